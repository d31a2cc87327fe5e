"""Where a tracked tensor holds its samples: the small readings of ``Axis`` every rule
module shares.

``_held(axis, n)``: the samples at indices ``0..n-1``; ``_aligned``: a tensor's batch
dimensions after broadcasting to a shape; ``_rows``: a batch dimension holding given samples
one per index (moved rows noted in ``BatchAxes.moves``); ``_line``: the one dimension an
index's samples vary along; ``_grid``/``_indices``: index tensors; ``_dims``/``_reduced_dims``:
the dimensions a reduction reduces (``_NORMS``: ``norm(t, ord, dim)``); ``_batch_at``: a
dimension among some where a tensor has samples; ``_samples_along``: the sample at each index
of a dimension; ``_zeros_across``: weights exactly 0 across samples; ``constant_blocks``: a
constant block-diagonal matrix over a flattened batch's rows (per sample).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch._C._functorch import is_functorch_wrapped_tensor

from torchdiv._core.mixing.axes import Axis

if TYPE_CHECKING:
    from torchdiv._core.mixing.axes import Axes
    from torchdiv._core.mixing.tracker import BatchAxes

aten = torch.ops.aten


def _aligned(t: torch.Tensor, axes: Axes, out: torch.Tensor | Sequence[int]) -> Axes:
    """``t``'s batch dimensions in ``out`` (or a tensor of that shape), with shapes aligned at
    the right (broadcasting)."""
    shape = out.shape if isinstance(out, torch.Tensor) else out
    shift = len(shape) - t.dim()
    return tuple(
        axis._replace(position=axis.position + shift)
        for axis in axes
        if 0 <= axis.position + shift < len(shape)
        and shape[axis.position + shift] == t.shape[axis.position]
    )


def _indices(span: range) -> torch.Tensor:
    return torch.arange(span.start, span.stop, span.step)


def _held(axis: Axis, n: int) -> tuple[int, ...]:
    """The samples ``axis`` holds at indices ``0..n-1`` along its dimension."""
    if axis.inner == 1 and n == len(axis.rows):
        return axis.rows  # each index one row: no tensor to make
    return tuple(axis.samples(torch.arange(n)).tolist())


def _rows(tr: BatchAxes, position: int, axis: Axis, samples: torch.Tensor, what: str) -> Axis:
    """The batch dimension at ``position`` holding ``samples`` of ``axis``'s batch, one per
    index (in order, or the batch in order repeated, as whole batches joined: a plain one;
    else its rows, noted as moved by ``what``). Runs of one sample as long as the first
    (``x.reshape(-1).flip(0)``: ``D`` elements per sample) are one row each, with that
    ``inner``, so that a reshape back follows them."""
    run = _run(samples)
    rows = tuple(samples[::run].tolist())
    if len(rows) % axis.size == 0 and rows == tuple(range(axis.size)) * (len(rows) // axis.size):
        return Axis(position, axis.size, run, (), axis.source)
    tr.moves.setdefault(rows, what)
    return Axis(position, axis.size, run, rows, axis.source)


def _run(samples: torch.Tensor) -> int:
    """The length of the first run of equal ``samples`` (1-d), if they are all runs that long
    (else 1)."""
    changes = (samples[1:] != samples[:-1]).nonzero()
    run = int(changes[0]) + 1 if len(changes) else len(samples)
    if run < 2 or len(samples) % run:
        return 1
    blocks = samples.reshape(-1, run)
    return run if bool((blocks == blocks[:, :1]).all()) else 1


def _line(samples: torch.Tensor) -> tuple[int, torch.Tensor] | None:
    """The dimension ``k`` along which alone ``samples`` (a non-empty index's samples) vary,
    with the samples along it: a 1-d index, or one broadcast along the others
    (``x[arange(B)[:, None], idx]``, each sample's entries at its own ``idx[b]``)."""
    for k in range(samples.dim()):
        line = samples.movedim(k, 0).reshape(samples.shape[k], -1)
        if bool((line == line[:, :1]).all()):
            return k, line[:, 0]
    return None


def _grid(shape: Sequence[int], dim: int) -> torch.Tensor:
    """The index along ``dim`` of every element of a tensor of ``shape``."""
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return torch.arange(shape[dim]).reshape(view).expand(*shape)


def _dims(t: torch.Tensor, dims: Any) -> list[int]:
    if dims is None or dims == []:
        return list(range(t.dim()))
    if isinstance(dims, int):
        dims = [dims]
    return [d % max(t.dim(), 1) for d in dims]


def _reduced_dims(func: Any, args: Sequence[Any]) -> list[int]:
    """The dimensions a reduction reduces (all, if none are given)."""
    at = 2 if func in _NORMS else 1  # norm(t, ord, dim)
    return _dims(args[0], args[at] if len(args) > at else None)


def _batch_at(tr: BatchAxes, t: Any, dims: Sequence[int]) -> int | None:
    """A dimension among ``dims`` where ``t`` has samples, if any."""
    for q, *_ in tr.axes(t) or ():
        if q in dims:
            return q
    return None


_NORMS = {aten.linalg_vector_norm.default, aten.norm.ScalarOpt_dim}


def _samples_along(tr: BatchAxes, t: torch.Tensor, dim: int) -> torch.Tensor | None:
    """The sample at each index of ``t``'s dimension ``dim`` (``None``: none there)."""
    for axis in tr.axes(t) or ():
        if axis.position == dim:
            return axis.samples(torch.arange(t.shape[dim]))
    return None


def _zeros_across(weights: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether ``weights`` (rows by keys: their last two dimensions, holding samples
    ``rows`` and ``keys``) are exactly 0 wherever the row's sample and the key's differ
    (``False`` where their values cannot be read here)."""
    across = (rows[:, None] != keys[None, :]).to(weights.device)
    try:
        return bool((weights.detach()[..., across] == 0).all())
    except RuntimeError:
        return False


def constant_blocks(tr: BatchAxes, a: Any, b: Any) -> bool:
    """Whether ``a @ b`` keeps the samples of ``b``'s rows apart because ``a`` is a constant
    block-diagonal matrix: ``a`` square, 2-D, nothing differentiates it (no batch axes, no
    grad, no transform's wrapper), ``b`` 2-D with its one batch axis along dimension 0 (a
    batch flattened to ``(B * N, F)``), and ``a`` exactly 0 (dense) or without an entry
    (sparse COO or CSR) wherever the row's sample and the column's differ (a graph's
    adjacency built per sample: ``torch.block_diag(*adj)``). Row ``i`` of the product then
    sums rows of ``i``'s own sample only, and the result holds the samples as ``b``'s rows.
    ``a``'s values decide it: the verdict holds for these values only
    (``BatchAxes.values_read``), so an adjacency later changed in place to join two samples
    is watched, and refused, at that call.

    Example: ``torch.block_diag(*adj) @ h.reshape(B * N, F)`` with ``adj`` of shape
    ``(B, N, N)`` is per sample, as ``torch.bmm(adj, h)`` is."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != a.shape[1] or tr.axes(a):
        return False
    if a.requires_grad or is_functorch_wrapped_tensor(a):
        return False
    axes = tr.axes(b) or ()
    held = _samples_along(tr, b, 0) if len(axes) == 1 else None
    if held is None:
        return False
    tr.values_read()
    if a.layout == torch.strided:
        return _zeros_across(a, held, held)
    if a.layout == torch.sparse_coo:
        rows, columns = a._indices().cpu()
    elif a.layout == torch.sparse_csr:
        crow, columns = a.crow_indices().cpu(), a.col_indices().cpu()
        rows = torch.repeat_interleave(torch.arange(len(crow) - 1), crow.diff())
    else:
        return False
    return bool((held[rows] == held[columns]).all())
