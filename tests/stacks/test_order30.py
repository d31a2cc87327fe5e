"""A compiled step after ``torch.compiler.reset()`` (order30): the traced replays' record of a
compilation's first attempt (``replay.restarted``, read by Dynamo's restarts of the same
compilation) was keyed by Dynamo's ``CompileId``, which ``reset()`` numbers from ``(0, 0)``
again. A process that compiled a step, reset Dynamo (between models, experiments, a sweep's
runs) and compiled a step that Dynamo restarts (a graph break after the call) gave that
restart the earlier compilation's plan: ``SpeculationLogDivergence`` where the recording
differs on the restart (``f`` caching a tensor by batch size; the suite hit it by order), and
the old plan replayed, silently, where the model changed but kept its structure (a
``Softplus``'s ``beta``: the divergence 0.049 off). Compiled with ``aot_eager`` in float64,
against the eager calls (checked against independent references in their own tests)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from conftest import assert_close
from test_compiled_losses import _fresh_dynamo  # noqa: F401  (autouse: Dynamo reset per test)

import torchdiv

f64 = torch.float64
ENGINES = {
    "structured": lambda f, x: torchdiv.divergence(f, x, method="structured"),
    "taylor": lambda f, x: torchdiv.laplacian(f, x, method="taylor"),
}


def _softplus_mlp(d_out: int) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(2, 8, dtype=f64), torch.nn.Softplus(), torch.nn.Linear(8, d_out, dtype=f64)
    )


def _frame_a(call: Callable, f: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return call(f, x)


def _frame_b(call: Callable, f: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return call(f, x)


def _recorded_last_at_frame_one(call: Callable, f: torch.nn.Module, x: torch.Tensor) -> None:
    """After a reset, ``call`` of ``f`` compiled in two frames (compilation ids ``(0, 0)`` and
    ``(1, 0)``; each restarted once by the engine's replay), both equal to eager's: the last
    compilation that recorded is ``(1, 0)``, whatever the tests before left (the fault's
    precondition made sure)."""
    torch.compiler.reset()
    for frame in (_frame_a, _frame_b):
        compiled = torch.compile(frame, backend="aot_eager", dynamic=True)
        assert_close(compiled(call, f, x), call(f, x))


def _reset_to_frame_one(x: torch.Tensor) -> None:
    """Dynamo reset and its frame 0 compiled (``x + 1``, no recording): the next
    compilation's id is ``(1, 0)`` again."""
    torch.compiler.reset()
    torch.compile(lambda x: x + 1, backend="aot_eager")(x)


def _broken(call):
    """``call`` compiled with a graph break after it (a print, a log call): Dynamo restarts
    the trace of the frame."""

    def step(f: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = call(f, x)
        torch._dynamo.graph_break()
        return out

    return torch.compile(step, backend="aot_eager", dynamic=True)


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not")
@pytest.mark.parametrize(  # (~4 s of CPU each: the Taylor engine's in the daily sample)
    "engine", ["structured", pytest.param("taylor", marks=pytest.mark.slow)]
)
def test_a_model_changed_after_a_reset_is_not_replayed_as_before(engine):
    """Before: the second restart (a graph break after the call) of the compilation after the
    reset read the plan compiled before it (``beta`` 1; the first restart, the engine's own,
    read its own), the same ``f`` at the same shape: the compiled step's divergence 0.049 off
    eager's (the Laplacian 0.032). Now each compilation reads its own plans."""
    call = ENGINES[engine]
    f, x = _softplus_mlp(2 if engine == "structured" else 1), torch.randn(4, 2, dtype=f64)
    _recorded_last_at_frame_one(call, f, x)
    _reset_to_frame_one(x)
    f[1].beta = 3.0
    assert_close(_broken(call)(f, x), call(f, x))


@functools.lru_cache
def _ramp(n: int) -> torch.Tensor:
    """Per-sample weights for a batch of ``n``, made once per size."""
    return torch.linspace(0.5, 1.5, n, dtype=f64)


class _Ramped(torch.nn.Module):
    """A Softplus MLP weighted per sample by a ramp cached by batch size: Dynamo restarts
    the trace, whose second recording reads the ramp made by the first and refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _softplus_mlp(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * _ramp(x.shape[0])[:, None]


@pytest.mark.slow  # (~4 s of CPU)
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not")
def test_a_second_model_compiled_after_a_reset_is_given_its_own_first_plan():
    """Before: the second model's restart read the first model's entry, recorded again,
    refused (the cached ramp) and Dynamo raised ``SpeculationLogDivergence`` (the order
    dependency of ``test_merges21c``'s cached-ramp test). Now it equals eager's."""
    call, a, b = ENGINES["structured"], _softplus_mlp(2), _Ramped()
    x = torch.randn(4, 2, dtype=f64)
    _recorded_last_at_frame_one(call, a, x)
    _reset_to_frame_one(x)
    assert_close(_broken(call)(b, x), call(b, x))
