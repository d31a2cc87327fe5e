"""The Laplacian of a chain graph by the forward Laplacian on its saved tensors: an MLP's
second derivatives without backward passes.

The loop (``_laplacian.loop``) takes ``1 + n`` backward passes through ``f``'s graph and its
double-backward graph: at two inputs and batch 256, a tanh MLP's ~600 us, of which the
forward pass is ~55. Where ``y``'s graph down to ``x`` is a chain (``_exact.chain.chain``: each
node one input on the way to ``x``, a parameter or nothing else) of products and activations
listed here (``_SECOND``), the forward Laplacian runs along it instead, from ``x`` up: per
sample, the ``n`` first derivatives ``J`` (``(n, N, h)``) and the Laplacian ``L`` (``(N, h)``)
of each node's output,

    product ``z = a M``:       ``J' = J M``,            ``L' = L M``
    (``a`` a concatenation of the chain's node with inputs that do not depend on ``x``, a
    time input's features: ``M``'s rows of that node's columns)
    activation ``u = phi(z)``:   ``J' = phi'(z) J``,        ``L' = phi'(z) L + phi''(z) Σ_k J_k²``

from the tensors the nodes saved at this call (``phi'`` by the node's own backward call,
``tanh_backward`` and so on; nothing is kept between calls, so nothing of ``f`` is baked in).
With ``create_graph`` the ops record their graph as the loop's passes would: parameter
gradients and derivatives in ``x`` go through them. Activations without a closed second
derivative here (GELU, ELU, Softplus, SiLU...) and anything else leave the chain to the loop.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch

from torchdiv._exact.chain import _narrow, _Slice, chain

aten = torch.ops.aten

# per activation node type: what its formulas read off the node (read once: each read makes a
# new Python tensor), ``phi'(z) g`` and ``phi''(z) g`` for a tangent ``g`` (``None`` for the
# second: zero almost everywhere, as the loop's double backward gives it)
Saved = tuple[Any, ...]
Rule = tuple[
    Callable[[Any], Saved],
    Callable[..., torch.Tensor],
    Callable[..., torch.Tensor] | None,
]


def _tanh_second(g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``tanh''(z) g = -2 t (1 - t²) g`` from ``t = tanh(z)``."""
    return aten.tanh_backward(g, t) * (t * -2)


def _sigmoid_second(g: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``phi''(z) g = phi'(z) (1 - 2s) g`` from ``s = phi(z)``."""
    return aten.sigmoid_backward(g, s) * (1 - 2 * s)


def _result(node: Any) -> Saved:
    return (node._saved_result,)


_RULES: dict[str, Rule] = {
    "TanhBackward0": (_result, aten.tanh_backward, _tanh_second),
    "SigmoidBackward0": (_result, aten.sigmoid_backward, _sigmoid_second),
    "ReluBackward0": (_result, lambda g, r: aten.threshold_backward(g, r, 0), None),
    "LeakyReluBackward0": (
        lambda node: (node._saved_self, node._saved_negative_slope),
        lambda g, z, slope: aten.leaky_relu_backward(g, z, slope, False),
        None,
    ),
}
_PRODUCTS = frozenset(("AddmmBackward0", "MmBackward0"))
_KNOWN = _PRODUCTS | frozenset(_RULES)
_SLICE = "slice"  # (a concatenation's slice among the nodes: ``_forward_laplacian``)


def chain_laplacian(y: torch.Tensor, x: torch.Tensor, create_graph: bool) -> torch.Tensor | None:
    """Every sample's Laplacian of every component of ``y`` (``(N, m)``, computed from ``x``,
    ``(N, n)``, the loop's input: a leaf or a view of the caller's ``x``), with a graph only
    where ``create_graph``; or ``None`` where ``y``'s graph is not a chain of listed nodes
    starting with a product of ``x``, or ``f`` is piecewise linear in ``x`` (a ReLU network:
    the loop then runs)."""
    if x.dim() != 2 or y.dim() != 2:
        return None
    steps = chain(y, x)
    if steps is None:
        return None
    # from x up to y; a concatenation's slice (``_exact.chain._Slice``: x's columns beside a
    # time input) by ``_SLICE``, taken by the product right above it
    nodes = [(node, _SLICE if step is _narrow else node.name()) for step, node in reversed(steps)]
    names = [name for _, name in nodes]
    if (
        next((name for name in names if name is not _SLICE), None) not in _PRODUCTS
        or any(name not in _KNOWN and name is not _SLICE for name in names)
        or any(a is _SLICE and b not in _PRODUCTS for a, b in itertools.pairwise(names))
        or names[-1] is _SLICE  # (y the concatenation itself: no product above it)
    ):
        return None
    if not any(name in _RULES and _RULES[name][2] is not None for _, name in nodes):
        return None  # (piecewise linear: told before the block's products, ~70 us at D = 2)
    with torch.set_grad_enabled(create_graph):
        return _forward_laplacian(nodes, x.shape[1])


def _forward_laplacian(nodes: list[tuple[Any, str]], n: int) -> torch.Tensor | None:
    """The forward Laplacian along ``nodes`` (the chain from ``x`` up, with their type names,
    one of them curved) for ``n`` inputs, ``(N, m)``; ``None`` where the first weight, or one
    after a slice, is sparse. One ``(n + 1, N, h)`` block: rows ``0..n-1`` the first
    derivatives, row ``n`` the Laplacian (broadcast over the samples until the first
    activation). A concatenation's slice ``[start, start + width)`` (``x``'s part beside
    inputs that do not depend on it: zero derivatives) goes into the product above it:
    ``J' = J M[start : start + width]``, ``L' = L M[start : start + width]``."""
    rows: torch.Tensor | None = None
    part: _Slice | None = None  # x's columns of the concatenation below the next product
    for node, name in nodes:
        if name is _SLICE:
            part = node
            continue
        if name in _PRODUCTS:
            mat2 = node._saved_mat2
            if mat2.layout != torch.strided and (rows is None or part is not None):
                return None  # (a sparse weight: no sparse activation rules, no sparse narrow)
            if part is not None:  # (the other inputs do not depend on x: J = L = 0 there)
                mat2 = mat2.narrow(0, part.start, part.width)
                part = None
            if rows is None:  # a product of x itself: the rows of mat2, alike for every sample
                rows = torch.cat([mat2, mat2.new_zeros(1, mat2.shape[1])]).unsqueeze(1)
            else:
                rows = torch.matmul(rows, mat2)
            alpha = node._saved_alpha if name == "AddmmBackward0" else 1
            if alpha != 1:
                rows = rows * alpha
            continue
        assert rows is not None  # (the chain starts with a product)
        read, first, second = _RULES[name]
        saved = read(node)
        out = first(rows, *saved)
        if second is not None:
            squares = rows[0] * rows[0]
            for k in range(1, n):
                squares = torch.addcmul(squares, rows[k], rows[k])
            out[n] += second(squares, *saved)
        rows = out
    assert rows is not None  # (the chain starts with a product)
    return rows[n]
