"""Per-call time and watch counts of "auto" on real model families, torchdiv of two trees.

The sample-mixing watch keeps a remembered pass (``Verdict``) so that a model is watched
once, not at every call; a check that withholds the pass makes every call pay the watch.
This script times ``divergence``, ``laplacian`` and ``jacobian_diagonal`` (``method="auto"``)
on a dozen model families under two source trees, each in a worker process of its own
(``PYTHONPATH=<tree>/src``), the workers alternated case by case, their order swapped every
other round, and counts the watches (``watch.BatchAxes`` made, as ``tests/conftest.py``'s
``watches`` fixture counts them) in the calls after the first. Run it under the lock:

    flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \\
        python bench/watch_regressions.py --old ../perfcheck18-base --new .

Prints a markdown table: each tree's median over the rounds of a call's CPU time (ms; the
spread: max - min over the rounds), new/old, and the watches (first call + the ``--calls``
calls after it), old and new. The operators run in the table's order on each model, so a
pass the divergence's watch remembered "for any x" serves the Jacobian diagonal's calls too
(its "0+0"); the Laplacian records ``f`` at every call, its watch riding along ("1+10").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

OPERATORS = ("divergence", "laplacian", "jacobian_diagonal")


# ---------------------------------------------------------------- the models (worker side)


def _models() -> dict[str, tuple[Any, Any]]:
    """name -> (the field f: x -> same shape as x, x). The Laplacian is taken of
    ``f(x)`` squared and summed over the event."""
    import torch
    from torch import nn
    from torch.nn.utils import parametrizations as P

    torch.manual_seed(0)
    B, D, W = 32, 16, 64

    def mlp(first: nn.Module | None = None, mid: nn.Module | None = None, w: int = W) -> Any:
        return nn.Sequential(
            first or nn.Linear(D, w), mid or nn.Tanh(), nn.Linear(w, W), nn.Tanh(), nn.Linear(W, D)
        )

    class Counter(nn.Module):
        """Counts its calls in a buffer (``self.n += 1``), as step-counting models do."""

        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()
            self.register_buffer("n", torch.zeros((), dtype=torch.long))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.n += 1
            return self.net(x)

    class Ema(nn.Module):
        """Keeps an EMA of its first weight, updated under no_grad in forward."""

        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()
            self.register_buffer("ema", self.net[0].weight.detach().clone())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                self.ema.mul_(0.999).add_(self.net[0].weight, alpha=0.001)
            return self.net(x)

    class Glow(nn.Module):
        """Glow's LU-decomposed invertible 1x1 map run inverse, ``x @ inverse(P L U)`` (P a
        buffer, L and U parameters), then an MLP (rev-watch18's case: d = 8, B = 16)."""

        def __init__(self, d: int = 8) -> None:
            super().__init__()
            p, lower, upper = torch.linalg.lu(torch.linalg.qr(torch.randn(d, d))[0])
            self.register_buffer("p", p)
            self.lower, self.upper = nn.Parameter(lower), nn.Parameter(upper)
            self.net = nn.Sequential(nn.Linear(d, W), nn.Tanh(), nn.Linear(W, d))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            eye = torch.eye(len(self.lower))
            w = self.p @ (self.lower.tril(-1) + eye) @ self.upper.triu()
            return self.net(x @ torch.inverse(w))

    class Block(nn.Module):
        """A pre-norm transformer block on (B, T, d) tokens (LayerNorm, attention, MLP)."""

        def __init__(self, d: int = 16) -> None:
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.norm1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.mlp(self.norm2(x))

    class Gns(nn.Module):
        """GNS-like message passing on (B, N, d) nodes over held edges (a buffer)."""

        def __init__(self, n: int = 8, d: int = 4, h: int = 32) -> None:
            super().__init__()
            ring = torch.arange(n)
            self.register_buffer("edges", torch.stack([ring, (ring + 1) % n]))
            self.encode, self.decode = nn.Linear(d, h), nn.Linear(h, d)
            self.edge = nn.Sequential(nn.Linear(2 * h, h), nn.SiLU(), nn.Linear(h, h))
            self.node = nn.Sequential(nn.Linear(2 * h, h), nn.SiLU(), nn.Linear(h, h))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.encode(x)
            src, dst = self.edges
            for _ in range(2):
                m = self.edge(torch.cat([h.index_select(-2, src), h.index_select(-2, dst)], -1))
                agg = torch.zeros_like(h).index_add_(-2, dst, m)
                h = h + self.node(torch.cat([h, agg], -1))
            return self.decode(h)

    class Gcn(nn.Module):
        """Two PyG GCNConv layers on (B, N, d) node features (``node_dim=-2``), held edges."""

        def __init__(self, n: int = 8, d: int = 4, h: int = 32) -> None:
            super().__init__()
            import torch_geometric.nn as pyg

            ring = torch.arange(n)
            self.edges = torch.cat(
                [torch.stack([ring, (ring + 1) % n]), torch.stack([(ring + 1) % n, ring])], 1
            )
            self.first, self.second = pyg.GCNConv(d, h), pyg.GCNConv(h, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.second(torch.tanh(self.first(x, self.edges)), self.edges)

    class ResBlock(nn.Module):
        """diffusers' ResnetBlock2D's form: GroupNorm, SiLU, conv, twice, plus the input."""

        def __init__(self, c: int = 8) -> None:
            super().__init__()
            self.norm1, self.norm2 = nn.GroupNorm(4, c), nn.GroupNorm(4, c)
            self.conv1 = nn.Conv2d(c, c, 3, padding=1)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv1(nn.functional.silu(self.norm1(x)))
            return x + self.conv2(nn.functional.silu(self.norm2(h)))

    class UNet(nn.Module):
        """A two-level U-Net: strided conv down, conv, nearest upsampling, skip concatenated."""

        def __init__(self, c: int = 2, h: int = 8) -> None:
            super().__init__()
            self.inc = nn.Conv2d(c, h, 3, padding=1)
            self.down = nn.Conv2d(h, 2 * h, 3, stride=2, padding=1)
            self.mid = nn.Conv2d(2 * h, 2 * h, 3, padding=1)
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.out = nn.Conv2d(3 * h, c, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = torch.relu(self.inc(x))
            b = torch.relu(self.mid(torch.relu(self.down(a))))
            return self.out(torch.cat([a, self.up(b)], 1))

    class Fno(nn.Module):
        """An FNO layer: rfft2, the low modes times complex weights, irfft2, plus a 1x1 conv."""

        def __init__(self, c: int = 4, modes: int = 3) -> None:
            super().__init__()
            self.modes = modes
            self.w = nn.Parameter(torch.randn(c, c, modes, modes, dtype=torch.cfloat) / c)
            self.skip = nn.Conv2d(c, c, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = torch.fft.rfft2(x)
            out = torch.zeros_like(f)
            m = self.modes
            out[..., :m, :m] = torch.einsum("bixy,ioxy->boxy", f[..., :m, :m], self.w)
            return torch.nn.functional.gelu(torch.fft.irfft2(out, s=x.shape[-2:]) + self.skip(x))

    x = torch.randn(B, D)
    bn = mlp(mid=nn.BatchNorm1d(W)).eval()
    with torch.no_grad():
        bn[1].running_mean.normal_()
        bn[1].running_var.uniform_(0.5, 2)
    return {
        "tanh MLP (CNF)": (mlp(), x),
        "spectral_norm (parametrization)": (mlp(P.spectral_norm(nn.Linear(D, W))), x),
        "spectral_norm (legacy hook)": (mlp(nn.utils.spectral_norm(nn.Linear(D, W))), x),
        "weight_norm (parametrization)": (mlp(P.weight_norm(nn.Linear(D, W))), x),
        "BatchNorm1d eval": (bn, x),
        "LayerNorm transformer block": (Block(), torch.randn(8, 8, 16)),
        "GNS message passing": (Gns(), torch.randn(16, 8, 4)),
        "PyG GCN": (Gcn(), torch.randn(16, 8, 4)),
        "Glow LU 1x1 inverse": (Glow(), torch.randn(16, 8)),
        "orthogonal cayley": (mlp(P.orthogonal(nn.Linear(D, D), orthogonal_map="cayley"), w=D), x),
        "orthogonal cayley d=8 B=16": (
            nn.Sequential(P.orthogonal(nn.Linear(8, 8), orthogonal_map="cayley"), nn.Tanh()),
            torch.randn(16, 8),
        ),
        "orthogonal matrix_exp": (
            mlp(P.orthogonal(nn.Linear(D, D), orthogonal_map="matrix_exp"), w=D),
            x,
        ),
        "ResNet block GroupNorm": (ResBlock(), torch.randn(4, 8, 6, 6)),
        "U-Net-ish conv": (UNet(), torch.randn(4, 2, 8, 8)),
        "FNO spectral conv": (Fno(), torch.randn(4, 4, 8, 8)),
        "counter buffer": (Counter(), x),
        "EMA buffer (no_grad)": (Ema(), x),
    }


def _energy(f: Any, event: int) -> Any:
    """``f(x)`` squared, summed over the event: one scalar per sample (the Laplacian's f), a
    module holding ``f`` (the key holds its state, as it holds ``f``'s)."""
    from torch import nn

    class Energy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f, self.dims = f, tuple(range(-event, 0))

        def forward(self, x: Any) -> Any:
            return (self.f(x) ** 2).sum(self.dims)

    return Energy()


def _worker(calls: int, min_run_time: float) -> None:
    """Serve "case|operator" lines from stdin: time the call (the 20% quantile of its
    thread CPU times over ``min_run_time`` s of calls: ``_common.cpu_quantile_ms``, which a
    loaded machine's waits do not lengthen) and count the watches of ``calls`` calls after
    the first (once per case)."""
    import torch
    from _common import cpu_quantile_ms

    import torchdiv
    from torchdiv._core.mixing import watch

    started: list[int] = []

    class Counted(watch.BatchAxes):  # type: ignore[misc,name-defined]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            started.append(1)
            super().__init__(*args, **kwargs)

    watch.BatchAxes = Counted  # type: ignore[attr-defined]
    torch.set_num_threads(1)
    models = _models()
    call: dict[tuple[str, str], Callable[[], Any]] = {}
    for name, (net, x) in models.items():
        energy = _energy(net, x.dim() - 1)
        call[name, "divergence"] = lambda n=net, x=x: torchdiv.divergence(n, x)
        call[name, "laplacian"] = lambda e=energy, x=x: torchdiv.laplacian(e, x)
        call[name, "jacobian_diagonal"] = lambda n=net, x=x: torchdiv.jacobian_diagonal(n, x)
    watched: dict[tuple[str, str], str] = {}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        name, op = line.strip().split("|")
        f = call[name, op]
        out: dict[str, Any] = {}
        try:
            if (name, op) not in watched:
                del started[:]
                f()
                first = len(started)
                del started[:]
                for _ in range(calls):
                    f()
                watched[name, op] = f"{first}+{len(started)}"
            out["ms"] = cpu_quantile_ms(f, min_run_time)
            out["watched"] = watched[name, op]
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        print(json.dumps(out), flush=True)


# ---------------------------------------------------------------- the driver


def _start(tree: Path, args: argparse.Namespace) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(tree.resolve() / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--worker", "--calls", str(args.calls)]
    cmd += ["--min-run-time", str(args.min_run_time)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    json.loads(proc.stdout.readline())
    return proc


def _ask(proc: subprocess.Popen[str], name: str, op: str) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"{name}|{op}\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, help="the baseline tree (its src/ is imported)")
    parser.add_argument("--new", type=Path, default=Path(__file__).parent.parent)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10, help="calls whose watches are counted")
    parser.add_argument("--min-run-time", type=float, default=0.2)
    parser.add_argument("--only", default="", help="cases whose name contains one of these (a,b)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args.calls, args.min_run_time)
    if args.old is None:
        parser.error("--old is required")
    procs = {"old": _start(args.old, args), "new": _start(args.new, args)}
    names = [n for n in _case_names() if any(o in n for o in args.only.split(","))]
    rows = []
    for name in names:
        for op in OPERATORS:
            got: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
            for r in range(args.rounds):
                for side in ("old", "new")[:: 1 if r % 2 == 0 else -1]:
                    got[side].append(_ask(procs[side], name, op))
            rows.append(_row(name, op, got))
            print(rows[-1], file=sys.stderr, flush=True)
    for proc in procs.values():
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()
    print("| model | operator | old ms | new ms | new/old | watched old | watched new |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def _case_names() -> list[str]:
    """The models' names, read without building them (in the order ``_models`` gives)."""
    import re

    source = Path(__file__).read_text()
    body = source[source.index('    return {\n        "tanh MLP') :]
    return re.findall(r'^        "([^"]+)": \(', body[: body.index("\n    }\n")], re.M)


def _row(name: str, op: str, got: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The table's row: median over the rounds (spread: max - min) and the ratio."""
    cells, medians = [name, op], {}
    for side in ("old", "new"):
        errors = [g["error"] for g in got[side] if "error" in g]
        if errors:
            cells.append(errors[0])
            continue
        ms = [g["ms"] for g in got[side]]
        medians[side] = statistics.median(ms)
        cells.append(f"{medians[side]:.2f} ({max(ms) - min(ms):.2f})")
    ratio = medians["new"] / medians["old"] if len(medians) == 2 else float("nan")
    cells.append(f"{ratio:.2f}")
    for side in ("old", "new"):
        cells.append(next((g["watched"] for g in got[side] if "watched" in g), "-"))
    return cells


if __name__ == "__main__":
    main()
