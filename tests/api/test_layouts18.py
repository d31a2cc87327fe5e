"""Unusual but legal layouts and dtypes of ``x``, every public operator against float64
per-sample references, called twice and interleaved with a contiguous ``x`` (cache staleness).

Layouts: channels-last (4-D and 5-D conv nets with group norms, called contiguous, then
channels-last, then back), a batch-transposed view, a strided slice, a stride-0 batch
(``x0.expand(B, ...)``: every sample shares memory), a storage offset, an inference tensor, a
leaf that requires grad and a non-leaf. References evaluate ``f`` on each sample alone
(``x[b:b + 1]``) and differentiate it row by row with ``autograd.grad`` (``create_graph``, so
parameter gradients and gradients to ``x`` follow), Laplacians by grad of grad the same way.
Nothing the caller passed changes: values, strides, offset, ``requires_grad``, leafness,
``.grad`` and the version counter of ``x``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import assert_close, parameter_gradients, tolerances
from torch import nn

import torchdiv

f64 = torch.float64
Function = Callable[[torch.Tensor], torch.Tensor]


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _conv(dims: int) -> nn.Module:
    """A diffusion-style block: conv, GroupNorm, SiLU, conv on ``dims``-D images of ``C``
    channels (``IMAGES``: 8 values per sample, few enough for the row-by-row references)."""
    torch.manual_seed(1)
    conv, c = (nn.Conv2d, 2) if dims == 2 else (nn.Conv3d, 1)
    return nn.Sequential(
        conv(c, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(), conv(4, c, 3, padding=1)
    ).double()


IMAGES = {2: (2, 2, 2, 2), 3: (2, 1, 2, 2, 2)}


def _energy(net: nn.Module) -> Function:
    """A scalar per sample: ``u(x) = Σ tanh(net(x))²``."""
    return lambda z: torch.tanh(net(z)).square().flatten(1).sum(1)


def per_sample_jacobian(f: Function, x: torch.Tensor) -> torch.Tensor:
    """``(S, m, n)`` for ``x`` of shape ``(S, ...)``: ``f`` on each sample alone, one
    ``autograd.grad`` per output row, with a graph to ``x`` and ``f``'s parameters."""
    n = x.shape[1:].numel()
    blocks = [x.new_zeros(0, n, n)]  # an empty batch's (square f's)
    for b in range(len(x)):
        xb = x[b : b + 1]
        leaf = xb if xb.requires_grad else xb.detach().requires_grad_(True)
        y = f(leaf).flatten()
        rows = [
            torch.autograd.grad(y[i], leaf, create_graph=True)[0].flatten() for i in range(len(y))
        ]
        blocks.append(torch.stack(rows)[None])
    return torch.cat(blocks[1:] or blocks)


def per_sample_laplacian(u: Function, x: torch.Tensor) -> torch.Tensor:
    """``(S,)``: ``Σ_i ∂²u/∂x_i²`` of the scalar ``u`` on each sample alone, grad of grad, with
    a graph to ``x`` (where it requires grad) and ``u``'s parameters."""
    out = [x.new_zeros(0)]
    for b in range(len(x)):
        xb = x[b : b + 1]
        leaf = xb if xb.requires_grad else xb.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(u(leaf).sum(), leaf, create_graph=True)
        g = g.flatten()
        diagonal = [
            torch.autograd.grad(g[i], leaf, create_graph=True)[0].flatten()[i]
            for i in range(len(g))
        ]
        out.append(torch.stack(diagonal).sum()[None])
    return torch.cat(out)


def references(f: Function, u: Function, x: torch.Tensor, kind: str) -> torch.Tensor:
    """The divergence, diagonal, Jacobian or Laplacian of each sample, shaped as the
    operators return them (``x``: one batch dimension)."""
    if kind == "laplacian":
        return per_sample_laplacian(u, x)
    jac = per_sample_jacobian(f, x)
    diagonal = jac.diagonal(dim1=1, dim2=2)
    if kind == "jacobian":
        return jac.reshape(x.shape + x.shape[1:])
    return diagonal.sum(-1) if kind == "divergence" else diagonal.reshape(x.shape)


def _channels_last(base: torch.Tensor) -> torch.Tensor:
    fmt = torch.channels_last if base.dim() == 4 else torch.channels_last_3d
    return base.clone().contiguous(memory_format=fmt)


def _inference(base: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return base.clone()


LAYOUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "contiguous": lambda base: base.clone(),
    "batch_transposed": lambda base: base.transpose(0, 1).contiguous().transpose(0, 1),
    "strided_slice": lambda base: torch.stack([base, base], -1)[..., 0],
    "expanded_batch": lambda base: base[:1].expand(base.shape),
    "storage_offset": lambda base: torch.cat([base.new_zeros(3), base.flatten()])[3:].view(
        base.shape
    ),
    "inference_tensor": _inference,
    "leaf_requires_grad": lambda base: base.clone().requires_grad_(True),
    "non_leaf": lambda base: base.clone().requires_grad_(True) * 1.0,
}
IMAGE_LAYOUTS = {**LAYOUTS, "channels_last": _channels_last}


def _state(x: torch.Tensor) -> tuple:
    """What a call must leave as it was."""
    version = None if x.is_inference() else x._version
    grad = None if not x.is_leaf or x.grad is None else x.grad.clone()
    return (
        x.detach().clone(),
        x.stride(),
        x.storage_offset(),
        x.requires_grad,
        x.is_leaf,
        grad,
        version,
    )


def _assert_state(x: torch.Tensor, before: tuple) -> None:
    after = _state(x)
    assert torch.equal(before[0], after[0])
    assert before[1:5] == after[1:5]
    assert before[5] is None and after[5] is None
    assert before[6] == after[6]


def _basis_probes(x: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """The ``n`` basis vectors of the event as fixed probes, ``(n, *x.shape)``."""
    batch, n = x.shape[:batch_dims], x.shape[batch_dims:].numel()
    eye = torch.eye(n, dtype=x.dtype).reshape(n, *[1] * batch_dims, n)
    return eye.expand(n, *batch, n).reshape(n, *x.shape)


def _operators(f: Function, u: Function, bd: int = 1) -> dict[str, tuple[Function, str]]:
    """Each public operator's call (``batch_dims=bd``) and the reference it is compared to."""

    def scaled(x: torch.Tensor) -> torch.Tensor:
        # the basis as fixed probes: Σ_i e_iᵀ J e_i / n, times n, is the trace
        n = x.shape[bd:].numel()
        probes = _basis_probes(x, bd)
        return n * torchdiv.divergence(f, x, batch_dims=bd, method="hutchinson", probes=probes)

    return {
        **{
            f"divergence {m}": (
                lambda x, m=m: torchdiv.divergence(f, x, batch_dims=bd, method=m),
                "divergence",
            )
            for m in ("auto", "forward", "reverse", "structured")
        },
        "divergence chunk_size=1": (
            lambda x: torchdiv.divergence(f, x, batch_dims=bd, chunk_size=1),
            "divergence",
        ),
        "divergence hutchinson probes=": (scaled, "divergence"),
        **{
            f"jacobian_diagonal {m}": (
                lambda x, m=m: torchdiv.jacobian_diagonal(f, x, batch_dims=bd, method=m),
                "diagonal",
            )
            for m in ("auto", "structured")
        },
        "jacobian": (lambda x: torchdiv.jacobian(f, x, batch_dims=bd), "jacobian"),
        **{
            f"laplacian {m}": (
                lambda x, m=m: torchdiv.laplacian(u, x, batch_dims=bd, method=m),
                "laplacian",
            )
            for m in ("auto", "taylor", "forward-over-reverse", "grad-of-grad")
        },
        "value_grad_laplacian": (
            lambda x: torchdiv.value_grad_laplacian(u, x, batch_dims=bd).laplacian,
            "laplacian",
        ),
    }


def _check_calls(
    call: Function, layout: torch.Tensor, other: torch.Tensor, want: dict, params: nn.Module
) -> None:
    """``call`` on ``layout`` twice, then on ``other``, then on ``layout`` again: each result
    right, the first one's parameter gradients too, and neither input changed."""
    for i, x in enumerate((layout, layout, other, layout)):
        before = _state(x)
        out = call(x)
        _assert_state(x, before)
        expected = want["other" if x is other else "layout"]
        assert out.dtype == f64
        assert_close(out, expected)
        if i == 0:
            weights = torch.linspace(-1, 1, out.numel(), dtype=f64).reshape(out.shape)
            got = parameter_gradients(params, (out * weights).sum())
            ref = parameter_gradients(params, (expected * weights).sum())
            for a, b in zip(got, ref, strict=True):
                assert_close(a, b)


MLP_OPERATORS = list(_operators(torch.sin, torch.sin))


# every operator and every layout always run once (the pairs on a cyclic diagonal), the other
# pairs in the daily sample of slow tests
OPERATOR_LAYOUTS = [
    pytest.param(
        operator,
        layout,
        marks=[] if i % len(LAYOUTS) == j % len(MLP_OPERATORS) else pytest.mark.slow,
    )
    for i, operator in enumerate(MLP_OPERATORS)
    for j, layout in enumerate(LAYOUTS)
]


@pytest.mark.parametrize("operator,layout", OPERATOR_LAYOUTS)
def test_every_operator_on_every_layout_of_x(operator, layout):
    """An MLP on ``(4, 3)``: values and parameter gradients against per-sample loops, twice
    in a row and around a call on a contiguous ``x`` of other values."""
    net, field = _mlp(), _mlp(1)
    call, kind = _operators(net, _energy(field))[operator]
    base = torch.randn(4, 3, dtype=f64, generator=torch.Generator().manual_seed(0))
    x, other = LAYOUTS[layout](base), 2 * base.flip(0)
    f, u = net, _energy(field)
    want = {
        "layout": references(f, u, x.detach().clone(), kind),
        "other": references(f, u, other, kind),
    }
    _check_calls(call, x, other, want, nn.ModuleList([net, field]))


# one always-run case; the rest in the daily sample of slow tests (several seconds
# each: the row-by-row references of a conv net's second derivatives)
IMAGE_CASES = [
    pytest.param(operator, dims, marks=[] if (operator, dims) == fast else pytest.mark.slow)
    for operator in (
        "divergence auto",
        "divergence structured",
        "jacobian_diagonal auto",
        "laplacian auto",
        "laplacian taylor",
    )
    for dims in (2, 3)
    for fast in [("divergence structured", 2)]
]


@pytest.mark.parametrize("operator,dims", IMAGE_CASES)
def test_conv_nets_called_contiguous_then_channels_last_and_back(operator, dims):
    """The same conv net (GroupNorm inside) on the same values, contiguous, channels-last
    twice, contiguous again, channels-last again: the structured engine's plans, the watch's
    keys and the Laplacian's remembered passes see both layouts in turn."""
    net = _conv(dims)
    call, kind = _operators(net, _energy(net))[operator]
    base = torch.randn(IMAGES[dims], dtype=f64, generator=torch.Generator().manual_seed(2))
    expected = references(net, _energy(net), base, kind)
    for i, x in enumerate([base, _channels_last(base), _channels_last(base), base.clone(), base]):
        before = _state(x)
        out = call(x)
        _assert_state(x, before)
        assert_close(out, expected)
        if i == 1:
            weights = torch.linspace(-1, 1, out.numel(), dtype=f64).reshape(out.shape)
            got = parameter_gradients(net, (out * weights).sum())
            for a, b in zip(got, parameter_gradients(net, (expected * weights).sum()), strict=True):
                assert_close(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("layout", IMAGE_LAYOUTS)
def test_image_layouts_of_x_for_the_structured_engine(layout):
    """Every layout of an image batch through the 2-D conv net, the ``"structured"``
    divergence and the Laplacian's ``"auto"``."""
    net = _conv(2)
    base = torch.randn(IMAGES[2], dtype=f64, generator=torch.Generator().manual_seed(3))
    x = IMAGE_LAYOUTS[layout](base)
    for name in ("divergence structured", "laplacian auto"):
        call, kind = _operators(net, _energy(net))[name]
        want = references(net, _energy(net), x.detach().clone(), kind)
        for _ in range(2):
            before = _state(x)
            assert_close(call(x), want)
            _assert_state(x, before)


def _gradients(out: torch.Tensor, weights: torch.Tensor, targets: list) -> list[torch.Tensor]:
    """``∂ Σ weights * out / ∂ t`` for each target (zeros where unused)."""
    grads = torch.autograd.grad(
        (out * weights).sum(), targets, retain_graph=True, allow_unused=True
    )
    return [torch.zeros_like(t) if g is None else g for t, g in zip(targets, grads, strict=True)]


GRAPH_FORMS = {
    "graph_divergence": (
        lambda f, u, x: torchdiv.graph_divergence(f(x), x, create_graph=True),
        "divergence",
    ),
    "graph_jacobian": (
        lambda f, u, x: torchdiv.graph_jacobian(f(x), x, create_graph=True),
        "jacobian",
    ),
    "graph_laplacian": (
        lambda f, u, x: torchdiv.graph_laplacian(u(x), x, create_graph=True),
        "laplacian",
    ),
}
GRAPH_LAYOUTS = {
    "leaf": lambda base: (base.clone().requires_grad_(True),) * 2,
    "non_leaf": lambda base: (lambda leaf: (leaf * 1.0, leaf))(base.clone().requires_grad_(True)),
    "expanded_leaf": lambda base: (lambda leaf: (leaf.expand(base.shape), leaf))(
        base[:1].clone().requires_grad_(True)
    ),
    "channels_last": lambda base: (_channels_last(base).requires_grad_(True),) * 2,  # conv net
    "storage_offset": lambda base: (lambda leaf: (leaf[2:].view(base.shape), leaf))(
        torch.cat([base.new_zeros(2), base.flatten()]).requires_grad_(True)
    ),
}


# the conv net's channels-last graphs (seconds each: row-by-row second derivatives) in the daily
# sample of slow tests
@pytest.mark.parametrize(
    "layout",
    [pytest.param(k, marks=pytest.mark.slow) if k == "channels_last" else k for k in GRAPH_LAYOUTS],
)
@pytest.mark.parametrize("form", GRAPH_FORMS)
def test_graph_forms_on_every_layout_with_gradients_to_x(form, layout):
    """The graph forms on an existing graph (an MLP's; a conv net's for channels-last):
    values, parameter gradients and the gradient reaching the tensor ``x`` was made from
    (summed over the samples an expanded ``x`` shares), against the per-sample loops run on
    the same ``x``."""
    net = _conv(2) if layout == "channels_last" else _mlp()
    shape = IMAGES[2] if layout == "channels_last" else (4, 3)
    base = torch.randn(shape, dtype=f64, generator=torch.Generator().manual_seed(4))
    x, leaf = GRAPH_LAYOUTS[layout](base)
    call, kind = GRAPH_FORMS[form]
    for _ in range(2):
        out = call(net, _energy(net), x)
        expected = references(net, _energy(net), x, kind)
        assert_close(out, expected)
        weights = torch.linspace(-1, 1, out.numel(), dtype=f64).reshape(out.shape)
        targets = [*net.parameters(), leaf]
        ours, want = (_gradients(o, weights, targets) for o in (out, expected))
        for a, b in zip(ours, want, strict=True):
            assert_close(a, b)
        assert leaf.grad is None and all(p.grad is None for p in net.parameters())


# each estimator and each layout always run once, the other pairs in the daily sample
@pytest.mark.parametrize(
    "method,probe,layout",
    [
        pytest.param(method, probe, layout, marks=[] if i == j else pytest.mark.slow)
        for i, (method, probe) in enumerate(
            [("hutchinson", "rademacher"), ("hutch++", "gaussian"), ("xtrace", "gaussian")]
        )
        for j, layout in enumerate(["channels_last", "batch_transposed", "expanded_batch"])
    ],
)
def test_estimates_do_not_depend_on_the_layout_of_x(method, probe, layout):
    """The same generator state on the same values gives the same estimate whatever x's
    strides (probes are drawn by logical position, not in x's memory order)."""
    net = _conv(2)
    base = torch.randn(IMAGES[2], dtype=f64, generator=torch.Generator().manual_seed(5))
    x = IMAGE_LAYOUTS[layout](base)
    options = {"method": method, "num_probes": 6, "probe": probe}
    ours = torchdiv.divergence(net, x, generator=torch.Generator().manual_seed(0), **options)
    plain = x.contiguous()
    want = torchdiv.divergence(net, plain, generator=torch.Generator().manual_seed(0), **options)
    assert_close(ours, want)


# dtypes ---------------------------------------------------------------------------------------

MIXED = {
    "divergence": lambda f, u, x: torchdiv.divergence(f, x),
    "jacobian": lambda f, u, x: torchdiv.jacobian(f, x),
    "jacobian_diagonal": lambda f, u, x: torchdiv.jacobian_diagonal(f, x),
    "divergence hutchinson": lambda f, u, x: torchdiv.divergence(
        f, x, method="hutchinson", num_probes=2
    ),
    "laplacian": lambda f, u, x: torchdiv.laplacian(u, x),
    "value_grad_laplacian": lambda f, u, x: torchdiv.value_grad_laplacian(u, x),
}


@pytest.mark.parametrize("x_dtype", [torch.float32, f64])
@pytest.mark.parametrize("name", MIXED)
def test_x_and_parameters_of_different_float_dtypes_is_f_s_error(name, x_dtype):
    """float64 ``x`` into float32 parameters, or the reverse: PyTorch's dtype error from
    ``f`` itself, named as ``f(x)``'s, never a silent cast of ``x`` or of the result."""
    net = _mlp().to(torch.float32 if x_dtype == f64 else f64)
    x = torch.randn(4, 3, dtype=x_dtype)
    with pytest.raises(RuntimeError, match=rf"^{name.split()[0]}: f\(x\) raised .*dtype"):
        MIXED[name](net, _energy(net), x)


# every operator always run in one half dtype (alternating), the other in the daily sample
@pytest.mark.parametrize(
    "operator,dtype",
    [
        pytest.param(operator, dtype, marks=[] if i % 2 == j else pytest.mark.slow)
        for i, operator in enumerate(MLP_OPERATORS)
        for j, dtype in enumerate([torch.float16, torch.bfloat16])
    ],
)
def test_half_precision_x_on_cpu(operator, dtype):
    """float16/bfloat16 ``x`` and parameters on the CPU: the result keeps the dtype and
    agrees with float64 on the same (rounded) weights and inputs to a few hundred ulps
    (every op rounds to 8 or 11 significant bits; sums of a few terms)."""
    net, field = _mlp().to(dtype), _mlp(1).to(dtype)
    call, kind = _operators(net, _energy(field))[operator]
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(6)).to(dtype)
    out = call(x)
    assert out.dtype == dtype
    want = references(net.double(), _energy(field.double()), x.double(), kind).detach()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), want, rtol=64 * eps, atol=64 * eps)


NOT_FLOATING = {
    "divergence": lambda x: torchdiv.divergence(torch.sin, x),
    "jacobian": lambda x: torchdiv.jacobian(torch.sin, x),
    "jacobian_diagonal": lambda x: torchdiv.jacobian_diagonal(torch.sin, x),
    "laplacian": lambda x: torchdiv.laplacian(lambda z: z.sum(-1), x),
    "estimate_divergence": lambda x: torchdiv.estimate_divergence(torch.sin, x, num_probes=2),
    "value_grad_laplacian": lambda x: torchdiv.value_grad_laplacian(lambda z: z.sum(-1), x),
    "weighted_laplacian": lambda x: torchdiv.weighted_laplacian(
        lambda z: z.sum(-1), x, diffusion=torch.eye(3)
    ),
    "biharmonic": lambda x: torchdiv.biharmonic(lambda z: z.sum(-1), x),
    "graph_divergence": lambda x: torchdiv.graph_divergence(torch.ones(4, 3), x),
    "graph_jacobian": lambda x: torchdiv.graph_jacobian(torch.ones(4, 3), x),
    "graph_laplacian": lambda x: torchdiv.graph_laplacian(torch.ones(4), x),
    "draw_probes": lambda x: torchdiv.draw_probes(x, 2),
}


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
@pytest.mark.parametrize("name", NOT_FLOATING)
def test_integer_boolean_and_complex_x_is_a_type_error_naming_x(name, dtype):
    x = torch.ones(4, 3).to(dtype)
    with pytest.raises(TypeError, match=rf"^{name}: x must have a (real )?floating dtype"):
        NOT_FLOATING[name](x)


# shapes -----------------------------------------------------------------------------------------


def _field(batch_dims: int) -> Function:
    """``sin(z) Σ z`` per sample (the sum over the sample's event)."""

    def f(z: torch.Tensor) -> torch.Tensor:
        total = z.flatten(batch_dims).sum(-1) if z.dim() > batch_dims else z
        return torch.sin(z) * total.reshape(*total.shape, *[1] * (z.dim() - batch_dims))

    return f


def _flat_field(z: torch.Tensor) -> torch.Tensor:
    """``_field`` on one sample's flattened event, ``(1, n)``."""
    return torch.sin(z) * z.sum(-1, keepdim=True)


SHAPES = {
    "batch 0": ((0, 3), 1),
    "batch 1": ((1, 3), 1),
    "no event dims (B,)": ((5,), 1),
    "event of one (B, 1)": ((5, 1), 1),
    "one-pixel image": ((3, 1, 1, 1), 1),
    "batch_dims=2": ((2, 3, 4), 2),
    "batch_dims=0": ((2, 3), 0),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("operator", MLP_OPERATORS)
def test_degenerate_batches_and_events(operator, shape):
    """Empty and single batches, events of one element or none, two batch dimensions and
    none: against the per-sample loops on ``x`` flattened to ``(samples, event)``."""
    size, bd = SHAPES[shape]
    x = torch.randn(size, dtype=f64, generator=torch.Generator().manual_seed(7))
    f = _field(bd)
    u = lambda z: f(z).flatten(bd).sum(-1) if z.dim() > bd else f(z)  # noqa: E731
    call, kind = _operators(f, u, bd)[operator]
    out = call(x)
    assert out.dtype == f64
    batch, flat = x.shape[:bd], x.reshape(x.shape[:bd].numel(), x.shape[bd:].numel())
    expected = references(_flat_field, lambda z: _flat_field(z).sum(-1), flat, kind)
    shapes = {"jacobian": x.shape + x.shape[bd:], "diagonal": x.shape}
    assert_close(out, expected.reshape(shapes.get(kind, batch)))


@pytest.mark.parametrize("method", ["auto", "forward", "reverse", "structured"])
def test_a_large_batch_with_one_basis_vector_at_a_time(method):
    """``(4096, 3)`` with ``chunk_size=1`` against the closed form ``tr(diag(1 - t²) W)``."""
    w = torch.tensor([[0.9, -0.4, 0.3], [0.2, 1.1, -0.5], [-0.6, 0.3, 0.8]], dtype=f64)
    x = torch.randn(4096, 3, dtype=f64, generator=torch.Generator().manual_seed(8))
    t = torch.tanh(x @ w.T)
    out = torchdiv.divergence(lambda z: torch.tanh(z @ w.T), x, method=method, chunk_size=1)
    assert_close(out, ((1 - t * t) * w.diagonal()).sum(-1))
    lap = torchdiv.laplacian(lambda z: torch.tanh(z @ w.T).sum(-1), x, chunk_size=1)
    assert_close(lap, (-2 * t * (1 - t * t) * w.square().sum(-1)).sum(-1))


# what f returns -----------------------------------------------------------------------------

W = torch.tensor([[0.9, -0.4, 0.3], [0.2, 1.1, -0.5], [-0.6, 0.3, 0.8]], dtype=f64)


def _layer(z: torch.Tensor) -> torch.Tensor:
    return torch.tanh(z @ W.to(z.dtype).T)


OUTPUTS: dict[str, Function] = {
    "batch-transposed view": lambda z: _layer(z).T.contiguous().T,
    "strided slice": lambda z: torch.stack([_layer(z), -_layer(z)], -1)[..., 0],
    "stride-0 event": lambda z: torch.tanh(2 * z[:, :1]).expand(-1, 3),
    "float32 from float64 x": lambda z: _layer(z).float(),
}


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("operator", [o for o in MLP_OPERATORS if "laplacian" not in o])
def test_outputs_that_are_views_or_of_another_dtype(operator, output):
    """``f``'s result a non-contiguous view, or float32 for float64 ``x``: the result is
    right and has ``x``'s dtype."""
    f = OUTPUTS[output]
    call, kind = _operators(f, f)[operator]
    x = torch.randn(4, 3, dtype=f64, generator=torch.Generator().manual_seed(9))
    out = call(x)
    assert out.dtype == f64
    expected = references(lambda z: f(z).double(), f, x, kind)
    tol = tolerances(torch.float32 if "float32" in output else f64)
    torch.testing.assert_close(out, expected, **tol)


REFUSED: dict[str, tuple[Function, type[Exception], str]] = {
    "tuple": (lambda z: (_layer(z),), TypeError, r"f\(x\) must be a torch.Tensor, got tuple"),
    "dict": (lambda z: {"y": _layer(z)}, TypeError, r"f\(x\) must be a torch.Tensor, got dict"),
    "batch last": (lambda z: _layer(z).T[:, :3], ValueError, "f\\(x\\) changed the batch shape"),
}


@pytest.mark.parametrize("returns", REFUSED)
@pytest.mark.parametrize("operator", MLP_OPERATORS)
def test_f_returning_a_tuple_a_dict_or_the_batch_last_is_refused(operator, returns):
    f, error, message = REFUSED[returns]
    call, _ = _operators(f, lambda z: f(z) if returns != "batch last" else f(z).sum(-1))[operator]
    x = torch.randn(4, 3, dtype=f64)
    with pytest.raises(error, match=rf"^{operator.split()[0]}: {message}"):
        call(x)
