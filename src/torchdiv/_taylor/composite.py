"""Rules for normalisations and softmax, written with the jet arithmetic of ``jet``.

Softmax ``s = softmax(a)`` along ``dim`` has closed-form jets. With ``<p, q> = sum_dim p q``
and ``c_k = jac_k - <s, jac_k>`` (the centred direction):

    jac_s[k] = s c_k,        lap_s = s (lap + Q - <s, lap + Q>),     Q = sum_k c_k^2,

and ``log_softmax`` has ``jac = c_k``, ``lap = lap_a - <s, lap_a> - <s, Q>`` (the second
derivative of log-sum-exp is the variance of the direction under ``s``). Fully masked rows
(``s = 0``) give zeros, as ``_safe_softmax`` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from torchdiv._taylor.elementwise import RULES as ELEMENTWISE
from torchdiv._taylor.jet import (
    Context,
    Jet,
    UnsupportedOp,
    add,
    full_jac,
    full_lap,
    inner,
    linear,
    product,
    scale,
    square_sum,
)

aten = torch.ops.aten
Tensor = torch.Tensor


def _normalize(ctx: Context, a: Jet, dims: tuple[int, ...], eps: float) -> tuple[Jet, Jet, Jet]:
    """``(a - mean) * rstd`` over ``dims``, with the mean and ``rstd = (var + eps)^-1/2``.
    A half-precision ``a`` (float16, bfloat16) is normalised in float32 and the three cast
    back, as PyTorch's kernels compute: in float16 the squares of the centred directions
    and their derivatives overflow (``nan`` parameter gradients of a squared group-norm
    Laplacian of about 2e4 where float16 reaches 65504)."""
    dtype = a.value.dtype
    if dtype in (torch.float16, torch.bfloat16):
        wide = _normalize(ctx, _cast(a, torch.float32), dims, eps)
        return _cast(wide[0], dtype), _cast(wide[1], dtype), _cast(wide[2], dtype)
    ctx = inner(ctx)
    mean = linear(ctx, torch.mean, a, dims, keepdim=True)
    centred = add(a, mean, -1)
    square = ELEMENTWISE[aten.pow.Tensor_Scalar](ctx, centred, 2)
    var = linear(ctx, torch.mean, square, dims, keepdim=True)
    rstd = ELEMENTWISE[aten.rsqrt.default](ctx, add(var, eps))
    return product(ctx, torch.mul, centred, rstd), mean, rstd


def _cast(a: Jet, dtype: torch.dtype) -> Jet:
    """``a`` (value and derivatives) in ``dtype``."""
    jac, lap = (None if t is None else t.to(dtype) for t in (a.jac, a.lap))
    return Jet(a.value.to(dtype), jac, lap)


def _variance(
    ctx: Context, a: Jet, dims: Any = None, correction: float = 1, keepdim: bool = False
) -> tuple[Jet, Jet]:
    """``(var, mean)`` over ``dims`` (all if ``None``), with ``correction`` (Bessel's = 1).
    The sum of squares is divided by ``max(0, count - correction)``, as PyTorch divides it:
    by zero (``nan`` or ``inf``, with PyTorch's warning) where no degree of freedom is left,
    such as one element with Bessel's correction (a Python division by zero raised there).
    A complex ``a`` has a real variance, of ``|a - mean|^2 = re^2 + im^2`` (its square was
    taken: a complex "variance", and the Laplacians and divergences of ``"taylor"``,
    ``"structured"`` and ``"auto"`` silently off)."""
    ctx = inner(ctx)
    dims = tuple(dims) if dims else tuple(range(a.value.dim()))  # None or []: every dim
    count = math.prod(a.shape[d] for d in dims)
    mean = linear(ctx, torch.mean, a, dims, keepdim=True)
    square = _squared_modulus(ctx, add(a, mean, -1))
    freedom = max(0, count - (1 if correction is None else correction))
    var = scale(
        linear(ctx, torch.sum, square, dims, keepdim=keepdim),
        1 / freedom if freedom else math.inf,
    )
    return var, mean if keepdim else linear(ctx, torch.squeeze, mean, dims)


def _squared_modulus(ctx: Context, a: Jet) -> Jet:
    """``|a|^2`` elementwise, real: ``a^2``, or ``re^2 + im^2`` for a complex ``a`` (its
    square is complex; ``torch.real``/``torch.imag`` are linear)."""
    power = ELEMENTWISE[aten.pow.Tensor_Scalar]
    if not a.value.is_complex():
        return power(ctx, a, 2)
    real, imag = linear(ctx, torch.real, a), linear(ctx, torch.imag, a)
    return add(power(ctx, real, 2), power(ctx, imag, 2))


def _var(
    ctx: Context, a: Jet, dims: Any = None, *, correction: float = 1, keepdim: bool = False
) -> Jet:
    return _variance(ctx, a, dims, correction, keepdim)[0]


def _var_mean(
    ctx: Context, a: Jet, dims: Any = None, *, correction: float = 1, keepdim: bool = False
) -> tuple[Jet, Jet]:
    return _variance(ctx, a, dims, correction, keepdim)


def _std_mean(
    ctx: Context, a: Jet, dims: Any = None, *, correction: float = 1, keepdim: bool = False
) -> tuple[Jet, Jet]:
    """``(std, mean)``: the masked root of ``_variance``'s ``var`` (``_masked_root``), value
    and every derivative 0 where the variance is 0 (equal entries), as ``_core.modes._std``
    (PyTorch's first derivatives are 0 there, its second ones ``nan``). One recorded op, not
    ``var`` and six for its masked root (+20 % on an ``"auto"`` divergence of a hand-written
    LayerNorm). A float16 or bfloat16 ``a`` in float32, rounded once, as PyTorch's."""
    dtype = a.value.dtype
    if dtype in (torch.float16, torch.bfloat16):
        std, mean = _std_mean(
            ctx, _cast(a, torch.float32), dims, correction=correction, keepdim=keepdim
        )
        return _cast(std, dtype), _cast(mean, dtype)
    var, mean = _variance(ctx, a, dims, correction, keepdim)
    return _masked_root(ctx, var), mean


def _std(
    ctx: Context, a: Jet, dims: Any = None, *, correction: float = 1, keepdim: bool = False
) -> Jet:
    return _std_mean(ctx, a, dims, correction=correction, keepdim=keepdim)[0]


def _masked_root(ctx: Context, total: Jet) -> Jet:
    """``sqrt(total)`` of a ``total >= 0`` with value and derivatives 0 where it is 0: not
    differentiable there (a kink, ``|t|`` along a direction), and PyTorch's backward gives 0
    (exact for a total that is 0 at every x, ``r_i - r_i``). The value is taken from the
    guarded root too: ``sqrt(0)``'s backward, ``0 / 0``, made the parameter gradients nan
    where the zero total depends on them (PaiNN's vector features of a padding atom). A
    ``nan`` total stays ``nan``. The second-order term is taken from the new ``jac``,

        jac' = d1 jac,   lap' = d1 lap - sum_k jac'_k^2 / sqrt(t),   d1 = 1 / (2 sqrt(t)),

    as ``d2 = -1 / (4 t^1.5)`` overflowed float32 from ``t ~ 1e-26`` (``-inf`` times a
    ``sum_k jac_k^2`` underflowed to 0: ``nan`` Laplacians of a std of ~1e-15).
    """
    nonzero = total.value != 0
    root = torch.sqrt(torch.where(nonzero, total.value, torch.ones_like(total.value)))
    d1 = torch.where(nonzero, 0.5 / root, torch.zeros_like(root))
    value = torch.where(nonzero, root, torch.zeros_like(root))
    jac = None if total.jac is None else d1 * total.jac
    lap = None if total.lap is None else d1 * total.lap
    if jac is not None and ctx.second_order:
        bend = square_sum(jac) / root
        lap = -bend if lap is None else lap - bend
    return Jet(value, jac if ctx.jac else None, lap)


def _vector_norm(
    ctx: Context, a: Jet, order: float = 2, dims: Any = None, keepdim: bool = False, **_: Any
) -> Jet:
    if order != 2:
        raise UnsupportedOp(f"aten.linalg_vector_norm with ord={order} (only 2 has a rule)")
    if a.value.dtype in (torch.float16, torch.bfloat16):  # in float32, as PyTorch's kernel:
        wide = _vector_norm(ctx, _cast(a, torch.float32), order, dims, keepdim)  # |a|^2
        return _cast(wide, a.value.dtype)  # overflowed float16 from |a| = 256 (inf Laplacians)
    square = _squared_modulus(inner(ctx), a)  # (a complex total was a complex "norm")
    total = linear(inner(ctx), torch.sum, square, dims, keepdim=keepdim)
    return _masked_root(ctx, total)  # a zero vector's norm: 0, derivatives 0, as PyTorch's


def _batch_norm_eval(
    ctx: Context,
    a: Jet,
    weight: Any,
    bias: Any,
    mean: Tensor,
    var: Tensor,
    momentum: float,
    eps: float,
) -> tuple[Jet, Tensor, Tensor]:
    """Batch norm with running statistics: an affine map per channel (dimension 1)."""
    per_channel = (-1, *[1] * (a.value.dim() - 2))
    rstd = torch.rsqrt(var + eps)
    scale_ = rstd if weight is None else rstd * weight
    shift = -mean * scale_ if bias is None else bias - mean * scale_
    out = add(scale(a, scale_.reshape(per_channel)), shift.reshape(per_channel))
    empty = a.value.new_zeros(0)
    return out, empty, empty


def _batch_norm(
    ctx: Context,
    a: Jet,
    weight: Any,
    bias: Any,
    mean: Any,
    var: Any,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[Jet, Tensor, Tensor]:
    """Batch norm: with running statistics, in evaluation mode; with the batch's own and none
    to update, as ``F.instance_norm`` calls it (samples folded into the channels, ``(1, N*C,
    ...)``: per sample; over samples, the mixing watch has refused it before)."""
    if not training and mean is not None and var is not None:
        return _batch_norm_eval(ctx, a, weight, bias, mean, var, momentum, eps)
    if mean is not None or var is not None:
        raise UnsupportedOp("aten.native_batch_norm in training mode, updating running statistics")
    per_channel = (-1, *[1] * (a.value.dim() - 2))
    normed, _, _ = _normalize(ctx, a, (0, *range(2, a.value.dim())), eps)
    weight = None if weight is None else weight.reshape(per_channel)
    bias = None if bias is None else bias.reshape(per_channel)
    empty = a.value.new_zeros(0)
    return _affine(ctx, normed, weight, bias), empty, empty


def _affine(ctx: Context, a: Jet, weight: Tensor | None, bias: Tensor | None) -> Jet:
    out = a if weight is None else product(ctx, torch.mul, a, weight)
    return out if bias is None else add(out, bias)


def _layer_norm(
    ctx: Context, a: Jet, shape: list[int], weight: Any, bias: Any, eps: float
) -> tuple[Jet, Jet, Jet]:
    dims = tuple(range(a.value.dim() - len(shape), a.value.dim()))
    normed, mean, rstd = _normalize(ctx, a, dims, eps)
    return _affine(ctx, normed, weight, bias), mean, rstd


def _group_norm(
    ctx: Context,
    a: Jet,
    weight: Any,
    bias: Any,
    n: int,
    c: int,
    hw: int,
    groups: int,
    eps: float,
) -> tuple[Jet, Jet, Jet]:
    grouped = linear(inner(ctx), torch.reshape, a, (n, groups, -1))
    normed, mean, rstd = _normalize(ctx, grouped, (2,), eps)
    normed = linear(ctx, torch.reshape, normed, a.shape)
    per_channel = (c, *[1] * (a.value.dim() - 2))
    out = _affine(
        ctx,
        normed,
        None if weight is None else weight.reshape(per_channel),
        None if bias is None else bias.reshape(per_channel),
    )
    flat = (n, groups)
    return out, linear(ctx, torch.reshape, mean, flat), linear(ctx, torch.reshape, rstd, flat)


def _centred(ctx: Context, a: Jet, s: Tensor, dim: int) -> Tensor:
    """``c_k = jac_k - <s, jac_k>`` along ``dim`` (of the value), shape ``(K,) + a.shape``."""
    jac = full_jac(ctx, a)
    return jac - (s * jac).sum(dim % s.dim() + 1, keepdim=True)


def _softmax(ctx: Context, a: Jet, dim: int, *_: Any) -> Jet:
    s = torch.softmax(a.value, dim)
    return _softmax_jet(ctx, a, s, dim)


def _safe_softmax(ctx: Context, a: Jet, dim: int, *_: Any, **__: Any) -> Jet:
    return _softmax_jet(ctx, a, aten._safe_softmax(a.value, dim), dim)


def _softmax_jet(ctx: Context, a: Jet, s: Tensor, dim: int) -> Jet:
    if a.jac is None and a.lap is None:
        return Jet(s, None, None)
    c = _centred(ctx, a, s, dim)
    if not ctx.second_order:
        return Jet(s, s * c, None)
    total = full_lap(a) + c.square().sum(0)
    return Jet(s, s * c, s * (total - (s * total).sum(dim, keepdim=True)))


def _log_softmax(ctx: Context, a: Jet, dim: int, *_: Any) -> Jet:
    y = torch.log_softmax(a.value, dim)
    if a.jac is None and a.lap is None:
        return Jet(y, None, None)
    s = y.exp()
    c = _centred(ctx, a, s, dim)
    if not ctx.second_order:
        return Jet(y, c, None)
    total = full_lap(a)
    lap = total - (s * (total + c.square().sum(0))).sum(dim, keepdim=True)
    return Jet(y, c, lap)


RULES: dict[Any, Callable[..., Any]] = {
    aten.native_layer_norm.default: _layer_norm,
    aten.native_group_norm.default: _group_norm,
    aten._softmax.default: _softmax,
    aten._log_softmax.default: _log_softmax,
    aten.var.correction: _var,
    aten.var_mean.correction: _var_mean,
    aten.std.correction: _std,
    aten.std_mean.correction: _std_mean,
    aten.linalg_vector_norm.default: _vector_norm,
    aten._native_batch_norm_legit_no_training.default: _batch_norm_eval,
    aten.native_batch_norm.default: _batch_norm,
}
if hasattr(aten, "_safe_softmax"):  # PyTorch >= 2.5: attention's softmax on the math backend
    RULES[aten._safe_softmax.default] = _safe_softmax
