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
from torch import nn
from torch.utils.checkpoint import checkpoint

import torchdiv
from tests.conftest import assert_same_parameter_gradients
from torchdiv._laplacian import methods

f64 = torch.float64


class _Doubled(torch.autograd.Function):
    """``y = 2 x``, whose backward also changes state (``owner.effect``): a buffer written in
    place or through ``.data``, a random draw added to the gradient, a Python counter."""

    @staticmethod
    def forward(x: torch.Tensor, owner: nn.Module) -> torch.Tensor:
        return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.owner = inputs[1]

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        owner = ctx.owner
        if owner.effect == "buffer":
            with torch.no_grad():
                owner.count.add_(1)
        elif owner.effect == "data":
            owner.count.data.add_(1)
        elif owner.effect == "random":
            g = g + 1e-3 * torch.randn_like(g)
        elif owner.effect == "attribute":
            owner.steps += 1
        return 2 * g, None

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor, _: None) -> torch.Tensor:
        return 2 * tangent

    @staticmethod
    def vmap(info, in_dims, x, owner):
        return _Doubled.apply(x, owner), in_dims[0]


def _hit(module: nn.Module, grad_input, grad_output) -> None:
    with torch.no_grad():
        module.count.add_(1)


class _Counted(nn.Module):
    """Counts its forward calls in a buffer (also each recomputation of a checkpoint)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=f64))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.count.add_(1)
        return h


class _Net(nn.Module):
    """``lgamma`` MLP 3-16-1 (no Taylor rule: the Hessian-vector path) with one backward-pass
    effect: ``_Doubled``'s, a full backward hook counting into a buffer, or a checkpointed
    segment (counter and dropout) that backward passes recompute."""

    def __init__(self, effect: str) -> None:
        super().__init__()
        self.effect, self.steps = effect, 0
        self.a, self.b = nn.Linear(3, 16), nn.Linear(16, 1)
        self.register_buffer("count", torch.zeros((), dtype=f64))
        self.counted, self.drop = _Counted(), nn.Dropout(0.3)
        if effect == "hook":
            self.counted.register_full_backward_hook(_hit)

    def segment(self, h: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.lgamma(self.counted(h).abs() + 1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.effect == "checkpoint":
            return self.b(checkpoint(self.segment, h, use_reentrant=False))
        if self.effect != "hook":
            h = _Doubled.apply(h, self)
        return self.b(torch.lgamma(self.counted(h).abs() + 1.5))


EFFECTS = ["buffer", "data", "random", "attribute", "hook", "checkpoint"]


def _state(net: _Net) -> tuple[dict[str, torch.Tensor], int, torch.Tensor]:
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    return buffers, net.steps, torch.get_rng_state()


@pytest.mark.parametrize("effect", EFFECTS)
def test_forward_over_reverse_refuses_backward_pass_state(effect):
    """The premise of watching ``f``'s evaluation alone: inside the transforms every backward
    pass effect on state raises (PyTorch's refusals), but a Python attribute (which ``Once``
    puts back with the module's settings before each evaluation)."""
    torch.manual_seed(0)
    net = _Net(effect).to(f64)
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
    base = _Net(effect).to(f64)
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
            seen[chunk_size].append((out, *_state(net)))
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


class _Set(nn.Module):
    """An ``lgamma`` MLP that sets a tensor attribute at every forward, read by the next one
    (a cache made anew each call): under the chunks' transforms it is set to their wrapper."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 16), nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = getattr(self, "cache", 1.0)
        self.cache = torch.full((1,), 2.0, dtype=x.dtype)
        return self.b(torch.lgamma(self.a(x).abs() + 1.5)) * scale


def test_an_attribute_set_under_one_chunk_is_read_plain_by_the_next(monkeypatch):
    """With ``f``'s evaluation watched inside the transforms, the next chunk read the dead
    wrapper the last one set (PyTorch's "level escaped?" assert), and forward mode fell back
    to the loop of backward passes; the products run every chunk, values equal at one chunk
    and at four."""
    looped = []
    probed = methods.probed
    monkeypatch.setattr(methods, "probed", lambda *a, **k: looped.append(1) or probed(*a, **k))
    torch.manual_seed(0)
    base = _Set().to(f64)
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


class _Dropped(nn.Module):
    """An ``lgamma`` MLP 3-16-16-1 with dropout and a forward counter: state ``f`` changes in
    its own evaluation, which each chunk makes again from the state before."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16))
        self.out, self.drop, self.counted = nn.Linear(16, 1), nn.Dropout(0.25), _Counted()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.counted(self.net(x)))
        return self.out(torch.lgamma(h.abs() + 1.5))


def _estimate(f, x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """``(1/r) Σ_j v_jᵀ ∇²f v_j`` per sample by plain grad of grad over the batch (samples
    independent, dropout's mask drawn once), graph kept."""
    x = x.detach().requires_grad_()
    y = f(x)[:, 0]
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    rows = [torch.autograd.grad((g * v).sum(), x, create_graph=True)[0] for v in probes]
    return torch.stack([(v * hv).sum(-1) for v, hv in zip(probes, rows, strict=True)]).mean(0)


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_values_parameter_gradients_and_state_of_one_evaluation(chunk_size):
    """Estimate and its parameter gradients equal plain autograd's with the same dropout mask
    (float64), at one chunk and several, two calls; the generator and the counter as one plain
    evaluation leaves them; float32 within its rounding of the float64 estimate."""
    torch.manual_seed(0)
    net = _Dropped().to(f64)
    x = torch.rand(6, 3, dtype=f64)
    probes = torch.randn(5, 6, 3, dtype=f64)
    for call in range(2):
        start = torch.get_rng_state()
        reference = _estimate(net, x, probes)
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
