"""Products of shared matrices, kept across calls while their factors keep their values.

A chain's trace multiplies weights with weights (``W_1 W_L``, joined around the cycle, and
``S_2 o S_1^T``): for a 3-layer MLP with D = H = 256, B = 128, about as many multiply-adds as
the forward pass itself, yet the same result at every evaluation of a network whose weights
did not change (an ODE solve, a likelihood over many batches, repeated calls between
optimiser steps). ``matmul`` and ``join`` keep the last ``SIZE`` such products with copies of
their factors and return a kept one only when both factors hold, bit for bit, the values of
the copies: a comparison of the factors' bytes (``memcmp``: ~7 us for 256 x 256 floats,
against ~450 us for ``W_1 W_L``), right however the weights were changed (in place, through
``.data``, which does not move a tensor's version counter, or replaced).

Factors that require grad under grad mode get the kept value too, through ``_Product``: a
graph node whose backward is the product's own (``dA = G B^T``, ``dB = A^T G`` for
``matmul``) from this call's factors, so that parameter gradients (and their gradients) are
those of the plain product.

A kept product serves only calls under the float32 precision it was computed at
(``torchdiv._core.precision``): one kept under ``torch.set_float32_matmul_precision
("medium")`` (bfloat16 products on a CPU with them) was served after the caller set
``"highest"`` again, a divergence 7e-4 off where float32's is 2.5e-7.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from torchdiv._core.precision import float32_eps

Tensor = torch.Tensor
SIZE = 8
MAX_FACTOR_ELEMENTS = 1 << 20  # larger factors are not copied: at most ~100 MB kept in float32
MIN_SAVING = 16  # kept only if the product costs this many times a comparison of the factors


@dataclass(frozen=True)
class _Op:
    """A product of two factors, and its gradients with respect to each of them given the
    result's gradient ``g``: ``grad_a(b, g)``, ``grad_b(a, g)``."""

    run: Callable[[Tensor, Tensor], Tensor]
    grad_a: Callable[[Tensor, Tensor], Tensor]
    grad_b: Callable[[Tensor, Tensor], Tensor]


_MATMUL = _Op(lambda a, b: a @ b, lambda b, g: g @ b.mT, lambda a, g: a.mT @ g)
_JOIN = _Op(lambda a, b: a * b.mT, lambda b, g: g * b.mT, lambda a, g: (g * a).mT)


@dataclass(frozen=True)
class _Kept:
    op: _Op
    a: Tensor
    b: Tensor
    result: Tensor
    precision: float  # float32_eps of the device's matrix products when it was computed


_kept: list[_Kept] = []


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` of two matrices, from a kept result if ``a`` and ``b`` hold the values of the
    factors it was computed from; differentiable (with respect to both) like ``a @ b``. Kept
    when the product costs at least ``MIN_SAVING`` multiply-adds per compared element."""
    cost = a.shape[0] * a.shape[1] * b.shape[1]
    return _product(_MATMUL, a, b, cost >= MIN_SAVING * (a.numel() + b.numel()))


def join(a: Tensor, b: Tensor) -> Tensor:
    """``a o b^T`` (elementwise) of two matrices, kept as ``matmul`` is where the factors are
    compared by ``memcmp`` (CPU): the transposed read makes the product ~6x slower than the
    comparison (256 x 256 floats)."""
    return _product(_JOIN, a, b, _compared_by_bytes(a) and _compared_by_bytes(b))


def _product(op: _Op, a: Tensor, b: Tensor, worth: bool) -> Tensor:
    # (traced by Dynamo, ``_structured.replay``: a graph computes the product at every call)
    if not worth or a.numel() + b.numel() > MAX_FACTOR_ELEMENTS or torch.compiler.is_compiling():
        return op.run(a, b)
    precision = float32_eps(a.device, ("matmul",)) if a.dtype == torch.float32 else 0.0
    result = _found(op, a, b, precision)
    if result is None:
        result = op.run(a.detach(), b.detach())
        _kept.append(_Kept(op, _copy(a), _copy(b), result, precision))
        del _kept[:-SIZE]
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        out: Tensor = _Product.apply(op, a, b, result)
        return out
    return result


def _found(op: _Op, a: Tensor, b: Tensor, precision: float) -> Tensor | None:
    for i, kept in enumerate(_kept):
        same = kept.op is op and kept.precision == precision
        if same and _equal(kept.a, a) and _equal(kept.b, b):
            _kept.append(_kept.pop(i))  # most recently used last
            return kept.result
    return None


class _Product(torch.autograd.Function):
    """``op(a, b)`` given its value, with the backward of ``op`` from the saved factors
    (itself differentiable: a gradient of a parameter gradient goes through it).

    Its ``backward`` runs eagerly under ``torch.compile`` too: the product exists only where
    the structured engine ran eagerly (a compiled step's one graph break), and the step's
    ``backward()`` would otherwise hand this Python frame to Dynamo, which compiled it as two
    graphs of their own (guards and wrappers at every step)."""

    @staticmethod
    def forward(ctx: Any, op: _Op, a: Tensor, b: Tensor, result: Tensor) -> Tensor:
        ctx.op = op
        ctx.save_for_backward(a, b)
        return result.detach()  # a new tensor object: never the kept one itself

    @staticmethod
    @torch.compiler.disable
    def backward(  # type: ignore[override]
        ctx: Any, grad: Tensor
    ) -> tuple[None, Tensor | None, Tensor | None, None]:
        a, b = ctx.saved_tensors
        _, need_a, need_b, _ = ctx.needs_input_grad
        grad_a = ctx.op.grad_a(b, grad) if need_a else None
        grad_b = ctx.op.grad_b(a, grad) if need_b else None
        return None, grad_a, grad_b, None


def _copy(t: Tensor) -> Tensor:
    """What ``t`` is compared with later: a private copy, or ``t`` itself when it views a
    kept result (``W_1 W_L`` in the join), whose values never change (kept results are only
    read: nothing here or in the cycle writes to them, and none is handed to the caller)."""
    if any(_same_view(kept.result, t) for kept in _kept):
        return t.detach()
    return t.detach().clone(memory_format=torch.contiguous_format)


def _same_view(kept: Tensor, now: Tensor) -> bool:
    """Whether ``now`` shows the very elements of ``kept``."""
    return (
        kept.data_ptr() == now.data_ptr()
        and kept.shape == now.shape
        and kept.stride() == now.stride()
        and kept.dtype == now.dtype
        and kept.device == now.device
    )


def _memcmp() -> Callable[[int, int, int], int] | None:
    """The C library's ``memcmp`` (``None`` where it cannot be loaded)."""
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c")).memcmp
    except (OSError, TypeError, AttributeError):
        return None
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return function  # type: ignore[no-any-return]


_MEMCMP = _memcmp()
# integers of each element size: comparing bit patterns is exact (NaN equals the same NaN,
# -0.0 differs from 0.0), and faster than torch.equal on floats
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not a subclass whose data lies elsewhere


def _compared_by_bytes(t: Tensor) -> bool:
    return (
        _MEMCMP is not None
        and t.device.type == "cpu"
        and type(t) in _PLAIN
        and not t.is_complex()
        and t.element_size() in _BITS
    )


def _equal(kept: Tensor, now: Tensor) -> bool:
    """Whether ``now`` holds the same bits as ``kept`` (a contiguous copy)."""
    if kept.shape != now.shape or kept.dtype != now.dtype or kept.device != now.device:
        return False
    if _same_view(kept, now):  # a kept result (see _copy): a private copy is never seen
        return True
    if now.is_complex() or now.element_size() not in _BITS:
        return torch.equal(kept, now.detach())
    if _MEMCMP is not None and _compared_by_bytes(now):
        if not now.is_contiguous() or now.is_neg():  # (a weight is neither: no copy made)
            now = now.detach().resolve_neg().contiguous()
        return _MEMCMP(kept.data_ptr(), now.data_ptr(), now.numel() * now.element_size()) == 0
    bits = _BITS[now.element_size()]
    return torch.equal(kept.view(bits), now.detach().contiguous().view(bits))


def clear() -> None:
    _kept.clear()
