"""A batch folded into the channels, ``x.reshape(1, B * C, H, W)``: grouped convolutions and
group norms whose groups each lie inside one sample are per sample (StyleGAN2's modulated
convolution, a per-sample group norm written on the fold); groups that straddle samples mix
them and must be refused, also after a grouped convolution changed the channel count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import torchdiv
from torchdiv import BatchInteractionError

B, C_IN, C_OUT, H = 4, 2, 3, 6
f64 = torch.float64


def _weights() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(C_OUT, C_IN, 3, 3, dtype=f64, generator=g)
    style = torch.randn(B, C_IN, dtype=f64, generator=g)
    return weight.requires_grad_(), style


def modulated(weight: torch.Tensor, style: torch.Tensor, groups_per_sample: float, norm_groups):
    """StyleGAN2's fused modulated convolution (one weight per sample, the batch folded into
    the channels, ``groups = B``), then a group norm on the fold with ``norm_groups`` groups;
    ``groups_per_sample = 0.5`` pairs samples in each convolution group (mixing)."""

    def f(x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        w = weight[None] * style[:, None, :, None, None]  # (B, C_OUT, C_IN, 3, 3)
        w = w * torch.rsqrt(w.square().sum([2, 3, 4], keepdim=True) + 1e-8)
        groups = int(b * groups_per_sample)
        w = w.reshape(b * C_OUT, C_IN, 3, 3)
        if groups < b:  # each group reads the channels of b // groups samples
            w = w.repeat(1, b // groups, 1, 1)
        y = F.conv2d(x.reshape(1, b * C_IN, H, H), w, padding=1, groups=groups)
        if norm_groups is not None:
            y = F.group_norm(y, norm_groups(b))
        return torch.tanh(y.reshape(b, C_OUT, H, H)[:, :C_IN])

    return f


def per_sample_divergence(f, x: torch.Tensor) -> torch.Tensor:
    """The trace of each sample's block of the whole batch's Jacobian, by plain autograd."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].detach().requires_grad_()
        yi = f(torch.cat([x[:i], xi, x[i + 1 :]]))[i].reshape(-1)
        rows = [torch.autograd.grad(yi[k], xi, create_graph=True)[0] for k in range(yi.numel())]
        out.append(torch.stack([r.reshape(-1)[k] for k, r in enumerate(rows)]).sum())
    return torch.stack(out)


PER_SAMPLE = {
    "modulated": (1, None),
    "modulated, group norm per sample": (1, lambda b: b),
    "modulated, group norm 3 groups per sample": (1, lambda b: 3 * b),
}
MIXING = {
    "convolution groups straddling samples": (0.5, None),
    "group norm of the whole fold": (1, lambda b: 1),
    "group norm of two samples a group": (1, lambda b: b // 2),
}


@pytest.mark.parametrize("case", list(PER_SAMPLE))
@pytest.mark.parametrize("method", ["auto", "structured", "reverse"])
def test_groups_inside_samples_are_per_sample(case: str, method: str) -> None:
    weight, style = _weights()
    f = modulated(weight, style, *PER_SAMPLE[case])
    x = torch.randn(B, C_IN, H, H, dtype=f64, generator=torch.Generator().manual_seed(1))
    got = torchdiv.divergence(f, x, method=method)
    want = per_sample_divergence(f, x)
    assert_close(got, want, rtol=1e-12, atol=1e-12)
    (g_got,) = torch.autograd.grad(got.square().sum(), weight)
    (g_want,) = torch.autograd.grad(want.square().sum(), weight)
    assert_close(g_got, g_want, rtol=1e-11, atol=1e-12)


def test_a_group_norm_on_the_fold_with_a_group_a_sample_is_not_refused() -> None:
    """A group norm over ``x`` itself folded, one group per sample (the watch sees ``x``'s
    samples along the channels, each a run of ``C`` channels)."""
    x = torch.randn(B, 8, H, H, dtype=f64)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(F.group_norm(x.reshape(1, -1, H, H), 2 * x.shape[0]).reshape(x.shape))

    assert_close(torchdiv.divergence(f, x), per_sample_divergence(f, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", list(MIXING))
@pytest.mark.parametrize("method", ["auto", "structured", "hutchinson"])
def test_groups_straddling_samples_are_refused(case: str, method: str) -> None:
    weight, style = _weights()
    f = modulated(weight, style, *MIXING[case])
    x = torch.randn(B, C_IN, H, H, dtype=f64)
    extra = {"num_probes": 1} if method == "hutchinson" else {}
    what = "convolution" if "convolution" in case else "group norm"
    with pytest.raises(BatchInteractionError, match=f"a {what} (across|over) samples"):
        torchdiv.divergence(f, x, method=method, **extra)


def hypernetwork(kind: str):
    """A convolution over the fold whose kernels (or bias) a hypernetwork computes from each
    sample (StyleGAN2's path-length term differentiates through kernels modulated by the
    latent): right where each output channel's kernel, bias and input channels are of one
    sample; ``rolled``/``flipped`` pair sample ``b``'s channels with another's kernels, and
    ``unfolded`` convolves the unfolded batch (B, C_IN, H, H) with every sample's kernels."""
    hyper = torch.randn(C_IN * H * H, C_OUT * C_IN * 9, dtype=f64) / 10
    hyper = hyper.requires_grad_()

    def f(x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        kernels = torch.tanh(x.reshape(b, -1) @ hyper)
        if kernels_moved := kind in ("rolled", "rolled transposed"):
            kernels = kernels.roll(1, 0)
        folded = x.reshape(1, b * C_IN, H, H)
        if kind.endswith("transposed"):  # StyleGAN2's upsampling: (B * C_IN, C_OUT, 3, 3)
            w = kernels.reshape(b, C_OUT, C_IN, 3, 3).transpose(1, 2).reshape(-1, C_OUT, 3, 3)
            y = F.conv_transpose2d(folded, w, stride=2, padding=1, groups=b)[..., :H, :H]
        elif kind in ("bias", "flipped bias"):
            bias = kernels[:, :C_OUT].flip(0) if kind == "flipped bias" else kernels[:, :C_OUT]
            w = torch.ones(b * C_OUT, C_IN, 3, 3, dtype=x.dtype)
            y = F.conv2d(folded, w, bias.reshape(-1), padding=1, groups=b)
        elif kind == "unfolded":
            w = kernels.reshape(b * C_OUT, C_IN, 3, 3)
            y = F.conv2d(x, w, padding=1)[:, :C_OUT]
        else:
            assert kind in ("per sample", "rolled") and kernels_moved == (kind == "rolled")
            y = F.conv2d(folded, kernels.reshape(-1, C_IN, 3, 3), padding=1, groups=b)
        return torch.tanh(y.reshape(b, C_OUT, H, H)[:, :C_IN])

    return f, hyper


def _assert_per_sample(f, x: torch.Tensor, hyper: torch.Tensor) -> None:
    """``"auto"``'s divergence and the gradient of a loss of it with respect to ``hyper`` (the
    weights computing kernels or affine from ``x``) equal the per-sample loop's (float64)."""
    got, want = torchdiv.divergence(f, x), per_sample_divergence(f, x)
    assert_close(got, want, rtol=1e-12, atol=1e-12)
    (g_got,) = torch.autograd.grad(got.square().sum(), hyper)
    (g_want,) = torch.autograd.grad(want.square().sum(), hyper)
    assert_close(g_got, g_want, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("kind", ["per sample", "per sample transposed", "bias"])
def test_kernels_computed_from_each_sample_are_per_sample(kind: str) -> None:
    f, hyper = hypernetwork(kind)
    x = torch.randn(B, C_IN, H, H, dtype=f64, generator=torch.Generator().manual_seed(2))
    _assert_per_sample(f, x, hyper)


@pytest.mark.parametrize("kind", ["rolled", "rolled transposed", "flipped bias", "unfolded"])
def test_kernels_of_other_samples_are_refused(kind: str) -> None:
    """The watch read a convolution's input only: kernels computed from other samples than
    the channels they convolve passed ``"auto"`` (values 2-47% off the per-sample loop)."""
    f, _ = hypernetwork(kind)
    x = torch.randn(B, C_IN, H, H, dtype=f64, generator=torch.Generator().manual_seed(2))
    with pytest.raises(BatchInteractionError, match="weights or bias hold samples"):
        torchdiv.divergence(f, x)


def adaptive_group_norm(rolled: bool):
    """AdaGN on the fold: each sample's scale and shift, computed from it, as the affine of a
    group norm with two groups a sample; ``rolled`` gives sample ``b``'s channels sample
    ``b - 1``'s (mixing)."""
    hyper = torch.randn(C_IN * H * H, C_IN, dtype=f64) / 5
    hyper = hyper.requires_grad_()

    def f(x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        style = torch.tanh(x.reshape(b, -1) @ hyper)
        style = style.roll(1, 0) if rolled else style
        scale, shift = 1 + style.reshape(-1), style.reshape(-1)
        y = F.group_norm(x.reshape(1, b * C_IN, H, H), 2 * b, scale, shift)
        return torch.sin(y.reshape(x.shape))

    return f, hyper


def test_a_group_norm_with_an_affine_from_each_sample_is_per_sample() -> None:
    f, hyper = adaptive_group_norm(rolled=False)
    x = torch.randn(B, C_IN, H, H, dtype=f64, generator=torch.Generator().manual_seed(3))
    _assert_per_sample(f, x, hyper)


def test_a_group_norm_with_an_affine_of_other_samples_is_refused() -> None:
    """The group norm's weight and bias were not read: AdaGN's scale and shift rolled by one
    sample passed ``"auto"`` (4.7e-2 off the per-sample divergence, gradients 0.27)."""
    f, _ = adaptive_group_norm(rolled=True)
    x = torch.randn(B, C_IN, H, H, dtype=f64, generator=torch.Generator().manual_seed(3))
    with pytest.raises(BatchInteractionError, match="weight or bias hold"):
        torchdiv.divergence(f, x)
