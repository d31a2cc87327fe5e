"""rev-merges30: ``replay.restarted`` (compile30) on a PyTorch whose compile context differs.

``restarted`` reads Dynamo's private ``torch._guards.CompileContext`` (``try_get``, the
context's ``attempt``, the context as a weak key) to give a restarted attempt the keys its
first attempt recorded. Where that read failed (a release that renames or drops one of them,
or makes the context a class with ``__slots__``), the exception left the wrapper, outside
``_recorded``'s ``try``, and the whole compiled call raised ``InternalTorchDynamoError``
where the eager call serves. It now fails closed: the call runs eagerly (key ``-1``), never
a plan read from a context it could not tell apart. Values and parameter gradients against a
float64 loop of ``torch.autograd.grad``; compiled with ``aot_eager``."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
import torch._guards as guards
from conftest import assert_close
from test_compiled_losses import Counting, _fresh_dynamo  # noqa: F401  (autouse reset)

import torchdiv

pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not")
Real = guards.CompileContext


def _ours() -> bool:
    """Whether ``try_get``'s caller is ``replay.restarted``'s wrapper (torch's own reads of
    the context are left as they are)."""
    return sys._getframe(2).f_globals.get("__name__") == "torchdiv._structured.replay"


class _NoAttempt:
    """A context without ``attempt``."""

    def __init__(self, real: Any) -> None:
        self.compile_id = real.compile_id


class _Slots:
    """A context that cannot be a weak key."""

    __slots__ = ("attempt", "compile_id")

    def __init__(self, real: Any) -> None:
        self.compile_id, self.attempt = real.compile_id, real.attempt


def _context(kind: str) -> type:
    class Context(Real):  # type: ignore[misc, valid-type]
        @staticmethod
        def try_get() -> Any:
            real = Real.try_get()
            if real is None or not _ours():
                return real
            if kind == "no try_get":
                raise AttributeError("try_get")
            return _NoAttempt(real) if kind == "no attempt" else _Slots(real)

    return Context


def _divergence(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per sample ``sum_j df_j/dx_j`` by ``torch.autograd.grad``, differentiable."""
    out = []
    for xi in x:
        xi = xi.detach().requires_grad_(True)
        y = net(xi[None])[0]
        out.append(sum(torch.autograd.grad(y[j], xi, create_graph=True)[0][j] for j in range(3)))
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["no try_get", "no attempt", "slots"])
def test_a_changed_compile_context_runs_the_call_eagerly(kind, monkeypatch):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.Softplus(), torch.nn.Linear(8, 3)
    ).double()
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(guards, "CompileContext", _context(kind))

    def loss(x: torch.Tensor) -> torch.Tensor:
        return torchdiv.divergence(net, x, method="structured").square().sum()

    got = torch.compile(loss, backend=Counting())(x)
    grads = torch.autograd.grad(got, list(net.parameters())[:-1])
    expected = _divergence(net, x).square().sum()
    # float64: the same function by other arithmetic, a few ulps of terms O(1)
    assert_close(got, expected)
    for a, b in zip(grads, torch.autograd.grad(expected, list(net.parameters())[:-1]), strict=True):
        assert_close(a, b)
