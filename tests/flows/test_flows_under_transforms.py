"""``flows.log_likelihood`` inside the caller's ``torch.func`` transforms.

Inside ``vmap`` (over stacks of inputs, or an ensemble of flows by ``functional_call``)
torchdiffeq's solvers write the states into a solution tensor they make unbatched, which
raised PyTorch's "vmap: inplace arithmetic ... is not possible", naming no way out; inside
``grad`` the adaptive solvers raised PyTorch's ``setup_context`` error and ``adjoint=True``
its ``requires_grad_`` error. Now a ``ValueError`` names ``log_likelihood`` and what runs:
the stack as a second batch dimension (checked against the closed form), a loop over an
ensemble's members, fixed-grid solvers under ``grad`` (checked against ``torch.autograd``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

pytest.importorskip("torchdiffeq")

from torchdiv import draw_probes
from torchdiv.flows import log_likelihood

f64 = torch.float64


def _normal(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (z**2).sum(-1) - math.log(2 * math.pi)


class Linear(nn.Module):
    """``f(t, z) = z A^T``: ``log p(x) = log N(exp(-A) x) - tr(A)`` over ``[0, 1]``."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z @ self.a.T


A = torch.tensor([[0.5, 1.0], [0.0, -2.0]], dtype=f64)
SOLVERS = [("dopri5", None), ("rk4", {"step_size": 0.05})]


def _closed_form(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return _normal(x @ torch.linalg.matrix_exp(-a).T) - torch.trace(a)


@pytest.mark.parametrize("method", ["auto", "hutchinson"])
@pytest.mark.parametrize("solver, options", SOLVERS, ids=[s for s, _ in SOLVERS])
def test_a_vmap_over_stacks_of_inputs_names_the_batch_dimension(solver, options, method):
    torch.manual_seed(0)
    xs = torch.randn(3, 4, 2, dtype=f64)
    f = Linear(A)
    probes = draw_probes(xs[0], 2, method="hutchinson") if method == "hutchinson" else None

    def one(x: torch.Tensor) -> torch.Tensor:
        return log_likelihood(
            f, x, 0.0, 1.0, _normal, solver=solver, options=options, method=method, probes=probes
        )

    with pytest.raises(ValueError, match=r"log_likelihood: .*vmap.*batch_dims=2"):
        torch.func.vmap(one)(xs)


def test_the_stack_as_a_second_batch_dimension_is_each_member_s_likelihood():
    torch.manual_seed(0)
    xs = torch.randn(3, 4, 2, dtype=f64)
    got = log_likelihood(Linear(A), xs, 0.0, 1.0, _normal, batch_dims=2, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(got, _closed_form(xs, A), rtol=1e-6, atol=1e-6)


def test_an_ensemble_of_flows_under_vmap_names_the_loop():
    torch.manual_seed(0)
    x = torch.randn(4, 2, dtype=f64)
    members = [Linear(A * s) for s in (1.0, 0.5)]
    params, _ = torch.func.stack_module_state(members)
    base = members[0]

    def one(p: dict[str, torch.Tensor]) -> torch.Tensor:
        def f(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(base, p, (t, z))

        return log_likelihood(f, x, 0.0, 1.0, _normal)

    with pytest.raises(ValueError, match=r"log_likelihood: .*vmap.*Python loop"):
        torch.func.vmap(one)(params)
    for member, scale in zip(members, (1.0, 0.5), strict=True):  # the loop
        got = log_likelihood(member, x, 0.0, 1.0, _normal, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(got, _closed_form(x, A * scale), rtol=1e-6, atol=1e-6)


def _loss(a: torch.Tensor, solver: str, options: dict | None, adjoint: bool) -> torch.Tensor:
    x = torch.linspace(-1, 1, 8, dtype=f64).reshape(4, 2)
    f = Linear(a) if adjoint else (lambda t, z: z @ a.T)
    return log_likelihood(
        f, x, 0.0, 1.0, _normal, solver=solver, options=options, adjoint=adjoint
    ).sum()


@pytest.mark.parametrize(
    "solver, options, adjoint",
    [("dopri5", None, False), ("rk4", {"step_size": 0.1}, True)],
    ids=["adaptive", "adjoint"],
)
def test_what_torchdiffeq_cannot_run_under_grad_names_the_fixed_grid_solvers(
    solver, options, adjoint
):
    with pytest.raises(ValueError, match=r"log_likelihood: .*transform.*fixed-grid"):
        torch.func.grad(_loss)(A, solver, options, adjoint)


def test_a_fixed_grid_solver_under_grad_is_backpropagation_through_it():
    got = torch.func.grad(_loss)(A, "rk4", {"step_size": 0.1}, False)
    a = A.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(_loss(a, "rk4", {"step_size": 0.1}, False), a)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
