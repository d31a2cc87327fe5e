"""Module utilities that change a module between calls, in training loops (optim27).

``torch.nn.utils.parametrize.cached()`` computes each parametrized weight once per block and
reuses it: a training step that runs the model's forward (its data loss) and then a torchdiv
regulariser inside one block differentiates one weight. torchdiv turned the cache off while
it evaluated ``f`` (a weight first cached inside its ``torch.func`` transforms was a dead
wrapper to the next evaluation), so ``f`` computed its weights afresh: with a train-mode
``parametrizations.spectral_norm`` that ran the power iteration once more per call, moved
``u``, ``v`` again and differentiated another weight than the block's, silently (divergence
8e-7, parameter gradients 2e-5, the vectors 2e-3 off the same step written with plain
autograd, at initialisation; more as the weights move). The cache is now read, not written,
while torchdiv evaluates ``f``: the block's weights as they were before the call. The
reference: the same step by per-sample ``torch.autograd.grad`` loops (float64).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import torchdiv
from tests.conftest import assert_close, laplacian_by_grad_of_grad, loop_diagonal

f64 = torch.float64
D, B = 4, 5


def _model(scalar: bool = False) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1 if scalar else D)
    ).to(f64)
    nn.utils.parametrizations.spectral_norm(net[0])
    nn.utils.parametrizations.spectral_norm(net[2])
    return net.train()


def _divergence(f, x: torch.Tensor) -> torch.Tensor:
    return loop_diagonal(f, x, create_graph=True).sum(-1)


CASES = {
    "divergence-auto": (False, lambda f, x: torchdiv.divergence(f, x), _divergence),
    "divergence-forward": (
        False,
        lambda f, x: torchdiv.divergence(f, x, method="forward", chunk_size=2),
        _divergence,
    ),
    "divergence-reverse": (
        False,
        lambda f, x: torchdiv.divergence(f, x, method="reverse"),
        _divergence,
    ),
    "diagonal": (
        False,
        lambda f, x: torchdiv.jacobian_diagonal(f, x).square().sum(-1),
        lambda f, x: loop_diagonal(f, x, create_graph=True).square().sum(-1),
    ),
    "laplacian-auto": (
        True,
        lambda f, x: torchdiv.laplacian(lambda z: f(z)[:, 0], x),
        lambda f, x: laplacian_by_grad_of_grad(lambda z: f(z)[:, 0], x),
    ),
    "laplacian-forward-over-reverse": (
        True,
        lambda f, x: torchdiv.laplacian(
            lambda z: f(z)[:, 0], x, method="forward-over-reverse", chunk_size=1
        ),
        lambda f, x: laplacian_by_grad_of_grad(lambda z: f(z)[:, 0], x),
    ),
}


def _step(case: str, ours: bool) -> tuple[torch.Tensor, list[torch.Tensor], dict]:
    """One training step inside ``parametrize.cached()``: the data loss's forward first, then
    the operator; its values, the parameter gradients of the loss and the buffers after."""
    scalar, call, reference = CASES[case]
    net = _model(scalar)
    x = torch.randn(B, D, dtype=f64, generator=torch.Generator().manual_seed(1))
    with parametrize.cached():
        y = net(x)
        value = (call if ours else reference)(net, x)
        loss = value.square().sum() + y.square().sum()
        grads = torch.autograd.grad(loss, list(net.parameters()))
    return value.detach(), list(grads), {k: v.clone() for k, v in net.named_buffers()}


@pytest.mark.parametrize("case", list(CASES))
def test_a_cached_block_s_weight_is_the_operator_s(case: str):
    value, grads, buffers = _step(case, ours=True)
    want, want_grads, want_buffers = _step(case, ours=False)
    assert_close(value, want)  # (float64: a few hundred flops deep)
    for a, b in zip(grads, want_grads, strict=True):
        assert_close(a, b)
    for name, buffer in want_buffers.items():
        assert torch.equal(buffers[name], buffer), name  # one power iteration: the forward's


def test_the_cache_is_left_as_the_call_found_it():
    """The entries from before the call stay, none is a transform's wrapper, and the block's
    count is its own."""
    net = _model()
    x = torch.randn(B, D, dtype=f64)
    with parametrize.cached():
        net(x)
        before = dict(parametrize._cache)
        torchdiv.divergence(net, x, method="forward", chunk_size=1)
        assert parametrize._cache == before
        assert all(type(t) is torch.Tensor for t in parametrize._cache.values())
        assert parametrize._cache_enabled == 1
    assert parametrize._cache_enabled == 0 and not parametrize._cache


def _step_first(case: str, ours: bool) -> tuple[torch.Tensor, torch.Tensor, list, dict]:
    """The operator first, then the data loss's forward, inside one block: the forward reads
    the weight the call computed (one power iteration in the block), as in plain code."""
    scalar, call, reference = CASES[case]
    net = _model(scalar)
    x = torch.randn(B, D, dtype=f64, generator=torch.Generator().manual_seed(1))
    with parametrize.cached():
        value = (call if ours else reference)(net, x)
        y = net(x)
        loss = value.square().sum() + y.square().sum()
        grads = torch.autograd.grad(loss, list(net.parameters()))
    return value.detach(), y.detach(), list(grads), {k: v.clone() for k, v in net.named_buffers()}


@pytest.mark.parametrize("case", list(CASES))
def test_the_weight_the_call_computed_is_the_block_s(case: str):
    value, y, grads, buffers = _step_first(case, ours=True)
    want, y_want, want_grads, want_buffers = _step_first(case, ours=False)
    assert_close(value, want)
    assert_close(y, y_want)
    for a, b in zip(grads, want_grads, strict=True):
        assert_close(a, b)
    for name, buffer in want_buffers.items():
        assert torch.equal(buffers[name], buffer), name


def test_a_weight_cached_by_a_call_under_no_grad_is_detached():
    """As a plain forward under ``no_grad`` caches it: no graph."""
    net = _model()
    x = torch.randn(B, D, dtype=f64)
    with parametrize.cached():
        with torch.no_grad():
            torchdiv.divergence(net, x)
        assert parametrize._cache and not any(t.requires_grad for t in parametrize._cache.values())


def test_a_check_caches_no_weight_its_state_contradicts():
    """``check_batch_independence`` puts ``f``'s state back (the vectors as before): the
    block's next forward runs the power iteration itself, as after no call at all."""
    net, once = _model(), _model()
    x = torch.randn(B, D, dtype=f64)
    with parametrize.cached():
        torchdiv.check_batch_independence(net, x)
        y = net(x)
    with parametrize.cached():
        y_want = once(x)
    assert_close(y, y_want)
    for name, buffer in once.named_buffers():
        assert torch.equal(net.get_buffer(name), buffer), name


class _Recurrent(nn.Module):
    """A recurrent cell whose recurrent weight has a train-mode spectral norm, applied three
    times inside its own ``cached()`` block (the weight, and its power iteration, once per
    forward), as RNNs with parametrized weights are written."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.rec, self.out = nn.Linear(D, 8), nn.Linear(8, 8, bias=False), nn.Linear(8, D)
        nn.utils.parametrizations.spectral_norm(self.rec)
        self.to(f64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with parametrize.cached():
            h = torch.tanh(self.inp(x))
            for _ in range(3):
                h = torch.tanh(self.rec(h) + self.inp(x))
            return self.out(h)


@pytest.mark.parametrize("case", ["divergence-auto", "divergence-forward", "divergence-reverse"])
@pytest.mark.parametrize("first", [True, False])
def test_f_s_own_cached_block_inside_the_caller_s(case: str, first: bool):
    """``f``'s own block inside the caller's: each evaluation computes the recurrent weight
    once and reads it at every step (with the writes dropped, every step ran the power
    iteration again; with the cache off, as before optim27, the block's forward and the
    call computed two weights: 5e-3 off in the parameters after four Adam steps)."""
    _, call, reference = CASES[case]
    x = torch.randn(B, D, dtype=f64, generator=torch.Generator().manual_seed(1))
    out = []
    for operator in (call, reference):
        net = _Recurrent()
        with parametrize.cached():
            y = net(x) if first else None
            value = operator(net, x)
            y = net(x) if y is None else y
            loss = value.square().sum() + y.square().sum()
            grads = torch.autograd.grad(loss, list(net.parameters()))
        out.append((value.detach(), grads, {k: v.clone() for k, v in net.named_buffers()}))
    (value, grads, buffers), (want, want_grads, want_buffers) = out
    assert_close(value, want)
    for a, b in zip(grads, want_grads, strict=True):
        assert_close(a, b)
    for name, buffer in want_buffers.items():
        assert torch.equal(buffers[name], buffer), name
