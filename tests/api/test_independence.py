"""check_batch_independence finds samples that interact, and only those."""

from __future__ import annotations

import contextlib

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
        match=r"samples interact: the inputs of samples \[0, 1, 2, 3, 4, 5\] reach the outputs "
        r"of other samples.*Train-mode BatchNorm modules in f: 1\.",
    ):
        torchdiv.check_batch_independence(model, torch.randn(6, 3))


def test_attention_across_the_batch():
    def attend(x):  # x (B, d): every sample attends to every other one
        weights = torch.softmax(x @ x.T, dim=-1)
        return weights @ x

    with pytest.raises(ValueError, match=r"samples interact"):
        torchdiv.check_batch_independence(attend, torch.randn(4, 3))


def test_one_way_leak_between_middle_samples_is_named():
    """Only output 5 reads input 4: one pair in the middle of the batch, one direction."""

    def leak(x):
        out = x.clone()
        out[5] = out[5] + 0.01 * x[4]
        return out

    with pytest.raises(
        torchdiv.BatchInteractionError,
        match=r"the inputs of samples \[4\] reach the outputs of other samples",
    ):
        torchdiv.check_batch_independence(leak, torch.randn(10, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_leaks_are_found(dtype):
    """Independent samples give exact zeros, so the threshold does not depend on the dtype."""
    x = torch.randn(8, 4, dtype=dtype)
    with pytest.raises(torchdiv.BatchInteractionError):
        torchdiv.check_batch_independence(torch.nn.BatchNorm1d(4).to(dtype), x)
    with pytest.raises(torchdiv.BatchInteractionError):
        torchdiv.check_batch_independence(lambda z: z + 0.1 * z.roll(1, 0), x)
    torchdiv.check_batch_independence(tanh_mlp(4, 8, 4, dtype), x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 1e200])
def test_a_diverged_sample_hides_no_leak(bad):
    """A sample with a nan or inf in its x has non-finite gradients, even in trials that leave
    it out (0 * nan): they made the largest gradient nan and every comparison false, so a leak
    between the other samples passed. A float64 gradient of 1e200 became inf in float32 with
    the same effect. (-1: a nan in f(x) only, log(-1), with finite gradients.)"""
    x = torch.rand(6, 3, dtype=torch.float64) + 0.5
    x[3, 1] = bad

    def leaks(z):
        return torch.log(z) + 0.1 * z.roll(1, 0) ** 2

    with pytest.raises(torchdiv.BatchInteractionError, match=r"samples interact"):
        torchdiv.check_batch_independence(leaks, x)
    torchdiv.check_batch_independence(lambda z: torch.log(z) + z**2, x)


def test_a_non_finite_gradient_of_finite_samples_is_a_leak():
    """``sqrt`` of a batch sum at exactly zero: ``f`` and ``x`` are finite, but samples 0-3
    reach every output with a nan gradient (0 * inf), which was left out as a diverged
    sample's, and the check passed (and ``inf * 0``, leaving a trial's own samples out, hid
    it again). Non-finite gradients are excused at samples whose ``x`` or ``f(x)`` is not."""
    x = torch.rand(8, 3, dtype=torch.float64)
    x[:4, 0] = torch.tensor([1.0, -1.0, 2.0, -2.0], dtype=torch.float64)

    def mixes(z):
        return z + torch.sqrt(z[:4, 0].sum().abs())

    assert mixes(x).isfinite().all()
    with pytest.raises(torchdiv.BatchInteractionError, match=r"samples \[0, 1, 2, 3\]"):
        torchdiv.check_batch_independence(mixes, x)


def test_no_finite_gradient_is_an_error():
    x = torch.full((4, 3), float("nan"))
    with pytest.raises(ValueError, match=r"check_batch_independence: every gradient .* is nan"):
        torchdiv.check_batch_independence(lambda z: z**2 - z.mean(0), x)


def test_under_inference_mode():
    with torch.inference_mode():
        x = torch.randn(4, 3)
        with pytest.raises(torchdiv.BatchInteractionError):
            torchdiv.check_batch_independence(lambda z: z - z.mean(0), x)
        torchdiv.check_batch_independence(torch.sin, x)


def test_reproducible_with_a_generator():
    x = torch.randn(6, 3)
    for seed in range(3):
        torchdiv.check_batch_independence(
            torch.tanh, x, generator=torch.Generator().manual_seed(seed)
        )


def test_trivial_cases():
    torchdiv.check_batch_independence(lambda x: x * 2, torch.randn(1, 3))  # one sample
    torchdiv.check_batch_independence(lambda x: x * 2, torch.randn(3), batch_dims=0)
    torchdiv.check_batch_independence(lambda x: torch.ones(4, 3), torch.randn(4, 3))  # constant


def test_bad_input():
    with pytest.raises(TypeError, match=r"check_batch_independence: x must be a torch.Tensor"):
        torchdiv.check_batch_independence(torch.sin, 3.0)
    for bad in (-1.0, float("nan"), "a", True):
        with pytest.raises(ValueError, match=r"check_batch_independence: rtol must be a finite"):
            torchdiv.check_batch_independence(torch.sin, torch.randn(3, 2), rtol=bad)
    with pytest.raises(TypeError, match=r"check_batch_independence: generator must be a torch"):
        torchdiv.check_batch_independence(torch.sin, torch.randn(3, 2), generator=0)
    with pytest.raises(ValueError, match=r"check_batch_independence: f\(x\) changed the batch"):
        torchdiv.check_batch_independence(lambda x: x.sum(0), torch.randn(4, 3))


@pytest.mark.parametrize("mixes", [True, False])
def test_the_check_leaves_the_model_as_it_found_it(mixes):
    """Train mode: a batch norm (which mixes samples) keeps its running statistics and batch
    counter, and the dropout's draws are undone (the global random state), whether the check
    raises or passes."""
    torch.manual_seed(0)
    norm = torch.nn.BatchNorm1d(3)
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), norm, torch.nn.Dropout(0.5))
    if not mixes:
        net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    context = pytest.raises(torchdiv.BatchInteractionError) if mixes else contextlib.nullcontext()
    with context:
        torchdiv.check_batch_independence(net, torch.randn(8, 3, generator=torch.Generator()))
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    assert torch.equal(torch.get_rng_state(), rng)
    assert net.training


def test_the_error_shows_its_public_module():
    assert torchdiv.BatchInteractionError.__module__ == "torchdiv"
    assert repr(torchdiv.BatchInteractionError("m")) == "BatchInteractionError('m')"
    assert "torchdiv.BatchInteractionError" in str(torchdiv.BatchInteractionError)


def test_a_graph_that_vmap_cannot_batch_is_checked_one_pass_per_trial():
    """GroupNorm on channels-last strides (diffusers' attention blocks): both batched backward
    passes raise; the trials go one backward pass each and still find a leak."""
    gn = torch.nn.GroupNorm(2, 4)

    def f(z):
        return gn(z.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2))

    x = torch.randn(3, 4, 2, 2)
    assert torchdiv.check_batch_independence(f, x) is None
    with pytest.raises(torchdiv.BatchInteractionError, match=r"samples \[0, 1, 2\]"):
        torchdiv.check_batch_independence(lambda z: f(z) + z.mean(0), x)
