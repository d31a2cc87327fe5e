"""rev-b33: review of opinfo33 and nnsweep33 (NOTES_rev-b33.md)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchdiv

f64 = torch.float64


class _Layer(nn.Module):
    """``tanh(head(TEL(tail(x))))`` per sample: a train-mode transformer layer whose attention
    and feed-forward dropouts draw under torch.func otherwise than in a plain call from the
    same generator state (nnsweep33's left-alone case)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.2, batch_first=True)
        self.layer.norm_first = True
        self.A = nn.Parameter(torch.randn(3, 12, generator=g, dtype=f64))
        self.W = nn.Parameter(torch.randn(12, 2, generator=g, dtype=f64) / 4)
        self.double().train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(torch.tanh(x @ self.A).reshape(-1, 3, 4))
        return torch.tanh(h.reshape(-1, 12) @ self.W)


def _transformed(f: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``f(x)`` and every sample's Jacobian ``(N, m, n)`` of one evaluation under
    ``torch.func.vjp`` (the draw forward over reverse differentiates), the Jacobian by its
    pullback (first order: the draw is in question here, not PyTorch's formulas)."""
    y, pullback = torch.func.vjp(f, x)
    eye = torch.eye(y.shape[1], dtype=y.dtype)
    rows = [pullback(eye[i].expand_as(y))[0] for i in range(y.shape[1])]
    return y, torch.stack(rows, 1)


@pytest.mark.parametrize(("chunk_size", "coordinates"), [(None, None), (1, None), (None, [0, 2])])
def test_value_grad_laplacian_forward_over_reverse_value_of_the_derivatives_draw(
    chunk_size: int | None, coordinates: list[int] | None
) -> None:
    """The value and the gradient are of ONE draw: before rev-b33 the value came from a plain
    evaluation (one dropout draw) and the gradient and Laplacian from the transformed one
    (another: 0.05 apart here), silently; with ``coordinates`` too (the Laplacian's
    products' draw). Float64: 1e-12 is rounding."""
    torch.manual_seed(0)
    f = _Layer()
    x = torch.randn(3, 3, dtype=f64)
    torch.manual_seed(1)
    plain = f(x)
    torch.manual_seed(1)
    y, jac = _transformed(f, x)
    assert (plain - y).abs().max() > 1e-3  # (the two draws differ: the test can fail)
    torch.manual_seed(1)
    out = torchdiv.value_grad_laplacian(
        f, x, method="forward-over-reverse", chunk_size=chunk_size, coordinates=coordinates
    )
    torch.testing.assert_close(out.gradient, jac, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.value, y, rtol=0, atol=1e-12)
    if coordinates is not None:  # the Laplacian of that draw: laplacian's, from the same state
        torch.manual_seed(1)
        lap = torchdiv.laplacian(f, x, method="forward-over-reverse", coordinates=coordinates)
        torch.testing.assert_close(out.laplacian, lap, rtol=0, atol=1e-12)
    # the value's parameter gradients: of that draw's graph
    params = [p for p in f.parameters()]
    got = torch.autograd.grad(out.value.sum(), params, allow_unused=True)
    want = torch.autograd.grad(y.sum(), params, allow_unused=True)
    for a, b in zip(got, want, strict=True):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["forward", "reverse", "auto"])
def test_native_layer_norm_mixed_precision_keeps_plain_dtypes(method: str) -> None:
    """``torch.native_layer_norm`` of a bfloat16 input with float32 weight and bias (mixed
    precision, PyTorch's CPU kernel): ``out`` bfloat16, ``mean``/``rstd`` float32, as a plain
    call. opinfo33's replacement returned ``out`` float32 and the statistics bfloat16, so
    ``f``'s next bfloat16 matmul raised under torchdiv only. Values: the divergence against
    one of ``f`` with the input widened by hand (bfloat16 rounding of ``out`` and of the
    tangents, eps 2^-8, over a sum of four: 2e-2 relative and absolute)."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(4, generator=g), torch.randn(4, generator=g)
    lin = torch.randn(4, 4, generator=g).to(torch.bfloat16)
    seen: dict[str, list[torch.dtype]] = {}

    def f(x: torch.Tensor) -> torch.Tensor:
        out, mean, rstd = torch.native_layer_norm(x.to(torch.bfloat16), [4], w, b, 1e-5)
        seen["dtypes"] = [out.dtype, mean.dtype, rstd.dtype]
        return (out @ lin).float() + 0 * (mean * rstd).float()

    x = torch.randn(3, 4, generator=g)
    plain = [t.dtype for t in torch.native_layer_norm(x.to(torch.bfloat16), [4], w, b, 1e-5)]
    assert plain == [torch.bfloat16, torch.float32, torch.float32]
    div = torchdiv.divergence(f, x, method=method)
    assert seen["dtypes"] == plain
    want = torchdiv.divergence(
        lambda z: (torch.nn.functional.layer_norm(z, [4], w, b).to(torch.bfloat16) @ lin).float(),
        x,
        method="reverse",
    )
    torch.testing.assert_close(div, want, rtol=2e-2, atol=2e-2)
