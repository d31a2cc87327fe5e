"""The lead's thirty-first session: ``value_grad_laplacian``'s ``"auto"`` on a PyTorch whose
Dynamo lacks the private ``CompileContext.current_trace_id`` it reads (rev-merges30: an
``AttributeError`` from every such call)."""

from __future__ import annotations

import pytest
import torch
from torch._guards import CompileContext

import torchdiv


def _u(xyt: torch.Tensor) -> torch.Tensor:
    return torch.sin(xyt[:, 0]) * torch.sin(xyt[:, 1]) * torch.exp(-xyt[:, 2])


@pytest.mark.parametrize("coordinates", [None, [0, 1]])
def test_auto_without_dynamos_trace_id(
    monkeypatch: pytest.MonkeyPatch, coordinates: list[int] | None
) -> None:
    monkeypatch.delattr(CompileContext, "current_trace_id")
    x = torch.randn(7, 3, dtype=torch.float64)
    out = torchdiv.value_grad_laplacian(_u, x, coordinates=coordinates)
    # closed forms: Δ_xy u = -2u, Δ_xyt u = -u; float64 rounding only
    want = (-2 if coordinates else -1) * _u(x)
    torch.testing.assert_close(out.laplacian, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.value, _u(x))
