"""Exact per-sample Laplacian: torchdiv's methods vs torch.func and the grad-of-grad loop.

Run:  .venv/bin/python bench/laplacian.py [--rounds 5] [--min-run-time 0.4]
                                          [--cases paper256,mlp8,mlp32,mlp128,conv,attention]

Cases: the collapsed-Taylor paper's MLP (D=50 -> 768 -> 768 -> 512 -> 512 -> 1, tanh) over
batch sizes, tanh MLPs D -> 128 -> 128 -> 1 at B=256, a small conv net on 8x8 images and a
small attention block. Two scenarios, all methods timed side by side in one run:
  frozen: parameters do not require grad (evaluating a PDE residual);
  train:  parameters require grad and every result stays differentiable (a PINN loss).
Every result is checked against vmap(hessian) + trace before it is timed. Writes
bench/results/local/laplacian.json (--update: the committed bench/results/laplacian.json, every
case) and prints markdown tables.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable

import torch
from _common import compare, markdown, script
from torch import nn

import torchdiv
from torchdiv._bench import recipes as _recipes


def mlp(*widths: int) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers += [nn.Linear(a, b), nn.Tanh()] if i < len(widths) - 2 else [nn.Linear(a, b)]
    return nn.Sequential(*layers)


def convnet() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(512, 1),
    )


class Attention(nn.Module):
    """One pre-norm self-attention block over 8 tokens of width 16, tanh head to a scalar.
    Attention written out (softmax(q k^T / sqrt(d)) v) so that torch.func's forward mode runs."""

    def __init__(self, tokens: int = 8, width: int = 16):
        super().__init__()
        self.tokens, self.width = tokens, width
        self.norm, self.qkv = nn.LayerNorm(width), nn.Linear(width, 3 * width)
        self.head = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x.reshape(len(x), self.tokens, self.width))
        q, k, v = self.qkv(h).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(self.width), -1) @ v
        return self.head(a + h).sum((1, 2))


PAPER = (50, 768, 768, 512, 512, 1)
CASES: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "paper32": lambda: (mlp(*PAPER), torch.randn(32, 50)),
    "paper128": lambda: (mlp(*PAPER), torch.randn(128, 50)),
    "paper256": lambda: (mlp(*PAPER), torch.randn(256, 50)),
    "mlp8": lambda: (mlp(8, 128, 128, 1), torch.randn(256, 8)),
    "mlp32": lambda: (mlp(32, 128, 128, 1), torch.randn(256, 32)),
    "mlp128": lambda: (mlp(128, 128, 128, 1), torch.randn(256, 128)),
    "conv": lambda: (convnet(), torch.randn(64, 64)),
    "attention": lambda: (Attention(), torch.randn(64, 128)),
}
DESCRIPTIONS = {
    "paper32": "paper MLP 50-768-768-512-512-1, B=32",
    "paper128": "paper MLP 50-768-768-512-512-1, B=128",
    "paper256": "paper MLP 50-768-768-512-512-1, B=256",
    "mlp8": "tanh MLP D=8 H=128 B=256",
    "mlp32": "tanh MLP D=32 H=128 B=256",
    "mlp128": "tanh MLP D=128 H=128 B=256",
    "conv": "conv 1-8-8 on 8x8, B=64",
    "attention": "attention 8 tokens x 16, B=64",
}
EXACT = ("auto", "taylor", "forward-over-reverse", "hessian")
BASELINES = ("torch.func vmap(hessian)", "loop of grad-of-grad")


def methods(train: bool) -> dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
    ours = {f"torchdiv {m}": functools.partial(torchdiv.laplacian, method=m) for m in EXACT}
    return {
        **ours,
        "torch.func vmap(hessian)": _recipes.vmap_hessian_trace,
        "loop of grad-of-grad": functools.partial(_recipes.grad_of_grad, create_graph=train),
    }


def run_case(name: str, rounds: int, min_run_time: float) -> list[dict]:
    """Every method on one case, both scenarios: correctness, peak memory, interleaved times."""
    rows = []
    for scenario in ("frozen", "train"):
        torch.manual_seed(0)
        net, x = CASES[name]()
        net.requires_grad_(scenario == "train")
        reference = _recipes.vmap_hessian_trace(net, x).detach()
        calls = {m: functools.partial(fn, net, x) for m, fn in methods(scenario == "train").items()}
        fields = {"case": DESCRIPTIONS[name], "scenario": scenario}
        # float32 second derivatives through a few layers: agreement to 1e-3 of the scale
        rows += compare(fields, calls, reference, 1e-3, rounds, min_run_time, RATIO)
    return rows


RATIO = ("vs_vmap_hessian", lambda times: times["torch.func vmap(hessian)"]["median_ms"])


def summary(rows: list[dict]) -> list[dict]:
    """One line per case and scenario: taylor and auto against vmap(hessian), and memory."""
    out = []
    for case, scenario in dict.fromkeys((r["case"], r["scenario"]) for r in rows):
        group = {r["method"]: r for r in rows if (r["case"], r["scenario"]) == (case, scenario)}
        taylor, auto = group["torchdiv taylor"], group["torchdiv auto"]
        ref = group["torch.func vmap(hessian)"]
        exact = [f"torchdiv {m}" for m in EXACT[1:] if "median_ms" in group[f"torchdiv {m}"]]
        best = min(group[m]["median_ms"] for m in exact)
        loop = group["loop of grad-of-grad"]
        out.append(
            {
                "case": case,
                "scenario": scenario,
                "taylor": f"{taylor['median_ms']:.1f} ± {taylor['iqr_ms']:.1f}",
                "hessian": f"{ref['median_ms']:.1f} ± {ref['iqr_ms']:.1f}",
                "loop": f"{loop['median_ms']:.1f}",
                "time_ratio": taylor["median_ms"] / ref["median_ms"],
                "memory_ratio": taylor["peak_mb"] / ref["peak_mb"],
                "taylor_mb": taylor["peak_mb"],
                "auto_vs_best": auto["median_ms"] / best,
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
                ("taylor", "taylor ms (median ± IQR)"),
                ("hessian", "vmap(hessian) ms"),
                ("loop", "grad-of-grad ms"),
                ("time_ratio", "taylor / vmap(hessian) time"),
                ("memory_ratio", "taylor / vmap(hessian) peak memory"),
                ("taylor_mb", "taylor peak MiB"),
                ("auto_vs_best", "auto / best exact"),
            ],
        )
    )


def main() -> None:
    script(__doc__, CASES, run_case, "laplacian.json", tables)


if __name__ == "__main__":
    main()
