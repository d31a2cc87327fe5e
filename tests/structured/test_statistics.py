"""Group norms split off (``torchdiv._structured.statistics``): the colouring of the net with its
statistics held, plus the exact correction through them.

Checked in float64 against a row-by-row ``autograd.grad`` loop (``conftest.loop_diagonal``:
independent of every torchdiv engine): diagonals and divergences, their gradients with respect
to every parameter and to ``x`` (grad-of-grad through the loop), the plan chosen (named by
``describe``) or not (attention: nothing local is left), and the fallbacks.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, loop_diagonal
from torch import nn
from torch.utils.checkpoint import checkpoint
from unets import GuidedUNet

import torchdiv
from torchdiv._bench import ffjord
from torchdiv._structured import describe, statistics

SPLIT_WORK = statistics.SPLIT_WORK


def _gn_net(affine: bool = True) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1),
        nn.GroupNorm(2, 8, affine=affine),
        nn.SiLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.GroupNorm(4, 8),
        nn.SiLU(),
        nn.Conv2d(8, 2, 3, padding=1),
    ).double()


@pytest.fixture(autouse=True)
def _small_states_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """The split on states far below ``SPLIT_WORK`` (where plain columns are faster), to
    check its values at test sizes."""
    monkeypatch.setattr(statistics, "SPLIT_WORK", 0)


@pytest.mark.parametrize("affine", [True, False])
def test_diagonal_and_plan(affine: bool, split_plans: list[bool]) -> None:
    net, x = _gn_net(affine), torch.randn(2, 2, 8, 8, dtype=torch.float64)
    assert describe(net, x) == (
        "colours: 32 directions and 12 group-norm statistics for 128 unit vectors"
    )
    diag = torchdiv.jacobian_diagonal(net, x, method="structured")
    assert split_plans[-1]
    assert_close(diag, loop_diagonal(net, x))
    assert_close(torchdiv.divergence(net, x), loop_diagonal(net, x).flatten(1).sum(1))


def test_gradients_of_a_loss(split_plans: list[bool]) -> None:
    """Training: parameters and ``x`` require grad; the gradient of a loss of divergences
    against grad-of-grad through the row loop (the statistics' own dependence on both
    included)."""
    f = ffjord.odefunc(8, groups=4).double()  # torchdiffeq's MNIST dynamics
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, dtype=torch.float64)
    params = [x, *f.parameters()]
    div = torchdiv.divergence(f, x)
    assert split_plans == [True]
    ours = torch.autograd.grad((weights * div).sum(), params, allow_unused=True)
    y = f(x).flatten(1)
    rows = (torch.autograd.grad(y[:, i].sum(), x, create_graph=True) for i in range(y.shape[1]))
    ref = sum(row.flatten(1)[:, i] for i, (row,) in enumerate(rows))  # grad-of-grad: x too
    assert_close(div, ref)
    expected = torch.autograd.grad((weights * ref).sum(), params, allow_unused=True)
    assert [g is None for g in ours] == [g is None for g in expected]  # norm3's bias: none
    for got, want in zip(ours, expected, strict=True):
        if want is not None:
            assert_close(got, want, scale=want.abs().max().item())


def test_frozen_call_keeps_no_graph_and_leaves_x_alone(split_plans: list[bool]) -> None:
    net, x = _gn_net().requires_grad_(False), torch.randn(2, 2, 10, 10, dtype=torch.float64)
    before = x.clone()
    with torch.no_grad():
        div = torchdiv.divergence(net, x, method="structured")
    assert split_plans == [True]
    assert not div.requires_grad and not x.requires_grad and x.grad is None
    assert torch.equal(x, before)
    assert_close(div, loop_diagonal(net, x).flatten(1).sum(1))


def test_small_chunks_and_channels_last(split_plans: list[bool]) -> None:
    net = _gn_net()
    x = torch.randn(2, 2, 10, 10, dtype=torch.float64).to(memory_format=torch.channels_last)
    diag = torchdiv.jacobian_diagonal(net, x, method="structured", chunk_size=5)
    assert split_plans == [True]
    assert_close(diag, loop_diagonal(net, x))


def test_one_dimensional_events(split_plans: list[bool]) -> None:
    net = nn.Sequential(
        nn.Conv1d(3, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.Tanh(), nn.Conv1d(6, 3, 3, padding=1)
    ).double()
    x = torch.randn(2, 3, 40, dtype=torch.float64)
    diag = torchdiv.jacobian_diagonal(net, x, method="structured")
    assert split_plans == [True]
    assert_close(diag, loop_diagonal(net, x))


def test_attention_is_not_split() -> None:
    """Attention reads every position: with the statistics held the net is still not local,
    and column propagation stays the plan."""
    net = GuidedUNet(width=8, attention=True).eval()
    t = torch.full((1,), 0.3)
    assert describe(lambda z: net(z, t), torch.randn(1, 3, 64, 64)) == "columns: 12288 unit vectors"


def test_attention_free_unet_is_split() -> None:
    """ADM's U-Net without attention at 64 x 64: a receptive field of 31 pixels per axis
    colours it (3 x 32 x 32 directions) and its 17 group norms add 136 statistics."""
    net = GuidedUNet(width=8, attention=False).eval()
    t = torch.full((1,), 0.3)
    assert describe(lambda z: net(z, t), torch.randn(1, 3, 64, 64)) == (
        "colours: 3072 directions and 136 group-norm statistics for 12288 unit vectors"
    )


def test_checkpointed_block_falls_back_to_columns(split_plans: list[bool]) -> None:
    """A checkpointed block recomputes its real group norm in the backward passes of the
    correction, which autograd refuses to match: column propagation, still exact."""
    net = _gn_net()

    def f(z: torch.Tensor) -> torch.Tensor:
        return checkpoint(net, z, use_reentrant=False)

    x = torch.randn(2, 2, 10, 10, dtype=torch.float64)
    diag = torchdiv.jacobian_diagonal(f, x, method="structured")
    assert_close(diag, loop_diagonal(f, x))


class Counted(nn.Module):
    """Counts its calls in a buffer, in place: state ``f`` changes outside its result."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return z


def test_random_or_stateful_nets_are_not_split(split_plans: list[bool]) -> None:
    """Dropout draws anew at every evaluation and a buffer written in place moves at each:
    the split, which evaluates ``f`` more than once, is not tried."""
    for layer in (nn.Dropout(0.2), Counted()):
        net = nn.Sequential(
            nn.Conv2d(2, 8, 3, padding=1), nn.GroupNorm(2, 8), layer, nn.Conv2d(8, 2, 3, padding=1)
        ).double()
        torchdiv.divergence(net, torch.randn(2, 2, 10, 10, dtype=torch.float64))
    assert split_plans == []


def test_allowed_batch_interaction_is_not_split(split_plans: list[bool]) -> None:
    """With mixing detection off, a net may send one image's statistics into another's
    output, which the correction (one column and one row for every image at once) cannot
    tell apart: the probes of columns, as before the split. The reference: each
    unit vector put in every image at once, pushed forward by ``torch.func.jvp`` (vmapped)."""
    net = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 2, 3, padding=1)
    ).double()

    def f(z: torch.Tensor) -> torch.Tensor:
        return net(z) + net(z).mean(0, keepdim=True)

    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    n = x[0].numel()
    probes = torch.eye(n, dtype=x.dtype).reshape(n, 1, *x.shape[1:]).expand(n, *x.shape)
    _, columns = torch.func.vmap(lambda v: torch.func.jvp(f, (x,), (v,)))(probes)
    ref = columns.flatten(2).diagonal(dim1=0, dim2=2)  # (n, N, n) -> (N, n)
    with torchdiv.allow_batch_interaction():
        diag = torchdiv.jacobian_diagonal(f, x, method="structured")
    assert_close(diag, ref.reshape(x.shape))
    assert split_plans == []


def test_autocast_group_norms_are_not_split() -> None:
    """Under autocast a group norm's input is bfloat16 and PyTorch's kernel normalises it in
    float32: statistics measured in the input's precision would differ from the net's own."""
    net = _gn_net().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert describe(net, torch.randn(2, 2, 8, 8)) == "columns: 128 unit vectors"


def test_a_split_that_does_not_pay_costs_no_evaluation() -> None:
    """torchdiffeq's dynamics on 4 x 4 states: 72 colours and 3 x 24 statistics against 128
    unit vectors do not pay. That is read from ``f``'s own recording before ``f`` is evaluated
    again, at every call (its in-place ReLU keeps no template to remember a decision with): one
    evaluation per call, as column propagation makes."""
    f = ffjord.odefunc(8, groups=4).double()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    for calls in (1, 2):
        torchdiv.divergence(f, x, method="structured")
        assert f.net.nfe == calls
    assert describe(f, x) == "columns: 128 unit vectors"


def test_small_states_are_not_split(
    monkeypatch: pytest.MonkeyPatch, split_plans: list[bool]
) -> None:
    """The split's fixed cost (three evaluations of f, two recordings) loses to plain columns
    on small states (3.4x slower on torchdiffeq's dynamics with 4 channels at 5 x 5,
    ``bench/split_threshold.py``): below ``SPLIT_WORK`` it is not tried; above it, it is."""
    monkeypatch.setattr(statistics, "SPLIT_WORK", SPLIT_WORK)
    f = ffjord.odefunc(4, 2).double()
    small = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    assert "statistics" not in describe(f, small)
    jacobians = [torch.autograd.functional.jacobian(f, small[i : i + 1]) for i in range(3)]
    want = torch.stack([j.reshape(100, 100).trace() for j in jacobians])
    assert_close(torchdiv.divergence(f, small), want)
    assert split_plans == []
    large = torch.randn(3, 4, 10, 10, dtype=torch.float64)
    assert "group-norm statistics" in describe(f, large)
