"""torchdiv called from several Python threads at once (a server's request threads, a
data-loading thread): each call right, none failing for another thread's state. References:
per-sample ``autograd.grad`` rows in float64."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch

import torchdiv
from torchdiv._taylor.cache import PlanCache


@pytest.fixture
def frequent_switches() -> Iterator[None]:
    """Threads switched every microsecond (the interpreter's default is 5 ms): the races
    below then show within a few calls."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def _in_threads(work: Callable[[int], None], count: int) -> list[BaseException]:
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as error:  # reported by the test, not lost in the thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    return errors


def _divergence(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Sum over ``i`` of entry ``(i, i)`` of every sample's Jacobian, by ``autograd.grad`` rows."""
    z = x.detach().requires_grad_(True)
    y = f(z)
    rows = [torch.autograd.grad(y[:, i].sum(), z, retain_graph=True)[0][:, i] for i in range(3)]
    return torch.stack(rows, 1).sum(1)


def _laplacian(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Of output 0: the divergence of its gradient, by grad of grad."""

    def gradient(z: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(f(z)[:, 0].sum(), z, create_graph=True)[0]

    return _divergence(gradient, x).detach()


CALLS = {
    "divergence-forward": (lambda f, x: torchdiv.divergence(f, x, method="forward"), _divergence),
    "laplacian-hessian": (
        lambda f, x: torchdiv.laplacian(lambda z: f(z)[:, :1], x, method="hessian")[:, 0],
        _laplacian,
    ),
}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("shared", [False, True], ids=["own-models", "one-model"])
def test_forward_mode_in_threads(call: str, shared: bool, frequent_switches: None) -> None:
    """``torch.func.jvp`` counts its nesting, and forward AD its dual levels, for the process:
    a second thread's push found no level ("no level exists") and failed."""
    torch.manual_seed(0)
    nets = [
        torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        for _ in range(3)
    ]
    x = torch.randn(5, 3, dtype=torch.float64)
    operator, reference = CALLS[call]
    expected = [reference(net, x) for net in nets]

    def work(i: int) -> None:
        k = 0 if shared else i
        for _ in range(10):
            torch.testing.assert_close(operator(nets[k], x), expected[k], rtol=1e-12, atol=1e-12)

    assert _in_threads(work, 3) == []


def test_plan_cache_in_threads(frequent_switches: None) -> None:
    """A look-up moved its entry to the end after another thread had evicted it: KeyError."""
    cache = PlanCache(2)
    sites = [torch.nn.Identity() for _ in range(3)]

    def work(i: int) -> None:
        for j in range(5000):
            site, key = sites[(i + j) % 3], j % 5
            cache.put(site, key, (id(site), key))
            assert cache.get(site, (j + i) % 5) in (None, (id(site), (j + i) % 5))

    assert _in_threads(work, 3) == []


def _attention_settings() -> tuple[bool, ...]:
    cuda = torch.backends.cuda
    return (
        cuda.flash_sdp_enabled(),
        cuda.mem_efficient_sdp_enabled(),
        cuda.math_sdp_enabled(),
        cuda.cudnn_sdp_enabled(),
        torch.backends.mha.get_fastpath_enabled(),
    )


def test_attention_settings_are_put_back_after_threads(frequent_switches: None) -> None:
    """Attention runs on the math backend while torchdiv evaluates ``f``; the backends are
    process-wide flags, which each call's ``sdpa_kernel`` put back as it had found them: calls
    in threads that left out of order left the fused kernels off for the rest of the process
    (flash attention on a GPU). Each result is checked against ``autograd.grad`` rows."""
    torch.manual_seed(0)
    q, k, v = (torch.nn.Linear(4, 4).double() for _ in range(3))

    def attention(z: torch.Tensor) -> torch.Tensor:  # within each sample: (B, 3, 4)
        return torch.nn.functional.scaled_dot_product_attention(q(z), k(z), v(z)).flatten(1)

    x = torch.randn(2, 3, 4, dtype=torch.float64)
    z = x.detach().requires_grad_(True)
    y = attention(z)
    rows = [torch.autograd.grad(y[:, i].sum(), z, retain_graph=True)[0] for i in range(12)]
    expected = sum(row.flatten(1)[:, i] for i, row in enumerate(rows))
    before = _attention_settings()

    def work(i: int) -> None:
        for method in ("forward", "reverse") * 10:
            got = torchdiv.divergence(lambda z: attention(z).view(z.shape), x, method=method)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)

    assert _in_threads(work, 4) == []
    assert _attention_settings() == before


def _forked(work: Callable[[], float], timeout: float = 60.0) -> float | None:
    """``work()`` in a forked child (one intra-op thread: GNU OpenMP hangs in a child whose
    parent ran parallel regions), its result, or ``None`` if the child did not finish in
    ``timeout`` seconds (killed) or failed."""
    read, write = os.pipe()
    with warnings.catch_warnings():  # (3.12+: fork in a process with threads)
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            torch.set_num_threads(1)
            os.write(write, repr(work()).encode())
        finally:
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + timeout
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        time.sleep(0.05)
    with os.fdopen(read) as pipe:
        out = pipe.read()
    return float(out) if out else None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX's")
def test_a_process_forked_while_a_thread_pushes_tangents_runs_forward_mode() -> None:
    """Forked while another thread was inside a forward-mode call (holding the lock that
    keeps threads' pushes apart), the child's own forward-mode call waited for a thread that
    does not exist there."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.randn(4, 3, dtype=torch.float64)
    net.double()
    inside, forked = threading.Event(), threading.Event()

    def held(z: torch.Tensor) -> torch.Tensor:
        inside.set()
        forked.wait(60)
        return net(z)

    def _error(got: torch.Tensor) -> torch.Tensor:
        return (got - _divergence(net, x)).abs().max().detach()

    thread = threading.Thread(target=lambda: torchdiv.divergence(held, x, method="forward"))
    thread.start()
    try:
        assert inside.wait(60)
        error = _forked(lambda: float(_error(torchdiv.divergence(net, x, method="forward"))), 30)
    finally:
        forked.set()
        thread.join(60)
    assert error is not None and error < 1e-12
