"""perfcheck25: ``jet.square_sum`` accumulates direction by direction only where ``jac ** 2``
would be a large temporary; below, ``square().sum(0)``'s two kernels are faster (a LayerNorm
MLP's Laplacian, 12 directions of 256 x 32, paid 11 ``addcmul_`` launches per sum)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torchdiv._taylor.jet import square_sum


class _Ops(TorchDispatchMode):
    """The names of the ATen ops run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("shape", "accumulated"),
    [((12, 256, 32), False), ((128, 256, 32), False), ((2, 512, 512), True)],
)
def test_square_sum_path_and_values(shape: tuple[int, ...], accumulated: bool) -> None:
    """The accumulating path only for a large ``jac`` with large directions; the values are
    ``sum_k jac[k] ** 2`` either way (float32: rounding of the sum only)."""
    jac = torch.randn(shape)
    with _Ops() as ops:
        out = square_sum(jac)
    assert any(name.startswith("addcmul_") for name in ops.names) == accumulated
    torch.testing.assert_close(out, jac.double().square().sum(0).float())
