"""Regressions from the adversarial review of torchdiv.flows: each test failed before its fix."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torchdiffeq import odeint

import torchdiv
from torchdiv.flows import AugmentedDynamics, log_likelihood


def normal(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * z.flatten(1).square().sum(-1)


class Counted(nn.Module):
    """A tanh MLP field that refuses to be evaluated more than ``limit`` times (a stalled
    adaptive solve would otherwise run until memory runs out). Its count is a buffer: a
    Python number is part of the field's structure, watched again at every evaluation where
    it changes (keyleft21; docs/guide/flows.md)."""

    def __init__(self, n: int, limit: int = 1500):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(n + 1, 16), nn.Tanh(), nn.Linear(16, n)).double()
        self.register_buffer("nfe", torch.zeros((), dtype=torch.int64))
        self.limit = limit

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        if self.nfe > self.limit:
            raise RuntimeError(f"solve stalled: {int(self.nfe)} evaluations, t={float(t)}")
        return self.net(torch.cat([z, t.expand(*z.shape[:-1], 1)], -1))


@pytest.mark.parametrize("method, num_probes", [("hutch++", 6), ("xtrace", 6)])
def test_sketching_estimators_with_default_probes_do_not_stall_the_adaptive_solver(
    method, num_probes
):
    """n=3, Rademacher (default) sketch vectors coincide up to sign with probability 1/4 per
    sample: the QR's extra column is then round-off, the dynamics jump, and dopri5's step
    collapses near t1 (the exact solve takes ~100 evaluations; this one never ends)."""
    field = Counted(3)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        log_likelihood(
            field, x, 0.0, 1.0, normal, method=method, num_probes=num_probes,
            generator=torch.Generator().manual_seed(0), rtol=1e-9, atol=1e-9,
        )  # fmt: skip
    assert field.nfe < 1000


def test_structured_method_supports_adjoint_gradients():
    """torchdiffeq's adjoint integrates the backward ODE inside autograd's backward pass, which
    the structured capture takes for "a backward pass (autograd.grad) inside f"."""

    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.A = nn.Parameter(torch.randn(3, 3, dtype=torch.float64) * 0.5)

        def forward(self, t, z):
            return torch.tanh(z @ self.A.T)

    field = Field()
    x = torch.randn(4, 3, dtype=torch.float64)
    tol = {"rtol": 1e-10, "atol": 1e-10}  # adjoint and direct differ by the solver's error
    logp = log_likelihood(field, x, 0.0, 1.0, normal, method="structured", adjoint=True, **tol)
    (grad,) = torch.autograd.grad(logp.sum(), field.A)
    direct = log_likelihood(field, x, 0.0, 1.0, normal, method="structured", **tol)
    (expected,) = torch.autograd.grad(direct.sum(), field.A)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method, num_probes", [("auto", None), ("hutchinson", 2)])
def test_empty_batch_gives_an_empty_result(method, num_probes):
    """torchdiv.divergence returns an empty result for an empty batch; log_likelihood hands
    torchdiffeq an empty state and dies in an AssertionError ('underflow in dt 0.0')."""
    x = torch.randn(0, 3, dtype=torch.float64)
    logp = log_likelihood(
        lambda t, z: -z, x, 0.0, 1.0, normal, method=method, num_probes=num_probes
    )
    assert logp.shape == (0,)


def test_a_diverged_sample_is_named_or_left_alone_by_a_fixed_step_solver():
    """One sample with nan in x: torchdiffeq's adaptive solvers step the whole batch and
    stopped with a bare AssertionError ("underflow in dt 0.0"); now a ValueError naming the
    sample and the way out. A fixed-step solver gives it nan and the others their values."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()

    def field(t, z):
        return net(torch.cat([z, t.expand(z.shape[0], 1)], 1))

    x = torch.randn(5, 2, dtype=torch.float64)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"log_likelihood: the 'dopri5' solve stopped .*\[3\]"):
        log_likelihood(field, x, 0.0, 1.0, normal)
    with pytest.raises(ValueError, match=r"f\(t, z\) or its divergence became nan or inf"):
        log_likelihood(lambda t, z: field(t, z) / (z[:, :1] - x[2, 0]), x[:3], 0.0, 1.0, normal)
    fixed = {"solver": "rk4", "options": {"step_size": 0.25}}
    logp = log_likelihood(field, x, 0.0, 1.0, normal, **fixed)
    alone = torch.cat(
        [log_likelihood(field, x[b : b + 1], 0.0, 1.0, normal, **fixed) for b in (0, 1, 2, 4)]
    )
    assert logp[3].isnan()
    torch.testing.assert_close(logp[[0, 1, 2, 4]], alone, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_structured_evaluations_do_not_synchronise_on_the_gpu():
    """The structured engine builds colourings and 0/1 movement matrices on the CPU and copies
    them with .to(x.device) at every evaluation (_structured/forward.py:48,52,
    factors.py:243): a blocking host-to-device copy, i.e. a stream synchronisation. The CPU
    sync counter in test_flows cannot see it (host_planning hides it, and .to is no sync on
    CPU)."""
    net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 1, 3, padding=1))
    net = net.cuda()

    def field(t, z):
        return net(torch.cat([z, t.expand(z.shape[0], 1, 8, 8).to(z.dtype)], 1))

    x = torch.randn(16, 1, 8, 8, device="cuda")
    dynamics = AugmentedDynamics(field, x)
    t = torch.tensor(0.3, device="cuda")
    dynamics(t, dynamics.initial_state(x))  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        dynamics(t, dynamics.initial_state(x))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_float_times_keep_float64_precision():
    """t1 = 0.1 as a Python float is 0.1 in float64, not float32's 0.10000000149: that moved
    log p by 3.6e-6 here, while the solve at tolerance 1e-12 is within 2e-10 of the closed form."""
    A = torch.tensor([[0.5, 1.0], [0.0, -2.0]], dtype=torch.float64) * 10
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    logp = log_likelihood(lambda t, z: z @ A.T, x, 0.0, 0.1, normal, rtol=1e-12, atol=1e-12)
    z0 = x @ torch.linalg.matrix_exp(-0.1 * A).T  # x = exp(0.1 A) z0
    expected = normal(z0) - 0.1 * torch.trace(A)  # log p(x) = log N(z0) - 0.1 tr(A)
    torch.testing.assert_close(logp, expected, rtol=0, atol=1e-8)


def test_dynamics_of_a_bound_method_stored_on_its_own_module_make_no_cycle():
    """``AugmentedDynamics`` of a bound method holds its module's parameters for
    ``odeint_adjoint``: as parameters, not as a submodule, which would make a module that
    keeps its dynamics (``self.dynamics = ...``) its own descendant (``.to``, ``repr`` and
    ``state_dict`` would recurse without end)."""

    class Flow(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(2, 2)

        def velocity(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.net(z))

    flow = Flow()
    x = torch.randn(3, 2)
    flow.dynamics = AugmentedDynamics(flow.velocity, x)
    assert set(flow.dynamics.parameters()) == set(flow.net.parameters())
    flow.to(torch.float64)
    assert "dynamics" in repr(flow) and len(flow.state_dict()) == 4  # (the module's twice)


class _Flow(nn.Module):
    """A flow that builds its dynamics once, from its own bound method."""

    def __init__(self, n: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n, 8), nn.Tanh(), nn.Linear(8, n))
        self.dynamics = AugmentedDynamics(self.velocity, torch.zeros(1, n))

    def velocity(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(z) * (1 + t)


@pytest.mark.parametrize("change", ["swapped layer", "to_empty from meta", "overwriting .double()"])
def test_dynamics_of_a_bound_method_give_the_parameters_its_module_has_at_the_solve(change):
    """``odeint_adjoint`` differentiates with respect to ``dynamics.parameters()``: copies of
    the module's parameters taken when the dynamics was built stayed after the module's
    parameters were replaced (a swapped layer; ``to_empty`` from the meta device, the way
    large models are initialised; ``.double()`` under ``overwrite_module_params_on_conversion``,
    which replaced the copies by conversions of their own), and the parameters ``f`` reads got
    no gradient, silently (``None``, where backpropagation through the solver gives them)."""
    from torchdiffeq import odeint_adjoint

    dtype = torch.float32
    if change == "to_empty from meta":
        with torch.device("meta"):
            flow = _Flow(3)
        flow.to_empty(device="cpu")
        torch.manual_seed(0)
        for m in flow.net:
            if isinstance(m, nn.Linear):
                m.reset_parameters()
    else:
        flow = _Flow(3)
    if change == "swapped layer":
        flow.net[2] = nn.Linear(8, 3)
    elif change == "overwriting .double()":
        overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        try:
            flow.double()
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
        dtype = torch.float64
    assert set(flow.dynamics.parameters()) == set(flow.net.parameters())
    x = torch.randn(5, 3, dtype=dtype, generator=torch.Generator().manual_seed(0))
    times = torch.tensor([1.0, 0.0], dtype=dtype)
    grads = []
    for solve in (odeint, odeint_adjoint):
        state = flow.dynamics.initial_state(x)
        z, delta = solve(flow.dynamics, state, times, method="rk4", options={"step_size": 0.1})
        loss = normal(z[-1]).sum() - delta[-1].sum()
        grads.append(torch.autograd.grad(loss, list(flow.net.parameters()), allow_unused=True))
    for by_solver, by_adjoint in zip(*grads, strict=True):  # (the adjoint's own RK4 steps:
        assert by_adjoint is not None  # O(h^4) from the solve's gradient, ~1e-6 here)
        torch.testing.assert_close(by_adjoint, by_solver, rtol=1e-4, atol=1e-5)


class _Holder(nn.Module):
    """A module holding the dynamics (a wrapper; torchdyn's ``DEFunc``)."""

    def __init__(self, dynamics: nn.Module):
        super().__init__()
        self.dynamics = dynamics

    def forward(self, t: torch.Tensor, state: Any) -> Any:
        return self.dynamics(t, state)


def test_dynamics_of_a_bound_method_held_by_another_module_give_it_the_parameters():
    """A module holding the dynamics reads its children's registered parameters (not their
    ``named_parameters``): with the bound method's parameters read only by an overridden
    ``named_parameters``, the holder had none, and ``odeint_adjoint`` of it gave the
    velocity's parameters no gradient, silently (``None``)."""
    from torchdiffeq import odeint_adjoint

    flow = _Flow(3)
    dynamics = AugmentedDynamics(flow.velocity, torch.zeros(1, 3), method="forward")
    holder = _Holder(dynamics)
    assert set(holder.parameters()) == set(flow.net.parameters())
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    times = torch.tensor([1.0, 0.0])
    grads = []
    for solve in (odeint, odeint_adjoint):
        z, delta = solve(holder, dynamics.initial_state(x), times, method="rk4",
                         options={"step_size": 0.1})  # fmt: skip
        loss = normal(z[-1]).sum() - delta[-1].sum()
        grads.append(torch.autograd.grad(loss, list(flow.net.parameters()), allow_unused=True))
    for by_solver, by_adjoint in zip(*grads, strict=True):  # (tolerance: as above)
        assert by_adjoint is not None
        torch.testing.assert_close(by_adjoint, by_solver, rtol=1e-4, atol=1e-5)


class _OldStyleTanh(torch.autograd.Function):
    """``tanh`` as an ``autograd.Function`` of the old style (``ctx`` in ``forward``), which
    ``torch.func`` refuses: the exact engines hand over to plain autograd."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return torch.tanh(z)

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return g * (1 - torch.tanh(z) ** 2)


@pytest.mark.parametrize("method, num_probes", [("auto", None), ("hutchinson", 2)])
def test_dynamics_under_inference_mode_keep_the_divergence(method, num_probes):
    """An ``odeint`` of the dynamics under ``torch.inference_mode()`` (an evaluation loop): the
    plain-autograd engine found no graph there and gave a zero divergence, silently. ``t`` (an
    inference tensor then) scales the field, so it is saved for the backward pass. Reference:
    per-sample ``autograd.grad`` rows in float64, the probes' quadratic forms for Hutchinson."""
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(3, 8).double(), nn.Linear(8, 3).double()

    def field(t, z):
        return lin2(_OldStyleTanh.apply(lin1(z))) * (1 + t)

    x = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor(0.5, dtype=torch.float64)
    probes = torch.randn(2, 4, 3, dtype=torch.float64) if num_probes else None
    dynamics = AugmentedDynamics(field, x, method=method, probes=probes)
    z = x.detach().requires_grad_(True)
    jacobian = torch.stack(
        [torch.autograd.grad(field(t, z)[:, i].sum(), z, retain_graph=True)[0] for i in range(3)], 1
    )  # (B, out, in): samples are independent
    if probes is None:
        expected = jacobian.diagonal(dim1=1, dim2=2).sum(-1)[None]
    else:
        expected = torch.einsum("kbi,bij,kbj->kb", probes, jacobian, probes)
    with torch.inference_mode():
        state = dynamics.initial_state(x.clone())
        velocity, delta = dynamics(t.clone(), state)
    torch.testing.assert_close(-delta, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(velocity, field(t, x).detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("given", [True, False])
def test_probes_made_under_inference_mode_train(given: bool) -> None:
    """Probes drawn once under ``torch.inference_mode()`` (an evaluation loop's, passed as
    ``probes=``), or dynamics made there (drawing their own), then a training solve: its
    backward pass refused the inference-tensor probes ("Inference tensors cannot be saved for
    backward"). The solve and its parameter gradients equal those with the probes cloned."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    times = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with torch.inference_mode():
        probes = torchdiv.draw_probes(x, 2, generator=torch.Generator().manual_seed(0))
        made = (
            None
            if given
            else AugmentedDynamics(lambda t, z: net(z), x, method="hutchinson", num_probes=2)
        )
    dynamics = made or AugmentedDynamics(lambda t, z: net(z), x, method="hutchinson", probes=probes)
    plain = probes.clone() if given else made.sampling.probes.clone()
    params = list(net.parameters())
    results = []
    for dyn in (
        dynamics,
        AugmentedDynamics(lambda t, z: net(z), x, method="hutchinson", probes=plain),
    ):
        _, delta = odeint(
            dyn, dyn.initial_state(x), times, method="rk4", options={"step_size": 0.5}
        )
        results.append((delta[-1], torch.autograd.grad(delta[-1].sum(), params)))
    (got, grads), (want, want_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_score_of_a_cnf_and_its_gradients() -> None:
    """The score ``grad_x log p(x)`` with ``create_graph=True`` (score matching, gradient
    penalties): through the solver, against the same rk4 steps with a per-sample
    ``autograd.grad`` divergence (values, score and ``d|score|^2/dtheta`` to float64
    round-off); with ``adjoint=True``, whose backward (torchdiffeq's) runs under ``no_grad``,
    the score came back without a graph, silently: now that backward pass is refused."""
    field = Counted(2)
    x0 = torch.randn(4, 2, dtype=torch.float64)
    solve = {"solver": "rk4", "options": {"step_size": 0.25}}
    params = list(field.parameters())

    def reference(x: torch.Tensor) -> torch.Tensor:
        def dynamics(t, state):
            z = state[0]
            dz = field(t, z)
            rows = [torch.autograd.grad(dz[:, i].sum(), z, create_graph=True)[0] for i in (0, 1)]
            return dz, -(rows[0][:, 0] + rows[1][:, 1])

        times = torch.tensor([0.0, 1.0], dtype=torch.float64)
        state = (x, torch.zeros(len(x), dtype=torch.float64))
        z, delta = odeint(dynamics, state, times, method="rk4", options=solve["options"])
        return normal(z[-1]) - delta[-1]

    out = []
    for run in (lambda x: log_likelihood(field, x, 1.0, 0.0, normal, **solve), reference):
        x = x0.clone().requires_grad_()
        logp = run(x)
        (score,) = torch.autograd.grad(logp.sum(), x, create_graph=True)
        out.append([logp, score, *torch.autograd.grad(score.square().sum(), params)])
    for got, want in zip(*out, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    x = x0.clone().requires_grad_()
    logp = log_likelihood(field, x, 1.0, 0.0, normal, adjoint=True, **solve)
    with pytest.raises(RuntimeError, match=r"^log_likelihood: adjoint=True .*adjoint=False"):
        torch.autograd.grad(logp.sum(), x, create_graph=True)
    (score,) = torch.autograd.grad(logp.sum(), x)  # first derivatives: the solver's error
    torch.testing.assert_close(score, out[1][1].detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, num_probes", [("hutchinson", 2), ("hutch++", 3)])
def test_a_solve_watches_its_field_for_sample_mixing_once(watches, method, num_probes):
    """A tiny field (2-D CNF) is watched for sample mixing until it has passed once. The
    dynamics hand the engines a closure over each evaluation's ``t``, a new object every
    time: the multi-probe estimators watched every evaluation (16 of an rk4 solve of 4
    steps, each also a new entry of the 256 in ``mixing._PASSED``) where the one-probe path
    watched the field once. (The exact path still does: docs/guide/flows.md.)"""
    field = Counted(2)
    x = torch.randn(8, 2, dtype=torch.float64)
    for _ in range(2):
        _rk4_solve(field, x, method, num_probes)
    assert field.nfe == 32
    assert len(watches) <= 2


@pytest.mark.parametrize("method, num_probes", [("auto", None), ("hutchinson", 2)])
def test_a_field_that_mixes_samples_is_refused_at_every_solve(method, num_probes):
    """Watched once per field is still watched: the first evaluation of a mixing field
    raises, and a solve that raised marks nothing as passed."""
    from torchdiv import BatchInteractionError

    field = Counted(2)
    x = torch.randn(8, 2, dtype=torch.float64)
    for _ in range(2):
        with pytest.raises(BatchInteractionError, match="mix"):
            _rk4_solve(lambda t, z: field(t, z) - field(t, z).mean(0), x, method, num_probes)


def _rk4_solve(field, x: torch.Tensor, method: str, num_probes: int | None) -> None:
    """``log_likelihood`` of ``x`` under ``field`` from 0 to 1 by 4 rk4 steps (16 evaluations)."""
    log_likelihood(
        field,
        x,
        0.0,
        1.0,
        normal,
        method=method,
        num_probes=num_probes,
        solver="rk4",
        options={"step_size": 0.25},
    )


class _Conditioned(nn.Module):
    """A velocity conditioned on a tensor attribute set from outside (a context encoder's
    output, as conditional CNFs hold it)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        self.context: torch.Tensor | None = None

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        assert self.context is not None
        return self.net(torch.cat([z, self.context.expand(len(z), -1)], -1))

    def with_context(self, t: torch.Tensor, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, c.expand(len(z), -1)], -1))


@pytest.mark.parametrize("where", ["attribute", "buffer", "partial"])
def test_adjoint_refuses_a_context_computed_from_other_parameters(where: str) -> None:
    """``odeint_adjoint`` differentiates the module's parameters only: a context computed by
    an encoder outside it, held as an attribute or a partial's argument, got no gradient
    with ``adjoint=True`` (None against 5.5 through the solver), silently. Refused, naming
    it; a context that requires no grad, or the module's own parameters, still run."""
    import functools

    torch.manual_seed(0)
    field, encoder = _Conditioned().double(), nn.Linear(4, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    solve = {"solver": "rk4", "options": {"step_size": 0.5}}

    def velocity(context: torch.Tensor):
        if where == "partial":
            return functools.partial(field.with_context, c=context)
        if where == "buffer":
            vars(field).pop("context", None)  # (a plain attribute until now)
            field.register_buffer("context", context)
        else:
            field.context = context
        return field

    def base(z: torch.Tensor) -> torch.Tensor:
        return -0.5 * z.square().sum(-1)

    context = encoder(torch.ones(4, dtype=torch.float64))
    name = {"partial": "keyword 'c' of the partial"}.get(where, f"{where} 'context'")
    with pytest.raises(ValueError, match=rf"^log_likelihood: adjoint=True .*{name}.*adjoint=False"):
        log_likelihood(velocity(context), x, 1.0, 0.0, base, adjoint=True, **solve)
    direct = log_likelihood(velocity(context.detach()), x, 1.0, 0.0, base, **solve)
    adjoint = log_likelihood(velocity(context.detach()), x, 1.0, 0.0, base, adjoint=True, **solve)
    torch.testing.assert_close(adjoint, direct, rtol=1e-12, atol=1e-12)


class _InContainers(nn.Module):
    """A velocity whose context is held in a container attribute (``self.contexts = [c]``,
    a dict of conditions)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        self.held: list[torch.Tensor] | dict[str, torch.Tensor] = []

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        c = self.held["c"] if isinstance(self.held, dict) else self.held[0]
        return self.net(torch.cat([z, c.expand(len(z), -1)], -1))

    def with_contexts(
        self, t: torch.Tensor, z: torch.Tensor, cs: tuple[torch.Tensor]
    ) -> torch.Tensor:
        return self.net(torch.cat([z, cs[0].expand(len(z), -1)], -1))


@pytest.mark.parametrize("where", ["list", "dict", "partial tuple"])
def test_adjoint_refuses_a_context_held_in_a_container(where: str) -> None:
    """A context computed by an encoder outside the module, held in a list or dict attribute
    or a tuple argument of a partial: ``odeint_adjoint`` gave the encoder no gradient (None,
    silently) where only bare tensors were checked. Refused, naming the attribute."""
    import functools

    torch.manual_seed(0)
    field, encoder = _InContainers().double(), nn.Linear(4, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    context = encoder(torch.ones(4, dtype=torch.float64))
    f: object = field
    if where == "list":
        field.held = [context]
    elif where == "dict":
        field.held = {"c": context}
    else:
        f = functools.partial(field.with_contexts, cs=(context,))
    name = "keyword 'cs' of the partial" if where == "partial tuple" else "attribute 'held'"

    def base(z: torch.Tensor) -> torch.Tensor:
        return -0.5 * z.square().sum(-1)

    with pytest.raises(ValueError, match=rf"^log_likelihood: adjoint=True .*{name}"):
        log_likelihood(f, x, 1.0, 0.0, base, adjoint=True, solver="rk4")


class _TimeScaledLinear(nn.Module):
    """``f(t, z) = t A z``: the flow ``z(T) = exp(T^2 A / 2) z(0)``, in closed form."""

    def __init__(self, n: int):
        super().__init__()
        torch.manual_seed(1)
        self.A = nn.Parameter(0.3 * torch.randn(n, n, dtype=torch.float64))

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return t * z @ self.A.T


@pytest.mark.parametrize("adjoint", [False, True])
def test_a_learned_end_time_trains_with_the_adjoint(adjoint: bool) -> None:
    """FFJORD's ``train_T``: the end time ``T = sqrt_end_time ** 2`` a parameter of the outer
    model. The adjoint gives the times their gradients (torchdiffeq's time VJPs), yet the
    check of what ``f`` differentiates (``f`` at the solve's ends) took ``T``'s parameter,
    reached through ``t``, for a lost context and refused the model (rev-lines16). Values and
    gradients (``A``, ``sqrt_end_time``) against the closed form, ``log p(x) =
    log N(exp(-T^2 A / 2) x) - tr(A) T^2 / 2``, in float64."""
    f = _TimeScaledLinear(3)
    root = nn.Parameter(torch.tensor(1.1, dtype=torch.float64))
    x = torch.randn(4, 3, dtype=torch.float64)
    logp = log_likelihood(f, x, 0.0, root**2, normal, rtol=1e-10, atol=1e-10, adjoint=adjoint)
    half = root**4 / 2
    exact = normal(x @ torch.linalg.matrix_exp(-half * f.A).T) - half * f.A.trace()
    torch.testing.assert_close(logp, exact, rtol=1e-8, atol=1e-8)
    got = torch.autograd.grad(logp.square().sum(), [f.A, root])
    want = torch.autograd.grad(exact.square().sum(), [f.A, root])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
