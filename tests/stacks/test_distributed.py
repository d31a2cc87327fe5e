"""torchdiv.distributed: one batch's exact divergence and Laplacian (and a Hutchinson estimate)
with the directions shared out across two (or three) gloo processes equal one process's to
float64 round-off, on every rank, with x-gradients equal to one process's on every rank and
parameter gradients (averaged over the ranks, by hand or by DDP) equal to one process's, also
through a second backward pass. Cases in ``tests/ddp_cases.py``; the processes are bounded in
time."""

from __future__ import annotations

import ddp_cases
import pytest
import torch

import torchdiv

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")

ROUND_OFF = {"rtol": 1e-12, "atol": 1e-12}  # float64: partial sums added in another order


def _assert_sharded_equal_one_process(cases: list, world: int) -> None:
    outcomes = ddp_cases.run_pairs(list(enumerate(cases)), ddp_cases.run_sharded, world=world)
    assert sorted(outcomes) == list(range(len(cases)))
    for index, (status, payload) in outcomes.items():
        assert status == "ok", (cases[index], payload)
        outputs, grads = payload
        value, x_grad, expected_grads = ddp_cases.sharded_reference(cases[index])
        assert len(outputs) == world
        for rank_value, rank_x_grad in outputs:  # the same on every rank
            for got, expected in ((rank_value, value), (rank_x_grad, x_grad)):
                got = torch.tensor(got, dtype=torch.float64)
                torch.testing.assert_close(got, expected, **ROUND_OFF, msg=str(cases[index]))
        for grad, expected in zip(grads, expected_grads, strict=True):
            got = torch.tensor(grad, dtype=torch.float64)
            torch.testing.assert_close(got, expected, **ROUND_OFF, msg=str(cases[index]))


def test_sharded_operators_equal_one_process():
    """Values, x-gradients (every rank's: the whole batch's, not R times its share's) and,
    through a gradient penalty on x, second-order parameter gradients."""
    _assert_sharded_equal_one_process(ddp_cases.SHARDED, world=2)


@pytest.mark.slow
def test_ranks_without_directions_equal_one_process():
    """Three ranks, an event of two elements: a rank with nothing to add takes part in every
    backward all-reduce (none hangs) and every rank's results equal one process's."""
    _assert_sharded_equal_one_process(ddp_cases.SHARDED_THREE, world=3)


def test_without_process_group_the_error_names_the_way_out():
    with pytest.raises(RuntimeError, match=r"distributed\.divergence: torch\.distributed is not"):
        torchdiv.distributed.divergence(torch.sin, torch.randn(2, 3))
