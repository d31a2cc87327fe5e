"""One-hot basis vectors broadcast across the batch, and chunking."""

from __future__ import annotations

import torch

from torchdiv._core.basis import WHOLE, Share, as_blocks, basis, chunks


def test_chunks_cover_the_range_once():
    assert list(chunks(7, 3)) == [(0, 3), (3, 6), (6, 7)]
    assert list(chunks(3, 10)) == [(0, 3)]
    assert list(chunks(0, 4)) == []
    assert list(chunks(7, 3, first=2)) == [(2, 5), (5, 7)]


def test_shares_cover_every_direction_once_in_their_chunks():
    for n in (0, 1, 5, 16):
        for count in (1, 2, 3, 8):
            pieces = [p for i in range(count) for p in Share(i, count).chunks(n, 2)]
            covered = [j for start, stop in pieces for j in range(start, stop)]
            assert covered == list(range(n))
            assert all(stop - start <= 2 for start, stop in pieces)
    assert Share(1, 2).of(5) == (2, 5)
    assert WHOLE.of(7) == (0, 7)


def test_basis_is_one_hot_in_every_sample():
    like = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    v = basis(1, 4, like, batch_dims=2)
    assert v.shape == (3, 2, 3, 2, 2) and v.dtype == torch.float64 and v.is_contiguous()
    flat = v.reshape(3, 6, 4)
    expected = torch.eye(4, dtype=torch.float64)[1:4].unsqueeze(1).expand(3, 6, 4)
    assert torch.equal(flat, expected)


def test_basis_unbatched_and_as_blocks():
    like = torch.randn(5)
    v = basis(0, 5, like, batch_dims=0)
    assert torch.equal(v, torch.eye(5))
    assert as_blocks(torch.randn(3, 4, 2, 5), batch_dims=1).shape == (3, 4, 10)
    assert as_blocks(torch.randn(3, 0, 2), batch_dims=1).shape == (3, 0, 2)
