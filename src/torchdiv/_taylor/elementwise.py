"""Rules for elementwise functions: ``phi(a)`` propagates as ``chain(a, phi, phi', phi'')``.

Each entry of ``DERIVATIVES`` maps an ATen op to ``derivatives(x, y, *args) -> (phi'(x),
phi''(x) or None)``, given the input ``x``, the output ``y = phi(x)`` and the op's other
arguments, reusing ``y`` where the derivative is cheaper in terms of it (``tanh' = 1 - y^2``).
``BINARY`` does the same for functions of two tensors, ``phi(a, b)``, with the partial
derivatives ``((phi_a, phi_b), (phi_aa, phi_ab, phi_bb))`` (``jet.chain2``).

Where a function is not differentiable (``hypot`` and ``atan2`` at the origin) the rules
return zero derivatives, as PyTorch's ``cdist`` backward does at zero distance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from torchdiv._core.versions import slope
from torchdiv._taylor.jet import (
    Context,
    Jet,
    UnsupportedOp,
    aligned_jac,
    chain,
    chain2,
    inner,
    product,
    scaled_jac,
    sum_squares,
    value_of,
)

aten = torch.ops.aten
Tensor = torch.Tensor
Derivatives = Callable[..., tuple[Tensor, Tensor | None]]
Partials = tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
Given = Callable[..., Jet]


def _tanh_first(x: Tensor, y: Tensor) -> Tensor:
    return torch.addcmul(y.new_ones(()), y, y, value=-1)  # 1 - y^2 in one kernel


def _tanh(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    d1 = _tanh_first(x, y)
    return d1, -2 * y * d1


def _sigmoid_first(x: Tensor, y: Tensor) -> Tensor:
    return y * (1 - y)


def _sigmoid(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    d1 = _sigmoid_first(x, y)
    return d1, d1 * (1 - 2 * y)


def _step(t: Tensor) -> Tensor:
    """``1`` where ``t > 0``, else ``0`` (``0`` at ``nan`` too: ``sign(nan)`` is ``0``; where
    ``f``'s output is ``nan`` anyway), in ``t``'s dtype, by two
    arithmetic ops: on the CPU a comparison, a cast and ``where`` or ``masked_fill`` each took
    3-20x an ``exp`` of the same tensor (a (256, 64) float32 tensor, one thread: ``x > 0``
    13-17 us, ``torch.where`` 70-85 us, ``masked_fill`` 78 us, ``clamp`` then ``sign`` 6 us;
    ELU's first and second derivatives 205 -> ~30 us, a quarter of the structured engine's
    D = 8 divergence of zuko's CNF velocity)."""
    return t.clamp(min=0).sign()


def _relu(x: Tensor, y: Tensor) -> tuple[Tensor, None]:
    return _step(x), None


def _gelu(x: Tensor, y: Tensor, approximate: str = "none") -> tuple[Tensor, Tensor]:
    if x.dtype == torch.float16:  # (see _saturated)
        x = _saturated(x)
    if approximate == "tanh":  # y = x/2 (1 + tanh u), u = c (x + 0.044715 x^3)
        c = math.sqrt(2 / math.pi)
        u = c * (x + 0.044715 * x**3)
        t = torch.tanh(u)
        # du of x within +-32, beyond which sech^2 u is 0 in every dtype (float64's sigmoid
        # underflows from |u| = 373, |x| = 22): du overflowed float16 from |x| = 782, and
        # 0 * inf made the first derivative nan there (autograd's: 1)
        xc = x.clamp(-32, 32)
        du, ddu = c * (1 + 3 * 0.044715 * xc * xc), c * 6 * 0.044715 * xc
        # sech^2 u = 4 sigmoid(2u) sigmoid(-2u): not 1 - t^2, which cancels where |u| > 3
        # (|x| > 2.5), in float32 to ~1e-3 of itself, 10x autograd's double backward's
        # error; nor 1 / cosh^2, whose overflow made parameter gradients nan at |x| > 13;
        # nor 4a / (1 + a)^2 with a = e^(-2|u|): through |u|, whose derivative sign(0) is
        # 0, its own derivatives (Taylor in Taylor, parameter gradients of a biharmonic)
        # lost sech^2's second derivative -2 at u = 0 (the biharmonic at x = 0 63% off)
        sech2 = 4 * torch.sigmoid(2 * u) * torch.sigmoid(-2 * u)
        s = sech2 * du  # (first: du^2 overflows float16 from |x| = 41, 0 * inf was nan)
        d1 = 0.5 * (1 + t) + 0.5 * x * s
        return d1, s + 0.5 * x * (sech2 * ddu - 2 * t * s * du)
    density = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    return cdf + x * density, density * (2 - x * x)


def _saturated(x: Tensor) -> Tensor:
    """``x`` within +-10, where GELU's derivatives (both forms) are already 1 or 0 and 0 in
    every dtype (the density ~1e-22), for float16: beyond, ``x * x`` overflowed from
    |x| = 256 times a density of 0 (the exact form's second derivative ``nan``), and the
    backward pass through the tanh form's (parameter gradients of a Laplacian) overflowed
    its cotangents from |x| ~ 20, times a sigmoid's 0 derivative (``nan``)."""
    return x.clamp(-10, 10)


def _silu(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s)), s * (1 - s) * (2 + x * (1 - 2 * s))


def _below(t: Tensor, edge: float) -> Tensor:
    """``min(t, edge)`` with slope 1 only where ``t < edge``, 0 at ``edge`` itself (at every
    torch: ``hardtanh``'s backward, where ``clamp``'s passes there up to torch 2.13): the
    input of a branch whose derivatives autograd's double backward takes on ``t < edge``."""
    return F.hardtanh(t, -math.inf, edge)


def _softplus(x: Tensor, y: Tensor, beta: float = 1.0, threshold: float = 20.0):  # type: ignore[no-untyped-def]
    """``log(1 + e^(beta x)) / beta``, ``x`` from ``beta x > threshold`` on: autograd's first
    derivative ``sigmoid(beta x)`` up to the threshold, its double backward ``beta s (1 - s)``
    below it only (strictly: 0 at ``beta x == threshold``, here too, and in the graph of the
    first derivative, which the structured engine's parameter gradients differentiate)."""
    z = x * beta
    edge = z - threshold  # (exact near the threshold: Sterbenz)
    linear = _step(edge)  # 1 where beta x > threshold, else 0
    below = edge.clamp(max=0).sign()  # -1 where beta x < threshold, else 0
    s = torch.sigmoid(_below(z, threshold))  # (above the threshold not read: linear)
    rest = 1 - s
    return torch.addcmul(s, rest, linear), -beta * s * rest * below


def _elu(x: Tensor, y: Tensor, alpha: float = 1.0, scale: float = 1.0, input_scale: float = 1.0):  # type: ignore[no-untyped-def]
    """``scale x`` for ``x > 0``, else ``scale alpha (e^(input_scale x) - 1)`` (``selu``,
    ``celu``): autograd's first derivative takes the negative side at ``x <= 0``, its double
    backward at ``x < 0`` only (0 at ``x == 0``, here too, and in the first derivative's
    graph: ``_below``)."""
    # the exponential of the negative side only: exp(input_scale * x) overflows at a large
    # positive x (88.7 / input_scale in float32) and where's backward gives 0 * inf = nan there
    low = _below(x, 0.0)
    d1_neg = scale * alpha * input_scale * torch.exp(low if input_scale == 1 else input_scale * low)
    positive = _step(x)
    negative = d1_neg * (1 - positive)
    return torch.add(negative, positive, alpha=scale), negative * (low.sign() * -input_scale)


def _leaky_relu(x: Tensor, y: Tensor, slope: float = 0.01) -> tuple[Tensor, None]:
    return slope + (1 - slope) * _step(x), None


def _log_sigmoid_first(x: Tensor, y: Tensor) -> Tensor:
    """``logsigmoid' = sigmoid(-x)``."""
    return torch.sigmoid(-x)


def _log_sigmoid(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``logsigmoid(x) = -log(1 + e^-x)``, smooth: ``phi' = s = sigmoid(-x)``,
    ``phi'' = -s (1 - s)``. A rule of its own: PyTorch's decomposition, ``min(x, 0) -
    log1p(exp(-|x|))``, has a kink at 0 in each part, whose second derivatives there (``abs``'s
    ``sign(0) = 0``) lost the -1/4 at ``x == 0``. (``log_sigmoid_forward``'s output is
    ``(y, buffer)``: ``y``'s rule here, its ``RULES`` entry below.)"""
    s = torch.sigmoid(-x)
    return s, s * (s - 1)


def _x_log_number(log: Callable[[Tensor], Tensor], shift: float) -> Derivatives:
    """``x log(b + shift)`` for a number ``b`` (``xlogy.Scalar_Other``,
    ``special_xlog1py.other_scalar``): ``phi' = log(b + shift)`` (0 where ``x == 0`` if
    ``b + shift <= 0``), ``phi'' = 0``."""

    def derivatives(x: Tensor, y: Tensor, b: float) -> tuple[Tensor, None]:
        first = log(x.new_full((), b)).expand_as(x)
        if b + shift > 0:
            return first, None
        return torch.where(x == 0, torch.zeros_like(x), first), None

    return derivatives


def _pow(x: Tensor, y: Tensor, p: float) -> tuple[Tensor, Tensor | None]:
    if p == 0:
        return torch.zeros_like(x), None
    if p == 1:
        return torch.ones_like(x), None
    return p * x ** (p - 1), (p * (p - 1) * x ** (p - 2) if p != 2 else torch.full_like(x, 2.0))


# torch 2.14 moved clamp's derivatives at its edges: number bounds pass nothing there (as
# ``hardtanh``), tensor bounds half to ``x`` and half to the bound (as ``maximum``'s ties);
# asked of the running torch, whose version does not say it (a 2.14 nightly from before)
CLAMP_EDGES_SPLIT = slope(lambda t: t.clamp(max=1.0), 1.0) == 0


def _clamp(x: Tensor, y: Tensor, low: Any = None, high: Any = None) -> tuple[Tensor, None]:
    """``clamp``: slope 1 on ``[low, high]``, edges included, as autograd's backward has it
    (on ``(low, high)`` from torch 2.14 on: ``CLAMP_EDGES_SPLIT``)."""
    above, below = (torch.gt, torch.lt) if CLAMP_EDGES_SPLIT else (torch.ge, torch.le)
    inside = torch.ones_like(x, dtype=torch.bool)
    if low is not None:
        inside &= above(x, low)
    if high is not None:
        inside &= below(x, high)
    return inside.to(x.dtype), None


def _hardtanh(x: Tensor, y: Tensor, low: float = -1.0, high: float = 1.0) -> tuple[Tensor, None]:
    """``hardtanh`` (and ``relu6``): slope 1 on ``(low, high)``, 0 at the edges, as autograd's
    backward has it (unlike ``clamp``'s): saturated pixels at exactly -1 or 1 are common."""
    return ((x > low) & (x < high)).to(x.dtype), None


def _hardsigmoid(x: Tensor, y: Tensor) -> tuple[Tensor, None]:
    """``relu6(x + 3) / 6``: slope 1/6 on ``(-3, 3)``, 0 at the edges (autograd's)."""
    return ((x > -3) & (x < 3)).to(x.dtype) / 6, None


def _hardswish(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``x relu6(x + 3) / 6``: ``x / 3 + 1/2`` on ``(-3, 3)``, 0 below, 1 from 3 on, and
    second derivative 1/3 on ``(-3, 3)``, as autograd's backward and double backward have it
    at the edges (a decomposition through ``clamp`` read 1.5 at 3 and -0.5 at -3)."""
    inside = ((x > -3) & (x < 3)).to(x.dtype)
    return torch.where(x >= 3, torch.ones_like(x), inside * (x / 3 + 0.5)), inside / 3


def _arcsine(x: Tensor, y: Tensor, sign: float) -> tuple[Tensor, Tensor]:
    """``asin`` (``sign = 1``) and ``acos`` (``-1``): ``phi' = sign (1 - x^2)^(-1/2)``,
    ``phi'' = phi' x / (1 - x^2)``."""
    d1 = sign * torch.rsqrt(1 - x * x)
    return d1, d1 * x / (1 - x * x)


def _erfinv(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``phi' = sqrt(pi)/2 exp(y^2)`` (the inverse of ``erf' = 2/sqrt(pi) exp(-y^2)``),
    ``phi'' = 2 y phi'^2``."""
    d1 = math.sqrt(math.pi) / 2 * torch.exp(y * y)
    return d1, 2 * y * d1 * d1


DERIVATIVES: dict[Any, Derivatives] = {
    aten.tanh.default: _tanh,
    aten.sigmoid.default: _sigmoid,
    aten.relu.default: _relu,
    aten.gelu.default: _gelu,
    aten.silu.default: _silu,
    aten.softplus.default: _softplus,
    aten.elu.default: _elu,
    aten.leaky_relu.default: _leaky_relu,
    aten.log_sigmoid_forward.default: _log_sigmoid,
    aten.xlogy.Scalar_Other: _x_log_number(torch.log, 0.0),
    aten.special_xlog1py.other_scalar: _x_log_number(torch.log1p, 1.0),
    aten.hardtanh.default: _hardtanh,
    aten.hardsigmoid.default: _hardsigmoid,
    aten.hardswish.default: _hardswish,
    aten.clamp.default: _clamp,
    aten.pow.Tensor_Scalar: _pow,
    aten.sin.default: lambda x, y: (torch.cos(x), -y),
    aten.cos.default: lambda x, y: (-torch.sin(x), -y),
    aten.exp.default: lambda x, y: (y, y),
    aten.expm1.default: lambda x, y: (y + 1, y + 1),
    aten.log.default: lambda x, y: (1 / x, -1 / (x * x)),
    aten.log1p.default: lambda x, y: (1 / (1 + x), -1 / ((1 + x) * (1 + x))),
    aten.sqrt.default: lambda x, y: (0.5 / y, -0.25 / (y * x)),
    aten.rsqrt.default: lambda x, y: (-0.5 * y**3, 0.75 * y**5),
    aten.reciprocal.default: lambda x, y: (-y * y, 2 * y**3),
    aten.erf.default: lambda x, y: (
        2 / math.sqrt(math.pi) * torch.exp(-x * x),
        -4 * x / math.sqrt(math.pi) * torch.exp(-x * x),
    ),
    aten.abs.default: lambda x, y: (torch.sign(x), None),
    aten.tan.default: lambda x, y: (1 + y * y, 2 * y * (1 + y * y)),
    aten.atan.default: lambda x, y: (1 / (1 + x * x), -2 * x / (1 + x * x) ** 2),
    aten.asin.default: lambda x, y: _arcsine(x, y, 1.0),
    aten.acos.default: lambda x, y: _arcsine(x, y, -1.0),
    aten.erfinv.default: _erfinv,
    aten.sinh.default: lambda x, y: (torch.cosh(x), y),
    aten.cosh.default: lambda x, y: (torch.sinh(x), y),
    aten.asinh.default: lambda x, y: ((1 + x * x) ** -0.5, -x * (1 + x * x) ** -1.5),
    aten.log2.default: lambda x, y: (1 / (x * math.log(2)), -1 / (x * x * math.log(2))),
    aten.log10.default: lambda x, y: (1 / (x * math.log(10)), -1 / (x * x * math.log(10))),
    aten.exp2.default: lambda x, y: (math.log(2) * y, math.log(2) ** 2 * y),
    aten.erfc.default: lambda x, y: (
        -2 / math.sqrt(math.pi) * torch.exp(-x * x),
        4 * x / math.sqrt(math.pi) * torch.exp(-x * x),
    ),
    # piecewise constant or shifted: derivatives 0 or 1 almost everywhere (hash-grid
    # encodings take cell corners by floor and ceil)
    **{
        op: lambda x, y, *_, **__: (torch.zeros_like(x), None)
        for op in (
            aten.sign.default,
            aten.floor.default,
            aten.ceil.default,
            aten.round.default,
            aten.round.decimals,
            aten.trunc.default,
        )
    },
    **{
        op: lambda x, y, *_: (torch.ones_like(x), None)
        for op in (aten.fmod.Scalar, aten.remainder.Scalar)
    },
}


def _ones(x: Tensor) -> Tensor:
    return x.new_ones(()).expand_as(x)


def _elu_first(
    x: Tensor, y: Tensor, alpha: float = 1.0, scale: float = 1.0, input_scale: float = 1.0
) -> Tensor:
    return aten.elu_backward(_ones(x), alpha, scale, input_scale, False, x)


def _gelu_first(x: Tensor, y: Tensor, approximate: str = "none") -> Tensor:
    """GELU's first derivative by ``gelu_backward``; in float16 at ``x`` within +-10, beyond
    which it is 1 or 0 in every dtype and its derivative ~1e-20: there ``gelu_double_backward``
    (the second order of parameter gradients) computes in float16, where ``x * x`` overflowed
    from |x| = 256 (150 for the tanh approximation's ``x^3``) times a 0 density: ``nan``."""
    if x.dtype == torch.float16:
        x = _saturated(x)
    return aten.gelu_backward(_ones(x), x, approximate=approximate)


def _softplus_first(x: Tensor, y: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    return aten.softplus_backward(_ones(x), x, beta, threshold)


def _silu_first(x: Tensor, y: Tensor) -> Tensor:
    s = torch.sigmoid(x)  # (not ``silu_backward``: it has no forward-mode rule)
    return s * (1 + x * (1 - s))


# first derivatives alone, where the second costs kernels of its own: for what reads only
# ``phi'`` (the structured engine's chains, replays without second order), given ``x``, ``y``
# and the op's other arguments as ``DERIVATIVES``. ELU's, GELU's and Softplus's are PyTorch's
# own backward kernels at a unit cotangent (one kernel, the values autograd's first
# derivative gives; differentiable, forward mode too, by their own rules): a (256, 64)
# float32 tensor, one thread, 55-70 -> 23-25 us (ELU), 86-101 -> 54-79 us (GELU; its tanh
# approximation 206-242 -> 56-66 us), 82-108 -> 18-23 us (Softplus); SiLU's (4 ops) is not
# ``silu_backward``, which has no forward-mode rule
FIRST: dict[Any, Callable[..., Tensor]] = {
    aten.tanh.default: _tanh_first,
    aten.sigmoid.default: _sigmoid_first,
    aten.elu.default: _elu_first,
    aten.gelu.default: _gelu_first,
    aten.softplus.default: _softplus_first,
    aten.silu.default: _silu_first,
    aten.log_sigmoid_forward.default: _log_sigmoid_first,
}


def _nonzero(t: Tensor) -> Tensor:
    """``t`` with zeros replaced by ones, for divisions whose numerator vanishes there too."""
    return torch.where(t != 0, t, torch.ones_like(t))


def _atan2(a: Tensor, b: Tensor, y: Tensor) -> Partials:
    """``atan2(a, b)``, the angle of the point ``(b, a)``: with ``r2 = a^2 + b^2``,
    ``phi_a = b/r2``, ``phi_b = -a/r2``, ``phi_aa = -phi_bb = -2ab/r2^2``,
    ``phi_ab = (a^2 - b^2)/r2^2``."""
    r2 = _nonzero(a * a + b * b)
    cross = 2 * a * b / (r2 * r2)
    return (b / r2, -a / r2), (-cross, (a * a - b * b) / (r2 * r2), cross)


def _hypot(a: Tensor, b: Tensor, y: Tensor) -> Partials:
    """``r = hypot(a, b)``: ``phi_a = a/r``, ``phi_b = b/r``, ``phi_aa = b^2/r^3``,
    ``phi_ab = -ab/r^3``, ``phi_bb = a^2/r^3``."""
    r = _nonzero(y)
    r3 = r * r * r
    return (a / r, b / r), (b * b / r3, -a * b / r3, a * a / r3)


def _logaddexp(a: Tensor, b: Tensor, y: Tensor) -> Partials:
    """``log(e^a + e^b)``: ``phi_a = s = e^(a - y)``, ``phi_b = t = e^(b - y)``, and
    ``phi_aa = phi_bb = -phi_ab = s t``."""
    s, t = torch.exp(a - y), torch.exp(b - y)
    st = s * t
    return (s, t), (st, -st, st)


def _wrapped(mode: str) -> Callable[[Tensor, Tensor, Tensor], Partials]:
    """``a - round(a / b) b`` with ``round`` by ``mode`` (``"floor"``: ``remainder``,
    ``"trunc"``: ``fmod``), piecewise linear: ``phi_a = 1``, ``phi_b = -round(a / b)``
    (PyTorch's derivatives), no second derivatives."""

    def partials(a: Tensor, b: Tensor, y: Tensor) -> Partials:
        zero = torch.zeros_like(y)
        quotient = torch.div(a, b, rounding_mode=mode) + zero  # (broadcast like y)
        return (torch.ones_like(y), -quotient), (zero, zero, zero)

    return partials


def _x_log(
    log: Callable[[Tensor], Tensor], shift: float
) -> Callable[[Tensor, Tensor, Tensor], Partials]:
    """``a log(b + shift)`` (``xlogy``: ``log``, 0; ``xlog1py``: ``log1p``, 1), with ``c = b +
    shift``: ``phi_a = log(c)``, 0 where ``a == 0`` and ``c <= 0`` (autograd's, the value 0
    there), ``phi_b = a / c``, ``phi_aa = 0``, ``phi_ab = 1 / c``, ``phi_bb = -a / c^2``. A
    rule of its own: PyTorch's decomposition ``where(a == 0, 0, a log(b))`` gave ``phi_a = 0``
    at every ``a == 0``."""

    def partials(a: Tensor, b: Tensor, y: Tensor) -> Partials:
        zero = torch.zeros_like(y)
        c = b + shift if shift else b
        inverse = 1 / c + zero  # (broadcast like y)
        ratio = a * inverse
        first = torch.where((a == 0) & (c <= 0), zero, log(b) + zero)
        return (first, ratio), (zero, inverse, -ratio * inverse)

    return partials


BINARY: dict[Any, Callable[[Tensor, Tensor, Tensor], Partials]] = {
    aten.xlogy.Tensor: _x_log(torch.log, 0.0),
    aten.special_xlog1py.default: _x_log(torch.log1p, 1.0),
    aten.atan2.default: _atan2,
    aten.hypot.default: _hypot,
    aten.logaddexp.default: _logaddexp,
    aten.remainder.Tensor: _wrapped("floor"),
    aten.fmod.Tensor: _wrapped("trunc"),
}


def _binary(op: Any, partials: Callable[[Tensor, Tensor, Tensor], Partials]) -> Given:
    def given(ctx: Context, y: Tensor, a: Jet | Tensor, b: Jet | Tensor) -> Jet:
        va, vb = value_of(a), value_of(b)
        first, second = partials(va, vb, y)
        return chain2(ctx, a, b, y, first, second)

    return given


def _given(op: Any, derivatives: Derivatives) -> Given:
    first = FIRST.get(op)

    def given(ctx: Context, y: Tensor, a: Jet, *args: Any, **kwargs: Any) -> Jet:
        if first is not None and not ctx.second_order:  # (chain would not read d2)
            return chain(ctx, a, y, first(a.value, y, *args, **kwargs), None)
        d1, d2 = derivatives(a.value, y, *args, **kwargs)
        return chain(ctx, a, y, d1, d2)

    return given


def _computing(op: Any, given: Given) -> Callable[..., Jet]:
    """The rule that computes ``y = op(value, ...)`` itself and hands it to ``given``."""

    def rule(ctx: Context, *args: Any, **kwargs: Any) -> Jet:
        return given(ctx, op(*map(value_of, args), **kwargs), *args, **kwargs)

    return rule


def _scalar_pow(ctx: Context, c: float, a: Jet) -> Jet:
    """``c ** a``: the jet is the exponent."""
    if c <= 0:
        raise UnsupportedOp(f"aten.pow.Scalar with base {c} (derivatives need log(base))")
    y = torch.pow(c, a.value)
    return chain(ctx, a, y, math.log(c) * y, math.log(c) ** 2 * y)


def _div(ctx: Context, a: Jet | Tensor, b: Jet | Tensor) -> Jet:
    """``a / b``: ``a * (1 / b)`` when ``b`` carries a jet, else a scaled jet."""
    if isinstance(b, Jet):
        return product(ctx, torch.mul, a, RULES[aten.reciprocal.default](inner(ctx), b))
    assert isinstance(a, Jet)  # rules run on ops with a jet, and b is none
    value = a.value / b
    jac = aligned_jac(a, value.dim())
    return Jet(value, None if jac is None else jac / b, None if a.lap is None else a.lap / b)


def _tanh_given(ctx: Context, y: Tensor, a: Jet) -> Jet:
    """``tanh`` with ``phi'' = -2 y phi'`` factored out: ``lap' = phi' (lap - 2 y sum_k
    jac_k^2)``, three kernels fewer than ``chain`` (a tenth of a tanh network's replay)."""
    if not ctx.second_order:
        return chain(ctx, a, y, _tanh_first(a.value, y), None)
    d1 = _tanh_first(a.value, y)
    squares = sum_squares(ctx, a)  # (before jac may be overwritten)
    jac = None if a.jac is None or not ctx.jac else scaled_jac(ctx, d1, a.jac)
    if squares is None:
        inside = a.lap
    elif a.lap is None:
        inside = -2 * y * squares
    else:
        inside = torch.addcmul(a.lap, y, squares, value=-2)
    return Jet(y, jac, None if inside is None else d1 * inside)


# rules given the op's output as ``f`` computed it (``propagate``'s ``known``): ``given(ctx,
# y, *args, **kwargs)`` with the op's own arguments, jets where they depend on x
GIVEN: dict[Any, Given] = {op: _given(op, d) for op, d in DERIVATIVES.items()}
GIVEN[aten.tanh.default] = _tanh_given
GIVEN.update({op: _binary(op, partials) for op, partials in BINARY.items()})
# ops whose rules (``chain``, ``_tanh_given``) may write ``jac'`` into their argument's ``jac``
OVERWRITES = frozenset(DERIVATIVES)
# (a rule returns its op's outputs: a jet, or a tuple of them and tensors, log_sigmoid_forward's)
RULES: dict[Any, Callable[..., Any]] = {op: _computing(op, given) for op, given in GIVEN.items()}
RULES[aten.pow.Scalar] = _scalar_pow


def _log_sigmoid_forward(ctx: Context, a: Jet) -> tuple[Jet, Tensor]:
    """``log_sigmoid_forward``: ``(logsigmoid(a), buffer)``, the buffer (read by its backward
    alone) without a jet; ``GIVEN``'s entry gives ``y``'s alone (what ``f`` reads)."""
    y, buffer = aten.log_sigmoid_forward(a.value)
    return GIVEN[aten.log_sigmoid_forward.default](ctx, y, a), buffer


RULES[aten.log_sigmoid_forward.default] = _log_sigmoid_forward
RULES[aten.div.Tensor] = _div


def _div_mode(ctx: Context, a: Jet | Tensor, b: Jet | Tensor, **kwargs: Any) -> Jet:
    """``torch.div(a, b, rounding_mode=...)``: ``a / b`` without a mode; rounded (``"floor"``,
    ``"trunc"``: a hash grid's cell index) it is piecewise constant, derivatives 0 as
    PyTorch's."""
    if kwargs.get("rounding_mode") is None:
        return _div(ctx, a, b)
    y = torch.div(value_of(a), value_of(b), **kwargs)
    zero = torch.zeros_like(y)
    return chain2(ctx, a, b, y, (zero, zero), (zero, zero, zero))


RULES[aten.div.Tensor_mode] = _div_mode
