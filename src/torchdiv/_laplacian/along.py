"""Second derivatives along chosen directions, by composing ``f`` with a shift of its input.

For a factor ``S`` (``n x k``, the same for every sample or one per sample) put

    g(z) = f(x + S z),    z = 0 in R^k per sample,

so that ``∇²_z g(0) = Sᵀ ∇²f(x) S`` and the Laplacian of ``g`` in ``z`` is

    Δ_z g(0) = Σ_k s_kᵀ ∇²f(x) s_k = tr(S Sᵀ ∇²f(x)).

Every Laplacian method then serves every operator ``tr(A ∇²f)`` with ``A = S Sᵀ``: the Taylor
engine propagates the ``k`` columns of ``S`` as its directions (the shift is one matrix
product, whose rule keeps a shared ``S`` broadcast across the batch), the nested methods take
``k`` Hessian-vector products, and Hutchinson's probes ``v`` in ``z`` are the probes ``S v``
in ``x``. The Laplacian over a subset of the coordinates is the case where ``S``'s columns are
the unit vectors of those coordinates. ``g`` closes over ``x`` (and ``S``), so the result is
differentiable with respect to both, and to whatever ``f`` closes over.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from torchdiv._core.checks import wrapping
from torchdiv._core.subclass import attributes_of

Function = Callable[[torch.Tensor], torch.Tensor]


def along(
    f: Function, x: torch.Tensor, batch_dims: int, sigma: torch.Tensor
) -> tuple[Function, torch.Tensor]:
    """``g(z) = f(x + S z)`` and the point ``z = 0`` (shape ``x.shape[:batch_dims] + (k,)``).

    ``sigma`` is ``(n, k)`` (one factor for all samples) or ``x.shape[:batch_dims] + (n, k)``
    (one per sample), ``n`` the number of elements of ``x``'s event, in ``x``'s dtype.
    ``g.__wrapped__`` is ``f``.
    """
    n, k = sigma.shape[-2:]
    flat = (x.shape[:batch_dims].numel(), n)

    def g(z: torch.Tensor) -> torch.Tensor:
        if sigma.dim() == 2:  # one op, x + z Sᵀ: its graph is part of every backward pass
            shifted = _shaped(torch.addmm(_shaped(x, flat), _shaped(z, (flat[0], k)), sigma.T), x)
        else:
            shifted = x + (sigma @ z.unsqueeze(-1)).squeeze(-1).reshape(x.shape)
        return f(attributes_of(x, shifted))  # a subclass's labels kept (PINA's LabelTensor)

    # of x's subclass, as x's new_zeros would be, so that "auto" takes the engines that serve
    # subclasses (a TorchDispatchMode's recording breaks PINA's LabelTensor construction)
    zero = torch.zeros((*x.shape[:batch_dims], k), dtype=x.dtype, device=x.device)
    return wrapping(g, f), zero if type(x) is torch.Tensor else zero.as_subclass(type(x))


def _shaped(t: torch.Tensor, like: torch.Tensor | tuple[int, int]) -> torch.Tensor:
    """``t`` reshaped to ``like`` (a shape or a tensor's), itself (no view) if it has it."""
    shape = like.shape if isinstance(like, torch.Tensor) else like
    return t if t.shape == shape else t.reshape(shape)


def unit_columns(coordinates: torch.Tensor, like: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """``S`` whose columns are the unit vectors of the flat event indices ``coordinates``
    (on ``like``'s device): shape ``(n, k)``, dtype and device of ``like``."""
    n = like.shape[batch_dims:].numel()
    return torch.eye(n, dtype=like.dtype, device=like.device).index_select(1, coordinates)
