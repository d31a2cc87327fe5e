"""Adversarial review of optim27's read-only ``parametrize.cached()`` (rev-optim27).

While a torchdiv call runs inside a ``cached()`` block, the cache is read-only and the
weights the call's evaluations compute are kept apart (``_core.modes._ReadOnly``), forgotten
whenever torchdiv puts ``f``'s state back. PyTorch's cache is one for the process: another
thread's plain block, running meanwhile on its own model, wrote its weights into the same
store and lost them at the call's next put-back, so its next forward in the block computed
the weight again (a train-mode spectral norm's power iteration twice in one block: ``u`` 9e-3,
the forward 6e-5 off the same block run alone), silently. The reference: the same block
run by itself (two plain forwards, one power iteration).
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import torchdiv
from tests.conftest import assert_close

f64 = torch.float64
D, B = 4, 5


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, D)).to(f64)
    nn.utils.parametrizations.spectral_norm(net[0])
    return net.train()


@pytest.mark.parametrize("grad", [True, False])
def test_another_thread_s_block_keeps_its_weights_while_a_call_runs(grad: bool):
    """Thread A's ``divergence`` (forward mode in chunks of 1: ``f`` evaluated from one state
    four times; with grad or under ``no_grad``) runs while thread B's block computes its
    model's weight, then reads it again after A put its state back, and once more after A's
    call: B's block is as if run alone (one power iteration, one weight with its graph)."""
    a_net, b_net = _model(), _model()
    alone = copy.deepcopy(b_net)
    x = torch.randn(B, D, dtype=f64, generator=torch.Generator().manual_seed(1))
    evaluated, b_read, put_back = threading.Event(), threading.Event(), threading.Event()
    a_done, b_done = threading.Event(), threading.Event()
    count, out, errors = [0], {}, []

    def f(z: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        if count[0] == 2:  # (the first evaluation complete, the second under way)
            evaluated.set()
            b_read.wait(10)
        if count[0] == 3:  # (the state put back for the third)
            put_back.set()
        return a_net(z)

    def thread_a() -> None:
        try:
            with parametrize.cached(), torch.set_grad_enabled(grad):
                torchdiv.divergence(f, x, method="forward", chunk_size=1)
                a_done.set()
                b_done.wait(10)  # (B's block still open: A's block leaves the cache)
        except BaseException as e:  # (reported below)
            errors.append(e)
            put_back.set()
            a_done.set()

    def thread_b() -> None:
        evaluated.wait(10)
        with parametrize.cached():
            out["first"] = b_net(x)
            b_read.set()
            put_back.wait(10)
            out["second"] = b_net(x)
            a_done.wait(10)
            out["third"] = b_net(x)
            b_done.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert count[0] >= 3
    with parametrize.cached():
        first, second, third = alone(x), alone(x), alone(x)
        want = torch.autograd.grad(third.sum(), list(alone.parameters()))
    assert_close(out["first"], first)  # (float64: a handful of flops)
    assert_close(out["second"], second)
    assert_close(out["third"], third)
    got = torch.autograd.grad(out["third"].sum(), list(b_net.parameters()))
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)
    for name, buffer in alone.named_buffers():
        assert torch.equal(b_net.get_buffer(name), buffer), name  # one power iteration
