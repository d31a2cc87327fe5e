"""torchdiv on newer PyTorch releases than the one the suite pins (compat-new25).

The suite runs on one torch; these tests stand in for the releases above it where a change of
theirs can be imitated on this one (an op removed from ``torch.ops.aten``).
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

import torchdiv._core.mixing.reads as reads

aten = torch.ops.aten


def test_reads_tables_build_without_removed_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.14 removed ``aten::cholesky`` (``torch.cholesky`` raises since): the table of
    ops that raise on their values named it, and ``import torchdiv`` failed with an
    ``AttributeError``. The module, run afresh under an ``aten`` without it, builds its tables
    and keeps the ops still there."""
    namespace = type(aten)
    original = namespace.__getattr__

    def without_cholesky(self: object, name: str) -> object:
        if self is aten and name == "cholesky":
            raise AttributeError(name)
        return original(self, name)

    monkeypatch.delattr(aten, "cholesky", raising=False)
    monkeypatch.setattr(namespace, "__getattr__", without_cholesky)
    spec = importlib.util.spec_from_file_location("reads_without_cholesky", reads.__file__)
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fresh)  # (its dataclasses look it up)
    spec.loader.exec_module(fresh)
    kept = {op for op in reads._CHECKS_VALUES if op.overloadpacket.__name__ != "cholesky"}
    assert kept == fresh._CHECKS_VALUES and aten.linalg_cholesky_ex.default in kept
