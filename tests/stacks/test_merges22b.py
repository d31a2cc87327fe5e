"""Review of the twenty-second session's merges into the structure key and the chain walk.

- percall22: ``_exact.chain`` reads a node's kind by its Python type. Nodes of other ops
  (a custom ``Function``'s, TorchScript's ``CppFunction``, ``t_copy``'s ``TBackward0_copy``,
  whose ``name()`` is ``TBackward0``) are never steps; values and parameter gradients of
  models holding them as the float64 per-sample loop's.
- rev-export22: SymPy values and ``ValueRanges`` told by value in the key. Two dynamic
  exports of the same shapes are two keys (the mixing one refused after the per-sample one's
  pass, also once that one is freed, and after an in-place graph edit); a mutable SymPy
  matrix is not told.
- b46a64c: Lightning's ``_compile_kwargs`` dictionary left out of the key. Found: an
  attribute of that name of another type (a list, a flag) was counted twice, so ``_held``
  took the module for one holding nothing else and never read its other attributes (an
  ``OrderedDict`` switch set after a pass: served mixed).
- rev-code22: ``_hint``'s kinds keep their precedence, ``explain``'s model hints their order,
  ``_reached_leaves`` lists a leaf reached by two edges once, ``depends_on`` tells siblings.
"""

from __future__ import annotations

import collections
import copy
import gc

import pytest
import torch
from conftest import assert_close, assert_gradients_as, loop_diagonal
from torch.export import Dim

import torchdiv
from torchdiv._api import reporting
from torchdiv._core.mixing import errors
from torchdiv._core.walk import nodes
from torchdiv._exact import autograd, chain
from torchdiv._taylor import cache

f64 = torch.float64


# --- percall22: the chain's node kinds by type ---------------------------------------------


class StraightThrough(torch.autograd.Function):
    """``tanh`` forward, identity backward (a straight-through estimator): its node must never
    be read as ``TanhBackward0``'s step."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.tanh()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g


class _Odd(torch.nn.Module):
    """``2 -> 8 -> 2`` with a straight-through tanh (``how="function"``) or its second
    weight transposed by ``t_copy`` (``TBackward0_copy``, whose ``name()`` is ``TBackward0``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.inner, self.outer = torch.nn.Linear(2, 8), torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(x)
        if self.how == "function":
            return self.outer(StraightThrough.apply(h))
        return torch.addmm(self.outer.bias, h.tanh(), torch.t_copy(self.outer.weight))


def _by_name(node) -> object:
    """The kind ``chain`` gave a node by ``node.name()`` before percall22."""
    name = node.name()
    if name in chain._FORMULAS:
        return chain._FORMULAS[name]
    return {"torch::autograd::AccumulateGrad": chain._LEAF, "TBackward0": chain._TRANSPOSE}.get(
        name
    )


def test_node_kinds_by_type_are_those_by_name_or_none() -> None:
    """Every node of MLPs of each listed op, a custom ``Function``'s, ``t_copy``'s: a step by
    type is that step by name, a leaf a leaf, a transpose a transpose; nodes told apart by
    type only (``TBackward0_copy``, a custom ``Function``) are no kind at all."""
    torch.manual_seed(0)
    acts = [torch.nn.Tanh(), torch.nn.Sigmoid(), torch.nn.ReLU(), torch.nn.GELU(),
            torch.nn.ELU(), torch.nn.Softplus(), torch.nn.LeakyReLU()]  # fmt: skip
    layers = [torch.nn.Linear(3, 3, bias=i % 2 == 0) for i in range(len(acts))]
    net = torch.nn.Sequential(*[m for pair in zip(layers, acts, strict=True) for m in pair])
    x = torch.randn(4, 3, requires_grad=True)
    outputs = [net(x), _Odd("function")(x[:, :2]), _Odd("t_copy")(x[:, :2])]
    seen = 0
    for y in outputs:
        for node in nodes(y.grad_fn):
            kind, by_name = chain._kind(type(node)), _by_name(node)
            if type(kind) is tuple:
                assert kind[0] is by_name and hasattr(node, kind[1]), node.name()
                seen += 1
            elif kind is not None:
                assert kind is by_name, node.name()
            elif type(node).__name__ == "TBackward0_copy" or isinstance(
                node, torch.autograd.function.BackwardCFunction
            ):
                seen += 1
            else:
                assert by_name is None, node.name()
    assert seen == 2 * len(acts) + 7  # (7 linears and 7 activations; 2 + 1 and 3 + 1 in the odd)


@pytest.mark.parametrize("how", ["function", "t_copy"])
def test_nodes_that_look_like_steps_give_the_loop_s_values_and_gradients(chain_taken, how) -> None:
    """A straight-through ``Function`` (the chain's tanh formula would differ) and a
    ``t_copy`` weight: divergence on a later call (the first is watched) and its parameter
    gradients as the float64 loop of ``autograd.grad`` (the custom backward's identity)."""
    torch.manual_seed(0)
    net = _Odd(how).double()
    x = torch.randn(8, 2, dtype=f64)
    torchdiv.divergence(net, x)
    got = torchdiv.divergence(net, x)
    want = loop_diagonal(net, x, create_graph=True).sum(1)
    assert_close(got, want)
    assert_gradients_as(net, got.square().sum(), net, want.square().sum())
    if how == "function":
        assert not chain_taken()  # (a custom Function's node: never a step)


# --- rev-export22: SymPy values in the key -----------------------------------------------


class _Plain(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner, self.outer = torch.nn.Linear(3, 8), torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer(self.inner(x).tanh())


class _Centred(_Plain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.outer(self.inner(x).tanh())
        return y - y.mean(0, keepdim=True)


def _dynamic(net: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    shapes = {"x": {0: Dim("batch")}}
    return torch.export.export(copy.deepcopy(net), (x,), dynamic_shapes=shapes).module()


@pytest.mark.slow  # three exports: ~0.8 s
def test_an_exported_mixing_model_after_a_per_sample_one_is_refused(watches) -> None:
    """Two dynamic exports of the same shapes and weights (their ``range_constraints``
    equal): the mixing one is refused after the per-sample one's pass, with that one alive,
    freed, and after its own graph is edited in place into the mixing one (``recompile``)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=f64)
    plain = _Plain().double()
    centred = _Centred().double()
    centred.load_state_dict(plain.state_dict())
    kept, mixing = _dynamic(plain, x), _dynamic(centred, x)
    assert kept.range_constraints == mixing.range_constraints
    for _ in range(2):
        assert_close(torchdiv.divergence(kept, x), loop_diagonal(plain, x).sum(1))
    assert len(watches) == 1
    with pytest.raises(torchdiv.BatchInteractionError, match=r"^divergence: f mixes samples"):
        torchdiv.divergence(mixing, x)
    del kept
    gc.collect()
    with pytest.raises(torchdiv.BatchInteractionError, match=r"^divergence: f mixes samples"):
        torchdiv.divergence(mixing, x)
    edited = _dynamic(plain, x)
    torchdiv.divergence(edited, x)
    graph = edited.graph
    output = next(n for n in graph.nodes if n.op == "output")
    (y,) = output.args[0]
    with graph.inserting_before(output):
        mean = graph.call_function(torch.ops.aten.mean.dim, (y, [0], True))
        centre = graph.call_function(torch.ops.aten.sub.Tensor, (y, mean))
    output.args = ((centre,),)
    edited.recompile()
    with pytest.raises(torchdiv.BatchInteractionError, match=r"^divergence: f mixes samples"):
        torchdiv.divergence(edited, x)


class _Holding(torch.nn.Module):
    """A linear layer and a dictionary of what a symbolic model keeps (``self.exprs``)."""

    def __init__(self, held: object) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.exprs = {"e": held}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_symbolic_values_are_told_by_value_and_mutable_ones_not() -> None:
    """A SymPy expression and a ``ValueRanges``: the same key at every call, another for
    another value (also one that differs in a constant's type, ``s + 1`` and ``s + 1.0``); a
    mutable SymPy matrix (not a ``Basic``) leaves the key untold."""
    sympy = pytest.importorskip("sympy")
    from torch.utils._sympy.value_ranges import ValueRanges

    s = sympy.Symbol("s0", integer=True, positive=True)
    x = torch.randn(4, 3)
    net = _Holding(s + 1)
    first = cache.structure_key(net, x, 1)
    assert first[0] is not cache.UNTOLD and first == cache.structure_key(net, x, 1)
    for other in (s + 2, s + sympy.Float(1.0), ValueRanges(2, 8)):
        net.exprs["e"] = other
        assert cache.structure_key(net, x, 1) != first
    told = cache.structure_key(net, x, 1)
    net.exprs["e"] = ValueRanges(2, 8)  # (an equal one, another object)
    assert cache.structure_key(net, x, 1) == told
    net.exprs["e"] = sympy.Matrix([[s]])
    assert cache.structure_key(net, x, 1)[0] is cache.UNTOLD


# --- b46a64c: Lightning's _compile_kwargs left out -----------------------------------------


class _Switched(torch.nn.Module):
    """A layer whose output is rolled along the batch by ``cfg["shift"]`` (an ``OrderedDict``
    switch), holding ``_compile_kwargs`` as Lightning's wrapper of ``torch.compile`` sets it
    (a dictionary) or a user's attribute of that name of another type."""

    def __init__(self, compile_kwargs: object) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.cfg = collections.OrderedDict(shift=0)
        self._compile_kwargs = compile_kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).roll(self.cfg["shift"], 0)


class _Backend:
    """A ``torch.compile`` backend object (a plain object: not told by the key)."""


@pytest.mark.parametrize(
    "compile_kwargs",
    [{"backend": _Backend(), "fullgraph": True}, ["fullgraph"], True],
    ids=["lightning-dict", "a-list", "a-flag"],
)
def test_compile_kwargs_hide_no_other_attribute(watches, compile_kwargs) -> None:
    """Fails without the fix for a list or a flag: ``_held`` counted ``_compile_kwargs`` as
    told twice, took the module for one holding nothing else and skipped its ``OrderedDict``,
    whose switch set after a pass was served by it (mixed samples, silently). Lightning's
    dictionary, a backend object in it, keeps the pass (one watch in two calls)."""
    torch.manual_seed(0)
    net = _Switched(compile_kwargs).double()
    x = torch.randn(4, 3, dtype=f64)
    for _ in range(2):
        assert_close(torchdiv.divergence(net, x), loop_diagonal(net, x).sum(1))
    assert len(watches) == 1
    net.cfg["shift"] = 1
    with pytest.raises(torchdiv.BatchInteractionError, match=r"^divergence: f mixes samples"):
        torchdiv.divergence(net, x)


# --- rev-code22's refactors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "starts"),
    [
        ("Expanded Weights: random operation under vmap", "f computes through torch's Expanded"),
        ("random operation under vmap; dtype", "f draws random numbers"),
        ("Trying to use forward AD with tanh; dtype; positional argument", "PyTorch has no"),
        ("doesn't have storage; dtype", "an op of f reads its input's memory"),
        ("requires_grad_() in a functorch transform; scalar type", "f calls requires_grad_()"),
        ("expected scalar type Float; positional argument", "f's parameters and x are"),
        ("missing 1 required positional argument", "torchdiv calls f(x)"),
    ],
)
def test_hint_kinds_keep_their_precedence(message: str, starts: str) -> None:
    """A message that two kinds of ``_hint`` know gets the earlier kind's (traceback,
    transforms, plain autograd, dtype, the call), as the one function before the split."""
    net = torch.nn.Linear(2, 2).double()
    x = torch.randn(3, 2, dtype=f64)
    hint = reporting._hint("torchdiv.divergence", message, net, x, "f(x)")
    assert hint is not None and hint.startswith(starts), hint


def test_explain_adds_the_model_hints_in_order_and_only_past_the_first_fixes() -> None:
    """Two model hints in one ``what`` come in ``_model_hints``' order (a batch split before
    a GPyTorch kernel); a train-mode ``what`` gets none."""
    x = torch.randn(4, 3)
    what = f"{errors._SPLIT_WHAT}{errors._KERNEL_WHAT}"
    text = errors.explain(what, x, 1)
    split, kernel = text.index("Where f splits the batch"), text.index("GPyTorch's kernels")
    assert split < kernel < text.index("allow_batch_interaction()")
    assert "GPyTorch's kernels" not in errors.explain(f"train mode{errors._KERNEL_WHAT}", x, 1)


def test_graph_walks_list_a_leaf_reached_twice_once_and_tell_siblings() -> None:
    """A weight used twice (two edges to one ``AccumulateGrad``) is one reached leaf;
    ``depends_on`` tells ``a`` from ``b`` of ``h.chunk(2)``."""
    w = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(2, 3, requires_grad=True)
    y = (x @ w) @ w
    assert [id(t) for t in autograd._reached_leaves(y)].count(id(w)) == 1
    a, b = (x @ w).chunk(2)
    assert autograd.depends_on(2 * a, a) and not autograd.depends_on(2 * a, b)
    assert autograd.depends_on(y, x) and not autograd.depends_on(a, torch.randn(1))
