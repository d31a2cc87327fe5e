"""Video diffusion nets, whose per-sample event is ``(C, F, H, W)``: a 3D U-Net (Conv3d,
GroupNorm, a timestep embedding added per channel, strided-Conv3d down, ConvTranspose3d up,
skip concatenation) and a factorised space-time block that folds frames into the batch axis
(``"(b f) c h w"`` for a 2D conv and spatial attention, ``"(b h w) f c"`` for temporal
attention, written with ``permute``/``reshape`` as video repositories write einops'
rearranges). The folds are per sample and must not be refused; the same block with the fold
in the wrong order mixes samples and must be. float64 at C=2, F=2, H=W=2 (16 inputs per
sample), references by a per-sample loop of plain autograd: each sample alone through the
net, one gradient per input kept differentiable for the parameter gradients of losses
built from the divergence and the diagonal."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, assert_same_parameter_gradients
from torch import nn

import torchdiv


def embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal timestep embedding, ``(B,) -> (B, dim)``."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=t.dtype) / (dim // 2))
    return torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)


class ResBlock3d(nn.Module):
    """GroupNorm, SiLU, Conv3d, the timestep embedding per channel, again, and a skip."""

    def __init__(self, cin: int, cout: int, tdim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(2, cin), nn.Conv3d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(2, cout), nn.Conv3d(cout, cout, 3, padding=1)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.temb(F.silu(emb))[:, :, None, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class UNet3d(nn.Module):
    """One level down (strided Conv3d, spatial only) and up (ConvTranspose3d), skip concat."""

    def __init__(self, channels: int = 2, width: int = 4, tdim: int = 8):
        super().__init__()
        self.tdim = tdim
        self.mlp = nn.Sequential(nn.Linear(tdim, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.conv_in = nn.Conv3d(channels, width, 3, padding=1)
        self.block1 = ResBlock3d(width, width, tdim)
        self.down = nn.Conv3d(width, width, 3, stride=(1, 2, 2), padding=1)
        self.mid = ResBlock3d(width, 2 * width, tdim)
        self.up = nn.ConvTranspose3d(2 * width, 2 * width, (1, 2, 2), stride=(1, 2, 2))
        self.block2 = ResBlock3d(3 * width, width, tdim)
        self.norm_out = nn.GroupNorm(2, width)
        self.conv_out = nn.Conv3d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.mlp(embedding(t, self.tdim))
        skip = self.block1(self.conv_in(x), emb)
        h = self.up(self.mid(self.down(skip), emb))
        h = self.block2(torch.cat([h, skip], 1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class SelfAttention(nn.Module):
    """Multi-head self-attention over ``(N, L, D)`` tokens, the softmax written out."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = (
            z.reshape(n, length, self.heads, -1).transpose(1, 2) for z in self.qkv(x).chunk(3, -1)
        )
        weights = (q @ k.transpose(-1, -2) / math.sqrt(dim // self.heads)).softmax(-1)
        return self.out((weights @ v).transpose(1, 2).reshape(n, length, dim))


class SpaceTime(nn.Module):
    """Factorised block: GroupNorm per frame, Conv2d and spatial attention on ``(b f) c h w``,
    temporal attention on ``(b h w) f c``. ``fold="frames-first"`` folds ``(f b)`` and
    unfolds ``(b f)``: frames of different videos end up in one sample (a mixing bug)."""

    def __init__(self, channels: int = 2, width: int = 4, tdim: int = 8, fold: str = "right"):
        super().__init__()
        self.tdim, self.fold = tdim, fold
        self.proj_in, self.proj_out = nn.Conv3d(channels, width, 1), nn.Conv3d(width, channels, 1)
        self.norm, self.conv = nn.GroupNorm(2, width), nn.Conv2d(width, width, 3, padding=1)
        self.temb = nn.Linear(tdim, width)
        self.spatial, self.temporal = SelfAttention(width), SelfAttention(width)
        self.norm_s, self.norm_t = nn.LayerNorm(width), nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x) + self.temb(embedding(t, self.tdim))[:, :, None, None, None]
        b, c, f, hh, ww = h.shape
        order = (2, 0, 1, 3, 4) if self.fold == "frames-first" else (0, 2, 1, 3, 4)
        frames = self.conv(F.silu(self.norm(h.permute(order).reshape(b * f, c, hh, ww))))
        tokens = frames.flatten(2).transpose(1, 2)
        tokens = tokens + self.spatial(self.norm_s(tokens))
        h = tokens.transpose(1, 2).reshape(b, f, c, hh, ww).permute(0, 2, 1, 3, 4)
        series = h.permute(0, 3, 4, 2, 1).reshape(b * hh * ww, f, c)
        series = series + self.temporal(self.norm_t(series))
        h = series.reshape(b, hh, ww, f, c).permute(0, 4, 3, 1, 2)
        return x + self.proj_out(h)


MODELS = {"unet3d": UNet3d, "space-time": SpaceTime}
EXACT_METHODS = ("auto", "reverse", "forward", "structured")


def problem(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = MODELS[name]().double()
    x = torch.randn(3, 2, 2, 2, 2, dtype=torch.float64)
    return model, x, torch.tensor([10.0, 300.0, 900.0], dtype=torch.float64)


def loop_diagonal(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Each sample alone through the net; row i of its Jacobian by ``autograd.grad`` with a
    graph (so the diagonal can be differentiated with respect to the parameters)."""
    rows = []
    for b in range(len(x)):
        leaf = x[b : b + 1].detach().requires_grad_(True)
        y = model(leaf, t[b : b + 1]).reshape(-1)
        grads = [torch.autograd.grad(y[i], leaf, create_graph=True)[0] for i in range(len(y))]
        rows.append(torch.stack([g.reshape(-1)[i] for i, g in enumerate(grads)]))
    return torch.stack(rows).reshape(x.shape)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(
    "method",
    [pytest.param(m, marks=() if m == "auto" else pytest.mark.slow) for m in EXACT_METHODS],
)
def test_divergence_and_parameter_gradients_match_the_per_sample_loop(name, method):
    model, x, t = problem(name)
    diagonal = loop_diagonal(model, x, t)
    weights = torch.linspace(0.5, 1.5, len(x), dtype=x.dtype)
    f = lambda z: model(z, t)  # noqa: E731
    divergence = torchdiv.divergence(f, x, method=method)
    assert_close(divergence, diagonal.flatten(1).sum(1))
    assert_same_parameter_gradients(
        model, (weights * divergence).sum(), (weights * diagonal.flatten(1).sum(1)).sum()
    )
    if method != "structured":  # structured is a divergence engine only
        ours = torchdiv.jacobian_diagonal(f, x, method=method)
        assert_close(ours, diagonal)
        assert_same_parameter_gradients(model, ours.square().sum(), diagonal.square().sum())


@pytest.mark.parametrize("method", ["hutchinson", pytest.param("hutch++", marks=pytest.mark.slow)])
def test_estimators_are_unbiased_on_the_space_time_block(method):
    model, x, t = problem("space-time")
    exact = torchdiv.divergence(lambda z: model(z, t), x)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [
            torchdiv.divergence(
                lambda z: model(z, t), x, method=method, num_probes=6, generator=generator
            ).detach()
            for _ in range(30)
        ]
    )
    stderr = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - exact).abs() <= 4 * stderr + 1e-12).all()


def test_folding_frames_into_the_batch_in_the_wrong_order_is_refused():
    model, x, t = problem("space-time")
    model.fold = "frames-first"
    moved = x.clone()
    moved[1] += 1.0
    assert not torch.allclose(model(x, t)[0], model(moved, t)[0])  # it really mixes
    for method in ("auto", "hutchinson"):
        kwargs = {"num_probes": 3} if method == "hutchinson" else {}
        with pytest.raises(torchdiv.BatchInteractionError, match="mixes samples"):
            torchdiv.divergence(lambda z: model(z, t), x, method=method, **kwargs)
