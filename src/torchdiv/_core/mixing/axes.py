"""The records the watch keeps per tensor: where its samples sit, and the rules' types.

``Axis``: one batch dimension of a tensor, ``(position, size, inner, rows, source)``: along
dimension ``position`` index ``j`` holds sample ``(j // inner) % size`` of ``x``'s batch
dimension ``source`` (or ``rows[(j // inner) % len(rows)]`` for samples an indexing op moved);
``Axes``, a tensor's tuple of them. ``Pick``: samples picked out of the batch (``x[0]``).
``Block``: marked attention weights; ``Lines``: the samples along each dimension of a tensor
written through views. ``Carry`` (``after``: the batch dimensions of an op's results, ``None``
for a result not followed) and ``Mixing`` (``before``: what an op combined, ``None`` if
nothing) are the two kinds of per-op rule ``torchdiv._core.mixing.tables`` holds; both take
the ``BatchAxes`` (``torchdiv._core.mixing.tracker``) that calls them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

import torch

if TYPE_CHECKING:
    from torchdiv._core.mixing.tracker import BatchAxes


class Axis(NamedTuple):
    """A batch dimension of a tensor: along dimension ``position``, index ``j`` holds sample
    ``(j // inner) % size`` of a batch dimension of ``size`` samples; for samples an indexing
    op moved (``x[perm]``, ``x[mask]``, ``index_select``, ``gather``), sample
    ``rows[(j // inner) % len(rows)]`` (``rows`` empty: in order, the first form). The samples
    are those of ``x``'s batch dimension ``source``: with ``batch_dims=2`` and a square batch,
    ``x.transpose(0, 1)`` holds each dimension's samples along the other one."""

    position: int
    size: int
    inner: int
    rows: tuple[int, ...] = ()
    source: int = 0

    @property
    def period(self) -> int:
        """How many ``inner``-long runs along ``position`` before the samples repeat."""
        return len(self.rows) or self.size

    def samples(self, at: torch.Tensor) -> torch.Tensor:
        """The sample held at each index ``at`` (an integer tensor) along ``position``."""
        runs = torch.div(at, self.inner, rounding_mode="floor") % self.period
        return _rows_tensor(self.rows).to(at.device)[runs] if self.rows else runs


@functools.lru_cache(maxsize=64)
def _rows_tensor(rows: tuple[int, ...]) -> torch.Tensor:
    """``rows`` as a tensor, made once: every indexing op that reads moved rows asks again."""
    return torch.tensor(rows)


Axes = tuple[Axis, ...]


# marked attention weights: (the tensor, the samples along its rows, along its keys, its
# version when marked: ``BatchAxes.blocks``)
Block = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None]


# x's batch dimension -> (a dimension of a tensor, the sample at each index along it, -1 where
# none was written)
Lines = dict[int, tuple[int, torch.Tensor]]


class Pick(NamedTuple):
    """Samples picked out of a batch dimension of ``size`` samples (``x``'s batch dimension
    ``source``): ``sample`` (``None``: several, or not known which), and ``what`` picked it,
    for the message."""

    size: int
    sample: int | None
    what: str
    source: int = 0


# where batch dimensions go (``after``): ``rule(tr, args, out)`` -> each result's batch
# dimensions (strings: ``BatchAxes`` is named for type checkers only, its module imports these)
Carry: TypeAlias = "Callable[[BatchAxes, Sequence[Any], Any], list[Axes | None] | None]"
# what combines samples (``before``): ``rule(tr, args)`` -> what the op combined, if anything
Mixing: TypeAlias = "Callable[[BatchAxes, Sequence[Any]], str | None]"
