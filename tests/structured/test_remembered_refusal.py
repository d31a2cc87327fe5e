"""``method="auto"`` remembers where the structured engine found no rule for an op of ``f``
(``torchdiv._structured.refused_before``): later calls at that structure go to the generic
engines without recording ``f`` again, with the values and parameter gradients of a float64
closed form, watched for sample mixing once per structure (as any ``f``: the watch's pass is
kept with the refusal), and a recording made afresh whenever ``f``, its parameters, its
modules' modes or flags or ``x``'s shape or dtype change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchdiv
from torchdiv import _structured
from torchdiv._core.mixing.errors import BatchInteractionError
from torchdiv._taylor import cache

DOUBLE = torch.float64


class Spectral(nn.Module):
    """One Fourier layer of an FNO (Li et al. 2021) on a 1-D grid: the lowest ``modes``
    frequencies mixed across channels by complex weights, plus a pointwise convolution;
    ``mix`` (a flag, part of the structure key) rolls the batch by one when set."""

    def __init__(self, width: int = 4, modes: int = 3) -> None:
        super().__init__()
        self.modes, self.mix = modes, False
        scale = 1 / (width * width)
        self.weights = nn.Parameter(scale * torch.rand(width, width, modes, dtype=torch.cdouble))
        self.w = nn.Conv1d(width, width, 1).double()

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        x_ft = torch.fft.rfft(x)
        out_ft = torch.zeros(
            x.shape[0], x.shape[1], x.shape[-1] // 2 + 1, dtype=x_ft.dtype, device=x.device
        )
        out_ft[:, :, : self.modes] = torch.einsum(
            "bix,iox->box", x_ft[:, :, : self.modes], self.weights
        )
        return torch.fft.irfft(out_ft, n=x.shape[-1]) + self.w(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mix:
            x = x.roll(1, 0)
        return torch.nn.functional.gelu(self.linear(x))


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    """Empty caches, and ``recordings``: how many times the recorder ran."""
    monkeypatch.setattr(_structured, "_REFUSED", cache.Refusals())
    cache.RECORDINGS.clear()
    counted = []
    capture = cache.capture
    monkeypatch.setattr(cache, "capture", lambda *a, **k: counted.append(1) or capture(*a, **k))
    yield counted
    cache.RECORDINGS.clear()


def net_and_x(batch: int = 6, seed: int = 0) -> tuple[Spectral, torch.Tensor]:
    torch.manual_seed(seed)
    return Spectral(), torch.randn(batch, 4, 8, dtype=DOUBLE)  # 32 x 192 > TINY_PROBLEM


def closed_form(net: Spectral, x: torch.Tensor) -> torch.Tensor:
    """Each sample's divergence in closed form (the reference, independent of the engines):
    ``f(x) = gelu(L x + c)`` with ``L`` linear, so ``div f = sum_i gelu'(z_i) L_ii`` with
    ``gelu'(z) = Phi(z) + z phi(z)``; ``L``'s diagonal read from its images of the unit
    vectors (a batch of them, the bias removed). Differentiable in the parameters."""
    n = x[0].numel()
    basis = torch.eye(n, dtype=DOUBLE).reshape(n, *x.shape[1:])
    diag = (net.linear(basis) - net.linear(torch.zeros_like(basis))).reshape(n, n).diagonal()
    z = net.linear(x).reshape(len(x), n)
    normal = torch.distributions.Normal(0.0, 1.0)
    return ((normal.cdf(z) + z * normal.log_prob(z).exp()) * diag).sum(-1)


@pytest.mark.parametrize("op", ["divergence", "jacobian_diagonal"])
def test_a_refusal_is_remembered_with_the_values_and_gradients_of_a_closed_form(_fresh, op):
    # (a convolution: "auto" records its diagonal, never left to plain autograd's rows)
    net, x = net_and_x(batch=24)
    fn = getattr(torchdiv, op)
    want = closed_form(net, x)
    want_grads = torch.autograd.grad(want.square().sum(), list(net.parameters()))
    for call in range(3):
        got = fn(net, x)
        got = got if op == "divergence" else got.sum((1, 2))
        grads = torch.autograd.grad(got.square().sum(), list(net.parameters()))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        for g, w in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
        assert len(_fresh) == 1, f"call {call}: recorded {len(_fresh)} times"


def test_the_refusal_is_forgotten_when_f_its_parameters_modes_or_x_change(_fresh):
    net, x = net_and_x()
    torchdiv.divergence(net, x)
    torchdiv.divergence(net, x)
    assert len(_fresh) == 1
    changes = [
        lambda: (Spectral().double(), x),  # another module
        lambda: (net, x[:5]),  # another batch (32 x 160, still recorded)
        lambda: (net, x.float()),  # another dtype (a float32 x with float64 weights: refused)
        lambda: (net.train(False), x),  # another mode
    ]
    other, _ = net_and_x(seed=1)
    seen = len(_fresh)
    for make in changes:
        f, z = make()
        if z.dtype == DOUBLE:
            torchdiv.divergence(f, z)
        else:
            with pytest.raises(RuntimeError):
                torchdiv.divergence(f, z)
        assert len(_fresh) == seen + 1
        seen = len(_fresh)
    net.weights = nn.Parameter(other.weights.detach().clone())  # a parameter replaced
    got = torchdiv.divergence(net, x)
    assert len(_fresh) == seen + 1
    torch.testing.assert_close(got, closed_form(net, x), rtol=1e-10, atol=1e-10)


def test_a_lambda_made_anew_finds_the_refusal_but_another_module_does_not(_fresh):
    net, x = net_and_x()
    other, _ = net_and_x(seed=1)
    for _ in range(3):
        torchdiv.divergence(lambda z: net(z), x)
    assert len(_fresh) == 1
    got = torchdiv.divergence(lambda z: other(z), x)
    assert len(_fresh) == 2
    torch.testing.assert_close(got, closed_form(other, x), rtol=1e-10, atol=1e-10)


def test_an_f_that_starts_mixing_samples_after_its_refusal_is_still_refused(_fresh):
    """The pass kept with the refusal is the structure's: a flag that turns on a roll along
    the batch makes a new structure, watched again and refused, never a silently wrong
    divergence. (A module's integer attribute is no part of the key, for a refused structure
    as for any: docs/guide/limitations.md.)"""
    net, x = net_and_x()
    torchdiv.divergence(net, x)
    torchdiv.divergence(net, x)
    net.mix = True
    with pytest.raises(BatchInteractionError):
        torchdiv.divergence(net, x)
    with pytest.raises(BatchInteractionError):
        torchdiv.jacobian_diagonal(net, x)


def test_method_structured_still_raises_after_auto_remembered_the_refusal(_fresh):
    net, x = net_and_x()
    torchdiv.divergence(net, x)
    with pytest.raises(NotImplementedError, match=r"no propagation rule for .*aten\._fft_r2c"):
        torchdiv.divergence(net, x, method="structured")
