"""Models as today's open-source diffusion, flow and transformer repositories write them, with
einops (``rearrange``/``repeat``/``reduce``/``einsum`` and the ``Rearrange``/``Reduce`` layers),
``torch.einsum`` with ellipses, ``F.scaled_dot_product_attention`` (masked, causal), RMSNorm
(``nn.RMSNorm`` and hand-written), SwiGLU/GEGLU feed-forwards, rotary embeddings (tables built
in forward or cached as buffers), sinusoidal and Fourier embeddings of a per-sample ``t``,
adaLN modulation, a 1-D U-Net with weight-standardised convs and group norm, rectified-flow
velocity nets on 2-D points and on ``(B, T, D)`` tokens (``batch_dims=2``), non-reentrant and
selective activation checkpointing and ``save_on_cpu``. float64, events of 2-16 elements;
references: each sample alone through plain autograd, one gradient per output element kept
differentiable (values AND parameter gradients)."""

from __future__ import annotations

import contextlib
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_close,
    central_difference,
    directional_gradient,
    sampled_daily,
    shifted,
)
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

import torchdiv
from torchdiv import BatchInteractionError

einops = pytest.importorskip("einops")
from einops import rearrange, reduce, repeat  # noqa: E402
from einops.layers.torch import Rearrange, Reduce  # noqa: E402


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a per-sample time, ``(B,) -> (B, dim)``: ``cos(t w_k), sin(t w_k)``
    with ``w_k = max_period^(-k / (dim / 2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class HandRMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * g`` over the last dimension, written out (LLaMA style)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim) + 0.1 * torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding of ``(B, H, N, Dh)`` queries and keys; the angle table either
    cached as buffers at construction or built in forward by ``torch.einsum("i,j->ij")``."""

    def __init__(self, dim: int, length: int, cached: bool):
        super().__init__()
        self.cached = cached
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, dim, 2).double() / dim))
        if cached:
            cos, sin = self.table(length)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

    def table(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(length, dtype=self.inv_freq.dtype)
        angles = torch.einsum("i,j->ij", pos, self.inv_freq)
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = (self.cos, self.sin) if self.cached else self.table(q.shape[-2])
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)`` (LLaMA's feed-forward)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GEGLU(nn.Module):
    """``out(a * gelu(gate))`` with ``a, gate`` the halves of one projection (diffusers style)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj, self.out = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(a * F.gelu(gate, approximate="tanh"))


class Attention(nn.Module):
    """Multi-head self-attention with einops and the fused kernel: ``qkv`` split by
    ``rearrange("b n (three h d) -> three b h n d")``, rotary queries and keys, then
    ``F.scaled_dot_product_attention`` (``mask``: none, ``"causal"`` by ``is_causal``, ``"bool"``
    a boolean key-padding-like mask, ``"float"`` an additive bias). ``mixing``: the classic
    wrong rearrange ``"b n d -> n b d"`` before attention, which attends across the batch."""

    def __init__(self, dim: int, heads: int, length: int, mask: str, cached: bool, mixing: bool):
        super().__init__()
        self.heads, self.mask, self.mixing = heads, mask, mixing
        self.qkv, self.out = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)
        self.rotary = Rotary(dim // heads, length, cached)
        keep = torch.ones(length, length, dtype=torch.bool).tril(1)
        self.register_buffer("keep", keep, persistent=False)
        self.register_buffer("bias", 0.3 * torch.randn(heads, length, length).double())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mixing:
            x = rearrange(x, "b n d -> n b d")
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        q, k = self.rotary(q, k)
        if self.mask == "causal":
            h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.mask == "bool":
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=self.keep)
        elif self.mask == "float":
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        else:
            h = F.scaled_dot_product_attention(q, k, v)
        h = rearrange(h, "b h n d -> b n (h d)")
        if self.mixing:
            h = rearrange(h, "n b d -> b n d")
        return self.out(h)


class Block(nn.Module):
    """Pre-norm transformer block with adaLN modulation: ``shift, scale, gate`` for attention
    and feed-forward from the time embedding ``c`` (``(B, D)``), broadcast over tokens by
    ``rearrange("b d -> b 1 d")``."""

    def __init__(self, dim: int, heads: int, length: int, *, norm: str, ff: str, **attn):
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=1e-6) if norm == "torch" else HandRMSNorm(dim)
        self.norm2 = nn.RMSNorm(dim, eps=1e-6) if norm == "torch" else HandRMSNorm(dim)
        self.attn = Attention(dim, heads, length, **attn)
        self.ff = SwiGLU(dim, 2 * dim) if ff == "swiglu" else GEGLU(dim, 2 * dim)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mods = rearrange(self.ada(c), "b (six d) -> six b 1 d", six=6)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.ff(self.norm2(x) * (1 + scale2) + shift2)


class TokenFlow(nn.Module):
    """A DiT/SiT-like velocity net on ``(B, N, C)`` token sequences, ``f(x, t)``: embed, blocks,
    a pooled context by ``Reduce("b n d -> b d", "mean")`` added to the conditioning of the
    final adaLN layer, project back. ``ckpt``: each block through ``checkpoint`` (``"plain"``:
    ``use_reentrant=False``; ``"selective"``: with a policy that saves matmuls and recomputes
    the rest; ``"cpu"``: the forward inside ``save_on_cpu``)."""

    def __init__(
        self,
        channels: int = 4,
        length: int = 4,
        dim: int = 8,
        heads: int = 2,
        depth: int = 1,
        *,
        norm: str = "torch",
        ff: str = "swiglu",
        mask: str = "none",
        cached: bool = True,
        mixing: bool = False,
        ckpt: str = "none",
    ):
        super().__init__()
        self.dim, self.ckpt = dim, ckpt
        self.embed = nn.Linear(channels, dim)
        self.time = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        attn = {"mask": mask, "cached": cached, "mixing": mixing}
        self.blocks = nn.ModuleList(
            [Block(dim, heads, length, norm=norm, ff=ff, **attn) for _ in range(depth)]
        )
        self.pool = Reduce("b n d -> b d", "mean")
        self.final_ada = nn.Linear(dim, 2 * dim)
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.head = nn.Linear(dim, channels)

    def run_block(self, block: Block, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.ckpt == "plain":
            return checkpoint(block, h, c, use_reentrant=False)
        if self.ckpt == "selective":
            return checkpoint(block, h, c, use_reentrant=False, context_fn=save_matmuls_context)
        return block(h, c)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.ckpt == "cpu":
            with torch.autograd.graph.save_on_cpu():
                return self.body(x, t)
        return self.body(x, t)

    def body(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = self.time(timestep_embedding(t, self.dim))
        h = self.embed(x)
        for block in self.blocks:
            h = self.run_block(block, h, c)
        shift, scale = rearrange(
            self.final_ada(F.silu(c + self.pool(h))), "b (two d) -> two b 1 d", two=2
        )
        return self.head(self.final_norm(h) * (1 + scale) + shift)


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective activation checkpointing: keep matmul outputs, recompute everything else."""
    keep = (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default)
    return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE


save_matmuls_context = functools.partial(create_selective_checkpoint_contexts, _save_matmuls)


class WeightStandardizedConv1d(nn.Conv1d):
    """Conv1d whose kernel is standardised per output channel in forward (``(w - mean) /
    sqrt(var + eps)``), the Big-Transfer conv of the annotated-diffusion U-Nets."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = reduce(self.weight, "o ... -> o 1 1", "mean")
        var = reduce(self.weight, "o ... -> o 1 1", functools.partial(torch.var, unbiased=False))
        weight = (self.weight - mean) * (var + 1e-5).rsqrt()
        return F.conv1d(x, weight, self.bias, self.stride, self.padding)


class ResnetBlock1d(nn.Module):
    """Weight-standardised conv, GroupNorm, scale-shift from the time embedding, SiLU, twice,
    and a 1x1 residual."""

    def __init__(self, cin: int, cout: int, tdim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(tdim, 2 * cout))
        self.conv1, self.norm1 = (
            WeightStandardizedConv1d(cin, cout, 3, padding=1),
            nn.GroupNorm(2, cout),
        )
        self.conv2, self.norm2 = (
            WeightStandardizedConv1d(cout, cout, 3, padding=1),
            nn.GroupNorm(2, cout),
        )
        self.skip = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = rearrange(self.mlp(emb), "b c -> b c 1").chunk(2, dim=1)
        h = F.silu(self.norm1(self.conv1(x)) * (scale + 1) + shift)
        return F.silu(self.norm2(self.conv2(h))) + self.skip(x)


class LinearAttention1d(nn.Module):
    """Linear attention over positions (softmax of keys over positions, of queries over
    features), ``einops.einsum`` for the context and the output; GroupNorm on the output."""

    def __init__(self, dim: int, heads: int = 2, dim_head: int = 4):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.qkv = nn.Conv1d(dim, 3 * heads * dim_head, 1, bias=False)
        self.out = nn.Sequential(nn.Conv1d(heads * dim_head, dim, 1), nn.GroupNorm(1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (
            rearrange(z, "b (h c) n -> b h c n", h=self.heads) for z in self.qkv(x).chunk(3, 1)
        )
        q, k = q.softmax(dim=-2) * self.scale, k.softmax(dim=-1)
        context = einops.einsum(k, v, "b h d n, b h e n -> b h d e")
        out = einops.einsum(context, q, "b h d e, b h d n -> b h e n")
        return self.out(rearrange(out, "b h c n -> b (h c) n")) + x


class UNet1d(nn.Module):
    """A small 1-D diffusion U-Net on ``(B, C, L)``: sinusoidal time MLP, one level down by
    ``Rearrange("b c (l p) -> b (c p) l")`` and a 1x1 conv, linear attention in the middle, up by
    nearest upsampling and a conv, skip concatenation, GroupNorm out."""

    def __init__(self, channels: int = 2, width: int = 4, tdim: int = 8):
        super().__init__()
        self.tdim = tdim
        self.time = nn.Sequential(nn.Linear(tdim, tdim), nn.GELU(), nn.Linear(tdim, tdim))
        self.conv_in = nn.Conv1d(channels, width, 3, padding=1)
        self.down_block = ResnetBlock1d(width, width, tdim)
        self.down = nn.Sequential(
            Rearrange("b c (l p) -> b (c p) l", p=2), nn.Conv1d(2 * width, width, 1)
        )
        self.mid = ResnetBlock1d(width, width, tdim)
        self.attn = LinearAttention1d(width)
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv1d(width, width, 3, padding=1)
        )
        self.up_block = ResnetBlock1d(2 * width, width, tdim)
        self.conv_out = nn.Conv1d(width, channels, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time(timestep_embedding(t, self.tdim))
        skip = self.down_block(self.conv_in(x), emb)
        h = self.up(self.attn(self.mid(self.down(skip), emb)))
        return self.conv_out(self.up_block(torch.cat((h, skip), dim=1), emb))


class FourierFlow2d(nn.Module):
    """A rectified-flow velocity net on 2-D toy data: Gaussian Fourier features of ``t``
    (a fixed random frequency buffer), ``repeat``/``rearrange`` of ``t``, an MLP with SiLU."""

    def __init__(self, width: int = 16, features: int = 4):
        super().__init__()
        self.register_buffer("freqs", 3.0 * torch.randn(features).double())
        self.net = nn.Sequential(
            nn.Linear(2 + 2 * features + 1, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, 2),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * torch.einsum("...,f->...f", t, self.freqs)
        feats = torch.cat((angles.sin(), angles.cos(), rearrange(t, "... -> ... 1")), -1)
        return self.net(torch.cat((x, feats.expand(*x.shape[:-1], -1)), -1))


class PerTokenFlow(nn.Module):
    """A velocity net on ``(B, T, D)`` tokens that acts on each token alone (``batch_dims=2``):
    hand-written RMSNorm, adaLN from the per-sequence time ``t`` (``(B,)``), its embedding
    broadcast over tokens by ``repeat("b d -> b t d")``, a GEGLU feed-forward, ``torch.einsum``
    with ellipses for a per-token mixing of the features."""

    def __init__(self, dim: int = 4, hidden: int = 8):
        super().__init__()
        self.dim = dim
        self.norm = HandRMSNorm(dim)
        self.ada = nn.Linear(dim, 2 * dim)
        self.ff = GEGLU(dim, hidden)
        self.mix = nn.Parameter(torch.randn(dim, dim).double() / dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = repeat(timestep_embedding(t, self.dim), "b d -> b t d", t=x.shape[1])
        shift, scale = self.ada(c).chunk(2, dim=-1)
        h = self.ff(self.norm(x) * (1 + scale) + shift)
        return torch.einsum("...i,ij->...j", torch.tanh(h), self.mix) + x


# ---------------------------------------------------------------------------------------------
# references: each sample alone through plain autograd (attention on the math backend, whose
# primitives have second derivatives), rows kept differentiable for parameter gradients


def samples(x: torch.Tensor, t: torch.Tensor, batch_dims: int):
    """``(x_s, t_s)`` of each sample alone, a batch of one (``batch_dims`` ones), in order."""
    if batch_dims == 1:
        return [(x[b : b + 1], t[b : b + 1]) for b in range(len(x))]
    return [
        (x[b : b + 1, s : s + 1], t[b : b + 1]) for b in range(len(x)) for s in range(x.shape[1])
    ]


def reference_jacobians(
    model, x: torch.Tensor, t: torch.Tensor, batch_dims: int = 1
) -> torch.Tensor:
    """Per-sample Jacobians ``S + (m, n)``, one ``autograd.grad`` per output element;
    differentiable with respect to ``x`` too where it requires grad (an ODE state)."""
    blocks = []
    with sdpa_kernel([SDPBackend.MATH]):
        for xs, ts in samples(x, t, batch_dims):
            leaf = xs if xs.requires_grad else xs.detach().requires_grad_(True)
            y = model(leaf, ts).reshape(-1)
            rows = [
                torch.autograd.grad(y[i], leaf, create_graph=True)[0].reshape(-1)
                for i in range(len(y))
            ]
            blocks.append(torch.stack(rows))
    return torch.stack(blocks).reshape(*x.shape[:batch_dims], *blocks[0].shape)


def reference_laplacians(
    model, x: torch.Tensor, t: torch.Tensor, batch_dims: int = 1
) -> torch.Tensor:
    """Per-sample Laplacians of every output, ``x.shape[:batch_dims] + y_event``: grad of grad."""
    out = []
    with sdpa_kernel([SDPBackend.MATH]):
        for xs, ts in samples(x, t, batch_dims):
            leaf = xs.detach().requires_grad_(True)
            y = model(leaf, ts).reshape(-1)
            laps = []
            for i in range(len(y)):
                g = torch.autograd.grad(y[i], leaf, create_graph=True)[0].reshape(-1)
                second = (
                    torch.autograd.grad(g[j], leaf, create_graph=True)[0].reshape(-1)[j]
                    for j in range(len(g))
                )
                laps.append(sum(second))
            out.append(torch.stack(laps))
    return torch.stack(out).reshape(model(x, t).shape)


def traces(jac: torch.Tensor) -> torch.Tensor:
    return jac.diagonal(dim1=-2, dim2=-1).sum(-1)


def same_with_gradients(model: nn.Module, ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Values agree, and the parameter gradients of a random weighting of them."""
    each_with_gradients(model, [ours], reference)


def each_with_gradients(
    model: nn.Module, results: list[torch.Tensor], reference: torch.Tensor
) -> None:
    """Each result agrees with ``reference``, and so do the parameter gradients of one random
    weighting (the reference's taken once: a grad loop's graph is slow to walk)."""
    weights = torch.randn(reference.shape, dtype=reference.dtype)
    want = gradients(model, (reference * weights).sum())
    for ours in results:
        assert_close(ours, reference)
        for got, expected in zip(gradients(model, (ours * weights).sum()), want, strict=True):
            assert_close(got, expected)


def gradients(model: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    """``d loss / d p`` for every parameter (zeros where unused), the graph kept."""
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def exact_methods_right(model, f, x: torch.Tensor, jac: torch.Tensor, batch_dims: int = 1) -> None:
    """Divergence and diagonal of ``f`` at ``x`` by each exact method against the reference
    Jacobians ``jac``, values and parameter gradients."""
    methods = ("auto", "forward", "reverse", "structured")
    kinds = [(torchdiv.divergence, traces(jac)), (torchdiv.jacobian_diagonal, diagonal_of(jac, x))]
    for operator, reference in kinds:
        ours = [operator(f, x, batch_dims=batch_dims, method=method) for method in methods]
        each_with_gradients(model, ours, reference)


def diagonal_of(jac: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return jac.diagonal(dim1=-2, dim2=-1).reshape(x.shape)


def token_flow(**kwargs) -> tuple[TokenFlow, torch.Tensor, torch.Tensor]:
    """A two-head token flow, 2 sequences of 4 tokens of 2 channels (8 inputs each), ``t``."""
    torch.manual_seed(0)
    model = TokenFlow(channels=2, length=4, dim=8, **kwargs).double()
    return model, torch.randn(2, 4, 2, dtype=torch.float64), torch.rand(2, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# transformer velocity nets: every exact method, values and parameter gradients

VARIANTS = {
    "rmsnorm-swiglu-cached": {},
    "hand-rmsnorm-geglu": {"norm": "hand", "ff": "geglu"},
    "causal": {"mask": "causal"},
    "bool-mask": {"mask": "bool"},
    "float-mask-rope-in-forward": {"mask": "float", "cached": False},
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_token_flow_exact(variant: str) -> None:
    """Divergence, diagonal and Jacobian by each exact method of a DiT-like token flow (einops
    rearranges, RoPE, fused attention, RMSNorm, SwiGLU/GEGLU, adaLN, a Reduce pool)."""
    model, x, t = token_flow(**VARIANTS[variant])
    jac = reference_jacobians(model, x, t)
    f = lambda z: model(z, t)  # noqa: E731
    exact_methods_right(model, f, x, jac)
    same_with_gradients(model, torchdiv.jacobian(f, x).reshape(jac.shape), jac)


class PaddedAttention(nn.Module):
    """Attention over padded sequences: each sample's key-padding mask ``(B, N)`` (closed
    over, from its length) as ``rearrange("b n -> b 1 1 n")``, a custom ``scale``; ``t``
    scales the output per sample."""

    def __init__(self, dim: int = 4, heads: int = 2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        mask = rearrange(keep, "b n -> b 1 1 n")
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.7)
        return self.out(rearrange(h, "b h n d -> b n (h d)")) * t[:, None, None]


@pytest.mark.slow
def test_per_sample_padding_masks() -> None:
    """A key-padding mask per sample reaches each sample's own attention: every exact method
    right, values and parameter gradients (the reference slices the mask with the sample)."""
    torch.manual_seed(0)
    model, x, t = PaddedAttention().double(), torch.randn(3, 4, 4).double(), torch.rand(3).double()
    keep = torch.arange(4)[None, :] < torch.tensor([4, 2, 3])[:, None]
    per_sample = [
        reference_jacobians(
            functools.partial(model, keep=keep[b : b + 1]), x[b : b + 1], t[b : b + 1]
        )
        for b in range(3)
    ]
    jac = torch.cat(per_sample)
    exact_methods_right(model, lambda z: model(z, t, keep), x, jac)


# ---------------------------------------------------------------------------------------------
# activation checkpointing and offloading inside f


@pytest.mark.parametrize("ckpt", ["plain", "selective"])
def test_checkpointed_fused_attention_named(ckpt: str) -> None:
    """Blocks under a non-reentrant (or selective) checkpoint with the fused attention kernel:
    a divergence kept differentiable needs the math backend, which the checkpoint's
    recomputation in a backward pass does not keep. It ended in PyTorch's CheckpointError
    ("Recomputed values ... different metadata") or SAC's "not found in storage", though the
    training guide promised "auto" right there; now refused, naming the way out."""
    model, x, t = token_flow(ckpt=ckpt)
    with pytest.raises(
        RuntimeError, match=r"divergence: .*checkpoint.*sdpa_kernel\(SDPBackend.MATH\)"
    ):
        torchdiv.divergence(lambda z: model(z, t), x)


def test_checkpointed_attention_upstream_of_x() -> None:
    """A checkpointed fused attention that made ``x`` (an encoder upstream, in ``x``'s
    history) is not ``f``'s: ``f``, the flow without checkpoints, is differentiated, right."""
    model, x, t = token_flow()
    encoder = Attention(2, 1, 4, mask="none", cached=True, mixing=False).double()
    h = checkpoint(encoder, x.requires_grad_(True), use_reentrant=False)
    ours = torchdiv.divergence(lambda z: model(z, t), h)
    assert_close(ours, traces(reference_jacobians(model, h.detach(), t)).detach())


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", ["plain", "selective", "cpu"])
def test_checkpointed_blocks_on_the_math_backend(ckpt: str) -> None:
    """The way out: the call and the backward pass under ``sdpa_kernel(MATH)``; "auto",
    "structured" and Hutchinson (shared probes) right, values and parameter gradients; with
    ``save_on_cpu`` inside f no math backend is needed. A selective checkpoint's region can be
    walked by one backward pass only (PyTorch: "Trying to backward an extra time"): the
    parameter gradients of the engines of backward passes need a second one; "structured"
    takes none (limitations.md)."""
    model, x, t = token_flow()
    jac = reference_jacobians(model, x, t)
    model.ckpt = ckpt
    f = lambda z: model(z, t)  # noqa: E731
    probes = torch.randn(2, *x.shape, dtype=x.dtype)
    kernel = sdpa_kernel([SDPBackend.MATH]) if ckpt != "cpu" else contextlib.nullcontext()
    with kernel:
        same_with_gradients(model, torchdiv.divergence(f, x, method="structured"), traces(jac))
        if ckpt == "selective":
            return
        same_with_gradients(model, torchdiv.divergence(f, x), traces(jac))
        ours = torchdiv.divergence(f, x, method="hutchinson", probes=probes)
        same_with_gradients(model, ours, hutchinson_reference(jac, probes))


# ---------------------------------------------------------------------------------------------
# the sample-mixing watch


def mixing_calls(f, x: torch.Tensor) -> list:
    """The calls that watch ``f`` for mixed samples."""
    return [
        lambda: torchdiv.divergence(f, x),
        lambda: torchdiv.divergence(f, x, method="structured"),
        lambda: torchdiv.divergence(f, x, method="hutchinson", num_probes=1),
        lambda: torchdiv.jacobian_diagonal(f, x),
        lambda: torchdiv.laplacian(f, x),
        lambda: torchdiv.check_batch_independence(f, x),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", ["none", "plain"])
def test_attention_across_the_batch_refused(ckpt: str) -> None:
    """The wrong rearrange ``"b n d -> n b d"`` before attention attends across the batch:
    every watched method refuses it, inside a checkpointed block too (on the math backend:
    with the fused kernel the checkpoint is refused first)."""
    torch.manual_seed(0)
    x, t = torch.randn(3, 4, 2, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    model = TokenFlow(channels=2, length=4, cached=False, mixing=True, ckpt=ckpt).double()
    with sdpa_kernel([SDPBackend.MATH]):
        for call in mixing_calls(lambda z: model(z, t), x):
            with pytest.raises(BatchInteractionError):
                call()


def test_tokens_as_samples() -> None:
    """``batch_dims=2`` (each token a sample): the per-token flow is accepted, the token
    flow, whose attention mixes tokens, refused."""
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 4, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    per_token = PerTokenFlow().double()
    torchdiv.check_batch_independence(lambda z: per_token(z, t), x, batch_dims=2)
    mixing = TokenFlow(channels=4, length=4).double()
    for method in ("auto", "structured"):
        with pytest.raises(BatchInteractionError, match="softmax over samples"):
            torchdiv.divergence(lambda z: mixing(z, t), x, batch_dims=2, method=method)


@pytest.mark.slow
def test_per_sample_models_accepted() -> None:
    """Group norms, ``Rearrange`` folds of positions into channels, weight standardisation,
    einops reductions over a sample's tokens: per sample, not refused."""
    torch.manual_seed(0)
    t = torch.rand(3, dtype=torch.float64)
    unet, tokens = UNet1d().double(), TokenFlow(channels=2, length=4).double()
    torchdiv.check_batch_independence(lambda z: unet(z, t), torch.randn(3, 2, 8).double())
    torchdiv.check_batch_independence(lambda z: tokens(z, t), torch.randn(3, 4, 2).double())


# ---------------------------------------------------------------------------------------------
# flows.log_likelihood of rectified-flow velocity nets


def standard_normal(z: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """``log N(z; 0, I)`` per sample."""
    flat = z.flatten(batch_dims)
    return -0.5 * flat.square().sum(-1) - 0.5 * flat.shape[-1] * math.log(2 * math.pi)


def euler_log_likelihood(model, x, batch_dims: int, steps: int, divergence) -> torch.Tensor:
    """``log p(x)`` by Euler steps from ``t1 = 1`` down to ``t0 = 0`` of ``dz/dt = v``,
    ``dDelta/dt = -div v`` (as ``flows.log_likelihood`` with ``solver="euler"``), the
    divergence of ``v(., s)`` at ``z`` given by ``divergence(s, z)``."""
    z, delta, h = x, torch.zeros(x.shape[:batch_dims], dtype=x.dtype), -1.0 / steps
    for k in range(steps):
        s = torch.tensor(1.0 + k * h, dtype=x.dtype)
        v, div = model(z, s.expand(len(z))), divergence(s, z)
        z, delta = z + h * v, delta - h * div
    return standard_normal(z, batch_dims) - delta


@pytest.mark.parametrize(
    "method",
    sampled_daily(
        ["auto", "structured", "reverse", "hutchinson"], {"auto", "structured", "reverse"}
    ),
)
def test_rectified_flow_log_likelihood(method: str) -> None:
    """``log p(x)`` of a 2-D rectified flow (Fourier time features) by each method, against
    Euler steps of per-sample grad loops: values and parameter gradients."""
    torch.manual_seed(0)
    model, x = FourierFlow2d().double(), torch.randn(4, 2, dtype=torch.float64)
    probes = torch.randn(2, *x.shape, dtype=x.dtype) if method == "hutchinson" else None

    def divergence(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        jac = reference_jacobians(model, z, s.expand(len(z)))
        return traces(jac) if probes is None else hutchinson_reference(jac, probes)

    ours = torchdiv.flows.log_likelihood(
        lambda s, z: model(z, s.expand(len(z))),
        x,
        0.0,
        1.0,
        lambda z: standard_normal(z, 1),
        method=method,
        probes=probes,
        solver="euler",
        options={"step_size": 0.25},
    )
    same_with_gradients(model, ours, euler_log_likelihood(model, x, 1, 4, divergence))


def offloaded(model: nn.Module, t: torch.Tensor):
    """``f`` with its activations offloaded by ``save_on_cpu`` (inside ``f``)."""

    def f(z: torch.Tensor) -> torch.Tensor:
        with torch.autograd.graph.save_on_cpu():
            return model(z, t)

    return f


def test_offloading_inside_f_named() -> None:
    """``save_on_cpu`` around part of ``f`` (activation offloading in a block): the methods of
    ``torch.func``'s reverse mode raised PyTorch's "Please open an issue" with no hint (the
    hooks around the call were named since rev-modes22); now a hint names the methods that
    run."""
    torch.manual_seed(0)
    model, x = FourierFlow2d().double(), torch.randn(3, 2, dtype=torch.float64)
    f = offloaded(model, torch.rand(3).double())
    hint = r"Hint: f sets saved-tensor hooks .* use method='auto'"
    with pytest.raises(RuntimeError, match=hint + " or 'forward'"):
        torchdiv.divergence(f, x, method="reverse")
    with pytest.raises(RuntimeError, match=hint + ", 'taylor' or 'grad-of-grad'"):
        torchdiv.laplacian(f, x, method="forward-over-reverse")


@pytest.mark.slow
def test_offloading_inside_f_right() -> None:
    """The methods that hint names: right values and parameter gradients."""
    torch.manual_seed(0)
    model, x, t = (
        FourierFlow2d().double(),
        torch.randn(3, 2, dtype=torch.float64),
        torch.rand(3).double(),
    )
    f = offloaded(model, t)
    for method in ("auto", "forward"):
        ours = torchdiv.divergence(f, x, method=method)
        same_with_gradients(model, ours, traces(reference_jacobians(model, x, t)))
    laplacians = reference_laplacians(model, x, t)
    methods = ("auto", "taylor", "grad-of-grad")
    each_with_gradients(model, [torchdiv.laplacian(f, x, method=m) for m in methods], laplacians)


@pytest.mark.slow
@pytest.mark.parametrize("batch_dims", [1, 2])
def test_token_log_likelihood(batch_dims: int) -> None:
    """``log p`` of token sequences: the token flow (attention, a sequence a sample) and the
    per-token flow (``batch_dims=2``, a token a sample), against Euler steps of grad loops."""
    torch.manual_seed(0)
    model = (TokenFlow(channels=2, length=4) if batch_dims == 1 else PerTokenFlow()).double()
    x = torch.randn(2, 4, 2 if batch_dims == 1 else 4, dtype=torch.float64)

    def divergence(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return traces(reference_jacobians(model, z, s.expand(len(z)), batch_dims))

    ours = torchdiv.flows.log_likelihood(
        lambda s, z: model(z, s.expand(len(z))),
        x,
        0.0,
        1.0,
        lambda z: standard_normal(z, batch_dims),
        batch_dims=batch_dims,
        solver="euler",
        options={"step_size": 0.25},
    )
    reference = euler_log_likelihood(model, x, batch_dims, 4, divergence)
    same_with_gradients(model, ours, reference)


# ---------------------------------------------------------------------------------------------
# a 1-D U-Net and tokens as samples: exact, stochastic and second-order methods


def hutchinson_reference(jac: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """``mean_k v_k . J v_k`` per sample (``v . J^T v`` too), ``probes``: ``(k,) + x.shape``."""
    flat = probes.reshape(len(probes), *jac.shape[:-2], jac.shape[-1])
    return torch.einsum("k...i,...ij,k...j->...", flat, jac, flat) / len(probes)


@pytest.mark.slow
def test_unet1d() -> None:
    """Weight-standardised convs, GroupNorm, scale-shift, ``Rearrange`` down, linear attention
    by ``einops.einsum``: divergence and diagonal by each exact method and Hutchinson with
    shared probes against the grad loop; parameter gradients against central differences
    along one direction for "auto" and Hutchinson (the grad loop's own graph took ~20 s to
    walk per loss; each method's parameter gradients are checked on the other models)."""
    torch.manual_seed(0)
    model, x, t = UNet1d().double(), torch.randn(2, 2, 4).double(), torch.rand(2).double()
    jac = reference_jacobians(model, x, t).detach()
    f = lambda z: model(z, t)  # noqa: E731
    probes = torch.randn(3, *x.shape, dtype=x.dtype)
    for method in ("auto", "forward", "reverse", "structured"):
        assert_close(torchdiv.divergence(f, x, method=method), traces(jac))
        assert_close(torchdiv.jacobian_diagonal(f, x, method=method), diagonal_of(jac, x))
    hutchinson = functools.partial(torchdiv.divergence, f, x, method="hutchinson", probes=probes)
    assert_close(hutchinson(), hutchinson_reference(jac, probes))
    gradient_by_differences(model, functools.partial(torchdiv.divergence, f, x))
    gradient_by_differences(model, hutchinson)


def gradient_by_differences(model: nn.Module, call) -> None:
    """The parameter gradient of a random weighting of ``call()`` along a random direction
    against central differences of the weighted ``call()`` itself (its values checked)."""
    params = list(model.parameters())
    directions = [torch.randn_like(p) for p in params]
    out = call()
    weights = torch.randn(out.shape, dtype=out.dtype)

    def value(step: float) -> torch.Tensor:
        with shifted(params, directions, step), torch.no_grad():
            return (call() * weights).sum()

    got = directional_gradient(out * weights, params, directions)
    assert got == pytest.approx(central_difference(value).item(), rel=1e-7, abs=1e-9)


@pytest.mark.slow
def test_per_token_flow_batch_dims_2() -> None:
    """Each token a sample (``batch_dims=2``), ``t`` per sequence: divergence, diagonal,
    Laplacian by each method, Hutchinson, values and parameter gradients."""
    torch.manual_seed(0)
    model, x, t = (
        PerTokenFlow().double(),
        torch.randn(2, 3, 4, dtype=torch.float64),
        torch.rand(2).double(),
    )
    jac = reference_jacobians(model, x, t, batch_dims=2)
    f = lambda z: model(z, t)  # noqa: E731
    exact_methods_right(model, f, x, jac, batch_dims=2)
    probes = torch.randn(3, *x.shape, dtype=x.dtype)
    ours = torchdiv.divergence(f, x, batch_dims=2, method="hutchinson", probes=probes)
    same_with_gradients(model, ours, hutchinson_reference(jac, probes))
    laplacians = reference_laplacians(model, x, t, batch_dims=2)
    methods = ("auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad")
    ours = [torchdiv.laplacian(f, x, batch_dims=2, method=method) for method in methods]
    each_with_gradients(model, ours, laplacians)


@pytest.mark.slow
def test_token_flow_laplacian() -> None:
    """Laplacians of every output of a small token flow by each method: values against grad
    of grad; parameter gradients against central differences along one direction (plain
    autograd's third derivative through LayerNorm is wrong, as in ``test_dit``: the grad
    loop's parameter gradients disagree with the differences, torchdiv's agree)."""
    torch.manual_seed(1)
    model = TokenFlow(channels=2, length=2, mask="causal").double()
    x, t = torch.randn(2, 2, 2, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    f = lambda z: model(z, t)  # noqa: E731
    params = list(model.parameters())
    directions = [torch.randn_like(p) for p in params]
    weights = torch.randn(x.shape, dtype=x.dtype)

    def shifted_value(step: float) -> torch.Tensor:
        with shifted(params, directions, step), torch.no_grad():
            return (torchdiv.laplacian(f, x, method="taylor") * weights).sum()

    expected = central_difference(shifted_value).item()
    laplacians = reference_laplacians(model, x, t).detach()
    for method in ("auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad"):
        ours = torchdiv.laplacian(f, x, method=method)
        assert_close(ours, laplacians)
        got = directional_gradient(ours * weights, params, directions)
        assert got == pytest.approx(expected, rel=1e-7, abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
def test_sketched_estimates(method: str) -> None:
    """Hutch++ and XTrace of a token flow's divergence with shared probes: the estimate of
    the reference Jacobian (or its transpose: the estimators take VJPs where they choose
    reverse mode, an estimate as unbiased, not the same number) by ``estimate_trace``'s
    algebra, values and parameter gradients."""
    model, x, t = token_flow(mask="causal")
    jac = reference_jacobians(model, x, t)
    probes = torchdiv.draw_probes(x, 6, method=method, probe="gaussian")
    ours = torchdiv.divergence(lambda z: model(z, t), x, method=method, probes=probes)

    def of(matrix: torch.Tensor) -> torch.Tensor:
        def matmat(v: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bij,kbj->kbi", matrix, v.flatten(2)).reshape(v.shape)

        return torchdiv.estimate_trace(matmat, x, method=method, probes=probes).value

    forward, transposed = of(jac), of(jac.transpose(-1, -2))
    close = torch.allclose(ours, forward, rtol=1e-10, atol=1e-10)
    same_with_gradients(model, ours, forward if close else transposed)


def hutchinson_laplacians(model, x, t, probes: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """``mean_k v_k . H_i v_k`` per sample and output ``i``: Hessian-vector products of each
    sample alone by grad of grad, kept differentiable."""
    out = []
    vectors = probes.reshape(len(probes), -1, x[(0,) * batch_dims].numel())
    for index, (xs, ts) in enumerate(samples(x, t, batch_dims)):
        leaf = xs.detach().requires_grad_(True)
        y = model(leaf, ts).reshape(-1)
        values = []
        for i in range(len(y)):
            g = torch.autograd.grad(y[i], leaf, create_graph=True)[0].reshape(-1)
            quadratic = (
                torch.autograd.grad(g @ v, leaf, create_graph=True)[0].reshape(-1) @ v
                for v in vectors[:, index]
            )
            values.append(sum(quadratic) / len(probes))
        out.append(torch.stack(values))
    return torch.stack(out).reshape(*x.shape[:batch_dims], -1)


@pytest.mark.slow
@pytest.mark.parametrize("batch_dims", [1, 2])
def test_hutchinson_laplacian(batch_dims: int) -> None:
    """The Hutchinson Laplacian with shared probes of the 2-D rectified flow and of the
    per-token flow (``batch_dims=2``): values and parameter gradients."""
    torch.manual_seed(0)
    if batch_dims == 1:
        model, x, t = FourierFlow2d().double(), torch.randn(3, 2).double(), torch.rand(3).double()
    else:
        model, x, t = PerTokenFlow().double(), torch.randn(2, 2, 4).double(), torch.rand(2).double()
    probes = torch.randn(3, *x.shape, dtype=x.dtype)
    f = lambda z: model(z, t)  # noqa: E731
    ours = torchdiv.laplacian(f, x, batch_dims=batch_dims, method="hutchinson", probes=probes)
    same_with_gradients(model, ours, hutchinson_laplacians(model, x, t, probes, batch_dims))
