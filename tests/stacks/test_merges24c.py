"""Merge review of rev-real24 (checkpointed fused attention refused) and rev-new24 (the
Laplacian loop's structure key made before ``f`` runs).

rev-real24 refuses a call whose ``f`` runs ``F.scaled_dot_product_attention``'s fused kernel
inside a non-reentrant ``torch.utils.checkpoint``: the checkpoint recomputes that region in
each backward pass on the backend set there. A checkpointed attention that ran before the
call (a text encoder whose output ``f`` closes over) is not ``f``'s: its recomputation runs
on the backend it was made on, and ``f`` is differentiated right.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, assert_same_parameter_gradients
from torch import nn
from torch.utils.checkpoint import checkpoint

import torchdiv

f64 = torch.float64


class _SelfAttention(nn.Module):
    """A pre-norm-free transformer layer's attention: ``(B, N, D) -> (B, N, D)``, residual."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, dtype=f64)
        self.out = nn.Linear(dim, dim, dtype=f64)
        self.heads = heads

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # (the fused CPU kernel by default)
        return h + self.out(a.transpose(1, 2).reshape(b, n, d))


class _TextEncoder(nn.Module):
    """Written as HF encoders are: layers under ``checkpoint(layer.__call__, ...,
    use_reentrant=False)`` when ``gradient_checkpointing``; a mean-pooled ``(B, D)`` output."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_SelfAttention(), _SelfAttention()])
        self.gradient_checkpointing = True

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                tokens = checkpoint(layer.__call__, tokens, use_reentrant=False)
            else:
                tokens = layer(tokens)
        return tokens.mean(1)


def _conditioned_flow() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """A text-conditioned velocity MLP ``v(x, c)`` trained with its encoder: models, the
    tokens, ``x`` of shape (3, 2)."""
    encoder = _TextEncoder()
    velocity = nn.Sequential(
        nn.Linear(2 + 8, 16, dtype=f64), nn.Tanh(), nn.Linear(16, 2, dtype=f64)
    )
    return encoder, velocity, torch.randn(3, 5, 8, dtype=f64), torch.randn(3, 2, dtype=f64)


def test_a_checkpointed_encoder_f_closes_over_is_not_refused() -> None:
    """One-probe Hutchinson of ``x -> v(x, encoder(tokens))``, the encoder's checkpointed
    fused attention run before the call: refused as ``f``'s own until rev-merges24c (the
    walk for it went into the closed-over context's history). Values and the encoder's and
    the velocity's parameter gradients against per-sample ``v . grad(v . f)``."""
    encoder, velocity, tokens, x = _conditioned_flow()
    probes = torch.randn(1, *x.shape, dtype=f64)
    context = encoder(tokens)

    def f(z: torch.Tensor) -> torch.Tensor:
        return velocity(torch.cat([z, context], -1))

    ours = torchdiv.divergence(f, x, method="hutchinson", probes=probes)
    rows = []
    for b in range(len(x)):
        xb = x[b : b + 1].clone().requires_grad_(True)
        v = probes[0, b : b + 1]
        (vjp,) = torch.autograd.grad(
            velocity(torch.cat([xb, context[b : b + 1]], -1)), xb, v, create_graph=True
        )
        rows.append((vjp * v).sum())
    reference = torch.stack(rows)
    assert_close(ours, reference)
    for model in (velocity, encoder):
        assert_same_parameter_gradients(model, ours.square().sum(), reference.square().sum())


def test_a_checkpointed_encoder_f_runs_is_refused() -> None:
    """The same encoder run inside ``f`` (off ``x``'s path): still refused, naming the way
    out (PyTorch's CheckpointError at the caller's backward without it)."""
    encoder, velocity, tokens, x = _conditioned_flow()
    probes = torch.randn(1, *x.shape, dtype=f64)

    def f(z: torch.Tensor) -> torch.Tensor:
        return velocity(torch.cat([z, encoder(tokens)], -1))

    with pytest.raises(RuntimeError, match="sdpa_kernel"):
        torchdiv.divergence(f, x, method="hutchinson", probes=probes)
