"""Page faults of the Laplacian's large Taylor jets (issue 18): thread CPU time and minor page
faults of each call, in a fresh process, of a frozen tanh FNN's Laplacian.

    flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
        PYTHONPATH=src .venv/bin/python bench/lap_faults.py [--dim 100] [--batch 2048] \
        [--method taylor] [--chunk-size N] [--calls 12] [--trained]

A jet above 32 MiB (glibc's largest dynamic ``mmap`` threshold) is mapped afresh at each call
where the heap has no hole that large; its pages are then faulted and zeroed at every call.
Run it again under ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184`` (the memory kept)
or ``THP_MEM_ALLOC_ENABLE=1`` (huge pages) to see the cost of the faults. lapcall25, D = 100,
B = 2048, one thread: 145-150 ms and 76.8k faults a call; kept 60-70 ms, no faults; huge pages
70-90 ms (3.2k faults).
"""

from __future__ import annotations

import argparse
import functools
import resource
import statistics
import time

import laplacian_small
import torch

import torchdiv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=100)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--method", default="taylor")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--calls", type=int, default=12)
    parser.add_argument(
        "--trained", action="store_true", help="parameters train: the call and its backward"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    net = laplacian_small.fnn(args.dim).requires_grad_(args.trained)
    x = torch.randn(args.batch, args.dim)
    method = functools.partial(torchdiv.laplacian, method=args.method, chunk_size=args.chunk_size)
    times, faults = [], []
    for _ in range(args.calls):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        start = time.thread_time_ns()
        laplacian_small._step(method, net, x, args.trained)
        times.append((time.thread_time_ns() - start) / 1e6)
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    print("ms     ", " ".join(f"{t:6.1f}" for t in times))
    print("faults ", " ".join(f"{f:6d}" for f in faults))
    print(
        f"median after the first two: {statistics.median(times[2:]):.1f} ms, "
        f"{statistics.median(faults[2:]):.0f} faults"
    )


if __name__ == "__main__":
    main()
