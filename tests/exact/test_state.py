"""A stateful ``f`` (a buffer written in place, a train-mode dropout) evaluated more than once
by one call (forward mode once per chunk of directions, the check of an empty event): every
evaluation computes the function of the first (``_exact.state.Once``), and the state changes
once. References: the function frozen at one plain evaluation (``conftest.one_state``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    LegacyCube,
    Stateful,
    assert_close,
    assert_one_state,
    loop_diagonal,
    one_state,
    reference_diagonal,
    reference_jacobian,
)

import torchdiv
from torchdiv._exact import plan as _plan

f64 = torch.float64


@pytest.mark.parametrize("chunk_size", [None, 1, 2])
@pytest.mark.parametrize("operator", ["divergence", "jacobian_diagonal", "jacobian"])
def test_forward_mode_in_chunks_differentiates_one_evaluation(operator, chunk_size):
    """Without ``Once`` every chunk of JVPs saw another ``u`` and mask (1e-2-1 off), and the
    buffer moved once per chunk; with several tangents a chunk raised vmap's randomness
    error."""
    net, x = Stateful(4, 4), torch.randn(3, 4, dtype=f64)
    once, state = one_state(net, x, seed=5)
    torch.manual_seed(5)
    got = getattr(torchdiv, operator)(net, x, method="forward", chunk_size=chunk_size)
    reference = {"jacobian": reference_jacobian, "jacobian_diagonal": reference_diagonal}
    expected = reference.get(operator, reference_diagonal)(once, x)
    assert_close(got, expected.sum(-1) if operator == "divergence" else expected)
    assert_one_state(net, once, state)


@pytest.mark.parametrize(
    "draw",
    [
        lambda h: F.dropout(h, 0.5, training=True),
        lambda h: F.alpha_dropout(h, 0.5, training=True),
        lambda h: h * torch.bernoulli(torch.full_like(h, 0.3)),
        lambda h: h + torch.randn_like(h),
        lambda h: h * torch.rand(h.shape, dtype=h.dtype),
        lambda h: h[:, torch.randperm(h.shape[1])],
    ],
)
def test_forward_mode_draws_what_a_plain_evaluation_draws(draw):
    """``vmap`` over tangents with ``randomness="same"`` (``ForwardJacobian``): the random
    calls of ``f`` get unbatched inputs and draw once, the numbers of a plain evaluation
    from the same state, leaving the generator where it would. The reference: reverse mode,
    which evaluates ``f`` once outside ``vmap``. (Before: vmap's randomness error.)"""
    w = torch.linspace(-1, 1, 12, dtype=f64).reshape(3, 4)
    f = lambda z: draw(torch.tanh(z @ w)) @ w.T  # noqa: E731
    x = torch.randn(5, 3, dtype=f64)
    got, states = {}, {}
    for method in ("forward", "reverse"):
        torch.manual_seed(2)
        got[method] = torchdiv.jacobian(f, x, method=method)
        states[method] = torch.get_rng_state()
    torch.manual_seed(2)
    f(x)
    assert torch.equal(states["forward"], torch.get_rng_state())
    assert torch.equal(states["reverse"], torch.get_rng_state())
    assert_close(got["forward"], got["reverse"])


@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_the_empty_event_check_evaluates_the_same_function(method):
    """An empty event (a scalar per sample) is checked for sample mixing by one more
    evaluation of ``f`` before the engine's: both from one state (before: the engine saw
    the second ``u`` and mask, and the buffer moved twice)."""
    net, x = Stateful(1, 1), torch.randn(6, dtype=f64)
    elementwise = lambda z: net(z[:, None])[:, 0]  # noqa: E731
    once, state = one_state(net, x[:, None], seed=1)
    torch.manual_seed(1)
    got = torchdiv.divergence(elementwise, x, method=method)
    assert_close(got, reference_diagonal(once, x[:, None])[:, 0])
    assert_one_state(net, once, state)


@pytest.mark.parametrize("operator", ["jacobian_diagonal", "jacobian"])
def test_watched_evaluation_that_hands_over_changes_state_once(operator):
    """A problem above the tiny size is watched by one dispatch mode (``_plan.OpSizes``) that
    also notes what ``f`` changes (``_state.Changes``): when ``torch.func`` then fails (a
    legacy ``autograd.Function`` after the buffer write and the dropout draw), plain autograd
    evaluates ``f`` again from the state before, with the same mask, and the buffer moves
    once. Without the notes the second evaluation saw another ``u`` and mask."""
    net, x = Stateful(64, 64, hidden=16, head=LegacyCube.apply), torch.randn(16, 64, dtype=f64)
    assert x[0].numel() * x.numel() > _plan.TINY_PROBLEM  # watched, and planned
    once, state = one_state(net, x, seed=4)
    torch.manual_seed(4)
    got = getattr(torchdiv, operator)(net, x)
    once.head = lambda y: y**3  # the same function, which torch.func's jacrev can run
    expected = (reference_jacobian if operator == "jacobian" else loop_diagonal)(once, x)
    assert_close(got, expected)
    assert_one_state(net, once, state)


def test_the_loops_plain_evaluation_run_again_under_the_modes_changes_state_once():
    """``laplacian``'s ``"auto"`` at a few inputs loops over backward passes, evaluating ``f``
    outside the derivative modes the first time at a structure; an eval-mode batch norm leaves
    a node they guard, so the loop evaluates ``f`` again under them. That second evaluation
    starts from the state the first found: one function (the same mask and ``u``), and the
    buffers and the generator as one evaluation leaves them. Before, they moved twice."""
    norm = torch.nn.BatchNorm1d(1).double().eval()
    with torch.no_grad():
        norm.running_mean.fill_(0.3)
    net, x = Stateful(3, head=norm), torch.randn(5, 3, dtype=f64)
    once, state = one_state(net, x, seed=6)
    torch.manual_seed(6)
    with torch.no_grad():
        got = torchdiv.laplacian(net, x)
    assert_close(got, torchdiv.laplacian(once, x, method="grad-of-grad"))
    assert_one_state(net, once, state)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_a_call_that_f_interrupts_on_a_later_evaluation_leaves_the_state_as_before(exc):
    """Forward mode in chunks evaluates ``f`` once per chunk; ``f`` raising on its second
    evaluation (an error, Ctrl-C) propagates, and the call leaves ``f``'s state as it found it
    (buffers, the generator), as a call failing on the first evaluation does: a retry computes
    what an uninterrupted call would. Before, the state was left as one evaluation left it."""
    net, x = Stateful(3, 3), torch.randn(4, 3, dtype=f64)
    u, evaluations = net.u.clone(), [0]

    def f(z: torch.Tensor) -> torch.Tensor:
        evaluations[0] += 1
        if evaluations[0] == 2:
            raise exc("second evaluation")
        return net(z)

    torch.manual_seed(2)
    rng = torch.get_rng_state()
    with pytest.raises(exc, match="second evaluation"):
        torchdiv.jacobian(f, x, method="forward", chunk_size=1)
    assert net.calls.item() == 0 and torch.equal(net.u, u)
    assert torch.equal(torch.get_rng_state(), rng)


class _Slots(torch.nn.Module):
    """``x`` scaled by ``slots[1]`` after ``write`` moved the buffer ``slots`` in place through
    views of it (``slots[0]``, ``slots[1]``, ``slots`` itself): one evaluation leaves
    ``after``, and its Jacobian is ``after[1]`` times the identity."""

    def __init__(self, write, after: list[float]) -> None:
        super().__init__()
        self.write, self.after = write, after
        self.register_buffer("slots", torch.zeros(2, dtype=f64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.write(self.slots)
        return x * self.slots[1]


def _slot_by_slot(slots: torch.Tensor) -> None:
    slots[0] += 1
    slots[1] += 1


def _slot_then_whole(slots: torch.Tensor) -> None:
    slots[0] += 1
    slots += 1


@pytest.mark.parametrize(
    ("write", "after"), [(_slot_by_slot, [1.0, 1.0]), (_slot_then_whole, [2.0, 1.0])]
)
def test_every_view_of_a_buffer_f_writes_is_put_back(write, after):
    """``Changes`` kept one view per storage: the first one ``f`` wrote (``slots[0]``), so
    that forward mode in chunks put back only that view before each chunk's evaluation;
    ``slots[1]`` moved once per chunk, each chunk differentiated another function and the
    divergence of ``x * slots[1]`` over 4 inputs was 1 + 2 + 3 + 4 = 10 instead of 4 (the
    buffer left at ``[1, 4]``). Closed form: ``after[1] * n``, the buffer moved once."""
    net, x = _Slots(write, after), torch.randn(3, 4, dtype=f64)
    got = torchdiv.divergence(net, x, method="forward", chunk_size=1)
    assert_close(got, torch.full((3,), 4 * after[1], dtype=f64))
    assert net.slots.tolist() == after
