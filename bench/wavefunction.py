"""Laplacians of VMC wavefunctions: torchdiv against the loops VMC codes write with autograd.

Run:  flock /tmp/torchdiv-bench.lock .venv/bin/python bench/wavefunction.py [--rounds 5]
          [--min-run-time 0.4] [--cases sj16,sj8,fermi8]

Cases (float64, ``torchdiv._bench.wavefunctions``): Slater-Jastrow with N = 16 electrons
(48 inputs) and N = 8 at batch 256, FermiNet-like with N = 8 at batch 64. Methods:
  torchdiv auto                     (runs "taylor": rules for slogdet and every other op)
  torchdiv forward-over-reverse     (torch.func, with the ops PyTorch differentiates wrongly
                                     replaced)
  loop of grad-of-grad              (create_graph gradient, then one autograd.grad per input)
  forward-over-reverse (autograd.forward_ad)  (dual inputs, one backward per input; no
                                     torch.func; its gradients through slogdet are wrong)
Two scenarios: frozen (parameters do not require grad: evaluating the local energy) and train
(parameters require grad, results stay differentiable). Every result is checked against the
grad-of-grad loop before it is timed. Writes bench/results/local/wavefunction.json
(--update: the committed bench/results/wavefunction.json, after a run of every case).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from _common import compare, markdown, script

import torchdiv
from torchdiv._bench import recipes as _recipes
from torchdiv._bench.wavefunctions import FermiNetLike, SlaterJastrow

CASES: dict[str, Callable[[], tuple[torch.nn.Module, torch.Tensor]]] = {
    "sj16": lambda: (SlaterJastrow(16), torch.randn(256, 16, 3)),
    "sj8": lambda: (SlaterJastrow(8), torch.randn(256, 8, 3)),
    "fermi8": lambda: (FermiNetLike(8), torch.randn(64, 8, 3)),
}
DESCRIPTIONS = {
    "sj16": "Slater-Jastrow N=16, B=256",
    "sj8": "Slater-Jastrow N=8, B=256",
    "fermi8": "FermiNet-like N=8, B=64",
}
LOOP, DUAL = "loop of grad-of-grad", "forward-over-reverse (autograd.forward_ad)"


def methods(train: bool) -> dict[str, Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]]:
    return {
        "torchdiv auto": torchdiv.laplacian,
        "torchdiv forward-over-reverse": functools.partial(
            torchdiv.laplacian, method="forward-over-reverse"
        ),
        LOOP: functools.partial(_recipes.grad_of_grad, create_graph=train),
        DUAL: functools.partial(_recipes.dual_grad_loop, create_graph=train),
    }


def run_case(name: str, rounds: int, min_run_time: float) -> list[dict]:
    rows = []
    for scenario in ("frozen", "train"):
        torch.manual_seed(0)
        model, r = CASES[name]()
        model, r = model.double().requires_grad_(scenario == "train"), r.double()
        reference = _recipes.grad_of_grad(model, r).detach()
        calls = {
            m: functools.partial(fn, model, r) for m, fn in methods(scenario == "train").items()
        }
        fields = {"case": DESCRIPTIONS[name], "scenario": scenario}
        rows += compare(fields, calls, reference, 1e-9, rounds, min_run_time, RATIO)
    return rows


RATIO = ("vs_loop", lambda times: times[LOOP]["median_ms"])


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for case, scenario in dict.fromkeys((r["case"], r["scenario"]) for r in rows):
        group = {r["method"]: r for r in rows if (r["case"], r["scenario"]) == (case, scenario)}
        auto, loop, dual = group["torchdiv auto"], group[LOOP], group[DUAL]
        out.append(
            {
                "case": case,
                "scenario": scenario,
                "auto": f"{auto['median_ms']:.1f} ± {auto['iqr_ms']:.1f}",
                "loop": f"{loop['median_ms']:.1f} ± {loop['iqr_ms']:.1f}",
                "dual": f"{dual['median_ms']:.1f} ± {dual['iqr_ms']:.1f}",
                "vs_loop": auto["median_ms"] / loop["median_ms"],
                "vs_dual": auto["median_ms"] / dual["median_ms"],
                "auto_mb": auto["peak_mb"],
                "loop_mb": loop["peak_mb"],
            }
        )
    return out


def tables(rows: list[dict]) -> None:
    print(
        markdown(
            summary(rows),
            [
                ("case", "case"),
                ("scenario", "scenario"),
                ("auto", "auto ms (median ± IQR)"),
                ("loop", "grad-of-grad ms"),
                ("dual", "forward_ad fwd-over-rev ms"),
                ("vs_loop", "auto / grad-of-grad"),
                ("vs_dual", "auto / forward_ad"),
                ("auto_mb", "auto peak MiB"),
                ("loop_mb", "grad-of-grad peak MiB"),
            ],
        )
    )


def main() -> None:
    script(__doc__, CASES, run_case, "wavefunction.json", tables)


if __name__ == "__main__":
    main()
