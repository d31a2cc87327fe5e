"""PINN networks as their papers write them, through ``laplacian``: SIREN, random Fourier
features, the gated "modified MLP", PirateNet's gated residual blocks, a hard boundary factor
with ``prod``, a Chebyshev-KAN layer with ``acos``, an efficient-kan B-spline KAN layer (knot
comparisons cast to the dtype), and a transformer encoder (trainable, and frozen in eval
mode, where PyTorch takes its fused fast path); and the second-order operators (the Laplacian
over space only of ``u(x, y, t)``, ``value_grad_laplacian``, ``weighted_laplacian``,
``biharmonic``) on the first five, against grad-of-grad loops; and linear elasticity's
residual from a ``jacobian`` of a function that calls ``jacobian`` (the stress).

For each, in float64: ``"auto"`` runs ``"taylor"`` (its fallback is disabled), values match a
grad-of-grad loop and central finite differences, and the gradient of the Laplacian with
respect to every parameter (third derivatives) matches autograd through the loop and finite
differences of the Laplacian along a random direction of the parameters.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

import torchdiv
from torchdiv._core.modes import SafeDerivatives
from torchdiv._laplacian import methods as _laplacian

f64 = torch.float64


class Siren(nn.Module):
    """Sitzmann et al. 2020: ``sin(w0 (W x + b))`` layers; the first layer's weights uniform in
    ``±1/fan_in``, the others in ``±sqrt(6/fan_in)/w0``, so that ``w0 = 30`` keeps the
    pre-activations unit-scaled."""

    def __init__(self, d_in: int, width: int, depth: int = 2, w0: float = 30.0):
        super().__init__()
        self.w0 = w0
        sizes = [d_in] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.out = nn.Linear(width, 1)
        with torch.no_grad():
            for i, layer in enumerate(self.hidden):
                bound = 1 / layer.in_features if i == 0 else math.sqrt(6 / layer.in_features) / w0
                layer.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = torch.sin(self.w0 * layer(x))
        return self.out(x)


class FourierFeatures(nn.Module):
    """Tancik et al. 2020: ``[cos 2 pi B x, sin 2 pi B x]`` with a fixed Gaussian ``B``
    (a buffer), then a tanh MLP."""

    def __init__(self, d_in: int, features: int, width: int, sigma: float = 1.0):
        super().__init__()
        self.register_buffer("B", sigma * torch.randn(features, d_in))
        self.mlp = nn.Sequential(
            nn.Linear(2 * features, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh()
        )
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * x @ self.B.T
        return self.out(self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], -1)))


class ModifiedMLP(nn.Module):
    """Wang, Teng & Perdikaris 2021: two encoders ``U = tanh(x W_u)``, ``V = tanh(x W_v)``
    gate every hidden layer, ``H <- (1 - Z) U + Z V`` with ``Z = tanh(H W + b)``."""

    def __init__(self, d_in: int, width: int, depth: int = 3):
        super().__init__()
        self.u, self.v = nn.Linear(d_in, width), nn.Linear(d_in, width)
        self.first = nn.Linear(d_in, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = torch.tanh(self.u(x)), torch.tanh(self.v(x))
        h = torch.tanh(self.first(x))
        for layer in self.hidden:
            z = torch.tanh(layer(h))
            h = (1 - z) * u + z * v
        return self.out(h)


class PirateNet(nn.Module):
    """Wang, Sankaran et al. 2024 (PirateNets): random Fourier features ``[cos B x, sin B x]``
    (``B`` a buffer), gates ``U``, ``V`` of them, and residual blocks of three gated layers,
    ``f = tanh(W1 h)``, ``z1 = f U + (1 - f) V``, ... , ``h <- a tanh(W3 z2) + (1 - a) h``
    with a trainable ``a`` (0 at initialisation: the net starts as its embedding)."""

    def __init__(self, d_in: int, features: int, blocks: int = 2, alpha: float = 0.3):
        super().__init__()
        width = 2 * features
        self.register_buffer("B", torch.randn(d_in, features))
        self.u, self.v = nn.Linear(width, width), nn.Linear(width, width)
        self.layers = nn.ModuleList(
            nn.ModuleList(nn.Linear(width, width) for _ in range(3)) for _ in range(blocks)
        )
        self.alpha = nn.Parameter(torch.full((blocks,), alpha))
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.cos(x @ self.B), torch.sin(x @ self.B)], -1)
        u, v = torch.tanh(self.u(h)), torch.tanh(self.v(h))
        for (first, second, third), a in zip(self.layers, self.alpha, strict=True):
            f = torch.tanh(first(h))
            z = f * u + (1 - f) * v
            g = torch.tanh(second(z))
            z = g * u + (1 - g) * v
            h = a * torch.tanh(third(z)) + (1 - a) * h
        return self.out(h)


class BSplineKAN(nn.Module):
    """A Kolmogorov-Arnold layer as efficient-kan writes it (Liu et al. 2024): a uniform knot
    grid (a buffer, extended by ``order`` knots each side), cubic B-spline bases by the
    Cox-de Boor recursion from the indicator ``(x >= g_i) & (x < g_{i+1})`` cast to the dtype,
    and ``y = W_base silu(x) + (W_spline * scaler) . B(x)``."""

    def __init__(self, d_in: int, d_out: int, grid: int = 5, order: int = 3):
        super().__init__()
        self.order = order
        h = 2 / grid  # the grid spans [-1, 1]
        knots = torch.arange(-order, grid + order + 1) * h - 1
        self.register_buffer("grid", knots.expand(d_in, -1).contiguous())
        self.base_weight = nn.Parameter(torch.randn(d_out, d_in) / math.sqrt(d_in))
        self.spline_weight = nn.Parameter(0.3 * torch.randn(d_out, d_in, grid + order))
        self.spline_scaler = nn.Parameter(1 + 0.1 * torch.randn(d_out, d_in))

    def bases(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in) -> (N, in, grid + order)``."""
        g, x = self.grid, x.unsqueeze(-1)
        b = ((x >= g[:, :-1]) & (x < g[:, 1:])).to(x.dtype)
        for k in range(1, self.order + 1):
            left = (x - g[:, : -(k + 1)]) / (g[:, k:-1] - g[:, : -(k + 1)]) * b[:, :, :-1]
            right = (g[:, k + 1 :] - x) / (g[:, k + 1 :] - g[:, 1:-k]) * b[:, :, 1:]
            b = left + right
        return b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, x = x.shape, x.reshape(-1, self.grid.shape[0])
        weight = self.spline_weight * self.spline_scaler.unsqueeze(-1)
        spline = self.bases(x).reshape(len(x), -1) @ weight.reshape(len(weight), -1).T
        out = nn.functional.linear(nn.functional.silu(x), self.base_weight) + spline
        return out.reshape(*shape[:-1], -1)


class HardBoundary(nn.Module):
    """``u(x) = prod_i x_i (1 - x_i) * net(x)``: zero on the boundary of the unit cube by
    construction (Lagaris et al. 1998; Lu et al. 2021)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * (1 - x)).prod(-1, keepdim=True) * self.net(x)


class ChebyKAN(nn.Module):
    """A Chebyshev Kolmogorov-Arnold layer (SS et al. 2024): inputs squashed by ``tanh`` into
    ``(-1, 1)``, expanded in ``T_n(t) = cos(n acos t)``, ``n = 0..degree``, and combined with
    learned coefficients ``y_o = sum_{i,n} c_{o,i,n} T_n(t_i)``."""

    def __init__(self, d_in: int, d_out: int, degree: int):
        super().__init__()
        self.coefficients = nn.Parameter(torch.randn(d_out, d_in, degree + 1) / (d_in * degree))
        self.register_buffer("orders", torch.arange(degree + 1, dtype=torch.get_default_dtype()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(x).unsqueeze(-1)  # (N, in, 1)
        basis = torch.cos(self.orders * torch.acos(t))  # (N, in, degree + 1)
        return torch.einsum("nid,oid->no", basis, self.coefficients)


class TokenTransformer(nn.Module):
    """Each coordinate a token (value embedding + learned position), one encoder layer,
    mean pooling and a linear read-out."""

    def __init__(self, d_in: int, d_model: int = 8, heads: int = 2):
        super().__init__()
        self.embed = nn.Linear(1, d_model)
        self.position = nn.Parameter(0.1 * torch.randn(d_in, d_model))
        self.encoder = nn.TransformerEncoderLayer(
            d_model, heads, 2 * d_model, dropout=0.0, batch_first=True
        )
        self.out = nn.Linear(d_model, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.unsqueeze(-1)) + self.position
        return self.out(self.encoder(tokens).mean(1))


def _tanh_net(d_in: int, width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, 1))


D = 3  # inputs: a 2-D PDE in space and time, or 3-D in space
MODELS = {
    "siren": lambda: Siren(D, 8),
    "fourier_features": lambda: FourierFeatures(D, 4, 8),
    "modified_mlp": lambda: ModifiedMLP(D, 8),
    "pirate_net": lambda: PirateNet(D, 4),
    "bspline_kan": lambda: nn.Sequential(BSplineKAN(D, 4), BSplineKAN(4, 1)),
    "hard_boundary": lambda: HardBoundary(_tanh_net(D)),
    "cheby_kan": lambda: nn.Sequential(ChebyKAN(D, 4, 4), nn.LayerNorm(4), ChebyKAN(4, 1, 3)),
    "transformer": lambda: TokenTransformer(D),
}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().to(f64)


def _points(model: nn.Module) -> torch.Tensor:
    return torch.rand(4, D, dtype=f64, generator=torch.Generator().manual_seed(1))


def _loop_laplacian(u, x):
    """The grad-of-grad loop PINN codes write, differentiable: attention on the math backend
    (whose double backward exists) and layer norm from means and a square root (the fused
    kernel's third derivative is wrong, pytorch/pytorch#175754; the directional finite
    differences below check the parameter gradients independently)."""
    x = x.detach().requires_grad_(True)
    with sdpa_kernel([SDPBackend.MATH]), SafeDerivatives(3, ""):
        y = u(x).reshape(len(x))
        (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        columns = [
            torch.autograd.grad(g[:, j].sum(), x, create_graph=True)[0][:, j]
            for j in range(x.shape[1])
        ]
    return sum(columns).reshape(len(x), 1)


def _finite_difference_laplacian(u, x, step=1e-4):
    with torch.no_grad():
        centre, total = u(x), 0
        for j in range(x.shape[1]):
            e = torch.zeros_like(x)
            e[:, j] = step
            total = total + u(x + e) - 2 * centre + u(x - e)
    return total / step**2


@pytest.fixture
def taylor_only(monkeypatch):
    """``"auto"`` may not fall back: the forward-over-reverse fallback is removed."""
    monkeypatch.setattr(_laplacian, "forward_over_reverse", None)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_laplacian_values_and_parameter_gradients(name, taylor_only):
    model = _model(name)
    x = _points(model)
    lap = torchdiv.laplacian(model, x)
    torch.testing.assert_close(torchdiv.laplacian(model, x, method="taylor"), lap)
    loop = _loop_laplacian(model, x)
    scale = loop.abs().max().item()
    torch.testing.assert_close(lap, loop, rtol=1e-10, atol=1e-10 * scale)
    # central differences: step^2 f''''/12 (SIREN: w0^4 = 8e5) + 4 eps |f| / step^2
    fd = _finite_difference_laplacian(model, x)
    torch.testing.assert_close(lap, fd, rtol=1e-5, atol=1e-5 * scale)

    params = dict(model.named_parameters())
    c = torch.linspace(-1, 1, len(x), dtype=f64).reshape(lap.shape)
    grads = torch.autograd.grad((c * lap).sum(), list(params.values()), materialize_grads=True)
    want = torch.autograd.grad((c * loop).sum(), list(params.values()), materialize_grads=True)
    for key, got, expected in zip(params, grads, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8 * scale, msg=key)

    g = torch.Generator().manual_seed(2)
    direction = {k: torch.randn(p.shape, dtype=f64, generator=g) for k, p in params.items()}
    eps = 1e-6

    def shifted(sign: float) -> torch.Tensor:
        moved = {k: p.detach() + sign * eps * direction[k] for k, p in params.items()}
        v = lambda z: functional_call(model, moved, (z,))  # noqa: E731
        return (c * torchdiv.laplacian(v, x, method="taylor")).sum()

    directional = sum((gr * direction[k]).sum() for k, gr in zip(params, grads, strict=True))
    expected = (shifted(1) - shifted(-1)) / (2 * eps)
    torch.testing.assert_close(directional, expected, rtol=1e-6, atol=1e-6 * scale)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func))
        return func(*args, **(kwargs or {}))


def test_frozen_eval_transformer_leaves_the_fast_path_and_is_exact(taylor_only):
    """Eval mode with frozen parameters: PyTorch runs ``_transformer_encoder_layer_fwd``,
    which has no derivatives; the recording turns the fast path off (and back on)."""
    model = _model("transformer").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = _points(model)
    with torch.no_grad(), _Ops() as ops:
        model(x)
    assert "aten._transformer_encoder_layer_fwd.default" in ops.seen  # the fast path is taken
    taylor = torchdiv.laplacian(model, x, method="taylor")
    assert torch.backends.mha.get_fastpath_enabled()
    torch.testing.assert_close(torchdiv.laplacian(model, x), taylor)
    torch.testing.assert_close(taylor, _loop_laplacian(model, x), rtol=1e-10, atol=1e-10)


def _loop_hessian(u, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``u(x)``, its gradient and Hessian per sample by grad-of-grad loops, differentiable
    (``x`` itself is used where it already requires grad: the biharmonic's outer loop)."""
    x = x if x.requires_grad else x.detach().requires_grad_(True)
    y = u(x).reshape(len(x))
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    rows = [torch.autograd.grad(g[:, j].sum(), x, create_graph=True)[0] for j in range(D)]
    return y, g, torch.stack(rows, 1)


def _trace(hessian: torch.Tensor, coordinates=range(D)) -> torch.Tensor:
    return sum(hessian[:, j, j] for j in coordinates).reshape(-1, 1)


def _value_gradient_laplacian(y, g, hessian) -> torch.Tensor:
    """``value_grad_laplacian``'s three, side by side: ``(N, 1 + D + 1)``."""
    return torch.cat([y[:, None], g, _trace(hessian)], 1)


torch.manual_seed(3)
_DIFFUSION = torch.randn(D, D, dtype=f64)
_DIFFUSION = _DIFFUSION + _DIFFUSION.T  # symmetric, indefinite: both signs' Laplacians
_SIGMA = torch.randn(D, 2, dtype=f64)

# (operator(u, x, method), reference(u, x), methods): on (x, y, t) inputs, Δ over space only
SECOND_ORDER = {
    "space_laplacian": (
        lambda u, x, m: torchdiv.laplacian(u, x, method=m, coordinates=[0, 1]),
        lambda u, x: _trace(_loop_hessian(u, x)[2], [0, 1]),
        ("auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad"),
    ),
    "value_grad_laplacian": (
        lambda u, x, m: torch.cat(
            [part.flatten(1) for part in torchdiv.value_grad_laplacian(u, x, method=m)], 1
        ),
        lambda u, x: _value_gradient_laplacian(*_loop_hessian(u, x)),
        ("auto", "taylor", "forward-over-reverse"),
    ),
    "weighted_laplacian": (
        lambda u, x, m: torchdiv.weighted_laplacian(u, x, diffusion=_DIFFUSION, method=m),
        lambda u, x: (_DIFFUSION * _loop_hessian(u, x)[2]).sum((1, 2)).reshape(-1, 1),
        ("auto", "taylor", "forward-over-reverse"),
    ),
    "weighted_laplacian_sigma": (
        lambda u, x, m: torchdiv.weighted_laplacian(u, x, sigma=_SIGMA, method=m),
        lambda u, x: ((_SIGMA @ _SIGMA.T) * _loop_hessian(u, x)[2]).sum((1, 2)).reshape(-1, 1),
        ("auto", "taylor", "forward-over-reverse"),
    ),
    "biharmonic": (
        lambda u, x, m: torchdiv.biharmonic(u, x, method=m),
        lambda u, x: _trace(_loop_hessian(lambda z: _trace(_loop_hessian(u, z)[2]), x)[2]),
        ("auto", "taylor", "forward-over-reverse"),
    ),
}


@pytest.mark.parametrize(
    "operator",
    [pytest.param(k, marks=[pytest.mark.slow] if k == "biharmonic" else []) for k in SECOND_ORDER],
)
@pytest.mark.parametrize(
    "name", ["siren", "fourier_features", "modified_mlp", "pirate_net", "bspline_kan"]
)
def test_second_order_operators_and_their_parameter_gradients(name, operator):
    """Every method of the second-order operators against grad-of-grad loops: values within
    1e-10 and the gradients of ``Σ c·value`` with respect to every parameter within 1e-8 (up
    to fifth derivatives for the biharmonic's)."""
    run, reference, methods = SECOND_ORDER[operator]
    model = _model(name)
    x = _points(model)
    params = list(model.parameters())
    want = reference(model, x)
    scale = want.abs().max().item()
    c = torch.linspace(-1, 1, want.numel(), dtype=f64).reshape(want.shape)
    expected = torch.autograd.grad((c * want).sum(), params, materialize_grads=True)
    for method in methods:
        got = run(model, x, method)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * scale, msg=method)
        grads = torch.autograd.grad((c * got).sum(), params, materialize_grads=True)
        for key, a, b in zip(dict(model.named_parameters()), grads, expected, strict=True):
            tol = 1e-8 * b.abs().max().item()
            torch.testing.assert_close(a, b, rtol=1e-8, atol=tol, msg=f"{method} {key}")


@pytest.mark.parametrize("method", ["auto", "taylor", "grad-of-grad"])
@pytest.mark.parametrize(
    "name", ["modified_mlp", pytest.param("pirate_net", marks=pytest.mark.slow)]
)
def test_lbfgs_closure_evaluations_match_a_fresh_reference(name, method):
    """``torch.optim.LBFGS(line_search_fn="strong_wolfe")`` changes the parameters in place
    between the closure's evaluations (the line search, then the next iteration): every
    evaluation of the heat residual ``u_t - 0.1 Δ_x u`` on ``(x, y, t)`` (the space-only
    Laplacian, the time derivative from ``jacobian``) and its parameter gradients match the
    grad-of-grad loop at the parameters of that evaluation, so nothing remembered from an
    earlier call (a plan, a recording, the loop's decision) holds stale weights."""
    model = _model(name)
    x = torch.rand(16, D, dtype=f64, generator=torch.Generator().manual_seed(4))
    params = list(model.parameters())
    optimiser = torch.optim.LBFGS(params, max_iter=4, line_search_fn="strong_wolfe")
    evaluations = []

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        u_t = torchdiv.jacobian(model, x)[:, 0, 2]
        lap = torchdiv.laplacian(model, x, method=method, coordinates=[0, 1])[:, 0]
        loss = (u_t - 0.1 * lap).square().mean()
        loss.backward()
        _, g, hessian = _loop_hessian(model, x)
        want = (g[:, 2] - 0.1 * _trace(hessian, [0, 1])[:, 0]).square().mean()
        expected = torch.autograd.grad(want, params, materialize_grads=True)
        torch.testing.assert_close(loss, want, rtol=1e-10, atol=0)
        for p, e in zip(params, expected, strict=True):  # the output bias: no gradient
            got = torch.zeros_like(p) if p.grad is None else p.grad
            torch.testing.assert_close(got, e, rtol=1e-8, atol=1e-8 * e.abs().max().item())
        evaluations.append(loss.item())
        return loss

    for _ in range(2):
        optimiser.step(closure)
    assert len(set(evaluations)) >= 4  # the parameters moved between evaluations


@pytest.mark.parametrize(
    ("inner", "outer"), [("auto", "auto"), ("forward", "reverse"), ("reverse", "forward")]
)
def test_linear_elasticity_residual_from_nested_jacobians(inner: str, outer: str) -> None:
    """The residual ``div sigma + f`` of linear elasticity as a user composes it: the stress
    ``sigma = λ tr(ε) I + 2μ ε`` of the strain ``ε = sym(∇u)`` from one ``jacobian``, its
    divergence the trace of the ``jacobian`` of that (a torchdiv call inside ``f``). Values and
    parameter gradients of ``‖div sigma + f‖²`` against the closed form
    ``μ Δu + (λ + μ) ∇(∇·u)`` from per-sample Hessians of plain autograd."""
    torch.manual_seed(7)
    lam, mu, d = 1.3, 0.7, 2
    net = nn.Sequential(nn.Linear(d, 16), nn.SiLU(), nn.Linear(16, d)).double()

    def u(x: torch.Tensor) -> torch.Tensor:  # clamped at x_0 = 0 and 1
        return net(x) * x[..., :1] * (1 - x[..., :1])

    def stress(x: torch.Tensor) -> torch.Tensor:
        grad_u = torchdiv.jacobian(u, x, method=inner)
        strain = (grad_u + grad_u.mT) / 2
        trace = strain.diagonal(dim1=-2, dim2=-1).sum(-1)
        return lam * trace[:, None, None] * torch.eye(d, dtype=x.dtype) + 2 * mu * strain

    x, force = torch.rand(4, d, dtype=torch.float64), torch.randn(4, d, dtype=torch.float64)
    hessians = torch.stack(
        [
            torch.stack(
                [
                    torch.autograd.functional.hessian(lambda z, i=i: u(z)[i], xb, create_graph=True)
                    for i in range(d)
                ]
            )
            for xb in x
        ]
    )  # (B, component, d, d)
    laplacian = hessians.diagonal(dim1=-2, dim2=-1).sum(-1)
    want = mu * laplacian + (lam + mu) * torch.einsum("bjji->bi", hessians)
    got = torch.einsum("bijj->bi", torchdiv.jacobian(stress, x, method=outer))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    params = list(net.parameters())
    loss = lambda div_stress: (div_stress + force).square().sum(-1).mean()  # noqa: E731
    for g, w in zip(
        torch.autograd.grad(loss(got), params),
        torch.autograd.grad(loss(want), params),
        strict=True,
    ):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
