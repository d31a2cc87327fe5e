"""Where ``"auto"``'s Laplacian should loop over backward passes rather than run the Taylor
engine, at two and three inputs (issue 18): ``"auto"`` forced to each choice, thread CPU time,
one thread, with the recorded graph's work estimates (``Graph.work_per_call``, the share of matrix
products in it) and the rule's choice (``_laplacian.methods.loops_for``) beside the ratio.

    flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
        PYTHONPATH=src .venv/bin/python bench/laplacian_crossover.py [--rounds 9] [--only NAME]

Cases: ``laplacian_small.py``'s tanh FNN (width 64, 3 hidden layers; also widths 32 and 128)
and Chebyshev KAN (D -> 8 -> 8 -> 1) at D = 2, 3 and batches 256 to 4096; several output
components (``-m2``, ``-m3``: the FNN, ``pinn23_idioms.py``'s tanh / LAAF / RFF nets); frozen
(the Laplacian alone) and trained (with its backward pass to the parameters). Each case runs two
functions of their own call sites (``_laplacian.methods._site``) through ``"auto"``: one
whose first call was decided to loop (the decision is remembered for its structure), one
that never loops (``loops_for`` patched to ``False`` for its calls): the loop as ``"auto"``
runs it (its settings, checks and per-call Python) against the Taylor engine as ``"auto"``
runs it. Rounds as ``entry_cpu.py`` (``_common.alike_rounds``); "loop / taylor" is the median
of the per-round ratios, with its interquartile range.

``--vgl`` (``[--frozen]``): ``value_grad_laplacian(coordinates=[0, .., k-1])``'s training step
of a heat residual ``u_t - 0.01 Δ u`` (or the residual alone) for ``pinn23_idioms.py``'s
width-32 tanh / LAAF / RFF nets and the width-64 FNN, D = 2-10, k = 1-3 (k = D: the whole
sweep), batches 1024 to 32768: ``methods.loops_for``'s rules at k coordinates
(``LOOP_WORK_PARTIAL``).
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable

import laplacian_small
import pinn23_idioms
import torch
from _common import alike_rounds
from entry_cpu import cpu_ms
from torch import nn

import torchdiv
from torchdiv._laplacian import methods
from torchdiv._taylor import RULES, capture

CASES: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    **{
        f"fnn{d}-w{w}-{b}": functools.partial(
            lambda d, w, b: (laplacian_small.fnn(d, w), torch.randn(b, d)), d, w, b
        )
        for d in (2, 3)
        for w, batches in ((64, (256, 1024, 2048, 4096)), (32, (1024,)), (128, (1024,)))
        for b in batches
    },
    **{  # several output components per sample (a Navier-Stokes net's u, v, p)
        f"fnn{d}-m{m}-w{w}-{b}": functools.partial(
            lambda d, w, m, b: (laplacian_small.fnn(d, w, outputs=m), torch.randn(b, d)), d, w, m, b
        )
        for d in (2, 3)
        for m in (2, 3)
        for w in (32, 64)
        for b in (256, 1024, 2048)
    },
    **{  # pinn23_idioms' Navier-Stokes nets (u, v, p), whose graphs are not chains
        f"{kind}{d}-m{m}-{b}": functools.partial(
            lambda kind, d, m, b: (pinn23_idioms.net(kind, d, out=m), torch.randn(b, d)),
            kind,
            d,
            m,
            b,
        )
        for kind in ("tanh", "laaf", "rff")
        for d in (2, 3)
        for m in (1, 2, 3)
        for b in (256, 1024, 2048)
    },
    **{
        f"kan{d}-{b}": functools.partial(
            lambda d, b: (laplacian_small.kan(d), torch.rand(b, d) * 2 - 1), d, b
        )
        for d in (2, 3)
        for b in (256, 1024, 2048, 4096)
    },
}

HEADER = (
    "case                 scenario  work/call  products' share  rule  loop ms  taylor ms  "
    "loop/taylor [IQR]"
)
_LOOPING = [False]  # what the patched ``loops_for`` answers


def _forced(graph: object, x: torch.Tensor, batch_dims: int, *_: object, **__: object) -> bool:
    return _LOOPING[0]


def pair(net: nn.Module, x: torch.Tensor, train: bool) -> dict[str, Callable[[], object]]:
    """``"auto"`` by the loop and by the Taylor engine, each one training step (``train``) or
    one Laplacian."""

    def looping(z: torch.Tensor) -> torch.Tensor:
        return net(z)

    def taylor(z: torch.Tensor) -> torch.Tensor:
        return net(z)

    def step(f: Callable[[torch.Tensor], torch.Tensor], loop: bool) -> object:
        _LOOPING[0] = loop
        lap = torchdiv.laplacian(f, x).reshape(len(x), -1)
        if train:
            torch.autograd.grad(lap.square().sum(), list(net.parameters()), allow_unused=True)
        return lap.detach()

    return {
        "loop": functools.partial(step, looping, True),
        "taylor": functools.partial(step, taylor, False),
    }


# ``--vgl``: ``value_grad_laplacian(coordinates=...)``'s training step of a heat residual
# ``u_t - 0.01 Δ_x u`` (the last input is t): name -> (model kind, inputs, chosen coordinates)
VGL_CASES = {
    **{
        f"{kind}{d}-k{k}-{b}": (kind, d, k, b)
        for kind in ("tanh", "laaf", "rff", "w64")
        for d, k in ((2, 1), (3, 1), (3, 2))
        for b in (1024, 2048, 4096, 8192)
    },
    **{
        f"{kind}{d}-k{k}-{b}": (kind, d, k, b)
        for kind in ("tanh", "w64")
        for d, k in ((2, 2), (3, 3), (4, 3), (10, 1), (10, 2))
        for b in (1024, 2048, 4096, 8192)
    },
    **{f"{kind}2-k1-{b}": (kind, 2, 1, b) for kind in ("tanh", "w64") for b in (16384, 32768)},
    **{  # the whole sweep of nets whose graphs are not chains
        f"{kind}{d}-k{d}-{b}": (kind, d, d, b)
        for kind in ("laaf", "rff", "kan")
        for d in (2, 3)
        for b in (2048, 4096, 8192)
    },
}


def vgl_model(kind: str, d: int) -> nn.Module:
    """``pinn23_idioms``' width-32 nets, or ``laplacian_small``'s width-64 tanh FNN (``w64``)
    or Chebyshev KAN (``kan``)."""
    if kind == "kan":
        return laplacian_small.kan(d)
    return laplacian_small.fnn(d, 64) if kind == "w64" else pinn23_idioms.net(kind, d)


def vgl_pair(
    net: nn.Module, x: torch.Tensor, k: int, train: bool
) -> dict[str, Callable[[], object]]:
    """``value_grad_laplacian``'s ``"auto"`` along the first ``k`` coordinates by the loop and
    by the Taylor sweep, each one training step of the heat residual (``train``) or the
    residual alone."""

    def looping(z: torch.Tensor) -> torch.Tensor:
        return net(z)

    def taylor(z: torch.Tensor) -> torch.Tensor:
        return net(z)

    params = list(net.parameters())

    def step(f: Callable[[torch.Tensor], torch.Tensor], loop: bool) -> object:
        _LOOPING[0] = loop
        out = torchdiv.value_grad_laplacian(f, x, coordinates=list(range(k)))
        residual = out.gradient[:, 0, -1] - 0.01 * out.laplacian[:, 0]
        if train:
            torch.autograd.grad(residual.square().mean(), params, allow_unused=True)
        return residual.detach()

    return {
        "loop": functools.partial(step, looping, True),
        "taylor": functools.partial(step, taylor, False),
    }


def vgl_main(args: argparse.Namespace, rule: Callable[..., bool]) -> None:
    """The ``--vgl`` table: loop / Taylor sweep per case, with the rule's choice at ``k``."""
    print(HEADER)
    for name, (kind, d, k, b) in VGL_CASES.items():
        if args.only not in name:
            continue
        for train in (True, False) if args.frozen else (True,):
            torch.manual_seed(0)
            net, x = vgl_model(kind, d).requires_grad_(train), torch.rand(b, d)
            graph = capture(net, x, RULES, batch_dims=1)
            choice = "loop" if rule(graph, x, 1, k, gradient=True) else "taylor"
            calls = vgl_pair(net, x, k, train)
            for call in calls.values():
                call(), call()
            _report(name, "train" if train else "frozen", graph, choice, calls, args)


def _report(
    name: str,
    scenario: str,
    graph: object,
    choice: str,
    calls: dict[str, Callable[[], object]],
    args: argparse.Namespace,
) -> None:
    budget = int(args.budget_ms * 1e6)
    times = alike_rounds(calls, args.rounds, functools.partial(cpu_ms, budget_ns=budget))
    ratios = [a / b for a, b in zip(times["loop"], times["taylor"], strict=True)]
    q1, med, q3 = statistics.quantiles(ratios, n=4)
    loop, taylor = statistics.median(times["loop"]), statistics.median(times["taylor"])
    print(
        f"{name:20} {scenario:8} {graph.work_per_call():9.0f}  "  # type: ignore[attr-defined]
        f"{methods._products_share(graph):15.3f}  {choice:6}  {loop:7.3f}  "  # type: ignore[arg-type]
        f"{taylor:9.3f}  {med:.3f} [{q1:.3f}-{q3:.3f}]",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--only", default="", help="run the cases whose name holds this")
    parser.add_argument("--budget-ms", type=float, default=30)
    parser.add_argument("--vgl", action="store_true", help="value_grad_laplacian's heat step")
    parser.add_argument("--frozen", action="store_true", help="--vgl: also not differentiated")
    args = parser.parse_args()
    rule = methods.loops_for
    methods.loops_for = _forced
    print(f"threads {torch.get_num_threads()}")
    if args.vgl:
        vgl_main(args, rule)
        return
    print(HEADER)
    for name, make in CASES.items():
        if args.only not in name:
            continue
        for train in (False, True):
            torch.manual_seed(0)
            net, x = make()
            net.requires_grad_(train)
            graph = capture(net, x, RULES, batch_dims=1)
            choice = "loop" if rule(graph, x, 1) else "taylor"
            calls = pair(net, x, train)
            for call in calls.values():
                call(), call()
            _report(name, "train" if train else "frozen", graph, choice, calls, args)


if __name__ == "__main__":
    main()
