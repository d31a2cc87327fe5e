"""Replay a captured graph on jets: one small rule per ATen op.

The registry ``RULES`` maps each op to ``rule(ctx, *args, **kwargs)``, called with the op's
own arguments except that tensors depending on ``x`` arrive as ``Jet``. Ops on tensors that
do not depend on ``x`` (a transposed weight, a mask) are replayed as they are, so the result
stays differentiable with respect to the parameters ``f`` reads.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import torch
from torch._C._functorch import peek_interpreter_stack

from torchdiv._taylor import composite, elementwise, linalg, linear, reductions, sparse
from torchdiv._taylor.capture import Graph, Node, Ref
from torchdiv._taylor.jet import Context, Jet, UnsupportedOp
from torchdiv._taylor.sparse import Sparse
from torchdiv._taylor.tree import leaves, map_leaves

RULES: dict[Any, Any] = {
    **elementwise.RULES,
    **linear.RULES,
    **composite.RULES,
    **linalg.RULES,
    **reductions.RULES,
}

# rules given the op's output (``propagate``'s ``known``), where computing it again costs a kernel
GIVEN: dict[Any, Any] = {**elementwise.GIVEN, **linear.GIVEN}

aten = torch.ops.aten
_JETS = (Jet, Sparse)
_T = TypeVar("_T")
AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")  # (the device types autocast runs on)
# ops whose ``lap`` needs only the inputs' ``lap`` (linear, or linear almost everywhere)
_LAP_FROM_LAP = {
    *linear.LINEAR_OPS,
    *reductions.SELECTIONS,
    aten.view.default,
    aten._unsafe_view.default,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.unbind.int,
    aten.add.Tensor,
    aten.add.Scalar,
    aten.sub.Tensor,
    aten.sub.Scalar,
    aten.rsub.Scalar,
    aten.mul.Scalar,
    aten.div.Scalar,
    aten.relu.default,
    aten.leaky_relu.default,
    aten.hardtanh.default,
    aten.clamp.default,
    aten.clamp.Tensor,
    aten.abs.default,
    aten.max_pool2d_with_indices.default,
    aten.max_pool3d_with_indices.default,
    aten.cat.default,
    aten.constant_pad_nd.default,
    aten.where.self,
}
# ops linear in each argument: the same, if only one argument depends on x
_MULTILINEAR = {
    aten.mul.Tensor,
    aten.mm.default,
    aten.bmm.default,
    aten.addmm.default,
    aten.convolution.default,
}


def propagate(
    graph: Graph,
    x: Jet | Sparse,
    ctx: Context,
    constants: dict[int, list[Any]] | None = None,
    known: list[list[Any]] | None = None,
) -> Jet | torch.Tensor:
    """``_propagate`` with the caller's ``torch.autocast`` off. The graph holds the ops as
    autocast dispatched them (its casts are nodes), so the values are the same; the rules' own
    algebra (``A^-1 Ȧ`` of a determinant, a product's tangents) then runs in its jets' dtype,
    as PyTorch's derivative formulas run outside autocast. Under ``autocast(float16)`` a
    Slater determinant's Hutchinson Laplacian was ``nan`` (``A^-1 Ȧ`` in float16, squared past
    65504) where the float16 loop was finite (autocast33)."""
    on = autocast_on()
    if not on:
        return _propagate(graph, x, ctx, constants, known)
    return autocast_off(on, lambda: _propagate(graph, x, ctx, constants, known))


def autocast_on() -> list[str]:
    """The device types ``torch.autocast`` is on for: none at once where it is on for none
    (one check, 0.2 us, instead of four, 3.5 us a call), but in Dynamo, which traces the four."""
    if not torch.compiler.is_compiling() and not torch._C._is_any_autocast_enabled():
        return []
    return [d for d in AUTOCAST_DEVICES if torch.is_autocast_enabled(d)]


def autocast_off(devices: list[str], run: Callable[[], _T]) -> _T:
    """``run()`` with ``torch.autocast`` off on ``devices`` (those it is on for): where
    recorded ATen calls run again, as the recording saw them below autocast (its casts are
    calls of their own), or a rule's algebra runs in its jets' dtype. Nested ``with``
    statements, which Dynamo traces (it cannot enter an autocast from an ``ExitStack``)."""
    if not devices:
        return run()
    with torch.autocast(devices[0], enabled=False):
        return autocast_off(devices[1:], run)


def _propagate(
    graph: Graph,
    x: Jet | Sparse,
    ctx: Context,
    constants: dict[int, list[Any]] | None = None,
    known: list[list[Any]] | None = None,
) -> Jet | torch.Tensor:
    """The output jet of ``graph`` for the input jet ``x`` (a tensor if it does not depend on x).

    ``ctx.jac`` says whether the output's ``jac`` is wanted; intermediate ``jac`` that no later
    op needs are skipped. Values are freed after their last use, so memory in flight is what
    the live jets need. Ops that carry no jet are computed once per ``constants`` cache: pass
    the same dict to every chunk of directions at the same ``x``. A ``Sparse`` input (per-particle
    jets, ``sparse.per_particle``) stays sparse where the ops allow; the output is a dense ``Jet``.
    ``known``: every node's outputs at ``x.value`` as ``f`` computed them (``Graph.values``);
    ops with a ``GIVEN`` rule (elementwise functions, matrix products) and ops without a jet
    then take them instead of computing them again (a dense ``x`` only), but for the nodes
    whose outputs ``f`` wrote over in place after them (``Graph.overwritten``).
    """
    constants = {} if constants is None else constants
    plan = graph.plan = graph.plan or Plan(graph)
    needs_jac = plan.needs_jac(ctx)
    with_jac, without_jac = replace(ctx, jac=True), replace(ctx, jac=False)
    apply = _applied if isinstance(x, Sparse) else _apply
    if isinstance(x, Sparse):
        known = None
    overwritten = graph.overwritten
    env: dict[int, list[Any]] = {-1: [x]}
    # overwrite a dying jet's jac (``Context.overwrite``): unknown until a candidate comes, then
    # whether nothing can record a graph; never with a sparse input, in Dynamo or functorch
    recordless: bool | None = (
        False
        if isinstance(x, Sparse) or torch.compiler.is_compiling() or peek_interpreter_stack()
        else None
    )

    def resolve(a: Any) -> Any:
        return env[a.node][a.leaf] if isinstance(a, Ref) else a

    for index, node in enumerate(graph.nodes):
        if node.kept is not None:
            env[index] = node.kept
        elif index in constants:
            env[index] = constants[index]
        else:
            positions = plan.positions[index]
            if positions is not None:  # the usual case: every Ref a positional argument
                args, kwargs = list(node.args), node.kwargs
                for i in positions:
                    args[i] = resolve(args[i])
                jets = any(isinstance(args[i], _JETS) for i in positions)
            else:
                args, kwargs = map_leaves(resolve, node.args), map_leaves(resolve, node.kwargs)
                jets = any(isinstance(a, _JETS) for a in leaves((args, kwargs)))
            if node.depends and jets:
                node_ctx = with_jac if index in needs_jac else without_jac
                if (
                    recordless is not False
                    and node.func in elementwise.OVERWRITES
                    and _dying(env, plan, index, x)
                ):
                    if recordless is None:
                        recordless = _records_nothing(graph, x, known)
                    if recordless:
                        node_ctx = replace(node_ctx, overwrite=True)
                if (
                    known is not None
                    and index not in overwritten
                    and node.func in GIVEN
                    and _reusable(known[index], args)
                ):
                    env[index] = [_apply(node, node_ctx, args, kwargs, known[index][0])]
                else:
                    env[index] = leaves(apply(node, node_ctx, args, kwargs))
            elif (
                known is not None
                and index not in overwritten
                and (not node.grad or _reusable(known[index], args))
            ):
                env[index] = constants[index] = known[index]
            else:
                with torch.set_grad_enabled(node.grad and torch.is_grad_enabled()):
                    out = node.func(*map_leaves(_value, args), **map_leaves(_value, kwargs))
                env[index] = constants[index] = leaves(out)
        for dead in plan.last_use.get(index, ()):
            del env[dead]
    output: Jet | torch.Tensor = map_leaves(lambda a: sparse.densify(resolve(a)), graph.output)
    return output


class Plan:
    """What every replay of a graph needs about its nodes, worked out once (it walked every
    node's arguments three times per replay, a tenth of a small network's Laplacian): the
    ``Ref`` each node reads, their positions if all are positional arguments, the nodes whose
    outputs are last read by each node, and the nodes whose ``jac`` later ops read. It holds
    the graph's nodes and output, not the graph: the graph holds its plan (``Graph.plan``),
    and a cycle kept the graph's values (every activation of ``f``) alive after the call
    until Python's cycle collector ran."""

    def __init__(self, graph: Graph):
        self.nodes, self.output = graph.nodes, graph.output
        self.inputs: list[list[Ref]] = []
        self.positions: list[list[int] | None] = []
        for node in graph.nodes:
            refs = [a for a in leaves((node.args, node.kwargs)) if isinstance(a, Ref)]
            top = [i for i, a in enumerate(node.args) if isinstance(a, Ref)]
            self.inputs.append(refs)
            self.positions.append(top if len(top) == len(refs) else None)
        self.last_use = self._last_uses()
        self._needs_jac: dict[tuple[bool, bool], set[int]] = {}

    def needs_jac(self, ctx: Context) -> set[int]:
        """Nodes whose ``jac`` some later op (or the caller, if ``ctx.jac``) reads."""
        key = (ctx.jac, ctx.second_order)
        if key not in self._needs_jac:
            self._needs_jac[key] = self._needed(ctx)
        return self._needs_jac[key]

    def _needed(self, ctx: Context) -> set[int]:
        nodes = self.nodes
        output = leaves(self.output)
        needed = {a.node for a in output if isinstance(a, Ref)} if ctx.jac else set()
        for index in range(len(nodes) - 1, -1, -1):
            node = nodes[index]
            if not node.depends:
                continue
            dependent = [a.node for a in self.inputs[index] if a.node < 0 or nodes[a.node].depends]
            lap_from_lap = node.func in _LAP_FROM_LAP or (
                node.func in _MULTILINEAR and len(dependent) <= 1
            )
            if index in needed or (ctx.second_order and not lap_from_lap):
                needed.update(n for n in dependent if n >= 0)
        return needed

    def _last_uses(self) -> dict[int, list[int]]:
        """``{i: nodes whose outputs are last read by node i}``; the output's nodes are kept."""
        last: dict[int, int] = {}
        for index, refs in enumerate(self.inputs):
            for a in refs:
                last[a.node] = index
        keep = {a.node for a in leaves(self.output) if isinstance(a, Ref)}
        by_user: dict[int, list[int]] = {}
        for producer, user in last.items():
            if producer not in keep:
                by_user.setdefault(user, []).append(producer)
        return by_user


# elements of a jac from which ``propagate`` lets a rule overwrite it where it dies: below, a
# new block comes from the allocator's free lists at no fault (issue 18's were 5-50 MiB)
OVERWRITE_NUMEL = 1 << 18


def _dying(env: dict[int, list[Any]], plan: Plan, index: int, x: Jet | Sparse) -> bool:
    """Whether node ``index``'s one jet argument is a large ``jac`` that nothing reads after
    it: computed in this replay, last read here, and sharing its storage with no other live
    value nor the caller's input jet ``x`` (views, or a jet passing its argument's ``jac`` on
    as it is, such as ``x + c``'s, share it)."""
    refs = plan.inputs[index]
    if len(refs) != 1 or refs[0].node < 0 or refs[0].node not in plan.last_use.get(index, ()):
        return False
    jet = env[refs[0].node][refs[0].leaf]
    if not isinstance(jet, Jet) or jet.jac is None or jet.jac.numel() < OVERWRITE_NUMEL:
        return False
    storage = jet.jac.untyped_storage().data_ptr()
    holders = sum(
        t.untyped_storage().data_ptr() == storage
        for outs in (*env.values(), [x])
        for out in outs
        for t in _tensors(out)
    )
    return holders == 1


def _tensors(out: Any) -> tuple[torch.Tensor, ...]:
    """The tensors a node's output holds (a jet's value, jac and lap)."""
    if isinstance(out, _JETS):
        parts = (out.value, out.jac, out.lap, getattr(out, "owner", None))
        return tuple(t for t in parts if t is not None)
    return (out,) if isinstance(out, torch.Tensor) else ()


def _records_nothing(graph: Graph, x: Jet | Sparse, known: list[list[Any]] | None) -> bool:
    """Whether no op of a replay of ``graph`` at ``x`` records a graph, so that no tensor it
    computes is saved for a backward pass (overwriting one would corrupt it): grad mode off,
    or nothing it reads (``x``'s jet, the tensors the nodes hold, ``f``'s values) requires
    grad."""
    if not torch.is_grad_enabled():
        return True
    # (lazily: the first tensor that requires grad ends the walk, often a first layer's weight)
    nodes = (leaves((node.args, node.kwargs, node.kept)) for node in graph.nodes)
    read = itertools.chain((_tensors(x),), nodes, known or ())
    return not any(isinstance(t, torch.Tensor) and t.requires_grad for ts in read for t in ts)


def values(graph: Graph, x: torch.Tensor) -> list[list[Any]]:
    """Every node's outputs at ``x``: as captured if kept (those ``f`` wrote over in place
    after them, ``Graph.overwritten``, computed again from the others), else recomputed
    (random and mutating calls keep their recorded outputs, as in ``propagate``)."""
    kept = graph.values
    if kept is not None and not graph.overwritten:
        return kept
    env: list[list[Any]] = []

    def resolve(a: Any) -> Any:
        return (x if a.node < 0 else env[a.node][a.leaf]) if isinstance(a, Ref) else a

    def replay() -> None:
        for index, node in enumerate(graph.nodes):
            if kept is not None and index not in graph.overwritten:
                env.append(kept[index])
            elif node.kept is not None:
                env.append(node.kept)
            else:
                with torch.set_grad_enabled(node.grad and torch.is_grad_enabled()):
                    args, kwargs = map_leaves(resolve, node.args), map_leaves(resolve, node.kwargs)
                    env.append(leaves(node.func(*args, **kwargs)))

    # the calls as recorded, below autocast (under the caller's, a float32 block of f's,
    # autocast(enabled=False), was cast to bfloat16 again: rev-c33)
    autocast_off(autocast_on(), replay)
    if kept is not None:
        graph.values, graph.overwritten = env, frozenset()
    return env


def _applied(node: Node, ctx: Context, args: Any, kwargs: Any) -> Any:
    """``_apply``, or ``sparse.apply`` if an argument is a ``Sparse`` jet."""
    if any(isinstance(a, Sparse) for a in leaves((args, kwargs))):
        return sparse.apply(node.func, ctx, args, kwargs, lambda c, a, k: _apply(node, c, a, k))
    return _apply(node, ctx, args, kwargs)


def _apply(node: Node, ctx: Context, args: Any, kwargs: Any, value: Any = None) -> Any:
    """The rule of ``node``'s op (its ``GIVEN`` rule with the output ``value``, if given); a
    rule that meets a jet where it can only take a tensor (a weight computed from x, say), or
    arguments it was not written for (a dimension of a 0-dimensional tensor: ``softmax``,
    ``sort``, ``max`` along dimension 0 of a scalar, which PyTorch allows and the rules'
    ``dim % ndim`` divided by zero; a complex tensor where the rule is a real function's:
    ``abs``'s ``sign``, a norm's comparisons, which PyTorch does not implement for complex
    values), is reported as an unsupported use of the op: ``"auto"`` then takes another
    method (the op itself ran in ``f`` on the same arguments)."""
    try:
        if value is not None:
            return GIVEN[node.func](ctx, value, *args, **kwargs)
        return RULES[node.func](ctx, *args, **kwargs)
    except (TypeError, AttributeError, IndexError, ZeroDivisionError, NotImplementedError) as exc:
        raise UnsupportedOp(f"{node.func} with these arguments ({exc})") from exc


def _reusable(outputs: list[Any], args: Any) -> bool:
    """Whether ``f``'s recorded ``outputs`` of a node can stand for its recomputation: not where
    they lost the graph that its arguments carry. Inside an op PyTorch decomposes with its own
    derivative formula (``renorm`` computes its scale from a ``detach``ed input), the recorded
    values of the parts carry no gradient, while the replay differentiates every part: taking
    them dropped the scale's share of a parameter gradient."""
    if not torch.is_grad_enabled() or not any(
        isinstance(v, torch.Tensor) and v.requires_grad for v in map(_value, leaves(args))
    ):
        return True
    return all(
        v.requires_grad or not (v.is_floating_point() or v.is_complex())
        for v in outputs
        if isinstance(v, torch.Tensor)
    )


def _value(a: Any) -> Any:
    return a.value if isinstance(a, _JETS) else a
