"""rev-merges28: ``log_likelihood``'s refusal of a backward pass through
``solver="scipy_solver"`` (no graph) for an ``f`` that holds its parameters deeper than the
walk of what it holds looks (wrappers of wrappers)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchdiv.flows import log_likelihood


class _Field:
    def __init__(self, m: nn.Module) -> None:
        self.m = m

    def __call__(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.m(z)


class _Outer:
    def __init__(self, inner: object) -> None:
        self.inner = inner

    def __call__(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.inner(t, z)  # type: ignore[operator]


def _normal(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * z.pow(2).sum(-1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("depth", [2, 3])
def test_scipy_solver_refuses_for_parameters_held_deep(depth: int) -> None:
    """``f`` = wrappers around a wrapper of the model: the walk (``_reached``, two levels)
    did not reach the model, nothing requiring grad was found, so the backward pass of a
    loss with a learnable base ran and the model's parameters silently got no gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    f: object = _Field(model)
    for _ in range(depth):
        f = _Outer(f)
    mu = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    x = torch.randn(4, 2, dtype=torch.float64)
    logp = log_likelihood(f, x, 0.0, 1.0, lambda z: _normal(z - mu), solver="scipy_solver",
                          options={"solver": "RK45"})  # fmt: skip
    with pytest.raises(RuntimeError, match=r"scipy_solver.*no gradients"):
        (-logp.mean()).backward()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_scipy_solver_with_a_frozen_deep_field_trains_the_base() -> None:
    """Nothing of ``f`` requires grad: the base's gradient, right (the solve's end points
    are constants), is given."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    f = _Outer(_Outer(_Field(model.requires_grad_(False))))
    mu = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    x = torch.randn(4, 2, dtype=torch.float64)
    opts = {"rtol": 1e-10, "atol": 1e-10}
    logp = log_likelihood(f, x, 0.0, 1.0, lambda z: _normal(z - mu), solver="scipy_solver",
                          options={"solver": "RK45"}, **opts)  # fmt: skip
    (g,) = torch.autograd.grad(logp.sum(), [mu])
    want = log_likelihood(f, x, 0.0, 1.0, lambda z: _normal(z - mu), **opts)
    (w,) = torch.autograd.grad(want.sum(), [mu])
    torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-7)  # two solvers at 1e-10, float64
