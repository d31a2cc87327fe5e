"""Normalisations in half precision by the Taylor engine (``composite._normalize``).

A diffusers-style ResNet block (group norm, SiLU, 3x3 convolution, twice, plus the skip)
with float16 weights and inputs: the Taylor rule normalised in float16, where the squares of
the centred directions and their derivatives overflow, so the parameter gradients of the
squared Laplacian of ``|f|^2`` (near 2e4; float16 reaches 65504) came out ``nan`` in the
first layers, while forward over reverse (PyTorch's kernels accumulate in float32) gave
finite ones. Reference: float64 per-sample grad of grad on the same rounded weights and
inputs; bound: 24 unit roundoffs of the dtype relative to the reference's largest entry
(bf16rev16's bound; measured after the fix: see NOTES_recorders17.md).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import laplacian_alone, parameter_gradients
from torch import nn

import torchdiv

UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm1, self.conv1 = nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        return x + self.conv2(nn.functional.silu(self.norm2(h)))


def _energy(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda z: net(z).square().flatten(1).sum(-1)


@pytest.mark.slow  # (the float64 reference loop: ~30 s under load; float16 convolutions)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_group_norm_laplacian_parameter_gradients(dtype: torch.dtype) -> None:
    net = Block().to(dtype)
    net64 = Block().to(dtype).double()  # (the same rounded weights)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = laplacian_alone(_energy(net64), x.double())
    want_grads = parameter_gradients(net64, want.square().sum())
    got = torchdiv.laplacian(_energy(net), x, method="taylor")
    grads = parameter_gradients(net, got.float().square().sum())
    for g, w in zip(grads, want_grads, strict=True):
        assert torch.isfinite(g).all()
        error = (g.double() - w).abs().max() / w.abs().max()
        assert error < 24 * UNIT[dtype], (error / UNIT[dtype]).item()
