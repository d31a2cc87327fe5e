"""Exact operators from a Jacobian engine: the dense Jacobian and its diagonal, chunk by chunk.

An engine (``ForwardJacobian``, ``ReverseJacobian`` or ``GraphJacobian``) hands out blocks of ``k`` Jacobian
columns or rows of all ``N`` samples at once, shape ``(k, N, m)``. The consumers here never
touch autograd; they only slice and stack those blocks, so memory in flight is one block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from torchdiv._autograd import GraphJacobian
from torchdiv._basis import chunks
from torchdiv._checks import event_numel
from torchdiv._forward import ForwardJacobian
from torchdiv._reverse import ReverseJacobian

EXACT_METHODS = ("auto", "forward", "reverse")

# `auto` keeps about this many tangent elements (k basis vectors x the larger of x and f(x))
# in flight per chunk; measured on 2-core CPUs, larger chunks stop paying off (bench/).
AUTO_CHUNK_ELEMENTS = 1 << 21


class Engine(Protocol):
    """What the consumers need: ``block(start, stop)`` gives ``(k, N, m)`` columns or rows."""

    blocks_are_rows: bool
    num_basis: int
    x: torch.Tensor
    batch_dims: int

    @property
    def y_shape(self) -> torch.Size: ...

    def block(self, start: int, stop: int) -> torch.Tensor: ...


def dense(engine: Engine, chunk_size: int) -> torch.Tensor:
    """Every sample's Jacobian, shape ``(N, m, n)`` (outputs by inputs)."""
    blocks = [engine.block(start, stop) for start, stop in chunks(engine.num_basis, chunk_size)]
    if not blocks:  # no basis vectors: an empty event on the side the engine walks along
        m = math.prod(engine.y_shape[engine.batch_dims :])
        return engine.x.new_zeros(_samples(engine), m, event_numel(engine.x, engine.batch_dims))
    stacked = torch.cat(blocks)  # (basis, N, other side)
    return stacked.permute(1, 0, 2) if engine.blocks_are_rows else stacked.permute(1, 2, 0)


def diagonal(engine: Engine, chunk_size: int) -> torch.Tensor:
    """Diagonal of every sample's square Jacobian, shape ``(N, n)``."""
    parts = []
    for start, stop in chunks(engine.num_basis, chunk_size):
        block = engine.block(start, stop)
        j = torch.arange(stop - start, device=block.device)
        parts.append(block[j, :, start + j])  # (k, N): entry (start+j, start+j) of each sample
    if not parts:
        return engine.x.new_zeros(_samples(engine), 0)
    return torch.cat(parts).T


def _samples(engine: Engine) -> int:
    return engine.x.shape[: engine.batch_dims].numel()


def auto_chunk(engine: Engine, x: torch.Tensor) -> int:
    """The chunk size ``auto`` uses when the caller gave none."""
    per_vector = max(x.numel(), engine.y_shape.numel(), 1)
    return max(1, min(engine.num_basis, AUTO_CHUNK_ELEMENTS // per_vector))


def prefer_forward(num_outputs: int, x: torch.Tensor, batch_dims: int) -> bool:
    """Whether ``auto`` uses forward mode: when the sample's output has more elements than its
    input (fewer JVPs than VJPs); square Jacobians use reverse mode, measured faster (bench/)."""
    return num_outputs > event_numel(x, batch_dims)


def evaluate(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    batch_dims: int,
    method: str,
    chunk_size: int | None,
    consume: Callable[[Engine, int], torch.Tensor],
) -> tuple[torch.Tensor, torch.Size]:
    """Run ``consume`` on the engine ``method`` names; returns its result and ``f(x).shape``.

    ``"forward"`` and ``"reverse"`` are taken as given (``chunk_size=None``: all at once).
    ``"auto"`` picks a mode and a chunk size by shape (see ``divergence``); if ``torch.func``
    cannot run ``f`` (an op without a forward-mode rule or a batching rule, a legacy
    ``autograd.Function``) it falls back to the plain-autograd engine, which runs anything
    ``backward()`` can.
    """
    if method == "forward":
        engine: Engine = ForwardJacobian(f, x, batch_dims)
    elif method == "reverse":
        engine = ReverseJacobian(f, x, batch_dims)
    else:
        try:
            engine = ReverseJacobian(f, x, batch_dims)
            if prefer_forward(engine.num_basis, x, batch_dims):
                engine = ForwardJacobian(f, x, batch_dims)
            return _consume(engine, consume, chunk_size or auto_chunk(engine, x))
        except RuntimeError:  # NotImplementedError included
            engine = GraphJacobian.of_function(f, x, batch_dims)
            return _consume(engine, consume, chunk_size or auto_chunk(engine, x))
    return _consume(engine, consume, chunk_size or max(engine.num_basis, 1))


def _consume(
    engine: Engine, consume: Callable[[Engine, int], torch.Tensor], chunk: int
) -> tuple[torch.Tensor, torch.Size]:
    return consume(engine, chunk), engine.y_shape
