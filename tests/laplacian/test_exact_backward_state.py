"""State that ``f`` changes on the exact Laplacian's Hessian-column paths.

``laplacian(method="forward-over-reverse")`` and ``"hessian"`` take Hessian columns by forward
over reverse, one chunk of directions at a time, each evaluating ``f`` again from the state
before the first (``Once``). Only ``f``'s own evaluation is watched, not its backward and
tangent passes (as on the Hutchinson path, ``test_hutchinson_backward_state.py``): PyTorch
refuses every backward-pass change of state inside the transforms, and these methods then
raise, having changed nothing when they ran several chunks. These tests check, for each
backward-pass effect, that the outcome and the state do not depend on the chunks, that a
second call changes the state as the first did, and values and parameter gradients against
plain grad of grad.
"""

from __future__ import annotations

import copy

import pytest
import torch

import torchdiv
from tests.backward_state import EFFECTS, Dropped, Net, SetEachForward, f64, state_of
from tests.conftest import assert_same_parameter_gradients

METHODS = ["forward-over-reverse", "hessian"]


def _calls(net, x, method, chunk_size):
    """Two calls from ``net``'s state: each one's value (or its error's type) and the state
    after it."""
    seen = []
    for _ in range(2):
        try:
            out = torchdiv.laplacian(net, x, method=method, chunk_size=chunk_size)
        except RuntimeError as error:
            out = type(error)
        seen.append((out, *state_of(net)))
    return seen


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("effect", EFFECTS)
def test_backward_pass_state_does_not_depend_on_the_chunks(method, effect):
    """One chunk, three (``chunk_size=1``) and two (``chunk_size=2``), two calls each: the same
    values or the same refusal; a refused call over several chunks changed nothing (the state
    put back although ``f``'s evaluation completed before a backward pass raised); a call
    that runs changes the state as one plain evaluation does (the forward counter once), and
    the second as the first."""
    torch.manual_seed(0)
    base = Net(effect).to(f64)
    x = torch.rand(4, 3, dtype=f64)
    start = state_of(base)
    seen = {}
    for chunk_size in (None, 1, 2):
        torch.manual_seed(1)
        rng = torch.get_rng_state()
        seen[chunk_size] = _calls(copy.deepcopy(base), x, method, chunk_size)
        if isinstance(seen[chunk_size][0][0], type):  # refused: nothing changed
            if chunk_size is None:  # one chunk: nothing put back (``Once`` wraps nothing)
                continue
            for _, buffers, steps, after in seen[chunk_size]:
                assert all(torch.equal(v, start[0][k]) for k, v in buffers.items())
                assert steps == start[1]
                assert torch.equal(after, rng)
    outs = {c: [s[0] for s in seen[c]] for c in seen}
    refused = isinstance(outs[None][0], type)
    assert refused == (effect != "attribute")
    for chunk_size in (1, 2):
        for out, out1 in zip(outs[None], outs[chunk_size], strict=True):
            if refused:
                assert out is out1
            else:
                torch.testing.assert_close(out, out1, rtol=1e-12, atol=1e-12)
    if not refused:
        for chunk_size in (None, 1, 2):
            (_, first, steps, _), (_, second, steps2, _) = seen[chunk_size]
            assert int(first["counted.count"]) == 1 and steps == 1  # as one plain evaluation
            assert int(second["counted.count"]) == 2 and steps2 == 2


@pytest.mark.parametrize("method", METHODS)
def test_an_attribute_set_under_one_chunk_is_read_plain_by_the_next(method):
    """A tensor attribute ``f`` sets at each forward and reads at the next: every chunk's
    evaluation reads it as the call found it (it was left set by the first chunk: a first call
    at three chunks 0.38 where plain grad of grad gives 0.20), unwrapped before the next reads
    it (else PyTorch's "level escaped?" assert); first and second calls as plain autograd's,
    the attribute a plain tensor after."""
    torch.manual_seed(0)
    base = SetEachForward().to(f64)
    x = torch.rand(4, 3, dtype=f64)
    plain = copy.deepcopy(base)
    references = [_laplacian(plain, x), _laplacian(plain, x)]  # the cache unset, then set
    for chunk_size in (None, 1):
        net = copy.deepcopy(base)
        for reference in references:
            out = torchdiv.laplacian(net, x, method=method, chunk_size=chunk_size)[:, 0]
            assert torch.equal(net.cache, torch.full((1,), 2.0, dtype=f64))
            torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-12)


def _laplacian(f, x: torch.Tensor) -> torch.Tensor:
    """``Σ_i ∂²f/∂x_i²`` per sample by plain grad of grad over the batch (samples independent,
    dropout's mask drawn once), graph kept."""
    x = x.detach().requires_grad_()
    y = f(x)[:, 0]
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    rows = [torch.autograd.grad(g[:, i].sum(), x, create_graph=True)[0] for i in range(x.shape[1])]
    return sum(row[:, i] for i, row in enumerate(rows))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk_size", [None, 1, 2])
def test_values_parameter_gradients_and_state_of_one_evaluation(method, chunk_size):
    """The Laplacian and its parameter gradients equal plain autograd's with the same dropout
    mask (float64), two calls; the generator and the forward counter as one plain evaluation
    leaves them; without dropout, equal to a grad-of-grad loop one sample at a time; float32
    within its rounding of float64."""
    torch.manual_seed(0)
    net = Dropped().to(f64)
    x = torch.rand(5, 3, dtype=f64)
    for call in range(2):
        start = torch.get_rng_state()
        reference = _laplacian(net, x)
        after = torch.get_rng_state()
        torch.set_rng_state(start)
        out = torchdiv.laplacian(net, x, method=method, chunk_size=chunk_size)
        assert torch.equal(torch.get_rng_state(), after)
        assert int(net.counted.count) == 2 * (call + 1)  # the reference's evaluation and ours
        torch.testing.assert_close(out[:, 0], reference, rtol=1e-10, atol=1e-12)
        assert_same_parameter_gradients(net, out.square().sum(), reference.square().sum())
    plain = copy.deepcopy(net).eval()
    out = torchdiv.laplacian(plain, x, method=method, chunk_size=chunk_size)[:, 0]
    one_by_one = torch.cat([_laplacian(plain, x[b : b + 1]) for b in range(len(x))])
    torch.testing.assert_close(out, one_by_one, rtol=1e-10, atol=1e-12)
    assert_same_parameter_gradients(plain, out.square().sum(), one_by_one.square().sum())
    low = copy.deepcopy(net).float()
    torch.manual_seed(2)
    out32 = torchdiv.laplacian(low, x.float(), method=method, chunk_size=chunk_size)
    torch.manual_seed(2)
    out64 = torchdiv.laplacian(net, x, method=method, chunk_size=chunk_size)
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-5)
