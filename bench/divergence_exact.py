"""Exact per-sample divergence: torchdiv vs torch.func and the seed threads' recipes.

Run:  .venv/bin/python bench/divergence_exact.py [--rounds 5] [--min-run-time 0.4]
          [--cases mlp32,mlp256,mlp784,conv,mlp256x5,resmlp256,cnf256,conv3x16]

Two scenarios per case, all methods timed side by side in one run:
  frozen: parameters do not require grad (evaluation, e.g. a likelihood);
  train:  parameters require grad and every result must stay differentiable (the recipes that
          call autograd.grad use create_graph=True; torch.func and torchdiv do it by themselves).
Every result is checked against vmap(jacrev) + trace before it is timed; one forward pass of
f is timed in the same rounds, for scale. Writes bench/results/local/divergence_exact.json
(--update: the committed bench/results/divergence_exact.json, every case) and
prints markdown tables with ratios to the best torch.func recipe and to the best of all
baseline recipes of the same scenario.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from _common import compare, markdown, script

import torchdiv
from torchdiv._bench import recipes as _recipes


def mlp(d: int, h: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(d, h),
        torch.nn.Tanh(),
        torch.nn.Linear(h, h),
        torch.nn.Tanh(),
        torch.nn.Linear(h, d),
    )


def deep_mlp(d: int, h: int, layers: int) -> torch.nn.Module:
    sizes = [d, *[h] * (layers - 1), d]
    modules: list[torch.nn.Module] = []
    for i in range(layers):
        modules.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < layers - 1:
            modules.append(torch.nn.Tanh())
    return torch.nn.Sequential(*modules)


class Residual(torch.nn.Module):
    """``x + g(x)``."""

    def __init__(self, g: torch.nn.Module):
        super().__init__()
        self.g = g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.g(x)


class ConcatSquash(torch.nn.Module):
    """FFJORD's ConcatSquashLinear: ``Linear(x) * sigmoid(gate(t)) + bias(t)``."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = torch.nn.Linear(d_in, d_out)
        self.gate = torch.nn.Linear(1, d_out)
        self.bias = torch.nn.Linear(1, d_out, bias=False)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, 1)
        return self.linear(x) * torch.sigmoid(self.gate(t)) + self.bias(t)


class CNF(torch.nn.Module):
    """FFJORD's ODE net: ConcatSquash layers ``d -> h -> h -> d`` with tanh, at time ``t``
    (one time for the batch, as inside an ODE solve)."""

    def __init__(self, d: int, h: int, t: float = 0.5):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            [ConcatSquash(d, h), ConcatSquash(h, h), ConcatSquash(h, d)]
        )
        self.register_buffer("t", torch.tensor(t))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(self.t, x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


def convnet(width: int = 16) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, width, 3, padding=1),
        torch.nn.Tanh(),
        torch.nn.Conv2d(width, width, 3, padding=1),
        torch.nn.Tanh(),
        torch.nn.Conv2d(width, 3, 3, padding=1),
    )


CASES: dict[str, Callable[[], tuple[torch.nn.Module, torch.Tensor]]] = {
    "mlp32": lambda: (mlp(32, 256), torch.randn(128, 32)),
    "mlp256": lambda: (mlp(256, 256), torch.randn(128, 256)),
    "mlp784": lambda: (mlp(784, 512), torch.randn(32, 784)),
    "conv": lambda: (convnet(), torch.randn(8, 3, 16, 16)),
    "mlp256x5": lambda: (deep_mlp(256, 256, 5), torch.randn(128, 256)),
    "resmlp256": lambda: (Residual(mlp(256, 256)), torch.randn(128, 256)),
    "cnf256": lambda: (CNF(256, 256), torch.randn(128, 256)),
    "conv3x16": lambda: (convnet(32), torch.randn(32, 3, 16, 16)),
}
DESCRIPTIONS = {
    "mlp32": "tanh MLP D=32 B=128 H=256",
    "mlp256": "tanh MLP D=256 B=128 H=256",
    "mlp784": "tanh MLP D=784 B=32 H=512",
    "conv": "conv 3-16-16-3 on (8, 3, 16, 16)",
    "mlp256x5": "5-layer tanh MLP D=256 B=128 H=256",
    "resmlp256": "x + MLP(x), D=256 B=128 H=256",
    "cnf256": "ConcatSquash CNF net D=256 B=128 H=256",
    "conv3x16": "conv 3-32-32-3 on (32, 3, 16, 16)",
}

TORCH_FUNC = ("torch.func vmap(jacrev)", "torch.func vmap(jacfwd)")
BASELINES = (*TORCH_FUNC, "loop of autograd.grad", "autograd.grad(is_grads_batched)")
FORWARD = "one forward pass of f"


def methods(train: bool) -> dict[str, Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]]:
    ours = {
        "torchdiv auto": functools.partial(torchdiv.divergence, method="auto"),
        "torchdiv structured": functools.partial(torchdiv.divergence, method="structured"),
        "torchdiv forward": functools.partial(torchdiv.divergence, method="forward"),
        "torchdiv reverse": functools.partial(torchdiv.divergence, method="reverse"),
        "torchdiv forward chunk=64": functools.partial(
            torchdiv.divergence, method="forward", chunk_size=64
        ),
        "torchdiv reverse chunk=64": functools.partial(
            torchdiv.divergence, method="reverse", chunk_size=64
        ),
    }
    recipes = {
        name: functools.partial(_recipes.RECIPES[name], create_graph=train)
        if name in ("loop of autograd.grad", "autograd.grad(is_grads_batched)")
        else _recipes.RECIPES[name]
        for name in BASELINES
    }
    return {**ours, **recipes}


def setup(name: str, scenario: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net, x = CASES[name]()
    net.requires_grad_(scenario == "train")
    return net, x


def run_case(name: str, rounds: int, min_run_time: float) -> list[dict]:
    """Every method on one case, both scenarios: correctness, peak memory, interleaved times."""
    rows = []
    for scenario in ("frozen", "train"):
        net, x = setup(name, scenario)
        reference = _recipes.vmap_jacrev(net, x).detach()
        calls = {m: functools.partial(fn, net, x) for m, fn in methods(scenario == "train").items()}
        fields = {"case": DESCRIPTIONS[name], "scenario": scenario}
        forward = {FORWARD: functools.partial(net, x)}
        rows += compare(fields, calls, reference, 1e-4, rounds, min_run_time, RATIO, forward)
    return rows


def _best_baseline(times: dict[str, dict[str, float]]) -> float:
    return min(times[m]["median_ms"] for m in BASELINES if m in times)


RATIO = ("vs_best_baseline", _best_baseline)


def _best_of(group: dict[str, dict], names: tuple[str, ...]) -> str:
    return min((m for m in names if "median_ms" in group[m]), key=lambda m: group[m]["median_ms"])


def summary(rows: list[dict]) -> list[dict]:
    """One line per case and scenario: auto against the best recipes and a forward pass."""
    out = []
    for case, scenario in dict.fromkeys((r["case"], r["scenario"]) for r in rows):
        group = {r["method"]: r for r in rows if (r["case"], r["scenario"]) == (case, scenario)}
        best, func = _best_of(group, BASELINES), _best_of(group, TORCH_FUNC)
        auto, chunked = group["torchdiv auto"], group["torchdiv reverse chunk=64"]
        out.append(
            {
                "case": case,
                "scenario": scenario,
                "auto": f"{auto['median_ms']:.2f} ± {auto['iqr_ms']:.2f}",
                "func": f"{func[11:]}: {group[func]['median_ms']:.1f}",
                "vs_func": auto["median_ms"] / group[func]["median_ms"],
                "best": f"{best}: {group[best]['median_ms']:.1f}",
                "ratio": auto["vs_best_baseline"],
                "vs_forward": auto["median_ms"] / group[FORWARD]["median_ms"],
                "auto_mb": auto["peak_mb"],
                "jacrev_mb": group["torch.func vmap(jacrev)"]["peak_mb"],
                "chunk64": f"{chunked['median_ms']:.1f} ms, {chunked['peak_mb']:.1f} MiB",
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
                ("func", "best torch.func ms"),
                ("vs_func", "auto / torch.func"),
                ("best", "best recipe ms"),
                ("ratio", "auto / best recipe"),
                ("vs_forward", "auto / forward pass"),
                ("auto_mb", "auto peak MiB"),
                ("jacrev_mb", "vmap(jacrev) peak MiB"),
                ("chunk64", "reverse, chunk_size=64"),
            ],
        )
    )
    print(
        markdown(
            rows,
            [
                ("case", "case"),
                ("scenario", "scenario"),
                ("method", "method"),
                ("median_ms", "median ms"),
                ("iqr_ms", "IQR ms"),
                ("vs_best_baseline", "x best recipe"),
                ("peak_mb", "peak MiB"),
            ],
        )
    )


def main() -> None:
    script(__doc__, CASES, run_case, "divergence_exact.json", tables)


if __name__ == "__main__":
    main()
