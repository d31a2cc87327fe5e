"""Jacobian diagonals by forward propagation of (compressed) unit vectors through the graph.

The captured graph is replayed on jets that carry only Jacobian columns (the Laplacian
engine with its second-order term off). The directions are stored once for all samples, so
the first linear or convolution layer costs as many rows as there are directions, not that
times the batch; with a colouring (``torchdiv._structured.colors``) each direction is the
sum of a colour's unit vectors and every diagonal entry is read off the column of its own
colour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from torchdiv._core.basis import WHOLE, Share
from torchdiv._core.checks import event_numel
from torchdiv._core.modes import host_planning, to_device
from torchdiv._taylor import Context, Graph, Jet, propagate

# widest jac (directions x elements) per chunk when the caller gives no chunk_size
CHUNK_ELEMENTS = 2**24


@dataclass(frozen=True)
class Readout:
    """Where ``diagonal`` reads each entry, planned on the host from the colours alone (a
    function of ``f``'s structure and ``x``'s shape, never of values; kept by a compiled
    replay, ``replay``): ``colors`` (``(n,)``, the elements' colours), the chunks of colours
    carried at once (``pieces``: ``start``, ``stop``, and the chunk's entries as ``rows``
    (colour - ``start``) and ``elements``), and ``back``, the permutation from colour order
    to element order (``None`` for a share: colour order kept); tensors on ``x``'s device
    (a copy to the device is no op Dynamo traces)."""

    colors: torch.Tensor
    pieces: tuple[tuple[int, int, torch.Tensor, torch.Tensor], ...]
    back: torch.Tensor | None


def diagonal(
    graph: Graph,
    x: torch.Tensor,
    batch_dims: int,
    chunk_size: int | None,
    colors: torch.Tensor | None,
    share: Share = WHOLE,
) -> torch.Tensor:
    """Every sample's Jacobian diagonal, ``(N, n)``; ``colors[i]`` (on the CPU) is element
    ``i``'s colour (``None``: every element its own). The readout indices are made on the
    CPU too: nothing here waits for the device. With a ``share`` of the colours, the entries
    of their elements only, ``(N, k)``, in colour order (their sum is that share's trace)."""
    return read(graph, x, batch_dims, readout(graph, x, batch_dims, chunk_size, colors, share))


def readout(
    graph: Graph,
    x: torch.Tensor,
    batch_dims: int,
    chunk_size: int | None,
    colors: torch.Tensor | None,
    share: Share = WHOLE,
) -> Readout:
    """``diagonal``'s ``Readout`` (arguments as there), made on the host."""
    n = event_numel(x, batch_dims)
    with host_planning():
        colors = torch.arange(n) if colors is None else colors
        num_colors = int(colors.max()) + 1 if n else 0
        chunk = chunk_size or graph.chunk(num_colors, CHUNK_ELEMENTS)
        order = torch.argsort(colors)
        pieces = []
        for start, stop in share.chunks(num_colors, chunk):
            mine = order[(colors[order] >= start) & (colors[order] < stop)]
            rows = to_device(colors[mine] - start, x.device)
            pieces.append((start, stop, rows, to_device(mine, x.device)))
        back = to_device(torch.argsort(order), x.device) if share == WHOLE else None
    return Readout(to_device(colors, x.device), tuple(pieces), back)


def read(graph: Graph, x: torch.Tensor, batch_dims: int, plan: Readout) -> torch.Tensor:
    """``diagonal`` along ``plan``: the columns of each piece's colours propagated through
    ``graph`` at ``x``, and their entries read (plain tensor ops: Dynamo traces them)."""
    entries: list[torch.Tensor] = []
    constants: dict[int, list[Any]] = {}
    for start, stop, rows, elements in plan.pieces:
        found = columns(graph, x, batch_dims, plan.colors, start, stop, constants)
        entries.append(found[rows, :, elements].T)  # (N, elements of the chunk)
    if not entries:
        n = event_numel(x, batch_dims) if plan.back is not None else 0
        return x.new_zeros(x.shape[:batch_dims].numel(), n)
    diag = torch.cat(entries, 1)
    return diag if plan.back is None else diag[:, plan.back]


def columns(
    graph: Graph,
    x: torch.Tensor,
    batch_dims: int,
    colors: torch.Tensor,
    start: int,
    stop: int,
    constants: dict[int, list[Any]],
) -> torch.Tensor:
    """``J v_g`` for the colours ``g`` in ``[start, stop)``, flat ``(k, N, n)``."""
    k, n_samples = stop - start, x.shape[:batch_dims].numel()
    picked = colors[None, :] == torch.arange(start, stop, device=colors.device)[:, None]
    directions = to_device(picked, x.device).to(x.dtype)
    directions = directions.reshape(k, *[1] * batch_dims, *x.shape[batch_dims:])
    out = propagate(graph, Jet(x, directions, None), Context(k, False), constants)
    if not isinstance(out, Jet) or out.jac is None:  # f(x) does not depend on x
        return x.new_zeros(k, n_samples, event_numel(x, batch_dims))
    return out.jac.expand(k, *graph.output_shape).reshape(k, n_samples, -1)
