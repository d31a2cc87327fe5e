"""rev-late32, part 2: late review of rev-compile32's changes to torchdiv's compiled call.

- An error of one thread's compiled call (here: PyTorch's own "Nested forward mode AD"
  error, raised where another thread's compiled forward-mode graph held the process's one
  forward-AD level) exited that level: the other thread's call, right before
  rev-compile32, then raised PyTorch's internal ``TypeError`` (``_unwrap_for_grad``).

References: float64 per-sample loops of ``torch.autograd.grad`` on the eager model (the
divergence from each sample's Jacobian rows). Threads ordered by events: a backend running
the captured graph under a ``TorchFunctionMode`` that pauses at ``torch.tanh``."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

import torchdiv

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning")]

f64 = torch.float64
# float64 throughout, terms O(1): forward mode against autograd loops agrees to ~1e-13
TOL = {"rtol": 1e-9, "atol": 1e-10}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import torch._dynamo.eval_frame as frames

    stance = frames._stance
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    frames._stance = stance


def _divergence(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Each sample's divergence by its Jacobian rows (``autograd.grad``)."""
    out = []
    for i in range(len(x)):
        leaf = x[i : i + 1].detach().requires_grad_(True)
        y = net(leaf)
        rows = [torch.autograd.grad(y[0, j], leaf, retain_graph=True)[0][0, j] for j in range(3)]
        out.append(torch.stack(rows).sum())
    return torch.stack(out)


class _Pause(TorchFunctionMode):
    """Signals ``paused`` and waits for ``resume`` at ``torch.tanh`` while ``armed``."""

    armed = False
    paused = threading.Event()
    resume = threading.Event()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if _Pause.armed and func is torch.tanh:
            _Pause.armed = False
            _Pause.paused.set()
            _Pause.resume.wait(30)
        return func(*args, **(kwargs or {}))


def _pausing(gm: torch.fx.GraphModule, example: list[torch.Tensor]) -> Any:
    """A backend running the captured graph under ``_Pause``."""

    def run(*args: torch.Tensor) -> Any:
        with _Pause():
            return gm.forward(*args)

    return run


def _plain(gm: torch.fx.GraphModule, example: list[torch.Tensor]) -> Any:
    return gm.forward


def _layer() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh()).double()


def test_another_thread_s_failed_forward_call_leaves_the_running_one_s_level():
    """Fails without the fix: thread A's compiled forward-mode call holds the forward-AD level
    (entered by its graph); thread B's compiled forward-mode call cannot enter another
    (PyTorch's "Nested forward mode AD" error, rightly raised) and its ``put_back`` exited
    A's level: A raised ``TypeError`` from PyTorch's internals. Now B's error leaves it:
    A's divergence is right, and the process has no level left open after."""
    torch.manual_seed(0)
    net_a, net_b = _layer(), _layer()
    model_a = torch.compile(net_a, backend=_pausing)
    model_b = torch.compile(net_b, backend=_plain)
    x = torch.randn(4, 3, dtype=f64)
    want = _divergence(net_a, x)
    torch.testing.assert_close(torchdiv.divergence(model_a, x, method="forward"), want, **TOL)
    torchdiv.divergence(model_b, x, method="forward")  # (compiled before the threads)
    got: dict[str, Any] = {}

    def run_a() -> None:
        try:
            got["a"] = torchdiv.divergence(model_a, x, method="forward")
        except Exception as error:  # (reported below)
            got["a"] = error

    _Pause.paused.clear()
    _Pause.resume.clear()
    _Pause.armed = True
    thread = threading.Thread(target=run_a)
    thread.start()
    try:
        assert _Pause.paused.wait(30)
        with pytest.raises(RuntimeError, match="Nested forward mode AD"):
            torchdiv.divergence(model_b, x, method="forward")
    finally:
        _Pause.armed = False
        _Pause.resume.set()
        thread.join(30)
    assert isinstance(got["a"], torch.Tensor), got["a"]
    torch.testing.assert_close(got["a"], want, **TOL)
    with torch.autograd.forward_ad.dual_level():  # (none left open)
        pass
