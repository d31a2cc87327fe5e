"""Sample mixing is an error: every operator raises ``BatchInteractionError`` naming the op or
module and the fix when ``f`` combines samples (``torchdiv._core.mixing``), and leaves batch
independent functions alone."""

from __future__ import annotations

import copy
import functools
import logging
import math
import sys
import threading
from collections.abc import Callable

import pytest
import torch
from conftest import LegacyCube
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.testing import assert_close

import torchdiv
from torchdiv import BatchInteractionError

f64 = torch.float64
UNBATCHED = r"x has no event dimensions.*pass batch_dims=0"
TRAIN_BN = r"BatchNorm1d in train mode.*model\.eval\(\)"
OPT_OUT = r"allow_batch_interaction\(\)"


def _net(dim: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, 5), nn.Tanh(), nn.Linear(5, dim)).to(f64)


def _bn_net(dim: int = 3) -> nn.Module:  # train mode: every new module's default
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.Tanh()).to(f64)


def _graph(op):
    """The graph form as a function of ``(f, x)``."""

    def call(f, x, **kwargs):
        x = x.clone().requires_grad_(True)
        return op(f(x), x, **kwargs)

    return call


def _flow(f, x, **kwargs):
    pytest.importorskip("torchdiffeq")
    bd = kwargs.get("batch_dims", 1)
    normal = lambda z: -0.5 * z.square().sum(tuple(range(bd, z.dim())))  # noqa: E731
    return torchdiv.flows.log_likelihood(
        lambda t, z: f(z), x, 0.0, 1.0, normal, solver="euler", options={"step_size": 0.5},
        **kwargs,
    )  # fmt: skip


OPERATORS = {
    "divergence": torchdiv.divergence,
    "jacobian": torchdiv.jacobian,
    "jacobian_diagonal": torchdiv.jacobian_diagonal,
    "laplacian": torchdiv.laplacian,
    "graph_divergence": _graph(torchdiv.graph_divergence),
    "graph_jacobian": _graph(torchdiv.graph_jacobian),
    "log_likelihood": _flow,
}


@pytest.mark.parametrize("name", OPERATORS)
def test_an_unbatched_x_is_an_error_that_says_batch_dims_0(name: str) -> None:
    # batch_dims=1 on x of shape (3,) reads three samples of one element: the forum's
    # column sums, not the divergence of the one sample
    with pytest.raises(BatchInteractionError, match=rf"^{name}: f mixes samples.*{UNBATCHED}"):
        OPERATORS[name](_net(), torch.randn(3, dtype=f64))


@pytest.mark.parametrize("name", OPERATORS)
def test_batch_dims_too_high_is_an_error(name: str) -> None:
    with pytest.raises(BatchInteractionError, match=rf"^{name}: .*batch_dims=2.*{OPT_OUT}"):
        OPERATORS[name](_net(), torch.randn(8, 3, dtype=f64), batch_dims=2)


@pytest.mark.parametrize("name", OPERATORS)
def test_train_mode_batch_norm_is_an_error_that_says_eval(name: str) -> None:
    match = r"batch norm in train mode.*model\.eval\(\)"
    with pytest.raises(BatchInteractionError, match=rf"^{name}: {match}|^{name}: f mixes.*{match}"):
        OPERATORS[name](_bn_net(), torch.randn(8, 3, dtype=f64))


@pytest.mark.parametrize(
    ("name", "method"),
    [
        ("divergence", "forward"),
        ("divergence", "reverse"),
        ("divergence", "structured"),
        ("jacobian", "forward"),
        ("jacobian", "reverse"),
        ("jacobian_diagonal", "forward"),
        ("jacobian_diagonal", "reverse"),
        ("laplacian", "taylor"),
        ("laplacian", "forward-over-reverse"),
        ("laplacian", "hessian"),
    ],
)
@pytest.mark.parametrize("dim", [3, 24])  # tiny problems and those "auto" plans
def test_train_mode_batch_norm_with_every_method(name: str, method: str, dim: int) -> None:
    # torch.func refused it with "in-place operation ... captured Tensor", never naming
    # batch norm; the statistics must not move either
    net, x = _bn_net(dim), torch.randn(32, dim, dtype=f64)
    before = [b.clone() for b in net[1].buffers()]
    with pytest.raises(BatchInteractionError, match=rf"^{name}: f mixes.*{TRAIN_BN}"):
        getattr(torchdiv, name)(net, x, method=method)
    for now, then in zip(net[1].buffers(), before, strict=True):
        assert torch.equal(now, then)
    assert net.training


@pytest.mark.parametrize(
    ("method", "num_probes", "case"),
    [
        ("hutchinson", 1, "unbatched"),  # one probe: plain autograd, checked on its graph
        ("hutchinson", 4, "unbatched"),
        ("hutchinson", 1, "batch norm"),
        ("hutchinson", 4, "batch norm"),
        ("xtrace", 2, "batch norm"),
    ],
)
def test_stochastic_methods_see_it_too(method: str, num_probes: int, case: str) -> None:
    f, x = (_net(), torch.randn(3, dtype=f64)) if case == "unbatched" else (
        _bn_net(), torch.randn(8, 3, dtype=f64)
    )  # fmt: skip
    match = UNBATCHED if case == "unbatched" else "batch norm in train mode"
    for call in (torchdiv.divergence, torchdiv.estimate_divergence):
        with pytest.raises(BatchInteractionError, match=rf"^{call.__name__}: .*{match}"):
            call(f, x, method=method, num_probes=num_probes)


def _scattered(x: torch.Tensor) -> torch.Tensor:
    """The same places in every sample, filled from the source in flat order: sample 1's
    places get sample 0's tail."""
    mask = (torch.arange(x.shape[1]) % 3 == 0).expand_as(x)
    return torch.zeros_like(x).masked_scatter(mask, x.sin()) + x**2


@pytest.mark.parametrize(
    ("f", "what"),
    [
        (lambda x: x - x.mean(0), r"a mean over samples \(dimension 0"),
        (lambda x: x.softmax(0), "a softmax over samples"),
        (lambda x: x * x.sum(), "a sum of all elements"),
        (lambda x: x @ x.T @ x, "a matrix product summing over samples"),
        (lambda x: x.sin() * x.diagonal(0, 0, 1).sum(), "a diagonal across samples"),
        (lambda x: x * x.diagonal(1, 1, 0).exp().sum(), "a diagonal across samples"),
        (lambda x: x * torch.trace(x), "a diagonal across samples"),  # trace's decomposition
        (_scattered, "a masked_scatter, which reads its source across samples"),
        (nn.LayerNorm(16).to(f64), None),  # a layer norm over the event: fine
    ],
)
@pytest.mark.parametrize("name", ["divergence", "jacobian_diagonal", "laplacian"])
def test_reductions_over_the_batch_are_errors(f, what, name: str) -> None:
    x = torch.randn(64, 16, dtype=f64)  # large enough for "auto" to record or watch f
    if what is None:
        getattr(torchdiv, name)(f, x)
        return
    with pytest.raises(BatchInteractionError, match=rf"^{name}: f mixes samples: {what}"):
        getattr(torchdiv, name)(f, x)


def test_the_generic_watch_sees_a_trace_across_samples() -> None:
    """``torch.trace`` is one kernel on CPU: the watch of ``jacobian``'s engines (never the
    structured recorder, which decomposes it) has its own rule for it."""
    x = torch.randn(64, 16, dtype=f64)
    with pytest.raises(BatchInteractionError, match="a diagonal across samples"):
        torchdiv.jacobian(lambda x: x * torch.trace(x), x)


@pytest.mark.parametrize("shape", [(256, 2), (8, 2), (4, 3), (256, 8)])
@pytest.mark.parametrize("name", ["divergence", "jacobian_diagonal", "jacobian"])
def test_tiny_problems_are_watched_on_each_new_function(shape, name: str) -> None:
    """Below ``"auto"``'s planning size the first call of each ``f`` at a shape is watched
    (it returned column sums: zeros for ``x - x.mean(0)``); later calls of an ``f`` that
    passed are not, and stay right."""
    x = torch.randn(*shape, dtype=f64)
    call = getattr(torchdiv, name)
    for mixing in (lambda x: x - x.mean(0), lambda x: x.tanh() * x.sum()):
        for _ in range(2):
            with pytest.raises(BatchInteractionError, match=rf"^{name}: f mixes samples"):
                call(mixing, x)
    net = _net(shape[1])
    want = torch.func.vmap(torch.func.jacrev(net))(x)
    if name != "jacobian":
        want = want.diagonal(0, -2, -1)
        want = want.sum(-1) if name == "divergence" else want
    for _ in range(2):  # watched, then plain autograd
        assert_close(call(net, x), want)


def test_a_bound_method_is_watched_once_for_its_object() -> None:
    """``net.forward`` is a new object at each access: it is known by its module."""
    from torchdiv._taylor import mixing

    net, x = _net(2), torch.randn(16, 2, dtype=f64)
    assert not mixing.passed_before(net.forward, x, 1)
    torchdiv.divergence(net.forward, x)
    assert mixing.passed_before(net.forward, x, 1)
    assert not mixing.passed_before(_net(2).forward, x, 1)


def test_a_wrapper_that_mixes_is_watched_after_what_it_wraps_passed() -> None:
    """Wrappers made by ``functools.wraps`` unwrap to the function they wrap: keyed by that,
    a mixing wrapper was trusted once the plain function had passed (zeros, no error)."""
    import functools

    def centered(g):
        @functools.wraps(g)
        def wrapper(z):
            y = g(z)
            return y - y.mean(0)

        return wrapper

    net, x = _net(3), torch.randn(64, 3, dtype=f64)
    torchdiv.divergence(net.forward, x)
    for name in ("divergence", "jacobian_diagonal", "jacobian"):
        with pytest.raises(BatchInteractionError, match="f mixes samples"):
            getattr(torchdiv, name)(centered(net.forward), x)


def test_a_submodule_swapped_for_one_that_mixes_is_watched() -> None:
    class Center(nn.Module):
        def forward(self, z):
            return z - z.mean(0)

    net, x = _net(3), torch.randn(64, 3, dtype=f64)
    torchdiv.divergence(net, x)
    net[2] = nn.Sequential(net[2], Center())
    with pytest.raises(BatchInteractionError, match="f mixes samples"):
        torchdiv.divergence(net, x)


@pytest.mark.parametrize("name", ["divergence", "jacobian"])
def test_a_submodule_switched_to_train_mode_alone_is_watched(name: str) -> None:
    """``model[0].train()`` inside a model in eval mode: only the submodule's mode changed
    (the structure key read the root's), and it now centres over the batch."""

    class CentredInTraining(nn.Module):
        def forward(self, z):
            return z - z.mean(0) if self.training else z

    net = nn.Sequential(nn.Sequential(nn.Linear(3, 3), CentredInTraining()), nn.Tanh())
    net = net.to(f64).eval()
    x = torch.randn(64, 3, dtype=f64)
    for _ in range(2):
        getattr(torchdiv, name)(net, x)
    net[0][1].train()
    with pytest.raises(BatchInteractionError, match="f mixes samples"):
        getattr(torchdiv, name)(net, x)


@pytest.mark.parametrize("name", ["laplacian", "value_grad_laplacian"])
def test_a_loop_at_one_input_is_watched_on_each_new_function(name: str) -> None:
    """At one input ``"auto"`` loops without recording: its first call of each ``f`` object
    is watched (it returned zeros for a mean over samples)."""
    x = torch.randn(8, 1, dtype=f64)
    for mixing in (lambda x: (x - x.mean(0)).pow(3).sum(-1), lambda x: (x * x.sum()).sum(-1)):
        for _ in range(2):
            with pytest.raises(BatchInteractionError, match="f mixes samples"):
                getattr(torchdiv, name)(mixing, x)


def test_the_module_is_named() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).to(f64)
    with pytest.raises(BatchInteractionError, match=r"in Linear, ATen op aten\.(add)?mm"):
        torchdiv.divergence(net, torch.randn(4, dtype=f64))
    conv = nn.Conv2d(3, 3, 3, padding=1).to(f64)
    with pytest.raises(BatchInteractionError, match=r"convolution across samples.*in Conv2d"):
        torchdiv.divergence(conv, torch.randn(2, 3, 8, 8, dtype=f64), batch_dims=2)


# ---- batch-independent functions are not flagged ----


@pytest.mark.parametrize(
    ("method", "num_probes"),
    [
        ("auto", None),
        ("forward", None),
        ("reverse", None),
        ("structured", None),
        ("hutchinson", 1),
        ("hutchinson", 2),
    ],
)
def test_an_elementwise_f_on_an_empty_event_is_its_derivative(method: str, num_probes) -> None:
    x = torch.randn(5, dtype=f64)
    probes = {} if num_probes is None else {"num_probes": num_probes}
    assert_close(torchdiv.divergence(torch.sin, x, method=method, **probes), x.cos())
    assert_close(torchdiv.laplacian(torch.sin, x), -x.sin())
    y = x.clone().requires_grad_(True)
    assert_close(torchdiv.graph_divergence(y.sin(), y), x.cos())


@pytest.mark.parametrize("batch", [(3,), (2, 2)])
@pytest.mark.parametrize(("n", "m"), [(2, 0), (0, 2), (0, 0)])
def test_a_reshape_of_no_elements_mixes_nothing(batch, n, m) -> None:
    """A per-sample map with an event of no elements in or out, reshaped (``y.reshape(B, m)``):
    the watch could not place the batch among the place values of a tensor of no elements,
    took the samples for spread across its dimensions, and ``"auto"`` raised
    ``BatchInteractionError`` where the Jacobian is the empty ``(B, m, n)``. A tensor of no
    elements holds no sample's values: it is not followed."""
    a = torch.randn(m, n, dtype=f64)

    def f(x: torch.Tensor) -> torch.Tensor:
        return (x.reshape(*batch, n) @ a.T).reshape(*batch, m)

    x = torch.randn(*batch, n, dtype=f64)
    jac = torchdiv.jacobian(f, x, batch_dims=len(batch))
    assert_close(jac, torch.zeros(*batch, m, n, dtype=f64))
    if n == m:
        div = torchdiv.divergence(f, x, batch_dims=len(batch))
        assert_close(div, torch.zeros(batch, dtype=f64))


def _per_sample_reference(f, x: torch.Tensor) -> torch.Tensor:
    """Every sample's divergence from ``torch.func.jacrev`` on that sample alone (attention on
    the math backend, whose backward vmap batches)."""
    rows = []
    for b in range(len(x)):
        with sdpa_kernel([SDPBackend.MATH]):
            jac = torch.func.jacrev(lambda z, b=b: f(z[None], b)[0])(x[b])
        rows.append(jac.reshape(x[b].numel(), -1).trace())
    return torch.stack(rows)


def _attention() -> nn.Module:
    torch.manual_seed(1)
    return nn.MultiheadAttention(4, 2, batch_first=True).to(f64)


@pytest.mark.parametrize(
    ("case", "shape"),
    [
        ("closure over per-sample t", (64, 8)),
        ("eval-mode batch norm", (64, 8)),
        ("conv net", (4, 2, 6, 6)),
        ("attention within a sample", (8, 5, 4)),
        ("instance norm", (4, 2, 6, 6)),
        ("layer norm", (64, 8)),
        ("reduction under no_grad", (64, 8)),
    ],
)
@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap of fused attention
def test_independent_functions_are_not_flagged(case: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(2)
    x = torch.randn(*shape, dtype=f64)
    t = torch.rand(len(x), dtype=f64)
    mlp = _net(8)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3, padding=1))
    conv = conv.to(f64)
    bn = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Tanh()).to(f64)
    bn[1].running_mean.uniform_(-1, 1)
    bn.eval()
    attn, inorm = _attention(), nn.InstanceNorm2d(2, affine=True).to(f64)

    def no_grad_scale(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scale = z.abs().mean()  # the whole batch, but a constant for derivatives
        return mlp(z) * scale

    fs = {
        "closure over per-sample t": lambda z, b=None: (
            mlp(z) * (t if b is None else t[b : b + 1])[:, None]
        ),
        "eval-mode batch norm": lambda z, b=None: bn(z),
        "conv net": lambda z, b=None: conv(z),
        "attention within a sample": lambda z, b=None: attn(z, z, z, need_weights=False)[0],
        "instance norm": lambda z, b=None: inorm(z),
        "layer norm": lambda z, b=None: nn.functional.layer_norm(z, (8,)),
    }
    if case == "reduction under no_grad":
        with torch.no_grad():
            scale = x.abs().mean()
        expected = torchdiv.divergence(lambda z: mlp(z) * scale, x, method="reverse")
        assert_close(torchdiv.divergence(no_grad_scale, x), expected)
        return
    f = fs[case]
    expected = _per_sample_reference(f, x)
    for method in ("auto", "reverse"):
        assert_close(torchdiv.divergence(lambda z: f(z), x, method=method), expected)
    y = x.clone().requires_grad_(True)
    assert_close(torchdiv.graph_divergence(f(y), y), expected)


def test_batch_dims_2_on_truly_batched_data() -> None:
    net = _net(3)
    x = torch.randn(4, 5, 3, dtype=f64)  # 4 x 5 samples of 3 features
    flat = torchdiv.divergence(net, x.reshape(20, 3))
    for method in ("auto", "structured", "forward", "reverse"):
        assert_close(torchdiv.divergence(net, x, batch_dims=2, method=method), flat.reshape(4, 5))
    assert_close(
        torchdiv.laplacian(net, x, batch_dims=2),
        torchdiv.laplacian(net, x.reshape(20, 3)).reshape(4, 5, 3),
    )


SQUARE_BATCH = {  # x of shape (3, 3, 2), batch_dims=2: the two batch dimensions of equal size
    "transposed": lambda net: lambda z: net(z.transpose(0, 1)),
    "permuted": lambda net: lambda z: net(z.permute(1, 0, 2)),
    "times its transpose": lambda net: lambda z: net(z) * z.transpose(0, 1),
    "stacked along the other dimension": lambda net: (
        lambda z: torch.stack([net(z[:, i]) for i in range(3)])
    ),
    "merged, then split the other way": lambda net: (
        lambda z: net(z.reshape(9, 2)).reshape(3, 3, 2).transpose(0, 1)
    ),
}


@pytest.mark.parametrize("case", SQUARE_BATCH)
@pytest.mark.parametrize(
    "name, method", [("divergence", "auto"), ("divergence", "structured"), ("laplacian", "auto")]
)
def test_batch_dimensions_of_equal_size_swapped_are_mixing(case: str, name: str, method: str):
    """With ``batch_dims=2`` and a square batch, sample ``(i, j)`` of ``x.transpose(0, 1)`` is
    sample ``(j, i)``: the watch told batch dimensions apart by size only, and "auto" and
    "structured" returned the other samples' terms (different wrong values)."""
    net = _net(2)
    f, x = SQUARE_BATCH[case](net), torch.randn(3, 3, 2, dtype=f64)
    jac = torch.autograd.functional.jacobian(f, x)
    assert jac[0, 1, :, 1, 0].abs().max() > 1e-3  # sample (0, 1) reads sample (1, 0)
    g = f if name == "divergence" else (lambda z: f(z).sum(-1))
    with pytest.raises(BatchInteractionError, match=rf"^{name}: f mixes samples: .*batch dim"):
        getattr(torchdiv, name)(g, x, batch_dims=2, method=method)


def test_batch_dimensions_swapped_and_swapped_back_are_per_sample() -> None:
    net = _net(2)
    x = torch.randn(3, 3, 2, dtype=f64)
    fs = [
        lambda z: net(z.transpose(0, 1)).transpose(0, 1),
        lambda z: net(z.reshape(9, 2)).reshape(3, 3, 2),
        lambda z: torch.stack([net(z[:, i]) for i in range(3)], 1),
    ]
    expected = torchdiv.divergence(net, x.reshape(9, 2), method="reverse").reshape(3, 3)
    for f in fs:
        for method in ("auto", "structured"):
            assert_close(torchdiv.divergence(f, x, batch_dims=2, method=method), expected)


# ---- the opt-out ----


def test_allow_batch_interaction_gives_the_batched_derivative() -> None:
    net, x = _net(), torch.randn(3, dtype=f64)
    with torchdiv.allow_batch_interaction():
        mixed = torchdiv.divergence(net, x)  # what the caller asked for: column sums
        bn = torchdiv.divergence(_bn_net(), torch.randn(8, 3, dtype=f64))
    y = x.clone().requires_grad_(True)
    (column_sums,) = torch.autograd.grad(net(y), y, torch.ones(3, dtype=f64))
    assert_close(mixed, column_sums)
    assert bn.shape == (8,)
    with pytest.raises(BatchInteractionError):  # back on after the block
        torchdiv.divergence(net, x)


def test_allow_batch_interaction_is_per_thread_and_nests() -> None:
    net, x = _net(), torch.randn(3, dtype=f64)
    seen = []
    with torchdiv.allow_batch_interaction():
        with torchdiv.allow_batch_interaction():
            pass
        torchdiv.divergence(net, x)  # still off after the inner block

        def other() -> None:
            try:
                torchdiv.divergence(net, x)
            except BatchInteractionError:
                seen.append("raised")

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert seen == ["raised"]


def test_the_check_reports_what_the_operators_refuse() -> None:
    # check_batch_independence agrees with the automatic detection on the issue's cases
    for f, x, bd in [
        (_net(), torch.randn(3, dtype=f64), 1),
        (_net(), torch.randn(8, 3, dtype=f64), 2),
        (_bn_net(), torch.randn(8, 3, dtype=f64), 1),
    ]:
        with pytest.raises(BatchInteractionError, match="check_batch_independence: samples"):
            torchdiv.check_batch_independence(f, x, batch_dims=bd)
    assert math.isfinite(float(torchdiv.divergence(torch.sin, torch.zeros(2)).sum()))


def _weighted(f, x, **kwargs):
    n = x[(0,) * kwargs.get("batch_dims", 1)].numel()
    return torchdiv.weighted_laplacian(f, x, diffusion=torch.eye(n, dtype=f64), **kwargs)


SECOND_ORDER = {
    "weighted_laplacian": _weighted,
    "biharmonic": torchdiv.biharmonic,
    "value_grad_laplacian": torchdiv.value_grad_laplacian,
    "graph_laplacian": _graph(torchdiv.graph_laplacian),
}


@pytest.mark.parametrize("name", SECOND_ORDER)
@pytest.mark.parametrize("method", ["auto", "forward-over-reverse"])
def test_second_order_operators_too(name: str, method: str) -> None:
    options = {} if name == "graph_laplacian" else {"method": method}
    call = SECOND_ORDER[name]
    train_bn = r"batch norm in train mode.*model\.eval\(\)"
    with pytest.raises(BatchInteractionError, match=rf"^{name}: f mixes samples.*{train_bn}"):
        call(_bn_net(), torch.randn(8, 3, dtype=f64), **options)
    with pytest.raises(BatchInteractionError, match=rf"^{name}: f mixes samples.*batch_dims=2"):
        call(_net(), torch.randn(8, 3, dtype=f64), batch_dims=2, **options)


def test_a_sum_that_only_seeds_a_backward_pass_is_not_mixing() -> None:
    # a score model: grad(energy(x).sum(), x) is per sample, though the sum is over the batch
    torch.manual_seed(4)
    energy = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1)).to(f64)

    def score(x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x if x.requires_grad else x.requires_grad_(True)
            return torch.autograd.grad(energy(x).sum(), x, create_graph=True)[0]

    x = torch.randn(64, 16, dtype=f64)
    expected = torchdiv.laplacian(lambda z: energy(z).squeeze(-1), x, method="taylor")
    for method in ("auto", "reverse"):
        assert_close(torchdiv.divergence(score, x, method=method), expected)
    # but a sum that reaches the output mixes samples
    with pytest.raises(BatchInteractionError, match="a sum of all elements"):
        torchdiv.divergence(lambda z: score(z) * energy(z).sum(), x)


def test_a_train_mode_batch_norm_of_something_else_is_not_mixing() -> None:
    """A batch norm in f's graph that does not see x (a scale computed from a constant) leaves
    samples independent: the graph-watching paths must not flag it."""
    torch.manual_seed(5)
    bn = nn.BatchNorm1d(3).to(f64)  # train mode
    c = torch.randn(8, 3, dtype=f64)
    x = torch.randn(8, 3, dtype=f64)
    f = lambda z: z * bn(c)  # noqa: E731
    with torch.no_grad():
        expected = bn(c).sum(-1)
    generator = torch.Generator().manual_seed(0)
    one = torchdiv.estimate_divergence(f, x, num_probes=1, generator=generator)
    xr = x.clone().requires_grad_(True)
    assert_close(torchdiv.graph_divergence(f(xr), xr), expected)
    assert one.value.shape == (8,)


def test_split_reads_its_dimension_after_the_sizes() -> None:
    """``split(sizes, dim)`` has the dimension third: a split of the event keeps the batch
    dimension tracked (it used to read the sizes as the dimension: a list raised, an int was
    taken for a dimension)."""
    x = torch.randn(8, 6, dtype=f64)
    within = lambda z: torch.cat([p.sin() for p in z.split([2, 4], dim=1)], 1)  # noqa: E731
    assert_close(torchdiv.laplacian(within, x, method="taylor"), -x.sin())
    halves = lambda z: torch.cat([p.sin() for p in z.split(3, 1)], 1)  # noqa: E731
    assert_close(torchdiv.laplacian(halves, x, method="taylor"), -x.sin())


def test_a_remembered_loop_still_watches_for_mixing() -> None:
    """``laplacian``'s ``"auto"`` remembers a decision to loop per function code: a later
    function with the same code that mixes samples is still caught (it returned zeros)."""

    def make(mix: bool):
        return lambda x: ((x - x.mean(0)) if mix else x).pow(3).sum(-1)

    x = torch.randn(8, 2, dtype=f64)
    for name in ("laplacian", "value_grad_laplacian"):
        getattr(torchdiv, name)(make(False), x)  # remembered: loop
        with pytest.raises(BatchInteractionError, match="a mean over samples"):
            getattr(torchdiv, name)(make(True), x)


def test_a_remembered_loop_watches_each_object_once(monkeypatch) -> None:
    """The loop's evaluation of ``f`` is watched op by op until that very object has passed a
    watch at the structure (recording watches it too); later calls search only its autograd
    graph, which still catches the mixing a later call can bring in without changing the
    structure key: a batch norm switched to train mode."""
    from torchdiv._core.mixing import watch
    from torchdiv._laplacian import loop, methods
    from torchdiv._taylor import mixing as seen
    from torchdiv._taylor.cache import PlanCache

    monkeypatch.setattr(methods, "_LOOPS", PlanCache(256))
    monkeypatch.setattr(seen, "_PASSED", PlanCache(256))
    watched, graphs = [], []
    monkeypatch.setattr(loop, "watched", lambda *a: watched.append(1) or watch.watched(*a))
    monkeypatch.setattr(
        loop, "check_graph", lambda *a, **k: graphs.append(1) or watch.check_graph(*a, **k)
    )
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).to(f64)
    net.eval()
    x = torch.randn(16, 2, dtype=f64)
    make = lambda: lambda z: net(z).squeeze(-1)  # noqa: E731
    expected = torchdiv.laplacian(make(), x, method="hessian")
    f = make()
    for call in range(3):  # recorded (watched there), then only its graph searched
        watched.clear(), graphs.clear()
        assert_close(torchdiv.laplacian(f, x), expected)
        assert (len(watched), len(graphs)) == ((0, 0) if call == 0 else (0, 1)), call
    g = make()  # the same code over the same net, a new object: the same f, graph searched
    for call in range(2):
        watched.clear(), graphs.clear()
        assert_close(torchdiv.laplacian(g, x), expected)
        assert (len(watched), len(graphs)) == (0, 1), call
    other = copy.deepcopy(net)  # another net, another structure: recorded (watched) again
    for call in range(2):
        watched.clear(), graphs.clear()
        assert_close(torchdiv.laplacian(lambda z: other(z).squeeze(-1), x), expected)
        assert (len(watched), len(graphs)) == ((0, 0) if call == 0 else (0, 1)), call
    net.train()  # the key holds f's code and x, not the module f closes over
    with pytest.raises(
        BatchInteractionError, match=r"^laplacian: f mixes samples: a batch norm in train mode"
    ):
        torchdiv.laplacian(f, x)


PICKED = {
    "x * x[0]": lambda x: x * x[0],
    "x - x[-1]": lambda x: x - x[-1],
    "x * x[:1]": lambda x: x.tanh() * x[:1],
    "narrow": lambda x: x + x.narrow(0, 2, 1).sin(),
    "unbind": lambda x: x * x.unbind(0)[1].exp(),
    "split": lambda x: x * x.split(1)[3],
    "a time read from the first sample": lambda x: x * x[0, -1],
    "two samples": lambda x: x * (x[0] * x[1]),
}


@pytest.mark.parametrize("case", PICKED)
@pytest.mark.parametrize(
    ("name", "method", "shape"),
    [
        ("divergence", "auto", (4, 3)),  # tiny: watched on the first call
        ("divergence", "auto", (64, 16)),  # planned by recording
        ("jacobian_diagonal", "structured", (8, 4)),
        ("laplacian", "auto", (8, 4)),
        ("laplacian", "taylor", (64, 16)),
    ],
)
def test_a_sample_picked_out_and_combined_with_the_batch_is_mixing(case, name, method, shape):
    """``x * x[0]`` makes every sample depend on sample 0: the per-sample derivatives of the
    batched ``f`` are not its Jacobian's diagonal blocks (they were returned silently)."""
    f = PICKED[case]
    g = (lambda x: f(x).square().sum(-1)) if name == "laplacian" else f
    x = torch.randn(*shape, dtype=f64)
    with pytest.raises(BatchInteractionError, match=rf"^{name}: f mixes samples: sample \d"):
        getattr(torchdiv, name)(g, x, method=method)


@pytest.mark.parametrize(
    "case",
    [
        "stack",
        "cat of x[i:i+1]",
        "stack, then the batch",
        "whole slice",
        "chunks",
        "chunks, one of a single sample, then the batch",
        "the first sample apart, then the batch",
        "in reverse, flipped back, then the batch",
        "padded with the last sample",
        "batch_dims=2",
    ],
)
def test_independent_functions_that_pick_samples_are_not_mixing(case: str) -> None:
    """A loop over the samples (``for xi in x``) stacked back in order is per sample, also
    when combined with the batch afterwards; so are a slice of the whole batch, chunks (one of
    a single sample), a loop in reverse flipped back, a batch padded with its last sample
    (these four were flagged by a first version of the pick tracking)."""
    net = _net(3)
    x = torch.randn(6, 3, dtype=f64)
    fs = {
        "stack": lambda z: torch.stack([net(zi) for zi in z]),
        "cat of x[i:i+1]": lambda z: torch.cat([net(z[i : i + 1]) for i in range(len(z))]),
        "stack, then the batch": lambda z: z.sin() + torch.stack([net(zi) for zi in z], 0),
        "whole slice": lambda z: z[0 : len(z)] * net(z),
        "chunks": lambda z: torch.cat([net(c) for c in z.split(4)]) * z,
        "chunks, one of a single sample, then the batch": lambda z: (
            z.sin() + torch.cat([net(c) for c in z.split(5)])
        ),
        "the first sample apart, then the batch": lambda z: (
            z.sin() + torch.cat([net(z[:1]), net(z[1:])])
        ),
        "in reverse, flipped back, then the batch": lambda z: (
            z.sin() + torch.stack([net(zi) for zi in reversed(z.unbind())]).flip(0)
        ),
        "padded with the last sample": lambda z: net(torch.cat([z, z[-1:].expand(3, -1)]))[
            : len(z)
        ],
        "batch_dims=2": lambda z: torch.stack([net(zi) for zi in z.unbind(1)], 1),
    }
    f, expected = fs[case], torch.func.vmap(torch.func.jacrev(net))(x).diagonal(0, -2, -1)
    if case == "whole slice":
        expected = torch.func.vmap(torch.func.jacrev(lambda z: z * net(z)))(x).diagonal(0, -2, -1)
    if case.endswith("then the batch"):
        expected = expected + x.cos()
    if case == "chunks":
        expected = torch.func.vmap(torch.func.jacrev(lambda z: net(z) * z))(x).diagonal(0, -2, -1)
    if case == "batch_dims=2":
        x2 = torch.randn(2, 6, 3, dtype=f64)
        for method in ("auto", "structured"):
            got = torchdiv.jacobian_diagonal(f, x2, batch_dims=2, method=method)
            assert_close(got, torchdiv.jacobian_diagonal(net, x2, batch_dims=2, method="reverse"))
        return
    for method in ("auto", "structured"):
        assert_close(torchdiv.jacobian_diagonal(f, x, method=method), expected)
    u = lambda z: f(z).square().sum(-1)  # noqa: E731
    assert_close(
        torchdiv.laplacian(u, x, method="taylor"), torchdiv.laplacian(u, x, method="grad-of-grad")
    )


@pytest.mark.parametrize("n", [4, 64])  # tiny problems and those "auto" plans
def test_samples_moved_into_the_output_event_are_mixing(n: int) -> None:
    """A broadcasting slip (``z @ A`` with a per-sample ``A`` of shape ``(B, d, d)`` gives
    ``(B, B, d)``): no op sums over samples, yet output sample ``c`` depends on every sample
    of ``x``; ``jacobian`` and ``laplacian`` returned numbers, silently."""
    a = torch.randn(n, 3, 3, dtype=f64)
    x = torch.randn(n, 3, dtype=f64)
    slips = {
        "jacobian": lambda z: torch.tanh(z @ a),
        "laplacian": lambda z: torch.tanh(z @ a).square().sum(-1),
    }
    for name, f in slips.items():
        with pytest.raises(BatchInteractionError, match=r"samples run along dimension 1"):
            getattr(torchdiv, name)(f, x)
    outer = lambda z: torch.einsum("bi,cj->bcij", z, z).sum(-1)  # noqa: E731
    with pytest.raises(BatchInteractionError, match=r"samples run along dimension 1"):
        torchdiv.jacobian(outer, x)


class _CentredInTraining(nn.Module):
    """Subtracts the batch mean in train mode only (a hand-written normalisation)."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y - y.mean(0) if self.training else y


_GLOBAL_NET = nn.Sequential(nn.Linear(16, 16), _CentredInTraining(), nn.Tanh()).double()


def _through_global(z: torch.Tensor) -> torch.Tensor:
    return _GLOBAL_NET(z)


@pytest.mark.parametrize("shape", [(8, 4), (200, 16)])  # tiny; square rows up to 2**16
def test_a_module_reached_by_name_switched_to_train_is_watched_again(shape) -> None:
    """A function's structure holds the modules it names (closure cells, globals, and those
    of the functions it names): switched to train mode, it mixes samples, and the later
    calls, unwatched once the first passed, returned other samples' terms without an
    error (a closure's rebinding too)."""
    d = shape[1]
    net = nn.Sequential(nn.Linear(d, d), _CentredInTraining(), nn.Tanh()).double().eval()
    x = torch.randn(*shape, dtype=f64)
    closure = lambda z: net(z)  # noqa: E731
    global_net = lambda z: _through_global(z)  # noqa: E731  (a global function naming a global)
    inner = torch.tanh
    rebound = lambda z: inner(z)  # noqa: E731
    _GLOBAL_NET.eval()
    try:
        for f, module in ((closure, net), (global_net, _GLOBAL_NET)):
            if d != 16 and module is _GLOBAL_NET:
                continue
            for _ in range(3):
                torchdiv.jacobian(f, x)
            module.train()
            with pytest.raises(BatchInteractionError, match="a mean over samples"):
                torchdiv.jacobian(f, x)
        for _ in range(3):
            torchdiv.jacobian(rebound, x)
        inner = lambda z: z - z.mean(0)  # noqa: E731
        with pytest.raises(BatchInteractionError, match="a mean over samples"):
            torchdiv.jacobian(rebound, x)
    finally:
        _GLOBAL_NET.eval()


def test_objects_a_function_names_are_looked_into_only_if_modules_or_functions() -> None:
    """A config whose ``__getattr__`` raises ``KeyError`` (a dict-backed one) or a stand-in
    that claims to be a module: the structure key leaves them alone (they crashed it)."""
    from unittest import mock

    class Config:
        def __init__(self) -> None:
            self._values = {"scale": 2.0}

        def __getattr__(self, name: str) -> float:
            return self._values[name]

    config, stand_in = Config(), mock.MagicMock(spec=nn.Module)
    x = torch.randn(4, 3, dtype=f64)
    f = lambda z: config.scale * z.tanh() + 0 * len(str(stand_in))  # noqa: E731
    assert_close(torchdiv.divergence(f, x), (2 * (1 - x.tanh() ** 2)).sum(-1))


# ---- samples selected and put back: masks, integer indices, gathers, scatters ----


def _moves(net: nn.Module, perm: torch.Tensor) -> dict:
    """Functions that select samples along the batch (a mask computed from ``x``, integer
    indices, ``gather``, ``scatter``, ...): the ``ALLOWED`` ones put each sample's values
    back in its own place, the others give sample ``b`` other samples' terms."""
    inv = perm.argsort()

    def put_back(x):  # the reviewer's case: y[m] = g(x[m]) with m computed from x
        y = x.clone()
        m = x[:, 0] > 0
        y[m] = net(x[m])
        return y

    def into_zeros(x):
        y = torch.zeros_like(x)
        m = (x[:, 0] > 0).nonzero().squeeze(1)
        y[m] = net(x[m])
        return y + x.sin()

    def whole_mask(x):
        y = x.clone()
        m = x > 0
        y[m] = x[m].sin()
        return y

    def added_in_place(x):
        y = x.clone()
        m = torch.where(x[:, 0] > 0)
        y[m] += net(x[m])
        return y

    def centred(x):  # the selected samples combined: mixing
        y = x.clone()
        m = x[:, 0] > 0
        v = net(x[m])
        y[m] = v - v.mean(0)
        return y

    def flipped(x):
        y = x.clone()
        m = x[:, 0] > 0
        y[m] = net(x[m]).flip(0)
        return y

    def other_mask(x):
        y = x.clone()
        y[x[:, 0] > 0] = net(x[x[:, 0] <= 0][:1]).expand(int((x[:, 0] > 0).sum()), -1)
        return y

    def one_row_times_batch(x):
        return x * net(x[torch.arange(len(x)) == 2])

    return {
        "y[m] = g(x[m])": put_back,
        "into zeros_like(x) at nonzero": into_zeros,
        "mask over the whole tensor": whole_mask,
        "y[where(c)] += g(x[where(c)])": added_in_place,
        "permuted, then inverted": lambda x: net(x[perm])[inv],
        "index_select, then inverted": lambda x: net(x.index_select(0, perm)).index_select(0, inv),
        "flipped twice": lambda x: net(x.flip(0)).flip(0),
        "y[perm] = g(x[perm])": lambda x: torch.zeros_like(x).index_put((perm,), net(x[perm])),
        "index_copy of x[perm] at perm": lambda x: torch.zeros_like(x).index_copy(
            0, perm, net(x[perm])
        ),
        "scatter of x[perm] at perm": lambda x: torch.zeros_like(x).scatter(
            0, perm[:, None].expand_as(x), net(x[perm])
        ),
        "one element per sample": lambda x: x * x[torch.arange(len(x)), perm % x.shape[1], None],
        "gather along the event": lambda x: x.gather(
            1, (perm[:, None] + torch.arange(x.shape[1])) % x.shape[1]
        ).exp(),
        "each sample's entries sorted": lambda x: (
            x[torch.arange(len(x))[:, None], x.argsort(-1)] * x
        ),
        "masked_scatter of g(x[m]) at m": lambda x: x.masked_scatter(x > 0, x[x > 0].exp()),
        "flattened, flipped twice": lambda x: net(x.reshape(-1).flip(0).flip(0).reshape(x.shape)),
        "rolled flat by a sample and back": lambda x: torch.roll(
            torch.roll(x, x.shape[1]).sin(), -x.shape[1]
        ),
        # refused
        "x[perm]": lambda x: net(x[perm]),
        "flattened, flipped": lambda x: net(x.reshape(-1).flip(0).reshape(x.shape)),
        "flattened, rolled by a sample": lambda x: net(
            x.reshape(-1).roll(x.shape[1], 0).reshape(x.shape)
        ),
        "rolled flat by one element": lambda x: torch.roll(x, 1).sin(),
        "flattened, permuted": lambda x: net(x.reshape(-1)[_flat_perm(x)].reshape(x.shape)),
        "per-pair sums by index_add": lambda x: (
            x - torch.zeros(2, x.shape[1], dtype=x.dtype).index_add(0, _pairs(x), x)[_pairs(x)] / 3
        ),
        "per-pair sums by scatter_add": lambda x: (
            x
            - torch.zeros(2, x.shape[1], dtype=x.dtype).scatter_add(
                0, _pairs(x)[:, None].expand_as(x), x
            )[_pairs(x)]
            / 3
        ),
        "a sum by index_put(accumulate=True)": lambda x: (
            x
            * torch.zeros(1, x.shape[1], dtype=x.dtype).index_put(
                (_pairs(x) * 0,), x, accumulate=True
            )
        ),
        "x[argwhere(c)] summed": lambda x: x + x[torch.argwhere(x[:, 0] > 0)[:, 0]].sum(0),
        "x[m] summed": lambda x: x * x[x[:, 0] > 0].sum(),
        "masked_select summed": lambda x: x * torch.masked_select(x, x > 0).sum(),
        "index_select": lambda x: net(x.index_select(0, perm)),
        "gather": lambda x: x.gather(0, perm[:, None].expand_as(x)).sin(),
        "take_along_dim": lambda x: torch.take_along_dim(x, perm[:, None], 0).sin(),
        "repeated sample": lambda x: net(x[torch.zeros(len(x), dtype=torch.long)]),
        "roll": lambda x: net(x.roll(1, 0)),
        "x[perm] * x": lambda x: x[perm] * x,
        "x[perm] multiplied into x in place": lambda x: x.sin().mul_(x[perm]),
        "y[m] = centred g(x[m])": centred,
        "y[m] = g(x[m]).flip(0)": flipped,
        "y[m] = g(x[other mask])": other_mask,
        "one row times the batch": one_row_times_batch,
        "scatter at perm": lambda x: torch.zeros_like(x).scatter(
            0, perm[:, None].expand_as(x), x.sin()
        ),
        "index_add at perm": lambda x: torch.zeros_like(x).index_add(0, perm, x.sin()),
        "index_copy at perm": lambda x: torch.zeros_like(x).index_copy(0, perm, x.sin()),
    }


def _flat_perm(x: torch.Tensor) -> torch.Tensor:
    """A permutation of ``x``'s elements across samples."""
    return torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))


def _pairs(x: torch.Tensor) -> torch.Tensor:
    """A cluster of two for every sample: even or odd."""
    return torch.arange(len(x)) % 2


# every way a call watches f: (operator, method, x's shape)
WATCHED_CALLS = [
    ("divergence", "auto", (6, 3)),  # tiny: watched on the first call
    ("divergence", "auto", (64, 16)),  # recorded (the structured step)
    ("jacobian_diagonal", "structured", (6, 3)),
    ("jacobian", "auto", (6, 3)),
    ("laplacian", "auto", (6, 3)),
    ("laplacian", "taylor", (64, 16)),
]
REFUSED = {
    "x[perm]": r"aten\.index\.Tensor\) moved samples along the batch: place \d+ .* holds sample",
    "x[argwhere(c)] summed": r"a sum over samples",
    "x[m] summed": r"a sum of all elements",
    "masked_select summed": r"a sum of all elements",
    "index_select": r"aten\.index_select\.default moved samples along the batch",
    "gather": r"aten\.gather\.default moved samples",
    "take_along_dim": r"aten\.gather\.default moved samples",
    "repeated sample": r"computed from sample 0 picked out of the batch by an indexing op",
    "roll": r"aten\.roll\.default moved samples",
    "x[perm] * x": r"samples moved by an indexing op, combined elementwise with others",
    "x[perm] multiplied into x in place": r"samples moved by an indexing op .*combined elementwise",
    "y[m] = centred g(x[m])": r"values written into other samples' places",
    "y[m] = g(x[m]).flip(0)": r"values written into other samples' places .*by aten\.flip",
    "y[m] = g(x[other mask])": r"sample \d+ picked .*, written into other samples' places",
    "one row times the batch": r"sample 2 picked out of the batch .*combined with the whole batch",
    "scatter at perm": r"values written into other samples' places \(ATen op aten\.scatter",
    "index_add at perm": r"written into other samples' places \(ATen op aten\.index_(add|put)",
    "index_copy at perm": r"written into other samples' places \(ATen op aten\.index_(copy|put)",
    "flattened, flipped": r"aten\.flip\.default moved samples along the batch",
    "flattened, rolled by a sample": r"aten\.roll\.default moved samples along the batch",
    "rolled flat by one element": r"samples moved across dimensions by a roll of the flattened",
    "flattened, permuted": r"moved by an indexing op .*, reshaped to .* across their places",
    "per-pair sums by index_add": r"added into a tensor of shape \(2, \d+\), not x's batch",
    "per-pair sums by scatter_add": r"added into a tensor .*aten\.(scatter_add|index_put)",
    "a sum by index_put(accumulate=True)": r"samples added into a tensor of shape \(1, \d+\)",
}
MOVES = list(_moves(nn.Identity(), torch.arange(3)))
ALLOWED = [case for case in MOVES if case not in REFUSED]
RECORDED = {"permuted, then inverted", "index_select, then inverted", "flipped twice"}
RECORDED |= {
    "one element per sample",
    "gather along the event",
    "each sample's entries sorted",
}  # no index_put: taylor's too
ALONE = {"y[m] = g(x[m])", "mask over the whole tensor", "y[where(c)] += g(x[where(c)])"}
ALONE |= {"flipped twice", "into zeros_like(x) at nonzero"}  # f of one sample is its part
ALONE |= {
    "each sample's entries sorted",
    "flattened, flipped twice",
    "rolled flat by a sample and back",
}


def _moved_setup(case: str, shape: tuple[int, int]):
    torch.manual_seed(7)
    x = torch.randn(*shape, dtype=f64)
    perm = torch.randperm(shape[0])
    perm[:2] = perm[:2].flip(0) if bool((perm == torch.arange(shape[0])).all()) else perm[:2]
    return _moves(_net(shape[1]), perm)[case], x


def _per_sample_blocks(f, x: torch.Tensor) -> torch.Tensor:
    """Each sample's Jacobian block ``(B, D, D)`` by plain autograd, after checking that ``f``
    has none across samples: the whole ``(B, D, B, D)`` Jacobian for a small batch; for a
    larger one a VJP with a random sign per sample, which for independent samples is exactly
    the signed VJP (``J^T (s u) = s J^T u``), then one VJP per output coordinate."""
    z = x.clone().requires_grad_(True)
    y = f(z)
    if len(x) <= 8:
        full = torch.autograd.functional.jacobian(f, x)
        blocks = full.diagonal(0, 0, 2).permute(2, 0, 1)
        assert_close(full.abs().sum(), blocks.abs().sum())  # nothing across samples
        return blocks
    u = torch.randn_like(y)
    signs = torch.randint(0, 2, (len(x), 1), dtype=x.dtype) * 2 - 1
    (plain,) = torch.autograd.grad(y, z, u, retain_graph=True)
    (signed,) = torch.autograd.grad(y, z, signs * u, retain_graph=True)
    assert_close(signed, signs * plain, rtol=0, atol=1e-12)
    rows = [torch.autograd.grad(y[:, i].sum(), z, retain_graph=True)[0] for i in range(y.shape[1])]
    return torch.stack(rows, 1)


def _per_sample_hessian_trace(u, x: torch.Tensor) -> torch.Tensor:
    """Each sample's Laplacian by plain autograd, a grad-of-grad loop over its own inputs with
    the other samples held fixed (the batch is what ``u`` sees)."""
    rows = []
    for b in range(len(x)):
        total = torch.zeros((), dtype=x.dtype)
        for i in range(x.shape[1]):
            z = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(u(z)[b], z, create_graph=True)
            total = total + torch.autograd.grad(g[b, i], z)[0][b, i]
        rows.append(total)
    return torch.stack(rows)


@pytest.mark.parametrize("case", ALLOWED)
@pytest.mark.parametrize("shape", [(6, 3), (64, 16)])  # tiny, and recorded by "auto"
def test_samples_selected_and_put_back_in_place_are_per_sample(case: str, shape) -> None:
    """A mask computed from ``x`` that selects samples and writes them back into the same
    places, a permutation undone, a gather within each sample: sample ``b``'s Jacobian is its
    own (the whole batch's Jacobian by plain autograd has no blocks off the diagonal), and
    every watched method returns it, as ``jacrev`` on each sample alone does."""
    f, x = _moved_setup(case, shape)
    blocks = _per_sample_blocks(f, x)
    if case in ALONE:  # each sample alone (a mask: no vmap)
        alone = [torch.func.jacrev(lambda z: f(z[None])[0])(x[b]) for b in range(0, len(x), 7)]
        assert_close(torch.stack(alone), blocks[::7])
    diagonal = blocks.diagonal(0, -2, -1)
    methods = ["auto", "structured"] if case in RECORDED else ["auto"]
    for method in methods:
        assert_close(torchdiv.divergence(f, x, method=method), diagonal.sum(-1))
        assert_close(torchdiv.jacobian_diagonal(f, x, method=method), diagonal)
    assert_close(torchdiv.jacobian(f, x), blocks)
    if shape[0] > 6:
        return
    u = lambda z: f(z).square().sum(-1)  # noqa: E731
    expected = _per_sample_hessian_trace(u, x)
    for method in ["auto", "taylor"] if case in RECORDED else ["auto"]:
        assert_close(torchdiv.laplacian(u, x, method=method), expected)


@pytest.mark.parametrize("case", list(REFUSED))
@pytest.mark.parametrize(("name", "method", "shape"), WATCHED_CALLS)
@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap of scatter, index_put
def test_samples_moved_along_the_batch_are_refused(case: str, name, method, shape) -> None:
    """Samples an indexing op moved (a permutation, a repeat, a mask's rows combined, values
    written into other samples' places): sample ``b``'s derivatives would hold other samples'
    terms, which every watched method returned silently; now ``BatchInteractionError``
    names the op."""
    f, x = _moved_setup(case, shape)
    if shape[0] == 6:
        full = torch.autograd.functional.jacobian(f, x)  # plain autograd
        blocks = full.diagonal(0, 0, 2).permute(2, 0, 1)
        assert float(full.abs().sum() - blocks.abs().sum()) > 1e-3  # truly mixing
    g = (lambda z: f(z).square().sum(-1)) if name == "laplacian" else f
    with pytest.raises(
        BatchInteractionError, match=rf"^{name}: f mixes samples: .*{REFUSED[case]}"
    ):
        getattr(torchdiv, name)(g, x, method=method)


@pytest.mark.parametrize("shape", [(6, 3), (64, 16)])
def test_a_masked_scatter_of_rows_moved_elsewhere_is_refused(shape) -> None:
    """``x.masked_scatter(m, x[m].flip(0))`` writes each selected value into another
    sample's place (``x.masked_scatter(m, g(x[m]))`` puts them back, allowed above)."""
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=f64)
    f = lambda z: z.masked_scatter(z > 0, z[z > 0].flip(0))  # noqa: E731
    with pytest.raises(BatchInteractionError, match=r"other samples' places .*masked_scatter"):
        torchdiv.divergence(f, x)


# ---- ops without a rule of their own (``_core.mixing.unknown._unknown``) ----


def _eye(z: torch.Tensor, n: int = 3) -> torch.Tensor:
    return torch.eye(n, dtype=z.dtype)


def _pooled(pool, z: torch.Tensor) -> torch.Tensor:
    """``pool`` over a (1, D, B) view of ``z``: the batch is the pooled axis."""
    return pool(z.T[None], 3, 1, 1).squeeze(0).T


def _grid_shifted(z: torch.Tensor) -> torch.Tensor:
    """``grid_sample`` of a (1, 1, D, B) view of ``z`` at the points one sample along: the
    batch is a spatial axis, the grid's values pick the samples read."""
    b, d = z.shape
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, d, dtype=z.dtype),
        torch.linspace(-1, 1, b, dtype=z.dtype),
        indexing="ij",
    )
    grid = torch.stack([xs + 2 / (b - 1), ys], -1)[None]
    return F.grid_sample(z.T[None, None], grid, align_corners=True, padding_mode="border")[0, 0].T


F = nn.functional
# pdist, or the differences SafeDerivatives computes it from (the engines run f under it)
PDIST = r"pairwise distances across samples|samples moved by an indexing op \(aten\.index\.Tensor\)"
UNKNOWN = {  # f of z (B, D), D >= 3: an op no table knows combines samples -> what is named
    "dist": (lambda z: z * torch.dist(z, z.sin(), 3), r"dist of a tensor holding samples"),
    "renorm over the batch": (lambda z: torch.renorm(z, 2, 1, 0.5), r"a renorm, a norm over"),
    "pdist": (lambda z: z * torch.pdist(z).sum(), PDIST),
    "nuclear norm": (
        lambda z: z * torch.linalg.matrix_norm(z, "nuc"),
        r"_linalg_svd of matrices whose rows",
    ),
    "median()": (lambda z: z * z.median(), r"median of a tensor .*shape \(\) has no room"),
    "sort": (lambda z: z * z.sort(0).values, r"sort along samples \(dimension 0"),
    "kthvalue": (lambda z: z * z.kthvalue(2, 0).values, r"kthvalue along samples"),
    "topk": (lambda z: z * z.topk(2, 0).values.sum(0), r"topk along samples"),
    "cummax": (lambda z: torch.cummax(z, 0).values, r"cummax along samples"),
    "aminmax": (lambda z: z * torch.aminmax(z).min, r"aminmax of a tensor holding samples"),
    "nansum": (lambda z: z * z.nansum(0), r"nansum along samples"),
    "nanmean": (lambda z: z * z.nanmean(0), r"nansum along samples"),
    "quantile": (lambda z: z * torch.quantile(z, 0.5, dim=0), r"sort along samples"),
    "logdet": (
        lambda z: z * torch.logdet(z[:3] @ z[:3].T + _eye(z)),
        r"_linalg_slogdet of matrices whose rows or columns are samples",
    ),
    "det": (lambda z: z * torch.linalg.det(z[:3, :3]), r"_linalg_(slog)?det of matrices"),
    "matrix_exp": (
        lambda z: z * torch.linalg.matrix_exp(z[:3, :3]).sum(),
        r"linalg_matrix_exp of matrices whose rows",
    ),
    "mode": (lambda z: z * z.mode(0).values, r"mode along samples"),
    "unfold": (lambda z: z * z.unfold(0, 2, 2).sum((0, 2)), r"unfold along samples"),
    "diff": (
        lambda z: torch.cat([z[:1], torch.diff(z, dim=0)]),
        r"samples moved by aten\.slice\.Tensor, combined elementwise with others",
    ),
    "cross with the batch flipped": (
        lambda z: z * torch.linalg.cross(z[:, :3], z.flip(0)[:, :3]).sum(-1, keepdim=True),
        r"combining different samples in one place",
    ),
    "fft along the batch": (lambda z: torch.fft.fft(z, dim=0).real, r"_fft_r2c along samples"),
    "logsigmoid summed": (lambda z: z * F.logsigmoid(z).sum(), r"a sum of all elements"),
    "mse_loss": (lambda z: z * F.mse_loss(z, z.sin()), r"mse_loss of a tensor holding samples"),
    "avg pool over the batch": (
        lambda z: _pooled(F.avg_pool1d, z),
        r"avg_pool2d across samples \(dimension 3",
    ),
    # (no kernel or size argument: passed, every watched method returned the neighbour's terms)
    "grid sample over the batch": (_grid_shifted, r"grid_sampler_2d across samples"),
    "max pool over the batch": (
        lambda z: _pooled(F.max_pool1d, z),
        r"max_pool2d_with_indices across samples",
    ),
    "glu of the batch beside its flip": (
        lambda z: F.glu(torch.cat([z, z.flip(0)], 1), dim=1),
        r"glu combining different samples in one place",
    ),
    "bilinear with the batch flipped": (
        lambda z: z * F.bilinear(z, z.flip(0), torch.ones(1, z.shape[1], z.shape[1], dtype=f64)),
        r"_trilinear combining different samples in one place",
    ),
    "every other sample, summed": (lambda z: z * z[::2].sum(0), r"a sum over samples"),
    "einsum of sample pairs, part of them kept": (
        lambda z: torch.einsum("bi,ci->bc", z, z)[:, : z.shape[1]],
        r"samples run along dimension 1 of f's output|a sum over samples \(dimension 1",
    ),
    # an in-place transpose moved the batch under the tensor's id: the tracking ended there
    "transposed in place, summed along the batch": (
        lambda z: z.sin().t_().cumsum(-1).t_(),
        r"a cumulative sum over samples",
    ),
}


@pytest.mark.parametrize("case", list(UNKNOWN))
@pytest.mark.parametrize(("name", "method", "shape"), WATCHED_CALLS)
def test_ops_without_a_rule_that_combine_samples_are_refused(case, name, method, shape) -> None:
    """Ops the watch has no table entry for (``sort`` along the batch, a scalar ``dist``,
    ``det`` of a block of samples, pooling with the batch as the pooled axis, ...) ended its
    tracking silently: every watched method returned other samples' terms. Now the op's
    schema says it combines samples (its ``dim`` names a batch dimension, its result has no
    room for them, ...) and ``BatchInteractionError`` names it."""
    _assert_refused(*UNKNOWN[case], name, method, shape)


def _assert_refused(f, what: str, name: str, method: str, shape) -> None:
    """``f`` (of ``z`` of ``shape``) mixes samples: plain autograd's Jacobian has blocks across
    samples (at the small shape), and the watched call raises naming ``what``."""
    torch.manual_seed(3)
    x = torch.randn(*shape, dtype=f64)
    if shape[0] == 6:
        full = torch.autograd.functional.jacobian(f, x)  # plain autograd
        blocks = full.diagonal(0, 0, 2).permute(2, 0, 1)
        assert float(full.abs().sum() - blocks.abs().sum()) > 1e-3  # truly mixing
    g = (lambda z: f(z).square().sum(-1)) if name == "laplacian" else f
    with pytest.raises(BatchInteractionError, match=rf"^{name}: f mixes samples: .*({what})"):
        getattr(torchdiv, name)(g, x, method=method)


def _solve_rhs(z: torch.Tensor) -> torch.Tensor:
    a = torch.eye(z.shape[1], dtype=z.dtype) * 3 + torch.ones(z.shape[1], z.shape[1], dtype=f64)
    return torch.linalg.solve(a, z.T).T + torch.linalg.solve(a.expand(len(z), -1, -1), z.sin())


def _blocks(z: torch.Tensor) -> torch.Tensor:
    """Each sample as a (D // 3, 3) matrix (rows of 3), for per-sample matrix functions."""
    return z[:, : z.shape[1] // 3 * 3].unflatten(1, (-1, 3))


KEPT = {  # the same ops along each sample's own event: per sample, not refused
    "sort, topk, kthvalue along the event": lambda z: (
        z * z.sort(-1).values
        + z.topk(2, -1).values.sum(-1, keepdim=True)
        + z.kthvalue(2, -1, keepdim=True).values
    ),
    "cummax, mode, median along the event": lambda z: (
        torch.cummax(z, -1).values * z.mode(-1, keepdim=True).values.cos()
        + z.median(-1, keepdim=True).values
    ),
    "nansum, nanmean, quantile along the event": lambda z: (
        z
        * (
            z.nansum(-1, keepdim=True)
            + z.nanmean(-1, keepdim=True)
            + torch.quantile(z, 0.3, dim=-1, keepdim=True)
        )
    ),
    "unfold, diff along the event": lambda z: (
        z * z.unfold(1, 2, 1).sum((1, 2))[:, None] + torch.cat([z[:, :1], torch.diff(z, dim=1)], 1)
    ),
    "fft along the event": lambda z: torch.fft.irfft(torch.fft.rfft(z, dim=-1) * 2, z.shape[1]),
    "renorm of each sample": lambda z: torch.renorm(z, 2, 0, 0.5),
    "glu, cross, bilinear within a sample": lambda z: (
        F.glu(torch.cat([z, z.sin()], 1), dim=1)
        + torch.linalg.cross(z[:, :3], z[:, :3].cos()).sum(-1, keepdim=True)
        + F.bilinear(z, z.sin(), torch.ones(1, z.shape[1], z.shape[1], dtype=f64))
    ),
    "logsigmoid, mse_loss without reduction": lambda z: (
        F.logsigmoid(z) + F.mse_loss(z, z.sin(), reduction="none")
    ),
    "pooled over the event": lambda z: (
        F.avg_pool1d(z[:, None], 3, 1, 1)[:, 0] * F.max_pool1d(z[:, None], 3, 1, 1)[:, 0]
    ),
    "det, svd, matrix_exp of each sample's matrix": lambda z: (
        z
        * (
            torch.linalg.det(_blocks(z)[:, :3] @ _blocks(z)[:, :3].mT)
            + torch.linalg.matrix_norm(_blocks(z), "nuc")
            + torch.linalg.matrix_exp(_blocks(z).mT @ _blocks(z)).sum((1, 2))
        )[:, None]
    ),
    "solve for each sample's right-hand side": _solve_rhs,
    "interpolated onto its own size along the batch": lambda z: (
        F.interpolate(z.T[None], size=len(z), mode="linear")[0].T
    ),
    "halves of the batch rejoined": lambda z: z.sin() * torch.cat([z[:2].exp(), z[2:].tanh()]),
    "even and odd samples apart, written back": lambda z: _even_odd(z) * z,
    "median() under no_grad": lambda z: z.tanh() * _constant_median(z),
    # ATen's quantile with a tensor q runs unsqueeze_, transpose_, squeeze_ (false refusals:
    # the in-place views' dimensions were read after they had moved)
    "quantile of each sample, q a tensor": lambda z: (
        z * torch.quantile(z, torch.tensor([0.3], dtype=z.dtype), dim=-1).T
    ),
    "in-place views and back": lambda z: _in_place_views(z),
    # samples 0..B-1 twice along the batch: the batch repeated, which a reshape follows back
    "whole batches joined, reshaped back": lambda z: (
        torch.cat([z.sin(), z.exp()]).reshape(2, *z.shape).prod(0)
    ),
    "narrow_copy of the whole batch, renorm_ of each sample": lambda z: (
        torch.narrow_copy(z.sin(), 0, 0, len(z)) * (z * 2).renorm_(2, 0, 0.5)
    ),
}


def _in_place_views(z: torch.Tensor) -> torch.Tensor:
    h = z.sin()
    h.unsqueeze_(0).transpose_(1, 2).squeeze_(0)  # (1, B, D) -> (1, D, B) -> (D, B)
    return h.t_().unsqueeze_(-1).squeeze_().cumsum(-1)  # (B, D) -> (B, D, 1) -> (B, D)


def _even_odd(z: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(z)
    y[::2] = z[::2].exp()
    y[1::2] = z[1::2].tanh()
    return y


def _constant_median(z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return z.median()


@pytest.mark.parametrize("case", list(KEPT))
@pytest.mark.parametrize("shape", [(6, 3), (64, 6)])  # tiny, and recorded by "auto"
def test_ops_without_a_rule_along_each_sample_are_not_refused(case: str, shape) -> None:
    """The rules for ops without a table entry refuse none of these (the op along the event,
    a matrix per sample, a solve per column, the identity interpolation): each method gives
    plain autograd's diagonal blocks (checked to have none off the diagonal)."""
    _assert_per_sample(KEPT[case], shape)


def _assert_per_sample(f, shape) -> None:
    """``f`` (of ``z`` of ``shape``) is per sample: each method gives plain autograd's diagonal
    blocks (checked to have none off the diagonal), and, at the small shape, its Laplacian a
    grad-of-grad loop's."""
    torch.manual_seed(4)
    x = torch.randn(*shape, dtype=f64)
    blocks = _per_sample_blocks(f, x)
    for method in ("auto", "structured"):
        got = _unless_unplanned(lambda: torchdiv.divergence(f, x, method=method))  # noqa: B023
        if got is not None:
            assert_close(got, blocks.diagonal(0, -2, -1).sum(-1))
    if shape[0] > 6:
        return
    u = lambda z: f(z).square().sum(-1)  # noqa: E731
    expected = _per_sample_hessian_trace(u, x)
    for method in ("auto", "taylor"):
        got = _unless_unplanned(lambda: torchdiv.laplacian(u, x, method=method))  # noqa: B023
        if got is not None:
            assert_close(got, expected)


def _unless_unplanned(call):
    """``call()``, or ``None`` where a recording engine has no rule for one of the ops
    (``"auto"`` falls back to the generic engines there: fine)."""
    try:
        return call()
    except NotImplementedError as e:
        assert "no propagation rule" in str(e)
        return None


def _message_passing(n: int, wrong: bool = False):
    """An E(n)-flow / EGNN layer on ``z`` of shape ``(B, n * 3)``: nodes flattened to
    ``(B * n, 3)``, edges offset by ``b * n`` per graph, messages summed at their targets into a
    fresh ``(B * n, 3)`` buffer (``unsorted_segment_sum``: ``scatter_add_``; or ``index_add``).
    ``wrong``: the targets shifted by one graph, into the next sample's nodes."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 3).to(f64)
    rows, cols = torch.tensor([(i, j) for i in range(n) for j in range(n) if i != j]).T

    def f(z: torch.Tensor, scatter: bool) -> torch.Tensor:
        b = len(z)
        h = z.reshape(b * n, 3)
        offset = torch.arange(b)[:, None] * n
        r, c = (rows + offset).reshape(-1), (cols + offset).reshape(-1)
        m = torch.tanh(lin(torch.cat([h[r], h[c]], -1)))
        to = (r + n) % (b * n) if wrong else r
        if scatter:
            agg = h.new_full((b * n, 3), 0).scatter_add_(0, to[:, None].expand(-1, 3), m)
        else:
            agg = torch.zeros_like(h).index_add(0, to, m)
        return (h + agg).reshape(z.shape)

    return f


def _mixture_of_experts():
    """A Mixtral-style sparse block on ``z`` of shape ``(B, T, 4)``: tokens flattened to
    ``(B * T, 4)``, routed to their top two of three experts, the results ``index_add_``-ed
    into a fresh ``(B * T, 4)`` buffer: each token's output is its own."""
    torch.manual_seed(1)
    gate = nn.Linear(4, 3, bias=False).to(f64)
    experts = [nn.Sequential(nn.Linear(4, 5), nn.SiLU(), nn.Linear(5, 4)).to(f64) for _ in "abc"]

    def f(z: torch.Tensor) -> torch.Tensor:
        tokens = z.reshape(-1, 4)
        weights, chosen = torch.topk(torch.softmax(gate(tokens), 1), 2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros(tokens.shape, dtype=z.dtype)
        for e, expert in enumerate(experts):
            token, k = torch.where(chosen == e)
            out.index_add_(0, token, expert(tokens[token]) * weights[token, k, None])
        return out.reshape(z.shape)

    return f


@pytest.mark.parametrize(
    ("case", "n"),  # tiny, and recorded by "auto" (not the whole Jacobian of 256 tokens)
    [(c, n) for c in ["scatter_add_", "index_add", "experts"] for n in (3, 64)]
    + [("experts, batch_dims=2", 3)],
)
def test_values_put_into_a_flattened_batch_in_their_own_places_are_per_sample(case, n) -> None:
    """Message passing over a batch of graphs with nodes flattened to ``(B * N, F)`` and a
    mixture of experts with tokens flattened to ``(B * T, D)`` sum per-sample values into a
    fresh buffer laid out as the flattened batch: checked to land in their own samples'
    places, they are per sample (they were refused: a buffer not of ``x``'s batch shape)."""
    bd = 2 if case.endswith("2") else 1
    if case.startswith("experts"):
        moe, x = _mixture_of_experts(), torch.randn(n, 4, 4, dtype=f64)
        f = moe if bd == 2 else (lambda z: moe(z.unflatten(1, (4, 4))).flatten(1))
        x = x if bd == 2 else x.flatten(1)
    else:
        x = torch.randn(n, 12, dtype=f64)
        f = functools.partial(_message_passing(4), scatter=case == "scatter_add_")
    if bd == 1:
        blocks = _per_sample_blocks(f, x)  # plain autograd, nothing across samples
        alone = [torch.func.jacrev(lambda z: f(z[None])[0])(x[b]) for b in range(0, n, 7)]
        assert_close(torch.stack(alone), blocks[::7])
        expected = blocks.diagonal(0, -2, -1)
    else:  # each token alone: the (B, T, D, B, T, D) Jacobian's (b, t) blocks
        full = torch.autograd.functional.jacobian(f, x).flatten(3, 4).flatten(0, 1)
        blocks = torch.stack([full[i, :, i] for i in range(12)])
        assert_close(full.abs().sum(), blocks.abs().sum())
        expected = blocks.diagonal(0, -2, -1).reshape(3, 4, 4)
    for method in ("auto", "reverse"):
        got = torchdiv.jacobian_diagonal(f, x, batch_dims=bd, method=method)
        assert_close(got, expected)


def _pair_sums(z: torch.Tensor) -> torch.Tensor:
    """Samples summed in pairs into a buffer of ``2 B`` rows (a flattened batch's size), read
    back: each sample's output holds its neighbour's."""
    cid = torch.arange(len(z)) // 2
    return z - torch.zeros(2 * len(z), z.shape[1], dtype=z.dtype).index_add(0, cid, z)[cid] / 3


def _into_other_samples(z: torch.Tensor) -> torch.Tensor:
    """Samples added into a ``(2 B, D)`` buffer that is not fresh: made of other samples' values
    by an op the watch does not follow (``as_strided``), so not taken for a flattened batch."""
    flipped = torch.as_strided(z.flip(0).contiguous(), (2 * len(z), z.shape[1]), (1, 1))
    return flipped.index_add(0, torch.arange(len(z)) * 2, z)[::2]


RECURRENT = {"GRU": nn.GRU, "LSTM": nn.LSTM, "RNN": nn.RNN}


@pytest.mark.parametrize(
    "case", ["messages into the next graph", "pair sums", "into other samples", *RECURRENT]
)
def test_samples_mixed_by_a_flattened_buffer_or_a_recurrence_are_refused(case: str) -> None:
    """Messages scattered into the next graph's nodes of a ``(B * N, F)`` buffer, samples
    summed in pairs into a ``(2 B, D)`` one or added into one not fresh, and an RNN with
    ``batch_first=False`` fed ``(B, T, D)`` (its recurrence runs over the samples; returned
    silently) mix samples."""
    torch.manual_seed(2)
    if case in RECURRENT:
        rnn = RECURRENT[case](4, 4).to(f64)  # batch_first=False
        f, x = (lambda z: rnn(z.unflatten(1, (3, 4)))[0].flatten(1)), torch.randn(3, 12, dtype=f64)
        what = r"sample 0 picked out of the batch .*, combined with sample 1"
    elif case == "into other samples":
        f, x = _into_other_samples, torch.randn(6, 3, dtype=f64)
        what = r"samples added into a tensor of shape \(12, 3\), not x's batch shape, whose "
        what += r"places are not followed \(ATen"
    elif case == "pair sums":
        f, x = _pair_sums, torch.randn(6, 3, dtype=f64)
        what = (
            r"samples added into a tensor of shape \(12, 3\), .*\(nor those of a flattened batch\)"
        )
    else:
        f, x = (
            functools.partial(_message_passing(4, wrong=True), scatter=True),
            torch.randn(3, 12, dtype=f64),
        )
        what = r"samples added into a tensor of shape \(12, 3\), .*aten\.scatter_add_"
    full = torch.autograd.functional.jacobian(f, x)  # plain autograd
    blocks = full.diagonal(0, 0, 2).permute(2, 0, 1)
    assert float(full.abs().sum() - blocks.abs().sum()) > 1e-3  # truly mixing
    for name in ("divergence", "jacobian_diagonal"):
        with pytest.raises(BatchInteractionError, match=rf"^{name}: f mixes samples: {what}"):
            getattr(torchdiv, name)(f, x)


@pytest.mark.parametrize("case", RECURRENT)
def test_a_recurrence_over_each_sample_s_own_time_is_per_sample(case: str) -> None:
    """The same RNNs over each sample's time steps (``batch_first=True``; a bidirectional one
    fed ``(T, B, D)``) are per sample: jacrev of each sample alone."""
    torch.manual_seed(3)
    first = RECURRENT[case](4, 4, batch_first=True).to(f64)
    both = RECURRENT[case](4, 2, bidirectional=True).to(f64)
    x = torch.randn(3, 12, dtype=f64)
    fs = [
        lambda z: first(z.unflatten(1, (3, 4)))[0].flatten(1),
        lambda z: both(z.unflatten(1, (3, 4)).transpose(0, 1))[0].transpose(0, 1).flatten(1),
    ]
    for f in fs:
        alone = torch.stack([torch.func.jacrev(lambda z, f=f: f(z[None])[0])(xb) for xb in x])
        got = torchdiv.jacobian_diagonal(f, x)
        assert_close(got, alone.diagonal(0, -2, -1))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("op", ["_cudnn_rnn", "miopen_rnn"])
def test_a_fused_recurrent_kernel_refuses_samples_along_its_time(op: str, batch_first) -> None:
    """cuDNN's and MIOpen's RNN kernels (one op on a GPU; the CPU shows the steps) fed
    ``(B, T, D)``: per sample if ``batch_first`` (the output keeps the batch), else the
    recurrence runs over the samples. The rule is driven directly, as a dispatch mode calls
    it: the kernel needs a GPU."""
    from torchdiv._core.mixing.tracker import BatchAxes

    x, hx = torch.randn(3, 4, 5, dtype=f64), torch.zeros(1, 3, 5, dtype=f64)
    head = (x, [], 4, None, hx, None, 1, 5, 0, 1) if op == "_cudnn_rnn" else (x, [], 4, hx, None)
    args = (*head, *((1, 5, 1) if op == "miopen_rnn" else ()), batch_first, 0.0, False, False)
    args = (*args, [], None)
    out = (torch.empty(3, 4, 5, dtype=f64), torch.empty(1, 3, 5, dtype=f64))
    watch = BatchAxes(x, 1)
    watch.after(watch.before(getattr(torch.ops.aten, op).default, args), args, out)
    if batch_first:
        assert watch.pending is None
        assert watch.axes(out[0]) == watch.axes(x)
    else:
        assert "a recurrent net run over samples (dimension 0" in str(watch.pending)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("case", RECURRENT)
def test_a_recurrence_over_the_samples_is_refused_on_a_gpu(case: str) -> None:
    """The cuDNN kernel: ``batch_first=False`` fed ``(B, T, D)`` is refused, ``True`` gives
    plain autograd's Jacobian of each sample alone (``torch.func`` cannot run cuDNN's RNN:
    "Cannot access storage of TensorWrapper", checked on an H200)."""
    torch.manual_seed(3)
    x = torch.randn(3, 4, 4, dtype=f64, device="cuda")
    wrong = RECURRENT[case](4, 4).to("cuda", f64)
    with pytest.raises(BatchInteractionError, match=r"a recurrent net run over samples"):
        torchdiv.divergence(lambda z: wrong(z)[0], x)
    right = RECURRENT[case](4, 4, batch_first=True).to("cuda", f64)
    f = lambda z: right(z)[0]  # noqa: E731
    jacobian = torch.autograd.functional.jacobian
    alone = torch.stack([jacobian(lambda z: f(z[None])[0], xb) for xb in x])
    expected = alone.flatten(1, 2).flatten(2).diagonal(0, -2, -1).reshape(3, 4, 4)
    assert_close(torchdiv.jacobian_diagonal(f, x, batch_dims=1), expected)


# ---- what the watch did not follow: writes through views, custom autograd.Functions, ... ----


def _padded_buffer(z: torch.Tensor, g=torch.sin) -> torch.Tensor:
    """``g(z)`` written into a fresh buffer one column wider, and a column of its own."""
    buf = torch.zeros(len(z), z.shape[1] + 1, dtype=z.dtype)
    buf[:, : z.shape[1]] = g(z)
    buf[..., -1] = z[:, 0]
    return buf


def _narrowed_buffer(z: torch.Tensor) -> torch.Tensor:
    buf = torch.zeros(len(z), z.shape[1] + 1, dtype=z.dtype)
    buf.narrow(1, 0, z.shape[1]).copy_(z.sin())
    return buf


def _shifted(z: torch.Tensor) -> torch.Tensor:
    """Each sample's place given the one before's values (a write through a view)."""
    y = z.sin()
    y[1:] = z[:-1].cos()
    return y


def _written_centred(z: torch.Tensor) -> torch.Tensor:
    buf = torch.zeros_like(z)
    buf[:, :-1] = (z - z.mean(0))[:, :-1]
    return buf + z


def _feature_major(z: torch.Tensor) -> torch.Tensor:
    """``z.sin().T``, written one feature at a time into a fresh ``(D, B)`` buffer."""
    buf = torch.zeros(z.shape[1], len(z), dtype=z.dtype)
    for i in range(z.shape[1]):
        buf[i] = z[:, i].sin()
    return buf


def _tril(n: int) -> torch.Tensor:
    """A well-conditioned lower-triangular ``(n, n)`` factor."""
    return 2 * torch.eye(n, dtype=f64) + 0.1 * torch.ones(n, n, dtype=f64).tril(-1)


HIDDEN = {  # f of z (B, D): mixing the watch did not follow (every watched method was silent)
    "a fresh buffer written through a slice, centred": (
        lambda z: (_padded_buffer(z) - _padded_buffer(z).mean(0))[:, : z.shape[1]],
        r"a mean over samples \(dimension 0 of a tensor of shape \(\d+, \d+\)\)",
    ),
    "narrow().copy_() into a fresh buffer, centred": (
        lambda z: (_narrowed_buffer(z) - _narrowed_buffer(z).mean(0))[:, : z.shape[1]],
        r"a mean over samples",
    ),
    "a column written by buf[..., -1] = t, summed over the batch": (
        lambda z: z * _padded_buffer(z)[:, -1:].sum(0),
        r"a sum over samples",
    ),
    "centred values written through a view": (_written_centred, r"a mean over samples"),
    "the samples before written into each place": (
        _shifted,
        r"a write through a view \(aten\.copy_\.default\) moved samples along the batch",
    ),
    "pdist of an odd number of samples": (
        lambda z: torch.cat([z[:5] * torch.pdist(z[:5])[:5, None], z[5:]]),
        PDIST,
    ),
    "cdist(x, x) reduced over its second dimension": (
        lambda z: z * torch.cdist(z, z, p=1).sum(1, keepdim=True),
        r"a sum over samples \(dimension 1",
    ),
    "reflection pad along the batch": (
        lambda z: F.pad(z.T[None], (len(z) // 2,) * 2, mode="reflect")[0].T[: len(z)],
        r"reflection_pad1d across samples",
    ),
    "replication pad along the batch": (
        lambda z: z * F.pad(z.T[None], (0, len(z)), mode="replicate")[0].T[len(z) :],
        r"replication_pad1d across samples",
    ),
    "cholesky_solve of samples as the right-hand side's rows": (
        lambda z: torch.cholesky_solve(z.sin(), _tril(len(z))),
        r"cholesky_solve of matrices whose rows or columns are samples",
    ),
    "triangular_solve of samples as the right-hand side's rows": (
        lambda z: torch.triangular_solve(z.sin(), _tril(len(z)), upper=False).solution,
        r"triangular_solve of matrices whose rows or columns are samples",
    ),
    "cholesky_solve with a factor made of samples": (
        lambda z: (
            z
            * torch.cholesky_solve(
                torch.ones(len(z), 1, dtype=z.dtype),
                (z[:, :1].sin() * torch.ones(1, len(z), dtype=z.dtype)).tril() + _tril(len(z)),
            )
        ),
        r"cholesky_solve of matrices whose rows or columns are samples",
    ),
    "a batch padded with constants by F.pad, centred": (
        lambda z: _centred_head(F.pad(z, (0, 0, 0, 2)), len(z)),
        r"a mean over samples \(dimension 0 of a tensor of shape \(\d+, \d+\)\)",
    ),
    "a batch joined with zeros, centred": (
        lambda z: _centred_head(torch.cat([z, torch.zeros(2, z.shape[1], dtype=z.dtype)]), len(z)),
        r"a mean over samples",
    ),
    "a reshape to (D, B), transposed": (
        lambda z: z.reshape(z.shape[1], len(z)).t().sin(),
        r"x's samples spread across the dimensions of a tensor of shape \(\d+, \d+\)",
    ),
    "a view as (D, B), summed along its first dimension": (
        lambda z: z * z.view(z.shape[1], len(z)).sum(0)[:, None],
        r"x's samples spread across .*aten\.sum",
    ),
    "pairs of samples summed together": (
        lambda z: z.reshape(len(z) // 2, 2, z.shape[1]).sum(1).repeat_interleave(2, 0),
        r"x's samples spread across the dimensions of a tensor of shape \(\d+, 2, \d+\)",
    ),
    "a transpose reshaped to the batch's shape": (
        lambda z: z.transpose(0, 1).reshape(z.shape).sin(),
        r"x's samples spread across the dimensions of (f's output|a tensor) of shape \(\d+, \d+\)",
    ),
    "a feature-major buffer reshaped to the batch's shape": (
        lambda z: _feature_major(z).reshape(z.shape),
        r"x's samples spread across the dimensions of (f's output|a tensor)",
    ),
    "a custom autograd.Function, centred": (
        lambda z: LegacyCube.apply(z) - LegacyCube.apply(z).mean(0),
        r"a mean over samples",
    ),
    "a plane read at the samples' points, centred": (
        lambda z: z * (_plane_read(z) - _plane_read(z).mean(0)).sum(1, keepdim=True),
        r"a mean over samples",
    ),
    "a tiled batch, centred": (
        lambda z: (lambda r: r - r.mean(0))(z.repeat(1, 2))[:, 1 : z.shape[1] + 1],
        r"a mean over samples",
    ),
    "a solve by another sample's matrix": (
        lambda z: z * torch.linalg.solve(_matrix_of(z).flip(0), z[:, :2]).sum(1, keepdim=True),
        r"combining different samples",
    ),
    "Householder reflectors by another sample's tau": (
        lambda z: z * _reflected(z, z[:, :2].roll(1, 0)),
        r"combining different samples",
    ),
    "each sample's plane read at every sample's point": (
        lambda z: z * _planes_read_everywhere(z).sum(1, keepdim=True),
        r"a sum over samples",
    ),
}


@pytest.mark.parametrize("case", list(HIDDEN))
@pytest.mark.parametrize(("name", "method", "shape"), WATCHED_CALLS)
@pytest.mark.filterwarnings("ignore:torch.triangular_solve is deprecated")
def test_mixing_the_watch_did_not_follow_is_refused(case, name, method, shape) -> None:
    """Values written in place through a view (a fresh buffer padded with a column, then
    centred), a reshape that spreads each sample across dimensions (``x.reshape(D, B)`` for
    ``x.T``), ``pdist`` of an odd batch, ``cdist(x, x)`` reduced over its second dimension,
    reflection and replication pads along the batch, ``cholesky_solve``/``triangular_solve``
    of samples, a custom ``autograd.Function``: every watched method returned other
    samples' terms silently."""
    _assert_refused(*HIDDEN[case], name, method, shape)


def _matrix_of(z: torch.Tensor) -> torch.Tensor:
    """Each sample's invertible ``(2, 2)`` matrix, ``(B, 2, 2)``."""
    w = torch.tensor([[1.0, -0.5], [0.25, 2.0]], dtype=z.dtype)
    return (z[:, :2, None] * w).tanh() + 3 * torch.eye(2, dtype=z.dtype)


def _reflected(z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``(B, 1)``: the sum of ``householder_product(A, 0.3 tanh(tau))`` of each sample's
    ``(3, 2)`` ``A`` (``tau`` ``(B, 2)``). The watch compared ``A``'s batch dimension with
    ``tau``'s one dimension apart (aligned at the right), so another sample's ``tau`` passed."""
    w = torch.linspace(-1, 1, 6, dtype=z.dtype).reshape(3, 2)
    q = torch.linalg.householder_product((z[:, :3, None] * w).tanh(), 0.3 * tau.tanh())
    return q.sum((-2, -1))[:, None]


def _planes_read_everywhere(z: torch.Tensor) -> torch.Tensor:
    """``(B, B)``: sample ``i``'s own plane (``(1, B, B, 1)``, the samples along its channels)
    read at sample ``j``'s point (the grid's height). The result had the planes' shape, so
    the watch took the planes' samples alone and lost the grid's."""
    b = z.shape[0]
    heights = torch.linspace(-1, 1, b, dtype=z.dtype).view(1, 1, b, 1)
    planes = (z[:, :1, None, None] * heights).tanh().permute(1, 0, 2, 3)
    grid = z[:, :2].tanh().view(1, -1, 1, 2)
    return F.grid_sample(planes, grid, align_corners=True)[0, :, :, 0]


def _plane_read(z: torch.Tensor) -> torch.Tensor:
    """A tri-plane field's read, ``(B, 2)``: a constant ``(1, 2, 4, 4)`` plane of features
    sampled by ``grid_sample`` at each sample's first two coordinates, the points along the
    grid's height (``grid.view(1, -1, 1, 2)``); its result was not followed by the watch."""
    plane = torch.arange(32, dtype=z.dtype).reshape(1, 2, 4, 4).sin()
    grid = z[:, :2].tanh().view(1, -1, 1, 2)
    return F.grid_sample(plane, grid, align_corners=False).view(2, -1).T


def _centred_head(padded: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` rows of ``padded`` less its mean over all rows."""
    return (padded - padded.mean(0))[:n]


def _halves(z: torch.Tensor) -> torch.Tensor:
    buf = torch.empty_like(z)
    buf[:2] = z[:2].exp()
    buf[2:] = z[2:].tanh()
    return buf * z


def _interleaved(z: torch.Tensor) -> torch.Tensor:
    """Each sample's two rows of a buffer of ``2 B`` rows, written by two strided views."""
    buf = z.new_zeros(2 * len(z), z.shape[1])
    buf[::2] = z.sin()
    buf[1::2] = z.cos()
    return buf.reshape(len(z), 2, z.shape[1]).prod(1)


def _constant_cube_scale(z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        scale = (LegacyCube.apply(z) - LegacyCube.apply(z).mean(0)).abs().mean()
    return z.tanh() * scale


HIDDEN_KEPT = {  # their per-sample counterparts: not refused
    "a fresh buffer written through views, centred over the event": lambda z: (
        _padded_buffer(z, torch.tanh) - _padded_buffer(z).mean(1, keepdim=True)
    )[:, 1:],
    "halves of the batch written into a buffer": _halves,
    "a buffer of two rows per sample, interleaved": _interleaved,
    "a sample written back into its own place": lambda z: _own_place(z),
    "select_scatter of a sample into its own place": lambda z: torch.select_scatter(
        z.sin(), z[1].cos(), 0, 1
    ),
    "slice_scatter of the first samples into their places": lambda z: torch.slice_scatter(
        z.sin(), z[:2].cos(), 0, 0, 2
    ),
    "cholesky_solve of samples as the right-hand side's columns": lambda z: (
        torch.cholesky_solve(z.T, _tril(z.shape[1])).T
    ),
    "reflection pad along the event": lambda z: (
        F.pad(z[:, None], (1, 1), mode="reflect")[:, 0, 1:-1]
        * F.pad(z[:, None], (0, 2), mode="replicate")[:, 0, 2:]
    ),
    "padded with constants along the batch, cut back": lambda z: (
        F.pad(z.sin(), (0, 0, 1, 2))[1:-2]
        * torch.cat([torch.ones(1, z.shape[1], dtype=z.dtype), z.exp()])[1:]
    ),
    "a feature-major buffer, transposed back": lambda z: _feature_major(z).T,
    "pairs of samples, each reduced over its event": lambda z: (
        z.reshape(len(z) // 2, 2, z.shape[1]).square().sum(-1, keepdim=True).reshape(len(z), 1)
        * z.sin()
    ),
    "a reshape to (D, B) and back": lambda z: (
        z.reshape(z.shape[1], -1).sin() * torch.arange(z.shape[1], dtype=z.dtype)[:, None]
    ).reshape(z.shape),
    "a reshape to (D, B), scaled in place, and back": lambda z: (
        z.reshape(z.shape[1], -1).sin().mul_(2).reshape(z.shape)
    ),
    "even and odd samples interleaved by a stack": lambda z: torch.stack(
        [z[::2].sin(), z[1::2].exp()], 1
    ).reshape(z.shape),
    "a custom autograd.Function": lambda z: LegacyCube.apply(z) * z,
    "a plane read at the samples' points": lambda z: z * _plane_read(z).sum(1, keepdim=True),
    "a tiled batch": lambda z: z * z.repeat(1, 2)[:, 1 : z.shape[1] + 1],
    "a solve by each sample's matrix": lambda z: (
        z * torch.linalg.solve(_matrix_of(z), z[:, :2]).sum(1, keepdim=True)
    ),
    "Householder reflectors by each sample's tau": lambda z: z * _reflected(z, z[:, :2]),
    "a custom autograd.Function under no_grad, centred": _constant_cube_scale,
}


def _own_place(z: torch.Tensor) -> torch.Tensor:
    y = z.sin()
    y[0] = z[0].cos()
    y[2:4] = z[2:4].exp()
    return y


@pytest.mark.parametrize("case", list(HIDDEN_KEPT))
@pytest.mark.parametrize("shape", [(6, 3), (64, 6)])  # tiny, and recorded by "auto"
def test_what_the_watch_now_follows_is_not_refused_per_sample(case: str, shape) -> None:
    """The per-sample counterparts of the cases above (``select_scatter`` of a sample into
    its own place was refused: a pick combined with the batch; so was the batch interleaved
    by ``stack([x[::2], x[1::2]], 1).reshape(B, D)``)."""
    _assert_per_sample(HIDDEN_KEPT[case], shape)


@pytest.mark.parametrize("shape", [(6, 3), (64, 6)])  # _cdist_forward, _euclidean_dist
def test_distances_to_constant_points_are_per_sample(shape) -> None:
    """``cdist(x, c)`` holds each sample's distances in its row (PyTorch has no second
    derivative of ``_cdist_forward``: the divergence alone)."""
    x = torch.randn(*shape, dtype=f64)
    f = lambda z: torch.cdist(z, torch.eye(z.shape[1], dtype=z.dtype))  # noqa: E731
    expected = _per_sample_blocks(f, x).diagonal(0, -2, -1).sum(-1)
    for method in ("auto", "reverse"):
        assert_close(torchdiv.divergence(f, x, method=method), expected)


def test_a_lambda_made_anew_over_the_same_objects_is_watched_once() -> None:
    """``divergence(lambda z: net(z), x)`` in a training loop is a new object at every call:
    known by its code and what it closes over, it is watched once (watched at every call, a
    divergence at 2 inputs took 1.9x the time)."""
    from torchdiv._taylor import mixing

    net, x = _net(2), torch.randn(16, 2, dtype=f64)
    make = lambda: lambda z: net(z)  # noqa: E731
    assert not mixing.passed_before(make(), x, 1)
    torchdiv.divergence(make(), x)
    assert mixing.passed_before(make(), x, 1)
    assert not mixing.passed_before(lambda z: net(z) * 2, x, 1)


_SHIFT = 0


class _Config:
    def __init__(self, mix: bool):
        self.mix = mix


_MAKERS = {
    "index tensor": lambda v: lambda z: z[v] * 2,
    "threshold": lambda v: lambda z: z - z.mean(0) if v > 0.5 else z * 2,
    "config": lambda v: lambda z: z - z.mean(0) if v.mix else z * 2,
    "global": lambda v: lambda z: z.roll(_SHIFT, 0) * 2,
}


@pytest.mark.parametrize("name", ["divergence", "jacobian_diagonal", "jacobian"])
@pytest.mark.parametrize("case", [*_MAKERS, "tensor written in place"])
def test_a_lambda_made_anew_over_other_objects_is_watched_again(
    name: str, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a lambda closes over can decide whether it mixes samples (an index tensor, a
    threshold, a config object, a global it names, a tensor written in place): a new lambda
    over another such value is watched again, not taken for the one that passed."""
    x = torch.randn(8, 3, dtype=f64)
    call = getattr(torchdiv, name)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    index = torch.arange(8)
    values = {
        "index tensor": (torch.arange(8), order),
        "threshold": (0.1, 0.9),
        "config": (_Config(False), _Config(True)),
        "global": (0, 1),
        "tensor written in place": (index, index),
    }[case]
    make = _MAKERS.get(case, _MAKERS["index tensor"])
    for step, value in enumerate(values):
        if case == "global":
            monkeypatch.setattr(sys.modules[__name__], "_SHIFT", value)
        if step and case == "tensor written in place":
            index.copy_(order)
        if step == 0:
            want = torch.full((8, 3), 2.0, dtype=f64)
            got = call(make(value), x)
            got = got.diagonal(0, -2, -1) if name == "jacobian" else got
            assert_close(got, want.sum(-1) if name == "divergence" else want)
        else:
            with pytest.raises(BatchInteractionError, match="f mixes samples"):
                call(make(value), x)


_CALLS = {
    "divergence": lambda f, x: torchdiv.divergence(f, x),
    "jacobian_diagonal": lambda f, x: torchdiv.jacobian_diagonal(f, x).sum(-1),
    "hutchinson": lambda f, x: torchdiv.divergence(
        f, x, method="hutchinson", probes=torch.ones(1, *x.shape, dtype=x.dtype)
    ),
}


@pytest.mark.parametrize("name", list(_CALLS))
def test_a_lambda_over_the_time_of_each_step_is_watched_once(name: str, watches: list[int]) -> None:
    """FFJORD's pattern, ``divergence(lambda z: field(t, z), z)`` at every step of an ODE
    solve, holds a new time tensor at every call: a watch during which no value decided
    anything (``torchdiv._core.mixing.reads.decides``) holds for every time, so the field is
    watched once, not at every step (2.1x the time of a divergence at 2 inputs). Values
    against the trace of per-sample Jacobians (``torch.autograd.functional.jacobian`` of
    each sample, float64), which depend on ``t``; a time of another shape is watched again."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).to(f64)
    x = torch.randn(8, 2, dtype=f64)

    def field(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return net(torch.cat([z, t.expand(len(z), 1)], 1)) * torch.sin(t)

    for step in range(4):
        t = torch.tensor(0.3 + step / 4, dtype=f64)
        got = _CALLS[name](lambda z, t=t: field(t, z), x)
        one = lambda z, t=t: field(t, z[None])[0]  # noqa: E731
        want = [torch.autograd.functional.jacobian(one, xi) for xi in x]
        want_trace = torch.stack([j.trace() for j in want])
        if name == "hutchinson":  # the probe of ones: the sum of every entry of each Jacobian
            want_trace = torch.stack([j.sum() for j in want])
        assert_close(got, want_trace, rtol=1e-12, atol=1e-12)
    assert len(watches) == 1
    column = torch.zeros(1, 1, dtype=f64)
    _CALLS[name](lambda z: field(column, z), x)
    assert len(watches) == 2


_FIELDS_READING = {  # what a field over a time does besides computing: watches of 4 steps
    "train-mode dropout": (lambda h: nn.functional.dropout(h, 0.2, training=True), 1),
    "a shape logged": (lambda h: (logging.debug(f"{h.shape} {h.size(0)}"), h)[1], 1),
    "a value logged": (lambda h: (logging.debug(f"{h.mean():.3f}"), h)[1], 4),
    "bernoulli noise": (lambda h: h * torch.bernoulli(torch.full_like(h, 0.9)), 4),
}


@pytest.mark.parametrize("case", list(_FIELDS_READING))
def test_a_time_field_that_logs_or_draws_noise_is_not_refused(
    case: str, watches: list[int]
) -> None:
    """A field over a new time at every ODE step (``lambda z: field(t, z)``) that draws a
    train-mode dropout mask or logs a shape is watched once; one that formats a value
    (``f"{h.mean():.3f}"``) or draws ``bernoulli`` noise by a probability tensor (an op that
    raises on its argument's values: ``_CHECKS_VALUES``) is watched at every step, and
    never refused: none mixes samples (reviewed after the loose key was hardened)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).to(f64)
    x = torch.randn(8, 2, dtype=f64)
    inner, watched = _FIELDS_READING[case]

    def field(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return inner(net(torch.cat([z, t.expand(len(z), 1)], 1)))

    for step in range(4):
        t = torch.tensor(0.3 + step / 4, dtype=f64)
        assert torchdiv.divergence(lambda z, t=t: field(t, z), x).shape == (8,)
    assert len(watches) == watched


def test_a_pinn_lambda_over_new_times_is_watched_once_by_the_laplacian(
    watches: list[int],
) -> None:
    """A heat-equation residual written with a lambda, ``laplacian(lambda s: u(cat([s, t],
    1)), x)``, over new collocation times at every step: ``"auto"`` loops over backward
    passes at two inputs, and its recording's watch (no value decided anything) holds for
    every ``t`` of that shape: watched once, not at every step. Values against the
    grad-of-grad loop."""
    from conftest import laplacian_by_grad_of_grad

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).to(f64)
    for _ in range(3):
        x, t = torch.randn(32, 2, dtype=f64), torch.rand(32, 1, dtype=f64)
        u = lambda s, t=t: net(torch.cat([s, t], 1)).squeeze(-1)  # noqa: E731
        assert_close(torchdiv.laplacian(u, x), laplacian_by_grad_of_grad(u, x))
    assert len(watches) == 1


_DECIDING = {  # each z * z where the time is 0, a mix of samples where it is 1
    "threshold": lambda t: lambda z: z - z.mean(0) if t > 0.5 else z * z,
    "read out": lambda t: lambda z: z.roll(int(t.item()), 0) ** 2,
    "index cast": lambda t: lambda z: z[(torch.arange(len(z)) + t.long()) % len(z)] ** 2,
    "index compared": lambda t: lambda z: z[(torch.arange(len(z)) + (t > 0.5)) % len(z)] ** 2,
    # reads the dispatcher does not see (``torchdiv._core.mixing.reads.Reads``)
    "tolist": lambda t: lambda z: z.roll(int(t.tolist()), 0) ** 2,
    "numpy": lambda t: lambda z: z.roll(int(t.numpy()), 0) ** 2,
    "str": lambda t: lambda z: z.roll(int("1." in str(t)), 0) ** 2,
    "apply_": lambda t: lambda z: z.roll(_first_value(t), 0) ** 2,
    # an f-string (``__format__``, inside which ``__repr__`` went unseen) and a number read
    # with the dispatch modes turned off
    "f-string": lambda t: lambda z: z.roll(int("1." in f"{t.reshape(1)}"), 0) ** 2,
    "modes off": lambda t: lambda z: z.roll(_read_unseen(t), 0) ** 2,
    # an op that raises on values (``torchdiv._core.mixing.reads._CHECKS_VALUES``), its error caught
    "error caught": lambda t: lambda z: z.roll(_fails(t), 0) ** 2,
}


def _read_unseen(t: torch.Tensor) -> int:
    """``int(t)`` where no dispatch mode sees its ``item``."""
    with torch.utils._python_dispatch._disable_current_modes():
        return int(t)


def _fails(t: torch.Tensor) -> int:
    """1 where ``binary_cross_entropy`` refuses ``t + 0.5`` (outside [0, 1]), else 0."""
    try:
        torch.nn.functional.binary_cross_entropy(t + 0.5, torch.ones_like(t))
    except RuntimeError:
        return 1
    return 0


def _first_value(t: torch.Tensor) -> int:
    """``t``'s value as an int, read by a Python callable ``apply_`` gives it."""
    got: list[float] = []
    t.clone().apply_(lambda v: got.append(v) or v)
    return int(got[0])


_DECIDED_BY = {  # (the Laplacian loops at 2 inputs)
    **_CALLS,
    "laplacian": lambda f, x: torchdiv.laplacian(f, x).sum(-1),
}


@pytest.mark.parametrize("name", list(_DECIDED_BY))
@pytest.mark.parametrize("case", list(_DECIDING))
def test_a_time_that_decides_whether_f_mixes_is_watched_again(name: str, case: str) -> None:
    """Where a held time's value decides what ``f`` does (a branch, a read-out, an index
    computed from it; a read by ``tolist()``, ``numpy()`` or ``str()``, which bypass the
    dispatcher: before ``Reads``, f over the time 1 returned 2 * x.roll(1, 0) silently; so
    did an f-string of ``t``, a read with the dispatch modes off, and an error of
    ``binary_cross_entropy`` caught),
    the watch holds only for that time: ``f`` over another, which mixes
    samples, is watched again and refused (taken for the ``f`` that passed, it gave a wrong
    per-sample result)."""
    x = torch.randn(8, 2, dtype=f64)
    make = _DECIDING[case]
    first = _DECIDED_BY[name](make(torch.tensor(0.0, dtype=f64)), x)
    assert_close(first, torch.full((8,), 4.0, dtype=f64) if name == "laplacian" else 2 * x.sum(-1))
    with pytest.raises(BatchInteractionError, match="f mixes samples"):
        _DECIDED_BY[name](make(torch.tensor(1.0, dtype=f64)), x)


class _Timed(torch.Tensor):
    """A time tensor carrying Python state (``shift``) that decides what ``f`` does without
    any op reading a value."""

    shift: int

    @staticmethod
    def __new__(cls, data: torch.Tensor, shift: int) -> _Timed:
        out = torch.Tensor._make_subclass(cls, data)
        out.shift = shift
        return out


@pytest.mark.parametrize("name", list(_DECIDED_BY))
def test_a_held_tensor_subclass_is_told_by_identity(name: str) -> None:
    """A tensor subclass held by ``f`` may decide what ``f`` does by its Python state (here
    a roll along the batch): it is told by identity and version, as before loose keys, so
    ``f`` over another one is watched again and refused (held by dtype and shape, it was
    taken for the ``f`` that passed: the per-sample result of ``x.roll(1, 0) ** 2``
    returned silently)."""
    x = torch.randn(8, 2, dtype=f64)

    def make(t: _Timed) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda z: z.roll(t.shift, 0) ** 2 + 0 * t.as_subclass(torch.Tensor)

    first = _DECIDED_BY[name](make(_Timed(torch.tensor(0.0, dtype=f64), 0)), x)
    assert_close(first, torch.full((8,), 4.0, dtype=f64) if name == "laplacian" else 2 * x.sum(-1))
    with pytest.raises(BatchInteractionError, match="f mixes samples"):
        _DECIDED_BY[name](make(_Timed(torch.tensor(1.0, dtype=f64), 1)), x)


class _Sub(torch.Tensor):
    """A tensor subclass with PyTorch's default ``__torch_function__``: every result of an op
    on it comes back wrapped by ``as_subclass``, a new object no ATen call made."""


_SUBCLASSED = {  # each mixes samples by a roll along the batch
    "held": lambda s: lambda z: z.roll(1, 0) ** 2 + 0 * s,
    "carried": lambda s: lambda z: (z * (1 + s)).roll(1, 0) ** 2,
    "returned": lambda s: lambda z: (z.roll(1, 0) ** 2).as_subclass(_Sub),
    "made inside": lambda s: lambda z: z.as_subclass(_Sub).roll(1, 0) ** 2,
}


@pytest.mark.parametrize("name", list(_DECIDED_BY))
@pytest.mark.parametrize("case", list(_SUBCLASSED))
def test_results_of_a_tensor_subclass_are_followed(name: str, case: str) -> None:
    """Results wrapped by a subclass's ``__torch_function__`` (``as_subclass``: a view with
    an ``id`` of its own, unwrapped to a plain view under ``torch.func``) are followed as the
    results they alias (``BatchAxes.follow``): a roll along the batch is refused, where every
    operator returned its per-sample result silently (the watch knew no such object). The
    per-sample counterpart keeps its values (against per-sample Jacobians, float64)."""
    x = torch.randn(8, 2, dtype=f64)
    held = torch.tensor(0.5, dtype=f64).as_subclass(_Sub)
    with pytest.raises(BatchInteractionError, match="f mixes samples"):
        _DECIDED_BY[name](_SUBCLASSED[case](held), x)
    f = lambda z: (z * (1 + held)).as_subclass(_Sub).sin() ** 2  # noqa: E731
    one = lambda v: f(v[None])[0].as_subclass(torch.Tensor)  # noqa: E731
    jacobians = [torch.autograd.functional.jacobian(one, xi) for xi in x]
    got = _DECIDED_BY[name](f, x).as_subclass(torch.Tensor)
    if name == "laplacian":
        want = torch.stack(
            [torch.autograd.functional.hessian(lambda v: one(v).sum(), xi).trace() for xi in x]
        )
    elif name == "hutchinson":  # the probe of ones: the sum of every entry of each Jacobian
        want = torch.stack([j.sum() for j in jacobians])
    else:
        want = torch.stack([j.trace() for j in jacobians])
    assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(_DECIDED_BY))
def test_a_held_tensor_with_attributes_is_told_by_identity(name: str) -> None:
    """A plain tensor may carry Python attributes (``t.shift = 1``) that decide what ``f``
    does without any op reading a value, as a subclass's state does: it is told by identity
    and version, so ``f`` over another one is watched again and refused (held by dtype and
    shape, it was taken for the ``f`` that passed: ``x.roll(1, 0) ** 2``'s per-sample result
    returned silently)."""
    x = torch.randn(8, 2, dtype=f64)

    def make(shift: int) -> Callable[[torch.Tensor], torch.Tensor]:
        t = torch.tensor(float(shift), dtype=f64)
        t.shift = shift  # type: ignore[attr-defined]
        return lambda z: z.roll(t.shift, 0) ** 2 + 0 * t

    first = _DECIDED_BY[name](make(0), x)
    assert_close(first, torch.full((8,), 4.0, dtype=f64) if name == "laplacian" else 2 * x.sum(-1))
    with pytest.raises(BatchInteractionError, match="f mixes samples"):
        _DECIDED_BY[name](make(1), x)


@pytest.mark.parametrize("name", list(_DECIDED_BY))
def test_held_tensors_that_are_one_object_are_another_key(name: str) -> None:
    """A branch on whether two held tensors are one object (``a is b``) reads no value: the
    loose key holds which of them are (``_same_as``), so ``f`` over two objects after one
    held twice is watched again and refused (taken for the ``f`` that passed, its
    ``x.roll(1, 0) ** 2`` returned its per-sample result silently)."""
    x = torch.randn(8, 2, dtype=f64)

    def make(a: torch.Tensor, b: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda z: z.roll(int(a is not b), 0) ** 2 + 0 * a * b

    one = torch.tensor(0.0, dtype=f64)
    first = _DECIDED_BY[name](make(one, one), x)
    assert_close(first, torch.full((8,), 4.0, dtype=f64) if name == "laplacian" else 2 * x.sum(-1))
    with pytest.raises(BatchInteractionError, match="f mixes samples"):
        _DECIDED_BY[name](make(torch.tensor(0.0, dtype=f64), torch.tensor(0.0, dtype=f64)), x)


@pytest.mark.parametrize("name", list(_DECIDED_BY))
def test_a_held_tensor_of_other_strides_is_another_key(name: str) -> None:
    """A branch on a held tensor's layout (``is_contiguous()``) reads no value, so no op
    ``decides``: the loose key holds its strides, and ``f`` over a transposed time of the
    same shape is watched again and refused (held by dtype and shape alone, it was taken for
    the ``f`` that passed: ``x.roll(1, 0) ** 2``'s per-sample result returned silently)."""
    x = torch.randn(8, 2, dtype=f64)

    def make(t: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda z: (z if t.is_contiguous() else z.roll(1, 0)) ** 2 + 0 * t.sum()

    first = _DECIDED_BY[name](make(torch.zeros(2, 4, dtype=f64)), x)
    assert_close(first, torch.full((8,), 4.0, dtype=f64) if name == "laplacian" else 2 * x.sum(-1))
    with pytest.raises(BatchInteractionError, match="f mixes samples"):
        _DECIDED_BY[name](make(torch.zeros(4, 2, dtype=f64).T), x)


def test_the_saved_results_nodes_follow_every_write_not_the_count() -> None:
    """``BatchAxes._saved_mixed`` rebuilds its table of nodes after every write into
    ``mixed``: a removal (a custom Function's constant result, ``_settle``) then an addition
    leave the count as it was, and a table kept by the count missed the new mixed result."""
    from torch.autograd.forward_ad import _set_fwd_grad_enabled

    from torchdiv._core.mixing.tracker import BatchAxes

    x = torch.randn(4, 3, requires_grad=True)
    axes = BatchAxes(x, 1)
    total = torch.ops.aten.sum.dim_IntList

    def summed(t: torch.Tensor) -> torch.Tensor:  # a sum over the samples, watched
        carry = axes.before(total, (t, [0]))
        out = total(t, [0])
        axes.after(carry, (t, [0]), out)
        return out

    first = summed(x)
    with torch.no_grad(), _set_fwd_grad_enabled(False):  # as in a custom Function's forward
        constant = summed(x)
    assert len(axes.mixed) == 2 and axes._saved_mixed(first) is not None  # the table of both
    second = summed(x)  # its ``before`` settles the forward: the constant leaves ``mixed``
    assert len(axes.mixed) == 2 and id(constant) not in axes.mixed
    assert axes._saved_mixed(second) is not None


def test_identity_keeps_f_where_it_cannot_tell_what_f_holds() -> None:
    """``identity`` tells a lambda by what it holds only where it can at every call: a tensor
    made under ``torch.inference_mode`` has no version (``_version`` raised, and every public
    call of a lambda over one failed), a long tuple cost ~0.8 us an item at every call (7.8
    ms for 10k), and a chain of nested tuples raised ``RecursionError``: such a lambda is
    itself (watched at every call, as any new object), a short tuple still by its items."""
    from torchdiv._taylor import mixing

    with torch.inference_mode():
        frozen = torch.ones(3)
    chain: tuple = ()
    for i in range(5000):
        chain = (i, chain)
    long = tuple(range(mixing.TUPLE_ITEMS + 1))
    for held in (frozen, chain, long):
        f = lambda z, held=held: z  # noqa: E731
        assert mixing.identity(f) == (f, ()), type(held)
    short = tuple(range(mixing.TUPLE_ITEMS))
    make = lambda: lambda z, held=short: z  # noqa: E731
    assert mixing.identity(make())[0] is not make()
    assert mixing.identity(make()) == mixing.identity(make())


@pytest.mark.parametrize("name", ["divergence", "jacobian_diagonal", "hutchinson", "laplacian"])
def test_a_lambda_over_an_inference_tensor(name: str) -> None:
    """A constant made under ``torch.inference_mode`` (a mask, a table computed without
    autograd) in a lambda: right per-sample values at every call (``RuntimeError: Inference
    tensors do not track version counter`` before), mixing through it still caught.
    Reference: plain autograd row by row (``loop_diagonal``), grad of grad."""
    from conftest import laplacian_by_grad_of_grad, loop_diagonal

    with torch.inference_mode():
        shift = torch.linspace(-1, 1, 3, dtype=f64)
    x = torch.randn(8, 3, dtype=f64)
    net = _net(3)
    make = lambda: lambda z: torch.tanh(net(z) + shift)  # noqa: E731
    mixes = lambda z: torch.tanh((net(z) + shift).flip(0))  # noqa: E731
    if name == "laplacian":
        calls = lambda f: torchdiv.laplacian(lambda z: f(z).sum(-1), x[:, :2])  # noqa: E731
        make = lambda: lambda z: torch.tanh(net(torch.cat([z, z[:, :1]], 1)) + shift)  # noqa: E731
        expected = laplacian_by_grad_of_grad(lambda z: make()(z).sum(-1), x[:, :2])
    elif name == "hutchinson":
        probes = torchdiv.draw_probes(x, 1, generator=torch.Generator().manual_seed(0))
        calls = lambda f: torchdiv.divergence(f, x, method="hutchinson", probes=probes)  # noqa: E731
        jac = _rows_jacobian(make(), x)
        expected = torch.einsum("bi,bij,bj->b", probes[0], jac, probes[0])
    else:
        calls = lambda f: getattr(torchdiv, name)(f, x)  # noqa: E731
        diagonal = loop_diagonal(make(), x)
        expected = diagonal.sum(-1) if name == "divergence" else diagonal
    for _ in range(3):
        assert_close(calls(make()), expected)
    with pytest.raises(BatchInteractionError, match="mix"):
        calls(mixes if name != "laplacian" else lambda z: mixes(torch.cat([z, z[:, :1]], 1)))


def _rows_jacobian(f, x: torch.Tensor) -> torch.Tensor:
    """Each sample's Jacobian ``(B, D, D)`` of a per-sample ``f``, one backward pass per
    output coordinate."""
    leaf = x.detach().requires_grad_(True)
    y = f(leaf)
    rows = [torch.autograd.grad(y[:, i].sum(), leaf, retain_graph=True)[0] for i in range(3)]
    return torch.stack(rows, 1)


class _Held(nn.Module):
    """A net whose ``forward`` applies ``self.act``, a function it holds as an attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = _net(3)
        self.act = torch.tanh

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(z))


@pytest.mark.parametrize("name", ["divergence", "jacobian_diagonal", "hutchinson", "laplacian"])
@pytest.mark.parametrize("change", ["forward replaced", "activation swapped"])
@pytest.mark.parametrize("given", ["the module", "a lambda made anew"])
def test_a_function_a_module_holds_is_part_of_its_structure(
    name: str, change: str, given: str
) -> None:
    """A module's functions held as attributes are part of its structure: ``net.forward =
    g`` (a patched forward, accelerate's wrapped one) or ``self.act`` swapped for one that
    mixes samples is watched again. Both gave silently wrong per-sample results (the
    module's key held its submodules, flags and hooks only)."""
    x = torch.randn(8, 3, dtype=f64)
    net = _Held()
    f = (lambda: net) if given == "the module" else (lambda: lambda z: net(z))
    calls = {
        "divergence": lambda g: torchdiv.divergence(g, x),
        "jacobian_diagonal": lambda g: torchdiv.jacobian_diagonal(g, x),
        "hutchinson": lambda g: torchdiv.divergence(g, x, method="hutchinson", num_probes=1),
        "laplacian": lambda g: torchdiv.laplacian(lambda z: g(z).sum(-1), x),
    }[name]
    for _ in range(3):
        calls(f())
    flip = lambda y: y.flip(0)  # noqa: E731
    if change == "forward replaced":
        net.forward = lambda z: flip(torch.tanh(net.lin(z)))
    else:
        net.act = lambda y: torch.tanh(flip(y))
    with pytest.raises(BatchInteractionError, match="mix"):
        calls(f())


def _with_empty_features(z: torch.Tensor) -> torch.Tensor:
    """``tanh(z)`` with a per-sample feature block of size 0 reshaped in (a conditioning of
    no features, ``flatten`` of an empty map): no values, so no samples, are moved."""
    empty = z[:, z.shape[1] :].reshape(len(z), 0, 3).flatten(1)
    return torch.cat([torch.tanh(z), empty], -1)


@pytest.mark.parametrize("method", ["taylor", "auto"])
def test_a_reshape_of_an_empty_tensor_mixes_no_samples(method: str) -> None:
    """The watch placed a batch axis by the place values of the reshape's result; an empty
    one has none, so the axis was taken for spread across dimensions and ``f`` refused."""
    x = torch.randn(64, 6, dtype=f64)  # "auto" plans it (structured), past the tiny problems
    lap = torchdiv.laplacian(lambda z: _with_empty_features(z).sum(-1), x, method=method)
    assert_close(lap, (-2 * torch.tanh(x) / torch.cosh(x) ** 2).sum(-1))
    expected = (1 / torch.cosh(x) ** 2).sum(-1)
    assert_close(torchdiv.divergence(_with_empty_features, x), expected)


def _force_of_a_centred_energy(z: torch.Tensor) -> torch.Tensor:
    """``-grad`` of an energy over the batch-centred ``z`` (its mean over the batch mixes)."""
    with torch.enable_grad():
        z = z if z.requires_grad else z.requires_grad_(True)
        energy = (z - z.mean(0)).square().sum()
        return -torch.autograd.grad(energy, z, create_graph=True)[0]


@pytest.mark.parametrize("shape", [(4, 3), (64, 3), (3, 4, 3)])
@pytest.mark.parametrize("f", [lambda z: z - z.mean(0), _force_of_a_centred_energy])
@pytest.mark.parametrize("num_probes", [None, 1])
def test_mixing_is_seen_under_the_caller_s_no_grad(shape, f, num_probes) -> None:
    """Under the caller's ``torch.no_grad()`` (sampling, evaluation) the reverse-mode engine
    evaluated ``f`` inside ``torch.func.vjp`` with grad off below the transform, where the
    watch sees the ops: each was taken for one in a ``no_grad`` block of ``f`` (a constant),
    so ``"auto"`` (tiny problems) returned 0 for ``z - z.mean(0)`` and one-probe Hutchinson
    other samples' terms, silently; under grad mode both were refused."""
    x = torch.randn(*shape, dtype=torch.float64)
    kwargs = {} if num_probes is None else {"method": "hutchinson", "num_probes": num_probes}
    with torch.no_grad(), pytest.raises(BatchInteractionError, match="f mixes samples"):
        torchdiv.divergence(f, x, **kwargs)


@pytest.mark.parametrize("name", ["jacobian", "jacobian_diagonal"])
def test_jacobians_see_mixing_under_the_caller_s_no_grad(name: str) -> None:
    """The same blindness: ``jacobian`` and ``jacobian_diagonal`` of ``z - z.mean(0)`` (also
    through a wide or narrow output) passed under ``no_grad``."""
    x = torch.randn(4, 6, dtype=torch.float64)
    for f in (
        lambda z: z - z.mean(0),
        lambda z: torch.cat([z, z], -1) - torch.cat([z, z], -1).mean(0),
        lambda z: z[:, :1] - z[:, :1].mean(0),
    ):
        if name == "jacobian_diagonal" and f(x).shape != x.shape:
            continue
        with torch.no_grad(), pytest.raises(BatchInteractionError, match="f mixes samples"):
            getattr(torchdiv, name)(f, x)


def test_a_no_grad_divergence_has_no_graph() -> None:
    """Reverse mode now evaluates ``f`` with grad on under the caller's ``no_grad``: its
    results and the value handed out still carry no graph there."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.randn(5, 3)
    with torch.no_grad():
        for kwargs in ({}, {"method": "reverse"}, {"method": "hutchinson", "num_probes": 1}):
            assert not torchdiv.divergence(net, x, **kwargs).requires_grad


class _ConformerConvolution(nn.Module):
    """The Conformer's convolution module (Gulati et al. 2020) as torchaudio writes it: layer
    norm, a pointwise convolution to twice the channels, a GLU over channels, a depthwise
    convolution, a batch norm, SiLU and a pointwise convolution, on ``(B, T, D)``."""

    def __init__(self, dim: int = 4, kernel: int = 3) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.sequential = nn.Sequential(
            nn.Conv1d(dim, 2 * dim, 1),
            nn.GLU(dim=1),
            nn.Conv1d(dim, dim, kernel, padding=(kernel - 1) // 2, groups=dim),
            nn.BatchNorm1d(dim),
            nn.SiLU(),
            nn.Conv1d(dim, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sequential(self.norm(x).transpose(1, 2)).transpose(1, 2)


def test_samples_are_followed_through_a_glu() -> None:
    """``glu`` halves a dimension (an op no table knows, whose result is not shaped as its
    argument): its result was not followed, so what mixed samples after it passed unseen (a
    Conformer block's train-mode batch norm, a mean over samples, a roll along the batch:
    ``"auto"`` returned the derivatives of the batched function). Now refused; in eval mode
    the block is per sample: the divergence of each sample evaluated alone (float64)."""
    torch.manual_seed(0)
    block = _ConformerConvolution().to(f64)
    x = torch.randn(5, 6, 4, dtype=f64)
    with pytest.raises(BatchInteractionError, match="batch norm in train mode"):
        torchdiv.divergence(block, x)
    with pytest.raises(BatchInteractionError, match="batch norm in train mode"):
        torchdiv.laplacian(lambda z: block(z).sum((-2, -1)), x)
    glu = nn.functional.glu
    mixed = {
        "a mean over samples": lambda z: (lambda g: (g - g.mean(0)).sin())(glu(z, -1)),
        "moved samples": lambda z: glu(z.roll(1, 0), -1).sin(),
    }
    y = torch.randn(8, 6, dtype=f64)
    for what, f in mixed.items():
        with pytest.raises(BatchInteractionError, match=what):
            torchdiv.laplacian(lambda z, f=f: f(z).sum(-1), y)
        with pytest.raises(BatchInteractionError):
            torchdiv.divergence(lambda z, f=f: torch.cat([f(z), z[:, :3]], -1), y)
    block.eval()
    got = torchdiv.divergence(block, x)
    alone = [  # each sample alone: the trace of its Jacobian by plain autograd
        torch.autograd.functional.jacobian(block, xb[None]).reshape(24, 24).trace() for xb in x
    ]
    assert_close(got, torch.stack(alone))


def test_sums_into_a_layout_with_the_batch_elsewhere_are_followed() -> None:
    """Values added along a dimension that holds no samples, into a zero tensor with the
    batch not first (features by samples, ``zeros(D, B).index_add(0, i, h.T)``; one index
    of ``index_put``; ``scatter_add``): each sample's values stay in its own places, which the
    watch took for samples added into an unfollowed tensor (``BatchInteractionError``). The
    same sums along the samples still mix them."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64)
    index = torch.tensor([0, 2, 2])
    kept = {
        "index_add": lambda z: torch.zeros_like(z.T).index_add(0, index, z.T.sin()).T,
        "index_put": lambda z: (
            torch.zeros_like(z.T).index_put((index,), z.T.sin(), accumulate=True).T
        ),
        "scatter_add": lambda z: (
            torch.zeros_like(z.T).scatter_add(0, index[:, None].expand(3, len(z)), z.T.sin()).T
        ),
    }
    for name, f in kept.items():
        alone = [torch.autograd.functional.jacobian(f, r[None])[0, :, 0].trace() for r in x]
        assert_close(torchdiv.divergence(f, x), torch.stack(alone), msg=name)
    swap = torch.tensor([1, 0, 2, 3])  # sample 0's values into sample 1's place
    mixed = lambda z: torch.zeros_like(z.T).index_add(1, swap, z.T.sin()).T  # noqa: E731
    with pytest.raises(BatchInteractionError):
        torchdiv.divergence(mixed, x)


_F = nn.functional
# ops that keep each sample along their first argument's leading dimensions and rearrange the
# others (``torchdiv._core.mixing.unknown._changed_dims``): their results were not followed, so a
# mean over samples or a roll along the batch after them passed "auto" silently wrong
_LEADING_OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "diag_embed": torch.diag_embed,
    "diagonal": lambda z: (z[:, :, None] * z[:, None, :]).diagonal(dim1=1, dim2=2),
    "matrix_power of diag_embed": lambda z: torch.linalg.matrix_power(z.diag_embed() + 1, 2),
    "pixel_shuffle": lambda z: _F.pixel_shuffle(z[:, None, None, :].repeat(1, 4, 2, 1), 2),
    "pixel_unshuffle": lambda z: _F.pixel_unshuffle(z[:, None, None, :].repeat(1, 1, 2, 2), 2),
    "F.unfold (im2col)": lambda z: _F.unfold(z[:, None, :, None].repeat(1, 2, 1, 2), (1, 2)),
    "F.fold (col2im)": lambda z: _F.fold(z[:, :, None].repeat(1, 1, 2), (1, 2), (1, 1)),
    "interpolate linear": lambda z: _F.interpolate(z[:, None], scale_factor=2, mode="linear"),
    "interpolate nearest": lambda z: _F.interpolate(z[:, None], size=3),
    "interpolate bicubic": lambda z: _F.interpolate(
        z[:, None, :, None].repeat(1, 1, 1, 2), size=(3, 3), mode="bicubic"
    ),
    "interpolate trilinear": lambda z: _F.interpolate(
        z[:, None, :, None, None], size=(3, 2, 2), mode="trilinear"
    ),
    "adaptive_avg_pool1d": lambda z: _F.adaptive_avg_pool1d(z[:, None], 3),
    "adaptive_max_pool1d": lambda z: _F.adaptive_max_pool1d(z[:, None], 3),
    "max_pool1d with indices": lambda z: _F.max_pool1d(
        z[:, None].repeat(1, 1, 2), 2, return_indices=True
    )[0],
    "det": lambda z: torch.linalg.det(z.diag_embed() + 2),
    "eigvalsh": lambda z: torch.linalg.eigvalsh(z[:, :, None] * z[:, None, :] + 1),
    "rot90": lambda z: torch.rot90(z[:, :, None].repeat(1, 1, 2), 1, (1, 2)),
    "affine_grid": lambda z: _F.affine_grid(
        torch.cat([z[:, :1], z[:, :1] ** 2, z[:, :1].cos()], 1).repeat(1, 2).view(-1, 2, 3),
        [len(z), 1, 2, 3],
        align_corners=False,
    ),
}


def _after(op: Callable[[torch.Tensor], torch.Tensor], g: str) -> Callable:
    """``f(z) = z tanh(s)``, ``s`` each sample's sum of ``op(z)`` after ``g``: ``"mean"``
    subtracts the mean over samples, ``"roll"`` rolls them along the batch (both mix them),
    ``"none"`` leaves them alone."""

    def f(z: torch.Tensor) -> torch.Tensor:
        y = op(z)
        y = {"mean": lambda: y - y.mean(0), "roll": lambda: y.roll(1, 0), "none": lambda: y}[g]()
        return z * y.reshape(len(z), -1).sum(1).tanh()[:, None]

    return f


@pytest.mark.parametrize("name", list(_LEADING_OPS))
def test_samples_are_followed_through_ops_keeping_the_leading_dimensions(name: str) -> None:
    """Pools, resamplings, ``pixel_shuffle``, ``im2col``/``col2im``, ``diag_embed``,
    ``diagonal``, ``linalg`` functions, ``rot90`` and ``affine_grid`` keep each sample along
    the leading dimensions of their first argument (``N``, ``C`` of ``(N, C, *spatial)``; the
    matrices' batch). Their results were not
    followed, so samples mixed after them passed ``"auto"``: now refused, at tiny and larger
    sizes; without the mixing each result is the divergence of each sample alone (float64,
    plain autograd)."""
    torch.manual_seed(0)
    op = _LEADING_OPS[name]
    for b, d in [(2, 1), (8, 6)]:
        x = torch.randn(b, d, dtype=f64)
        for g in ("mean", "roll"):
            f = _after(op, g)
            with pytest.raises(BatchInteractionError):
                torchdiv.divergence(f, x)
            with pytest.raises(BatchInteractionError):
                torchdiv.jacobian_diagonal(f, x)
            with pytest.raises(BatchInteractionError):
                torchdiv.laplacian(lambda z, f=f: f(z).sum(1), x)
        f = _after(op, "none")
        alone = torch.stack(
            [torch.autograd.functional.jacobian(f, xb[None]).reshape(d, d).trace() for xb in x]
        )
        assert_close(torchdiv.divergence(f, x), alone)
        assert_close(torchdiv.jacobian_diagonal(f, x).sum(1), alone)


def test_a_channel_shuffle_of_samples_is_refused() -> None:
    """``channel_shuffle`` keeps its argument's shape, so its result was followed as holding
    the samples in place: with the samples along the channels (``x[None, :, :, None]``) it
    moves them to other samples' places, and ``"auto"`` returned a wrong divergence (sample
    ``1``'s place held sample ``2``'s). Now refused; a shuffle of each sample's own channels
    is per sample: the divergence of each sample evaluated alone (float64)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=f64)
    moved = lambda z: _F.channel_shuffle(z[None, :, :, None], 2)[0, :, :, 0].sin()  # noqa: E731
    with pytest.raises(BatchInteractionError, match="channel_shuffle moving samples"):
        torchdiv.divergence(moved, x)

    def own(z: torch.Tensor) -> torch.Tensor:
        y = _F.channel_shuffle(z[:, :, None, None].repeat(1, 2, 1, 1), 3)
        return y.reshape(len(z), -1)[:, :3].sin()

    alone = torch.stack(
        [torch.autograd.functional.jacobian(own, xb[None]).reshape(3, 3).trace() for xb in x]
    )
    assert_close(torchdiv.divergence(own, x), alone)
