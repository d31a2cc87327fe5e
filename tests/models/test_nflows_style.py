"""Discrete flows as nflows, normflows, residual-flows and zuko write them (rev-nflows17).

- nflows: MAF whose MADE has residual blocks of masked linear layers, ``RandomPermutation``
  (``index_select`` by a buffer), ``LULinear`` (triangular factors filled by index writes) and a
  rational-quadratic spline coupling (``torch.empty_like`` filled by index writes with the
  identity/transform feature buffers, in-place ``/=`` on views of the net's output, boolean
  masks over the whole batch, ``searchsorted`` nudging the last knot in place, linear tails).
  The flow's own ``log|det J|`` is the reference for ``slogdet`` of torchdiv's Jacobian;
  the Jacobian itself is checked against a one-sample-at-a-time autograd loop.
- normflows: planar and radial flows, whose divergences have closed forms.
- residual-flows' ``iResBlock``: its forward calls ``x.requires_grad_(True)`` and
  ``torch.autograd.grad`` (brute-force 2-D log-det) inside ``torch.enable_grad()``.
- zuko's UNAF integrates through ``GaussLegendre``, an ``autograd.Function`` whose backward is
  ``@once_differentiable``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, assert_same_parameter_gradients
from torch import nn

import torchdiv
from torchdiv._taylor import UnsupportedOp

f64 = torch.float64


def _made_mask(out_degrees: torch.Tensor, in_degrees: torch.Tensor, output: bool) -> torch.Tensor:
    """nflows' masks: an output unit of degree ``d`` reads inputs of degree ``< d``, a hidden
    unit those of degree ``<= d``."""
    if output:
        return (out_degrees[:, None] > in_degrees).to(f64)
    return (out_degrees[:, None] >= in_degrees).to(f64)


class _MaskedLinear(nn.Linear):
    def __init__(self, in_degrees: torch.Tensor, out_features: int, features: int, output: bool):
        super().__init__(len(in_degrees), out_features, dtype=f64)
        if output:
            degrees = torch.arange(1, features + 1).repeat_interleave(out_features // features)
        else:
            degrees = torch.arange(out_features) % max(1, features - 1) + min(1, features - 1)
        self.register_buffer("mask", _made_mask(degrees, in_degrees, output))
        self.register_buffer("degrees", degrees)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class _MaskedResidualBlock(nn.Module):
    def __init__(self, degrees: torch.Tensor, features: int) -> None:
        super().__init__()
        first = _MaskedLinear(degrees, len(degrees), features, output=False)
        self.layers = nn.ModuleList(
            [first, _MaskedLinear(first.degrees, len(degrees), features, output=False)]
        )
        self.degrees = self.layers[1].degrees

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers[1](F.relu(self.layers[0](F.relu(x))))


class _MAF(nn.Module):
    """nflows' ``MaskedAffineAutoregressiveTransform`` over a residual MADE."""

    def __init__(self, features: int, hidden: int) -> None:
        super().__init__()
        self.features = features
        self.initial = _MaskedLinear(torch.arange(1, features + 1), hidden, features, output=False)
        self.block = _MaskedResidualBlock(self.initial.degrees, features)
        self.final = _MaskedLinear(self.block.degrees, 2 * features, features, output=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.final(self.block(self.initial(x))).view(-1, self.features, 2)
        scale = torch.sigmoid(params[..., 0] + 2.0) + 1e-3
        return scale * x + params[..., 1], torch.log(scale).sum(1)


class _LULinear(nn.Module):
    """nflows' ``LULinear``: unit-lower and upper factors written entry by entry."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.n = features
        count = features * (features - 1) // 2
        self.lower_entries = nn.Parameter(torch.zeros(count, dtype=f64))
        self.upper_entries = nn.Parameter(torch.zeros(count, dtype=f64))
        self.unconstrained_upper_diag = nn.Parameter(torch.zeros(features, dtype=f64))
        self.bias = nn.Parameter(torch.zeros(features, dtype=f64))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        below, above, diag = (
            torch.tril_indices(self.n, self.n, -1),
            torch.triu_indices(self.n, self.n, 1),
            torch.arange(self.n),
        )
        upper_diag = F.softplus(self.unconstrained_upper_diag) + 1e-3
        lower = self.lower_entries.new_zeros(self.n, self.n)
        lower[below[0], below[1]] = self.lower_entries
        lower[diag, diag] = 1.0
        upper = self.upper_entries.new_zeros(self.n, self.n)
        upper[above[0], above[1]] = self.upper_entries
        upper[diag, diag] = upper_diag
        out = F.linear(F.linear(x, upper), lower, self.bias)
        return out, torch.log(upper_diag).sum() * x.new_ones(x.shape[0])


def _searchsorted(bin_locations: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    bin_locations[..., -1] += 1e-6
    return torch.sum(inputs[..., None] >= bin_locations, dim=-1) - 1


def _knots(unnormalized: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cumulative knots in ``[-bound, bound]`` (ends written in place) and the bin sizes."""
    bins = unnormalized.shape[-1]
    sizes = 1e-3 + (1 - 1e-3 * bins) * F.softmax(unnormalized, dim=-1)
    cum = F.pad(torch.cumsum(sizes, dim=-1), pad=(1, 0), mode="constant", value=0.0)
    cum = 2 * bound * cum - bound
    cum[..., 0] = -bound
    cum[..., -1] = bound
    return cum, cum[..., 1:] - cum[..., :-1]


def _spline(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, d: torch.Tensor, bound: float):
    """nflows' ``rational_quadratic_spline`` (forward) on the inside entries."""
    cumwidths, widths = _knots(w, bound)
    cumheights, heights = _knots(h, bound)
    derivatives = 1e-3 + F.softplus(d)
    idx = _searchsorted(cumwidths, x)[..., None]
    x_k, w_k, y_k = (t.gather(-1, idx)[..., 0] for t in (cumwidths, widths, cumheights))
    delta = heights / widths
    s_k, d_k, d_k1, h_k = (
        t.gather(-1, idx)[..., 0] for t in (delta, derivatives, derivatives[..., 1:], heights)
    )
    theta = (x - x_k) / w_k
    tt = theta * (1 - theta)
    denominator = s_k + (d_k + d_k1 - 2 * s_k) * tt
    out = y_k + h_k * (s_k * theta.pow(2) + d_k * tt) / denominator
    numerator = s_k.pow(2) * (d_k1 * theta.pow(2) + 2 * s_k * tt + d_k * (1 - theta).pow(2))
    return out, torch.log(numerator) - 2 * torch.log(denominator)


def _unconstrained_spline(x, w, h, d, bound: float):
    """nflows' ``unconstrained_rational_quadratic_spline`` with linear tails."""
    inside = (x >= -bound) & (x <= bound)
    outside = ~inside
    out, logabsdet = torch.zeros_like(x), torch.zeros_like(x)
    d = F.pad(d, pad=(1, 1))
    constant = math.log(math.exp(1 - 1e-3) - 1)
    d[..., 0] = constant
    d[..., -1] = constant
    out[outside] = x[outside]
    logabsdet[outside] = 0
    out[inside], logabsdet[inside] = _spline(
        x[inside], w[inside, :], h[inside, :], d[inside, :], bound
    )
    return out, logabsdet


class _SplineCoupling(nn.Module):
    """nflows' ``PiecewiseRationalQuadraticCouplingTransform``."""

    def __init__(self, mask: torch.Tensor, hidden: int, bins: int = 4, bound: float = 2.0) -> None:
        super().__init__()
        features = torch.arange(len(mask))
        self.register_buffer("identity_features", features.masked_select(mask <= 0))
        self.register_buffer("transform_features", features.masked_select(mask > 0))
        self.bins, self.bound, self.hidden = bins, bound, hidden
        n_in, n_out = len(self.identity_features), len(self.transform_features)
        self.net = nn.Sequential(
            nn.Linear(n_in, hidden, dtype=f64),
            nn.ReLU(),
            nn.Linear(hidden, n_out * (3 * bins - 1), dtype=f64),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        identity = x[:, self.identity_features, ...]
        transform = x[:, self.transform_features, ...]
        params = self.net(identity).reshape(x.shape[0], transform.shape[1], -1)
        w, h = params[..., : self.bins], params[..., self.bins : 2 * self.bins]
        w /= math.sqrt(self.hidden)
        h /= math.sqrt(self.hidden)
        transform, logabsdet = _unconstrained_spline(
            transform, w, h, params[..., 2 * self.bins :], self.bound
        )
        out = torch.empty_like(x)
        out[:, self.identity_features, ...] = identity
        out[:, self.transform_features, ...] = transform
        return out, logabsdet.sum(1)


class _Composite(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer(
            "permutation", torch.randperm(features, generator=torch.Generator().manual_seed(0))
        )
        self.maf = _MAF(features, 12)
        self.lu = _LULinear(features)
        self.coupling = _SplineCoupling(torch.arange(features) % 2, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, total = self.maf(x)
        z = torch.index_select(z, 1, self.permutation)
        z, logabsdet = self.lu(z)
        total = total + logabsdet
        z, logabsdet = self.coupling(z)
        return z, total + logabsdet


def _perturbed(module: nn.Module, scale: float = 0.3, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _jacobian_alone(f, x: torch.Tensor) -> torch.Tensor:
    """Each sample's Jacobian from ``f`` of that sample alone (autograd, row by row)."""
    blocks = []
    for b in range(len(x)):
        xb = x[b : b + 1].detach().requires_grad_(True)
        yb = f(xb).reshape(-1)
        rows = [
            torch.autograd.grad(yb[i], xb, retain_graph=True)[0].reshape(-1) for i in range(len(yb))
        ]
        blocks.append(torch.stack(rows))
    return torch.stack(blocks)


def _inputs(seed: int) -> torch.Tensor:
    """Four samples, some entries in the linear tails (|x| > 2), bins differing by seed."""
    x = 1.6 * torch.randn(4, 4, dtype=f64, generator=torch.Generator().manual_seed(seed))
    x[0, 1], x[2, 3] = 2.7, -3.1
    return x


@pytest.mark.parametrize("method", ["auto", "reverse", "forward"])
def test_an_nflows_spline_flow_jacobian_log_det_and_its_gradients(method: str) -> None:
    """``slogdet`` of torchdiv's Jacobian is the flow's own summed ``logabsdet``, with its
    parameter gradients, on two calls whose inputs fall in other bins and tails."""
    flow = _perturbed(_Composite(4))
    f = lambda z: flow(z)[0]  # noqa: E731
    for seed in (2, 3):
        x = _inputs(seed)
        jac = torchdiv.jacobian(f, x, method=method)
        assert_close(jac, _jacobian_alone(f, x))
        log_det = torch.linalg.slogdet(jac)[1]
        own = flow(x)[1]
        assert_close(log_det, own)
        weights = torch.linspace(0.5, 1.5, 4, dtype=f64)
        assert_same_parameter_gradients(flow, (weights * log_det).sum(), (weights * own).sum())


@pytest.mark.parametrize("method", ["auto", "reverse", "forward"])
def test_an_nflows_spline_flow_divergence_and_its_gradients(method: str) -> None:
    flow = _perturbed(_Composite(4))
    f = lambda z: flow(z)[0]  # noqa: E731
    x = _inputs(4)
    div = torchdiv.divergence(f, x, method=method)
    want = torch.diagonal(_reference_with_graph(f, x), dim1=-2, dim2=-1).sum(-1)
    assert_close(div, want)
    assert_same_parameter_gradients(flow, div.square().sum(), want.square().sum())


def _reference_with_graph(f, x: torch.Tensor) -> torch.Tensor:
    blocks = []
    for b in range(len(x)):
        xb = x[b : b + 1].detach().requires_grad_(True)
        yb = f(xb).reshape(-1)
        rows = [
            torch.autograd.grad(yb[i], xb, retain_graph=True, create_graph=True)[0].reshape(-1)
            for i in range(len(yb))
        ]
        blocks.append(torch.stack(rows))
    return torch.stack(blocks)


def test_an_nflows_spline_coupling_is_refused_by_structured_naming_auto() -> None:
    """The coupling fills ``torch.empty_like`` by index writes: no structured rule; the error
    names the way out."""
    flow = _perturbed(_Composite(4))
    with pytest.raises(UnsupportedOp, match="method='auto'"):
        torchdiv.divergence(lambda z: flow(z)[0], _inputs(2), method="structured")


class _Planar(nn.Module):
    """normflows' ``Planar``: ``z + u' tanh(w.z + b)``, ``u'`` made invertible."""

    def __init__(self, d: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.u = nn.Parameter(torch.rand(1, d, generator=g, dtype=f64) * 2.8 - 1.4)
        self.w = nn.Parameter(torch.rand(1, d, generator=g, dtype=f64) * 1.2 - 0.6)
        self.b = nn.Parameter(torch.full((1,), 0.1, dtype=f64))

    def u_hat(self) -> torch.Tensor:
        inner = torch.sum(self.w * self.u)
        return self.u + (torch.log(1 + torch.exp(inner)) - 1 - inner) * self.w / torch.sum(
            self.w**2
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lin = torch.sum(self.w * z, list(range(1, self.w.dim())), keepdim=True) + self.b
        return z + self.u_hat() * torch.tanh(lin)

    def divergence(self, z: torch.Tensor) -> torch.Tensor:
        lin = (self.w * z).sum(1) + self.b
        return z.shape[1] + (self.w * self.u_hat()).sum() / torch.cosh(lin) ** 2


class _Radial(nn.Module):
    """normflows' ``Radial``: ``z + beta / (alpha + r) (z - z0)``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(6)
        self.beta = nn.Parameter(torch.full((1,), -0.7, dtype=f64))
        self.alpha = nn.Parameter(torch.full((1,), 0.3, dtype=f64))
        self.z_0 = nn.Parameter(torch.randn(1, d, generator=g, dtype=f64))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        beta = torch.log(1 + torch.exp(self.beta)) - torch.abs(self.alpha)
        dz = z - self.z_0
        r = torch.linalg.vector_norm(dz, dim=list(range(1, self.z_0.dim())), keepdim=True)
        return z + beta / (torch.abs(self.alpha) + r) * dz

    def divergence(self, z: torch.Tensor) -> torch.Tensor:
        """``tr(I (1 + h) + h'(r) r rhat rhat^T) = d (1 + h) + r h'(r)``."""
        beta = torch.log(1 + torch.exp(self.beta)) - torch.abs(self.alpha)
        r = (z - self.z_0).norm(dim=1)
        a = torch.abs(self.alpha)
        return z.shape[1] * (1 + beta / (a + r)) - beta * r / (a + r) ** 2


@pytest.mark.parametrize("method", ["auto", "reverse", "forward", "structured"])
@pytest.mark.parametrize("flow_type", [_Planar, _Radial])
def test_normflows_planar_and_radial_divergences_are_their_closed_forms(
    flow_type, method: str
) -> None:
    flow = flow_type(5)
    x = torch.randn(6, 5, dtype=f64, generator=torch.Generator().manual_seed(8))
    div = torchdiv.divergence(flow, x, method=method)
    want = flow.divergence(x)
    assert_close(div, want)
    assert_same_parameter_gradients(
        flow,
        (div.log() * torch.arange(6.0, dtype=f64)).sum(),
        (want.log() * torch.arange(6.0, dtype=f64)).sum(),
    )


class _LipSwish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x) / 1.1


class _IResBlock(nn.Module):
    """residual-flows' ``iResBlock`` in eval on 2-D data: brute-force log-det by
    ``torch.autograd.grad`` inside ``forward``, after ``x.requires_grad_(True)``."""

    def __init__(self) -> None:
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.nnet = nn.Sequential(
            sn(nn.Linear(2, 16, dtype=f64)), _LipSwish(), sn(nn.Linear(16, 2, dtype=f64))
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            x = x.requires_grad_(True)
            g = self.nnet(x)
            rows = [torch.autograd.grad(g[:, d].sum(), x, create_graph=True)[0] for d in range(2)]
            det = (rows[0][:, 0] + 1) * (rows[1][:, 1] + 1) - rows[0][:, 1] * rows[1][:, 0]
        return x + g, torch.log(torch.abs(det))


def test_a_residual_flow_block_differentiating_inside_its_forward() -> None:
    """``"auto"`` falls back to plain autograd: ``slogdet`` of its Jacobian is the block's
    brute-force log-det; ``"reverse"`` refuses ``requires_grad_`` naming ``'auto'``."""
    block = _IResBlock().eval()
    x = torch.randn(5, 2, dtype=f64, generator=torch.Generator().manual_seed(9))
    jac = torchdiv.jacobian(lambda z: block(z)[0], x)
    assert_close(torch.linalg.slogdet(jac)[1], block(x.clone())[1])
    with pytest.raises(RuntimeError, match="method='auto'"):
        torchdiv.jacobian(lambda z: block(z)[0], x, method="reverse")


def test_zukos_unaf_values_and_its_refused_parameter_gradients() -> None:
    """zuko's UNAF integrates through ``GaussLegendre`` (``@once_differentiable``): the
    Jacobian is right (``slogdet`` = zuko's ladj); a loss through it that needs the Function's
    second derivatives raises ``UndifferentiableBackward`` rather than missing its part."""
    zuko = pytest.importorskip("zuko")
    torch.manual_seed(0)
    flow = zuko.flows.UNAF(3, transforms=1).double()
    x = torch.randn(4, 3, dtype=f64, generator=torch.Generator().manual_seed(10))
    transform = flow().transform
    jac = torchdiv.jacobian(transform, x)
    log_det = torch.linalg.slogdet(jac)[1]
    assert_close(log_det, transform.call_and_ladj(x)[1])
    with pytest.raises(RuntimeError, match="once_differentiable"):
        log_det.sum().backward()


class _DepthCat(nn.Module):
    """torchdyn's ``DepthCat``: the time, set on the module from outside, as one more channel."""

    def __init__(self) -> None:
        super().__init__()
        self.t: torch.Tensor | float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.t * torch.ones(x.shape[0], 1).to(x)], 1)


class _DEFunc(nn.Module):
    """torchdyn's ``DEFunc``: writes ``t`` onto every submodule that has a ``t``, then runs
    the field (the layout of torchdyn's CNFs, whose own tests skip without torchcde)."""

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.vf = field

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for _, module in self.vf.named_modules():
            if hasattr(module, "t"):
                module.t = t
        return self.vf(x)


def _log_likelihood_alone(velocity, x: torch.Tensor, base) -> torch.Tensor:
    """One sample at a time: rk4 from ``t = 1`` to ``0`` on ``(z, -int tr)``, the trace by
    autograd row by row (torchdiffeq, no torchdiv)."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    d = x.shape[1]

    def augmented(t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            z = state[:, :d] if state.requires_grad else state[:, :d].requires_grad_(True)
            v = velocity(t, z)
            rows = [torch.autograd.grad(v[0, i], z, create_graph=True)[0][0, i] for i in range(d)]
        return torch.cat([v, -sum(rows).view(1, 1)], 1)

    out = []
    for b in range(len(x)):
        start = torch.cat([x[b : b + 1], torch.zeros(1, 1, dtype=x.dtype)], 1)
        end = torchdiffeq.odeint(
            augmented,
            start,
            torch.tensor([1.0, 0.0], dtype=x.dtype),
            method="rk4",
            options={"step_size": 0.25},
        )[-1]
        out.append(base(end[:, :d]) - end[:, d])
    return torch.cat(out)


@pytest.mark.parametrize("method", ["auto", "reverse", "forward", "structured"])
def test_a_torchdyn_depthcat_field_log_likelihood_and_its_gradients(method: str) -> None:
    """A field whose time is written onto its ``DepthCat`` layers before each evaluation:
    ``flows.log_likelihood`` (rk4, data at ``t = 1``) and its parameter gradients equal a
    per-sample solve with the trace by autograd, on two calls."""
    pytest.importorskip("torchdiffeq")
    from torchdiv.flows import log_likelihood

    torch.manual_seed(0)
    field = nn.Sequential(
        _DepthCat(),
        nn.Linear(4, 16, dtype=f64),
        nn.Tanh(),
        _DepthCat(),
        nn.Linear(17, 3, dtype=f64),
    )
    velocity = _DEFunc(field)
    base = lambda z: -0.5 * z.square().sum(-1) - 1.5 * math.log(2 * math.pi)  # noqa: E731
    x = torch.randn(5, 3, dtype=f64, generator=torch.Generator().manual_seed(11))
    want = _log_likelihood_alone(velocity, x, base)
    weights = torch.linspace(0.5, 1.5, 5, dtype=f64)
    for _ in range(2):
        got = log_likelihood(
            velocity, x, 0.0, 1.0, base, method=method, solver="rk4", options={"step_size": 0.25}
        )
        assert_close(got, want)
        assert_same_parameter_gradients(field, (weights * got).sum(), (weights * want).sum())
