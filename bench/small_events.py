"""Small events (the 2-D to 64-D flows of zuko and torchdyn): "auto" against the recipes.

Run:  flock /tmp/torchdiv-bench.lock env OMP_WAIT_POLICY=PASSIVE \
          .venv/bin/python bench/small_events.py [--rounds 5] [--min-run-time 0.4] [--cases ...]

Cases: MLPs D -> 64 -> 64 -> D (tanh; ELU for the divergence too) at D = 2, 8, 16, 32, 64 and
batch 256 and 4096, for ``divergence``, ``jacobian_diagonal`` and ``jacobian``. Two
scenarios: frozen (parameters do not require grad) and train (they do; the recipes that call
``autograd.grad`` keep a graph, ``create_graph=True``). The recipes, written the way their
libraries write them:
  vmap(jacrev):        ``torch.func.vmap(torch.func.jacrev(f_one_sample))``;
  is_grads_batched:    one ``autograd.grad`` over the whole identity basis
                       (``is_grads_batched=True``), as zuko's exact FFJ transform does;
  torchdyn loop:       ``grad(y[:, i].sum(), x, create_graph=True)[0][:, i]`` for each i,
                       as torchdyn's ``autograd_trace`` (divergence and diagonal only): it
                       keeps the graph even when frozen, more work than the others do;
  loop of autograd.grad: the same loop keeping the graph only in training, as the seed
                       threads write it (``torchdiv._bench.recipes``; divergence and diagonal).
Every result is checked against vmap(jacrev) before it is timed; one forward pass of f is timed
in the same rounds, for scale. "auto / best" is auto's median over the fastest recipe's. Writes
bench/results/local/small_events.json (--update: bench/results/small_events.json).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from _common import compare, markdown, script
from torch import nn
from torch.func import jacrev, vmap

import torchdiv
from torchdiv._bench import recipes as _recipes

Function = Callable[[torch.Tensor], torch.Tensor]
OPERATORS = ("divergence", "jacobian_diagonal", "jacobian")


def mlp(d: int, activation: type[nn.Module]) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d, 64), activation(), nn.Linear(64, 64), activation(), nn.Linear(64, d)
    )


def _per_sample_jacobian(f: Function, x: torch.Tensor) -> torch.Tensor:
    return vmap(jacrev(lambda z: f(z[None])[0]))(x)  # (B, D, D)


def _batched_rows(f: Function, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """Every row of every sample's Jacobian, ``(D, B, D)``: one ``autograd.grad`` whose
    cotangents are the identity expanded over the batch (zuko's exact trace)."""
    x = x.detach().requires_grad_(True)
    y = f(x)
    eye = torch.eye(x.shape[-1], dtype=x.dtype).expand(*x.shape, -1).movedim(-1, 0)
    (rows,) = torch.autograd.grad(y, x, eye, create_graph=create_graph, is_grads_batched=True)
    return rows


def _loop_entries(f: Function, x: torch.Tensor) -> torch.Tensor:
    """``d y_i / d x_i`` of every sample, ``(B, D)``: torchdyn's ``autograd_trace`` loop, one
    ``grad`` of a column sum per dimension, always with ``create_graph=True``."""
    x = x.detach().requires_grad_(True)
    y = f(x)
    entries = [
        torch.autograd.grad(y[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(x.shape[1])
    ]
    return torch.stack(entries, -1)


Recipe = Callable[[Function, torch.Tensor], torch.Tensor]


def recipes(operator: str, train: bool) -> dict[str, Recipe]:
    if operator == "divergence":
        return {
            "vmap(jacrev)": lambda f, x: torch.einsum("bii->b", _per_sample_jacobian(f, x)),
            "is_grads_batched (zuko)": lambda f, x: torch.einsum(
                "i...i", _batched_rows(f, x, train)
            ),
            "torchdyn loop": lambda f, x: _loop_entries(f, x).sum(-1),
            "loop of autograd.grad": lambda f, x: _recipes.loop_grad(f, x, train),
        }
    if operator == "jacobian_diagonal":
        return {
            "vmap(jacrev)": lambda f, x: _per_sample_jacobian(f, x).diagonal(dim1=1, dim2=2),
            "is_grads_batched (zuko)": lambda f, x: _batched_rows(f, x, train).diagonal(
                dim1=0, dim2=2
            ),
            "torchdyn loop": lambda f, x: _loop_entries(f, x),
            "loop of autograd.grad": lambda f, x: _recipes.loop_grad_diagonal(f, x, train),
        }
    return {
        "vmap(jacrev)": _per_sample_jacobian,
        "is_grads_batched (zuko)": lambda f, x: _batched_rows(f, x, train).movedim(0, 1),
    }


ACTIVATIONS = {"tanh": nn.Tanh, "elu": nn.ELU}
DIMS = (2, 8, 16, 32, 64)
BATCHES = (256, 4096)
CASES = {
    f"{act}-{op}": (act, op)
    for op in OPERATORS
    for act in (("tanh", "elu") if op == "divergence" else ("tanh",))
}
AUTO = "torchdiv auto"
FORWARD = "one forward pass of f"


def _best(times: dict[str, dict[str, float]]) -> float:
    return min(v["median_ms"] for k, v in times.items() if k not in (AUTO, FORWARD))


def run_case(name: str, rounds: int, min_run_time: float) -> list[dict]:
    act, operator = CASES[name]
    rows = []
    for d in DIMS:
        for batch in BATCHES:
            for scenario in ("frozen", "train"):
                torch.manual_seed(0)
                net = mlp(d, ACTIVATIONS[act]).requires_grad_(scenario == "train")
                x = torch.randn(batch, d)
                reference = recipes(operator, False)["vmap(jacrev)"](net, x).detach()
                ours = functools.partial(getattr(torchdiv, operator), net, x)
                calls = {AUTO: ours}
                calls |= {
                    k: functools.partial(r, net, x)
                    for k, r in recipes(operator, scenario == "train").items()
                }
                fields = {"operator": operator, "activation": act, "D": d, "B": batch}
                fields["scenario"] = scenario
                fwd = {FORWARD: functools.partial(net, x)}
                ratio = ("vs_best", _best)
                rows += compare(fields, calls, reference, 1e-4, rounds, min_run_time, ratio, fwd)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """One line per operator, activation, D, B and scenario: auto against the best recipe."""
    out = []
    keys = ("operator", "activation", "D", "B", "scenario")
    for group_key in dict.fromkeys(tuple(r[k] for k in keys) for r in rows):
        group = {r["method"]: r for r in rows if tuple(r[k] for k in keys) == group_key}
        timed = [m for m, r in group.items() if "median_ms" in r and m not in (AUTO, FORWARD)]
        best = min(timed, key=lambda m: group[m]["median_ms"])
        auto = group[AUTO]
        out.append(
            {
                **dict(zip(keys, group_key, strict=True)),
                "auto": f"{auto['median_ms']:.2f} ± {auto['iqr_ms']:.2f}",
                "best": f"{best}: {group[best]['median_ms']:.2f} ± {group[best]['iqr_ms']:.2f}",
                "ratio": auto["vs_best"],
                "vs_forward": auto["median_ms"] / group[FORWARD]["median_ms"],
            }
        )
    return out


def tables(rows: list[dict]) -> None:
    print(
        markdown(
            summary(rows),
            [
                ("operator", "operator"),
                ("activation", "act"),
                ("D", "D"),
                ("B", "B"),
                ("scenario", "scenario"),
                ("auto", "auto ms (median ± IQR)"),
                ("best", "best recipe ms"),
                ("ratio", "auto / best"),
                ("vs_forward", "auto / forward"),
            ],
        )
    )


def main() -> None:
    script(__doc__, CASES, run_case, "small_events.json", tables)


if __name__ == "__main__":
    main()
