"""What a training loop changes between two torchdiv calls, where ``f`` reaches the model
through the loop's own state: a trainer's ``self`` (a plain class, not an ``nn.Module``) or a
``TrainState``-like object that holds the model, named by ``lambda z: self.model(z)``.

The watch for sample mixing runs at the first call of each ``f`` at each structure
(``torchdiv._taylor.cache.structure_key``); later calls of tiny problems, one-probe
Hutchinson and the Laplacian's loop only search the autograd graph for torch's train-mode
batch norm. The structure must therefore hold the modules ``f`` reaches through such an
object: a hand-written batch norm (nflows' and FFJORD's ``BatchNorm`` layers centre over the
batch in training mode) switched on by ``model.train()`` after sanity-check validation
calls in eval mode, a hook registered, or the object's model attribute rebound to another
model, each served the eval calls' pass unwatched (the sum over the batch of off-diagonal
Jacobian blocks returned as per-sample divergences) until rev-train23.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import torchdiv
from tests.conftest import sampled_daily
from torchdiv import BatchInteractionError

f64 = torch.float64


class _BatchNorm(nn.Module):
    """A hand-written batch norm as flow repositories write one: the batch's mean and
    variance in training mode, running statistics in eval mode."""

    def __init__(self, features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean, var = y.mean(0), y.var(0)
        else:
            mean, var = self.running_mean, self.running_var
        return (y - mean) / torch.sqrt(var + self.eps)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 8), _BatchNorm(8), nn.Tanh(), nn.Linear(8, 2)).double()


class _Trainer:
    """A training loop's own class (not a module) holding the model; ``score`` makes a new
    ``f`` at every step, as a loss method does."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def score(self, call: Callable[[Any, torch.Tensor], torch.Tensor], x: torch.Tensor) -> Any:
        return call(lambda z: self.model(z), x)


def _centred(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    return out - out.mean(0)


CHANGES: dict[str, Callable[[_Trainer], Any]] = {
    "model.train()": lambda t: t.model.train(),
    "forward hook registered": lambda t: t.model[0].register_forward_hook(_centred),
    "model attribute rebound": lambda t: setattr(t, "model", _model().train()),
}

CALLS: dict[str, Callable[[Any, torch.Tensor], Any]] = {
    "divergence": lambda f, x: torchdiv.divergence(f, x),
    "jacobian": lambda f, x: torchdiv.jacobian(f, x),
    "jacobian_diagonal": lambda f, x: torchdiv.jacobian_diagonal(f, x),
    "laplacian": lambda f, x: torchdiv.laplacian(f, x),
    "value_grad_laplacian": lambda f, x: torchdiv.value_grad_laplacian(f, x),
    "hutchinson": lambda f, x: torchdiv.estimate_divergence(
        f, x, num_probes=1, generator=torch.Generator().manual_seed(0)
    ),
}


# one always-run case per change (and each kind of call once among them), the rest daily
ALWAYS = {
    "model.train()/divergence",
    "forward hook registered/laplacian",
    "model attribute rebound/hutchinson",
}
CASES = [f"{change}/{call}" for change in CHANGES for call in CALLS]


@pytest.mark.parametrize("case", sampled_daily(CASES, set(CASES) - ALWAYS))
def test_a_model_a_trainer_holds_is_watched_again_after_it_changes(case: str) -> None:
    """Sanity-check calls in eval mode (no mixing: they pass), then the change that makes
    the model mix samples: the next call through the same trainer is refused."""
    change, call = case.split("/")
    trainer = _Trainer(_model().eval())
    x = torch.randn(4, 2, dtype=f64)
    for _ in range(2):
        trainer.score(CALLS[call], x)
    CHANGES[change](trainer)
    with pytest.raises(BatchInteractionError):
        trainer.score(CALLS[call], x)


class _State:
    """A ``TrainState``: the networks in a list."""

    def __init__(self, model: nn.Module) -> None:
        self.nets = [model]


class _Velocity:
    """A callable object (not a module) reading the model from the state it holds."""

    def __init__(self, state: _State) -> None:
        self.state = state

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.state.nets[0](z)


def test_a_model_in_a_state_a_callable_object_holds_is_watched_again() -> None:
    """The model two plain levels down, in a list: switched to training mode after eval
    calls, it is refused."""
    model = _model().eval()
    f = _Velocity(_State(model))
    x = torch.randn(4, 2, dtype=f64)
    for _ in range(2):
        torchdiv.divergence(f, x)
    model.train()
    with pytest.raises(BatchInteractionError):
        torchdiv.divergence(f, x)


class _Config:
    """A script's configuration object (an ``argparse.Namespace``-like plain class)."""

    def __init__(self) -> None:
        self.centre = False


def test_a_flag_on_a_configuration_a_lambda_names_is_watched_again() -> None:
    """``if cfg.centre:`` read by the lambda, set after calls that passed: refused (it
    returned 0 for every sample, the centred batch's divergence, unrefused)."""
    cfg = _Config()
    model = _model().eval()
    f = lambda z: (lambda y: y - y.mean(0) if cfg.centre else y)(model(z))  # noqa: E731
    x = torch.randn(4, 2, dtype=f64)
    for _ in range(2):
        torchdiv.divergence(f, x)
    cfg.centre = True
    with pytest.raises(BatchInteractionError):
        torchdiv.divergence(f, x)
