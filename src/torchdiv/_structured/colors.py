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
768; FFJORD's four-layer ODE net on 3 x 32 x 32 images 75 instead of 3072. The reach comes
from the captured graph (``torchdiv._structured.locality``: convolutions of any stride,
dilation or transposition, pooling, upsampling, padding, squeezes and channel slices); an op
that reads positions far apart (normalisation over positions, attention) ends the analysis
and every unit vector is its own colour.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from torchdiv._structured.locality import reach
from torchdiv._taylor import Graph


def colors(
    graph: Graph, values: list[list[Any]], x: torch.Tensor, batch_dims: int, held: bool = False
) -> torch.Tensor | None:
    """The colour of every element of ``x``'s flattened event, ``(n,)`` on the CPU (plans are
    made on the host, so that a GPU never waits for them), or ``None`` if the graph is not
    local or colouring saves nothing. ``values``: every node's outputs; ``held``: as
    ``locality.reach``'s."""
    event = x.shape[batch_dims:]
    if len(event) < 2 or tuple(graph.output_shape) != tuple(x.shape):
        return None
    reaches = reach(graph, values, x, batch_dims, held)
    if reaches is None:
        return None
    periods = [min(r + 1, size) for r, size in zip(reaches, event[1:], strict=True)]
    if event[0] * math.prod(periods) >= math.prod(event):
        return None
    color = torch.arange(event[0]).reshape(-1, *[1] * len(periods))
    for axis, (period, size) in enumerate(zip(periods, event[1:], strict=True)):
        shape = [1] * (len(periods) + 1)
        shape[axis + 1] = size
        color = color * period + (torch.arange(size) % period).reshape(shape)
    return color.reshape(-1)
