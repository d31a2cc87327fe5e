"""Exact divergence of image ODE nets and a U-Net: the structured engine against torch.func.

Run:  flock /tmp/torchdiv-bench.lock .venv/bin/python bench/images.py [--rounds 2]
          [--min-run-time 0.5] [--cases ffjord,multiscale,unet,odefunc,unet-noattn]

Cases (random init, parameters frozen, float32; models in ``torchdiv._bench.ffjord``
and ``torchdiv._bench.unets``, written the way FFJORD and guided-diffusion write them):

  ffjord:     FFJORD's ODEnet, 4 ConcatConv2d layers 3-64-64-64-3 (3x3, stride 1), softplus,
              on (8, 3, 32, 32) at t = 0.5
  multiscale: the same widths inside one squeeze (space-to-depth), strides 1, 2, -2, 1
              (a 4x4 stride-2 convolution down, a 4x4 stride-2 transposed one up)
  unet:       guided-diffusion's two-level U-Net (GroupNorm, SiLU, attention at 8x8), width
              16, on (4, 3, 16, 16)
  odefunc:    torchdiffeq's MNIST ODE-Net dynamics (three GroupNorm(32, 64), two 3x3
              ConcatConv2d) on (8, 64, 8, 8): group norms split off (``statistics``)
  unet-noattn: the U-Net without its attention blocks, width 8, on (1, 3, 48, 48): group
              norms split off

Methods: ``divergence(method="structured")`` (the plan it chose is printed), the column
propagation it replaced (every unit vector its own colour, as before images were coloured),
torchdiv's generic reverse mode, and the torch.func recipes ``vmap(jacfwd)`` and
``vmap(jacrev)`` of one sample; all images' columns at once do not fit in memory, so both
run one image at a time, jacrev with ``chunk_size`` (128 on the 32 x 32 cases, 32 on the
U-Net) and jacfwd whole on the 32 x 32 cases, as ``vmap(jvp, chunk_size=8)`` on the U-Net
(jacfwd has no chunk_size; whole, or in chunks of 32, it ran past an 18 GB limit there).
Each is checked against jacfwd's result (float32 tolerance), then timed round-robin with
``torch.utils.benchmark`` (``--rounds`` blocks of ``--min-run-time``, median and IQR). All
but the structured method take up to minutes per call on a 2-core CPU: one call each,
timed with ``perf_counter`` on ``RECIPE_SAMPLES`` images and scaled to the batch (all are
per-sample loops or batched over samples: about linear in it). Writes
bench/results/local/images.json and prints a markdown table with ratios to the best
torch.func recipe and to the column propagation.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
from _common import markdown, script, time_interleaved
from torch.func import jacfwd, jacrev, jvp, vmap

import torchdiv
from torchdiv import _structured
from torchdiv._bench import ffjord, unets
from torchdiv._structured import forward
from torchdiv._taylor import RULES, capture, values

Function = Callable[[torch.Tensor], torch.Tensor]


CASES: dict[str, Callable[[], tuple[Function, torch.Tensor, tuple[int | None, int]]]] = {
    # (f, x, unit vectors per chunk in the torch.func recipes: jacfwd's, jacrev's)
    "ffjord": lambda: (ffjord.odenet((64, 64, 64)), torch.randn(8, 3, 32, 32), (None, 128)),
    "multiscale": lambda: (ffjord.multiscale((64, 64, 64)), torch.randn(8, 3, 32, 32), (None, 128)),
    "unet": lambda: (unets.guided_unet(), torch.randn(4, 3, 16, 16), (8, 32)),
    "odefunc": lambda: (ffjord.odefunc(64), torch.randn(8, 64, 8, 8), (None, 128)),
    "unet-noattn": lambda: (unets.guided_unet(8, False), torch.randn(1, 3, 48, 48), (8, 32)),
}
# images the baselines are timed on
RECIPE_SAMPLES = {"ffjord": 1, "multiscale": 1, "unet": 1, "odefunc": 1, "unet-noattn": 1}
DESCRIPTIONS = {
    "ffjord": "FFJORD ODEnet 4x ConcatConv2d 64ch, (8, 3, 32, 32)",
    "multiscale": "FFJORD ODEnet squeeze + strides 1,2,-2,1, 64ch, (8, 3, 32, 32)",
    "unet": "two-level U-Net, GroupNorm + attention, (4, 3, 16, 16)",
    "odefunc": "torchdiffeq MNIST ODEfunc, 3 GroupNorm(32) + 2 ConcatConv2d, (8, 64, 8, 8)",
    "unet-noattn": "the U-Net without attention, width 8, (1, 3, 48, 48)",
}
STRUCTURED, COLUMNS = "torchdiv structured", "column propagation (no colouring)"
REVERSE = "torchdiv reverse (batched VJPs)"
TORCH_FUNC = ("torch.func jacfwd per image", "torch.func jacrev per image")


def _one(f: Function) -> Function:
    return lambda z: f(z[None]).reshape(-1)


def _trace(jac: torch.Tensor) -> torch.Tensor:
    return jac.reshape(jac.shape[0], jac.shape[1], -1).diagonal(dim1=1, dim2=2).sum(-1)


def jacrev_each(f: Function, x: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """``jacrev(f_one_sample, chunk_size=chunk)`` one sample at a time (vmapped over the
    U-Net's four images, even chunk_size=32 took over 22 GB)."""
    return torch.cat([_trace(jacrev(_one(f), chunk_size=chunk)(z)[None]) for z in x])


def jacfwd_each(f: Function, x: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """``jacfwd(f_one_sample)`` one sample at a time; with ``chunk``, its unit vectors pushed
    by ``vmap(jvp, chunk_size=chunk)`` (jacfwd itself has no chunk_size)."""
    if chunk is None:
        return torch.cat([_trace(jacfwd(_one(f))(z)[None]) for z in x])
    traces = []
    for z in x:
        basis = torch.eye(z.numel(), dtype=z.dtype).reshape(-1, *z.shape)
        push = vmap(lambda v, z=z: jvp(_one(f), (z,), (v,))[1], chunk_size=chunk)
        traces.append(push(basis).diagonal().sum())
    return torch.stack(traces)


def columns(f: Function, x: torch.Tensor) -> torch.Tensor:
    """The plan without colouring: every unit vector propagated on its own."""
    graph = capture(f, x, RULES, keep_values=True, batch_dims=1)
    values(graph, x)
    return forward.diagonal(graph, x, 1, None, None).sum(-1)


def run_case(name: str, rounds: int, min_run_time: float) -> list[dict]:
    torch.manual_seed(0)
    f, x, (forward_chunk, reverse_chunk) = CASES[name]()
    if isinstance(f, torch.nn.Module):
        f.requires_grad_(False)
    k = RECIPE_SAMPLES[name]
    part = x[:k]
    baselines = {
        COLUMNS: functools.partial(columns, f, part),
        REVERSE: functools.partial(torchdiv.divergence, f, part, method="reverse"),
        TORCH_FUNC[0]: functools.partial(jacfwd_each, f, part, forward_chunk),
        TORCH_FUNC[1]: functools.partial(jacrev_each, f, part, reverse_chunk),
    }
    ours = functools.partial(torchdiv.divergence, f, x, method="structured")
    fields = {"case": DESCRIPTIONS[name], "plan": _structured.describe(f, x)}
    print(fields, flush=True)
    outs, rows = {}, []
    slow = k < len(x)  # minutes per call: one timed call each
    for method, call in baselines.items():
        start = time.perf_counter()
        outs[method] = call()
        ms = (time.perf_counter() - start) * 1e3 * len(x) / k
        rows.append({**fields, "method": method, "median_ms": ms, "iqr_ms": float("nan")})
        print(rows[-1], flush=True)
    timed = {STRUCTURED: ours} if slow else {STRUCTURED: ours, **baselines}
    times = time_interleaved(timed, rounds, min_run_time)
    for row in rows:
        row.update(times.get(row["method"], {}))
    outs[STRUCTURED] = ours()[:k]
    rows.insert(0, {**fields, "method": STRUCTURED, **times[STRUCTURED]})
    reference = outs[TORCH_FUNC[0]]
    for row in rows:
        out = outs[row["method"]]
        atol = 1e-4 * reference.abs().max().item()
        row["correct"] = torch.allclose(out, reference, rtol=1e-4, atol=atol)
        row["samples_timed"] = len(x) if row["method"] == STRUCTURED else k
    best = min(r["median_ms"] for r in rows if r["method"] in TORCH_FUNC)
    cols = next(r["median_ms"] for r in rows if r["method"] == COLUMNS)
    for row in rows:
        row["vs_func"] = row["median_ms"] / best
        row["vs_columns"] = row["median_ms"] / cols
        print(row, flush=True)
    return rows


def tables(rows: list[dict]) -> None:
    print(
        markdown(
            rows,
            [
                ("case", "case"),
                ("plan", "structured plan"),
                ("method", "method"),
                ("median_ms", "median ms"),
                ("iqr_ms", "IQR ms"),
                ("vs_func", "x best torch.func"),
                ("vs_columns", "x column propagation"),
                ("samples_timed", "images timed"),
                ("correct", "correct"),
            ],
        )
    )


def main() -> None:
    script(__doc__, CASES, run_case, "images.json", tables)


if __name__ == "__main__":
    main()
