"""Meta's ``flow_matching`` library as its users call it, with torchdiv's divergence in the
likelihood solve in place of the library's own.

The models are written as the library's examples write them: the 2-D notebooks' MLP (Swish,
``t`` reshaped, expanded and concatenated) inside a ``ModelWrapper``; a class-conditional field
that broadcasts ``t`` to ``(B,)`` (``torch.zeros(B) + t``, as the image example's wrapper does)
and embeds its label, the label passed by closure; a guided-diffusion style U-Net at 4x4
(sinusoidal time embedding, label embedding, scale-shift group norm, attention, skip).
Training uses the library's ``AffineProbPath`` and schedulers (conditional flow matching loss).

Not a project extra: every test skips without ``flow_matching`` (installed here ``--no-deps``;
it needs only torch, numpy and torchdiffeq).

References: ``ODESolver.compute_likelihood(exact_divergence=True)`` (its exact divergence is
an autograd loop over the event, right for flat ``(B, D)`` states only); the same ``odeint``
with a per-sample float64 ``jacrev`` trace (each sample alone with its own time and label),
values and parameter gradients to ``conftest.tolerances`` (1e-10: both sides are the same
quadrature of the same field, only the Jacobian's trace is computed differently).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close, assert_same_parameter_gradients, sampled_daily
from torch import nn
from torch.func import jacrev

import torchdiv
from torchdiv.flows import log_likelihood

fm_solver = pytest.importorskip("flow_matching.solver")
fm_utils = pytest.importorskip("flow_matching.utils")
fm_path = pytest.importorskip("flow_matching.path")
fm_scheduler = pytest.importorskip("flow_matching.path.scheduler")
odeint = pytest.importorskip("torchdiffeq").odeint

f64 = torch.float64
MIDPOINT = {"solver": "midpoint", "options": {"step_size": 0.25}}


def log_p0(z: torch.Tensor) -> torch.Tensor:
    """The standard normal source density, per sample of any event shape."""
    flat = z.flatten(1)
    return -0.5 * flat.square().sum(-1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x) * x


class MLP(nn.Module):
    """The 2-D notebooks' velocity: ``cat([x, t expanded to (B, 1)])`` through a Swish MLP."""

    def __init__(self, input_dim: int = 2, hidden_dim: int = 16):
        super().__init__()
        self.input_dim = input_dim
        self.main = nn.Sequential(
            nn.Linear(input_dim + 1, hidden_dim),
            Swish(),
            nn.Linear(hidden_dim, hidden_dim),
            Swish(),
            nn.Linear(hidden_dim, input_dim),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        size = x.size()
        x = x.reshape(-1, self.input_dim)
        t = t.reshape(-1, 1).to(x.dtype).expand(x.shape[0], 1)
        return self.main(torch.cat([x, t], dim=1)).reshape(*size)


class Wrapped(fm_utils.ModelWrapper):
    """The notebooks' ``WrappedModel``: ``forward(x, t, **extras)``."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, **extras) -> torch.Tensor:
        return self.model(x, t, **extras)


class Flow(nn.Module):
    """The CNF notebook's (moons) velocity: ELU MLP on ``cat((t, x_t), -1)``."""

    def __init__(self, dim: int = 2, h: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + 1, h), nn.ELU(), nn.Linear(h, h), nn.ELU(), nn.Linear(h, dim)
        )

    def forward(self, t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat((t, x_t), -1))


class TimeFirst(fm_utils.ModelWrapper):
    """The CNF notebook's wrapper: the solver's 0-dim ``t`` viewed as ``(1, 1)`` and expanded
    to ``(B, 1)``, passed first."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, **extras) -> torch.Tensor:
        return self.model(t.view(1, 1).expand(x.shape[0], 1), x)


class Conditional(nn.Module):
    """A class-conditional field: ``t`` (a float, a 0-dim, ``(B,)`` or ``(B, 1)`` tensor)
    made a ``(B, 1)`` column and concatenated, label embedded, SiLU MLP."""

    def __init__(self, classes: int = 3, hidden: int = 16):
        super().__init__()
        self.label = nn.Embedding(classes, 4)
        self.net = nn.Sequential(
            nn.Linear(2 + 1 + 4, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
        )
        self.out = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor, t, label: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        return self.out(self.net(torch.cat([x, t, self.label(label)], -1)))


def per_sample_trace(model, t: torch.Tensor, z: torch.Tensor, **extras) -> torch.Tensor:
    """``tr d model(z_b, t) / d z_b``, each sample alone (its own extras), float64 ``jacrev``."""
    traces = []
    for b in range(len(z)):
        own = {k: v[b : b + 1] for k, v in extras.items()}
        jac = jacrev(lambda s, own=own: model(s[None], t, **own)[0])(z[b])
        traces.append(jac.reshape(z[b].numel(), z[b].numel()).trace())
    return torch.stack(traces)


def brute_force_log_likelihood(model, x: torch.Tensor, options: dict, **extras) -> torch.Tensor:
    """The same solve from ``t = 1`` back to 0 with ``per_sample_trace`` for the divergence."""

    def dynamics(t, state):
        z, _ = state
        return model(z, t, **extras), -per_sample_trace(model, t, z, **extras)

    times = torch.tensor([1.0, 0.0], dtype=x.dtype)
    z, delta = odeint(
        dynamics,
        (x, torch.zeros(len(x), dtype=x.dtype)),
        times,
        method=options["solver"],
        options=options["options"],
    )
    return log_p0(z[-1]) - delta[-1]


@pytest.mark.parametrize("notebook", ["flow matching", "CNF"])
def test_exact_log_likelihood_equals_the_library_and_a_jacobian_trace(notebook):
    """The notebooks' MLPs in their ``ModelWrapper``: ``compute_likelihood`` with the library's
    exact divergence, torchdiv's ``log_likelihood`` (noise at ``t0 = 0``, data at ``t1 = 1``)
    and the brute-force trace agree; so do the parameter gradients of the NLL (the CNF
    notebook's maximum-likelihood loss)."""
    model = (Wrapped(MLP()) if notebook == "flow matching" else TimeFirst(Flow())).to(f64)
    x = torch.randn(4, 2, dtype=f64)
    times = torch.tensor([1.0, 0.0], dtype=f64)
    solver = fm_solver.ODESolver(velocity_model=model)
    _, theirs = solver.compute_likelihood(
        x, log_p0, step_size=0.25, method="midpoint", time_grid=times, exact_divergence=True
    )
    ours = log_likelihood(lambda t, z: model(x=z, t=t), x, 0.0, 1.0, log_p0, **MIDPOINT)
    reference = brute_force_log_likelihood(model, x, MIDPOINT)
    assert_close(ours.detach(), theirs)
    assert_close(ours, reference)
    assert_same_parameter_gradients(model, -ours.mean(), -reference.mean())


@pytest.mark.parametrize("time", ["float", "0-dim", "per-sample", "column"])
def test_time_as_users_pass_it(time):
    """``t`` handed on as a Python float, the solver's 0-dim tensor, a ``(B,)`` tensor or a
    ``(B, 1)`` column: the divergence and its parameter gradients equal the per-sample trace."""
    model = Conditional().to(f64)
    x, label = torch.randn(3, 2, dtype=f64), torch.tensor([0, 2, 1])
    t = torch.tensor(0.3, dtype=f64)
    given = {
        "float": 0.3,
        "0-dim": t,
        "per-sample": t.expand(3),
        "column": t.expand(3, 1),
    }[time]
    ours = torchdiv.divergence(lambda z: model(z, given, label), x)
    reference = per_sample_trace(model, t, x, label=label)
    assert_close(ours, reference)
    assert_same_parameter_gradients(model, ours.square().sum(), reference.square().sum())


@pytest.mark.parametrize(
    "scheduler",
    sampled_daily(
        ["CondOTScheduler", "CosineScheduler", "VPScheduler"], {"CosineScheduler", "VPScheduler"}
    ),
)
def test_trained_conditional_field_likelihood_and_gradients(scheduler):
    """Two conditional-flow-matching steps on the library's affine path, then the NLL of
    labelled points (label by closure): values and parameter gradients against the brute force."""
    model = Wrapped(Conditional()).to(f64)
    path = fm_path.AffineProbPath(scheduler=getattr(fm_scheduler, scheduler)())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        x_1 = torch.randn(8, 2, dtype=f64) + 2
        sample = path.sample(
            x_0=torch.randn_like(x_1), x_1=x_1, t=torch.rand(8, dtype=f64) * 0.98 + 0.01
        )
        labels = torch.randint(0, 3, (8,))
        loss = (model(sample.x_t, sample.t, label=labels) - sample.dx_t).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, label = torch.randn(3, 2, dtype=f64), torch.tensor([1, 0, 2])
    ours = log_likelihood(lambda t, z: model(z, t, label=label), x, 0.0, 1.0, log_p0, **MIDPOINT)
    reference = brute_force_log_likelihood(model, x, MIDPOINT, label=label)
    assert_close(ours, reference)
    assert_same_parameter_gradients(model, -ours.mean(), -reference.mean())


def test_hutchinson_with_the_library_s_probe_equals_its_estimate():
    """``compute_likelihood(exact_divergence=False)`` draws one Rademacher probe per solve
    (float32: its probe is float32 whatever ``x``'s dtype, so float64 fails inside the
    library); the same probe as ``probes=`` gives the same estimate."""
    model = Wrapped(MLP()).float()
    x = torch.randn(4, 2)
    times = torch.tensor([1.0, 0.0])
    torch.manual_seed(7)
    _, theirs = fm_solver.ODESolver(velocity_model=model).compute_likelihood(
        x, log_p0, step_size=0.25, method="midpoint", time_grid=times
    )
    torch.manual_seed(7)
    probe = (torch.randn_like(x) < 0) * 2.0 - 1.0  # the library's draw
    ours = log_likelihood(
        lambda t, z: model(x=z, t=t),
        x,
        0.0,
        1.0,
        log_p0,
        method="hutchinson",
        probes=probe[None],
        **MIDPOINT,
    )
    assert_close(ours.detach(), theirs)


def test_hutchinson_is_unbiased_with_the_library_s_variance():
    """Each row of a batch gets its own probe, so one solve of 4 points repeated 500 times is
    500 independent one-probe estimates per point (fixed seeds). Their mean is within 4
    standard errors of the exact log-likelihood (4 points: a false alarm under 3e-4), and
    their variance is the library's (Rademacher both: the ratio of two sample variances of
    500 draws lies in [0.75, 1.33] with probability above 0.99 for equal variances)."""
    model = Wrapped(MLP()).float()
    points, repeats = torch.randn(4, 2), 500
    x = points.repeat(repeats, 1)
    field = lambda t, z: model(x=z, t=t)  # noqa: E731
    options = {"solver": "midpoint", "options": {"step_size": 0.5}}
    exact = log_likelihood(field, points, 0.0, 1.0, log_p0, **options).detach()
    ours = log_likelihood(
        field,
        x,
        0.0,
        1.0,
        log_p0,
        method="hutchinson",
        num_probes=1,
        probe="rademacher",
        generator=torch.Generator().manual_seed(0),
        **options,
    ).detach()
    torch.manual_seed(1)
    _, theirs = fm_solver.ODESolver(velocity_model=model).compute_likelihood(
        x, log_p0, step_size=0.5, method="midpoint", time_grid=torch.tensor([1.0, 0.0])
    )
    ours, theirs = ours.reshape(repeats, 4).double(), theirs.reshape(repeats, 4).double()
    stderr = ours.std(0) / math.sqrt(repeats)
    assert ((ours.mean(0) - exact.double()).abs() <= 4 * stderr).all()
    ratio = ours.var(0) / theirs.var(0)
    assert ((ratio > 0.75) & (ratio < 1.33)).all(), ratio


class BatchNormMLP(nn.Module):
    """The notebook's MLP with a batch norm after its first layer: in train mode it mixes
    the samples of the batch (each sample's velocity reads the batch's statistics)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(3, 16)
        self.norm = nn.BatchNorm1d(16)
        self.rest = nn.Sequential(Swish(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, 1).to(x.dtype).expand(x.shape[0], 1)
        return self.rest(self.norm(self.first(torch.cat([x, t], 1))))


@pytest.mark.parametrize("method", ["auto", "hutchinson"])
@pytest.mark.parametrize("mixes", [False, True])
def test_the_watch_passes_the_notebook_model_and_refuses_a_mixing_one(method, mixes):
    """The notebook's reshapes and expanded time are per sample: no refusal; the same field
    with a train-mode batch norm is refused in the solve's first evaluation."""
    options = {"num_probes": 1} if method == "hutchinson" else {}
    model = Wrapped(BatchNormMLP() if mixes else MLP()).to(f64)
    x = torch.randn(5, 2, dtype=f64)

    def solve() -> torch.Tensor:
        field = lambda t, z: model(x=z, t=t)  # noqa: E731
        return log_likelihood(field, x, 0.0, 1.0, log_p0, method=method, **options, **MIDPOINT)

    if mixes:
        with pytest.raises(torchdiv.BatchInteractionError, match="mixes samples"):
            solve()
    else:
        assert solve().isfinite().all()


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Guided diffusion's sinusoidal embedding of a ``(B,)`` time."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


class ResBlock(nn.Module):
    """A scale-shift ResBlock: GroupNorm, SiLU, conv; the embedding scales and shifts the
    second norm's output."""

    def __init__(self, channels: int, emb: int, out: int | None = None):
        super().__init__()
        out = out or channels
        self.in_layers = nn.Sequential(
            nn.GroupNorm(4, channels), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, 2 * out))
        self.out_norm = nn.GroupNorm(4, out)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Conv2d(out, out, 3, padding=1))
        self.skip = nn.Identity() if out == channels else nn.Conv2d(channels, out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.emb_layers(emb)[..., None, None].chunk(2, 1)
        h = self.out_norm(self.in_layers(x)) * (1 + scale) + shift
        return self.skip(x) + self.out_layers(h)


class Attention(nn.Module):
    """Guided diffusion's ``AttentionBlock`` (two heads, ``QKVAttentionLegacy`` order)."""

    def __init__(self, channels: int, heads: int = 2):
        super().__init__()
        self.norm, self.heads = nn.GroupNorm(4, channels), heads
        self.qkv, self.proj = nn.Conv1d(channels, 3 * channels, 1), nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, -1))
        q, k, v = qkv.reshape(b * self.heads, 3 * c // self.heads, -1).chunk(3, 1)
        scale = 1 / math.sqrt(math.sqrt(c // self.heads))
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), -1)
        h = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
        return x + self.proj(h).reshape(b, c, *spatial)


class UNet(nn.Module):
    """The image example's U-Net at toy size: ``forward(x, timesteps, extra)`` with the label
    in ``extra`` (absent: unconditional; label ``classes``: the null class of a doubled-batch
    guidance), one down and one up level, attention in the middle."""

    def __init__(self, channels: int = 2, width: int = 8, classes: int = 3):
        super().__init__()
        self.width, emb = width, 4 * width
        self.time_embed = nn.Sequential(nn.Linear(width, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Embedding(classes + 1, emb)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.down_block, self.down = ResBlock(width, emb), nn.Conv2d(width, width, 3, 2, 1)
        self.middle, self.attention = ResBlock(width, emb), Attention(width)
        self.up_block = ResBlock(2 * width, emb, width)
        self.out = nn.Sequential(
            nn.GroupNorm(4, width), nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, extra: dict) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.width).to(x.dtype))
        if "label" in extra:
            emb = emb + self.label_emb(extra["label"])
        skip = self.down_block(self.inp(x), emb)
        h = self.attention(self.middle(self.down(skip), emb))
        up = nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
        return self.out(self.up_block(torch.cat([up, skip], 1), emb))


class Guided(fm_utils.ModelWrapper):
    """The image example's classifier-free-guidance wrapper written for likelihoods: its
    ``t`` broadcast to ``(B,)``, conditional and unconditional passes mixed by ``cfg_scale``,
    with grad left on (the example's own wrapper runs under ``torch.no_grad()``: see
    docs/guide/flows.md)."""

    def forward(self, x, t, cfg_scale: float, label: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(x.shape[0], dtype=x.dtype) + t
        conditional = self.model(x, t, extra={"label": label})
        if cfg_scale == 0.0:
            return conditional
        free = self.model(x, t, extra={})
        return (1.0 + cfg_scale) * conditional - cfg_scale * free


class DoubledGuided(fm_utils.ModelWrapper):
    """Guidance as diffusers pipelines write it: conditional and unconditional (null label)
    passes in one doubled batch, ``chunk(2)`` after: per sample, not a mixing of samples."""

    def forward(self, x, t, cfg_scale: float, label: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(x.shape[0], dtype=x.dtype) + t
        null = torch.full_like(label, 3)
        both = self.model(torch.cat([x, x]), torch.cat([t, t]), {"label": torch.cat([label, null])})
        conditional, free = both.chunk(2)
        return (1.0 + cfg_scale) * conditional - cfg_scale * free


GUIDANCE = {"two passes": (Guided, 0.5), "doubled batch": (DoubledGuided, 0.5)}
GUIDANCE["conditional only"] = (Guided, 0.0)


@pytest.mark.parametrize(
    "guidance", sampled_daily(list(GUIDANCE), {"conditional only", "two passes"})
)
def test_unet_guided_divergence(guidance):
    """The toy U-Net behind a guidance wrapper, label by closure: ``"auto"`` (no refusal of the
    doubled batch) and the brute-force trace agree (float64), as do the parameter gradients."""
    wrapper, cfg_scale = GUIDANCE[guidance]
    model = wrapper(UNet()).to(f64)
    x, label = torch.randn(2, 2, 4, 4, dtype=f64), torch.tensor([2, 0])
    t = torch.tensor(0.4, dtype=f64)
    field = lambda z: model(z, t, cfg_scale=cfg_scale, label=label)  # noqa: E731
    reference = per_sample_trace(
        lambda z, t, label: model(z, t, cfg_scale=cfg_scale, label=label), t, x, label=label
    )
    ours = torchdiv.divergence(field, x)
    assert_close(ours, reference)
    assert_same_parameter_gradients(model, ours.sum(), reference.sum())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["reverse", "forward", "structured"])
def test_unet_guided_divergence_other_methods(method):
    model = Guided(UNet()).to(f64)
    x, label = torch.randn(2, 2, 4, 4, dtype=f64), torch.tensor([1, 0])
    t = torch.tensor(0.7, dtype=f64)
    reference = per_sample_trace(
        lambda z, t, label: model(z, t, cfg_scale=0.5, label=label), t, x, label=label
    )
    ours = torchdiv.divergence(lambda z: model(z, t, cfg_scale=0.5, label=label), x, method=method)
    assert_close(ours, reference)


@pytest.mark.slow
def test_unet_log_likelihood_and_hutchinson():
    """The toy U-Net's log-likelihood (rk4, 2 steps) against the brute-force solve, values
    and parameter gradients; one-probe-per-row Hutchinson within 4 standard errors."""
    model = Guided(UNet()).to(f64)
    x, label = torch.randn(2, 2, 4, 4, dtype=f64), torch.tensor([2, 1])
    options = {"solver": "rk4", "options": {"step_size": 0.5}}
    field = lambda t, z: model(z, t, cfg_scale=0.5, label=label)  # noqa: E731
    ours = log_likelihood(field, x, 0.0, 1.0, log_p0, **options)
    reference = brute_force_log_likelihood(
        lambda z, t, label: model(z, t, cfg_scale=0.5, label=label), x, options, label=label
    )
    assert_close(ours, reference)
    assert_same_parameter_gradients(model, -ours.mean(), -reference.mean())
    estimate, stderr = log_likelihood(
        field,
        x,
        0.0,
        1.0,
        log_p0,
        method="hutchinson",
        num_probes=8,
        generator=torch.Generator().manual_seed(0),
        return_stderr=True,
        **options,
    )
    assert ((estimate - ours).abs() <= 4 * stderr).all()


class SamplingGuided(fm_utils.ModelWrapper):
    """The image example's ``CFGScaledModel`` as it is written for sampling: both passes
    under ``torch.no_grad()`` (``"inference"``: a ``@torch.inference_mode()`` guidance method
    instead), with a Python evaluation counter."""

    def __init__(self, model: nn.Module, stop: str):
        super().__init__(model)
        self.stop, self.nfe_counter = stop, 0

    def forward(self, x, t, cfg_scale: float, label: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(x.shape[0], dtype=x.dtype) + t
        block = torch.no_grad() if self.stop == "no_grad" else torch.inference_mode()
        with block:
            conditional = self.model(x, t, label)
            free = self.model(x, t, torch.zeros_like(label))
        self.nfe_counter += 1
        return (1.0 + cfg_scale) * conditional - cfg_scale * free


@pytest.mark.parametrize("method", ["auto", "hutchinson"])
@pytest.mark.parametrize("stop", ["no_grad", "inference"])
def test_a_sampling_wrapper_s_stopped_field_is_refused(stop, method):
    """Every method takes a value computed under ``no_grad``/``inference_mode`` for a constant,
    so this field's divergence is 0: the log-likelihood was the base density of the
    transported points, silently (the library's ``compute_likelihood`` raises). Now an error
    naming the cause, under the caller's grad and ``no_grad`` alike; not where nothing moves."""
    model = SamplingGuided(Conditional(), stop).to(f64)
    x, label = torch.randn(3, 2, dtype=f64), torch.tensor([0, 2, 1])
    options = {"num_probes": 1} if method == "hutchinson" else {}
    field = lambda t, z: model(z, t, cfg_scale=0.5, label=label)  # noqa: E731
    for mode in (torch.enable_grad(), torch.no_grad()):
        with mode, pytest.raises(ValueError, match=r"no_grad.*inference_mode"):
            log_likelihood(field, x, 0.0, 1.0, log_p0, method=method, **options, **MIDPOINT)
    # no motion (t0 == t1): log p(x) is the base density, right whatever f
    assert_close(log_likelihood(field, x, 1.0, 1.0, log_p0, method=method, **options), log_p0(x))


def test_fields_constant_in_z_or_divergence_free_pass():
    """The library's own constant example (``ones_like(x) * 3 t**2``) and a rotation (trace
    exactly 0 at every evaluation) are not stopped fields: their log-likelihoods come back."""
    x = torch.randn(3, 2, dtype=f64)
    rotation = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=f64)
    constant = log_likelihood(lambda t, z: torch.ones_like(z) * 3 * t**2, x, 0.0, 1.0, log_p0)
    tight = {"rtol": 1e-8, "atol": 1e-8}
    turned = log_likelihood(lambda t, z: z @ rotation.T, x, 0.0, 1.0, log_p0, **tight)
    assert_close(constant, log_p0(x - 1.0))  # z(0) = x - integral of 3 t^2 over [0, 1]
    # a rotation keeps the standard normal's density (dopri5 at 1e-8: 1e-6 is its error)
    torch.testing.assert_close(turned, log_p0(x), rtol=0, atol=1e-6)
