"""jacobian, jacobian_diagonal and divergence against independent references."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import (
    KnownJacobian,
    assert_close,
    conv_net,
    reference_diagonal,
    reference_divergence,
    reference_jacobian,
    tanh_mlp,
)
from torch.func import jacfwd, vmap

import torchdiv

METHODS = ["auto", "forward", "reverse", "structured"]
DTYPES = [torch.float32, torch.float64]


def dense(method: str) -> str:
    """``jacobian`` has no ``"structured"`` method (it is for traces and diagonals)."""
    return "auto" if method == "structured" else method


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["low_rank", "nonsymmetric", "diagonal_heavy"])
def test_known_jacobian_problems(method, dtype, kind):
    problem = KnownJacobian(kind, 6, dtype)
    x = torch.randn(5, 6, dtype=dtype)
    expected = problem.jacobian(x)
    assert_close(torchdiv.jacobian(problem, x, method=dense(method)), expected, scale=10)
    assert_close(
        torchdiv.jacobian_diagonal(problem, x, method=method),
        expected.diagonal(dim1=-2, dim2=-1),
        scale=10,
    )
    assert_close(
        torchdiv.divergence(problem, x, method=method),
        expected.diagonal(dim1=-2, dim2=-1).sum(-1),
        scale=10,
    )


@pytest.mark.parametrize("method", METHODS)
def test_linear_map_divergence_is_trace(method):
    A = torch.randn(7, 7, dtype=torch.float64)
    b = torch.randn(7, dtype=torch.float64)
    x = torch.randn(3, 7, dtype=torch.float64)
    div = torchdiv.divergence(lambda x: x @ A.T + b, x, method=method)
    assert_close(div, A.trace().expand(3))


@pytest.mark.parametrize("method", METHODS)
def test_square_has_diagonal_two_x(method):
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    assert_close(torchdiv.jacobian_diagonal(lambda x: x**2, x, method=method), 2 * x)
    assert_close(torchdiv.divergence(lambda x: x**2, x, method=method), 2 * x.flatten(1).sum(-1))


@pytest.mark.parametrize("method", METHODS)
def test_seed_003_model_matches_functional_jacobian_blocks(method):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 20), torch.nn.Tanh(), torch.nn.Linear(20, 2)
    ).double()
    x = torch.rand(10, 3, dtype=torch.float64)
    full = torch.autograd.functional.jacobian(model, x)  # (10, 2, 10, 3)
    blocks = full.diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    jac = torchdiv.jacobian(model, x, method=dense(method))
    assert jac.shape == (10, 2, 3)
    assert_close(jac, blocks)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_against_torch_func(method, dtype):
    net = tanh_mlp(5, 16, 5, dtype)
    x = torch.randn(6, 5, dtype=dtype)
    assert_close(torchdiv.jacobian(net, x, method=dense(method)), reference_jacobian(net, x))
    assert_close(torchdiv.jacobian_diagonal(net, x, method=method), reference_diagonal(net, x))
    assert_close(torchdiv.divergence(net, x, method=method), reference_divergence(net, x))


@pytest.mark.parametrize("method", METHODS)
def test_non_square_jacobian_against_jacfwd(method):
    net = tanh_mlp(4, 8, 9)
    x = torch.randn(3, 4, dtype=torch.float64)
    expected = vmap(jacfwd(net))(x)
    assert_close(torchdiv.jacobian(net, x, method=dense(method)), expected)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_net_on_images(method, dtype):
    net = conv_net(2, dtype)
    x = torch.randn(3, 2, 4, 4, dtype=dtype)
    jac = torchdiv.jacobian(net, x, method=dense(method), chunk_size=7)
    assert jac.shape == (3, 2, 4, 4, 2, 4, 4)
    assert_close(jac, reference_jacobian(net, x))
    assert_close(torchdiv.divergence(net, x, method=method), reference_divergence(net, x))


@pytest.mark.parametrize("batch_dims", [0, 1, 2])
@pytest.mark.parametrize("method", METHODS)
def test_batch_dims(batch_dims, method):
    W = torch.randn(3, 4, 3, 4, dtype=torch.float64) / 4

    def f(x):  # event (3, 4) -> (3, 4), nonlinear, any number of leading dims
        return torch.tanh(torch.einsum("...ij,ijkl->...kl", x, W)) * x

    x = torch.randn(*(2, 5)[:batch_dims], 3, 4, dtype=torch.float64)
    jac = torchdiv.jacobian(f, x, batch_dims=batch_dims, method=dense(method))
    assert jac.shape == (*x.shape[:batch_dims], 3, 4, 3, 4)
    assert_close(jac, reference_jacobian(f, x, batch_dims))
    div = torchdiv.divergence(f, x, batch_dims=batch_dims, method=method)
    assert div.shape == x.shape[:batch_dims]
    assert_close(div, reference_divergence(f, x, batch_dims))
    diag = torchdiv.jacobian_diagonal(f, x, batch_dims=batch_dims, method=method)
    assert_close(diag, reference_diagonal(f, x, batch_dims))


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 100])
@pytest.mark.parametrize("method", METHODS)
def test_chunk_sizes_give_the_same_answer(chunk_size, method):
    net = tanh_mlp(8, 12, 8)
    x = torch.randn(4, 8, dtype=torch.float64)
    kw = {"method": method, "chunk_size": chunk_size}
    assert_close(
        torchdiv.jacobian(net, x, **{**kw, "method": dense(method)}), reference_jacobian(net, x)
    )
    assert_close(torchdiv.divergence(net, x, **kw), reference_divergence(net, x))
    assert_close(torchdiv.jacobian_diagonal(net, x, **kw), reference_diagonal(net, x))


def test_forward_equals_reverse_float32():
    net = tanh_mlp(10, 32, 10, torch.float32)
    x = torch.randn(16, 10)
    fwd = torchdiv.divergence(net, x, method="forward")
    rev = torchdiv.divergence(net, x, method="reverse")
    assert_close(fwd, rev)
    assert fwd.dtype == torch.float32


def test_non_contiguous_input():
    net = tanh_mlp(6, 8, 6)
    base = torch.randn(6, 9, dtype=torch.float64)
    x = base.T[:, :6]  # (9, 6), transposed and sliced: not contiguous
    assert not x.is_contiguous()
    for method in METHODS:
        assert_close(torchdiv.divergence(net, x, method=method), reference_divergence(net, x))
        assert_close(torchdiv.jacobian(net, x, method=dense(method)), reference_jacobian(net, x))


@pytest.mark.parametrize("method", METHODS)
def test_closure_over_per_sample_tensor(method):
    """The seed thread's g(t, x) with t.shape == (B,): f receives the whole batch."""
    net = tanh_mlp(5, 8, 5)
    t = torch.rand(4, dtype=torch.float64) + 0.5

    def f(x):
        return net(x) * t[:, None] + torch.sin(t[:, None] * x)

    x = torch.randn(4, 5, dtype=torch.float64)
    assert_close(torchdiv.divergence(f, x, method=method), reference_divergence(f, x))
    assert_close(torchdiv.jacobian(f, x, method=dense(method)), reference_jacobian(f, x))


def test_float64_finite_differences():
    net = tanh_mlp(4, 10, 4)
    x = torch.randn(3, 4, dtype=torch.float64)
    h = 1e-6
    fd = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for i in range(4):
            e = torch.zeros(4, dtype=torch.float64)
            e[i] = h
            fd += (net(x + e)[:, i] - net(x - e)[:, i]) / (2 * h)
    # central differences: truncation O(h^2) ~ 1e-12, round-off ~ eps / h ~ 1e-10
    torch.testing.assert_close(torchdiv.divergence(net, x), fd, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("fn", ["divergence", "jacobian_diagonal", "jacobian"])
@pytest.mark.parametrize("method", METHODS)
def test_gradients_wrt_parameters_and_x(fn, method):
    net = tanh_mlp(4, 8, 4)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    ours = getattr(torchdiv, fn)(net, x, method=dense(method) if fn == "jacobian" else method)
    ref = {
        "divergence": reference_divergence,
        "jacobian_diagonal": reference_diagonal,
        "jacobian": reference_jacobian,
    }[fn](net, x)
    weights = torch.randn_like(ref)
    params = [x, *net.parameters()]
    got = torch.autograd.grad((ours * weights).sum(), params, allow_unused=True)
    want = torch.autograd.grad((ref * weights).sum(), params, allow_unused=True)
    for g, w, p in zip(got, want, params, strict=True):  # unused: the last bias for a trace
        zero = torch.zeros_like(p)
        assert_close(zero if g is None else g, zero if w is None else w)


def test_gradient_wrt_closed_over_time():
    t = torch.tensor([0.3, 0.7, 1.1], dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, dtype=torch.float64)

    def f(x):
        return torch.sin(t[:, None] * x)

    div = torchdiv.divergence(f, x)  # sum_i t cos(t x_i)
    (g,) = torch.autograd.grad(div.sum(), t)
    expected = (torch.cos(t[:, None] * x) - t[:, None] * x * torch.sin(t[:, None] * x)).sum(-1)
    assert_close(g, expected)


@pytest.mark.parametrize("method", METHODS)
def test_under_no_grad(method):
    net = tanh_mlp(4, 8, 4)
    x = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        div = torchdiv.divergence(net, x, method=method)
        jac = torchdiv.jacobian(net, x, method=dense(method))
        assert not torch.is_grad_enabled()
    assert not div.requires_grad and not jac.requires_grad
    assert_close(div, reference_divergence(net, x))
    assert_close(jac, reference_jacobian(net, x))


@pytest.mark.parametrize("method", METHODS)
def test_frozen_function_result_does_not_require_grad(method):
    net = tanh_mlp(4, 8, 4).requires_grad_(False)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert not torchdiv.divergence(net, x, method=method).requires_grad


@pytest.mark.parametrize("method", METHODS)
def test_constant_function_has_zero_derivatives(method):
    x = torch.randn(3, 4, dtype=torch.float64)
    c = torch.randn(3, 4, dtype=torch.float64)
    assert torch.equal(torchdiv.divergence(lambda x: c, x, method=method), torch.zeros(3).double())
    assert torch.equal(
        torchdiv.jacobian(lambda x: c, x, method=dense(method)), torch.zeros(3, 4, 4).double()
    )
    p = torch.randn(4, dtype=torch.float64, requires_grad=True)  # depends on a parameter only
    div = torchdiv.divergence(lambda x: p.expand(3, 4), x, method=method)
    assert torch.equal(div.detach(), torch.zeros(3).double())


@pytest.mark.parametrize("method", METHODS)
def test_one_element_event_and_identity(method):
    x = torch.randn(6, 1, dtype=torch.float64)
    assert_close(torchdiv.divergence(torch.sin, x, method=method), torch.cos(x[:, 0]))
    assert_close(torchdiv.divergence(torch.sin, x[:, 0], method=method), torch.cos(x[:, 0]))
    y = torch.randn(2, 3, 5)
    assert torch.equal(torchdiv.divergence(lambda z: z, y, method=method), torch.full((2,), 15.0))


def test_empty_batch():
    x = torch.randn(0, 3, dtype=torch.float64)
    assert torchdiv.divergence(torch.sin, x).shape == (0,)
    assert torchdiv.jacobian(torch.sin, x).shape == (0, 3, 3)


@pytest.mark.parametrize("batch", [(2, 0), (0, 4)])
def test_empty_batch_of_two_dimensions_through_a_linear_layer(batch):
    """nn.Linear folds both batch dimensions into one (a reshape of zero elements), which the
    sample-mixing watch read as spreading the samples of the dimension of 2 or 4: "auto"
    raised BatchInteractionError on an empty batch."""
    net = torch.nn.Linear(3, 3)
    x = torch.randn(*batch, 3)
    assert torchdiv.divergence(net, x, batch_dims=2).shape == batch
    assert torchdiv.jacobian_diagonal(net, x, batch_dims=2).shape == (*batch, 3)
    assert torchdiv.jacobian(net, x, batch_dims=2).shape == (*batch, 3, 3)


def test_result_dtype_is_that_of_x():
    x = torch.randn(3, 4)
    assert torchdiv.divergence(lambda z: z.double() ** 2, x).dtype == torch.float32


@pytest.mark.parametrize("method", METHODS)
def test_expanded_and_view_inputs(method):
    """A stride-0 x (one sample repeated) and a view of a leaf that requires grad."""
    net = tanh_mlp(3, 6, 3)
    x = torch.randn(1, 3, dtype=torch.float64).expand(5, 3)
    assert_close(torchdiv.divergence(net, x, method=method), reference_divergence(net, x))
    leaf = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    view = leaf[:, ::2]
    div = torchdiv.divergence(net, view, method=method)
    assert_close(div, reference_divergence(net, view))
    (g,) = torch.autograd.grad(div.sum(), leaf)
    (ref,) = torch.autograd.grad(reference_divergence(net, view).sum(), leaf)
    assert_close(g, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_float32(dtype):
    net = tanh_mlp(4, 8, 4, torch.float32)
    x = torch.randn(6, 4)
    low = torchdiv.divergence(net.to(dtype), x.to(dtype))
    assert low.dtype == dtype
    # a handful of roundings at eps = 2**-8 (bfloat16) / 2**-11 (float16) on O(1) values
    torch.testing.assert_close(
        low.float(), reference_divergence(net.float(), x), rtol=0.05, atol=0.05
    )


@pytest.mark.parametrize("method", METHODS)
def test_under_inference_mode(method):
    net = tanh_mlp(4, 8, 4)
    x = torch.randn(3, 4, dtype=torch.float64)
    with torch.inference_mode():
        div = torchdiv.divergence(net, x, method=method)
    assert_close(div, reference_divergence(net, x).detach())


_OPTIONS_MADE_IN_INFERENCE = {  # calls given a tensor option made under inference mode
    "divergence": lambda f, x, p, s: torchdiv.divergence(f, x, method="hutchinson", probes=p),
    "estimate_divergence": lambda f, x, p, s: torchdiv.estimate_divergence(f, x, probes=p).value,
    "jacobian_diagonal": lambda f, x, p, s: torchdiv.jacobian_diagonal(
        f, x, method="hutchinson", probes=p
    ),
    "laplacian": lambda f, x, p, s: torchdiv.laplacian(f, x, method="hutchinson", probes=p),
    "weighted_laplacian": lambda f, x, p, s: torchdiv.weighted_laplacian(f, x, sigma=s),
}


@pytest.mark.parametrize("name", _OPTIONS_MADE_IN_INFERENCE)
def test_options_made_under_inference_mode_train(name):
    """Probes drawn once under ``torch.inference_mode()`` (an evaluation loop's) and passed to
    a training call as ``probes=``, or a ``sigma=`` made there, raised PyTorch's "Inference
    tensors cannot be saved for backward": they are cloned, as an inference-tensor ``x`` is.
    Values and parameter gradients equal those of the same tensors made normally."""
    net = tanh_mlp(3, 8, 3)
    f = lambda z: net(z) * z  # noqa: E731
    x = torch.randn(4, 3, dtype=torch.float64)
    with torch.inference_mode():
        probes = torchdiv.draw_probes(x, 2, generator=torch.Generator().manual_seed(0))
        sigma = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    call = _OPTIONS_MADE_IN_INFERENCE[name]
    params = list(net.parameters())
    got = call(f, x, probes, sigma)
    want = call(f, x, probes.clone(), sigma.clone())
    assert_close(got, want)
    options = {"allow_unused": True, "materialize_grads": True}
    grads = torch.autograd.grad(got.sum(), params, **options)
    for a, b in zip(grads, torch.autograd.grad(want.sum(), params, **options), strict=True):
        assert_close(a, b)
    assert probes.is_inference() and sigma.is_inference()  # the caller's are left as they were


@pytest.mark.parametrize("name", ["divergence", "jacobian", "laplacian", "estimate_divergence"])
def test_an_uninitialized_lazy_module_is_refused_before_it_is_evaluated(name):
    """A lazy module's first forward inside a torch.func transform left it half made, and the
    next evaluation crashed the process (a segmentation fault)."""
    out = 1 if name == "laplacian" else 4
    net = torch.nn.Sequential(
        torch.nn.LazyLinear(out), torch.nn.Flatten(0) if out == 1 else torch.nn.Tanh()
    )
    options = {"num_probes": 2} if name == "estimate_divergence" else {}
    with pytest.raises(
        ValueError, match=rf"^{name}: f has uninitialized parameters .*LazyLinear.*f\(x\)"
    ):
        getattr(torchdiv, name)(net, torch.randn(3, 4), **options)
    net(torch.randn(3, 4))  # initialized: runs
    getattr(torchdiv, name)(net, torch.randn(3, 4), **options)


@pytest.mark.parametrize("method", ["auto", "structured"])
def test_a_function_closing_over_a_lazy_module_is_refused(method):
    """``f = lambda z: net(z)`` with a lazy ``net``: the check looked only into modules and
    bound methods, and the first forward inside a transform crashed the process
    (``method="forward"``, ``"reverse"``: a segmentation fault; ``"auto"``: an
    ``AttributeError`` about a ``torch._C.Tag``). Now refused as a lazy module ``f`` is, by
    the walk that follows a function's closure (``_core.script.scripted``)."""
    net = torch.nn.Sequential(torch.nn.LazyLinear(3), torch.nn.Tanh())
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"^divergence: f has uninitialized .*LazyLinear"):
        torchdiv.divergence(lambda z: net(z), x, method=method)
    net(x)  # initialized: runs
    torchdiv.divergence(lambda z: net(z), x, method=method)


@pytest.mark.parametrize("kind", ["module", "bound", "partial", "object"])
def test_a_lazy_module_added_after_a_call_is_refused(kind):
    """The walk at the start of a call (``_core.script.call_started``) stands in for
    ``check_initialized``'s own: it is made at every call, so a lazy module added to ``f``'s
    tree after calls that passed (which a cache of the first call's finding would miss) is
    refused, also through a bound method of the module, a partial (zuko's velocity at a time:
    ``partial(transform.f, t)``) and a callable object holding it."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh())
    x = torch.randn(3, 2)

    class Velocity:
        def __init__(self, net):
            self.net = net

        def __call__(self, z):
            return self.net(z)

    f = {
        "module": net,
        "bound": net.forward,
        "partial": functools.partial(lambda t, z: net(z) * t, 2.0),
        "object": Velocity(net),
    }[kind]
    torchdiv.divergence(f, x), torchdiv.jacobian_diagonal(f, x)
    net.append(torch.nn.Sequential(torch.nn.LazyLinear(2)))
    with pytest.raises(ValueError, match=r"^divergence: f has uninitialized .*LazyLinear"):
        torchdiv.divergence(f, x)
    net(x)  # initialized: runs
    torchdiv.divergence(f, x)


def test_the_walk_at_the_start_of_a_call_is_read_once_for_that_f(monkeypatch):
    """``check_initialized`` takes the call's walk (``initialized``) for the ``f`` it walked (a
    module, or a function: both walks follow its closure, defaults and globals alike), once
    (after ``f`` ran, a check walks again), and never for another ``f`` or outside a call."""
    from torchdiv._core import checks, script

    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    read = []

    def spy(f):
        read.append((f, script.initialized(f)))
        return read[-1][1]

    monkeypatch.setattr(checks, "initialized", spy)

    class Velocity:  # a callable object of the user's
        def __call__(self, z):
            return net(z)

    torchdiv.divergence(net, torch.randn(3, 2))
    torchdiv.divergence(lambda z: net(z), torch.randn(3, 2))
    torchdiv.divergence(functools.partial(lambda t, z: net(z) * t, 2.0), torch.randn(3, 2))
    torchdiv.divergence(Velocity(), torch.randn(3, 2))
    assert [found for _, found in read] == [True] * 4
    token = script.call_started(net)
    try:
        assert script.initialized(net) and not script.initialized(net)
    finally:
        script.call_ended(token)
    assert not script.initialized(net)
    token = script.call_started(torch.nn.Sequential(torch.nn.LazyLinear(2)))
    try:
        assert not script.initialized(net)
    finally:
        script.call_ended(token)
