"""torchdiv called from functional-style code, as ports from JAX and ``torch.func`` users write
it: ``f`` built with ``torch.func.functional_call(model, params, (x,))`` over a parameter
dictionary the caller owns (leaves, or views of one flat vector), dictionaries rebuilt at
every call, buffers passed in the dictionary, a Python MLP over a list of ``(W, b)`` layers,
and the state such a script keeps in an object (a ``TrainState``) beside module-level
globals of the same names. References: the diagonal blocks of the cross-batch Jacobian
(``reference_divergence``), each sample alone in float64 by ``torch.func.jacrev``, and the
count of watches for sample mixing (``watches``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.func import functional_call, jacrev

import torchdiv
from tests.conftest import assert_close, reference_divergence

f64 = torch.float64


def _per_sample_divergence(f, x: torch.Tensor) -> torch.Tensor:
    """Each sample's trace alone: ``jacrev`` of ``f`` at that sample as a batch of one."""
    return torch.stack([jacrev(lambda z: f(z[None])[0])(s).trace() for s in x])


class _Reordered(torch.nn.Module):
    """A layer that hands its outputs back in the order a buffer gives (``y[self.order]``):
    per sample only while ``order`` is the identity."""

    def __init__(self, n: int, batch: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(n, n)
        self.register_buffer("order", torch.arange(batch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))[self.order]


@dataclasses.dataclass
class TrainState:
    """What a JAX port trains with (flax's ``TrainState``, mutable here): its buffers."""

    buffers: dict[str, torch.Tensor]


# a script's module-level state, as JAX ports keep it: the buffers it started from, and the
# object it trains with (``state.buffers``, an attribute of the same name; see below)
buffers = {"order": torch.arange(4)}


def test_an_attribute_named_as_a_global_is_not_the_global() -> None:
    """``f`` reads ``state.buffers``; the script also holds a global ``buffers`` (the dict it
    started from). The watch's key took every name in ``f``'s code (``co_names``: the
    attributes it reads too) for a global it reads, so it held the global ``buffers`` and the
    index tensor in it, the one the first call read: a pass kept for that index served the
    calls after ``state.buffers`` was replaced by a dictionary whose ``order`` moves samples,
    silently (the traces of the unmoved layer, -0.20 to -0.27, where each output sample's
    derivative in its own input is 0)."""
    torch.manual_seed(0)
    model = _Reordered(3, 4).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    state = TrainState(buffers)
    f = lambda z: functional_call(model, {**params, **state.buffers}, (z,))  # noqa: E731
    x = torch.randn(4, 3, dtype=f64)
    assert_close(torchdiv.divergence(f, x), reference_divergence(f, x))
    state.buffers = {"order": torch.tensor([1, 2, 3, 0])}  # (the global keeps the first)
    with pytest.raises(torchdiv.BatchInteractionError):
        torchdiv.divergence(f, x)
