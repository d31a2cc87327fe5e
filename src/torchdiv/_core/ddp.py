"""DistributedDataParallel's output sink, seen from torchdiv's own backward passes.

With ``static_graph=True``, DDP passes every output of ``forward`` through an
``autograd.Function`` (``_DDPSink``) whose backward, the first time it runs after a forward,
queues the gradient all-reduce as a callback of the *current* backward pass and marks it
queued. torchdiv's products (``autograd.grad`` of ``f(x)`` with respect to ``x``, inside the
call) run that backward first: the all-reduce then fires at the end of torchdiv's inner pass,
before the caller's ``loss.backward()`` has produced any parameter gradient, and the
caller's pass, finding it marked queued, never reduces. Every rank keeps its own gradients
and training silently diverges from one process (relative errors 0.3-1.3 measured).

``inner_backward`` marks the all-reduce as queued during torchdiv's own passes and puts the
mark back afterwards, so the sink queues it in the caller's backward, as DDP intends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def static_graph_owners(y: torch.Tensor) -> list[Any]:
    """The ``DistributedDataParallel(static_graph=True)`` modules whose sink ``y`` was
    computed through (none unless ``torch.distributed`` is initialised: no walk then)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return []
    owners, seen, stack = [], set(), [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        ref = getattr(node, "ddp_weakref", None)  # only _DDPSink's backward has one
        ddp = ref() if callable(ref) else None
        if ddp is not None and getattr(ddp, "static_graph", False) and ddp not in owners:
            owners.append(ddp)
        stack.extend(child for child, _ in node.next_functions)
    return owners


@contextlib.contextmanager
def inner_backward(owners: list[Any]) -> Iterator[None]:
    """Run torchdiv's own backward passes through ``owners``' sinks without queueing their
    gradient all-reduce there (see the module docstring)."""
    saved = [ddp._static_graph_delay_allreduce_enqueued for ddp in owners]
    for ddp in owners:
        ddp._static_graph_delay_allreduce_enqueued = True
    try:
        yield
    finally:
        for ddp, mark in zip(owners, saved, strict=True):
            ddp._static_graph_delay_allreduce_enqueued = mark
