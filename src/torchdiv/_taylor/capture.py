"""Capture what ``f`` computes at ``x`` as a list of ATen calls.

A ``TorchDispatchMode`` sees every ATen operation ``f`` runs, below autograd, after PyTorch's
own composite functions (``linear``, ``matmul``, ``einsum``, ``reshape``, ...) have been
decomposed into a small set of primitives. Each call is recorded with the tensors it reads:
``x`` itself, outputs of earlier calls (as ``Ref``), or outside tensors (parameters, buffers,
closures), which are kept by reference so that a replay is differentiable with respect to
them. A call *depends* on ``x`` if one of its floating tensor inputs does; only those need a
propagation rule. A dependent call without a rule is decomposed with PyTorch's decomposition
table (core ATen decompositions) if it has one, and otherwise named in ``Graph.unsupported``.

Attention is captured on PyTorch's math backend, whose primitives (``bmm``, ``_safe_softmax``)
have rules; the fused CPU and CUDA kernels do not decompose.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._decomp import core_aten_decompositions
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from torchdiv._modes import math_attention

aten = torch.ops.aten
# ops whose floating result does not change with the values of x (stop-gradient, factories)
_CONSTANT_RESULTS = {
    aten.detach.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.full_like.default,
    aten.empty_like.default,
    aten.rand_like.default,
    aten.randn_like.default,
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_full.default,
    aten.new_empty.default,
}
_DECOMPOSITIONS = core_aten_decompositions()


@dataclass(frozen=True)
class Ref:
    """Output ``leaf`` (in ``tree_flatten`` order) of node ``node``; node ``-1`` is ``x``."""

    node: int
    leaf: int = 0


@dataclass
class Node:
    """One recorded ATen call; tensors produced inside ``f`` appear as ``Ref``."""

    func: torch._ops.OpOverload
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    depends: bool
    kept: list[Any] | None = None  # outputs to reuse instead of replaying (see _kept)


@dataclass
class Graph:
    """The calls ``f`` made at ``x``, in order, and where its result comes from."""

    nodes: list[Node] = field(default_factory=list)
    output: Any = None
    unsupported: list[str] = field(default_factory=list)
    widest: int = 1  # elements of the largest tensor computed from x (all samples)
    output_shape: tuple[int, ...] = ()


class _Recorder(TorchDispatchMode):
    def __init__(self, x: torch.Tensor, rules: Container[Any]):
        super().__init__()
        self.graph, self.rules = Graph(), rules
        self.refs: dict[int, Ref] = {id(x): Ref(-1)}
        self.dependent: set[Ref] = {Ref(-1)}
        self.alive: list[Any] = [x]  # keeps ids unique while recording

    def ref(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self.refs.get(id(value), value)
        return value

    def functional(self, func: Any, args: Any) -> Any:
        """For an in-place op on its first argument (``relu_``, ``add_``: ``nn.ReLU(inplace=
        True)``, ``h += x``), the out-of-place op to record instead, if nothing else recorded
        shares that tensor's memory (a view would see the write; a replay could not);
        otherwise ``func`` itself."""
        name = func._schema.name.split("::")[-1]
        first = func._schema.arguments[0].alias_info if func._schema.arguments else None
        if not name.endswith("_") or name.startswith("_") or first is None or not first.is_write:
            return func
        packet = getattr(torch.ops.aten, name[:-1], None)
        functional = getattr(packet, func._overloadname, None) if packet is not None else None
        target = args[0]
        storage = target.untyped_storage().data_ptr()
        leaves = (t for t in tree_flatten(self.alive)[0] if isinstance(t, torch.Tensor))
        shared = any(t is not target and t.untyped_storage().data_ptr() == storage for t in leaves)
        return func if functional is None or shared else functional

    def depends(self, args: Any, kwargs: Any) -> bool:
        leaves = tree_flatten((args, kwargs))[0]
        return any(
            isinstance(a, torch.Tensor) and self.refs.get(id(a)) in self.dependent for a in leaves
        )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        # under no_grad inside f (capture enables grad around f) results are constants, as
        # reverse mode sees them
        depends = (
            self.depends(args, kwargs) and func not in _CONSTANT_RESULTS and torch.is_grad_enabled()
        )
        if depends and func not in self.rules and func in _DECOMPOSITIONS:
            with self:
                return _DECOMPOSITIONS[func](*args, **kwargs)
        recorded = self.functional(func, args) if depends else func
        out = func(*args, **kwargs)
        leaves = tree_flatten(out)[0]
        differentiable = any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in leaves)
        depends = depends and differentiable
        if depends and (recorded not in self.rules or recorded._schema.is_mutable):
            self.graph.unsupported.append(str(func))
        index = len(self.graph.nodes)
        kept = None if depends else _kept(func, leaves)
        self.graph.nodes.append(
            Node(recorded, tree_map(self.ref, args), tree_map(self.ref, kwargs), depends, kept)
        )
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                self.refs[id(leaf)] = Ref(index, i)
                if depends:
                    self.dependent.add(Ref(index, i))
                    self.graph.widest = max(self.graph.widest, leaf.numel())
        self.alive.append(out)
        return out


def _kept(func: Any, leaves: list[Any]) -> list[Any] | None:
    """The outputs of a random or mutating op, which a replay must not run again: a second
    dropout mask, or a buffer incremented once more (or an ``out=`` op that autograd refuses)."""
    random = torch.Tag.nondeterministic_seeded in func.tags
    return leaves if random or func._schema.is_mutable else None


def capture(
    f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rules: Container[Any]
) -> Graph:
    """Record the ATen calls of ``f(x)`` (evaluated once, with grad enabled around ``f`` so
    that its own ``no_grad`` blocks show).

    ``rules`` holds the ops that have a propagation rule; dependent calls outside it are
    decomposed where PyTorch can, else listed in ``Graph.unsupported``.
    """
    recorder = _Recorder(x, rules)
    with torch.enable_grad(), math_attention(), recorder:
        y = f(x)
    recorder.graph.output = tree_map(recorder.ref, y)
    recorder.graph.output_shape = tuple(y.shape)
    return recorder.graph
