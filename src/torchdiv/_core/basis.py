"""Standard-basis vectors broadcast across the batch, produced in chunks.

NOTE [Batching over basis vectors, not over samples]
-----------------------------------------------------
``torch.func`` gets per-sample Jacobians with ``vmap(jacrev(f))(x)``: it slices the batch and
calls ``f`` on one sample at a time. That breaks two kinds of functions people really have:
closures over per-sample tensors (``lambda x: g(t, x)`` with ``t.shape == (B,)``: inside the
vmap ``x`` has lost its batch dimension but ``t`` has not) and modules that do not support
vmap over their batch. We never re-slice the batch. ``f`` always sees the caller's batched
``x``; what we vmap over is a set of *basis vectors*, each one broadcast across the batch.

Let ``x`` have batch shape ``S`` (``N = prod(S)`` samples) and event shape ``E`` (``n =
prod(E)`` elements), and let ``e_i`` be the ``i``-th unit vector of the flattened event. The
tangent ``V_i`` of shape ``S + E`` holds ``e_i`` in every sample. Because samples are
independent, the Jacobian of the batched ``f`` is block diagonal, so one JVP gives

    (J V_i)[b] = J_b e_i = column i of sample b's Jacobian,     for every b at once,

and one VJP with ``U_i`` (``e_i`` of the output event in every sample) gives row ``i`` of every
sample's Jacobian. ``k`` such vectors stacked into a ``(k,) + S + E`` tensor and vmapped give
``k`` columns (or rows) per call; ``chunk_size`` bounds ``k`` and with it the memory in flight.
The cross-batch ``(N, m, N, n)`` tensor of ``torch.autograd.functional.jacobian`` never exists.

The price of independence is an assumption: if samples interact (train-mode BatchNorm,
attention across the batch) the result silently mixes them. ``check_batch_independence``
tests for that.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from torchdiv._core.checks import event_numel


def chunks(n: int, chunk_size: int, first: int = 0) -> Iterator[tuple[int, int]]:
    """Split ``range(first, n)`` into consecutive ``(start, stop)`` pieces of at most
    ``chunk_size``."""
    for start in range(first, n, chunk_size):
        yield start, min(start + chunk_size, n)


@dataclass(frozen=True)
class Share:
    """Part ``index`` of ``count`` of a set of directions (unit vectors, colours, probes): the
    contiguous range ``[n * index // count, n * (index + 1) // count)`` of ``n``. The parts of
    all indices cover every direction once (``torchdiv.distributed`` gives one to each rank)."""

    index: int = 0
    count: int = 1

    def of(self, n: int) -> tuple[int, int]:
        """The ``(start, stop)`` of this part of ``n`` directions."""
        return n * self.index // self.count, n * (self.index + 1) // self.count

    def chunks(self, n: int, chunk_size: int) -> Iterator[tuple[int, int]]:
        """This part of ``range(n)`` in pieces of at most ``chunk_size``."""
        start, stop = self.of(n)
        return chunks(stop, chunk_size, start)


WHOLE = Share()  # every direction: one process


def basis(start: int, stop: int, like: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """Unit vectors ``e_start .. e_{stop-1}`` of ``like``'s event, repeated in every sample.

    Returns:
        A contiguous ``(stop - start,) + like.shape`` tensor with ``like``'s dtype and device;
        element ``[j, b..., i...]`` is 1 where the flattened event index equals ``start + j``.
        It is materialised rather than a stride-0 view across the batch: CPU batched matmuls
        copy stride-0 operands slice by slice, which measured slower than one ``k``-sized copy.
    """
    k, n = stop - start, event_numel(like, batch_dims)
    out = like.new_zeros((k, like.shape[:batch_dims].numel(), n))
    out.diagonal(start, dim1=0, dim2=2).fill_(1)  # [j, :, start + j]: one op, no index tensor
    return out if like.dim() == 2 and batch_dims == 1 else out.reshape(k, *like.shape)


def as_blocks(products: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """``(k,) + S + E`` products -> ``(k, N, m)``: per basis vector, per sample, flat event."""
    k, batch = products.shape[0], products.shape[1 : 1 + batch_dims]
    return products.reshape(k, batch.numel(), event_numel(products, 1 + batch_dims))


def broadcast_basis(start: int, stop: int, like: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """The same unit vectors stored once for all samples: shape ``(k,) + (1,) * batch_dims +
    event``, broadcasting against ``(k,) + like.shape`` (for engines that keep it broadcast)."""
    k, n = stop - start, event_numel(like, batch_dims)
    out = like.new_zeros((k, n))
    j = torch.arange(k, device=like.device)
    out[j, start + j] = 1
    return out.reshape(k, *[1] * batch_dims, *like.shape[batch_dims:])
