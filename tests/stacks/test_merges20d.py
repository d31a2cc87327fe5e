"""Adversarial review of keyattrs20: a module's own containers (lists, tuples, dictionaries,
named tuples, partials, namespaces, three deep, 32 items) read into the structure key that
lets the sample-mixing watch keep its pass across calls (``torchdiv._taylor.cache._contained``).

Two faults: e3nn's irreps (tuple subclasses whose own ``__len__`` raises) in a module's tuple
crashed every call of an e3nn ``Gate`` (``NotImplementedError``; kept before keyattrs20), as
they crashed a function closing over them (before too); and a plain object's bound method in
a module's list was told by identity alone, its object's state unread, so a change there that
turned mixing on was served by the first calls' pass (a plain object in the list itself is
watched at every call). Values against the per-sample Jacobians (float64, ``jacrev`` of the
whole batch's diagonal blocks); watches counted by ``conftest.watches``."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, reference_diagonal, reference_divergence
from torch import nn

import torchdiv
from torchdiv import BatchInteractionError

f64 = torch.float64


def _gated() -> nn.Module:
    """An e3nn equivariant layer as its examples write one: a linear map of irreps, then a
    ``Gate`` (its ``_Sortcut`` keeps a tuple of ``Irreps``, each ``(mul, Irrep)`` items four
    levels down from the module)."""
    o3 = pytest.importorskip("e3nn.o3")
    e3nn_nn = pytest.importorskip("e3nn.nn")
    gate = e3nn_nn.Gate("2x0e", [torch.tanh], "1x0e", [torch.sigmoid], "1x1o")
    return nn.Sequential(o3.Linear("2x0e+1x1o", gate.irreps_in), gate)


def test_an_e3nn_gate_keeps_its_pass(watches: list[int]) -> None:
    """Three divergences of a ``Gate``: each right, watched once (``NotImplementedError`` from
    ``Irrep.__len__`` at every call after keyattrs20)."""
    torch.manual_seed(0)
    m = _gated().double()
    x = torch.randn(8, 5, dtype=f64)
    for _ in range(3):
        assert_close(torchdiv.divergence(m, x), reference_divergence(m, x))
    assert len(watches) == 1


def test_a_function_closing_over_irreps() -> None:
    """A function reaching irreps through its closure (``named``, ``mixing.identity``: crashed
    on the irreps' ``__len__`` before keyattrs20 as well)."""
    o3 = pytest.importorskip("e3nn.o3")
    torch.manual_seed(0)
    irreps = o3.Irreps("2x0e+1x1o")
    linear = o3.Linear(irreps, irreps).double()

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(linear(z)) * irreps.dim

    x = torch.randn(8, irreps.dim, dtype=f64)
    for _ in range(2):
        assert_close(torchdiv.jacobian_diagonal(f, x), reference_diagonal(f, x))


class _Shifter:
    """A plain helper object whose method moves each sample by ``shift`` places along the
    batch (0: none)."""

    def __init__(self) -> None:
        self.shift = 0

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        return h.roll(self.shift, 0)


class _Pipeline(nn.Module):
    """A linear layer, then the callables of a plain list: ``torch.tanh`` and a helper's
    bound method."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.helper = _Shifter()
        self.steps = [torch.tanh, self.helper.apply]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.lin(z)
        for step in self.steps:
            h = step(h)
        return h


@pytest.mark.parametrize("call", ["divergence", "jacobian_diagonal"])
def test_a_plain_object_s_bound_method_in_a_list_is_watched(call: str) -> None:
    """The helper's ``shift`` set to 1 after three calls: refused (served mixed by the first
    calls' pass after keyattrs20: 0.7 off the per-sample divergence)."""
    torch.manual_seed(0)
    m = _Pipeline().double()
    x = torch.randn(8, 3, dtype=f64)
    op = getattr(torchdiv, call)
    reference = reference_divergence if call == "divergence" else reference_diagonal
    for _ in range(3):
        assert_close(op(m, x), reference(m, x))
    m.helper.shift = 1
    with pytest.raises(BatchInteractionError, match="mixes samples"):
        op(m, x)


class _Normed(nn.Module):
    """A linear layer and ``tanh``, then, unless ``cfg["norm"] is True`` (per sample), the
    batch mean subtracted: a setting that is a flag or a count, as configurations write
    ``norm: bool | int``."""

    def __init__(self, cfg: list[object] | tuple[object, ...]) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.cfg = cfg

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(z))
        return h if self.cfg[0] is True else h - h.mean(0)


@pytest.mark.parametrize(
    "held",
    ["a list of values", "a tuple of values", "a list with a function"],
)
def test_a_flag_set_to_an_equal_integer_is_watched(held: str) -> None:
    """``True`` set to ``1`` (equal, same hash) in a module's container: refused (the key held
    both as equal values, served mixed after keyattrs20)."""
    torch.manual_seed(0)
    cfg: list[object] | tuple[object, ...] = {
        "a list of values": [True],
        "a tuple of values": (True,),
        "a list with a function": [True, torch.tanh],
    }[held]
    m = _Normed(cfg).double()
    x = torch.randn(8, 3, dtype=f64)
    for _ in range(3):
        assert_close(torchdiv.divergence(m, x), reference_divergence(m, x))
    m.cfg = (1,) if isinstance(cfg, tuple) else [1, *cfg[1:]]
    with pytest.raises(BatchInteractionError, match="mixes samples"):
        torchdiv.divergence(m, x)
