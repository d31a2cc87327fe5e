"""Reverse-mode engine: Jacobian rows of every sample by batched VJPs (see NOTE in _basis)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import vjp

from torchdiv._core.basis import as_blocks, basis, batched
from torchdiv._core.checks import event_numel
from torchdiv._core.modes import (
    INNER_ORDER,
    SafeDerivatives,
    backward_passes_order,
    math_attention,
)
from torchdiv._exact.attributes import transforming
from torchdiv._exact.autograd import again_from
from torchdiv._exact.state import Changes


class ReverseJacobian:
    """``U @ J`` for the batched ``f`` at ``x``, by ``vmap`` of the ``torch.func.vjp`` pullback.

    ``f`` is evaluated once, on the caller's batched ``x``; only the cotangents carry the extra
    ``k`` dimension. Results are differentiable, through ordinary autograd, with respect to
    ``x`` and anything ``f`` closes over, and only where those require grad.

    ``changes``: a watch's ``Changes`` noting this evaluation's writes and draws; under the
    caller's ``no_grad``, an ``f`` that takes a backward pass with a graph is evaluated again
    from the caller's state through it (``again_from``; ``inner_again``).
    """

    blocks_are_rows = True

    def __init__(
        self,
        f: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        batch_dims: int,
        changes: Changes | None = None,
    ):
        # cdist: the batched pullback is wrong; fused attention: no double backward
        transforming()  # (f may set module attributes to the transform's tensors)
        order, forward_mode = backward_passes_order()  # (the caller's grad mode)
        outer = torch.is_grad_enabled()
        safe = SafeDerivatives(order, "method='forward'", forward_mode)
        # grad on below the transform: under the caller's no_grad the ops of f reached the
        # dispatcher (the sample-mixing watch) with grad off, each taken for one in a no_grad
        # block of f (a constant): lambda z: z - z.mean(0) passed "auto" silently
        with math_attention(), safe, torch.enable_grad():
            # torch types vjp's result as a 2- or 3-tuple (has_aux); without aux it is 2
            y_and_pullback = vjp(f, x)
        # f took a backward pass with a graph: its ops' second derivatives are taken
        # (``torchdiv._exact.autograd._evaluated``), from the caller's state again
        self.inner_again = safe.backward_inside and order < INNER_ORDER[0]
        if self.inner_again:
            safe = SafeDerivatives(INNER_ORDER[0], "method='forward'", INNER_ORDER[1])
            with math_attention(), again_from(changes, x), safe, torch.enable_grad():
                y_and_pullback = vjp(f, x)
        self.replaced = safe.replaced  # (a plain evaluation would be made again: Passed.plain)
        # (a caller without grad gets y detached: ``torchdiv._exact.dispatch.output``)
        self.outer_grad = outer
        self.y: torch.Tensor = y_and_pullback[0]
        self._pullback: Callable[[torch.Tensor], tuple[torch.Tensor]] = y_and_pullback[1]
        self.x, self.batch_dims = x, batch_dims
        self.y_shape = self.y.shape
        self.num_basis = event_numel(self.y, batch_dims)
        self._one_by_one = False  # the pullback's vmap failed on a sparse tensor (``apply``)

    def apply(self, cotangents: torch.Tensor) -> torch.Tensor:
        """VJPs: ``(k,) + f(x).shape`` cotangents -> ``(k,) + x.shape`` products.

        One cotangent (a one-probe estimate) skips ``vmap``, whose overhead would be a large
        part of a single VJP. Where ``vmap`` cannot run the pullback because of a sparse
        tensor (PyTorch 2.13 has no batching rule for the backward of a product with a sparse
        matrix, ``torch.sparse.mm(adj, h)``, ``torch.spmm``, ``adj @ h``, a sparse ``bmm``:
        "expand is unsupported for Sparse tensors"), the pullback runs once per cotangent,
        as plain autograd does, for this and every later block of the call.
        """
        if len(cotangents) == 1:
            (out,) = self._pullback(cotangents[0])
            return out[None]
        if not self._one_by_one:
            try:
                (out,) = batched(self._pullback, cotangents)
                return out
            except RuntimeError as error:
                if "sparse" not in str(error).lower():
                    raise
                self._one_by_one = True  # (and for the chunks that follow)
        return torch.stack([self._pullback(c)[0] for c in cotangents])

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start..stop-1`` of every sample's Jacobian, shape ``(k, N, n)``."""
        out = self.apply(basis(start, stop, self.y, self.batch_dims))
        return as_blocks(out, self.batch_dims)
