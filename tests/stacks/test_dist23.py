"""The distributed and training stacks against the twenty-first and twenty-second sessions'
changes, on small MLPs at D = 2-3 where the saved-tensor chains are taken (``_exact.chain``,
``_laplacian.chain``: counted in the processes), under two gloo ranks on localhost spawned by
``ddp_cases.run_pairs`` (each item bounded in time: no hang).

- DDP (default, ``static_graph``, ``find_unused_parameters``; gradient accumulation under
  ``no_sync``) and FSDP2 (resharding after forward or not, a ``MixedPrecisionPolicy``
  computing in float32), three SGD steps of a loss holding ``divergence``,
  ``jacobian_diagonal``, ``laplacian`` or ``value_grad_laplacian`` and ``f(x)``: every rank's
  gradients equal the float64 gradients of the whole batch in one process, by ``torch.func``
  per sample (independent of torchdiv), and the ranks agree; ``CommDebugMode`` around a step
  counts the collectives of a plain step.
- Collectives inside ``f``: a batch mean over every rank's samples switched on after two
  served calls, and each sample added to the other rank's sample at its position (a
  differentiable ``all_reduce``), are refused on both ranks; an ``all_reduce`` of detached
  values (a constant to the derivatives) is served, each call's value equal to a per-sample
  ``autograd`` reference while the other rank's batch moves (no recording kept a stale one);
  a field stopped by ``detach`` is refused by ``log_likelihood`` on both ranks, and the next
  calls are served.
- ``torchdiv.distributed``'s shared-out operators on those MLPs (three calls: the later ones
  take the chains) with a gradient penalty: values, ``x``-gradients and rank-averaged
  parameter gradients against ``torch.func`` in float64.

One fault: ``CommDebugMode`` around a step missed the collectives of DDP's and FSDP2's
pre-forward work in a call (``_core.ddp._plain_level`` left the caller's dispatch modes too):
its always-run guard runs in one process; everything else is a guard of what was right,
slow (a spawn each). ``NOTES_rev-dist23.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import ddp_cases
import pytest
import torch
from torch import nn

import torchdiv

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed"),
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
]

f64 = torch.float64
STEPS, LR = 3, 0.2
WORLD = ddp_cases.WORLD


class Field(nn.Module):
    """A tanh (or sigmoid) MLP ``D -> 16 -> 16 -> D``: a chain of ``addmm`` and activations.
    ``mixing``: after the first layer, ``"mean"`` subtracts the batch mean over every rank's
    samples, ``"position"`` adds the other ranks' samples at the same position (both by a
    differentiable ``all_reduce``), ``"detached"`` adds them as constants (an in-place
    ``all_reduce`` of a detached copy)."""

    def __init__(self, d: int = 2, activation: Callable = torch.tanh) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(d, 16), nn.Linear(16, 16), nn.Linear(16, d)
        self.activation = activation
        self.mixing = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.activation(self.inp(x))
        if self.mixing:
            h = _mixed(h, self.mixing)
        return self.out(self.activation(self.mid(h)))


def _mixed(h: torch.Tensor, how: str) -> torch.Tensor:
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_reduce

    if how == "mean":
        return h - all_reduce(h.mean(0, keepdim=True)) / WORLD
    if how == "position":
        return h + all_reduce(h) / WORLD
    others = h.detach().clone()
    dist.all_reduce(others)
    return h + others


MODELS = {"tanh2": (2, torch.tanh), "sigmoid3": (3, torch.sigmoid)}


def _model(name: str) -> Field:
    torch.manual_seed(0)
    d, activation = MODELS[name]
    return Field(d, activation).to(f64)


def _batch(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4 * WORLD, MODELS[name][0], generator=g, dtype=f64)


def _value_grad_laplacian(f: Callable, x: torch.Tensor) -> torch.Tensor:
    out = torchdiv.value_grad_laplacian(f, x)
    return out.laplacian.sum(-1) + out.gradient.square().sum((-1, -2))


OPERATORS: dict[str, Callable[[Callable, torch.Tensor], torch.Tensor]] = {
    "divergence": torchdiv.divergence,
    "jacobian_diagonal": lambda f, x: torchdiv.jacobian_diagonal(f, x).sum(-1),
    "laplacian": lambda f, x: torchdiv.laplacian(f, x).sum(-1),
    "value_grad_laplacian": _value_grad_laplacian,
}


def _loss(model: Callable, x: torch.Tensor, op: str) -> torch.Tensor:
    return OPERATORS[op](model, x).square().mean() + model(x).square().mean()


def _reference_value(model: nn.Module, x: torch.Tensor, op: str) -> torch.Tensor:
    """The operator's value per sample by ``torch.func`` on one sample at a time."""
    one = lambda z: model(z[None])[0]  # noqa: E731
    jacobian = torch.func.vmap(torch.func.jacrev(one))(x)  # (N, m, n)
    if op in ("divergence", "jacobian_diagonal"):
        return jacobian.diagonal(0, -2, -1).sum(-1)
    hessian = torch.func.vmap(torch.func.hessian(one))(x)  # (N, m, n, n)
    laplacian = hessian.diagonal(0, -2, -1).sum((-1, -2))
    if op == "laplacian":
        return laplacian
    return laplacian + jacobian.square().sum((-1, -2))


def _reference_steps(name: str, op: str, micro: int) -> list[list[torch.Tensor]]:
    """Each SGD step's parameter gradients in one process, float64: the mean over the ranks'
    ``micro`` micro-batches each of their mean losses (``x`` split as the ranks split it)."""
    model = _model(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    steps = []
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        parts = [p for half in _batch(name).chunk(WORLD) for p in half.chunk(micro)]
        for part in parts:
            value = _reference_value(model, part, op)
            loss = value.square().mean() + model(part).square().mean()
            (loss / len(parts)).backward()
        steps.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
    return steps


def _count_chains() -> dict[str, int]:
    """This process's count of the chains taken (``_exact.chain`` products, rows from the top
    layer's or traces by cyclicity given; ``_laplacian.chain`` Laplacians given), from now
    on."""
    from torchdiv._exact import autograd
    from torchdiv._laplacian import loop

    counts = {"jacobian": 0, "laplacian": 0}

    def counted(module: Any, name: str, kind: str) -> None:
        original = getattr(module, name)

        def call(*args: Any, **kwargs: Any) -> torch.Tensor | None:
            out = original(*args, **kwargs)
            counts[kind] += out is not None
            return out

        setattr(module, name, call)

    for name in ("chain_products", "unit_products", "chain_trace"):
        counted(autograd, name, "jacobian")
    counted(loop, "chain_laplacian", "laplacian")
    return counts


def _wrap(model: nn.Module, wrapper: str) -> nn.Module:
    """``ddp_cases.wrap``, and ``"fsdp-mixed"``: FSDP2 over each layer and the whole with
    parameters all-gathered in float32 (a float64 model), gradients reduced in float64."""
    if wrapper != "fsdp-mixed":
        return ddp_cases.wrap(model, wrapper)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=f64)
    for child in model.children():
        fully_shard(child, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def _collectives(step: Callable[[], None]) -> dict[str, int]:
    """The collectives ``CommDebugMode`` counts in ``step()``, by name."""
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as comm:
        step()
    return {str(op): n for op, n in comm.get_comm_counts().items()}


def _full(t: torch.Tensor | None) -> list[float] | None:
    if t is None:
        return None
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return t.detach().double().flatten().tolist()


def _gathered(result: tuple[str, Any]) -> tuple[str, Any]:
    """Every rank's ``result``, gathered to each (both ranks agree before the next item)."""
    import torch.distributed as dist

    results: list = [None] * WORLD
    dist.all_gather_object(results, result)
    return "ok", results


def run_steps(item: tuple[str, str, str, str], rank: int) -> tuple[str, Any]:
    """``ddp_cases.run_pairs``' runner: ``STEPS`` SGD steps of ``(wrapper, model, operator,
    mode)`` on this rank's half of the batch; mode ``"accumulate"``: two micro-batches a step,
    the first under ``no_sync`` (not at the first step: ``static_graph`` asserts there, a
    plain loss too); ``"comm"``: each step's loss the operator's alone, under
    ``CommDebugMode``, and a plain step (``f(x)``'s square) of another model wrapped alike
    after it: their collectives. Each step's gradients, the chains counted."""
    wrapper, name, op, mode = item
    counts = _count_chains()
    try:
        model, plain = _wrap(_model(name), wrapper), _wrap(_model(name), wrapper)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        x = _batch(name).chunk(WORLD)[rank]
        steps, collectives = [], []
        for step in range(STEPS):
            optimizer.zero_grad(set_to_none=True)
            if mode == "accumulate" and step > 0:
                first, second = x.chunk(2)
                with model.no_sync():
                    (_loss(model, first, op) / 2).backward()
                (_loss(model, second, op) / 2).backward()
            elif mode == "comm":
                ours = _collectives(lambda: OPERATORS[op](model, x).square().mean().backward())
                theirs = _collectives(lambda: plain(x).square().mean().backward())
                collectives.append((ours, theirs))
            else:
                _loss(model, x, op).backward()
            steps.append([_full(p.grad) for p in model.parameters()])
            optimizer.step()
        result: tuple[str, Any] = ("ok", (steps, dict(counts), collectives))
    except Exception as error:
        result = ("error", f"{type(error).__name__}: {str(error)[:300]}")
    return _gathered(result)


# (wrapper, model, operator, mode): every operator under each wrapper on the D = 2 tanh MLP;
# the D = 3 sigmoid MLP under one DDP and one FSDP2 option; accumulation under no_sync
TRAINING = [
    *[(w, "tanh2", op, "steps") for w in ("ddp", "ddp-static", "ddp-unused", "fsdp",
      "fsdp-keep", "fsdp-mixed") for op in OPERATORS],
    *[(w, "sigmoid3", op, "steps") for w in ("ddp-unused", "fsdp") for op in OPERATORS],
    *[(w, "tanh2", op, "accumulate") for w in ("ddp", "ddp-static", "ddp-unused")
      for op in ("divergence", "laplacian")],
    *[(w, "tanh2", op, "comm") for w in ("ddp", "ddp-static", "ddp-unused", "fsdp", "fsdp-keep")
      for op in ("divergence", "laplacian")],
]  # fmt: skip
# float64 throughout, sums in another order: 1e-16-1e-15 measured; float32 all-gathered
# parameters (FSDP2's param_dtype): 1e-7-2e-7 measured
TOL = {"fsdp-mixed": 1e-5}


@pytest.mark.slow
def test_training_steps_under_ddp_and_fsdp_equal_one_process_in_float64():
    """``TRAINING`` on one pair of gloo processes (~25 s of CPU): each step's gradients on
    every rank equal the float64 one-process gradients (relative, per parameter), the ranks
    agree exactly, the chains were taken (``_exact.chain`` by the divergences and diagonals
    of a full-precision model, ``_laplacian.chain`` by the Laplacians), and ``CommDebugMode``
    counts a step the collectives of a plain step (it missed those of DDP's and FSDP2's
    pre-forward work in the call, which ran outside every mode: DDP's bucket rebuild
    broadcasts, FSDP2's forward all-gathers)."""
    outcomes = ddp_cases.run_pairs(list(enumerate(TRAINING)), run_steps)
    chains: dict[str, int] = {"jacobian": 0, "laplacian": 0}
    for index, (wrapper, name, op, mode) in enumerate(TRAINING):
        status, ranks = outcomes[index]
        assert status == "ok", (TRAINING[index], ranks)
        assert [r[0] for r in ranks] == ["ok"] * WORLD, (TRAINING[index], ranks)
        if mode == "comm":
            for _, (_, _, collectives) in ranks:
                for ours, theirs in collectives:
                    assert ours == theirs and theirs, (TRAINING[index], collectives)
            continue
        micro = 2 if mode == "accumulate" else 1
        want = _reference_steps(name, op, micro)
        if mode == "accumulate":  # (the first step is a plain one: see run_steps)
            want[0] = _reference_steps(name, op, 1)[0]
        tol = TOL.get(wrapper, 1e-12)
        (steps, *_), (other, *_) = ranks[0][1], ranks[1][1]
        assert steps == other, f"{TRAINING[index]}: the ranks step apart"
        for got, expected in zip(steps, want, strict=True):
            for g, e in zip(got, expected, strict=True):
                error = (torch.tensor(g, dtype=f64) - e.flatten()).norm() / e.norm()
                assert error <= tol, (TRAINING[index], error.item())
        if wrapper != "fsdp-mixed":
            for _, (_, counts, _) in ranks:
                for kind in chains:
                    chains[kind] += counts[kind]
    assert chains["jacobian"] > 0 and chains["laplacian"] > 0, chains


def run_collectives(item: tuple[str, str, str], rank: int) -> tuple[str, Any]:
    """``ddp_cases.run_pairs``' runner: four calls of ``(wrapper, operator, mixing)`` on the
    D = 2 tanh MLP. ``"mean"``/``"position"``: served twice, then mixing (each call
    ``"served"`` or ``"refused"``); ``"detached"``: mixing from the start, rank 1's batch
    moving, each call's value minus the per-sample ``autograd`` reference (the collectives
    in lockstep: every rank evaluates the same samples in the same order); ``"stopped"``
    (``log_likelihood``): a field detached at the second and fourth calls."""
    wrapper, op, mixing = item
    inner = _model("tanh2")
    model = _wrap(inner, wrapper)
    outcomes: list = []
    try:
        for call in range(4):
            x = _batch("tanh2").chunk(WORLD)[rank] * (1 + 0.3 * call * rank)
            if mixing == "stopped":
                outcomes.append(_stopped_call(inner, model, x, stop=call % 2 == 1))
                continue
            inner.mixing = mixing if call >= 2 or mixing == "detached" else ""
            try:
                value = OPERATORS[op](model, x)
            except torchdiv.BatchInteractionError as error:
                assert "mixes samples" in str(error)
                outcomes.append("refused")
                continue
            _loss(model, x, op).backward()
            if mixing != "detached":
                outcomes.append("served")
                continue
            plain = _model("tanh2")  # (unwrapped: FSDP2 frees its parameters after a backward)
            plain.mixing = mixing
            want = torch.stack([_per_sample(plain, row, op) for row in x])
            outcomes.append((value.detach() - want).abs().max().item())
        result: tuple[str, Any] = ("ok", outcomes)
    except Exception as error:
        result = ("error", f"{type(error).__name__}: {str(error)[:300]}")
    return _gathered(result)


def _per_sample(model: nn.Module, row: torch.Tensor, op: str) -> torch.Tensor:
    """The operator at one sample by ``autograd.grad`` rows (a batch of one: its collective
    meets the other rank's sample at the same position), the Laplacian by grad of grad."""
    z = row[None].detach().requires_grad_(True)
    y = model(z)[0]
    total = z.new_zeros(())
    for i in range(len(y)):
        (g,) = torch.autograd.grad(y[i], z, create_graph=True)
        if op == "divergence":
            total = total + g[0, i]
            continue
        for j in range(z.shape[1]):
            total = total + torch.autograd.grad(g[0, j], z, retain_graph=True)[0][0, j]
    return total.detach()


class _Velocity(nn.Module):
    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        self.f = f

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.f(z)


def _stopped_call(inner: Field, model: nn.Module, x: torch.Tensor, stop: bool) -> str:
    """One adaptive ``log_likelihood`` step of ``model``'s flow, its hidden layer detached
    where ``stop`` (the field then does not depend on ``z``): ``"served"`` or ``"refused"``."""
    mid = inner.mid
    inner.mid = nn.Sequential(_Detached(), mid) if stop else mid
    try:
        value = torchdiv.flows.log_likelihood(
            _Velocity(model), x, 0.0, 1.0, lambda z: -0.5 * z.square().sum(-1),
            solver="dopri5", rtol=1e-5, atol=1e-5,
        )  # fmt: skip
        value.mean().backward()
        return "served"
    except ValueError as error:
        assert "does not depend on z" in str(error)
        return "refused"
    finally:
        inner.mid = mid


class _Detached(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.detach()


COLLECTIVES = [
    *[(w, op, m) for w in ("ddp", "fsdp") for op in ("divergence", "laplacian")
      for m in ("mean", "position", "detached")],
    ("ddp", "log_likelihood", "stopped"),
    ("fsdp-keep", "log_likelihood", "stopped"),
]  # fmt: skip


@pytest.mark.slow
def test_collectives_inside_f_are_refused_or_right_on_every_rank():
    """``COLLECTIVES`` on one pair of gloo processes (~10 s of CPU): a mixing collective is
    refused on both ranks from the call that turns it on (a chain or a recording kept from
    the served calls does not serve it), a detached one is right at every call while the other
    rank's samples move, a stopped field is refused on both ranks and the next call served."""
    outcomes = ddp_cases.run_pairs(list(enumerate(COLLECTIVES)), run_collectives)
    for index, (_, _, mixing) in enumerate(COLLECTIVES):
        status, ranks = outcomes[index]
        assert status == "ok", (COLLECTIVES[index], ranks)
        for rank_status, calls in ranks:
            assert rank_status == "ok", (COLLECTIVES[index], calls)
            if mixing == "detached":
                assert max(calls) < 1e-12, (COLLECTIVES[index], calls)
            elif mixing == "stopped":
                assert calls == ["served", "refused"] * 2, (COLLECTIVES[index], calls)
            else:
                assert calls == ["served"] * 2 + ["refused"] * 2, (COLLECTIVES[index], calls)


def run_sharded(item: tuple[str, str, str, str], rank: int) -> tuple[str, Any]:
    """``ddp_cases.run_pairs``' runner: ``ddp_cases.sharded_step``'s step (a gradient
    penalty) three times on one model (its structure's later calls take the chains), the
    last one's values, ``x``-gradients and rank-averaged parameter gradients."""
    import torch.distributed as dist

    op, method, name, wrapper = item
    try:
        model: nn.Module = _model(name)
        if wrapper == "ddp":
            model = nn.parallel.DistributedDataParallel(model)
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            x = _batch(name).requires_grad_(True)
            value = ddp_cases.sharded_value(model, x, op, method, sharded=True)
            loss = value.square().mean()
            (x_grad,) = torch.autograd.grad(loss, x, create_graph=True)
            (loss + x_grad.square().sum()).backward()
        grads = []
        for p in model.parameters():
            grad = torch.zeros_like(p) if p.grad is None else p.grad
            if wrapper != "ddp":
                dist.all_reduce(grad)
                grad /= WORLD
            grads.append(grad.flatten().tolist())
        outcome = (value.detach().flatten().tolist(), x_grad.detach().flatten().tolist(), grads)
        result: tuple[str, Any] = ("ok", outcome)
    except Exception as error:
        result = ("error", f"{type(error).__name__}: {str(error)[:300]}")
    return _gathered(result)


SHARDED = [
    (op, method, name, wrapper)
    for name in MODELS
    for op, method in (("divergence", "auto"), ("divergence", "structured"),
                       ("divergence", "reverse"), ("laplacian", "auto"))
    for wrapper in ("none", "ddp")
]  # fmt: skip


def _sharded_reference(item: tuple[str, str, str, str]) -> tuple[torch.Tensor, ...]:
    """``sharded_step``'s value, ``x``-gradient and parameter gradients by ``torch.func``."""
    op, _, name, _ = item
    model = _model(name)
    x = _batch(name).requires_grad_(True)
    one = lambda z: model(z[None])[0]  # noqa: E731
    if op == "laplacian":  # (each output component's: (N, m))
        value = torch.func.vmap(torch.func.hessian(one))(x).diagonal(0, -2, -1).sum(-1)
    else:
        value = _reference_value(model, x, op)
    loss = value.square().mean()
    (x_grad,) = torch.autograd.grad(loss, x, create_graph=True)
    (loss + x_grad.square().sum()).backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
    return value.detach().flatten(), x_grad.detach().flatten(), *[g.flatten() for g in grads]


@pytest.mark.slow
def test_shared_out_operators_on_chain_mlps_equal_float64_references():
    """``SHARDED`` on one pair (~8 s of CPU): ``torchdiv.distributed``'s divergence (the
    first rank computes a chain whole) and Laplacian under a gradient penalty, every rank's
    value and ``x``-gradient and the rank-averaged parameter gradients against ``torch.func``
    in float64 (``ddp_cases``' sharded cases use an MLP scaled by a buffer: no chain)."""
    close = functools.partial(torch.testing.assert_close, rtol=1e-10, atol=1e-12)
    outcomes = ddp_cases.run_pairs(list(enumerate(SHARDED)), run_sharded)
    for index, item in enumerate(SHARDED):
        status, ranks = outcomes[index]
        assert status == "ok", (item, ranks)
        value, x_grad, *grads = _sharded_reference(item)
        for rank_status, payload in ranks:
            assert rank_status == "ok", (item, payload)
            got_value, got_x_grad, got_grads = payload
            close(torch.tensor(got_value, dtype=f64), value, msg=str(item))
            close(torch.tensor(got_x_grad, dtype=f64), x_grad, msg=str(item))
            for got, want in zip(got_grads, grads, strict=True):
                close(torch.tensor(got, dtype=f64), want, msg=str(item))


def test_comm_debug_mode_counts_the_ddp_forward_s_collectives_in_a_call(one_process_group):
    """The always-run guard of the ``CommDebugMode`` fault (one process, ~0.1 s): a
    DDP-wrapped MLP with a registered buffer broadcasts it at every forward and rebuilds its
    buckets (two more broadcasts) at the second; a step whose loss is a divergence of the
    module showed none of them (DDP's pre-forward work ran outside every dispatch mode, the
    caller's too), only the gradients' all-reduce."""
    model, plain = (
        nn.parallel.DistributedDataParallel(ddp_cases.make_model("mlp", False)) for _ in "ab"
    )
    x = ddp_cases.batch("mlp")
    for _ in range(2):
        ours = _collectives(lambda: torchdiv.divergence(model, x).square().mean().backward())
        theirs = _collectives(lambda: plain(x).square().mean().backward())
        assert ours == theirs and "c10d.broadcast_" in theirs, (ours, theirs)
