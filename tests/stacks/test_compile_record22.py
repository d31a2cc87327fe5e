"""Lightning, imported, wraps ``torch.compile`` and keeps its arguments on the model
(``net._compile_kwargs``, a deep copy, through the ``OptimizedModule``'s ``__setattr__``). A
backend object there (a plain object: not told by the structure key) made every call of the
compiled model a structure without a pass kept: watched again at every call (found as an
order-dependent failure of ``test_a_compiled_per_sample_model_stays_compiled_and_right`` once
another test had imported Lightning). The key leaves that record out; values stay checked
against a float64 per-sample loop.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close, reference_divergence
from test_compiled_losses import _fresh_dynamo  # noqa: F401  (autouse: Dynamo reset per test)
from test_compiled_model_mixing import Counting, Mlp

import torchdiv
from torchdiv._api import compiled as _compiled
from torchdiv._taylor.mixing import structure

f64 = torch.float64


def _watched_calls(monkeypatch, model, net, x) -> int:
    """How many of three ``divergence`` calls of the compiled ``model`` watched ``net``
    (each value checked against the per-sample Jacobians' traces, float64)."""
    watched = []
    watch_once = _compiled.watch_once
    monkeypatch.setattr(_compiled, "watch_once", lambda *a: watched.append(1) or watch_once(*a))
    for _ in range(3):
        assert_close(torchdiv.divergence(model, x), reference_divergence(net, x))
    return len(watched)


def test_a_compile_record_holding_a_backend_object_keeps_the_memo(monkeypatch) -> None:
    """Set as Lightning's wrapper sets it: on the compiled module, landing on ``net``."""
    torch.manual_seed(0)
    net = Mlp().double()
    backend = Counting()
    model = torch.compile(net, backend=backend)
    model._compile_kwargs = copy.deepcopy({"backend": backend})
    assert "_compile_kwargs" in vars(net)
    x = torch.randn(8, 3, dtype=f64)
    assert structure(net, x, 1)[0] is net  # (a site: a pass may be kept)
    assert _watched_calls(monkeypatch, model, net, x) == 1


def test_under_lightning_s_torch_compile(monkeypatch) -> None:
    pytest.importorskip("lightning_fabric.wrappers")  # (wraps torch.compile when imported)
    torch.manual_seed(0)
    net = Mlp().double()
    model = torch.compile(net, backend=Counting())
    x = torch.randn(8, 3, dtype=f64)
    assert _watched_calls(monkeypatch, model, net, x) == 1
