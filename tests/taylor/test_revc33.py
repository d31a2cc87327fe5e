"""rev-c33: the autocast33 and degen33 merges attacked: routes that replay a recording under
another autocast state than it was made in, and kept recordings served again."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch import nn

import torchdiv

f64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not")


class _Float32Block(nn.Module):
    """A tanh MLP run inside ``torch.autocast("cpu", enabled=False)``: float32 whatever the
    caller's autocast (a block a user keeps out of reduced precision)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                                 nn.Linear(16, 2))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            return self.net(x)


def _laplacian64(f: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-sample Laplacian of every output by float64 grad-of-grad loops."""
    f, x = copy.deepcopy(f).to(f64), x.detach().to(f64).requires_grad_()
    y = f(x)
    rows = []
    for k in range(y.shape[1]):
        (g,) = torch.autograd.grad(y[:, k].sum(), x, create_graph=True)
        rows.append(sum(torch.autograd.grad(g[:, i].sum(), x, retain_graph=True)[0][:, i]
                        for i in range(x.shape[1])))  # fmt: skip
    return torch.stack(rows, 1)


def test_a_compiled_laplacian_replays_the_sweep_as_eager_ran_it_outside_autocast() -> None:
    """The eager Taylor engine propagates with the caller's autocast off (autocast33); the
    compiled call (``_laplacian.traced``) replays the ATen calls the eager call made, those of
    the sweep included, but under the caller's autocast: each of the sweep's float32 matrix
    products was cast to bfloat16 again. Here ``f`` is float32 throughout (its block keeps
    autocast out), eager is float32-exact, and the compiled step gave a bfloat16 result (not
    ``x``'s dtype) 0.6 % off float64."""
    torch._dynamo.reset()
    f, x = _Float32Block(), torch.randn(4, 3)

    def step(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torchdiv.laplacian(f, x, method="taylor")

    eager = step(x)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(x)
    ref = _laplacian64(f, x)
    assert got.dtype == eager.dtype == torch.float32
    # float32 throughout: a few float32 roundings of values of order 1 (bfloat16's are 4e-3)
    torch.testing.assert_close(got.to(f64), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)


class _Float32Layer(nn.Module):
    """``tanh(W x + b)`` (square ``W``) inside ``torch.autocast("cpu", enabled=False)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(6, 6), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            return self.net(x)


def test_a_compiled_structured_diagonal_replays_fs_calls_as_recorded() -> None:
    """The compiled structured engine (``_structured.replay``) runs ``f``'s recorded calls again
    under the caller's autocast: a block of ``f`` kept in float32 (``autocast(enabled=False)``)
    had its matrix product cast to bfloat16 again, so the diagonal ``W_ii tanh'(Wx + b)`` was
    3e-3 off float64 where eager (``f``'s own float32 values) is float32-exact."""
    torch._dynamo.reset()
    f, x = _Float32Layer(), torch.randn(4, 6)

    def step(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torchdiv.jacobian_diagonal(f, x, method="structured")

    eager = step(x)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(x)
    x64 = x.to(f64)
    layer = f.net[0]
    pre = x64 @ layer.weight.to(f64).T + layer.bias.to(f64)
    ref = layer.weight.to(f64).diagonal() * (1 - torch.tanh(pre) ** 2)  # closed form
    # float32 values of order 1: a few roundings (bfloat16's were 3e-3)
    torch.testing.assert_close(got.to(f64), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)


class _CountingFloat32Layer(_Float32Layer):
    """``_Float32Layer`` that counts its calls in a buffer: a write, so the recording keeps no
    values and the structured engine computes ``f``'s values again from its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return super().forward(x)


def test_values_computed_again_are_computed_as_recorded() -> None:
    """``_taylor.propagate.values`` ran ``f``'s recorded calls again under the caller's
    autocast: the structured diagonal of a float32 block (``autocast(enabled=False)``) of an
    ``f`` that writes a buffer was 2e-3 off float64 (bfloat16 products) where ``f``'s own
    values give it float32-exact."""
    f, x = _CountingFloat32Layer(), torch.randn(4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torchdiv.jacobian_diagonal(f, x, method="structured")
    layer = f.net[0]
    x64 = x.to(f64)
    pre = x64 @ layer.weight.to(f64).T + layer.bias.to(f64)
    ref = layer.weight.to(f64).diagonal() * (1 - torch.tanh(pre) ** 2)  # closed form
    assert got.dtype == torch.float32
    # float32 values of order 1: a few roundings (bfloat16's were 2e-3)
    torch.testing.assert_close(got.to(f64), ref.detach(), rtol=1e-5, atol=1e-6)
