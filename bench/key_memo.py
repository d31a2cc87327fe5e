"""Issue 19: would a per-module memo make the structure key cheaper? Measurement only.

``divergence(net, x)`` at D = 2, B = 256 (tanh MLP 2x64), the key's walk (``_held``) swapped
call by call among three versions, each call alternated with the recipe (one untimed recipe
call before each timed pair, the versions in random order), thread CPU time, one thread:

- ``as is``: ``torchdiv._taylor.cache._held``;
- ``memo, sound``: each module's attribute scan kept by ``id`` and reused while the module
  (weakly referenced), its type, the ``id`` and type of every value in its ``__dict__`` and
  every function it holds (alive) are unchanged; hooks, parameters' ``requires_grad``,
  buffers and children read at every call as before;
- ``memo, leaky``: the same check by the ``__dict__`` values themselves, held strongly (one
  list comparison): the fastest any memo can be, and unsound, as a module whose dictionaries
  hold a bound method of itself (``LazyLinear``'s load hook) is then never freed.

    flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
        .venv/bin/python bench/key_memo.py [--calls 600] [--train]

The memos reproduce ``_held`` on modules without buffers (checked on the benchmark's MLP).
"""

from __future__ import annotations

import argparse
import random
import time
import weakref
from collections.abc import Callable
from typing import Any

import small_events
import torch

import torchdiv
from torchdiv._bench import recipes
from torchdiv._taylor import cache
from torchdiv._taylor.cache import _MODULE_FLAGS, _MODULE_HELD

Held = Callable[[torch.nn.Module], tuple[tuple[Any, ...], tuple[bool, ...]]]


def _scan(m: torch.nn.Module) -> list[Any]:
    """``_held``'s own entries of ``m``: its id, type, flags and functions."""
    return [id(m), weakref.ref(type(m))] + [
        v if type(v) in _MODULE_FLAGS else weakref.ref(v)
        for v in m.__dict__.values()
        if type(v) in _MODULE_HELD
    ]


def _sound(m: torch.nn.Module, kept: Any) -> bool:
    values = m.__dict__.values()
    return (
        kept[0]() is m
        and kept[1] is type(m)
        and kept[2] == list(map(id, values))
        and kept[3] == list(map(type, values))
        and all(r() is not None for r in kept[5])
    )


def _leaky(m: torch.nn.Module, kept: Any) -> bool:
    return kept[0]() is m and kept[1] is type(m) and kept[2] == [*m.__dict__.values()]


def memo(strong: bool) -> Held:
    """``_held`` with each module's scan kept (``_sound`` or ``_leaky`` check)."""
    own: dict[int, Any] = {}
    same = _leaky if strong else _sound

    def held(f: torch.nn.Module) -> tuple[tuple[Any, ...], tuple[bool, ...]]:
        out: list[Any] = []
        grads: list[bool] = []
        seen: set[int] = set()
        stack = [f]
        while stack:
            m = stack.pop()
            if id(m) in seen:
                continue
            seen.add(id(m))
            kept = own.get(id(m))
            if kept is None or not same(m, kept):
                scan, values = _scan(m), m.__dict__.values()
                ids = [*values] if strong else list(map(id, values))
                refs = [r for r in scan[2:] if isinstance(r, weakref.ref)]
                kept = own[id(m)] = (
                    weakref.ref(m),
                    type(m),
                    ids,
                    list(map(type, values)),
                    scan,
                    refs,
                )
            out += kept[4]
            pre, post = m._forward_pre_hooks, m._forward_hooks
            if pre or post:
                out.append((*(pre or ()), None, *(post or ())))
            grads += [p.requires_grad for p in m._parameters.values() if p is not None]
            stack += [c for c in m._modules.values() if c is not None]
        return tuple(out), tuple(grads)

    return held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=600, help="timed calls of each version")
    parser.add_argument("--train", action="store_true", help="parameters require grad")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = small_events.mlp(2, torch.nn.Tanh).requires_grad_(args.train)
    x = torch.randn(256, 2)
    original = cache._held
    versions = {"as is": original, "memo, sound": memo(False), "memo, leaky": memo(True)}
    for version in versions.values():
        assert version(net) == original(net) == version(net)
    times: dict[str, list[int]] = {name: [] for name in [*versions, "recipe"]}

    def recipe() -> object:
        return recipes.loop_grad(net, x, args.train)

    try:
        for version in versions.values():
            cache._held = version
            for _ in range(20):
                torchdiv.divergence(net, x), recipe()
        for _ in range(args.calls):
            for name in random.sample(list(versions), len(versions)):
                cache._held = versions[name]
                recipe()
                start = time.thread_time_ns()
                recipe()
                times["recipe"].append(time.thread_time_ns() - start)
                start = time.thread_time_ns()
                torchdiv.divergence(net, x)
                times[name].append(time.thread_time_ns() - start)
    finally:
        cache._held = original

    def quartiles(name: str) -> tuple[float, float, float]:
        t = sorted(times[name])
        return t[len(t) // 4] / 1e3, t[len(t) // 2] / 1e3, t[3 * len(t) // 4] / 1e3

    base, whole = quartiles("recipe")[1], quartiles("as is")[1]
    print(f"{'training' if args.train else 'frozen'}: recipe (loop of autograd.grad) {base:.1f} us")
    for name in versions:
        low, median, high = quartiles(name)
        print(
            f"  {name:12s} {median:6.1f} us [IQR {low:.1f}-{high:.1f}]  ratio {median / base:.3f}"
            f"  saves {whole - median:5.1f} us"
        )


if __name__ == "__main__":
    main()
