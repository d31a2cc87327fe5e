"""method="structured": trace cyclicity, colouring and jac-only forward propagation.

Every result is compared in float64 with the per-sample blocks of the whole batch's
``torch.func.jacrev`` (``conftest.reference_*``), to 1e-10: both sides are short sums of
products of O(1) numbers. The plan each test exercises is asserted too (a chain, a colouring,
or plain propagation), so a test cannot pass by silently falling back.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import LegacyCube, assert_close, reference_diagonal, reference_divergence
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torchdiv
from torchdiv import _structured
from torchdiv._core import crossover
from torchdiv._core.crossover import ROWS_PROBLEM
from torchdiv._structured import colors, cycle, factors
from torchdiv._structured.factors import Diagonal, Path, Shared
from torchdiv._taylor import RULES, UnsupportedOp, capture, values

f64 = torch.float64
ACTIVATIONS = [nn.Tanh, nn.ReLU, nn.Sigmoid, nn.Softplus, nn.SiLU, nn.GELU, nn.ELU, nn.LeakyReLU]


def mlp(sizes: list[int], act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(f64)


class Residual(nn.Module):
    def __init__(self, inner: nn.Module, scale: float = 1.0):
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x):
        return x + self.scale * self.inner(x)


class ConcatSquash(nn.Module):
    """FFJORD's ConcatSquashLinear: ``Linear(x) * sigmoid(gate(t)) + bias(t)``."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.gate = nn.Linear(1, d_out)
        self.bias = nn.Linear(1, d_out, bias=False)

    def forward(self, t, x):
        t = t.reshape(-1, 1)
        return self.linear(x) * torch.sigmoid(self.gate(t)) + self.bias(t)


class ConcatSquashNet(nn.Module):
    def __init__(self, sizes: list[int], t: torch.Tensor):
        super().__init__()
        self.layers = nn.ModuleList([ConcatSquash(a, b) for a, b in itertools.pairwise(sizes)])
        self.t = t

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(self.t, x)
            if i < len(self.layers) - 1:
                x = torch.nn.functional.softplus(x)
        return x


class ConcatTime(nn.Module):
    """Time as an extra input column: ``net(cat([x, t], -1))``."""

    def __init__(self, d: int, hidden: int, t: torch.Tensor):
        super().__init__()
        self.net, self.t = mlp([d + 1, hidden, hidden, d]), t

    def forward(self, x):
        return self.net(torch.cat([x, self.t.expand(x.shape[0], 1)], -1))


def plan(f, x, batch_dims=1) -> str:
    """Which plan the structured engine takes for ``f`` at ``x``."""
    graph = capture(f, x, RULES, keep_values=True)
    kept = values(graph, x)
    if factors.paths(graph, kept, x, x.shape[:batch_dims].numel()) is not None:
        return "chain"
    return "colors" if colors.colors(graph, kept, x, batch_dims) is not None else "propagate"


def check(f, x, batch_dims=1, chunk_size=None, expected_plan=None):
    kw = {"batch_dims": batch_dims, "method": "structured", "chunk_size": chunk_size}
    assert_close(torchdiv.divergence(f, x, **kw), reference_divergence(f, x, batch_dims))
    assert_close(torchdiv.jacobian_diagonal(f, x, **kw), reference_diagonal(f, x, batch_dims))
    if expected_plan is not None:
        assert plan(f, x, batch_dims) == expected_plan


@pytest.mark.parametrize("depth", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: a.__name__)
def test_mlps_of_every_depth_and_activation(depth, act):
    torch.manual_seed(depth)
    net = mlp([5, *[7] * (depth - 1), 5], act)
    check(net, torch.randn(4, 5, dtype=f64), expected_plan="chain")


def test_one_linear_layer_is_its_trace():
    net = mlp([6, 6])
    x = torch.randn(3, 6, dtype=f64)
    div = torchdiv.divergence(net, x, method="structured")
    assert_close(div, net[0].weight.detach().trace().expand(3))


@pytest.mark.parametrize(
    "sizes",
    [[8, 2, 8], [8, 3, 16, 8], [8, 16, 2, 16, 8], [6, 12, 12, 12, 3, 6]],
    ids=["bottleneck", "narrow-wide", "autoencoder", "deep-narrow-end"],
)
def test_bottleneck_and_autoencoder_shapes(sizes):
    torch.manual_seed(len(sizes))
    check(mlp(sizes), torch.randn(5, sizes[0], dtype=f64), expected_plan="chain")


def test_residual_mlps():
    torch.manual_seed(0)
    check(Residual(mlp([6, 9, 9, 6])), torch.randn(4, 6, dtype=f64), expected_plan="chain")
    nested = nn.Sequential(Residual(mlp([6, 9, 6]), 0.5), nn.Tanh(), Residual(mlp([6, 9, 9, 6])))
    check(nested, torch.randn(4, 6, dtype=f64), expected_plan="chain")


def test_many_residual_blocks_propagate_instead_of_enumerating_paths():
    torch.manual_seed(0)
    net = nn.Sequential(*[Residual(mlp([4, 6, 4])) for _ in range(5)])  # 32 paths
    check(net, torch.randn(3, 4, dtype=f64), expected_plan="propagate")


def test_residual_minus_and_identity():
    torch.manual_seed(0)
    g = mlp([5, 8, 5])
    x = torch.randn(3, 5, dtype=f64)
    check(lambda z: z - 2 * g(z), x, expected_plan="chain")
    check(lambda z: z.clone(), x, expected_plan="chain")
    assert_close(
        torchdiv.divergence(lambda z: z * 1, x, method="structured"), torch.full((3,), 5.0).double()
    )


@pytest.mark.parametrize("per_sample_time", [False, True])
def test_concat_squash_time_conditioning(per_sample_time):
    torch.manual_seed(1)
    t = torch.rand(4, dtype=f64) if per_sample_time else torch.tensor(0.3, dtype=f64)
    net = ConcatSquashNet([6, 10, 10, 6], t).to(f64)
    check(net, torch.randn(4, 6, dtype=f64), expected_plan="chain")


def test_time_concatenated_to_the_input():
    torch.manual_seed(2)
    net = ConcatTime(5, 9, torch.tensor([[0.7]], dtype=f64))
    check(net, torch.randn(4, 5, dtype=f64), expected_plan="chain")


def test_data_movement_on_a_chain():
    torch.manual_seed(3)
    W = torch.randn(12, 12, dtype=f64) / 3

    def f(x):  # (B, 3, 4): reshape, flip, permute, slice, pad: all fixed per-sample maps
        h = torch.tanh(x.reshape(-1, 12) @ W).reshape(-1, 4, 3).transpose(1, 2)
        h = torch.nn.functional.pad(h.flip(-1)[:, :, 1:], (0, 1), value=2.0)
        return torch.sigmoid(h) * 3

    check(f, torch.randn(5, 3, 4, dtype=f64), expected_plan="chain")


def test_products_of_two_branches_propagate():
    torch.manual_seed(4)
    g, h = mlp([5, 7, 5]), mlp([5, 6, 5])
    x = torch.randn(4, 5, dtype=f64)
    check(lambda z: g(z) * h(z), x, expected_plan="propagate")
    check(lambda z: z * z.sum(-1, keepdim=True), x, expected_plan="propagate")
    check(lambda z: torch.tanh(z) * z, x, expected_plan="propagate")
    check(lambda z: z * z, x, expected_plan="chain")  # one input used twice: 2 z


def test_layer_norm_and_attention_propagate():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 6)).to(f64)
    check(net, torch.randn(4, 6, dtype=f64), expected_plan="propagate")
    q = nn.Linear(4, 4).to(f64)

    def attention(x):  # (B, T, E)
        return torch.nn.functional.scaled_dot_product_attention(q(x), x, torch.tanh(x))

    check(attention, torch.randn(3, 5, 4, dtype=f64), expected_plan="propagate")


def conv_net(channels: int, hidden: int, **conv) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 3, padding=1, **conv),
        nn.Tanh(),
        nn.Conv2d(hidden, hidden, 3, padding=1),
        nn.Softplus(),
        nn.Conv2d(hidden, channels, 3, padding=1),
    ).to(f64)


def test_conv_net_uses_48_colours_on_3x16x16_images():
    torch.manual_seed(6)
    net = conv_net(3, 4)
    x = torch.randn(2, 3, 16, 16, dtype=f64)
    graph = capture(net, x, RULES, keep_values=True)
    coloring = colors.colors(graph, values(graph, x), x, 1)
    assert int(coloring.max()) + 1 == 48  # reach 3 per axis: 3 channels x 4 x 4 positions
    check(net, x, chunk_size=10)


@pytest.mark.parametrize(
    "net",
    [
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, (3, 5), padding=(1, 2)), nn.SiLU(), nn.Conv2d(3, 2, 1)
        ),
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=2, dilation=2), nn.Tanh(), nn.Conv2d(3, 2, 3, padding=1)
        ),
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.ELU(), nn.Conv2d(4, 2, 3, padding=1)
        ),
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4).eval(), nn.Conv2d(4, 2, 1)
        ),
    ],
    ids=["asymmetric-kernel", "dilated", "grouped", "eval-batchnorm"],
)
def test_local_conv_nets_are_coloured(net):
    torch.manual_seed(7)
    net = net().to(f64)
    with torch.no_grad():  # nonzero running statistics for the batch norm
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    check(net, torch.randn(2, 2, 9, 11, dtype=f64), expected_plan="colors")


def test_weights_computed_in_f_still_colour():
    """Weight norm computes each convolution's weight inside f (from parameters, not x)."""
    torch.manual_seed(16)
    norm = nn.utils.parametrizations.weight_norm
    net = nn.Sequential(
        norm(nn.Conv2d(2, 4, 3, padding=1)), nn.Tanh(), norm(nn.Conv2d(4, 2, 3, padding=1))
    )
    check(net.double(), torch.randn(2, 2, 9, 9, dtype=f64), expected_plan="colors")


def test_residual_conv_and_channel_concatenation_are_coloured():
    torch.manual_seed(8)
    a, b = nn.Conv2d(2, 3, 3, padding=1).double(), nn.Conv2d(5, 2, 3, padding=1).double()

    def f(x):
        return x + b(torch.cat([torch.tanh(a(x)), x], 1))

    check(f, torch.randn(2, 2, 8, 8, dtype=f64), expected_plan="colors")


def test_one_and_three_dimensional_convolutions_are_coloured():
    torch.manual_seed(9)
    net1 = nn.Sequential(nn.Conv1d(2, 3, 5, padding=2), nn.Tanh(), nn.Conv1d(3, 2, 3, padding=1))
    check(net1.double(), torch.randn(3, 2, 20, dtype=f64), expected_plan="colors")
    net3 = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv3d(2, 1, 3, padding=1))
    check(net3.double(), torch.randn(2, 1, 6, 6, 6, dtype=f64), expected_plan="colors")


@pytest.mark.parametrize(
    "net",
    [
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.AvgPool2d(2),
            nn.Tanh(),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(4, 2, 3, padding=1),
        ),
        lambda: nn.Sequential(nn.Conv2d(2, 2, 3), nn.Tanh(), nn.ConvTranspose2d(2, 2, 3)),
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, stride=2),
            nn.Tanh(),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(4, 2, 1),
        ),
    ],
    ids=["pooling", "shrinking-conv", "strided"],
)
def test_sampled_and_shrinking_conv_nets_are_coloured(net):
    """Pooling, strides, upsampling and a valid convolution undone by a transposed one keep
    the reach small (``locality``; more in ``test_structured_images.py``)."""
    torch.manual_seed(10)
    check(net().to(f64), torch.randn(2, 2, 6, 6, dtype=f64), expected_plan="colors")


@pytest.mark.parametrize(
    "net",
    [
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 3, padding=1)
        ),
    ],
    ids=["group-norm"],
)
def test_non_local_conv_nets_propagate_every_unit_vector(net):
    torch.manual_seed(10)
    check(net().to(f64), torch.randn(2, 2, 6, 6, dtype=f64), expected_plan="propagate")


@pytest.mark.parametrize("batch_dims", [0, 2])
def test_batch_dims(batch_dims):
    torch.manual_seed(11)
    net = mlp([4, 6, 6, 4])
    x = torch.randn(*(3, 2)[:batch_dims], 4, dtype=f64)
    check(lambda z: net(z.reshape(-1, 4)).reshape(z.shape), x, batch_dims, expected_plan="chain")
    conv = conv_net(2, 3)
    xc = torch.randn(*(3, 2)[:batch_dims], 2, 7, 7, dtype=f64)
    check(lambda z: conv(z.reshape(-1, 2, 7, 7)).reshape(z.shape), xc, batch_dims)


@pytest.mark.parametrize(
    "make",
    [
        lambda: (mlp([6, 8, 8, 8, 8, 6]), torch.randn(5, 6, dtype=f64)),
        lambda: (
            ConcatSquashNet([6, 8, 8, 6], torch.rand(5, dtype=f64)).double(),
            torch.randn(5, 6, dtype=f64),
        ),
        lambda: (conv_net(2, 3), torch.randn(3, 2, 7, 7, dtype=f64)),
        lambda: (
            nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 6)).double(),
            torch.randn(5, 6, dtype=f64),
        ),
    ],
    ids=["mlp5", "concat-squash", "conv", "layer-norm"],
)
@pytest.mark.parametrize("fn", ["divergence", "jacobian_diagonal"])
def test_gradients_wrt_parameters_and_x_match_the_reference(make, fn):
    """Training losses: d/dtheta of a weighted sum of results, against the same through
    torch.func's Jacobian (every parameter, and x)."""
    torch.manual_seed(12)
    net, x = make()
    x.requires_grad_(True)
    ours = getattr(torchdiv, fn)(net, x, method="structured")
    ref = (reference_divergence if fn == "divergence" else reference_diagonal)(net, x)
    weights = torch.randn_like(ref)
    params = [x, *net.parameters()]
    got = torch.autograd.grad((ours * weights).sum(), params, allow_unused=True)
    want = torch.autograd.grad((ref * weights).sum(), params, allow_unused=True)
    for g, w, p in zip(got, want, params, strict=True):
        zero = torch.zeros_like(p)
        assert_close(zero if g is None else g, zero if w is None else w)


def test_float32_agrees_with_float64():
    torch.manual_seed(13)
    net = mlp([32, 64, 64, 64, 64, 32])
    x = torch.randn(16, 32, dtype=f64)
    exact = torchdiv.divergence(net, x, method="structured")
    low = torchdiv.divergence(net.float(), x.float(), method="structured")
    assert low.dtype == torch.float32
    # four 64-wide layers of O(1) products: relative round-off a few float32 eps x sqrt(terms)
    torch.testing.assert_close(low.double(), exact, rtol=1e-4, atol=1e-4)


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize(
    ("make", "chunk", "full_block"),
    [
        # a 4-activation chain: the carried block is (N, chunk, width)
        (lambda: (mlp([32, 48, 48, 48, 48, 32]).float(), torch.randn(8, 32)), 4, 8 * 48 * 48),
        # a coloured conv net: (chunk colours, N, channels, H, W) of the widest layer
        (lambda: (conv_net(3, 6).float(), torch.randn(2, 3, 16, 16)), 6, 48 * 2 * 6 * 16 * 16),
    ],
    ids=["chain", "colors"],
)
def test_chunk_size_bounds_memory(make, chunk, full_block):
    torch.manual_seed(14)
    net, x = make()
    net.requires_grad_(False)
    sizes = {}
    for chunk_size in (10**6, chunk):
        with _LargestTensor() as watch:
            out = torchdiv.divergence(net, x, method="structured", chunk_size=chunk_size)
        sizes[chunk_size] = watch.largest
        torch.testing.assert_close(out, reference_divergence(net, x), rtol=1e-4, atol=1e-3)
    assert sizes[10**6] == full_block
    assert (
        sizes[chunk] * (full_block // sizes[chunk]) == full_block and sizes[chunk] < full_block // 4
    )


def test_auto_falls_back_and_structured_names_the_custom_function():
    x = torch.randn(3, 4, dtype=f64, requires_grad=True)
    f = lambda z: LegacyCube.apply(z) * 2  # noqa: E731
    assert_close(torchdiv.divergence(f, x), 6 * (x**2).sum(-1))
    assert_close(torchdiv.jacobian_diagonal(f, x), 6 * x**2)
    for fn in ("divergence", "jacobian_diagonal"):
        with pytest.raises(NotImplementedError, match=rf"{fn}: method='structured' .*custom"):
            getattr(torchdiv, fn)(f, x, method="structured")


def test_auto_falls_back_and_structured_names_the_op_without_a_rule():
    x = torch.randn(3, 4, dtype=f64)
    f = lambda z: torch.lgamma(z.square() + 1).sum(-1, keepdim=True) * z  # noqa: E731
    assert capture(f, x, RULES).unsupported == ["aten.lgamma.default"]
    for fn, reference in (
        ("divergence", reference_divergence),
        ("jacobian_diagonal", reference_diagonal),
    ):
        assert_close(getattr(torchdiv, fn)(f, x), reference(f, x))
        with pytest.raises(
            NotImplementedError, match=rf"{fn}: method='structured' has no .*aten.lgamma"
        ):
            getattr(torchdiv, fn)(f, x, method="structured")


def test_custom_function_is_detected_when_x_does_not_require_grad():
    x = torch.randn(3, 4, dtype=f64)
    assert_close(torchdiv.divergence(lambda z: LegacyCube.apply(z), x), (3 * x**2).sum(-1))
    with pytest.raises(UnsupportedOp, match=r"custom autograd\.Function"):
        _structured.plan("divergence", lambda z: LegacyCube.apply(z), x, 1, None, True, True)


def test_a_no_grad_block_inside_f_is_a_constant_as_in_reverse_mode():
    net = mlp([4, 6, 4])

    def f(z):
        with torch.no_grad():
            scale = z.norm(dim=-1, keepdim=True)
        return net(z) * scale

    x = torch.randn(3, 4, dtype=f64)
    for fn in ("divergence", "jacobian_diagonal"):
        expected = getattr(torchdiv, fn)(f, x, method="reverse")
        assert_close(getattr(torchdiv, fn)(f, x, method="structured"), expected)


def test_in_place_ops_in_f_replay_the_values():
    """``h`` changes after relu read it: its recorded value is stale (``None``), computed
    again from the others."""
    torch.manual_seed(15)
    first, last = nn.Linear(5, 8).double(), nn.Linear(8, 5).double()

    def f(z):
        h = first(z)
        y = torch.relu(h)  # its derivative reads h > 0 (autograd keeps y, so h may change)
        h.add_(5)
        return last(y) + h[:, :5]

    x = torch.randn(4, 5, dtype=f64)
    graph = capture(f, x, RULES, keep_values=True)
    assert graph.values is not None and graph.overwritten
    assert all(v is None for i in graph.overwritten for v in graph.values[i])
    check(f, x, expected_plan="chain")


def test_empty_inputs_and_constant_functions():
    assert torchdiv.divergence(torch.tanh, torch.randn(0, 3), method="structured").shape == (0,)
    assert torchdiv.jacobian_diagonal(torch.tanh, torch.randn(2, 0), method="structured").shape == (
        2,
        0,
    )
    c = torch.randn(3, 4, dtype=f64)
    x = torch.randn(3, 4, dtype=f64)
    assert torch.equal(
        torchdiv.divergence(lambda z: c, x, method="structured"), torch.zeros(3).double()
    )
    assert torch.equal(
        torchdiv.jacobian_diagonal(lambda z: c, x, method="structured"), torch.zeros(3, 4).double()
    )


def test_frozen_net_under_no_grad_gives_a_plain_tensor():
    net = mlp([4, 6, 6, 4]).requires_grad_(False)
    x = torch.randn(3, 4, dtype=f64)
    assert not torchdiv.divergence(net, x, method="structured").requires_grad
    with torch.no_grad():
        assert not torchdiv.divergence(mlp([4, 6, 6, 4]), x, method="structured").requires_grad


# The cycle algebra alone, against dense products.


def _dense(path: Path, n_samples: int) -> torch.Tensor:
    out = None
    for f in path.factors:
        m = (
            f.matrix.expand(n_samples, *f.matrix.shape)
            if isinstance(f, Shared)
            else torch.diag_embed(f.scale.expand(n_samples, -1))
        )
        out = m if out is None else m @ out
    return path.coefficient * out.diagonal(dim1=-2, dim2=-1)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    kinds=st.lists(
        st.sampled_from(["shared", "diagonal", "shared-diagonal"]), min_size=1, max_size=8
    ),
    widths=st.lists(st.integers(1, 6), min_size=8, max_size=8),
    chunk=st.one_of(st.none(), st.integers(1, 4)),
    seed=st.integers(0, 2**16),
)
def test_cycle_trace_and_diagonal_equal_the_dense_product(kinds, widths, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    n_samples, n = 3, widths[0]
    width, path = n, []
    for i, kind in enumerate(kinds):
        if kind == "shared":
            out = n if i == len(kinds) - 1 else widths[i + 1] if i + 1 < len(widths) else n
            path.append(Shared(torch.randn(out, width, generator=g, dtype=f64)))
            width = out
        else:
            rows = 1 if kind == "shared-diagonal" else n_samples
            path.append(Diagonal(torch.randn(rows, width, generator=g, dtype=f64)))
    if width != n:
        path.append(Shared(torch.randn(n, width, generator=g, dtype=f64)))
    p = Path(-0.5, tuple(path))
    x = torch.zeros(n_samples, n, dtype=f64)
    dense_diagonal = _dense(p, n_samples)
    assert_close(cycle.trace([p], x, n_samples, chunk), dense_diagonal.sum(-1))
    assert_close(cycle.diagonal([p], x, n_samples, chunk), dense_diagonal)


def test_cycle_trace_of_the_identity_path_is_the_event_size():
    x = torch.zeros(4, 2, 3, dtype=f64)
    assert_close(cycle.trace([Path(2.0, ())], x, 4, None), torch.full((4,), 12.0, dtype=f64))
    assert_close(cycle.diagonal([Path(2.0, ())], x, 4, None), torch.full((4, 6), 2.0, dtype=f64))


@pytest.mark.parametrize("two", [False, True], ids=["work", "two-entries"])
@pytest.mark.parametrize("train", [False, True])
def test_auto_leaves_small_diagonals_to_plain_autograd(monkeypatch, train, two):
    """``"auto"``'s diagonal where plain autograd's rows cost less than the structured
    engine (``rows_diagonal``: work ``n x B x W`` within ``ROWS_DIAGONAL_WORK``, frozen or
    trained; at most ``LOOP_ROWS`` entries per sample at any work, ``two``: issue 19's D = 2,
    B = 4096 is past the limit, here lowered under a small net's work) goes to the generic
    engines; any trace is planned. Values and parameter gradients as the float64 loop's."""
    from conftest import assert_same_parameter_gradients, loop_diagonal, tanh_mlp

    planned: list[bool] = []
    plan = _structured.plan
    monkeypatch.setattr(_structured, "plan", lambda *a, **k: planned.append(True) or plan(*a, **k))
    if two:
        monkeypatch.setattr(_structured, "ROWS_DIAGONAL_WORK", 1)
        monkeypatch.setattr(_structured, "ROWS_DIAGONAL_WORK_TRAINED", 1)
    d, batch = (2, 1100) if two else (8, 128)
    net = tanh_mlp(d, 16, d).requires_grad_(train)
    x = torch.randn(batch, d, dtype=f64)  # 2 x 2200 or 8 x 1024: above TINY_PROBLEM
    assert d * x.numel() > _structured.TINY_PROBLEM
    assert (crossover.work(net, x, 1) <= _structured.ROWS_DIAGONAL_WORK) is not two
    for _ in range(2):  # (watched, then unwatched)
        diagonal = torchdiv.jacobian_diagonal(net, x)
    assert planned == []
    expected = loop_diagonal(net, x, create_graph=train)
    assert_close(diagonal, expected)
    if train:
        assert_same_parameter_gradients(net, diagonal.square().sum(), expected.square().sum())
    torchdiv.divergence(net, x)
    assert planned == [True]


def _issue_mlp(d: int) -> nn.Module:
    """The tanh MLP of issue 19's cells, D -> 64 -> 64 -> D (float32, as benchmarked)."""
    from conftest import tanh_mlp

    return tanh_mlp(d, 64, d, dtype=torch.float32)


@pytest.mark.parametrize(
    ("d", "batch", "train", "rows"),
    [
        (2, 4096, False, True),  # a pass per row at any work: rows 1.8 ms, structured 2.9
        (2, 4096, True, True),  # rows 2.0 ms, structured 2.6 (percall24)
        (8, 256, False, True),  # rows 0.86 ms, structured 1.28 (bench/diagonal_choice.py)
        (8, 256, True, True),
        (16, 256, False, True),  # rows 1.07 ms, structured 1.37 (percall32)
        (16, 256, True, True),  # rows 1.15 ms, structured 1.60
        (8, 1024, False, True),  # rows 2.19 ms, structured 2.91
        (8, 2048, False, False),  # structured 4.1-4.7 ms, rows 5.8
        (8, 4096, False, False),  # structured 5.1 ms, rows 8.5
        (8, 4096, True, False),
        (64, 256, False, False),  # past ROWS_PROBLEM
    ],
)
def test_rows_diagonal_at_issue_19s_cells(d, batch, train, rows):
    """The choice ``"auto"`` makes for the Jacobian diagonal at the measured cells."""
    net, x = _issue_mlp(d).requires_grad_(train), torch.zeros(batch, d)
    assert _structured.chosen("auto", net, x, 1)
    assert _structured.rows_diagonal(net, x, 1) is rows


def test_rows_diagonal_turns_at_its_work_limits(monkeypatch):
    """The rows up to the work limit of the scenario, the structured engine one multiply-add
    past it; the trained limit only for a module with a parameter that requires grad, under
    grad mode."""
    net, x = _issue_mlp(8).requires_grad_(False), torch.zeros(256, 8)
    work = crossover.work(net, x, 1)
    monkeypatch.setattr(_structured, "ROWS_DIAGONAL_WORK_TRAINED", 2 * work)
    monkeypatch.setattr(_structured, "ROWS_DIAGONAL_WORK", work)
    assert _structured.rows_diagonal(net, x, 1)
    monkeypatch.setattr(_structured, "ROWS_DIAGONAL_WORK", work - 1)
    assert not _structured.rows_diagonal(net, x, 1)  # frozen: not the trained limit
    net.requires_grad_(True)
    assert _structured.rows_diagonal(net, x, 1)
    with torch.no_grad():
        assert not _structured.rows_diagonal(net, x, 1)
    monkeypatch.setattr(_structured, "ROWS_DIAGONAL_WORK_TRAINED", work)
    assert _structured.rows_diagonal(net, x, 1)
    monkeypatch.setattr(_structured, "ROWS_DIAGONAL_WORK_TRAINED", work - 1)
    assert not _structured.rows_diagonal(net, x, 1)


def test_rows_diagonal_only_where_the_generic_engines_take_rows():
    """Past ``ROWS_PROBLEM`` unit vectors x elements the generic engines run ``torch.func``'s
    reverse mode, slower than the structured engine: not chosen however little ``f`` does."""

    class Scaled(nn.Module):  # one parameter: W = n, the work of a 64-element event tiny
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.scale * x)

    net, x = Scaled(), torch.zeros(128, 64)
    assert crossover.work(net, x, 1) <= _structured.ROWS_DIAGONAL_WORK
    assert 64 * x.numel() > ROWS_PROBLEM
    assert not _structured.rows_diagonal(net, x, 1)
    assert _structured.rows_diagonal(net, x[: ROWS_PROBLEM // 64 // 64], 1)


def test_rows_diagonal_never_for_a_function_or_a_convolution():
    """A function's work and ops are not seen (a closure over a conv net with in-place ops
    that autograd refuses, ``test_statistics_training``), a conv net's rows would run forward
    mode: both stay with the structured engine, however small."""
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 1, 3, padding=1))
    x = torch.zeros(2, 1, 4, 4)
    assert crossover.work(conv, x, 1) <= _structured.ROWS_DIAGONAL_WORK
    assert not _structured.rows_diagonal(conv, x, 1)
    net, x = _issue_mlp(8), torch.zeros(256, 8)
    assert _structured.rows_diagonal(net, x, 1)
    assert not _structured.rows_diagonal(lambda z: net(z), x, 1)
    assert _structured.rows_diagonal(net.forward, x, 1)  # a module's bound method is seen


def test_rows_diagonal_reads_a_weight_normed_layers_width():
    """``weight_norm``'s parametrization holds ``g`` (64, 1) before ``v`` (64, 16): the first
    weight's width was read as 1, the work 16x too high, and the diagonal (1.31x slower by the
    structured engine, ``bench/watch_regressions.py``) no longer left to the rows."""
    from torch.nn.utils import parametrizations

    plain = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 16))
    normed = nn.Sequential(parametrizations.weight_norm(nn.Linear(16, 64)), *plain[1:])
    x = torch.zeros(32, 16)
    found = crossover.held(normed)
    assert found is not None and found.width == 16
    assert crossover.work(normed, x, 1) < 2 * crossover.work(plain, x, 1)
    assert _structured.rows_diagonal(normed, x, 1) and _structured.rows_diagonal(plain, x, 1)


def test_small_diagonals_left_to_plain_autograd_are_watched_for_mixing():
    """An ``f`` that centres its features over the batch, at a size where a diagonal skips
    the structured engine: the generic engines' watch refuses it, at the first
    call and at the next."""

    class Centred(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 8, dtype=f64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.linear(x)
            return torch.tanh(h - h.mean(0))

    net, x = Centred(), torch.randn(128, 8, dtype=f64)
    assert 8 * x.numel() > _structured.TINY_PROBLEM and _structured.rows_diagonal(net, x, 1)
    for _ in range(2):
        with pytest.raises(torchdiv.BatchInteractionError):
            torchdiv.jacobian_diagonal(net, x)
