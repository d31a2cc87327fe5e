"""torchdiv inside the training frameworks users run it in: a Lightning ``Trainer`` (automatic
and manual optimization, gradient accumulation and clipping, ``bf16-mixed``, validation under
``torch.inference_mode()``) and HF Accelerate (``prepare``, whose ``mixed_precision="bf16"``
replaces the model's ``forward`` by an autocast wrapper, ``accumulate``, ``backward``).

References are independent of the engines: the same steps taken by hand in float64 with a
per-sample grad-of-grad loop over plain autograd. Neither framework is a project extra: each
test is skipped where it is not installed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import pytest
import torch

import torchdiv
import torchdiv.flows

D, B, STEPS, LR = 3, 4, 3, 0.1


def _net(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The score model every test trains, initialised the same each time."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, D))
    return net.to(dtype)


def _data() -> torch.Tensor:
    return torch.randn(B * 2 * STEPS, D, generator=torch.Generator().manual_seed(1))


def _reference_divergence(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
    """``tr J`` of each sample, one sample and one row at a time, with a graph."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].clone().requires_grad_(True)
        y = f(xi)[0]
        rows = [torch.autograd.grad(y[k], xi, create_graph=True)[0][0, k] for k in range(D)]
        out.append(torch.stack(rows).sum())
    return torch.stack(out)


def _score_matching(net: torch.nn.Module, x: torch.Tensor, div: torch.Tensor) -> torch.Tensor:
    """Implicit score matching (Hyvarinen 2005): ``E[tr J_s + |s|^2 / 2]``."""
    return (div + 0.5 * net(x).pow(2).sum(-1)).mean()


def _by_hand(steps: int, accumulate: int = 1, clip: float | None = None) -> torch.nn.Module:
    """SGD on the score-matching loss in float64, as the trainers are told to run it."""
    net = _net(torch.float64)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    batches: Iterator[torch.Tensor] = iter(_data().double().split(B))
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(accumulate):
            x = next(batches)
            (_score_matching(net, x, _reference_divergence(net, x)) / accumulate).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
    return net


def _max_error(a: torch.nn.Module, b: torch.nn.Module) -> float:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max((p.double() - q.double()).abs().max().item() for p, q in pairs)


def _loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(_data()), batch_size=B)


# ---------------------------------------------------------------- Lightning


def _lightning_module(method: str, manual: bool = False):
    """A LightningModule whose steps take ``torchdiv.divergence`` of its score network."""
    lightning = pytest.importorskip("lightning")

    class ScoreMatching(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()
            self.automatic_optimization = not manual
            self.seen: list[tuple[torch.Tensor, torch.Tensor, bool, bool]] = []
            self.training_flags: list[bool] = []

        def training_step(self, batch, index):
            (x,) = batch
            self.training_flags.append(self.net.training)
            loss = _score_matching(self.net, x, torchdiv.divergence(self.net, x, method=method))
            if manual:
                opt = self.optimizers()
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()
                return None
            return loss

        def validation_step(self, batch, index):
            (x,) = batch
            div = torchdiv.divergence(self.net, x, method=method)
            self.seen.append((x, div, torch.is_inference_mode_enabled(), self.net.training))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    return ScoreMatching()


def _trainer(**options):
    lightning = pytest.importorskip("lightning")
    warnings.filterwarnings("ignore", module="lightning")
    return lightning.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             **options)  # fmt: skip


@pytest.mark.parametrize(
    ("options", "manual", "accumulate", "clip"),
    [
        ({}, False, 1, None),
        ({"accumulate_grad_batches": 2}, False, 2, None),
        ({"gradient_clip_val": 0.05}, False, 1, 0.05),
        ({}, True, 1, None),
    ],
    ids=["plain", "accumulate", "clip", "manual"],
)
@pytest.mark.parametrize("method", ["auto", "reverse", "forward"])
def test_lightning_fit_equals_float64_steps_by_hand(method, options, manual, accumulate, clip):
    """Parameters after 3 optimizer steps of ``Trainer.fit``: float32 against float64 steps
    with a per-sample reference (5e-8 measured; 1e-5 allows float32's rounding over 3 steps
    of a loss of order 1); the network is left in train mode, as Lightning sets it."""
    module = _lightning_module(method, manual)
    _trainer(max_steps=STEPS, limit_val_batches=0, **options).fit(module, _loader())
    assert _max_error(module.net, _by_hand(STEPS, accumulate, clip)) < 1e-5
    assert module.training_flags == [True] * (STEPS * accumulate)
    assert module.net.training


@pytest.mark.parametrize("method", ["auto", "reverse", "forward", "structured"])
def test_lightning_validate_under_inference_mode_is_right(method):
    """``Trainer.validate`` runs ``validation_step`` under ``torch.inference_mode()``: the
    divergence there is each sample's (float32 against float64, 1e-6), not a refusal."""
    module = _lightning_module(method)
    _trainer(limit_val_batches=1).validate(module, _loader(), verbose=False)
    ((x, div, inference, training),) = module.seen
    assert inference and not training
    expected = _reference_divergence(_net(torch.float64), x.double())
    torch.testing.assert_close(div.double(), expected, rtol=1e-6, atol=1e-6)


def test_lightning_bf16_mixed_within_bfloat16_rounding():
    """``precision="bf16-mixed"`` autocasts the step: the parameters after 3 steps are those
    of float64 steps up to bfloat16's rounding (5e-4 measured; eps = 2^-8 = 3.9e-3 of a
    gradient of order 1 times the learning rate 0.1 over 3 steps is 1.2e-3)."""
    module = _lightning_module("auto")
    _trainer(max_steps=STEPS, limit_val_batches=0, precision="bf16-mixed").fit(module, _loader())
    assert _max_error(module.net, _by_hand(STEPS)) < 3e-3


class _LaplaceResidual:
    """PINN residual ``(lap u - 1)^2`` of a scalar network ``u: R^2 -> R``."""

    @staticmethod
    def net(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        torch.manual_seed(0)
        layers = torch.nn.Sequential(
            torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )
        return layers.to(dtype)

    @staticmethod
    def reference(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(x.shape[0]):
            xi = x[i : i + 1].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(net(xi).sum(), xi, create_graph=True)
            rows = [torch.autograd.grad(g[0, k], xi, create_graph=True)[0][0, k] for k in range(2)]
            out.append(torch.stack(rows).sum())
        return torch.stack(out)


@pytest.mark.parametrize("operator", ["laplacian", "value_grad_laplacian"])
def test_lightning_pinn_residual_equals_float64_steps(operator):
    """A PINN trained by ``Trainer.fit`` on ``laplacian`` (or ``value_grad_laplacian``'s third
    output), then validated under inference mode: float32 against float64 (5e-8 measured)."""
    lightning = pytest.importorskip("lightning")
    x_all = torch.randn(8, 2, generator=torch.Generator().manual_seed(2))

    class Pinn(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _LaplaceResidual.net()
            self.seen: list[torch.Tensor] = []

        def u(self, z: torch.Tensor) -> torch.Tensor:
            return self.net(z).squeeze(-1)

        def lap(self, z: torch.Tensor) -> torch.Tensor:
            if operator == "laplacian":
                return torchdiv.laplacian(self.u, z)
            return torchdiv.value_grad_laplacian(self.u, z)[2]

        def training_step(self, batch, index):
            return (self.lap(batch[0]) - 1.0).pow(2).mean()

        def validation_step(self, batch, index):
            self.seen.append(self.lap(batch[0]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_all), batch_size=4)
    module = Pinn()
    _trainer(max_steps=2, limit_val_batches=0).fit(module, loader)
    net = _LaplaceResidual.net(torch.float64)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for x in x_all.double().split(4):
        opt.zero_grad()
        (_LaplaceResidual.reference(net, x) - 1.0).pow(2).mean().backward()
        opt.step()
    assert _max_error(module.net, net) < 1e-5
    _trainer(limit_val_batches=1).validate(module, loader, verbose=False)
    expected = _LaplaceResidual.reference(net, x_all[:4].double())
    torch.testing.assert_close(module.seen[0].double(), expected, rtol=1e-5, atol=1e-5)


def test_lightning_cnf_likelihood_in_validation_equals_training_mode():
    """``flows.log_likelihood`` in ``validation_step`` (inference mode) gives the values it
    gives outside it, after a ``Trainer.fit`` on the negative log-likelihood."""
    lightning = pytest.importorskip("lightning")

    class Velocity(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(1)
            self.inner, self.outer = torch.nn.Linear(3, 16), torch.nn.Linear(16, 2)

        def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            tx = torch.cat([x, t.expand(x.shape[0], 1)], -1)
            return self.outer(torch.tanh(self.inner(tx)))

    def base(z: torch.Tensor) -> torch.Tensor:
        return torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)

    class Cnf(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.f = Velocity()
            self.seen: list[tuple[torch.Tensor, bool]] = []

        def training_step(self, batch, index):
            return -torchdiv.flows.log_likelihood(self.f, batch[0], 0.0, 1.0, base).mean()

        def validation_step(self, batch, index):
            ll = torchdiv.flows.log_likelihood(self.f, batch[0], 0.0, 1.0, base)
            self.seen.append((ll, torch.is_inference_mode_enabled()))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(3))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)
    module = Cnf()
    _trainer(max_steps=2, limit_val_batches=0).fit(module, loader)
    outside = torchdiv.flows.log_likelihood(module.f, x[:4], 0.0, 1.0, base).detach()
    _trainer(limit_val_batches=1).validate(module, loader, verbose=False)
    ((ll, inference),) = module.seen
    assert inference
    torch.testing.assert_close(ll, outside, rtol=0, atol=0)


# ---------------------------------------------------------------- Accelerate


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps one process-wide state (its mixed precision fixed at the first
    ``Accelerator``): reset before and after, so each test picks its own."""
    state = pytest.importorskip("accelerate.state")
    state.AcceleratorState._reset_state(True)
    state.GradientState._reset_state()
    yield pytest.importorskip("accelerate")
    state.AcceleratorState._reset_state(True)
    state.GradientState._reset_state()


@pytest.mark.parametrize("method", ["auto", "reverse", "forward", "structured"])
def test_accelerate_accumulate_equals_float64_steps(fresh_accelerate, method):
    """``prepare`` + ``accumulate`` (2 batches a step) + ``backward``: float32 against float64
    steps by hand (4e-8 measured)."""
    accelerator = fresh_accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    net = _net()
    model, opt = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=LR))
    for x in _data().split(B):
        with accelerator.accumulate(model):
            loss = _score_matching(model, x, torchdiv.divergence(model, x, method=method))
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
    assert _max_error(net, _by_hand(STEPS, accumulate=2)) < 1e-5


@pytest.mark.parametrize("method", ["auto", "reverse", "forward", "structured"])
def test_accelerate_bf16_wrapped_forward(fresh_accelerate, method):
    """``mixed_precision="bf16"`` replaces ``model.forward`` by an autocast wrapper that casts
    outputs to float32: torchdiv follows the wrapper (float32 results within bfloat16's
    rounding of float64 steps: 5e-4 measured, bound as in the Lightning bf16 test), keeps
    samples apart, refuses a train-mode batch norm the wrapper hides, and answers the same
    twice."""
    accelerator = fresh_accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    net = _net()
    model, opt = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=LR))
    assert model.forward.__func__ is not type(net).forward  # the wrapper, not the method
    for x in _data().split(B)[:STEPS]:
        div = torchdiv.divergence(model, x, method=method)
        assert div.dtype == torch.float32
        accelerator.backward(_score_matching(model, x, div))
        opt.step()
        opt.zero_grad()
    assert _max_error(net, _by_hand(STEPS)) < 3e-3

    x = _data()[:B]
    first = torchdiv.divergence(model, x, method=method)
    torch.testing.assert_close(torchdiv.divergence(model, x, method=method), first, rtol=0, atol=0)
    moved = x.clone()
    moved[2] += 1.0
    changed = torchdiv.divergence(model, moved, method=method)
    torch.testing.assert_close(changed[[0, 1, 3]], first[[0, 1, 3]], rtol=0, atol=0)

    torch.manual_seed(0)
    mixing = torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh())
    wrapped = accelerator.prepare(torch.nn.Sequential(mixing, torch.nn.Linear(8, D)))
    with pytest.raises(torchdiv.BatchInteractionError, match="batch norm"):
        torchdiv.divergence(wrapped, x, method=method)
    assert wrapped.training
