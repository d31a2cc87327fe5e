"""torchdiv inside the training stacks written with Lightning and Fabric (and Accelerate), as
their users write them: a CNF loss (``divergence``), a score-matching loss
(``jacobian_diagonal``, Hutchinson's ``divergence``) and a PINN residual
(``value_grad_laplacian`` with ``coordinates=``) in the training step; Fabric's ``setup``,
``backward``, ``no_backward_sync`` and a compiled module; Lightning's ``64-true``, weight
averaging (EMA, SWA) and a resumed checkpoint; two gloo processes (Lightning's and Fabric's
DDP, Fabric's FSDP2, Accelerate's ``accumulate``), spawned here and bounded in time.

Each optimizer step's gradients (after the strategy's all-reduce) are compared with those of a
float64 reference that loops over the samples with ``autograd.grad`` (under DDP: the average
over both ranks' samples, read from the indices each rank saw), at the parameters the step
started from. Lightning, Fabric and Accelerate are not project extras: skipped where absent.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable
from typing import Any

import ddp_cases
import pytest
import torch

import torchdiv

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"
)

D, B, N, LR = 3, 4, 16, 0.1
KINDS = ("cnf", "diagonal", "hutchinson", "pinn")
# the Hutchinson probes of every sample (one row per sample of the data), Rademacher
PROBES = torch.randn(2, N, D, generator=torch.Generator().manual_seed(5)).sign()


def _net(kind: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The network every test trains, initialised alike: a vector field ``R^3 -> R^3``, or a
    scalar ``u(x, y, t)`` for the PINN."""
    torch.manual_seed(0)
    out = 1 if kind == "pinn" else D
    net = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, out))
    return net.to(dtype)


def _data() -> torch.Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(1))


def _loss(kind: str, f: Callable, x: torch.Tensor, idx: torch.Tensor, method: str = "auto"):
    """The training losses: a CNF's regularised divergence ``E[(tr J)^2 + |f|^2]``, implicit
    score matching ``E[tr J + |s|^2 / 2]`` (exact diagonal, or Hutchinson with the samples'
    ``PROBES``) and the heat equation's residual ``E[(u_t - Δ_xy u - u)^2]``."""
    if kind == "pinn":
        value, grad, lap = torchdiv.value_grad_laplacian(
            lambda z: f(z).squeeze(-1), x, coordinates=[0, 1], method=method
        )
        return (grad[:, 2] - lap - value).square().mean()
    if kind == "cnf":
        div = torchdiv.divergence(f, x, method=method)
        return (div.square() + f(x).square().sum(-1)).mean()
    if kind == "diagonal":
        trace = torchdiv.jacobian_diagonal(f, x, method=method).sum(-1)
    else:
        trace = torchdiv.divergence(f, x, method="hutchinson", probes=PROBES[:, idx].to(x.dtype))
    return (trace + 0.5 * f(x).square().sum(-1)).mean()


def _reference(kind: str, f: Callable, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``_loss`` one sample at a time, each Jacobian row (or Hessian diagonal entry) by its own
    ``autograd.grad`` with a graph."""
    terms = []
    for i in range(len(x)):
        xi = x[i : i + 1].clone().requires_grad_(True)
        y = f(xi)[0]
        if kind == "pinn":
            (g,) = torch.autograd.grad(y.sum(), xi, create_graph=True)
            lap = sum(torch.autograd.grad(g[0, k], xi, create_graph=True)[0][0, k] for k in (0, 1))
            terms.append((g[0, 2] - lap - y.sum()).square())
            continue
        jac = torch.stack(
            [torch.autograd.grad(y[k], xi, create_graph=True)[0][0] for k in range(D)]
        )
        if kind == "hutchinson":
            probes = PROBES[:, idx[i]].to(x.dtype)
            trace = torch.stack([v @ jac @ v for v in probes]).mean()
        else:
            trace = jac.trace()
        square = y.square().sum()
        terms.append(trace.square() + square if kind == "cnf" else trace + 0.5 * square)
    return torch.stack(terms).mean()


def _reference_gradients(kind: str, start: list[torch.Tensor], shares: list[list[int]]):
    """The gradient of one optimizer step in float64 at the parameters ``start``: the mean over
    ``shares`` (a rank's micro-batch each, as sample indices) of each one's mean loss."""
    net = _net(kind, torch.float64)
    with torch.no_grad():
        for p, value in zip(net.parameters(), start, strict=True):
            p.copy_(value)
    data = _data().double()
    for share in shares:
        idx = torch.tensor(share)
        (_reference(kind, net, data[idx], idx) / len(shares)).backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad for p in net.parameters()]


def _assert_steps_right(kind: str, steps: list, tol: float) -> None:
    """``steps``: ``(start, shares, gradients)`` of each optimizer step, against float64."""
    assert steps
    for start, shares, grads in steps:
        start = [torch.as_tensor(p, dtype=torch.float64) for p in start]
        want = _reference_gradients(kind, start, shares)
        for got, expected in zip(grads, want, strict=True):
            torch.testing.assert_close(
                torch.as_tensor(got, dtype=torch.float64), expected, rtol=0, atol=tol
            )


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t``, an FSDP2 shard gathered whole."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t.clone()


def _snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [_whole(p).double() for p in module.parameters()]


def _grads(module: torch.nn.Module) -> list[torch.Tensor]:
    """The gradients the optimizer is about to use (zeros where none)."""
    return [
        torch.zeros_like(_whole(p)) if p.grad is None else _whole(p.grad)
        for p in module.parameters()
    ]


# float32 against float64 over a loss of order 1: 3e-8-9e-8 measured; bf16-mixed: eps 2^-8 of
# gradients of order 1 (2.3e-4 measured on parameters after 2 steps, 2.2e-3 on gradients)
TOL = {"32-true": 1e-6, "64-true": 1e-12, "bf16-mixed": 5e-3}


# ---------------------------------------------------------------- Fabric, one process


def _fabric_steps(kind: str, precision: str, method: str = "auto", compiled: str = "") -> list:
    """Two optimizer steps of two micro-batches each (``no_backward_sync`` on the first), by
    Fabric; ``compiled``: ``"before"`` setup (``_reapply_compile``) or ``"after"``."""
    fabric = pytest.importorskip("lightning.fabric").Fabric(
        accelerator="cpu", devices=1, precision=precision
    )
    net = _net(kind)
    inner = torch.compile(net, backend="aot_eager") if compiled == "before" else net
    model = fabric.setup_module(inner, _reapply_compile=compiled == "before")
    opt = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=LR))
    if compiled == "after":
        model = torch.compile(model, backend="aot_eager")
    data, steps, shares = _data(), [], []
    for k, idx in enumerate(torch.arange(N).split(B)):
        if k % 2 == 0:
            start = _snapshot(net)
        shares.append(idx.tolist())
        with fabric.no_backward_sync(model, enabled=k % 2 == 0):
            fabric.backward(_loss(kind, model, data[idx], idx, method) / 2)
        if k % 2 == 1:
            steps.append((start, shares, _grads(net)))
            shares = []
            opt.step()
            opt.zero_grad()
    assert net.training and all(p.requires_grad for p in net.parameters())
    return steps


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("kind", KINDS)
def test_fabric_steps_equal_float64_steps(kind, precision):
    """Fabric's ``_FabricModule`` hooks every output that requires grad with a guard that
    raises outside ``fabric.backward`` (where the precision, ``bf16-mixed``, has its own
    backward): every call on a Fabric model was refused as a hook changing derivatives. Now
    the guard is dropped inside the call (it would raise in torchdiv's own backward passes)
    and kept on the caller's outputs."""
    _assert_steps_right(kind, _fabric_steps(kind, precision), TOL[precision])
    if precision == "bf16-mixed":
        fabric = pytest.importorskip("lightning.fabric").Fabric(
            accelerator="cpu", devices=1, precision=precision
        )
        model = fabric.setup_module(_net("cnf"))
        torchdiv.divergence(model, _data()[:B])
        with pytest.raises(RuntimeError, match=r"fabric\.backward"):
            model(_data()[:B]).sum().backward()


@pytest.mark.parametrize("method", ["structured", "reverse", "forward"])
def test_fabric_steps_by_every_method(method):
    _assert_steps_right("cnf", _fabric_steps("cnf", "32-true", method), TOL["32-true"])


@pytest.mark.slow
@pytest.mark.parametrize("compiled", ["before", "after"])
def test_fabric_compiled_module_steps(compiled):
    """``torch.compile`` before ``fabric.setup`` (re-applied around the Fabric module) or after."""
    torch._dynamo.reset()
    _assert_steps_right("cnf", _fabric_steps("cnf", "32-true", "auto", compiled), 1e-6)


# ---------------------------------------------------------------- Lightning, one process


class _Indexed(torch.utils.data.Dataset):
    """The data with each sample's index (the reference reads which samples a step saw)."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, _data()[i]


def _loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(_Indexed(), batch_size=B)


def _recording_module(kind: str, method: str = "auto", manual: bool = False, accumulate: int = 1):
    """A LightningModule taking ``_loss`` in ``training_step`` that records each optimizer
    step as ``(start, shares, gradients)`` (``on_before_optimizer_step``: after the all-reduce
    and before clipping), and ``validation_step``'s divergences with the parameters then."""
    lightning = pytest.importorskip("lightning")

    class Recording(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net(kind)
            self.automatic_optimization = not manual
            self.steps: list = []
            self.shares: list[list[int]] = []
            self.validated: list = []

        def training_step(self, batch, index):
            idx, x = batch
            if not self.shares:
                self.start = _snapshot(self.net)
            self.shares.append(idx.tolist())
            loss = _loss(kind, self.net, x, idx, method)
            if not manual:
                return loss
            last = (index + 1) % accumulate == 0
            with contextlib.nullcontext() if last else self.trainer.strategy.block_backward_sync():
                self.manual_backward(loss / accumulate)
            if last:  # (``step`` calls ``on_before_optimizer_step``)
                self.optimizers().step()
                self.optimizers().zero_grad()
            return None

        def on_before_optimizer_step(self, optimizer) -> None:
            self.steps.append((self.start, self.shares, _grads(self.net)))
            self.shares = []

        def validation_step(self, batch, index):
            idx, x = batch
            div = torchdiv.divergence(self.net, x, method=method)
            self.validated.append((idx, div, _snapshot(self.net)))

        def configure_model(self) -> None:
            if self.trainer.strategy.__class__.__name__ == "ModelParallelStrategy":
                _shard(self.net, self.device_mesh)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    return Recording()


def _trainer(**options: Any):
    lightning = pytest.importorskip("lightning")
    options.setdefault("enable_checkpointing", False)
    return lightning.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0,
                             **options)  # fmt: skip


def _assert_validated_right(module) -> None:
    """Each validation divergence is the trace of the float64 Jacobian at the parameters the
    validation ran with (the averaged ones under weight averaging)."""
    assert module.validated
    for idx, div, params in module.validated:
        net = _net("cnf", torch.float64)
        with torch.no_grad():
            for p, value in zip(net.parameters(), params, strict=True):
                p.copy_(value)
        one = torch.func.jacrev(lambda z, net=net: net(z[None])[0])
        want = torch.stack([one(z).trace() for z in _data().double()[idx]])
        torch.testing.assert_close(div.double(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_lightning_64_true_steps_equal_float64_steps(kind):
    """``precision="64-true"`` converts the module and the batches: float64 throughout."""
    module = _recording_module(kind)
    _trainer(max_steps=2, limit_val_batches=0, precision="64-true").fit(module, _loader())
    _assert_steps_right(kind, module.steps, TOL["64-true"])
    assert module.net[0].weight.dtype == torch.float64


@pytest.mark.parametrize(
    "averaging", ["ema", "swa"], ids=["EMAWeightAveraging", "StochasticWeightAveraging"]
)
def test_lightning_weight_averaging_swaps_weights_under_the_calls(averaging):
    """EMA swaps the averaged weights in for validation (``.data.copy_``: no version counter
    moves) and back; both copy the average in at the end. Every step's gradients and every
    validation's divergences are those of the weights there."""
    callbacks = pytest.importorskip("lightning.pytorch.callbacks")
    callback = (
        callbacks.EMAWeightAveraging(decay=0.5)
        if averaging == "ema"
        else callbacks.StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)
    )
    module = _recording_module("cnf")
    trainer = _trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1,
                       callbacks=[callback])  # fmt: skip
    trainer.fit(module, _loader(), _loader())
    _assert_steps_right("cnf", module.steps, TOL["32-true"])
    _assert_validated_right(module)
    module.validated.clear()
    _trainer(limit_val_batches=1).validate(module, _loader(), verbose=False)
    _assert_validated_right(module)


def test_lightning_resumed_checkpoint_and_reassigned_parameters(tmp_path):
    """A run resumed from ``ModelCheckpoint``'s last checkpoint in a new module (new
    Parameter objects, the first run's module freed), then the parameters replaced by
    ``load_state_dict(assign=True)`` and training continued: every step right."""
    callbacks = pytest.importorskip("lightning.pytorch.callbacks")
    first = _recording_module("cnf")
    checkpoint = callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, enable_checkpointing=True,
             callbacks=[checkpoint]).fit(first, _loader())  # fmt: skip
    del first
    resumed = _recording_module("cnf")
    _trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0).fit(
        resumed, _loader(), ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert len(resumed.steps) == 2
    state = {k: v + 0.1 for k, v in resumed.state_dict().items()}
    resumed.load_state_dict(state, assign=True)
    _trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(resumed, _loader())
    assert len(resumed.steps) == 4
    _assert_steps_right("cnf", resumed.steps, TOL["32-true"])


# ---------------------------------------------------------------- two processes

# what the pair runs: (framework, loss kind, method, options); Lightning and Fabric join the
# group ``ddp_cases.run_pairs`` made (LOCAL_RANK set: processes created outside), Accelerate too
STACKS = [
    ("lightning-ddp", "cnf", "auto", {"accumulate_grad_batches": 2}),
    ("lightning-ddp", "pinn", "auto", {"accumulate_grad_batches": 2, "gradient_clip_val": 0.05}),
    ("lightning-ddp", "hutchinson", "auto", {}),
    ("lightning-ddp-manual", "diagonal", "auto", {"accumulate": 2}),
    ("lightning-ddp", "cnf", "structured", {"precision": "64-true"}),
    ("fabric-ddp", "cnf", "auto", {}),
    ("fabric-ddp", "pinn", "auto", {"precision": "bf16-mixed"}),
    ("fabric-ddp", "diagonal", "reverse", {"compiled": True}),
    ("fabric-fsdp2", "cnf", "auto", {}),
    ("fabric-fsdp2", "pinn", "auto", {}),
    ("accelerate", "hutchinson", "auto", {}),
    ("accelerate", "cnf", "structured", {}),
    ("accelerate", "pinn", "auto", {"mixed_precision": "bf16"}),
    ("lightning-fsdp2", "cnf", "auto", {"accumulate_grad_batches": 2}),
    # (static_graph under accumulate_grad_batches: PyTorch's reducer assert "expect_autograd_
    # hooks_", with a plain loss too)
    ("lightning-ddp", "diagonal", "auto", {"ddp": {"static_graph": True}}),
    (
        "lightning-ddp",
        "pinn",
        "auto",
        {"accumulate_grad_batches": 2, "ddp": {"find_unused_parameters": True}},
    ),
]


def _in_process_group(rank: int) -> None:
    """What Lightning, Fabric and Accelerate read of processes started outside them."""
    os.environ.update(WORLD_SIZE="2", NODE_RANK="0", LOCAL_RANK=str(rank), RANK=str(rank),
                      ACCELERATE_USE_CPU="true")  # fmt: skip


def _fabric_strategy(name: str):
    strategies = pytest.importorskip("lightning.fabric.strategies")
    timeout = datetime.timedelta(seconds=ddp_cases.COLLECTIVE_TIMEOUT_S)
    if name == "fabric-ddp":
        return strategies.DDPStrategy(process_group_backend="gloo", timeout=timeout)
    return strategies.ModelParallelStrategy(parallelize_fn=_shard, data_parallel_size=2,
                                            tensor_parallel_size=1, timeout=timeout)  # fmt: skip


def _shard(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """FSDP2 as its tutorials write it: each linear layer, then the whole."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh["data_parallel"])
    return fully_shard(model, mesh=mesh["data_parallel"])


def _stack_steps(item: tuple, rank: int) -> list:
    """One rank's optimizer steps (``(start, shares, gradients)``) of a ``STACKS`` item: each
    rank takes samples ``rank, rank + 2, ...``, two of them a micro-batch, two micro-batches
    a step (the first without a gradient sync), except under Lightning's own sampler."""
    framework, kind, method, options = item
    if framework.startswith("lightning"):
        manual = framework.endswith("manual")
        module = _recording_module(kind, method, manual, options.pop("accumulate", 1))
        strategies = pytest.importorskip("lightning.pytorch.strategies")
        timeout = datetime.timedelta(seconds=ddp_cases.COLLECTIVE_TIMEOUT_S)
        if framework == "lightning-fsdp2":
            strategy = strategies.ModelParallelStrategy(
                data_parallel_size=2, tensor_parallel_size=1, timeout=timeout
            )
        else:
            strategy = strategies.DDPStrategy(process_group_backend="gloo", timeout=timeout,
                                              **options.pop("ddp", {}))  # fmt: skip
        trainer = _trainer(devices=2, strategy=strategy, max_epochs=1, limit_val_batches=0,
                           **options)  # fmt: skip
        trainer.fit(module, _loader())
        return module.steps
    net = _net(kind)
    if framework == "accelerate":
        accelerate = pytest.importorskip("accelerate")
        accelerate.state.AcceleratorState._reset_state(True)
        accelerate.state.GradientState._reset_state()
        accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2, **options)
        model, opt = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=LR))

        def backward(loss: torch.Tensor, accumulating: bool):
            with accelerator.accumulate(model):
                accelerator.backward(loss * 2)  # (Accelerate divides by the steps)
    else:
        fabric = pytest.importorskip("lightning.fabric").Fabric(
            accelerator="cpu", devices=2, strategy=_fabric_strategy(framework),
            precision=options.get("precision", "32-true"),
        )  # fmt: skip
        fabric.launch()  # (the processes are there: it only sets Fabric up)
        inner = torch.compile(net, backend="aot_eager") if options.get("compiled") else net
        model = fabric.setup_module(inner, _reapply_compile=bool(options.get("compiled")))
        opt = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=LR))

        def backward(loss: torch.Tensor, accumulating: bool):
            with fabric.no_backward_sync(model, enabled=accumulating):
                fabric.backward(loss)

    data, steps, shares = _data(), [], []
    for k, idx in enumerate(torch.arange(rank, N, 2).split(2)):
        if k % 2 == 0:
            start = _snapshot(net)
        shares.append(idx.tolist())
        backward(_loss(kind, model, data[idx], idx, method) / 2, k % 2 == 0)
        if k % 2 == 1:
            steps.append((start, shares, _grads(net)))
            shares = []
            opt.step()
            opt.zero_grad()
    return steps


def run_stack(item: tuple, rank: int) -> tuple[str, Any]:
    """``ddp_cases.run_pairs``' runner: both ranks' steps (gathered to each), as lists."""
    import torch.distributed as dist

    _in_process_group(rank)
    try:
        steps = _stack_steps(item, rank)
    except Exception as error:  # (the pair goes on with the next item)
        steps = f"{type(error).__name__}: {error}"
    both: list = [None, None]
    dist.all_gather_object(both, steps)
    if any(isinstance(s, str) for s in both):
        return "error", next(s for s in both if isinstance(s, str))
    plain = [[([p.tolist() for p in a], s, [g.tolist() for g in c]) for a, s, c in r] for r in both]
    return "ran", plain


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_process_stacks_average_both_ranks_samples():
    """Every ``STACKS`` item on one pair of gloo processes (~20 s of CPU): both ranks step
    with the same gradients, the float64 average over both ranks' micro-batches (the first
    micro-batch's under ``no_sync``/``no_backward_sync``/``block_backward_sync`` reaches
    the second's all-reduce). Lightning's FSDP (FSDP1) needs a GPU; FSDP2 runs through
    Fabric's ``ModelParallelStrategy``."""
    for module in ("lightning", "accelerate"):
        pytest.importorskip(module)
    outcomes = ddp_cases.run_pairs(list(enumerate(STACKS)), run_stack)
    failed = {}
    for i, (framework, kind, _, options) in enumerate(STACKS):
        verdict, found = outcomes[i]
        if verdict != "ran":
            failed[i] = (verdict, found)
            continue
        first, second = found
        assert len(first) == len(second) >= 1
        for (start, own, grads), (_, other, theirs) in zip(first, second, strict=True):
            assert grads == theirs, f"{framework}: the ranks step apart"
            shares = [s for pair in zip(own, other, strict=True) for s in pair]
            tol = TOL[
                options.get(
                    "precision", "bf16-mixed" if options.get("mixed_precision") else "32-true"
                )
            ]
            try:
                _assert_steps_right(kind, [(start, shares, grads)], tol)
            except AssertionError as error:
                failed[i] = ("wrong", str(error))
    assert not failed, {STACKS[i][:3]: v for i, v in failed.items()}


def _jacobians(f: Callable, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.func.jacrev(lambda s: f(s[None])[0])(s) for s in x])


def _traces(field: Callable, scalar: Callable, x: torch.Tensor) -> torch.Tensor:
    return _jacobians(field, x).diagonal(0, 1, 2).sum(-1)


def _laplacians(field: Callable, scalar: Callable, x: torch.Tensor) -> torch.Tensor:
    hessian = torch.func.hessian(lambda s: scalar(s[None]).sum())
    return torch.stack([hessian(s).trace() for s in x])


def _one_probe(field: Callable, scalar: Callable, x: torch.Tensor) -> torch.Tensor:
    v = PROBES[0, :B].to(x.dtype)
    return torch.einsum("bi,bij,bj->b", v, _jacobians(field, x), v)


def _graph_divergence(field: Callable, scalar: Callable, x: torch.Tensor) -> torch.Tensor:
    z = x.clone().requires_grad_(True)
    return torchdiv.graph_divergence(field(z), z, create_graph=True)


# calls on a Fabric ``bf16-mixed`` vector field and scalar (``(field, scalar, x)``): every
# engine (forward mode, plain evaluations, the graph form), with their float64 references
_BF16_CALLS: dict[str, tuple[Callable, Callable]] = {
    **{
        f"divergence-{m}": (lambda f, u, x, m=m: torchdiv.divergence(f, x, method=m), _traces)
        for m in ("auto", "forward", "reverse", "structured")
    },
    "hutchinson-one-probe": (
        lambda f, u, x: torchdiv.divergence(f, x, method="hutchinson", probes=PROBES[:1, :B]),
        _one_probe,
    ),
    "jacobian-forward": (
        lambda f, u, x: torchdiv.jacobian(f, x, method="forward").diagonal(0, 1, 2).sum(-1),
        _traces,
    ),
    **{
        f"laplacian-{m}": (lambda f, u, x, m=m: torchdiv.laplacian(u, x, method=m), _laplacians)
        for m in ("taylor", "hessian", "forward-over-reverse")
    },
    "graph-divergence": (_graph_divergence, _traces),
}


@pytest.mark.parametrize("call", list(_BF16_CALLS))
def test_fabric_bf16_module_in_every_engine(call):
    """Under ``bf16-mixed`` the guard raised in torchdiv's own backward passes: through forward
    mode's outputs at registration (their ``requires_grad`` reads true), one-probe Hutchinson's
    and the graph form's walks (the latter as "GraphSpent"), ``check_batch_independence``.
    Values within bfloat16's rounding of float64 (eps 2^-8 of terms of order 1: 3e-2), and
    ``fabric.backward`` through them."""
    fabric = pytest.importorskip("lightning.fabric").Fabric(
        accelerator="cpu", devices=1, precision="bf16-mixed"
    )
    field, scalar = _net("cnf"), _net("pinn")
    m, s = fabric.setup_module(field), fabric.setup_module(scalar)
    x = _data()[:B]
    ours, reference = _BF16_CALLS[call]
    got = ours(m, lambda z: s(z).squeeze(-1), x)
    params = [*field.parameters(), *scalar.parameters()]
    assert all(p.grad is None and p.requires_grad for p in params) and field.training
    plain = _net("cnf", torch.float64), _net("pinn", torch.float64)
    want = reference(plain[0], plain[1], x.double())
    torch.testing.assert_close(got.double(), want, rtol=0, atol=3e-2)
    fabric.backward(got.square().sum())
    assert field[0].weight.grad is not None or scalar[0].weight.grad is not None
    assert torchdiv.check_batch_independence(m, x) is None


# ``strategy="ddp_spawn"`` pickles the module to the processes it spawns: its class must be
# importable there, so the run is a script of its own (its ``__main__`` is the processes'),
# which writes each rank's steps where the test reads them
_SPAWNED = """
import sys, warnings
sys.path[:0] = {paths!r}
warnings.filterwarnings("ignore")
import lightning, torch
import test_lightning20 as T


class Spawned(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = T._net("cnf")
        self.steps, self.shares = [], []

    def training_step(self, batch, index):
        idx, x = batch
        if not self.shares:
            self.start = T._snapshot(self.net)
        self.shares.append(idx.tolist())
        return T._loss("cnf", self.net, x, idx, {method!r})

    def on_before_optimizer_step(self, optimizer):
        self.steps.append((self.start, self.shares, T._grads(self.net)))
        self.shares = []

    def on_train_end(self):
        torch.save(self.steps, f"{out}/rank{{self.global_rank}}.pt")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=T.LR)


if __name__ == "__main__":
    strategy = lightning.pytorch.strategies.DDPStrategy(
        start_method="spawn", process_group_backend="gloo", timeout=T.datetime.timedelta(seconds=30)
    )
    trainer = T._trainer(devices=2, strategy=strategy, max_epochs=1, limit_val_batches=0,
                         accumulate_grad_batches=2)
    trainer.fit(Spawned(), T._loader())
"""


@pytest.mark.slow
def test_lightning_ddp_spawn_accumulated_steps(tmp_path):
    """``Trainer(strategy="ddp_spawn", devices=2, accumulate_grad_batches=2)`` (gloo): both
    ranks take each step with the float64 average over both ranks' micro-batches. A script
    run in a session of its own, killed with the processes it spawned after 120 s (~15 s of
    CPU)."""
    import signal
    import subprocess
    import sys

    pytest.importorskip("lightning")
    here = os.path.dirname(__file__)
    paths = [here, os.path.dirname(here), *sys.path]
    script = tmp_path / "spawned.py"
    script.write_text(_SPAWNED.format(paths=paths, method="auto", out=str(tmp_path)))
    run = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE,
                           stdout=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        _, errors = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 0, errors.decode()[-2000:]
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert len(first) == len(second) >= 1
    for (start, own, grads), (_, other, theirs) in zip(first, second, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(grads, theirs, strict=True))
        _assert_steps_right("cnf", [(start, own + other, grads)], TOL["32-true"])


class _Scaled(torch.nn.Module):
    """A gradient-scaling hook of the model's own in ``forward``: it changes derivatives."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net("cnf")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        if y.requires_grad:
            y.register_hook(lambda g: 2 * g)
        return y


@pytest.mark.parametrize("method", ["auto", "reverse", "forward"])
def test_fabric_module_with_a_hook_of_its_own_is_still_refused(method):
    """Only Fabric's guard is let through: a hook of the model's own inside a Fabric module is
    refused as before, and the guard is back on after the refusal."""
    from torchdiv._core.modes import WrongDerivatives

    fabric = pytest.importorskip("lightning.fabric").Fabric(
        accelerator="cpu", devices=1, precision="bf16-mixed"
    )
    model = fabric.setup_module(_Scaled())
    with pytest.raises(WrongDerivatives, match="register_hook"):
        torchdiv.divergence(model, _data()[:B], method=method)
    with pytest.raises(RuntimeError, match=r"fabric\.backward"):
        model(_data()[:B]).sum().backward()
