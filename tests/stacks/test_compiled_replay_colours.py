"""The structured engine's colour and column plans (conv nets) traced inside a compiled loss
(``_structured.replay``): one graph, values and parameter gradients equal to eager, no
recompilation for fixed shapes, at most one for dynamic ones, and never a stale colouring:
every change of the structure it was made from (a layer swapped, a convolution's padding
mode, stride, dilation or groups, the input's size, a module made in the compiled code, an
index buffer, a number made from the batch size) is recorded again or run eagerly."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch._dynamo
from conftest import assert_close, sampled_daily
from test_compiled_losses import (
    _fresh_dynamo,  # noqa: F401  (autouse: Dynamo reset per test)
    assert_compiled_matches,
    conv,
)
from test_compiled_replay import Centred, _step_matches, assert_steps_compile_once
from torch._dynamo.utils import counters

import torchdiv

pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not")

Op = Callable[..., torch.Tensor]


def structured(f: torch.nn.Module, x: torch.Tensor, p: object = None) -> torch.Tensor:
    return torchdiv.divergence(f, x, method="structured")


class Pooled(torch.nn.Module):
    """A conv net whose output adds the mean over positions (squeeze-and-excitation's
    pooling): not local, so every unit vector is its own colour (columns)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = conv()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return y + torch.tanh(y.mean((2, 3), keepdim=True))


# (net, x's shape, operator): "auto" records a conv net past the problems it traces
CASES: dict[str, tuple[Callable[[], torch.nn.Module], tuple[int, ...], Op]] = {
    "divergence structured, colours": (conv, (3, 2, 6, 6), structured),
    "diagonal structured, colours in chunks": (
        conv,
        (3, 2, 6, 6),
        lambda f, x, p: torchdiv.jacobian_diagonal(f, x, method="structured", chunk_size=5),
    ),
    "divergence auto, colours": (conv, (2, 2, 16, 16), lambda f, x, p: torchdiv.divergence(f, x)),
    "divergence structured, columns": (Pooled, (3, 2, 4, 4), structured),
}


@pytest.mark.parametrize(
    "name",
    sampled_daily(CASES, {"diagonal structured, colours in chunks", "divergence auto, colours"}),
)
def test_colours_are_one_graph(name):
    """``fullgraph=True`` holds (on main the call ran eagerly behind a break: it raised)."""
    make, shape, op = CASES[name]
    backend = assert_compiled_matches(
        make(), op, torch.randn(shape, dtype=torch.float64), fullgraph=True
    )
    assert backend.compiled == 1


def test_colours_in_float32():
    """float32: values and gradients within 1e-5 of eager's."""
    net, x = conv().float(), torch.randn(3, 2, 6, 6)
    assert_compiled_matches(net, structured, x, fullgraph=True)


def test_a_compiled_step_is_not_recompiled():
    """Fixed shapes: the first graph serves every step, parameters updated in place (the
    readout's index tensors are read as the same graph inputs each call)."""
    assert_steps_compile_once(conv(), torch.randn(3, 2, 6, 6, dtype=torch.float64))


class Upsampled(torch.nn.Module):
    """A strided convolution and an upsampling back: its stride changes the reach."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.down = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.up = torch.nn.Upsample(size=(6, 6))
        self.out = torch.nn.Conv2d(4, 2, 3, padding=1)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.up(torch.tanh(self.down(x))))


def _swap(net: torch.nn.Module) -> None:
    net[2] = torch.nn.Conv2d(4, 2, 5, padding=2).double()  # (reach 3: other colours)


def _groups(net: torch.nn.Module) -> None:
    net[2] = torch.nn.Conv2d(4, 2, 3, padding=1, groups=2).double()


def _dilation(net: torch.nn.Module) -> None:
    net[0].dilation, net[0].padding = (2, 2), (2, 2)  # (same shapes, a wider reach)


def _padding_mode(net: torch.nn.Module) -> None:
    net[0].padding_mode = "circular"  # (a pad that wraps around: pixels far apart meet)


def _stride(net: torch.nn.Module) -> None:
    net.down.stride = (2, 2)  # (3 x 3 then upsampled back: other windows)


CHANGES: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[torch.nn.Module], None]]] = {
    "a conv layer swapped": (conv, _swap),
    "groups": (conv, _groups),
    "dilation": (conv, _dilation),
    "padding mode": (conv, _padding_mode),
    "stride": (Upsampled, _stride),
}


# (dilation always: a wider reach from the same shapes; the others daily, Dynamo's guards
# on the module catch them too)
@pytest.mark.parametrize("change", sampled_daily(CHANGES, set(CHANGES) - {"dilation"}))
def test_a_changed_convolution_is_recorded_again(change):
    """A change of the structure recompiles (Dynamo's guards on ``f``, whose forward the
    replay traces) and the new trace records the new structure and colours; the old
    colours, kept, were wrong where the reach grew."""
    make, changed = CHANGES[change]
    net, x = make(), torch.randn(3, 2, 6, 6, dtype=torch.float64)
    loss = torch.compile(lambda x: structured(net, x).square().mean(), backend="aot_eager")
    _step_matches(net, loss, x)
    changed(net)
    _step_matches(net, loss, x)


def test_a_changed_input_size_is_recorded_again():
    """The colours and readout are made for one event shape: a second size makes Dynamo's
    shapes dynamic, whose graph the first size met again. Its readout, of 8 x 6 images, has
    the size of 6 x 8 ones (Dynamo's shape guards hold): the replay guards on the event."""
    net = conv()
    loss = torch.compile(lambda x: structured(net, x).square().mean(), backend="aot_eager")
    for h, w in ((6, 8), (8, 6), (6, 8)):
        _step_matches(net, loss, torch.randn(3, 2, h, w, dtype=torch.float64))


def test_a_conv_net_made_or_changed_in_the_compiled_code_is_not_replayed():
    """Dynamo applies what the traced code did to the real objects only after the graph: a
    recording while tracing saw a module made there blank, and a layer swapped there as it
    was (a convolution's colours and calls for a dilated one). Such calls run eagerly."""
    net, x = conv(), torch.randn(3, 2, 6, 6, dtype=torch.float64)

    def made(x: torch.Tensor) -> torch.Tensor:
        return structured(torch.nn.Sequential(net[0], torch.nn.Tanh(), net[2]), x)

    got = torch.compile(made, backend="aot_eager")(x)
    assert_close(got, made(x))
    assert got.requires_grad

    def swapped(x: torch.Tensor) -> torch.Tensor:  # (the same weight's shape, dilated)
        net[2] = torch.nn.Conv2d(4, 2, 3, padding=2, dilation=2).double()
        return structured(net, x)

    got = torch.compile(swapped, backend="aot_eager")(x)
    assert_close(got, structured(net, x))


def test_sample_mixing_is_still_refused():
    """The recording while tracing watches for sample mixing (detection is off while Dynamo
    traces, and the replay's graph watches nothing: the centred net was replayed)."""
    loss = torch.compile(lambda x: structured(Centred(conv()), x).sum(), backend="aot_eager")
    with pytest.raises(torchdiv.BatchInteractionError):
        loss(torch.randn(3, 2, 6, 6, dtype=torch.float64))


class Shuffled(torch.nn.Module):
    """A conv net on columns permuted by a buffer: the colouring reads the index values."""

    def __init__(self) -> None:
        super().__init__()
        self.net = conv()
        self.register_buffer("perm", torch.arange(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[..., self.perm])


def test_an_index_buffer_changed_in_place_is_not_replayed():
    """No guard sees a buffer's values: colours of the identity read a reversed buffer's
    Jacobian wrongly. Such a plan runs eagerly, right after the change."""
    f, x = Shuffled(), torch.randn(3, 2, 6, 6, dtype=torch.float64)
    loss = torch.compile(lambda x: structured(f, x), backend="aot_eager")
    assert_close(loss(x), structured(f, x))
    f.perm.copy_(torch.tensor([0, 3, 1, 4, 2, 5]))
    assert_close(loss(x), structured(f, x))


class Averaged(torch.nn.Module):
    """A conv net scaled by a number made from the batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.net = conv()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * (4.0 / x.shape[0])


@pytest.mark.parametrize(
    "make",
    [pytest.param(conv, marks=pytest.mark.slow, id="conv"), pytest.param(Averaged, id="Averaged")],
)
def test_dynamic_batch(make):
    """``dynamic=True``: one graph for every batch size, but where a number in ``f``'s calls
    changes with it (``4 / N``, baked into the replay: stale at the next size): then one
    graph per size, right at each."""
    net = make()

    def loss(x: torch.Tensor) -> torch.Tensor:
        return torchdiv.jacobian_diagonal(net, x, method="structured").square().mean()

    counters.clear()
    compiled = torch.compile(loss, backend="aot_eager", dynamic=True)
    for n in (3, 5, 7):
        x = torch.randn(n, 2, 6, 6, dtype=torch.float64)
        assert_close(compiled(x), loss(x))
    assert counters["stats"]["unique_graphs"] == (1 if make is conv else 3)
