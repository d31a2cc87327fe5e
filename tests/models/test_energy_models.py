"""Energy-based models and Stein methods as their repositories write them, torchdiv inside
the training loss.

- NCSN (Song and Ermon 2019): a conv score net with conditional instance norm ++ (per-sample
  statistics over the spatial dims, plus the normalised channel means) and the output divided
  by the sample's noise level ``sigmas[y]``; the exact score-matching loss
  ``sigma^2 (tr(d s/d x) + |s|^2 / 2)``. With a train-mode batch norm instead, the net mixes
  samples and must be refused.
- JEM (Grathwohl et al. 2020): the energy ``-logsumexp`` of a spectrally normalised residual
  classifier, in train mode (every forward runs one power iteration on buffers, in place).
  ``laplacian(E)`` and ``divergence(-grad E)`` (a score differentiated inside ``f``) must be
  the derivatives of ONE forward's function and advance the power iteration exactly once.
- Learned Stein discrepancy (Grathwohl et al. 2020): a critic ``g`` and the model's score
  ``s_p = -grad E``; ``mean(s_p . g + tr(d g/d x)) - lambda mean(|g|^2)`` with a Hutchinson
  divergence of given probes.

References: per-sample grad-of-grad loops over plain autograd, one sample at a time, float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from torch.nn.utils.parametrizations import spectral_norm

import torchdiv

F64 = torch.float64


class ConditionalInstanceNorm2dPlus(torch.nn.Module):
    """NCSN's normalisation: instance norm, plus the channel means normalised across channels
    (per sample), scaled by ``alpha``; ``gamma``, ``alpha``, ``beta`` embedded per noise level."""

    def __init__(self, channels: int, levels: int) -> None:
        super().__init__()
        self.channels = channels
        self.instance_norm = torch.nn.InstanceNorm2d(channels, affine=False)
        self.embed = torch.nn.Embedding(levels, 3 * channels)
        self.embed.weight.data[:, : 2 * channels].normal_(1, 0.1)
        self.embed.weight.data[:, 2 * channels :].normal_(0, 0.1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        means = x.mean(dim=(2, 3))
        m, v = means.mean(dim=-1, keepdim=True), means.var(dim=-1, keepdim=True)
        means = (means - m) / torch.sqrt(v + 1e-5)
        gamma, alpha, beta = self.embed(y).chunk(3, dim=-1)
        h = self.instance_norm(x) + means[..., None, None] * alpha[..., None, None]
        return gamma[..., None, None] * h + beta[..., None, None]


class NCSN(torch.nn.Module):
    """A two-block NCSN score net; ``batch_norm=True`` swaps the second norm for BatchNorm2d."""

    def __init__(self, width: int = 4, levels: int = 5, batch_norm: bool = False) -> None:
        super().__init__()
        self.register_buffer("sigmas", torch.exp(torch.linspace(0.0, -2.0, levels)))
        self.conv1 = torch.nn.Conv2d(1, width, 3, padding=1)
        self.norm1 = ConditionalInstanceNorm2dPlus(width, levels)
        self.conv2 = torch.nn.Conv2d(width, width, 3, padding=1)
        self.norm2 = (
            torch.nn.BatchNorm2d(width)
            if batch_norm
            else ConditionalInstanceNorm2dPlus(width, levels)
        )
        self.conv3 = torch.nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.elu(self.norm1(self.conv1(2 * x - 1), y))
        h = self.conv2(h)
        h = self.norm2(h) if isinstance(self.norm2, torch.nn.BatchNorm2d) else self.norm2(h, y)
        return self.conv3(F.elu(h)) / self.sigmas[y].view(-1, 1, 1, 1)


def sample_divergence(f, x: torch.Tensor) -> torch.Tensor:
    """``tr(d f/d x)`` of one sample ``x`` (batch of one), row by row, differentiable."""
    x = x.detach().requires_grad_(True)
    y = f(x).reshape(-1)
    rows = [
        torch.autograd.grad(y[i], x, create_graph=True)[0].reshape(-1)[i] for i in range(len(y))
    ]
    return torch.stack(rows).sum()


def sample_laplacian(energy, x: torch.Tensor) -> torch.Tensor:
    """``sum_i d^2 E / d x_i^2`` of one sample, by grad of grad, differentiable."""
    return sample_divergence(lambda z: -score_of(energy, z), x)


def score_of(energy, z: torch.Tensor) -> torch.Tensor:
    """``-grad_x E`` as the EBM repositories write it: ``autograd.grad`` inside the model."""
    return -torch.autograd.grad(energy(z).sum(), z, create_graph=True)[0]


def grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """``d loss / d params``, zeros for parameters the loss does not reach."""
    found = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, found, strict=True)]


@pytest.mark.parametrize("method", ["auto", "reverse", "forward", "structured"])
def test_ncsn_score_matching_loss_with_conditional_instance_norm_plus(method: str) -> None:
    """Per-sample normalisation over spatial dims is not refused; value and parameter
    gradients of the exact score-matching loss equal the per-sample loop's, call after call."""
    torch.manual_seed(0)
    net = NCSN().to(F64)
    x, y = torch.rand(3, 1, 4, 4, dtype=F64), torch.tensor([0, 3, 4])
    params = list(net.parameters())

    def loss_of(div: torch.Tensor) -> torch.Tensor:
        s = net(x, y).flatten(1)
        return (net.sigmas[y] ** 2 * (div + 0.5 * (s**2).sum(1))).mean()

    ref = torch.stack(
        [sample_divergence(lambda z, b=b: net(z, y[b : b + 1]), x[b : b + 1]) for b in range(3)]
    )
    ref_grads = grads(loss_of(ref), params)
    for _ in range(2):
        div = torchdiv.divergence(lambda z: net(z, y), x, method=method)
        assert_close(div, ref.detach())
        for g, r in zip(grads(loss_of(div), params), ref_grads, strict=True):
            assert_close(g, r)


@pytest.mark.parametrize("method", ["auto", "reverse", "forward", "structured", "hutchinson"])
def test_ncsn_with_a_train_mode_batch_norm_is_refused(method: str) -> None:
    """The same net with BatchNorm2d in train mode mixes samples: refused, stats untouched."""
    torch.manual_seed(0)
    net = NCSN(batch_norm=True).to(F64)
    x, y = torch.rand(3, 1, 4, 4, dtype=F64), torch.tensor([0, 3, 4])
    before = copy.deepcopy(net.state_dict())
    kwargs = {"num_probes": 2} if method == "hutchinson" else {}
    with pytest.raises(torchdiv.BatchInteractionError, match="batch norm"):
        torchdiv.divergence(lambda z: net(z, y), x, method=method, **kwargs)
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name


class Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.l1 = spectral_norm(torch.nn.Linear(width, width))
        self.l2 = spectral_norm(torch.nn.Linear(width, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.l2(F.leaky_relu(self.l1(F.leaky_relu(h, 0.2)), 0.2))


class JEM(torch.nn.Module):
    """A spectrally normalised residual classifier; energy ``-logsumexp(logits)``."""

    def __init__(self, d: int = 5, width: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.inp = spectral_norm(torch.nn.Linear(d, width))
        self.block = Block(width)
        self.head = torch.nn.Linear(width, classes)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.logsumexp(self.head(F.silu(self.block(self.inp(x)))), dim=1)


@pytest.mark.parametrize(
    ("op", "method"),
    [
        ("laplacian", "auto"),
        ("laplacian", "taylor"),
        ("laplacian", "forward-over-reverse"),
        ("divergence", "auto"),
        ("divergence", "reverse"),
    ],
)
@pytest.mark.parametrize("x_requires_grad", [False, True])
def test_jem_energy_in_train_mode_is_differentiated_at_one_power_iteration(
    op: str, method: str, x_requires_grad: bool
) -> None:
    """Spectral norm's train-mode power iteration writes ``u``, ``v`` in place on every
    forward: the operator is the one forward's function (an eval copy after one forward),
    and the buffers end where one plain forward leaves them."""
    torch.manual_seed(0)
    net = JEM().to(F64).train()
    x = torch.randn(4, 5, dtype=F64)
    once = copy.deepcopy(net)
    once.energy(x)  # one power iteration
    once.eval()
    params, ref_params = list(net.parameters()), list(once.parameters())
    weights = torch.randn(4, dtype=F64)
    if op == "laplacian":
        out = torchdiv.laplacian(
            net.energy, x.clone().requires_grad_(x_requires_grad), method=method
        )
        ref = torch.stack([sample_laplacian(once.energy, x[b : b + 1]) for b in range(4)])
    else:
        z = x.clone().requires_grad_(x_requires_grad)
        out = torchdiv.divergence(lambda w: score_of(net.energy, w), z, method=method)
        ref = torch.stack(
            [sample_divergence(lambda w: score_of(once.energy, w), x[b : b + 1]) for b in range(4)]
        )
    assert_close(out, ref.detach())
    for g, r in zip(
        grads((weights * out).sum(), params),
        grads((weights * ref).sum(), ref_params),
        strict=True,
    ):
        assert_close(g, r)
    for name, value in net.state_dict().items():
        assert torch.equal(value, once.state_dict()[name]), name


def test_learned_stein_discrepancy_with_a_hutchinson_critic_divergence() -> None:
    """LSD's objective with ``divergence(critic, method="hutchinson", probes=v)``: value and the
    gradients of both the critic and the energy equal the per-sample ``v^T J v`` loop's."""
    torch.manual_seed(0)
    d, b, k, lam = 5, 6, 3, 0.5
    energy_net = torch.nn.Sequential(
        torch.nn.Linear(d, 16), torch.nn.SiLU(), torch.nn.Linear(16, 1)
    ).to(F64)
    critic = torch.nn.Sequential(
        torch.nn.Linear(d, 16), torch.nn.SiLU(), torch.nn.Linear(16, d)
    ).to(F64)
    x = torch.randn(b, d, dtype=F64)
    probes = torch.randn(k, b, d, dtype=F64)
    params = list(energy_net.parameters()) + list(critic.parameters())

    def objective(div: torch.Tensor) -> torch.Tensor:
        z = x.detach().requires_grad_(True)
        s = score_of(lambda w: energy_net(w).squeeze(-1), z)
        g = critic(x)
        return ((s * g).sum(-1) + div).mean() - lam * (g**2).sum(-1).mean()

    def sample_estimate(i: int) -> torch.Tensor:
        z = x[i : i + 1].detach().requires_grad_(True)
        out = critic(z)
        terms = [
            (torch.autograd.grad(out, z, v[i : i + 1], create_graph=True)[0] * v[i : i + 1]).sum()
            for v in probes
        ]
        return torch.stack(terms).mean()

    ref = objective(torch.stack([sample_estimate(i) for i in range(b)]))
    est = objective(torchdiv.divergence(critic, x, method="hutchinson", probes=probes))
    assert_close(est, ref.detach())
    for g, r in zip(grads(est, params), grads(ref, params), strict=True):
        assert_close(g, r)
