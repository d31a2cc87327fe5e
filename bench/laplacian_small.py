"""Exact Laplacian at low dimension: where the forward Laplacian stops paying, and "auto".

Run:  flock /tmp/torchdiv-bench.lock env OMP_WAIT_POLICY=PASSIVE DDE_BACKEND=pytorch \
          .venv/bin/python bench/laplacian_small.py [--rounds 5] [--min-run-time 0.4] [--cases ...]

Cases: tanh FNNs D -> 64 -> 64 -> 64 -> 1 (a DeepXDE-style PINN) at D = 2, 3, 10, 100 and
batch 256 and 2048, and a Chebyshev KAN (features ``T_d(tanh x) = cos(d acos(tanh x))``,
d = 0..5, mixed by learned coefficients) D -> 8 -> 8 -> 1 at D = 2, 3; and the biharmonic of
the FNN at D = 2, 3, 10 (batch 256, float64), by Taylor in Taylor, nested forward-over-reverse
and nested loops, checked against nested forward-over-reverse. Two scenarios:
  frozen: evaluate the Laplacian (a residual);
  train:  parameters require grad, the Laplacian and its backward pass to every parameter
          (one step of a PINN loss), the cost that matters in training.
Methods side by side in one run: torchdiv's exact methods, the loop of grad-of-grad (its second
graph kept only in training), ``torch.func`` ``vmap(hessian)`` and, if DeepXDE is installed
(``DDE_BACKEND=pytorch``), the sum of ``dde.grad.hessian(y, x, i=j, j=j)`` (which keeps its
graph even when frozen, as DeepXDE does). Every result is checked against ``vmap(hessian)``
before it is timed. Writes bench/results/laplacian_small.json and prints markdown tables;
"auto / best" is auto's median over the fastest other method's.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable

import torch
from _common import compare, markdown, script
from torch import nn

import torchdiv
from torchdiv._bench import recipes as _recipes

os.environ.setdefault("DDE_BACKEND", "pytorch")
DEEPXDE_MISSING = None  # why the DeepXDE column is left out, printed by main()
try:  # a baseline only: DeepXDE is not a dependency of torchdiv
    import deepxde as dde
except ImportError as exc:
    dde = None
    DEEPXDE_MISSING = f"deepxde hessian sum: left out, import deepxde failed ({exc})"
torch.set_default_dtype(torch.float32)  # DeepXDE may have changed it


def fnn(d: int, width: int = 64, depth: int = 3, outputs: int = 1) -> nn.Module:
    widths = (d, *[width] * depth, outputs)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers += [nn.Linear(a, b), nn.Tanh()] if i < len(widths) - 2 else [nn.Linear(a, b)]
    return nn.Sequential(*layers)


class ChebyshevKAN(nn.Module):
    """A Chebyshev KAN layer: ``y_o = Σ_i Σ_d c_{iod} T_d(tanh x_i)``."""

    def __init__(self, d_in: int, d_out: int, degree: int = 5):
        super().__init__()
        self.coefficients = nn.Parameter(torch.randn(d_in, d_out, degree + 1) / (d_in * degree))
        self.register_buffer("orders", torch.arange(degree + 1, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(x).unsqueeze(-1)  # (B, d_in, 1)
        features = torch.cos(self.orders * torch.acos(t))  # (B, d_in, degree + 1)
        return torch.einsum("bid,iod->bo", features, self.coefficients)


def kan(d: int) -> nn.Module:
    return nn.Sequential(ChebyshevKAN(d, 8), ChebyshevKAN(8, 8), ChebyshevKAN(8, 1))


CASES: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    **{
        f"fnn{d}-{b}": functools.partial(lambda d, b: (fnn(d), torch.randn(b, d)), d, b)
        for d in (2, 3, 10, 100)
        for b in (256, 2048)
    },
    **{
        f"kan{d}-{b}": functools.partial(lambda d, b: (kan(d), torch.rand(b, d) * 2 - 1), d, b)
        for d in (2, 3)
        for b in (256, 2048)
    },
    **{
        f"biharmonic-fnn{d}-{b}": functools.partial(lambda d, b: (fnn(d), torch.randn(b, d)), d, b)
        for d, b in ((2, 256), (3, 256), (10, 256))
    },
}


def dde_hessian_sum(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """DeepXDE's PINN idiom: ``Σ_j dde.grad.hessian(y, x, i=j, j=j)`` (its cache cleared)."""
    dde.grad.clear()
    x = x.detach().requires_grad_(True)
    y = f(x)
    out = sum(dde.grad.hessian(y, x, i=j, j=j) for j in range(x.shape[1]))
    dde.grad.clear()
    return out.squeeze(-1)


def methods(train: bool = False) -> dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
    """The Laplacians timed; the loop keeps its second graph only in training (``train``), as
    torchdiv does: frozen, a graph nobody differentiates is work the others do not do.
    DeepXDE's ``hessian`` keeps it always (its own behaviour, as its users run it)."""
    ours = {
        f"torchdiv {m}": functools.partial(torchdiv.laplacian, method=m)
        for m in ("auto", "taylor", "forward-over-reverse")
    }
    out = {
        **ours,
        "loop of grad-of-grad": functools.partial(_recipes.grad_of_grad, create_graph=train),
        "torch.func vmap(hessian)": _recipes.vmap_hessian_trace,
    }
    if dde is not None:
        out["deepxde hessian sum"] = dde_hessian_sum
    return out


def _step(method: Callable, net: nn.Module, x: torch.Tensor, train: bool) -> torch.Tensor:
    """The Laplacian, and in training its backward pass to the parameters."""
    lap = method(net, x).reshape(len(x))
    if train:
        torch.autograd.grad(lap.square().sum(), list(net.parameters()), allow_unused=True)
    return lap.detach()


def nested_loop(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The biharmonic by the loop of backward passes at both levels."""
    inner = functools.partial(torchdiv.laplacian, method="grad-of-grad")
    return torchdiv.laplacian(lambda z: inner(net, z), x, method="grad-of-grad")


def biharmonic_methods() -> dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
    ours = {
        f"torchdiv {m}": functools.partial(torchdiv.biharmonic, method=m)
        for m in ("auto", "taylor", "forward-over-reverse")
    }
    return {**ours, "loop of grad-of-grad, nested": nested_loop}


def run_case(name: str, rounds: int, min_run_time: float) -> list[dict]:
    biharmonic = name.startswith("biharmonic")
    rows = []
    for scenario in ("frozen", "train"):
        torch.manual_seed(0)
        net, x = CASES[name]()
        train = scenario == "train"
        net.requires_grad_(train)
        if biharmonic:  # float64: fourth derivatives in float32 agree to a few digits only
            net, x = net.double(), x.double()
            reference = torchdiv.biharmonic(net, x, method="forward-over-reverse").detach()
        else:
            reference = _recipes.vmap_hessian_trace(net, x).detach()
        calls = {
            m: functools.partial(_step, fn, net, x, train)
            for m, fn in (biharmonic_methods() if biharmonic else methods(train)).items()
        }
        for method, call in list(calls.items()):
            try:
                call()
            except NotImplementedError as exc:  # "taylor" without a rule (acos): not timed
                print(name, scenario, method, "unsupported:", str(exc)[:120], flush=True)
                del calls[method]
        fields = {"case": name, "scenario": scenario}
        ratio = BIHARMONIC_RATIO if biharmonic else RATIO
        rows += compare(fields, calls, reference, 1e-3, rounds, min_run_time, ratio)
    return rows


RATIO = ("vs_vmap_hessian", lambda times: times["torch.func vmap(hessian)"]["median_ms"])
BIHARMONIC_RATIO = (
    "vs_nested_autodiff",
    lambda times: times["torchdiv forward-over-reverse"]["median_ms"],
)


def summary(rows: list[dict]) -> list[dict]:
    """One line per case and scenario: every method's median, and auto over the best other."""
    out = []
    for case, scenario in dict.fromkeys((r["case"], r["scenario"]) for r in rows):
        group = {r["method"]: r for r in rows if (r["case"], r["scenario"]) == (case, scenario)}
        timed = {m: r["median_ms"] for m, r in group.items() if "median_ms" in r}
        others = {m: t for m, t in timed.items() if m != "torchdiv auto"}
        best = min(others, key=others.get)
        line = {"case": case, "scenario": scenario}
        line.update({m: f"{t:.2f}" for m, t in timed.items()})
        line["best"] = best
        line["auto_vs_best"] = timed["torchdiv auto"] / others[best]
        out.append(line)
    return out


def tables(rows: list[dict]) -> None:
    for part in (
        [r for r in rows if not r["case"].startswith("biharmonic")],
        [r for r in rows if r["case"].startswith("biharmonic")],
    ):
        if not part:
            continue
        names = list(dict.fromkeys(r["method"] for r in part))
        columns = [("case", "case"), ("scenario", "scenario")]
        columns += [(m, f"{m} ms") for m in names]
        columns += [("best", "fastest other"), ("auto_vs_best", "auto / fastest other")]
        print(markdown(summary(part), columns))


def main() -> None:
    if DEEPXDE_MISSING is not None:
        print(DEEPXDE_MISSING, flush=True)
    script(__doc__, CASES, run_case, "laplacian_small.json", tables)


if __name__ == "__main__":
    main()
