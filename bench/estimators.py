"""Stochastic divergence: accuracy and cost of Hutchinson, Hutch++ and XTrace per sample.

Run:  .venv/bin/python bench/estimators.py [--rounds 3] [--min-run-time 0.2]
          [--json PATH | --update]
      .venv/bin/python bench/estimators.py --report bench/results/estimators.json

Accuracy: relative RMS error against the exact divergence (``method="auto"``), over every
sample of the batch and ``--repeats`` independent draws: ``sqrt(mean (est - exact)^2) /
sqrt(mean exact^2)`` (normalised by the RMS of the exact values, not per sample, because a
network's divergence can be near zero at some points). Cost: median time of one estimate,
divided by one forward pass of ``f`` and by the exact divergence, all timed side by side
(``torch.utils.benchmark``, round-robin, see ``_common.time_interleaved``). Cases:

  mlp64:   tanh MLP 64-128-128-64, 64 samples (a network Jacobian: flat spectrum)
  decay:   x -> A x, A symmetric with eigenvalues k^-2, n=256, 64 samples
  conv:    conv net 3-16-16-3 (tanh) on (32, 3, 8, 8) images
  one probe: 1-probe Hutchinson on the tanh MLP 256-256-256-256, batch 128 (the CNF staple),
           frozen parameters and trainable ones (then the forward pass builds its graph too)

Writes bench/results/local/estimators.json (git-ignored); --update replaces the committed
bench/results/estimators.json (every case).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
from _common import add_output_options, markdown, output_path, time_interleaved, write_json
from divergence_exact import convnet, mlp

import torchdiv

METHODS = ("hutchinson", "hutch++", "xtrace")
NUM_PROBES = (6, 12, 30, 60)


def decaying(n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    u, _ = torch.linalg.qr(torch.randn(n, n))
    a = u @ torch.diag(torch.arange(1, n + 1, dtype=torch.float32) ** -2.0) @ u.T
    return lambda x: x @ a.T


def frozen(module: torch.nn.Module) -> torch.nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


CASES: dict[str, Callable[[], tuple[Callable, torch.Tensor]]] = {
    "mlp64": lambda: (frozen(mlp(64, 128)), torch.randn(64, 64)),
    "decay": lambda: (decaying(256), torch.randn(64, 256)),
    "conv": lambda: (frozen(convnet()), torch.randn(32, 3, 8, 8)),
}
DESCRIPTIONS = {
    "mlp64": "tanh MLP D=64, B=64",
    "decay": "linear, eigenvalues k^-2, n=256, B=64",
    "conv": "conv 3-16-16-3 on (32, 3, 8, 8)",
}


def accuracy(f: Callable, x: torch.Tensor, exact: torch.Tensor, repeats: int) -> list[dict]:
    rows = []
    for method in METHODS:
        for m in NUM_PROBES:
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                est = torch.stack(
                    [
                        torchdiv.divergence(f, x, method=method, num_probes=m, generator=g)
                        for _ in range(repeats)
                    ]
                )
            rel = ((est - exact).square().mean() / exact.square().mean()).sqrt().item()
            rows.append({"method": method, "num_probes": m, "rel_rms_error": rel})
    return rows


def costs(
    f: Callable, x: torch.Tensor, rounds: int, min_run_time: float, probes: tuple[int, ...]
) -> dict[str, dict[str, float]]:
    calls = {"forward": lambda: f(x), "exact (auto)": lambda: torchdiv.divergence(f, x)}
    for method in METHODS:
        for m in probes:
            if m % (3 if method == "hutch++" else 2 if method == "xtrace" else 1) == 0:
                calls[f"{method} {m}"] = lambda method=method, m=m: torchdiv.divergence(
                    f, x, method=method, num_probes=m
                )
    with torch.no_grad():
        return time_interleaved(calls, rounds, min_run_time)


def run_case(name: str, repeats: int, rounds: int, min_run_time: float) -> list[dict]:
    torch.manual_seed(0)
    f, x = CASES[name]()
    with torch.no_grad():
        exact = torchdiv.divergence(f, x)
    times = costs(f, x, rounds, min_run_time, NUM_PROBES)
    rows = []
    for row in accuracy(f, x, exact, repeats):
        t = times[f"{row['method']} {row['num_probes']}"]
        rows.append(
            {
                "case": DESCRIPTIONS[name],
                **row,
                "median_ms": t["median_ms"],
                "iqr_ms": t["iqr_ms"],
                "x_forward": t["median_ms"] / times["forward"]["median_ms"],
                "x_exact": t["median_ms"] / times["exact (auto)"]["median_ms"],
                "forward_ms": times["forward"]["median_ms"],
                "exact_ms": times["exact (auto)"]["median_ms"],
            }
        )
    return rows


def one_probe(rounds: int, min_run_time: float) -> list[dict]:
    """1-probe Hutchinson against one forward pass, B=128, D=256 tanh MLP."""
    rows = []
    for scenario in ("frozen", "train"):
        torch.manual_seed(0)
        net = mlp(256, 256)
        if scenario == "frozen":
            frozen(net)
        x = torch.randn(128, 256)
        calls = {
            "forward": lambda net=net, x=x: net(x),
            "hutchinson 1": lambda net=net, x=x: torchdiv.divergence(
                net, x, method="hutchinson", num_probes=1
            ),
            "exact (auto)": lambda net=net, x=x: torchdiv.divergence(net, x),
        }
        t = time_interleaved(calls, rounds, min_run_time)
        fwd = t["forward"]["median_ms"]
        for name, r in t.items():
            rows.append(
                {
                    "case": f"tanh MLP D=256 B=128 ({scenario})",
                    "call": name,
                    "median_ms": r["median_ms"],
                    "iqr_ms": r["iqr_ms"],
                    "x_forward": r["median_ms"] / fwd,
                }
            )
    return rows


ACCURACY_COLUMNS = [
    ("case", "case"),
    ("method", "method"),
    ("num_probes", "products/sample"),
    ("rel_rms_error", "rel. RMS error"),
    ("median_ms", "ms (median)"),
    ("iqr_ms", "IQR ms"),
    ("x_forward", "x forward"),
    ("x_exact", "x exact"),
]
ONE_PROBE_COLUMNS = [
    ("case", "case"),
    ("call", "call"),
    ("median_ms", "ms (median)"),
    ("iqr_ms", "IQR ms"),
    ("x_forward", "x forward"),
]


def report(rows: list[dict]) -> str:
    acc = [r for r in rows if "method" in r]
    one = [r for r in rows if "call" in r]
    lines = [markdown(acc, ACCURACY_COLUMNS), "", markdown(one, ONE_PROBE_COLUMNS)]
    by_case = {}
    for r in acc:
        by_case.setdefault(r["case"], {})[(r["method"], r["num_probes"])] = r["rel_rms_error"]
    for case, err in by_case.items():
        ref = err[("hutchinson", 30)]
        ratios = ", ".join(f"{m} {err[(m, 30)] / ref:.3g}" for m in ("hutch++", "xtrace"))
        lines.append(f"\n{case}: error at 30 products relative to Hutchinson's: {ratios}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=8, help="independent draws per cell")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--report", type=Path, help="print the tables of a results JSON")
    add_output_options(parser, "estimators.json")
    args = parser.parse_args()
    if args.report:
        print(report(json.loads(args.report.read_text())["rows"]))
        return
    path = output_path(parser, args, "estimators.json", CASES)
    rows = []
    for name in args.cases.split(","):
        rows += run_case(name, args.repeats, args.rounds, args.min_run_time)
    rows += one_probe(args.rounds, args.min_run_time)
    write_json(path, rows)
    print(f"wrote {path}")
    print(report(rows))


if __name__ == "__main__":
    main()
