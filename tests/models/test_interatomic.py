"""An ANI-style interatomic potential (Smith, Isayev & Roitberg 2017; TorchANI's layout):
radial atomic environment vectors with a cosine cutoff, one CELU(0.1) network per species, the
energy a sum over atoms. In float64: the Laplacian of the energy (the trace of the Hessian,
``Σ`` of the force constants), ``value_grad_laplacian`` (energy, minus the forces, Laplacian)
and the divergence of the force field ``-∇E`` by every method, and parameter gradients of each.

Reference: the same network with CELU written as ``where(z > 0, z, alpha expm1(z / alpha))``
through a grad-of-grad loop. PyTorch's own derivatives of ``celu`` take ``1/alpha`` rounded to
float32: every engine of PyTorch derivatives was off by 1.5e-8 relative before
``SafeDerivatives`` replaced ``celu`` by ``elu(z, alpha, 1, 1/alpha)`` (``"taylor"`` was right).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torchdiv

f64 = torch.float64
ALPHA = 0.1  # TorchANI's CELU
SHIFTS = (0.8, 1.4, 2.0, 2.6)  # radial shifts R_s (Å)
CUTOFF, ETA = 3.5, 4.0


class Celu(nn.Module):
    """``nn.CELU(ALPHA)``, or (``composite``) the reference: the same values from ops whose
    PyTorch derivatives are right."""

    def __init__(self, composite: bool):
        super().__init__()
        self.composite = composite

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.composite:
            return torch.where(z > 0, z, ALPHA * torch.expm1(z / ALPHA))
        return nn.functional.celu(z, ALPHA)


class AniLike(nn.Module):
    """``E(r) = Σ_i net_{s_i}(G_i)`` with
    ``G_i[s, k] = Σ_{j≠i, s_j = s} exp(-η (r_ij - R_k)²) f_c(r_ij)`` and
    ``f_c(d) = (cos(π d / R_c) + 1) / 2`` inside the cutoff; ``r``: ``(B, atoms, 3)``."""

    def __init__(self, species: list[int], scatter: bool, composite: bool = False, width: int = 8):
        super().__init__()
        self.scatter = scatter  # TorchANI's index_add into the AEV, else a dense contraction
        kinds = max(species) + 1
        self.register_buffer("species", torch.tensor(species))
        self.register_buffer("shifts", torch.tensor(SHIFTS))
        self.nets = nn.ModuleList(
            nn.Sequential(
                nn.Linear(kinds * len(SHIFTS), width),
                Celu(composite),
                nn.Linear(width, width),
                Celu(composite),
                nn.Linear(width, 1),
            )
            for _ in range(kinds)
        )

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        n = r.shape[-2]
        i, j = (~torch.eye(n, dtype=torch.bool)).nonzero().T  # ordered pairs i != j
        d = (r[:, i] - r[:, j]).norm(dim=-1)  # (B, pairs)
        cut = torch.where(d <= CUTOFF, 0.5 * torch.cos(math.pi * d / CUTOFF) + 0.5, 0.0)
        radial = torch.exp(-ETA * (d[..., None] - self.shifts) ** 2) * cut[..., None]
        kinds = len(self.nets)
        if self.scatter:
            slot = i * kinds + self.species[j]  # atom i's block for neighbour j's species
            aev = r.new_zeros(r.shape[0], n * kinds, len(SHIFTS)).index_add(1, slot, radial)
        else:
            first = (i == torch.arange(n)[:, None]).to(r.dtype)  # (atoms, pairs)
            kind = (self.species[j, None] == torch.arange(kinds)).to(r.dtype)  # (pairs, kinds)
            aev = torch.einsum("ap,ps,bpk->bask", first, kind, radial)
        aev = aev.reshape(r.shape[0], n, -1)
        energies = [self.nets[s](aev[:, self.species == s]).sum((1, 2)) for s in range(kinds)]
        return torch.stack(energies).sum(0)


def _models(scatter: bool = False) -> tuple[AniLike, AniLike]:
    torch.manual_seed(0)
    model = AniLike([0, 0, 1, 1], scatter).to(f64)
    reference = AniLike([0, 0, 1, 1], scatter, composite=True).to(f64)
    reference.load_state_dict(model.state_dict())
    return model, reference


def _coordinates() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return 1.2 * torch.randn(3, 4, 3, dtype=f64, generator=g)


def _loop(energy: nn.Module, r: torch.Tensor):
    """Energy, gradient and Laplacian by a grad-of-grad loop over the 12 coordinates."""
    r = r.detach().requires_grad_(True)
    e = energy(r)
    (g,) = torch.autograd.grad(e.sum(), r, create_graph=True)
    flat = g.flatten(1)
    columns = [
        torch.autograd.grad(flat[:, k].sum(), r, create_graph=True)[0].flatten(1)[:, k]
        for k in range(flat.shape[1])
    ]
    return e, g, torch.stack(columns, 1).sum(1)


def _assert_close_with_gradients(got, want, model, reference, rtol):
    """Values and the gradients of ``Σ c·value`` with respect to every parameter."""
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale)
    c = torch.linspace(-1, 1, want.numel(), dtype=f64).reshape(want.shape)
    grads = torch.autograd.grad(
        (c * got).sum(), list(model.parameters()), retain_graph=True, materialize_grads=True
    )
    expected = torch.autograd.grad(
        (c * want).sum(), list(reference.parameters()), retain_graph=True, materialize_grads=True
    )
    for name, a, b in zip(dict(model.named_parameters()), grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item(), msg=name)


# float64 through ~10 ops from the input: a few hundred ulps; the float32-rounded 1/alpha was 1.5e-8
RTOL = 1e-10


SCATTER = pytest.mark.parametrize("scatter", [True, False], ids=["index_add", "dense"])


@SCATTER
@pytest.mark.parametrize(
    "method", ["auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad"]
)
def test_laplacian_of_the_energy(method, scatter):
    """Every method, TorchANI's ``index_add`` into the AEV included (recorded as
    ``index_put(accumulate=True)``, which ``"taylor"`` refused before it had a rule)."""
    model, reference = _models(scatter)
    r = _coordinates()
    lap = torchdiv.laplacian(model, r, method=method)
    _assert_close_with_gradients(lap, _loop(reference, r)[2], model, reference, RTOL)


@SCATTER
@pytest.mark.parametrize("method", ["auto", "taylor", "forward-over-reverse"])
def test_energy_forces_and_laplacian_in_one_sweep(method, scatter):
    """Also the energy's own parameter gradients (a VMC or force-matching loss's): the
    evaluation beside the nested methods took PyTorch's ``celu`` derivative."""
    model, reference = _models(scatter)
    r = _coordinates()
    got = torchdiv.value_grad_laplacian(model, r, method=method)
    e, g, lap = _loop(reference, r)
    _assert_close_with_gradients(got.value, e, model, reference, RTOL)
    _assert_close_with_gradients(got.gradient, g, model, reference, RTOL)
    _assert_close_with_gradients(got.laplacian, lap, model, reference, RTOL)


@pytest.mark.parametrize("method", ["auto", "structured", "forward", "reverse"])
def test_divergence_of_a_celu_field(method):
    """A per-atom field: each atom's coordinates moved by the species networks' read-out of
    its own position, ``v(r)_i = W2 celu(W1 r_i)``; the trace by every exact method."""
    model, reference = _models()
    r = _coordinates()

    def field(net: AniLike):
        head = nn.Sequential(*list(net.nets[0])[:-1])  # 8 -> 8, both activations
        lift = torch.linspace(-1, 1, 24, dtype=f64).reshape(8, 3)
        back = torch.linspace(1, -1, 24, dtype=f64).reshape(3, 8)
        return lambda z: head(z @ lift.T) @ back.T

    div = torchdiv.divergence(field(model), r, method=method)
    want = _loop_divergence(field(reference), r)
    _assert_close_with_gradients(div, want, model, reference, RTOL)


def _loop_divergence(v, r: torch.Tensor) -> torch.Tensor:
    r = r.detach().requires_grad_(True)
    y = v(r).flatten(1)
    return sum(
        torch.autograd.grad(y[:, k].sum(), r, create_graph=True)[0].flatten(1)[:, k]
        for k in range(y.shape[1])
    )


def test_a_graph_with_celu_keeps_pytorch_s_derivatives():
    """``graph_laplacian`` cannot replace ops in the caller's graph: with ``create_graph`` it
    is not refused for ``celu`` (off by the float32 rounding only, documented), as it is for
    ops whose third derivative PyTorch gets wrong."""
    model, reference = _models()
    r = _coordinates().requires_grad_(True)
    lap = torchdiv.graph_laplacian(model(r), r, create_graph=True)
    want = _loop(reference, r)[2]
    torch.testing.assert_close(lap, want, rtol=1e-7, atol=1e-7 * want.abs().max().item())
