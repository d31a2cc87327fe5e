"""rev-a34: review of mixsweep34's check of custom ``autograd.Function`` products
(``watch.custom_products``) and of the lead's way-out texts."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import torchdiv

f64 = torch.float64


class _Clip(torch.autograd.Function):
    """Identity forward; backward clips each element of its cotangent (per sample, but not
    linear in the cotangent: ``P(s v) != s P v``)."""

    @staticmethod
    def forward(ctx: object, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp(-0.05, 0.05)


class _RowNormalised(torch.autograd.Function):
    """Identity forward; backward normalises each sample's cotangent (per sample, degree 0
    homogeneous in it)."""

    @staticmethod
    def forward(ctx: object, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class _ClipMixed(torch.autograd.Function):
    """Identity forward; backward adds the batch mean, then clips: mixing and not linear."""

    @staticmethod
    def forward(ctx: object, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return (grad + grad.mean(0, keepdim=True)).clamp(-0.05, 0.05)


class _NeighbourDifference(torch.autograd.Function):
    """Identity forward; backward adds the difference of the next two samples' cotangents
    (linear, mixing; zero for a cotangent shared by the samples)."""

    @staticmethod
    def forward(ctx: object, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad + grad.roll(1, 0) - grad.roll(2, 0)


def _net(
    function: Callable[..., torch.Tensor],
) -> tuple[torch.nn.Linear, Callable[..., torch.Tensor]]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3).to(f64)
    return lin, lambda x: torch.tanh(lin(function(x)))


def _loop_divergence(f: Callable[..., torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The float64 per-sample loop: sum_i d f(X)[b, i] / d X[b, i] by ``autograd.grad`` with
    one-hot cotangents (the other samples' zero), kept differentiable in the parameters."""
    z = x.detach().clone().requires_grad_()
    y = f(z)
    out = []
    for b in range(x.shape[0]):
        total = z.new_zeros(())
        for i in range(x.shape[1]):
            (g,) = torch.autograd.grad(y[b, i], z, retain_graph=True, create_graph=True)
            total = total + g[b, i]
        out.append(total)
    return torch.stack(out)


@pytest.mark.parametrize("function", [_Clip, _RowNormalised], ids=["clip", "row_normalised"])
def test_a_per_sample_backward_not_linear_in_its_cotangent_is_served(function: type) -> None:
    """A ``backward`` that keeps samples apart but is not linear in its cotangent failed
    ``P(s v) = s P v`` and was refused as mixing samples (mixsweep34's check; before it, the
    per-sample loop's numbers): now served, values and parameter gradients the loop's (float64
    throughout: round-off ~1e-15, 1e-10 leaves room for the loop's other summation order)."""
    lin, f = _net(function.apply)
    x = torch.randn(6, 3, dtype=f64, generator=torch.Generator().manual_seed(1))
    ref = _loop_divergence(f, x)
    (ref_grad,) = torch.autograd.grad(ref.sum(), lin.weight)
    got = torchdiv.divergence(f, x)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    (grad,) = torch.autograd.grad(got.sum(), lin.weight)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "function", [_ClipMixed, _NeighbourDifference], ids=["clip_mixed", "neighbour_difference"]
)
@pytest.mark.parametrize("operator", ["divergence", "jacobian_diagonal"])
def test_a_mixing_backward_is_still_refused(function: type, operator: str) -> None:
    """The confirmation of a leak (the leaking sample's product from the other samples'
    cotangents alone) keeps refusing a mixing backward, nonlinear or one whose coupling
    vanishes for a cotangent shared by the samples."""
    _, f = _net(function.apply)
    x = torch.randn(6, 3, dtype=f64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(torchdiv.BatchInteractionError, match="custom autograd.Function"):
        getattr(torchdiv, operator)(f, x)


class _SmallMean(torch.autograd.Function):
    """Identity forward; backward adds ``1e-3`` of the batch mean of its cotangent."""

    @staticmethod
    def forward(ctx: object, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad + 1e-3 * grad.mean(0, keepdim=True)


def test_a_small_coupling_through_the_batch_mean_is_still_refused_in_float32() -> None:
    """The confirmation takes the check's own leak (``(s - s_b) v``), not the other samples'
    ``s_c v`` alone, whose product at ``B = 1024`` is ``sqrt(B)`` times smaller: ``1e-3`` of
    the batch mean (the leak ``1e-3 |mean(s) - s_b|``, above float32's ``sqrt(eps)`` = 3.5e-4
    of the largest product) stays refused."""
    lin = torch.nn.Linear(3, 3)
    x = torch.randn(1024, 3, generator=torch.Generator().manual_seed(1))
    with pytest.raises(torchdiv.BatchInteractionError, match="custom autograd.Function"):
        torchdiv.divergence(lambda t: torch.tanh(lin(_SmallMean.apply(t))), x)
