"""Train a convolutional CNF on tiny images under DistributedDataParallel, then evaluate an exact
likelihood with the divergence shared out across the ranks.

Training: every rank draws its own batch of 1 x 8 x 8 images (blurred noise, a stand-in for
data), the loss is the mean negative log-likelihood by ``torchdiv.flows.log_likelihood`` with
Hutchinson's estimate (one product per sample and evaluation) and a fixed-step rk4 solve, and
``DistributedDataParallel`` averages the gradients: torchdiv needs no option for that (the model
is passed to it as it is, wrapped). Evaluation: the *exact* log-likelihood of one held-out
batch, solving the ODE of ``(z, Delta)`` with ``torchdiv.distributed.divergence``, each rank
taking its share of the colours of the structured engine; every rank gets the same value, which
rank 0 checks against one process's ``log_likelihood(method="auto")``. Bits per dimension as
``-log p / (D log 2)`` (continuous data: no dequantisation offset).

    torchrun --nproc-per-node 2 examples/ddp_cnf.py            # 2 processes (gloo, CPU)
    python examples/ddp_cnf.py --iters 2 --batch 4             # one process, a few seconds (CI)
"""

from __future__ import annotations

import argparse
import math
import os
import socket

import torch
import torch.distributed as dist
from torch import nn
from torchdiffeq import odeint

import torchdiv
from torchdiv.flows import log_likelihood

SIZE = 8  # image side; events of 1 x SIZE x SIZE


class Field(nn.Module):
    """A conv velocity field ``f(t, z)``, time as an extra input channel."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2, width, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(width, 1, 3, padding=1),
        )

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, t.expand(z.shape[0], 1, *z.shape[2:])], 1))


def images(n: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random images: noise blurred by a 3x3 box filter, scaled to unit variance."""
    noise = torch.randn(n, 1, SIZE + 2, SIZE + 2, generator=generator)
    blurred = nn.functional.avg_pool2d(noise, 3, stride=1)
    return blurred / blurred.std()


def normal(z: torch.Tensor) -> torch.Tensor:
    """Log-density of the standard normal base, per sample."""
    d = z[0].numel()
    return -0.5 * z.flatten(1).square().sum(-1) - 0.5 * d * math.log(2 * math.pi)


def sharded_log_likelihood(field: nn.Module, x: torch.Tensor, steps: int) -> torch.Tensor:
    """``log p(x)`` with the exact divergence shared out across the ranks (rk4, as training)."""

    def dynamics(t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        z = state[0]
        div = torchdiv.distributed.divergence(lambda z: field(t, z), z)
        return field(t, z), -div

    start = (x, torch.zeros(x.shape[0], dtype=x.dtype))
    times = torch.tensor([1.0, 0.0], dtype=x.dtype)
    z, delta = odeint(dynamics, start, times, method="rk4", options={"step_size": 1 / steps})
    return normal(z[-1]) - delta[-1]


def init() -> tuple[int, int]:
    """The process group: torchrun's environment, or one process of its own."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32, help="images per rank and step")
    parser.add_argument("--steps", type=int, default=4, help="rk4 steps of the solve")
    parser.add_argument("--eval-batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank, world = init()
    torch.manual_seed(0)  # the same initial parameters on every rank (DDP also broadcasts them)
    model = nn.parallel.DistributedDataParallel(Field())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(1 + rank)  # every rank its own data
    options = {"solver": "rk4", "options": {"step_size": 1 / args.steps}}
    for step in range(args.iters):
        x = images(args.batch, data)
        logp = log_likelihood(model, x, 0.0, 1.0, normal, method="hutchinson", num_probes=1,
                              generator=torch.Generator().manual_seed(step), **options)  # fmt: skip
        loss = -logp.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % 20 == 0 or step == args.iters - 1):
            print(f"step {step:4d}  loss {loss.item():.3f}", flush=True)

    held_out = images(args.eval_batch, torch.Generator().manual_seed(12345))  # on every rank
    field, d = model.module, held_out[0].numel()
    with torch.no_grad():
        logp = sharded_log_likelihood(field, held_out, args.steps)
        if rank == 0:
            alone = log_likelihood(field, held_out, 0.0, 1.0, normal, **options)
            gap = (logp - alone).abs().max().item()
            bits = -logp.mean().item() / (d * math.log(2))
            print(f"exact held-out bits/dim: {bits:.4f} (ranks sharing the divergence: {world}; "
                  f"largest difference from one process: {gap:.1e})")  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
