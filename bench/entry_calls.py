"""The D = 2, B = 256 cells of ``entry_cpu.py`` timed call by call: ``"auto"`` and the best
recipe alternated, each call right after one of the other (what a training step that runs
other code between calls sees: torchdiv's Python objects out of the caches), thread CPU time
per call, one thread; the ratio of the medians. ``--lambda-anew``: ``"auto"`` called as a
training loop often writes it, ``divergence(lambda z: net(z), x)``, a new function object at
every call. ``--time-anew``: both given the field of an ODE step as FFJORD writes it,
``lambda z: field(t, z)`` over a new time tensor ``t`` at every call (here ``net(z) + t``).

    flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
        .venv/bin/python bench/entry_calls.py [--calls 1000] [--lambda-anew | --time-anew]
"""

from __future__ import annotations

import argparse
import time

import small_events
import torch

import torchdiv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls of each, alternated")
    parser.add_argument(
        "--lambda-anew", action="store_true", help="auto of a lambda made anew at every call"
    )
    parser.add_argument(
        "--time-anew", action="store_true", help="both of a lambda over a new time tensor"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = args.calls
    for op in ("divergence", "jacobian_diagonal", "jacobian"):
        for train in (False, True):
            torch.manual_seed(0)
            net = small_events.mlp(2, torch.nn.Tanh).requires_grad_(train)
            x = torch.randn(256, 2)
            name = "loop of autograd.grad" if op != "jacobian" else "is_grads_batched (zuko)"
            recipe, operator = small_events.recipes(op, train)[name], getattr(torchdiv, op)

            def auto(net, x, operator=operator):
                return operator(lambda z: net(z), x) if args.lambda_anew else operator(net, x)

            def field(step: int, net=net):
                if not args.time_anew:
                    return net
                t = torch.tensor(step / n)
                return lambda z: net(z) + t

            for step in range(20):
                auto(field(step), x), recipe(field(step), x)
            times: dict[str, list[int]] = {"auto": [], "recipe": []}
            for step in range(n):
                start = time.thread_time_ns()
                recipe(field(step), x)
                times["recipe"].append(time.thread_time_ns() - start)
                start = time.thread_time_ns()
                auto(field(step), x)
                times["auto"].append(time.thread_time_ns() - start)
            a, r = (sorted(times[k])[n // 2] / 1e3 for k in ("auto", "recipe"))
            print(
                f"{op:18s} {'train' if train else 'frozen':6s} auto {a:6.1f} us  "
                f"{name} {r:6.1f} us  ratio {a / r:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
