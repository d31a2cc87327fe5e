"""Review of compile20-conv's replay of conv nets' plans inside a compiled loss
(``_structured.replay``): a replay must never be served where the eager call would compute
something else or refuse. A number made from the batch size that agrees at the sizes the
recording tries (or made from a second batch dimension), a replay recorded under
``allow_batch_interaction()`` served outside it, and ``mark_dynamic`` on an image dimension
(its event guard raised Dynamo's error)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import assert_close
from test_compiled_losses import _fresh_dynamo, conv  # noqa: F401 (autouse: Dynamo reset)
from test_compiled_replay import Centred
from test_compiled_replay_colours import Averaged, structured
from torch._dynamo.utils import counters

import torchdiv
from torchdiv._core.mixing import errors

pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not")


class Capped(torch.nn.Module):
    """A conv net scaled by ``min(N, 4)``: the same number at 4, 5 and 9 samples."""

    def __init__(self) -> None:
        super().__init__()
        self.net = conv()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * min(x.shape[0], 4)


@pytest.mark.slow  # (two dynamic compiles of a conv net: ~10 s)
def test_a_batch_number_equal_at_the_sizes_tried_is_not_baked_in():
    """``dynamic=True``: recorded at 4 samples, the replay of ``* 4`` served 3 samples
    (Dynamo's trace of ``min(s0, 4)`` guards on nothing): divergences 1.3x eager's."""
    net = Capped()
    compiled = torch.compile(lambda x: structured(net, x), backend="aot_eager", dynamic=True)
    for n in (4, 3):
        x = torch.randn(n, 2, 6, 6, dtype=torch.float64)
        assert_close(compiled(x), structured(net, x))


def test_a_replay_recorded_with_detection_off_is_not_served_with_it_on():
    """Compiled inside ``allow_batch_interaction()``, a net that centres over the batch was
    recorded unwatched; called outside, the replay (no guard on the switch) served it where
    eager raises."""
    net, x = Centred(conv()), torch.randn(3, 2, 6, 6, dtype=torch.float64)
    compiled = torch.compile(lambda x: structured(net, x), backend="aot_eager")
    with torchdiv.allow_batch_interaction():
        assert_close(compiled(x), structured(net, x))
    with pytest.raises(torchdiv.BatchInteractionError):
        compiled(x)
    assert not getattr(errors._state, "watched", False)
    plain = conv()  # (no mixing: still replayed inside the block, one graph)
    counters.clear()
    compiled = torch.compile(lambda x: structured(plain, x), backend="aot_eager", fullgraph=True)
    with torchdiv.allow_batch_interaction():
        assert_close(compiled(x), structured(plain, x))
        assert errors.allowed()
    assert_close(compiled(x), structured(plain, x))
    assert counters["stats"]["unique_graphs"] == 1


def test_a_recording_that_raises_leaves_the_watch_as_it_was():
    """``errors.watched`` while recording a net that mixes samples (the recording raises
    inside it): detection is as before afterwards, off while Dynamo traces."""
    net, x = Centred(conv()), torch.randn(3, 2, 6, 6, dtype=torch.float64)
    with pytest.raises(torchdiv.BatchInteractionError):
        torch.compile(lambda x: structured(net, x), backend="aot_eager")(x)
    assert not getattr(errors._state, "watched", False)
    assert not errors.allowed()


MARKED = {
    "image height": (conv, lambda f, x: structured(f, x), 2),
    "image height of x * 2": (conv, lambda f, x: structured(f, x * 2.0), 2),
    "batch, numbers of N": (Averaged, lambda f, x: structured(f, x), 0),
}


@pytest.mark.parametrize("name", MARKED)
def test_mark_dynamic(name):
    """The replay's guards on ``x``'s event (or whole shape, where numbers change with the
    batch) specialised a dimension marked dynamic: Dynamo raised
    ``ConstraintViolationError`` (before the merge the call ran eagerly and served)."""
    make, loss, dim = MARKED[name]
    net = make()
    compiled = torch.compile(lambda x: loss(net, x), backend="aot_eager")
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    torch._dynamo.mark_dynamic(x, dim)
    assert_close(compiled(x), loss(net, x))


@pytest.mark.slow
def test_two_nets_alternately_and_padding_modes():
    """One compiled loss for two nets of the same structure but for the padding mode (and
    weights), called alternately: each call equals its net's eager divergence."""
    a, b = conv(), conv()
    b[0].padding_mode = "circular"
    with torch.no_grad():
        b[0].weight.mul_(-2.0)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    counters.clear()
    compiled = torch.compile(lambda f, x: structured(f, x), backend="aot_eager")
    for f in (a, b, a, b):
        assert_close(compiled(f, x), structured(f, x))


class PerStep(torch.nn.Module):
    """A pointwise layer scaled by ``1 / T``, ``T`` the second of two batch dimensions."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.w) * (4.0 / x.shape[1])


def test_a_number_made_from_the_second_batch_dimension_is_not_baked_in():
    """``batch_dims=2``, ``dynamic=True``: the numbers were compared at other sizes of the
    first batch dimension only, so the replay's ``4 / 5`` (the second size, the first
    dynamic graph) served ``T = 7``: 0.68 off."""
    net = PerStep()

    def div(x: torch.Tensor) -> torch.Tensor:
        return torchdiv.divergence(net, x, method="structured", batch_dims=2)

    compiled = torch.compile(div, backend="aot_eager", dynamic=True)
    for t in (3, 5, 7):
        x = torch.randn(2, t, 3, dtype=torch.float64)
        assert_close(compiled(x), div(x))
