"""torchdiv called from several Python threads at once (a server's request threads, a
data-loading thread): each call right, none failing for another thread's state. References:
per-sample ``autograd.grad`` rows in float64."""

from __future__ import annotations

import sys
import threading
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
