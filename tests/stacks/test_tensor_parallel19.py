"""Tensor parallelism (DTensor) under torchdiv's operators, in PINN- and CNF-style training
losses: ``parallelize_module``'s ``ColwiseParallel`` then ``RowwiseParallel`` (Megatron's pair)
on a tanh MLP and on a small attention block, alone and inside FSDP2 on a (1, 2) mesh; two gloo
processes on localhost, spawned by ``ddp_cases.run_pairs`` (bounded in time: a pair that
crashes or stops reporting is killed). Each case runs on both ranks and reports rank 0's list of
what went wrong; values and parameter gradients are compared, in float64, with a plain module
holding the same weights, all-gathered (``full_tensor``), and independent references
(``torch.func`` Jacobians and Hessians).

With a plain ``x``, every sharded module's input goes through ``DTensor.from_local``, whose
backward drops the graph of a gradient that changes placement (Partial made Replicate): the
divergence's parameter gradients were lost (none: ``loss.backward()`` gave the data term's
alone) and the Laplacian's second derivatives were zero (values 0.2 off), without an error.
Those are refused now, naming DTensor.from_local; ``x`` as a DTensor (``Replicate`` or the
batch split, ``Shard(0)``) goes through ``redistribute``, which is differentiable twice, and
every exact method ``"auto"`` takes gives the right values and gradients, samples unmixed.
"""

from __future__ import annotations

from collections.abc import Callable

import ddp_cases
import pytest
import torch
from conftest import (
    laplacian_by_grad_of_grad,
    reference_diagonal,
    reference_divergence,
    reference_jacobian,
    tanh_mlp,
)
from torch import nn

import torchdiv

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")

TOL = {"rtol": 1e-10, "atol": 1e-12}  # float64: partial sums added across ranks in another order
REFUSED = "DTensor.from_local"  # what the refusals name
PROBES = 2
STOCHASTIC_OR_GRAPH = ("laplacian/hutchinson", "divergence/hutchinson", "graph_divergence")


class Block(nn.Module):
    """A pre-norm transformer block on ``(B, S, E)``: attention of heads of width 2, then a tanh
    MLP, each added to the residual stream; written as nanoGPT-style code writes it, so that
    the heads split across the ranks (``view(b, s, -1, head)``)."""

    def __init__(self, width: int = 4, head: int = 2) -> None:
        super().__init__()
        self.head = head
        self.norm, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.norm(x)
        q, k, v = (p(h).view(b, s, -1, self.head).transpose(1, 2) for p in (self.q, self.k, self.v))
        attended = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.o(attended.transpose(1, 2).reshape(b, s, -1))
        return x + self.down(torch.tanh(self.up(self.norm2(x))))


def _full(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a DTensor all-gathered, a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _parallel(model: str, layout: str) -> tuple[nn.Module, nn.Module, torch.Tensor, object]:
    """The model sharded by ``layout`` (``"megatron"``: Colwise then Rowwise; ``"rowwise"``:
    both layers Rowwise from a replicated input; ``"fsdp"``: Megatron's inside FSDP2 on a
    (1, R) mesh; R: the group's ranks), a plain float64 copy of its weights (all-gathered), a
    float64 batch and the tensor-parallel mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    torch.manual_seed(0)
    if model == "mlp":
        net, plain, x = tanh_mlp(4, 8, 4), tanh_mlp(4, 8, 4), torch.randn(6, 4, dtype=torch.float64)
        pair = ("0", "2")
    else:
        net, plain, x = Block().double(), Block().double(), torch.randn(2, 3, 4).double()
        pair = ("up", "down")
    plan = {pair[0]: ColwiseParallel(), pair[1]: RowwiseParallel()}
    if model == "block":
        plan |= {name: ColwiseParallel() for name in "qkv"} | {"o": RowwiseParallel()}
    if layout == "rowwise":
        plan = {name: RowwiseParallel(input_layouts=Replicate()) for name in pair}
    world = torch.distributed.get_world_size()
    grid = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    mesh = grid["tp"] if layout == "fsdp" else init_device_mesh("cpu", (world,))
    parallelize_module(net, mesh, plan)
    plain.load_state_dict({name: _full(t) for name, t in net.state_dict().items()})
    if layout == "fsdp":
        fully_shard(net, mesh=grid["dp"])
    return net, plain, x, mesh


def _laplacian(f: Callable, x: torch.Tensor) -> torch.Tensor:
    """Each output's Laplacian by grad of grad (``conftest``'s loop, per output), shape
    ``f(x).shape``: backward passes only (``torch.func.hessian``'s forward mode loads its
    decompositions, ~1 s, in every worker)."""
    outputs = f(x).shape[1]
    return torch.stack(
        [laplacian_by_grad_of_grad(lambda z, i=i: f(z)[:, i], x) for i in range(outputs)], 1
    )


def _hutchinson_divergence(f: Callable, x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """``(1/k) sum_j v_j^T J v_j`` per sample, from the per-sample Jacobians."""
    samples, n = len(x), x[0].numel()
    jac = reference_jacobian(f, x).reshape(samples, n, n)
    flat = probes.reshape(len(probes), samples, n)
    return torch.einsum("kbi,bij,kbj->b", flat, jac, flat) / len(probes)


def _hutchinson_laplacian(f: Callable, x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """``(1/k) sum_j v_j^T H_i v_j`` per sample and output ``i``, ``H_i`` by ``torch.func``."""
    columns = []
    for i in range(f(x).shape[1]):
        hess = reference_jacobian(torch.func.grad(lambda z, i=i: f(z)[:, i].sum()), x)
        columns.append(torch.einsum("kbi,bij,kbj->b", probes, hess, probes) / len(probes))
    return torch.stack(columns, 1)


def _operators(probes: torch.Tensor) -> dict[str, tuple[Callable, Callable]]:
    """Name -> (torchdiv's call on ``(f, x)``, its reference on a plain ``f``)."""
    plain_probes = _full(probes)
    return {
        "divergence": (torchdiv.divergence, reference_divergence),
        "jacobian_diagonal": (torchdiv.jacobian_diagonal, reference_diagonal),
        "laplacian": (torchdiv.laplacian, _laplacian),
        "laplacian/grad-of-grad": (
            lambda f, x: torchdiv.laplacian(f, x, method="grad-of-grad"),
            _laplacian,
        ),
        "laplacian/hutchinson": (
            lambda f, x: torchdiv.laplacian(f, x, method="hutchinson", probes=probes),
            lambda f, x: _hutchinson_laplacian(f, x, plain_probes),
        ),
        "divergence/hutchinson": (
            lambda f, x: torchdiv.divergence(f, x, method="hutchinson", probes=probes),
            lambda f, x: _hutchinson_divergence(f, x, plain_probes),
        ),
        "graph_divergence": (
            lambda f, x: torchdiv.graph_divergence(
                f(z := x.detach().requires_grad_()), z, create_graph=True
            ),
            reference_divergence,
        ),
    }


def _step(f: nn.Module, x: torch.Tensor, op: Callable) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A PINN step's loss, the residual's square and a data term: its value and the parameter
    gradients (whole)."""
    f.zero_grad()  # (before the forward: FSDP2's root holds its unsharded parameters after it)
    value = _full(op(f, x.detach()))
    (value.square().mean() + _full(f(x)).square().mean()).backward()
    return value.detach(), [_full(p.grad) for p in f.parameters()]


def _compare(name: str, got, want) -> list[str]:
    try:
        torch.testing.assert_close(got, want, **TOL)
    except AssertionError as error:
        return [f"{name}: {str(error).splitlines()[0:3]}"]
    return []


def run_case(case: tuple[str, str, str], rank: int) -> list[str]:
    """``(model, layout, x)``: ``x`` ``"plain"``, ``"replicate"`` or ``"shard"`` (a DTensor,
    the batch split over the ranks). Returns what went wrong (rank 0's; both ranks run all)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from torchdiv._exact.autograd import UndifferentiableBackward

    model, layout, given = case
    net, plain, x, mesh = _parallel(model, layout)
    probes = torch.randn(PROBES, *x.shape, dtype=x.dtype)
    refused = given == "plain" and layout != "rowwise"  # (a placement changed in backward)
    if given != "plain":
        probes = distribute_tensor(probes, mesh, [Replicate()])
        x = distribute_tensor(x, mesh, [Replicate() if given == "replicate" else Shard(0)])
    failures = []
    for name, (op, reference) in _operators(probes).items():
        if given != "plain" and name in STOCHASTIC_OR_GRAPH:
            continue  # (refused by name: test_what_cannot_take_a_dtensor_is_refused_by_name)
        if model == "block" and name.startswith(("laplacian", "graph")):
            # the block's Laplacian: slow to refer to; its graph_divergence in a loss with a data
            # term raises PyTorch's "mixed torch.Tensor and DTensor" in the backward
            continue
        if refused and name.startswith("laplacian"):
            try:
                op(net, x)
                failures.append(f"{name}: not refused")
            except UndifferentiableBackward as error:
                failures += [] if REFUSED in str(error) else [f"{name}: {error}"]
            continue
        want = reference(plain, _full(x))
        if refused:
            value = _full(op(net, x))
            failures += _compare(f"{name} value", value, want)
            loss = value.square().mean() + _full(net(x)).square().mean()
            try:
                loss.backward()
                failures.append(f"{name}: gradients not refused")
            except UndifferentiableBackward as error:
                failures += [] if REFUSED in str(error) else [f"{name}: {error}"]
            continue
        value, grads = _step(net, x, op)
        plain_value, plain_grads = _step(plain, _full(x), op)
        failures += _compare(f"{name} value", value, want)
        failures += _compare(f"{name} value", value, plain_value)
        failures += _compare(f"{name} gradients", grads, plain_grads)
    return failures if rank == 0 else []


def _run(cases: list[tuple[str, str, str]]) -> dict[tuple[str, str, str], object]:
    outcomes = ddp_cases.run_pairs(list(enumerate(cases)), run_case)
    return {case: outcomes[i] for i, case in enumerate(cases)}


MEGATRON = [("mlp", "megatron", "plain"), ("mlp", "megatron", "shard")]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_megatron_mlp_on_one_rank_is_right_or_refused(one_process_group):
    """The cases below on a mesh of one rank, in this process (1-3 s): ``from_local`` drops
    the graph there too (a Partial gradient made Replicate)."""
    assert {case: run_case(case, 0) for case in MEGATRON} == {case: [] for case in MEGATRON}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_megatron_mlp_in_a_training_loss_is_right_or_refused():
    """Plain ``x``: values right, the divergence's gradients and the Laplacian refused
    (they were silently wrong); ``x`` split over the ranks as a DTensor (``Shard(0)``): values
    and gradients of every exact operator equal one process's. One pair of processes (20-40 s
    on a 2-core machine under load, mostly two interpreters importing torch)."""
    assert _run(MEGATRON) == {case: [] for case in MEGATRON}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fsdp2_with_tensor_parallelism_and_an_attention_block():
    """A Rowwise-only plan (no placement change in backward): not refused, and right. The
    Megatron MLP inside FSDP2 on a (1, 2) mesh (torchdiv's FSDP2 handling meets DTensor
    parameters: no misfire), with ``x`` plain and split; ``x`` replicated as a DTensor; an
    attention block whose heads are split (plain ``x``: values right, gradients refused)."""
    cases = [
        ("mlp", "rowwise", "plain"),
        ("mlp", "fsdp", "plain"),
        ("mlp", "fsdp", "shard"),
        ("mlp", "megatron", "replicate"),
        ("block", "megatron", "plain"),
    ]
    outcomes = _run(cases)
    assert outcomes == {case: [] for case in cases}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_what_cannot_take_a_dtensor_is_refused_by_name(one_process_group):
    """On a mesh of one rank, in this process. ``f`` returning a DTensor (the last layer's
    ``use_local_output=False``: loss_parallel's layout) raised ``AttributeError: 'Tensor'
    object has no attribute '_local_tensor'`` from DTensor's backward, given torchdiv's plain
    vectors; a DTensor ``x`` met Hutchinson's probes and the graph form's vectors as plain
    tensors ("got mixed torch.Tensor and DTensor"). Each is a ``TypeError`` naming DTensor and
    the way out now. The engines that run ``f`` under ``torch.func`` or a recording raise."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (1,))
    plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
    net = parallelize_module(tanh_mlp(4, 8, 4), mesh, plan)
    sharded_out = parallelize_module(
        tanh_mlp(4, 8, 4), mesh, plan | {"4": ColwiseParallel(use_local_output=False)}
    )
    x = torch.randn(6, 4, dtype=torch.float64)
    way_out = r"is a DTensor .*full_tensor\(\)"
    for op in (torchdiv.divergence, torchdiv.jacobian_diagonal, torchdiv.laplacian):
        with pytest.raises(TypeError, match=rf"{op.__name__}: f\(x\) {way_out}"):
            op(sharded_out, x)
    z = x.clone().requires_grad_(True)
    with pytest.raises(TypeError, match=rf"graph_divergence: y {way_out}"):
        torchdiv.graph_divergence(sharded_out(z), z)

    dx = distribute_tensor(x, mesh, [Replicate()])
    probes = distribute_tensor(torch.randn(2, 6, 4, dtype=torch.float64), mesh, [Replicate()])
    way_out = r"x is a DTensor, which {} cannot take.*method='auto'.*x.full_tensor\(\)"
    for call in (
        lambda: torchdiv.divergence(net, dx, method="hutchinson", num_probes=2),
        lambda: torchdiv.divergence(net, dx, method="hutch++", probes=probes.repeat(3, 1, 1)),
        lambda: torchdiv.laplacian(net, dx, method="hutchinson", probes=probes),
    ):
        with pytest.raises(TypeError, match=way_out.format("method='(hutchinson|hutch\\+\\+)'")):
            call()
    dz = dx.detach().requires_grad_(True)
    with pytest.raises(TypeError, match=way_out.format("the graph form")):
        torchdiv.graph_divergence(net(dz), dz, create_graph=True)

    for method in ("forward", "reverse", "structured"):
        with pytest.raises((RuntimeError, NotImplementedError), match="divergence: "):
            torchdiv.divergence(net, x, method=method)
