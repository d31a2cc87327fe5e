"""torchcfm's flow-matching trainers and models, then the learned CNF's likelihood through
torchdyn's ``NeuralODE`` and torchdiffeq on the augmented state ``(x, log p)`` whose dynamics
call ``torchdiv.divergence``, as the users of those libraries write it.

Not a project extra: every test skips without ``torchcfm`` (installed here ``--no-deps`` with
``POT``, which its ``optimal_transport`` imports) or ``torchdyn``; both are imported by
``pytest.importorskip`` before anything of theirs.

References: float64 ``vmap(jacrev)`` per sample (each sample alone, ``t`` its own) for the MLP
fields, the same ODE solved with that divergence for log-likelihoods and their parameter
gradients (``conftest.tolerances``: 1e-10). torchcfm's U-Net runs in float32 only (its
``GroupNorm32`` and time embedding cast to float32): there the reference is the same
``vmap(jacrev)`` in float32, values to 2e-5 and parameter gradients to 2e-5 of their largest
entry (measured 1e-6-6e-6: biases before a group norm have a zero true gradient, so entrywise
relative errors are meaningless there).
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from conftest import (
    assert_close,
    assert_same_parameter_gradients,
    central_difference,
    directional_gradient,
    sampled_daily,
    shifted,
)
from torch import nn
from torch.func import jacrev, vmap

import torchdiv

cfm = pytest.importorskip("torchcfm")
cfm_models = pytest.importorskip("torchcfm.models")
cfm_unet = pytest.importorskip("torchcfm.models.unet")
dyn_core = pytest.importorskip("torchdyn.core")

f64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:Setting tolerances has no effect:UserWarning")


class TorchWrapper(nn.Module):
    """torchcfm's ``torch_wrapper`` (``torchcfm.utils``): ``model(cat([x, t repeated]))`` with
    ``t`` a 0-dim tensor, torchdyn's call signature ``(t, x, *args, **kwargs)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, t, x, *args, **kwargs):
        return self.model(torch.cat([x, t.repeat(x.shape[0])[:, None]], 1))


def per_sample_divergence(field, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``tr d field(t, x_b) / d x_b`` for each sample alone: ``vmap(jacrev)`` over the batch,
    ``t`` the solve's 0-dim time."""
    jac = vmap(jacrev(lambda xb: field(t, xb[None])[0]))(x)
    return jac.reshape(len(x), x[0].numel(), -1).diagonal(dim1=1, dim2=2).sum(-1)


class Likelihood(nn.Module):
    """The augmented dynamics of torchcfm's likelihood notebooks: state ``[x, delta]`` with
    ``d delta / dt = -div v(t, x)``, the divergence by ``divergence(t, x)``."""

    def __init__(self, field: nn.Module, divergence):
        super().__init__()
        self.field, self.divergence = field, divergence

    def forward(self, t, state, *args, **kwargs):
        x = state[:, :-1]
        return torch.cat([self.field(t, x), -self.divergence(t, x)[:, None]], 1)


def train(matcher, model: nn.Module, steps: int = 3, score: nn.Module | None = None) -> None:
    """torchcfm's training loop: ``(t, xt, ut)`` from the matcher, the FM loss (plus the score
    loss for the Schrödinger bridge's ``[SF]2M``), a few Adam steps."""
    gen = torch.Generator().manual_seed(0)
    params = list(model.parameters()) + ([] if score is None else list(score.parameters()))
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        x0 = torch.randn(32, 2, dtype=f64, generator=gen)
        x1 = torch.randn(32, 2, dtype=f64, generator=gen) * 0.3 + 2.0
        if score is None:
            t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
        else:
            t, xt, ut, eps = matcher.sample_location_and_conditional_flow(x0, x1, return_noise=True)
        vt = model(torch.cat([xt, t[:, None]], -1))
        loss = (vt - ut).square().mean()
        if score is not None:
            lam = matcher.compute_lambda(t)[:, None]
            st = score(torch.cat([xt, t[:, None]], -1))
            loss = loss + (lam * st + eps).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def trained_field(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = cfm_models.MLP(dim=2, w=16, time_varying=True).to(f64)
    if kind == "sb":
        score = cfm_models.MLP(dim=2, w=16, time_varying=True).to(f64)
        train(cfm.SchrodingerBridgeConditionalFlowMatcher(sigma=0.5), model, score=score)
    elif kind == "ot":
        train(cfm.ExactOptimalTransportConditionalFlowMatcher(sigma=0.1), model)
    else:
        train(cfm.ConditionalFlowMatcher(sigma=0.1), model)
    return TorchWrapper(model)


def log_p(node, x: torch.Tensor) -> torch.Tensor:
    """``log p_1(x)``: the augmented state from data (t = 1) back to the base (t = 0),
    rk4 in 8 steps, standard normal base."""
    state = torch.cat([x, torch.zeros(len(x), 1, dtype=x.dtype)], 1)
    _, trajectory = node(state, torch.linspace(1, 0, 9, dtype=x.dtype))
    z, delta = trajectory[-1][:, :-1], trajectory[-1][:, -1]
    return -0.5 * z.square().sum(1) - math.log(2 * math.pi) - delta


SOLVES = [f"{k}/{s}" for k in ("cfm", "ot", "sb") for s in ("autograd", "adjoint")]


@pytest.mark.parametrize(
    "case", sampled_daily(SOLVES, set(SOLVES) - {"cfm/autograd", "sb/adjoint"})
)
def test_trained_field_likelihood_through_torchdyn(case):
    """torchdiv's exact divergence in torchdyn's ``NeuralODE`` on a field trained by each
    torchcfm matcher: log-likelihoods and their parameter gradients (maximum likelihood) equal
    the same solve with the per-sample ``jacrev`` divergence."""
    kind, sensitivity = case.split("/")
    field = trained_field(kind)
    x = torch.randn(5, 2, dtype=f64, generator=torch.Generator().manual_seed(1)) + 1.0

    def ours(t, x):
        return torchdiv.divergence(lambda z: field(t, z), x)

    results = []
    for divergence in (ours, lambda t, x: per_sample_divergence(field, t, x)):
        node = dyn_core.NeuralODE(Likelihood(field, divergence), "rk4", sensitivity=sensitivity)
        value = log_p(node, x)
        results.append((value, torch.autograd.grad(-value.mean(), list(field.parameters()))))
    (got, grads), (want, expected) = results
    assert_close(got, want)
    for g, e in zip(grads, expected, strict=True):
        assert_close(g, e)


def probe_divergence(field, probes: torch.Tensor):
    """``mean_k v_k^T J v_k`` per sample with ``J`` from ``per_sample_divergence``'s
    ``vmap(jacrev)``: Hutchinson's estimate for the given probes ``(K, B, D)``."""

    def divergence(t, x):
        jac = vmap(jacrev(lambda xb: field(t, xb[None])[0]))(x)
        return torch.einsum("kbi,bij,kbj->b", probes, jac, probes) / len(probes)

    return divergence


@pytest.mark.parametrize("batch", [1, pytest.param(4, marks=pytest.mark.slow)])
def test_hutchinson_with_given_probes_in_torchdyn(batch):
    """The FFJORD estimator with probes fixed for the solve (torchcfm's notebooks draw them
    once): equal to the ``jacrev`` quadratic forms in the same solve, with the gradients."""
    field = trained_field("cfm")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 2, dtype=f64, generator=gen)
    probes = torch.randn(3, batch, 2, dtype=f64, generator=gen)

    def ours(t, x):
        return torchdiv.divergence(lambda z: field(t, z), x, method="hutchinson", probes=probes)

    results = []
    for divergence in (ours, probe_divergence(field, probes)):
        node = dyn_core.NeuralODE(Likelihood(field, divergence), "rk4")
        value = log_p(node, x)
        results.append((value, torch.autograd.grad(value.sum(), list(field.parameters()))))
    (got, grads), (want, expected) = results
    assert_close(got, want)
    for g, e in zip(grads, expected, strict=True):
        assert_close(g, e)


def test_log_likelihood_of_the_wrapped_field():
    """``torchdiv.flows.log_likelihood`` on the ``torch_wrapper`` field itself (t a 0-dim
    tensor, as torchdiffeq passes it) and torchdiffeq's ``odeint`` of the augmented state with
    the ``jacrev`` divergence: the same rk4 steps (torchdiffeq's, the 3/8 rule: torchdyn's
    ``"rk4"`` is the classic one), the same log-likelihood and parameter gradients."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    from torchdiv.flows import log_likelihood

    field = trained_field("ot")
    x = torch.randn(4, 2, dtype=f64, generator=torch.Generator().manual_seed(4))
    params = list(field.parameters())
    got = log_likelihood(
        field,
        x,
        0.0,
        1.0,
        lambda z: -0.5 * z.square().sum(1) - math.log(2 * math.pi),
        solver="rk4",
        options={"step_size": 0.125},
    )
    dynamics = Likelihood(field, lambda t, x: per_sample_divergence(field, t, x))
    state = torch.cat([x, torch.zeros(len(x), 1, dtype=f64)], 1)
    end = torchdiffeq.odeint(dynamics, state, torch.linspace(1, 0, 9, dtype=f64), method="rk4")[-1]
    want = -0.5 * end[:, :-1].square().sum(1) - math.log(2 * math.pi) - end[:, -1]
    assert_close(got, want)
    for g, e in zip(
        torch.autograd.grad(got.sum(), params), torch.autograd.grad(want.sum(), params), strict=True
    ):
        assert_close(g, e)


@pytest.mark.parametrize("time", ["float", "0-dim", "(B,)", "(B, 1)"])
@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
def test_time_as_the_users_pass_it(time, method):
    """The MLP with time input called with ``t`` as a Python float, a 0-dim tensor, a ``(B,)``
    tensor of per-sample times and a ``(B, 1)`` column, concatenated inside ``f``."""
    torch.manual_seed(0)
    model = cfm_models.MLP(dim=3, w=16, time_varying=True).to(f64).train()
    x = torch.randn(4, 3, dtype=f64)
    times = torch.rand(4, dtype=f64)
    t = {"float": 0.3, "0-dim": times[0], "(B,)": times, "(B, 1)": times[:, None]}[time]

    def f(z):
        column = torch.as_tensor(t, dtype=z.dtype).reshape(-1, 1).expand(len(z), 1)
        return model(torch.cat([z, column], 1))

    got = torchdiv.divergence(f, x, method=method)
    per_time = torch.as_tensor(t, dtype=f64).reshape(-1).expand(4)
    jac = vmap(jacrev(lambda xb, tb: model(torch.cat([xb, tb[None]])[None])[0]))(x, per_time)
    want = jac.diagonal(dim1=1, dim2=2).sum(-1)
    assert_close(got, want)
    assert_same_parameter_gradients(model, got.square().sum(), want.square().sum())


@pytest.mark.parametrize(
    "method", sampled_daily(["auto", "forward", "reverse", "hutchinson"], {"forward", "reverse"})
)
def test_likelihood_gradient_against_central_differences(method):
    """The maximum-likelihood gradient of the Schrödinger-bridge field (SELU MLP) through
    torchdyn's solve, along a random direction in parameter space, against float64 central
    differences of the log-likelihood (independent of PyTorch's second-derivative formulas,
    which the ``jacrev`` references share). SELU's derivative jumps at 0 (``scale`` to
    ``scale * alpha``), so the divergence, and the rk4 sum of it, jumps where a step moves a
    pre-activation across 0: the direction is scaled by 1e-3, steps of 3e-7, where none
    crosses (at 1e-4 the differences were 2-400% off for every method); round-off then
    ``eps |log p| / 3e-7 |d log p|`` ~ 1e-9 relative."""
    field = trained_field("sb")
    params = list(field.parameters())
    gen = torch.Generator().manual_seed(5)
    directions = [1e-3 * torch.randn(p.shape, dtype=f64, generator=gen) for p in params]
    x = torch.randn(4, 2, dtype=f64, generator=gen) * 2
    options = {"probes": torch.randn(2, 4, 2, dtype=f64, generator=gen)}

    def divergence(t, x):
        kwargs = options if method == "hutchinson" else {}
        return torchdiv.divergence(lambda z: field(t, z), x, method=method, **kwargs)

    node = dyn_core.NeuralODE(Likelihood(field, divergence), "rk4")

    def shifted_log_p(step: float) -> torch.Tensor:
        with shifted(params, directions, step), torch.no_grad():
            return log_p(node, x).sum()

    want = central_difference(shifted_log_p).item()
    assert directional_gradient(log_p(node, x), params, directions) == pytest.approx(want, rel=1e-7)


UNETS = {
    "attention": {},
    "scale-shift, new attention order, up/down res-blocks": {
        "use_scale_shift_norm": True,
        "use_new_attention_order": True,
        "resblock_updown": True,
    },
    "odd 3x3": {"dim": (1, 3, 3), "channel_mult": (1,), "attention_resolutions": "3"},
    "class-conditional, two channels": {"dim": (2, 4, 4), "class_cond": True, "num_classes": 3},
}


def unet(**options) -> nn.Module:
    """torchcfm's ``UNetModel`` (the wrapper taking ``dim=(C, H, W)``), small: 4x4 images,
    32 channels (its group norms take 32 groups), one res-block per level, attention at the
    2x2 level;
    the zero-initialised output convolutions (``zero_module``) drawn afresh, else every
    Jacobian would be 0."""
    torch.manual_seed(0)
    args = {
        "dim": (1, 4, 4),
        "num_channels": 32,
        "num_res_blocks": 1,
        "channel_mult": (1, 2),
        "attention_resolutions": "2",
        "num_heads": 2,
    }
    model = cfm_unet.UNetModel(**{**args, **options})
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.05)
    return model


def unet_reference(model, t: torch.Tensor, x: torch.Tensor, y=None) -> torch.Tensor:
    """Each sample's divergence alone: ``vmap(jacrev)`` over ``(x_b, t_b, y_b)``."""

    def one(xb, tb, yb):
        return model(tb[None], xb[None], None if yb is None else yb[None])[0]

    jac = vmap(jacrev(one), in_dims=(0, 0, None if y is None else 0))(x, t, y)
    return jac.reshape(len(x), x[0].numel(), -1).diagonal(dim1=1, dim2=2).sum(-1)


def assert_close_to_largest(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """Float32 gradients agree to 2e-5 of the largest reference entry (see the docstring)."""
    scale = max(w.abs().max() for w in want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=2e-5 * scale)


UNET_CASES = [f"{name}/{batch}" for name in UNETS for batch in (1, 3)]


@pytest.mark.parametrize(
    "case", sampled_daily(UNET_CASES, set(UNET_CASES) - {"attention/3", "odd 3x3/1"})
)
def test_unet_auto_divergence(case):
    """``"auto"`` on torchcfm's U-Net (group norms, attention over positions, the sinusoidal
    time embedding, skip concatenations) with ``t`` 0-dim (repeated inside) or per sample,
    batch of 1 (``t`` 0-dim) or 3 (``t`` per sample), train mode (dropout 0): per-sample
    values and parameter gradients."""
    name, batch = case.rsplit("/", 1)
    batch, time = int(batch), "0-dim" if batch == "1" else "(B,)"
    model = unet(**UNETS[name]).train()
    gen = torch.Generator().manual_seed(1)
    c, h, w = UNETS[name].get("dim", (1, 4, 4))
    x = torch.randn(batch, c, h, w, generator=gen)
    times = torch.rand(batch, generator=gen)
    t = times[0] if time == "0-dim" else times
    y = torch.arange(batch) % 3 if UNETS[name].get("class_cond") else None
    got = torchdiv.divergence(lambda z: model(t, z, y), x)
    want = unet_reference(model, t.expand(batch), x, y)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    params = list(model.parameters())
    grads = [parameter_grads(d.square().sum(), params) for d in (got, want)]
    assert_close_to_largest(*grads)


def parameter_grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def test_unet_dropout_in_train_mode_is_one_mask():
    """Dropout in train mode: the divergence of the function with the call's one dropout mask
    (each Jacobian row by a backward pass of a forward under the same seed)."""
    model = unet(dim=(1, 4, 4), channel_mult=(1,), dropout=0.3).train()
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.2, 0.7])
    leaf = x.clone().requires_grad_(True)
    want = torch.zeros(2)
    for i in range(16):
        torch.manual_seed(5)
        out = model(t, leaf).reshape(2, -1)
        want += torch.autograd.grad(out[:, i].sum(), leaf)[0].reshape(2, -1)[:, i]
    torch.manual_seed(5)
    got = torchdiv.divergence(lambda z: model(t, z), x)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_unet_gradient_checkpoint_values_and_refused_gradients():
    """``use_checkpoint=True`` runs guided diffusion's ``CheckpointFunction``, whose backward
    calls ``autograd.grad`` without a graph: the divergence's value is right, its parameter
    gradient would miss the blocks' part, so differentiating it raises."""
    plain, checkpointed = unet(), unet(use_checkpoint=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.2, 0.7])
    got = torchdiv.divergence(lambda z: checkpointed(t, z), x)
    torch.testing.assert_close(got, unet_reference(plain, t, x), rtol=2e-5, atol=2e-5)
    with pytest.raises(RuntimeError, match="CheckpointFunction"):
        got.sum().backward()


class GraphTraceDynamics(nn.Module):
    """The augmented dynamics of CNF notebooks that sample under ``no_grad``: the state made
    to require grad inside ``set_grad_enabled(True)``, the velocity computed once, its trace
    read from that graph (``torchdiv.graph_divergence``)."""

    def __init__(self, field: nn.Module):
        super().__init__()
        self.field = field

    def forward(self, t, state, *args, **kwargs):
        x = state[:, :-1]
        with torch.set_grad_enabled(True):
            x.requires_grad_(True)
            v = self.field(t, x)
            divergence = torchdiv.graph_divergence(v, x)
        return torch.cat([v, -divergence[:, None]], 1)


def test_graph_trace_under_inference_mode_names_it():
    """Under ``no_grad`` the graph form works as in training; under ``torch.inference_mode()``
    no graph is recorded even inside ``set_grad_enabled(True)``: the error names inference
    mode and the function form (which works there), not a ``y`` computed from a copy of
    ``x`` as it did; so does the error where ``y`` was computed under ``no_grad``."""
    field = trained_field("cfm")
    x = torch.randn(3, 2, dtype=f64, generator=torch.Generator().manual_seed(6))
    node = dyn_core.NeuralODE(GraphTraceDynamics(field), "rk4")
    with torch.no_grad():
        got = log_p(node, x)
    want = log_p(
        dyn_core.NeuralODE(Likelihood(field, partial(per_sample_divergence, field)), "rk4"), x
    )
    assert_close(got, want)
    with torch.inference_mode(), pytest.raises(ValueError, match=r"inference_mode.*\(f, x\)"):
        log_p(node, x)

    def graph_trace(t, x):  # without set_grad_enabled(True): under no_grad, no graph
        x.requires_grad_(True)
        return torchdiv.graph_divergence(field(t, x), x)

    without_grad = dyn_core.NeuralODE(Likelihood(field, graph_trace), "rk4")
    with torch.no_grad(), pytest.raises(ValueError, match=r"no_grad.*enable_grad.*\(f, x\)"):
        log_p(without_grad, x)
    with torch.inference_mode():
        function_form = log_p(
            dyn_core.NeuralODE(
                Likelihood(field, lambda t, x: torchdiv.divergence(partial(field, t), x)), "rk4"
            ),
            x,
        )
    assert_close(function_form, want)
