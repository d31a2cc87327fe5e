"""Adversarial review of optim27's ``estimate_trace`` state handling (rev-optim27).

optim27 made every call of a ``matmat`` that evaluates a module start from the state the
first call found, but only where ``matmat`` was seen to reach an ``nn.Module`` (a walk of its
closure three levels deep, containers of at most 32 items): a ``matmat`` whose state sits in
plain tensors (a hand-written power iteration on a buffer ``u``, the functional style of
JAX ports), or whose module sits deeper (a trainer's ``self.cfg.model``, a dictionary of
40 entries), ran its power iteration once per chunk, silently (0.36 off the one-evaluation
estimate, ``u`` 0.41 off, at 6 probes in chunks of 2). The reference: the same Hutchinson sum
by hand on one evaluation (``torch.autograd.grad`` in float64), the same probes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import torchdiv
from tests.conftest import assert_close
from tests.estimators.test_optim27_matmat import _series as power_series
from tests.estimators.test_optim27_matmat import assert_gradients_alike

f64 = torch.float64
D, B, K = 4, 5, 6
COEFFICIENTS = (1.0, -1 / 2, 1 / 3)  # log(1 + t) = t - t^2/2 + t^3/3 - ...


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(B, D, dtype=f64, generator=torch.Generator().manual_seed(1))
    signs = torch.randint(0, 2, (K, B, D), generator=torch.Generator().manual_seed(2))
    return x, (2 * signs - 1).to(f64)


def _series(gx: torch.Tensor, z: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """optim27's power series of VJPs with these coefficients."""
    return power_series(gx, z, probes, COEFFICIENTS)


class _Functional:
    """A residual branch in plain tensors: ``tanh(z (W / sigma)^T)``, ``sigma`` by one power
    iteration on the buffer ``u`` at every evaluation (``spectral_norm``'s, by hand)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.weight = torch.randn(D, D, dtype=f64, generator=g).requires_grad_(True)
        self.u = F.normalize(torch.randn(D, dtype=f64, generator=g), dim=0)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        w = self.weight
        with torch.no_grad():
            v = F.normalize(w.t() @ self.u, dim=0)
            self.u.copy_(F.normalize(w @ v, dim=0))
        return torch.tanh(z @ (w / (self.u @ w @ v)).t())


def _spectral() -> nn.Module:
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, D)).to(f64)
    nn.utils.spectral_norm(g[0])
    return g.train()


class _Holder:
    """A trainer's attribute bag (``self.state.model``)."""


def _deep(g: nn.Module):
    """``g`` three plain objects down (beyond the closure walk's depth)."""
    holder = _Holder()
    holder.state = _Holder()
    holder.state.nets = _Holder()
    holder.state.nets.g = g
    return lambda z: holder.state.nets.g(z)


def _many(g: nn.Module):
    """``g`` in a dictionary of 41 entries (beyond the walk's 32)."""
    nets = {**{f"aux{i}": i for i in range(40)}, "g": g}
    return lambda z: nets["g"](z)


BRANCHES = {
    "plain tensors": (_Functional, lambda g: g, lambda g: g.u),
    "a module three objects down": (_spectral, _deep, lambda g: g[0].weight_u),
    "a module in a large dictionary": (_spectral, _many, lambda g: g[0].weight_u),
}


@pytest.mark.parametrize("case", list(BRANCHES))
@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_a_matmat_s_state_outside_reached_modules_moves_once(case: str, method: str):
    """Each call of ``matmat`` starts from the state the first found whatever holds that
    state: the estimate, its parameter gradients and the buffer after the call are those of
    the same estimate over one evaluation kept outside ``matmat``."""
    make, reach, buffer = BRANCHES[case]
    x, probes = _inputs()
    ours, kept = make(), make()
    g = reach(ours)

    def matmat(v: torch.Tensor) -> torch.Tensor:
        z = x.detach().requires_grad_(True)
        return _series(g(z), z, v)

    z = x.detach().requires_grad_(True)
    gx = kept(z)

    def options() -> dict:  # (a fresh generator for each estimate: the same probes)
        if method == "hutchinson":
            return dict(probes=probes, chunk_size=2)
        return dict(method=method, num_probes=K, generator=torch.Generator().manual_seed(3))

    if method == "hutchinson":  # (the hand sum itself)
        want = (_series(gx, z, probes) * probes).sum(-1).mean(0)
    else:  # (Hutch++ over the kept graph: its sketch and residual pass on one evaluation)
        want = torchdiv.estimate_trace(lambda v: _series(gx, z, v), x, **options()).value
    est = torchdiv.estimate_trace(matmat, x, **options())
    assert_close(est.value, want)  # (float64: a few hundred flops deep)
    assert_close(buffer(ours), buffer(kept))
    params = [p for p in (ours.parameters() if isinstance(ours, nn.Module) else [ours.weight])]
    ref = [p for p in (kept.parameters() if isinstance(kept, nn.Module) else [kept.weight])]
    assert_gradients_alike(est.value, params, want, ref)


def test_a_functional_dropout_draws_one_mask():
    """``F.dropout`` in a ``matmat`` over plain tensors: every chunk sees one mask (the
    estimate of one operator), and the global generator moves as one evaluation's draw."""
    x, probes = _inputs()
    weight = torch.randn(D, D, dtype=f64, generator=torch.Generator().manual_seed(0))

    def g(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.dropout(z @ weight.t(), 0.5, training=True))

    def matmat(v: torch.Tensor) -> torch.Tensor:
        z = x.detach().requires_grad_(True)
        return _series(g(z), z, v)

    torch.manual_seed(5)
    z = x.detach().requires_grad_(True)
    want = (_series(g(z), z, probes) * probes).sum(-1).mean(0)
    rng = torch.get_rng_state()
    torch.manual_seed(5)
    est = torchdiv.estimate_trace(matmat, x, probes=probes, chunk_size=2)
    assert_close(est.value, want)
    assert torch.equal(torch.get_rng_state(), rng)
