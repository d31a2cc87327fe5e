"""``det``'s third derivative by backward passes under a dispatch mode (det25).

PyTorch's third derivative of ``det`` by backward passes is ``nan`` under any
``TorchDispatchMode`` and under ``torch.func`` (its formula for tensor subclasses; right
without them), and torchdiv evaluates ``f`` under its own dispatch modes
(``_exact.state.Once``'s: ``weighted_laplacian`` with an indefinite ``diffusion``). ``det`` is
now replaced by ``_core.linalg.det`` from the third order by backward passes too, and the
sample-mixing watch sees through that replacement. ``slogdet``, ``logdet``, ``inv``,
``solve`` and ``eigvalsh`` were right under the modes (checked here, left as they are).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torchdiv
from tests.conftest import assert_close, central_difference, shifted
from torchdiv._core import linalg
from torchdiv._core.mixing.errors import BatchInteractionError
from torchdiv._core.mixing.watch import watched
from torchdiv._core.modes import SafeDerivatives

f64 = torch.float64


class _Passing(TorchDispatchMode):
    """A dispatch mode that runs every op as it is (as a FLOP counter or torchdiv's own)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return func(*args, **(kwargs or {}))


_G = torch.Generator().manual_seed(0)
_A0, _B = torch.randn(2, 3, 3, generator=_G, dtype=f64)
_S0 = _A0 @ _A0.mT + 3 * torch.eye(3, dtype=f64)  # symmetric positive definite
_SB = _B + _B.mT
_RHS = torch.randn(3, generator=_G, dtype=f64)
OPS = {  # a scalar function of t whose third derivative is taken
    "det": lambda t: torch.linalg.det(_A0 + t * _B),
    "slogdet": lambda t: torch.linalg.slogdet(_A0 + t * _B).logabsdet,
    "logdet": lambda t: torch.logdet(_S0 + t * _SB),
    "inv": lambda t: torch.linalg.inv(_A0 + t * _B).sum(),
    "solve": lambda t: torch.linalg.solve(_A0 + t * _B, _RHS).sum(),
    "eigvalsh": lambda t: torch.linalg.eigvalsh(_S0 + t * _SB).sin().sum(),
}


def _derivative(fun, t0: float, order: int) -> torch.Tensor:
    """``d^order fun / dt^order`` at ``t0`` by ``order`` backward passes."""
    t = torch.tensor(t0, dtype=f64, requires_grad=True)
    y = fun(t)
    for _ in range(order):
        (y,) = torch.autograd.grad(y, t, create_graph=True)
    return y


@pytest.mark.parametrize("name", list(OPS))
def test_third_derivatives_under_a_dispatch_mode(name: str) -> None:
    """Three backward passes under ``SafeDerivatives(3)`` and a dispatch mode equal the central
    difference of the second derivative taken outside any mode (float64: ~1e-10 relative).
    ``det``'s was ``nan`` (0.1830 without the mode)."""
    fun = OPS[name]
    with SafeDerivatives(3, "another method", forward_mode=False), _Passing():
        third = _derivative(fun, 0.3, 3)
    expected = central_difference(lambda h: _derivative(fun, 0.3 + h, 2).detach())
    assert_close(third.detach(), expected, scale=1e3)


def _slater(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``det(I + W logsigmoid(x) + b)``, the matrix of each sample from its 3 coordinates."""
    rows = m(nn.functional.logsigmoid(x)).unflatten(-1, (3, 3))
    return torch.linalg.det(torch.eye(3, dtype=f64) + rows)


def _weighted_loop(m: nn.Module, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Each sample's ``sum_jk A_jk d_j d_k f`` by grad of grad on that sample alone, outside
    any dispatch mode: ``(B,)``."""
    out = []
    for xb in x:
        leaf = xb.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(_slater(m, leaf), leaf, create_graph=True)
        rows = [torch.autograd.grad(g[i], leaf, create_graph=True)[0] for i in range(3)]
        out.append((a * torch.stack(rows)).sum())
    return torch.stack(out)


def test_weighted_laplacian_through_det_with_an_indefinite_diffusion() -> None:
    """``weighted_laplacian`` by backward passes with an indefinite ``A`` (``f`` under the
    state-keeping dispatch mode): values and parameter gradients equal the float64
    per-sample grad-of-grad loop outside any mode and central differences along a parameter
    direction (their parameter gradients were ``nan``, or 1.5% off)."""
    torch.manual_seed(0)
    m = nn.Linear(3, 9).double()
    x = torch.randn(2, 3, dtype=f64)
    sym = torch.randn(3, 3, dtype=f64)
    a = sym + sym.mT  # indefinite
    assert torch.linalg.eigvalsh(a).min() < 0 < torch.linalg.eigvalsh(a).max()

    def loop() -> torch.Tensor:
        return _weighted_loop(m, x, a)

    params = list(m.parameters())
    directions = [torch.randn_like(p) for p in params]
    want = loop()
    want_grads = torch.autograd.grad(want.sum(), params)
    along = central_difference(lambda t: _shifted_loss(loop, params, directions, t))
    for method in ("grad-of-grad", "auto"):
        ours = torchdiv.weighted_laplacian(lambda z: _slater(m, z), x, diffusion=a, method=method)
        assert_close(ours.detach(), want.detach())
        grads = torch.autograd.grad(ours.sum(), params)
        for got, ref in zip(grads, want_grads, strict=True):
            assert_close(got, ref)
        along_ours = sum((g * v).sum() for g, v in zip(grads, directions, strict=True))
        assert_close(torch.as_tensor(along_ours), along)


def _shifted_loss(loop, params: list[torch.Tensor], directions, t: float) -> torch.Tensor:
    with shifted(params, directions, t):
        return loop().sum().detach()


def test_a_graph_with_det_is_not_refused() -> None:
    """``graph_laplacian(create_graph=True)`` of a graph the caller built with ``det``:
    PyTorch's third derivative is right outside dispatch modes, so the graph is kept (the
    replacement from the third order must not refuse it), its parameter gradients those of
    the loop."""
    torch.manual_seed(1)
    m = nn.Linear(3, 9).double()
    x = torch.randn(3, 3, dtype=f64, requires_grad=True)
    ours = torchdiv.graph_laplacian(_slater(m, x), x, create_graph=True)
    want = _weighted_loop(m, x.detach(), torch.eye(3, dtype=f64))
    assert_close(ours.detach(), want.detach())
    got = torch.autograd.grad(ours.sum(), list(m.parameters()))
    for g, r in zip(got, torch.autograd.grad(want.sum(), list(m.parameters())), strict=True):
        assert_close(g, r)


MIXING = {  # each replacement of linalg over a matrix built across samples
    "det": lambda z: z * linalg.det(z[:3, :3]),
    "slogdet": lambda z: z * linalg.slogdet(z[:3, :3]).logabsdet,
    "logdet": lambda z: z * linalg.logdet(z[:3, :3] @ z[:3, :3].mT),
}


@pytest.mark.parametrize("name", list(MIXING))
def test_the_watch_sees_mixing_through_the_replacements(name: str) -> None:
    """The watch follows a custom Function's ``forward``, but took the results of one run right
    after an op under ``no_grad`` (the sign, taken first) for constants: ``det``, ``slogdet``
    and ``logdet`` of a matrix across samples passed, and ``divergence(method="auto")`` of
    ``z * det(z[:3, :3])`` returned other samples' terms once ``det`` was replaced by backward
    passes."""
    x = torch.randn(6, 3, dtype=f64)
    with pytest.raises(BatchInteractionError, match=r"_linalg_slogdet of matrices"):
        watched(MIXING[name], x, 1)


def test_divergence_of_a_det_across_samples_is_refused() -> None:
    x = torch.randn(6, 3, dtype=f64)
    with pytest.raises(BatchInteractionError, match=r"^divergence: f mixes samples: _linalg_"):
        torchdiv.divergence(lambda z: z * torch.linalg.det(z[:3, :3]), x, method="auto")
