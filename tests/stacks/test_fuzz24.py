"""A seeded random-program fuzzer: per-sample functions ``f(x)`` built from the nn modules and
functional ops the engines have rules for, every operator and every method it accepts, values
and parameter gradients in float64 against per-sample grad-of-grad loops
(``torch.autograd.grad`` per sample and per output, never ``torch.func``).

A program is a short chain of blocks on the feature axis of ``x`` (shape ``(B, D)``, or
``(B, T, D)`` with ``batch_dims=2``); each block prints as one line, so a failing program reads
as code. The same programs with one batch-mixing op spliced in (a mean over the batch,
train-mode batch norm, a roll along the batch) must be refused by the sample-mixing watch.

Run many programs by hand: ``PYTHONPATH=src python tests/stacks/test_fuzz24.py FIRST COUNT``.
"""

from __future__ import annotations

import datetime
import math
import sys
from collections.abc import Callable

import pytest
import torch
from fuzzing import pick as _pick
from fuzzing import uniform_int as _int
from torch import nn

import torchdiv

f64 = torch.float64
WIDEST = 8  # features carried between blocks


def _param(g: torch.Generator, *shape: int, scale: float = 1.0) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape, generator=g, dtype=f64) * scale)


def _linear(g: torch.Generator, k: int, k2: int, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(k, k2, bias=bias, dtype=f64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(k2, k, generator=g, dtype=f64) / math.sqrt(k))
        if bias:
            lin.bias.copy_(torch.randn(k2, generator=g, dtype=f64) * 0.3)
    return lin


def _activations(g: torch.Generator) -> list[Callable[[], nn.Module]]:
    beta, threshold = _pick(g, [1.0, 2.0, 0.5]), _pick(g, [20.0, 1.5])
    return [
        nn.Tanh,
        nn.SiLU,
        nn.GELU,
        lambda: nn.GELU(approximate="tanh"),
        lambda: nn.Softplus(beta=beta, threshold=threshold),
        lambda: nn.ELU(alpha=0.7),
        lambda: nn.CELU(alpha=1.3),
        nn.SELU,
        lambda: nn.LeakyReLU(0.1),
        nn.Mish,
        nn.Hardswish,
        nn.Sigmoid,
        nn.LogSigmoid,
        nn.Softsign,
        nn.Tanhshrink,
    ]


class Block(nn.Module):
    """One step ``h -> fn(h)`` on the last axis; ``text`` is the line it prints as; ``plain``:
    the same written in elementary ops, for the references (PyTorch's own third derivatives of
    ``layer_norm`` are wrong: the notes)."""

    def __init__(
        self,
        text: str,
        fn: Callable,
        plain: Callable | None = None,
        **modules: nn.Module | torch.Tensor,
    ) -> None:
        super().__init__()
        self.text, self.fn, self.plain = text, fn, plain or fn
        for name, m in modules.items():
            if isinstance(m, nn.Buffer):
                self.register_buffer(name, m)
            elif isinstance(m, nn.Parameter):
                self.register_parameter(name, m)
            else:
                self.add_module(name, m)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fn(self, h)


def _softplus(h: torch.Tensor, beta: float = 1.0, threshold: float = math.inf) -> torch.Tensor:
    """``log(1 + exp(beta h)) / beta``, ``h`` above the threshold; written so that no branch
    overflows (an ``inf`` in the branch ``where`` drops still makes its gradient ``nan``)."""
    z = beta * h
    smooth = (z.clamp(min=0) + torch.log1p(torch.exp(-torch.where(z > 0, z, -z)))) / beta
    return torch.where(z > threshold, h, smooth)


def _elu(h: torch.Tensor, alpha: float, scale: float = 1.0, inner: float = 1.0) -> torch.Tensor:
    return scale * torch.where(h > 0, h, alpha * (torch.exp(h.clamp(max=0) * inner) - 1))


def plain_activation(a: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``a(h)`` in elementary ops (``exp``, ``log1p``, ``tanh``, ``erf``, ``where``): the
    references' activations. PyTorch's own derivatives of ``celu`` lose seven digits in
    float64 (its ``1 / alpha`` rounded to float32)."""
    sigmoid = 0.5 * (1 + torch.tanh(h / 2))
    if isinstance(a, nn.Tanh):
        return torch.tanh(h)
    if isinstance(a, nn.SiLU):
        return h * sigmoid
    if isinstance(a, nn.GELU) and a.approximate == "tanh":
        return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    if isinstance(a, nn.GELU):
        return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    if isinstance(a, nn.Softplus):
        return _softplus(h, a.beta, a.threshold)
    if isinstance(a, nn.ELU):
        return _elu(h, a.alpha)
    if isinstance(a, nn.CELU):
        return _elu(h, a.alpha, inner=1 / a.alpha)
    if isinstance(a, nn.SELU):
        return _elu(h, 1.6732632423543772848170429916717, 1.0507009873554804934193349852946)
    if isinstance(a, nn.LeakyReLU):
        return torch.where(h > 0, h, a.negative_slope * h)
    if isinstance(a, nn.Mish):
        return h * torch.tanh(_softplus(h))
    if isinstance(a, nn.Hardswish):
        return torch.where(h <= -3, 0 * h, torch.where(h >= 3, h, h * (h + 3) / 6))
    if isinstance(a, nn.Sigmoid):
        return sigmoid
    if isinstance(a, nn.LogSigmoid):
        return -_softplus(-h)
    if isinstance(a, nn.Softsign):
        return h / (1 + torch.where(h > 0, h, -h))
    if isinstance(a, nn.Tanhshrink):
        return h - torch.tanh(h)
    raise AssertionError(f"no plain form of {a!r}")


def _root(s: torch.Tensor) -> torch.Tensor:
    """``sqrt(s)`` of ``s >= 0``, every derivative 0 where ``s`` is 0: the references' norms and
    standard deviations (PyTorch's first derivatives are 0 there, its second ``nan``)."""
    positive = s > 0
    return torch.where(positive, torch.where(positive, s, 1).sqrt(), 0)


def _plain_std(s: Block, h: torch.Tensor) -> torch.Tensor:
    return _root(h.var(-1, keepdim=True))


def _plain_layer_norm(s: Block, h: torch.Tensor) -> torch.Tensor:
    c = h - h.mean(-1, keepdim=True)
    out = c / torch.sqrt(c.square().mean(-1, keepdim=True) + s.m.eps)
    if s.m.weight is not None:
        out = out * s.m.weight
    return out if s.m.bias is None else out + s.m.bias


def _plain_rms_norm(s: Block, h: torch.Tensor) -> torch.Tensor:
    return h * torch.rsqrt(h.square().mean(-1, keepdim=True) + s.m.eps) * s.m.weight


def _block(g: torch.Generator, k: int, batch: tuple[int, ...]) -> tuple[Block, int]:
    """A random block taking ``k`` features, and its output width (``batch``: the batch shape,
    for closures over per-sample tensors)."""
    kind = _int(g, 0, 40)
    k2 = _int(g, 1, WIDEST)
    if kind > 22:
        return _more_block(g, k, k2, kind, batch)
    if kind == 0:
        bias = bool(_int(g, 0, 1))
        return Block(
            f"Linear({k}, {k2}, bias={bias})", lambda s, h: s.m(h), m=_linear(g, k, k2, bias)
        ), k2
    if kind in (1, 2):
        act = _pick(g, _activations(g))()
        return Block(
            repr(act), lambda s, h: s.m(h), lambda s, h: plain_activation(s.m, h), m=act
        ), k
    if kind == 3:
        norm = nn.LayerNorm(k, elementwise_affine=bool(_int(g, 0, 1)), dtype=f64)
        for p in norm.parameters():
            with torch.no_grad():
                p.add_(torch.randn(p.shape, generator=g, dtype=f64) * 0.3)
        return Block(repr(norm), lambda s, h: s.m(h), _plain_layer_norm, m=norm), k
    if kind == 4:
        norm = nn.RMSNorm(k, eps=1e-6, dtype=f64)
        with torch.no_grad():
            norm.weight.add_(torch.randn(k, generator=g, dtype=f64) * 0.3)
        return Block(repr(norm), lambda s, h: s.m(h), _plain_rms_norm, m=norm), k
    if kind == 5:
        name = _pick(g, ["softmax", "log_softmax"])
        return Block(f"{name}(h, -1)", lambda s, h: getattr(torch, name)(h, -1)), k
    if kind == 6:
        name = _pick(g, ["logsumexp", "sum", "mean", "prod", "norm", "amax_free_sq"])
        if name == "norm":
            return Block(
                "h.norm(dim=-1, keepdim=True)",
                lambda s, h: h.norm(dim=-1, keepdim=True),
                lambda s, h: _root(h.square().sum(-1, keepdim=True)),
            ), 1
        if name == "amax_free_sq":
            return Block(
                "(h * h).sum(-1, keepdim=True)", lambda s, h: (h * h).sum(-1, keepdim=True)
            ), 1
        return Block(
            f"h.{name}(-1, keepdim=True)", lambda s, h: getattr(h, name)(-1, keepdim=True)
        ), 1
    if kind in (7, 8):
        unary = {
            "h.pow(2)": lambda h: h.pow(2),
            "h.pow(3)": lambda h: h.pow(3),
            "torch.exp(torch.tanh(h))": lambda h: torch.exp(torch.tanh(h)),
            "torch.exp(0.3 * h)": lambda h: torch.exp(0.3 * h),
            "torch.log(1 + h * h)": lambda h: torch.log(1 + h * h),
            "torch.log(torch.sigmoid(h))": lambda h: torch.log(torch.sigmoid(h)),
            "torch.sin(h)": torch.sin,
            "torch.cos(h)": torch.cos,
            "torch.sqrt(h * h + 0.5)": lambda h: torch.sqrt(h * h + 0.5),
            "torch.reciprocal(1 + h * h)": lambda h: torch.reciprocal(1 + h * h),
            "(h * h + 1).pow(1.5)": lambda h: (h * h + 1).pow(1.5),
            "(h * h + 1).rsqrt()": lambda h: (h * h + 1).rsqrt(),
            "h.abs() + 0.1 * h": lambda h: h.abs() + 0.1 * h,
            "h.clamp(-30, 30)": lambda h: h.clamp(-30, 30),
            "torch.where(h > 0, h, 0.3 * h)": lambda h: torch.where(h > 0, h, 0.3 * h),
            "1 / (2 + torch.cos(h))": lambda h: 1 / (2 + torch.cos(h)),
        }
        text = _pick(g, sorted(unary))
        fn = unary[text]
        return Block(text, lambda s, h: fn(h)), k
    if kind == 9:
        act = _pick(g, _activations(g))()
        lin = _linear(g, k, k)
        return Block(
            f"h + {act!r}(Linear({k}, {k})(h))",
            lambda s, h: h + s.a(s.m(h)),
            lambda s, h: h + plain_activation(s.a, s.m(h)),
            m=lin,
            a=act,
        ), k
    if kind == 10 and 2 * k <= WIDEST:
        act = _pick(g, _activations(g))()
        return Block(
            f"cat([h, {act!r}(h)], -1)",
            lambda s, h: torch.cat([h, s.a(h)], -1),
            lambda s, h: torch.cat([h, plain_activation(s.a, h)], -1),
            a=act,
        ), 2 * k
    if kind == 11 and k >= 2:
        i = _int(g, 1, k - 1)
        return Block(
            f"a, b = h.split([{i}, {k - i}], -1); cat([b, a.sin()], -1)",
            lambda s, h: torch.cat(
                list(
                    reversed(
                        [p.sin() if j == 0 else p for j, p in enumerate(h.split([i, k - i], -1))]
                    )
                ),
                -1,
            ),
        ), k
    if kind == 12 and k >= 2 and k % 2 == 0:
        return Block(
            "a, b = h.chunk(2, -1); a * b", lambda s, h: h.chunk(2, -1)[0] * h.chunk(2, -1)[1]
        ), k // 2
    if kind == 13:
        a1, a2 = _pick(g, _activations(g))(), _pick(g, _activations(g))()
        return Block(
            f"{a1!r}(Linear({k}, {k2})(h)) * {a2!r}(Linear({k}, {k2})(h))",
            lambda s, h: s.a1(s.m1(h)) * s.a2(s.m2(h)),
            lambda s, h: plain_activation(s.a1, s.m1(h)) * plain_activation(s.a2, s.m2(h)),
            m1=_linear(g, k, k2),
            m2=_linear(g, k, k2),
            a1=a1,
            a2=a2,
        ), k2
    if kind == 14:
        w = _param(g, k, k2, scale=1 / math.sqrt(k))
        return Block(f"h @ W({k}, {k2})", lambda s, h: h @ s.w, w=w), k2
    if kind == 15:
        w = _param(g, k, k2, scale=1 / math.sqrt(k))
        return Block(
            f"einsum('...i,ij->...j', h, W({k}, {k2}))",
            lambda s, h: torch.einsum("...i,ij->...j", h, s.w),
            w=w,
        ), k2
    if kind == 16:
        w = _param(g, k, scale=1.0)
        return Block(
            f"einsum('...i,i,...i->...', h, w({k}), h)[..., None]",
            lambda s, h: torch.einsum("...i,i,...i->...", h, s.w, h)[..., None],
            w=w,
        ), 1
    if kind == 17:
        p, q = _param(g, k, scale=0.7), _param(g, k, scale=0.3)
        return Block(f"h * p({k}) + q({k})", lambda s, h: h * s.p + s.q, p=p, q=q), k
    if kind == 18 and k >= 2 and k % 2 == 0:
        return Block(
            f"h.unflatten(-1, (2, {k // 2})).transpose(-1, -2).flatten(-2)",
            lambda s, h: h.unflatten(-1, (2, k // 2)).transpose(-1, -2).flatten(-2),
        ), k
    if kind == 19 and k >= 2 and k % 2 == 0:
        return Block(
            f"h.reshape(*h.shape[:-1], 2, {k // 2}).sum(-2)",
            lambda s, h: h.reshape(*h.shape[:-1], 2, k // 2).sum(-2),
        ), k // 2
    if kind == 20:
        p = _param(g, k, scale=1.0)
        return Block(f"h * torch.sigmoid(p({k}))", lambda s, h: h * torch.sigmoid(s.p), p=p), k
    if kind == 21 and 2 * k <= WIDEST:
        lin = _linear(g, k, k)
        return Block(
            f"cat([h, h * Linear({k}, {k})(h)], -1)",
            lambda s, h: torch.cat([h, h * s.m(h)], -1),
            m=lin,
        ), 2 * k
    if kind == 22 and k >= 2:
        i = _int(g, 0, k - 1)
        return Block(f"h * h[..., {i}:{i + 1}]", lambda s, h: h * h[..., i : i + 1]), k
    return _block(g, k, batch)  # a kind that does not fit k: draw again


UNARY = {
    "torch.erf(h)": torch.erf,
    "torch.expm1(0.5 * h)": lambda h: torch.expm1(0.5 * h),
    "torch.log1p(h * h)": lambda h: torch.log1p(h * h),
    "torch.sinh(0.5 * h)": lambda h: torch.sinh(0.5 * h),
    "torch.asinh(h)": torch.asinh,
    "torch.atan(h)": torch.atan,
    "torch.square(h)": torch.square,
    "torch.pow(2.0, h)": lambda h: torch.pow(2.0, h),
    "torch.hypot(h, torch.ones_like(h))": lambda h: torch.hypot(h, torch.ones_like(h)),
    "h.clamp(-0.5, 0.5)": lambda h: h.clamp(-0.5, 0.5),
    "h.clamp(min=0.2)": lambda h: h.clamp(min=0.2),
    "torch.where(h > 0.3, h * h, -h)": lambda h: torch.where(h > 0.3, h * h, -h),
    "torch.maximum(h, 0.5 * h + 0.2)": lambda h: torch.maximum(h, 0.5 * h + 0.2),
    "torch.nn.functional.softplus(h, beta=2.0)": lambda h: nn.functional.softplus(h, beta=2.0),
    "h.abs()": torch.abs,
}


def _more_block(
    g: torch.Generator, k: int, k2: int, kind: int, batch: tuple[int, ...]
) -> tuple[Block, int]:
    """The second half of ``_block``'s kinds."""
    if kind == 23:
        t = torch.rand(batch, generator=g, dtype=f64) + 0.5
        return Block(
            f"h * t[..., None]  (t: per-sample, shape {tuple(batch)})",
            lambda s, h: h * s.t[..., None],
            t=nn.Buffer(t),
        ), k
    if kind == 24:
        c = torch.randn((*batch, k), generator=g, dtype=f64)
        return Block(
            f"h + c  (c: per-sample, shape {tuple(c.shape)})", lambda s, h: h + s.c, c=nn.Buffer(c)
        ), k
    if kind == 25 and k >= 2:
        name = _pick(g, ["var", "std"])
        return Block(
            f"h.{name}(-1, keepdim=True)",
            lambda s, h: getattr(h, name)(-1, keepdim=True),
            _plain_std if name == "std" else None,
        ), 1
    if kind == 26:
        return Block("F.normalize(h, dim=-1)", lambda s, h: nn.functional.normalize(h, dim=-1)), k
    if kind == 27:
        return Block("h.amax(-1, keepdim=True)", lambda s, h: h.amax(-1, keepdim=True)), 1
    if kind == 28:
        name = _pick(g, ["cumsum", "cumprod"])
        return Block(f"h.{name}(-1)", lambda s, h: getattr(h, name)(-1)), k
    if kind in (29, 30):
        text = _pick(g, sorted(UNARY))
        fn = UNARY[text]
        return Block(text, lambda s, h: fn(h)), k
    if kind == 31:
        perm = torch.randperm(k, generator=g)
        options = {
            "h.flip(-1)": lambda s, h: h.flip(-1),
            "h.roll(1, -1)": lambda s, h: h.roll(1, -1),
            f"h[..., {perm.tolist()}]": lambda s, h: h[..., perm],
            f"h.index_select(-1, {perm.tolist()})": lambda s, h: h.index_select(-1, perm),
            f"h.gather(-1, {perm.tolist()} expanded)": lambda s, h: h.gather(
                -1, perm.expand(h.shape)
            ),
        }
        text = _pick(g, sorted(options))
        return Block(text, options[text]), k
    if kind == 32 and k >= 2 and k % 2 == 0:

        def attend(s: Block, h: torch.Tensor) -> torch.Tensor:
            tokens = h.unflatten(-1, (2, k // 2))
            weights = torch.softmax(tokens @ tokens.mT / math.sqrt(k // 2), -1)
            return (weights @ tokens).flatten(-2)

        return Block(
            f"tokens = h.unflatten(-1, (2, {k // 2})); "
            "(softmax(tokens @ tokens.mT) @ tokens).flatten(-2)",
            attend,
        ), k
    if kind == 33 and k * k <= WIDEST:
        return Block(
            "einsum('...i,...j->...ij', h, h).flatten(-2)",
            lambda s, h: torch.einsum("...i,...j->...ij", h, h).flatten(-2),
        ), k * k
    if kind == 34:
        return Block(
            "h / (1 + h.norm(dim=-1, keepdim=True))",
            lambda s, h: h / (1 + h.norm(dim=-1, keepdim=True)),
            lambda s, h: h / (1 + _root(h.square().sum(-1, keepdim=True))),
        ), k
    if kind == 35:
        w, b, p = (
            _param(g, k2, k, scale=1 / math.sqrt(k)),
            _param(g, k2, scale=0.3),
            _param(g, k2, scale=0.5),
        )
        return Block(
            f"torch.addcmul(p({k2}), F.linear(h, W({k2}, {k}), b({k2})), "
            "torch.tanh(F.linear(h, W, b)))",
            lambda s, h: torch.addcmul(
                s.p,
                nn.functional.linear(h, s.w, s.b),
                torch.tanh(nn.functional.linear(h, s.w, s.b)),
            ),
            w=w,
            b=b,
            p=p,
        ), k2
    if kind == 36 and 2 * k <= WIDEST:
        return Block(
            "torch.stack([h, torch.sin(h)], -1).flatten(-2)",
            lambda s, h: torch.stack([h, torch.sin(h)], -1).flatten(-2),
        ), 2 * k
    if kind == 37 and 2 * k <= WIDEST:
        return Block(
            f"h.unsqueeze(-2).expand(*h.shape[:-1], 2, {k}).flatten(-2)",
            lambda s, h: h.unsqueeze(-2).expand(*h.shape[:-1], 2, k).flatten(-2),
        ), 2 * k
    if kind == 38:
        p = _param(g, k, scale=1.0)
        return Block(
            f"torch.softmax(h * p({k}), -1)", lambda s, h: torch.softmax(h * s.p, -1), p=p
        ), k
    if kind == 39 and k >= 2 and k % 2 == 0:
        w = _param(g, k // 2, k // 2, scale=0.7)
        return Block(
            f"(h.unflatten(-1, (2, {k // 2})) @ W({k // 2}, {k // 2})).flatten(-2)",
            lambda s, h: (h.unflatten(-1, (2, k // 2)) @ s.w).flatten(-2),
            w=w,
        ), k
    if kind == 40:
        return Block(
            "torch.lerp(h, torch.tanh(h), 0.3)", lambda s, h: torch.lerp(h, torch.tanh(h), 0.3)
        ), k
    return _block(g, k, batch)


class Program(nn.Module):
    """``x`` (event ``D``) through ``blocks`` to ``out`` features; ``scalar``: summed to one per
    sample (shape ``x.shape[:-1]``)."""

    def __init__(self, blocks: list[Block], scalar: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.scalar = scalar
        self.plain = False  # the references' elementary ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for b in self.blocks:
            h = b.plain(b, h) if self.plain else b(h)
        return h.sum(-1) if self.scalar else h

    def __repr__(self) -> str:
        lines = [f"    h = {b.text}" for b in self.blocks]
        end = "h.sum(-1)" if self.scalar else "h"
        return "def f(x):\n    h = x\n" + "\n".join(lines) + f"\n    return {end}"


def program(
    seed: int, d: int, out: int | None, batch: tuple[int, ...], scalar: bool = False
) -> Program:
    """The program of ``seed`` from ``d`` features to ``out`` (``None``: any width), for inputs
    of batch shape ``batch``."""
    g = torch.Generator().manual_seed(seed)
    blocks, k = [], d
    for _ in range(_int(g, 1, 5)):
        b, k = _block(g, k, batch)
        blocks.append(b)
    if out is not None and k != out:
        blocks.append(Block(f"Linear({k}, {out})", lambda s, h: s.m(h), m=_linear(g, k, out)))
    return Program(blocks, scalar)


def problem(seed: int) -> tuple[torch.Tensor, int, list[int]]:
    """The input of ``seed``: ``(B, D)`` or ``(B, T, D)`` with its ``batch_dims``, and the
    (flat) samples the references check. One in four is large (hundreds of samples: ``"auto"``
    then plans, records and chunks instead of its tiny-problem path), checked on three samples."""
    g = torch.Generator().manual_seed(10_000_019 + seed)
    d, batch_dims, large = _int(g, 1, 6), _pick(g, [0, 1, 1, 1, 1, 1, 2, 2]), _int(g, 0, 3) == 0
    if batch_dims == 0:
        shape, large = (d,), False
    elif large:
        shape = (_int(g, 60, 150), 2, d) if batch_dims == 2 else (_int(g, 150, 400), d)
    else:
        shape = (_int(g, 1, 3), 2, d) if batch_dims == 2 else (_int(g, 1, 4), d)
    x = torch.randn(shape, generator=g, dtype=f64)
    count = x.shape[:batch_dims].numel()
    samples = sorted({_int(g, 0, count - 1) for _ in range(3)}) if large else list(range(count))
    return x, batch_dims, samples


def _take(t: torch.Tensor, batch_dims: int, samples: list[int]) -> torch.Tensor:
    """The rows of ``samples`` of ``t`` (batch dimensions flattened)."""
    return t.reshape((-1, *t.shape[batch_dims:]))[samples]


# --- references: autograd.grad per sample and per output -------------------------------------


def _rows(
    y: torch.Tensor, x: torch.Tensor, batch_dims: int, samples: list[int]
) -> tuple[list, int, int]:
    """Per-sample Jacobian rows (create_graph) of ``y = f(x)``: ``rows[k][i]`` is
    ``d y_s[i] / d x_s`` for ``s = samples[k]``, flattened."""
    s_count = x.shape[:batch_dims].numel()
    n = x[(0,) * batch_dims].numel() if s_count else 0
    ys, m = y.reshape(s_count, -1), y[(0,) * batch_dims].numel()
    rows = []
    for s in samples:
        rows.append(
            [
                torch.autograd.grad(ys[s, i], x, create_graph=True, materialize_grads=True)[
                    0
                ].reshape(s_count, n)[s]
                for i in range(m)
            ]
        )
    return rows, n, m


def _plainly(f: Program, x: torch.Tensor) -> torch.Tensor:
    f.plain = True
    try:
        return f(x)
    finally:
        f.plain = False


def reference_jacobian(f, x: torch.Tensor, batch_dims: int, samples: list[int]) -> torch.Tensor:
    """The Jacobians of ``samples``, shape ``(len(samples),) + y_event + x_event``."""
    leaf = x.detach().requires_grad_(True)
    y = _plainly(f, leaf)
    rows = _rows(y, leaf, batch_dims, samples)[0]
    jac = torch.stack([torch.stack(r) for r in rows])
    return jac.reshape((len(samples), *y.shape[batch_dims:], *x.shape[batch_dims:]))


def _second(d: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """``d (d) / d leaf``: zeros where the first derivative is constant."""
    if not d.requires_grad:
        return torch.zeros_like(leaf)
    return torch.autograd.grad(d, leaf, create_graph=True, materialize_grads=True)[0]


def reference_laplacian(
    f, x: torch.Tensor, batch_dims: int, samples: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(f(x), per-sample Jacobian, per-sample Laplacian)`` of ``samples`` (flattened batch),
    each entry of the Laplacian
    ``sum_j d/dx_j (d y_s[i] / d x_j)`` by a second ``autograd.grad`` per sample, output and
    input."""
    leaf = x.detach().requires_grad_(True)
    y = _plainly(f, leaf)
    rows, n, m = _rows(y, leaf, batch_dims, samples)
    s_count = x.shape[:batch_dims].numel()
    lap = torch.stack(
        [
            torch.stack(
                [
                    sum(_second(rows[k][i][j], leaf).reshape(s_count, n)[s, j] for j in range(n))
                    for i in range(m)
                ]
            )
            for k, s in enumerate(samples)
        ]
    )
    jac = torch.stack([torch.stack(r) for r in rows])
    y_event = y.shape[batch_dims:]
    return (
        _take(y, batch_dims, samples),
        jac.reshape((len(samples), *y_event, *x.shape[batch_dims:])),
        lap.reshape((len(samples), *y_event)),
    )


# --- the operators and their methods -----------------------------------------------------------


def _basis_probes(x: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """``sqrt(n) e_r`` for every sample: Hutchinson's estimate over these is the exact trace
    (``(1/n) sum_r n e_r^T A e_r``), shape ``(n,) + x.shape``."""
    n = x[(0,) * batch_dims].numel()
    eye = torch.eye(n, dtype=x.dtype) * math.sqrt(n)
    return (
        eye.reshape((n,) + (1,) * batch_dims + x.shape[batch_dims:]).expand((n, *x.shape)).clone()
    )


def _graph(f: Callable, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f(leaf), leaf)`` for the graph forms."""
    leaf = x.detach().requires_grad_(True)
    return f(leaf), leaf


def _no_grad(op: Callable, f: Callable, x: torch.Tensor, **kw: object) -> torch.Tensor:
    """``op`` called inside ``torch.no_grad()``: the exact value all the same (no gradient)."""
    with torch.no_grad():
        return op(f, x, **kw)


def square_calls(x: torch.Tensor, batch_dims: int) -> dict[str, Callable]:
    """Every (operator, method) on a square program; each returns ``(what, tensor)``: which
    reference it matches and its result."""
    n = x[(0,) * batch_dims].numel()
    kw = {"batch_dims": batch_dims}
    calls: dict[str, Callable] = {}
    for m in ("auto", "structured", "forward", "reverse"):
        calls[f"divergence/{m}"] = lambda f, m=m: ("div", torchdiv.divergence(f, x, method=m, **kw))
        calls[f"jacobian_diagonal/{m}"] = lambda f, m=m: (
            "diag",
            torchdiv.jacobian_diagonal(f, x, method=m, **kw),
        )
    for m in ("auto", "forward", "reverse"):
        calls[f"jacobian/{m}"] = lambda f, m=m: ("jac", torchdiv.jacobian(f, x, method=m, **kw))
    for m in ("auto", "reverse"):
        calls[f"graph_divergence/{m}"] = lambda f, m=m: (
            "div",
            torchdiv.graph_divergence(*_graph(f, x), method=m, create_graph=True, **kw),
        )
    calls["graph_jacobian"] = lambda f: (
        "jac",
        torchdiv.graph_jacobian(*_graph(f, x), create_graph=True, **kw),
    )
    for m in ("forward", "reverse", "structured"):
        calls[f"divergence/{m}/chunk2"] = lambda f, m=m: (
            "div",
            torchdiv.divergence(f, x, method=m, chunk_size=2, **kw),
        )
    calls["jacobian_diagonal/auto/no_grad"] = lambda f: (
        "diag",
        _no_grad(torchdiv.jacobian_diagonal, f, x, **kw),
    )

    def exact(method: str) -> dict:
        """The options of ``method``'s exact mode: the scaled basis, or ``3n`` Hutch++ probes."""
        if method == "hutchinson":
            return {"probes": _basis_probes(x, batch_dims)}
        return {"num_probes": 3 * n, "generator": torch.Generator().manual_seed(1)}

    for m, mode in (("hutchinson", "basis"), ("hutch++", "3n")):
        calls[f"divergence/{m}/{mode}"] = lambda f, m=m: (
            "div",
            torchdiv.divergence(f, x, method=m, **exact(m), **kw),
        )
        calls[f"estimate_divergence/{m}/{mode}"] = lambda f, m=m: (
            "div",
            torchdiv.estimate_divergence(f, x, method=m, **exact(m), **kw).value,
        )
    calls["jacobian_diagonal/hutchinson/basis"] = lambda f: (
        "diag",
        torchdiv.jacobian_diagonal(f, x, method="hutchinson", **exact("hutchinson"), **kw),
    )
    return calls


def laplacian_calls(x: torch.Tensor, batch_dims: int) -> dict[str, Callable]:
    kw = {"batch_dims": batch_dims}
    calls: dict[str, Callable] = {}
    for m in ("auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad"):
        calls[f"laplacian/{m}"] = lambda f, m=m: ("lap", torchdiv.laplacian(f, x, method=m, **kw))
    calls["laplacian/hutchinson/basis"] = lambda f: (
        "lap",
        torchdiv.laplacian(f, x, method="hutchinson", probes=_basis_probes(x, batch_dims), **kw),
    )
    calls["graph_laplacian"] = lambda f: (
        "lap",
        torchdiv.graph_laplacian(*_graph(f, x), create_graph=True, **kw),
    )
    for m in ("auto", "taylor", "grad-of-grad", "forward-over-reverse"):
        calls[f"laplacian/{m}/chunk2"] = lambda f, m=m: (
            "lap",
            torchdiv.laplacian(f, x, method=m, chunk_size=2, **kw),
        )
    calls["value_grad_laplacian/taylor/chunk2"] = lambda f: (
        "vgl",
        torchdiv.value_grad_laplacian(f, x, method="taylor", chunk_size=2, **kw),
    )
    calls["laplacian/auto/no_grad"] = lambda f: ("lap", _no_grad(torchdiv.laplacian, f, x, **kw))
    for m in ("auto", "taylor", "forward-over-reverse"):
        calls[f"value_grad_laplacian/{m}"] = lambda f, m=m: (
            "vgl",
            torchdiv.value_grad_laplacian(f, x, method=m, **kw),
        )
    return calls


# --- comparing ---------------------------------------------------------------------------------


def _close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-8) -> str | None:
    """Float64 agreement: both sides are a few hundred flops from the same inputs, so 1e-8
    relative to the reference's largest entry leaves eight digits of head room over eps."""
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.dtype != expected.dtype:
        return f"dtype {actual.dtype} != {expected.dtype}"
    scale = 1.0 + float(expected.detach().abs().max()) if expected.numel() else 1.0
    err = float((actual.detach() - expected.detach()).abs().max()) if expected.numel() else 0.0
    if not err <= tolerance * scale:
        return f"max error {err:.3e} (scale {scale:.3e})"
    return None


def _grads(
    out: list[torch.Tensor], weights: list[torch.Tensor], params: list[torch.Tensor]
) -> list[torch.Tensor]:
    loss = sum((o * w).sum() for o, w in zip(out, weights, strict=True))
    if not params or not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        return [torch.zeros_like(p) for p in params]
    got = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if d is None else d for p, d in zip(params, got, strict=True)]


def check(
    f: nn.Module,
    x: torch.Tensor,
    batch_dims: int,
    samples: list[int],
    calls: dict[str, Callable],
    refs: dict,
    tolerance: float = 1e-8,
) -> list[str]:
    """Run every call; the list of disagreements (values, parameter gradients, errors) on
    ``samples``."""
    params = list(f.parameters())
    g = torch.Generator().manual_seed(7)
    faults = []
    ref_grads: dict[str, list[torch.Tensor]] = {}
    for name, call in calls.items():
        if name.startswith("graph_") and any(op in repr(f) for op in ("CELU", "std", "norm(")):
            # the caller's graph keeps PyTorch's derivatives: celu's 1e-7 off, and those of
            # std and norms nan at a zero vector (documented; the notes)
            continue
        try:
            what, got = call(f)
        except ValueError as exc:
            if name != "graph_laplacian" or "third derivative PyTorch gets wrong" not in str(exc):
                faults.append(f"{name}: raised ValueError: {str(exc)[:300]}")
            continue  # a layer norm in the caller's graph: refused, and said why
        except Exception as exc:
            faults.append(f"{name}: raised {type(exc).__name__}: {str(exc)[:300]}")
            continue
        expected = refs[what]
        got_list = [_take(t, batch_dims, samples) for t in (got if what == "vgl" else [got])]
        if len(got_list) != len(expected):
            faults.append(f"{name}: {len(got_list)} results for {len(expected)}")
            continue
        for part, (a, e) in enumerate(zip(got_list, expected, strict=True)):
            if (bad := _close(a, e, tolerance)) is not None:
                faults.append(f"{name}[{part}] value: {bad}")
        if name.endswith("no_grad"):
            continue  # nothing to differentiate
        g.manual_seed(7)
        weights = [torch.randn(e.shape, generator=g, dtype=f64) for e in expected]
        if what not in ref_grads:
            ref_grads[what] = _grads(expected, weights, params)
        try:
            got_grads = _grads(got_list, weights, params)
        except RuntimeError as exc:  # (a result whose graph cannot be differentiated)
            faults.append(f"{name}: its parameter gradients raised RuntimeError: {str(exc)[:300]}")
            continue
        for p_index, (a, e) in enumerate(zip(got_grads, ref_grads[what], strict=True)):
            if (bad := _close(a, e, tolerance)) is not None:
                faults.append(f"{name} grad of parameter {p_index} {tuple(e.shape)}: {bad}")
    return faults


def _blows_up(*refs: torch.Tensor) -> bool:
    """Whether a program overflowed (``exp`` of ``exp``): skipped, not compared."""
    return not all(
        bool(r.isfinite().all()) and float(r.detach().abs().amax()) < 1e8 if r.numel() else True
        for r in refs
    )


def fuzz_one(seed: int, which: str = "all") -> list[str]:
    """Every disagreement on the programs of ``seed`` (square and Laplacian), each prefixed by
    the program's text."""
    x, batch_dims, samples = problem(seed)
    d = x.shape[-1]
    faults = []
    where = f"x{tuple(x.shape)} batch_dims={batch_dims} samples={samples}"
    if which in ("all", "square"):
        f = program(seed, d, d, x.shape[:batch_dims])
        for again in range(2 if seed % 3 == 0 else 1):
            if again:  # the same f after an optimiser step, at a new x: nothing kept may be stale
                x = _stepped(f, x)
            found = _square(f, x, batch_dims, samples)
            faults += [f"seed {seed} {where} call {again + 1}\n{f!r}\n  {m}" for m in found]
    if which in ("all", "laplacian"):
        g = torch.Generator().manual_seed(seed)
        scalar = bool(_int(g, 0, 1))
        f = program(
            seed + 500_000, d, 1 if scalar else _int(g, 1, 3), x.shape[:batch_dims], scalar=scalar
        )
        for again in range(2 if seed % 3 == 0 else 1):
            if again:
                x = _stepped(f, x)
            found = _laplacians(f, x, batch_dims, samples)
            faults += [
                f"seed {seed} (laplacian) {where} call {again + 1}\n{f!r}\n  {m}" for m in found
            ]
    return faults


def _stepped(f: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``f``'s parameters moved in place (an optimiser step); a new input like ``x``."""
    with torch.no_grad():
        for p in f.parameters():
            p.mul_(1.1).add_(0.05)
    return x.flip(0) * 0.9 + 0.1


def _square(
    f: nn.Module, x: torch.Tensor, batch_dims: int, samples: list[int], calls: dict | None = None
) -> list[str]:
    """The disagreements of the square operators' ``calls`` (all) on ``samples``."""
    calls = square_calls(x, batch_dims) if calls is None else calls
    jac = reference_jacobian(f, x, batch_dims, samples)
    n = x[(0,) * batch_dims].numel()
    diag = jac.reshape(-1, n, n).diagonal(dim1=1, dim2=2)
    refs = {
        "jac": [jac],
        "diag": [diag.reshape((-1, *x.shape[batch_dims:]))],
        "div": [diag.sum(-1)],
    }
    return [] if _blows_up(jac) else check(f, x, batch_dims, samples, calls, refs)


def _laplacians(
    f: nn.Module, x: torch.Tensor, batch_dims: int, samples: list[int], calls: dict | None = None
) -> list[str]:
    """The disagreements of the Laplacians' ``calls`` (all) on ``samples``."""
    calls = laplacian_calls(x, batch_dims) if calls is None else calls
    y, jac, lap = reference_laplacian(f, x, batch_dims, samples)
    refs = {"lap": [lap], "vgl": [y, jac, lap]}
    return [] if _blows_up(y, jac, lap) else check(f, x, batch_dims, samples, calls, refs)


# --- the sample-mixing watch ---------------------------------------------------------------------

MIXERS = {
    "h - h.mean(0)": lambda s, h: h - h.mean(0, keepdim=True),
    "nn.BatchNorm1d (train mode)": lambda s, h: s.m(h.reshape(-1, h.shape[-1])).reshape(h.shape),
    "torch.roll(h, 1, 0)": lambda s, h: torch.roll(h, 1, 0),
}


def mixed(f: Program, where: int, mixer: str, x: torch.Tensor) -> Program:
    """``f`` with the batch-mixing ``mixer`` spliced in before block ``where`` (``x``: an input,
    for the width there)."""
    blocks = list(f.blocks)
    with torch.no_grad():
        width = Program(blocks[:where])(x).shape[-1]
    norm = nn.BatchNorm1d(width, dtype=f64) if "BatchNorm" in mixer else None
    blocks.insert(where, Block(mixer, MIXERS[mixer], **({} if norm is None else {"m": norm})))
    return Program(blocks, f.scalar)


def _mixes(f: Program, x: torch.Tensor, batch_dims: int) -> bool:
    """Whether some output sample of ``f`` depends on another input sample (autograd, per
    sample: the gradient of sample ``s``'s outputs, weighted by noise, off sample ``s``)."""
    leaf = x.detach().requires_grad_(True)
    y = _plainly(f, leaf)
    count = x.shape[:batch_dims].numel()
    ys = y.reshape(count, -1)
    g = torch.Generator().manual_seed(3)
    for s in range(count):
        weights = torch.randn(ys[s].shape, generator=g, dtype=f64)
        (d,) = torch.autograd.grad(
            (ys[s] * weights).sum(), leaf, retain_graph=True, materialize_grads=True
        )
        off = torch.cat([d.reshape(count, -1)[:s], d.reshape(count, -1)[s + 1 :]])
        if off.numel() and float(off.abs().amax()) > 1e-12:
            return True
    return False


WATCHED = {
    "divergence": lambda f, x, bd: torchdiv.divergence(f, x, batch_dims=bd),
    "jacobian_diagonal": lambda f, x, bd: torchdiv.jacobian_diagonal(f, x, batch_dims=bd),
    "jacobian": lambda f, x, bd: torchdiv.jacobian(f, x, batch_dims=bd),
    "laplacian": lambda f, x, bd: torchdiv.laplacian(f, x, batch_dims=bd),
    "value_grad_laplacian": lambda f, x, bd: torchdiv.value_grad_laplacian(f, x, batch_dims=bd),
    "check_batch_independence": lambda f, x, bd: torchdiv.check_batch_independence(
        f, x, batch_dims=bd
    ),
}


def _said(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def watch_one(seed: int) -> list[str]:
    """The watch on the square program of ``seed`` (a fresh object per call, so that every
    call is a first call): never refused as it is, refused with one mixing op spliced in."""
    x, batch_dims, _ = problem(seed)
    if batch_dims == 0:
        x, batch_dims = x[None], 1
    if x.shape[0] < 2:
        x = torch.cat([x, x.flip(0) + 0.5])
    d = x.shape[-1]
    faults = []
    g = torch.Generator().manual_seed(seed)
    mixer = _pick(g, sorted(MIXERS))
    for op, call in WATCHED.items():
        f = program(seed, d, d, x.shape[:batch_dims])
        try:
            call(f, x, batch_dims)
        except Exception as exc:
            faults.append(f"{op} refused the per-sample program: {_said(exc)}\n{f!r}")
        f = program(seed, d, d, x.shape[:batch_dims])
        m = mixed(f, _int(g, 0, len(f.blocks) - 1), mixer, x)
        if not _mixes(m, x, batch_dims):
            continue  # the mixing washed out (a norm over one feature after it): nothing to see
        try:
            call(m, x, batch_dims)
        except torchdiv.BatchInteractionError:
            pass
        except Exception as exc:
            faults.append(f"{op} raised on a mixing program: {_said(exc)}\n{m!r}")
        else:
            faults.append(f"{op} did not refuse the mixing program x{tuple(x.shape)}\n{m!r}")
    return [f"seed {seed}: {m}" for m in faults]


# --- the tests -----------------------------------------------------------------------------------


def _todays_seeds(count: int) -> list[int]:
    """``count`` seeds of today's date whose problems are small (a few samples: fast)."""
    seeds, seed = [], datetime.date.today().toordinal() * 1000
    while len(seeds) < count:
        if problem(seed)[0].shape[0] <= 4:
            seeds.append(seed)
        seed += 1
    return seeds


@pytest.mark.parametrize("seed", _todays_seeds(2))
def test_todays_programs(seed: int) -> None:
    """A few programs per day (seeds from the date), every operator and method."""
    faults = fuzz_one(seed)
    assert not faults, "\n\n".join(faults)


def _dense(act: nn.Module, d_in: int, out: int, scale: float) -> Program:
    """``Linear(d_in, 4) -> act -> Linear(4, out)``, the first layer's weights times ``scale``."""
    g = torch.Generator().manual_seed(0)
    first, last = _linear(g, d_in, 4), _linear(g, 4, out)
    with torch.no_grad():
        first.weight.mul_(scale)
    return Program(
        [
            Block("Linear", lambda s, h: s.m(h), m=first),
            Block(repr(act), lambda s, h: s.m(h), lambda s, h: plain_activation(s.m, h), m=act),
            Block("Linear", lambda s, h: s.m(h), m=last),
        ]
    )


@pytest.mark.parametrize("act", [nn.CELU(0.1), nn.ELU(), nn.SELU()], ids=repr)
def test_elu_family_gradients_at_large_inputs(act: nn.Module) -> None:
    """The Taylor rule of ``elu`` (``celu``, ``selu``) took ``exp(input_scale x)`` on both
    sides and kept the negative side's by ``where``: above ``709 / input_scale`` (float64;
    ``88.7 / input_scale`` in float32: 8.9 at TorchANI's ``CELU(0.1)``) it overflowed and
    ``where``'s backward gave ``0 * inf = nan``: every parameter gradient of ``"taylor"`` and
    ``"auto"`` Laplacians and of ``"structured"`` divergences was ``nan`` (values right)."""
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=f64)
    f = _dense(act, 2, 2, 2000.0)
    assert float(f.blocks[0](x).detach().amax()) > 710  # exp(x) overflows float64
    assert not _blows_up(f(x))  # (compared, not skipped)
    calls = {k: c for k, c in square_calls(x, 1).items() if "structured" in k}
    assert not _square(f, x, 1, [0, 1, 2], calls)
    f = _dense(act, 2, 1, 2000.0)
    calls = {k: c for k, c in laplacian_calls(x, 1).items() if k.endswith(("/taylor", "/auto"))}
    assert not _laplacians(f, x, 1, [0, 1, 2], calls)


def test_std_of_equal_entries() -> None:
    """``std`` where the entries are equal (zero variance, a constant): the recorders took it as
    ``sqrt(var)`` with ``sqrt``'s rule, infinite at 0, so ``"taylor"``/``"auto"`` Laplacians
    and ``"structured"`` divergences were ``nan`` where PyTorch's derivatives (every other
    engine) are 0. Found by seed 20947."""
    g = torch.Generator().manual_seed(0)
    f = Program(
        [
            Block("h.expand(*h.shape[:-1], 2)", lambda s, h: h.expand(*h.shape[:-1], 2)),
            Block("h.std(-1, keepdim=True)", lambda s, h: h.std(-1, keepdim=True), _plain_std),
            Block("h * p(1) + q(1)", lambda s, h: h * s.p + s.q, p=_param(g, 1), q=_param(g, 1)),
        ]
    )
    x = torch.randn(3, 1, generator=g, dtype=f64)
    calls = {k: c for k, c in square_calls(x, 1).items() if "structured" in k}
    assert not _square(f, x, 1, [0, 1, 2], calls)
    calls = {k: c for k, c in laplacian_calls(x, 1).items() if k.endswith(("/taylor", "/auto"))}
    assert not _laplacians(f, x, 1, [0, 1, 2], calls)


def test_norm_of_a_zero_vector_by_forward_mode() -> None:
    """The 2-norm of a vector that is zero at every ``x`` but depends on the parameters
    (``log_softmax`` over one feature: 0): PyTorch's forward-mode formula was kept at the
    second order, whose derivative there is ``0 / 0``, so the parameter gradients of
    ``"forward"`` divergences, diagonals and Jacobians were ``nan`` (the other engines: 0).
    Found by seed 21171."""
    g = torch.Generator().manual_seed(0)
    f = Program(
        [
            Block("h @ W(1, 1)", lambda s, h: h @ s.w, w=_param(g, 1, 1)),
            Block("log_softmax(h, -1)", lambda s, h: torch.log_softmax(h, -1)),
            Block(
                "h.norm(dim=-1, keepdim=True) + h",
                lambda s, h: h.norm(dim=-1, keepdim=True) + h,
                lambda s, h: _root(h.square().sum(-1, keepdim=True)) + h,
            ),
        ]
    )
    x = torch.randn(2, 1, generator=g, dtype=f64)
    calls = {k: c for k, c in square_calls(x, 1).items() if "forward" in k}
    assert not _square(f, x, 1, [0, 1], calls)


def _finite_gradients(out: torch.Tensor, f: nn.Module) -> bool:
    grads = torch.autograd.grad(out.sum(), list(f.parameters()), materialize_grads=True)
    return bool(out.isfinite().all()) and all(bool(g.isfinite().all()) for g in grads)


_PYTORCHS = "PyTorch's formula (not replaced in _core.modes yet: NOTES_rev-fuzz24.md)"


@pytest.mark.xfail(strict=True, reason=_PYTORCHS)
@pytest.mark.parametrize("method", ["auto", "grad-of-grad", "forward-over-reverse", "hessian"])
def test_gelu_tanh_laplacian_gradients_at_large_inputs(method: str) -> None:
    """``gelu(approximate="tanh")``'s third derivative by PyTorch's formulas is ``nan`` from
    ``|x| >= 13`` in float32 (27 in float64): the parameter gradients of Laplacians by every
    engine of PyTorch's derivatives were ``nan``, ``"auto"``'s too where it takes the loop
    (one input here; ``value_grad_laplacian``'s up to three). The Taylor rule is right."""
    f = _dense(nn.GELU(approximate="tanh"), 1, 1, 20.0).float()
    x = torch.linspace(-1, 1, 4)[:, None]
    assert float(f.blocks[0](x).detach().abs().amax()) > 13
    assert _finite_gradients(torchdiv.laplacian(f, x, method="taylor"), f)
    assert _finite_gradients(torchdiv.laplacian(f, x, method=method), f)


@pytest.mark.xfail(strict=True, reason=_PYTORCHS)
@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
def test_mish_divergence_gradients_at_large_inputs(method: str) -> None:
    """``mish``'s second derivative by PyTorch's formulas is ``nan`` from ``x >= 88.8`` in
    float32: the parameter gradients of exact divergences (and forward-over-reverse, Hessian
    and loop Laplacians' values) were ``nan``; the Taylor and structured rules are right."""
    f = _dense(nn.Mish(), 2, 2, 150.0).float()
    x = torch.linspace(-1, 1, 6).reshape(3, 2)
    assert float(f.blocks[0](x).detach().amax()) > 89
    assert _finite_gradients(torchdiv.divergence(f, x, method="structured"), f)
    assert _finite_gradients(torchdiv.divergence(f, x, method=method), f)


@pytest.mark.slow
@pytest.mark.parametrize("first", [0, 100])
def test_many_programs(first: int) -> None:
    faults = [m for s in range(first, first + 100) for m in fuzz_one(s)]
    assert not faults, "\n\n".join(faults[:10])


@pytest.mark.slow
def test_watch_on_programs() -> None:
    faults = [m for s in range(40) for m in watch_one(s)]
    assert not faults, "\n\n".join(faults[:10])


if __name__ == "__main__":
    first, count = int(sys.argv[1]), int(sys.argv[2])
    mode = sys.argv[3] if len(sys.argv) > 3 else "ops"
    for s in range(first, first + count):
        if s % 100 == 0:
            print(f"at seed {s}", file=sys.stderr, flush=True)
        for message in fuzz_one(s) if mode == "ops" else watch_one(s):
            print(message, "\n", flush=True)
