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

import pytest

from tests.laplacian.test_qmc27 import assert_local_energy_gradients


@pytest.mark.parametrize(("chunk_size", "transformed"), [(1, False), (5, False), (5, True)])
def test_local_energy_by_hessian_products_in_chunks_near_a_node(
    chunk_size: int, transformed: bool
) -> None:
    """Electrons 1e-2 apart, float32: the mean local energy's parameter gradients within 2x
    the loop's error (measured 1.0x; 22x at one direction a chunk, 8.6x at five before)."""
    assert_local_energy_gradients(1e-2, transformed, chunk_size=chunk_size)
