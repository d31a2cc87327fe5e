"""sbi's flow-matching (FMPE) and score-based (NPSE) posterior estimators, as its users build
them: ``build_vector_field_estimator`` with sbi's MLP and AdaMLP vector-field nets (random
Fourier time embedding, layer norm, skip connections), z-scoring of theta and x from the
training data (buffers), an embedding net for x; the probability-flow field
``estimator.ode_fn(theta, x_o, t)`` with the observation broadcast to the batch by closure.
sbi integrates it with zuko's ``FreeFormJacobianTransform`` (data at ``t_min``, base at
``t_max``); torchdiv's divergence and ``log_likelihood`` take its place."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import torchdiv

pytest.importorskip("sbi")
pytest.importorskip("torchdiffeq")
from sbi.neural_nets.net_builders.vector_field_nets import (
    build_vector_field_estimator,
)

f64 = torch.float64


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """Training pairs whose scales differ per dimension, so that z-scoring is not the identity."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(200, 3, generator=g) * torch.tensor([1.0, 2.0, 0.5]) + 1.0
    x = torch.randn(200, 4, generator=g) * 3.0 + 2.0
    return theta, x


def _estimator(kind: str, net: str | nn.Module = "mlp", **kwargs) -> nn.Module:
    """A small sbi estimator in float64 and eval mode. sbi zero-initialises the MLP's output
    layer (the field is then constant in theta, divergence 0): untrained weights are redrawn."""
    torch.manual_seed(0)
    theta, x = _data()
    embedding = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6))
    estimator = build_vector_field_estimator(
        theta, x, kind, z_score_x="independent", z_score_y="independent",
        embedding_net=embedding, hidden_features=16, num_layers=2, net=net, **kwargs,
    )  # fmt: skip
    with torch.no_grad():
        for p in estimator.net.parameters():
            if p.abs().max() == 0:
                p.normal_(std=0.3)
    return estimator.to(f64).eval()


def _observation() -> torch.Tensor:
    return _data()[1][:1].to(f64)


def _trace(field: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor) -> torch.Tensor:
    """Each sample's Jacobian trace, one sample at a time (float64 ``jacrev``)."""

    def one(z: torch.Tensor) -> torch.Tensor:
        return field(z[None])[0]

    return torch.func.vmap(torch.func.jacrev(one))(theta).diagonal(0, -2, -1).sum(-1)


CASES = [
    ("flow", "mlp", {}),
    ("flow", "ada_mlp", {}),
    ("score", "mlp", {"sde_type": "ve"}),
    ("score", "ada_mlp", {"sde_type": "vp"}),
]


@pytest.mark.parametrize(("kind", "net", "kwargs"), CASES, ids=lambda c: str(c) or "-")
def test_divergence_of_sbis_probability_flow_field(kind: str, net: str, kwargs: dict) -> None:
    """``ode_fn`` at a time inside the interval, x_o broadcast by closure: torchdiv's exact
    divergence and the parameter gradients of a loss on it against the per-sample trace."""
    estimator = _estimator(kind, net, **kwargs)
    x_o = _observation()
    theta = torch.randn(6, 3, dtype=f64) + 1.0
    t = torch.tensor(0.4, dtype=f64)

    def field(z: torch.Tensor) -> torch.Tensor:
        return estimator.ode_fn(z, x_o, t)

    want = _trace(field, theta)
    # "reverse": the recipe for sbi's dense nets, where "auto"'s columns are slower
    assert_close(torchdiv.divergence(field, theta, method="reverse"), want, rtol=1e-10, atol=1e-10)
    got = torchdiv.divergence(field, theta)
    assert_close(got, want, rtol=1e-10, atol=1e-10)
    params = list(estimator.parameters())
    grads = torch.autograd.grad(got.square().mean(), params, allow_unused=True)
    expected = torch.autograd.grad(want.square().mean(), params, allow_unused=True)
    for g, e, p in zip(grads, expected, params, strict=True):
        zero = torch.zeros_like(p)
        assert_close(zero if g is None else g, zero if e is None else e, rtol=1e-9, atol=1e-10)


def test_per_sample_observations_and_an_ensemble() -> None:
    """Training-style conditions (each theta its own x, through the embedding net) and an
    ensemble (the mean of two estimators' fields, as sbi's ensemble posterior averages)."""
    first, second = _estimator("flow", "mlp"), _estimator("flow", "ada_mlp")
    theta = torch.randn(5, 3, dtype=f64)
    x = _data()[1][:5].to(f64)
    t = torch.tensor(0.7, dtype=f64)

    def ensemble(z: torch.Tensor) -> torch.Tensor:
        return 0.5 * (first.ode_fn(z, x, t) + second.ode_fn(z, x, t))

    def each(z: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        return 0.5 * (first.ode_fn(z[None], xb[None], t) + second.ode_fn(z[None], xb[None], t))[0]

    want = torch.func.vmap(torch.func.jacrev(each))(theta, x).diagonal(0, -2, -1).sum(-1)
    assert_close(torchdiv.divergence(ensemble, theta), want, rtol=1e-10, atol=1e-10)


def _rk4_reference(estimator: nn.Module, theta: torch.Tensor, steps: int) -> torch.Tensor:
    """``log p(theta | x_o)`` by the same rk4 steps with the trace from ``jacrev``: data at
    ``t_min``, base ``N(mean_base, std_base)`` at ``t_max``."""
    from torchdiffeq import odeint

    x_o = _observation()

    def augmented(t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        z = state[0]
        return estimator.ode_fn(z, x_o, t), _trace(lambda w: estimator.ode_fn(w, x_o, t), z)

    times = torch.tensor([estimator.t_min, estimator.t_max], dtype=f64)
    step = (estimator.t_max - estimator.t_min) / steps
    zs, deltas = odeint(augmented, (theta, torch.zeros(len(theta), dtype=f64)), times,
                        method="rk4", options={"step_size": step})  # fmt: skip
    base = torch.distributions.Normal(estimator.mean_base, estimator.std_base)
    return base.log_prob(zs[-1]).sum(-1) + deltas[-1]


def _base(estimator: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    base = torch.distributions.Normal(estimator.mean_base, estimator.std_base)
    return lambda z: base.log_prob(z).sum(-1)


@pytest.mark.parametrize(("kind", "kwargs"), [("flow", {}), ("score", {"sde_type": "vp"})])
def test_log_likelihood_of_sbis_estimator_and_its_gradients(kind: str, kwargs: dict) -> None:
    """``log_likelihood(field, theta, t_max, t_min, base)`` with rk4 against the same steps
    with a ``jacrev`` trace: values and parameter gradients (the NLL of a training step)."""
    estimator = _estimator(kind, "ada_mlp", **kwargs)
    x_o = _observation()
    theta = torch.randn(4, 3, dtype=f64) + 1.0
    steps = 8
    got = torchdiv.flows.log_likelihood(
        lambda t, z: estimator.ode_fn(z, x_o, t), theta, estimator.t_max, estimator.t_min,
        _base(estimator), solver="rk4",
        options={"step_size": (estimator.t_max - estimator.t_min) / steps},
    )  # fmt: skip
    want = _rk4_reference(estimator, theta, steps)
    assert_close(got, want, rtol=1e-10, atol=1e-10)
    params = list(estimator.parameters())
    grads = torch.autograd.grad(-got.mean(), params, allow_unused=True)
    expected = torch.autograd.grad(-want.mean(), params, allow_unused=True)
    for g, e, p in zip(grads, expected, params, strict=True):
        zero = torch.zeros_like(p)
        assert_close(zero if g is None else g, zero if e is None else e, rtol=1e-9, atol=1e-10)


@pytest.mark.slow  # two adaptive solves at 1e-7 (0.3 s)
def test_log_likelihood_equals_sbis_log_prob() -> None:
    """sbi's own log-probability (``ZukoNeuralODE``, what ``posterior.log_prob`` solves) against
    ``log_likelihood``. zuko scales the log-determinant state by 1e-2 inside its adaptive
    solver (its ``trace_scale``: looser tolerance on that term), so the two solves at 1e-7
    agree to about 1e-5, not 1e-7; a divergence with the wrong sign or of the wrong field is
    off by O(1)."""
    from sbi.samplers.ode_solvers import ZukoNeuralODE

    estimator = _estimator("flow", "ada_mlp")
    x_o = _observation()
    theta = torch.randn(5, 3, dtype=f64) + 1.0
    neural_ode = ZukoNeuralODE(
        estimator.ode_fn, estimator.net, estimator.mean_base, estimator.std_base,
        estimator.condition_shape, estimator.t_min, estimator.t_max, atol=1e-7, rtol=1e-7,
    )  # fmt: skip
    want = neural_ode.get_distribution(x_o).log_prob(theta)
    got = torchdiv.flows.log_likelihood(
        lambda t, z: estimator.ode_fn(z, x_o, t), theta, estimator.t_max, estimator.t_min,
        _base(estimator), rtol=1e-7, atol=1e-7,
    )  # fmt: skip
    assert_close(got, want, rtol=1e-4, atol=1e-4)


class BatchNormField(nn.Module):
    """A residual vector-field net with batch norm, passed to sbi as ``net=`` (sbi's
    ``VectorFieldNet`` call ``net(input, condition, t)``; sbi's classifiers take
    ``norm_layer=nn.BatchNorm1d`` the same way)."""

    def __init__(self, features: int = 3, condition: int = 6, hidden: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(features + condition + 1, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, hidden))
            for _ in range(2)
        )
        self.out = nn.Linear(hidden, features)

    def forward(self, input: torch.Tensor, condition: torch.Tensor, t: torch.Tensor):
        time = t.reshape(-1, 1).expand(input.shape[0], 1)
        h = self.inp(torch.cat([input, condition, time], -1))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


@pytest.mark.parametrize("method", ["auto", "hutchinson"])
def test_batch_norm_nets_refused_in_train_mode_passed_in_eval(method: str) -> None:
    estimator = _estimator("flow", BatchNormField())
    x_o = _observation()
    theta = torch.randn(8, 3, dtype=f64)
    t = torch.tensor(0.4, dtype=f64)
    field = lambda z: estimator.ode_fn(z, x_o, t)  # noqa: E731
    kwargs = {"num_probes": 2, "generator": torch.Generator().manual_seed(0)}
    kwargs = kwargs if method == "hutchinson" else {}
    estimator.train()
    with pytest.raises(torchdiv.BatchInteractionError, match="batch norm"):
        torchdiv.divergence(field, theta, method=method, **kwargs)
    estimator.eval()
    got = torchdiv.divergence(field, theta, method=method, **kwargs)
    if method == "auto":
        assert_close(got, _trace(field, theta), rtol=1e-10, atol=1e-10)


def test_hutchinson_is_unbiased_on_sbis_field() -> None:
    """4096 Rademacher probes per sample (seeded): the estimate within 4 of its own standard
    errors of the exact divergence, and the standard error near the probes' spread."""
    estimator = _estimator("score", "mlp", sde_type="ve")
    x_o = _observation()
    theta = torch.randn(6, 3, dtype=f64)
    t = torch.tensor(0.3, dtype=f64)
    field = lambda z: estimator.ode_fn(z, x_o, t)  # noqa: E731
    exact = torchdiv.divergence(field, theta)
    with torch.no_grad():
        est = torchdiv.estimate_divergence(
            field, theta, num_probes=4096, generator=torch.Generator().manual_seed(0)
        )
    z = (est.value - exact) / est.stderr
    assert z.abs().max() < 4, z
    assert (est.stderr > 0).all()
