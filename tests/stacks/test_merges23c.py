"""Review of rev-train23's merge: the structure key looks into the plain objects ``f``
reaches (a trainer's ``self`` in ``lambda z: self.model(z)``) for their modules, flags and
small containers (``torchdiv._taylor.cache.named``).

- A trainer holding a ``weakref.proxy`` whose object is gone (a parent, a callback) made
  every call through it raise ``ReferenceError`` from the key's ``isinstance`` (reading the
  proxy's ``__class__``); a proxy of a live function in its list ``TypeError``. Before the
  merge such an object was never read.
- A model two plain objects down (``lambda z: self.state.model(z)``) was outside the key,
  as documented, while one in ``self.states = [state]`` was in it: the modules of the plain
  objects a plain object holds are read now (not their flags: a progress bar's postfix
  would make every call another structure).
"""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch
from conftest import reference_divergence, tanh_mlp
from torch import nn

import torchdiv
from tests.stacks.test_train23 import _model
from torchdiv import BatchInteractionError

f64 = torch.float64


class _Gone:
    """What a proxy stands for (a parent trainer, a callback), freed."""


class _Trainer:
    """A training loop's own class: the model, a proxy of an object that is gone, and the
    same in its list of callbacks."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        gone = _Gone()
        self.parent = weakref.proxy(gone)
        self.callbacks = [weakref.proxy(gone)]
        del gone
        gc.collect()


def _centred(module: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
    return out - out.mean(0)


def test_a_dead_proxy_on_a_trainer_is_not_read() -> None:
    """The divergence through the trainer is the float64 loop's (it raised
    ``ReferenceError``), and the model set to mix after a pass is still refused."""
    torch.manual_seed(0)
    trainer = _Trainer(tanh_mlp(2, 8, 2))
    x = torch.randn(4, 2, dtype=f64)
    f = lambda z: trainer.model(z)  # noqa: E731
    torch.testing.assert_close(torchdiv.divergence(f, x), reference_divergence(f, x))
    trainer.model.register_forward_hook(_centred)
    with pytest.raises(BatchInteractionError):
        torchdiv.divergence(f, x)


class _Callback:
    """A callback a trainer lists (a callable object)."""

    def __call__(self, step: int) -> None:
        pass


def _on_step(step: int) -> None:
    """A callback a trainer lists (a function)."""


@pytest.mark.parametrize("callback", ["dead object", "live function"])
def test_a_proxy_of_a_callback_a_trainer_lists_is_not_read(callback: str) -> None:
    """``self.callbacks = [weakref.proxy(cb)]``: a dead one raised ``ReferenceError``, one of
    a live function ``TypeError`` (no weak reference to a proxy) from every call through the
    trainer; the divergence is the float64 loop's."""
    torch.manual_seed(0)
    trainer = _Trainer(tanh_mlp(2, 8, 2))
    held = _Callback() if callback == "dead object" else _on_step
    trainer.callbacks = [weakref.proxy(held)]
    del held
    gc.collect()
    x = torch.randn(4, 2, dtype=f64)
    f = lambda z: trainer.model(z)  # noqa: E731
    torch.testing.assert_close(torchdiv.divergence(f, x), reference_divergence(f, x))


class _State:
    """A ``TrainState`` a trainer holds, holding the model and a proxy of an object gone."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.parent = _Trainer(model).parent


class _Loop:
    """A training loop's own class holding the state, not the model."""

    def __init__(self, state: _State) -> None:
        self.state = state


def test_a_model_two_plain_objects_down_is_watched_again() -> None:
    """``lambda z: self.state.model(z)``: the model (a hand-written batch norm, as flows
    write one) put in training mode after eval calls that passed is refused (it was served
    their pass, as a model in ``self.states = [state]`` was not)."""
    trainer = _Loop(_State(_model().eval()))
    x = torch.randn(4, 2, dtype=f64)
    for call in range(3):
        if call == 2:
            trainer.state.model.train()
        with pytest.raises(BatchInteractionError) if call == 2 else contextlib.nullcontext():
            torchdiv.divergence(lambda z: trainer.state.model(z), x)
