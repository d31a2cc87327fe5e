"""What the differential fuzzers share (``tests/stacks/test_fuzz24.py``, ``test_fuzz27.py``,
``test_fuzz28.py``, ``tests/taylor/test_fuzzlap28.py``): seeded draws, the comparison of a
result with its float64 reference, and a spy on the ways their seeds take through an engine."""

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
