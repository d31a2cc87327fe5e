"""A captured graph's Jacobian as a sum over paths of products of two kinds of factors.

Take ``f`` built from per-sample linear maps that are the same for every sample (``Linear``
layers, concatenation with a time input, reshapes) and elementwise functions (activations,
gates, biases, scalings), joined by sums (residual connections). Then for every sample ``b``

    J_b = sum_p c_p F_{p,m} ... F_{p,2} F_{p,1}

over the paths ``p`` from ``x`` to ``f(x)`` (a sum node forks two paths), each factor being

* ``Shared(A)``: ``out = A in``, the same matrix in every sample (``mm``/``addmm`` with a
  weight that does not depend on ``x``; data movement such as ``cat`` with constants, found by
  moving indices through the op), or
* ``Diagonal(d_b)``: ``out = d_b * in`` elementwise (``phi'`` of an activation; a gate; the
  constant of ``mul``/``add``), per sample or the same in every sample.

``torchdiv._structured.cycle`` takes traces of such products. Anything else (a convolution,
a product of two tensors that both depend on ``x``, a normalisation) is not a factor:
``paths`` then returns ``None`` and the caller propagates Jacobian columns instead.

Which call gives which factor, and which sums give which signs, depends on the graph's
structure alone: ``paths`` also returns these ``Route``s, and ``followed`` makes the factors of
a graph of the same structure (a later call of ``f``) along them, without walking the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from torchdiv._core.modes import host_planning, to_device
from torchdiv._core.script import cached
from torchdiv._taylor import RULES, Context, Graph, Jet
from torchdiv._taylor.capture import Node, Ref
from torchdiv._taylor.elementwise import DERIVATIVES, FIRST
from torchdiv._taylor.linear import MOVES
from torchdiv._taylor.tree import leaves, map_leaves

aten = torch.ops.aten
Tensor = torch.Tensor

MAX_PATHS = 16  # beyond this many paths (nested residual blocks) columns are propagated
MAX_MATRIX = 1 << 22  # elements of a shared factor built from a data-movement op

_SUMS = {aten.add.Tensor: 1.0, aten.sub.Tensor: -1.0}
_MOVEMENT = {*MOVES, aten.constant_pad_nd.default}


@dataclass(frozen=True)
class Shared:
    """``out = matrix @ in`` in every sample; ``matrix`` is ``(w_out, w_in)``."""

    matrix: Tensor


@dataclass(frozen=True)
class Diagonal:
    """``out = scale[b] * in`` elementwise; ``scale`` is ``(N, w)``, or ``(1, w)`` if the
    same in every sample."""

    scale: Tensor

    @property
    def shared(self) -> bool:
        return self.scale.shape[0] == 1


Factor = Shared | Diagonal


@dataclass(frozen=True)
class Path:
    """``coefficient * F_m ... F_1``; ``factors`` in the order they apply to ``x``."""

    coefficient: float
    factors: tuple[Factor, ...]


@dataclass(frozen=True)
class Route:
    """How a path was found, from the graph's structure alone: the sum nodes whose second
    operand it takes (its coefficient is the product of their signs) and the calls that give
    its factors, ``(output, source)``, with how many factors each gave and which rule gave
    them (``kinds``: a later call makes them by that rule directly)."""

    signs: tuple[int, ...]
    steps: tuple[tuple[Ref, Ref], ...]
    counts: tuple[int, ...]
    kinds: tuple[str, ...]  # the ``_Walker`` method that made each step's factors


def paths(
    graph: Graph, values: list[list[Any]], x: Tensor, n_samples: int
) -> tuple[list[Path], list[Route]] | None:
    """The paths of ``graph``'s output (``values``: every node's outputs) and their routes,
    or ``None`` if some op on the way is not a factor or there are more than ``MAX_PATHS``."""
    if not isinstance(graph.output, Ref) or n_samples == 0:
        return None
    walker = _Walker(graph, values, x, n_samples)
    for ref in walker.ancestors(graph.output):  # in the order f computed them
        found = walker.memo[ref] = walker.walk(ref)
        if found is None:  # the output depends on it
            return None
    found = walker.memo[graph.output]
    return None if found is None else (found, walker.routes[graph.output])


def followed(
    routes: list[Route],
    graph: Graph,
    values: list[list[Any]],
    x: Tensor,
    n_samples: int,
    given: dict[Ref, tuple[Factor, ...]] | None = None,
) -> list[Path] | None:
    """The paths along ``routes`` found by ``paths`` on a graph of the same structure (a
    recording checked against the same template), with this graph's values: the factors of
    the same calls, without the walk; ``None`` if a call no longer gives the factors it gave
    (an index map that reads index values), and the caller walks again. ``given``: factors
    already made, by their call's output (``moved``'s)."""
    walker = _Walker(graph, values, x, n_samples)
    made: dict[Ref, tuple[Factor, ...] | None] = dict(given or {})
    found = []
    for route in routes:
        coefficient = 1.0
        for node in route.signs:
            coefficient *= walker.sign(graph.nodes[node])
        factors: list[Factor] = []
        for (out, source), count, kind in zip(route.steps, route.counts, route.kinds, strict=True):
            if out not in made:
                made[out] = walker.made_by(kind, graph.nodes[out.node], out, source)
            step = made[out]
            if step is None or len(step) != count:
                return None
            factors += step
        found.append(Path(coefficient, tuple(factors)))
    return found


def moved(
    routes: list[Route], graph: Graph, values: list[list[Any]], x: Tensor, n_samples: int
) -> dict[Ref, tuple[Factor, ...]] | None:
    """The data-movement factors along ``routes`` (``_Walker._movement``: 0/1 matrices made
    on the host from shapes, and from the index values of ``index_select``), by their call's
    output, for ``followed``'s ``given``; ``None`` if one no longer applies."""
    walker, found = _Walker(graph, values, x, n_samples), {}
    for route in routes:
        for (out, source), kind in zip(route.steps, route.kinds, strict=True):
            if kind == "_movement" and out not in found:
                made = walker.made_by(kind, graph.nodes[out.node], out, source)
                if made is None:
                    return None
                found[out] = made
    return found


class _Walker:
    def __init__(self, graph: Graph, values: list[list[Any]], x: Tensor, n_samples: int):
        self.graph, self.values, self.x, self.n = graph, values, x, n_samples
        self.memo: dict[Ref, list[Path] | None] = {Ref(-1): [Path(1.0, ())]}
        self.routes: dict[Ref, list[Route]] = {Ref(-1): [Route((), (), (), ())]}
        self.kinds: dict[Ref, str] = {}

    def ancestors(self, output: Ref) -> list[Ref]:
        """The outputs of recorded calls that ``output`` depends on, itself included, sorted
        (a loop, not a recursion: a network may have hundreds of layers)."""
        found, todo = set(), [output]
        while todo:
            ref = todo.pop()
            if ref.node < 0 or ref in found:
                continue
            found.add(ref)
            node = self.graph.nodes[ref.node]
            todo += [a for a in leaves((node.args, node.kwargs)) if self.dependent(a)]
        return sorted(found, key=lambda r: (r.node, r.leaf))

    def value(self, a: Any) -> Any:
        if not isinstance(a, Ref):
            return a
        return self.x if a.node < 0 else self.values[a.node][a.leaf]

    def dependent(self, a: Any) -> bool:
        return isinstance(a, Ref) and (a.node < 0 or self.graph.nodes[a.node].depends)

    def walk(self, ref: Ref) -> list[Path] | None:
        """The paths to ``ref``, from those of its inputs (already in ``memo``)."""
        node = self.graph.nodes[ref.node]
        inputs = {a for a in leaves((node.args, node.kwargs)) if self.dependent(a)}
        if len(self.values[ref.node]) != 1 or not _per_sample(self.value(ref), self.n):
            return None
        if node.func in _SUMS and len(inputs) == 2 and len(node.args) == 2:
            return self._sum(node, ref)
        if len(inputs) != 1:
            return None
        (source,) = inputs
        inner = self.memo[source]
        if inner is None:
            return None
        factors = self.factors(node, ref, source)
        if factors is None:
            return None
        self.routes[ref] = [
            Route(
                r.signs,
                (*r.steps, (ref, source)),
                (*r.counts, len(factors)),
                (*r.kinds, self.kinds[ref]),
            )
            for r in self.routes[source]
        ]
        return [Path(p.coefficient, (*p.factors, *factors)) for p in inner]

    def sign(self, node: Node) -> float:
        """The coefficient a sum node gives its second operand."""
        return _SUMS[node.func] * node.kwargs.get("alpha", 1.0)

    def _sum(self, node: Node, ref: Ref) -> list[Path] | None:
        a, b = node.args
        if self.value(a).shape != self.value(b).shape:  # one side broadcast: not elementwise
            return None
        left, right = self.memo[a], self.memo[b]
        if left is None or right is None or len(left) + len(right) > MAX_PATHS:
            return None
        sign = self.sign(node)
        second = [Route((*r.signs, ref.node), r.steps, r.counts, r.kinds) for r in self.routes[b]]
        self.routes[ref] = [*self.routes[a], *second]
        return [*left, *(Path(sign * p.coefficient, p.factors) for p in right)]

    def factors(self, node: Node, out: Ref, source: Ref) -> tuple[Factor, ...] | None:
        """The factors ``node`` contributes (none for an identity), or ``None``; the rule that
        made them is noted in ``kinds``."""
        kind = self._kind(node, out, source)
        if kind is None:
            return None
        self.kinds[out] = kind
        return self.made_by(kind, node, out, source)

    def made_by(self, kind: str, node: Node, out: Ref, source: Ref) -> tuple[Factor, ...] | None:
        """The factors of ``node`` by the rule ``kind`` (``_kind``'s choice on a graph of
        the same structure), or ``None`` if it does not apply to these values."""
        if not _per_sample(self.value(source), self.n):
            return None
        try:
            made: tuple[Factor, ...] | None = getattr(self, kind)(node, out, source)
        except (RuntimeError, TypeError):  # a rule or an index map that does not apply here
            return None
        return made

    def _kind(self, node: Node, out: Ref, source: Ref) -> str | None:
        """Which rule gives ``node``'s factors, from its op and arguments (``None``: it is not
        a factor)."""
        if not _per_sample(self.value(source), self.n):
            return None
        if node.func in DERIVATIVES and _is(node.args[0], source):  # phi(a): phi'(a)
            return "_first" if node.func in FIRST else "_derivative"
        if torch.Tag.pointwise in node.func.tags and node.func in RULES:
            return "_pointwise"
        if node.func in (aten.mm.default, aten.addmm.default):
            return "_matmul"
        if node.func in _MOVEMENT:
            return "_movement"
        return None

    def _first(self, node: Node, out: Ref, source: Ref) -> tuple[Diagonal]:
        """``phi(a, *rest)``: ``phi'(a)`` alone (``FIRST``), without the second derivative."""
        rest, kwargs = map_leaves(self.value, (node.args[1:], node.kwargs))
        y = self.value(out)
        return (self._diagonal(FIRST[node.func](self.value(source), y, *rest, **kwargs), y),)

    def _derivative(self, node: Node, out: Ref, source: Ref) -> tuple[Diagonal]:
        """``phi(a, *rest)``: its derivative in ``a``."""
        rest, kwargs = map_leaves(self.value, (node.args[1:], node.kwargs))
        y = self.value(out)
        d1, _ = DERIVATIVES[node.func](self.value(source), y, *rest, **kwargs)
        return (self._diagonal(d1, y),)

    def _diagonal(self, d: Tensor | None, like: Tensor) -> Diagonal:
        """``d`` (broadcasting against ``like``) as an ``(N or 1, w)`` scale."""
        if d is None:
            return Diagonal(like.new_zeros(1, like.numel() // self.n))
        if d.shape == like.shape and like.dim() == 2 and like.shape[0] == self.n:
            return Diagonal(d)  # (N, w) already: an activation of a Linear's output
        k = _batch_prefix(like.shape, self.n)
        d = d.reshape((1,) * (like.dim() - d.dim()) + d.shape)
        if all(s == 1 for s in d.shape[:k]):
            return Diagonal(d.expand(d.shape[:k] + like.shape[k:]).reshape(1, -1))
        return Diagonal(d.expand(like.shape).reshape(self.n, -1))

    def _pointwise(self, node: Node, out: Ref, source: Ref) -> tuple[Diagonal] | None:
        """An elementwise op of ``a`` and constants (same shape as ``a``, not broadcast): its
        rule applied to a unit derivative."""
        a, y = self.value(source), self.value(out)
        if y.shape != a.shape:
            return None
        unit = Jet(a, a.new_ones((1,) * (a.dim() + 1)), None)
        args = map_leaves(lambda v: unit if _is(v, source) else self.value(v), node.args)
        kwargs = map_leaves(self.value, node.kwargs)
        jet = RULES[node.func](Context(1, second_order=False), *args, **kwargs)
        return (self._diagonal(None if jet.jac is None else jet.jac[0], y),)

    def _matmul(self, node: Node, out: Ref, source: Ref) -> tuple[Shared] | None:
        """``a @ W`` (``mm``) or ``bias + alpha a @ W`` (``addmm``) with ``W`` and the bias
        constant (a bias that is ``a`` itself, ``addmm(a, a, W)``, adds a path of its own:
        not one factor)."""
        args = node.args if node.func == aten.mm.default else node.args[1:]
        bias = node.args[0] if node.func == aten.addmm.default else None
        if not _is(args[0], source) or self.dependent(args[1]) or self.dependent(bias):
            return None
        if self.value(args[0]).shape[0] != self.n:  # rows that are not the samples
            return None
        weight = self.value(args[1]).T
        alpha = node.kwargs.get("alpha", 1.0) if node.func == aten.addmm.default else 1.0
        return (Shared(weight if alpha == 1 else alpha * weight),)

    def _movement(self, node: Node, out: Ref, source: Ref) -> tuple[Shared, ...] | None:
        """A data-movement op as a 0/1 matrix (``_moved``); where its arguments hold no
        integer tensor (an index, whose values move the elements), the matrix depends on
        shapes alone and is kept for the next call of that shape (``_kept_moved``: a time
        input's ``cat`` and ``expand`` in every call of a CNF's velocity, ~0.1 ms each)."""
        a, y = self.value(source), self.value(out)
        w_in, w_out = a.numel() // self.n, y.numel() // self.n
        if w_in * w_out > MAX_MATRIX:
            return None
        at = _Moving(a.shape, self.n, w_out, a.dtype, a.device)
        key = _shape_key((node.args, node.kwargs), source, self.value)
        if key is not None and w_in * w_out <= KEPT_MATRIX:
            return _kept_moved(node.func, key, at)
        indexed = node.func in _INDEXED

        def index(v: Any) -> Any:
            return _index(v, source, self.value, a.shape, indexed)

        arguments, keywords = map_leaves(index, node.args), map_leaves(index, node.kwargs)
        return _moved(node.func, arguments, keywords, at)


KEPT_MATRIX = 1 << 16  # elements of a data-movement matrix kept across calls (``_kept_moved``)


class _Mark:
    """``_shape_key``'s mark of ``x``'s tensor (``SOURCE``) or of a floating constant's shape
    (``FLOAT``, first of a pair): an object of its own, equal to no argument."""


_SOURCE, _FLOAT = _Mark(), _Mark()


# the data-movement ops whose integer tensor argument is an index (its values move the
# elements); elsewhere one is data (``cat`` promotes an integer column beside ``x``)
_INDEXED = frozenset({aten.index_select.default})


def _index(v: Any, source: Ref, value: Any, shape: torch.Size, indexed: bool) -> Any:
    """An argument of a data-movement op as element indices: ``source``'s (``shape``) their
    positions, another tensor ``-1`` (a constant: no source), but an integer tensor of an
    ``indexed`` op (an index) itself."""
    if _is(v, source):
        return torch.arange(shape.numel()).reshape(shape)
    v = value(v)
    if not isinstance(v, Tensor):
        return v
    return v.cpu() if indexed and not v.is_floating_point() else torch.full(v.shape, -1)


def _shape_key(v: Any, source: Ref, value: Any) -> Any:
    """A data-movement op's arguments as a hashable key of what moves the elements: ``source``
    and floating constants by their shapes, lists as tuples; ``None`` where an integer tensor
    (an index) or an unhashable value is among them."""
    if isinstance(v, (list, tuple)):
        items = [_shape_key(item, source, value) for item in v]
        return None if any(item is None for item in items) else tuple(items)
    if isinstance(v, dict):
        return _shape_key(tuple(v.items()), source, value)
    if _is(v, source):
        return _SOURCE
    v = value(v)
    if isinstance(v, Tensor):
        return (_FLOAT, tuple(v.shape)) if v.is_floating_point() else None
    try:
        hash(v)
    except TypeError:
        return None
    return v


def _unkeyed(v: Any, shape: torch.Size) -> Any:
    """``_shape_key``'s key back to index arguments (``_index``): tuples stay tuples (ATen
    takes them for lists), the pairs of a dictionary's key are read by ``_kept_moved``."""
    if v is _SOURCE:
        return torch.arange(shape.numel()).reshape(shape)
    if isinstance(v, tuple) and len(v) == 2 and v[0] is _FLOAT:
        return torch.full(v[1], -1)
    if isinstance(v, tuple):
        return tuple(_unkeyed(item, shape) for item in v)
    return v


class _Moving(NamedTuple):
    """Where a data-movement op moves elements: ``x``'s tensor (``shape``, ``n`` samples) to
    ``w_out`` elements per sample, and the matrix's ``dtype`` and ``device``."""

    shape: torch.Size
    n: int
    w_out: int
    dtype: torch.dtype
    device: torch.device


@cached(64)
def _kept_moved(func: Any, key: Any, at: _Moving) -> tuple[Shared, ...] | None:
    """``_moved`` of arguments that ``_shape_key`` gave ``key``: the same for every call of
    those shapes (kept; its matrix is never written to)."""
    arguments, keywords = key
    unkeyed = {name: _unkeyed(v, at.shape) for name, v in keywords}
    return _moved(func, _unkeyed(arguments, at.shape), unkeyed, at)


def _moved(
    func: Any, arguments: Any, keywords: dict[str, Any], at: _Moving
) -> tuple[Shared, ...] | None:
    """A data-movement op as a 0/1 matrix ``(w_out, w_in)``, found by moving element indices
    through it on the CPU (a plan never waits for the device): its arguments as ``_index``
    gives them, where floating constants are ``-1`` (padding too), so every output element
    names its source in ``x``'s tensor or none. ``()`` for the identity on every sample's
    flattened event (a reshape, a copy); ``None`` where an element moves to another sample."""
    shape, n, w_out = at.shape, at.n, at.w_out
    w_in = shape.numel() // n
    with host_planning():
        if func == aten.constant_pad_nd.default:
            arguments = (*arguments[:2], -1)
        moved = func(*arguments, **keywords).reshape(n, w_out)
        samples = torch.arange(n)[:, None]
        if not bool(((moved < 0) | (moved // w_in == samples)).all()):
            return None  # an element moved to another sample
        source_index, kept = moved[0] % w_in, moved[0] >= 0
        if w_in == w_out and bool(kept.all()) and torch.equal(source_index, torch.arange(w_in)):
            return ()
        matrix = torch.zeros(w_out, w_in, dtype=at.dtype)
        matrix[torch.arange(w_out)[kept], source_index[kept]] = 1
    return (Shared(to_device(matrix, at.device)),)


def _is(v: Any, ref: Ref) -> bool:
    return isinstance(v, Ref) and v == ref


def _batch_prefix(shape: torch.Size, n_samples: int) -> int:
    """How many leading dimensions of ``shape`` index samples (their product is ``N``)."""
    size = 1
    for k, s in enumerate(shape):
        if size == n_samples:
            return k
        size *= s
    return len(shape) if size == n_samples else -1


def _per_sample(v: Any, n_samples: int) -> bool:
    """Whether ``v`` is a floating tensor whose leading dimensions are the ``N`` samples."""
    return (
        isinstance(v, Tensor)
        and v.is_floating_point()
        and v.numel() % n_samples == 0
        and _batch_prefix(v.shape, n_samples) >= 0
    )
