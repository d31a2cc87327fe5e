"""Products of shared matrices, kept across calls while their factors keep their values.

A chain's trace multiplies weights with weights (``W_1 W_L``, joined around the cycle, and
``S_2 o S_1^T``): for a 3-layer MLP with D = H = 256, B = 128, about as many multiply-adds
as the forward pass itself, yet the same result at every evaluation of a frozen network (an
ODE solve, a likelihood over many batches). ``product`` keeps the last ``SIZE`` such
products with copies of their factors and returns a kept one only when both factors are equal,
element by element, to the copies: a comparison of the factors' elements, far cheaper than the
product, and right however the weights were changed (in place, through ``.data``, which does
not move a tensor's version counter, or replaced). Factors that require grad under grad mode
are always multiplied afresh: the product must carry their graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
SIZE = 8
MAX_FACTOR_ELEMENTS = 1 << 20  # larger factors are not copied: at most ~100 MB kept in float32
MIN_SAVING = 16  # kept only if the product costs this many times a comparison of the factors


@dataclass(frozen=True)
class _Kept:
    op: Callable[[Tensor, Tensor], Tensor]
    a: Tensor
    b: Tensor
    result: Tensor


_kept: list[_Kept] = []


def product(op: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor, cost: int) -> Tensor:
    """``op(a, b)``, from a kept result if ``a`` and ``b`` equal the factors it was computed
    from; ``cost``: the product's multiply-adds."""
    tracked = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    compared = a.numel() + b.numel()
    if tracked or compared > MAX_FACTOR_ELEMENTS or cost < MIN_SAVING * compared:
        return op(a, b)
    for i, kept in enumerate(_kept):
        if kept.op is op and _equal(kept.a, a) and _equal(kept.b, b):
            _kept.append(_kept.pop(i))  # most recently used last
            return kept.result
    result = op(a, b)  # no graph: nothing requires grad (or grad mode is off)
    _kept.append(_Kept(op, a.detach().clone(), b.detach().clone(), result))
    del _kept[:-SIZE]
    return result


# integers of each element size: comparing bit patterns is exact (NaN equals the same NaN,
# -0.0 differs from 0.0) and, on CPU, ~30x faster than torch.equal on floats
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _equal(kept: Tensor, now: Tensor) -> bool:
    """Whether ``now`` holds the same bits as ``kept``."""
    if kept.shape != now.shape or kept.dtype != now.dtype or kept.device != now.device:
        return False
    bits = _BITS.get(now.element_size())
    if bits is None or now.is_complex():
        return torch.equal(kept, now.detach())
    return torch.equal(kept.view(bits), now.detach().view(bits))


def clear() -> None:
    _kept.clear()
