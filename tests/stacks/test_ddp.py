"""Every public operator inside a DDP- or FSDP2-wrapped training loss: gradients equal to one
process (float64, 1e-10 relative), for every method, every DDP option and FSDP2 with and
without resharding after forward, on an MLP and a conv net (cases in ``tests/ddp_cases.py``;
``bench/ddp_matrix.py`` runs all combinations). Two gloo processes on localhost, spawned
here, bounded in time: a pair that crashes or stops reporting is killed."""

from __future__ import annotations

import ddp_cases
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def test_every_operator_under_ddp_and_fsdp_equals_one_process():
    cases = ddp_cases.sample()
    outcomes = ddp_cases.run_pairs(list(enumerate(cases)))
    verdicts = {cases[i]: ddp_cases.judge(cases[i], outcome) for i, outcome in outcomes.items()}
    assert len(verdicts) == len(cases)
    failed = {"/".join(case): v for case, v in verdicts.items() if v[0] != "right"}
    assert not failed
