"""Two tiny U-Nets of the kinds diffusion models use, random init, for the tests.

* ``diffusers_unet()``: diffusers' ``UNet2DModel`` with attention blocks (CPU fused attention,
  which has no forward-mode rule), in eval mode; it takes ``(x, t)`` and returns an object
  whose ``.sample`` is the output.
* ``GuidedUNet``: the layout of guided-diffusion's ``UNetModel``, and its legacy gradient
  checkpoint ``Recompute`` (``torchdiv._bench.unets``, shared with the benchmarks and the CLI).
* ``UNet3d``: a 3D U-Net pooled by ``AvgPool3d``, upsampled trilinearly
  (``torchdiv._bench.unets``, shared with ``bench/unet3d_pooling.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from torchdiv._bench.unets import GuidedUNet, Recompute, UNet3d

__all__ = ["GuidedUNet", "Recompute", "UNet3d", "diffusers_unet"]


def diffusers_unet(seed: int = 0) -> nn.Module:
    """A tiny diffusers ``UNet2DModel`` (700k parameters) with attention at 1/2 resolution."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()
