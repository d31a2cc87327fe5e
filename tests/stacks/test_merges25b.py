"""Review of percall25's merge: the structure key (``torchdiv._taylor.cache._held``) picks a
module's attributes but torch's own by name, in one set operation.

Attacked with changes that make ``f`` mix samples between calls (own names, torch's names,
deleted and re-added attributes, slots, properties, class attributes, configurations of every
container type, NumPy and tensor flags, hooks, parametrizations, compiled modules: NOTES_rev-
merges25b.md). The merge read every case main read but a value a user stored under one of
torch's own attribute names (documented), and read some main missed. Faults found, on main
before the merge and after it alike:

- A boolean scalar buffer (a switch kept in the checkpoint, ``register_buffer("centre",
  torch.tensor(False))``) written in place (``load_state_dict``, ``fill_``) was held by
  identity alone, as a count is: the pass of its old value served the call that now mixes
  samples.
- A flag read from a NumPy array or data frame (a ``numpy.bool_``, not a ``numbers.Number``
  as NumPy's other scalars) was not read at all: set to mix samples, served by the old pass.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import assert_close, reference_diagonal, reference_divergence
from torch import nn

import torchdiv
from torchdiv import BatchInteractionError

f64 = torch.float64

CALLS = {
    "divergence": (torchdiv.divergence, reference_divergence),
    "jacobian_diagonal": (torchdiv.jacobian_diagonal, reference_diagonal),
}


def _served_then_refused(m: nn.Module, change: Callable[[], object], call: str) -> None:
    """Three calls of ``call`` (against the float64 loop), ``change``, a fourth: refused."""
    op, reference = CALLS[call]
    x = torch.randn(8, 3, dtype=f64)
    for _ in range(3):
        assert_close(op(m, x), reference(m, x))
    change()
    with pytest.raises(BatchInteractionError, match="mixes samples"):
        op(m, x)


class _Switched(nn.Module):
    """Centres the batch (mixes samples) where its boolean buffer ``centre`` says so: a
    switch saved with the weights, as a normalization layer's mode."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.register_buffer("centre", torch.tensor(False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(z))
        return h - h.mean(0) if self.centre else h


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("write", ["load_state_dict", "fill_"])
def test_a_boolean_buffer_written_in_place_is_refused(write: str, call: str) -> None:
    """The switch written in place: the next call refused (on main: ``DID NOT RAISE``)."""
    torch.manual_seed(0)
    m = _Switched(3).double().eval()
    state = {**m.state_dict(), "centre": torch.tensor(True)}
    change = {
        "load_state_dict": lambda: m.load_state_dict(state),
        "fill_": lambda: m.centre.fill_(True),
    }[write]
    _served_then_refused(m, change, call)


class _Flagged(nn.Module):
    """Centres the batch where its ``centre`` flag, read from a NumPy array or data frame (a
    ``numpy.bool_``), is set, as its own attribute or in its ``cfg`` dictionary."""

    def __init__(self, d: int, where: str) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        if where == "own":
            self.centre = np.bool_(False)
        else:
            self.cfg = {"centre": np.bool_(False)}

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(z))
        centre = self.cfg["centre"] if hasattr(self, "cfg") else self.centre
        return h - h.mean(0) if centre else h


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("where", ["own", "cfg"])
def test_a_numpy_boolean_flag_set_is_refused(where: str, call: str) -> None:
    """The flag set to ``numpy.True_``: the next call refused (its own attribute, on main:
    ``DID NOT RAISE``; in its dictionary, an item the key could not tell: watched at every
    call, refused on main too, a guard)."""
    torch.manual_seed(0)
    m = _Flagged(3, where).double().eval()
    change = {
        "own": lambda: setattr(m, "centre", np.bool_(True)),
        "cfg": lambda: m.cfg.__setitem__("centre", np.bool_(True)),
    }[where]
    _served_then_refused(m, change, call)
