"""check_batch_independence finds samples that interact, and only those."""

from __future__ import annotations

import pytest
import torch
from conftest import conv_net, tanh_mlp

import torchdiv


@pytest.mark.parametrize(
    "f",
    [tanh_mlp(3, 8, 3, torch.float32), torch.nn.BatchNorm1d(3).eval(), torch.sin],
    ids=["mlp", "eval-batchnorm", "sin"],
)
def test_independent_functions_pass(f):
    assert torchdiv.check_batch_independence(f, torch.randn(5, 3)) is None


def test_conv_net_on_images_and_two_batch_dims():
    net = conv_net(2, torch.float32)

    def f(x):
        return net(x.flatten(0, 1)).unflatten(0, x.shape[:2])

    torchdiv.check_batch_independence(f, torch.randn(2, 3, 2, 4, 4), batch_dims=2)


def test_train_mode_batchnorm_is_named():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    with pytest.raises(
        torchdiv.BatchInteractionError,
        match=r"samples interact: the output of sample 0 depends on the inputs of other "
        r"samples.*Train-mode BatchNorm modules in f: 1\.",
    ):
        torchdiv.check_batch_independence(model, torch.randn(6, 3))


def test_attention_across_the_batch():
    def attend(x):  # x (B, d): every sample attends to every other one
        weights = torch.softmax(x @ x.T, dim=-1)
        return weights @ x

    with pytest.raises(ValueError, match=r"samples interact"):
        torchdiv.check_batch_independence(attend, torch.randn(4, 3))


def test_one_way_leak_is_found_in_both_directions():
    """Output 1 reads input 0 only: a causal leak the reverse probe at sample 0 misses."""

    def causal(x):
        return x + torch.cat([torch.zeros_like(x[:1]), x[:-1]])

    with pytest.raises(
        torchdiv.BatchInteractionError,
        match=r"the input of sample 0 influences the outputs of other samples",
    ):
        torchdiv.check_batch_independence(causal, torch.randn(4, 3))


def test_trivial_cases():
    torchdiv.check_batch_independence(lambda x: x * 2, torch.randn(1, 3))  # one sample
    torchdiv.check_batch_independence(lambda x: x * 2, torch.randn(3), batch_dims=0)
    torchdiv.check_batch_independence(lambda x: torch.ones(4, 3), torch.randn(4, 3))  # constant


def test_bad_input():
    with pytest.raises(TypeError, match=r"check_batch_independence: x must be a torch.Tensor"):
        torchdiv.check_batch_independence(torch.sin, 3.0)
    with pytest.raises(ValueError, match=r"check_batch_independence: f\(x\) changed the batch"):
        torchdiv.check_batch_independence(lambda x: x.sum(0), torch.randn(4, 3))
