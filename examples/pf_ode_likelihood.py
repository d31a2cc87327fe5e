"""Bits per dimension of a tiny flow-matching model on 8x8 images: exact vs estimated divergence.

A small convolutional velocity field ``v(t, x)`` is trained by (rectified) flow matching on
synthetic 8x8 images drawn with torch (one to three soft blobs each, quantised to 256 levels):
``x_t = (1 - t) z + t x`` with ``z ~ N(0, I)``, regress ``v(t, x_t)`` on ``x - z``. Its
probability-flow ODE carries N(0, I) at t=0 to the data at t=1, and
``torchdiv.flows.log_likelihood`` integrates the divergence along it for image-shaped states
``(B, 1, 8, 8)``. The test images' bits/dim (dequantised with uniform noise, data scaled to
[-1, 1]) are computed with the exact divergence (``"auto"``: 25 colour directions per
function evaluation for this conv net, instead of 64 unit vectors) and with each estimator
(``--num-probes`` JVPs). All solves use the same solver and tolerances; the table shows
each method's time, bits/dim, error against the exact one, the reported standard error of
the batch mean (from the integrated per-probe terms) and |error| / stderr.

    python examples/pf_ode_likelihood.py                      # about a minute on a CPU
    python examples/pf_ode_likelihood.py --train-steps 2 --batch 2 --solver rk4 --step-size 0.5
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from torchdiv.flows import log_likelihood

SIDE = 8
N = SIDE * SIDE


def images(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` 8x8 images in [-1, 1]: 1-3 Gaussian blobs, quantised to 256 levels, dequantised."""
    coords = torch.arange(SIDE, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    out = torch.zeros(n, SIDE, SIDE)
    count = torch.randint(1, 4, (n,), generator=generator)
    for k in range(3):
        centre = torch.rand(n, 2, generator=generator) * (SIDE - 3) + 1.5
        width = 0.8 + 1.2 * torch.rand(n, generator=generator)
        d2 = (yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2
        blob = torch.exp(-d2 / (2 * width[:, None, None] ** 2))
        out = out + blob * (k < count)[:, None, None]
    levels = (out.clamp(0, 1) * 255).round()
    noise = torch.rand(levels.shape, generator=generator)
    return ((levels + noise) / 256 * 2 - 1)[:, None]


def bits_per_dim(log_p: torch.Tensor) -> torch.Tensor:
    """Model density on [-1, 1]^N -> bits/dim of the 256-level data (dequantised)."""
    return -log_p / (N * math.log(2)) - 1 + 8  # scale [0,1) -> [-1,1): -1 bit; 8 bits per level


def standard_normal(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * z.square().sum((1, 2, 3)) - 0.5 * N * math.log(2 * math.pi)


class Velocity(nn.Module):
    """Four 3x3 convolutions (SiLU), with ``t`` as an extra input channel."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 1, 3, padding=1),
        )

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        time_channel = t.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, SIDE, SIDE).to(x.dtype)
        return self.net(torch.cat([x, time_channel], 1))


def train(model: nn.Module, steps: int, batch: int, generator: torch.Generator) -> None:
    """Rectified flow matching: regress ``model(t, x_t)`` on ``x - z``."""
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(1, steps + 1):
        x = images(batch, generator)
        z = torch.randn(x.shape, generator=generator)
        t = torch.rand(batch, generator=generator)
        xt = (1 - t[:, None, None, None]) * z + t[:, None, None, None] * x
        loss = (model(t, xt) - (x - z)).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % max(steps // 5, 1) == 0:
            print(f"flow matching step {step:4d}  loss {loss.item():.4f}")


def add_likelihood_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``likelihood_table`` (also used by ``diffusion_bits_per_dim.py``)."""
    parser.add_argument("--batch", type=int, default=64, help="test images")
    parser.add_argument("--num-probes", type=int, default=12, help="JVPs per sample and eval")
    parser.add_argument("--solver", default="dopri5")
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--step-size", type=float, help="for fixed-step solvers (rk4, euler)")
    parser.add_argument("--seed", type=int, default=0)


def likelihood_table(model: nn.Module, x: torch.Tensor, args: argparse.Namespace) -> None:
    """Bits/dim of ``x`` under the flow of ``model(t, x)``: exact and each estimator, timed,
    with the standard error of the batch mean and |error| / stderr."""
    model.requires_grad_(False)
    solve = {"solver": args.solver, "rtol": args.rtol, "atol": args.atol}
    if args.step_size is not None:
        solve["options"] = {"step_size": args.step_size}
    rows = []
    for method in ("auto", "hutchinson", "hutch++", "xtrace"):
        probes = {} if method == "auto" else {"num_probes": args.num_probes}
        g = torch.Generator().manual_seed(args.seed + 1)
        start = time.perf_counter()
        with torch.no_grad():
            log_p, stderr = log_likelihood(
                model, x, 0.0, 1.0, standard_normal, method=method, return_stderr=True,
                generator=None if method == "auto" else g, **probes, **solve,
            )  # fmt: skip
        seconds = time.perf_counter() - start
        bpd = bits_per_dim(log_p).mean().item()
        # independent probes per image: the batch mean's stderr is sqrt(sum se_i^2) / B
        se = (stderr.square().sum().sqrt() / len(x) / (N * math.log(2))).item()
        rows.append((method, seconds, bpd, se))

    exact = rows[0][2]
    print(f"\n{len(x)} test images, {args.solver} rtol={args.rtol} atol={args.atol}, "
          f"estimators with num_probes={args.num_probes}")  # fmt: skip
    print(f"{'method':<12}{'time s':>8}{'bits/dim':>12}{'error':>12}{'stderr':>12}{'|err|/se':>10}")
    for method, seconds, bpd, se in rows:
        name = "exact" if method == "auto" else method
        err = bpd - exact
        ratio = f"{abs(err) / se:10.2f}" if se > 0 else f"{'-':>10}"
        print(f"{name:<12}{seconds:8.2f}{bpd:12.5f}{err:12.2e}{se:12.2e}{ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-steps", type=int, default=400)
    add_likelihood_arguments(parser)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    data = torch.Generator().manual_seed(args.seed)
    model = Velocity()
    start = time.perf_counter()
    train(model, args.train_steps, 128, data)
    print(f"trained in {time.perf_counter() - start:.1f} s")
    likelihood_table(model, images(args.batch, data), args)


if __name__ == "__main__":
    main()
