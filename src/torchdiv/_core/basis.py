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

import contextlib
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

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


def accumulated(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    """``total + part`` for a running sum over chunks (or coordinates; ``total=None``: the
    first part), kept in at least float32: the caller casts the sum to ``x``'s dtype once, at
    the end (``.to``, differentiable). A sum kept in bfloat16 (8 significant bits) stops
    growing once it is 256 times a part (float16: 2048 times): ``D`` unit terms added one at a
    time gave 256 for ``D = 1024``. float64 stays float64."""
    wide = part.to(torch.promote_types(part.dtype, torch.float32))
    return wide if total is None else total + wide


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


@dataclass
class _Quiet:
    """``quiet_batching``'s state: how many threads are inside, and meanwhile its filter and
    the list it was put in."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    inside: int = 0
    filter: object = None
    filters: list[Any] = field(default_factory=list)


_QUIET = _Quiet()
# PyTorch's UserWarning when ``vmap`` runs an op without a batching rule by a loop
_SLOW_BATCHING = "There is a performance drop because we have not yet implemented the batching"


@contextlib.contextmanager
def quiet_batching() -> Iterator[None]:
    """Around torchdiv's own ``vmap`` calls: PyTorch's warning that an op has no batching rule
    (the result is right, only slower; the caller can do nothing about torchdiv's batching) is
    not shown.

    One ``ignore`` filter for that message is put in front of ``warnings.filters`` while any
    thread is inside, and taken out, by identity, when the last one leaves: the caller's
    filters, set before or meanwhile, stay as they are (``warnings.catch_warnings`` would
    restore a snapshot of the list, undoing another thread's changes; where another thread's
    ``catch_warnings`` swapped the list meanwhile, the filter leaves both lists). A caller's
    own filter equal to it stays. Other threads' warnings of that message are not shown
    meanwhile. Nothing is done while Dynamo traces (it enters no lock).
    """
    if torch.compiler.is_compiling():
        yield
        return
    with _QUIET.lock:
        if _QUIET.inside == 0:
            before = list(warnings.filters)
            warnings.filterwarnings("ignore", _SLOW_BATCHING, UserWarning)
            ours = warnings.filters[0]
            _QUIET.filter = None if ours in before else ours  # (equal: the caller's)
            _QUIET.filters = _filters()
        _QUIET.inside += 1
    try:
        yield
    finally:
        with _QUIET.lock:
            _QUIET.inside -= 1
            if _QUIET.inside == 0:
                for filters in {id(f): f for f in (_QUIET.filters, _filters())}.values():
                    at = [i for i, item in enumerate(filters) if item is _QUIET.filter]
                    for i in at[:1]:
                        del filters[i]
                _QUIET.filter, _QUIET.filters = None, []


def _filters() -> list[Any]:
    """``warnings.filters``, the list itself (typeshed types it as a ``Sequence``)."""
    return cast("list[Any]", warnings.filters)
