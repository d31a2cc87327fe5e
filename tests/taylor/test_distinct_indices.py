"""``index_put`` without accumulate is followed by the recording engines only where its indices
name each place once (``_taylor.linear._distinct``): places that alias through a negative index
(``-1`` is the last), a boolean mask's positions, and index tensors broadcast together (a row
index ``(2, 1)`` against a column index ``(2,)``) are places PyTorch writes, counted as such.
Reference: the places listed by hand."""

from __future__ import annotations

import pytest
import torch

from torchdiv._taylor.linear import _distinct

CASES = [
    ((4,), [torch.tensor([-1, 3])], False),  # -1 and 3 are one place of 4
    ((4,), [torch.tensor([-1, 0])], True),
    ((3, 4), [None, torch.tensor([-4, 1])], True),  # -4 is 0 of the second dimension
    ((3, 4), [None, torch.tensor([-4, 0])], False),
    ((3, 4), [torch.tensor([[0], [1]]), torch.tensor([2, 2])], False),  # broadcast: (0,2) twice
    ((3, 4), [torch.tensor([[0], [1]]), torch.tensor([2, 3])], True),
    ((3, 4), [None, torch.tensor([True, False, True, False])], True),
    ((3, 4), [torch.tensor([[True, False, True, False]] * 3)], True),
    ((3, 4), [torch.tensor([0, 2]), None], True),
]


@pytest.mark.parametrize("shape, indices, distinct", CASES, ids=[str(i) for i in range(len(CASES))])
def test_places_named_twice_are_told(shape, indices, distinct):
    assert _distinct(shape, indices) is distinct
