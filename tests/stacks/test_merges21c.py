"""Adversarial review of replays21 (``torchdiv._core.batch_sizes``): ``f``'s Python runs once
more while Dynamo traces, on a fake ``x`` with a symbolic batch size. What that run leaves in
``f`` (a size log, an activation log, a buffer replaced out of place) must not outlive it; and
a recording that differs on Dynamo's restart of a trace (``f`` caching a tensor by batch
size) must not fail the compile. Compiled with ``aot_eager`` in float64, values and parameter
gradients against the eager calls (themselves against independent references in their own
tests)."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import assert_close, carried_columns
from test_compiled_losses import _fresh_dynamo  # noqa: F401  (autouse: Dynamo reset per test)
from torch._subclasses.fake_tensor import FakeTensor

import torchdiv
from torchdiv._core.batch_sizes import served

pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not")
f64 = torch.float64
ENGINES = {
    "structured": (2, lambda f, x: torchdiv.divergence(f, x, method="structured")),
    "taylor": (1, lambda f, x: torchdiv.laplacian(f, x, method="taylor")),
}


class Logged(torch.nn.Module):
    """An MLP that logs what it saw the way training code does: the batch sizes and hidden
    activations in lists, the last size on ``self``, and (``counted``) a call count in a
    buffer replaced out of place (``self.calls = self.calls + 1``, as running statistics are
    often kept)."""

    def __init__(self, d_out: int, counted: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = torch.nn.Linear(2, 8, dtype=f64)
        self.outer = torch.nn.Linear(8, d_out, dtype=f64)
        self.register_buffer("calls", torch.zeros((), dtype=f64))
        self.sizes: list[int] = []
        self.hidden: list[torch.Tensor] = []
        self.last, self.counted = 0, counted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.counted:
            self.calls = self.calls + 1
        self.sizes.append(x.shape[0])
        self.last = x.shape[0]
        h = torch.tanh(self.inner(x))
        self.hidden.append(h.detach())
        return self.outer(h)


def _assert_steps_as_eagerly(f: torch.nn.Module, call, sizes: tuple[int, ...]) -> None:
    """``call``'s loss and parameter gradients compiled (``dynamic=True``) equal eager's at
    batches of ``sizes`` (event ``(2,)``)."""
    compiled = torch.compile(lambda f, x: call(f, x), backend="aot_eager", dynamic=True)
    for n in sizes:
        x = torch.randn(n, 2, dtype=f64)
        for got, want in zip(
            _loss_and_grads(f, compiled, x), _loss_and_grads(f, call, x), strict=True
        ):
            assert_close(got, want)


def _loss_and_grads(f: torch.nn.Module, loss, x: torch.Tensor) -> list[torch.Tensor]:
    """The loss and its parameter gradients (zero where it does not read one)."""
    value = loss(f, x).square().sum()
    grads = torch.autograd.grad(value, list(f.parameters()), materialize_grads=True)
    return [value.detach(), *grads]


@pytest.mark.parametrize("counted", [False, True])
@pytest.mark.parametrize("engine", ENGINES)
def test_the_symbolic_run_leaves_no_symbol_or_fake_tensor_in_f(engine, counted):
    """Before: the symbolic run appended a ``SymInt`` and a ``FakeTensor`` to ``f``'s logs and
    (Taylor: it runs before the recording) left a ``FakeTensor`` as ``f``'s buffer, so the
    compiled step raised (``UnsupportedOp ... FakeTensor``) and every later call of ``f``,
    eager too, failed. Now each entry is a real tensor or int and the step equals eager's."""
    d_out, call = ENGINES[engine]
    f = Logged(d_out, counted)
    _assert_steps_as_eagerly(f, call, (5, 9))
    assert type(f.calls) is torch.Tensor and type(f.last) is int
    assert all(type(n) is int for n in f.sizes)
    assert not any(isinstance(h, FakeTensor) for h in f.hidden)


@functools.lru_cache
def _weights(n: int) -> torch.Tensor:
    """Per-sample weights for a batch of ``n``, made once per size (a cache keyed by it)."""
    return torch.linspace(0.5, 1.5, n, dtype=f64)


class Weighted(torch.nn.Module):
    """An MLP whose output is weighted per sample by a cached ramp over the batch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2, 8, dtype=f64), torch.nn.Tanh(), torch.nn.Linear(8, 2, dtype=f64)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * _weights(x.shape[0])[:, None]


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_a_tensor_cached_by_batch_size_compiles():
    """Before: Dynamo restarted the trace (the cache breaks it), the second recording read the
    ramp the first had cached and refused where the first had replayed: every batch size
    raised ``SpeculationLogDivergence`` (one size before replays21). Now each restart is given
    the first attempt's plan; values and gradients equal eager's at 4 and 8."""
    _, call = ENGINES["structured"]
    f = Weighted()
    _assert_steps_as_eagerly(f, call, (4, 8))


class Counted(torch.nn.Module):
    """A field scaled by a count read from a buffer's values (``rule``): ``item`` or the
    number of a mask's nonzero entries, a number of the values, not of the batch size."""

    def __init__(self, rule: str) -> None:
        super().__init__()
        self.rule, self.net = rule, torch.nn.Linear(2, 1, dtype=f64)
        self.register_buffer("mask", torch.tensor([1.0, 0.0, 1.0], dtype=f64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rule == "item":
            return self.net(x) * self.mask.long().sum().item()
        return self.net(x) * self.mask.nonzero().shape[0]


@pytest.mark.parametrize("rule", ["item", "nonzero"])
def test_a_number_read_from_values_serves_the_recorded_size_only(rule):
    """``served``'s contract: a value read on the host gives the recorded size. Before, with
    ``affine`` (the Taylor replay's) such a number, an unbacked symbol of the fake run,
    counted as an integer coefficient of ``N``'s polynomial: every size (the Taylor replay's
    recordings at other sizes caught it, by chance of the values)."""
    x = torch.randn(5, 2, dtype=f64)
    assert served(Counted(rule), x, affine=True) == (5, 5)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_lazy_module_is_refused_as_eagerly_and_left_uninitialized(engine):
    """The eager call refuses a lazy module not yet called (``ValueError``: call ``f(x)``
    first). Before, compiled with the Taylor engine, the symbolic run materialized its
    parameters on the fake ``x``, without data: the step raised ``Cannot copy out of meta
    tensor`` and ``f`` was broken for good, its eager call too. Now the step raises the eager
    call's error, and once ``f`` is called the compiled step equals eager's."""
    d_out, call = ENGINES[engine]
    torch.manual_seed(0)
    f = torch.nn.Sequential(
        torch.nn.LazyLinear(8, dtype=f64), torch.nn.Tanh(), torch.nn.Linear(8, d_out, dtype=f64)
    )
    compiled = torch.compile(lambda f, x: call(f, x), backend="aot_eager", dynamic=True)
    x = torch.randn(5, 2, dtype=f64)
    with pytest.raises(ValueError, match="uninitialized parameters"):
        compiled(f, x)
    f(x)
    assert_close(compiled(f, x), call(f, x))


def test_a_chain_replayed_at_a_larger_batch_carries_a_block_as_eagerly(monkeypatch):
    """The replay's column block (``chunk``) is made at the recorded batch size. Before,
    recorded at 2 samples, a 32-wide MLP's replay served 3000 with all 32 columns at once,
    a block of 3.1M elements where the eager call carries 1M (10 columns; 64 wide at 4000:
    16.4M, 16x): memory growing with the batch, unbounded. Now a size whose block would
    pass twice ``BLOCK_ELEMENTS`` records again; values equal eager's."""
    from torchdiv._structured import cycle

    carried = carried_columns(monkeypatch)
    torch.manual_seed(0)
    layers = [torch.nn.Linear(32, 32, dtype=f64) for _ in range(4)]
    f = torch.nn.Sequential(*(m for layer in layers for m in (layer, torch.nn.Tanh())))[:-1]
    _, call = ENGINES["structured"]
    compiled = torch.compile(lambda f, x: call(f, x), backend="aot_eager", dynamic=True)
    for n in (2, 3000):
        x = torch.randn(n, 32, dtype=f64)
        carried.clear()
        got = compiled(f, x)
        assert carried and n * max(carried) * 32 <= 2 * cycle.BLOCK_ELEMENTS
        assert_close(got, call(f, x))


class Pooled(torch.nn.Module):
    """A conv block with a global average added back (as squeeze-excitation blocks do):
    every element reads the whole sample, so the structured plan reads one colour per
    element (columns), with no number made from the batch size (every size served)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = torch.nn.Conv2d(1, 2, 3, padding=1, dtype=f64)
        self.outer = torch.nn.Conv2d(2, 1, 3, padding=1, dtype=f64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inner(x))
        return self.outer(h) + h.mean((1, 2, 3), keepdim=True)


@pytest.mark.slow  # (5-13 s: the small budget makes 4 pieces, each traced)
def test_colours_replayed_at_a_larger_batch_are_carried_as_eagerly(monkeypatch):
    """As for the chain's block: the colours a replay carries at once are made at the
    recorded size (``forward.readout``, budget ``CHUNK_ELEMENTS``, here made small). Before,
    recorded at 2, 64 columns at once were carried at 6 samples where the eager call carries
    16, memory growing with the batch; now the compiled call reads as the eager call."""
    from torchdiv._structured import forward

    monkeypatch.setattr(forward, "CHUNK_ELEMENTS", 1 << 14)
    widths: list[int] = []
    read = forward.read

    def spy(graph, x, batch_dims, plan):
        widths.append(max(stop - start for start, stop, *_ in plan.pieces))
        return read(graph, x, batch_dims, plan)

    monkeypatch.setattr(forward, "read", spy)
    f = Pooled()
    call = lambda f, x: torchdiv.jacobian_diagonal(f, x, method="structured")  # noqa: E731
    compiled = torch.compile(call, backend="aot_eager", dynamic=True)
    for n in (2, 6):
        x = torch.randn(n, 1, 8, 8, dtype=f64)
        widths.clear()
        got = compiled(f, x)
        compiled_widths = list(widths)
        widths.clear()
        assert_close(got, call(f, x))
        assert compiled_widths == widths
