"""State that ``f`` changes on the Hutchinson Laplacian's Hessian-vector path.

Where the Taylor engine has no rule (``lgamma``), the estimate takes Hessian-vector products by
forward over reverse, one chunk of probes at a time, each evaluating ``f`` again from the state
before the first (``Once``). Only ``f``'s own evaluation is watched there, not its backward and
tangent passes: that is sound because ``torch.func`` refuses every way a backward pass could
change state outside ``f`` (a write to a buffer, a random draw, a checkpoint's recomputation, a
module's backward hook), so forward mode fails and the loop of backward passes runs instead.
These tests pin that premise and check, for each such ``f``, that the state after a call does
not depend on the chunks and that a second call changes it as the first did.
"""

from __future__ import annotations

import copy

import pytest
import torch

import torchdiv
from tests.backward_state import (
    EFFECTS,
    Dropped,
    Net,
    SetEachForward,
    estimate,
    f64,
    state_of,
)
from tests.conftest import assert_same_parameter_gradients
from torchdiv._laplacian import methods


@pytest.mark.parametrize("effect", EFFECTS)
def test_forward_over_reverse_refuses_backward_pass_state(effect):
    """The premise of watching ``f``'s evaluation alone: inside the transforms every backward
    pass effect on state raises (PyTorch's refusals), but a Python attribute (which ``Once``
    puts back with the module's settings before each evaluation)."""
    torch.manual_seed(0)
    net = Net(effect).to(f64)
    x = torch.rand(4, 3, dtype=f64)
    for k in (1, 2):  # one direction a chunk too
        for sample, batch_dims in ((x, 1), (x[0], 0)):
            directions = torch.randn(k, *sample.shape, dtype=f64)
            if effect == "attribute":
                methods.hessian_products(net, sample, batch_dims, directions)
                continue
            with pytest.raises(RuntimeError):
                methods.hessian_products(net, sample, batch_dims, directions)


@pytest.mark.parametrize("effect", EFFECTS)
def test_backward_pass_state_does_not_depend_on_the_chunks(effect):
    """Two calls at one chunk and at four (``chunk_size=1``, 4 probes), from the same state:
    the same estimates (but for a random backward's noise), the same state after each call,
    and a second call changing it as the first did."""
    torch.manual_seed(0)
    base = Net(effect).to(f64)
    x = torch.rand(4, 3, dtype=f64)
    probes = torch.randn(4, 4, 3, dtype=f64)
    seen = {}
    for chunk_size in (None, 1):
        net = copy.deepcopy(base)
        torch.manual_seed(1)
        seen[chunk_size] = []
        for _ in range(2):
            out = torchdiv.laplacian(
                net, x, method="hutchinson", probes=probes, chunk_size=chunk_size
            )
            seen[chunk_size].append((out, *state_of(net)))
    for (out, buffers, steps, rng), (out1, buffers1, steps1, rng1) in zip(
        seen[None], seen[1], strict=True
    ):
        if effect != "random":
            torch.testing.assert_close(out, out1, rtol=1e-12, atol=1e-12)
        assert buffers.keys() == buffers1.keys()
        for key in buffers:
            assert torch.equal(buffers[key], buffers1[key]), key
        assert steps == steps1
        assert torch.equal(rng, rng1)
    (_, first, steps, _), (_, second, steps2, _) = seen[None]
    for key in first:  # the second call's changes are the first's
        assert torch.equal(second[key] - first[key], first[key]), key
    assert steps2 == 2 * steps


def test_an_attribute_set_under_one_chunk_is_read_plain_by_the_next(monkeypatch):
    """With ``f``'s evaluation watched inside the transforms, the next chunk read the dead
    wrapper the last one set (PyTorch's "level escaped?" assert), and forward mode fell back
    to the loop of backward passes; the products run every chunk, values equal at one chunk
    and at four."""
    looped = []
    probed = methods.probed
    monkeypatch.setattr(methods, "probed", lambda *a, **k: looped.append(1) or probed(*a, **k))
    torch.manual_seed(0)
    base = SetEachForward().to(f64)
    x = torch.rand(4, 3, dtype=f64)
    probes = torch.randn(4, 4, 3, dtype=f64)
    outs = []
    for chunk_size in (None, 1):
        net = copy.deepcopy(base)
        outs += [
            torchdiv.laplacian(net, x, method="hutchinson", probes=probes, chunk_size=chunk_size)
        ]
        assert torch.equal(net.cache, torch.full((1,), 2.0, dtype=f64))
    assert not looped
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_values_parameter_gradients_and_state_of_one_evaluation(chunk_size):
    """Estimate and its parameter gradients equal plain autograd's with the same dropout mask
    (float64), at one chunk and several, two calls; the generator and the counter as one plain
    evaluation leaves them; float32 within its rounding of the float64 estimate."""
    torch.manual_seed(0)
    net = Dropped().to(f64)
    x = torch.rand(6, 3, dtype=f64)
    probes = torch.randn(5, 6, 3, dtype=f64)
    for call in range(2):
        start = torch.get_rng_state()
        reference = estimate(net, x, probes)
        after = torch.get_rng_state()
        torch.set_rng_state(start)
        out = torchdiv.laplacian(net, x, method="hutchinson", probes=probes, chunk_size=chunk_size)
        assert torch.equal(torch.get_rng_state(), after)
        assert int(net.counted.count) == 2 * (call + 1)  # the reference's evaluation and ours
        torch.testing.assert_close(out[:, 0], reference, rtol=1e-10, atol=1e-12)
        assert_same_parameter_gradients(net, out.square().sum(), reference.square().sum())
    low = copy.deepcopy(net).float()
    torch.manual_seed(2)
    out32 = torchdiv.laplacian(low, x.float(), method="hutchinson", probes=probes.float())
    torch.manual_seed(2)
    out64 = torchdiv.laplacian(net, x, method="hutchinson", probes=probes)
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-5)
