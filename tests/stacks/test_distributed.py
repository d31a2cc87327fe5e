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

# The two-rank cases (ddp_cases.SHARDED: values, every rank's x-gradient, the whole batch's and
# not R times its share's, and, through a gradient penalty on x, second-order parameter
# gradients) run on the DDP test's pair of processes, one spawn for both:
# tests/stacks/test_ddp.py::test_every_operator_under_ddp_and_fsdp_equals_one_process.


@pytest.mark.slow
def test_ranks_without_directions_equal_one_process():
    """Three ranks, an event of two elements: a rank with nothing to add takes part in every
    backward all-reduce (none hangs) and every rank's results equal one process's."""
    cases = ddp_cases.SHARDED_THREE
    outcomes = ddp_cases.run_pairs(list(enumerate(cases)), ddp_cases.run_sharded, world=3)
    assert sorted(outcomes) == list(range(len(cases)))
    for index, outcome in outcomes.items():
        ddp_cases.assert_sharded_equal_one_process(cases[index], outcome, 3)


def test_without_process_group_the_error_names_the_way_out():
    with pytest.raises(RuntimeError, match=r"distributed\.divergence: torch\.distributed is not"):
        torchdiv.distributed.divergence(torch.sin, torch.randn(2, 3))
