"""User code for the type checkers (tests/test_typing.py): what each call's result is typed as.

Only defined, never called: ``assert_type`` is checked statically by mypy and pyright.
"""

from __future__ import annotations

import torch
from typing_extensions import assert_type

import torchdiv
from torchdiv.flows import log_likelihood


def velocity(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return z * t


def normal(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * z.square().sum(-1)


def log_likelihood_follows_return_stderr(x: torch.Tensor, flag: bool) -> None:
    assert_type(log_likelihood(velocity, x, 0.0, 1.0, normal), torch.Tensor)
    assert_type(log_likelihood(velocity, x, 0.0, 1.0, normal, return_stderr=False), torch.Tensor)
    logp, stderr = log_likelihood(
        velocity, x, 0.0, 1.0, normal, method="hutchinson", num_probes=4, return_stderr=True
    )
    assert_type(logp, torch.Tensor)
    assert_type(stderr, torch.Tensor)
    either = log_likelihood(velocity, x, 0.0, 1.0, normal, return_stderr=flag)
    assert_type(either, torch.Tensor | tuple[torch.Tensor, torch.Tensor])


def operators_return_tensors(x: torch.Tensor) -> None:
    assert_type(torchdiv.divergence(torch.tanh, x), torch.Tensor)
    assert_type(torchdiv.jacobian(torch.tanh, x), torch.Tensor)
    assert_type(torchdiv.laplacian(torch.tanh, x), torch.Tensor)
    assert_type(torchdiv.estimate_divergence(torch.tanh, x, num_probes=4), torchdiv.Estimate)
