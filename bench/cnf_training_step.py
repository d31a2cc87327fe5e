"""One CNF training step: torchdiv's divergence against the trace recipes of the FFJORD and
RNODE repositories, inside the same fixed-step solve.

Run (one thread, alone on the machine's benchmark lock):
    flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \\
        PYTHONPATH=src .venv/bin/python bench/cnf_training_step.py [--rounds 3]
        [--min-run-time 0.5] [--dims 2,16] [--pairs auto,hutch,flows,rnode]

The step: FFJORD's ConcatSquash tanh MLP (D-64-64-D, the time gating every layer), the
augmented state ``(x, delta)`` (RNODE: ``(x, delta, E, F)``) through torchdiffeq's RK4 with
8 steps over ``[0, 1]`` (32 evaluations, the same for every recipe), the loss
``-mean(log N(z) - delta)`` (RNODE: plus ``0.1 (E + F)``), ``backward`` and an Adam step, on
256 samples. Divergence by:

  auto            ``torchdiv.divergence(f, x)`` (exact)
  ffjord-bf       FFJORD's ``divergence_bf``: ``D`` backward passes with ``create_graph``
  hutch           ``torchdiv.divergence(f, x, method="hutchinson", probes=e)``, one probe
                  per sample drawn once per solve
  hutch-recipe    FFJORD's ``divergence_approx``: one VJP ``e^T J``, dotted with ``e``
  flows           ``torchdiv.flows.AugmentedDynamics(field, x, method="hutchinson",
                  probes=e)`` as the dynamics: ``f`` and the estimate from one evaluation
                  (``hutch`` evaluates ``f`` once more for the velocity)
  rnode           ``hutch`` plus the Frobenius term ``estimate_trace`` of ``J J^T`` with the
                  same probe (a VJP and a JVP) and the kinetic energy
  rnode-recipe    RNODE's: divergence and Frobenius term from one VJP ``e^T J``

The values of the first step are checked (``auto`` against ``ffjord-bf``, the rest against
their recipe: float64 state, 1e-9 relative). Times: ``_common.time_interleaved`` (median and
IQR of wall time, rounds interleaved).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
from _common import time_interleaved
from divergence_exact import ConcatSquash
from torch import nn
from torchdiffeq import odeint

import torchdiv

B, HIDDEN, STEPS = 256, 64, 8


class Field(nn.Module):
    """FFJORD's ODEnet of ConcatSquash layers with tanh between them."""

    def __init__(self, dim: int):
        super().__init__()
        self.layers = nn.ModuleList(
            [ConcatSquash(dim, HIDDEN), ConcatSquash(HIDDEN, HIDDEN), ConcatSquash(HIDDEN, dim)]
        )

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(t, x)
            x = torch.tanh(x) if i < len(self.layers) - 1 else x
        return x


def divergence_bf(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """FFJORD's brute-force trace: one backward pass per dimension."""
    return sum(
        torch.autograd.grad(y[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(x.shape[1])
    )


class Dynamics(nn.Module):
    """The augmented dynamics, the divergence (and for RNODE the regularisers) by ``recipe``."""

    def __init__(self, field: Field, recipe: str):
        super().__init__()
        self.field, self.recipe = field, recipe
        self.probes = torch.empty(0)

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x, e = state[0], self.probes
        g = lambda x: self.field(t, x)  # noqa: E731
        if self.recipe in ("ffjord-bf", "hutch-recipe", "rnode-recipe"):
            with torch.enable_grad():
                x = x if x.requires_grad else x.requires_grad_()
                velocity = g(x)
                if self.recipe == "ffjord-bf":
                    return velocity, -divergence_bf(velocity, x)
                (ej,) = torch.autograd.grad(velocity, x, e[0], create_graph=True)
            div = (ej * e[0]).sum(1)
            if self.recipe == "hutch-recipe":
                return velocity, -div
            return velocity, -div, velocity.square().sum(1), ej.square().sum(1)
        velocity = g(x)
        if self.recipe == "auto":
            return velocity, -torchdiv.divergence(g, x)
        div = torchdiv.divergence(g, x, method="hutchinson", probes=e)
        if self.recipe == "hutch":
            return velocity, -div
        frobenius = torchdiv.estimate_trace(jjt(g, x), x, probes=e).value
        return velocity, -div, velocity.square().sum(1), frobenius


def jjt(g: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
    """``V -> J J^T V`` (a VJP, then a JVP), whose trace is ``||J||_F^2``."""

    def matmat(probes: torch.Tensor) -> torch.Tensor:
        _, vjp = torch.func.vjp(g, x)
        return torch.func.vmap(lambda v: torch.func.jvp(g, (x,), vjp(v))[1])(probes)

    return matmat


def step_call(dim: int, recipe: str, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A closure that makes one training step (fresh probes per step) and returns the loss."""
    torch.manual_seed(0)
    field = Field(dim).to(x.dtype)
    dynamics = Dynamics(field, recipe)
    optimizer = torch.optim.Adam(field.parameters(), lr=1e-3)
    times = torch.tensor([0.0, 1.0], dtype=x.dtype)
    generator = torch.Generator().manual_seed(1)
    extra = 2 if recipe.startswith("rnode") else 0
    zeros = torch.zeros(B, dtype=x.dtype)

    def step() -> torch.Tensor:
        dynamics.probes = torch.randn((1, *x.shape), generator=generator, dtype=x.dtype)
        state = (x, zeros, *([zeros] * extra))
        ode: Callable[..., tuple[torch.Tensor, ...]] = dynamics
        if recipe == "flows":  # terms (1, B): one probe
            ode = torchdiv.flows.AugmentedDynamics(
                field, x, method="hutchinson", probes=dynamics.probes
            )
            state = (x, zeros[None])
        out = odeint(ode, state, times, method="rk4", options={"step_size": 1 / STEPS})
        z, delta, *regularisers = (s[-1] for s in out)
        delta = delta.reshape(B)
        logp = -0.5 * z.square().sum(1) - 0.5 * dim * math.log(2 * math.pi) - delta
        loss = -logp.mean() + 0.1 * sum(r.mean() for r in regularisers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


PAIRS = {
    "auto": "ffjord-bf",
    "hutch": "hutch-recipe",
    "flows": "hutch-recipe",
    "rnode": "rnode-recipe",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--dims", default="2,16")
    parser.add_argument("--pairs", default=",".join(PAIRS), help="which of ours to time")
    args = parser.parse_args()
    pairs = {ours: PAIRS[ours] for ours in args.pairs.split(",")}
    for dim in map(int, args.dims.split(",")):
        x = torch.randn(B, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        for ours, recipe in pairs.items():  # the first step's loss, float64
            first = step_call(dim, ours, x)(), step_call(dim, recipe, x)()
            assert torch.allclose(*first, rtol=1e-9), (dim, ours, first)
        x = x.float()
        calls = {name: step_call(dim, name, x) for pair in pairs.items() for name in pair}
        times = time_interleaved(calls, args.rounds, args.min_run_time)
        for ours, recipe in pairs.items():
            for name in (ours, recipe):
                t = times[name]
                ratio = t["median_ms"] / times[recipe]["median_ms"]
                timing = f"{t['median_ms']:8.1f} ms (IQR {t['iqr_ms']:5.1f})"
                print(f"D={dim:3d} {name:14s} {timing}  x{ratio:4.2f} of {recipe}")


if __name__ == "__main__":
    main()
