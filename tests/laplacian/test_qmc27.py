"""VMC wavefunctions end to end after det26 (qmc27): FermiNet-style Slater determinants near
their nodes through every Laplacian route, against float64 per-walker loops of
``autograd.grad`` (``conftest.laplacian_alone``).

Float32 tolerances are relative to the plain float32 per-walker loop's own error against the
float64 loop (as ``tests/core/test_det26.py``): near a node the Laplacian of ``log|psi|`` and
its parameter gradients lose digits as ``1 / sigma_min^2`` whatever computes them, so a
route is right when it loses no more than the loop does (2x: the spread of round-off
between two float32 evaluations of the same formulas, measured 0.6-1.3x).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import CheckpointError, checkpoint

import torchdiv
from tests.conftest import laplacian_alone
from tests.stacks.test_numerics24 import _per_sample_error, _SlaterDeterminant

f64 = torch.float64


def _relative(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The largest relative 2-norm error over the parameter tensors."""
    return max(float((g.double() - w).norm() / w.norm()) for g, w in zip(got, want, strict=True))


def _near_a_node(gap: float) -> torch.Tensor:
    """8 walkers of 4 electrons (numerics24's draw), electrons 0 and 1 ``gap`` apart."""
    torch.manual_seed(100)
    x = torch.randn(8, 12, dtype=f64)
    x[:, 3:6] = x[:, 0:3] + gap * torch.randn(8, 3, dtype=f64)
    return x


@pytest.mark.parametrize("gap", [1e-1, 1e-2, 1e-4])
def test_graph_laplacian_of_a_determinant_near_a_node(gap: float) -> None:
    """``graph_laplacian(y, x, create_graph=True)`` of a caller's graph through ``det``
    (``psi = det``, a Slater determinant written without the log), float32: its second-level
    passes were batched by ``vmap``, where PyTorch takes ``det``'s backward formula for
    tensor subclasses, whose derivative gave ``nan`` parameter gradients (electrons 1e-2 to
    1e-4 apart) and values 26x the loop's error (0.1 apart). Now within 2x the float32 loop's
    error, values and parameter gradients (measured 1.0x)."""
    torch.manual_seed(3)
    net = _SlaterDeterminant()
    net64 = copy.deepcopy(net).double()
    x = _near_a_node(gap)
    truth = laplacian_alone(net64, x)
    truth_grads = torch.autograd.grad(truth.sum(), list(net64.parameters()))
    plain = laplacian_alone(net, x.float())
    plain_grads = torch.autograd.grad(plain.sum(), list(net.parameters()))
    leaf = x.float().requires_grad_(True)
    ours = torchdiv.graph_laplacian(net(leaf), leaf, create_graph=True)
    ours_grads = torch.autograd.grad(ours.sum(), list(net.parameters()))
    loop_error = _per_sample_error(plain.detach(), truth.detach())
    assert _per_sample_error(ours.detach(), truth.detach()) <= 2 * loop_error
    assert _relative(ours_grads, truth_grads) <= 2 * _relative(plain_grads, truth_grads)


class _MixedSlater(nn.Module):
    """``log|det phi_j(r_i)|`` of 4 electrons in 3-D: float32 orbitals (a tanh MLP), the
    determinant taken in float64 as QMC codes take it, ``log|psi|`` back in ``x``'s dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.orbitals = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phi = self.orbitals(x.reshape(-1, 4, 3))
        return torch.linalg.slogdet(phi.double()).logabsdet.to(x.dtype)


def _local_kinetic(laplacian: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """``-(Δ log|psi| + |∇ log|psi||²) / 2`` per walker (``gradient``: ``(B, 12)``)."""
    return -0.5 * (laplacian + gradient.square().sum(-1))


def _kinetic_alone(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The kinetic energy of each walker evaluated alone, its gradient and Laplacian from one
    graph (grad of grad), as a per-walker loop takes them."""
    out = []
    for xb in x:
        leaf = xb[None].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(model(leaf).sum(), leaf, create_graph=True)
        rows = [torch.autograd.grad(g[0, i], leaf, create_graph=True)[0][0, i] for i in range(12)]
        out.append(_local_kinetic(torch.stack(rows).sum(), g[0]))
    return torch.stack(out)


@pytest.mark.parametrize("transformed", [False, True])
def test_local_energy_by_hessian_products_near_a_node(transformed: bool) -> None:
    """``value_grad_laplacian(method="forward-over-reverse")``, and ``"auto"`` inside the
    caller's ``torch.func.grad`` (which computes the three separately), float32, electrons 0.1
    apart: the parameter gradients of the mean local energy within 2x the float32 per-walker
    loop's error against the float64 one (measured 1.0x). The gradient came from
    ``jacobian``, the Laplacian from the Hessian products: near a node their errors
    (``1 / r²`` terms each) did not cancel in ``E_L`` as they do where one computation gives
    both (the loop, the Taylor sweep): 5-380x the loop's error at 0.1, 24-1300x at 1e-2
    (2.7e-2 and 11 relative there). The gradient now is the Hessian products' own primal."""
    assert_local_energy_gradients(1e-1, transformed)


def assert_local_energy_gradients(apart: float, transformed: bool, **options: Any) -> None:
    """The mean local energy's parameter gradients by ``value_grad_laplacian(method=
    "forward-over-reverse", **options)`` (``transformed``: ``"auto"`` inside the caller's
    ``torch.func.grad``), float32, two electrons ``apart``, within 2x the float32 per-walker
    loop's error against the float64 one."""
    torch.manual_seed(3)
    net = _MixedSlater()
    net64 = copy.deepcopy(net).double()
    x = _near_a_node(apart)[:4]
    truth = torch.autograd.grad(_kinetic_alone(net64, x).mean(), list(net64.parameters()))
    plain = torch.autograd.grad(_kinetic_alone(net, x.float()).mean(), list(net.parameters()))
    names = [name for name, _ in net.named_parameters()]

    def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        f = lambda z: functional_call(net, params, (z,))  # noqa: E731
        method = "auto" if transformed else "forward-over-reverse"
        out = torchdiv.value_grad_laplacian(f, x.float(), method=method, **options)
        assert out.gradient.shape == x.shape
        return _local_kinetic(out.laplacian, out.gradient).mean()

    if transformed:  # ("auto" under the caller's torch.func: forward over reverse)
        found = torch.func.grad(loss)({n: p.detach() for n, p in net.named_parameters()})
        ours = [found[n] for n in names]
    else:
        ours = list(torch.autograd.grad(loss(dict(net.named_parameters())), net.parameters()))
    assert _relative(ours, truth) <= 2 * _relative(plain, truth)


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches emptied before and after a compile test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_local_energy_through_tensor_norm() -> None:
    """``torch.compile`` of a loss whose ``log|psi|`` takes electron-nucleus distances by the
    method ``r.norm(dim=-1)`` (a Slater-type envelope ``exp(-|r|)``), by
    ``value_grad_laplacian(method="forward-over-reverse")``: Dynamo raised its
    ``AssertionError`` ("Guard failed on the same frame it was created") on
    ``SafeDerivatives``' lookup of ``Tensor.norm`` in its table (so did every forward engine:
    ``jacobian``, ``"hessian"``); now the local energy and its parameter gradients are the
    eager per-walker loop's (float64 round-off)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()

    def log_psi(r: torch.Tensor) -> torch.Tensor:
        return net(r).sum((1, 2)) - r.norm(dim=-1).sum(-1)

    def energy(r: torch.Tensor) -> torch.Tensor:
        out = torchdiv.value_grad_laplacian(log_psi, r, method="forward-over-reverse")
        return -0.5 * (out.laplacian + out.gradient.square().sum((1, 2)))

    r = torch.randn(4, 2, 3, dtype=f64)
    ours = torch.compile(energy, backend="aot_eager")(r)
    leaf = r.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(log_psi(leaf).sum(), leaf, create_graph=True)
    want = -0.5 * (laplacian_alone(log_psi, r) + g.square().sum((1, 2)))
    torch.testing.assert_close(ours, want)
    params = list(net.parameters())[:3]  # (the last bias leaves the derivatives)
    got = torch.autograd.grad(ours.sum(), params)
    expected = torch.autograd.grad(want.sum(), params)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_a_checkpointed_region_with_a_replaced_op() -> None:
    """A non-reentrant ``checkpoint`` inside ``log|psi|`` around orbitals, a norm and ``det``:
    the loop (``"grad-of-grad"``) evaluates ``f`` with the norm replaced, the checkpoint
    recomputes the region in its backward passes with PyTorch's: PyTorch's ``CheckpointError``
    now names the way out; ``"auto"`` and ``"taylor"`` give the float64 loop's values and
    parameter gradients (1e-12: round-off)."""
    torch.manual_seed(0)
    orbitals = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()

    def body(x: torch.Tensor) -> torch.Tensor:
        r = x.reshape(-1, 3, 3)
        phi = orbitals(r) * torch.exp(-r.norm(dim=-1, keepdim=True))
        return torch.log(torch.linalg.det(phi).abs())

    def log_psi(x: torch.Tensor) -> torch.Tensor:
        return checkpoint(body, x, use_reentrant=False)

    x = torch.randn(3, 9, dtype=f64)
    with pytest.raises(CheckpointError, match=r"checkpoint.*method='taylor'"):
        torchdiv.laplacian(log_psi, x, method="grad-of-grad")
    want = laplacian_alone(body, x)
    params = list(orbitals.parameters())[:3]  # (the last bias leaves the Laplacian)
    expected = torch.autograd.grad(want.sum(), params)
    for method in ("auto", "taylor"):
        ours = torchdiv.laplacian(log_psi, x, method=method)
        torch.testing.assert_close(ours, want, rtol=1e-12, atol=0)
        for a, b in zip(torch.autograd.grad(ours.sum(), params), expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))
