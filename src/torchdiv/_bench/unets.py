"""guided-diffusion's U-Net layout, for tests, ``bench/images.py`` and the CLI's ``unet``
families: residual blocks with GroupNorm, SiLU and a timestep embedding added per channel, a
self-attention block over pixels (``attention=False``: none, as ``attention_resolutions=()``
builds it), skip connections concatenated on the way up, and optionally the legacy gradient
checkpoint: an old-style ``autograd.Function`` that runs its block without a graph and re-runs
it in ``backward``, so its graph can be walked once only and ``torch.func`` cannot run it.

Written for torchdiv (the names follow openai/guided-diffusion's ``UNetModel``, also shipped by
torchcfm), with two departures: plain GroupNorm (guided-diffusion normalises in float32 even for
float64 inputs, which would spoil float64 references), and no zero-initialised output layers
(the network would start as the zero function, and so would its divergence).

Also ``UNet3d``, a one-level 3D (video) U-Net pooled by ``AvgPool3d`` and upsampled by trilinear
interpolation, for ``bench/unet3d_pooling.py`` and the structured engine's 3D pooling tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


class Recompute(torch.autograd.Function):
    """Old-style gradient checkpoint: ``forward`` runs ``block`` without a graph, ``backward``
    runs it again with one, differentiates it and drops the inputs (a second walk fails)."""

    @staticmethod
    def forward(ctx: Any, block: Callable[..., torch.Tensor], n: int, *args: torch.Tensor):
        ctx.block, ctx.inputs, ctx.params = block, list(args[:n]), list(args[n:])
        with torch.no_grad():
            return block(*ctx.inputs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> Any:
        inputs = [t.detach().requires_grad_(True) for t in ctx.inputs]
        with torch.enable_grad():
            out = ctx.block(*[t.view_as(t) for t in inputs])
        grads = torch.autograd.grad(out, inputs + ctx.params, grad_outputs, allow_unused=True)
        del ctx.inputs, ctx.params
        return (None, None, *grads)


def checkpoint(
    block: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], module: nn.Module, on: bool
) -> torch.Tensor:
    if not on:
        return block(*inputs)
    return Recompute.apply(block, len(inputs), *inputs, *module.parameters())


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape ``(N, dim)``."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, dtype=t.dtype) / (dim // 2))
    angles = t[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], -1)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb: int, out: int, groups: int, use_checkpoint: bool):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, out))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out, out, 3, padding=1)
        )
        self.skip = nn.Identity() if out == channels else nn.Conv2d(channels, out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self, self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[..., None, None]
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Self-attention over the pixels, written out (softmax of q k^T / sqrt(d)), one head."""

    def __init__(self, channels: int, groups: int, use_checkpoint: bool):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return checkpoint(self._forward, (x,), self, self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        h = x.reshape(b, c, -1)
        q, k, v = self.qkv(self.norm(h)).chunk(3, dim=1)
        weights = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(c), dim=-1)
        out = self.proj_out(torch.einsum("bts,bcs->bct", weights, v))
        return (h + out).reshape(b, c, *spatial)


class TimestepSequential(nn.Sequential):
    """Passes the timestep embedding to the blocks that take one."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock | AttentionBlock) else layer(x)
        return x


class GuidedUNet(nn.Module):
    """Two resolutions: conv in, ResBlock, downsample, ResBlock + attention, a middle block,
    and back up with skip connections; ``forward(x, timesteps)``. ``attention=False``: the
    same net without its attention blocks."""

    def __init__(
        self,
        channels: int = 3,
        width: int = 16,
        groups: int = 4,
        use_checkpoint: bool = False,
        attention: bool = True,
    ):
        super().__init__()
        emb, wide = 4 * width, 2 * width
        self.width = width

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, emb, cout, groups, use_checkpoint)

        def attn(c: int) -> nn.Module:  # attention=False: ADM's attention_resolutions=()
            return AttentionBlock(c, groups, use_checkpoint) if attention else nn.Identity()

        self.time_embed = nn.Sequential(nn.Linear(width, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList(
            [
                TimestepSequential(nn.Conv2d(channels, width, 3, padding=1)),
                TimestepSequential(res(width, width)),
                TimestepSequential(nn.Conv2d(width, width, 3, stride=2, padding=1)),
                TimestepSequential(res(width, wide), attn(wide)),
            ]
        )
        self.middle_block = TimestepSequential(res(wide, wide), attn(wide), res(wide, wide))
        self.output_blocks = nn.ModuleList(
            [
                TimestepSequential(res(2 * wide, wide), attn(wide)),
                TimestepSequential(
                    res(wide + width, wide),
                    nn.Upsample(scale_factor=2),
                    nn.Conv2d(wide, wide, 3, padding=1),
                ),
                TimestepSequential(res(wide + width, width)),
                TimestepSequential(res(2 * width, width)),
            ]
        )
        self.out = nn.Sequential(
            nn.GroupNorm(groups, width), nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps.to(x.dtype), self.width))
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], 1), emb)
        return self.out(h)


class AtStep(nn.Module):
    """``x -> net(x, t)`` at one timestep ``t`` for the whole batch (a buffer), as inside a
    sampler's step."""

    t: torch.Tensor

    def __init__(self, net: nn.Module, t: float = 200.0):
        super().__init__()
        self.net = net
        self.register_buffer("t", torch.tensor(t))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, self.t.expand(x.shape[0]))


def guided_unet(width: int = 16, attention: bool = True, seed: int = 0) -> AtStep:
    """``GuidedUNet`` on 3-channel images at ``t = 200``, random init, in eval mode."""
    torch.manual_seed(seed)
    return AtStep(GuidedUNet(width=width, attention=attention).eval())


class UNet3d(nn.Module):
    """A 3D U-Net as volumetric and video diffusion code writes it: Conv3d/GroupNorm/SiLU blocks
    (``width // 2`` groups), down by ``AvgPool3d`` over space only (as video nets pool), up by
    trilinear ``interpolate``, a skip concatenation; ``(N, channels, F, H, W)`` in and out."""

    def __init__(self, channels: int = 2, width: int = 4):
        super().__init__()
        groups = width // 2
        self.conv_in = nn.Conv3d(channels, width, 3, padding=1)
        self.down = nn.AvgPool3d((1, 2, 2))
        self.mid = nn.Sequential(
            nn.GroupNorm(groups, width), nn.SiLU(), nn.Conv3d(width, 2 * width, 3, padding=1)
        )
        self.out = nn.Sequential(
            nn.GroupNorm(groups, 3 * width),
            nn.SiLU(),
            nn.Conv3d(3 * width, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.conv_in(x)
        h = self.mid(self.down(skip))
        h = torch.nn.functional.interpolate(
            h, size=skip.shape[-3:], mode="trilinear", align_corners=False
        )
        return self.out(torch.cat([h, skip], 1))
