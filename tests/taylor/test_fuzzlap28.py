"""A differential fuzzer of the Taylor engine's second-order rules (``torchdiv._taylor``, the
forward Laplacian) on seeded random scalar-output programs, PINN- and QMC-style.

A program maps ``(B, n) -> (B,)`` through a chain of blocks on a feature vector, each printed
as one line of code, drawn from: MLP layers with every activation the rules know (kinks
included: ReLU, leaky ReLU, ELU/SELU/CELU, Softplus with a threshold, hardtanh, hardswish,
clamp), products and quotients of two subnetworks, norms ``(h + c).norm(dim=-1)``, ``exp`` /
``log`` / ``sqrt`` / ``pow`` with float exponents, ``atan2``, ``hypot``, ``logaddexp``,
``where``, reductions over features (``sum``, ``mean``, ``logsumexp``, ``prod``, ``amax``),
``cat`` / ``stack`` / indexing, ``einsum``, ``layer_norm``, softmax attention over features
and ``det`` / ``slogdet`` of small per-sample matrices.

Each round compares ``laplacian(method="taylor")`` and ``"auto"``, ``value_grad_laplacian``
(value, gradient and Laplacian) and ``laplacian(coordinates=)`` with float64 per-sample loops
of ``torch.autograd.grad`` (grad of grad, ``create_graph``; conftest's
``laplacian_by_grad_of_grad``), values and the gradients in every parameter of a weighted sum
of them. A round's points are generic (random) or placed on kinks: zero biases, small integer
weights and inputs, a sample at the origin, so that pre-activations are exact integers (0
among them). Each round runs in float64 or float32 (the reference always float64), at
batch 1 or several, and again after an in-place step of the weights (the engine caches the
recorded program).

Run many by hand: ``PYTHONPATH=src python tests/taylor/test_fuzzlap28.py FIRST COUNT``.
"""

from __future__ import annotations

import copy
import math
import re
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import sampled_daily
from fuzzing import pick as _pick
from fuzzing import uniform_int as _int
from torch import nn

import torchdiv

f64 = torch.float64
Fn = Callable[[torch.Tensor], torch.Tensor]


# (code with ``h``, function, smooth) -- a kink round draws every one, a generic round too
# (generic points miss the kinks almost surely)
_ACTIVATIONS: dict[str, Fn] = {
    "torch.tanh(h)": torch.tanh,
    "torch.sigmoid(h)": torch.sigmoid,
    "F.gelu(h)": F.gelu,
    'F.gelu(h, approximate="tanh")': lambda h: F.gelu(h, approximate="tanh"),
    "F.silu(h)": F.silu,
    "F.mish(h)": F.mish,
    "F.softplus(h)": F.softplus,
    "F.softplus(h, 2.0, 1.0)": lambda h: F.softplus(h, 2.0, 1.0),
    "F.logsigmoid(h)": F.logsigmoid,
    "F.elu(h, 0.5)": lambda h: F.elu(h, 0.5),
    "torch.selu(h)": torch.selu,
    "F.celu(h, 2.0)": lambda h: F.celu(h, 2.0),
    "torch.relu(h) ** 2": lambda h: torch.relu(h) ** 2,
    "torch.relu(h)": torch.relu,
    "F.leaky_relu(h, 0.1)": lambda h: F.leaky_relu(h, 0.1),
    "F.hardtanh(h)": F.hardtanh,
    "F.hardswish(h)": F.hardswish,
    "F.hardsigmoid(h)": F.hardsigmoid,
    "F.softsign(h)": F.softsign,
    "torch.sin(h)": torch.sin,
    "torch.cos(h)": torch.cos,
    "torch.exp(-h * h)": lambda h: torch.exp(-h * h),
    "torch.erf(h)": torch.erf,
    "torch.atan(h)": torch.atan,
    "torch.asinh(h)": torch.asinh,
    "h.clamp(-1.0, 1.0)": lambda h: h.clamp(-1.0, 1.0),
    "h * h.abs()": lambda h: h * h.abs(),
    "h.abs() ** 3": lambda h: h.abs() ** 3,
    "torch.cosh(h)": torch.cosh,
}


class Block(nn.Module):
    """One step ``h -> fn(self, h)`` of a program, printed as ``code``."""

    def __init__(self, code: str, fn: Callable[[Block, torch.Tensor], torch.Tensor], **parts: Any):
        super().__init__()
        self.code, self.fn = code, fn
        self.reference = False  # (set on the reference's copy: ``_REFERENCE``'s stand-ins)
        for name, part in parts.items():
            setattr(self, name, part) if isinstance(part, nn.Module) else self.register_buffer(
                name, part
            )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fn(self, h)

    def act(self, code: str, h: torch.Tensor) -> torch.Tensor:
        """The activation ``code`` (the reference's stand-in in the reference)."""
        return (_REFERENCE if self.reference and code in _REFERENCE else _ACTIVATIONS)[code](h)

    def extra_repr(self) -> str:
        return self.code


class Program(nn.Module):
    def __init__(self, blocks: list[Block], head: nn.Parameter) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for block in self.blocks:
            h = block(h)
        return (h * self.head).sum(-1) + 0.25 * (h * h).sum(-1)


class Draw:
    """The parameters of one program: generic (Gaussian, scaled) or on kinks (small integers,
    zero biases)."""

    def __init__(self, g: torch.Generator, kink: bool) -> None:
        self.g, self.kink = g, kink

    def weight(self, *shape: int) -> nn.Parameter:
        if self.kink:  # small integers: every pre-activation at an integer input is an integer
            w = torch.randint(-1, 2, shape, generator=self.g).to(f64)
        else:
            w = torch.randn(*shape, generator=self.g, dtype=f64) / math.sqrt(shape[-1])
        return nn.Parameter(w)

    def bias(self, *shape: int) -> nn.Parameter:
        if self.kink:
            return nn.Parameter(torch.zeros(*shape, dtype=f64))
        return nn.Parameter(torch.randn(*shape, generator=self.g, dtype=f64) * 0.3)

    def linear(self, k: int, k2: int) -> nn.Linear:
        lin = nn.Linear(k, k2, dtype=f64)
        lin.weight, lin.bias = self.weight(k2, k), self.bias(k2)
        return lin

    def activation(self) -> str:
        return _pick(self.g, sorted(_ACTIVATIONS))


def _hardsigmoid(h: torch.Tensor) -> torch.Tensor:
    """``F.hardsigmoid`` by its formula, for the reference (PyTorch has no derivative of
    ``hardsigmoid_backward``): ``h / 6 + 1 / 2`` on ``(-3, 3)``, open as its kernel's
    derivative is (0 at the kinks), 0 below and 1 above."""
    inside = (h > -3) & (h < 3)
    return torch.where(inside, h / 6 + 0.5, (h >= 3).to(h.dtype))


# the reference's stand-ins for ops whose second derivative PyTorch lacks
_REFERENCE = {"F.hardsigmoid(h)": _hardsigmoid}


def _on(code: str, inner: str) -> str:
    """``code`` with its variable ``h`` replaced by ``inner``."""
    return re.sub(r"\bh\b", inner, code)


def _dense(d: Draw, k: int) -> tuple[Block, int]:
    k2 = _int(d.g, 2, 5)
    code = d.activation()
    return Block(_on(code, "lin(h)"), lambda m, h: m.act(code, m.lin(h)), lin=d.linear(k, k2)), k2


def _two(d: Draw, k: int) -> tuple[Block, int]:
    """Products and quotients of two subnetworks."""
    k2 = _int(d.g, 2, 4)
    ca, cb = d.activation(), d.activation()
    kind = _int(d.g, 0, 2)
    parts = {"la": d.linear(k, k2), "lb": d.linear(k, k2)}
    la, lb = _on(ca, "la(h)"), _on(cb, "lb(h)")
    if kind == 0:
        return Block(
            f"{la} * {lb}", lambda m, h: m.act(ca, m.la(h)) * m.act(cb, m.lb(h)), **parts
        ), k2
    if kind == 1:
        return Block(
            f"{la} / (1 + ({lb}) ** 2)",
            lambda m, h: m.act(ca, m.la(h)) / (1 + m.act(cb, m.lb(h)) ** 2),
            **parts,
        ), k2
    return Block(
        f"{la} * ({lb}).sum(-1, keepdim=True)",
        lambda m, h: m.act(ca, m.la(h)) * m.act(cb, m.lb(h)).sum(-1, keepdim=True),
        **parts,
    ), k2


def _norm(d: Draw, k: int) -> tuple[Block, int]:
    c = torch.full((k,), 0.5, dtype=f64) if d.kink else torch.randn(k, generator=d.g, dtype=f64)
    kind = _int(d.g, 0, 3)
    if kind == 0:
        code, fn = (
            "cat([h, (h + c).norm(dim=-1, keepdim=True)])",
            lambda m, h: torch.cat([h, (h + m.c).norm(dim=-1, keepdim=True)], -1),
        )
        return Block(code, fn, c=c), k + 1
    if kind == 1:
        return Block(
            "h * torch.exp(-(h + c).norm(dim=-1, keepdim=True))",
            lambda m, h: h * torch.exp(-(h + m.c).norm(dim=-1, keepdim=True)),
            c=c,
        ), k
    if kind == 2:
        return Block(
            "h / (1 + (h + c).pow(2).sum(-1, keepdim=True)).sqrt()",
            lambda m, h: h / (1 + (h + m.c).pow(2).sum(-1, keepdim=True)).sqrt(),
            c=c,
        ), k
    return Block(
        "cat([h, torch.linalg.vector_norm(h + c, 3.0, -1, keepdim=True)])",
        lambda m, h: torch.cat([h, torch.linalg.vector_norm(h + m.c, 3.0, -1, keepdim=True)], -1),
        c=c,
    ), k + 1


def _powers(d: Draw, k: int) -> tuple[Block, int]:
    p = _pick(d.g, [0.5, 1.5, -0.5, 2.5, -1.5, 3.0, 0.75])
    options: list[tuple[str, Callable[[Block, torch.Tensor], torch.Tensor]]] = [
        (f"(h * h + 0.5).pow({p})", lambda m, h: (h * h + 0.5).pow(p)),
        ("torch.sqrt(h * h + 0.3)", lambda m, h: torch.sqrt(h * h + 0.3)),
        ("torch.log(h * h + 0.7)", lambda m, h: torch.log(h * h + 0.7)),
        ("torch.exp(0.5 * h)", lambda m, h: torch.exp(0.5 * h)),
        ("torch.log1p(torch.exp(h))", lambda m, h: torch.log1p(torch.exp(h))),
        ("torch.rsqrt(1 + h * h)", lambda m, h: torch.rsqrt(1 + h * h)),
        ("1 / (1.5 + torch.cos(h))", lambda m, h: 1 / (1.5 + torch.cos(h))),
        (f"2.0 ** h.tanh() + h ** {p}", lambda m, h: 2.0 ** h.tanh() + (h * h + 1) ** p),
        ("torch.expm1(h.tanh()) * h", lambda m, h: torch.expm1(h.tanh()) * h),
    ]
    code, fn = _pick(d.g, options)
    return Block(code, fn), k


def _binary(d: Draw, k: int) -> tuple[Block, int]:
    lin = d.linear(k, k)
    shift = 0.5 if d.kink else 0.0  # (atan2 and hypot are singular at (0, 0))
    options: list[tuple[str, Callable[[Block, torch.Tensor], torch.Tensor]]] = [
        ("torch.atan2(h, lin(h) + s)", lambda m, h: torch.atan2(h, m.lin(h) + shift)),
        ("torch.hypot(h, lin(h) + s)", lambda m, h: torch.hypot(h, m.lin(h) + shift)),
        ("torch.logaddexp(h, lin(h))", lambda m, h: torch.logaddexp(h, m.lin(h))),
        ("torch.maximum(h, lin(h))", lambda m, h: torch.maximum(h, m.lin(h))),
        ("torch.minimum(h, lin(h)) ** 2", lambda m, h: torch.minimum(h, m.lin(h)) ** 2),
    ]
    code, fn = _pick(d.g, options)
    return Block(code, fn, lin=lin), k


def _where(d: Draw, k: int) -> tuple[Block, int]:
    ca, cb = d.activation(), d.activation()
    kind = _int(d.g, 0, 2)
    if kind == 0:
        return Block(
            f"torch.where(h > 0, {ca}, {cb})",
            lambda m, h: torch.where(h > 0, m.act(ca, h), m.act(cb, h)),
        ), k
    if kind == 1:
        return Block("h.clamp(min=-0.5) * h", lambda m, h: h.clamp(min=-0.5) * h), k
    return Block("torch.clamp(h, -1.0, 2.0) ** 3", lambda m, h: torch.clamp(h, -1.0, 2.0) ** 3), k


def _reduce(d: Draw, k: int) -> tuple[Block, int]:
    options: list[tuple[str, Callable[[Block, torch.Tensor], torch.Tensor]]] = [
        ("h - h.mean(-1, keepdim=True)", lambda m, h: h - h.mean(-1, keepdim=True)),
        ("h * h.sum(-1, keepdim=True)", lambda m, h: h * h.sum(-1, keepdim=True)),
        ("h - h.logsumexp(-1, keepdim=True)", lambda m, h: h - h.logsumexp(-1, keepdim=True)),
        (
            "cat([h, h.tanh().prod(-1, keepdim=True)])",
            lambda m, h: torch.cat([h, h.tanh().prod(-1, keepdim=True)], -1),
        ),
        ("h.sin() * h.amax(-1, keepdim=True)", lambda m, h: h.sin() * h.amax(-1, keepdim=True)),
        ("h * h.var(-1, keepdim=True)", lambda m, h: h * h.var(-1, keepdim=True)),
        ("F.softmax(h, -1) * h", lambda m, h: F.softmax(h, -1) * h),
    ]
    code, fn = _pick(d.g, options)
    grows = code.startswith("cat")
    return Block(code, fn), k + int(grows)


def _move(d: Draw, k: int) -> tuple[Block, int]:
    idx = torch.randint(0, k, (_int(d.g, 1, 3),), generator=d.g)
    kind = _int(d.g, 0, 3)
    if kind == 0:
        return Block(
            "cat([h, h[:, idx] ** 2], -1)",
            lambda m, h: torch.cat([h, h[:, m.idx] ** 2], -1),
            idx=idx,
        ), k + len(idx)
    if kind == 1:
        return Block(
            "stack([h, h.flip(-1).tanh()], -1).prod(-1)",
            lambda m, h: torch.stack([h, h.flip(-1).tanh()], -1).prod(-1),
        ), k
    if kind == 2:
        return Block(
            "cat([h[:, ::2].sin(), h[:, 1:]], -1)",
            lambda m, h: torch.cat([h[:, ::2].sin(), h[:, 1:]], -1),
        ), (k + 1) // 2 + k - 1
    return Block("h.roll(1, -1) * h", lambda m, h: h.roll(1, -1) * h), k


def _einsum(d: Draw, k: int) -> tuple[Block, int]:
    k2 = _int(d.g, 2, 4)
    w = d.weight(k, k2)
    if _int(d.g, 0, 1):
        return Block(
            'torch.einsum("bi,ij->bj", h, W).tanh()',
            lambda m, h: torch.einsum("bi,ij->bj", h, m.W.p).tanh(),
            W=_Holder(w),
        ), k2
    return Block(
        'torch.einsum("bi,ij,bj->b", h, W, h[:, :k2])[:, None] * h',
        lambda m, h: torch.einsum("bi,ij,bj->b", h, m.W.p[:, : h.shape[1]], h)[:, None] * h,
        W=_Holder(d.weight(k, k)),
    ), k


class _Holder(nn.Module):
    def __init__(self, p: nn.Parameter) -> None:
        super().__init__()
        self.p = p


def _composite_layer_norm(m: Block, h: torch.Tensor) -> torch.Tensor:
    """``F.layer_norm`` by its formula, for the reference: the fused kernel's third derivative
    is wrong (pytorch/pytorch#175754, ``docs/guide/limitations.md``): the loop's parameter
    gradients of a Laplacian through it were off by up to 60%, the engine's agree with
    central differences."""
    centred = h - h.mean(-1, keepdim=True)
    rstd = torch.rsqrt(centred.square().mean(-1, keepdim=True) + 1e-5)
    return centred * rstd * m.w.p + m.b.p


def _layer_norm(d: Draw, k: int) -> tuple[Block, int]:
    """Layer norm of ``h + c``: on kinks ``c`` spreads the features apart (an integer ``h``
    with equal features has variance 0, where the Laplacian is 0 up to round-off that
    ``1 / sqrt(eps)`` amplifies: the loop's parameter gradients there were noise, 3e-2)."""
    w = nn.Parameter(1 + 0.3 * torch.randn(k, generator=d.g, dtype=f64))
    c = 0.37 * torch.arange(k, dtype=f64) if d.kink else torch.zeros(k, dtype=f64)

    def fn(m: Block, h: torch.Tensor) -> torch.Tensor:
        if m.reference:
            return _composite_layer_norm(m, h + m.c)
        return F.layer_norm(h + m.c, (h.shape[-1],), m.w.p, m.b.p)

    code = "F.layer_norm(h + c, (k,), w, b)"
    return Block(code, fn, w=_Holder(w), b=_Holder(d.bias(k)), c=c), k


def _attention(d: Draw, k: int) -> tuple[Block, int]:
    """Softmax attention over ``t`` tokens of ``e`` features made from the feature vector."""
    t, e = _int(d.g, 2, 3), _int(d.g, 1, 2)

    def fn(m: Block, h: torch.Tensor) -> torch.Tensor:
        q, kk, v = (lin(h).unflatten(-1, (t, e)) for lin in (m.q, m.k, m.v))
        att = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(e), -1)
        return (att @ v).flatten(1)

    return Block(
        "softmax(q k^T / sqrt(e)) v, (t, e) tokens",
        fn,
        q=d.linear(k, t * e),
        k=d.linear(k, t * e),
        v=d.linear(k, t * e),
    ), t * e


def _det(d: Draw, k: int) -> tuple[Block, int]:
    s = _int(d.g, 2, 3)
    eye = torch.eye(s, dtype=f64) * 2
    kind = _int(d.g, 0, 2)

    def mat(m: Block, h: torch.Tensor) -> torch.Tensor:
        return m.lin(h).unflatten(-1, (s, s)) + m.eye

    if kind == 0:
        code = "cat([h, det(lin(h).unflatten(-1, (s, s)) + 2 I)[:, None]])"
        fn = lambda m, h: torch.cat([h, torch.linalg.det(mat(m, h))[:, None]], -1)  # noqa: E731
    elif kind == 1:
        code = "cat([h, slogdet(lin(h).unflatten(-1, (s, s)) + 2 I).logabsdet[:, None]])"
        fn = lambda m, h: torch.cat(  # noqa: E731
            [h, torch.linalg.slogdet(mat(m, h)).logabsdet[:, None]], -1
        )
    else:
        code = "cat([h, logdet(M M^T + I)[:, None]])"
        fn = lambda m, h: torch.cat(  # noqa: E731
            [h, torch.logdet(mat(m, h) @ mat(m, h).mT + m.eye / 2)[:, None]], -1
        )
    lin = d.linear(k, s * s)
    if d.kink:  # an integer matrix far from singular at integer inputs is not promised
        with torch.no_grad():
            lin.weight.mul_(0.25)
    return Block(code, fn, lin=lin, eye=eye), k + 1


def _more(d: Draw, k: int) -> tuple[Block, int]:
    """Sorting, cumulative and statistics ops, tensor powers and special functions."""
    options: list[tuple[str, Callable[[Block, torch.Tensor], torch.Tensor]]] = [
        ("h.sort(-1).values * h.tanh()", lambda m, h: h.sort(-1).values * h.tanh()),
        ("h.topk(2, -1).values.sum(-1, keepdim=True) * h", _topk),
        ("torch.cumsum(h, -1).sin()", lambda m, h: torch.cumsum(h, -1).sin()),
        ("torch.cumprod(h.tanh() + 1.5, -1)", lambda m, h: torch.cumprod(h.tanh() + 1.5, -1)),
        ("h * h.std(-1, keepdim=True)", lambda m, h: h * (h + m.c).std(-1, keepdim=True)),
        ("F.log_softmax(h, -1)", lambda m, h: F.log_softmax(h, -1)),
        ("torch.erfc(h) * torch.sinh(0.5 * h)", lambda m, h: torch.erfc(h) * torch.sinh(0.5 * h)),
        ("(h.tanh() + 2) ** (h.sin() + 1.5)", lambda m, h: (h.tanh() + 2) ** (h.sin() + 1.5)),
        ("torch.xlogy(h, h * h + 1)", lambda m, h: torch.xlogy(h, h * h + 1)),
        ("h * h.median(-1, keepdim=True).values", lambda m, h: h * _median(h)),
        ("torch.remainder(h, 2.5) * h", lambda m, h: torch.remainder(h, 2.5) * h),
        ("torch.asin(torch.tanh(h) * 0.9)", lambda m, h: torch.asin(torch.tanh(h) * 0.9)),
    ]
    code, fn = _pick(d.g, options)
    return Block(code, fn, c=0.37 * torch.arange(k, dtype=f64)), k


def _topk(m: Block, h: torch.Tensor) -> torch.Tensor:
    return h.topk(min(2, h.shape[-1]), -1).values.sum(-1, keepdim=True) * h


def _median(h: torch.Tensor) -> torch.Tensor:
    return h.median(-1, keepdim=True).values


def _solve(d: Draw, k: int) -> tuple[Block, int]:
    """``solve``, ``inv`` and ``cholesky`` of a per-sample ``M = lin(h) + 3 I`` (``(k, k)``)."""
    lin = d.linear(k, k * k)
    with torch.no_grad():
        lin.weight.mul_(0.3)
    eye = torch.eye(k, dtype=f64) * 3

    def mat(m: Block, h: torch.Tensor) -> torch.Tensor:
        return m.lin(h).unflatten(-1, (k, k)) + m.eye

    options: list[tuple[str, Callable[[Block, torch.Tensor], torch.Tensor]]] = [
        ("solve(M, h)", lambda m, h: torch.linalg.solve(mat(m, h), h)),
        ("inv(M) @ h", lambda m, h: (torch.linalg.inv(mat(m, h)) @ h[..., None])[..., 0]),
        (
            "cholesky(M M^T) @ h",
            lambda m, h: (torch.linalg.cholesky(mat(m, h) @ mat(m, h).mT) @ h[..., None])[..., 0],
        ),
    ]
    code, fn = _pick(d.g, options)
    return Block(code, fn, lin=lin, eye=eye), k


_KINDS = {
    "more": _more,
    "solve": _solve,
    "dense": _dense,
    "two": _two,
    "norm": _norm,
    "powers": _powers,
    "binary": _binary,
    "where": _where,
    "reduce": _reduce,
    "move": _move,
    "einsum": _einsum,
    "layer_norm": _layer_norm,
    "attention": _attention,
    "det": _det,
}


def draw_program(seed: int) -> tuple[Program, dict[str, Any]]:
    """A program and the round's settings (dtype, kink, n, batch sizes), all from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    kink = bool(_int(g, 0, 2) == 0)
    d = Draw(g, kink)
    n = _int(g, 2, 4)
    k = n
    blocks = [_dense(d, k)]  # first an MLP layer (every program a PINN's start)
    k = blocks[0][1]
    for _ in range(_int(g, 1, 3)):
        kind = _pick(g, sorted(_KINDS))
        block, k = _KINDS[kind](d, k)
        blocks.append((block, k))
        if k > 8:
            block, k = _dense(d, k)
            blocks.append((block, k))
    head = nn.Parameter(torch.randn(k, generator=g, dtype=f64))
    settings = {
        "kink": kink,
        "n": n,
        "dtype": _pick(g, [torch.float64, torch.float64, torch.float32]),
        "batch": _pick(g, [1, 3, 5]),
        "seed": seed,
        "biharmonic": _int(g, 0, 3) == 0,  # (fourth order: n^2 + n grads of grads, slower)
    }
    return Program([b for b, _ in blocks], head), settings


def _points(settings: dict[str, Any], g: torch.Generator, batch: int) -> torch.Tensor:
    n = settings["n"]
    if settings["kink"]:
        x = torch.randint(-1, 2, (batch, n), generator=g).to(f64)
        x[0] = 0.0  # the origin: every zero-bias pre-activation at its kink
        return x
    return torch.randn(batch, n, generator=g, dtype=f64)


# ops ``method="taylor"`` refuses by name (``"auto"`` then falls back, checked instead)
REFUSED = (
    "aten.linalg_vector_norm with ord=3.0",
    "aten.pow.Tensor_Tensor",
    "aten.median.dim",
    "aten.linalg_solve_triangular",  # (the biharmonic of cholesky: its rule's solve)
)


def _loop(model: nn.Module, x: torch.Tensor, coordinates: list[int] | None):
    """Value, gradient and Laplacian (over ``coordinates``) by grad-of-grad loops (the whole
    batch per grad: samples are independent), differentiable in the parameters (and in
    ``x`` where it requires grad)."""
    z = x if x.requires_grad else x.detach().requires_grad_()
    value = model(z)
    (grad,) = torch.autograd.grad(value.sum(), z, create_graph=True)
    total = torch.zeros(len(z), dtype=z.dtype)
    for i in coordinates if coordinates is not None else range(z.shape[1]):
        (column,) = torch.autograd.grad(grad[:, i].sum(), z, create_graph=True)
        total = total + column[:, i]
    return value, grad, total


def _weighted_loop(model: nn.Module, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``tr(S^T H S) = sum_k s_k^T H s_k`` (the columns ``s_k`` of ``sigma``) by loops."""
    z = x.detach().requires_grad_()
    (grad,) = torch.autograd.grad(model(z).sum(), z, create_graph=True)
    total = torch.zeros(len(z), dtype=z.dtype)
    for s in sigma.T:
        (hs,) = torch.autograd.grad((grad @ s).sum(), z, create_graph=True)
        total = total + hs @ s
    return total


def _biharmonic_loop(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``Δ²f``: the grad-of-grad loop of the grad-of-grad loop's Laplacian."""
    z = x.detach().requires_grad_()
    lap = _loop(model, z, None)[2]
    unused = {"allow_unused": True, "materialize_grads": True}  # (a cubic's: none left)
    (grad,) = torch.autograd.grad(lap.sum(), z, create_graph=True, **unused)
    total = torch.zeros(len(z), dtype=z.dtype)
    for i in range(z.shape[1]):
        (column,) = torch.autograd.grad(grad[:, i].sum(), z, create_graph=True, **unused)
        total = total + column[:, i]
    return total


def _parameter_gradients(out: torch.Tensor, model: nn.Module) -> dict[str, torch.Tensor]:
    ps = dict(model.named_parameters())
    gs = torch.autograd.grad(out, list(ps.values()), allow_unused=True, retain_graph=True)
    return {
        n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(ps.items(), gs, strict=True)
    }


def _quantities(
    model: nn.Module, x: torch.Tensor, engine: bool, biharmonic: bool
) -> dict[str, torch.Tensor]:
    """Everything a round compares, by the engine (``engine``) or by the loops: the
    Laplacians (all, some ``coordinates``, weighted by ``sigma sigma^T``, and the biharmonic
    where ``biharmonic``) and ``value_grad_laplacian``'s parts, and the gradients in every
    parameter of a weighted sum of each."""
    n = x.shape[1]
    coords = [0] if n == 2 else [0, n - 1]
    cot = torch.linspace(-1.0, 2.0, len(x), dtype=x.dtype)
    w = torch.linspace(0.5, 1.5, n, dtype=x.dtype)
    sigma = torch.linspace(-1.0, 1.0, 2 * n, dtype=x.dtype).reshape(n, 2)  # (a diffusion's factor)
    out: dict[str, torch.Tensor] = {}
    if engine:

        def taylor(api: Callable[..., Any], **options: Any) -> Any:
            """``api(model, x, method="taylor")``, or ``"auto"``'s where ``"taylor"`` refuses
            an op of ``REFUSED`` by name (loudly: any other refusal fails the round)."""
            try:
                return api(model, x, method="taylor", **options)
            except NotImplementedError as e:
                assert any(op in str(e) for op in REFUSED), e
                return api(model, x, method="auto", **options)

        laps = {
            "laplacian taylor": taylor(torchdiv.laplacian),
            "laplacian auto": torchdiv.laplacian(model, x, method="auto"),
            "laplacian taylor coordinates": taylor(torchdiv.laplacian, coordinates=coords),
            "weighted_laplacian taylor": taylor(torchdiv.weighted_laplacian, sigma=sigma),
        }
        if biharmonic:
            laps["biharmonic taylor"] = taylor(torchdiv.biharmonic)
        vgl = taylor(torchdiv.value_grad_laplacian)
        parts = vgl.value, vgl.gradient, vgl.laplacian
    else:
        parts = _loop(model, x, None)
        laps = {f"laplacian {m}": parts[2] for m in ("taylor", "auto")}
        laps["laplacian taylor coordinates"] = _loop(model, x, coords)[2]
        laps["weighted_laplacian taylor"] = _weighted_loop(model, x, sigma)
        if biharmonic:
            laps["biharmonic taylor"] = _biharmonic_loop(model, x)
    for name, lap in laps.items():
        out[name] = lap
        for p, g in _parameter_gradients(lap @ cot, model).items():
            out[f"{name} d/d{p}"] = g
    value, grad, lap = parts
    out |= {"vgl value": value, "vgl gradient": grad, "vgl laplacian": lap}
    loss = lap @ cot + (grad * w).sum() + value.sum()
    for p, g in _parameter_gradients(loss, model).items():
        out[f"vgl d/d{p}"] = g
    return {k: v.detach() for k, v in out.items()}


def _check(model: Program, x: torch.Tensor, label: str, biharmonic: bool) -> None:
    """The engine's quantities against float64 loops. float64: within 1e-8 of the largest
    entry of each (a few hundred flops of depth; some programs' second derivatives reach
    1e3). float32: within 1e-3 of it (eps 1.2e-7 times the growth of round-off through
    divisions, norms and det's cofactors) plus twice the error of the same loops run in
    float32: a saturated ``tanh`` (``1 - y^2`` at ``y = 0.9999998``) loses most digits in
    every float32 method alike. Both plus 5e-7: where the Laplacian is 0 but its parts are
    not (integer points, attention, a layer norm), the float64 loop's own round-off reached
    1.2e-7 in parameter gradients (seed 349: the loop, ``"hessian"`` and the engine apart by
    that much, central differences mere noise)."""
    dtype = next(model.parameters()).dtype
    reference = copy.deepcopy(model).to(f64)
    for block in reference.blocks:
        block.reference = True
    want = _quantities(reference, x, False, biharmonic)
    got = _quantities(model, x.to(dtype), True, biharmonic)
    slack = {k: torch.zeros((), dtype=f64) for k in want}
    # float64: PyTorch's hardsigmoid backward multiplies by 1/6 rounded to float32 (relative
    # 3e-8 off) and the engine by 1/6: parameter gradients of a Laplacian mix both
    tol = 1e-7 if "hardsigmoid" in str(model) else 1e-8
    # fourth and fifth derivatives by autograd's formulas lose more digits (seed 32: the
    # loop 1.5e-7 off the biharmonic's parameter gradients, "taylor" and
    # "forward-over-reverse" within 1e-15 of each other)
    tolerances = {name: 1e-6 if "biharmonic" in name else tol for name in want}
    if dtype != f64:
        tolerances = dict.fromkeys(want, 1e-3)
        in_dtype = copy.deepcopy(reference).to(dtype)
        loop = _quantities(in_dtype, x.to(dtype), False, biharmonic)
        slack = {k: 2 * (loop[k].to(f64) - want[k]).abs() for k in want}
    for name, expected in want.items():
        scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
        if " d/d" in name:  # a parameter gradient, of a quantity of ``base``'s size: its
            # round-off scales with that (seed 387: a gradient of 14 of a weighted Laplacian
            # of 2.4e6, where the loop, "taylor" and "forward-over-reverse" differ by 1e-7)
            base = want[name.split(" d/d")[0].replace("vgl", "vgl laplacian")]
            scale = max(scale, 1e-3 * float(base.abs().max()))
        error = (got[name].to(f64) - expected).abs() - slack[name]
        worst = float(error.max()) if expected.numel() else 0.0
        assert math.isfinite(worst) and worst <= tolerances[name] * scale + 5e-7, (
            f"{label} {name}: error {worst:.3g} past the loops' (scale {scale:.3g})\n"
            f" got {got[name]}\nwant {expected}"
        )


def run_round(seed: int) -> None:
    """Check one program: as drawn, after an in-place weight step, at another batch size."""
    model, settings = draw_program(seed)
    model = model.to(settings["dtype"])
    g = torch.Generator().manual_seed(10_000 + seed)
    label = f"seed {seed} {settings} program:\n{model}\n"
    x = _points(settings, g, settings["batch"])
    _check(model, x, label + "as drawn", settings["biharmonic"])
    with torch.no_grad():  # an in-place optimizer step (kinks: integers stay integers)
        for p in model.parameters():
            step = (
                torch.randint(-1, 2, p.shape, generator=g)
                if settings["kink"]
                else (0.05 * torch.randn(p.shape, generator=g, dtype=f64))
            )
            p.add_(step.to(p.dtype) * (p != 0) if settings["kink"] else step.to(p.dtype))
    _check(model, x, label + "after a step", settings["biharmonic"])
    other = 4 if settings["batch"] == 1 else 1
    _check(model, _points(settings, g, other), label + f"batch {other}", settings["biharmonic"])


# ---- the faults the fuzzer found, minimised ----


@pytest.mark.parametrize("op", [torch.maximum, torch.minimum])
def test_a_tie_of_maximum_splits_the_value_s_derivatives_in_halves(op: Callable) -> None:
    """At ``h == 0`` (zero biases at the origin) ``maximum(h, 0)`` has autograd's derivative
    1/2 in ``h``; the engine took its value from the zero alone, so the gradient (a first
    derivative) and the Laplacian (``x`` times it) had parameter gradients 0, not the
    loop's. Seed 93 of the fuzzer (``minimum(h, lin(h)) ** 2`` after ``maximum``)."""
    b = torch.zeros(2, dtype=f64, requires_grad=True)
    x = torch.zeros(3, 2, dtype=f64)
    x[1:] = torch.tensor([[1.0, -2.0], [0.0, 0.5]], dtype=f64)  # (only the origin ties)

    def f(z: torch.Tensor) -> torch.Tensor:
        return (op(z + b, torch.zeros_like(z)) * (z * z).sum(-1, keepdim=True)).sum(-1)

    value, grad, lap = _loop(f, x, None)  # type: ignore[arg-type]
    out = torchdiv.value_grad_laplacian(f, x, method="taylor")
    cot = torch.tensor([1.0, 0.5, -1.5], dtype=f64)
    unused = {"retain_graph": True, "allow_unused": True, "materialize_grads": True}
    for got, want in ((out.laplacian, lap), (out.gradient, grad), (out.value, value)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        expected = torch.autograd.grad((want.movedim(0, -1) @ cot).sum(), b, **unused)[0]
        actual = torch.autograd.grad((got.movedim(0, -1) @ cot).sum(), b, **unused)[0]
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    got = torchdiv.laplacian(f, x, method="taylor")
    expected = torch.autograd.grad(lap @ cot, b)[0]
    torch.testing.assert_close(torch.autograd.grad(got @ cot, b)[0], expected)


def test_tanh_gelu_has_its_fourth_derivative_at_zero() -> None:
    """The tanh GELU rule's ``sech^2 u`` through ``|u|``: its own second derivative at
    ``u = 0`` was lost (``sign(0) = 0``), and the biharmonic by Taylor in Taylor at ``x = 0``
    read -0.588 for -1.604 (central differences of the loop's second derivative: -1.6037,
    float64, step 1e-3). Seeds 7 and 255 (zero biases at the origin)."""
    x = torch.tensor([[-1.3], [0.0], [0.4], [2.1]], dtype=f64)
    w = torch.ones(1, dtype=f64, requires_grad=True)

    def f(z: torch.Tensor) -> torch.Tensor:
        return F.gelu(z * w, approximate="tanh").sum(-1)

    expected = _biharmonic_loop(f, x)  # type: ignore[arg-type]
    got = torchdiv.biharmonic(f, x, method="taylor")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        torch.autograd.grad(got.sum(), w)[0], torch.autograd.grad(expected.sum(), w)[0]
    )


FAST = list(range(12))  # (about 2 s in all)
SLOW = range(12, 412, 40)  # 400 more, 40 to a test (several seconds each)
# seed 3 in the daily sample of slow tests: 1.4 s alone, as much as the other eleven together
# (a float32 biharmonic of four blocks: mish, mish, ``solve``, ``2.0 ** h.tanh() + h ** 0.5``).
# What it reaches is checked always elsewhere: the float32 biharmonic by seed 7, ``solve``'s
# Laplacian and gradients in tests/taylor/test_linalg_rules.py, mish's in
# tests/taylor/test_in_place_activations.py and tests/laplacian/test_laplacian.py, powers in
# tests/taylor/test_power.py
DAILY = {3}


@pytest.mark.parametrize("seed", sampled_daily(FAST, DAILY))
def test_fuzz(seed: int) -> None:
    run_round(seed)


@pytest.mark.slow
@pytest.mark.parametrize("first", SLOW)
def test_fuzz_slow(first: int) -> None:
    failed = []
    for seed in range(first, first + 40):
        try:
            run_round(seed)
        except AssertionError as e:
            failed.append(f"{e}"[:2000])
    assert not failed, "\n\n".join(failed)


if __name__ == "__main__":
    first, count = int(sys.argv[1]), int(sys.argv[2])
    failed = []
    for s in range(first, first + count):
        try:
            run_round(s)
        except Exception as e:
            failed.append(s)
            print(f"=== seed {s}: {type(e).__name__}: {str(e)[:3000]}\n")
    print("failed:", failed)
