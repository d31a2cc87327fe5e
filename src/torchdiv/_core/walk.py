"""Walking an autograd graph: every node below a root, once; what one walk finds; the nodes
on the paths to a tensor (``towards``); one backward pass (``vjp``, ``batched_vjp``)."""

from __future__ import annotations

import ctypes
import functools
import resource
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.function import BackwardCFunction, once_differentiable
from torch.autograd.graph import _engine_run_backward
from torch.overrides import has_torch_function

from torchdiv._core.subclass import plain_tensor

BATCH_NORM_NODES = {  # their backward nodes' type names
    "NativeBatchNormBackward0",
    "CudnnBatchNormBackward0",
    "MiopenBatchNormBackward0",
}
# the nodes of the fused attention kernels, which have no double backward (``math_attention``)
FUSED_ATTENTION = ("ScaledDotProduct",)


class GraphTooDeep(RuntimeError):
    """A graph too large to walk in Python: its nodes' Python objects would make PyTorch free
    it recursively, past the C stack (``walked``)."""


# Measured (torch 2.13, CPython 3.11, x86-64): once Python has touched an autograd node (its
# ``grad_fn`` or a ``next_functions`` entry: any walk of the graph from Python), PyTorch keeps
# the node's Python object for the node's life, and freeing the graph then recurses through
# those objects' deallocators, ~210 bytes of C stack per node, instead of its iterative
# deletion: a recurrent loop of 10^4 steps (a chain of 40,000 nodes) crashed the process
# (segfault) when its graph was freed after a walk, with the default 8 MiB stack; 9,500
# steps did not. A walk therefore stops, with an error, past ``_BYTES_PER_NODE`` per node of
# the stack (so that what it touched can be freed), checked from ``_FLOOR`` nodes on. It
# counts the nodes it expands (reads ``next_functions`` of, which makes their children's
# Python objects): a path of touched nodes is at most one node longer, so the recursion
# depth is bounded; leaves (``AccumulateGrad``), most of a wide graph's nodes (10^4 modules
# summed: ~40,000 nodes, half of them leaves, every path 6 long), are not counted.
_BYTES_PER_NODE = 320
_FLOOR = 4096


# glibc's stack for a thread started without a size where the stack limit is unlimited
# (``ARCH_STACK_DEFAULT_SIZE``, x86-64 and AArch64)
_THREAD_DEFAULT = 2 * 2**20


def _stack_bytes() -> int | None:
    """The C stack this thread has: the stack limit (``ulimit -s``) for the main thread
    (``None`` where it is unlimited: that stack grows); another's as the C library tells it
    (``_thread_stack``), else the size ``threading.stack_size`` sets, else glibc's default:
    that limit, 2 MiB where it is unlimited. (``threading.stack_size`` is the size of threads
    started from then on, not this one's, and an unlimited limit gave threads no bound: a
    10^4-step loop's walked graph crashed the process freed in a thread, rev-qmc28.)"""
    main = threading.current_thread() is threading.main_thread()
    size = None if main else _thread_stack() or threading.stack_size()
    if size:
        return size
    soft = resource.getrlimit(resource.RLIMIT_STACK)[0]
    if soft == resource.RLIM_INFINITY:
        return None if main else _THREAD_DEFAULT
    return soft


def _thread_stack() -> int | None:
    """This thread's stack size from the C library (``pthread_getattr_np``: glibc, musl),
    ``None`` where it cannot be asked."""
    libc = _libc()
    if libc is None:
        return None
    attributes = ctypes.create_string_buffer(256)  # (a pthread_attr_t: 56-64 bytes)
    size = ctypes.c_size_t()
    if libc.pthread_getattr_np(libc.pthread_self(), attributes) != 0:
        return None
    try:
        if libc.pthread_attr_getstacksize(attributes, ctypes.byref(size)) != 0:
            return None
    finally:
        libc.pthread_attr_destroy(attributes)
    return size.value or None


@functools.cache
def _libc() -> Any:
    """The C library's pthread functions ``_thread_stack`` calls, or ``None`` without them."""
    try:
        libc = ctypes.CDLL(None)
        libc.pthread_self.restype = ctypes.c_ulong
        libc.pthread_self.argtypes = []
        libc.pthread_getattr_np.argtypes = [ctypes.c_ulong, ctypes.c_void_p]
        libc.pthread_attr_getstacksize.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        libc.pthread_attr_destroy.argtypes = [ctypes.c_void_p]
    except (OSError, AttributeError, TypeError):  # (no such library or function)
        return None
    return libc


def walked(count: int) -> float:
    """The number of nodes a walk may expand, having expanded ``count``: raises
    ``GraphTooDeep`` where ``count`` is past what this thread's stack allows to free (see
    above); else the bound, to be checked again past it (``inf``: no bound)."""
    stack = _stack_bytes()
    bound = float("inf") if stack is None else max(stack // _BYTES_PER_NODE, _FLOOR)
    if count > bound:
        mib = stack / 2**20 if stack is not None else 0.0  # (MiB, one decimal)
        raise GraphTooDeep(
            f"torchdiv: the autograd graph to walk has more than {int(bound)} nodes, more than "
            "torchdiv walks in Python: PyTorch frees a graph whose nodes Python has touched "
            f"recursively (~210 bytes of C stack a node), and past ~{int(bound)} nodes on this "
            f"thread's {mib:.1f} MiB stack that would crash the process (a segmentation fault) "
            "when the graph is freed. Use method='reverse' or method='forward' (no walk of "
            "f's graph; with torchdiv.divergence, jacobian or jacobian_diagonal and f, not "
            "graph_divergence or graph_jacobian; for a Laplacian, method='taylor' or "
            "'forward-over-reverse'), or raise the stack limit before Python "
            "starts (`ulimit -s unlimited`; in a thread, threading.stack_size(...) before "
            "starting it): the bound is the stack's size / "
            f"{_BYTES_PER_NODE} bytes"
        )
    return bound


def nodes(root: Any, stop: Any = None) -> Iterator[Any]:
    """Every node of the autograd graph below ``root`` (a ``grad_fn``; itself included), each
    once, depth first; nothing for ``None`` (a tensor that does not require grad). ``stop``
    (``x.grad_fn``: below it lies ``x``'s history) is yielded, not walked below. Raises
    ``GraphTooDeep`` past the nodes this thread's stack could free (``walked``)."""
    seen, stack = set(), [root]
    inner, bound = 0, float(_FLOOR)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        if node is not stop:
            children = node.next_functions
            if children:
                inner += 1
                if inner > bound:
                    bound = walked(inner)
                stack.extend(child for child, _ in children)


@dataclass
class Found:
    """What ``search`` found in a graph: ``others``, a tensor requiring grad other than the
    leaf it was given; its batch-norm nodes (for ``_core.mixing.watch.check_graph``) and custom
    ``autograd.Function`` nodes; ``fused``, a fused attention kernel (``attention``: its
    nodes); ``guarded``, a node of the ops it was asked about."""

    others: bool = False
    batch_norms: list[Any] = field(default_factory=list)
    custom: list[Any] = field(default_factory=list)
    fused: bool = False
    attention: list[Any] = field(default_factory=list)
    guarded: bool = False
    # a node type ``_exact.chain`` has no formula for (``CHAIN_NODES``): that chain check fails,
    # so it is skipped (its walk makes the fresh graph's Python node objects: ~15 us a call)
    unchained: bool = False


# what ``search`` looks for, by node type (bits of ``_kind``)
_LEAF, _CUSTOM, _BATCH_NORM, _FUSED, _GUARDED, _UNCHAINED = 1, 2, 4, 8, 16, 32
# the node types a chain graph (``_exact.chain``) may hold: its formulas' nodes, the leaves and
# a weight's transpose (``tests/exact/test_chain.py`` checks them against ``_FORMULAS``)
CHAIN_NODES = frozenset(
    {
        "AccumulateGrad",
        "TBackward0",
        "CatBackward0",
        "ExpandBackward0",
        "AddmmBackward0",
        "MmBackward0",
        "TanhBackward0",
        "SigmoidBackward0",
        "ReluBackward0",
        "GeluBackward0",
        "EluBackward0",
        "SoftplusBackward0",
        "LeakyReluBackward0",
    }
)
# ``_kind`` of the C++ node types met so far, per tuple of guarded prefixes (a fixed set of
# types: PyTorch's; custom ``autograd.Function`` nodes, one type per user class, are not kept)
_KINDS: dict[tuple[type, tuple[str, ...]], int] = {}


def _kind(cls: type, guarded: tuple[str, ...]) -> int:
    """What a node of type ``cls`` is to ``search``, as the bits above; told by the type's
    name, not by ``getattr`` (an exception raised and caught at every other node). Kept in
    ``_KINDS`` but for a custom ``Function``'s node."""
    name = cls.__name__
    kind = 0
    if name == "AccumulateGrad":  # leaves: the only nodes with a ``variable``
        kind = _LEAF
    elif issubclass(cls, BackwardCFunction):  # (its name is the user's)
        kind = _CUSTOM
    elif name in BATCH_NORM_NODES:
        kind = _BATCH_NORM
    elif name.startswith(FUSED_ATTENTION):
        kind = _FUSED
    if guarded and name.startswith(guarded):  # a batch norm's node too (instance norm)
        kind |= _GUARDED
    if name not in CHAIN_NODES:  # (a custom Function's node too)
        kind |= _UNCHAINED
    if not kind & _CUSTOM:
        _KINDS[cls, guarded] = kind
    return kind


def is_guarded(cls: type, guarded: tuple[str, ...]) -> bool:
    """Whether ``search(..., guarded)`` finds a node of type ``cls`` ``guarded``."""
    kind = _KINDS.get((cls, guarded))
    return bool((_kind(cls, guarded) if kind is None else kind) & _GUARDED)


def search(y: torch.Tensor, x_leaf: torch.Tensor, guarded: tuple[str, ...] = ()) -> Found:
    """One walk of ``y``'s graph for what the engines that evaluate ``f`` unwatched need
    (``Found``); ``guarded``: type-name prefixes of the nodes to look for
    (``_core.modes.changed_nodes``).

    A plain loop, not ``nodes``, with each node type's meaning looked up once (``_kind``,
    ``_KINDS``): it runs at every call of a small problem and every one-probe estimate,
    where 10 us are 1-2% of the cost (a trained MLP's graph of 30 nodes: 25 us of string
    tests on a 2-core CPU without the table).

    Not below ``x_leaf`` where it is a view of an ``x`` that requires grad: that is ``x``'s
    history (``others``: it requires grad), not ``f``'s; in a solve differentiated through
    its steps it is every earlier step's graph, walked at every step until rev-scoresde20.
    """
    found = Found()
    seen: set[Any] = set()
    stack: list[Any] = [y.grad_fn]  # autograd nodes (``variable``: not in torch's stubs)
    kinds = _KINDS
    history = x_leaf.grad_fn  # where ``x_leaf`` is ``x.view_as(x)`` of an ``x`` requiring grad
    inner, bound = 0, float(_FLOOR)  # (nodes expanded: ``walked``)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node is history:  # ``x``'s history (an ODE solve's earlier steps), not ``f``'s:
            found.others = True  # not walked (it made every step's walk longer)
            continue
        cls = type(node)
        kind = kinds.get((cls, guarded))
        if kind is None:
            kind = _kind(cls, guarded)
        if kind == _UNCHAINED:  # (most nodes of a graph that is not an MLP's)
            found.unchained = True
        elif kind:
            found.unchained = found.unchained or bool(kind & _UNCHAINED)
            if kind & _LEAF:
                found.others = found.others or node.variable is not x_leaf
            elif kind & _CUSTOM:
                found.custom.append(node)
            elif kind & _BATCH_NORM:
                found.batch_norms.append(node)
            elif kind & _FUSED:
                found.fused = True
                found.attention.append(node)
            if kind & _GUARDED:
                found.guarded = True
        children = node.next_functions
        if children:
            inner += 1
            if inner > bound:
                bound = walked(inner)
            stack += [child for child, _ in children]
    return found


def vjp(
    y: torch.Tensor, x: torch.Tensor, cotangent: torch.Tensor, create_graph: bool
) -> torch.Tensor | None:
    """``torch.autograd.grad(y, x, cotangent, retain_graph=True, create_graph=create_graph,
    allow_unused=True)[0]``: one backward pass, ``None`` where ``y`` does not depend on ``x``.

    ``autograd.grad``'s Python layer (argument normalisation, ``_make_grads``' checks of the
    cotangent against ``y``, through symbolic-shape helpers) costs about 12 us a call on a
    2-core CPU, against 15-20 us for a whole backward pass of a small MLP at batch 4; the
    loops of small problems take two to four passes per call. Where nothing overrides torch
    functions and the cotangent matches ``y`` (what ``_make_grads`` checks, and all it would
    change), the pass goes to the engine as ``autograd.grad`` sends it; anything else goes
    through ``autograd.grad`` itself.
    """
    plain = not has_torch_function((y, x, cotangent))
    if plain and cotangent.shape == y.shape and cotangent.dtype == y.dtype and y.requires_grad:
        return _engine_pass(y, x, cotangent, create_graph)[0]
    (out,) = torch.autograd.grad(
        y, x, cotangent, retain_graph=True, create_graph=create_graph, allow_unused=True
    )
    return plain_tensor(out)


def batched_vjp(
    y: torch.Tensor, x: torch.Tensor, cotangents: torch.Tensor, create_graph: bool
) -> torch.Tensor | None:
    """``torch.autograd.grad(y, x, cotangents, retain_graph=True, create_graph=create_graph,
    allow_unused=True, is_grads_batched=True)[0]``: ``(k,) + x.shape``, one backward pass for
    the ``k`` cotangents ``(k,) + y.shape``, ``None`` where ``y`` does not depend on ``x``.
    As ``vjp``, where nothing overrides torch functions and the cotangents match ``y``, the
    pass goes to the engine under PyTorch's batching as ``autograd.grad`` sends it, without
    its Python layer (~25 us of a 1.65 ms Laplacian of a Chebyshev KAN at two inputs, batch
    256, one thread: the Laplacian loop's batched second level), nor that of the legacy
    ``_vmap`` it calls (pytree in and out dims, a wrapper made per call: another ~90 us
    there): the batch dimension added and removed at a vmap level of its own, as ``_vmap``
    does."""
    plain = not has_torch_function((y, x, cotangents))
    if plain and cotangents.shape[1:] == y.shape and cotangents.dtype == y.dtype:
        level = torch._C._vmapmode_increment_nesting()
        try:
            batched = torch._add_batch_dim(cotangents, 0, level)  # type: ignore[attr-defined]
            (out,) = _engine_pass(y, x, batched, create_graph)
            if out is None:
                return None
            return torch._remove_batch_dim(out, level, len(cotangents), 0)  # type: ignore[attr-defined]
        finally:
            torch._C._vmapmode_decrement_nesting()
    (out,) = torch.autograd.grad(
        y,
        x,
        cotangents,
        retain_graph=True,
        create_graph=create_graph,
        allow_unused=True,
        is_grads_batched=True,
    )
    return out


def _engine_pass(
    y: torch.Tensor, x: torch.Tensor, cotangent: torch.Tensor, create_graph: bool
) -> tuple[torch.Tensor | None, ...]:
    """The engine's backward pass ``autograd.grad`` makes (the graph kept), ``(x's product,)``."""
    return _engine_run_backward(
        (y,), (cotangent,), True, create_graph, (x,), True, accumulate_grad=False
    )


def towards(y: torch.Tensor, x: torch.Tensor) -> list[Any]:
    """The nodes of ``y``'s graph on a path to ``x``: to the edge into its ``grad_fn`` at its
    ``output_nr`` (not through another output of that node; the node is left out with ``x``'s
    own history), or to a leaf's ``AccumulateGrad``; children first."""
    order: list[Any] = []
    seen: set[Any] = set()
    stack: list[tuple[Any, bool]] = [(y.grad_fn, False)]
    inner, bound = 0, float(_FLOOR)  # (nodes expanded: ``walked``)
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
        elif node is not None and node not in seen:
            seen.add(node)
            stack.append((node, True))
            children = node.next_functions if node is not x.grad_fn else ()
            if children:  # (below ``x.grad_fn``, ``x``'s history: none of it reaches ``x``)
                inner += 1
                if inner > bound:
                    bound = walked(inner)
                stack += [(child, False) for child, _ in children]
    reaches: dict[Any, bool] = {}
    edge = x.grad_fn, x.output_nr  # (not another output of x's node: ``x, z = h.split(...)``)
    for node in order:  # (every child before its parents)
        if x.grad_fn is None:
            own = getattr(node, "variable", None) is x
            reaches[node] = own or any(reaches.get(c, False) for c, _ in node.next_functions)
        else:
            reaches[node] = any(
                nr == edge[1] if c is edge[0] else reaches.get(c, False)
                for c, nr in node.next_functions
            )
    return [node for node in order if reaches[node] and node is not x.grad_fn]


# the code of every ``backward`` that ``@once_differentiable`` wraps (its inner function's)
_ONCE = once_differentiable(lambda ctx, *grads: None).__code__


def once_differentiable_functions(custom: list[Any], y: torch.Tensor, x: torch.Tensor) -> list[str]:
    """The names of the custom ``autograd.Function``s among ``custom`` (``Found.custom`` of
    ``y``'s graph) whose ``backward`` is ``@once_differentiable``, or is a ``torch.compile``d
    graph's (AOTAutograd's ``CompiledFunction``: ``COMPILED``) or torchdiffeq's adjoint
    (``OdeintAdjointMethod``: ``ADJOINT``, which solves the adjoint ODE under ``no_grad``
    from detached states: a Laplacian through ``odeint_adjoint`` was 0, the gradients of a
    divergence through it lacked its part), and that lie on a path from
    ``y`` to ``x``. Their ``backward`` returns constants when its gradients do not require
    grad (PyTorch's ``DelayedError`` is attached only when they do, and torchdiv's basis
    vectors do not): a derivative of a product through them silently lacks their part. The
    paths are walked only when such a node is there."""
    once = [node for node in custom if _once_differentiable(node._forward_cls)]
    if not once:
        return []
    on_path = set(towards(y, x))
    return sorted({_name(node._forward_cls) for node in once if node in on_path})


COMPILED = "torch.compile's CompiledFunction"  # the name of a compiled graph's Function
ADJOINT = "torchdiffeq's OdeintAdjointMethod (odeint_adjoint)"  # and the adjoint's
EXPANDED = "torch's ExpandedWeights (call_for_per_sample_grads)"  # and per-sample layers'
WHILE_LOOP = "torch.while_loop"  # and torch.while_loop's
SCAN = "torch._higher_order_ops.scan"  # and scan's (Mamba-style selective scans, linear RNNs)


def _once_differentiable(cls: Any) -> bool:
    return (
        getattr(cls.backward, "__code__", 0) is _ONCE
        or _compiled(cls)
        or _adjoint(cls)
        or _expanded(cls)
        or _while_loop(cls)
        or _scan(cls)
    )


def _scan(cls: Any) -> bool:
    """Whether ``cls`` is ``torch._higher_order_ops.scan``'s ``Function`` (eager, outside
    ``torch.compile``), whose backward runs a scan of the step's VJPs that records no graph
    (PyTorch 2.13): ``torch.autograd.grad(..., create_graph=True)`` through it returns a
    gradient that does not require grad, so ``graph_laplacian`` through an RNN written with
    it was 0 and ``graph_divergence(create_graph=True)``'s parameter gradients lacked its
    part, silently, until hop32."""
    return cls.__name__ == "ScanAutogradOp" and cls.__module__.startswith("torch._higher")


def _while_loop(cls: Any) -> bool:
    """Whether ``cls`` is ``torch.while_loop``'s ``Function`` (eager, outside
    ``torch.compile``), whose backward runs the loop back over the forward's carries saved
    without a graph: differentiated again, it misses their part (PyTorch 2.13: a Laplacian
    by ``method="grad-of-grad"`` through three ``sin`` steps 0.3 where it is 1.1, silently,
    until rev-control22)."""
    return cls.__name__ == "WhileLoopAutogradOp" and cls.__module__.startswith("torch._higher")


def _expanded(cls: Any) -> bool:
    """Whether ``cls`` is one of PyTorch's ExpandedWeights ``Function``s (a layer called
    through ``torch.nn.utils._per_sample_grad.call_for_per_sample_grads``, Opacus's
    ``grad_sample_mode="ew"``), whose backward writes each pass's per-sample parameter
    gradients into ``grad_sample`` and is not differentiated again for them: torchdiv's own
    backward passes filled ``grad_sample``, and a loss built on their products got per-sample
    gradients 5-300x off (plain autograd's grad-of-grad as well), without an error."""
    return cls.__module__.startswith("torch.nn.utils._expanded_weights")


def _adjoint(cls: Any) -> bool:
    """Whether ``cls`` is torchdiffeq's ``odeint_adjoint``, whose backward (the adjoint ODE,
    solved under ``no_grad``) returns constants, whatever gradients it is given."""
    return cls.__name__ == "OdeintAdjointMethod" and cls.__module__.startswith("torchdiffeq")


def _compiled(cls: Any) -> bool:
    """Whether ``cls`` is AOTAutograd's ``Function`` of a compiled graph, whose backward
    cannot be differentiated again (it raises only where its gradients require grad)."""
    return cls.__name__ == "CompiledFunction" and cls.__module__.startswith("torch._functorch")


def _name(cls: Any) -> str:
    if _expanded(cls):
        return EXPANDED
    if _while_loop(cls):
        return WHILE_LOOP
    if _scan(cls):
        return SCAN
    return COMPILED if _compiled(cls) else ADJOINT if _adjoint(cls) else cls.__qualname__
