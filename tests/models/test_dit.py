"""Diffusion transformers as DiT/SiT repositories write them: patchify by a strided Conv2d or
by ``reshape``/``permute``, fixed sin-cos 2D position embeddings, a sinusoidal timestep
embedder fed a per-sample ``t`` of shape ``(B,)``, a class table with a null class for
classifier-free guidance (label dropout ``torch.where(drop, null, y)`` in training), adaLN-Zero
blocks (``chunk(6, dim=1)``, ``x * (1 + scale[:, None]) + shift[:, None]``, LayerNorm without
affine, attention by ``F.scaled_dot_product_attention`` or a hand-written softmax), the final
layer and unpatchify by ``einsum("nhwpqc->nchpwq")`` or ``permute``, learned sigma (2C output
channels, the first C taken as the drift). float64, image 4x4, one channel (16 inputs per
sample); references: each sample alone through plain autograd (``loop_diagonal``, grad of
grad), central differences where PyTorch's own third derivative is wrong (LayerNorm)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_close,
    assert_same_parameter_gradients,
    central_difference,
    directional_gradient,
    laplacian_by_grad_of_grad,
    loop_diagonal,
    shifted,
)
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import torchdiv

NULL = 5  # the null class of five labels


def shift_scale(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens ``(B, N, D)`` by per-sample ``(B, D)`` shift and scale."""
    return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def grid_embedding(dim: int, side: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding ``(1, side * side, dim)``: half for rows, half cols."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    parts = []
    for pos in (cols.flatten(), rows.flatten()):
        angle = pos[:, None].double() * omega
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, 1)[None]


class Block(nn.Module):
    """adaLN-Zero transformer block: six modulations from the conditioning ``c``."""

    def __init__(self, dim: int, heads: int, fused: bool):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = (q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(b, n, d))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, m1, g1, s2, m2, g2 = self.ada(c).chunk(6, dim=1)
        h = h + g1.unsqueeze(1) * self.attend(shift_scale(self.norm1(h), s1, m1))
        return h + g2.unsqueeze(1) * self.mlp(shift_scale(self.norm2(h), s2, m2))


class TinyDiT(nn.Module):
    """``(B, C, S, S), t (B,), y (B,) -> (B, 2C, S, S)`` (learned sigma)."""

    def __init__(self, fused: bool = True, conv: bool = True, size: int = 4, p: int = 2):
        super().__init__()
        dim, self.p, self.conv, self.c = 16, p, conv, 1
        self.embed = nn.Conv2d(1, dim, p, p) if conv else nn.Linear(p * p, dim)
        self.register_buffer("pos", grid_embedding(dim, size // p).float())
        self.freqs = 8
        self.t_mlp = nn.Sequential(nn.Linear(self.freqs, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.labels = nn.Embedding(NULL + 1, dim)
        self.blocks = nn.ModuleList([Block(dim, 2, fused) for _ in range(2)])
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.final = nn.Linear(dim, p * p * 2)

    def conditioning(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        half = self.freqs // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=t.dtype) / half)
        angle = t[:, None] * freqs[None]
        if self.training:  # label dropout for classifier-free guidance, per sample
            y = torch.where(torch.rand(y.shape[0]) < 0.3, NULL, y)
        return self.t_mlp(torch.cat([angle.cos(), angle.sin()], -1)) + self.labels(y)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:
            return self.embed(x).flatten(2).transpose(1, 2)
        b, c, s, _ = x.shape
        p, g = self.p, s // self.p
        patches = x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, -1)
        return self.embed(patches)

    def image(self, h: torch.Tensor) -> torch.Tensor:
        b, n, _ = h.shape
        g, p = int(n**0.5), self.p
        h = h.reshape(b, g, g, p, p, 2)
        h = torch.einsum("nhwpqc->nchpwq", h) if self.conv else h.permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, 2, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.conditioning(t, y)
        h = self.tokens(x) + self.pos
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_ada(c).chunk(2, dim=1)
        return self.image(self.final(shift_scale(self.final_norm(h), shift, scale)))


def setup(fused: bool = True, conv: bool = True):
    torch.manual_seed(0)
    net = TinyDiT(fused, conv).double().eval()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t = torch.rand(3, dtype=torch.float64) * 1000
    y = torch.tensor([0, 3, 1])
    return net, x, t, y


@pytest.mark.parametrize("method", ["auto", "reverse", "forward", "structured"])
@pytest.mark.parametrize(("fused", "conv"), [(True, True), (False, False)])
def test_drift_divergence_and_parameter_gradients(method: str, fused: bool, conv: bool) -> None:
    """The probability-flow drift's divergence and its parameter gradients (a weighted loss)
    equal a per-sample loop of plain autograd (the fused attention by PyTorch's math kernel
    there: the CPU flash kernel has no double backward)."""
    net, x, t, y = setup(fused, conv)
    drift = lambda z: net(z, t, y)[:, :1]  # noqa: E731
    w = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    ours = torchdiv.divergence(drift, x, method=method)
    with sdpa_kernel([SDPBackend.MATH]):
        diagonal = loop_diagonal(drift, x, create_graph=True)
    reference = diagonal.flatten(1).sum(1)
    assert_close(ours, reference)
    assert_same_parameter_gradients(net, (w * ours).sum(), (w * reference).sum())
    if method == "auto":
        assert_close(torchdiv.jacobian_diagonal(drift, x), diagonal)


def test_energy_laplacian_parameter_gradient_by_central_differences() -> None:
    """Laplacian of ``||eps||^2``: values by grad of grad; its parameter gradient (a fourth
    derivative through LayerNorm, where PyTorch's triple backward of ``native_layer_norm`` is
    wrong: entries 1-60% off on the DiTs measured) by central differences along a random
    direction of all parameters."""
    net, x, t, y = setup(fused=False)
    energy = lambda z: net(z, t, y)[:, :1].pow(2).flatten(1).sum(1)  # noqa: E731
    ours = torchdiv.laplacian(energy, x)
    assert_close(ours, laplacian_by_grad_of_grad(energy, x).detach())
    params = list(net.parameters())
    directions = [torch.randn_like(p) for p in params]
    got = directional_gradient(ours, params, directions)  # before the parameters move

    def along(step: float) -> torch.Tensor:
        with shifted(params, directions, step), torch.no_grad():
            return torchdiv.laplacian(energy, x).sum()

    expected = central_difference(along).item()
    assert got == pytest.approx(expected, rel=1e-7)


def test_guidance_batch_and_the_watch() -> None:
    """``torch.cat([z, z])`` with conditional and null labels, split and recombined inside
    ``f``, is per sample: not refused, right. DiT's ``forward_with_cfg`` fed a doubled batch
    (the second half's outputs computed from the first half's inputs), a batch mean in the
    embedding and attention over tokens flattened with the batch mix samples: refused."""
    net, x, t, y = setup()

    def guided(z: torch.Tensor) -> torch.Tensor:
        out = net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL)]))
        cond, uncond = out[:, :1].chunk(2)
        return uncond + 4.0 * (cond - uncond)

    with sdpa_kernel([SDPBackend.MATH]):
        reference = loop_diagonal(guided, x).flatten(1).sum(1)
    assert_close(torchdiv.divergence(guided, x), reference)

    def forward_with_cfg(z: torch.Tensor) -> torch.Tensor:
        half = z[: len(z) // 2]
        return net(torch.cat([half, half]), t[:2], torch.tensor([1, NULL]))[:, :1]

    def batch_mean(z: torch.Tensor) -> torch.Tensor:
        return net(z - z.mean(0, keepdim=True), t, y)[:, :1]

    def flattened(z: torch.Tensor) -> torch.Tensor:
        h = net.tokens(z) + net.pos
        b, n, d = h.shape
        h = net.blocks[0].attend(h.reshape(1, b * n, d)).reshape(b, n, d)
        return net.image(net.final(h))[:, :1]

    for f, z in ((forward_with_cfg, x[:2]), (batch_mean, x), (flattened, x)):
        with pytest.raises(torchdiv.BatchInteractionError, match="samples"):
            torchdiv.divergence(f, z)


def test_label_dropout_draws_once_like_a_plain_call() -> None:
    """In training the label-dropout mask is drawn from the global generator: a call draws it
    once, as ``f(x)`` does (the same state after, the same mask), and leaves the mode and
    ``requires_grad`` alone."""
    net, x, t, y = setup()
    net.train()
    drift = lambda z: net(z, t, y)[:, :1]  # noqa: E731
    torch.manual_seed(7)
    drift(x)
    after_plain = torch.get_rng_state()
    torch.manual_seed(7)
    dropped = torch.where(torch.rand(3) < 0.3, NULL, y)
    for method in ("auto", "reverse", "forward", "structured"):
        torch.manual_seed(7)
        ours = torchdiv.divergence(drift, x, method=method)
        assert torch.equal(torch.get_rng_state(), after_plain)
        assert net.training and not x.requires_grad
        net.eval()
        with sdpa_kernel([SDPBackend.MATH]):
            expected = loop_diagonal(lambda z: net(z, t, dropped)[:, :1], x).flatten(1).sum(1)
        net.train()
        assert_close(ours, expected)
