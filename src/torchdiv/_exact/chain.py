"""Backward passes of a chain graph without the autograd engine: an MLP's VJPs as flat ops.

``autograd.grad`` pays the engine's set-up at every pass (a graph task, the dependencies of
every node, the nodes it must run: ~20-30 us on a 2-core CPU), once per cotangent where the
passes are not batched; a D = 2 divergence of a tanh MLP D -> 64 -> 64 -> D at batch 256
takes two such passes, about 135 us of the recipe's ~200 us. Where ``y``'s graph down to
``x`` is a *chain* (each node has one input on the way to ``x``; every other input is a
parameter's leaf, its transpose, or nothing) of nodes whose backward formulas are listed
here (``_FORMULAS``: ``addmm`` and the usual activations), the products for all ``k``
cotangents ``(k,) + y.shape`` are that chain's formulas applied in turn to the whole
``(k, N, m)`` block: the same ATen backward calls the engine's nodes make, on the tensors
the nodes saved in this call (nothing is kept between calls), with a graph exactly where the
engine's ``create_graph`` would record one, so parameter gradients and higher derivatives go
through the same formulas (``tanh_backward``'s own, and so on). A trace (``trace``) takes
the trace's cyclicity instead where the chain holds at most two activations: one product for
all ``k`` rows, not ``k``.

Used by ``GraphJacobian`` in its usual case only (no custom ``Function``, no DDP/FSDP2 hook,
not compiling, no tensor subclass, anomaly detection off, real floating dtypes), and only
where every node is listed: anything else (a residual sum, a view, a batch norm, a module's
full backward hook's node) takes the engine as before. What the engine would run and this does
not: hooks on the graph's nodes (a module's legacy ``register_backward_hook`` too: "auto" runs
it on a structure's first call only). ``f``'s own gradient hooks on tensors are refused before
(``_core.modes.refuse_gradient_hook``); PyTorch's own on tensors ``f`` computes
(``register_multi_grad_hook``) and hooks put on a ``grad_fn`` are not run here (they change
no gradient, or are not caught by any method: ``docs/guide/limitations.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch
from torch.autograd.function import BackwardCFunction
from torch.overrides import has_torch_function

from torchdiv._core import walk
from torchdiv._core.walk import Found, is_guarded

aten = torch.ops.aten

Step = Callable[[torch.Tensor, Any], torch.Tensor]


def _mm(g: torch.Tensor, node: Any) -> torch.Tensor:
    """``mm(self, mat2)``'s product for ``self`` (a ``Linear`` without bias): ``g @ mat2^T``."""
    return torch.matmul(g, node._saved_mat2.t())


def _addmm(g: torch.Tensor, node: Any) -> torch.Tensor:
    """``addmm(b, mat1, mat2, beta, alpha)``'s product for ``mat1``: ``alpha * g @ mat2^T``."""
    out = torch.matmul(g, node._saved_mat2.t())
    alpha = node._saved_alpha
    return out if alpha == 1 else out * alpha


def _elu(g: torch.Tensor, node: Any) -> torch.Tensor:
    """``elu(self, alpha, scale, input_scale)``'s product (ELU, SELU, CELU)."""
    return aten.elu_backward(
        g, node._saved_alpha, node._saved_scale, node._saved_input_scale, False, node._saved_self
    )


# per node type name: the product for the input on the chain, from the node's saved tensors
# (derivatives.yaml's formulas, each the ATen call the node itself makes at every order; not
# SiLU's or Mish's, whose nodes call another function under grad mode, not an ATen op)
_FORMULAS: dict[str, Step] = {
    "AddmmBackward0": _addmm,
    "MmBackward0": _mm,
    "TanhBackward0": lambda g, n: aten.tanh_backward(g, n._saved_result),
    "SigmoidBackward0": lambda g, n: aten.sigmoid_backward(g, n._saved_result),
    "ReluBackward0": lambda g, n: aten.threshold_backward(g, n._saved_result, 0),
    "GeluBackward0": lambda g, n: aten.gelu_backward(
        g, n._saved_self, approximate=n._saved_approximate
    ),
    "EluBackward0": _elu,
    "SoftplusBackward0": lambda g, n: aten.softplus_backward(
        g, n._saved_self, n._saved_beta, n._saved_threshold
    ),
    "LeakyReluBackward0": lambda g, n: aten.leaky_relu_backward(
        g, n._saved_self, n._saved_negative_slope, False
    ),
}
# which input of each listed node is on the chain (``addmm``'s ``mat1``; the others have one)
_ON_CHAIN = {"AddmmBackward0": 1}
# the saved tensor each formula reads (``_raw_saved_*``: its ``SavedTensor``, hooks readable)
_SAVED: dict[str, str] = {
    "AddmmBackward0": "_raw_saved_mat2",
    "MmBackward0": "_raw_saved_mat2",
    "TanhBackward0": "_raw_saved_result",
    "SigmoidBackward0": "_raw_saved_result",
    "ReluBackward0": "_raw_saved_result",
}
_DTYPES = (torch.float32, torch.float64)
# (kinds of nodes besides steps; a concatenation is a step whose slice the walk works out, an
# expand of x to its own shape none)
_LEAF, _TRANSPOSE, _OTHER = "AccumulateGrad", "TBackward0", None
_CAT, _EXPAND = "CatBackward0", "ExpandBackward0"
Kind = tuple[Step, str, int] | str | None
# each PyTorch node type's kind for ``chain``, by the type (one C++ class per op): a step (its
# formula, the attribute of the saved tensor it reads, its input on the chain), a leaf, a
# transpose or another node; read by type, not by ``node.name()`` and three look-ups of the
# new string at every node (a tiny problem's every call walks its chain)
_KINDS: dict[type, Kind] = {}


def _kind(cls: type) -> Kind:
    """The kind of a node of type ``cls`` (``_KINDS``); a custom ``autograd.Function``'s node,
    whose class the user names (and which is freed with its class: not kept), is another."""
    kind = _KINDS.get(cls, _OTHER)
    if kind is not _OTHER or cls in _KINDS:
        return kind
    if issubclass(cls, BackwardCFunction):
        return _OTHER
    name = cls.__name__
    step = _FORMULAS.get(name)
    if step is not None:
        kind = step, _SAVED.get(name, "_raw_saved_self"), _ON_CHAIN.get(name, 0)
    else:  # (these very strings: ``is`` below)
        kind = next((k for k in (_LEAF, _TRANSPOSE, _CAT, _EXPAND) if k == name), _OTHER)
    _KINDS[cls] = kind
    return kind


def _off_chain(node: Any, x: torch.Tensor, met: set[type]) -> bool:
    """Whether an input of a chain node that is not on the chain surely does not reach ``x``:
    nothing, a leaf other than ``x``, or the transpose of one (``Linear``'s weight) or an
    expand of one (a time embedding's parameter beside ``x``); the types
    of the nodes met added to ``met``, but ``x``'s own leaf's (a concatenation's input on the
    chain, asked too): ``met``'s leaves are others' (``chain``'s ``others``), and ``x``'s
    counted as one made a frozen ``f`` with ``x`` beside constants (zuko's velocity) build its
    products with ``create_graph``, its result requiring grad through torchdiv's copy of
    ``x`` (percall31, tests/exact/test_percall31.py)."""
    if node is None:
        return True
    cls = type(node)
    kind = _kind(cls)
    if kind is _TRANSPOSE or kind is _EXPAND:  # (a time embedding's parameter, expanded)
        met.add(cls)
        ((node, _),) = node.next_functions
        if node is None:
            return True
        cls = type(node)
        kind = _kind(cls)
    if kind is _LEAF and node.variable is x:
        return False
    met.add(cls)
    return kind is _LEAF


def chain(
    y: torch.Tensor, x: torch.Tensor, found: Found | None = None, guarded: tuple[str, ...] = ()
) -> list[tuple[Step, Any]] | None:
    """The steps from ``y`` down to ``x`` (each a formula and the node whose saved tensors it
    reads), or ``None`` where ``y``'s graph is not such a chain or the engine must run (a
    tensor subclass, anomaly detection, another dtype, compiling). ``x`` is the engine's input:
    a leaf (its ``AccumulateGrad`` ends the chain) or a view of the caller's ``x`` (its
    ``grad_fn``, at its output, ends it: what lies below is ``x``'s history). A saved tensor
    with hooks (``saved_tensors_hooks``, ``save_on_cpu``, a non-reentrant ``checkpoint``) takes
    the engine: a checkpoint recomputes its region at every read outside a backward pass (a
    3-layer MLP's 5 times for one D = 2 divergence), the engine once per pass (twice).

    ``found`` (a new ``walk.Found``), where the steps are returned: what ``walk.search(y, x,
    guarded)`` finds in that graph, which holds nothing else than the steps, leaves and
    transposes met here (so no batch norm, custom ``Function`` or attention): ``others``, a
    leaf other than ``x`` or ``x``'s history, and ``guarded`` (``GraphJacobian.of_function``
    walks a chain once, not twice: ~3 us, 1 % of a D = 2 diagonal's call)."""
    if (
        y.dtype not in _DTYPES
        or x.dtype != y.dtype
        or has_torch_function((y, x))
        or torch.is_anomaly_enabled()
        or torch.compiler.is_compiling()
    ):
        return None
    steps: list[tuple[Step, Any]] = []
    met: set[type] = set()  # the types of the nodes met below y's, but the steps'
    end, at = x.grad_fn, x.output_nr
    node: Any = y.grad_fn  # (a leaf's node has ``variable``, which its stub lacks)
    nr = y.output_nr
    bound: float = walk._FLOOR
    while node is not None:
        if node is end:
            if not (nr == at and steps):
                return None
            sliced = _sliced(steps, y, x)
            return None if sliced is None else _found(sliced, met, True, found, guarded)
        kind = _kind(type(node))
        if kind is _CAT:  # (its slice once the walk is done: ``_sliced``)
            on = _cat_input(node, x, met)
            if on is None:
                return None
            steps.append((_narrow, on))
            node, nr = node.next_functions[on]
            continue
        if kind is _EXPAND:  # (x broadcast to its own shape: zuko's time input beside it)
            if not _unexpanded(node, x, y):
                return None
            met.add(type(node))
            ((node, nr),) = node.next_functions
            if node is not end and not (node is not None and getattr(node, "variable", None) is x):
                return None  # (only x itself: no other tensor's shape is known here)
            continue
        if type(kind) is not tuple:
            if not (steps and kind is _LEAF and node.variable is x):
                return None
            others = False  # (a parameter's leaf, before x's; loops, not generators, here
            for t in met:  # and below: a tiny problem's every call walks its chain)
                if _kind(t) is _LEAF:
                    others = True
                    break
            met.add(type(node))
            sliced = _sliced(steps, y, x)
            return None if sliced is None else _found(sliced, met, others, found, guarded)
        step, saved, on = kind
        if getattr(node, saved).unpack_hook is not None:
            return None  # (a checkpoint's: each read outside a pass would recompute its region)
        edges = node.next_functions
        for i, (other, _) in enumerate(edges):
            if i != on and not _off_chain(other, x, met):
                return None
        steps.append((step, node))
        if 2 * len(steps) > bound:  # (``walk.walked``: the step's node and its transpose)
            bound = walk.walked(2 * len(steps))
        node, nr = edges[on]
    return None


def _cat_input(node: Any, x: torch.Tensor, met: set[type]) -> int | None:
    """The one input of a concatenation (``CatBackward0``) on the chain, where it is its first
    or last and the concatenation runs along the last dimension (a time input's features
    beside ``x``: zuko's, FFJORD's ``ConcatLinear``, torchdyn's ``DepthCat``): the others
    surely do not reach ``x`` (``_off_chain``). ``None`` otherwise. The inputs' sizes are not
    kept on the node: only the first or the last one's place follows from its size."""
    dim = node._saved_dim  # (an int64 read as unsigned: -1 is 2**64 - 1)
    last = x.dim() - 1
    if last < 1 or (dim - (1 << 64) if dim >= 1 << 63 else dim) % x.dim() != last:
        return None
    edges = node.next_functions
    met.add(type(node))
    on = [i for i, (other, _) in enumerate(edges) if not _off_chain(other, x, met)]
    if len(on) != 1 or on[0] not in (0, len(edges) - 1):
        return None
    return -1 if on[0] and len(edges) > 1 else 0  # (which end: resolved by ``_sliced``)


def _unexpanded(node: Any, x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether an ``expand`` (``ExpandBackward0``) of ``x`` leaves it as it is: from ``x``'s
    shape, none of whose sizes is 1 (a size-1 dimension could grow: its product a sum), to as
    many dimensions (``y`` has ``x``'s: the chain's steps keep them), so to ``x``'s shape."""
    return (
        y.dim() == x.dim()
        and min(x.shape, default=0) > 1
        and tuple(node._saved_self_sym_sizes) == tuple(x.shape)
    )


class _Slice(NamedTuple):
    """A concatenation's product for its input on the chain: ``g[..., start:start + width]``."""

    start: int
    width: int


def _narrow(g: torch.Tensor, at: _Slice) -> torch.Tensor:
    return g.narrow(-1, at.start, at.width)


def _sliced(
    steps: list[tuple[Step, Any]], y: torch.Tensor, x: torch.Tensor
) -> list[tuple[Step, Any]] | None:
    """``steps`` with each concatenation's end (``_cat_input``: ``0`` first, ``-1`` last) made
    its ``_Slice``: the width reaching it from ``y`` down, the width it passes on from ``x``
    up (a linear step's ``(in, out)`` matrix turns one into the other; activations keep it).
    ``None`` where a width cannot be told (two concatenations in a row)."""
    for step, _ in steps:
        if step is _narrow:
            break
    else:  # (no concatenation: the usual chain)
        return steps
    shapes = [node._saved_mat2.shape if step in (_addmm, _mm) else None for step, node in steps]
    n = len(steps)
    reaching: list[int | None] = [None] * n  # the width of the products reaching each step
    width: int | None = y.shape[-1]
    for i, (step, _) in enumerate(steps):
        reaching[i] = width
        matrix = shapes[i]
        width = matrix[0] if matrix is not None else None if step is _narrow else width
    passed: list[int | None] = [None] * n  # the width of those it passes on
    width = x.shape[-1]
    for i in range(n - 1, -1, -1):
        passed[i] = width
        matrix = shapes[i]
        width = matrix[1] if matrix is not None else None if steps[i][0] is _narrow else width
    out = list(steps)
    for i, (step, end) in enumerate(steps):
        total, part = reaching[i], passed[i]
        if step is not _narrow:
            continue
        if total is None or part is None or part > total:
            return None
        out[i] = (_narrow, _Slice(0 if end == 0 else total - part, part))
    return out


def _found(
    steps: list[tuple[Step, Any]],
    met: set[type],
    others: bool,
    found: Found | None,
    guarded: tuple[str, ...],
) -> list[tuple[Step, Any]]:
    """``steps``, with ``found`` (if any) told what ``walk.search`` finds in their graph:
    ``others`` (a leaf besides ``x``'s, or ``x``'s history) and whether a node of the steps'
    or ``met``'s types is ``guarded`` (each type looked up once)."""
    if found is not None:
        found.others = others
        found.guarded = False
        if guarded:
            types = set(met)
            for step, node in steps:
                if step is not _narrow:
                    types.add(type(node))
            for t in types:
                if is_guarded(t, guarded):
                    found.guarded = True
                    break
    return steps


def products(
    steps: list[tuple[Step, Any]], cotangents: torch.Tensor, create_graph: bool
) -> torch.Tensor:
    """``(k,) + y.shape`` cotangents -> ``(k,) + x.shape`` products along the chain, with a
    graph only where ``create_graph`` (as the engine records one)."""
    if torch.is_grad_enabled() is create_graph:  # (no set_grad_enabled object: 3 calls)
        return _applied(steps, cotangents)
    # the switch itself, put back by ``finally``: a ``set_grad_enabled`` object's
    # ``__init__``, ``__enter__`` and ``__exit__`` are three Python calls, ~0.7 us (a chain is
    # taken only eagerly: ``chain``, never while Dynamo traces)
    torch._C._set_grad_enabled(create_graph)
    try:
        return _applied(steps, cotangents)
    finally:
        torch._C._set_grad_enabled(not create_graph)


# adjacent activations of a chain with their width (``trace``)
Group = tuple[int, list[tuple[Step, Any]]]


def trace(steps: list[tuple[Step, Any]], y: torch.Tensor) -> torch.Tensor | None:
    """Every sample's trace of the chain's Jacobian, ``(N,)``, by the trace's cyclicity, or
    ``None`` where the chain holds more than two activations once adjacent ones are merged,
    or none. ``steps`` as ``chain`` gives them for an ``(N, n)`` ``x`` and ``y`` (each
    ``addmm``'s rows are the samples); under the caller's grad mode (with a graph where
    ``products`` would record one: the same saved tensors, the same derivative formulas).

    Top first, the Jacobian is ``J = A D2 M D1 B``: ``D1 = diag(d1)``, ``D2 = diag(d2)`` the
    activations' derivatives (``d2``: their formulas applied to ones), ``M``, ``A`` and ``B``
    products of the linear steps' matrices (``A``, ``B`` maybe absent: identities). So
    ``tr J = tr(D2 M D1 K) = sum_b d1_b (d2 @ (M o K^T))_b`` with ``K = B A``, ``(h1, h2)``:
    one ``(N, h2) @ (h2, h1)`` product for all ``n`` diagonal entries, where ``products``
    takes ``n`` such and a basis (a D -> 64 -> 64 -> D MLP at D = 2: half the flops of its
    largest step), ``D1`` applied by its formulas to that product. With one activation,
    ``tr J = sum_b d1_b diag(B A)_b``."""
    if y.dim() != 2:
        return None
    # top first: the matrix (out, in) of adjacent linear steps, or adjacent activations with
    # their width
    factors: list[torch.Tensor | Group] = []
    width = y.shape[1]
    for step, node in steps:
        last = factors[-1] if factors else None
        if step is _narrow:  # (a concatenation: the columns of x's part, an (out, in) matrix)
            columns = slice(node.start, node.start + node.width)
            if isinstance(last, torch.Tensor):
                factors[-1] = last[:, columns]
            else:
                factors.append(torch.eye(width, dtype=y.dtype, device=y.device)[:, columns])
            width = node.width
        elif step is _addmm or step is _mm:
            mat2 = node._saved_mat2  # (in, out)
            matrix = mat2.t()
            if step is _addmm and node._saved_alpha != 1:
                matrix = matrix * node._saved_alpha
            width = mat2.shape[0]
            if isinstance(last, torch.Tensor):
                factors[-1] = last @ matrix
            else:
                factors.append(matrix)
        elif isinstance(last, tuple):
            last[1].append((step, node))
        else:
            factors.append((width, [(step, node)]))
    top, bottom = factors[0], factors[-1]
    a = top if isinstance(top, torch.Tensor) else None
    b = bottom if isinstance(bottom, torch.Tensor) else None
    inner = factors[a is not None : len(factors) - (b is not None)]
    if len(inner) not in (1, 3):
        return None
    h1, first = cast(Group, inner[-1])
    if len(inner) == 1:
        k = b @ a if a is not None and b is not None else a if b is None else b
        ones = y.new_ones(())
        g = (ones if k is None else k.diagonal()).expand(y.shape[0], h1)
    else:  # (K^T as A^T B^T, contiguous: M o K^T of a transposed view took ~6 us, not ~2)
        kt = (
            a.t() @ b.t()
            if a is not None and b is not None
            else None
            if a is None and b is None
            else cast(torch.Tensor, a if b is None else b).t()
        )
        (h2, second), m = cast(Group, inner[0]), cast(torch.Tensor, inner[1])
        d2 = _slopes(second, y, h2)
        g = d2 * m.diagonal() if kt is None else d2 @ (m * kt)
    return _slopes(first, y, h1, g).sum(-1)


def widest(steps: list[tuple[Step, Any]], y: torch.Tensor) -> int:
    """The most elements of a product along the chain per cotangent (``_plan.Sizes.widest``,
    which plans how many go at once): ``y``'s, or ``N x in`` of a linear step's ``(in, out)``
    matrix (an activation's product is as large as the one it gets)."""
    inputs = (node._saved_mat2.shape[0] for step, node in steps if step is _addmm or step is _mm)
    return max(y.numel(), y.shape[0] * max(inputs, default=0))


def _slopes(
    steps: list[tuple[Step, Any]], y: torch.Tensor, width: int, g: torch.Tensor | None = None
) -> torch.Tensor:
    """``g`` (``None``: ones, ``(N, width)``) through adjacent activations' formulas in turn
    (``trace``'s ``D g``). An ELU's whose ``alpha``, ``scale`` and ``input_scale`` are 1 is
    its derivative ``exp(min(x, 0))`` times ``g`` (``g`` itself where ``g`` is ones) where no
    graph is recorded through its input ``x`` (grad mode off, or ``x`` not requiring grad:
    "auto"'s frozen calls): ``elu_backward`` takes ``x <= 0``'s branch ``alpha scale
    input_scale exp(input_scale x)`` at ``x = 0`` too, 1 there as the other's ``scale`` is;
    its product with ``g`` is ``elu_backward``'s in ``g``, so a graph through ``g`` alone has
    its derivative. Not with a graph through ``x``: ``elu_backward``'s own derivative in ``x``
    is masked by ``x < 0`` (0 at the kink), ``clamp(max=0)``'s by ``x <= 0`` (parameter
    gradients 2 % off at ``x = 0``: tests/exact/test_percall31.py), and a ``where`` of a
    scalar takes ~90 us. ~11 us against ``elu_backward``'s ~16 us at ``(256, 64)`` float32,
    one thread: zuko's velocity (ELU by default) at D = 2, its trace 129 -> 107 us."""
    for step, node in steps:
        if (
            step is _elu
            and node._saved_alpha == 1
            and node._saved_scale == 1
            and node._saved_input_scale == 1
        ):
            x = node._saved_self
            if not (x.requires_grad and torch.is_grad_enabled()):
                slope = x.clamp(max=0).exp()
                g = slope if g is None else g * slope
                continue
        g = step(y.new_ones(()).expand(y.shape[0], width) if g is None else g, node)
    assert g is not None  # (a group holds one activation at least)
    return g


def _applied(steps: list[tuple[Step, Any]], g: torch.Tensor) -> torch.Tensor:
    """``g`` through ``steps``' formulas in turn."""
    for step, node in steps:
        g = step(g, node)
    return g


def unit_products(
    steps: list[tuple[Step, Any]], start: int, stop: int, y: torch.Tensor, create_graph: bool
) -> torch.Tensor | None:
    """``products`` of the unit cotangents ``e_start .. e_{stop-1}`` of an ``(N, m)`` ``y``,
    ``(k, N, n)``, where the top step is linear and an activation follows it: that step's
    products are its matrix's rows, the same for every sample (no basis, no product with
    it); the activation's formula, an elementwise ATen op of the rows ``(k, 1, h)`` and its
    saved ``(N, h)`` tensor, broadcasts them to a tensor of their own (each view op of an
    ``expand`` costs ~1 us: 4 of a D = 2 diagonal's call); a concatenation's slice between
    them (a time input beside the activation's output) keeps the rows' part. Else ``None``."""
    if y.dim() != 2 or len(steps) < 2:
        return None
    below: Step | None = steps[1][0]
    if below is _narrow:
        below = next((step for step, _ in steps[2:] if step is not _narrow), None)
    if below is None or below is _addmm or below is _mm:
        return None
    step, node = steps[0]
    if step is not _addmm and step is not _mm:
        return None
    if torch.is_grad_enabled() is create_graph:  # (training: no set_grad_enabled object)
        return _top_rows(steps, start, stop, step, node)
    torch._C._set_grad_enabled(create_graph)  # (the switch itself: see ``products``)
    try:
        return _top_rows(steps, start, stop, step, node)
    finally:
        torch._C._set_grad_enabled(not create_graph)


def _top_rows(
    steps: list[tuple[Step, Any]], start: int, stop: int, step: Step, node: Any
) -> torch.Tensor:
    """``unit_products``' rows, under the grad mode it sets: the top step's (``step``, its
    ``node``) through the steps below it."""
    rows = node._saved_mat2.t()  # (m, h): row i of the (out, in) matrix
    if start or stop != rows.shape[0]:
        rows = rows[start:stop]
    if step is _addmm and node._saved_alpha != 1:
        rows = rows * node._saved_alpha
    return _applied(steps[1:], rows.unsqueeze(1))
