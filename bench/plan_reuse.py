"""Plans reused across calls: exact divergence against a forward pass, and along an ODE solve.

Run:  flock /tmp/torchdiv-bench.lock env OMP_WAIT_POLICY=PASSIVE \
          .venv/bin/python bench/plan_reuse.py [--rounds 5] [--min-run-time 0.4] [--cases ...]

Cases:
  mlp256: a 3-layer tanh MLP, D = 256, B = 128, H = 256, frozen and train: ``divergence``
          with its plan reused (the steady state of repeated calls), planned afresh at every
          call (the kept recordings and products cleared first), and one forward pass.
  cnf:    ``flows.log_likelihood`` of FFJORD's ConcatSquash MLP (D = 16, H = 64, B = 256,
          dopri5, rtol = atol = 1e-5, frozen) with the exact divergence (plans reused, or
          afresh) and with one-probe Hutchinson.
The results of each case are checked against each other before timing. Writes
bench/results/local/plan_reuse.json (--update: bench/results/plan_reuse.json).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from _common import compare, markdown, script
from divergence_exact import CNF, mlp

import torchdiv
from torchdiv._structured import products
from torchdiv._taylor import cache
from torchdiv.flows import log_likelihood


def afresh(call: Callable[[], Any]) -> Callable[[], Any]:
    """``call`` with nothing kept, from earlier calls or within it (every evaluation of ``f``
    recorded and planned again, as before plans were kept)."""

    def run() -> Any:
        cache.RECORDINGS.clear()
        products.clear()
        size, largest = cache.RECORDINGS.size, products.MAX_FACTOR_ELEMENTS
        cache.RECORDINGS.size, products.MAX_FACTOR_ELEMENTS = 0, 0
        try:
            return call()
        finally:
            cache.RECORDINGS.size, products.MAX_FACTOR_ELEMENTS = size, largest

    return run


def _mlp256(rounds: int, min_run_time: float) -> list[dict]:
    rows = []
    for scenario in ("frozen", "train"):
        torch.manual_seed(0)
        net, x = mlp(256, 256).requires_grad_(scenario == "train"), torch.randn(128, 256)
        reused = functools.partial(torchdiv.divergence, net, x)
        calls = {"divergence, plan reused": reused, "divergence, planned afresh": afresh(reused)}
        forward = {"one forward pass": functools.partial(net, x)}
        fields = {"case": "tanh MLP D=256 B=128 H=256", "scenario": scenario}
        ratio = ("vs_baseline", lambda t: t["one forward pass"]["median_ms"])
        rows += compare(
            fields, calls, reused().detach(), 1e-4, rounds, min_run_time, ratio, forward
        )
    return rows


def _cnf(rounds: int, min_run_time: float) -> list[dict]:
    torch.manual_seed(0)
    net, x = CNF(16, 64).requires_grad_(False), torch.randn(256, 16)

    def field(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        net.t = t
        return net(z)

    def base(z: torch.Tensor) -> torch.Tensor:
        return -0.5 * z.square().sum(-1)

    def solve(**options: Any) -> torch.Tensor:
        return log_likelihood(field, x, 0.0, 1.0, base, rtol=1e-5, atol=1e-5, **options)

    exact = functools.partial(solve, method="auto")
    generator = torch.Generator().manual_seed(0)
    one_probe = functools.partial(solve, method="hutchinson", num_probes=1, generator=generator)
    calls = {"exact, plan reused": exact, "exact, planned afresh": afresh(exact)}
    fields = {"case": "ConcatSquash CNF D=16 H=64 B=256, dopri5", "scenario": "frozen"}
    ratio = ("vs_baseline", lambda t: t["one-probe Hutchinson"]["median_ms"])
    unchecked = {"one-probe Hutchinson": one_probe}
    with torch.no_grad():
        reference = exact()
    return compare(fields, calls, reference, 1e-4, rounds, min_run_time, ratio, unchecked)


CASES = {"mlp256": _mlp256, "cnf": _cnf}


def run_case(name: str, rounds: int, min_run_time: float) -> list[dict]:
    return CASES[name](rounds, min_run_time)


def tables(rows: list[dict]) -> None:
    columns = [
        ("case", "case"),
        ("scenario", "scenario"),
        ("method", "method"),
        ("median_ms", "median ms"),
        ("iqr_ms", "IQR ms"),
        ("vs_baseline", "x forward pass (mlp256) / x one-probe solve (cnf)"),
    ]
    print(markdown(rows, columns))


def main() -> None:
    script(__doc__, CASES, run_case, "plan_reuse.json", tables)


if __name__ == "__main__":
    main()
