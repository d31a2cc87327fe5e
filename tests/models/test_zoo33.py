"""Normalizing-flow and invertible-network libraries as their users use them (zoo33).

Pyro's ``pyro.distributions.transforms`` (planar, radial, Householder, block and neural
autoregressive, affine and spline autoregressive and coupling transforms over
``AutoRegressiveNN``/``DenseNN``, their conditional versions, ``TransformedDistribution``
log-densities as score models, ``DenseNN`` velocity fields in ``AugmentedDynamics``), FrEIA's
``SequenceINN`` (``AllInOneBlock``, ``GLOWCouplingBlock``, ``RNVPCouplingBlock``,
``PermuteRandom``, ``Fixed1x1Conv``, ``IRevNetDownsampling``, ``HaarDownsampling``, conv
subnets on images, and ``ActNorm``, which initialises from the first batch it sees) and
``torch.distributions.transforms`` composed.

References, independent of torchdiv: each sample's block of the whole batch's Jacobian by
plain ``autograd.grad`` one output element at a time (mixing would show there), the
libraries' own log-determinants, Laplacians by grad of grad, and parameter gradients of
losses built from them (``create_graph``). A model state the first call changes (ActNorm)
is compared with a copy initialised by one plain forward.

Two faults found here (both with plain-torch models in FrEIA's style below, which always run):
``check_batch_independence`` put an ActNorm's parameters back but not its plain flag
(``init_on_next_batch``), so the layer never initialised afterwards, silently; and a
refusal's recording (``"forward"``/``"reverse"`` refusing the write) left the parameters
initialised through ``.data.view(-1)[:] = ...`` with the flag put back.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    assert_close,
    assert_same_parameter_gradients,
    parameter_gradients,
    sampled_daily,
)
from torch import nn
from torch.distributions import transforms as tdt

import torchdiv
import torchdiv.flows
from torchdiv._taylor.jet import UnsupportedOp

try:  # the ``models`` extra; the FrEIA-style and torch.distributions tests run without them
    import pyro.distributions as pyro_dist
    import pyro.distributions.transforms as T
    from pyro.nn import DenseNN
except ImportError:
    pyro_dist = T = DenseNN = None
try:
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm
    from FrEIA.modules import IResNetLayer as FrEIAIResNet
except ImportError:
    Ff = Fm = FrEIAIResNet = None

needs_pyro = pytest.mark.skipif(T is None, reason="pyro-ppl is not installed")
needs_freia = pytest.mark.skipif(Fm is None, reason="FrEIA is not installed")

f64 = torch.float64
METHODS = ["auto", "forward", "reverse"]
D = 4


def _perturbed(module: nn.Module, scale: float = 0.3, seed: int = 1) -> nn.Module:
    """Trainable parameters moved off their initial values (which often make the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _blocks(f, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """Each sample's block ``d f(x)[b] / d x[b]`` of the whole batch's Jacobian, ``(B, m, n)``,
    by one ``autograd.grad`` per output element of the batch."""
    leaf = x.detach().clone().requires_grad_(True)
    y = f(leaf).reshape(len(x), -1)
    rows = [
        torch.autograd.grad(y[b, i], leaf, retain_graph=True, create_graph=create_graph)[0][b]
        for b in range(len(x))
        for i in range(y.shape[1])
    ]
    return torch.stack(rows).reshape(len(x), y.shape[1], -1)


def _inputs(batch: int = 5, shape: tuple[int, ...] = (D,), seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 1.5 * torch.randn(batch, *shape, dtype=f64, generator=g)


def _assert_operators(f, x: torch.Tensor, method: str, params: list[torch.Tensor]) -> None:
    """Jacobian, divergence and diagonal by ``method`` are the blocks'; a loss of the
    divergence and the Jacobian's ``slogdet`` has the blocks' parameter gradients."""
    want = _blocks(f, x, create_graph=True)
    n = want.shape[-1]
    jac = torchdiv.jacobian(f, x, method=method).reshape(len(x), n, n)
    div = torchdiv.divergence(f, x, method=method)
    diag = torchdiv.jacobian_diagonal(f, x, method=method).reshape(len(x), n)
    assert_close(jac, want.detach())
    assert_close(div, want.detach().diagonal(0, 1, 2).sum(-1))
    assert_close(diag, want.detach().diagonal(0, 1, 2))
    weights = torch.linspace(0.5, 1.5, len(x), dtype=f64)

    def loss(j: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return (weights * d).square().sum() + torch.linalg.slogdet(j)[1].sum()

    got = torch.autograd.grad(loss(jac, div), params, allow_unused=True)
    ref = loss(want, want.diagonal(0, 1, 2).sum(-1))
    expected = torch.autograd.grad(ref, params, allow_unused=True)
    for a, b, p in zip(got, expected, params, strict=True):
        zero = torch.zeros_like(p)
        # float64, gradients up to ~1e2 through splines' divisions: 1e-10 relative
        torch.testing.assert_close(
            zero if a is None else a, zero if b is None else b, rtol=1e-9, atol=1e-9
        )


# ------------------------------------------------------------------ FrEIA's style, always run


class FrEIAStyleActNorm(nn.Module):
    """FrEIA 0.2's ``ActNorm`` (its math and its writes): on the first batch, the scale and
    then the shift written through views of the parameters' ``.data``, a plain flag reset."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(1, features, dtype=f64))
        self.bias = nn.Parameter(torch.zeros(1, features, dtype=f64))
        self.init_on_next_batch = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.init_on_next_batch:
            self.scale.data.view(-1)[:] = torch.log(1 / x.transpose(0, 1).std(dim=-1))
            data = x * self.scale.exp()
            self.bias.data.view(-1)[:] = -data.transpose(0, 1).mean(dim=-1)
            self.init_on_next_batch = False
        return x * self.scale.exp() + self.bias


def _style_flow() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(FrEIAStyleActNorm(D), nn.Linear(D, D).double(), nn.Tanh())


def _uninitialised(flow: nn.Module) -> bool:
    """Every ActNorm of ``flow`` as made: its flag set, its parameters zero."""
    norms = [m for m in flow.modules() if hasattr(m, "init_on_next_batch")]
    assert norms
    return all(
        m.init_on_next_batch and not m.scale.any() and not m.bias.any()  # type: ignore[union-attr]
        for m in norms
    )


def test_check_batch_independence_leaves_an_actnorm_uninitialised() -> None:
    """The check evaluates ``f`` once and puts back what it changed: an ActNorm's parameters
    and its plain flag both. (Its flag stayed reset while its parameters went back to zero,
    so the layer never initialised from the data afterwards: an identity, silently.) The
    first plain forward after the check then initialises it as on a fresh model."""
    flow, fresh = _style_flow(), _style_flow()
    x = 2.0 * _inputs() + 1.0
    torchdiv.check_batch_independence(flow, x)
    assert _uninitialised(flow)
    assert_close(flow(x), fresh(x))
    assert not flow[0].init_on_next_batch


@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_a_refused_actnorm_write_leaves_the_model_as_found(method: str) -> None:
    """``"forward"``/``"reverse"`` refuse FrEIA's write of the first batch's statistics
    (values computed from ``x``, which ``torch.func``'s transforms forbid), naming the way out;
    the recording that looks for sample mixing in the refusal put the flag back but left the
    parameters initialised (written through ``.data.view(-1)[:]``, unseen by its undo).
    ``"auto"`` then initialises once, as a plain forward does."""
    flow, once = _style_flow(), _style_flow()
    x = 2.0 * _inputs() + 1.0
    with pytest.raises(RuntimeError, match=r"parameter's \.data.*call f\(x\) once before"):
        torchdiv.divergence(flow, x, method=method)
    assert _uninitialised(flow)
    div = torchdiv.divergence(flow, x)
    assert_close(div, _blocks(once, x).diagonal(0, 1, 2).sum(-1))
    assert not _uninitialised(flow)
    assert_close(flow[0].scale, once[0].scale)


# ------------------------------------------------------------------ torch.distributions


_TORCH_TRANSFORMS = {
    "affine-sigmoid": lambda: tdt.ComposeTransform(
        [
            tdt.AffineTransform(0.5, torch.tensor([0.5, 2.0, -1.0, 1.5], dtype=f64)),
            tdt.SigmoidTransform(),
            tdt.AffineTransform(-1.0, 3.0),
        ]
    ),
    "tanh-power": lambda: tdt.ComposeTransform(
        [tdt.TanhTransform(), tdt.AffineTransform(1.5, 1.0), tdt.PowerTransform(1.7)]
    ),
    "exp-cache": lambda: tdt.ComposeTransform(
        [tdt.ExpTransform(cache_size=1), tdt.AffineTransform(0.0, 0.5, cache_size=1)],
        cache_size=1,
    ),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(_TORCH_TRANSFORMS))
def test_torch_distributions_composed_transforms(name: str, method: str) -> None:
    """Elementwise composed transforms: the diagonal is the blocks', its ``log|.|`` summed is
    the transform's own ``log_abs_det_jacobian``; a cached transform called on ``x`` before
    the call (its cache holding ``x``) gives the same."""
    t = _TORCH_TRANSFORMS[name]()
    x = _inputs()
    y = t(x)
    diag = torchdiv.jacobian_diagonal(t, x, method=method)
    assert_close(diag, _blocks(t, x).diagonal(0, 1, 2))
    assert_close(diag.abs().log(), t.log_abs_det_jacobian(x, y))
    assert_close(t(x), y)


@pytest.mark.parametrize("method", METHODS)
def test_stick_breaking_and_corr_cholesky_jacobians(method: str) -> None:
    """Non-square maps: ``StickBreakingTransform`` (R^3 -> the simplex in R^4) and
    ``CorrCholeskyTransform`` (R^3 -> 3x3 Cholesky factors of correlations), Jacobians shaped
    ``(B,) + out + in``; stick breaking's log-det is that of its first three outputs."""
    x = 0.7 * _inputs(shape=(3,))
    stick = tdt.StickBreakingTransform()
    jac = torchdiv.jacobian(stick, x, method=method)
    assert jac.shape == (5, 4, 3)
    assert_close(jac, _blocks(stick, x))
    assert_close(torch.linalg.slogdet(jac[:, :3])[1], stick.log_abs_det_jacobian(x, stick(x)))
    corr = tdt.CorrCholeskyTransform()
    jac = torchdiv.jacobian(corr, x, method=method)
    assert jac.shape == (5, 3, 3, 3)
    assert_close(jac.reshape(5, 9, 3), _blocks(corr, x))


# ------------------------------------------------------------------ Pyro

_CONTEXT = torch.randn(5, 3, dtype=f64, generator=torch.Generator().manual_seed(11))

# Pyro's transforms of vectors, ``t(x)``, with ``t.log_abs_det_jacobian(x, y)``
_PYRO = {
    "planar": lambda: T.Planar(D),
    "radial": lambda: T.Radial(D),
    "householder": lambda: T.Householder(D, count_transforms=2),
    "block-autoregressive": lambda: T.BlockAutoregressive(D, residual="gated"),
    "affine-autoregressive": lambda: T.affine_autoregressive(D, hidden_dims=[16]),
    "affine-autoregressive-stable": lambda: T.affine_autoregressive(
        D, hidden_dims=[16], stable=True
    ),
    "neural-autoregressive": lambda: T.neural_autoregressive(D, hidden_dims=[16]),
    "affine-coupling": lambda: T.affine_coupling(D, hidden_dims=[16]),
    "spline-coupling": lambda: T.spline_coupling(D, hidden_dims=[16]),
    "spline-autoregressive": lambda: T.spline_autoregressive(D, hidden_dims=[16], count_bins=4),
    "polynomial": lambda: T.polynomial(D),
    "conditional-planar": lambda: T.conditional_planar(D, 3),
    "conditional-affine-autoregressive": lambda: T.conditional_affine_autoregressive(
        D, 3, hidden_dims=[16]
    ),
    "conditional-spline": lambda: T.conditional_spline(D, 3, count_bins=4),
}
# Pyro's own log-dets of these carry its clamps (``eps = 1e-8`` inside logs and divisions)
_CLAMPED = {"block-autoregressive", "neural-autoregressive", "polynomial"}
# piecewise-rational splines: ``outputs = numerator / denominator`` then ``outputs[mask] =
# inputs[mask]``; forward mode's tangent saved the quotient, which the write changes, and
# the parameter gradients of its result raise PyTorch's "modified by an inplace operation"
# (``torch.func.jvp`` alone raises alike: left alone, ``"auto"`` and ``"reverse"`` are right)
_SPLINES = {"spline-coupling", "spline-autoregressive", "conditional-spline"}


def _pyro(name: str):
    torch.manual_seed(0)
    t = _perturbed(_PYRO[name]().double())
    if name.startswith("conditional"):
        return t, lambda z: t.condition(_CONTEXT[: len(z)])(z)
    return t, t


@needs_pyro
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "name",
    sampled_daily(
        list(_PYRO),
        {
            "planar",
            "householder",
            "block-autoregressive",
            "affine-coupling",
            "spline-coupling",
            "conditional-affine-autoregressive",
        },
    ),
)
def test_a_pyro_transform(name: str, method: str) -> None:
    """Jacobian, divergence and diagonal, with parameter gradients, against the blocks; the
    Jacobian's ``slogdet`` is Pyro's ``log_abs_det_jacobian``."""
    t, f = _pyro(name)
    x = _inputs()
    params = list(t.parameters())
    if method == "forward" and name in _SPLINES:
        want = _blocks(f, x)
        jac = torchdiv.jacobian(f, x, method=method)
        assert_close(jac, want)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(jac.diagonal(0, 1, 2).sum(), params)
        return
    _assert_operators(f, x, method, params)
    own = t.condition(_CONTEXT)(x) if name.startswith("conditional") else t(x)
    log_det = (t.condition(_CONTEXT) if name.startswith("conditional") else t).log_abs_det_jacobian(
        x, own
    )
    log_det = log_det.sum(-1) if log_det.shape == x.shape else log_det
    jac = torchdiv.jacobian(f, x, method=method)
    scale = 1e4 if name in _CLAMPED else 1.0  # (Pyro's eps: measured up to 1.3e-7 off)
    assert_close(torch.linalg.slogdet(jac)[1], log_det, scale=scale)


@needs_pyro
def test_a_pyro_transform_called_before_and_after() -> None:
    """Pyro's transforms cache ``(x, y)`` of their last call (``cache_size=1``) and the
    log-det computed there: a call after the user's own ``y = t(x)`` differentiates ``t``, not
    the cache, and the user's later ``t(x)``, ``log_abs_det_jacobian`` and their parameter
    gradients are those of an untouched copy."""
    t, _ = _pyro("planar")
    ref = copy.deepcopy(t)
    x = _inputs()
    t(x)
    div = torchdiv.divergence(t, x)
    assert_close(div, _blocks(ref, x).diagonal(0, 1, 2).sum(-1))
    y, y_ref = t(x), ref(x)
    assert_close(y, y_ref)
    log_det, log_det_ref = t.log_abs_det_jacobian(x, y), ref.log_abs_det_jacobian(x, y_ref)
    assert_close(log_det, log_det_ref)
    got = torch.autograd.grad(log_det.sum() + y.sum(), list(t.parameters()))
    want = torch.autograd.grad(log_det_ref.sum() + y_ref.sum(), list(ref.parameters()))
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)


@needs_pyro
def test_a_score_model_at_samples_the_flow_just_drew() -> None:
    """``y = dist.rsample()`` leaves ``(x_base, y)`` in the coupling's cache, which
    ``log_prob(y)`` reads when given that very ``y`` (``transform.inv``: no inverse pass, a
    graph to ``x_base``). The calls evaluate ``log_prob`` at their own tensors: the Laplacian
    by every method, ``value_grad_laplacian`` and the inverse's divergence are those at ``y``."""
    module, log_prob = _log_density("affine-coupling")
    (t,) = module
    base = pyro_dist.Normal(torch.zeros(D, dtype=f64), torch.ones(D, dtype=f64)).to_event(1)
    flow = pyro_dist.TransformedDistribution(base, [t])
    torch.manual_seed(1)
    y = flow.rsample((5,))
    want, _ = _laplacian_reference(log_prob, y)
    want_inverse = _blocks(t.inv, y).diagonal(0, 1, 2).sum(-1)
    for method in _LAPLACIANS:
        torch.manual_seed(1)
        y = flow.rsample((5,))  # (the cache holds this y)
        # float64; log-densities' Laplacians ~1e3 here: 1e-13 relative
        torch.testing.assert_close(
            torchdiv.laplacian(flow.log_prob, y, method=method),
            want.detach(),
            rtol=1e-12,
            atol=1e-10,
        )
    torch.testing.assert_close(
        torchdiv.value_grad_laplacian(flow.log_prob, y).laplacian,
        want.detach(),
        rtol=1e-12,
        atol=1e-10,
    )
    for method in ["auto", "forward", "reverse", "structured"]:
        assert_close(torchdiv.divergence(t.inv, y, method=method), want_inverse)


def _log_density(name: str):
    torch.manual_seed(0)
    transforms = {
        "affine-coupling": lambda: [T.affine_coupling(D, hidden_dims=[16])],
        "householder": lambda: [T.Householder(D, count_transforms=2)],
        "spline": lambda: [T.Spline(D, count_bins=6)],
        "composed": lambda: [
            T.ComposeTransformModule(
                [
                    T.affine_coupling(D, hidden_dims=[16]),
                    T.Permute(torch.tensor([3, 1, 0, 2])),
                    T.Householder(D, count_transforms=1),
                    T.affine_coupling(D, hidden_dims=[16]),
                ]
            )
        ],
    }[name]()
    module = nn.ModuleList([_perturbed(t.double()) for t in transforms])
    base = pyro_dist.Normal(torch.zeros(D, dtype=f64), torch.ones(D, dtype=f64)).to_event(1)
    return module, pyro_dist.TransformedDistribution(base, list(module)).log_prob


def _laplacian_reference(f, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(leaf).sum(), leaf, create_graph=True)
    rows = [torch.autograd.grad(g[:, i].sum(), leaf, create_graph=True)[0][:, i] for i in range(D)]
    return torch.stack(rows, 1).sum(1), g


_LAPLACIANS = ["auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad"]


@needs_pyro
@pytest.mark.parametrize("name", ["affine-coupling", "householder", "spline", "composed"])
def test_a_pyro_log_density_laplacian(name: str) -> None:
    """The Laplacian of ``TransformedDistribution.log_prob`` (the inverse pass: a score
    model's divergence) by every method and ``value_grad_laplacian``, with the parameter
    gradients of a loss, against grad of grad. A spline's index writes have no Taylor
    rule: ``"taylor"`` refuses by name, ``"auto"`` falls back."""
    module, f = _log_density(name)
    x = _inputs()
    params = list(module.parameters())
    want, grad = _laplacian_reference(f, x)
    weights = torch.linspace(0.5, 1.5, len(x), dtype=f64)
    expected = torch.autograd.grad((weights * want).square().sum(), params, retain_graph=True)
    for method in _LAPLACIANS:
        if name == "spline" and method == "taylor":
            with pytest.raises(UnsupportedOp, match=r"taylor.*fill_"):
                torchdiv.laplacian(f, x, method=method)
            continue
        lap = torchdiv.laplacian(f, x, method=method)
        assert_close(lap, want.detach())
        got = torch.autograd.grad((weights * lap).square().sum(), params)
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)  # (float64; grads ~1e2)
    for method in ["auto", "forward-over-reverse"] + ([] if name == "spline" else ["taylor"]):
        both = torchdiv.value_grad_laplacian(f, x, method=method)
        assert_close(both.value, f(x).detach())
        assert_close(both.gradient, grad.detach())
        assert_close(both.laplacian, want.detach())


@needs_pyro
def test_a_pyro_dense_nn_velocity_in_augmented_dynamics() -> None:
    """A CNF's velocity from Pyro's ``DenseNN`` (time as an input), inside
    ``AugmentedDynamics``, exact and with fixed probes: ``(f, -div f)`` and its parameter
    gradients against the blocks and the probes' quadratic forms."""
    torch.manual_seed(0)
    net = _perturbed(DenseNN(D + 1, [16, 16], param_dims=[D]).double())

    def velocity(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return net(torch.cat([z, t.expand(len(z), 1)], 1))

    x, t = _inputs(), torch.tensor(0.3, dtype=f64)
    want = _blocks(lambda z: velocity(t, z), x, create_graph=True)
    dynamics = torchdiv.flows.AugmentedDynamics(velocity, x)
    v, terms = dynamics(t, dynamics.initial_state(x))
    assert_close(v, velocity(t, x).detach())
    assert_close(terms[0], -want.detach().diagonal(0, 1, 2).sum(-1))
    assert_same_parameter_gradients(
        net, terms.square().sum(), want.diagonal(0, 1, 2).sum(-1).square().sum()
    )
    probes = torchdiv.draw_probes(x, 3, generator=torch.Generator().manual_seed(5))
    dynamics = torchdiv.flows.AugmentedDynamics(
        velocity, x, method="hutchinson", num_probes=3, probes=probes
    )
    _, terms = dynamics(t, dynamics.initial_state(x))
    forms = torch.einsum("kbi,bij,kbj->kb", probes, want, probes)
    assert_close(terms, -forms.detach())
    assert_same_parameter_gradients(net, terms.square().sum(), forms.square().sum())


@needs_pyro
def test_a_pyro_batch_norm_in_training() -> None:
    """Pyro's ``BatchNorm`` in training mode: its forward uses the moving statistics (no
    mixing: right, by every method), its inverse the batch's (``y.mean(0)``): ``"auto"``
    refuses the inverse by name, with the moving statistics as found."""
    torch.manual_seed(0)
    bn = _perturbed(T.BatchNorm(D).double()).train()
    x = _inputs()
    for method in METHODS:
        assert_close(
            torchdiv.divergence(bn, x, method=method), _blocks(bn, x).diagonal(0, 1, 2).sum(-1)
        )
    mean = bn.moving_mean.clone()
    with pytest.raises(torchdiv.BatchInteractionError, match="mean over samples"):
        torchdiv.divergence(bn.inv, x)
    assert torch.equal(bn.moving_mean, mean)


class _TimeConditioned(nn.Module):
    """``f(t, z) = net([z, t])``: a CNF's velocity from a Pyro ``DenseNN``, as a module
    (``odeint_adjoint`` takes the parameters of the module it is given)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, t.expand(len(z), 1)], 1))


@needs_pyro
@pytest.mark.slow  # (7 s on 2 cores: 6 solves, each differentiated)
def test_pyro_nets_as_cnf_velocities_in_log_likelihood() -> None:
    """``log_likelihood`` of a CNF whose velocity is a Pyro ``DenseNN`` (time as an input) and
    of one built on a masked ``AutoRegressiveNN`` with skip connections (a triangular
    Jacobian), by fixed-step RK4: values and parameter gradients against the same solve of
    the augmented ODE whose divergence is a loop of ``autograd.grad``; by the adjoint solve,
    the gradients within its discretisation (1.8e-9 relative measured at step 0.01)."""
    from pyro.nn import AutoRegressiveNN

    odeint = pytest.importorskip("torchdiffeq").odeint

    torch.manual_seed(0)
    velocity = _TimeConditioned(_perturbed(DenseNN(D + 1, [16, 16], param_dims=[D]).double(), 0.2))
    arn = _perturbed(AutoRegressiveNN(D, [16], param_dims=[1], skip_connections=True).double())
    base = pyro_dist.Normal(torch.zeros(D, dtype=f64), torch.ones(D, dtype=f64)).to_event(1)
    x = _inputs()

    def triangular(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(arn(z)) * (1 + t)

    def reference(f, step: float) -> torch.Tensor:
        def augmented(t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
            z = state[0].requires_grad_(True) if not state[0].requires_grad else state[0]
            with torch.enable_grad():
                v = f(t, z)
                rows = [
                    torch.autograd.grad(v[:, i].sum(), z, create_graph=True)[0][:, i]
                    for i in range(D)
                ]
            return v, -torch.stack(rows, 1).sum(1)

        times = torch.tensor([1.0, 0.0], dtype=f64)
        zs, deltas = odeint(
            augmented, (x, x.new_zeros(len(x))), times, method="rk4", options={"step_size": step}
        )
        return base.log_prob(zs[-1]) - deltas[-1]

    options = {"step_size": 0.125}
    for f, module in ((velocity, velocity), (triangular, arn)):
        want = reference(f, 0.125)
        expected = parameter_gradients(module, want.sum())
        for method in METHODS:
            got = torchdiv.flows.log_likelihood(
                f, x, 0.0, 1.0, base.log_prob, method=method, solver="rk4", options=options
            )
            assert_close(got, want.detach())
            for a, b in zip(parameter_gradients(module, got.sum()), expected, strict=True):
                assert_close(a, b)
    options = {"step_size": 0.05}
    want = reference(velocity, 0.05)
    expected = parameter_gradients(velocity, want.sum())
    got = torchdiv.flows.log_likelihood(
        velocity, x, 0.0, 1.0, base.log_prob, solver="rk4", options=options, adjoint=True
    )
    assert_close(got, want.detach())
    for a, b in zip(parameter_gradients(velocity, got.sum()), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))


# ------------------------------------------------------------------ FrEIA


def _fc(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(c_in, 16), nn.Tanh(), nn.Linear(16, c_out))


def _conv(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c_in, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, c_out, 3, padding=1)
    )


_FREIA = {  # (event shape, blocks), made when used
    "all-in-one": lambda: ((D,), [(Fm.AllInOneBlock, {"subnet_constructor": _fc})]),
    "all-in-one-householder": lambda: (
        (D,),
        [
            (
                Fm.AllInOneBlock,
                {
                    "subnet_constructor": _fc,
                    "learned_householder_permutation": 2,
                    "reverse_permutation": True,
                },
            )
        ],
    ),
    "glow-rnvp": lambda: (
        (D,),
        [
            (Fm.GLOWCouplingBlock, {"subnet_constructor": _fc, "clamp": 1.5}),
            (Fm.PermuteRandom, {"seed": 1}),
            (Fm.RNVPCouplingBlock, {"subnet_constructor": _fc}),
        ],
    ),
    "image-all-in-one": lambda: ((2, 3, 3), [(Fm.AllInOneBlock, {"subnet_constructor": _conv})]),
    "image-glow-1x1": lambda: (
        (2, 3, 3),
        [
            (Fm.GLOWCouplingBlock, {"subnet_constructor": _conv, "clamp": 1.0}),
            (Fm.Fixed1x1Conv, {"M": torch.tensor([[1.0, 0.5], [0.2, 1.0]])}),
        ],
    ),
    "image-irevnet": lambda: (
        (2, 4, 4),
        [
            (Fm.IRevNetDownsampling, {}),
            (Fm.GLOWCouplingBlock, {"subnet_constructor": _conv}),
            (Fm.IRevNetUpsampling, {}),
        ],
    ),
    "image-haar": lambda: (
        (1, 4, 4),
        [(Fm.HaarDownsampling, {}), (Fm.RNVPCouplingBlock, {"subnet_constructor": _conv})],
    ),
}


def _freia(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    shape, blocks = _FREIA[name]()
    inn = Ff.SequenceINN(*shape)
    for block, options in blocks:
        inn.append(block, **options)
    return _perturbed(inn.double()), shape


@needs_freia
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "name", sampled_daily(list(_FREIA), {"all-in-one-householder", "glow-rnvp", "image-glow-1x1"})
)
def test_a_freia_sequence_inn(name: str, method: str) -> None:
    """Jacobian, divergence and diagonal (image events too), with parameter gradients; the
    Jacobian's ``slogdet`` is the network's own ``log_jac_det``."""
    inn, shape = _freia(name)
    x = _inputs(3, shape)

    def f(z: torch.Tensor) -> torch.Tensor:
        return inn(z)[0]

    _assert_operators(f, x, method, [p for p in inn.parameters() if p.requires_grad])
    jac = torchdiv.jacobian(f, x, method=method).reshape(3, x[0].numel(), -1)
    # (Fixed1x1Conv's log-det is taken of M at construction, in float32: 5e-7 relative)
    scale = 1e4 if name == "image-glow-1x1" else 1.0
    assert_close(torch.linalg.slogdet(jac)[1], inn(x)[1], scale=scale)


def _freia_act_norm(image: bool) -> nn.Module:
    torch.manual_seed(0)
    if image:
        inn = Ff.SequenceINN(2, 3, 3)
        inn.append(Fm.ActNorm)
        inn.append(Fm.GLOWCouplingBlock, subnet_constructor=_conv)
    else:
        inn = Ff.SequenceINN(D)
        inn.append(Fm.ActNorm)
        inn.append(Fm.GLOWCouplingBlock, subnet_constructor=_fc)
        inn.append(Fm.ActNorm)
    return inn.double()


def _scalar(f):
    return lambda z: f(z).tanh().flatten(1).sum(-1)


_FIRST_CALLS = {
    "jacobian": lambda f, x: torchdiv.jacobian(f, x),
    "divergence": lambda f, x: torchdiv.divergence(f, x),
    "diagonal": lambda f, x: torchdiv.jacobian_diagonal(f, x),
    "hutchinson": lambda f, x: torchdiv.divergence(
        f, x, method="hutchinson", num_probes=3, generator=torch.Generator().manual_seed(0)
    ),
    "laplacian": lambda f, x: torchdiv.laplacian(_scalar(f), x),
    "grad-of-grad": lambda f, x: torchdiv.laplacian(_scalar(f), x, method="grad-of-grad"),
    "value-grad-laplacian": lambda f, x: torchdiv.value_grad_laplacian(_scalar(f), x).laplacian,
    "hutch++": lambda f, x: torchdiv.divergence(
        f, x, method="hutch++", num_probes=6, generator=torch.Generator().manual_seed(0)
    ),
    "xtrace": lambda f, x: torchdiv.divergence(
        f, x, method="xtrace", num_probes=4, generator=torch.Generator().manual_seed(0)
    ),
    "estimate-to-a-tolerance": lambda f, x: (
        torchdiv.estimate_divergence(
            f, x, rtol=1.0, num_probes=2, max_probes=64, generator=torch.Generator().manual_seed(0)
        ).value
    ),
    "hutchinson-laplacian": lambda f, x: torchdiv.laplacian(
        _scalar(f), x, method="hutchinson", num_probes=3, generator=torch.Generator().manual_seed(0)
    ),
    "partial-laplacian": lambda f, x: torchdiv.laplacian(_scalar(f), x, coordinates=[0, 2]),
    "weighted-laplacian": lambda f, x: torchdiv.weighted_laplacian(
        _scalar(f), x, diffusion=torch.diag(torch.linspace(-1.0, 2.0, x[0].numel(), dtype=f64))
    ),
}


@needs_freia
@pytest.mark.parametrize("image", [False, True])
@pytest.mark.parametrize(
    "call", sampled_daily(list(_FIRST_CALLS), {"jacobian", "hutchinson", "laplacian"})
)
def test_a_freia_actnorm_initialised_by_the_first_call(call: str, image: bool) -> None:
    """FrEIA's ``ActNorm`` initialises from the first batch it sees: first run inside a
    call, the result and its parameter gradients are those of a copy initialised by one plain
    forward, the model is left as that forward left it, and a second call agrees."""
    inn = _freia_act_norm(image)
    once = copy.deepcopy(inn)
    x = 2.0 * _inputs(5, (2, 3, 3) if image else (D,)) + 1.0
    got = _FIRST_CALLS[call](lambda z: inn(z)[0], x)
    with torch.no_grad():
        once(x)
    want = _FIRST_CALLS[call](lambda z: once(z)[0], x)
    assert_close(got, want)
    theirs = once.state_dict()
    for name, mine in inn.state_dict().items():
        assert torch.equal(mine, theirs[name]), name
    assert not any(m.init_on_next_batch for m in inn.modules() if isinstance(m, Fm.ActNorm))
    mine = torch.autograd.grad(got.sum(), list(inn.parameters()), allow_unused=True)
    ref = torch.autograd.grad(want.sum(), list(once.parameters()), allow_unused=True)
    for a, b in zip(mine, ref, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b)
    assert_close(_FIRST_CALLS[call](lambda z: inn(z)[0], x), want)


@needs_freia
@needs_pyro
@pytest.mark.parametrize("probe", ["rademacher", "gaussian", "sphere"])
def test_estimates_with_fixed_probes(probe: str) -> None:
    """Hutchinson with probes drawn once (``draw_probes``) on a FrEIA network and a Pyro
    planar-radial stack: the estimate and its standard error are the mean and the standard
    error of the probes' quadratic forms ``v^T J v`` of the blocks, with the parameter
    gradients of the mean; the diagonal estimate is ``v * (J v)`` or ``v * (J^T v)``
    averaged (rows or columns, by the engine: documented)."""
    inn, _ = _freia("all-in-one")
    torch.manual_seed(0)
    stack = T.ComposeTransformModule([T.Planar(D), T.Radial(D)]).double()
    x = _inputs()
    for f, module in ((lambda z: inn(z)[0], inn), (stack, stack)):
        jac = _blocks(f, x, create_graph=True)
        probes = torchdiv.draw_probes(x, 6, probe=probe, generator=torch.Generator().manual_seed(1))
        forms = torch.einsum("kbi,bij,kbj->kb", probes, jac, probes)
        est = torchdiv.estimate_divergence(f, x, num_probes=6, probes=probes)
        assert_close(est.value, forms.detach().mean(0))
        assert_close(est.stderr, forms.detach().std(0) / 6**0.5)
        params = [p for p in module.parameters() if p.requires_grad]
        unused = {"allow_unused": True, "materialize_grads": True}  # (the last biases)
        got = torch.autograd.grad(est.value.square().sum(), params, **unused)
        want = torch.autograd.grad(forms.mean(0).square().sum(), params, **unused)
        for a, b in zip(got, want, strict=True):
            assert_close(a, b)
        if probe == "sphere":
            continue
        diag = torchdiv.jacobian_diagonal(f, x, method="hutchinson", num_probes=6, probes=probes)
        rows = torch.einsum("kbi,bij,kbj->bi", probes, jac.detach(), probes) / 6
        columns = torch.einsum("kbi,bji,kbj->bi", probes, jac.detach(), probes) / 6
        assert torch.allclose(diag, rows, rtol=1e-10, atol=1e-10) or torch.allclose(
            diag, columns, rtol=1e-10, atol=1e-10
        )


_REFUSED = {
    "reverse": lambda f, x: torchdiv.divergence(f, x, method="reverse"),
    "forward": lambda f, x: torchdiv.jacobian(f, x, method="forward"),
    "biharmonic": lambda f, x: torchdiv.biharmonic(_scalar(f), x),
    "forward-over-reverse": lambda f, x: torchdiv.value_grad_laplacian(
        _scalar(f), x, method="forward-over-reverse"
    ),
}


@needs_freia
@pytest.mark.parametrize("name", [*_REFUSED, "taylor", "check"])
def test_freia_actnorm_refusals_and_the_check_leave_it_as_found(name: str) -> None:
    """The explicit methods (and the biharmonic, whose every method nests transforms) refuse
    FrEIA's write by name, the Taylor engine has no rule for it, and the check runs ``f``
    once: each leaves the real ``ActNorm`` uninitialised (flag and parameters), as the
    FrEIA-style model above."""
    x = 2.0 * _inputs() + 1.0
    inn = _freia_act_norm(False)

    def f(z: torch.Tensor) -> torch.Tensor:
        return inn(z)[0]

    if name == "taylor":
        with pytest.raises(UnsupportedOp, match="taylor"):
            torchdiv.value_grad_laplacian(_scalar(f), x, method="taylor")
    elif name == "check":
        torchdiv.check_batch_independence(f, x)
    else:
        with pytest.raises(RuntimeError, match=r"parameter's \.data.*call f\(x\) once before"):
            _REFUSED[name](f, x)
    assert _uninitialised(inn)


@needs_freia
@pytest.mark.parametrize("method", METHODS)
def test_a_freia_iresnet_layer(method: str) -> None:
    """FrEIA's ``IResNetLayer`` (``x + g(x)``) with its log-det estimated inside ``forward``
    (Rademacher draws from torch's generator, ``autograd.grad`` of ``g``): the divergence and
    its parameter gradients are the blocks', and the call draws what one forward draws, at
    one chunk and at several."""
    torch.manual_seed(0)
    layer = FrEIAIResNet([(D,)], internal_size=16, hutchinson_samples=2, jacobian_iterations=4)
    layer = _perturbed(layer.double(), 0.1)

    def f(z: torch.Tensor) -> torch.Tensor:
        return layer([z])[0][0]

    x = _inputs()
    want = _blocks(f, x, create_graph=True).diagonal(0, 1, 2).sum(-1)
    for chunk_size in (None, 1):
        torch.manual_seed(5)
        f(x)
        after = torch.get_rng_state()
        torch.manual_seed(5)
        div = torchdiv.divergence(f, x, method=method, chunk_size=chunk_size)
        assert torch.equal(torch.get_rng_state(), after)
        assert_close(div, want.detach())
        assert_same_parameter_gradients(layer, div.square().sum(), want.square().sum())


@needs_freia
@pytest.mark.parametrize("method", METHODS)
def test_a_conditional_freia_graph_inn(method: str) -> None:
    """A ``GraphINN`` with a ``ConditionNode`` (a conditional ``AllInOneBlock`` and GLOW
    coupling), ``Split`` and ``Concat``: the Jacobian and its ``slogdet`` (the network's own
    log-det), with gradients with respect to the parameters and to the condition."""
    torch.manual_seed(0)
    inp, cond = Ff.InputNode(D, name="in"), Ff.ConditionNode(3, name="c")
    first = Ff.Node(inp, Fm.AllInOneBlock, {"subnet_constructor": _fc}, conditions=cond)
    split = Ff.Node(first, Fm.Split, {"section_sizes": [2, 2], "dim": 0})
    inner = Ff.Node(split.out0, Fm.GLOWCouplingBlock, {"subnet_constructor": _fc})
    joined = Ff.Node([inner.out0, split.out1], Fm.Concat, {"dim": 0})
    last = Ff.Node(joined, Fm.GLOWCouplingBlock, {"subnet_constructor": _fc}, conditions=cond)
    nodes = [inp, cond, first, split, inner, joined, last, Ff.OutputNode(last)]
    inn = _perturbed(Ff.GraphINN(nodes).double())
    x = _inputs()
    c = _CONTEXT.clone().requires_grad_(True)

    def f(z: torch.Tensor) -> torch.Tensor:
        return inn(z, c=[c])[0]

    _assert_operators(f, x, method, [p for p in inn.parameters() if p.requires_grad])
    jac = torchdiv.jacobian(f, x, method=method)
    assert_close(torch.linalg.slogdet(jac)[1], inn(x, c=[c])[1])
    want = _blocks(f, x, create_graph=True)
    (got,) = torch.autograd.grad(torch.linalg.slogdet(jac)[1].sum() + jac.square().sum(), c)
    (ref,) = torch.autograd.grad(torch.linalg.slogdet(want)[1].sum() + want.square().sum(), c)
    assert_close(got, ref)
