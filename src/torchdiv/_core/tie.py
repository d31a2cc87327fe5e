"""A result of the recording engines kept on the graph of an ``x`` that requires grad.

The structured and Taylor engines propagate derivatives as values: where ``f`` is piecewise
linear in ``x`` (ReLU, max pooling, ``clamp``, ``abs``), the first derivatives they carry are
constants times masks, and a divergence, Jacobian diagonal or Laplacian built from them has
no autograd path to ``x`` at all. Its gradient with respect to ``x`` is 0 (almost
everywhere), but ``torch.autograd.grad(result.sum(), x)`` raised ("appears to not have been
used in the graph"), and with frozen parameters the result did not even require grad
(``.backward()`` raised), where plain autograd, reverse and forward mode give the result a
graph to ``x`` with zero gradients. ``tied(out, x)`` is ``out`` with a zero derivative with
respect to ``x``, itself tied to ``x``: every order of ``x``-derivative of the tie is an
exact zero on ``x``'s graph (``x`` may hold ``inf``: nothing multiplies it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._python_dispatch import _get_current_dispatch_mode

from torchdiv._core.checks import untransformed
from torchdiv._core.ddp import ZeroGradients


class _Tied(torch.autograd.Function):
    """``out`` (a copy), with gradient ``grad`` for ``out`` and a tied zero for ``x``; in
    forward mode, ``out``'s tangent."""

    generate_vmap_rule = True  # (a backward batched by ``is_grads_batched``)

    @staticmethod
    def forward(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return out.clone()  # a new tensor: the caller may write to its result

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: Any) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        (x,) = ctx.saved_tensors
        return grad, tied(torch.zeros_like(x), x)

    @staticmethod
    def jvp(  # type: ignore[override]
        ctx: Any, out_tangent: torch.Tensor | None, x_tangent: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Forward mode (the caller's ``dual_level`` with dual parameters): ``out``'s
        tangent; ``x``'s contributes nothing."""
        return out_tangent


def tied(out: torch.Tensor, x: torch.Tensor, read: Sequence[Any] = ()) -> torch.Tensor:
    """``out``, on ``x``'s graph with a zero derivative, if ``x`` requires grad under grad mode.
    A copy of ``out`` and one graph node: the result's size, not ``f``'s work. ``read``: the
    tensors ``f`` read (its parameters among them); where ``out`` has no graph but some of
    them require grad, ``out`` is also given a zero gradient for each of those (a ReLU
    network's Laplacian is 0 whatever its weights: the Taylor engine's had no graph at all,
    and ``loss.backward()`` raised where the methods of backward passes give zeros).

    ``out`` as it is while Dynamo traces, under the caller's ``torch.func`` transforms (where
    the recording engines do not run) and under a dispatch mode: a call inside ``f`` that an
    outer engine records (``biharmonic``'s Laplacian of a Laplacian), which would refuse the
    tie as a custom ``autograd.Function`` (the outer call ties its own result)."""
    if not torch.is_grad_enabled() or not untransformed():
        return out
    if _get_current_dispatch_mode() is not None:
        return out
    if not out.requires_grad:
        trained = [t for t in read if isinstance(t, torch.Tensor) and t.requires_grad]
        out = ZeroGradients.apply(out, *trained).clone() if trained else out  # (writable)
    if not x.requires_grad:
        return out
    result: torch.Tensor = _Tied.apply(out, x)
    return result


def trained(f: object, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tied``'s ``read`` for ``out``, a result of ``f`` that its engine cannot attribute: an
    ``nn.Module``'s parameters (a closure's tensors are not known), walked only where ``out``
    has no graph under grad mode (where ``tied`` reads them). A nested method's Laplacian of a
    piecewise-linear module (hardsigmoid: PyTorch's double backward gives constant zeros) had
    no graph: with ``x`` frozen and the module trained, ``backward()`` raised where ``"auto"``
    and the loop give its parameters zero gradients (rev-b34)."""
    if out.requires_grad or not torch.is_grad_enabled() or not isinstance(f, torch.nn.Module):
        return ()
    return tuple(f.parameters())


def detached(t: torch.Tensor) -> torch.Tensor:
    """``t`` without its autograd graph but with its forward-mode tangents: those of the
    caller's ``torch.autograd.forward_ad`` level (dual parameters) and of a ``torch.func.jvp``
    around the call, which ``detach`` cuts too. ``t`` itself where it has no graph (the
    engines' results under the caller's ``no_grad``: a ``jvp`` over parameters of a
    forward-mode engine's divergence or Laplacian gave tangents of exactly 0, rev-b34); a
    dual tensor's graph is dropped and its tangent kept (``value_grad_laplacian``'s loop
    gave ``None``, gradcheck34)."""
    if not t.requires_grad:
        return t
    tangent = fwAD.unpack_dual(t).tangent
    if tangent is None:
        return t.detach()
    return fwAD.make_dual(t.detach(), tangent.detach())
