"""``python -m torchdiv demo``: every exact method and the seed threads' recipes on two nets."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.benchmark import Timer

from torchdiv import _recipes
from torchdiv._api import divergence


def demo_cases() -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    """A small tanh MLP and a small conv net with a fixed seed, float32, parameters frozen (so
    that no method pays for keeping its result differentiable and all compete alike)."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(16, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 16),
    )
    conv = torch.nn.Sequential(
        torch.nn.Conv2d(2, 8, 3, padding=1),
        torch.nn.Tanh(),
        torch.nn.Conv2d(8, 2, 3, padding=1),
    )
    return [
        ("tanh MLP 16-64-64-16, x (64, 16)", mlp.requires_grad_(False), torch.randn(64, 16)),
        ("conv net 2-8-2 ch, x (8, 2, 8, 8)", conv.requires_grad_(False), torch.randn(8, 2, 8, 8)),
    ]


def methods() -> dict[str, Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]]:
    ours: dict[str, Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]] = {
        f"torchdiv {m}": (lambda f, x, m=m: divergence(f, x, method=m))
        for m in ("auto", "forward", "reverse")
    }
    ours["torchdiv forward, chunk_size=8"] = lambda f, x: divergence(
        f, x, method="forward", chunk_size=8
    )
    return {**ours, **_recipes.RECIPES}


def run_demo(min_run_time: float = 0.2) -> str:
    """Time each method on each case; return the report as text."""
    lines = []
    for title, net, x in demo_cases():
        reference = _recipes.vmap_jacrev(net.double(), x.double())
        net.float()
        lines += ["", title, f"{'method':36s} {'median ms':>10s} {'max |err|':>10s}"]
        for name, fn in methods().items():
            err = (fn(net, x).double() - reference).abs().max().item()
            t = Timer(
                "fn(net, x)",
                globals={"fn": fn, "net": net, "x": x},
                num_threads=torch.get_num_threads(),
            )
            ms = t.blocked_autorange(min_run_time=min_run_time).median * 1e3
            lines.append(f"{name:36s} {ms:10.3f} {err:10.2e}")
    lines += [
        "",
        "max |err|: against torch.func jacrev + trace in float64; the nets run in float32.",
    ]
    return "\n".join(lines)
