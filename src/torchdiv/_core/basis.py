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

import re
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch._functorch.vmap as _vmap_module
from torch._C._functorch import (
    _add_batch_dim,
    _remove_batch_dim,
    _vmap_decrement_nesting,
    _vmap_increment_nesting,
    is_functorch_wrapped_tensor,
    maybe_get_level,
    peek_interpreter_stack,
)
from torch.func import vmap

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
    wide = part if part.dtype in _WIDE else part.to(torch.promote_types(part.dtype, torch.float32))
    return wide if total is None else total + wide


# dtypes ``accumulated`` keeps as they are (float32 and wider): no ``.to`` dispatched for them,
# 2-3 us a coordinate of the Laplacian's loop at two or three inputs (issue 18)
_WIDE = frozenset((torch.float32, torch.float64, torch.complex64, torch.complex128))


def basis(start: int, stop: int, like: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """Unit vectors ``e_start .. e_{stop-1}`` of ``like``'s event, repeated in every sample.

    Returns:
        A new contiguous ``(stop - start,) + like.shape`` tensor with ``like``'s dtype and
        device, not requiring grad; element ``[j, b..., i...]`` is 1 where the flattened event
        index equals ``start + j``. It is materialised rather than a stride-0 view across the
        batch: CPU batched matmuls copy stride-0 operands slice by slice, which measured
        slower than one ``k``-sized copy. Small blocks are copies of one kept per shape
        (``_kept_block``); the caller may write to the tensor it gets.
    """
    kept = _kept_block(start, stop, like, batch_dims)
    return kept.clone() if kept is not None else _new_block(start, stop, like, batch_dims)


def _new_block(start: int, stop: int, like: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """``basis``, made from zeros: one ``new_zeros`` and one ``fill_`` of a diagonal view."""
    k, n = stop - start, event_numel(like, batch_dims)
    out = like.new_zeros((k, like.shape[:batch_dims].numel(), n))
    out.diagonal(start, dim1=0, dim2=2).fill_(1)  # [j, :, start + j]: one op, no index tensor
    return out if like.dim() == 2 and batch_dims == 1 else out.reshape(k, *like.shape)


# the blocks ``basis`` hands out copies of, by everything a block depends on: ``stop`` (the
# event size: whole bases only), ``like``'s shape (the block's, with ``k`` in front),
# ``batch_dims`` (which part of it is the event), dtype and device; at most ``_KEPT_BLOCKS`` of
# at most ``KEPT_BLOCK`` elements each (a tiny problem's, ``_exact.plan.TINY_PROBLEM``: 2 MiB
# in all in float64), the oldest dropped first
_KEPT: dict[tuple[Any, ...], torch.Tensor] = {}
_KEPT_LOCK = threading.Lock()
_KEPT_BLOCKS = 8
KEPT_BLOCK = 2**15


def _kept_block(start: int, stop: int, like: torch.Tensor, batch_dims: int) -> torch.Tensor | None:
    """The block ``basis`` copies (made on first use), or ``None`` where a new block is made
    instead: a large block (``KEPT_BLOCK``), a chunk of a basis (the blocks of all chunks
    kept would hold a whole basis: ``chunk_size`` would bound nothing), and wherever a block
    made then and kept could differ from one made now: ``like`` a subclass or a
    ``torch.func`` transform's wrapper (``new_zeros`` follows it), inside any ``torch.func``
    transform (a parameter Hessian of a Laplacian loss, ``jacrev(grad(loss))`` after a
    ``jvp(grad(loss))``, failed PyTorch's internal assert "level <= current_level" on a
    block's copy: gradcheck34), under a dispatch or
    torch-function mode (a fake-tensor mode makes fake zeros), in inference mode (an
    inference tensor), or while Dynamo traces; and off the CPU: a block made on one CUDA
    stream and copied on another, with nothing to order the two, could be read unfilled.

    A block is 0.5-1 us of Python to find against ~13 us to make on a 2-core CPU (zeros and
    a strided fill, three dispatched ops, where ``clone`` is one): a tiny problem's call
    makes one or two. Nothing kept ever leaves this module: ``basis`` hands out a copy, so
    a caller, a backward hook that writes into its gradient or a product that aliases its
    cotangent (the Jacobian of the identity) cannot change a later call's vectors."""
    if (
        torch.compiler.is_compiling()  # (first: Dynamo traces none of the other tests)
        or type(like) is not torch.Tensor
        or like.device.type != "cpu"
        or start != 0
        or stop * like.numel() > KEPT_BLOCK
        or stop != event_numel(like, batch_dims)
        or is_functorch_wrapped_tensor(like)
        or peek_interpreter_stack() is not None
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._is_torch_function_mode_enabled()
        or torch.is_inference_mode_enabled()
    ):
        return None
    key = (stop, like.shape, batch_dims, like.dtype, like.device)
    block = _KEPT.get(key)
    if block is None:
        with torch.no_grad():
            block = _new_block(start, stop, like, batch_dims)
        with _KEPT_LOCK:  # (another thread's iteration would raise)
            while len(_KEPT) >= _KEPT_BLOCKS:
                del _KEPT[next(iter(_KEPT))]
            _KEPT[key] = block
    return block


def as_blocks(products: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """``(k,) + S + E`` products -> ``(k, N, m)``: per basis vector, per sample, flat event."""
    k, batch = products.shape[0], products.shape[1 : 1 + batch_dims]
    return products.reshape(k, batch.numel(), event_numel(products, 1 + batch_dims))


def broadcast_basis(start: int, stop: int, like: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """The same unit vectors stored once for all samples: shape ``(k,) + (1,) * batch_dims +
    event``, broadcasting against ``(k,) + like.shape`` (for engines that keep it broadcast)."""
    return broadcast_units(torch.arange(start, stop, device=like.device), like, batch_dims)


def broadcast_units(index: torch.Tensor, like: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """``broadcast_basis`` for the unit vectors of the flat event indices ``index`` (1-D int64,
    in that order): shape ``(len(index),) + (1,) * batch_dims + event``."""
    k, n = len(index), event_numel(like, batch_dims)
    out = like.new_zeros((k, n))
    out[torch.arange(k, device=like.device), index] = 1
    return out.reshape(k, *[1] * batch_dims, *like.shape[batch_dims:])


# PyTorch's UserWarning when ``vmap`` runs an op without a batching rule by a loop
_SLOW_BATCHING = "There is a performance drop because we have not yet implemented the batching"
# the filter ``warnings.filterwarnings("ignore", _SLOW_BATCHING, UserWarning)`` makes
_IGNORE = ("ignore", re.compile(_SLOW_BATCHING, re.I), UserWarning, None, 0)


class _Quiet:
    """``with quiet_batching:`` around torchdiv's own ``vmap`` calls (``batched``): PyTorch's
    warning that an op has no batching rule (the result is right, only slower; the caller can
    do nothing about torchdiv's batching) is not shown. Not for a region Dynamo traces (it
    enters no lock).

    One ``ignore`` filter for that message is put in front of ``warnings.filters`` while any
    thread is inside, and taken out, by identity, when the last one leaves: the caller's
    filters, set before or meanwhile, stay as they are (``warnings.catch_warnings`` would
    restore a snapshot of the list, undoing another thread's changes; where another thread's
    ``catch_warnings`` swapped the list meanwhile, the filter leaves both lists). A caller's
    own filter equal to it stays. Other threads' warnings of that message are not shown
    meanwhile.

    The one instance holds how many threads are inside, and meanwhile its filter (``None``:
    the caller's equal one was there) and the list it was put in. A class, not a generator
    function: ``batched`` enters it at every call of a small problem, where ``contextlib``'s
    generator and copies of the filter list cost 5-6 us.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inside = 0
        self.filter: object = None
        self.filters: list[Any] = []

    def __enter__(self) -> None:
        with self.lock:
            if self.inside == 0:
                theirs = _IGNORE in warnings.filters
                warnings.filterwarnings("ignore", _SLOW_BATCHING, UserWarning)
                self.filter = None if theirs else warnings.filters[0]
                self.filters = _filters()
            self.inside += 1

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.inside -= 1
            if self.inside == 0 and self.filter is not None:
                now = _filters()
                for filters in (self.filters,) if now is self.filters else (self.filters, now):
                    at = next((i for i, f in enumerate(filters) if f is self.filter), None)
                    if at is not None:
                        del filters[at]
                self.filter, self.filters = None, []


quiet_batching = _Quiet()


def _filters() -> list[Any]:
    """``warnings.filters``, the list itself (typeshed types it as a ``Sequence``)."""
    return cast("list[Any]", warnings.filters)


Outputs = tuple[torch.Tensor, ...]
_LOADED = threading.Event()  # vmap's decompositions are loaded (once per process)


def batched(
    fn: Callable[[torch.Tensor], Outputs],
    vectors: torch.Tensor,
    out_dims: tuple[int | None, ...] | None = None,
    randomness: str = "error",
) -> Outputs:
    """``torch.func.vmap(fn, out_dims=out_dims, randomness=randomness)(vectors)`` for ``fn`` of
    one tensor batched along its first dimension (``(k,) + shape``), returning a tuple of
    tensors (``out_dims``: each one's batched dimension, ``None`` for one that is not batched;
    default 0 for all), with PyTorch's slow-batching warning quieted (``quiet_batching``).

    ``vmap``'s Python layer (pytree flattening of the arguments and outputs, argument checks,
    the look-up of its decompositions and of export's modes, context managers) costs about
    43 us a call on a 2-core CPU, against ~600 us for the batched backward pass of a D = 8
    MLP's Jacobian at batch 256: 5-7% of a small problem's call. Outside a compiled region
    the level is entered, the batch dimension added and removed by functorch's own calls, as
    ``vmap`` makes them (its decompositions loaded once); inside one, Dynamo traces ``vmap``
    itself. Under the caller's own ``vmap`` (an ensemble of models), an output that is not
    batched here may be batched at the caller's level: ``vmap``'s check of ``out_dims=None``
    refused it (forward mode under an outer ``vmap`` raised), ``_unbatched`` reads the level.

        >>> batched(lambda v: (v * 2, v.sum()), torch.ones(3, 2))[1]
        tensor([2., 2., 2.])
    """
    if torch.compiler.is_compiling():
        return _vmapped(fn, vectors, out_dims, randomness)
    if not _LOADED.is_set():
        _vmap_module.lazy_load_decompositions()  # pyright: ignore[reportPrivateImportUsage]
        _LOADED.set()
    with quiet_batching:
        k = vectors.shape[0]
        level = _vmap_increment_nesting(k, randomness)
        try:
            outputs = fn(_add_batch_dim(vectors, 0, level))
            dims = out_dims or (0,) * len(outputs)
            return tuple(_unbatched(y, d, level, k) for y, d in zip(outputs, dims, strict=True))
        finally:
            _vmap_decrement_nesting()


def _vmapped(
    fn: Callable[[torch.Tensor], Outputs],
    vectors: torch.Tensor,
    out_dims: tuple[int | None, ...] | None,
    randomness: str,
) -> Outputs:
    # torch's out_dims_t omits None, which vmap accepts (an output without the k dimension)
    mapped = vmap(fn, out_dims=out_dims or 0, randomness=randomness)  # type: ignore[arg-type]
    return mapped(vectors)


def _unbatched(y: torch.Tensor, dim: int | None, level: int, k: int) -> torch.Tensor:
    """An output of ``batched``'s ``fn`` with the batch level removed (moved to ``dim``), or,
    where ``dim`` is ``None``, as it is (batched at an outer level at most); the errors
    ``vmap`` raises."""
    if dim is None:
        if maybe_get_level(y) == level:
            raise ValueError("vmap: a BatchedTensor was returned where out_dims is None")
        return y
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"vmap: only Tensors may be returned, got {type(y)}")
    return _remove_batch_dim(y, level, k, dim)
