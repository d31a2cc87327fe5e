"""torchdiv on newer PyTorch releases than the one the suite pins (compat-new25).

The suite runs on one torch; these tests stand in for the releases above it where a change of
theirs can be imitated on this one (an op removed from ``torch.ops.aten``).
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

import torchdiv
import torchdiv._core.mixing.reads as reads
from tests.conftest import assert_close, torch_from

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


@torch_from("2.15", "the Bessel functions of torch.special had no derivatives")
@pytest.mark.parametrize("name", ["bessel_j0", "modified_bessel_k1"])
def test_bessel_functions_that_pytorch_differentiates_are_served(name: str) -> None:
    """torch 2.15 differentiates ``bessel_j0``, ``j1``, ``y0``, ``y1`` and the modified
    ``i0``, ``i1``, ``k0``, ``k1``, which torchdiv refused as ops without derivatives (every
    call on them raised). Reference: Bessel's equation, ``x^2 y'' = -x y' - (x^2 - n^2) y``
    (modified: ``+ (x^2 + n^2) y``), with ``y'`` by the recurrences, all from the functions'
    values."""
    s = torch.special
    op, order, modified = getattr(s, name), int(name[-1]), name.startswith("modified")
    x = torch.rand(4, 3, dtype=torch.float64) + 0.5
    other = s.modified_bessel_k0(x) if modified else s.bessel_j0(x)
    y = op(x)
    slope = -other - y / x if modified else -s.bessel_j1(x)  # (k1' = -k0 - k1/x, j0' = -j1)
    curvature = (-x * slope + ((x * x + order**2) if modified else -x * x) * y) / (x * x)
    field = lambda z: op(z) + z  # noqa: E731
    for method in ("auto", "forward", "reverse"):
        assert_close(torchdiv.divergence(field, x, method=method), (slope + 1).sum(-1))
    for method in ("auto", "forward-over-reverse", "hessian", "grad-of-grad"):
        got = torchdiv.laplacian(lambda z: op(z).sum(-1), x, method=method)
        assert_close(got, curvature.sum(-1))
