"""rev-merges21a: the collective rule of the mixing watch (rev-stacks21) on gloo groups of one
process (``one_process_group``) and of two spawned ranks (``ddp_cases.run_pairs``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dnf

import torchdiv

f64 = torch.float64
LEGACY = "ignore:torch.distributed.nn.functional:FutureWarning"


def _weights() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, dtype=f64, generator=g) / 3**0.5, torch.randn(
        3, 8, dtype=f64, generator=g
    ) / 8


W1, W2 = _weights()


class AllToAll(torch.autograd.Function):
    """Samples swapped between ranks by ``all_to_all_single`` (a sequence-parallel exchange)."""

    @staticmethod
    def forward(h: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(h)
        dist.all_to_all_single(out, h.contiguous())
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return AllToAll.apply(grad)


# ops whose ``c10d`` op returns only a ``Work`` and fills its first argument
FILLED: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gather": lambda h: torch.stack(dnf.gather(h, 0)).sum(0),
    "all_to_all_single": lambda h: dnf.all_to_all_single(torch.empty_like(h), h),
    "reduce": lambda h: dnf.reduce(h, 0),
    "function all_to_all_single": AllToAll.apply,
}


def _net(collective: Callable[[torch.Tensor], torch.Tensor], centred: bool) -> Callable:
    def f(z: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(z @ W1.T)
        g = collective(h)
        return (h - g.mean(0) if centred else g) @ W2.T

    return f


@pytest.mark.filterwarnings(LEGACY)
@pytest.mark.parametrize("name", ["gather", "all_to_all_single", "function all_to_all_single"])
def test_a_collective_filling_its_argument_is_refused(one_process_group, name):
    """``h - torch.stack(gather(h, 0)).sum(0).mean(0)`` is ``h - h.mean(0)`` on one rank
    (refused), a batch norm over every rank's batch on more; ``gather_`` and
    ``alltoall_base_`` return only a ``Work`` and fill their first argument, which went
    unmarked: served."""
    x = torch.randn(6, 3, dtype=f64)
    with pytest.raises(torchdiv.BatchInteractionError, match="collective over the ranks"):
        torchdiv.divergence(_net(FILLED[name], centred=True), x)


class CopyToParallel(torch.autograd.Function):
    """Megatron's copy to the tensor-parallel region: identity, gradients all-reduced."""

    @staticmethod
    def forward(h: torch.Tensor) -> torch.Tensor:
        return h.view_as(h)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class ReduceFromParallel(torch.autograd.Function):
    """Megatron's reduce from the tensor-parallel region: partial sums all-reduced."""

    @staticmethod
    def forward(h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        dist.all_reduce(h)
        return h

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class SendOn(torch.autograd.Function):
    """A pipeline stage's activations sent on from rank 0 to rank 1 (a barrier on one rank):
    ``send`` and ``recv`` combine nothing on either rank."""

    @staticmethod
    def forward(h: torch.Tensor) -> torch.Tensor:
        y = 2 * h
        if dist.get_world_size() == 1:
            dist.barrier()
        elif dist.get_rank() == 0:
            dist.send(y.contiguous(), 1)
        else:
            dist.recv(torch.empty_like(y), 0)
        return y

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return 2 * grad


def _tensor_parallel(z: torch.Tensor) -> torch.Tensor:
    """``tanh(z W1^T) W2^T`` with ``W1``'s rows and ``W2``'s columns split over the ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    first, second = W1.chunk(world, 0)[rank], W2.chunk(world, 1)[rank]
    return ReduceFromParallel.apply(torch.tanh(CopyToParallel.apply(z) @ first.T) @ second.T)


def _traces(z: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The divergence of the unsplit net (its hidden layer times ``scale``), one sample at a
    time (``jacrev``)."""
    jacobian = torch.func.vmap(torch.func.jacrev(lambda v: scale * torch.tanh(v @ W1.T) @ W2.T))
    return torch.vmap(torch.trace)(jacobian(z))


def _batch() -> torch.Tensor:
    return torch.randn(8, 3, dtype=f64, generator=torch.Generator().manual_seed(5))


def run_rank(name: str, rank: int) -> list:
    """``ddp_cases.run_pairs``' runner: both ranks' outcome of ``name``."""
    x = _batch()
    try:
        if name == "tensor parallel":  # (the same samples on every rank)
            try:
                torchdiv.divergence(_tensor_parallel, x)
                outcome: object = "served"
            except torchdiv.BatchInteractionError as error:
                assert "allow_batch_interaction()" in str(error).split("tensor parallelism")[1]
                with torchdiv.allow_batch_interaction():
                    got = torchdiv.divergence(_tensor_parallel, x)
                outcome = float((got - _traces(x)).abs().max())
        elif name == "send":
            x = x.chunk(dist.get_world_size())[rank]
            got = torchdiv.divergence(_net(SendOn.apply, centred=False), x)
            outcome = float((got - _traces(x, 2.0)).abs().max())
        else:
            x = x.chunk(dist.get_world_size())[rank]
            try:
                torchdiv.divergence(_net(FILLED[name], centred=False), x)
                outcome = "served"
            except torchdiv.BatchInteractionError as error:
                outcome = "refused" if "collective over the ranks" in str(error) else str(error)
    except Exception as error:
        outcome = f"{type(error).__name__}: {error}"[:300]
    outcomes: list = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, outcome)
    return outcomes


@pytest.mark.slow
@pytest.mark.filterwarnings(LEGACY)
@pytest.mark.parametrize("world", [1, 2])
def test_ranks_refuse_every_collective_of_their_samples_and_name_tensor_parallelism(world):
    """Spawned gloo ranks (bounded by ``run_pairs``' timeout), each with its share of the
    batch: ``reduce``, ``gather`` and ``all_to_all_single`` (whose ``c10d`` ops return only a
    ``Work``) put the other rank's samples into f's output; they were served on both ranks.
    Refused on every rank now (on one rank too: the same f). Megatron-style tensor
    parallelism (the same x on every rank) is refused as well (served before rev-stacks21:
    the watch cannot tell the ranks' samples apart), with the message naming
    ``allow_batch_interaction()``, under which every rank's divergence equals the unsplit
    net's (float64, 1e-12). A pipeline stage's ``send``/``recv`` inside a Function's forward
    combines nothing: served, right (a first version of the fix marked what that forward had
    made, and the ranks' verdicts differed: a hang)."""
    import ddp_cases

    names = [*FILLED, "tensor parallel", "send"]
    outcomes = ddp_cases.run_pairs(list(enumerate(names)), run_rank, timeout=40, world=world)
    for index, name in enumerate(names):
        if name in ("tensor parallel", "send"):
            assert all(isinstance(o, float) and o < 1e-12 for o in outcomes[index]), outcomes
        else:
            assert outcomes[index] == ["refused"] * world, (name, outcomes[index])
