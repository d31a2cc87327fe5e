"""Image classifiers of timm and torchvision used as score heads ``R^{C,H,W} -> R^{C,H,W}``
(their logits of ``C H W`` classes reshaped to an image), at tiny widths on 4x4-8x8 images.

torchvision's Swin and ConvNeXt pool a permuted ``(B, H, W, C)`` tensor with
``AdaptiveAvgPool2d(1)``: for a channels-last input PyTorch takes the mean and restrides it
by ``as_strided_`` (the same elements, channels-last strides), which the recording engines
(``"structured"``, the Laplacian's ``"taylor"``) refused until rev-vision21, ``"auto"``
taking the generic engines. The timm models (skipped where timm cannot be imported: it
needs torchvision) check values, parameter gradients and the refusal of train-mode batch
norm on the real code; references are per-sample loops of plain autograd in float64."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_close,
    assert_same_parameter_gradients,
    laplacian_alone,
    loop_diagonal,
)
from torch import nn

import torchdiv


class SwinLikeHead(nn.Module):
    """Patch embedding, tokens ``(B, H, W, C)`` through a pre-norm MLP with a residual, then
    torchvision's Swin ending: norm, ``permute(0, 3, 1, 2)``, ``AdaptiveAvgPool2d(1)``,
    ``flatten``, a linear head whose ``C H W`` logits are the output image."""

    def __init__(self, channels: int = 2, size: int = 4, width: int = 6):
        super().__init__()
        self.embed = nn.Conv2d(channels, width, 2, stride=2)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        hidden = 2 * width
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, channels * size * size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).permute(0, 2, 3, 1)
        tokens = tokens + self.mlp(self.norm1(tokens))
        pooled = self.avgpool(self.norm2(tokens).permute(0, 3, 1, 2))
        return self.head(torch.flatten(pooled, 1)).reshape(x.shape)


def swin_like() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return SwinLikeHead().double(), torch.randn(3, 2, 4, 4, dtype=torch.float64)


@pytest.mark.parametrize("method", ["structured", "auto"])
def test_a_channels_last_average_pool_is_recorded(method):
    model, x = swin_like()
    diagonal = loop_diagonal(model, x, create_graph=True)
    divergence = torchdiv.divergence(model, x, method=method)
    assert_close(divergence, diagonal.flatten(1).sum(1))
    weights = torch.linspace(0.5, 1.5, len(x), dtype=x.dtype)
    expected = (weights * diagonal.flatten(1).sum(1)).sum()
    assert_same_parameter_gradients(model, (weights * divergence).sum(), expected)
    ours = torchdiv.jacobian_diagonal(model, x, method=method)
    assert_close(ours, diagonal)


def test_the_laplacian_through_a_channels_last_average_pool_by_taylor():
    model, x = swin_like()
    energy = lambda z: model(z).flatten(1).square().sum(1) / 2  # noqa: E731
    assert_close(torchdiv.laplacian(energy, x, method="taylor"), laplacian_alone(energy, x))
