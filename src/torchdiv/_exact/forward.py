"""Forward-mode engine: Jacobian columns of every sample by batched JVPs (see NOTE in _basis)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import jvp, vmap

from torchdiv._core.basis import as_blocks, basis, quiet_batching
from torchdiv._core.checks import event_numel
from torchdiv._core.modes import SafeDerivatives, math_attention
from torchdiv._exact.attributes import transforming

Products = Callable[[torch.Tensor], torch.Tensor]  # tangents -> JVPs


class ForwardJacobian:
    """``J @ V`` for the batched ``f`` at ``x``, by ``vmap`` of ``torch.func.jvp`` over tangents.

    ``f`` is evaluated on the caller's batched ``x``; only the tangents carry the extra ``k``
    dimension. Results are differentiable, through ordinary autograd, with respect to ``x``
    and anything ``f`` closes over.
    """

    blocks_are_rows = False

    def __init__(
        self,
        f: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        batch_dims: int,
        again: Callable[[Products], Products] | None = None,
    ):
        # jvp cannot make a dual tensor of a primal whose elements share memory (stride 0)
        self.f, self.x, self.batch_dims = f, x.contiguous(), batch_dims
        # each product evaluates f: from the state before the first, outside the transforms
        # (``_state.Once``, ``Changes.again``); None: one product, or f without state
        self._products = self._apply if again is None else again(self._apply)
        self.num_basis = event_numel(x, batch_dims)
        self._y_shape: torch.Size | None = None
        self._y: torch.Tensor | None = None

    @property
    def y(self) -> torch.Tensor:
        """``f(x)``, as the last product computed it (evaluates ``f`` if none was taken)."""
        if self._y is None:
            self._y = self.f(self.x)
            self._y_shape = self._y.shape
        return self._y

    @property
    def y_shape(self) -> torch.Size:
        """Shape of ``f(x)``; evaluates ``f`` once if no product has been taken yet."""
        if self._y_shape is None:
            with torch.no_grad():
                self._y_shape = self.f(self.x).shape
        return self._y_shape

    def apply(self, tangents: torch.Tensor) -> torch.Tensor:
        """JVPs: ``(k,) + x.shape`` tangents -> ``(k,) + f(x).shape`` products.

        One tangent (a one-probe estimate) skips ``vmap``. ``f`` runs under
        ``SafeDerivatives(2)``: the products' own derivatives (parameter gradients of a
        Jacobian) are second derivatives, which PyTorch gets wrong for some ops through
        forward mode.
        """
        transforming()  # (f may set module attributes to the transform's tensors)
        with math_attention(), SafeDerivatives(2, "method='reverse'"):  # fused: no forward AD
            return self._products(tangents)

    def _apply(self, tangents: torch.Tensor) -> torch.Tensor:
        """On the CPU ``randomness="same"``: only the tangents are batched, so a random call
        of ``f`` (a train-mode dropout) gets inputs without the ``k`` dimension and draws
        once, as an evaluation of ``f`` outside ``vmap`` does: the same numbers from the same
        generator state, which it leaves where that evaluation would (every ``k``
        differentiates the one function; ``tests/exact/test_state.py``). Not on a GPU: on an
        H200 (torch 2.11) CUDA's fused dropout drew another mask under ``vmap`` than outside
        it (same generator state after), so reverse mode, the loop and a chunk of one
        direction would differentiate another function: vmap's randomness error stays there
        (the hint names what runs). A caller that applies the engine more than once
        evaluates ``f`` from the same state each time (``_state.Once``)."""
        if len(tangents) == 1:
            y, out = self._push(tangents[0])
            self._y, self._y_shape = y, y.shape
            return out[None]
        # torch's out_dims_t omits None, which vmap accepts (an output without the k dimension)
        randomness = "same" if self.x.device.type == "cpu" else "error"
        batched = vmap(self._push, out_dims=(None, 0), randomness=randomness)  # type: ignore[arg-type]
        with quiet_batching():
            y, out = batched(tangents)
        self._y, self._y_shape = y, y.shape
        return out

    def _push(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f(x), J v)``; torch types ``jvp``'s result as a 2- or 3-tuple (``has_aux``)."""
        primal_and_tangent = jvp(self.f, (self.x,), (v,))
        return primal_and_tangent[0], primal_and_tangent[1]

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Columns ``start..stop-1`` of every sample's Jacobian, shape ``(k, N, m)``."""
        out = self.apply(basis(start, stop, self.x, self.batch_dims))
        return as_blocks(out, self.batch_dims)
