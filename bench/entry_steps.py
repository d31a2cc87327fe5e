"""Where the fixed cost of a D = 2, B = 256 call goes (issue 19): each step of one public call
left out in place, by a patch that is unsound and only for this measurement, the call
alternated with the recipe call by call (one untimed recipe call before each timed pair, the
variants in random order), thread CPU time per call, one thread; the median of each variant
and what leaving its step out saved against the whole call.

    flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
        .venv/bin/python bench/entry_steps.py [--calls 600] [--train] [--block 1]

Steps: the argument checks, ``check_initialized``, ``Unwritten`` (the backup of ``x``), the
structure key with the look-up of the passed watch, the graph's batch-norm check,
``PlainAttributes`` and ``settings``, ``CompiledCodeEager``, ``forget_plans``'s walk, and
all four decorators (the undecorated function). Pieces timed alone in a loop cost 2-4 times
less than in place, where ``f``'s passes have pushed torchdiv's objects out of the caches;
``--block 20`` times 20 calls in a row instead (warm caches, as ``entry_cpu.py``'s budget loops).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import small_events
import torch

import torchdiv
from torchdiv._api import operators, reporting
from torchdiv._bench import recipes
from torchdiv._core import checks, modes, script
from torchdiv._exact import autograd, dispatch
from torchdiv._taylor import mixing


class _Nothing:
    """A context manager, ``Unwritten`` and ``PlainAttributes`` that do nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None

    def check(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def variants(net: torch.nn.Module, x: torch.Tensor) -> dict[str, list[tuple[Any, str, Any]]]:
    """``{step: [(module, attribute, stand-in)]}``; the structure key's stand-in is the key of
    a call made before (``net`` passed its watch there)."""
    for _ in range(3):
        torchdiv.divergence(net, x)
    at = mixing.structure(net, x, 1)
    seen = mixing.passed_before(net, x, 1, at)
    assert seen is not None
    argument_checks = ("check_callable", "check_input", "check_method", "check_chunk_size")
    return {
        "whole call": [],
        "argument checks": [(operators, n, _nothing) for n in argument_checks]
        + [(operators, "check_exact_options", _nothing)],
        "check_initialized": [(checks, "check_initialized", _nothing)],
        "Unwritten (backup of x)": [(checks, "Unwritten", _Nothing)],
        "structure key + passed look-up": [
            (dispatch, "structure", lambda f, x, batch_dims: at),
            (dispatch, "passed_before", lambda *args: seen),
        ],
        "graph batch-norm check": [(autograd, "check_graph", _nothing)],
        "PlainAttributes + settings": [(reporting, "PlainAttributes", _Nothing)],
        "CompiledCodeEager": [(modes, "CompiledCodeEager", _Nothing)],
        "forget_plans walk": [(modes, "call_started", lambda f: script._INITIALIZED.set([f]))],
    }


def _timed(call: Callable[[], object], block: int) -> float:
    """Thread CPU time of ``call`` in ns, the mean of ``block`` calls in a row."""
    start = time.thread_time_ns()
    for _ in range(block):
        call()
    return (time.thread_time_ns() - start) / block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=600, help="timed calls of each variant")
    parser.add_argument("--train", action="store_true", help="parameters require grad")
    parser.add_argument(
        "--block",
        type=int,
        default=1,
        help="calls in a row per measurement (their mean): >1 times warm caches, as "
        "entry_cpu.py's budget loops do, instead of each call after a recipe call",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = small_events.mlp(2, torch.nn.Tanh).requires_grad_(args.train)
    x = torch.randn(256, 2)
    steps = variants(net, x)
    originals = {(m, a): getattr(m, a) for patches in steps.values() for m, a, _ in patches}

    def use(step: str) -> None:
        for (module, attribute), value in originals.items():
            setattr(module, attribute, value)
        for module, attribute, value in steps.get(step, []):
            setattr(module, attribute, value)

    undecorated = torchdiv.divergence
    while hasattr(undecorated, "__wrapped__"):
        undecorated = undecorated.__wrapped__
    calls: dict[str, Callable[[], object]] = {s: lambda: torchdiv.divergence(net, x) for s in steps}
    calls["all four decorators"] = lambda: undecorated(net, x)

    def recipe() -> object:
        return recipes.loop_grad(net, x, args.train)

    times: dict[str, list[float]] = {name: [] for name in [*calls, "recipe"]}
    for name in calls:
        use(name)
        for _ in range(20):
            calls[name](), recipe()
    try:
        for _ in range(args.calls):
            for name in random.sample(list(calls), len(calls)):
                use(name)
                recipe()
                times["recipe"].append(_timed(recipe, args.block))
                times[name].append(_timed(calls[name], args.block))
    finally:
        use("whole call")

    def median(name: str) -> float:
        return statistics.median(times[name]) / 1e3

    whole, base = median("whole call"), median("recipe")
    print(f"{'training' if args.train else 'frozen'}: recipe (loop of autograd.grad) {base:.1f} us")
    for name in calls:
        saved = "" if name == "whole call" else f"  saves {whole - median(name):5.1f} us"
        print(f"  {name:32s} {median(name):7.1f} us  ratio {median(name) / base:.3f}{saved}")


if __name__ == "__main__":
    main()
