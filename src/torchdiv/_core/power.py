"""A tensor raised to a constant tensor exponent, with derivatives right at every order.

``torch.pow(a, e)`` with a tensor ``e`` (polynomial features ``h[..., None] ** torch.arange(k)``,
a per-feature power ``h ** self.p`` of a frozen ``p``) has a forward-mode formula that adds the
exponent's term ``a^e log(a) de`` even where ``e`` carries no tangent: its value is an exact 0,
but its derivatives hold ``log(a)``, ``nan`` at a negative base. So every second derivative
through forward mode was ``nan`` there: the parameter gradients of a forward-mode divergence,
of a forward-over-reverse or Hessian Laplacian (``laplacian(method="auto")`` at D = 32), where
backward passes only (the grad-of-grad loop) are right. ``power(a, e)`` computes the same values
with the derivatives of ``a`` alone,

    d(a^e)/da = e a^(e-1),   0 where e = 0,

themselves by ``power``, so none of any order takes ``log(a)``.

Example:
    >>> a = torch.tensor([-2.0, 0.5], requires_grad=True)
    >>> power(a, torch.tensor([3.0, 0.0]))
    tensor([-8.,  1.], grad_fn=<_PowerBackward>)
"""

from __future__ import annotations

from typing import Any

import torch

from torchdiv._core.nested import refuse_nested_forward


class _Power(torch.autograd.Function):
    """``a ** e`` for an ``e`` not differentiated; the derivatives with respect to ``a`` only."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return torch.pow(a, e)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: Any) -> None:
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        a, e = ctx.saved_tensors
        return (grad * _slope(a, e)).sum_to_size(a.shape), None

    @staticmethod
    def jvp(ctx: Any, tangent: torch.Tensor, _: Any) -> torch.Tensor:  # type: ignore[override]
        refuse_nested_forward("a ** e (a tensor exponent)")
        a, e = ctx.saved_tensors
        return tangent * _slope(a, e)


def _slope(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``e a^(e-1)`` broadcast, 0 where ``e = 0`` (``a`` taken as 1 there: no ``0 * inf`` at
    ``a = 0``, in this value or its derivatives)."""
    zero = e == 0
    return e * _Power.apply(torch.where(zero, 1, a), e - 1)


def power(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``a ** e`` (``a`` a floating tensor, ``e`` a real tensor not differentiated: an
    integer one too, ``torch.arange(4)``) with derivatives ``e a^(e-1)`` at every order;
    shapes broadcast and dtypes promote as ``torch.pow``'s."""
    dtype = torch.result_type(a, e)
    return _Power.apply(a.to(dtype), e.to(dtype))


def plain_exponent(a: Any, e: Any) -> bool:
    """Whether ``a ** e`` has the operands ``power`` takes: ``a`` a floating tensor, ``e`` a
    real (floating, integer or bool) tensor; whether ``e`` is differentiated is for the
    caller to tell (``_core.modes``, which runs the call eagerly where Dynamo traces it)."""
    return (
        isinstance(a, torch.Tensor)
        and isinstance(e, torch.Tensor)
        and a.is_floating_point()
        and not e.is_complex()
    )
