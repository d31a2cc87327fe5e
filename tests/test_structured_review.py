"""Regressions from the adversarial review of method="structured" (and "auto" choosing it).

Every test states the behaviour the issue or the API contract asks for, and failed before its
fix; the comments say what was wrong. References are float64 closed forms or the generic
methods.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchdiv
from torchdiv._bench.memory import peak_memory_mb

f64 = torch.float64


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_gelu_tanh_approximation_is_not_dropped() -> None:
    # factors._Walker._factors calls DERIVATIVES[op](a, y, *args[1:]) without node.kwargs:
    # gelu's `approximate` is keyword-only in ATen, so the exact-erf derivative is used.
    torch.manual_seed(0)
    x = torch.randn(4, 5, dtype=f64)
    f = lambda x: F.gelu(x, approximate="tanh")  # noqa: E731
    expected = torchdiv.divergence(f, x, method="reverse")
    _close(torchdiv.divergence(f, x, method="structured"), expected)
    _close(torchdiv.divergence(f, x), expected)


@pytest.mark.parametrize(("shape", "batch_dims"), [((1, 3, 5), 1), ((3, 5), 0)])
def test_linear_on_several_rows_of_one_sample(shape: tuple[int, ...], batch_dims: int) -> None:
    # With one sample every tensor passes _per_sample, so mm on a (T, D) block is taken as
    # Shared(W) on a D-wide event instead of I_T (x) W: tr(W) instead of T tr(W).
    torch.manual_seed(0)
    lin = nn.Linear(5, 5).to(f64)
    x = torch.randn(shape, dtype=f64)
    expected = torchdiv.divergence(lin, x, batch_dims=batch_dims, method="reverse")
    _close(expected.reshape(-1), 3 * lin.weight.trace().reshape(1))
    _close(torchdiv.divergence(lin, x, batch_dims=batch_dims), expected)
    residual = lambda x: x + lin(x)  # noqa: E731
    _close(
        torchdiv.divergence(residual, x, batch_dims=batch_dims),
        torchdiv.divergence(residual, x, batch_dims=batch_dims, method="reverse"),
    )


def test_score_function_differentiating_inside_f() -> None:
    # f = grad E (score matching): the backward ops autograd runs inside f read saved
    # tensors through new tensor objects, so the recorder sees them as constants and the
    # divergence (the Laplacian of E) comes out wrong instead of falling back.
    torch.manual_seed(0)
    energy = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)).to(f64)

    def score(x: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(energy(x).sum(), x, create_graph=True)[0]

    x = torch.randn(4, 5, dtype=f64, requires_grad=True)
    expected = torchdiv.divergence(score, x, method="reverse")
    _close(torchdiv.divergence(score, x), expected)


def test_buffer_read_then_updated_in_place() -> None:
    # capture() drops the kept values when f mutates anything, and values()/propagate()
    # replay the graph reading the buffer's *new* value: the divergence is taken at a
    # different function than the one f computed.
    torch.manual_seed(0)
    w = torch.randn(5, 5, dtype=f64)
    buf = torch.zeros(5, dtype=f64)

    def f(x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x @ w + buf)
        buf.add_(1.0)
        return y @ w

    x = torch.randn(4, 5, dtype=f64)
    y = torch.tanh(x @ w)
    expected = ((1 - y**2) * torch.diagonal(w @ w)).sum(1)  # at buf = 0
    buf.zero_()
    _close(torchdiv.divergence(f, x), expected)


def test_auto_fallback_runs_side_effects_once() -> None:
    # "auto" now captures f (one call) and, when the plan fails, runs the generic engine
    # (another call): a training-mode BatchNorm updates its running statistics twice.
    # Before issue 7, auto ran f's side effects once.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 5))
    torchdiv.divergence(net, torch.randn(8, 5))
    assert net[1].num_batches_tracked.item() == 1


def test_custom_function_probe_does_not_call_f_again() -> None:
    # capture._custom_function re-runs f whenever x does not require grad and f computes
    # anything from x with autograd off (an ordinary no_grad block): f's side effects
    # (counters, RNG, running statistics) happen twice.
    w = torch.randn(5, 5)
    calls = []

    def f(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        with torch.no_grad():
            scale = x.norm()
        return torch.tanh(x @ w) * scale

    torchdiv.divergence(f, torch.randn(4, 5), method="structured")
    assert len(calls) == 1


def test_leaky_relu_slope_in_float64() -> None:
    # elementwise._leaky_relu builds torch.where(x > 0, 1.0, slope) in the default dtype
    # (float32) before casting: a float64 divergence is wrong in the 9th digit.
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=f64)
    expected = (x > 0).to(f64).sum(1) + 0.2 * (x <= 0).to(f64).sum(1)
    f = lambda x: F.leaky_relu(x, 0.2)  # noqa: E731
    torch.testing.assert_close(torchdiv.divergence(f, x), expected, rtol=1e-14, atol=1e-14)


def test_empty_batch_keeps_the_graph() -> None:
    # _planned returns x.new_zeros(...) for an empty x: no grad_fn, so a training loss
    # over an empty mini-batch cannot call backward (it could before, and with "reverse").
    net = nn.Linear(3, 3)
    x = torch.randn(0, 3, requires_grad=True)
    torchdiv.divergence(net, x, method="reverse").sum().backward()
    torchdiv.divergence(net, x).sum().backward()


def test_result_is_not_a_stride_zero_view() -> None:
    # cycle.trace returns total.expand(N) when no path is per-sample: the caller gets a
    # tensor whose elements share memory, and in-place updates raise.
    a = torch.tensor([[2.0, 1.0], [7.0, -5.0]])
    div = torchdiv.divergence(lambda x: x @ a.T, torch.randn(3, 2))
    div += 1
    torch.testing.assert_close(div, torch.full((3,), -2.0))


def test_chunk_size_bounds_memory_of_bottleneck_chain() -> None:
    # cycle._join multiplies adjacent shared matrices unconditionally: a D -> 2 -> D linear
    # bottleneck becomes a dense D x D matrix whatever chunk_size says (reverse: D/8 VJPs of
    # 8 rows).
    torch.manual_seed(0)
    d = 1500
    a, b = torch.randn(d, 2) / d**0.5, torch.randn(2, d)
    f = lambda x: torch.tanh(x @ a @ b)  # noqa: E731
    x = torch.randn(2, d)
    reverse = peak_memory_mb(lambda: torchdiv.divergence(f, x, method="reverse", chunk_size=8))
    structured = peak_memory_mb(lambda: torchdiv.divergence(f, x, chunk_size=8))
    assert structured < 4 * reverse + 1.0, (structured, reverse)


def test_index_select_is_a_movement_factor() -> None:
    # _MOVEMENT lists index_select, but _movement replaces every tensor other than the
    # source by -1, the index included: the op always fails ("INDICES element is out of
    # DATA bounds"), and method="structured" raises for a graph it claims to support.
    torch.manual_seed(0)
    w = torch.randn(5, 5, dtype=f64)
    idx = torch.tensor([4, 0, 1, 1, 2])
    f = lambda x: torch.tanh(x.index_select(1, idx)) @ w  # noqa: E731
    x = torch.randn(3, 5, dtype=f64)
    _close(
        torchdiv.divergence(f, x, method="structured"), torchdiv.divergence(f, x, method="reverse")
    )


def test_deep_chain_does_not_hit_the_recursion_limit() -> None:
    # _Walker.paths recurses once per op: a 400-layer MLP raises RecursionError, which is
    # reported as "no propagation rule for maximum recursion depth exceeded".
    layers: list[nn.Module] = []
    for _ in range(400):
        layers += [nn.Linear(3, 3), nn.Tanh()]
    net = nn.Sequential(*layers).to(f64)
    x = torch.randn(2, 3, dtype=f64)
    _close(
        torchdiv.divergence(net, x, method="structured"),
        torchdiv.divergence(net, x, method="reverse"),
    )
