"""Diffusion-model sampling and likelihood idioms, written as diffusers, k-diffusion, EDM and
score_sde write them, small and in float64:

- classifier-free guidance that doubles the batch inside ``f`` (``torch.cat([x, x])``, one
  call of the net, ``.chunk(2)``, ``uncond + w (cond - uncond)``), conditioned per sample on
  class labels and text embeddings (closed over, cross-attention);
- k-diffusion's preconditioning (``c_skip``, ``c_out``, ``c_in`` of ``sigma``), ``sigma`` per
  sample ``(B,)`` or one scalar, the probability-flow drift ``(x - D(x)) / sigma``;
- v-prediction converted to ``x0`` and ``eps``; a timestep embedding of a ``(B,)`` or 0-dim
  ``t``; latent diffusion through a VAE-like conv encoder and decoder;
- EMA weights copied in between calls (``p.data.copy_``, ``load_state_dict``);
- dynamic thresholding (Imagen; diffusers' ``_threshold_sample``): a per-sample quantile of
  ``|x0|`` and ``clamp(x0, -s, s) / s``, whose ``clamp`` between tensors had no rule in the
  recording engines (``"structured"`` and the Laplacian's ``"taylor"`` refused it); a
  quantile over the batch must be refused;
- ``torch.no_grad`` / ``torch.inference_mode`` around a sampling loop that calls torchdiv;
- the probability-flow log-likelihood against a hand-written rk4 loop with per-sample
  divergences (exact, and Hutchinson with given probes).

References: per-sample rows by ``autograd.grad`` (``conftest.loop_diagonal``, differentiable
for the parameter gradients), the cross-batch ``jacrev`` blocks and ``torch.func.hessian``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_close,
    assert_same_parameter_gradients,
    loop_diagonal,
    reference_jacobian,
    reference_laplacian,
)
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import torchdiv

f64 = torch.float64
B = 3


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """diffusers' sinusoidal ``get_timestep_embedding`` (flip_sin_to_cos): ``t`` of shape
    ``(B,)`` or 0-dim (then one row, broadcast by the caller's addition)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=t.dtype) / half)
    angles = t.reshape(-1, 1) * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], -1)


class Denoiser(nn.Module):
    """A small U-Net-like ``eps``/``v``/``x0`` network: conv in, GroupNorm, SiLU, the time and
    class embeddings added per channel, a cross-attention over text tokens, conv out."""

    def __init__(self, channels: int = 2, width: int = 4, classes: int = 3, text: int = 5):
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.time = nn.Sequential(nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, width))
        self.label = nn.Embedding(classes + 1, width)  # the last class: "no label" (CFG)
        self.norm = nn.GroupNorm(2, width)
        self.q, self.k, self.v = nn.Linear(width, 4), nn.Linear(text, 4), nn.Linear(text, width)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor, context):
        h = self.inp(x) + (self.time(timestep_embedding(t, 8)) + self.label(label))[..., None, None]
        h = F.silu(self.norm(h))
        tokens = h.flatten(2).transpose(1, 2)  # (B, HW, width)
        scores = self.q(tokens) @ self.k(context).transpose(1, 2) / 2.0
        h = h + (scores.softmax(-1) @ self.v(context)).transpose(1, 2).reshape(h.shape)
        return self.out(h)


def _problem(seed: int = 0, size: int = 2):
    torch.manual_seed(seed)
    net = Denoiser().double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, 2, size, size, dtype=f64, generator=g)
    t = torch.rand(B, dtype=f64, generator=g)
    labels = torch.tensor([0, 2, 1])
    text = torch.randn(B, 3, 5, dtype=f64, generator=g)
    return net, x, t, labels, text


def _guided(net: Denoiser, t, labels, text, scale: float = 3.0):
    """k-diffusion's ``CFGDenoiser`` / diffusers' pipelines: the batch doubled inside ``f``."""
    null_label = torch.full_like(labels, 3)
    null_text = torch.zeros_like(text[:1]).expand_as(text)

    def f(z: torch.Tensor) -> torch.Tensor:
        both = net(
            torch.cat([z, z]),
            torch.cat([t, t]),
            torch.cat([null_label, labels]),
            torch.cat([null_text, text]),
        )
        uncond, cond = both.chunk(2)
        return uncond + scale * (cond - uncond)

    return f


def _check_divergence_and_diagonal(f, x, net, method: str) -> None:
    """Divergence and Jacobian diagonal against rows by ``autograd.grad``, and the parameter
    gradients of a loss of the divergence against the rows' own (``create_graph``; the rows
    through the math attention kernel: the fused CPU one has no double backward)."""
    with sdpa_kernel([SDPBackend.MATH]):
        want = loop_diagonal(f, x, create_graph=True)
    got = torchdiv.divergence(f, x, method=method)
    assert_close(got, want.flatten(1).sum(1), scale=10)
    assert_close(torchdiv.jacobian_diagonal(f, x, method=method), want.detach(), scale=10)
    weights = torch.linspace(-1, 1, B, dtype=f64)
    loss = (weights * got).sum() + got.square().sum()
    ref = want.flatten(1).sum(1)
    assert_same_parameter_gradients(net, loss, (weights * ref).sum() + ref.square().sum())


@pytest.mark.parametrize(
    "method",
    [
        "auto",
        "structured",
        *(pytest.param(m, marks=pytest.mark.slow) for m in ("forward", "reverse")),
    ],
)
def test_classifier_free_guidance_doubles_the_batch_inside_f(method):
    net, x, t, labels, text = _problem()
    _check_divergence_and_diagonal(_guided(net, t, labels, text), x, net, method)


def test_guided_hutchinson_with_given_probes_is_its_formula():
    """``mean_k v_k^T J_b v_k`` on each sample's Jacobian (cross-batch ``jacrev`` blocks)."""
    net, x, t, labels, text = _problem()
    f = _guided(net, t, labels, text)
    probes = torchdiv.draw_probes(x, 3, generator=torch.Generator().manual_seed(0))
    v = probes.flatten(2)
    jac = reference_jacobian(f, x).reshape(B, x[0].numel(), -1)
    want = torch.einsum("rbi,bij,rbj->b", v, jac, v) / 3
    for num in (3, 1):
        got = torchdiv.divergence(f, x, method="hutchinson", probes=probes[:num])
        if num == 1:
            want = torch.einsum("bi,bij,bj->b", v[0], jac, v[0])
        assert_close(got, want)


def _append_dims(v: torch.Tensor, dims: int) -> torch.Tensor:
    return v[(...,) + (None,) * (dims - v.dim())]


class Karras(nn.Module):
    """k-diffusion's ``Denoiser`` (EDM preconditioning) around ``inner``: ``D(x, sigma) =
    c_skip x + c_out F(c_in x, log(sigma) / 4)``, ``sigma`` of shape ``(B,)``."""

    def __init__(self, inner: Denoiser, sigma_data: float = 0.5):
        super().__init__()
        self.inner, self.sigma_data = inner, sigma_data

    def forward(self, x, sigma, labels, text):
        total = sigma**2 + self.sigma_data**2
        c_skip = _append_dims(self.sigma_data**2 / total, x.dim())
        c_out = _append_dims(sigma * self.sigma_data / total.sqrt(), x.dim())
        c_in = _append_dims(1 / total.sqrt(), x.dim())
        return c_skip * x + c_out * self.inner(c_in * x, sigma.log() / 4, labels, text)


@pytest.mark.parametrize("per_sample", [True, False])
def test_karras_preconditioned_probability_flow_drift(per_sample):
    """The PF-ODE drift ``dx/dsigma = (x - D(x, sigma)) / sigma``, ``sigma`` per sample or one
    0-dim value expanded to the batch (k-diffusion's samplers: ``sigma * s_in``)."""
    net, x, _, labels, text = _problem(seed=1)
    model = Karras(net)
    if per_sample:
        sigma = torch.tensor([0.2, 1.5, 7.0], dtype=f64)
    else:
        sigma = torch.tensor(1.3, dtype=f64).expand(B)
    f = lambda z: (z - model(z, sigma, labels, text)) / _append_dims(sigma, z.dim())  # noqa: E731
    _check_divergence_and_diagonal(f, x, net, "auto")


def test_scalar_timestep_gives_the_values_of_the_expanded_one():
    """A 0-dim ``t`` (one embedding row, broadcast) against ``t.expand(B)``, and against the
    rows, for every exact method: the embedding's broadcast is not a mix of samples."""
    net, x, _, labels, text = _problem(seed=2)
    t = torch.tensor(0.4, dtype=f64)
    f = lambda z: net(z, t, labels, text)  # noqa: E731
    expanded = lambda z: net(z, t.expand(B), labels, text)  # noqa: E731
    want = loop_diagonal(expanded, x).flatten(1).sum(1)
    for method in ("auto", "structured", "forward", "reverse"):
        assert_close(torchdiv.divergence(f, x, method=method), want, scale=10)


def test_v_prediction_converted_to_x0_and_eps():
    """``x0 = alpha x - sigma v`` and ``eps = sigma x + alpha v`` (alpha, sigma per sample on
    the variance-preserving path): ``div x0 = alpha n - sigma div v`` and ``div eps = sigma n
    + alpha div v``, with ``div v`` from the rows."""
    net, x, t, labels, text = _problem(seed=3)
    alpha, sigma = torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)
    a, s = _append_dims(alpha, 4), _append_dims(sigma, 4)
    v = lambda z: net(z, t, labels, text)  # noqa: E731
    div_v = loop_diagonal(v, x).flatten(1).sum(1)
    n = x[0].numel()
    x0 = torchdiv.divergence(lambda z: a * z - s * v(z), x)
    eps = torchdiv.divergence(lambda z: s * z + a * v(z), x, method="structured")
    assert_close(x0, alpha * n - sigma * div_v, scale=10)
    assert_close(eps, sigma * n + alpha * div_v, scale=10)


class Autoencoder(nn.Module):
    """A VAE-like conv encoder to a 2-channel latent at half resolution and a decoder back
    (``ConvTranspose2d``), as latent diffusion's first stage does at toy size."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 2, 2, 2))
        self.dec = nn.Sequential(nn.ConvTranspose2d(2, 4, 2, 2), nn.SiLU(), nn.Conv2d(4, 2, 1))


def test_latent_diffusion_through_encoder_and_decoder():
    """``f(x) = decode(eps(encode(x) * 0.18215, t) / 0.18215)`` on 4x4 images: divergence,
    diagonal and parameter gradients of both nets (all of them in one module)."""
    net, x, t, labels, text = _problem(seed=4, size=4)
    vae = Autoencoder().double()
    both = nn.ModuleList([net, vae])
    f = lambda z: vae.dec(net(vae.enc(z) * 0.18215, t, labels, text) / 0.18215)  # noqa: E731
    _check_divergence_and_diagonal(f, x, both, "auto")


@pytest.mark.parametrize("method", ["auto", "structured", "hutchinson"])
def test_ema_weights_copied_in_between_calls_are_used(method):
    """diffusers' ``EMAModel.copy_to`` writes ``param.data`` (no version bump) and
    ``load_state_dict`` copies under ``no_grad``: a call after either uses the new weights
    (no plan or passed watch keeps the old values)."""
    net, x, t, labels, text = _problem(seed=5)
    ema = copy.deepcopy(net)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.8).add_(0.1)
    f = lambda z: net(z, t, labels, text)  # noqa: E731
    probes = torchdiv.draw_probes(x, 2, generator=torch.Generator().manual_seed(0))
    kwargs = {"probes": probes} if method == "hutchinson" else {}
    before = torchdiv.divergence(f, x, method=method, **kwargs)
    torchdiv.divergence(f, x, method=method, **kwargs)
    saved = copy.deepcopy(net.state_dict())
    for p, q in zip(net.parameters(), ema.parameters(), strict=True):
        p.data.copy_(q.data)
    want = torchdiv.divergence(lambda z: ema(z, t, labels, text), x, method=method, **kwargs)
    assert_close(torchdiv.divergence(f, x, method=method, **kwargs), want, scale=10)
    net.load_state_dict(saved)
    assert_close(torchdiv.divergence(f, x, method=method, **kwargs), before.detach(), scale=10)


def threshold(x0: torch.Tensor, ratio: float = 0.75, max_value: float = 3.0) -> torch.Tensor:
    """diffusers' ``_threshold_sample`` (Imagen's dynamic thresholding): ``s`` the ``ratio``
    quantile of each sample's ``|x0|``, clamped to ``[1, max_value]`` (here ``[0.1, ...]``
    so that it moves with ``x`` at this scale), then ``clamp(x0, -s, s) / s``."""
    b, c, *rest = x0.shape
    flat = x0.reshape(b, c * math.prod(rest))
    s = torch.quantile(flat.abs(), ratio, dim=1)
    s = torch.clamp(s, min=0.1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape)


def _thresholded():
    net, x, t, labels, text = _problem(seed=6)
    return net, x, lambda z: threshold(net(z, t, labels, text))


@pytest.mark.parametrize("method", ["auto", "structured"])
def test_dynamic_thresholding_per_sample_is_exact(method):
    """Fails on ``"structured"`` without the ``clamp.Tensor`` rule (``UnsupportedOp``)."""
    net, x, f = _thresholded()
    flat = net(x, *_problem(seed=6)[2:]).flatten(1)
    s = torch.quantile(flat.abs(), 0.75, dim=1)
    assert ((s > 0.1) & (s < 3.0)).all() and (flat.abs() > s[:, None]).any()  # both branches
    _check_divergence_and_diagonal(f, x, net, method)


_SLOW_LAPLACIANS = [pytest.param(m, marks=pytest.mark.slow) for m in ("auto", "fwd-over-rev")]


@pytest.mark.parametrize("method", ["taylor", *_SLOW_LAPLACIANS])
def test_dynamic_thresholding_laplacian(method):
    """Each output's Laplacian against ``torch.func.hessian``, and the parameter gradients;
    ``"taylor"`` refused ``clamp`` between tensors before (``"auto"`` fell back)."""
    net, x, f = _thresholded()
    want = reference_laplacian(f, x)
    got = torchdiv.laplacian(f, x, method=method.replace("fwd-over-rev", "forward-over-reverse"))
    assert want.abs().max() > 1e-3
    assert_close(got, want, scale=10)
    c = torch.linspace(-1, 1, want.numel(), dtype=f64).reshape(want.shape)
    assert_same_parameter_gradients(net, (c * got).sum(), (c * want).sum())


def test_clamp_between_tensors_follows_autograd_at_the_edges():
    """``clamp(x, low, high)`` with ``low``/``high`` functions of ``x``: at ``x == low`` and
    ``x == high`` the derivative is ``x``'s, below ``low``'s, above ``high``'s, and where
    ``high < low`` everything is ``high``'s (autograd's ``clamp_backward_min_max``; PyTorch's
    forward mode takes the mean at a tie of ``clamp(x, min=low)``, so it is left out).
    Fails without the ``clamp.Tensor`` rule (``"structured"`` and ``"taylor"`` refused it)."""
    x = torch.tensor(
        [[0.0, 1.0, 2.0, -1.0], [3.0, 0.5, 0.25, -2.0], [1.0, 1.0, 1.0, 1.0]], dtype=f64
    )

    def f(z: torch.Tensor) -> torch.Tensor:
        low = z[:, :1] * 0.5 + z[:, 1:2] - 1  # row 0: z0^2 == low == 0; row 2: z^2 == low
        high = z[:, 2:3] * 1.5 - torch.tensor([[1.0], [-2.0], [0.25]], dtype=f64)
        return torch.clamp(z * z, low, high) + torch.clamp(z, min=low) * z[:, 3:]

    want = loop_diagonal(f, x)
    for method in ("structured", "auto"):
        assert_close(torchdiv.jacobian_diagonal(f, x, method=method), want)
    assert_close(torchdiv.divergence(f, x, method="structured"), want.sum(1))
    assert_close(torchdiv.laplacian(f, x, method="taylor"), reference_laplacian(f, x))


@pytest.mark.parametrize("method", ["auto", "structured", "hutchinson"])
@pytest.mark.parametrize("dim", [0, None])
def test_quantile_over_the_batch_is_refused(method, dim):
    """A threshold from the quantile of the whole batch (``dim=0`` of ``(B, n)``, or of the
    flattened batch) mixes samples: refused, naming the sort."""
    net, x, t, labels, text = _problem(seed=7)

    def f(z: torch.Tensor) -> torch.Tensor:
        x0 = net(z, t, labels, text)
        flat = x0.flatten(1).abs()
        s = torch.quantile(flat, 0.9, dim=0) if dim == 0 else torch.quantile(flat.flatten(), 0.9)
        return x0 / s.reshape(x0.shape[1:] if dim == 0 else ()).clamp(min=0.1)

    kwargs = {"num_probes": 1} if method == "hutchinson" else {}
    with pytest.raises(torchdiv.BatchInteractionError, match="sort"):
        torchdiv.divergence(f, x, method=method, **kwargs)


def test_sampling_loops_under_no_grad_and_inference_mode():
    """A sampler's ``with torch.no_grad():`` or ``torch.inference_mode():`` around calls of
    torchdiv: exact values (the library enables grad for the call), no graph kept, and
    conditioning made inside inference mode (``sigma`` per step) works; nothing of the
    model's gradients is touched."""
    net, x, _, labels, text = _problem(seed=8)
    model = Karras(net)
    sigmas = torch.tensor([2.0, 0.5], dtype=f64)
    want = []
    for sigma in sigmas:
        s = sigma.expand(B)
        want.append(loop_diagonal(lambda z, s=s: model(z, s, labels, text), x).flatten(1).sum(1))
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            for sigma, expected in zip(sigmas, want, strict=True):
                s = sigma * torch.ones(B, dtype=f64)  # an inference tensor under inference_mode
                got = torchdiv.divergence(lambda z, s=s: model(z, s, labels, text), x)
                assert not got.requires_grad
                assert_close(got, expected, scale=10)
    assert all(p.grad is None for p in net.parameters())


def _rk4_log_likelihood(divergence, velocity, x, t0: float, t1: float, steps: int):
    """``log p(x)`` by a hand-written rk4 (the 3/8 rule, torchdiffeq's ``"rk4"``) from ``t1``
    to ``t0`` on the augmented state ``(z, Delta)``, ``dDelta/dt = -div``, the divergence
    given per sample; a standard normal base."""
    state = (x, torch.zeros(len(x), dtype=x.dtype))
    h = (t0 - t1) / steps

    def field(t, s):
        return velocity(t, s[0]), -divergence(t, s[0])

    def moved(*terms):  # state + h * sum(c * k)
        return tuple(y + h * sum(c * k[i] for c, k in terms) for i, y in enumerate(state))

    for step in range(steps):
        t = torch.tensor(t1 + step * h, dtype=x.dtype)
        k1 = field(t, state)
        k2 = field(t + h / 3, moved((1 / 3, k1)))
        k3 = field(t + 2 * h / 3, moved((-1 / 3, k1), (1.0, k2)))
        k4 = field(t + h, moved((1.0, k1), (-1.0, k2), (1.0, k3)))
        state = moved((1 / 8, k1), (3 / 8, k2), (3 / 8, k3), (1 / 8, k4))
    z, delta = state
    base = -0.5 * z.flatten(1).square().sum(1) - 0.5 * z[0].numel() * math.log(2 * math.pi)
    return base - delta


@pytest.mark.parametrize("method", [pytest.param("auto", marks=pytest.mark.slow), "hutchinson"])
def test_probability_flow_likelihood_against_a_hand_written_loop(method):
    """score_sde's PF-ODE on the VP path with a guided eps-network: ``dx/dt = -beta(t)/2 (x -
    eps / sigma(t))``, ``log p(x)`` through ``torchdiv.flows.log_likelihood`` (rk4, fixed
    steps) against the same rk4 by hand with rows by ``autograd.grad`` (Hutchinson: the given
    probes' ``v^T J v`` on the ``jacrev`` blocks), and the parameter gradients."""
    pytest.importorskip("torchdiffeq")
    from torchdiv.flows import log_likelihood

    net, x, _, labels, text = _problem(seed=9)

    def velocity(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        beta = 0.1 + t * 19.9
        sigma = torch.sqrt(1 - torch.exp(-0.1 * t - 9.95 * t * t))
        eps = _guided(net, t.expand(B), labels, text, scale=2.0)(z)
        return -0.5 * beta * (z - eps / sigma)

    probes = torchdiv.draw_probes(x, 2, generator=torch.Generator().manual_seed(0))

    def divergence(t, z):
        f = lambda u: velocity(t, u)  # noqa: E731
        if method == "auto":  # rows through the state: it carries the parameters' gradients
            y = f(z).flatten(1)
            rows = (torch.autograd.grad(y[:, i].sum(), z, create_graph=True)[0] for i in range(n))
            return sum(row.flatten(1)[:, i] for i, row in enumerate(rows))
        jac = reference_jacobian(f, z).reshape(B, z[0].numel(), -1)
        v = probes.flatten(2)
        return torch.einsum("rbi,bij,rbj->b", v, jac, v) / len(v)

    n = x[0].numel()
    normal = lambda z: -0.5 * z.flatten(1).square().sum(1) - 0.5 * n * math.log(2 * math.pi)  # noqa: E731
    kwargs = {"probes": probes} if method == "hutchinson" else {}
    got = log_likelihood(
        velocity,
        x,
        1.0,
        0.25,
        normal,
        method=method,
        solver="rk4",
        options={"step_size": 0.375},
        **kwargs,
    )
    want = _rk4_log_likelihood(divergence, velocity, x.detach().requires_grad_(True), 1.0, 0.25, 2)
    assert_close(got, want, scale=100)
    assert_same_parameter_gradients(net, got.sum(), want.sum())


@pytest.mark.slow  # importing diffusers takes seconds
def test_diffusers_unet_guided_v_prediction_thresholded_by_its_scheduler():
    """diffusers' own pieces: a tiny class-conditional ``UNet2DModel`` (attention blocks,
    ``t`` of shape ``(B,)``), guidance by the doubled batch, ``x0 = sqrt(abar) x - sqrt(1 -
    abar) v`` and ``DDPMScheduler._threshold_sample``: divergence (``"structured"`` refused
    the thresholding's ``clamp`` before) and parameter gradients against the rows."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=4,
        in_channels=2,
        out_channels=2,
        block_out_channels=(4, 4),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=2,
        num_class_embeds=4,
        attention_head_dim=2,
    ).double()
    scheduler = diffusers.DDPMScheduler(
        thresholding=True, dynamic_thresholding_ratio=0.75, prediction_type="v_prediction"
    )
    x = torch.randn(B, 2, 4, 4, dtype=f64, generator=torch.Generator().manual_seed(1))
    labels, steps = torch.tensor([0, 2, 1]), torch.tensor([10, 500, 900])
    abar = scheduler.alphas_cumprod.double()[steps]
    a, s = _append_dims(abar.sqrt(), 4), _append_dims((1 - abar).sqrt(), 4)

    def f(z: torch.Tensor) -> torch.Tensor:
        both = unet(
            torch.cat([z, z]),
            torch.cat([steps, steps]),
            class_labels=torch.cat([torch.full_like(labels, 3), labels]),
        ).sample
        uncond, cond = both.chunk(2)
        return scheduler._threshold_sample(a * z - s * (uncond + 3.0 * (cond - uncond)))

    _check_divergence_and_diagonal(f, x, unet, "structured")
