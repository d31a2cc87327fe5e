"""Where the structured engine starts splitting group norms off
(``torchdiv._structured.statistics.SPLIT_WORK``): ``divergence`` of torchdiffeq's MNIST
dynamics with few channels, timed with the split allowed and with it off, alternated round by
round in one process, over state sizes around the threshold.

Run:  flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 \\
          .venv/bin/python bench/split_threshold.py [--batch 3] [--rounds 3]

``torch.utils.benchmark`` medians (``blocked_autorange``, 0.3 s per measurement); per round
the ratio split / columns; the median of those ratios and their range. A ratio above 1: the
split loses to plain columns at that size.
"""

from __future__ import annotations

import argparse
import statistics as stats

import torch
import torch.utils.benchmark as tb

import torchdiv
from torchdiv._bench.ffjord import odefunc
from torchdiv._structured import statistics

SIZES = [(4, 5), (4, 6), (4, 8), (8, 6), (4, 10), (8, 8), (4, 12)]  # (channels, side)


def _median_s(f: torch.nn.Module, x: torch.Tensor, split: bool) -> float:
    """The median time of one ``divergence`` call, with the split allowed or not."""
    statistics.SPLIT_WORK = 0 if split else 1 << 62
    torchdiv.divergence(f, x)
    names = {"divergence": torchdiv.divergence, "f": f, "x": x}
    timer = tb.Timer("divergence(f, x)", globals=names)
    return timer.blocked_autorange(min_run_time=0.3).median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    kept = statistics.SPLIT_WORK
    print(f"batch {args.batch}; threshold N n^2 >= {kept}")
    for channels, side in SIZES:
        f, n = odefunc(channels, 2), channels * side * side
        x = torch.randn(args.batch, channels, side, side)
        ratios, times = [], []
        for _ in range(args.rounds):
            split, columns = _median_s(f, x, True), _median_s(f, x, False)
            ratios.append(split / columns)
            times.append((split, columns))
        statistics.SPLIT_WORK = kept
        split, columns = (stats.median(t) * 1e3 for t in zip(*times, strict=True))
        chosen = "split" if args.batch * n * n >= kept else "columns"
        print(
            f"n = {n:4d} (N n^2 = {args.batch * n * n:8d}): split {split:6.1f} ms, columns "
            f"{columns:6.1f} ms, ratio {stats.median(ratios):.2f} "
            f"[{min(ratios):.2f}, {max(ratios):.2f}]; auto takes {chosen}"
        )


if __name__ == "__main__":
    main()
