"""torchdiv.distributed: one batch's exact divergence and Laplacian (and a Hutchinson estimate)
with the directions shared out across two gloo processes equal one process's to float64
round-off, on every rank, with gradients (averaged over the ranks, by hand or by DDP) equal to
one process's. Cases in ``tests/ddp_cases.py``; the processes are bounded in time."""

from __future__ import annotations

import ddp_cases
import pytest
import torch

import torchdiv

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")

ROUND_OFF = {"rtol": 1e-12, "atol": 1e-12}  # float64: partial sums added in another order


def test_sharded_operators_equal_one_process():
    cases = ddp_cases.SHARDED
    outcomes = ddp_cases.run_pairs(list(enumerate(cases)), runner=ddp_cases.run_sharded)
    assert sorted(outcomes) == list(range(len(cases)))
    for index, (status, payload) in outcomes.items():
        assert status == "ok", (cases[index], payload)
        values, grads = payload
        value, expected_grads = ddp_cases.sharded_reference(cases[index])
        for rank_values in values:  # the same on every rank
            torch.testing.assert_close(torch.tensor(rank_values, dtype=torch.float64), value,
                                       **ROUND_OFF)  # fmt: skip
        for grad, expected in zip(grads, expected_grads, strict=True):
            got = torch.tensor(grad, dtype=torch.float64)
            torch.testing.assert_close(got, expected, **ROUND_OFF)


def test_without_process_group_the_error_names_the_way_out():
    with pytest.raises(RuntimeError, match=r"distributed\.divergence: torch\.distributed is not"):
        torchdiv.distributed.divergence(torch.sin, torch.randn(2, 3))
