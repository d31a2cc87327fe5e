"""Separable PINNs (Cho et al., NeurIPS 2023) as their code writes them: one MLP per axis, each
mapping that axis's points ``(N_a, 1)`` to ``r`` features, combined over the whole grid by an
einsum over the rank, ``u[i, j, k] = Σ_r X[i, r] Y[j, r] Z[k, r]``.

A grid output is not one sample per input row, so two ways fit torchdiv's per-sample
contract, and both must be exact (values and parameter gradients against a grad-of-grad loop
at each grid point, evaluated through the full model one point at a time):

- per axis: the batch is that axis's points, ``f = lambda a: spinn(x, a, z).movedim(1, 0)``,
  whose sample ``j`` is the slab ``u[:, j, :]`` (it depends on ``y_j`` only); its Laplacian is
  ``∂²u/∂y²`` on the grid;
- unbatched (``batch_dims=0``): all axes' points in one event; since ``u[i, j, k]`` depends on
  ``x_i``, ``y_j`` and ``z_k`` alone, the Laplacian over the event is ``u_xx + u_yy + u_zz``,
  and ``coordinates=`` the first axis's points gives ``u_xx``.

Forgetting the ``movedim`` with square grids puts the samples along an event dimension: a
mix that ``"auto"`` must refuse, not answer.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchdiv

f64 = torch.float64
N = 3  # points per axis (equal: the forgotten movedim keeps the shapes valid)


class AxisNet(nn.Module):
    """One axis's MLP: ``(N_a, 1) -> (N_a, r)``."""

    def __init__(self, width: int = 8, rank: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(1, width),
            nn.Tanh(),
            nn.Linear(width, width),
            nn.Tanh(),
            nn.Linear(width, rank),
        )

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.net(a)


class Spinn3(nn.Module):
    """``(x, y, z)`` axis points -> ``u`` on their grid, shape ``(N_x, N_y, N_z)``."""

    def __init__(self) -> None:
        super().__init__()
        self.fx, self.fy, self.fz = AxisNet(), AxisNet(), AxisNet()

    def forward(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        xy = torch.einsum("xr,yr->xyr", self.fx(x), self.fy(y))
        return torch.einsum("xyr,zr->xyz", xy, self.fz(z))


def _setup() -> tuple[Spinn3, list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    model = Spinn3().to(f64)
    axes = [torch.rand(N, 1, dtype=f64) for _ in range(3)]
    return model, axes, torch.randn(N, N, N, dtype=f64)


def _loop_second_derivatives(model: Spinn3, axes: list[torch.Tensor]) -> torch.Tensor:
    """``∂²u/∂a²`` for each axis ``a`` at every grid point, shape ``(3, N, N, N)``, by
    grad-of-grad through the model evaluated at that one point (kept differentiable)."""
    out = []
    for axis in range(3):
        grid = []
        for i, j, k in torch.cartesian_prod(*(torch.arange(N),) * 3).tolist():
            point = [
                a[n : n + 1].clone().requires_grad_(d == axis)
                for d, (a, n) in enumerate(zip(axes, (i, j, k), strict=True))
            ]
            u = model(*point).reshape(())
            (g,) = torch.autograd.grad(u, point[axis], create_graph=True)
            (h,) = torch.autograd.grad(g.sum(), point[axis], create_graph=True)
            grid.append(h.reshape(()))
        out.append(torch.stack(grid).reshape(N, N, N))
    return torch.stack(out)


def _parameter_gradients(model: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters())))


@pytest.mark.parametrize(
    "method", ["auto", "taylor", pytest.param("forward-over-reverse", marks=pytest.mark.slow)]
)
def test_per_axis_and_unbatched_laplacians_match_a_pointwise_loop(method: str) -> None:
    model, (x, y, z), w = _setup()
    second = _loop_second_derivatives(model, [x, y, z])
    want = _parameter_gradients(model, (w * second.sum(0)).sum())

    uxx = torchdiv.laplacian(lambda a: model(a, y, z), x, method=method)
    uyy = torchdiv.laplacian(lambda a: model(x, a, z).movedim(1, 0), y, method=method)
    uzz = torchdiv.laplacian(lambda a: model(x, y, a).movedim(2, 0), z, method=method)
    per_axis = torch.stack([uxx, uyy.movedim(0, 1), uzz.movedim(0, 2)])
    torch.testing.assert_close(per_axis, second.detach(), rtol=1e-12, atol=1e-12)
    got = _parameter_gradients(model, (w * per_axis.sum(0)).sum())
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    flat = torch.cat([x, y, z]).reshape(-1)

    def on_grid(v: torch.Tensor) -> torch.Tensor:
        return model(v[:N, None], v[N : 2 * N, None], v[2 * N :, None])

    whole = torchdiv.laplacian(on_grid, flat, batch_dims=0, method=method)
    torch.testing.assert_close(whole, second.sum(0).detach(), rtol=1e-12, atol=1e-12)
    got = _parameter_gradients(model, (w * whole).sum())
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    only_x = torchdiv.laplacian(on_grid, flat, batch_dims=0, method=method, coordinates=range(N))
    torch.testing.assert_close(only_x, second[0].detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "operator",
    [torchdiv.laplacian, torchdiv.jacobian, torchdiv.value_grad_laplacian, torchdiv.biharmonic],
    ids=lambda op: op.__name__,
)
def test_samples_left_along_the_grid_are_refused(operator) -> None:
    """``spinn(x, a, z)`` without ``movedim(1, 0)``: ``a``'s samples index dimension 1."""
    model, (x, y, z), _ = _setup()
    with pytest.raises(torchdiv.BatchInteractionError, match="dimension 1"):
        operator(lambda a: model(x, a, z), y)
