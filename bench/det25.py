"""Cost of replacing ``det`` from the third order by backward passes (det25): the Laplacian of
``det(I + MLP(x))`` (256 samples, 6 coordinates, float32) and its parameter gradients, by
``"grad-of-grad"`` and ``"auto"``, and ``weighted_laplacian`` with an indefinite ``A``; a
tanh MLP without ``det`` for the common path. Run once per tree and compare (A/B across two
processes, alternated: the rows, the watch's and the loop's node tables are built at import).

    flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \\
        PYTHONPATH=src python bench/det25.py
"""

from __future__ import annotations

import statistics
import time

import torch

import torchdiv

torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 9))
mlp = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
x = torch.randn(256, 6)
sym = torch.randn(6, 6)
indefinite = sym + sym.mT


def slater(z: torch.Tensor) -> torch.Tensor:
    return torch.linalg.det(torch.eye(3) + net(z).unflatten(-1, (3, 3)))


CASES = {
    "det grad-of-grad": lambda: torchdiv.laplacian(slater, x, method="grad-of-grad"),
    "det auto": lambda: torchdiv.laplacian(slater, x, method="auto"),
    "det wlap indefinite": lambda: torchdiv.weighted_laplacian(
        slater, x, diffusion=indefinite, method="grad-of-grad"
    ),
    "no det grad-of-grad": lambda: torchdiv.laplacian(mlp, x, method="grad-of-grad"),
}


def main() -> None:
    times: dict[str, list[float]] = {}
    for _ in range(40):
        for name, call in CASES.items():
            start = time.perf_counter()
            call().sum().backward()
            times.setdefault(name, []).append(time.perf_counter() - start)
    for name, t in times.items():
        t = t[5:]  # warm-up
        print(
            f"{name:22s} median {1e3 * statistics.median(t):6.1f} ms  "
            f"[{1e3 * min(t):.1f}, {1e3 * max(t):.1f}]"
        )


if __name__ == "__main__":
    main()
