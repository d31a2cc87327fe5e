"""torchdiv in distributed training stacks against the twentieth session's changes: walks that
stop at ``x``'s history, a module's containers in the structure key, the compiled replays,
under DDP and FSDP2 (gloo on localhost; one process, or two spawned by ``ddp_cases.run_pairs``).

References: per-sample ``torch.func.jacrev`` traces in float64, on the unwrapped module (and,
with two ranks, on the whole batch in one process)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import torchdiv
from torchdiv._core import ddp

f64 = torch.float64
STEPS = 40  # rk4 evaluations of a 10-step solve


def _field() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).to(f64)


def _traces(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """``tr J_f(z_b)`` per sample, by ``jacrev`` of one sample at a time."""
    one = torch.func.jacrev(lambda v: f(v[None])[0])
    return torch.stack([one(v).trace() for v in z])


def _solve(dynamics: Callable, x: torch.Tensor) -> torch.Tensor:
    """The log-density change of an FFJORD solve (rk4, 10 steps), backpropagated through."""
    from torchdiffeq import odeint

    times = x.new_tensor([0.0, 1.0])
    state = (x, x.new_zeros(len(x)))
    return odeint(dynamics, state, times, method="rk4", options={"step_size": 0.1})[1][-1]


def _dynamics(form: str, model: nn.Module) -> Callable:
    """FFJORD's ODE function: the graph form (``dz = f(z)`` by the caller, then
    ``graph_divergence(dz, z)``, FFJORD's own way) or a public call on the module."""

    def graph(t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        z = state[0]
        with torch.enable_grad():
            z.requires_grad_(True)
            dz = model(z)
            return dz, -torchdiv.graph_divergence(dz, z, create_graph=True)

    def public(t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        z = state[0]
        return model(z), -torchdiv.divergence(model, z)

    def reference(t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        z = state[0]
        return model(z), -_traces(model, z)

    return {"graph": graph, "public": public, "reference": reference}[form]


@pytest.mark.parametrize(
    ("form", "wrapper"), [("graph", "none"), ("graph", "ddp"), ("public", "ddp")]
)
def test_a_solve_s_history_is_not_walked_under_a_process_group(
    one_process_group, monkeypatch, form, wrapper
):
    """rev-scoresde20 stopped the walks at ``x``'s history, but not those of DDP and FSDP2's
    handling (``_core.ddp``), which run once a process group is up: the graph form's
    ``Peers`` (any module, wrapped or not) and a public call's zero-gradient edges for a DDP
    module (``used``) walked the whole solve at every evaluation (400 rk4 evaluations of a
    small MLP: 0.4 -> 10-14 s). Counted: the nodes those walks visit per evaluation stay as
    many as at the first; the log-density change and the parameters' gradients equal the
    ``jacrev`` solve (float64)."""
    pytest.importorskip("torchdiffeq")
    visited: list[int] = [0]

    def counted(*args):
        for node in walk_nodes(*args):
            visited[-1] += 1
            yield node

    walk_nodes = ddp.nodes
    monkeypatch.setattr(ddp, "nodes", counted)
    plain, field = _field(), _field()
    model = nn.parallel.DistributedDataParallel(field) if wrapper == "ddp" else field
    x = torch.randn(4, 3, dtype=f64)
    dynamics = _dynamics(form, model)

    def step(t, state):
        visited.append(0)
        return dynamics(t, state)

    got = _solve(step, x)
    per_evaluation = torch.tensor(visited[2:])  # (the first has no history yet)
    assert len(per_evaluation) == STEPS - 1 and per_evaluation[0] > 0
    assert per_evaluation.max() <= 2 * per_evaluation[0], visited
    want = _solve(_dynamics("reference", plain), x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got.sum(), list(field.parameters()))
    expected = torch.autograd.grad(want.sum(), list(plain.parameters()))
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)


class CrossRankBatchNorm(nn.Module):
    """A batch norm whose statistics are those of every rank's batch, as code without
    ``SyncBatchNorm`` (CPU) writes it: ``torch.distributed.nn.functional.all_gather``, which
    backpropagates into each rank's share; ``detached``: the statistics all-reduced as
    constants (no derivative flows through them)."""

    def __init__(self, width: int, detached: bool = False) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(width)), nn.Parameter(torch.zeros(width))
        self.detached = detached

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        from torch.distributed.nn.functional import all_gather

        if self.detached:
            moments = torch.stack([h.sum(0), h.square().sum(0)]).detach()
            dist.all_reduce(moments)
            mean, square = moments / (len(h) * dist.get_world_size())
            var = square - mean**2
        else:
            gathered = torch.cat(all_gather(h))
            mean, var = gathered.mean(0), gathered.var(0, unbiased=False)
        return (h - mean) / (var + 1e-5).sqrt() * self.weight + self.bias


def _normed(detached: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = (nn.Linear(3, 8), CrossRankBatchNorm(8, detached), nn.Tanh(), nn.Linear(8, 3))
    return nn.Sequential(*layers).to(f64)


CALLS = {
    "divergence auto": lambda f, x: torchdiv.divergence(f, x),
    "divergence structured": lambda f, x: torchdiv.divergence(f, x, method="structured"),
    "divergence hutchinson": lambda f, x: torchdiv.divergence(
        f, x, method="hutchinson", num_probes=2, generator=torch.Generator().manual_seed(0)
    ),
    "laplacian auto": lambda f, x: torchdiv.laplacian(lambda z: f(z).sum(-1), x),
    "laplacian taylor": lambda f, x: torchdiv.laplacian(lambda z: f(z).sum(-1), x, method="taylor"),
    "value_grad_laplacian": lambda f, x: (
        torchdiv.value_grad_laplacian(lambda z: f(z).sum(-1), x).laplacian
    ),
}


# the legacy differentiable collectives, as older training code calls them
LEGACY = "ignore:torch.distributed.nn.functional.all_gather is deprecated:FutureWarning"


@pytest.mark.filterwarnings(LEGACY)
@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("wrapper", ["none", "ddp"])
def test_statistics_gathered_from_every_rank_are_refused(one_process_group, call, wrapper):
    """``torch.cat(all_gather(h)).mean(0)`` combines the samples of every rank (and of this
    one): the gathered tensors, filled in place by ``c10d.allgather_`` inside the gather's
    ``autograd.Function``, were untracked, so "auto" and Hutchinson served the mixing net as
    sample-wise (the Laplacian by "auto" was 0 for every sample, the divergence had the
    cross-sample terms), where the same net with ``h.mean(0)`` is refused."""
    model = _normed()
    if wrapper == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    x = torch.randn(6, 3, dtype=f64)
    with pytest.raises(torchdiv.BatchInteractionError, match="collective over the ranks"):
        CALLS[call](model, x)


@pytest.mark.parametrize("call", ["divergence auto", "laplacian taylor"])
def test_statistics_all_reduced_as_constants_are_served(one_process_group, call):
    """Statistics all-reduced under ``detach`` (no derivative through them, as a ``no_grad``
    block's) stay constants: values equal ``jacrev`` with the batch's statistics fixed."""
    model, x = _normed(detached=True), torch.randn(6, 3, dtype=f64)
    norm = model[1]
    h = model[0](x).detach()
    mean, var = h.mean(0), h.var(0, unbiased=False)
    fixed = nn.Sequential(model[0], _Affine(mean, var, norm.weight, norm.bias), *model[2:])
    if call == "divergence auto":
        want = _traces(fixed, x)
    else:
        hessian = torch.func.hessian(lambda v: fixed(v[None])[0].sum())
        want = torch.stack([hessian(v).trace() for v in x])
    torch.testing.assert_close(CALLS[call](model, x), want, rtol=1e-10, atol=1e-12)


class _Affine(nn.Module):
    """``(h - mean) / sqrt(var + eps) * weight + bias`` with fixed statistics."""

    def __init__(self, mean, var, weight, bias) -> None:
        super().__init__()
        self.mean, self.var, self.weight, self.bias = mean, var, weight, bias

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h - self.mean) / (self.var + 1e-5).sqrt() * self.weight + self.bias
