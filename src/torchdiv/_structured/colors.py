"""Compressed directions for local Jacobians (convolutional nets): Curtis-Powell-Reid colouring.

If every output element at position ``p`` (channel ``c``) depends only on inputs within
distance ``r_a`` of ``p`` along each spatial axis ``a``, then two input elements of the same
channel whose positions are congruent modulo ``r_a + 1`` on every axis never meet in one
output element's receptive field... except for the output at their own positions. So one
forward direction can carry the sum of all unit vectors of such a class ("colour") and still
give every diagonal entry exactly:

    (J sum_{j in g} e_j)_i = J_ii + sum_{j in g, j != i} J_ij = J_ii     for i in g,

the other terms being structural zeros (the convolutions never add them). A net of three
3x3 convolutions on 3 x 16 x 16 images has ``r = 3``: 3 x 4 x 4 = 48 directions instead of
768. The reach comes from the captured graph: elementwise ops keep it, a stride-1
convolution with kernel ``k``, dilation ``d`` and padding ``q`` adds ``max(q, d(k-1) - q)``,
concatenation over channels takes the largest; any other op on ``x`` (pooling, strides,
normalisation over positions, reshapes) ends the analysis and every unit vector is its own
colour.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from torchdiv._taylor import Graph
from torchdiv._taylor.capture import Node, Ref
from torchdiv._taylor.tree import leaves

aten = torch.ops.aten
Reach = tuple[int, ...]

_PER_POSITION = {  # ops that act on each position alone (beyond the pointwise ones)
    aten.clone.default,
    aten.alias.default,
    aten.native_batch_norm.default,  # evaluation mode only (checked)
    aten._native_batch_norm_legit_no_training.default,
}


def colors(
    graph: Graph, values: list[list[Any]], x: torch.Tensor, batch_dims: int
) -> torch.Tensor | None:
    """The colour of every element of ``x``'s flattened event, ``(n,)`` on the CPU (plans are
    made on the host, so that a GPU never waits for them), or ``None`` if the graph is not
    local or colouring saves nothing. ``values``: every node's outputs."""
    event = x.shape[batch_dims:]
    if len(event) < 2 or tuple(graph.output_shape) != tuple(x.shape):
        return None
    reach = _Locality(graph, values, x, batch_dims).reach()
    if reach is None:
        return None
    periods = [min(r + 1, size) for r, size in zip(reach, event[1:], strict=True)]
    if event[0] * math.prod(periods) >= math.prod(event):
        return None
    color = torch.arange(event[0]).reshape(-1, *[1] * len(periods))
    for axis, (period, size) in enumerate(zip(periods, event[1:], strict=True)):
        shape = [1] * (len(periods) + 1)
        shape[axis + 1] = size
        color = color * period + (torch.arange(size) % period).reshape(shape)
    return color.reshape(-1)


class _Locality:
    """Per spatial axis, how far from its own position each tensor computed from ``x`` reads
    ``x``; every such tensor must keep ``x``'s batch and spatial shape."""

    def __init__(self, graph: Graph, values: list[list[Any]], x: torch.Tensor, batch_dims: int):
        self.graph, self.values, self.x, self.batch_dims = graph, values, x, batch_dims
        self.reaches: dict[Ref, Reach] = {Ref(-1): (0,) * (x.dim() - batch_dims - 1)}

    def reach(self) -> Reach | None:
        for index, node in enumerate(self.graph.nodes):
            if node.depends and not self._visit(index, node):
                return None
        return self.reaches.get(self.graph.output)

    def _visit(self, index: int, node: Node) -> bool:
        inputs = [
            a
            for a in leaves((node.args, node.kwargs))
            if isinstance(a, Ref) and (a.node < 0 or self.graph.nodes[a.node].depends)
        ]
        out = self.values[index][0]
        if any(a not in self.reaches for a in inputs) or not self._aligned(out):
            return False
        widest = tuple(max(r) for r in zip(*(self.reaches[a] for a in inputs), strict=True))
        reach = self._reach(node, inputs, out, widest)
        if reach is not None:
            self.reaches[Ref(index)] = reach
        return reach is not None

    def _aligned(self, v: Any) -> bool:
        x, b = self.x, self.batch_dims
        return (
            isinstance(v, torch.Tensor)
            and v.dim() == x.dim()
            and v.shape[:b] == x.shape[:b]
            and v.shape[b + 1 :] == x.shape[b + 1 :]
        )

    def _value(self, a: Ref) -> torch.Tensor:
        return self.x if a.node < 0 else self.values[a.node][a.leaf]

    def _reach(
        self, node: Node, inputs: list[Ref], out: torch.Tensor, widest: Reach
    ) -> Reach | None:
        if torch.Tag.pointwise in node.func.tags or node.func in _PER_POSITION:
            if any(self._value(a).shape != out.shape for a in inputs):
                return None  # broadcast: one position read by many
            if node.func == aten.native_batch_norm.default and node.args[5]:
                return None  # training mode: statistics over positions
            return widest
        if node.func == aten.cat.default:
            dim = node.args[1] if len(node.args) > 1 else 0
            return widest if dim % out.dim() == self.batch_dims else None
        if node.func == aten.convolution.default and inputs == [node.args[0]]:
            weight = node.args[1]  # constant, maybe computed in f (weight norm)
            return _convolution_reach(
                node, self._value(weight) if isinstance(weight, Ref) else weight, widest
            )
        return None


def _convolution_reach(node: Node, weight: torch.Tensor, reach: Reach) -> Reach | None:
    """A stride-1 convolution (weight and bias constant) adds ``max(q, d(k-1) - q)``."""
    _, _, _, stride, padding, dilation, transposed, _, _ = node.args
    if transposed or any(s != 1 for s in stride):
        return None
    return tuple(
        r + max(p, d * (k - 1) - p)
        for r, p, d, k in zip(reach, padding, dilation, weight.shape[2:], strict=True)
    )
