"""PyTorch's higher-order ops inside ``f`` (hop32): ``scan`` (Mamba-style selective scans,
linear RNNs), ``associative_scan``, ``flex_attention``, ``nested_compile_region``, compared
with the same model written without them (a Python loop, math attention) by float64
per-sample loops of ``torch.autograd.grad``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._higher_order_ops.associative_scan import associative_scan
from torch._higher_order_ops.scan import scan
from torch.nn.attention import SDPBackend, sdpa_kernel

import torchdiv
from torchdiv._exact.autograd import UndifferentiableBackward

# eager scan traces its step with Dynamo, which reads a non-leaf's .grad (PyTorch's warning)
pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor:UserWarning")

f64 = torch.float64
T, D = 3, 2  # steps and width: an event of T * D = 6


class LinearRNN(nn.Module):
    """``h_t = tanh(h_{t-1} W + x_t U)``, every ``h_t`` out, by ``scan`` or a Python loop."""

    def __init__(self, by_scan: bool) -> None:
        super().__init__()
        self.by_scan = by_scan
        self.W = nn.Parameter(torch.randn(D, D, dtype=f64) / 2)
        self.U = nn.Parameter(torch.randn(D, D, dtype=f64) / 2)

    def step(self, h: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h @ self.W + xt @ self.U)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.view(x.shape[0], T, D)
        h = x.new_zeros(x.shape[0], D)
        if self.by_scan:

            def body(h: torch.Tensor, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                h = self.step(h, xt)
                return h, h.clone()

            _, ys = scan(body, h, xs, dim=1)
        else:
            out = []
            for t in range(T):
                h = self.step(h, xs[:, t])
                out.append(h)
            ys = torch.stack(out, 1)
        return ys.reshape(x.shape[0], -1)


class SelectiveScan(nn.Module):
    """A gated linear recurrence ``h_t = a_t h_{t-1} + b_t`` (S5/Mamba-style), ``a`` and ``b``
    from the input, by ``associative_scan`` or a Python loop; out ``h * x``."""

    def __init__(self, by_scan: bool) -> None:
        super().__init__()
        self.by_scan = by_scan
        self.A = nn.Parameter(torch.randn(D, D, dtype=f64) / 2)
        self.B = nn.Parameter(torch.randn(D, D, dtype=f64) / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.view(x.shape[0], T, D)
        a, b = torch.sigmoid(xs @ self.A), torch.tanh(xs @ self.B)
        if self.by_scan:

            def combine(left, right):
                return left[0] * right[0], right[0] * left[1] + right[1]

            _, h = associative_scan(combine, (a, b), dim=1, combine_mode="generic")
        else:
            out, state = [], torch.zeros_like(b[:, 0])
            for t in range(T):
                state = a[:, t] * state + b[:, t]
                out.append(state)
            h = torch.stack(out, 1)
        return (h * xs).reshape(x.shape[0], -1)


def _pair(cls: type[nn.Module]) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(3)
    model = cls(True)
    plain = cls(False)
    plain.load_state_dict(model.state_dict())
    return model, plain


def _loop_jacobian(f, x: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobians, one ``autograd.grad`` per output element (``create_graph``, so
    parameter gradients of anything built from them are grad-of-grad)."""
    rows = []
    for b in range(x.shape[0]):
        xb = x[b : b + 1].detach().requires_grad_(True)
        y = f(xb).reshape(-1)
        rows.append(
            torch.stack(
                [
                    torch.autograd.grad(y[i], xb, create_graph=True)[0].reshape(-1)
                    for i in range(y.numel())
                ]
            )
        )
    return torch.stack(rows)


def _loop_laplacian(f, x: torch.Tensor) -> torch.Tensor:
    """Per-sample Laplacian of every output component, by grad of grad."""
    out = []
    for b in range(x.shape[0]):
        xb = x[b : b + 1].detach().requires_grad_(True)
        y = f(xb).reshape(-1)
        comps = []
        for k in range(y.numel()):
            (g,) = torch.autograd.grad(y[k], xb, create_graph=True)
            g = g.reshape(-1)
            comps.append(
                sum(
                    torch.autograd.grad(g[i], xb, create_graph=True)[0].reshape(-1)[i]
                    for i in range(g.numel())
                )
            )
        out.append(torch.stack(comps))
    return torch.stack(out)


def _gradients(value: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    weights = torch.linspace(0.5, 1.5, value.numel(), dtype=f64).reshape(value.shape)
    return list(
        torch.autograd.grad((value * weights).sum(), list(model.parameters()), retain_graph=True)
    )


def _assert_same(
    ours: torch.Tensor, model: nn.Module, want: torch.Tensor, plain: nn.Module
) -> None:
    # float64, a few dozen flops per element: round-off ~1e-15
    torch.testing.assert_close(ours, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(_gradients(ours, model), _gradients(want, plain), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --- scan (eager): refused by name, never silently wrong --------------------------------------


def test_scan_s_backward_records_no_graph_in_pytorch() -> None:
    """The PyTorch fact the refusals below rest on (2.13): a gradient through eager ``scan``
    taken with ``create_graph=True`` does not require grad (its backward scans the step's
    VJPs without recording), where the Python loop's does."""
    model, plain = _pair(LinearRNN)
    x = torch.randn(2, T * D, dtype=f64, requires_grad=True)
    (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    (want,) = torch.autograd.grad(plain(x).sum(), x, create_graph=True)
    torch.testing.assert_close(g, want.detach(), rtol=1e-12, atol=1e-12)
    assert want.requires_grad and not g.requires_grad


def test_graph_laplacian_through_scan_is_refused_not_zero() -> None:
    """``graph_laplacian`` of an RNN written with eager ``scan`` was 0 (its second
    derivatives lost, without a word); now it names scan and the Python loop."""
    model, plain = _pair(LinearRNN)
    x = torch.randn(2, T * D, dtype=f64)
    assert _loop_laplacian(plain, x).abs().max() > 0.1
    leaf = x.clone().requires_grad_(True)
    with pytest.raises(
        UndifferentiableBackward,
        match=r"^torchdiv: f runs torch\._higher_order_ops\.scan.*Python loop",
    ):
        torchdiv.graph_laplacian(model(leaf), leaf)


def test_graph_divergence_s_training_gradients_through_scan_are_refused() -> None:
    """``graph_divergence(create_graph=True)`` through eager ``scan`` kept its values but gave
    a result without a graph (a loss adding it to others trained without its part); now its
    values are kept and its backward raises, naming scan."""
    model, plain = _pair(LinearRNN)
    x = torch.randn(2, T * D, dtype=f64)
    leaf = x.clone().requires_grad_(True)
    ours = torchdiv.graph_divergence(model(leaf), leaf, create_graph=True)
    want = _loop_jacobian(plain, x).diagonal(0, 1, 2).sum(-1)
    torch.testing.assert_close(ours.detach(), want.detach(), rtol=1e-10, atol=1e-12)
    with pytest.raises(UndifferentiableBackward, match="scan"):
        ours.sum().backward()


@pytest.mark.parametrize(
    ("op", "method"),
    [
        (torchdiv.divergence, "auto"),
        (torchdiv.divergence, "forward"),
        (torchdiv.divergence, "structured"),
        (torchdiv.jacobian, "reverse"),
        (torchdiv.laplacian, "auto"),
        (torchdiv.laplacian, "grad-of-grad"),
        (torchdiv.laplacian, "hessian"),
    ],
)
def test_every_method_s_error_through_scan_names_it_and_the_loop(op, method) -> None:
    """Every method fails inside eager ``scan`` (torch.func's ``KeyError: TransformType``, the
    recorders' "no rule registered for HigherOrderOperator scan", a FakeTensor assertion
    under grad-of-grad); the hint named nothing. It names scan and the Python loop."""
    model, _ = _pair(LinearRNN)
    with pytest.raises(
        Exception, match=r"(?s)Hint: f calls torch\._higher_order_ops\.scan.*Python loop"
    ):
        op(model, torch.randn(2, T * D, dtype=f64), method=method)


def test_check_batch_independence_through_scan_names_it() -> None:
    """``check_batch_independence`` evaluates ``f`` under the dispatch mode that undoes its
    changes, which eager ``scan`` cannot run (a FakeTensor assertion): named, with the loop."""
    model, _ = _pair(LinearRNN)
    with pytest.raises(
        Exception,
        match=r"(?s)^check_batch_independence: .*Hint: f calls torch\._higher_order_ops\.scan",
    ):
        torchdiv.check_batch_independence(model, torch.randn(3, T * D, dtype=f64))


# --- associative_scan, nested_compile_region (eager): right in every engine -------------------


def _block(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(layer(x))


_region = torch.compiler.nested_compile_region(_block)


class Repeated(nn.Module):
    """One block called twice (``g(g(x) * x)``), as a ``nested_compile_region`` (the
    ``invoke_subgraph`` higher-order op under ``torch.compile``) or a plain function."""

    def __init__(self, as_region: bool) -> None:
        super().__init__()
        self.as_region = as_region
        self.layer = nn.Linear(T * D, T * D, dtype=f64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = _region if self.as_region else _block
        return block(self.layer, block(self.layer, x) * x)


_FIRST_ORDER = [
    ("divergence", "auto"),
    ("divergence", "forward"),
    ("divergence", "reverse"),
    ("divergence", "structured"),
    ("jacobian_diagonal", "structured"),
    ("jacobian", "auto"),
    ("hutchinson", "fixed probes"),
]
_SECOND_ORDER = ["auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad"]


def _first_order(op: str, method: str, f, x: torch.Tensor, jacobian: torch.Tensor):
    """``op`` by torchdiv and by the loop's Jacobian ``jacobian``."""
    if op == "hutchinson":  # fixed probes: the estimate is the probes' quadratic forms' mean
        probes = torchdiv.draw_probes(x, 3, generator=torch.Generator().manual_seed(0))
        ours = torchdiv.divergence(f, x, method="hutchinson", probes=probes)
        return ours, torch.einsum("pbi,bij,pbj->b", probes, jacobian, probes) / 3
    ours = getattr(torchdiv, op)(f, x, method=method)
    want = {
        "divergence": jacobian.diagonal(0, 1, 2).sum(-1),
        "jacobian_diagonal": jacobian.diagonal(0, 1, 2),
        "jacobian": jacobian,
    }[op]
    return ours, want


@pytest.mark.parametrize("cls", [SelectiveScan, Repeated])
@pytest.mark.parametrize(("op", "method"), _FIRST_ORDER)
def test_first_order_operators_through_eager_hops(cls, op, method) -> None:
    model, plain = _pair(cls)
    x = torch.randn(2, T * D, dtype=f64)
    ours, want = _first_order(op, method, model, x, _loop_jacobian(plain, x))
    _assert_same(ours, model, want, plain)


@pytest.mark.parametrize("cls", [SelectiveScan, Repeated])
@pytest.mark.parametrize("method", _SECOND_ORDER)
def test_laplacians_through_eager_hops(cls, method) -> None:
    model, plain = _pair(cls)
    x = torch.randn(2, T * D, dtype=f64)
    _assert_same(
        torchdiv.laplacian(model, x, method=method), model, _loop_laplacian(plain, x), plain
    )


@pytest.mark.parametrize("cls", [SelectiveScan, Repeated])
def test_value_grad_laplacian_and_augmented_dynamics_through_eager_hops(cls) -> None:
    model, plain = _pair(cls)
    x = torch.randn(2, T * D, dtype=f64)
    out = torchdiv.value_grad_laplacian(model, x)
    _assert_same(out.laplacian, model, _loop_laplacian(plain, x), plain)
    _assert_same(out.gradient, model, _loop_jacobian(plain, x), plain)
    dynamics = torchdiv.flows.AugmentedDynamics(lambda t, z: model(z), x)
    _, change = dynamics(torch.tensor(0.0, dtype=f64), (x, torch.zeros(2, dtype=f64)))
    want = -_loop_jacobian(plain, x).diagonal(0, 1, 2).sum(-1)
    _assert_same(change.reshape(-1), model, want, plain)


# --- compiled ----------------------------------------------------------------------------------


def test_compiled_nested_compile_region_s_derivatives_are_its_eager_ones() -> None:
    """A ``torch.compile``d model calling a ``nested_compile_region`` twice: torchdiv traces
    its call of a compiled model into one graph, where Dynamo's speculation of the region
    under the engines' transforms raised "AssertionError: Expected FakeTensor" (PyTorch 2.13)
    out of every torch.func method and ``"auto"``, without torchdiv's context; the call now
    runs eagerly there, as for Dynamo's own errors, and is right."""
    torch._dynamo.reset()
    model, plain = _pair(Repeated)
    compiled = torch.compile(model)
    x = torch.randn(2, T * D, dtype=f64)
    jacobian = _loop_jacobian(plain, x)
    for method in ("auto", "reverse"):
        ours, want = _first_order("divergence", method, compiled, x, jacobian)
        _assert_same(ours, model, want, plain)
    _assert_same(torchdiv.laplacian(compiled, x), model, _loop_laplacian(plain, x), plain)


# --- the sample-mixing watch ---------------------------------------------------------------------


def _centre(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(0)


_centring_region = torch.compiler.nested_compile_region(_centre)


def test_a_compiled_region_that_centres_the_batch_is_refused_at_the_first_call() -> None:
    """A compiled function whose ``nested_compile_region`` subtracts the batch mean: the
    watch runs ``f`` eagerly at the first call, before any traced call, and sees the mean
    over samples inside the region."""
    torch._dynamo.reset()
    weight = torch.randn(T * D, T * D, dtype=f64) / 3
    compiled = torch.compile(lambda x: torch.tanh(_centring_region(x @ weight)))
    with pytest.raises(torchdiv.BatchInteractionError, match=r"^divergence: .*mean over samples"):
        torchdiv.divergence(compiled, torch.randn(3, T * D, dtype=f64))


def test_an_associative_scan_along_the_batch_is_refused() -> None:
    """``associative_scan`` over dimension 0 (a running sum over samples) is sample mixing:
    refused at the first call; along the sequence (``SelectiveScan`` above) it is not."""
    weight = torch.randn(T * D, T * D, dtype=f64) / 3

    def running(x: torch.Tensor) -> torch.Tensor:
        return associative_scan(
            lambda a, b: a + b, torch.tanh(x @ weight), dim=0, combine_mode="generic"
        )

    with pytest.raises(torchdiv.BatchInteractionError, match=r"^divergence: f mixes samples"):
        torchdiv.divergence(running, torch.randn(3, T * D, dtype=f64))


# --- flex_attention ----------------------------------------------------------------------------


class Attention(nn.Module):
    """One head over ``T`` tokens of width ``D`` with a relative-position bias, by
    ``flex_attention``'s ``score_mod`` or by ``scaled_dot_product_attention`` with the bias
    as an additive mask (the way out the hint names)."""

    def __init__(self, flex: bool) -> None:
        super().__init__()
        self.flex = flex
        self.qkv = nn.Linear(D, 3 * D, dtype=f64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        q, k, v = self.qkv(x.view(x.shape[0], 1, T, D)).chunk(3, -1)
        if self.flex:
            out = flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + 0.3 * (i - j))
        else:
            i = torch.arange(T)
            bias = (0.3 * (i[:, None] - i[None, :])).to(f64)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return out.reshape(x.shape[0], -1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU's refusal (CUDA has a backward)")
@pytest.mark.parametrize(
    ("op", "method"), [(torchdiv.divergence, "auto"), (torchdiv.laplacian, "taylor")]
)
def test_flex_attention_s_error_on_cpu_names_the_way_out(op, method) -> None:
    """On CPU every method raised PyTorch's "FlexAttention does not support backward on CPU"
    without a way out; the hint names scaled_dot_product_attention, whose form of the same
    attention every method differentiates (the loop's values and parameter gradients)."""
    model, plain = _pair(Attention)
    x = torch.randn(2, T * D, dtype=f64)
    with pytest.raises(
        Exception, match=r"(?s)Hint: f calls torch\.nn\.attention\.flex_attention.*scaled_dot"
    ):
        op(model, x, method=method)
    ours = op(plain, x, method=method)
    with sdpa_kernel(SDPBackend.MATH):  # (the fused CPU kernel has no second derivative)
        if op is torchdiv.laplacian:
            want = _loop_laplacian(plain, x)
        else:
            want = _loop_jacobian(plain, x).diagonal(0, 1, 2).sum(-1)
        _assert_same(ours, plain, want, plain)
