"""Review of the twenty-second session's merges: the module trackers lifted while a call runs
(``_core/modes.py``: ``FlopCounterMode`` in a thread beside a call) and ``log_likelihood``'s
stopped-field check (``flows._stopped``: piecewise-constant fields under grad).

References: a ``FlopCounterMode``'s module breakdown of the same step counted alone; for the
likelihoods, each sample's own ``torchdiffeq`` solve of the field in float64 with
``base_log_prob`` at its end (the divergence of a piecewise-constant field is 0 wherever it
is differentiable), values and parameter gradients."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from torch import nn
from torch.nn.modules import module as nn_module
from torch.utils.flop_counter import FlopCounterMode

import torchdiv
from tests.conftest import (
    assert_close,
    assert_same_parameter_gradients,
    reference_divergence,
    tanh_mlp,
)
from torchdiv.flows import log_likelihood

odeint = pytest.importorskip("torchdiffeq").odeint

f64 = torch.float64
STEP = {"step_size": 0.25}


def _in_thread_call(body) -> None:
    """Run ``body()`` while another thread's ``torchdiv.divergence`` call is inside ``f``."""
    net = tanh_mlp(3, 8, 3)
    inside, go = threading.Event(), threading.Event()

    def f(z: torch.Tensor) -> torch.Tensor:
        inside.set()
        assert go.wait(10)
        return net(z)

    worker = threading.Thread(target=torchdiv.divergence, args=(f, torch.randn(4, 3, dtype=f64)))
    worker.start()
    try:
        assert inside.wait(10)
        body()
    finally:
        go.set()
        worker.join()


def test_a_tracker_that_exits_during_another_thread_s_call_is_not_put_back():
    """A counter exited (its step done) while another thread's call held its hooks lifted:
    the call's end put them back for good, a dead tracker hooking every module (a later plain
    ``autograd.grad`` of a module raised PyTorch's "A leaf node was passed to
    _will_engine_execute_node")."""
    counter = FlopCounterMode(display=False)
    counter.__enter__()
    _in_thread_call(lambda: counter.__exit__(None, None, None))
    assert not nn_module._global_forward_pre_hooks and not nn_module._global_forward_hooks
    net, x = tanh_mlp(3, 8, 3), torch.randn(4, 3, dtype=f64, requires_grad=True)
    torch.autograd.grad(net(x).sum(), x)


def test_another_thread_s_counted_modules_stay_tracked_during_a_call():
    """A counter's step in one thread while another thread's call runs: its module
    breakdown lost the step (the hooks were lifted for every thread)."""
    net, x = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2)), torch.randn(6, 5)
    with FlopCounterMode(display=False) as alone:
        net(x).sum().backward()
    with FlopCounterMode(display=False) as counter:
        _in_thread_call(lambda: net(x).sum().backward())
    want = {name: sum(ops.values()) for name, ops in alone.get_flop_counts().items()}
    got = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    assert got == want


def test_each_counter_s_calls_are_watched_once(watches):
    """The lifted hooks are left out of the structure key: a model is watched once, not at
    the first call in each counter."""
    net, x = tanh_mlp(3, 8, 3), torch.randn(4, 3, dtype=f64)
    torchdiv.divergence(net, x)
    for _ in range(2):
        with FlopCounterMode(display=False):
            torchdiv.divergence(net, x)
            torchdiv.divergence(net, x)
    assert len(watches) == 1


def log_p0(z: torch.Tensor) -> torch.Tensor:
    """The standard normal density, per sample."""
    return -0.5 * z.square().sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


class Stepped(nn.Module):
    """A piecewise-constant velocity made under grad by an op without a derivative (a
    comparison, an integer cast, ``bucketize``, an int8 quantisation), scaled by parameters."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.scale = nn.Parameter(torch.tensor([0.7, -0.4], dtype=f64))
        self.shift = nn.Parameter(torch.tensor([0.2, 0.1], dtype=f64))

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "compare":
            level = (z > 0).to(z.dtype)
        elif self.kind == "where":
            level = torch.where(z > 0.5, 1.0, -1.0).to(z.dtype)
        elif self.kind == "int":
            level = (2 * z).int().to(z.dtype)
        elif self.kind == "bucketize":
            level = torch.bucketize(z, torch.tensor([-1.0, 0.0, 1.0], dtype=z.dtype)).to(z.dtype)
        else:  # quantised to int8 steps of 1/4
            level = (4 * z).to(torch.int8).to(z.dtype) / 4
        return level * self.scale + self.shift * t


@pytest.mark.parametrize("kind", ["compare", "where", "int", "bucketize", "int8"])
def test_a_piecewise_constant_field_is_not_refused(kind):
    """Its divergence is 0 wherever it is differentiable: log p(x) is the base density at
    the transported point. Refused as a no_grad field (every term exactly 0 and the values
    change at z + 1); values and parameter gradients against each sample's own solve."""
    field = Stepped(kind)
    x = torch.tensor([[0.3, -1.2], [1.4, 0.6], [-0.7, 2.1]], dtype=f64)
    ours = log_likelihood(field, x, 0.0, 1.0, log_p0, solver="midpoint", options=STEP)
    times = torch.tensor([1.0, 0.0], dtype=f64)
    alone = [odeint(field, xi[None], times, method="midpoint", options=STEP)[-1] for xi in x]
    reference = log_p0(torch.cat(alone))
    assert_close(ours, reference)
    assert_same_parameter_gradients(field, ours.sum(), reference.sum())


def _under_no_grad(net: nn.Module, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(z)


@torch.inference_mode()
def _under_inference(net: nn.Module, z: torch.Tensor) -> torch.Tensor:
    return net(z)


STOPS = {
    "no_grad": _under_no_grad,
    "inference_mode": _under_inference,
    "detach": lambda net, z: net(z.detach()),
    "data": lambda net, z: net(z.data),
}


@pytest.mark.parametrize("stop", STOPS)
def test_a_stopped_field_is_still_refused(stop):
    """The stops the check looks for (an op on a tensor that requires grad under no_grad or
    inference mode, a read off the graph) are refused as before."""
    net, x = tanh_mlp(2, 8, 2), torch.randn(3, 2, dtype=f64)
    with pytest.raises(ValueError, match="does not depend on z through autograd"):
        log_likelihood(lambda t, z: STOPS[stop](net, z), x, 0.0, 1.0, log_p0, solver="euler")


def _three_sin_steps(z: torch.Tensor) -> torch.Tensor:
    _, y = torch.while_loop(lambda i, y: i < 3, lambda i, y: (i + 1, y.sin()), (torch.tensor(0), z))
    return y


def test_torch_while_loop_s_hint_names_it_and_a_loop_s_way_out():
    """Every method fails inside ``torch.while_loop`` (torch.func's ``KeyError``): the hint
    said "torch.cond (or torch.while_loop)" and gave a branch's way out (``torch.where``).
    The graph forms' first derivatives, which it now names, are right."""
    x = torch.randn(4, 3, dtype=f64)
    with pytest.raises(KeyError) as raised:
        torchdiv.divergence(_three_sin_steps, x)
    hint = str(raised.value).partition("Hint: ")[2]
    assert "f calls torch.while_loop," in hint and "Python loop" in hint
    assert "torch.where" not in hint and "torch.cond" not in hint
    leaf = x.clone().requires_grad_(True)
    ours = torchdiv.graph_divergence(_three_sin_steps(leaf), leaf)
    assert_close(ours, reference_divergence(lambda z: z.sin().sin().sin(), x))
