"""Issue 19's two D = 2 cells that miss 1.05 (the tanh MLP's ``jacobian_diagonal`` and zuko's
CNF velocity divergence, batch 256), ``"auto"`` of two source trees alternated in one process:
each tree's ``torchdiv`` is imported apart and its modules put back in ``sys.modules`` before
each run of its calls (lazy imports inside functions find their own tree). Per round, every
variant's calls and the recipes' run one after another, ``--calls`` calls each, thread CPU
time, in an order shuffled anew every round (reversing it every other round ran the one at
both ends twice in a row, 3-7 % faster); the median of the rounds. Prints each tree's median
per call and its ratio to the best recipe's, and the median of the trees' ratios per round
(the same tree loaded twice: 0.98-1.02). ``--part``: one expression timed instead (a function
of torchdiv on the cell's ``f`` and ``x``), the median of the trees' differences per round.

    flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
        .venv/bin/python bench/percall_ab.py --tree base=OTHER/src --tree new=src [--rounds 21]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import pkgutil
import random
import statistics
import sys
import time
from collections.abc import Callable
from types import ModuleType

import small_events
import torch


def load(path: str) -> dict[str, ModuleType]:
    """The modules of the ``torchdiv`` under ``path``, imported apart from any other, every
    one of them now: one imported lazily by a call would stay in ``sys.modules`` for the other
    tree's calls (each tree read the other's caches; the tree loaded second ran 3-8 % slower
    than the same code loaded first)."""
    for name in [n for n in sys.modules if n == "torchdiv" or n.startswith("torchdiv.")]:
        del sys.modules[name]
    sys.path.insert(0, path)
    try:
        package = importlib.import_module("torchdiv")
        for module in pkgutil.walk_packages(package.__path__, "torchdiv."):
            if module.name != "torchdiv.__main__":
                importlib.import_module(module.name)  # (not lazily, into the other tree's)
    finally:
        sys.path.remove(path)
    return {n: m for n, m in sys.modules.items() if n == "torchdiv" or n.startswith("torchdiv.")}


def cases(train: bool) -> dict[str, tuple[Callable, torch.Tensor, str]]:
    """``{cell: (f, x, operator)}``: the tanh MLP's diagonal and zuko's velocity's divergence."""
    torch.manual_seed(0)
    net = small_events.mlp(2, torch.nn.Tanh).requires_grad_(train)
    out: dict[str, tuple[Callable, torch.Tensor, str]] = {
        "jacobian_diagonal-D2": (net, torch.randn(256, 2), "jacobian_diagonal")
    }
    try:
        from zuko.flows.continuous import FFJTransform
    except ImportError:
        return out
    torch.manual_seed(0)
    transform = FFJTransform(2).requires_grad_(train)
    velocity = functools.partial(transform.f, torch.tensor(0.3))
    out["zuko-cnf-divergence-D2"] = (velocity, torch.randn(256, 2), "divergence")
    return out


def _part(
    expression: str, setup: str, modules: dict[str, ModuleType], f: Callable, x: torch.Tensor
) -> Callable[[], object]:
    """``--part``: ``expression`` as a function of nothing, over this tree's modules (``s``:
    ``setup``'s value, made once)."""
    sys.modules.update(modules)
    xl = x.detach().requires_grad_(True)
    names = {"m": modules.__getitem__, "f": f, "x": x, "xl": xl, "y": f(xl), "torch": torch}
    names["s"] = eval(setup, names) if setup else None
    return eval(f"lambda: {expression}", names)  # (the command line's)


def run(
    modules: dict[str, ModuleType] | None, call: Callable[[], object], calls: int
) -> tuple[float, object]:
    """Thread CPU time per call in us over ``calls`` calls (a tree's modules put back first,
    untimed), and the last call's result."""
    if modules is not None:
        sys.modules.update(modules)
    start = time.thread_time_ns()
    for _ in range(calls):
        out = call()
    return (time.thread_time_ns() - start) / calls / 1e3, out


def rounds(
    calls: dict[str, Callable[[], object]], count: int, timed: Callable[[str], float]
) -> dict[str, list[float]]:
    """``timed(name)`` of every variant of ``calls`` in each of ``count`` rounds, in an order
    shuffled anew every round (seeded): each variant's times, a round's each."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    order = random.Random(0)
    for _ in range(count):
        names = list(calls)
        order.shuffle(names)
        for k in names:
            times[k].append(timed(k))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a src")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--calls", type=int, default=20, help="calls per variant and round")
    parser.add_argument("--only", default="", help="the cells whose name holds this")
    parser.add_argument(
        "--part",
        default="",
        help="time this expression instead of the call, e.g. "
        "\"m('torchdiv._taylor.mixing').structure(f, x, 1)\" (m: the tree's module by name; "
        "f, x: the cell's; xl: a leaf copy of x, y = f(xl)); no recipes",
    )
    parser.add_argument("--setup", default="", help="--part's s: evaluated once per tree")
    args = parser.parse_args()
    torch.set_num_threads(1)
    trees = {t.split("=", 1)[0]: load(t.split("=", 1)[1]) for t in args.tree}
    for train in (False, True):
        for cell, (f, x, op) in cases(train).items():
            if args.only not in f"{cell}-{'train' if train else 'frozen'}":
                continue
            calls: dict[str, Callable[[], object]] = {}
            for name, modules in trees.items():
                if args.part:
                    calls[name] = _part(args.part, args.setup, modules, f, x)
                else:
                    calls[name] = functools.partial(getattr(modules["torchdiv"], op), f, x)
            if not args.part:
                for name, recipe in small_events.recipes(op, train).items():
                    calls[name] = functools.partial(recipe, f, x)
                results = {k: run(trees.get(k), c, 1)[1] for k, c in calls.items()}
                first = results[next(iter(trees))]
                for k, r in results.items():
                    torch.testing.assert_close(r, first, rtol=1e-4, atol=1e-5, msg=k)
            times = rounds(
                calls, args.rounds, lambda k, c=calls: run(trees.get(k), c[k], args.calls)[0]
            )
            median = {k: statistics.median(v) for k, v in times.items()}
            names = list(trees)
            if args.part:
                saved = [a - b for a, b in zip(times[names[0]], times[names[-1]], strict=True)]
                print(
                    f"{cell}-{'train' if train else 'frozen':6s} "
                    + "  ".join(f"{k} {median[k]:8.3f} us" for k in trees)
                    + f"  {names[0]} - {names[-1]} {statistics.median(saved):.3f} us",
                    flush=True,
                )
                continue
            best = min(v for k, v in median.items() if k not in trees)
            line = "  ".join(f"{k} {median[k]:6.1f} us {median[k] / best:.3f}" for k in trees)
            pairs = [a / b for a, b in zip(times[names[-1]], times[names[0]], strict=True)]
            print(
                f"{cell}-{'train' if train else 'frozen':6s} {line}  best recipe {best:6.1f} us"
                f"  {names[-1]}/{names[0]} {statistics.median(pairs):.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
