"""Hutchinson divergence: torchdiv's call against the hand-written recipes, same probes.

Run (one thread, alone on the machine's benchmark lock):
    flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \\
        PYTHONPATH=src .venv/bin/python bench/hutchinson_overhead.py [--rounds 3]
        [--min-run-time 0.3] [--cpu-seconds 1.0] [--cases dit,cnf2,...] [--json PATH]

Every recipe estimates ``tr J`` of every sample as ``(1/m) sum_j v_j^T J^T v_j`` from the same
``m`` Rademacher probes ``V`` (shape ``(m,) + x.shape``), drawn once outside the timed calls:

  torchdiv       ``torchdiv.divergence(f, x, method="hutchinson", probes=V)``
  torchdiv-draw  the same, drawing its own probes (``generator=``): the probes' cost added
  hand-vjp       ``autograd.grad(f(x), x, V, is_grads_batched=True)`` (one probe: plain grad)
  func-vjp       ``vmap`` of ``torch.func.vjp``'s pullback over ``V``
  func-jvp       ``vmap`` of ``torch.func.jvp`` over ``V`` (not the DiT: CPU fused attention
                 has no forward-mode rule)

and the values are checked against ``hand-vjp``'s (float32: rtol 1e-4 of the largest),
torchdiv's at its first call and again after the warm-up (the later calls, timed, take another
route on small problems).
``frozen``: parameters without grad, the estimate only. ``train``: parameters with grad, the
estimate, then ``loss.backward()`` of its mean (the recipes take ``create_graph=True``; the
DiT's hand recipes run attention on PyTorch's math backend there, the fused CPU kernel has no
double backward).

Times: ``torch.utils.benchmark`` (``_common.time_interleaved``: blocked_autorange, rounds
interleaved, median and IQR of wall time) and the 0.2 quantile of this thread's CPU time
(``_common.cpu_quantile_ms``: on a shared machine less sensitive to other load). Ratios are
against ``hand-vjp`` and ``func-vjp`` of the same run.

Cases:
  dit    DiT (adaLN-Zero, 2 blocks, hidden 32, 4 heads, SDPA, patch 2) on (8, 1, 8, 8), m = 8
  cnf2   tanh MLP 2-64-64-2, B = 256, m = 1 and m = 8
  cnf16  tanh MLP 16-64-64-16, B = 64, m = 1 and m = 8
  conv   conv net 3-16-16-3 (tanh, 3x3) on (32, 3, 8, 8), m = 8

Writes bench/results/local/hutchinson_overhead.json (git-ignored).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import LOCAL, cpu_quantile_ms, time_interleaved, write_json
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import torchdiv

Field = Callable[[torch.Tensor], torch.Tensor]


class Block(nn.Module):
    """adaLN-Zero DiT block (Peebles and Xie 2023): six modulations from the conditioning."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)
        b, n, d = h.shape
        z = self.norm1(h) * (1 + scale1[:, None]) + shift1[:, None]
        q, k, v = self.qkv(z).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        h = h + gate1[:, None] * self.proj(o)
        z = self.norm2(h) * (1 + scale2[:, None]) + shift2[:, None]
        return h + gate2[:, None] * self.mlp(z)


class DiT(nn.Module):
    """Patchify by a strided conv, sin-cos timestep embedding plus a label table, adaLN-Zero
    blocks, final modulated layer, unpatchify by einsum; learned sigma (first channel kept)."""

    def __init__(self, size: int = 8, patch: int = 2, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Conv2d(1, dim, patch, patch)
        self.register_buffer("pos", 0.02 * torch.randn(1, (size // patch) ** 2, dim))
        self.t_mlp = nn.Sequential(nn.Linear(32, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.labels = nn.Embedding(11, dim)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(2)])
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.final = nn.Linear(dim, patch * patch * 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-math.log(1e4) * torch.arange(16, dtype=t.dtype) / 16)
        angle = t[:, None] * freqs[None]
        c = self.t_mlp(torch.cat([angle.cos(), angle.sin()], -1)) + self.labels(y)
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada(c).chunk(2, dim=1)
        h = self.final(self.norm(h) * (1 + scale[:, None]) + shift[:, None])
        b, n, _ = h.shape
        g, p = int(n**0.5), self.patch
        h = torch.einsum("nhwpqc->nchpwq", h.reshape(b, g, g, p, p, 2))
        return h.reshape(b, 2, g * p, g * p)[:, :1]


def mlp(d: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, d)
    )


def convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(16, 3, 3, padding=1),
    )


def dit_case() -> tuple[nn.Module, Field, torch.Tensor]:
    net = DiT().eval()
    b = 8
    t, y = torch.rand(b) * 1000, torch.randint(0, 10, (b,))
    return net, lambda z: net(z, t, y), torch.randn(b, 1, 8, 8)


def module_case(net: nn.Module, x: torch.Tensor) -> tuple[nn.Module, Field, torch.Tensor]:
    return net, net, x


# name -> (model builder, numbers of probes)
CASES: dict[str, tuple[Callable[[], tuple[nn.Module, Field, torch.Tensor]], tuple[int, ...]]] = {
    "dit": (dit_case, (8,)),
    "cnf2": (lambda: module_case(mlp(2), torch.randn(256, 2)), (1, 8)),
    "cnf16": (lambda: module_case(mlp(16), torch.randn(64, 16)), (1, 8)),
    "conv": (lambda: module_case(convnet(), torch.randn(32, 3, 8, 8)), (8,)),
}


def contract(products: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """``(m,) + x.shape`` products and probes -> every sample's mean of ``v^T p``, ``(B,)``."""
    return (products * probes).flatten(2).sum(-1).mean(0)


def recipes(
    f: Field, x: torch.Tensor, probes: torch.Tensor, train: bool, attention: bool
) -> dict[str, Callable[[], torch.Tensor]]:
    """The estimates as zero-argument calls returning every sample's value."""
    m = len(probes)
    math_backend = train and attention  # fused CPU attention: no double backward

    def hand() -> torch.Tensor:
        z = x.detach().requires_grad_(True)
        with sdpa_kernel([SDPBackend.MATH]) if math_backend else _nothing():
            y = f(z)
            if m == 1:
                (g,) = torch.autograd.grad(y, z, probes[0], create_graph=train)
                return contract(g[None], probes)
            (g,) = torch.autograd.grad(y, z, probes, create_graph=train, is_grads_batched=True)
        return contract(g, probes)

    def func_vjp() -> torch.Tensor:
        with sdpa_kernel([SDPBackend.MATH]) if math_backend else _nothing():
            _, pull = torch.func.vjp(f, x)
            (g,) = torch.vmap(pull)(probes)
        return contract(g, probes)

    def func_jvp() -> torch.Tensor:
        products = torch.vmap(lambda v: torch.func.jvp(f, (x,), (v,))[1])(probes)
        return contract(products, probes)

    generator = torch.Generator().manual_seed(0)
    calls = {
        "torchdiv": lambda: torchdiv.divergence(f, x, method="hutchinson", probes=probes),
        "torchdiv-draw": lambda: torchdiv.divergence(
            f, x, method="hutchinson", num_probes=m, generator=generator
        ),
        "hand-vjp": hand,
        "func-vjp": func_vjp,
    }
    if not attention:
        calls["func-jvp"] = func_jvp
    return calls


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: Any) -> None:
        return None


def with_backward(call: Callable[[], torch.Tensor], net: nn.Module) -> Callable[[], Any]:
    """The estimate, then the parameter gradients of its mean (a training step's cost)."""

    def step() -> None:
        net.zero_grad(set_to_none=True)
        call().mean().backward()

    return step


def run_case(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    build, probe_counts = CASES[name]
    rows = []
    for train in (False, True):
        for m in probe_counts:
            torch.manual_seed(0)
            net, f, x = build()
            net.requires_grad_(train)
            probes = torch.randint(0, 2, (m, *x.shape)).to(x.dtype) * 2 - 1
            calls = recipes(f, x, probes, train, attention=name == "dit")
            reference = calls["hand-vjp"]().detach()
            atol = 1e-4 * reference.abs().max().item()
            for key in ("torchdiv", "func-vjp", "func-jvp"):
                if key in calls:
                    got = calls[key]().detach()
                    torch.testing.assert_close(got, reference, rtol=1e-4, atol=atol)
            timed = {k: (with_backward(c, net) if train else c) for k, c in calls.items()}
            for call in timed.values():  # warm-up: plans, caches, allocator
                call()
                call()
            # the timed calls are later calls (torchdiv's plain-autograd route for small
            # problems, not its first call's engine): their values checked too
            torch.testing.assert_close(
                calls["torchdiv"]().detach(), reference, rtol=1e-4, atol=atol
            )
            wall = time_interleaved(timed, args.rounds, args.min_run_time)
            cpu = {k: [] for k in timed}
            for _ in range(args.rounds):
                for k, call in timed.items():
                    cpu[k].append(cpu_quantile_ms(call, args.cpu_seconds))
            row: dict[str, Any] = {"case": name, "train": train, "num_probes": m}
            for k in timed:
                row[k] = {
                    "median_ms": wall[k]["median_ms"],
                    "iqr_ms": wall[k]["iqr_ms"],
                    "cpu_ms": min(cpu[k]),
                }
            rows.append(row)
            print_row(row, list(timed))
    return rows


def print_row(row: dict[str, Any], keys: list[str]) -> None:
    mode = "train " if row["train"] else "frozen"
    print(f"{row['case']:6s} {mode} m={row['num_probes']}", flush=True)
    for key in keys:
        t = row[key]
        print(
            f"    {key:14s} wall {t['median_ms']:8.3f} ms (IQR {t['iqr_ms']:6.3f})  "
            f"x{t['median_ms'] / row['hand-vjp']['median_ms']:5.2f} hand  "
            f"x{t['median_ms'] / row['func-vjp']['median_ms']:5.2f} func  |  "
            f"cpu {t['cpu_ms']:8.3f} ms  x{t['cpu_ms'] / row['hand-vjp']['cpu_ms']:5.2f} hand  "
            f"x{t['cpu_ms'] / row['func-vjp']['cpu_ms']:5.2f} func",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.3)
    parser.add_argument("--cpu-seconds", type=float, default=0.5)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--json", type=Path, default=LOCAL / "hutchinson_overhead.json")
    args = parser.parse_args()
    rows = []
    for name in args.cases.split(","):
        rows += run_case(name, args)
    write_json(args.json, rows, vars(args) | {"json": str(args.json)})
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
