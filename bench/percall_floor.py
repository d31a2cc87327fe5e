"""The floor of issue 19's two D = 2 cells (``percall_ab.cases``): ``"auto"``'s call, the hand
recipes, and each piece of the call alone, alternated in one process (thread CPU time per
call, us, the median of the rounds; each piece on a graph made once, so hot: inside the call
it runs colder). ``f`` is also timed inside the call and inside the loop recipe (its call
wrapped): the difference to ``f`` alone is the cost of cold caches, which both pay.

    flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \\
        PYTHONPATH=src:bench .venv/bin/python bench/percall_floor.py [--rounds 31]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import small_events
import torch
from percall_ab import cases, rounds, run

import torchdiv
from torchdiv._api import operators
from torchdiv._bench import recipes
from torchdiv._core import checks, modes, script
from torchdiv._core.walk import Found
from torchdiv._exact import autograd, chain
from torchdiv._taylor import mixing


def _in_call(call: Callable[[], object], calls: int) -> float:
    """``f``'s own time per call inside ``call`` (``checks.call_f`` wrapped: the call's)."""
    spent = [0]
    plain = checks.call_f

    def timed(f: Callable[..., object], *args: object) -> object:
        start = time.thread_time_ns()
        try:
            return plain(f, *args)
        finally:
            spent[0] += time.thread_time_ns() - start

    checks.call_f = timed
    try:
        for _ in range(calls):
            call()
    finally:
        checks.call_f = plain
    return spent[0] / calls / 1e3


def pieces(f: Callable, x: torch.Tensor, op: str, train: bool) -> dict[str, Callable[[], object]]:
    xl = autograd.leaf(x)
    y = f(xl)
    steps = chain.chain(y, xl, Found())
    assert steps is not None
    out: dict[str, Callable[[], object]] = {"auto": lambda: getattr(torchdiv, op)(f, x)}
    for name, recipe in small_events.recipes(op, train).items():
        if name != "vmap(jacrev)":
            out[name] = lambda recipe=recipe: recipe(f, x)
    out["f alone"] = lambda: f(autograd.leaf(x))
    if op == "jacobian_diagonal":
        out["chain rows + diagonal"] = lambda: torch.diagonal_copy(
            chain.unit_products(steps, 0, 2, y, train),
            0,
            0,
            2,  # type: ignore[arg-type]
        )
    else:
        out["chain trace"] = lambda: _graded(train, lambda: chain.trace(steps, y))
    out["chain walk"] = lambda: chain.chain(y, xl, Found())
    out["structure key + passed_before"] = lambda: mixing.passed_before(f, x, 1)
    out["TorchScript walk"] = lambda: script.forget_plans(f)
    out["_prepare (outside a call)"] = lambda: operators._prepare(
        op, f, x, 1, "auto", None, True, operators.DIAGONAL_METHODS
    )
    out["CompiledCodeEager"] = lambda: _entered(modes.CompiledCodeEager())
    out["unwatched (f, walk, engine)"] = lambda: autograd.unwatched(f, x, 1, True)
    return out


def _graded(create_graph: bool, call: Callable[[], object]) -> object:
    with torch.set_grad_enabled(create_graph):
        return call()


def _entered(context: modes.CompiledCodeEager) -> None:
    context.__enter__()
    context.__exit__(None, None, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for train in (False, True):
        for cell, (f, x, op) in cases(train).items():
            calls = pieces(f, x, op, train)
            loop = recipes.loop_grad_diagonal if op == "jacobian_diagonal" else recipes.loop_grad
            calls["f inside auto"] = lambda f=f, x=x, op=op: _in_call(
                lambda: getattr(torchdiv, op)(f, x), 1
            )

            def in_loop(
                f: Callable = f, x: torch.Tensor = x, loop: Callable = loop, train: bool = train
            ) -> float:
                spent = [0]

                def timed(z: torch.Tensor) -> torch.Tensor:
                    start = time.thread_time_ns()
                    out = f(z)
                    spent[0] += time.thread_time_ns() - start
                    return out

                loop(timed, x, train)
                return spent[0] / 1e3

            calls["f inside the loop recipe"] = in_loop
            for call in calls.values():
                for _ in range(5):
                    call()

            def timed(k: str, calls: dict[str, Callable[[], object]] = calls) -> float:
                if k.startswith("f inside"):  # (its own time, not the call's)
                    return statistics.mean(float(calls[k]()) for _ in range(args.calls))  # type: ignore[arg-type]
                return run(None, calls[k], args.calls)[0]

            times = rounds(calls, args.rounds, timed)
            scenario = "train" if train else "frozen"
            print(f"{cell}-{scenario}")
            for k, v in times.items():
                print(f"  {k:32s} {statistics.median(v):8.1f} us", flush=True)


if __name__ == "__main__":
    main()
