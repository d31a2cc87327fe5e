"""Bounded memory, measured: peak and retained bytes of CPU tensors around torchdiv calls.

The tracker (``_tracked``) reads the profiler's memory events (``profile_memory=True``): every
allocation and free of PyTorch's CPU allocator carries the running total of bytes allocated,
so the peak above the start, and what is still allocated at the end (``retained``: allocated
inside, not freed inside), are exact byte counts, deterministic on one thread. It is checked
first on allocations of known sizes.

Found (memory34): ``Unwritten``'s copy-on-write backup of the caller's ``x``
(``torch._lazy_clone``) makes x's whole *storage* copy-on-write, and the recorders read
storage addresses with ``untyped_storage().data_ptr()``, which asks for write access and so
materialises it: every ``"auto"``/``"structured"``/``"taylor"`` call copied all of x's storage,
for ``x = data[:B]`` a whole dataset (10 MiB for a 4 KiB batch here, 17 ms for 0.6 ms), and
moved the caller's tensors to the copy. Now read by ``_core.checks.storage_address``.
"""

from __future__ import annotations

import functools
import gc
import json
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

import torchdiv
from torchdiv._bench.memory import _stderr_silenced


def _events(body: Callable[[], None]) -> list[dict[str, Any]]:
    with (
        _stderr_silenced(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        body()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        return json.loads(trace.read_text())["traceEvents"]


def _running(events: list[dict[str, Any]]) -> list[tuple[float, int]]:
    """``(time, bytes)`` after each allocator event: the bytes allocated inside the profile
    and not yet freed. A free of memory allocated before the profile (an earlier test's
    tensor collected now) is left out: it is no part of what the profiled code holds."""
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    inside: dict[int, int] = {}
    total, out = 0, []
    for m in memory:
        address, size = m["args"]["Addr"], m["args"]["Bytes"]
        if size > 0:
            inside[address] = size
            total += size
        elif address in inside:
            total -= inside.pop(address)
        out.append((m["ts"], total))
    return out


def _tracked(fn: Callable[[], Any]) -> tuple[int, int]:
    """``(peak, retained)`` bytes of tensors allocated while ``fn`` ran (its result dropped
    inside): the most live at once, and those still live at the end."""

    def body() -> None:
        out = fn()
        del out
        gc.collect()

    running = _running(_events(body))
    if not running:
        return 0, 0
    return max(b for _, b in running), running[-1][1]


def _live_after_steps(step: Callable[[], None], n: int) -> list[int]:
    """Bytes allocated inside one profile of ``n`` calls of ``step`` and still live after
    each call (read at the end of each call's ``record_function`` range)."""

    def body() -> None:
        for i in range(n):
            with record_function(f"memstep{i}"):
                step()
                gc.collect()

    events = _events(body)
    running = _running(events)
    ends = sorted(
        e["ts"] + e["dur"] for e in events if str(e.get("name", "")).startswith("memstep")
    )
    return [[b for ts, b in running if ts <= end][-1] for end in ends]


def test_the_tracker_counts_known_allocations():
    """1 MiB made and dropped: peak 1 MiB, nothing retained; kept: retained; 1 MiB and 1/2 MiB
    live together, then 1/4 MiB after the 1 MiB is freed: peak 1.5 MiB."""
    kept: list[torch.Tensor] = []
    mib = 2**20
    assert _tracked(lambda: kept.clear()) == (0, 0)  # (nothing allocated: a free left out)
    assert _tracked(lambda: torch.empty(mib, dtype=torch.uint8)) == (mib, 0)
    assert _tracked(lambda: kept.append(torch.empty(mib, dtype=torch.uint8))) == (mib, mib)

    def overlapping() -> torch.Tensor:
        a = torch.empty(mib, dtype=torch.uint8)
        b = torch.empty(mib // 2, dtype=torch.uint8)
        del a
        return torch.empty(mib // 4, dtype=torch.uint8) + b[: mib // 4]

    assert _tracked(overlapping) == (mib + mib // 2, 0)  # then 1/2 + 2 x 1/4
    steps = iter(range(3))

    def step() -> None:
        kept.append(torch.empty(mib * next(steps) + 8, dtype=torch.float64))

    assert _live_after_steps(step, 3) == [
        8 * 8,
        8 * (2 * 8 + mib),
        8 * (3 * 8 + 3 * mib),
    ]
    kept.clear()


D, H = 64, 16


def _mlp(out: int) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, out))
    return net.double().requires_grad_(False)


SLICE_CASES = [
    ("divergence", "auto"),
    ("divergence", "structured"),
    ("divergence", "forward"),
    ("jacobian_diagonal", "auto"),
    ("jacobian_diagonal", "structured"),
    ("laplacian", "auto"),
    ("laplacian", "taylor"),
    ("laplacian", "forward-over-reverse"),
]


@pytest.mark.parametrize(("op", "method"), SLICE_CASES)
def test_a_batch_sliced_from_a_dataset_is_not_copied_whole(op, method):
    """``x = data[:8]`` of a 10 MiB dataset tensor: the recorders' storage reads made the
    copy-on-write backup copy all 10 MiB at every call (measured peak 10.0 MiB, the dataset
    moved to a new address). Bound: the whole per-sample Jacobian, ``8 * 64 * 64 * 8`` bytes
    = 256 KiB, times 4.5 (the unchunked forward-mode engines hold its products, tangents and
    the basis, 4.3x measured for ``"forward"``: 1.1 MiB) = 1.125 MiB, a ninth of the
    dataset; the recording engines measured 10-60 KiB."""
    data = torch.randn(20_000, D, dtype=torch.float64)  # 10 MiB
    x = data[:8]
    net = _mlp(1 if op == "laplacian" else D)
    f = (lambda z: net(z).squeeze(-1)) if op == "laplacian" else net
    call = getattr(torchdiv, op)
    call(f, x, method=method)  # (first calls keep their plans)
    address = data.const_data_ptr()
    peak, retained = _tracked(lambda: call(f, x, method=method))
    assert peak < 4.5 * 8 * D * D * 8, (peak, data.nbytes)
    assert retained == 0
    assert data.const_data_ptr() == address  # the caller's tensor stays where it was


def test_the_caller_x_keeps_its_memory():
    """The caller's own ``x`` (not a slice) was moved to a copy at every recorded call."""
    x = torch.randn(8, D, dtype=torch.float64)
    net = _mlp(D)
    address = x.const_data_ptr()
    torchdiv.divergence(net, x)
    torchdiv.jacobian_diagonal(net, x, method="structured")
    torchdiv.laplacian(lambda z: net(z)[:, 0], x)
    assert x.const_data_ptr() == address


def test_a_write_into_x_is_still_put_back():
    """The backup still restores ``x`` (``Unwritten``) when ``f`` writes into it."""
    data = torch.randn(100, 4, dtype=torch.float64)
    x = data[:3]
    want = data.clone()

    def f(z: torch.Tensor) -> torch.Tensor:
        z.mul_(2)
        return z.sin()

    with pytest.raises(ValueError, match="writes into its input"):
        torchdiv.divergence(f, x, method="auto")
    torch.testing.assert_close(data, want, rtol=0, atol=0)


CHUNKED = [
    ("divergence", "forward"),
    ("divergence", "reverse"),
    ("jacobian_diagonal", "forward"),
    ("jacobian_diagonal", "reverse"),
    ("laplacian", "taylor"),
    ("laplacian", "forward-over-reverse"),
]


@pytest.mark.parametrize(("op", "method"), CHUNKED)
def test_chunk_size_bounds_the_peak_and_the_batch_scales_it_linearly(op, method):
    """An MLP with event 64, batch 8 and ``chunk_size=4``: at most 4 products in flight, one
    chunk's products ``4 * 8 * 64 * 8`` = 16 KiB; the peak must stay under 8 chunks (128 KiB,
    half the per-sample Jacobian's 256 KiB; measured 1.0-6.3 chunks). Four times the batch
    must cost at most ~4x (measured 2.6-4.0x): no ``(B, out, B, in)`` tensor (16x)."""
    k, batch = 4, 8
    net = _mlp(1 if op == "laplacian" else D)
    f = (lambda z: net(z).squeeze(-1)) if op == "laplacian" else net
    call = getattr(torchdiv, op)

    def peak(n: int) -> int:
        x = torch.randn(n, D, dtype=torch.float64)
        call(f, x, method=method, chunk_size=k)
        return _tracked(lambda: call(f, x, method=method, chunk_size=k))[0]

    small, large = peak(batch), peak(4 * batch)
    assert small < 8 * k * batch * D * 8, small
    assert large < 4.5 * small, (small, large)


def _cnf_step(method: str, chunk: int | None) -> Callable[[], None]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(9, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    net = net.double()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)

    def step() -> None:
        x = torch.randn(32, 8, dtype=torch.float64)
        t = torch.rand((), dtype=torch.float64)

        def f(z: torch.Tensor) -> torch.Tensor:  # a new closure at every step, as in a solve
            return net(torch.cat([z, t.expand(z.shape[0], 1)], -1))

        extra = {"num_probes": 4} if method == "hutchinson" else {}
        div = torchdiv.divergence(f, x, method=method, chunk_size=chunk, **extra)
        loss = (f(x).square().sum(-1) + div).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def _pinn_step(method: str, chunk: int | None) -> Callable[[], None]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh()
    )
    net.append(torch.nn.Linear(32, 1))
    net = net.double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step() -> None:
        x = torch.randn(32, 8, dtype=torch.float64)
        extra = {"num_probes": 4} if method == "hutchinson" else {}
        lap = torchdiv.laplacian(
            lambda z: net(z).squeeze(-1), x, method=method, chunk_size=chunk, **extra
        )
        loss = (lap + 1).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


TRAINING = [
    *[("cnf", m) for m in ("auto", "forward", "reverse", "structured", "hutchinson")],
    *[("pinn", m) for m in ("auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad")],
    ("pinn", "hutchinson"),
]


def _steady(live: list[int]) -> None:
    """Plans, recordings and optimiser state are made in the first steps and kept in bounded
    caches (the structured replay's ~100 KiB by step 10); from then on nothing may grow."""
    assert max(live[len(live) // 2 :]) == live[len(live) // 2], live


@pytest.mark.parametrize(("stack", "method"), [("cnf", "auto"), ("pinn", "auto")])
def test_training_steps_keep_live_memory_flat(stack, method):
    make = _cnf_step if stack == "cnf" else _pinn_step
    _steady(_live_after_steps(make(method, 3), 16))


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize(("stack", "method"), TRAINING)
def test_fifty_training_steps_keep_live_memory_flat(stack, method, chunk):
    make = _cnf_step if stack == "cnf" else _pinn_step
    _steady(_live_after_steps(make(method, chunk), 50))


def _first_output(net: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    return net(z)[:, 0]


@pytest.mark.parametrize(
    ("op", "method"),
    [
        ("divergence", m)
        for m in ("auto", "forward", "reverse", "structured", "hutchinson", "hutch++")
    ]
    + [("laplacian", m) for m in ("auto", "taylor", "forward-over-reverse", "grad-of-grad")],
)
def test_nothing_outlives_the_call(op, method):
    """Weak references to ``x``, the model and the result (with a graph, in training) die
    once the caller drops them: no cache holds a tensor or a module."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5))
    net = net.double()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    extra = {"num_probes": 6} if method in ("hutchinson", "hutch++") else {}
    if op == "laplacian":
        u = functools.partial(_first_output, net)
        out = torchdiv.laplacian(u, x, method=method, **extra)
        del u
    else:
        out = torchdiv.divergence(net, x, method=method, chunk_size=2, **extra)
    out.sum().backward()
    refs = [weakref.ref(x), weakref.ref(net), weakref.ref(out), weakref.ref(net[0].weight)]
    del x, net, out
    gc.collect()
    assert [r() is None for r in refs] == [True] * 4
