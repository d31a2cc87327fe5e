"""rev-late32: late review of rev-merges32's weak-reference routes (the TorchScript walk's
``_REFERENCE`` kind, ``referent``) and of the structure key's reading of weak references.

References: per-sample ``autograd.grad`` loops on an eager copy, values and parameter
gradients (conftest's ``assert_scripted_as_eager``: the scripted copy run three times
outside torchdiv first), float64 per-sample loops (``reference_divergence``) and, for the
structure key, the mixing watch's refusal (``BatchInteractionError``) on the first call after
a module behind a weak reference came to mix samples. Float64 3-6-3 and 3-3 tanh nets:
``assert_close``'s float64 tolerances."""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
from conftest import assert_scripted_as_eager

from torchdiv._core import script

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's own


# -- the TorchScript walk: a weak container read at the depth of a dictionary ---------------

_MODELS: Any = None  # (a module-level registry, set by each test)


def _get(name: str) -> Any:
    """A model registry's getter (``f`` calls it)."""
    return _MODELS[name]


def _first(name: str) -> Any:
    return next(iter(_MODELS))


def _registries(net: Any) -> dict[str, tuple[Any, Any]]:
    """Registries of ``net`` read by a getter ``f`` calls, with the getter."""
    return {
        "dictionary": ({"flow": net}, _get),
        "weak value dictionary": (weakref.WeakValueDictionary(flow=net), _get),
        "weak set": (weakref.WeakSet([net]), _first),
        "weak key dictionary's key": (weakref.WeakKeyDictionary({net: 1}), _first),
    }


@pytest.mark.parametrize("way", list(_registries(torch.nn.Identity())))
def test_a_weak_registry_read_by_a_getter_is_walked(nets, way: str, monkeypatch):
    """``f = lambda z: get("flow")(z)``, ``get`` reading a module-level registry: a
    ``WeakValueDictionary`` or ``WeakSet`` was read as a plain object, its ``data`` one
    level further down than a dictionary's items, past the walk's depth: the script's
    optimized plan ran (forward mode's divergence off, parameter gradients gone), where a
    plain dictionary's was found. A ``WeakKeyDictionary``'s keys were not read at all."""
    registry, getter = _registries(nets[1])[way]
    monkeypatch.setattr(f"{__name__}._MODELS", registry)
    f = {_get: lambda z: _get("flow")(z), _first: lambda z: _first("flow")(z)}[getter]
    assert_scripted_as_eager(f, *nets)
    assert nets[1] in script.scripted(f)
