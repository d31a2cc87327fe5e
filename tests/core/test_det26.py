"""``det`` replaced from the third order by backward passes only where PyTorch takes its
derivatives as for tensor subclasses (det26).

PyTorch's third derivative of ``det`` by backward passes is ``nan`` where its first two passes
run under a ``TorchDispatchMode`` or inside ``torch.func`` (det25), and right in plain
autograd. det25 replaced ``det`` by ``sign * exp(log|det|)`` at that order everywhere, whose
float32 Laplacian near a node of a Slater determinant was 6-180x the plain loop's error (its
parameter gradients 18-1300x); now ``SafeDerivatives`` replaces it only where a dispatch mode
is on the stack, an argument is a ``torch.func`` wrapper or a tensor subclass
(``_core.modes.plain_derivatives``), and the loop's lookup of the ops it changes follows.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.func import grad, vmap

import torchdiv
from tests.conftest import assert_close, central_difference, laplacian_alone
from tests.core.test_det25 import OPS, _derivative, _Passing, _slater, _weighted_loop
from tests.stacks.test_numerics24 import _per_sample_error, _SlaterDeterminant
from torchdiv._core.modes import SafeDerivatives
from torchdiv._laplacian import loop

f64 = torch.float64
_DET = OPS["det"]  # det(A0 + t B), third derivative 0.18295 at t = 0.3


def _relative(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The largest relative 2-norm error over the parameter tensors."""
    return max(float((g.double() - w).norm() / w.norm()) for g, w in zip(got, want, strict=True))


def test_float32_laplacian_of_a_determinant_near_a_node_within_the_loops_error() -> None:
    """Electrons 0 and 1 1e-2 apart (orbital matrix near-singular): the float32 Laplacian by
    ``"grad-of-grad"`` and its parameter gradients within 2x the float32 per-sample loop's
    error against the float64 loop (measured 1.00x both; 180x and 4900x with ``det`` replaced
    by ``sign * exp(log|det|)``, 6-180x and 18-1300x over five draws of 8 samples)."""
    torch.manual_seed(3)
    net = _SlaterDeterminant()
    net64 = copy.deepcopy(net).double()
    torch.manual_seed(100)
    x = torch.randn(8, 12, dtype=f64)
    x[:, 3:6] = x[:, 0:3] + 1e-2 * torch.randn(8, 3, dtype=f64)
    x = x[:4]  # (numerics24's draw, half of it: a faster test)
    truth = laplacian_alone(net64, x)
    truth_grads = torch.autograd.grad(truth.sum(), list(net64.parameters()))
    plain = laplacian_alone(net, x.float())
    plain_grads = torch.autograd.grad(plain.sum(), list(net.parameters()))
    ours = torchdiv.laplacian(net, x.float(), method="grad-of-grad")
    assert ours.dtype == torch.float32
    ours_grads = torch.autograd.grad(ours.sum(), list(net.parameters()))
    loop_error = _per_sample_error(plain.detach(), truth.detach())
    assert _per_sample_error(ours.detach(), truth.detach()) <= 2 * loop_error
    assert _relative(ours_grads, truth_grads) <= 2 * _relative(plain_grads, truth_grads)


def test_plain_autograd_keeps_pytorchs_det() -> None:
    """Outside dispatch modes and transforms ``SafeDerivatives(3)`` by backward passes leaves
    ``det`` to PyTorch (its node in the graph, nothing replaced), whose third derivative is the
    central difference of its second."""
    t = torch.tensor(0.3, dtype=f64, requires_grad=True)
    with SafeDerivatives(3, "another method", forward_mode=False) as mode:
        y = _DET(t)
    assert type(y.grad_fn).__name__ == "LinalgDetBackward0" and not mode.replaced
    with SafeDerivatives(3, "another method", forward_mode=False):
        third = _derivative(_DET, 0.3, 3)
    expected = central_difference(lambda h: _derivative(_DET, 0.3 + h, 2).detach())
    assert_close(third.detach(), expected, scale=1e3)


def test_third_derivative_inside_torch_func() -> None:
    """``torch.func.grad`` three times, and ``vmap`` of it, under ``SafeDerivatives(3)`` by
    backward passes: ``det``'s argument is a ``torch.func`` wrapper, so it is replaced; equal to
    the central difference of plain second derivatives (PyTorch's own: ``nan``)."""
    third = grad(grad(grad(_DET)))
    expected = central_difference(lambda h: _derivative(_DET, 0.3 + h, 2).detach())
    ts = torch.tensor([0.3, 0.3], dtype=f64)
    assert torch.isnan(third(ts[0]))
    with SafeDerivatives(3, "another method", forward_mode=False):
        assert_close(third(ts[0]), expected, scale=1e3)
        assert_close(vmap(third)(ts), expected.expand(2), scale=1e3)


def test_laplacian_under_a_callers_dispatch_mode() -> None:
    """``laplacian(method="grad-of-grad")`` and its parameter gradients taken under a caller's
    dispatch mode (a FLOP counter's, a logger's): ``det`` replaced there, values and gradients
    those of the float64 loop outside any mode (PyTorch's ``det``: ``nan`` gradients)."""
    torch.manual_seed(2)
    m = nn.Linear(3, 9).double()
    x = torch.randn(3, 3, dtype=f64)
    want = _weighted_loop(m, x, torch.eye(3, dtype=f64))
    want_grads = torch.autograd.grad(want.sum(), list(m.parameters()))
    with _Passing():
        ours = torchdiv.laplacian(lambda z: _slater(m, z), x, method="grad-of-grad")
        grads = torch.autograd.grad(ours.sum(), list(m.parameters()))
    assert_close(ours.detach(), want.detach())
    for got, ref in zip(grads, want_grads, strict=True):
        assert_close(got, ref)


def test_the_loops_lookup_follows_the_modes() -> None:
    """The loop's plain evaluation (``Settings.plain``, the loop ``"auto"`` remembers) stays
    plain through ``det`` outside dispatch modes (``SafeDerivatives`` would keep it), and is
    evaluated again under ``SafeDerivatives`` under a caller's mode: its parameter gradients
    were ``nan`` when the lookup left ``det`` out there."""
    torch.manual_seed(0)
    m = nn.Linear(2, 9).double()

    def f(z: torch.Tensor) -> torch.Tensor:
        rows = m(torch.tanh(z)).unflatten(-1, (3, 3))
        return torch.linalg.det(torch.eye(3, dtype=f64) + rows)

    x = torch.randn(4, 2, dtype=f64)
    want = laplacian_alone(f, x)
    want_grads = torch.autograd.grad(want.sum(), list(m.parameters()))
    for under_mode in (False, True):
        settings = loop.Settings(plain=True)
        with _Passing() if under_mode else contextlib.nullcontext():
            ours = loop.grad_of_grad(f, x, 1, None, settings)
            grads = torch.autograd.grad(ours.sum(), list(m.parameters()))
        assert settings.plain is not under_mode
        assert_close(ours.detach(), want.detach())
        for got, ref in zip(grads, want_grads, strict=True):
            assert_close(got, ref)


def test_a_graph_with_det_is_refused_under_a_dispatch_mode() -> None:
    """``graph_laplacian(create_graph=True)`` of a graph the caller built with ``det``, called
    under a dispatch mode: its passes take PyTorch's formula for tensor subclasses, whose
    third derivative is ``nan`` (the Laplacian's parameter gradients were, silently), so the
    graph is refused, naming the node and the function form (outside modes it is kept:
    ``test_det25``)."""
    torch.manual_seed(1)
    m = nn.Linear(3, 9).double()
    x = torch.randn(3, 3, dtype=f64, requires_grad=True)
    y = _slater(m, x)
    with _Passing(), pytest.raises(ValueError, match=r"LinalgDetBackward0.*function form"):
        torchdiv.graph_laplacian(y, x, create_graph=True)


def test_third_derivative_of_a_tensor_subclass() -> None:
    """A ``__torch_dispatch__`` tensor subclass (PyTorch's test ``TwoTensor``, as a DTensor)
    outside any mode: PyTorch's third derivative of ``det`` is ``nan`` there too, so
    ``SafeDerivatives(3)`` by backward passes replaces it: the central difference."""
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")

    def third() -> torch.Tensor:
        t = two_tensor.TwoTensor(torch.tensor(0.3, dtype=f64), torch.tensor(0.3, dtype=f64))
        y = _DET(t.requires_grad_(True))
        for _ in range(3):
            (y,) = torch.autograd.grad(y, t, create_graph=True)
        return y

    assert torch.isnan(third().a)
    expected = central_difference(lambda h: _derivative(_DET, 0.3 + h, 2).detach())
    with SafeDerivatives(3, "another method", forward_mode=False):
        got = third()
    assert_close(got.a.detach(), expected, scale=1e3)
    assert_close(got.b.detach(), expected, scale=1e3)


def test_batched_second_level_passes() -> None:
    """The loop with its second-level passes batched (``Settings.batched``, ``"auto"``'s at up
    to three inputs), float32: PyTorch's ``det`` backward there takes its form for tensor
    subclasses, whose derivative gave ``nan`` parameter gradients of the Laplacian (float32,
    two electrons 0.1 to 1e-6 apart; none in float64 there, nor at random positions), so
    ``det`` is replaced (a plain evaluation is made again under ``SafeDerivatives``): values
    and gradients those of the float64 per-sample loop to float32 round-off."""
    torch.manual_seed(3)
    net = _SlaterDeterminant()
    net64 = copy.deepcopy(net).double()
    torch.manual_seed(100)
    x = torch.randn(4, 12)
    x[:, 3:6] = x[:, 0:3] + 0.1 * torch.randn(4, 3)  # electrons 0 and 1 0.1 apart
    want = laplacian_alone(net64, x.double())
    want_grads = torch.autograd.grad(want.sum(), list(net64.parameters()))
    for plain in (False, True):
        settings = loop.Settings(batched=True, plain=plain)
        ours = loop.grad_of_grad(net, x, 1, None, settings)
        grads = torch.autograd.grad(ours.sum(), list(net.parameters()))
        assert not settings.plain
        assert_close(ours.detach(), want.detach().float())
        for got, ref in zip(grads, want_grads, strict=True):
            assert_close(got, ref.float())
