"""The custom-``Function`` watch (``_DifferentiableBackwards``) after tensor parallelism's merge
(rev-tp19): it now refuses at the call a Laplacian whose first derivatives went through a
``backward`` that dropped their graph, and guards the leaves when a result is left with none.

- A ``Function`` whose ``backward`` returns ``zeros_like`` (a step, a hard rounding: its
  derivative is zero) was judged to drop the graph: its Laplacians (auto, grad-of-grad,
  Hutchinson) were refused, where they were right before the merge.
- A ``backward`` that computes under ``no_grad`` (a fused kernel's, as flash-attention's
  ``Function``s do) went unseen where the products took one batched pass (more than two
  rows or probes: ``is_grads_batched`` hides the gradients' graph from the hooks): the
  gradients of a divergence at D = 3 were 50% off, without an error.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import assert_same_parameter_gradients, loop_diagonal, reference_laplacian
from torch import nn

import torchdiv
from torchdiv._exact.autograd import UndifferentiableBackward

D = 3


class HardStep(torch.autograd.Function):
    """``1[h > 0]``, its gradient zero (returned as ``zeros_like``, as such ops write it)."""

    @staticmethod
    def forward(ctx, h):
        return (h > 0).to(h.dtype)

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


class FusedTanh(torch.autograd.Function):
    """``tanh`` whose backward runs without autograd (a fused kernel's, flash-attention's way):
    right once, not differentiable again."""

    @staticmethod
    def forward(ctx, h):
        out = h.tanh()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        with torch.no_grad():
            return grad * (1 - out * out)


class GatedMLP(nn.Module):
    """A tanh MLP with an indicator feature of its hidden layer: by ``HardStep``, or by a
    comparison (``custom=False``, the reference with the same parameters)."""

    def __init__(self, custom: bool = True) -> None:
        super().__init__()
        self.inner, self.outer, self.custom = nn.Linear(D, 8), nn.Linear(8, D), custom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(x)
        step = HardStep.apply(h) if self.custom else (h > 0).to(h.dtype)
        return self.outer(h.tanh() + step)


class Fused(nn.Module):
    """The activation module a fused kernel is called through."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return FusedTanh.apply(h)


@pytest.mark.parametrize("method", ["auto", "grad-of-grad", "hutchinson"])
def test_a_function_with_a_zero_gradient_is_not_refused(method):
    """Its Laplacian (``HardStep`` adds none) and its parameter gradients are right."""
    net, x = GatedMLP().double(), torch.randn(5, D, dtype=torch.float64)
    probes = {"probes": torch.randn(4, 5, D, dtype=torch.float64)} if method == "hutchinson" else {}
    ours = torchdiv.laplacian(net, x, method=method, **probes)
    net.custom = False
    reference = torchdiv.laplacian(net, x, method="hutchinson" if probes else "auto", **probes)
    if not probes:
        torch.testing.assert_close(reference, reference_laplacian(net, x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    assert_same_parameter_gradients(net, ours.square().sum(), reference.square().sum())


@pytest.mark.parametrize("method", ["auto", "hutchinson"])
def test_a_graph_dropped_in_a_batched_pass_is_refused(method):
    """Three rows (or four probes) take one batched pass: the divergence's values are right and
    its gradients refused, naming the ``Function``, as with one pass per row."""
    net = nn.Sequential(nn.Linear(D, 8), Fused(), nn.Linear(8, D)).double()
    x = torch.randn(5, D, dtype=torch.float64)
    probes = {"probes": torch.randn(4, 5, D, dtype=torch.float64)} if method == "hutchinson" else {}
    out = torchdiv.divergence(net, x, method=method, **probes)
    if not probes:
        torch.testing.assert_close(out, loop_diagonal(net, x).sum(-1), rtol=1e-10, atol=1e-12)
    with pytest.raises(UndifferentiableBackward, match="FusedTanh"):
        out.square().sum().backward()


def test_the_guard_on_the_leaves_stays_on_the_result():
    """A result left without a graph (``FusedTanh`` first: every gradient to ``x`` went through
    it) holds a guard from the parameters: the caller's other losses on them are not refused,
    the result's are (again after ``retain_graph``), and nothing is held after it is gone."""
    net = nn.Sequential(Fused(), nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, D)).double()
    x = torch.randn(5, D, dtype=torch.float64)
    out = torchdiv.divergence(net, x)
    net(x).square().sum().backward()
    assert net[1].weight.grad is not None
    for _ in range(2):
        with pytest.raises(UndifferentiableBackward, match="FusedTanh"):
            out.sum().backward(retain_graph=True)
    held = weakref.ref(net[1].weight)
    del out, net
    gc.collect()
    assert held() is None


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_estimate_trace_takes_a_dtensor_template(one_process_group, method):
    """``like`` only shapes the probes: a DTensor ``like`` with a ``matmat`` on plain tensors
    gives the plain ``like``'s estimate (it did before the merge's DTensor checks refused it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    a = torch.randn(4, 6, 6, dtype=torch.float64)
    matmat = lambda v: torch.einsum("bij,kbj->kbi", a, v)  # noqa: E731
    like = torch.zeros(4, 6, dtype=torch.float64)
    shared = distribute_tensor(like, init_device_mesh("cpu", (1,)), [Replicate()])
    estimates = [
        torchdiv.estimate_trace(matmat, t, method=method, num_probes=6, generator=torch.Generator())
        for t in (shared, like)
    ]
    torch.testing.assert_close(estimates[0].value, estimates[1].value, rtol=0, atol=0)
