"""Walking an autograd graph: every node below a root, once; what one walk finds."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.function import BackwardCFunction

BATCH_NORM_NODES = {  # their backward nodes' type names
    "NativeBatchNormBackward0",
    "CudnnBatchNormBackward0",
    "MiopenBatchNormBackward0",
}
# the nodes of the fused attention kernels, which have no double backward (``math_attention``)
FUSED_ATTENTION = ("ScaledDotProduct",)


def nodes(root: Any) -> Iterator[Any]:
    """Every node of the autograd graph below ``root`` (a ``grad_fn``; itself included), each
    once, depth first; nothing for ``None`` (a tensor that does not require grad)."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(child for child, _ in node.next_functions)


@dataclass
class Found:
    """What ``search`` found in a graph: ``others``, a tensor requiring grad other than the
    leaf it was given; its batch-norm nodes (for ``_core.mixing.check_graph``) and custom
    ``autograd.Function`` nodes; ``fused``, a fused attention kernel; ``guarded``, a node of
    the ops it was asked about."""

    others: bool = False
    batch_norms: list[Any] = field(default_factory=list)
    custom: list[Any] = field(default_factory=list)
    fused: bool = False
    guarded: bool = False


def search(y: torch.Tensor, x_leaf: torch.Tensor, guarded: tuple[str, ...] = ()) -> Found:
    """One walk of ``y``'s graph for what the engines that evaluate ``f`` unwatched need
    (``Found``); ``guarded``: type-name prefixes of the nodes to look for
    (``_core.modes.changed_nodes``).

    Leaves appear as ``AccumulateGrad`` nodes, the only nodes with a ``variable``; nodes are
    told by their type's name, not by ``getattr`` (an exception raised and caught at every
    other node). A plain loop, not ``nodes``: it runs at every call of a small problem and
    every one-probe estimate, where 10 us are 1-2% of the cost.
    """
    found = Found()
    seen: set[Any] = set()
    stack: list[Any] = [y.grad_fn]  # autograd nodes (``variable``: not in torch's stubs)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = type(node).__name__
        if name == "AccumulateGrad":
            found.others = found.others or node.variable is not x_leaf
        elif isinstance(node, BackwardCFunction):  # (its name is the user's)
            found.custom.append(node)
        elif name in BATCH_NORM_NODES:
            found.batch_norms.append(node)
        elif name.startswith(FUSED_ATTENTION):
            found.fused = True
        if guarded and name.startswith(guarded):  # a batch norm's node too (instance norm)
            found.guarded = True
        stack += [child for child, _ in node.next_functions]
    return found
