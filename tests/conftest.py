"""Shared references and problems for the tests.

References are independent of torchdiv's batching: the Jacobian of the *whole* batched
function by ``torch.func.jacrev`` (the cross-batch ``(N, m, N, n)`` tensor), from which the
per-sample diagonal blocks are read. That is exactly what the seed threads do by hand.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import importlib
import os
import types
from collections.abc import Callable, Iterator

import pytest
import torch
from torch.func import hessian, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

from torchdiv._core.versions import release

# Python 3.13 warns where a ``functools.partial`` set on a class is read off an instance (3.14
# binds it as a method): a program of the tests' own that does so (``__call__ = partial(run,
# net)``, ``act = partial(...)`` read as ``self.act``) warns at its own call, never in
# torchdiv's walk of it (pyvers31). For ``pytest.mark.filterwarnings``.
PARTIAL_ON_A_CLASS = "ignore:functools.partial will be a method descriptor:FutureWarning"


def internal_module(name: str) -> types.ModuleType:
    """``torch.testing._internal.<name>`` (OpInfo's and ModuleInfo's databases), imported under
    PyTorch's own context that puts ``torch.backends``' flags back: its ``common_utils`` freezes
    them at import (``disable_global_flags``), and every later test of the worker that set a
    flag (``torch.backends.fp32_precision = "bf16"``) raised."""
    with torch.backends.__allow_nonbracketed_mutation():  # type: ignore[attr-defined]
        return importlib.import_module(f"torch.testing._internal.{name}")


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    """rtol/atol for comparing two ways of computing the same derivative.

    float64: both sides are a few hundred flops deep; 1e-10 leaves five digits of head room
    over eps = 2.2e-16. float32: eps = 1.2e-7 and the reductions in matmuls and traces sum
    hundreds of terms, so relative differences of a few 1e-6 are round-off; 2e-5 is tight.
    """
    return (
        {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, scale: float = 1.0) -> None:
    """``torch.testing.assert_close`` with the dtype's tolerances, atol scaled by ``scale``."""
    tol = tolerances(expected.dtype)
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale)


def reference_jacobian(
    f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_dims: int = 1
) -> torch.Tensor:
    """Per-sample Jacobians from the full cross-batch Jacobian, shape ``S + y_event + x_event``."""
    y = f(x)
    full = jacrev(f)(x)  # y.shape + x.shape
    batch = x.shape[:batch_dims]
    n_samples, m, n = batch.numel(), y[(0,) * batch_dims].numel(), x[(0,) * batch_dims].numel()
    blocks = full.reshape(n_samples, m, n_samples, n).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    return blocks.reshape(batch + y.shape[batch_dims:] + x.shape[batch_dims:])


def loop_diagonal(f, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """Each sample's Jacobian diagonal, row by row: ``f`` evaluated afresh for every row and
    differentiated once by ``autograd.grad`` (a graph that can be walked once suffices)."""
    n = x[0].numel()
    diagonal = []
    for i in range(n):
        leaf = x.detach().requires_grad_(True)
        y = f(leaf).reshape(len(x), n)
        (row,) = torch.autograd.grad(y[:, i].sum(), leaf, create_graph=create_graph)
        diagonal.append(row.reshape(len(x), n)[:, i])
    return torch.stack(diagonal, 1).reshape(x.shape)


def assert_run_as_written(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    method: str,
    want: torch.Tensor,
    expected: tuple[torch.Tensor, ...],
    held: torch.nn.Module,
) -> None:
    """After three runs of ``f`` outside torchdiv (TorchScript's executor profiles, then
    optimizes its plan), two divergences of ``f`` by ``method``: the values ``want`` and the
    gradients ``expected`` of their sum by ``held``'s parameters (the scripted module's)."""
    import torchdiv

    for _ in range(3):  # the executor's profiled runs, outside torchdiv
        f(x)
    for _ in range(2):
        got = torchdiv.divergence(f, x, method=method)
        assert_close(got, want.detach())  # float64: the dtype's tolerances (above)
        grads = torch.autograd.grad(
            got.sum(), list(held.parameters()), allow_unused=True, materialize_grads=True
        )
        for g, w in zip(grads, expected, strict=True):
            assert_close(g, w)


def assert_scripted_as_eager(
    f: Callable[[torch.Tensor], torch.Tensor], eager: torch.nn.Module, scripted: torch.nn.Module
) -> None:
    """``assert_run_as_written`` of ``f``, which runs ``scripted`` (a scripted copy of
    ``eager``, the same weights) on a float64 batch of 4 x 3, by forward mode: against the
    eager module's divergence and parameter gradients (per-sample ``autograd.grad`` loops)."""
    x = torch.randn(4, 3, dtype=torch.float64)
    want = loop_diagonal(eager, x, create_graph=True).sum(-1)
    unused = {"allow_unused": True, "materialize_grads": True}  # (a last bias: none)
    expected = torch.autograd.grad(want.sum(), list(eager.parameters()), **unused)
    assert_run_as_written(f, x, "forward", want, expected, scripted)


@pytest.fixture
def nets() -> Iterator[tuple[torch.nn.Module, torch.jit.ScriptModule]]:
    """A float64 3 -> 6 -> 3 tanh MLP and a scripted copy of it, the same weights: the
    TorchScript walk's tests (``assert_scripted_as_eager``) run the copy where ``f`` holds it."""
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    eager = eager.double()
    scripted = torch.jit.script(torch.nn.Sequential(*(m for m in eager)))
    scripted.load_state_dict(eager.state_dict())
    yield eager, scripted


def carried_columns(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The columns each block of the structured chain carries, in the order they are carried
    (``cycle.chunks`` spied on for the rest of the test)."""
    from torchdiv._structured import cycle

    carried: list[int] = []
    chunks = cycle.chunks

    def spy(width: int, chunk: int):
        carried.append(min(width, chunk))
        return chunks(width, chunk)

    monkeypatch.setattr(cycle, "chunks", spy)
    return carried


def reference_divergence(f, x, batch_dims: int = 1) -> torch.Tensor:
    jac = reference_jacobian(f, x, batch_dims)
    n = x[(0,) * batch_dims].numel()
    return jac.reshape(-1, n, n).diagonal(dim1=1, dim2=2).sum(-1).reshape(x.shape[:batch_dims])


def reference_diagonal(f, x, batch_dims: int = 1) -> torch.Tensor:
    jac = reference_jacobian(f, x, batch_dims)
    n = x[(0,) * batch_dims].numel()
    return jac.reshape(-1, n, n).diagonal(dim1=1, dim2=2).reshape(x.shape)


def reference_laplacian(f, x, batch_dims: int = 1) -> torch.Tensor:
    """Per-sample Laplacians from ``torch.func.hessian`` of each output summed over the batch
    (block diagonal: the diagonal of the cross-batch Hessian is the per-sample diagonal)."""
    y = f(x)
    batch = x.shape[:batch_dims]
    flat = y.reshape(batch.numel(), -1)
    columns = []
    for i in range(flat.shape[1]):
        with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU kernel has no forward-mode AD
            h = hessian(lambda z, i=i: f(z).reshape(flat.shape)[:, i].sum())(x)
            columns.append(
                h.reshape(x.numel(), x.numel()).diagonal().reshape(batch.numel(), -1).sum(1)
            )
    return torch.stack(columns, 1).reshape(y.shape)


def tanh_mlp(d_in: int, hidden: int, d_out: int, dtype=torch.float64) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, d_out),
    ).to(dtype)


def conv_net(channels: int = 3, dtype=torch.float64) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels, 4, 3, padding=1),
        torch.nn.Softplus(),
        torch.nn.Conv2d(4, channels, 3, padding=1),
    ).to(dtype)


class KnownJacobian:
    """``f(x) = A x + c * x**2`` per sample (lineax style): ``J(x) = A + diag(2 c x)``.

    ``A`` is chosen to be low rank, non-symmetric or diagonal-heavy, so the tests see the
    Jacobians that break wrong recipes (column sums equal the trace only by accident).
    """

    def __init__(self, kind: str, n: int, dtype: torch.dtype, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        rand = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
        if kind == "low_rank":
            self.A = rand(n, 2) @ rand(2, n)
        elif kind == "nonsymmetric":
            self.A = torch.triu(rand(n, n)) * 3
        else:  # diagonal heavy
            self.A = torch.diag(rand(n) * 10) + 0.1 * rand(n, n)
        self.c = rand(n)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(*x.shape[:-1], -1) if x.dim() else x
        return flat @ self.A.T + self.c * flat**2

    def jacobian(self, x: torch.Tensor) -> torch.Tensor:
        return self.A + torch.diag_embed(2 * self.c * x)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


@pytest.fixture
def split_plans(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each attempt at the structured engine's group-norm split
    (``torchdiv._structured.statistics``) made a plan."""
    from torchdiv._structured import statistics

    made: list[bool] = []
    plan = statistics._plan

    def recorded(*args, **kwargs):
        found = plan(*args, **kwargs)
        made.append(found is not None)
        return found

    monkeypatch.setattr(statistics, "_plan", recorded)
    return made


@pytest.fixture
def watches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per watch for sample mixing started from now on (every watch makes one
    ``torchdiv._core.mixing.tracker.BatchAxes``, made where ``torchdiv._core.mixing.watch``
    looks it up)."""
    from torchdiv._core.mixing import tracker, watch

    started: list[int] = []

    class Counted(tracker.BatchAxes):
        def __init__(self, *args: object, **kwargs: object) -> None:
            started.append(1)
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(watch, "BatchAxes", Counted)
    return started


class Cube(torch.autograd.Function):
    """``x³`` as a ``torch.func``-ready ``autograd.Function`` (``setup_context``, ``jvp``, a
    vmap rule): forward over reverse runs it, the Taylor engine has no rule for it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad

    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * tangent


class LegacyCube(torch.autograd.Function):
    """Old-style Function (forward takes ctx): torch.func cannot run it at all."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


def laplacian_by_grad_of_grad(f, x: torch.Tensor) -> torch.Tensor:
    """The loop VMC and PINN codes write: ``autograd.grad`` of each gradient coordinate, with
    ``create_graph`` (differentiable w.r.t. ``x`` and parameters). Reverse over reverse:
    PyTorch's double backward, right for every op where the Laplacian engines differ (checked
    against ``central_difference`` in ``test_linalg_rules``). ``f``: ``(B, ...) -> (B,)``."""
    z = x if x.requires_grad else x.detach().requires_grad_()
    (grad,) = torch.autograd.grad(f(z).sum(), z, create_graph=True)
    flat = grad.flatten(1)
    total = torch.zeros(len(z), dtype=z.dtype)
    for i in range(flat.shape[1]):
        (column,) = torch.autograd.grad(flat[:, i].sum(), z, create_graph=True)
        total = total + column.flatten(1)[:, i]
    return total


def laplacian_alone(f, x: torch.Tensor) -> torch.Tensor:
    """Each sample's Laplacian of the scalar ``f``, evaluated on that sample alone, by grad of
    grad: ``(B,)`` (a reference that cannot see other samples, whatever ``f`` does with them)."""
    out = []
    for xb in x:
        leaf = xb[None].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(f(leaf).sum(), leaf, create_graph=True)
        g = g.flatten()
        rows = [
            torch.autograd.grad(g[i], leaf, create_graph=True)[0].flatten()[i]
            for i in range(g.numel())
        ]
        out.append(torch.stack(rows).sum())
    return torch.stack(out)


def central_difference(fun, h: float = 3e-4) -> torch.Tensor:
    """``d fun(t) / dt`` at 0 by central differences at ``h`` and ``h/2`` with Richardson
    extrapolation: truncation O(h^4) (~1e-14 times the fifth derivative), round-off
    ~ eps |fun| / h ~ 1e-12 in float64; measured 1e-12-1e-10 relative on the linalg tests."""

    def central(step: float) -> torch.Tensor:
        return (fun(step) - fun(-step)) / (2 * step)

    return (4 * central(h / 2) - central(h)) / 3


@contextlib.contextmanager
def shifted(params: list[torch.Tensor], directions: list[torch.Tensor], t: float):
    """The parameters moved in place to ``p + t v`` inside the block, restored exactly after."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, directions, strict=True):
            p.add_(v, alpha=t)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def assert_same_parameter_gradients(
    model: torch.nn.Module, ours: torch.Tensor, reference: torch.Tensor
) -> None:
    """Gradients of two losses with respect to every parameter of ``model`` agree (zero where
    one is unused: an output bias does not reach a derivative)."""
    params = list(model.parameters())
    got = torch.autograd.grad(ours, params, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(reference, params, retain_graph=True, allow_unused=True)
    for p, a, b in zip(params, got, want, strict=True):
        zero = torch.zeros_like(p)
        assert_close(zero if a is None else a, zero if b is None else b)


def parameter_gradients(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    """The gradient of ``loss`` with respect to every parameter of ``model``, zeros where one
    is unused or where ``loss`` has no graph (a piecewise-linear net's Laplacian of 0)."""
    params = list(model.parameters())
    if not loss.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def directional_gradient(value: torch.Tensor, params: list[torch.Tensor], directions) -> float:
    """``sum_p <d value.sum() / d p, v_p>`` by one backward pass (unused parameters: 0)."""
    grads = torch.autograd.grad(value.sum(), params, allow_unused=True)
    pairs = zip(grads, directions, strict=True)
    return sum((g * v).sum().item() for g, v in pairs if g is not None)


# Slow tests (marked ``slow``: several seconds each) run as a sample in ``make test``: each is
# in one of SLOW_SHARE parts (a hash of its name), and the parts take turns day after day, so
# that every one runs every SLOW_SHARE-th day and each day's sample costs that share of them, while
# the suite stays under ~3 minutes on 2 cores. (A sample drawn afresh each day by a hash of the
# day and the name cost 103-350 s across 60 days on the fifteenth session's durations, and left
# a test unrun up to 22 days running.) ``--slow=all`` (or TORCHDIV_SLOW=all) runs all,
# ``--slow=none`` none; TORCHDIV_SLOW_SEED fixes the sample (to rerun a failure): a date runs
# that day's part, another string the part its hash picks.
# Five parts, not three (eighteenth session): the slow tests had grown to 193 s of CPU (parts
# of 50-76 s; a fresh clone's tests took 3 min 19-28 s), five parts cost 35-41 s each. Seven
# (twenty-second session): one part had grown to ~90 s of CPU on a loaded run, the tests to
# 3 min 24 s on a fresh clone. Ten (twenty-third session): a day's part was 61.5 s of CPU
# beside 298 s of always-run tests (suite23), the tests ~3 min 5 s on an idle machine.
# Thirteen (twenty-fourth session): the session's new always-run tests took a fresh clone's
# tests to 3 min 22 s (a day's part ~27 s of wall time on two workers).
SLOW_SHARE = 13
# Salted hash of the parts: the salt is the one of "", "1:", ..., "59:" whose five parts cost
# most alike on that run's per-test CPU seconds (36, 41, 40, 35, 41 s; three parts by "16:"
# cost 67, 76 and 50 s). A new slow test of tens of seconds may unbalance them: pick the salt
# again (the notes of testtime18 hold the script).
SLOW_SALT = "56:"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow",
        default=os.environ.get("TORCHDIV_SLOW", "sample"),
        choices=("all", "sample", "none"),
        help="slow tests: run all, today's sample (default) or none",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: several seconds; make test runs a daily sample")
    # the day fixed once, in the process that starts the run (pytest-xdist's workers inherit
    # it): a run across midnight would otherwise sample by two days (collection and test
    # time, one worker and another), and the header's seed would not rerun what ran
    os.environ.setdefault("TORCHDIV_SLOW_SEED", datetime.date.today().isoformat())


def pytest_report_header(config: pytest.Config) -> str:
    return f"slow tests: {config.getoption('--slow')} (seed {_slow_seed()})"


def _slow_seed() -> str:
    return os.environ.get("TORCHDIV_SLOW_SEED", datetime.date.today().isoformat())


def pytest_collection_finish(session: pytest.Session) -> None:
    """Let each test module with selected tests start what it runs in other processes
    (``start_early(config)``, e.g. the type checkers) before the first test runs. Not in a
    pytest-xdist worker: every worker collects every test but runs only those it is sent, so
    each would start them (the test that needs them starts them where it runs).

    First, in every process, what collection left alive (~560k objects: torch's and the
    other imports, the test modules, ~7900 items) is moved out of the cycle collector's
    reach (``gc.freeze``): it lives to the end of the run, yet every full collection walked
    it again, automatic ones (~50 in a worker's run) and the tests' own ``gc.collect()``
    (tests/api/test_lifetime.py), 0.3-0.6 s each in a worker's heap. Nothing a test checks
    changes: objects made afterwards are collected as before (testtime29 measured)."""
    gc.collect()
    gc.freeze()
    if os.environ.get("PYTEST_XDIST_WORKER") is not None:
        return
    modules = {getattr(item, "module", None) for item in session.items}
    for module in modules:
        start = getattr(module, "start_early", None)
        if start is not None and not session.config.option.collectonly:
            start(session.config)


def _part(text: str) -> int:
    """One of ``SLOW_SHARE`` parts by a (salted) hash of ``text``."""
    return hashlib.sha256(f"{SLOW_SALT}{text}".encode()).digest()[0] % SLOW_SHARE


def _todays_part(seed: str) -> int:
    """The part that runs under ``seed``: for an ISO date, its day number modulo
    ``SLOW_SHARE`` (consecutive days run the parts in turn), else the part of the string.

    >>> [_todays_part(day) for day in ("2026-12-06", "2026-12-07", "2026-12-08", "2026-12-10")]
    [9, 10, 11, 0]
    """
    try:
        return datetime.date.fromisoformat(seed).toordinal() % SLOW_SHARE
    except ValueError:
        return _part(seed)


def sampled_daily(names, daily: set[str]) -> list:
    """``names`` as parameters, those in ``daily`` marked slow: in the daily sample of slow
    tests (a family that keeps one always-run case per fault it guards).

    >>> [getattr(p, "marks", ()) != () for p in sampled_daily(["a", "b"], {"b"})]
    [False, True]
    """
    return [pytest.param(n, marks=pytest.mark.slow) if n in daily else n for n in names]


def in_todays_sample(config: pytest.Config, name: str) -> bool:
    """Whether the slow check ``name`` runs: every one under ``--slow=all``, none under
    ``--slow=none``, else (the default) those of today's part: ``name``'s part (a hash of it,
    the same whatever else is selected) is the seed's. ``name``: a slow test's node id, or a
    case that a test runs among others (e.g. the DDP matrix's ``"fsdp/mlp/laplacian/auto/alone"``),
    so that a test can sample its costly cases as the suite samples slow tests.

    >>> class Config:  # --slow=all
    ...     getoption = staticmethod(lambda name: "all")
    >>> in_todays_sample(Config(), "any")
    True
    """
    mode = config.getoption("--slow")
    if mode != "sample":
        return mode == "all"
    return _part(name) == _todays_part(_slow_seed())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason=f"slow, not in the sample of seed {_slow_seed()} (--slow=all)")
    for item in items:
        if "slow" in item.keywords and not in_todays_sample(config, item.nodeid):
            item.add_marker(skip)


class Stateful(torch.nn.Module):
    """``head(W2 dropout(u * tanh(W1 x)))``, a tanh layer of ``hidden`` units scaled by the
    buffer ``u``: every evaluation first writes ``u`` in place (``out=``, as spectral norm's
    power iteration does: ``torch.func`` allows that, not ``u += ...``) and ``calls``, then
    drops half the hidden units (train-mode dropout). Two evaluations compute different
    functions; a call should make one. ``frozen`` (set by ``one_state``): ``u`` and the
    mask of one evaluation, used as constants: that evaluation's function, deterministic."""

    def __init__(self, n: int, m: int = 1, hidden: int = 8, head=None) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.first = torch.nn.Linear(n, hidden).double()
        self.last = torch.nn.Linear(hidden, m).double()
        self.head = head
        self.register_buffer("u", torch.linspace(0.5, 1.5, hidden, dtype=torch.float64))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.keep = False  # keep (u, mask) of the next evaluation (a plain one: one_state)
        self.kept: tuple[torch.Tensor, torch.Tensor] | None = None
        self.frozen: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        if self.frozen is not None:
            u, mask = self.frozen
            h = h * u * mask * 2.0
        else:
            with torch.no_grad():
                torch.add(self.u, 0.25, out=self.u)
                torch.add(self.calls, 1, out=self.calls)
            h = torch.nn.functional.dropout(h * self.u, 0.5, training=True)
            if self.keep:
                self.kept = (self.u.clone(), (h != 0).detach())
        y = self.last(h)
        return y if self.head is None else self.head(y)


def one_state(net: Stateful, x: torch.Tensor, seed: int) -> tuple[Stateful, torch.Tensor]:
    """A copy of ``net`` evaluated once at ``x`` after ``torch.manual_seed(seed)``, then
    ``frozen`` at that evaluation (what a call seeded so must differentiate), and the CPU
    generator's state after it (where the call must leave it)."""
    import copy

    once = copy.deepcopy(net)
    once.keep = True
    torch.manual_seed(seed)
    once(x)
    state = torch.get_rng_state()
    once.frozen = once.kept
    return once, state


def assert_one_state(net: Stateful, once: Stateful, state: torch.Tensor) -> None:
    """``net`` after a call as ``once`` after one evaluation; the generator as it left it."""
    assert net.calls.item() == once.calls.item() == 1
    assert torch.equal(net.u, once.u)
    assert torch.equal(torch.get_rng_state(), state)


class CentredMLP(torch.nn.Module):
    """An MLP ``3 -> 8 -> 3`` whose hidden features are centred over the batch
    (``h - h.mean(0)``): it mixes samples, which every watch must refuse."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.outer = torch.nn.Linear(3, 8), torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(x).tanh()
        return self.outer(h - h.mean(0, keepdim=True))


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo group of one process (this one), destroyed afterwards (DDP, FSDP2 and tensor
    parallelism on a mesh of one rank, without spawning)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def chained(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times ``GraphJacobian`` took the chain's products (``_exact.chain``: one
    entry per time)."""
    from torchdiv._exact import autograd, chain

    calls: list[int] = []
    products = chain.products

    def spy(*args, **kwargs):
        calls.append(1)
        return products(*args, **kwargs)

    monkeypatch.setattr(autograd, "chain_products", spy)
    return calls


@pytest.fixture
def chain_taken(monkeypatch: pytest.MonkeyPatch) -> Callable[[], bool]:
    """Whether ``GraphJacobian`` has taken a result from the chain (``_exact.chain``) since
    the fixture was made, in any of its ways: products of a basis, rows from the top layer's,
    a trace by cyclicity (``False``: the engine ran instead)."""
    from torchdiv._exact import autograd

    rows = answers(monkeypatch, autograd, "unit_products")
    traces = answers(monkeypatch, autograd, "chain_trace")
    products = answers(monkeypatch, autograd, "chain_products")
    return lambda: any(rows) or any(traces) or any(products)


def jacobian_alone(f, x: torch.Tensor) -> torch.Tensor:
    """Each sample's Jacobian ``(B, m, n)``, ``f`` evaluated on that sample alone (a batch of
    one), row by row by ``autograd.grad`` with ``create_graph`` (differentiable in what ``f``
    closes over): a reference that cannot see other samples, whatever ``f`` does with them
    (a branch on a batch statistic takes each sample's own branch)."""
    out = []
    for xb in x:
        leaf = xb[None].detach().requires_grad_(True)
        y = f(leaf).flatten()
        rows = [torch.autograd.grad(y_i, leaf, create_graph=True)[0].flatten() for y_i in y]
        out.append(torch.stack(rows))
    return torch.stack(out)


def assert_gradients_as(model, ours, eager, reference) -> None:
    """The gradients of ``ours`` with respect to ``model``'s parameters equal those of
    ``reference`` with respect to ``eager``'s, its copy's (an exported or scripted module's),
    parameter by parameter (zero where one is unused)."""
    got = torch.autograd.grad(ours, list(model.parameters()), allow_unused=True)
    want = torch.autograd.grad(
        reference, list(eager.parameters()), retain_graph=True, allow_unused=True
    )
    for p, a, b in zip(eager.parameters(), got, want, strict=True):
        zero = torch.zeros_like(p)
        assert_close(zero if a is None else a, zero if b is None else b)


@pytest.fixture
def laplacian_chained(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """``"auto"``'s Laplacian loops at every structure (its decisions forgotten first); one
    entry per ``_laplacian.chain.chain_laplacian`` call: whether it gave the Laplacian."""
    from torchdiv._laplacian import loop
    from torchdiv._laplacian import methods as _laplacian
    from torchdiv._laplacian.chain import chain_laplacian
    from torchdiv._taylor.cache import PlanCache

    monkeypatch.setattr(_laplacian, "_LOOPS", PlanCache(256))
    monkeypatch.setattr(_laplacian, "loops_for", lambda *_: True)
    calls: list[bool] = []

    def spy(*args):
        out = chain_laplacian(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(loop, "chain_laplacian", spy)
    return calls


def laplacians_by_grad_of_grad(f, x: torch.Tensor) -> torch.Tensor:
    """Every output component's Laplacian by ``laplacian_by_grad_of_grad``, ``(N, m)`` for
    ``f``: ``(N, n) -> (N, m)``."""
    m = f(x[:1]).shape[1]
    return torch.stack(
        [laplacian_by_grad_of_grad(lambda z, i=i: f(z)[:, i], x) for i in range(m)], 1
    )


def answers(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[bool]:
    """One entry per call of ``module.name`` (patched with a spy): whether it answered (not
    ``None``)."""
    calls: list[bool] = []
    original = getattr(module, name)

    def spy(*args):
        out = original(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.fixture
def chain_traced(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """One entry per ``GraphJacobian.trace`` that walked a chain (``_exact.chain.trace``):
    whether the trace came by the chain's cyclicity (``False``: more than two activations)."""
    from torchdiv._exact import autograd

    return answers(monkeypatch, autograd, "chain_trace")


@pytest.fixture
def unit_rows(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """One entry per ``_exact.chain.unit_products`` call from ``GraphJacobian.unit_rows``
    (the diagonal's entries, a block's rows): whether the rows came from the top linear
    step's matrix (no basis)."""
    from torchdiv._exact import autograd

    return answers(monkeypatch, autograd, "unit_products")


def at_least(major: int, minor: int) -> bool:
    """Whether the running torch is release ``major.minor`` or newer (a nightly counts as the
    release it names).

    >>> at_least(2, 0)
    True
    """
    return release(torch.__version__) >= (major, minor)


def torch_from(version: str, reason: str) -> pytest.MarkDecorator:
    """Skip where the running torch is older than ``version``, which brought what the test
    checks (``reason``); the suite pins one torch, other releases run it too (compat-new25).

    >>> torch_from("2.0", "anything").args
    (False,)
    """
    older = not at_least(*map(int, version.split(".")))
    return pytest.mark.skipif(older, reason=f"torch < {version}: {reason}")
