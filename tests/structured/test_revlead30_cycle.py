"""The structured chain of 02f833fe (rev-lead30): carried column blocks of
``EAGER_BLOCK_ELEMENTS`` (2^18 then, 2^19 since; 2^20 before) and the last diagonal
contracted as one batched product ``(v o S_k) @ d`` (was a product and its sum). References:
a dense product per sample (``_entries``), per-sample ``autograd.grad`` loops (conftest's
``loop_diagonal``) for values, parameter gradients and the gradients of those (double
backward), and the float64 diagonal of the same rounded weights for half precision."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import assert_close, carried_columns, loop_diagonal
from torch import nn

import torchdiv
from torchdiv._structured import cycle

f64 = torch.float64


def _dense(shared: list[torch.Tensor], scales: list[torch.Tensor]) -> torch.Tensor:
    """The diagonal of each sample's ``S_k D_{k-1} ... D_1 S_1``, one dense product each."""
    rows = max(d.shape[0] for d in scales)
    out = []
    for b in range(rows):
        m = shared[0]
        for s, d in zip(shared[1:], scales, strict=True):
            m = s @ (d[b % d.shape[0]][:, None] * m)
        out.append(m.diagonal())
    return torch.stack(out)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_entries_of_shared_and_per_sample_diagonals(k: int) -> None:
    """Every mix of shared ``(1, w)`` and per-sample ``(N, w)`` diagonals (the batched product
    broadcasts ``(1, c, w) @ (N, w, 1)`` and ``(N, c, w) @ (1, w, 1)``), carried a column, two
    or all at once; first and second derivatives by float64 finite differences."""
    torch.manual_seed(k)
    widths = [5, *range(4, 3 + k), 5]
    shared = [
        torch.randn(widths[i + 1], widths[i], dtype=f64, requires_grad=True) for i in range(k)
    ]
    for pattern in itertools.product([1, 3], repeat=k - 1):
        scales = [
            torch.randn(p, widths[i + 1], dtype=f64, requires_grad=True)
            for i, p in enumerate(pattern)
        ]
        want = _dense(shared, scales)
        for chunk in (None, 1, 2):
            got = cycle._entries(shared, scales, chunk)
            assert got.shape == want.shape  # ((1, w) where every diagonal is shared)
            assert_close(got, want)

    if k != 3:  # (one mix of shared and per-sample diagonals: 1 s)
        return

    def entries(*args: torch.Tensor) -> torch.Tensor:
        return cycle._entries(list(args[:k]), list(args[k:]), 2)

    mixed = [
        torch.randn(1 + 2 * (i % 2), widths[i + 1], dtype=f64, requires_grad=True)
        for i in range(k - 1)
    ]
    assert torch.autograd.gradgradcheck(entries, (*shared, *mixed))


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers += [nn.Linear(a, b), nn.Tanh()] if i < len(sizes) - 2 else [nn.Linear(a, b)]
    return nn.Sequential(*layers).to(f64)


class _Residual(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.inner(z)


class _ConcatSquash(nn.Module):
    """FFJORD's ConcatSquashLinear at a time shared by the batch, softplus between."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        pairs = list(itertools.pairwise(sizes))
        self.linear = nn.ModuleList([nn.Linear(a, b) for a, b in pairs])
        self.gate = nn.ModuleList([nn.Linear(1, b) for _, b in pairs])
        self.t = torch.tensor([[0.3]], dtype=f64)
        self.to(f64)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for i, (linear, gate) in enumerate(zip(self.linear, self.gate, strict=True)):
            z = linear(z) * torch.sigmoid(gate(self.t))
            if i < len(self.linear) - 1:
                z = nn.functional.softplus(z)
        return z


MODELS = {
    "3-layer MLP": lambda: _mlp([6, 9, 9, 6]),
    "5-layer MLP (n >= 3)": lambda: _mlp([6, 9, 8, 9, 7, 6]),
    "residual": lambda: _Residual(_mlp([6, 9, 8, 9, 6])),
    "ConcatSquash": lambda: _ConcatSquash([6, 9, 8, 9, 6]),
}


@pytest.mark.parametrize("batch_dims", [1, 2])
@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("model", list(MODELS))
def test_diagonal_and_divergence_to_second_derivatives(
    model: str, chunk_size: int | None, batch_dims: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Jacobian diagonal and the divergence, the gradients of a loss of each by the
    parameters and the gradients of those (a gradient penalty's double backward) equal the
    per-sample loop's; at most ``chunk_size`` columns carried at once."""
    carried = carried_columns(monkeypatch)
    torch.manual_seed(0)
    f = MODELS[model]()
    shape = (2, 3, 6) if batch_dims == 2 else (5, 6)
    x = torch.randn(*shape, dtype=f64)
    params = list(f.parameters())
    unused = {"allow_unused": True, "materialize_grads": True}  # (a last bias: none)
    flat = x.reshape(-1, 6)
    want = loop_diagonal(f, flat, create_graph=True).reshape(shape)
    kw = {"batch_dims": batch_dims, "method": "structured", "chunk_size": chunk_size}
    for op, reference in (
        (torchdiv.jacobian_diagonal, want),
        (torchdiv.divergence, want.sum(-1)),
    ):
        got = op(f, x, **kw)
        assert_close(got, reference.detach())  # float64: conftest's tolerances

        def penalty(out: torch.Tensor) -> torch.Tensor:  # a loss, its gradient's square
            grads = torch.autograd.grad(out.tanh().sum(), params, create_graph=True, **unused)
            return sum((g * g).sum() for g in grads)

        for g, w in zip(
            torch.autograd.grad(penalty(got), params, **unused),
            torch.autograd.grad(penalty(reference), params, retain_graph=True, **unused),
            strict=True,
        ):
            assert_close(g, w)
    assert carried
    if chunk_size is not None:
        assert max(carried) <= chunk_size


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_diagonal_within_unit_roundoffs(dtype: torch.dtype) -> None:
    """The batched product in half precision (rounded products accumulated by the matrix
    product) is as accurate as the product and sum it replaced: a 64-wide tanh MLP's
    diagonal within 6 unit roundoffs of the largest entry off the float64 diagonal of the
    same rounded weights and inputs (measured: at most 2.2-3.0 by either contraction over
    30 seeds; a few roundings per entry, each at most half a unit)."""
    eps = torch.finfo(dtype).eps
    for seed in range(3):
        torch.manual_seed(seed)
        f = _mlp([8, 64, 64, 64, 8]).to(dtype)
        x = torch.randn(16, 8, dtype=dtype)
        got = torchdiv.jacobian_diagonal(f, x, method="structured")
        assert got.dtype == dtype
        want = loop_diagonal(f.to(f64), x.to(f64))
        assert ((got.to(f64) - want).abs().max() / want.abs().max()).item() <= 6 * eps


def test_default_block_bounds_the_carried_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``chunk_size``, a block carries ``EAGER_BLOCK_ELEMENTS // (N * widest)`` columns
    (at least one): 64-wide layers at 1024 samples, 8 columns at once of 2^19 elements."""
    carried = carried_columns(monkeypatch)
    torch.manual_seed(0)
    f = _mlp([16, 64, 64, 16])
    x = torch.randn(1024, 16, dtype=f64)
    got = torchdiv.jacobian_diagonal(f, x, method="structured")
    assert carried and 1024 * max(carried) * 64 <= cycle.EAGER_BLOCK_ELEMENTS == 1 << 19
    assert_close(got[:4], loop_diagonal(f, x[:4]))


def test_a_traced_replay_carries_the_blocks_it_carried_before() -> None:
    """A compiled call's replay (``replay._plan``) makes its column block at the recorded batch
    size and serves the sizes whose block stays within twice it (``_carried``): with the
    eager call's 2^18 blocks it served a 64-wide MLP recorded at 2 samples up to 128 rows (a
    new recording, a new graph, at 200: 6.6-7.4 s under ``aot_eager``), and one recorded at
    2000 rows unrolled 32 blocks of 2 columns into its graph (compiled in 23-24 s, was
    7.5-8.8 s), for no faster compiled call (2000 rows: 38.5 ms, was 39.7). Its blocks stay
    ``BLOCK_ELEMENTS`` (2^20): served up to 512 rows, 8 blocks at 2000."""
    from torchdiv._structured import replay

    torch.manual_seed(0)
    f = _mlp([64, 64, 64, 64]).float()
    small = replay._plan(f, torch.randn(2, 64), 1, None)
    large = replay._plan(f, torch.randn(2000, 64), 1, None)
    assert small is not None and large is not None
    assert small.rows[1] >= 512
    assert -(-64 // large.chunk) <= 8
