"""Models for the tests of the state ``f`` changes in its backward passes on the Laplacian's
Hessian-vector paths (``tests/laplacian/test_hutchinson_backward_state.py``,
``tests/laplacian/test_exact_backward_state.py``): ``lgamma`` MLPs (no Taylor rule) with one
backward-pass effect each, one that sets a tensor attribute at every forward, one with dropout
and a forward counter.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

f64 = torch.float64


class Doubled(torch.autograd.Function):
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
        return Doubled.apply(x, owner), in_dims[0]


def hit(module: nn.Module, grad_input, grad_output) -> None:
    with torch.no_grad():
        module.count.add_(1)


class Counted(nn.Module):
    """Counts its forward calls in a buffer (also each recomputation of a checkpoint)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=f64))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.count.add_(1)
        return h


class Net(nn.Module):
    """``lgamma`` MLP 3-16-1 (no Taylor rule: the Hessian-vector path) with one backward-pass
    effect: ``Doubled``'s, a full backward hook counting into a buffer, or a checkpointed
    segment (counter and dropout) that backward passes recompute."""

    def __init__(self, effect: str) -> None:
        super().__init__()
        self.effect, self.steps = effect, 0
        self.a, self.b = nn.Linear(3, 16), nn.Linear(16, 1)
        self.register_buffer("count", torch.zeros((), dtype=f64))
        self.counted, self.drop = Counted(), nn.Dropout(0.3)
        if effect == "hook":
            self.counted.register_full_backward_hook(hit)

    def segment(self, h: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.lgamma(self.counted(h).abs() + 1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.effect == "checkpoint":
            return self.b(checkpoint(self.segment, h, use_reentrant=False))
        if self.effect != "hook":
            h = Doubled.apply(h, self)
        return self.b(torch.lgamma(self.counted(h).abs() + 1.5))


EFFECTS = ["buffer", "data", "random", "attribute", "hook", "checkpoint"]


def state_of(net: Net) -> tuple[dict[str, torch.Tensor], int, torch.Tensor]:
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    return buffers, net.steps, torch.get_rng_state()


class SetEachForward(nn.Module):
    """An ``lgamma`` MLP that sets a tensor attribute at every forward, read by the next one
    (a cache made anew each call): under the chunks' transforms it is set to their wrapper."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 16), nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = getattr(self, "cache", 1.0)
        self.cache = torch.full((1,), 2.0, dtype=x.dtype)
        return self.b(torch.lgamma(self.a(x).abs() + 1.5)) * scale


class Dropped(nn.Module):
    """An ``lgamma`` MLP 3-16-16-1 with dropout and a forward counter: state ``f`` changes in
    its own evaluation, which each chunk makes again from the state before."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16))
        self.out, self.drop, self.counted = nn.Linear(16, 1), nn.Dropout(0.25), Counted()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.counted(self.net(x)))
        return self.out(torch.lgamma(h.abs() + 1.5))


def estimate(f, x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """``(1/r) Σ_j v_jᵀ ∇²f v_j`` per sample by plain grad of grad over the batch (samples
    independent, dropout's mask drawn once), graph kept."""
    x = x.detach().requires_grad_()
    y = f(x)[:, 0]
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    rows = [torch.autograd.grad((g * v).sum(), x, create_graph=True)[0] for v in probes]
    return torch.stack([(v * hv).sum(-1) for v, hv in zip(probes, rows, strict=True)]).mean(0)
