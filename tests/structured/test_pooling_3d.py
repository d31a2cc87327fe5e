"""Volumetric and video U-Nets written with ``AvgPool3d``/``F.avg_pool3d``, adaptive and max 3D
pooling and ``F.interpolate(..., mode="trilinear" or "nearest")``: the structured engine has
rules for them as for their 2D counterparts (the same arguments: padding, ``ceil_mode``,
``count_include_pad``, ``divisor_override``, ``align_corners``, sizes or scale factors,
non-cubic kernels), so ``"auto"`` colours such nets instead of falling back to the generic
engines. It refused them with "no propagation rule for aten.avg_pool3d.default".

References: each sample alone through the net in float64, one ``autograd.grad`` per output
row with a graph (divergence, diagonal and the parameter gradients of a loss built from
them); for Laplacians, a second gradient per input."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, assert_same_parameter_gradients, laplacian_alone
from torch import nn
from unets import UNet3d

import torchdiv
from torchdiv._structured import describe, locality
from torchdiv._taylor import RULES, capture, values

Op = Callable[[torch.Tensor], torch.Tensor]

# each op between a Conv3d and a resize back to the input's size (odd, non-cubic sizes)
OPS: dict[str, Op] = {
    "avg_pool3d": lambda h: F.avg_pool3d(h, 2),
    "avg_pool3d-ceil-nocount": lambda h: F.avg_pool3d(
        h, (2, 3, 2), (1, 2, 2), (1, 1, 0), ceil_mode=True, count_include_pad=False
    ),
    "avg_pool3d-divisor": lambda h: F.avg_pool3d(h, (2, 2, 3), divisor_override=5),
    "AvgPool3d-spatial": nn.AvgPool3d((1, 2, 2)),
    "adaptive_avg_pool3d": lambda h: F.adaptive_avg_pool3d(h, (2, 3, 2)),
    "max_pool3d-dilated": lambda h: F.max_pool3d(h, 2, 1, 1, dilation=(1, 2, 1)),
    "trilinear-factor": lambda h: F.interpolate(h, scale_factor=(1, 2, 2), mode="trilinear"),
    "trilinear-corners": lambda h: F.interpolate(
        h, size=(5, 7, 9), mode="trilinear", align_corners=True
    ),
    "trilinear-odd-factors": lambda h: F.interpolate(
        h, scale_factor=(1.7, 1.3, 0.6), mode="trilinear"
    ),
    "nearest3d": lambda h: F.interpolate(h, scale_factor=(1.7, 1.3, 0.6), mode="nearest"),
}


class Around(nn.Module):
    """``conv -> silu -> op -> tanh -> resize to the input's size -> conv``, gated by ``x``."""

    def __init__(self, op: Op, channels: int = 2):
        super().__init__()
        self.op = op
        self.a = nn.Conv3d(channels, 3, 3, padding=1)
        self.b = nn.Conv3d(3, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.op(F.silu(self.a(x))))
        h = F.interpolate(h, size=x.shape[-3:], mode="trilinear")
        return self.b(h) * torch.sigmoid(x)


def loop_diagonal(f: Op, x: torch.Tensor) -> torch.Tensor:
    """Every sample's Jacobian diagonal, one sample and one output row at a time, with a graph."""
    rows = []
    for b in range(len(x)):
        leaf = x[b : b + 1].detach().requires_grad_(True)
        y = f(leaf).reshape(-1)
        grads = [torch.autograd.grad(y[i], leaf, create_graph=True)[0] for i in range(len(y))]
        rows.append(torch.stack([g.reshape(-1)[i] for i, g in enumerate(grads)]))
    return torch.stack(rows).reshape(x.shape)


def problem(model: nn.Module, shape: tuple[int, ...]) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return model.double(), torch.randn(shape, dtype=torch.float64)


@pytest.mark.parametrize("name", list(OPS))
def test_structured_plans_3d_pooling_and_interpolation_by_colours(name):
    """The structured engine colours these nets (it refused them: no rule for the op)."""
    model, x = problem(Around(OPS[name]), (2, 2, 4, 6, 6))
    assert describe(model, x).startswith("colours:")


def _assert_divergence_and_diagonal(model, x, diagonal, weights, method):
    """``method``'s divergence and Jacobian diagonal against the loop's ``diagonal``, values
    and the parameter gradients of a loss built from both; returns the divergence."""
    divergence = torchdiv.divergence(model, x, method=method)
    assert_close(divergence, diagonal.flatten(1).sum(1))
    ours = torchdiv.jacobian_diagonal(model, x, method=method)
    assert_close(ours, diagonal)
    assert_same_parameter_gradients(
        model,
        (weights * divergence).sum() + ours.square().sum(),
        (weights * diagonal.flatten(1).sum(1)).sum() + diagonal.square().sum(),
    )
    return divergence


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n == "avg_pool3d" else pytest.mark.slow) for n in OPS]
)
def test_coloured_3d_pooling_and_interpolation_match_the_loop(name):
    """The coloured divergence, diagonal and their parameter gradients match the loop (one
    sample in the fast run; two in the slow ones)."""
    model, x = problem(Around(OPS[name]), (1 if name == "avg_pool3d" else 2, 2, 4, 6, 6))
    diagonal = loop_diagonal(model, x)
    weights = torch.tensor([0.7, 1.3][: len(x)], dtype=x.dtype)
    for method in ("structured", "auto"):
        _assert_divergence_and_diagonal(model, x, diagonal, weights, method)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 2, 3, 4, 4), (3, 2, 3, 5, 7)])
def test_unet3d_with_avgpool_and_trilinear_matches_the_loop(shape):
    model, x = problem(UNet3d(), shape)
    assert "generic engines" not in describe(model, x)
    diagonal = loop_diagonal(model, x)
    weights = torch.linspace(0.5, 1.5, len(x), dtype=x.dtype)
    for method in ("structured", "auto"):
        divergence = _assert_divergence_and_diagonal(model, x, diagonal, weights, method)
        again = torchdiv.divergence(model, x, method=method)  # the kept plan
        assert torch.equal(again, divergence)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=() if n == "avg_pool3d" else pytest.mark.slow) for n in OPS],
)
def test_taylor_laplacian_through_3d_pooling_and_interpolation(name):
    model, x = problem(Around(OPS[name]), (2, 2, 2, 4, 3))
    s = lambda z: torch.tanh(model(z)).square().flatten(1).sum(1)  # noqa: E731
    want = laplacian_alone(s, x)
    weights = torch.tensor([0.7, 1.3], dtype=x.dtype)
    ours = torchdiv.laplacian(s, x, method="taylor")
    assert_close(ours, want)
    assert_same_parameter_gradients(model, (weights * ours).sum(), (weights * want).sum())


def _depth_is_batch(op: Op) -> Op:
    """``op`` applied to ``(1, C, B, H, W)``: the samples along its depth axis."""
    return lambda x: op(x.permute(1, 0, 2, 3)[None])[0].permute(1, 0, 2, 3) * x


@pytest.mark.parametrize(
    "op",
    [
        lambda z: F.avg_pool3d(z, (3, 1, 1), 1, (1, 0, 0)),
        lambda z: F.interpolate(F.avg_pool3d(z, (2, 1, 1)), size=z.shape[2:], mode="trilinear"),
        lambda z: F.max_pool3d(z, (3, 1, 1), 1, (1, 0, 0)),
    ],
)
def test_3d_pooling_across_the_batch_is_refused(op):
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    f = _depth_is_batch(op)
    moved = x.clone()
    moved[1] += 1.0
    assert not torch.allclose(f(x)[0], f(moved)[0])  # it really mixes samples
    for method in ("auto", "structured"):
        with pytest.raises(torchdiv.BatchInteractionError):
            torchdiv.divergence(f, x, method=method)
    with pytest.raises(torchdiv.BatchInteractionError):
        torchdiv.laplacian(lambda z: f(z).flatten(1).sum(1), x, method="taylor")


def test_3d_pooling_with_the_batch_along_depth_but_a_kernel_of_one_there_is_not_refused():
    """A false refusal would be a fault too: a kernel of one along the samples reads each alone."""
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    f = _depth_is_batch(lambda z: F.avg_pool3d(z, (1, 3, 3), 1, (0, 1, 1)))
    want = loop_diagonal(f, x).flatten(1).sum(1)
    for method in ("auto", "structured"):
        assert_close(torchdiv.divergence(f, x, method=method), want)


class Signal(nn.Module):
    """A 1D conv net resampled by ``interpolate`` (linear or nearest) and back."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.a, self.b = nn.Conv1d(2, 3, 3, padding=1), nn.Conv1d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(F.interpolate(F.silu(self.a(x)), scale_factor=1.5, mode=self.mode))
        return self.b(F.interpolate(h, size=x.shape[-1:], mode=self.mode)) * torch.sigmoid(x)


@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_1d_interpolation_is_coloured_and_right(mode):
    """1D interpolation arrives decomposed (a gather along one dimension): still coloured,
    unlike the decomposed ``upsample_nearest3d`` (three gathers at once), which has a rule."""
    model, x = problem(Signal(mode), (2, 2, 16))
    assert describe(model, x).startswith("colours:")
    diagonal = loop_diagonal(model, x)
    for method in ("structured", "auto"):
        ours = torchdiv.jacobian_diagonal(model, x, method=method)
        assert_close(ours, diagonal)
        assert_same_parameter_gradients(model, ours.square().sum(), diagonal.square().sum())
    s = lambda z: torch.tanh(model(z)).square().sum(1).sum(1)  # noqa: E731
    ours = torchdiv.laplacian(s, x, method="taylor")
    want = laplacian_alone(s, x)
    assert_close(ours, want)
    assert_same_parameter_gradients(model, ours.sum(), want.sum())


@pytest.mark.parametrize("name", list(OPS))
def test_the_reach_through_3d_ops_bounds_the_jacobian(name):
    """The analysed reach (``locality.reach``) is at least the largest distance between an
    output and an input with a nonzero Jacobian entry (``jacrev`` of one sample) along every
    axis (a smaller one would colour two interacting inputs alike), and equal to it through
    the exact windows of pooling; linear interpolation counts a neighbour more."""
    model, x = problem(Around(OPS[name]), (1, 2, 4, 6, 6))
    graph = capture(model, x, RULES, keep_values=True)
    found = locality.reach(graph, values(graph, x), x, 1)
    jac = torch.func.jacrev(model)(x).reshape(2, 4, 6, 6, 2, 4, 6, 6)
    where = (jac != 0).any(0).any(3).nonzero()
    truth = tuple(int((where[:, a] - where[:, 3 + a]).abs().max()) for a in range(3))
    assert found is not None
    assert all(t <= r for t, r in zip(truth, found, strict=True))


def test_nearest_3d_with_a_factor_that_keeps_a_size_follows_the_forward_kernel():
    """At ``scale_factor=1.3`` on 3 rows PyTorch's nearest kernel reads rows 0, 0, 1 but its
    backward sends row ``q``'s gradient to row ``q`` (torch 2.13, CPU). The structured
    engine's diagonal and its parameter gradient must follow the forward (float64 central
    differences, the latter along a random direction of the weight): a rule applying the
    kernel to the directions got that gradient wrong (0.115 for 0.069 in one entry), as do
    ``"forward"`` and ``"reverse"`` (PyTorch's backward; documented), which ``"auto"`` takes
    at this size."""
    torch.manual_seed(0)
    conv = nn.Conv3d(1, 1, 3, padding=1).double()
    x = torch.randn(2, 1, 2, 3, 3, dtype=torch.float64)
    direction = torch.randn_like(conv.weight)

    def f(z: torch.Tensor) -> torch.Tensor:
        y = F.interpolate(conv(z), scale_factor=(1, 1.3, 1), mode="nearest")
        return torch.tanh(1.5 * y)

    def differences(step: float = 1e-5) -> torch.Tensor:
        basis = torch.eye(x[0].numel(), dtype=x.dtype).view(-1, 1, *x.shape[1:]) * step
        rows = [((f(x + e) - f(x - e)) / (2 * step)).flatten(1)[:, i] for i, e in enumerate(basis)]
        return torch.stack(rows, 1).view_as(x)

    want = differences()
    weight, step = conv.weight.detach().clone(), 1e-4
    with torch.no_grad():
        conv.weight.copy_(weight + step * direction)
        up = differences().square().sum()
        conv.weight.copy_(weight - step * direction)
        down = differences().square().sum()
        conv.weight.copy_(weight)
    ours = torchdiv.jacobian_diagonal(f, x, method="structured")
    torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-8)  # differences' error
    (grad,) = torch.autograd.grad(ours.square().sum(), conv.weight)
    torch.testing.assert_close(
        (grad * direction).sum(), (up - down) / (2 * step), rtol=1e-5, atol=1e-6
    )
