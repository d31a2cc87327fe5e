"""A tensor ``f`` assigns to an attribute or a buffer (not in place) is put back between the
evaluations of one call, as plain values and in-place writes are.

``self.n = self.n + 1`` (a step counter scaling the output) moved once per evaluation: the
Hutchinson Laplacian's Hessian-vector products (the second evaluation, the fifth at four
chunks) and ``"auto"``'s Laplacian differentiated ``f`` with ``n = 2`` (or 5) where the
call's ``f`` had ``n = 1``: 0.17, 0.61 and 0.12 off. Reference: a per-sample grad-of-grad
loop of plain autograd with the call's ``n``, float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchdiv

f64 = torch.float64


class _Stepped(nn.Module):
    """An ``lgamma`` MLP 3-8-1 (no Taylor rule: Hessian-vector products) scaled by a step
    counter that its forward reassigns, as a buffer or as a plain tensor attribute."""

    def __init__(self, buffer: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 1)
        if buffer:
            self.register_buffer("n", torch.zeros((), dtype=f64))
        else:
            self.n = torch.zeros((), dtype=f64)

    def core(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.lgamma(self.a(x).abs() + 1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n = self.n + 1
        return self.core(x) * self.n


def _reference(net: _Stepped, x: torch.Tensor, n: float, probes: torch.Tensor | None):
    """Per sample: ``mean_k v_k^T H v_k`` over the probes, or the Laplacian (``None``)."""
    rows = []
    for i in range(x.shape[0]):
        z = x[i : i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(net.core(z)[0, 0] * n, z, create_graph=True)
        if probes is None:
            rows.append(
                sum(torch.autograd.grad(g[0, j], z, create_graph=True)[0][0, j] for j in range(3))
            )
        else:
            products = [
                torch.autograd.grad((g[0] * v).sum(), z, create_graph=True)[0][0]
                for v in probes[:, i]
            ]
            rows.append(
                sum((p * v).sum() for p, v in zip(products, probes[:, i], strict=True))
                / len(probes)
            )
    return torch.stack(rows).reshape(-1, 1)


@pytest.mark.parametrize("buffer", [True, False], ids=["buffer", "attribute"])
@pytest.mark.parametrize(
    "method, chunk_size", [("hutchinson", None), ("hutchinson", 1), ("auto", None)]
)
def test_a_reassigned_counter_moves_once_per_call(buffer, method, chunk_size):
    torch.manual_seed(0)
    net = _Stepped(buffer).to(f64)
    x = torch.rand(4, 3, dtype=f64)
    probes = torch.randn(4, 4, 3, dtype=f64) if method == "hutchinson" else None
    kwargs = {"probes": probes, "chunk_size": chunk_size} if probes is not None else {}
    for call in (1, 2):
        out = torchdiv.laplacian(net, x, method=method, **kwargs)
        assert net.n.item() == call
        ref = _reference(net, x, float(call), probes)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        params = [net.a.weight, net.a.bias, net.b.weight]  # (b.bias: no second derivative)
        got = torch.autograd.grad(out.sum(), params)
        want = torch.autograd.grad(ref.sum(), params)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_reassigned_counter_in_the_divergence_and_the_value():
    """Forward mode one direction a chunk (3 evaluations: 0.14 off) and
    ``value_grad_laplacian``'s value (its second evaluation: 0.33 off) saw ``n = 2`` or 3."""
    torch.manual_seed(0)
    net = _Stepped(buffer=True).to(f64)
    x = torch.rand(4, 3, dtype=f64)
    stacked = lambda z: net(z).expand(-1, 3) * z  # noqa: E731  (a divergence of a field)
    div = torchdiv.divergence(stacked, x, method="forward", chunk_size=1)
    assert net.n.item() == 1
    rows = []
    for i in range(4):
        z = x[i : i + 1].clone().requires_grad_(True)
        y = net.core(z).expand(-1, 3)[0] * z[0]
        rows.append(sum(torch.autograd.grad(y[k], z, retain_graph=True)[0][0, k] for k in range(3)))
    torch.testing.assert_close(div, torch.stack(rows), rtol=1e-10, atol=1e-12)
    value, _, _ = torchdiv.value_grad_laplacian(net, x)
    assert net.n.item() == 2
    torch.testing.assert_close(value, net.core(x) * 2.0, rtol=1e-12, atol=1e-12)


class _Grown(nn.Module):
    """A tanh layer scaled by a history buffer that its forward grows in place, one entry a
    call (``resize_``, then the new entry written)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.register_buffer("history", torch.ones(1, dtype=f64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            k = self.history.numel()
            self.history.resize_(k + 1)
            self.history[k] = 1.0
        return torch.tanh(self.a(x)) * self.history.sum()


@pytest.mark.parametrize(
    "op, method",
    [("divergence", "forward"), ("divergence", "auto"), ("laplacian", "hutchinson")],
)
def test_a_buffer_grown_in_place_is_put_back_with_its_size(op, method):
    """Putting back a buffer ``f`` resized copied its value from before into the grown tensor,
    broadcast (``[1]`` into ``[1, 1]``): each later evaluation grew it again, so forward mode
    one direction a chunk differentiated ``f`` scaled by 2, 3 and 4 where one evaluation
    scales by 2 (rev-lines16), and the call left 4 entries. Reference: a per-sample loop of
    plain autograd with the call's scale, float64."""
    torch.manual_seed(0)
    net = _Grown().to(f64)
    x = torch.rand(4, 3, dtype=f64)
    probes = torch.randn(2, 4, 3, dtype=f64)
    options = {"probes": probes} if method == "hutchinson" else {}
    out = getattr(torchdiv, op)(net, x, method=method, chunk_size=1, **options)
    grown = net.history.tolist()
    rows = []
    for i in range(4):
        z = x[i : i + 1].clone().requires_grad_(True)
        y = torch.tanh(net.a(z))[0] * 2.0
        jac = torch.stack([torch.autograd.grad(y[k], z, create_graph=True)[0][0] for k in range(3)])
        if op == "divergence":
            rows.append(jac.trace())
        else:  # per output j: the probes' mean of v^T H_j v
            quad = [
                [torch.autograd.grad(jac[j] @ v, z, retain_graph=True)[0][0] @ v for j in range(3)]
                for v in probes[:, i]
            ]
            rows.append(torch.tensor(quad, dtype=f64).mean(0))
    torch.testing.assert_close(out, torch.stack(rows), rtol=1e-10, atol=1e-12)
    assert grown == [1.0, 1.0]


class _GrownTransposed(nn.Module):
    """A tanh layer scaled by ``history[0, 1]``, a buffer kept transposed (strides ``(1, 2)``)
    that its forward grows in place by a row (``resize_``: the grown tensor reads the storage
    row-major, so that the scale is ``2`` after one call from ``[[1, 3], [2, 4]]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.register_buffer("history", torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=f64).t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            k = self.history.shape[0]
            self.history.resize_(k + 1, 2)
            self.history[k] = 1.0
        return torch.tanh(self.a(x)) * self.history[0, 1]


@pytest.mark.parametrize("op", ["divergence", "jacobian_diagonal"])
def test_a_transposed_buffer_grown_in_place_is_put_back_with_its_strides(op):
    """Put back with its size only, a transposed buffer came back row-major (its values
    right, its strides not), so that each later evaluation's ``resize_`` read its storage
    otherwise: the scale ``3`` where one evaluation's is ``2`` (forward mode one direction a
    chunk: 0.24 off), and the call left another buffer than one evaluation. Reference: a
    per-sample loop of plain autograd with one call's scale and buffer, float64."""
    torch.manual_seed(0)
    plain = _GrownTransposed().to(f64)
    net = _GrownTransposed().to(f64)
    net.load_state_dict(plain.state_dict())
    x = torch.rand(4, 3, dtype=f64)
    with torch.no_grad():
        plain(x[:1])  # one evaluation: its scale and the buffer it leaves
    out = getattr(torchdiv, op)(net, x, method="forward", chunk_size=1)
    rows = []
    for i in range(4):
        z = x[i : i + 1].clone().requires_grad_(True)
        y = torch.tanh(net.a(z))[0] * plain.history[0, 1]
        jac = torch.stack([torch.autograd.grad(y[k], z, retain_graph=True)[0][0] for k in range(3)])
        rows.append(jac.diagonal())
    want = torch.stack(rows)
    torch.testing.assert_close(
        out, want.sum(-1) if op == "divergence" else want, rtol=1e-10, atol=1e-12
    )
    assert torch.equal(net.history, plain.history)
    assert net.history.stride() == plain.history.stride()
