"""One-probe Hutchinson watches ``f`` for sample mixing on its first call.

The one-product path (``divergence(f, x, method="hutchinson", num_probes=1)``, the CNF
training loss) evaluates ``f`` by plain autograd. It used to search only the autograd graph
(for a train-mode batch norm), so an ``f`` that combines samples (``f(x) - f(x).mean(0)``)
gave a silently wrong estimate. Now the first call of each ``f`` object at each structure
is watched op by op (``torchdiv._taylor.mixing.passed_before``), later calls are not. The
watch is counted where it starts: every watch makes one ``torchdiv._core.mixing.tracker.BatchAxes``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import assert_close, assert_same_parameter_gradients, reference_jacobian, tanh_mlp

import torchdiv
from torchdiv import BatchInteractionError

F64 = torch.float64
Function = Callable[[torch.Tensor], torch.Tensor]


def _mixing_functions() -> dict[str, Function]:
    """``f``s that combine samples, without a batch norm (new objects at every call)."""
    net = tanh_mlp(4, 8, 4)
    perm = torch.tensor([1, 0, 3, 2, 5, 4])
    return {
        "minus the batch mean": lambda z: net(z) - net(z).mean(0),
        "samples permuted": lambda z: net(z)[perm],
        "times the batch sum": lambda z: z * z.sum(0),
    }


ESTIMATES: dict[str, Callable[[Function, torch.Tensor], object]] = {
    "divergence": lambda f, x: torchdiv.divergence(f, x, method="hutchinson", num_probes=1),
    "divergence, probes": lambda f, x: torchdiv.divergence(
        f, x, method="hutchinson", probes=torchdiv.draw_probes(x, 1)
    ),
    "estimate_divergence": lambda f, x: torchdiv.estimate_divergence(f, x, num_probes=1),
    "jacobian_diagonal": lambda f, x: torchdiv.jacobian_diagonal(
        f, x, method="hutchinson", num_probes=1
    ),
    "laplacian": lambda f, x: torchdiv.laplacian(f, x, method="hutchinson", num_probes=1),
}


@pytest.mark.parametrize("case", list(_mixing_functions()))
@pytest.mark.parametrize("estimate", list(ESTIMATES))
def test_mixing_is_refused_with_one_probe(case: str, estimate: str) -> None:
    """Every one-probe stochastic estimate of a mixing ``f`` raises, at every call (a call
    that raised marks nothing as passed). ``divergence`` and ``estimate_divergence`` returned
    a wrong estimate before."""
    torch.manual_seed(0)
    f, x = _mixing_functions()[case], torch.randn(6, 4, dtype=F64)
    for _ in range(2):
        with pytest.raises(BatchInteractionError, match="mix"):
            ESTIMATES[estimate](f, x)


def test_a_per_sample_f_is_watched_once_per_structure(watches: list[int]) -> None:
    """The first call watches, later ones at the structure do not (also through another
    public function on the same path), a new shape or train mode is watched again, and
    every estimate is ``v^T J v`` with the probe drawn."""
    torch.manual_seed(0)
    net = tanh_mlp(4, 8, 4)
    x = torch.randn(6, 4, dtype=F64)
    jac = reference_jacobian(net, x)
    for call in range(3):
        probes = torchdiv.draw_probes(x, 1, generator=torch.Generator().manual_seed(call))
        est = torchdiv.divergence(net, x, method="hutchinson", probes=probes)
        assert_close(est, torch.einsum("bi,bij,bj->b", probes[0], jac, probes[0]))
        assert len(watches) == 1, call
    torchdiv.estimate_divergence(net, x, num_probes=1)
    assert len(watches) == 1
    torchdiv.divergence(net, x[:5], method="hutchinson", num_probes=1)
    assert len(watches) == 2
    net.eval()
    torchdiv.divergence(net, x, method="hutchinson", num_probes=1)
    assert len(watches) == 3


def test_a_lambda_made_anew_is_watched_once_per_what_it_closes_over(watches: list[int]) -> None:
    """A lambda written in the loop is a new object at every call; over the same net it is
    the same ``f`` (``mixing.identity``), over another net another."""
    nets = tanh_mlp(4, 8, 4), tanh_mlp(4, 8, 4)
    x = torch.randn(6, 4, dtype=F64)
    for count, net in zip((1, 1, 2, 2), (nets[0], nets[0], nets[1], nets[1]), strict=True):
        torchdiv.divergence(lambda z, net=net: net(z), x, method="hutchinson", num_probes=1)
        assert len(watches) == count


def test_allowed_interaction_is_neither_watched_nor_refused(watches: list[int]) -> None:
    """Under ``allow_batch_interaction()`` the one-probe estimate runs as before: unwatched,
    ``v_b . (J^T v)_b`` with ``J`` the whole batch's Jacobian (cross-sample terms included)."""
    torch.manual_seed(0)
    x = torch.randn(6, 4, dtype=F64)
    f = _mixing_functions()["times the batch sum"]
    probes = torchdiv.draw_probes(x, 1, generator=torch.Generator().manual_seed(0))
    with torchdiv.allow_batch_interaction():
        est = torchdiv.divergence(f, x, method="hutchinson", probes=probes)
    v = probes[0]
    # f_ci = z_ci s_i, s = z.sum(0): d f_ci / d z_bi = delta_cb s_i + z_ci, by hand
    want = (v * (v * x.sum(0) + (v * x).sum(0))).sum(-1)
    assert_close(est, want)
    assert not watches


def _solve(f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor) -> object:
    """``log_likelihood`` with one probe, 4 fixed RK4 steps (16 evaluations of ``f``)."""
    return torchdiv.flows.log_likelihood(
        f,
        x,
        0.0,
        1.0,
        lambda z: -0.5 * (z**2).sum(-1),
        method="hutchinson",
        num_probes=1,
        solver="rk4",
        options={"step_size": 0.25},
    )


def test_a_flow_with_one_probe_watches_its_velocity_once(watches: list[int]) -> None:
    """``log_likelihood``'s one-probe dynamics make a closure of ``f(t, z)`` at every step:
    the velocity ``f`` itself is watched at its first step at each structure, not at the
    later ones nor in a later solve."""
    net = tanh_mlp(4, 8, 4)
    x = torch.randn(6, 4, dtype=F64)

    def velocity(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return net(z) * (1 + t)

    _solve(velocity, x)  # two structures: x, then states that require grad
    assert len(watches) == 2
    _solve(velocity, x)
    assert len(watches) == 2


def test_a_flow_with_one_probe_refuses_a_mixing_velocity() -> None:
    """It gave a wrong likelihood."""
    net = tanh_mlp(4, 8, 4)
    x = torch.randn(6, 4, dtype=F64)
    with pytest.raises(BatchInteractionError, match="mix"):
        _solve(lambda t, z: net(z) - net(z).mean(0), x)


def test_a_guarded_structure_is_found_by_a_lambda_over_another_time() -> None:
    """One-probe Hutchinson of a CNF's ``lambda z: net(z, t)`` made anew over another time at
    every step, where ``f`` runs an op ``SafeDerivatives`` changes under grad mode (layer
    norm): the first step's plain evaluation is discarded and made again under the mode;
    later steps start there, one evaluation each (two at every step before: the decision was
    keyed by the lambda's values too). Each new lambda is still watched (its first
    evaluation, under the mode). Values: ``v^T J v`` with the per-sample Jacobian."""
    torch.manual_seed(0)
    net = tanh_mlp(4, 8, 4)
    evaluations: list[int] = []
    net.register_forward_pre_hook(lambda module, args: evaluations.append(1))
    x = torch.randn(6, 4, dtype=F64)
    norm = torch.nn.functional.layer_norm
    for step, t in enumerate((0.1, 0.2, 0.3, 0.4)):
        f = lambda z, t=t: norm(net(z), (4,)) * t  # noqa: E731
        probes = torchdiv.draw_probes(x, 1, generator=torch.Generator().manual_seed(step))
        evaluations.clear()
        est = torchdiv.divergence(f, x, method="hutchinson", probes=probes)
        assert len(evaluations) == (2 if step == 0 else 1), step
        jac = reference_jacobian(f, x)
        assert_close(est, torch.einsum("bi,bij,bj->b", probes[0], jac, probes[0]))


def test_a_lambda_over_a_device_and_a_dtype_is_watched_once(watches: list[int]) -> None:
    """``lambda z: net(z.to(device, dtype))`` written in a training loop: a ``device`` and a
    ``dtype`` are told by value (they have no weak references: such a lambda was a new ``f``
    at every call, watched every time)."""
    net = tanh_mlp(4, 8, 4)
    x = torch.randn(6, 4, dtype=F64)
    device, dtype = x.device, x.dtype
    for _ in range(3):
        torchdiv.divergence(
            lambda z: net(z.to(device, dtype)), x, method="hutchinson", num_probes=1
        )
    assert len(watches) == 1


def test_a_flow_with_one_probe_leaves_safe_derivatives(monkeypatch) -> None:
    """``log_likelihood``'s one-probe terms evaluate the velocity outside ``SafeDerivatives``
    (as ``divergence`` does) once a solve found no op the mode changes: every evaluation of
    the solve entered the mode before (its dispatch over every op of ``f``: a 2-D CNF
    evaluation 2.0x FFJORD's hand recipe, 1.7x without it)."""
    from torchdiv._core import modes

    net = tanh_mlp(4, 8, 4)
    x = torch.randn(6, 4, dtype=F64)
    _solve(lambda t, z: net(z) * (1 + t), x)  # the watched first steps
    entered: list[int] = []
    enter = modes.SafeDerivatives.__enter__
    monkeypatch.setattr(modes.SafeDerivatives, "__enter__", lambda s: entered.append(1) or enter(s))
    _solve(lambda t, z: net(z) * (1 + t), x)
    assert not entered


def test_a_flow_with_one_probe_evaluates_a_guarded_velocity_under_the_mode() -> None:
    """A velocity with an op ``SafeDerivatives`` changes under grad mode (layer norm): the
    first evaluation's plain graph is discarded and made again under the mode, later steps
    (other times, other states) start there, one evaluation each. Terms: ``-v^T J v`` with
    the probes given, as the per-sample Jacobian gives them."""
    torch.manual_seed(0)
    net = tanh_mlp(4, 8, 4)
    evaluations: list[int] = []
    net.register_forward_pre_hook(lambda module, args: evaluations.append(1))

    def velocity(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(net(z), (4,)) * t

    x = torch.randn(6, 4, dtype=F64)
    probes = torchdiv.draw_probes(x, 1, generator=torch.Generator().manual_seed(1))
    dynamics = torchdiv.flows.AugmentedDynamics(velocity, x, method="hutchinson", probes=probes)
    for step, t in enumerate(torch.tensor([0.1, 0.2, 0.3], dtype=F64)):
        z = x + step
        evaluations.clear()
        _, terms = dynamics(t, dynamics.initial_state(z))
        assert len(evaluations) == (2 if step == 0 else 1), step
        jac = reference_jacobian(lambda z, t=t: velocity(t, z), z)
        assert_close(terms, -torch.einsum("bi,bij,bj->b", probes[0], jac, probes[0])[None])


class _Flagged(torch.nn.Module):
    """A velocity field that subtracts the batch mean when its flag says so."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tanh_mlp(4, 8, 4)
        self.mix = False

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = self.net(z) * (1 + t)
        return y - y.mean(0) if self.mix else y


def _changes() -> dict[str, Callable[[_Flagged], object]]:
    """Changes after which a ``_Flagged`` field mixes samples."""
    return {
        "flag set": lambda m: setattr(m, "mix", True),
        "submodule replaced": lambda m: setattr(
            m.net, "2", torch.nn.BatchNorm1d(8, dtype=F64).train()
        ),
        "forward hook": lambda m: m.register_forward_hook(lambda _, a, out: out - out.mean(0)),
    }


ONE_PROBE_CALLS: dict[str, Callable[[_Flagged, torch.Tensor], object]] = {
    "divergence": lambda m, x: torchdiv.divergence(
        lambda z: m(torch.tensor(0.5, dtype=F64), z), x, method="hutchinson", num_probes=1
    ),
    "log_likelihood": lambda m, x: _solve(m, x),
}


@pytest.mark.parametrize("call", list(ONE_PROBE_CALLS))
@pytest.mark.parametrize("change", list(_changes()))
def test_a_field_changed_to_mix_between_calls_is_refused(call: str, change: str) -> None:
    """Two calls of a per-sample field (watched once, then served from that watch), a change
    that makes it mix samples, and the next call raises: the lean path's watch is kept per
    structure, and the change is another structure."""
    torch.manual_seed(0)
    m, x = _Flagged(), torch.randn(6, 4, dtype=F64)
    for _ in range(2):
        ONE_PROBE_CALLS[call](m, x)
    _changes()[change](m)
    with pytest.raises(BatchInteractionError, match="mix"):
        ONE_PROBE_CALLS[call](m, x)


def test_a_one_probe_cnf_solve_equals_ffjord_s_recipe() -> None:
    """A float64 CNF solve with one probe (RK4, 4 steps, later steps on the lean path) and
    FFJORD's ``divergence_approx`` dynamics (``e^T J`` by one ``autograd.grad`` with
    ``create_graph``, dotted with ``e``) with the same probe: the same log-density terms and
    parameter gradients, to round-off."""
    from torchdiffeq import odeint

    torch.manual_seed(0)
    net = tanh_mlp(4, 8, 4)
    x = torch.randn(6, 4, dtype=F64)
    probes = torchdiv.draw_probes(x, 1, generator=torch.Generator().manual_seed(3))
    e = probes[0]

    def velocity(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return net(z) * (1 + t)

    def recipe(t: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        with torch.enable_grad():
            z = state[0].requires_grad_(True)
            v = velocity(t, z)
            (e_dzdx,) = torch.autograd.grad(v, z, e, create_graph=True)
        return v, -(e_dzdx * e).sum(1)[None]

    ours = torchdiv.flows.AugmentedDynamics(velocity, x, method="hutchinson", probes=probes)
    times = torch.tensor([0.0, 1.0], dtype=F64)
    losses = []
    for dynamics in (ours, recipe):
        z, delta = (
            s[-1]
            for s in odeint(
                dynamics,
                (x, torch.zeros(1, 6, dtype=F64)),
                times,
                method="rk4",
                options={"step_size": 0.25},
            )
        )
        losses.append((z.square().sum(1) + delta[0] * torch.linspace(1, 2, 6, dtype=F64)).sum())
    assert_close(*losses)
    assert_same_parameter_gradients(net, *losses)
