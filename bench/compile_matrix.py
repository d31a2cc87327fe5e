"""torch.compile with torchdiv: which (net, method, mode) cells run, agree with eager, and how
often they graph-break or recompile.

Run:  .venv/bin/python bench/compile_matrix.py [--backend aot_eager|inductor] [--dtype float64]
          [--nets mlp,conv,lap] [--methods auto,...] [--modes model,loss,step,fullgraph,dynamic]

Nets: ``mlp`` (tanh MLP 8-32-32-8, divergence), ``conv`` (conv net 3-8-3 on 6x6 images,
divergence), ``lap`` (tanh MLP 3-32-32-1, Laplacian). Methods: auto, structured, reverse,
forward, hutchinson (probes given), taylor (Laplacian only; on the divergence nets the cell is
"n/a"); on ``lap`` reverse means ``grad-of-grad`` and forward ``forward-over-reverse``.

Modes, each compared with the same computation run eagerly (values and parameter gradients,
float64 1e-10, float32 1e-5):
  model:     ``torch.compile(net)`` passed as ``f`` to an eager loss; counts the compiled
             graphs' runs inside the call and checks the model still runs compiled after it
  loss:      ``torch.compile(loss)``, backward outside; three steps
  step:      ``torch.compile(step)``, step = zero_grad, loss, backward, SGD step; three steps
             (Dynamo itself breaks the graph at ``zero_grad``, ``backward`` and ``opt.step``)
  fullgraph: ``torch.compile(loss, fullgraph=True)``
  dynamic:   ``torch.compile(loss, dynamic=True)`` at batch sizes B, B+3, B+5
``graphs``: graphs compiled by the first call (one per graph break more than one);
``recompiles``: graphs compiled by the second and third calls.
"""

from __future__ import annotations

import argparse
import copy
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo
from torch._dynamo.utils import counters

import torchdiv

DIV_METHODS = {
    "auto": "auto",
    "structured": "structured",
    "reverse": "reverse",
    "forward": "forward",
    "hutchinson": "hutchinson",
}
LAP_METHODS = {
    "auto": "auto",
    "reverse": "grad-of-grad",
    "forward": "forward-over-reverse",
    "hutchinson": "hutchinson",
    "taylor": "taylor",
}


def nets(dtype: torch.dtype) -> dict[str, tuple[torch.nn.Module, Callable[[int], torch.Tensor]]]:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
        torch.nn.Linear(32, 8),
    )  # fmt: skip
    conv = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Softplus(),
        torch.nn.Conv2d(8, 3, 3, padding=1),
    )  # fmt: skip
    lap = torch.nn.Sequential(
        torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
        torch.nn.Linear(32, 1), torch.nn.Flatten(0),
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    return {
        "mlp": (mlp.to(dtype), lambda b: torch.randn(b, 8, generator=g, dtype=dtype)),
        "conv": (conv.to(dtype), lambda b: torch.randn(b, 3, 6, 6, generator=g, dtype=dtype)),
        "lap": (lap.to(dtype), lambda b: torch.randn(b, 3, generator=g, dtype=dtype)),
    }


def operator(net_name: str, method: str) -> Callable[..., torch.Tensor] | None:
    """``op(f, x, probes)``: the torchdiv call of the cell, or None where it does not apply."""
    if net_name == "lap":
        if method not in LAP_METHODS:
            return None
        m = LAP_METHODS[method]
        if m == "hutchinson":
            return lambda f, x, p: torchdiv.laplacian(f, x, method=m, probes=p)
        return lambda f, x, p: torchdiv.laplacian(f, x, method=m)
    if method not in DIV_METHODS:
        return None
    m = DIV_METHODS[method]
    if m == "hutchinson":
        return lambda f, x, p: torchdiv.divergence(f, x, method=m, probes=p)
    return lambda f, x, p: torchdiv.divergence(f, x, method=m)


class Counting:
    """A backend that counts graphs compiled and graph runs, around ``inner``."""

    def __init__(self, inner: str) -> None:
        self.inner, self.compiled, self.runs = inner, 0, 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.compiled += 1
        inner = torch._dynamo.lookup_backend(self.inner)
        compiled = inner(gm, example_inputs)

        def run(*args: Any) -> Any:
            self.runs += 1
            return compiled(*args)

        return run


def tol(dtype: torch.dtype) -> dict[str, float]:
    return (
        {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    )


def grads(net: torch.nn.Module) -> list[torch.Tensor]:
    # a bias the operator does not depend on (the last one of a divergence) gets no gradient
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in net.parameters()]


def eager_loss_and_grads(net, op, x, probes):
    net.zero_grad()
    loss = op(net, x, probes).square().mean()
    loss.backward()
    return loss.detach(), grads(net)


def close(a, b, dtype) -> bool:
    try:
        torch.testing.assert_close(a, b, **tol(dtype))
        return True
    except AssertionError:
        return False


def run_cell(net_name, method, mode, backend, dtype) -> str:
    op = operator(net_name, method)
    if op is None:
        return "n/a"
    net, make_x = nets(dtype)[net_name]
    x = make_x(16 if net_name != "conv" else 4)
    probes = torchdiv.draw_probes(x, 2, generator=torch.Generator().manual_seed(3))
    ref_loss, ref_grads = eager_loss_and_grads(net, op, x, probes)
    torch._dynamo.reset()
    counters.clear()
    count = Counting(backend)
    if mode == "model":
        model = torch.compile(net, backend=count)
        model(x)
        before = count.runs
        loss, got = eager_loss_and_grads(net, lambda f, x, p: op(model, x, p), x, probes)
        inside = count.runs - before
        before = count.runs
        model(x)
        stays = count.runs == before + 1
        ok = close(loss, ref_loss, dtype) and all(map(close, got, ref_grads, [dtype] * 99))
        return f"{'ok' if ok else 'MISMATCH'} runs_inside={inside} stays={'y' if stays else 'NO'}"
    if mode == "step":
        eager_net = copy.deepcopy(net)
        comp_net = copy.deepcopy(net)
        eager_opt = torch.optim.SGD(eager_net.parameters(), lr=1e-2)
        comp_opt = torch.optim.SGD(comp_net.parameters(), lr=1e-2)

        def make_step(n, o):
            def step(x, p):
                o.zero_grad()
                loss = op(n, x, p).square().mean()
                loss.backward()
                o.step()
                return loss.detach()

            return step

        eager_step = make_step(eager_net, eager_opt)
        comp_step = torch.compile(make_step(comp_net, comp_opt), backend=count)
        ok, after_first = True, 0
        for i in range(3):
            le, lc = eager_step(x, probes), comp_step(x, probes)
            ok &= close(lc, le, dtype)
            if i == 0:
                after_first = count.compiled
        ok &= all(
            close(a, b, dtype)
            for a, b in zip(comp_net.parameters(), eager_net.parameters(), strict=True)
        )
        recompiled = count.compiled - after_first
        return f"{'ok' if ok else 'MISMATCH'} graphs={after_first} recompiles={recompiled}"
    if mode == "dynamic":

        def loss_fn(x, p):
            return op(net, x, p).square().mean()

        comp = torch.compile(loss_fn, backend=count, dynamic=True)
        ok = True
        for b in (x.shape[0], x.shape[0] + 3, x.shape[0] + 5):
            xb = make_x(b)
            pb = torchdiv.draw_probes(xb, 2, generator=torch.Generator().manual_seed(3))
            ok &= close(comp(xb, pb), loss_fn(xb, pb), dtype)
        return f"{'ok' if ok else 'MISMATCH'} graphs={count.compiled} (3 batch sizes)"

    def loss_fn(x, p):
        return op(net, x, p).square().mean()

    comp = torch.compile(loss_fn, backend=count, fullgraph=mode == "fullgraph")
    ok, after_first = True, 0
    for i in range(3 if mode == "loss" else 1):
        net.zero_grad()
        loss = comp(x, probes)
        loss.backward()
        loss, got = loss.detach(), grads(net)
        ok &= close(loss, ref_loss, dtype) and all(map(close, got, ref_grads, [dtype] * 99))
        if i == 0:
            after_first = count.compiled
    recompiled = count.compiled - after_first
    return f"{'ok' if ok else 'MISMATCH'} graphs={after_first} recompiles={recompiled}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="aot_eager")
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--nets", default="mlp,conv,lap")
    parser.add_argument("--methods", default="auto,structured,reverse,forward,hutchinson,taylor")
    parser.add_argument("--modes", default="model,loss,step,fullgraph,dynamic")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    for net_name in args.nets.split(","):
        for method in args.methods.split(","):
            for mode in args.modes.split(","):
                try:
                    result = run_cell(net_name, method, mode, args.backend, dtype)
                except Exception as error:
                    if args.verbose:
                        traceback.print_exc()
                    first = str(error).strip().split("\n")[0][:150]
                    result = f"ERROR {type(error).__name__}: {first}"
                print(f"{net_name:5} {method:11} {mode:9} {result}", flush=True)
                if args.verbose and counters["graph_break"]:
                    for reason, n in counters["graph_break"].items():
                        print(f"      break x{n}: {reason[:200]}")


if __name__ == "__main__":
    main()
