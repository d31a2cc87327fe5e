"""Cost of Hutchinson's estimate on the U-Nets of diffusion models, per probe, against one
forward plus backward pass (issue 20's target: at most 3x).

Run:  flock /tmp/torchdiv-bench.lock .venv/bin/python bench/unet_estimators.py [--rounds 5]
      .venv/bin/python bench/unet_estimators.py --report bench/results/unet_estimators.json

Cases (random init, parameters frozen, float32, 8 images of 3 x 16 x 16, timesteps fixed):

  diffusers:          UNet2DModel(block_out_channels=(32, 64), layers_per_block=1,
                      norm_num_groups=8) with AttnDownBlock2D / AttnUpBlock2D, eval mode
  guided:             guided-diffusion's layout (``tests/unets.py``), width 16
  guided, checkpoint: the same with its legacy checkpoint (re-runs each block in backward)

Calls, timed round-robin (``torch.utils.benchmark``, ``_common.time_interleaved``): the
forward pass; forward plus ``autograd.grad`` of ``<f(x), u>`` with respect to ``x`` (the
baseline); ``divergence(..., method="hutchinson", num_probes=m)`` under ``torch.no_grad()``
for m = 1 and 8 (likelihood evaluation), whose time per probe is divided by the baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from _common import RESULTS, markdown, time_interleaved, write_json

import torchdiv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from unets import GuidedUNet, diffusers_unet

PROBES = (1, 8)


def cases() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    t = torch.tensor([10.0, 100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 700.0])
    diffusers = diffusers_unet().requires_grad_(False)
    torch.manual_seed(0)
    guided = GuidedUNet().requires_grad_(False)
    torch.manual_seed(0)
    # guided-diffusion's checkpoint differentiates its parameters in every backward pass
    checkpointed = GuidedUNet(use_checkpoint=True)
    return {
        "diffusers": lambda x: diffusers(x, t).sample,
        "guided": lambda x: guided(x, t),
        "guided, checkpoint": lambda x: checkpointed(x, t),
    }


def forward_backward(f: Callable, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(f(leaf), leaf, u)
    return grad


def run_case(name: str, f: Callable, rounds: int, min_run_time: float) -> list[dict]:
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    u = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    calls = {
        "forward": lambda: f(x),
        "forward + backward": lambda: forward_backward(f, x, u),
    }
    for m in PROBES:
        calls[f"hutchinson {m}"] = lambda m=m: torchdiv.divergence(
            f, x, method="hutchinson", num_probes=m
        )
    with torch.no_grad():
        times = time_interleaved(calls, rounds, min_run_time)
    baseline = times["forward + backward"]["median_ms"]
    rows = []
    for call, t in times.items():
        probes = int(call.split()[-1]) if call.startswith("hutchinson") else None
        row = {"case": name, "call": call, "median_ms": t["median_ms"], "iqr_ms": t["iqr_ms"]}
        row["x_forward_backward"] = t["median_ms"] / baseline
        if probes:
            row["per_probe_x_forward_backward"] = t["median_ms"] / probes / baseline
        rows.append(row)
        print(name, call, f"{t['median_ms']:.2f} ms", flush=True)
    return rows


COLUMNS = [
    ("case", "case"),
    ("call", "call"),
    ("median_ms", "ms (median)"),
    ("iqr_ms", "IQR ms"),
    ("x_forward_backward", "x fwd+bwd"),
    ("per_probe_x_forward_backward", "per probe x fwd+bwd"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--json", type=Path, default=RESULTS / "unet_estimators.json")
    parser.add_argument("--report", type=Path, help="print the table of a results JSON")
    args = parser.parse_args()
    if args.report:
        print(markdown(json.loads(args.report.read_text())["rows"], COLUMNS))
        return
    rows = []
    for name, f in cases().items():
        rows += run_case(name, f, args.rounds, args.min_run_time)
    write_json(args.json, rows)
    print(markdown(rows, COLUMNS))


if __name__ == "__main__":
    main()
