"""A module's own plain containers (keyattrs20): what a module (``f`` or any submodule) holds
in a list, tuple, dictionary, ``functools.partial`` or ``SimpleNamespace`` of its
``__dict__`` (functions, modules, flags, integers, tensors) is part of the structure key, so
a change there that turns mixing on is watched again, not served by the first calls' pass.

Until keyattrs20 the key (``torchdiv._taylor.cache._held``) read a module's flags, functions,
tensors and submodules, but no container it held: ``self.ops = [torch.tanh, torch.sin]``
with ``ops[1]`` swapped to ``lambda h: h.roll(1, 0)`` after three calls was served mixed
(every ``"auto"`` operator at 4 and 256 samples, silently wrong: a divergence where the exact
one is 0). Where the key cannot tell an item (a list of more than 32 items, a plain object in
a list), the module is watched at every call instead.

Each case: three calls (values against the per-sample Jacobians, float64, ``jacrev`` of the
whole batch's diagonal blocks), then the change after which ``f`` mixes samples: the next
call is watched and refused (``BatchInteractionError``).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import (
    assert_close,
    reference_diagonal,
    reference_divergence,
    reference_jacobian,
    reference_laplacian,
    sampled_daily,
)
from test_module_changes import _Stack
from torch import nn

import torchdiv
from torchdiv import BatchInteractionError

f64 = torch.float64
_SWAP = [1, 0, 3, 2, 5, 4, 7, 6]  # swaps neighbouring samples


def _rolled(h: torch.Tensor) -> torch.Tensor:
    """Each sample's row moved to the next sample's place (mixes samples)."""
    return h.roll(1, 0)


class _Flagged(nn.Module):
    """Subtracts the batch mean (mixes samples) where ``mix`` is set."""

    def __init__(self, mix: bool = False) -> None:
        super().__init__()
        self.mix = mix

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h - h.mean(0) if self.mix else h


class _Ops(nn.Module):
    """A linear layer, then the functions of a plain list, as an ODE function or a KAN's basis
    may keep them (``self.ops = [torch.tanh, torch.sin]``, not modules)."""

    def __init__(self, d: int = 3) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.ops: list[Callable[[torch.Tensor], torch.Tensor]] = [torch.tanh, torch.sin]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.lin(z)
        for op in self.ops:
            h = op(h)
        return h


class _Configured(nn.Module):
    """A linear layer and ``tanh``, configured by a dictionary (``cfg``: ``"act"``, a function;
    ``"centre"``, a flag; ``"shift"``, an integer roll of the batch; ``"blocks"``, a list of
    modules not registered), a ``SimpleNamespace`` (``opts.centre``), a partial (``post``) and
    an optional index tensor in a tuple (``order``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.cfg: dict[str, Any] = {"act": torch.tanh, "centre": False, "shift": 0, "blocks": []}
        self.opts = types.SimpleNamespace(centre=False, scale=0.5)
        self.post = functools.partial(torch.roll, shifts=0, dims=0)
        self.order: tuple[torch.Tensor, ...] = ()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.cfg["act"](self.lin(z)) * (1 + self.opts.scale)
        for block in self.cfg["blocks"]:
            h = block(h)
        if self.cfg["centre"] or self.opts.centre:
            h = h - h.mean(0)
        h = self.post(h.roll(self.cfg["shift"], 0))
        return h[self.order[0]] if self.order else h


class _Listed(nn.Module):
    """``tanh(lin(z))`` through the modules of a plain list (not a ``ModuleList``: held so
    that they are not its submodules, a trick for shared or parent modules)."""

    def __init__(self, held: list[Any]) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.held = held

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(z))
        for block in self.held:
            h = block(h)
        return h


class _Settings:
    """A plain configuration object (no weak references to its items: the key cannot tell it)."""

    def __init__(self) -> None:
        self.centre = False

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return h - h.mean(0) if self.centre else h


Case = Callable[..., tuple[nn.Module, Callable[[], None]]]


def _cases() -> dict[str, Case]:
    """Each: a module and the change after which it mixes samples."""

    def ops(d: int = 3) -> _Ops:
        torch.manual_seed(0)
        return _Ops(d).double().eval()

    def configured() -> _Configured:
        torch.manual_seed(0)
        return _Configured().double().eval()

    def listed(held: list[Any]) -> _Listed:
        torch.manual_seed(0)
        return _Listed(held).double().eval()

    def list_function_swapped(d: int = 3):
        m = ops(d)
        return m, lambda: m.ops.__setitem__(1, _rolled)

    def list_function_appended():
        m = ops()
        return m, lambda: m.ops.append(torch.flipud)

    def tuple_rebound():
        m = ops()
        return m, lambda: setattr(m, "ops", (torch.tanh, torch.flipud))

    def submodule_s_list():
        torch.manual_seed(0)
        inner = ops()
        m = nn.Sequential(nn.Linear(3, 3), inner).double().eval()
        return m, lambda: inner.ops.__setitem__(1, _rolled)

    def dict_function():
        m = configured()
        return m, lambda: m.cfg.__setitem__("act", torch.flipud)

    def dict_flag():
        m = configured()
        return m, lambda: m.cfg.__setitem__("centre", True)

    def dict_integer():
        m = configured()
        return m, lambda: m.cfg.__setitem__("shift", 1)

    def dict_list_module():
        m = configured()
        return m, lambda: m.cfg["blocks"].append(_Flagged(mix=True))

    def namespace_flag():
        m = configured()
        return m, lambda: setattr(m.opts, "centre", True)

    def partial_keyword():
        m = configured()
        return m, lambda: m.post.keywords.__setitem__("shifts", 1)

    def tuple_index():
        m = configured()
        order = torch.arange(8)
        m.order = (order,)

        def change() -> None:
            order.copy_(torch.tensor(_SWAP))

        return m, change

    def listed_module_flag():
        block = _Flagged()
        return listed([block]), lambda: setattr(block, "mix", True)

    def listed_module_replaced():
        m = listed([_Flagged()])
        return m, lambda: m.held.__setitem__(0, _Flagged(mix=True))

    def long_list():
        m = listed([nn.Identity() for _ in range(40)])
        return m, lambda: m.held.__setitem__(39, _Flagged(mix=True))

    def plain_object():
        settings = _Settings()
        return listed([settings]), lambda: setattr(settings, "centre", True)

    return {
        "list: a function swapped for a roll": list_function_swapped,
        "list: a batch flip appended": list_function_appended,
        "tuple: rebound with a batch flip": tuple_rebound,
        "a submodule's list: a function swapped": submodule_s_list,
        "dict: a function swapped": dict_function,
        "dict: a flag set": dict_flag,
        "dict: an integer shift set": dict_integer,
        "dict: a mixing module appended to its list": dict_list_module,
        "SimpleNamespace: a flag set": namespace_flag,
        "partial: a keyword written": partial_keyword,
        "tuple: an index written in place": tuple_index,
        "list: a module's flag set": listed_module_flag,
        "list: a module replaced": listed_module_replaced,
        "a 40-item list: a module replaced": long_list,
        "list: a plain object's flag set": plain_object,
    }


CASES = _cases()


CALLS: dict[str, tuple[Callable[[Any, torch.Tensor], torch.Tensor], Callable[..., Any]]] = {
    "divergence": (torchdiv.divergence, reference_divergence),
    "jacobian_diagonal": (torchdiv.jacobian_diagonal, reference_diagonal),
    "jacobian": (torchdiv.jacobian, reference_jacobian),
    "laplacian": (torchdiv.laplacian, reference_laplacian),
    "one-probe hutchinson": (
        lambda f, x: torchdiv.divergence(f, x, method="hutchinson", num_probes=1),
        None,
    ),
    "structured divergence": (
        lambda f, x: torchdiv.divergence(f, x, method="structured"),
        reference_divergence,
    ),
}


def _served_then_refused(case: str, call: str, batch: int, d: int = 3) -> None:
    """Three calls of ``call`` at ``batch`` samples of ``d`` elements (values against the
    reference up to 64 samples), the change, a fourth call: refused."""
    m, change = CASES[case](d) if d != 3 else CASES[case]()
    torch.manual_seed(1)
    x = torch.randn(batch, d, dtype=f64)
    op, reference = CALLS[call]
    for _ in range(3):
        got = op(m, x)
        if reference is not None and batch <= 64:
            assert_close(got, reference(m, x))
    change()
    with pytest.raises(BatchInteractionError, match="mixes samples"):
        op(m, x)


@pytest.mark.parametrize("case", list(CASES))
def test_a_container_change_that_turns_mixing_on_is_refused(case: str) -> None:
    """Every case through ``divergence``, 8 samples (a tiny problem: watched until passed)."""
    _served_then_refused(case, "divergence", 8)


_LARGE = [f"{call}, 2048 x 8" for call in CALLS]


@pytest.mark.parametrize(
    "name",
    [f"{call}, 8 x 3" for call in CALLS]
    + sampled_daily(_LARGE, set(_LARGE) - {"jacobian_diagonal, 2048 x 8"}),
)
def test_a_listed_function_swapped_for_a_roll_is_refused_by_every_operator(name: str) -> None:
    """The case of the limitations guide (closing19): every ``"auto"`` operator, a one-probe
    estimate and ``"structured"``, on a tiny problem (8 x 3: watched until passed) and one
    above ``TINY_PROBLEM`` (2048 x 8: diagonals on the generic rows; ~1 s, the others in the
    daily sample)."""
    call, size = name.split(", ")
    batch, d = map(int, size.split(" x "))
    _served_then_refused("list: a function swapped for a roll", call, batch, d)


@pytest.mark.parametrize("wrap", ["a lambda made anew", "its bound forward"])
def test_a_function_over_the_module_sees_its_containers(wrap: str) -> None:
    """``lambda z: m(z)`` made at every call, or ``m.forward``: the key of what a function
    reaches (``cache._reached``) holds the module's containers too (both served on main)."""
    m, change = CASES["list: a batch flip appended"]()
    make = (lambda: lambda z: m(z)) if wrap == "a lambda made anew" else (lambda: m.forward)
    x = torch.randn(8, 3, dtype=f64)
    for _ in range(3):
        assert_close(torchdiv.jacobian_diagonal(make(), x), reference_diagonal(m, x))
    change()
    with pytest.raises(BatchInteractionError, match="mixes samples"):
        torchdiv.jacobian_diagonal(make(), x)


_OTHER_CALLS = [c for c in CALLS if c != "divergence"]


@pytest.mark.parametrize("call", sampled_daily(_OTHER_CALLS, set(_OTHER_CALLS)))
@pytest.mark.parametrize("case", [c for c in CASES if "roll" not in c])
def test_every_operator_refuses_every_container_change(case: str, call: str) -> None:
    """The other cases through the other operators (the daily sample)."""
    _served_then_refused(case, call, 8)


def _common_modules() -> dict[str, Callable[[], nn.Module]]:
    """Modules with containers that never change: each must keep its pass."""

    class _Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.scales = [0.5, 1.0, 2.0]
            self.names = ("a", "b")

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.lin(z)) * self.scales[1]

    class _Tracked(_Stack):
        """Keeps a plain list of its 40 parameters, as ``DistributedDataParallel`` does."""

        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(3, 3) for _ in range(20)])
            self.tracked = list(self.parameters())

    return {
        "MLP": lambda: nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)),
        "40 parameters in a list": _Tracked,
        "ModuleList": _Stack,
        "list of floats": _Scaled,
        "list of functions": _Ops,
        "dict, namespace and partial": _Configured,
        "module in a list": lambda: _Listed([_Flagged()]),
    }


@pytest.mark.parametrize("name", list(_common_modules()))
def test_unchanged_containers_keep_the_pass(name: str, watches: list[int]) -> None:
    """Three divergences of a module whose containers stay as they are: watched once."""
    torch.manual_seed(0)
    m = _common_modules()[name]().double().eval()
    x = torch.randn(8, 3, dtype=f64)
    for _ in range(3):
        assert_close(torchdiv.divergence(m, x), reference_divergence(m, x))
    assert len(watches) == 1


def test_a_float_in_a_namespace_is_told_by_value(watches: list[int]) -> None:
    """A float a module keeps in a list or a namespace (a scale, a time) is told by its value,
    as its own float attributes are (keyleft21: one may set an index, ``h.roll(int(s), 0)``):
    a new value is watched again, one watched before finds its pass, the values follow."""
    torch.manual_seed(0)
    m = _Configured().double().eval()
    x = torch.randn(8, 3, dtype=f64)
    for scale in (0.5, 1.5, 0.5, 1.5):
        m.opts.scale = scale
        assert_close(torchdiv.divergence(m, x), reference_divergence(m, x))
    assert len(watches) == 2


def test_an_untold_item_watches_every_call(watches: list[int]) -> None:
    """A module holding what the key cannot tell (a plain object in its list) is watched at
    every call, not served."""
    m = _Listed([_Settings()]).double()
    x = torch.randn(8, 3, dtype=f64)
    for _ in range(3):
        torchdiv.divergence(m, x)
    assert len(watches) == 3


class _Eps(nn.Module):
    """Holds a regularisation ``eps`` (a module kept in a plain list, not a submodule)."""

    def __init__(self) -> None:
        super().__init__()
        self.eps = 1e-3


_EPS_READS: dict[str, Callable[[Any], float]] = {
    "a dictionary's entry": lambda m: m.cfg["eps"],
    "a listed module's float": lambda m: m.helpers[0].eps,
    "a list in a list": lambda m: m.nested[0][0],
    "a SimpleNamespace in a list": lambda m: m.spaces[0].eps,
}


class _Regularised(nn.Module):
    """``tanh(x) @ chol(W W^T + eps I)`` with ``eps`` read from one of its containers
    (``_EPS_READS``), or, where the factorization fails, a fallback that scales each sample by
    the batch mean (mixes samples): the watch passes it for any ``x`` while the numbers it
    holds stay (``mixing.Numbers``)."""

    def __init__(self, read: str) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(3, 3, dtype=f64))
        self.read = read
        self.cfg = {"eps": 1e-3}
        self.helpers = [_Eps()]
        self.nested = [[1e-3]]
        self.spaces = [types.SimpleNamespace(eps=1e-3)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = _EPS_READS[self.read](self)
        h = torch.tanh(x)
        try:
            chol = torch.linalg.cholesky(self.W @ self.W.T + eps * torch.eye(3, dtype=f64))
        except RuntimeError:
            return h * h.mean(0)
        return h @ chol


@pytest.mark.parametrize("read", list(_EPS_READS))
def test_a_float_in_a_container_that_breaks_a_factorization_is_watched_again(
    read: str, watches: list[int]
) -> None:
    """Two calls, watched once; ``eps`` set negative in the container: the factorization
    fails and the fallback mixes samples; refused, not served by the pass (its numbers,
    ``Numbers``, held only a module's own attributes, its short lists and tuples and a plain
    object's)."""
    torch.manual_seed(0)
    m = _Regularised(read)
    x = torch.randn(8, 3, dtype=f64)
    for _ in range(2):
        assert_close(torchdiv.divergence(m, x), reference_divergence(m, x))
    assert len(watches) == 1
    if read == "a dictionary's entry":
        m.cfg["eps"] = -100.0
    elif read == "a listed module's float":
        m.helpers[0].eps = -100.0
    elif read == "a list in a list":
        m.nested[0][0] = -100.0
    else:
        m.spaces[0].eps = -100.0
    with pytest.raises(BatchInteractionError, match="mixes samples"):
        torchdiv.divergence(m, x)


def test_an_index_in_a_module_s_tuple_keeps_the_pass(watches: list[int]) -> None:
    """Indices read along the batch from a tensor in a module's tuple (``self.order =
    (perm,)``), which the key holds by identity and version: watched once over three calls
    (at every call before keyattrs20), watched again and refused once written across samples
    (``tuple: an index written in place`` above), and again once replaced."""
    torch.manual_seed(0)
    m = _Configured().double().eval()
    m.order = (torch.arange(8),)
    x = torch.randn(8, 3, dtype=f64)
    for _ in range(3):
        assert_close(torchdiv.divergence(m, x), reference_divergence(m, x))
    assert len(watches) == 1
    m.order = (torch.tensor(_SWAP),)
    with pytest.raises(BatchInteractionError, match="mixes samples"):
        torchdiv.divergence(m, x)
