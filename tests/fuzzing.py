"""What the differential fuzzers share (``tests/stacks/test_fuzz24.py``, ``test_fuzz27.py``,
``test_fuzz28.py``, ``test_fuzzchain29.py``, ``tests/taylor/test_fuzzlap28.py``): seeded draws,
the comparison of a result and of its gradients with their float64 references, and a spy on the
ways their seeds take through an engine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch


def uniform_int(g: torch.Generator, low: int, high: int) -> int:
    """A uniform integer in ``[low, high]``."""
    return int(torch.randint(low, high + 1, (), generator=g))


def pick(g: torch.Generator, options: list) -> Any:
    """One of ``options``, uniformly."""
    return options[uniform_int(g, 0, len(options) - 1)]


def randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    """Standard normal float64 draws of ``shape``, times ``scale``."""
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def far(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> str | None:
    """Why ``actual`` is not ``expected`` within ``tol`` relative to ``1 + max |expected|``
    (its shape, or its largest error against that scale), ``None`` if it is: the fuzzers'
    comparison of a result with its float64 reference."""
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not expected.numel():
        return None
    scale = 1.0 + float(expected.detach().abs().max())
    err = float((actual.detach().to(torch.float64) - expected.detach()).abs().max())
    if not err <= tol * scale:
        return f"max error {err:.3e} (scale {scale:.3e})"
    return None


class Switch:
    """A flag a fuzzer's modules read (``if PLAIN:``), on for a block (``with PLAIN:``): the
    float64 references evaluate a program with its activations written out."""

    def __init__(self) -> None:
        self.on = False

    def __bool__(self) -> bool:
        return self.on

    def __enter__(self) -> None:
        self.on = True

    def __exit__(self, *exc: object) -> None:
        self.on = False


def weighted(
    outs: list[torch.Tensor], expected: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A scalar loss of results ``outs`` and the same of their float64 references
    ``expected``: each weighted by the same seeded normal draws and summed."""
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(e.shape, generator=g, dtype=torch.float64) for e in expected]
    loss = sum((o * w.to(o.dtype)).sum() for o, w in zip(outs, weights, strict=True))
    ref_loss = sum((e * w).sum() for e, w in zip(expected, weights, strict=True))
    assert isinstance(loss, torch.Tensor) and isinstance(ref_loss, torch.Tensor)
    return loss, ref_loss


def gradient_faults(
    name: str,
    loss: torch.Tensor,
    tensors: list[torch.Tensor],
    labels: list[str],
    want: list[torch.Tensor],
    tol: float,
) -> list[str]:
    """The disagreements of ``loss.backward()``'s gradients of ``tensors`` (their ``.grad``,
    ``None`` read as zeros) with their references ``want``; a ``loss`` without a graph is
    right only where every reference is 0."""
    if not loss.requires_grad:
        if any(float(w.abs().max()) > 0 for w in want if w.numel()):
            return [f"{name}: the result does not require grad, its reference's gradients != 0"]
        return []
    try:
        loss.backward()
    except RuntimeError as exc:
        return [f"{name}: .backward() raised RuntimeError: {str(exc)[:300]}"]
    faults = []
    for label, t, e in zip(labels, tensors, want, strict=True):
        a = torch.zeros_like(e) if t.grad is None else t.grad
        if (bad := far(a, e, tol)) is not None:
            faults.append(f"{name}: grad of {label} {tuple(e.shape)}: {bad}")
    return faults


def taken_paths(monkeypatch: pytest.MonkeyPatch, paths: dict[str, tuple[object, str]]) -> set[str]:
    """The names of ``paths`` (each a module and the name of a function in it, patched with a
    spy) whose function answered (returned other than ``None``) since: which ways a fuzzer's
    seeds took through an engine."""
    taken: set[str] = set()

    def spied(name: str, fn: Callable) -> Callable:
        def spy(*args: object, **kwargs: object) -> object:
            out = fn(*args, **kwargs)
            if out is not None:
                taken.add(name)
            return out

        return spy

    for name, (module, attribute) in paths.items():
        monkeypatch.setattr(module, attribute, spied(name, getattr(module, attribute)))
    return taken
