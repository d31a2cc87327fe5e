"""FFJORD's image ODE nets, for tests, ``bench/images.py`` and the CLI's ``ffjord`` family,
written the way its repository (rtqichen/ffjord) writes them.

* ``ConcatConv2d``: time enters as an extra input channel, ``tt = ones_like(x[:, :1]) * t``
  concatenated in front of ``x``, then one convolution (3x3 stride 1, 4x4 stride 2, or a 4x4
  stride-2 transposed convolution).
* ``ODEnet``: ``ConcatConv2d`` layers with softplus between them, optionally inside ``num_squeeze``
  space-to-depth squeezes (reshape-permute, undone at the end); ``strides`` picks each layer's
  kind (1, 2 down, -2 up), as FFJORD's ``--strides`` option does.
* ``squeeze`` / ``unsqueeze``: FFJORD's reshape-permute space-to-depth and its inverse.
* ``ODEfunc``: the dynamics of torchdiffeq's MNIST ODE-Net example (``odenet_mnist.py``):
  group norm, ReLU and a 3x3 ``ConcatConv2d``, twice, then a last group norm, counting its
  evaluations in ``nfe``; its group norms read whole images (``odefunc(...)``).

``odenet(...)`` returns ``f(x) = net(t, x)`` at a fixed time, the function whose divergence a
continuous normalising flow integrates. The layout, not the code, follows FFJORD.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def squeeze(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """``(N, C, H r, W r) -> (N, C r^2, H, W)``: every ``r x r`` block of pixels to channels."""
    n, c, h, w = x.shape
    blocks = x.contiguous().view(n, c, h // factor, factor, w // factor, factor)
    return blocks.permute(0, 1, 3, 5, 2, 4).contiguous().view(n, c * factor**2, h // factor, -1)


def unsqueeze(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """The inverse of ``squeeze``: ``(N, C r^2, H, W) -> (N, C, H r, W r)``."""
    n, c, h, w = x.shape
    blocks = x.contiguous().view(n, c // factor**2, factor, factor, h, w)
    return blocks.permute(0, 1, 4, 2, 5, 3).contiguous().view(n, c // factor**2, h * factor, -1)


class ConcatConv2d(nn.Module):
    """A convolution of ``[t, x]``: the time as a constant extra channel."""

    def __init__(self, dim_in: int, dim_out: int, ksize=3, stride=1, padding=0, transpose=False):
        super().__init__()
        module = nn.ConvTranspose2d if transpose else nn.Conv2d
        self._layer = module(dim_in + 1, dim_out, ksize, stride=stride, padding=padding)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = torch.ones_like(x[:, :1, :, :]) * t
        return self._layer(torch.cat([tt, x], 1))


_KINDS = {  # FFJORD's stride codes: kernel, stride, padding, transposed
    1: {"ksize": 3, "stride": 1, "padding": 1, "transpose": False},
    2: {"ksize": 4, "stride": 2, "padding": 1, "transpose": False},
    -2: {"ksize": 4, "stride": 2, "padding": 1, "transpose": True},
}


class ODEnet(nn.Module):
    """``ConcatConv2d`` layers ``hidden_dims + (channels,)`` with softplus between them."""

    def __init__(
        self,
        hidden_dims: Sequence[int],
        channels: int,
        strides: Sequence[int],
        num_squeeze: int = 0,
    ):
        super().__init__()
        if len(strides) != len(hidden_dims) + 1:
            raise ValueError("ODEnet: one stride per layer")
        self.num_squeeze = num_squeeze
        dim = channels * 4**num_squeeze
        layers = []
        for dim_out, stride in zip((*hidden_dims, dim), strides, strict=True):
            layers.append(ConcatConv2d(dim, dim_out, **_KINDS[stride]))
            dim = dim_out
        self.layers = nn.ModuleList(layers)
        self.activation_fns = nn.ModuleList(nn.Softplus() for _ in layers[:-1])

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dx = y
        for _ in range(self.num_squeeze):
            dx = squeeze(dx)
        for i, layer in enumerate(self.layers):
            dx = layer(t, dx)
            if i < len(self.layers) - 1:
                dx = self.activation_fns[i](dx)
        for _ in range(self.num_squeeze):
            dx = unsqueeze(dx)
        return dx


class AtTime(nn.Module):
    """``x -> net(t, x)`` at a fixed time ``t`` (a buffer)."""

    def __init__(self, net: nn.Module, t: float = 0.5):
        super().__init__()
        self.net = net
        self.register_buffer("t", torch.tensor(t))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.t.to(x.dtype), x)


class ODEfunc(nn.Module):
    """torchdiffeq's MNIST dynamics on ``dim`` channels; ``groups``: each group norm's
    (torchdiffeq's ``min(32, dim)``)."""

    def __init__(self, dim: int, groups: int | None = None):
        super().__init__()
        groups = groups or min(32, dim)
        self.norm1, self.norm2, self.norm3 = (nn.GroupNorm(groups, dim) for _ in range(3))
        self.conv1 = ConcatConv2d(dim, dim, 3, 1, 1)
        self.conv2 = ConcatConv2d(dim, dim, 3, 1, 1)
        self.relu = nn.ReLU(inplace=True)
        self.nfe = 0

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        out = self.conv1(t, self.relu(self.norm1(x)))
        out = self.conv2(t, self.relu(self.norm2(out)))
        return self.norm3(out)


def odefunc(dim: int = 64, groups: int | None = None, seed: int = 0) -> AtTime:
    """torchdiffeq's MNIST ODE-Net dynamics at ``t = 0.5``, random init."""
    torch.manual_seed(seed)
    return AtTime(ODEfunc(dim, groups))


def odenet(
    hidden_dims: Sequence[int] = (64, 64, 64),
    channels: int = 3,
    strides: Sequence[int] | None = None,
    num_squeeze: int = 0,
    seed: int = 0,
) -> AtTime:
    """FFJORD's image ODEnet at ``t = 0.5``, random init (default: its 64-64-64 stride-1
    net, four ``ConcatConv2d`` layers)."""
    torch.manual_seed(seed)
    strides = strides if strides is not None else (1,) * (len(hidden_dims) + 1)
    return AtTime(ODEnet(hidden_dims, channels, strides, num_squeeze))


def multiscale(hidden_dims: Sequence[int] = (64, 64, 64), channels: int = 3, seed: int = 0):
    """The multiscale variant: one squeeze, then a stride-2 down and a transposed stride-2
    up ``ConcatConv2d`` between stride-1 ones (FFJORD's ``--strides 1,2,-2,1``)."""
    return odenet(hidden_dims, channels, (1, 2, -2, 1), num_squeeze=1, seed=seed)
