"""``divergence`` of a 3D (video) U-Net written with ``nn.AvgPool3d`` down and trilinear
``F.interpolate`` up, GroupNorm/SiLU/Conv3d blocks and a skip concatenation: ``"auto"`` side by
side with ``"reverse"``, ``"forward"`` and ``"structured"`` in the same interleaved rounds,
float32, per-sample events ``(C, F, H, W)``. Before the structured engine had rules for
``avg_pool3d`` and ``upsample_trilinear3d``, ``"auto"`` fell back to the generic engines here
and ``"structured"`` refused (printed as such).

Run:  flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \\
          .venv/bin/python bench/unet3d_pooling.py [--rounds 3] [--min-run-time 0.5]

Prints, per shape, the structured engine's plan and each method's median and interquartile
range (ms) over the rounds' ``torch.utils.benchmark`` measurements.
"""

from __future__ import annotations

import argparse

import torch
from _common import time_interleaved

import torchdiv
from torchdiv._bench.unets import UNet3d  # (width 8: GroupNorm(4, .) blocks)
from torchdiv._structured import describe

SHAPES = [(2, 2, 4, 8, 8), (2, 2, 4, 12, 12)]  # (B, C, F, H, W)
METHODS = ("auto", "reverse", "forward", "structured")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = UNet3d(width=8).requires_grad_(False)
    for shape in SHAPES:
        x = torch.randn(shape)
        print(f"x {tuple(shape)}: structured plan: {describe(net, x)}")
        calls = {}
        for method in METHODS:
            try:
                torchdiv.divergence(net, x, method=method)  # warm: recorded, planned
            except NotImplementedError as exc:
                print(f"  {method}: refused ({str(exc)[:90]}...)")
                continue
            calls[method] = lambda m=method, x=x: torchdiv.divergence(net, x, method=m)
        times = time_interleaved(calls, args.rounds, args.min_run_time)
        for name, t in times.items():
            print(f"  {name:10s} median {t['median_ms']:8.1f} ms  IQR {t['iqr_ms']:6.1f} ms")


if __name__ == "__main__":
    main()
