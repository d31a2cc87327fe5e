"""The structured chain's carried column blocks: ``cycle._entries`` (the diagonal of every
sample's ``S_k D_{k-1} ... D_1 S_1``, a tanh MLP's Jacobian diagonal or a deep MLP's trace)
timed at blocks of 2^18, 2^19 (``cycle.EAGER_BLOCK_ELEMENTS``) and 2^20 elements
(``cycle.BLOCK_ELEMENTS``, the compiled replays'), for the shapes that set the eager size.

    flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \\
        PYTHONPATH=src .venv/bin/python bench/chain_blocks.py [--min-run-time 0.3]

One thread, ``torch.utils.benchmark`` (median and interquartile range, ms); the block sizes of
one shape measured in turn, round by round.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils import benchmark

from torchdiv._structured import cycle

# name: (event D, width w, samples N, layers)
SHAPES = {
    "diagonal D=8 w=64 N=4096": (8, 64, 4096, 3),
    "diagonal D=16 w=64 N=4096": (16, 64, 4096, 3),
    "diagonal D=64 w=64 N=256": (64, 64, 256, 3),
    "diagonal D=8 w=512 N=4096": (8, 512, 4096, 3),
    "trace D=256 w=256 N=128 5 layers": (256, 256, 128, 5),
    "trace D=32 w=128 N=1024 4 layers": (32, 128, 1024, 4),
}
BLOCKS = {"2^18": 1 << 18, "2^19": 1 << 19, "2^20": 1 << 20}


def factors(d: int, w: int, n: int, layers: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """An MLP's shared matrices ``S_1 .. S_k`` and per-sample diagonals ``D_1 .. D_{k-1}``."""
    g = torch.Generator().manual_seed(0)
    shared = [torch.randn(w, d, generator=g)]
    shared += [torch.randn(w, w, generator=g) for _ in range(layers - 2)]
    shared += [torch.randn(d, w, generator=g)]
    return shared, [torch.rand(n, w, generator=g) for _ in range(layers - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-run-time", type=float, default=0.3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, eager block 2^{cycle.EAGER_BLOCK_ELEMENTS.bit_length() - 1}")
    for name, (d, w, n, layers) in SHAPES.items():
        shared, scales = factors(d, w, n, layers)
        widest = max(s.shape[0] for s in shared)
        cells = []
        for label, block in BLOCKS.items():
            chunk = max(1, block // (n * widest))
            timer = benchmark.Timer(
                "cycle._entries(shared, scales, chunk)",
                globals={"cycle": cycle, "shared": shared, "scales": scales, "chunk": chunk},
            )
            m = timer.blocked_autorange(min_run_time=args.min_run_time)
            cells.append(f"{label} ({chunk} col.) {m.median * 1e3:8.2f} ms +- {m.iqr * 1e3:.2f}")
        print(f"{name:34s} " + "   ".join(cells))


if __name__ == "__main__":
    main()
