"""In-place activations that PyTorch decomposes into their op and a ``copy_``.

``nn.SiLU(inplace=True)`` and nine others reach the recorder as ``silu_`` (or ``elu_``,
``hardtanh_``, ...): the recording engines refused them naming ``aten.copy_`` and
``"auto"`` ran the generic engines, 8-12x slower. They are recorded as their out-of-place
op now (``_Recorder.write_out_of_place``). References: a per-sample grad-of-grad loop of
plain autograd through the activations written out of place as closed forms, float64.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchdiv
from tests.conftest import parameter_gradients
from torchdiv._taylor.jet import UnsupportedOp

D = torch.float64
SELU_SCALE, SELU_ALPHA = 1.0507009873554804934193349852946, 1.6732632423543772848170429916717

# the module in place, and the same function out of place in plain ops
ACTIVATIONS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Tensor], torch.Tensor]]] = {
    "silu": (lambda: nn.SiLU(inplace=True), lambda t: t * torch.sigmoid(t)),
    "elu": (lambda: nn.ELU(0.8, inplace=True), lambda t: torch.where(t > 0, t, 0.8 * t.expm1())),
    "selu": (
        lambda: nn.SELU(inplace=True),
        lambda t: SELU_SCALE * torch.where(t > 0, t, SELU_ALPHA * t.expm1()),
    ),
    "celu": (  # (alpha 0.1: PyTorch's celu derivatives round 1 / alpha to float32)
        lambda: nn.CELU(0.1, inplace=True),
        lambda t: torch.where(t > 0, t, 0.1 * (t / 0.1).expm1()),
    ),
    "mish": (lambda: nn.Mish(inplace=True), lambda t: t * torch.tanh(F.softplus(t))),
    "leaky_relu": (
        lambda: nn.LeakyReLU(0.1, inplace=True),
        lambda t: torch.where(t > 0, t, 0.1 * t),
    ),
    "hardtanh": (lambda: nn.Hardtanh(-0.5, 0.5, inplace=True), lambda t: t.clamp(-0.5, 0.5)),
    "relu6": (lambda: nn.ReLU6(inplace=True), lambda t: t.clamp(0, 6)),
    "hardswish": (lambda: nn.Hardswish(inplace=True), lambda t: t * (t + 3).clamp(0, 6) / 6),
    "hardsigmoid": (lambda: nn.Hardsigmoid(inplace=True), lambda t: (t + 3).clamp(0, 6) / 6),
}


def _nets(name: str) -> tuple[nn.Sequential, Callable[[torch.Tensor], torch.Tensor]]:
    """A 3-4-4-3 MLP with the activation in place, and the same net out of place."""
    make, form = ACTIVATIONS[name]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), make(), nn.Linear(4, 4), make(), nn.Linear(4, 3))
    net = net.to(D)
    return net, lambda z: net[4](form(net[2](form(net[0](z)))))


def _grad(out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(out, z, create_graph=True, allow_unused=True)
    return torch.zeros_like(z) if g is None else g


def _loop(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, op: str) -> torch.Tensor:
    """Per sample, by grad of grad: the Jacobian's diagonal, or the Laplacian of each output."""
    rows = []
    for i in range(x.shape[0]):
        z = x[i : i + 1].clone().requires_grad_(True)
        y = f(z)[0]
        grads = [_grad(y[k], z)[0] for k in range(y.shape[0])]
        if op == "diagonal":
            rows.append(torch.stack([g[k] for k, g in enumerate(grads)]))
        else:
            lap = [sum(_grad(g[j], z)[0, j] for j in range(z.shape[1])) for g in grads]
            rows.append(torch.stack(lap))  # type: ignore[arg-type]
    return torch.stack(rows)


OPS = ["divergence", "jacobian_diagonal", "laplacian", "value_grad_laplacian"]
RECORDING = {"divergence": "structured", "jacobian_diagonal": "structured"}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("op", OPS)
def test_in_place_activation_recorded_right(name: str, op: str) -> None:
    net, plain = _nets(name)
    x = 2 * torch.randn(4, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(4, 3, dtype=D, generator=torch.Generator().manual_seed(2))
    first = lambda z: net(z)[:, 0]  # noqa: E731  (a scalar field for value_grad_laplacian)
    if op == "value_grad_laplacian":
        expected = _loop(lambda z: plain(z)[:, :1], x, "laplacian")[:, 0]
        weights = weights[:, 0]
    elif op == "laplacian":
        expected = _loop(plain, x, "laplacian")
    else:
        expected = _loop(plain, x, "diagonal")
        expected = expected.sum(-1) if op == "divergence" else expected
        weights = weights[:, 0] if op == "divergence" else weights
    expected_grads = parameter_gradients(net, (expected * weights).sum())
    method = RECORDING.get(op, "taylor")
    for _ in range(2):  # (the second call: a plan or template kept from the first)
        if op == "value_grad_laplacian":
            value, _grads, got = torchdiv.value_grad_laplacian(first, x, method=method)
            torch.testing.assert_close(value, plain(x)[:, 0], rtol=1e-12, atol=1e-12)
        else:
            got = getattr(torchdiv, op)(net, x, method=method)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        grads = parameter_gradients(net, (got * weights).sum())
        for g, e in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("op", "method"),
    [
        ("divergence", "auto"),
        ("divergence", "reverse"),
        ("laplacian", "forward-over-reverse"),
        ("laplacian", "grad-of-grad"),
    ],
)
def test_celu_in_place_through_the_pullback_engines(op: str, method: str) -> None:
    """``nn.CELU(inplace=True)``: torchdiv's own ``celu`` (``elu`` with ``1 / alpha`` in
    double precision) wrote ``elu(a)`` back with ``a.copy_``, overwriting the input ``elu``'s
    backward reads: every engine that pulls back raised PyTorch's "modified by an inplace
    operation" (plain autograd ran it)."""
    net, plain = _nets("celu")
    x = torch.randn(4, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    expected = _loop(plain, x, "laplacian" if op == "laplacian" else "diagonal")
    expected = expected if op == "laplacian" else expected.sum(-1)
    got = getattr(torchdiv, op)(net, x, method=method)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    grads = parameter_gradients(net, got.square().sum())
    for g, e in zip(grads, parameter_gradients(net, expected.square().sum()), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def _aliased(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    """A view of the activation's input read after the write: it sees the new values."""
    h = lin(x)
    v = h[:, :2]
    F.silu(h, inplace=True)
    return v * h[:, 1:3]


def test_view_of_written_tensor_refused_or_right() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(3, 3).to(D)
    x = torch.randn(3, 3, dtype=D)
    f = lambda z: _aliased(z, lin)  # noqa: E731
    with pytest.raises(UnsupportedOp, match="silu_"):
        torchdiv.laplacian(f, x, method="taylor")
    torch.testing.assert_close(
        torchdiv.laplacian(f, x), _loop(f, x, "laplacian"), rtol=1e-10, atol=1e-10
    )
