"""A differential fuzzer of the structured engine (``torchdiv._structured``) on random programs
of the ops it has rules for, above all data movement whose arguments change between calls at
the same shapes.

The structured engine records one call of ``f`` and keeps its structure (``_taylor.cache``)
and the 0/1 matrices of data-movement ops keyed by shapes (``_structured.factors``): an index
tensor, a bool mask, a shift or a permutation that changes between calls while the shapes stay
must still be read from each call. fuzz24 drew chains of feature blocks and fuzz27 MLP chains;
here a program works on a ``(B, C, L)`` tensor (``L = H x W`` for 2-D ops), drawn from: linear
maps (``Linear``, ``matmul``, ``einsum``, ``bmm``), ``conv1d``/``conv2d`` (stride, padding,
dilation, groups), norms (layer, group, batch norm in eval mode), attention (``softmax``,
``scaled_dot_product_attention`` with a bool mask), elementwise ops, reductions, and data
movement: ``cat``/``stack``/``split``/``chunk``/``narrow``, slices with steps,
``index_select``/``gather``/``scatter``/``take``/``index`` by integer or bool tensors,
``permute``/``transpose``/``reshape``/``unflatten``/``expand``/``repeat``/``roll``/``flip``/
``pad``/``unfold``/``pixel_shuffle``. Each block prints as one line of code.

Every round checks ``divergence`` and ``jacobian_diagonal`` (``"structured"`` and ``"auto"``)
and ``jacobian`` (``"auto"``) against a float64 per-sample loop of ``torch.autograd.grad``
(one grad per sample and output, ``create_graph``), values and the gradients of a weighted sum
of the result in every parameter. Rounds on the same model object: as drawn; with the varying
arguments redrawn (same shapes); redrawn again after an in-place step of the weights; at
another batch size (1 or several); and redrawn at the first size again.

Run many by hand: ``PYTHONPATH=src python tests/stacks/test_fuzz28.py FIRST COUNT``.
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
from conftest import in_todays_sample
from fuzzing import far, taken_paths
from fuzzing import pick as _pick
from fuzzing import randn as _randn
from fuzzing import uniform_int as _int
from torch import nn

import torchdiv
from torchdiv import _structured
from torchdiv._structured import colors, cycle, factors, forward

f64 = torch.float64
BMAX = 16  # the most samples a round uses (per-sample index buffers are made this tall)
WIDEST = 40  # elements per sample carried between blocks


def _divisors(k: int) -> list[int]:
    return [d for d in range(1, k + 1) if k % d == 0]


def _grid(length: int) -> tuple[int, int] | None:
    """``(H, W)`` with ``H x W = length``, both at least 2, as square as can be."""
    pairs = [(h, length // h) for h in range(2, length) if length % h == 0 and length // h >= 2]
    return None if not pairs else min(pairs, key=lambda p: abs(p[0] - p[1]))


def _mask(g: torch.Generator, shape: tuple[int, ...], count: int) -> torch.Tensor:
    """A bool tensor of ``shape`` with exactly ``count`` entries set, at random places."""
    flat = torch.zeros(math.prod(shape), dtype=torch.bool)
    flat[torch.randperm(flat.numel(), generator=g)[:count]] = True
    return flat.reshape(shape)


def _perm_rows(g: torch.Generator, *shape: int) -> torch.Tensor:
    """Independent permutations of ``range(shape[-1])`` along the last dimension."""
    return torch.rand(*shape, generator=g).argsort(-1)


class Block(nn.Module):
    """One step ``h -> fn(self, h)`` of a program, printed as ``code``; ``redraw(g)`` draws its
    varying arguments again (the same shapes: index and mask buffers, shifts, flags)."""

    def __init__(
        self,
        code: str,
        fn: Callable[[Block, torch.Tensor], torch.Tensor],
        redraw: Callable[[Block, torch.Generator], None] | None = None,
        **parts: Any,
    ) -> None:
        super().__init__()
        self.code, self.fn, self._redraw = code, fn, redraw
        for name, part in parts.items():
            if isinstance(part, nn.Module | nn.Parameter):
                setattr(self, name, part)
            elif isinstance(part, torch.Tensor):
                self.register_buffer(name, part)
            else:
                setattr(self, name, part)

    def redraw(self, g: torch.Generator) -> None:
        if self._redraw is not None:
            self._redraw(self, g)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fn(self, h)

    def extra_repr(self) -> str:
        shown = {
            k: v.tolist() if v.numel() <= 12 else f"<{tuple(v.shape)}>"
            for k, v in self._buffers.items()
            if v is not None and not v.is_floating_point()
        }
        shown |= {
            k: v
            for k, v in vars(self).items()
            if isinstance(v, int | bool | tuple) and not k.startswith("_") and k != "training"
        }
        return f"{self.code}  {shown}" if shown else self.code


def _param(g: torch.Generator, *shape: int, scale: float = 1.0) -> nn.Parameter:
    return nn.Parameter(_randn(g, *shape, scale=scale))


def _linear(g: torch.Generator, k: int, k2: int) -> nn.Linear:
    lin = nn.Linear(k, k2, dtype=f64)
    with torch.no_grad():
        lin.weight.copy_(_randn(g, k2, k, scale=1 / math.sqrt(k)))
        lin.bias.copy_(_randn(g, k2, scale=0.3))
    return lin


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "torch.tanh(h)": torch.tanh,
    "torch.sigmoid(h)": torch.sigmoid,
    "F.gelu(h)": F.gelu,
    "F.silu(h)": F.silu,
    "F.softplus(h)": F.softplus,
    "h * h": lambda h: h * h,
    "torch.exp(-h * h)": lambda h: torch.exp(-h * h),
    "torch.sin(h)": torch.sin,
    "h.clamp(-0.8, 0.9)": lambda h: h.clamp(-0.8, 0.9),
    "F.elu(h)": F.elu,
}


def _elementwise(g: torch.Generator, c: int, n: int) -> Block:
    code = _pick(g, sorted(_ACTIVATIONS))
    act = _ACTIVATIONS[code]
    kind = _int(g, 0, 3)
    if kind == 0:
        return Block(code, lambda m, h: act(h))
    if kind == 1:  # a per-channel scale and shift
        return Block(
            re.sub(r"\bh\b", "(h * s + t)", code),
            lambda m, h: act(h * m.s + m.t),
            s=_param(g, c, 1),
            t=_param(g, c, n, scale=0.3),
        )
    if kind == 2:  # a gate by a varying mask
        return Block(
            f"torch.where(mask, {code}, h * 0.5)",
            lambda m, h: torch.where(m.mask, act(h), h * 0.5),
            lambda m, g: m.mask.copy_(torch.rand(m.mask.shape, generator=g) < 0.5),
            mask=torch.rand(c, n, generator=g) < 0.5,
        )
    return Block(
        f"({code}).masked_fill(mask, 0.25)",
        lambda m, h: act(h).masked_fill(m.mask, 0.25),
        lambda m, g: m.mask.copy_(torch.rand(m.mask.shape, generator=g) < 0.3),
        mask=torch.rand(n, generator=g) < 0.3,
    )


def _linear_block(g: torch.Generator, c: int, n: int) -> tuple[Block, int, int]:
    kind = _int(g, 0, 4)
    n2 = _int(g, 2, max(2, min(8, WIDEST // c)))
    c2 = _int(g, 1, max(1, min(6, WIDEST // n)))
    if kind == 0:
        return Block("lin(h)", lambda m, h: m.lin(h), lin=_linear(g, n, n2)), c, n2
    if kind == 1:
        w = _param(g, n, n2, scale=1 / math.sqrt(n))
        return Block("torch.matmul(h, W)", lambda m, h: torch.matmul(h, m.W), W=w), c, n2
    if kind == 2:
        w = _param(g, c2, c, scale=1 / math.sqrt(c))
        return Block('torch.einsum("bcl,dc->bdl", h, W)', _einsum, W=w), c2, n
    if kind == 3:
        w = _param(g, n, n2, scale=1 / math.sqrt(n))
        return (
            Block(
                "torch.bmm(h, W.expand(len(h), -1, -1))",
                lambda m, h: torch.bmm(h, m.W.expand(h.shape[0], -1, -1)),
                W=w,
            ),
            c,
            n2,
        )
    lin = _linear(g, n, n2)  # tied: the same weight twice (a chain's shared factor)
    return (
        Block(
            "F.linear(torch.tanh(lin(h)), lin.weight[:, :n2].t())"
            if n2 <= n
            else "lin(torch.tanh(h)) + lin(h)",
            (
                lambda m, h: F.linear(
                    torch.tanh(m.lin(h)), m.lin.weight[:, : m.lin.weight.shape[0]].t()
                )
            )
            if n2 <= n
            else (lambda m, h: m.lin(torch.tanh(h)) + m.lin(h)),
            lin=lin,
        ),
        c,
        n2,
    )


def _einsum(m: Block, h: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bcl,dc->bdl", h, m.W)


def _conv(g: torch.Generator, c: int, n: int) -> tuple[Block, int, int] | None:
    grid = _grid(n)
    if grid is not None and _int(g, 0, 1):
        hh, ww = grid
        groups = _pick(g, _divisors(c))
        c2 = groups * _int(g, 1, max(1, 6 // groups))
        k = _pick(g, [1, 2, 3])
        pad, dil = _int(g, 0, 1), _pick(g, [1, 1, 2])
        if min(hh, ww) + 2 * pad - dil * (k - 1) < 1:
            return None
        conv = nn.Conv2d(c, c2, k, padding=pad, dilation=dil, groups=groups, dtype=f64)
        with torch.no_grad():
            conv.weight.copy_(_randn(g, *conv.weight.shape, scale=0.5))
        h2 = hh + 2 * pad - dil * (k - 1)
        w2 = ww + 2 * pad - dil * (k - 1)
        return (
            Block(
                f"conv(h.unflatten(2, ({hh}, {ww}))).flatten(2)",
                lambda m, h: m.conv(h.unflatten(2, (m.hh, m.ww))).flatten(2),
                conv=conv,
                hh=hh,
                ww=ww,
            ),
            c2,
            h2 * w2,
        )
    groups = _pick(g, _divisors(c))
    c2 = groups * _int(g, 1, max(1, 6 // groups))
    k, stride = _pick(g, [1, 2, 3]), _pick(g, [1, 1, 2])
    pad, dil = _int(g, 0, 2), _pick(g, [1, 1, 2])
    span = n + 2 * pad - dil * (k - 1) - 1
    if span < 0:
        return None
    conv1 = nn.Conv1d(c, c2, k, stride, pad, dil, groups, dtype=f64)
    with torch.no_grad():
        conv1.weight.copy_(_randn(g, *conv1.weight.shape, scale=0.5))
    return Block("conv(h)", lambda m, h: m.conv(h), conv=conv1), c2, span // stride + 1


def _norm(g: torch.Generator, c: int, n: int) -> Block:
    kind = _int(g, 0, 3)
    if kind == 0 and n >= 2:
        ln = nn.LayerNorm(n, dtype=f64)
        with torch.no_grad():
            ln.weight.copy_(1 + _randn(g, n, scale=0.2))
            ln.bias.copy_(_randn(g, n, scale=0.2))
        return Block("ln(h)", lambda m, h: m.ln(h), ln=ln)
    if kind == 1 and c * n >= 2:
        ln = nn.LayerNorm((c, n), elementwise_affine=False, dtype=f64)
        return Block("ln(h) (over C, L)", lambda m, h: m.ln(h), ln=ln)
    if kind == 2:
        groups = _pick(g, [d for d in _divisors(c) if c // d * n >= 2] or [0])
        if groups:
            gn = nn.GroupNorm(groups, c, dtype=f64)
            with torch.no_grad():
                gn.weight.copy_(1 + _randn(g, c, scale=0.2))
            return Block("gn(h)", lambda m, h: m.gn(h), gn=gn)
    bn = nn.BatchNorm1d(c, dtype=f64).eval()
    with torch.no_grad():
        bn.running_mean.copy_(_randn(g, c, scale=0.3))
        bn.running_var.copy_(1 + torch.rand(c, generator=g, dtype=f64))
        bn.weight.copy_(1 + _randn(g, c, scale=0.2))
    return Block("bn(h) (eval)", lambda m, h: m.bn(h), bn=bn)


def _attention(g: torch.Generator, c: int, n: int) -> Block:
    kind = _int(g, 0, 2)
    if kind == 0:
        dim = _pick(g, [1, 2])
        return Block(f"torch.softmax(h, {dim})", lambda m, h: torch.softmax(h, m.dim), dim=dim)
    wq, wk = _param(g, n, n, scale=0.5), _param(g, n, n, scale=0.5)
    if kind == 1:
        return Block(
            "softmax((h @ Wq) @ (h @ Wk).mT, -1) @ h",
            lambda m, h: torch.softmax((h @ m.Wq) @ (h @ m.Wk).mT, -1) @ h,
            Wq=wq,
            Wk=wk,
        )

    def redraw(m: Block, g: torch.Generator) -> None:
        mask = torch.rand(m.mask.shape, generator=g) < 0.6
        mask[torch.arange(mask.shape[0]), torch.randint(0, c, (c,), generator=g)] = True
        m.mask.copy_(mask)

    mask = torch.rand(c, c, generator=g) < 0.6
    mask[:, 0] = True
    return Block(
        "F.scaled_dot_product_attention(h @ Wq, h @ Wk, h, attn_mask=mask)",
        lambda m, h: F.scaled_dot_product_attention(h @ m.Wq, h @ m.Wk, h, attn_mask=m.mask),
        redraw,
        Wq=wq,
        Wk=wk,
        mask=mask,
    )


def _reduction(g: torch.Generator, c: int, n: int) -> Block:
    kind = _int(g, 0, 3)
    if kind == 0:
        return Block("h - h.mean(-1, keepdim=True)", lambda m, h: h - h.mean(-1, keepdim=True))
    if kind == 1:
        return Block(
            "h * torch.tanh(h.sum(1, keepdim=True))",
            lambda m, h: h * torch.tanh(h.sum(1, keepdim=True)),
        )
    if kind == 2:
        return Block(
            "h - torch.logsumexp(h, -1, keepdim=True)",
            lambda m, h: h - torch.logsumexp(h, -1, keepdim=True),
        )
    return Block("torch.cumsum(h, -1) * 0.5", lambda m, h: torch.cumsum(h, -1) * 0.5)


def _movement(
    g: torch.Generator, c: int, n: int, kind: int | None = None
) -> tuple[Block, int, int] | None:
    """A data-movement step, most with arguments that ``redraw`` changes at the same shapes."""
    kind = _int(g, 0, 43) if kind is None else kind
    if kind == 0:  # index_select, an index with repeats
        k = _int(g, 1, n + 2)
        return (
            Block(
                "h.index_select(2, idx)",
                lambda m, h: h.index_select(2, m.idx),
                lambda m, g: m.idx.copy_(torch.randint(0, m.n, m.idx.shape, generator=g)),
                idx=torch.randint(0, n, (k,), generator=g),
                n=n,
            ),
            c,
            k,
        )
    if kind == 1:  # index_select over channels, a permutation
        return (
            Block(
                "h.index_select(1, perm)",
                lambda m, h: h.index_select(1, m.perm),
                lambda m, g: m.perm.copy_(torch.randperm(m.perm.numel(), generator=g)),
                perm=torch.randperm(c, generator=g),
            ),
            c,
            n,
        )
    if kind == 2:  # gather, a per-sample index
        k = _int(g, 1, n + 1)
        return (
            Block(
                "h.gather(2, idx[: len(h)])",
                lambda m, h: h.gather(2, m.idx[: h.shape[0]]),
                lambda m, g: m.idx.copy_(torch.randint(0, m.n, m.idx.shape, generator=g)),
                idx=torch.randint(0, n, (BMAX, c, k), generator=g),
                n=n,
            ),
            c,
            k,
        )
    if kind == 3:  # scatter of a per-sample permutation
        return (
            Block(
                "torch.zeros_like(h).scatter(2, perm[: len(h)], h)",
                lambda m, h: torch.zeros_like(h).scatter(2, m.perm[: h.shape[0]], h),
                lambda m, g: m.perm.copy_(_perm_rows(g, *m.perm.shape)),
                perm=_perm_rows(g, BMAX, c, n),
            ),
            c,
            n,
        )
    if kind == 4:  # scatter_add, an index with repeats, into fewer slots
        k = _int(g, 1, n)
        return (
            Block(
                f"h.new_zeros(len(h), C, {k}).scatter_add(2, idx[: len(h)], h)",
                lambda m, h: h.new_zeros(h.shape[0], h.shape[1], m.k).scatter_add(
                    2, m.idx[: h.shape[0]], h
                ),
                lambda m, g: m.idx.copy_(torch.randint(0, m.k, m.idx.shape, generator=g)),
                idx=torch.randint(0, k, (BMAX, c, n), generator=g),
                k=k,
            ),
            c,
            k,
        )
    if kind == 5:  # take, each sample's own elements
        k = _int(g, 1, c * n)
        return (
            Block(
                "torch.take(h, offsets + r[: len(h)]).unflatten(1, (1, -1))",
                _take,
                lambda m, g: m.r.copy_(torch.randint(0, m.w, m.r.shape, generator=g)),
                r=torch.randint(0, c * n, (BMAX, k), generator=g),
                w=c * n,
            ),
            1,
            k,
        )
    if kind == 6:  # advanced index by an integer tensor
        k = _int(g, 1, n + 2)
        return (
            Block(
                "h[:, :, idx]",
                lambda m, h: h[:, :, m.idx],
                lambda m, g: m.idx.copy_(torch.randint(-m.n, m.n, m.idx.shape, generator=g)),
                idx=torch.randint(-n, n, (k,), generator=g),
                n=n,
            ),
            c,
            k,
        )
    if kind == 7:  # two index tensors, broadcast
        k = _int(g, 1, n)
        return (
            Block(
                "h[:, ci[:, None], li]",
                lambda m, h: h[:, m.ci[:, None], m.li],
                _redraw_pair,
                ci=torch.randint(0, c, (c,), generator=g),
                li=torch.randint(0, n, (k,), generator=g),
                c=c,
                n=n,
            ),
            c,
            k,
        )
    if kind == 8:  # a bool mask with a fixed count
        k = _int(g, 1, n)
        return (
            Block(
                "h[:, :, mask]",
                lambda m, h: h[:, :, m.mask],
                lambda m, g: m.mask.copy_(_mask(g, tuple(m.mask.shape), m.k)),
                mask=_mask(g, (n,), k),
                k=k,
            ),
            c,
            k,
        )
    if kind == 9:  # a 2-D bool mask over (C, L)
        k = _int(g, 1, c * n)
        return (
            Block(
                "h[:, mask].unflatten(1, (1, -1))",
                lambda m, h: h[:, m.mask].unflatten(1, (1, -1)),
                lambda m, g: m.mask.copy_(_mask(g, tuple(m.mask.shape), m.k)),
                mask=_mask(g, (c, n), k),
                k=k,
            ),
            1,
            k,
        )
    if kind == 10:  # roll by a varying shift
        return (
            Block(
                "torch.roll(h, shift, 2)",
                lambda m, h: torch.roll(h, m.shift, 2),
                lambda m, g: setattr(m, "shift", _int(g, -2 * m.n, 2 * m.n)),
                shift=_int(g, -n, n),
                n=n,
            ),
            c,
            n,
        )
    if kind == 11:  # roll over two dimensions
        return (
            Block(
                "torch.roll(h, shifts, (1, 2))",
                lambda m, h: torch.roll(h, m.shifts, (1, 2)),
                lambda m, g: setattr(m, "shifts", (_int(g, -3, 3), _int(g, -3, 3))),
                shifts=(_int(g, -3, 3), _int(g, -3, 3)),
            ),
            c,
            n,
        )
    if kind == 12:  # flip, the dimensions varying
        return (
            Block(
                "h.flip(dims)",
                lambda m, h: h.flip(m.dims),
                lambda m, g: setattr(m, "dims", _pick(g, [(1,), (2,), (1, 2), (2, 1)])),
                dims=_pick(g, [(1,), (2,), (1, 2)]),
            ),
            c,
            n,
        )
    if kind == 13 and c == n:  # a transpose or not, the same shapes
        return (
            Block(
                "h.transpose(1, 2) if swap else h",
                lambda m, h: h.transpose(1, 2) if m.swap else h,
                lambda m, g: setattr(m, "swap", bool(_int(g, 0, 1))),
                swap=bool(_int(g, 0, 1)),
            ),
            c,
            n,
        )
    if kind == 13 or kind == 14:
        return Block("h.transpose(1, 2)", lambda m, h: h.transpose(1, 2)), n, c
    if kind == 15:  # cat with a flipped copy, then a narrow back at a varying start
        start = _int(g, 0, n)
        return (
            Block(
                "torch.cat([h, h.flip(-1) * s], -1).narrow(-1, start, L)",
                lambda m, h: torch.cat([h, h.flip(-1) * m.s], -1).narrow(-1, m.start, m.n),
                lambda m, g: setattr(m, "start", _int(g, 0, m.n)),
                s=_param(g, 1),
                start=start,
                n=n,
            ),
            c,
            n,
        )
    if kind == 16:  # stack and flatten
        return (
            Block(
                "torch.stack([h, torch.tanh(h)], 2).flatten(2)",
                lambda m, h: torch.stack([h, torch.tanh(h)], 2).flatten(2),
            ),
            c,
            2 * n,
        )
    if kind == 17 and n % 2 == 0:  # chunk: a gated unit
        return (
            Block(
                "a * torch.sigmoid(b) for a, b = h.chunk(2, -1)",
                lambda m, h: (lambda a, b: a * torch.sigmoid(b))(*h.chunk(2, -1)),
            ),
            c,
            n // 2,
        )
    if kind == 18 and n >= 2:  # split and swap: a rotation
        k = _int(g, 1, n - 1)
        return (
            Block(
                "torch.cat(h.split([k, L - k], -1)[::-1], -1)",
                lambda m, h: torch.cat(h.split([m.k, h.shape[-1] - m.k], -1)[::-1], -1),
                k=k,
            ),
            c,
            n,
        )
    if kind == 19 and n % 2 == 0:  # slices with steps, in a varying order
        return (
            Block(
                "torch.cat([h[..., s::2], h[..., 1 - s::2]], -1)",
                lambda m, h: torch.cat([h[..., m.s :: 2], h[..., 1 - m.s :: 2]], -1),
                lambda m, g: setattr(m, "s", _int(g, 0, 1)),
                s=_int(g, 0, 1),
            ),
            c,
            n,
        )
    if kind == 20:  # expand and reshape: each channel twice
        return (
            Block(
                "h.unsqueeze(2).expand(-1, -1, 2, -1).reshape(len(h), 2 * C, L)",
                lambda m, h: (
                    h.unsqueeze(2).expand(-1, -1, 2, -1).reshape(h.shape[0], -1, h.shape[2])
                ),
            ),
            2 * c,
            n,
        )
    if kind == 21:
        return (
            Block(
                "h.repeat(1, 1, 2) * w", lambda m, h: h.repeat(1, 1, 2) * m.w, w=_param(g, 2 * n)
            ),
            c,
            2 * n,
        )
    if kind == 22:  # pad
        mode = _pick(g, ["constant", "reflect", "replicate", "circular"])
        p1, p2 = _int(g, 0, min(2, n - 1)), _int(g, 0, min(2, n - 1))
        return (
            Block(
                f"F.pad(h, ({p1}, {p2}), mode={mode!r})",
                lambda m, h: F.pad(
                    h, (m.p1, m.p2), mode=m.mode, **({"value": 0.3} if m.mode == "constant" else {})
                ),
                p1=p1,
                p2=p2,
                mode=mode,
            ),
            c,
            n + p1 + p2,
        )
    if kind == 23 and n >= 2:  # unfold (windows)
        size = _int(g, 1, min(3, n))
        step = _int(g, 1, 2)
        windows = (n - size) // step + 1
        return (
            Block(
                f"h.unfold(2, {size}, {step}).flatten(2)",
                lambda m, h: h.unfold(2, m.size, m.step).flatten(2),
                size=size,
                step=step,
            ),
            c,
            windows * size,
        )
    if kind == 24:  # pixel shuffle / unshuffle
        grid = _grid(n)
        if grid is None:
            return None
        hh, ww = grid
        if c % 4 == 0:
            return (
                Block(
                    f"F.pixel_shuffle(h.unflatten(2, ({hh}, {ww})), 2).flatten(2)",
                    lambda m, h: F.pixel_shuffle(h.unflatten(2, (m.hh, m.ww)), 2).flatten(2),
                    hh=hh,
                    ww=ww,
                ),
                c // 4,
                4 * n,
            )
        if hh % 2 == 0 and ww % 2 == 0:
            return (
                Block(
                    f"F.pixel_unshuffle(h.unflatten(2, ({hh}, {ww})), 2).flatten(2)",
                    lambda m, h: F.pixel_unshuffle(h.unflatten(2, (m.hh, m.ww)), 2).flatten(2),
                    hh=hh,
                    ww=ww,
                ),
                4 * c,
                n // 4,
            )
        return None
    if kind == 25:  # a permutation of channels by indexing with a varying permutation
        return (
            Block(
                "h[:, perm]",
                lambda m, h: h[:, m.perm],
                lambda m, g: m.perm.copy_(torch.randperm(m.perm.numel(), generator=g)),
                perm=torch.randperm(c, generator=g),
            ),
            c,
            n,
        )
    if kind == 26:  # 2-D unfold (im2col)
        grid = _grid(n)
        if grid is None:
            return None
        hh, ww = grid
        return (
            Block(
                f"F.unfold(h.unflatten(2, ({hh}, {ww})), 2)",
                lambda m, h: F.unfold(h.unflatten(2, (m.hh, m.ww)), 2),
                hh=hh,
                ww=ww,
            ),
            4 * c,
            (hh - 1) * (ww - 1),
        )
    if kind == 27:  # reshape to another factorisation
        w = c * n
        c2 = _pick(g, _divisors(w))
        return (
            Block(
                f"h.reshape(len(h), {c2}, -1)", lambda m, h: h.reshape(h.shape[0], m.c2, -1), c2=c2
            ),
            c2,
            w // c2,
        )
    if kind >= 40:
        return _written(g, c, n, kind)
    if kind >= 28:
        return _value_moved(g, c, n, kind)
    return None


def _value_moved(g: torch.Generator, c: int, n: int, kind: int) -> tuple[Block, int, int] | None:
    """Movement by index values: an index that ``redraw`` changes, or one computed from ``h``
    (a sort, a top-k, a max: a permutation of its own in every sample and call)."""
    if kind == 28:  # index_add of a varying index
        k = _int(g, 1, n)
        return (
            Block(
                "h.index_add(2, idx, torch.tanh(h[..., :k]), alpha=0.7)",
                lambda m, h: h.index_add(2, m.idx, torch.tanh(h[..., : m.k]), alpha=0.7),
                lambda m, g: m.idx.copy_(torch.randint(0, m.n, m.idx.shape, generator=g)),
                idx=torch.randint(0, n, (k,), generator=g),
                k=k,
                n=n,
            ),
            c,
            n,
        )
    if kind == 29:  # index_put with accumulate, along L moved first
        k = _int(g, 1, n)
        return (
            Block(
                "h.permute(2, 0, 1).index_put((idx,), v, accumulate=True).permute(1, 2, 0)",
                lambda m, h: (
                    h.permute(2, 0, 1)
                    .index_put((m.idx,), torch.sin(h[..., : m.k]).permute(2, 0, 1), accumulate=True)
                    .permute(1, 2, 0)
                ),
                lambda m, g: m.idx.copy_(torch.randint(0, m.n, m.idx.shape, generator=g)),
                idx=torch.randint(0, n, (k,), generator=g),
                k=k,
                n=n,
            ),
            c,
            n,
        )
    if kind == 30:
        dim = _pick(g, [1, 2])
        return Block(f"h.sort({dim}).values", lambda m, h: h.sort(m.dim).values, dim=dim), c, n
    if kind == 31:
        k = _int(g, 1, n)
        return Block(f"h.topk({k}, -1).values", lambda m, h: h.topk(m.k, -1).values, k=k), c, k
    if kind == 32:
        return (
            Block(
                "h * h.max(-1, keepdim=True).values",
                lambda m, h: h * h.max(-1, keepdim=True).values,
            ),
            c,
            n,
        )
    if kind == 33:
        return (
            Block(
                "h.gather(-1, h.argsort(-1)) * w + h",
                lambda m, h: h.gather(-1, h.argsort(-1)) * m.w + h,
                w=_param(g, n),
            ),
            c,
            n,
        )
    if kind == 34:
        return (
            Block(
                "torch.where(h > 0.2, h, 0.3 * h)", lambda m, h: torch.where(h > 0.2, h, 0.3 * h)
            ),
            c,
            n,
        )
    if kind == 35:
        return (
            Block(
                "torch.maximum(h, h.flip(-1) * w)",
                lambda m, h: torch.maximum(h, h.flip(-1) * m.w),
                w=_param(g, n),
            ),
            c,
            n,
        )
    if kind == 36 and n >= 2:  # tensor_split at varying places, the pieces reversed
        return (
            Block(
                "torch.cat(h.tensor_split(cuts, -1)[::-1], -1)",
                lambda m, h: torch.cat(h.tensor_split(m.cuts, -1)[::-1], -1),
                lambda m, g: setattr(m, "cuts", sorted(_int(g, 0, m.n) for _ in range(2))),
                cuts=sorted(_int(g, 0, n) for _ in range(2)),
                n=n,
            ),
            c,
            n,
        )
    if kind == 37 and n >= 2:
        k = _int(g, 2, min(3, n))
        return (
            Block(
                f"F.max_pool1d(h, {k}, 1, padding={k // 2})",
                lambda m, h: F.max_pool1d(h, m.k, 1, padding=m.k // 2),
                k=k,
            ),
            c,
            n,
        )
    if kind == 38:
        mode = _pick(g, ["nearest", "linear"])
        return (
            Block(
                f"F.interpolate(h, scale_factor=2, mode={mode!r})",
                lambda m, h: F.interpolate(h, scale_factor=2, mode=m.mode),
                mode=mode,
            ),
            c,
            2 * n,
        )
    if kind == 39 and n >= 3:
        k = _int(g, 1, n)
        return (
            Block(
                f"h.kthvalue({k}, -1, keepdim=True).values - h",
                lambda m, h: h.kthvalue(m.k, -1, keepdim=True).values - h,
                k=k,
            ),
            c,
            n,
        )
    return None


def _written(g: torch.Generator, c: int, n: int, kind: int) -> tuple[Block, int, int] | None:
    """In-place writes into a tensor ``f`` made, at places that ``redraw`` changes."""
    k = _int(g, 1, n)
    if kind == 40:
        return (
            Block(
                "h = h.clone(); h[:, :, idx] = torch.tanh(h[:, :, src])",
                _put,
                _redraw_put,
                idx=torch.randperm(n, generator=g)[:k],
                src=torch.randint(0, n, (k,), generator=g),
                n=n,
                k=k,
            ),
            c,
            n,
        )
    if kind == 41:
        return (
            Block(
                "h.clone().masked_fill_(mask, 0.5)",
                lambda m, h: h.clone().masked_fill_(m.mask, 0.5),
                lambda m, g: m.mask.copy_(torch.rand(m.mask.shape, generator=g) < 0.4),
                mask=torch.rand(c, n, generator=g) < 0.4,
            ),
            c,
            n,
        )
    if kind == 42:
        return (
            Block(
                "(h * 2).index_fill_(2, idx, -0.5)",
                lambda m, h: (h * 2).index_fill_(2, m.idx, -0.5),
                lambda m, g: m.idx.copy_(torch.randint(0, m.n, m.idx.shape, generator=g)),
                idx=torch.randint(0, n, (k,), generator=g),
                n=n,
            ),
            c,
            n,
        )
    return (
        Block(
            "torch.zeros_like(h).index_copy_(2, perm, h)",
            lambda m, h: torch.zeros_like(h).index_copy_(2, m.perm, h),
            lambda m, g: m.perm.copy_(torch.randperm(m.n, generator=g)),
            perm=torch.randperm(n, generator=g),
            n=n,
        ),
        c,
        n,
    )


def _redraw_put(m: Block, g: torch.Generator) -> None:
    m.idx.copy_(torch.randperm(m.n, generator=g)[: m.k])
    m.src.copy_(torch.randint(0, m.n, (m.k,), generator=g))


def _put(m: Block, h: torch.Tensor) -> torch.Tensor:
    h = h.clone()
    h[:, :, m.idx] = torch.tanh(h[:, :, m.src])
    return h


def _redraw_pair(m: Block, g: torch.Generator) -> None:
    m.ci.copy_(torch.randint(0, m.c, m.ci.shape, generator=g))
    m.li.copy_(torch.randint(0, m.n, m.li.shape, generator=g))


def _take(m: Block, h: torch.Tensor) -> torch.Tensor:
    offsets = torch.arange(h.shape[0], device=h.device)[:, None] * m.w
    return torch.take(h, offsets + m.r[: h.shape[0]]).unflatten(1, (1, -1))


class Program(nn.Module):
    def __init__(self, blocks: list[nn.Module], event: tuple[int, ...], c: int, n: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.event, self.c, self.n = event, c, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, self.c, self.n)  # (the samples of any batch_dims in one)
        for block in self.blocks:
            h = block(h)
        return h.reshape(x.shape)


def _shape_after(blocks: list[nn.Module], c: int, n: int) -> tuple[int, int]:
    with torch.no_grad():
        h = torch.zeros(2, c, n, dtype=f64)
        for b in blocks:
            h = b(h)
    return h.shape[1], h.shape[2]


def _local(g: torch.Generator, c: int, n: int) -> Block | None:
    """A step that keeps ``(C, L)`` and reads positions near its own only (so that the
    colouring of ``torchdiv._structured.colors`` applies), some with varying arguments."""
    kind = _int(g, 0, 7)
    if kind <= 1:  # a "same" convolution
        k, dil = _pick(g, [1, 3, 3, 5]), _pick(g, [1, 1, 2])
        groups = _pick(g, _divisors(c))
        conv = nn.Conv1d(
            c, c, k, padding=dil * (k - 1) // 2, dilation=dil, groups=groups, dtype=f64
        )
        with torch.no_grad():
            conv.weight.copy_(_randn(g, *conv.weight.shape, scale=0.5))
        return Block("conv(h) (same length)", lambda m, h: m.conv(h), conv=conv)
    if kind == 2:
        return _elementwise(g, c, n)
    if kind == 3:  # a local gather along L, its offsets varying

        def draw(g: torch.Generator, n: int) -> torch.Tensor:
            return (torch.arange(n) + torch.randint(-1, 2, (n,), generator=g)).clamp(0, n - 1)

        return Block(
            "h[:, :, near]",
            lambda m, h: h[:, :, m.near],
            lambda m, g: m.near.copy_(draw(g, m.near.numel())),
            near=draw(g, n),
        )
    if kind == 4:  # channels moved
        options = [
            Block(
                "h.index_select(1, perm)",
                lambda m, h: h.index_select(1, m.perm),
                lambda m, g: m.perm.copy_(torch.randperm(m.perm.numel(), generator=g)),
                perm=torch.randperm(c, generator=g),
            ),
            Block(
                "h[:, perm]",
                lambda m, h: h[:, m.perm],
                lambda m, g: m.perm.copy_(torch.randperm(m.perm.numel(), generator=g)),
                perm=torch.randperm(c, generator=g),
            ),
            Block("h.flip(1)", lambda m, h: h.flip(1)),
            Block(
                "torch.roll(h, shift, 1)",
                lambda m, h: torch.roll(h, m.shift, 1),
                lambda m, g: setattr(m, "shift", _int(g, -3, 3)),
                shift=_int(g, -3, 3),
            ),
        ]
        return _pick(g, options)
    if kind == 5:  # padded, cut back at a varying offset
        p = _int(g, 1, 2)
        return Block(
            f"F.pad(h, ({p}, {p})).narrow(2, start, L)",
            lambda m, h: F.pad(h, (m.p, m.p)).narrow(2, m.start, h.shape[2]),
            lambda m, g: setattr(m, "start", _int(g, 0, 2 * m.p)),
            p=p,
            start=_int(g, 0, 2 * p),
        )
    if kind == 6:
        return _norm(g, c, n)
    return _reduction(g, c, n) if _int(g, 0, 1) else None


_CHAIN_ACTIVATIONS = [k for k in sorted(_ACTIVATIONS) if "exp" not in k]


def _chain_step(g: torch.Generator, c: int, n: int) -> tuple[Block, int, int] | None:
    """A step of the kinds ``torchdiv._structured.factors`` makes factors of (on ``(B, 1, L)``:
    a ``Linear``'s rows are the samples), most movement with varying arguments."""
    kind = _int(g, 0, 8)
    if kind == 7:
        return _scalar_step(g), c, n
    if kind == 8:  # an index with repeats, redrawn: its matrix is made at every call
        return _movement(g, c, n, 0)
    if kind <= 1:
        made = _linear_block(g, c, n)
        return made if "einsum" not in made[0].code and "bmm" not in made[0].code else None
    if kind == 2:
        return _chain_activation(g, c, n), c, n
    if kind == 3:  # cat with a constant, cut back at a varying start
        k = _int(g, 1, 3)
        return (
            Block(
                "torch.cat([h, t.expand(len(h), -1, -1)], -1).narrow(-1, start, L)",
                lambda m, h: torch.cat([h, m.t.expand(h.shape[0], -1, -1)], -1).narrow(
                    -1, m.start, h.shape[-1]
                ),
                lambda m, g: setattr(m, "start", _int(g, 0, m.k)),
                t=_randn(g, c, k),
                start=_int(g, 0, k),
                k=k,
            ),
            c,
            n,
        )
    return _movement_in(g, c, n, [0, 0, 0, 1, 10, 11, 12, 13, 14, 20, 21, 22, 27])


def _scalar_step(g: torch.Generator) -> Block:
    """An elementwise step whose float arguments ``redraw`` changes (a template reads them
    at every call): a power, a leaky slope, clamp bounds, softplus's beta, elu's alpha."""

    def draw(m: Block, g: torch.Generator) -> None:
        m.p = _pick(g, [1.5, 2.0, 3.0])
        m.slope, m.beta = float(torch.rand((), generator=g)), _pick(g, [0.5, 1.0, 2.0])
        m.lo, m.hi = -float(torch.rand((), generator=g)), float(torch.rand((), generator=g))
        m.alpha = 0.5 + float(torch.rand((), generator=g))

    kind = _int(g, 0, 3)
    steps: list[tuple[str, Callable[[Block, torch.Tensor], torch.Tensor]]] = [
        (
            "torch.pow(torch.sigmoid(h) + 0.1, p)",
            lambda m, h: torch.pow(torch.sigmoid(h) + 0.1, m.p),
        ),
        ("F.leaky_relu(h, slope)", lambda m, h: F.leaky_relu(h, m.slope)),
        ("F.softplus(h, beta=beta)", lambda m, h: F.softplus(h, beta=m.beta)),
        ("F.elu(h, alpha).clamp(lo, hi)", lambda m, h: F.elu(h, m.alpha).clamp(m.lo, m.hi)),
    ]
    block = Block(steps[kind][0], steps[kind][1], draw)
    draw(block, g)
    return block


def _chain_activation(g: torch.Generator, c: int, n: int) -> Block:
    code = _pick(g, _CHAIN_ACTIVATIONS)
    act = _ACTIVATIONS[code]
    if _int(g, 0, 1):
        return Block(code, lambda m, h: act(h))
    return Block(
        re.sub(r"\bh\b", "(h * s + t)", code),
        lambda m, h: act(h * m.s + m.t),
        s=_param(g, c, 1),
        t=_param(g, c, n, scale=0.3),
    )


def _movement_in(
    g: torch.Generator, c: int, n: int, kinds: list[int]
) -> tuple[Block, int, int] | None:
    for _ in range(10):
        made = _movement(g, c, n, _pick(g, kinds))
        if made is not None:
            return made
    return None


def program(g: torch.Generator, c: int, n: int, steps: int, flavour: str = "any") -> Program:
    """A random program on ``(B, c, n)``, ending at the same shape (a square ``f``):
    ``flavour`` ``"chain"`` (steps of a chain's kinds), ``"local"`` (steps that keep the
    shape and read near positions: colours) or ``"any"``."""
    blocks: list[nn.Module] = []
    c0, n0 = c, n
    while len(blocks) < steps:
        family = _int(g, 0, 9)
        made: tuple[Block, int, int | None] | None
        if flavour == "local":
            local = _local(g, c, n)
            made = None if local is None else (local, c, n)
        elif flavour == "chain":
            made = _chain_step(g, c, n)
        elif family <= 3:  # data movement, the point of the fuzzer
            made = _movement(g, c, n)
        elif family == 4:
            made = _linear_block(g, c, n)
        elif family == 5:
            made = _conv(g, c, n)
        elif family == 6:
            made = (_norm(g, c, n), c, n)
        elif family == 7:
            made = (_attention(g, c, n), c, n)
        elif family == 8:
            made = (_reduction(g, c, n), c, n)
        else:
            made = (_elementwise(g, c, n), c, n)
        if made is None:
            continue
        block = made[0]
        c2, n2 = _shape_after([*blocks, block], c0, n0)
        if c2 * n2 == 0 or c2 * n2 > 4 * WIDEST or (flavour == "chain" and c2 != 1):
            continue
        if flavour == "chain" and "constant" not in block.code and "pad" in block.code:
            continue
        if _int(g, 0, 4) == 0 and (c2, n2) == (c, n):  # a residual
            block = Residual(block)
        blocks.append(block)
        c, n = c2, n2
        if c * n > WIDEST:  # back to a width the next blocks can grow from
            lin = _linear(g, n, max(1, WIDEST // (2 * c)))
            blocks.append(Block("lin(h)", lambda m, h: m.lin(h), lin=lin))
            c, n = _shape_after(blocks, c0, n0)
        if flavour != "local" and _int(g, 0, 2) == 0:
            step = _chain_activation if flavour == "chain" else _elementwise
            blocks.append(step(g, c, n))
    if (c, n) != (c0, n0):  # back to x's shape: a Linear over the flattened sample
        blocks.append(Flat(_linear(g, c * n, c0 * n0), c0, n0))
    return Program(blocks, (c0 * n0,), c0, n0)


class Residual(nn.Module):
    def __init__(self, inner: Block) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.inner(h)


class Flat(nn.Module):
    def __init__(self, lin: nn.Linear, c: int, n: int) -> None:
        super().__init__()
        self.lin, self.c, self.n = lin, c, n

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lin(h.flatten(1)).unflatten(1, (self.c, self.n))


def redraw(f: nn.Module, g: torch.Generator) -> None:
    """Every block's varying arguments drawn again (the same shapes)."""
    for m in f.modules():
        if isinstance(m, Block):
            m.redraw(g)


# --- references and checks ------------------------------------------------------------------------


def reference_jacobian(
    f: nn.Module, x: torch.Tensor, batch_dims: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, m, n)`` Jacobians of a float64 copy of ``f`` by one ``autograd.grad`` per sample
    and output (``create_graph``: differentiable in the copy's parameters and in the leaf),
    and the leaf."""
    leaf = x.detach().to(f64).requires_grad_(True)
    y = f(leaf)
    count = x.shape[:batch_dims].numel()
    ys, n = y.reshape(count, -1), x.numel() // count
    rows = [
        torch.stack(
            [
                torch.autograd.grad(
                    ys[s, i], leaf, create_graph=True, retain_graph=True, materialize_grads=True
                )[0].reshape(count, n)[s]
                for i in range(ys.shape[1])
            ]
        )
        for s in range(count)
    ]
    return torch.stack(rows), leaf


def tolerance(dtype: torch.dtype) -> float:
    """Relative to ``1 + max |reference|``: float64 results of a few thousand flops from the
    same inputs, 1e-8 leaves seven digits over eps = 2.2e-16; float32 (eps 1.2e-7) against the
    float64 reference through norms, softmax and up to a dozen steps: 3e-4, still far below
    any wrong index (an element from the wrong place: O(1))."""
    return 1e-8 if dtype == f64 else 3e-4


def _calls() -> dict[str, tuple[str, Callable[[nn.Module, torch.Tensor, int], torch.Tensor]]]:
    out: dict[str, tuple[str, Callable[[nn.Module, torch.Tensor, int], torch.Tensor]]] = {}
    for m in ("structured", "auto"):
        out[f"divergence/{m}"] = (
            "div",
            lambda f, x, b, m=m: torchdiv.divergence(f, x, method=m, batch_dims=b),
        )
        out[f"jacobian_diagonal/{m}"] = (
            "diag",
            lambda f, x, b, m=m: torchdiv.jacobian_diagonal(f, x, method=m, batch_dims=b),
        )
    out["divergence/structured/chunk 2"] = (
        "div",
        lambda f, x, b: torchdiv.divergence(f, x, method="structured", chunk_size=2, batch_dims=b),
    )
    out["jacobian_diagonal/structured/chunk 3"] = (
        "diag",
        lambda f, x, b: torchdiv.jacobian_diagonal(
            f, x, method="structured", chunk_size=3, batch_dims=b
        ),
    )
    out["jacobian/auto"] = ("jac", lambda f, x, b: torchdiv.jacobian(f, x, batch_dims=b))

    def quiet(f: nn.Module, x: torch.Tensor, b: int) -> torch.Tensor:
        with torch.no_grad():
            return torchdiv.divergence(f, x, method="structured", batch_dims=b)

    out["divergence/structured/no_grad"] = ("div", quiet)
    return out


CALLS = _calls()


class Stats:
    """What the calls of a run did: refusals of ``"structured"`` by message, and how many
    calls the structured engine planned."""

    def __init__(self) -> None:
        self.refused: dict[str, int] = {}
        self.planned = 0
        self.planned_by_auto = 0


def _of(jac: torch.Tensor, what: str, shape: torch.Size) -> torch.Tensor:
    if what == "jac":
        return jac.reshape(shape)
    diag = jac.diagonal(dim1=1, dim2=2)
    return (diag.sum(-1) if what == "div" else diag).reshape(shape)


def check_round(
    f: nn.Module,
    x: torch.Tensor,
    stats: Stats,
    batch_dims: int = 1,
    values: dict[str, torch.Tensor] | None = None,
) -> list[str]:
    """Every call of ``CALLS`` on ``f`` at ``x``: its value and the gradients of a weighted sum
    of it (each parameter's ``.grad``, and ``x.grad`` where ``x`` requires grad) against the
    float64 loop. ``values``: called through ``torch.func.functional_call`` with these
    parameters instead of ``f``'s own (the same function object every call)."""
    copy_f = copy.deepcopy(f).to(f64)
    if values is not None:
        with torch.no_grad():
            for k, p in copy_f.named_parameters():
                p.copy_(values[k])
    jac, leaf = reference_jacobian(copy_f, x, batch_dims)
    own, theirs = dict(f.named_parameters()), dict(copy_f.named_parameters())
    called: Any = f
    if values is not None:
        own, called = values, _functional(f, values)
    names = [k for k, p in own.items() if p.requires_grad]
    wrt_x = x.requires_grad
    tol = tolerance(x.dtype)
    faults = []
    for name, (what, call) in CALLS.items():
        for p in own.values():
            p.grad = None
        x.grad = None
        try:
            got = call(called, x, batch_dims)
        except NotImplementedError as exc:
            if "structured" not in name:
                faults.append(f"{name} raised {type(exc).__name__}: {str(exc)[:300]}")
            else:
                key = str(exc).split(";")[0][:160]
                stats.refused[key] = stats.refused.get(key, 0) + 1
            continue
        except Exception as exc:  # every program is per-sample: any other error is a fault
            faults.append(f"{name} raised {type(exc).__name__}: {str(exc)[:400]}")
            continue
        want = _of(jac, what, got.shape)
        if got.dtype != x.dtype:
            faults.append(f"{name}: dtype {got.dtype}")
        if (bad := far(got, want, tol)) is not None:
            faults.append(f"{name}: value {bad}")
            continue
        if name.endswith("no_grad"):
            if got.requires_grad:
                faults.append(f"{name}: requires grad under no_grad")
            continue
        weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(3), dtype=f64)
        ref_loss = (want * weights).sum()
        wrt = [theirs[k] for k in names] + ([leaf] if wrt_x else [])
        if not wrt:
            continue
        expected = (
            torch.autograd.grad(
                ref_loss, wrt, retain_graph=True, allow_unused=True, materialize_grads=True
            )
            if ref_loss.requires_grad  # (no parameter and no x in the result's formula)
            else [torch.zeros_like(w) for w in wrt]
        )
        if not got.requires_grad:
            if any(bool(e.any()) for e in expected):
                faults.append(f"{name}: no graph, the reference's gradients are not zero")
            continue
        try:
            (got * weights.to(got.dtype)).sum().backward()
        except RuntimeError as exc:
            faults.append(f"{name}: .backward() raised {str(exc)[:300]}")
            continue
        actual = [own[k].grad for k in names] + ([x.grad] if wrt_x else [])
        for label, a, e in zip([*names, "x"], actual, expected, strict=False):
            a = torch.zeros_like(e) if a is None else a
            if (bad := far(a, e, tol)) is not None:
                faults.append(f"{name}: grad of {label}: {bad}")
    return faults


class Case:
    """The program of ``seed``, its input shapes, dtype and batch sizes."""

    def __init__(self, seed: int, large: bool | None = None, flavour: str | None = None) -> None:
        g = torch.Generator().manual_seed(28_000_000 + seed)
        self.seed = seed
        self.large = bool(_int(g, 0, 3) == 0) if large is None else large
        self.flavour = _pick(g, ["any", "any", "chain", "local"]) if flavour is None else flavour
        if self.flavour == "chain":
            self.c, self.n = 1, _pick(g, [24, 32]) if self.large else _int(g, 2, 12)
        elif self.flavour == "local":
            self.c, self.n = _pick(
                g, [(3, 12), (2, 16)] if self.large else [(1, 8), (2, 6), (2, 8)]
            )
        elif self.large:  # "auto" takes the structured engine: n * n * B > 2**12
            self.c, self.n = _pick(g, [(3, 8), (4, 6), (2, 12), (1, 24), (4, 8), (2, 16)])
        else:
            self.c, self.n = _pick(g, [(1, 4), (2, 3), (2, 4), (3, 4), (1, 8), (4, 4), (2, 6)])
        self.sizes = (
            [8, _pick(g, [1, 8])] if self.large else [_pick(g, [2, 3]), _pick(g, [1, 1, 5])]
        )
        self.flat = self.flavour == "chain" or (self.flavour == "any" and bool(_int(g, 0, 1)))
        self.dtype = _pick(g, [f64, f64, f64, torch.float32])
        self.x_grad = _int(g, 0, 3) == 0
        # samples in one dimension, in two (x (B, 2, ...)), none (one sample); x strided
        self.batch_dims = _pick(g, [1, 1, 1, 1, 2, 0])
        self.strided = _int(g, 0, 3) == 0
        steps = _int(g, 2, 6)
        self.model = program(g, self.c, self.n, steps, self.flavour).to(self.dtype)
        self.g = g

    def x(self, count: int) -> torch.Tensor:
        event = (self.c * self.n,) if self.flat else (self.c, self.n)
        lead = [(), (count,), (count, 2)][self.batch_dims]
        shape = (*lead, *event)
        if self.strided:  # (the same values in a permuted layout)
            x = _randn(self.g, *shape[::-1]).to(self.dtype).permute(*range(len(shape))[::-1])
        else:
            x = _randn(self.g, *shape).to(self.dtype)
        return x.requires_grad_(self.x_grad)

    def __repr__(self) -> str:
        shape = (self.c * self.n,) if self.flat else (self.c, self.n)
        return (
            f"seed {self.seed} ({self.flavour}): {self.dtype} event {shape} sizes {self.sizes} "
            f"x.requires_grad={self.x_grad} batch_dims={self.batch_dims} "
            f"strided={self.strided}\n{self.model!r}"
        )


def _functional(f: nn.Module, values: dict[str, torch.Tensor]) -> Callable:
    """``f`` through ``functional_call`` with ``values``: one function object per model
    (the engine's kept recording is the function's, its parameters are read at each call)."""

    def called(z: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(f, called.values, (z,))  # type: ignore[attr-defined]

    called = f.__dict__.setdefault("_functional", called)
    called.values = values  # type: ignore[attr-defined]
    return called


def _rebound(f: nn.Module, g: torch.Generator) -> None:
    """New parameter and buffer objects (redrawn), as a load of a state dict by assignment."""
    redraw(f, g)
    for m in f.modules():
        for k, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[k] = nn.Parameter(p.detach() * 0.95 + 0.01)
        for k, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[k] = b.clone()


def _stepped(f: nn.Module) -> None:
    with torch.no_grad():
        for p in f.parameters():
            p.mul_(0.9).add_(0.05)


def fuzz_one(
    seed: int, stats: Stats | None = None, large: bool | None = None, flavour: str | None = None
) -> list[str]:
    """Every disagreement of the program of ``seed`` over its rounds."""
    stats = Stats() if stats is None else stats
    case = Case(seed, large, flavour)
    f, g = case.model, case.g
    faults: list[str] = []
    rounds = [
        ("as drawn", case.sizes[0], None),
        ("redrawn", case.sizes[0], redraw),
        ("stepped, redrawn", case.sizes[0], lambda f, g: (_stepped(f), redraw(f, g))),
        ("another size, redrawn", case.sizes[1], redraw),
        ("redrawn, first size", case.sizes[0], redraw),
        ("rebound (new objects)", case.sizes[0], _rebound),
    ]
    original = _structured.plan

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        stats.planned += out is not None
        strict = kwargs["strict"] if "strict" in kwargs else args[5]
        stats.planned_by_auto += out is not None and not strict
        return out

    _structured.plan = spy  # type: ignore[assignment]
    try:
        for label, size, change in rounds:
            if change is not None:
                change(f, g)
            x = case.x(size)
            found = check_round(f, x, stats, case.batch_dims)
            faults += [f"{label} x{tuple(x.shape)}: {m}" for m in found]
        if seed % 2:  # through functional_call: other values, then those replaced, redrawn
            values = {
                k: (p.detach() * 0.8 + 0.02).requires_grad_() for k, p in f.named_parameters()
            }
            for label in ("functional_call", "functional_call, new values, redrawn"):
                x = case.x(case.sizes[0])
                found = check_round(f, x, stats, case.batch_dims, values)
                faults += [f"{label} x{tuple(x.shape)}: {m}" for m in found]
                for k in values:
                    values[k] = (values[k].detach() * 1.1 - 0.01).requires_grad_()
                redraw(f, g)
    finally:
        _structured.plan = original  # type: ignore[assignment]
    return [f"{case!r}\n  {m}" for m in faults]


# --- tests ---------------------------------------------------------------------------------------

# (flavour, seed): chains whose factors include index_select matrices made at every call
# (chain 8, 14, 10: the planted fault below fails them) and kept shape-keyed matrices, one
# large enough for "auto" to take the structured engine (chain 10: 8 samples), one with float
# arguments redrawn (chain 2: elu's alpha, clamp's bounds), local programs that are coloured
# (local 9, 1; any 2) and programs by columns (any 1, 11; local 9, 1; any 2): ~4 s in all.
FAST = [("chain", 8), ("chain", 14), ("chain", 10), ("chain", 2), ("local", 9), ("local", 1)]
FAST += [("any", 1), ("any", 11), ("any", 2)]
# those in the daily sample of slow tests (~1.1 s of the 2.9 s alone): each takes only paths
# that the others take too (local 1: colours and columns, as local 9 and any 2; any 1 and 11:
# columns); the rest takes every one of ``PATHS`` and "auto"'s plan, each day
DAILY = {("local", 1), ("any", 1), ("any", 11)}
# what each plan calls where it applies (a non-None result)
PATHS = {
    "chain trace": (cycle, "trace"),
    "chain diagonal": (cycle, "diagonal"),
    "colours": (colors, "colors"),
    "columns": (forward, "diagonal"),
    "movement read per call": (factors, "_moved"),
    "movement kept by shapes": (factors, "_kept_moved"),
}


def test_fuzz_fixed_seeds(monkeypatch: pytest.MonkeyPatch, pytestconfig: pytest.Config) -> None:
    """The fixed seeds agree with their float64 loops over all rounds, and between them took
    every plan of the structured engine, "auto" included: a seed list that stops reaching one
    (a change of the generator or of the engine's rules) fails here rather than checks less.
    The seeds of ``DAILY`` on their days only (``in_todays_sample``); the others take every
    plan without them."""
    taken = taken_paths(monkeypatch, PATHS)
    stats = Stats()
    todays = [
        (flavour, seed)
        for flavour, seed in FAST
        if (flavour, seed) not in DAILY
        or in_todays_sample(pytestconfig, f"test_fuzz28/{flavour} {seed}")
    ]
    faults = [m for flavour, seed in todays for m in fuzz_one(seed, stats, flavour=flavour)]
    assert not faults, "\n\n".join(faults[:5])
    assert taken == set(PATHS), taken
    assert stats.planned_by_auto > 0 and not stats.refused, (stats.planned_by_auto, stats.refused)


def test_fuzz_finds_a_matrix_kept_by_the_index_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixed seeds fail an engine that keeps ``index_select``'s matrix by the index's shape
    (a stale selection after the index changed in place): their varying arguments reach the
    movement factors."""
    shape_key = factors._shape_key

    def by_shape(v: Any, source: Any, value: Any) -> Any:
        if not isinstance(v, list | tuple | dict) and not factors._is(v, source):
            w = value(v)
            if isinstance(w, torch.Tensor) and not w.is_floating_point():
                return ("index", tuple(w.shape))
        return shape_key(v, source, value)

    unkeyed = factors._unkeyed

    def back(v: Any, shape: torch.Size) -> Any:
        if isinstance(v, tuple) and len(v) == 2 and v[0] == "index":
            return torch.arange(math.prod(v[1])).reshape(v[1]) % shape[-1]
        return unkeyed(v, shape)

    monkeypatch.setattr(factors, "_shape_key", by_shape)
    monkeypatch.setattr(factors, "_unkeyed", back)
    for seed in (8, 14):
        assert fuzz_one(seed, flavour="chain"), seed


def laplacian_loop(f: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every sample's and output's Laplacian ``(S, m)`` by grad-of-grad: one
    ``autograd.grad`` per sample, output and input of the rows of ``reference_jacobian``."""
    rows, leaf = reference_jacobian(f, x)  # (S, m, n), differentiable in the leaf
    return torch.stack(
        [
            sum(
                torch.autograd.grad(rows[s, i, j], leaf, retain_graph=True, materialize_grads=True)[
                    0
                ][s, j]
                for j in range(rows.shape[2])
            )
            for s in range(rows.shape[0])
            for i in range(rows.shape[1])
        ]
    ).reshape(rows.shape[:2])


def _filled(kind: str, index: torch.Tensor) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """``h`` with the places ``index`` names along its last dimension set to constants."""
    if kind == "index_fill_":
        return lambda m, h: (h * 2).index_fill_(2, index, -0.5)
    if kind == "index_fill_ of a strided tensor":  # (h's values laid out (C L, 1, C))
        return lambda m, h: (h.mT.contiguous().mT * 2).index_fill_(2, index, -0.5)
    if kind == "setitem":

        def put(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
            h = torch.sin(h) + 0.1  # (written in place: not an output autograd saved)
            h[:, :, index] = 0.25
            return h

        return put

    def put_values(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
        h = h * 1.5
        h[:, :, index] = m.c.expand(len(h), -1, -1)  # (a constant of its own per place)
        return h

    return put_values


@pytest.mark.parametrize(
    "kind", ["index_fill_", "index_fill_ of a strided tensor", "setitem", "setitem of a tensor"]
)
def test_constants_written_twice_at_a_place(kind: str) -> None:
    """``h.index_fill_(2, idx, -0.5)`` and ``h[:, :, idx] = 0.25`` with an index that names
    a place twice (drawn with repeats): ``method="structured"`` refused them ("index_put
    without accumulate writing a place twice", ``_taylor.linear._accumulated``), though the
    written values are constants: whichever write PyTorch keeps, the place's derivatives are
    zero. Values and parameter gradients against the float64 loop; the index changed between
    calls at the same shape, once with no repeat. ``index_fill_`` of a tensor that is not
    contiguous ends in ``prims.copy_strided`` (PyTorch's decomposition keeps the input's
    layout), which had no rule: refused too, at any index (found by seed 417)."""
    g = torch.Generator().manual_seed(5)
    index = torch.tensor([3, 0, 3])
    block = Block(kind, _filled(kind, index), c=_randn(g, 2, 3))
    f = Program([Block("lin(h)", lambda m, h: m.lin(h), lin=_linear(g, 5, 5)), block], (10,), 2, 5)
    for changed in ([1, 4, 1], [2, 0, 4]):
        x = _randn(g, 3, 10)
        stats = Stats()
        assert not check_round(f, x, stats)
        assert not stats.refused, stats.refused  # ("structured" planned every call)
        # the Laplacian engine's rule is the same
        torch.testing.assert_close(
            torchdiv.laplacian(f, x, method="taylor"), laplacian_loop(f, x), rtol=1e-10, atol=1e-10
        )
        index.copy_(torch.tensor(changed))


@pytest.mark.parametrize("into", ["zeros", "h"])
def test_scatter_of_a_permutation(into: str) -> None:
    """``torch.zeros_like(h).scatter(2, perm, h)`` (and into ``h`` itself) with a per-sample
    permutation redrawn between calls: ``scatter`` had no rule, so ``method="structured"``
    and ``"taylor"`` refused it (``"auto"`` fell back); it writes ``src`` over places of
    ``self``, linear in the two where its index names each place once (checked at every
    call, as ``index_put``'s). Values and parameter gradients against the float64 loop, the
    Laplacian by "taylor" against grad-of-grad; an index that names a place twice is refused
    by name, ``"auto"`` right."""
    g = torch.Generator().manual_seed(2)
    perm = _perm_rows(g, BMAX, 2, 5)

    def scattered(m: Block, h: torch.Tensor) -> torch.Tensor:
        base = torch.zeros_like(h) if into == "zeros" else torch.sin(h)
        return base.scatter(2, m.perm[: len(h), :, : m.k], torch.tanh(h[..., : m.k]))

    block = Block("scatter", scattered, perm=perm, k=5 if into == "zeros" else 3)
    f = Program([Block("lin(h)", lambda m, h: m.lin(h), lin=_linear(g, 5, 5)), block], (10,), 2, 5)
    for _ in range(2):
        x = _randn(g, 3, 10)
        stats = Stats()
        assert not check_round(f, x, stats)
        assert not stats.refused, stats.refused
        torch.testing.assert_close(
            torchdiv.laplacian(f, x, method="taylor"), laplacian_loop(f, x), rtol=1e-10, atol=1e-10
        )
        perm.copy_(_perm_rows(g, BMAX, 2, 5))
    perm[:, :, 1] = perm[:, :, 0]  # (place perm[..., 0] written twice)
    x = _randn(g, 3, 10)
    with pytest.raises(NotImplementedError, match="scatter writing a place twice"):
        torchdiv.divergence(f, x, method="structured")
    want = reference_jacobian(f, x)[0].diagonal(dim1=1, dim2=2).sum(-1)
    torch.testing.assert_close(torchdiv.divergence(f, x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flavour", "first"),
    [("chain", s) for s in (100, 110, 120, 130)]
    + [(f, s) for f in ("local", "any") for s in (100, 110, 120)],
)
def test_fuzz_many(flavour: str, first: int) -> None:
    """Ten more programs of a flavour (3-23 s each)."""
    faults = [m for s in range(first, first + 10) for m in fuzz_one(s, flavour=flavour)]
    assert not faults, "\n\n".join(faults[:5])


if __name__ == "__main__":
    first, count = int(sys.argv[1]), int(sys.argv[2])
    large = None if len(sys.argv) < 4 or sys.argv[3] == "-" else sys.argv[3] == "large"
    flavour = None if len(sys.argv) < 5 else sys.argv[4]
    stats = Stats()
    for s in range(first, first + count):
        for message in fuzz_one(s, stats, large, flavour):
            print(message, "\n", flush=True)
    print("planned", stats.planned, "by auto", stats.planned_by_auto, file=sys.stderr)
    for k, v in sorted(stats.refused.items(), key=lambda kv: -kv[1]):
        print(v, k, file=sys.stderr)
