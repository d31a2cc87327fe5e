"""Property-based: for random linear maps of random shapes, every method recovers the matrix."""

from __future__ import annotations

import math

import torch
from conftest import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

import torchdiv

shapes = st.lists(st.integers(1, 3), min_size=0, max_size=3)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    batch=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    event=shapes,
    out_event=shapes,
    method=st.sampled_from(["auto", "forward", "reverse"]),
    chunk_size=st.one_of(st.none(), st.integers(1, 5)),
    seed=st.integers(0, 2**16),
)
def test_linear_maps(batch, event, out_event, method, chunk_size, seed):
    g = torch.Generator().manual_seed(seed)
    n, m = math.prod(event), math.prod(out_event)
    A = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = torch.randn((*batch, *event), generator=g, dtype=torch.float64)
    bd = len(batch)

    def f(z):
        flat = z.reshape((*z.shape[:bd], n))
        return (flat @ A.T).reshape((*z.shape[:bd], *out_event))

    kw = {"batch_dims": bd, "method": method, "chunk_size": chunk_size}
    jac = torchdiv.jacobian(f, x, **kw)
    assert jac.shape == (*batch, *out_event, *event)
    assert_close(jac.reshape(-1, m, n), A.expand(max(math.prod(batch), 1), m, n))
    if m == n:
        assert_close(torchdiv.divergence(f, x, **kw), A.trace().expand(batch))
        assert_close(
            torchdiv.jacobian_diagonal(f, x, **kw).reshape(-1, n),
            A.diagonal().expand(max(math.prod(batch), 1), n),
        )
