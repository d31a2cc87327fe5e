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

    def __init__(self, width: int, detached: bool = False, functional: bool = False) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(width)), nn.Parameter(torch.zeros(width))
        self.detached, self.functional = detached, functional

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        from torch.distributed.nn.functional import all_gather

        if self.detached:
            moments = torch.stack([h.sum(0), h.square().sum(0)]).detach()
            dist.all_reduce(moments)
            mean, square = moments / (len(h) * dist.get_world_size())
            return (h - mean) / (square - mean**2 + 1e-5).sqrt() * self.weight + self.bias
        if self.functional:  # (the differentiable functional collective)
            from torch.distributed._functional_collectives import all_gather_tensor_autograd

            gathered = all_gather_tensor_autograd(h, 0, dist.group.WORLD)
        else:
            gathered = torch.cat(all_gather(h))
        mean, var = gathered.mean(0), gathered.var(0, unbiased=False)
        return (h - mean) / (var + 1e-5).sqrt() * self.weight + self.bias


def _normed(detached: bool = False, functional: bool = False) -> nn.Module:
    torch.manual_seed(0)
    norm = CrossRankBatchNorm(8, detached, functional)
    layers = (nn.Linear(3, 8), norm, nn.Tanh(), nn.Linear(8, 3))
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
    fixed = _fixed(model, x)
    if call == "divergence auto":
        want = _traces(fixed, x)
    else:
        hessian = torch.func.hessian(lambda v: fixed(v[None])[0].sum())
        want = torch.stack([hessian(v).trace() for v in x])
    torch.testing.assert_close(CALLS[call](model, x), want, rtol=1e-10, atol=1e-12)


def _fixed(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``model`` (``_normed(detached=True)``) with the statistics of the batch ``x`` fixed."""
    h = model[0](x).detach()
    mean, var = h.mean(0), h.var(0, unbiased=False)
    return nn.Sequential(model[0], _Affine(mean, var, model[1].weight, model[1].bias), *model[2:])


class _Affine(nn.Module):
    """``(h - mean) / sqrt(var + eps) * weight + bias`` with fixed statistics."""

    def __init__(self, mean, var, weight, bias) -> None:
        super().__init__()
        self.mean, self.var, self.weight, self.bias = mean, var, weight, bias

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h - self.mean) / (self.var + 1e-5).sqrt() * self.weight + self.bias


class Pipeline(nn.Module):
    """A vector field whose activations and scale sit in the module's own containers (the
    structure key reads them, keyattrs20), changed between training steps."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(3, 16), nn.Linear(16, 3)
        self.acts: list[Callable[[torch.Tensor], torch.Tensor]] = [torch.tanh]
        self.cfg = {"scale": 1.0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for act in self.acts:
            h = act(h)
        return self.out(h * self.cfg["scale"])


def _centred(h: torch.Tensor) -> torch.Tensor:
    return h - h.mean(0)


def _pipeline_steps(model: nn.Module, inner: Pipeline, x: torch.Tensor) -> list:
    """Two steps of ``mean(div^2)``, the containers changed (sin, scale 2) before the second;
    then a change that mixes samples (``h - h.mean(0)``), which must be refused."""
    steps = []
    for change in (None, "swap"):
        if change:
            inner.acts[0], inner.cfg["scale"] = torch.sin, 2.0
        model.zero_grad(set_to_none=True)
        torchdiv.divergence(model, x).square().mean().backward()
        steps.append([_full(p.grad) for p in model.parameters()])
    inner.acts.append(_centred)
    try:
        torchdiv.divergence(model, x)
        steps.append("served")
    except torchdiv.BatchInteractionError:
        steps.append("refused")
    return steps


def _full(g: torch.Tensor | None) -> list[float] | None:
    if g is not None and hasattr(g, "full_tensor"):
        g = g.full_tensor()
    return None if g is None else g.detach().flatten().tolist()


def _ffjord_step(model: nn.Module, x: torch.Tensor, form: str) -> list:
    """The log-density change of the graph-form solve, ``mean`` backpropagated through it."""
    model.zero_grad(set_to_none=True)
    _solve(_dynamics(form, model), x).mean().backward()
    return [[_full(p.grad) for p in model.parameters()]]


def _encoded() -> nn.Sequential:
    """An encoder (its output the ``x`` of the graph form) and a field on its features."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    return nn.Sequential(encoder, nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))).to(
        f64
    )


def _encoded_step(encoder: nn.Module, field: nn.Module, raw: torch.Tensor) -> list:
    """``div`` of the field at the encoder's output by the graph form: the walks stop at that
    ``x``, below which lie the encoder's DDP hooks (``static_graph``'s delayed all-reduce)."""
    x = encoder(raw)
    y = field(x)
    loss = torchdiv.graph_divergence(y, x, create_graph=True).square().mean()
    (loss + y.square().mean()).backward()
    return [[_full(p.grad) for p in (*encoder.parameters(), *field.parameters())]]


def _normed_step(model: nn.Module, x: torch.Tensor) -> list:
    model.zero_grad(set_to_none=True)
    torchdiv.divergence(model, x).square().mean().backward()
    return [[_full(p.grad) for p in model.parameters()]]


def run_rank(item: tuple[str, str], rank: int) -> tuple[str, object]:
    """``ddp_cases.run_pairs``' runner: ``(case, wrapper)`` on this rank's half of the batch;
    ``("ok", steps)`` or ``("error", message)``."""
    import ddp_cases
    import torch.distributed as dist

    case, wrapper = item
    x = _batch(case).chunk(ddp_cases.WORLD)[rank]
    try:
        if case == "pipeline":
            inner = _pipeline()
            steps = _pipeline_steps(ddp_cases.wrap(inner, wrapper), inner, x)
        elif case == "ffjord":
            steps = _ffjord_step(ddp_cases.wrap(_field(), wrapper), x, "graph")
        elif case == "detached":
            steps = _normed_step(ddp_cases.wrap(_normed(detached=True), wrapper), x)
        elif case == "encoded":
            encoder, field = (ddp_cases.wrap(part, wrapper) for part in _encoded())
            steps = _encoded_step(encoder, field, x)
        else:  # a gather over every rank's batch: refused on every rank, no collective left
            model = ddp_cases.wrap(_normed(functional=case == "functional"), wrapper)
            try:
                torchdiv.divergence(model, x)
                steps = ["served"]
            except torchdiv.BatchInteractionError as error:
                steps = ["refused" if "collective" in str(error) else str(error)[:200]]
        result: tuple[str, object] = ("ok", steps)
    except Exception as error:
        result = ("error", f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
    outcomes: list = [None, None]
    dist.all_gather_object(outcomes, result)  # (both ranks' steps, to compare)
    return result if result[0] == "error" else ("ok", outcomes)


def _pipeline() -> Pipeline:
    torch.manual_seed(0)
    return Pipeline().to(f64)


def _batch(case: str) -> torch.Tensor:
    return torch.randn(8, 3, dtype=f64, generator=torch.Generator().manual_seed(1))


def _reference(case: str) -> list:
    """One process's steps on each half of the batch, the halves' gradients averaged (what
    DDP and FSDP2 give every rank); "detached": the statistics of the whole batch fixed."""
    import ddp_cases

    x = _batch(case)
    halves = []
    for half in x.chunk(ddp_cases.WORLD):
        if case == "pipeline":
            model = _pipeline()
            halves.append(_pipeline_steps(model, model, half))
        elif case == "ffjord":
            halves.append(_ffjord_step(_field(), half, "reference"))
        elif case == "encoded":
            halves.append(_encoded_step(*_encoded(), half))
        else:
            model = _normed(detached=True)
            fixed = _fixed(model, x)
            _traces(fixed, half).square().mean().backward()
            halves.append([[_full(p.grad) for p in model.parameters()]])
    steps = []
    for step in zip(*halves, strict=True):
        if isinstance(step[0], str):
            steps.append(step[0])
            continue
        grads = zip(*step, strict=True)
        steps.append([_mean(pair) for pair in grads])
    return steps


def _mean(grads: tuple[list[float] | None, ...]) -> torch.Tensor | None:
    """The mean of the halves' gradients (``None``: none, as zero where the other has one)."""
    known = [torch.tensor(g, dtype=f64) for g in grads if g is not None]
    return sum(known) / len(grads) if known else None


STACKS = [
    ("pipeline", "ddp"),
    ("pipeline", "fsdp"),
    ("pipeline", "fsdp-keep"),
    ("ffjord", "ddp"),
    ("detached", "ddp"),
    ("encoded", "ddp-static"),
    ("encoded", "fsdp"),
    ("legacy", "ddp"),
    ("functional", "ddp"),
    ("functional", "fsdp"),
]


@pytest.mark.slow
@pytest.mark.filterwarnings(LEGACY, "ignore::FutureWarning", "ignore::UserWarning")
def test_two_ranks_agree_with_one_process_and_refuse_a_gather_over_their_samples():
    """Two gloo ranks, each with half of a float64 batch (each case bounded by
    ``ddp_cases.run_pairs``' timeout: no hang). A module's containers changed between steps
    (an activation swapped, a scale set), under DDP and FSDP2 resharding or not, then changed
    to mix samples; FFJORD's graph-form solve under DDP; the graph form at a wrapped
    encoder's output (``static_graph``, FSDP2: their hooks below ``x``); statistics all-reduced as
    constants; statistics gathered from both ranks (legacy and functional collectives, whose
    results were served on world sizes above one: the functional gather's unwaited buffers,
    values of 1e250). Both ranks' gradients equal each other and one process's (1e-10);
    the mixing changes and the gathers are refused on both ranks."""
    import ddp_cases

    pytest.importorskip("torchdiffeq")
    outcomes = ddp_cases.run_pairs(list(enumerate(STACKS)), run_rank)
    for index, item in enumerate(STACKS):
        status, payload = outcomes[index]
        assert status == "ok", (item, payload)
        if item[0] in ("legacy", "functional"):
            assert [rank[1] for rank in payload] == [["refused"]] * 2, (item, payload)
            continue
        want = _reference(item[0])
        for rank_status, steps in payload:
            assert rank_status == "ok" and len(steps) == len(want), (item, steps)
            for got, expected in zip(steps, want, strict=True):
                if isinstance(expected, str):
                    assert got == expected, item
                    continue
                for g, e in zip(got, expected, strict=True):
                    if e is None:
                        assert g is None or not any(g), item
                        continue
                    g = torch.zeros_like(e) if g is None else torch.tensor(g, dtype=f64)
                    torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=str(item))
