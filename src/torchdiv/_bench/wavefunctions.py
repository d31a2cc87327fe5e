"""Variational Monte Carlo wavefunctions, for tests and ``bench/wavefunction.py``.

Both map electron positions ``r`` of shape ``(B, N, 3)`` to ``log|psi(r)|`` of shape ``(B,)``;
the local kinetic energy needs ``laplacian(model, r)``, and training needs its gradient with
respect to the parameters.

- ``SlaterJastrow``: one determinant of orbitals ``phi_j(r_i)`` (an MLP on each electron,
  times an exponential envelope) and a Padé Jastrow factor ``sum_{i<j} a r_ij / (1 + b r_ij)``
  over the pair distances (the standard VMC trial function).
- ``FermiNetLike``: one-electron and pairwise streams mixed by means over electrons (as in
  FermiNet, Pfau et al. 2020), two determinants of envelope-weighted orbitals, combined as
  ``log|sum_k w_k det_k|`` by a max-shifted sum of exponentials.

The orbitals do not depend on spin (one determinant over all electrons), which is enough to
exercise every derivative the Laplacian takes.
"""

from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor


def pair_distances(r: Tensor) -> Tensor:
    """``|r_i - r_j|`` for ``i < j``, shape ``(B, N (N - 1) / 2)``."""
    i, j = torch.triu_indices(r.shape[-2], r.shape[-2], offset=1, device=r.device)
    return (r[..., i, :] - r[..., j, :]).square().sum(-1).sqrt()


class SlaterJastrow(nn.Module):
    """``log|det phi_j(r_i)| + sum_{i<j} a r_ij / (1 + b r_ij)``: ``(B, N, 3) -> (B,)``."""

    def __init__(self, electrons: int, hidden: int = 32):
        super().__init__()
        self.orbitals = nn.Sequential(
            nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
            nn.Linear(hidden, electrons),
        )  # fmt: skip
        self.decay = nn.Parameter(torch.linspace(0.5, 1.0, electrons))
        self.jastrow = nn.Parameter(torch.tensor([0.5, 1.0]))  # a, b

    def forward(self, r: Tensor) -> Tensor:
        radius = r.square().sum(-1, keepdim=True).sqrt()  # (B, N, 1)
        phi = self.orbitals(r) * torch.exp(-self.decay * radius)  # (B, N electrons, N orbitals)
        a, b = self.jastrow
        d = pair_distances(r)
        return torch.linalg.slogdet(phi).logabsdet + (a * d / (1 + b * d)).sum(-1)


class FermiNetLike(nn.Module):
    """``log|sum_k w_k det_k|`` over FermiNet-style mixed streams: ``(B, N, 3) -> (B,)``."""

    def __init__(self, electrons: int, hidden: int = 16, pair: int = 8, layers: int = 2):
        super().__init__()
        self.electrons, self.dets = electrons, 2
        self.one = nn.Linear(4, hidden)
        self.two = nn.Linear(4, pair)
        self.mix = nn.ModuleList(nn.Linear(2 * hidden + pair, hidden) for _ in range(layers))
        self.orbitals = nn.Linear(hidden, self.dets * electrons)
        self.decay = nn.Parameter(torch.linspace(0.6, 1.0, self.dets * electrons))
        self.weights = nn.Parameter(torch.tensor([1.0, -0.5]))

    def forward(self, r: Tensor) -> Tensor:
        n, k = self.electrons, self.dets
        radius = r.square().sum(-1, keepdim=True).sqrt()  # (B, N, 1)
        diff = r[..., :, None, :] - r[..., None, :, :]  # (B, N, N, 3)
        # softened so that the zero diagonal (i = j) has finite derivatives
        dist = (diff.square().sum(-1, keepdim=True) + 1e-2).sqrt()
        h = torch.tanh(self.one(torch.cat([r, radius], -1)))  # (B, N, hidden)
        g = torch.tanh(self.two(torch.cat([diff, dist], -1))).mean(-2)  # (B, N, pair)
        for layer in self.mix:
            mean = h.mean(-2, keepdim=True).expand_as(h)
            h = h + torch.tanh(layer(torch.cat([h, mean, g], -1)))
        envelope = torch.exp(-self.decay * radius)  # (B, N, k N)
        phi = (self.orbitals(h) * envelope).unflatten(-1, (k, n)).transpose(-3, -2)
        sign, logdet = torch.linalg.slogdet(phi)  # (B, k)
        shift = logdet.amax(-1, keepdim=True)
        total = (self.weights * sign * torch.exp(logdet - shift)).sum(-1)
        return total.abs().log() + shift.squeeze(-1)
