"""A lack of memory propagates from every engine, for the caller to take smaller chunks.

``torchdiv._core.checks.out_of_memory`` names two kinds: CUDA's ``torch.OutOfMemoryError`` and
the CPU allocator's ``RuntimeError`` ("DefaultCPUAllocator: can't allocate memory"). Engines
that fall back where an op cannot be run (the structured engine to columns, the Taylor engine
to forward over reverse) caught the CPU kind as "cannot run": the call went on with an engine
that needs more memory, where the documentation promises the error. Simulated here: a CPU
machine cannot be made to run out of memory in a test.
"""

from __future__ import annotations

import pytest
import torch

import torchdiv
import torchdiv._structured as structured
from torchdiv._api import second_order
from torchdiv._laplacian import loop, methods

CPU = "[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you "
CPU += "tried to allocate 123 bytes. Error code 12 (Cannot allocate memory)"
LACK = r"allocate memory|out of memory"  # the two kinds' messages


def _lack(kind):
    return RuntimeError(CPU) if kind == "cpu" else torch.OutOfMemoryError("CUDA out of memory.")


class SecondBackwardFails(torch.autograd.Function):
    """tanh whose backward passes after the first run out of memory."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        y = x.tanh()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        SecondBackwardFails.calls += 1
        if SecondBackwardFails.calls > 1:
            raise RuntimeError(CPU)
        (y,) = ctx.saved_tensors
        return grad * (1 - y**2)


def test_a_lack_of_memory_in_a_later_backward_pass_is_not_a_spent_graph():
    """Plain autograd's rows (two, one backward pass each): the second pass's lack of memory
    was reported as "the graph of f(x) cannot be walked twice" (``GraphSpent``), which only
    CUDA's kind escaped."""
    SecondBackwardFails.calls = 0
    x = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="can't allocate memory") as raised:
        torchdiv.divergence(SecondBackwardFails.apply, x)
    assert "walked twice" not in str(raised.value)


def _mlp(d_in: int, d_out: int) -> torch.nn.Module:
    net = torch.nn.Sequential(torch.nn.Linear(d_in, 8), torch.nn.Tanh(), torch.nn.Linear(8, d_out))
    return net.requires_grad_(False)


ENGINES = {  # where each engine starts, and a call "auto" sends there (batches not tiny)
    "structured": (structured, "values", lambda: torchdiv.divergence(_mlp(16, 16), X16)),
    "taylor laplacian": (methods, "collapsed", lambda: torchdiv.laplacian(_mlp(4, 1), X4)),
    "value_grad_laplacian": (
        second_order,
        "_sweep",
        lambda: torchdiv.value_grad_laplacian(_mlp(4, 1), X4),
    ),
}
X16, X4 = torch.randn(64, 16), torch.randn(64, 4)


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
@pytest.mark.parametrize("engine", list(ENGINES))
def test_an_engine_lets_a_lack_of_memory_through(monkeypatch, engine, kind):
    """The structured engine (f's recorded values, its first step), the Taylor Laplacian and
    value_grad_laplacian's sweep, each run out of memory: the error, not another engine."""
    module, name, call = ENGINES[engine]

    def lacking(*args, **kwargs):
        raise _lack(kind)

    monkeypatch.setattr(module, name, lacking)
    with pytest.raises(RuntimeError, match=LACK):
        call()


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_the_laplacian_loops_batched_passes_let_a_lack_of_memory_through(kind, monkeypatch):
    """ "auto" loops over backward passes at two inputs and batches the second-level passes of
    small nets, taking them one by one where that pass cannot be batched: a lack of memory is
    not such a pass. (A GELU net: a tanh chain's Laplacian runs no backward pass,
    ``_laplacian/chain.py``; the call that decides to loop runs the Taylor engine from its
    recording, so the loop starts at the second call.)"""

    def batched(*args, **kwargs):  # the batched pass (the engine under PyTorch's batching)
        raise _lack(kind)

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    net = net.double()
    x = torch.randn(8, 2, dtype=torch.float64)
    torchdiv.laplacian(net, x)
    monkeypatch.setattr(loop, "batched_vjp", batched)
    with pytest.raises(RuntimeError, match=LACK):
        torchdiv.laplacian(net, x)
