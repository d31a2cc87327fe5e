"""PINN idioms as recent papers' and libraries' code writes them (rev-pinn23): DeepXDE's
"LAAF-10 tanh" (``tanh(n a z)``, one learnable ``a`` shared by every layer, as its ``LLAAF``
module is), per-neuron adaptive slopes, trainable random Fourier features, a jaxpi-style
periodic embedding with a hard boundary factor, and a causal PINN's ``(T, X, 2)`` grid of
``(x, t)`` points taken with ``batch_dims=2``.

Values and parameter gradients against float64 grad-of-grad loops for every method, the
Laplacian over space only (``coordinates=[0]``) with ``value_grad_laplacian``'s ``u_t``; the
adaptive activations and Fourier features are not mistaken for a plain tanh chain
(``_laplacian.chain``), which a plain tanh MLP takes. On the grid, a model written for
``(N, 2)`` rows (``x[:, 0:1]`` for the coordinate ``x``) picks grid column 0, a sample, for
every point: until this review the watch followed no sample picked along one of several
batch dimensions, so ``"auto"``, ``"taylor"`` and ``"hutchinson"`` answered (Taylor 8 where
the per-sample Laplacian is 4, silently) instead of raising ``BatchInteractionError``.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math

import pytest
import torch
from conftest import laplacians_by_grad_of_grad
from torch import nn

import torchdiv

f64 = torch.float64


class LLAAF(nn.Module):
    """DeepXDE's layer-wise locally adaptive activation: ``phi(n a z)``, ``a = 1 / n`` first."""

    def __init__(self, n: int = 10) -> None:
        super().__init__()
        self.n = n
        self.a = nn.Parameter(torch.tensor(1.0 / n))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.n * self.a * z)


class Fnn(nn.Module):
    """DeepXDE's ``FNN``: ``ModuleList`` of linears, one activation object for all layers."""

    def __init__(self, sizes: list[int], activation: nn.Module) -> None:
        super().__init__()
        self.activation = activation
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for linear in self.linears[:-1]:
            x = self.activation(linear(x))
        return self.linears[-1](x)


class NeuronLaaf(nn.Module):
    """Neuron-wise adaptive slopes (Jagtap et al. 2020): ``tanh(n a_i z_i)`` per neuron."""

    def __init__(self, d_in: int, width: int, n: int = 10) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(d_in, width), nn.Linear(width, width)
        self.out = nn.Linear(width, 1)
        self.n = n
        self.a = nn.Parameter(torch.full((2, width), 1.0 / n) + 0.01 * torch.randn(2, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.n * self.a[0] * self.first(x))
        return self.out(torch.tanh(self.n * self.a[1] * self.second(h)))


class FourierFeatures(nn.Module):
    """Random Fourier features with a trainable ``B`` (``x @ B``, then ``[cos, sin]``)."""

    def __init__(self, d_in: int, features: int, width: int) -> None:
        super().__init__()
        self.B = nn.Parameter(2.0 * torch.randn(d_in, features))
        self.mlp = nn.Sequential(nn.Linear(2 * features, width), nn.Tanh(), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x @ self.B
        return self.mlp(torch.cat([torch.cos(z), torch.sin(z)], -1))


class PeriodicHard(nn.Module):
    """jaxpi's periodic embedding of ``x`` (``cos``/``sin`` of ``2 pi k x / L``, ``L``
    trainable), ``t`` passed through, and a hard initial condition ``u(x, 0) = sin(pi x)``.
    Written for ``(..., 2)`` points: the coordinates by ``x[..., 0:1]``."""

    def __init__(self, width: int, modes: int = 2) -> None:
        super().__init__()
        self.period = nn.Parameter(torch.tensor(2.0))
        self.register_buffer("k", torch.arange(1.0, modes + 1))
        self.mlp = nn.Sequential(
            nn.Linear(2 * modes + 1, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh()
        )
        self.out = nn.Linear(width, 1)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        x, t = points[..., 0:1], points[..., 1:2]
        w = 2 * math.pi * self.k / self.period * x
        h = self.mlp(torch.cat([torch.cos(w), torch.sin(w), t], -1))
        return torch.sin(math.pi * x) + t * self.out(h)


class RowsHard(PeriodicHard):
    """The same model with its hard condition written for ``(N, 2)`` rows, as DeepXDE's
    output transforms are (``lambda x, y: sin(pi x[:, 0:1]) + x[:, 1:2] * y``)."""

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        w = 2 * math.pi * self.k / self.period * points[..., 0:1]
        h = self.mlp(torch.cat([torch.cos(w), torch.sin(w), points[..., 1:2]], -1))
        return torch.sin(math.pi * points[:, 0:1]) + points[:, 1:2] * self.out(h)


MODELS = {
    "dde_laaf": lambda: Fnn([2, 8, 8, 1], LLAAF()),
    "neuron_laaf": lambda: NeuronLaaf(2, 8),
    "fourier_features": lambda: FourierFeatures(2, 4, 8),
    "periodic_hard": lambda: PeriodicHard(8),
    "tanh": lambda: Fnn([2, 8, 8, 1], nn.Tanh()),
}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().to(f64)


def _reference(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``u_t`` and ``u_xx`` of ``u(x, t)`` by grad of grad, differentiable, ``(N,)`` each."""
    z = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model(z).sum(), z, create_graph=True)
    (h,) = torch.autograd.grad(g[:, 0].sum(), z, create_graph=True)
    return g[:, 1], h[:, 0]


def _assert_gradients(model: nn.Module, got: torch.Tensor, want: torch.Tensor) -> None:
    """Values within 1e-10 and the gradients of ``Σ c·value`` for every parameter within 1e-8
    (float64; third derivatives through ``tanh``, ``sin`` and the adaptive slopes)."""
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    params = list(model.parameters())
    c = torch.linspace(-1, 1, want.numel(), dtype=f64).reshape(want.shape)
    expected = torch.autograd.grad(
        (c * want).sum(), params, retain_graph=True, materialize_grads=True
    )
    grads = torch.autograd.grad((c * got).sum(), params, retain_graph=True, materialize_grads=True)
    for key, a, b in zip(dict(model.named_parameters()), grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8 * b.abs().max().item(), msg=key)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_heat_residual_terms_and_parameter_gradients(name: str, laplacian_chained) -> None:
    """``Δu`` (every method), ``u_xx`` by ``coordinates=[0]`` and ``value_grad_laplacian``'s
    ``u_t`` with it (every sweep method), values and parameter gradients; only the plain tanh
    MLP is taken by the chain (adaptive slopes and Fourier features are products and sines
    the chain does not list)."""
    model = _model(name)
    x = torch.rand(6, 2, dtype=f64, generator=torch.Generator().manual_seed(1))
    want = laplacians_by_grad_of_grad(model, x)
    torchdiv.laplacian(model, x)  # "auto"'s deciding call runs Taylor, the later ones loop
    for method in ("auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad"):
        _assert_gradients(model, torchdiv.laplacian(model, x, method=method), want)
    assert (True in laplacian_chained) == (name == "tanh")  # ("auto" loops: the fixture)
    u_t, u_xx = _reference(model, x)
    for method in ("auto", "taylor", "forward-over-reverse"):
        got = torchdiv.laplacian(model, x, method=method, coordinates=[0])
        _assert_gradients(model, got[:, 0], u_xx)
        out = torchdiv.value_grad_laplacian(model, x, method=method, coordinates=[0])
        _assert_gradients(model, out.gradient[:, 0, 1], u_t)
        _assert_gradients(model, out.laplacian[:, 0], u_xx)


def _grid() -> torch.Tensor:
    """A causal PINN's collocation points: ``T = 2`` time slices of ``X = 3`` points."""
    g = torch.Generator().manual_seed(2)
    return torch.rand(2, 3, 2, dtype=f64, generator=g)


OPERATORS = {
    "laplacian": lambda u, x, m: torchdiv.laplacian(u, x, batch_dims=2, method=m),
    "space_laplacian": lambda u, x, m: torchdiv.laplacian(
        u, x, batch_dims=2, method=m, coordinates=[0]
    ),
    "value_grad_laplacian": lambda u, x, m: (
        torchdiv.value_grad_laplacian(u, x, batch_dims=2, method=m, coordinates=[0]).laplacian
    ),
    "hutchinson": lambda u, x, m: torchdiv.laplacian(
        u, x, batch_dims=2, method="hutchinson", probes=torch.ones(1, *x.shape, dtype=f64)
    ),
}


@pytest.mark.parametrize(
    ("operator", "method"),
    [
        (k, m)
        for k in sorted(OPERATORS)
        for m in ("auto", "taylor")
        if k != "hutchinson" or m == "auto"
    ],
)
def test_a_rows_model_on_a_time_slice_grid_is_refused(operator: str, method: str) -> None:
    """``points[:, 0:1]`` of a ``(T, X, 2)`` grid is grid column 0, a sample beside every
    other: refused, naming the batch dimension; the model written with ``points[..., 0:1]``
    gives the grad-of-grad loop's Laplacian on the flattened points."""
    run = OPERATORS[operator]
    torch.manual_seed(0)
    rows = RowsHard(8).to(f64)
    x = _grid()
    with pytest.raises(torchdiv.BatchInteractionError, match="dimension 1 of"):
        run(rows, x, method)
    right = PeriodicHard(8).to(f64)
    right.load_state_dict(rows.state_dict())
    got = run(right, x, method)
    if operator != "hutchinson":  # (its one all-ones probe sums the whole Hessian)
        flat = x.reshape(-1, 2)
        if operator == "laplacian":
            want = laplacians_by_grad_of_grad(right, flat)
        else:
            want = _reference(right, flat)[1][:, None]
        _assert_gradients(right, got, want.reshape(got.shape))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dde_laaf", "periodic_hard"])
def test_adam_then_lbfgs_with_causal_weights_matches_a_grad_of_grad_twin(name: str) -> None:
    """Wang et al.'s causal training: per-time-slice residual losses weighted by
    ``exp(-eps Σ_{k<i} L_k)`` (detached), the residual ``u_t - 0.01 u_xx`` from one
    ``value_grad_laplacian`` (``coordinates=[0]``); 3 Adam steps, then 2 L-BFGS steps (strong
    Wolfe: its closure re-evaluates the residual at moved parameters), points resampled each
    step: every loss and the final parameters as a twin trained with grad-of-grad loops."""
    model = _model(name)
    twin = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(5)

    def _closure(optimiser, u: nn.Module, x: torch.Tensor, ours: bool) -> torch.Tensor:
        optimiser.zero_grad()
        value = loss(u, x, ours)
        value.backward()
        losses[ours].append(value.item())
        return value

    def loss(u: nn.Module, x: torch.Tensor, ours: bool) -> torch.Tensor:
        if ours:
            out = torchdiv.value_grad_laplacian(u, x, coordinates=[0])
            u_t, u_xx = out.gradient[:, 0, 1], out.laplacian[:, 0]
        else:
            u_t, u_xx = _reference(u, x)
        slices = (u_t - 0.01 * u_xx).square().reshape(4, -1).mean(1)
        before = torch.cat([slices.new_zeros(1), slices[:-1]]).cumsum(0)
        return (torch.exp(-before).detach() * slices).mean()

    losses: dict[bool, list[float]] = {True: [], False: []}
    for kind, steps in (("adam", 3), ("lbfgs", 2)):
        optimisers = {
            ours: torch.optim.Adam(u.parameters(), 1e-2)
            if kind == "adam"
            else torch.optim.LBFGS(u.parameters(), max_iter=4, line_search_fn="strong_wolfe")
            for ours, u in ((True, model), (False, twin))
        }
        for _ in range(steps):
            x = torch.rand(32, 2, dtype=f64, generator=generator)
            x = x[x[:, 1].argsort()]  # time slices in order
            for ours, u in ((True, model), (False, twin)):
                optimisers[ours].step(functools.partial(_closure, optimisers[ours], u, x, ours))
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]))
    assert len(losses[True]) > 5  # the line search evaluated the closure more than once
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
