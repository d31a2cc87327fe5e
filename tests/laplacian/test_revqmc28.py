"""rev-qmc28: value_grad_laplacian by forward over reverse in chunks near a Slater node.

qmc27 took the gradient from the Hessian products' primal, so that near a node the ``1 / r²``
rounding errors of ``|∇ log ψ|²`` and ``Δ log ψ`` cancel in the local energy's parameter
gradients as the loop's do; with ``chunk_size`` (or ``"auto"``'s planned chunks) the gradient
was the first chunk's primal and the other chunks' products were differentiated through
graphs of their own: the float32 local energy's parameter gradients 5-20x the per-walker
loop's error 0.1 apart, 21-1800x at 1e-2..1e-4. Each coordinate's gradient is now the primal
of the chunk whose products differentiate it: 0.1-1.0x at 1e-2..1e-4 (the chunks are still
differentiated apart: 5-6x at 0.1, where the loop's error is float32's floor; documented).
Tolerances as ``tests/laplacian/test_qmc27.py``: 2x the float32 per-walker loop's error
against the float64 one.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

import torchdiv
from tests.laplacian.test_qmc27 import (
    _kinetic_alone,
    _local_kinetic,
    _MixedSlater,
    _near_a_node,
    _relative,
)


@pytest.mark.parametrize(("chunk_size", "transformed"), [(1, False), (5, False), (5, True)])
def test_local_energy_by_hessian_products_in_chunks_near_a_node(
    chunk_size: int, transformed: bool
) -> None:
    """Electrons 1e-2 apart, float32: the mean local energy's parameter gradients within 2x
    the loop's error (measured 1.0x; 22x at one direction a chunk, 8.6x at five before)."""
    torch.manual_seed(3)
    net = _MixedSlater()
    net64 = copy.deepcopy(net).double()
    x = _near_a_node(1e-2)[:4]
    truth = torch.autograd.grad(_kinetic_alone(net64, x).mean(), list(net64.parameters()))
    plain = torch.autograd.grad(_kinetic_alone(net, x.float()).mean(), list(net.parameters()))
    names = [name for name, _ in net.named_parameters()]

    def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        f = lambda z: functional_call(net, params, (z,))  # noqa: E731
        method = "auto" if transformed else "forward-over-reverse"
        out = torchdiv.value_grad_laplacian(f, x.float(), method=method, chunk_size=chunk_size)
        return _local_kinetic(out.laplacian, out.gradient).mean()

    if transformed:  # ("auto" under the caller's torch.func: forward over reverse)
        found = torch.func.grad(loss)({n: p.detach() for n, p in net.named_parameters()})
        ours = [found[n] for n in names]
    else:
        ours = list(torch.autograd.grad(loss(dict(net.named_parameters())), net.parameters()))
    assert _relative(ours, truth) <= 2 * _relative(plain, truth)
