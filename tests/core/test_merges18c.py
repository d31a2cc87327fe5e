"""rev-merges18c: numbers a provenance pass (paramonly18) must hold that it did not.

A factorization of a matrix built from parameters and Python numbers keeps the watch's pass
while ``Numbers`` finds the same numbers at each call. It held only numbers of the exact types
``int``/``float``/``complex``, in a plain object with a ``__dict__``, of the modules ``f``
reaches: a NumPy scalar (``np.float64(1e-3)``, a configuration read with NumPy), a
``dataclass(slots=True)`` configuration, or a configuration object a plain function names
(not a module's), set so the factorization fails, was served by the first call's pass while
``f``'s ``except`` branch mixed samples (divergences off by the cross-sample terms).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import torchdiv
from tests.core.test_mixing_parameter_provenance18 import Regularised
from torchdiv import BatchInteractionError

f64 = torch.float64


@dataclasses.dataclass(slots=True)
class SlotsConfig:
    """A configuration without a ``__dict__`` (``dataclass(slots=True)``)."""

    eps: float = 1.0


def _numpy_scalar(net: Regularised) -> Callable[[], None]:
    net.eps = np.float64(1.0)  # type: ignore[assignment]

    def change() -> None:
        net.eps = np.float64(-100.0)  # type: ignore[assignment]

    return change


def _slots_config(net: Regularised) -> Callable[[], None]:
    net.config = SlotsConfig()  # type: ignore[assignment]
    net.eps = 0.0

    def change() -> None:
        net.config.eps = -100.0

    return change


@pytest.mark.parametrize("number", [_numpy_scalar, _slots_config], ids=["numpy", "slots"])
def test_a_module_s_number_of_another_kind_that_changes_is_watched_again(
    number: Callable[[Regularised], Callable[[], None]],
) -> None:
    """``cholesky(W W^T + eps I)``, ``eps`` a NumPy scalar or a slotted configuration's:
    set negative after a passed call, the fallback (mixing samples) is refused."""

    def matrix(net: Regularised, x: torch.Tensor) -> torch.Tensor:
        eps = float(net.eps) + net.config.eps
        return net.W @ net.W.T + eps * torch.eye(3, dtype=f64)

    torch.manual_seed(4)
    net = Regularised(matrix)
    change = number(net)
    x = torch.randn(4, 3, dtype=f64)
    torchdiv.divergence(net, x)
    change()
    with pytest.raises(BatchInteractionError):
        torchdiv.divergence(net, x)


def test_a_plain_function_s_configuration_that_changes_is_watched_again() -> None:
    """A function over a module and a configuration object (no module): the configuration's
    ``eps`` set negative after a passed call, the fallback is refused."""
    torch.manual_seed(4)
    net = Regularised(lambda net, x: net.W)
    config = types.SimpleNamespace(eps=1.0)

    def f(x: torch.Tensor) -> Any:
        h = torch.tanh(x)
        try:
            m = net.W @ net.W.T + config.eps * torch.eye(3, dtype=f64)
            return h @ torch.linalg.cholesky(m)
        except RuntimeError:
            return h * h.mean(0)

    x = torch.randn(4, 3, dtype=f64)
    torchdiv.divergence(f, x)
    config.eps = -100.0
    with pytest.raises(BatchInteractionError):
        torchdiv.divergence(f, x)


@pytest.mark.parametrize("built", [False, True], ids=["view", "built"])
def test_a_view_attribute_rebound_is_watched_again(built: bool) -> None:
    """The module holds a view of its weight as a plain attribute (``self.Wv = self.W[:]``)
    and factorizes it (or ``Wv + I``): the pass held only the view's base, ``W``, still in
    its place after ``Wv`` was rebound to a matrix the factorization fails on, so the next
    call's fallback (mixing samples) was served by the pass."""

    def matrix(net: Regularised, x: torch.Tensor) -> torch.Tensor:
        return net.Wv + torch.eye(3, dtype=f64) if built else net.Wv

    torch.manual_seed(4)
    net = Regularised(matrix)
    net.W.data = torch.eye(3, dtype=f64)
    net.Wv = net.W[:, :]
    x = torch.randn(4, 3, dtype=f64)
    torchdiv.divergence(net, x)
    net.Wv = -100 * torch.eye(3, dtype=f64)
    with pytest.raises(BatchInteractionError):
        torchdiv.divergence(net, x)


class NearlySingular(torch.nn.Module):
    """``tanh(x) @ chol(W W^T + 1e-4 I)`` (float32) with ``W = 10 u u^T + 0.1 I``: the
    smallest eigenvalue, 0.01, is below bfloat16's rounding of ``W W^T`` (entries ~6400),
    so under ``torch.autocast`` the factorization fails; its fallback mixes samples."""

    def __init__(self) -> None:
        super().__init__()
        u = torch.randn(8, 1)
        self.W = torch.nn.Parameter(10 * u @ u.T + 0.1 * torch.eye(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x)
        try:
            m = self.W @ self.W.T + 1e-4 * torch.eye(8)
            return h @ torch.linalg.cholesky(m.float())
        except RuntimeError:
            return h * h.mean(0)


def test_a_pass_built_outside_autocast_is_not_served_inside() -> None:
    """A pass kept outside ``torch.autocast`` (the built matrix factorized in float32), the
    next call under bfloat16 autocast (its ``W @ W.T`` rounded: the fallback) is refused,
    as it is on a fresh model, not served per sample (values off by the batch mean's terms)."""
    torch.manual_seed(0)
    net = NearlySingular()
    x = torch.randn(4, 8)
    torchdiv.divergence(net, x)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(BatchInteractionError):
        torchdiv.divergence(net, x)


class Regularise:
    """A callable object (no module) over a model and its own ``eps``: ``tanh(x) @
    chol(W W^T + eps I)``, or the fallback that mixes samples."""

    def __init__(self, net: Regularised, eps: Any) -> None:
        self.net, self.eps = net, eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _regularised(x, self.net, self.eps)


def _regularised(x: torch.Tensor, net: Regularised, eps: Any) -> torch.Tensor:
    h = torch.tanh(x)
    try:
        eps = eps[0] if isinstance(eps, list) else eps
        return h @ torch.linalg.cholesky(net.W @ net.W.T + eps * torch.eye(3, dtype=f64))
    except RuntimeError:
        return h * h.mean(0)


@pytest.mark.parametrize("how", ["object", "partial", "list"])
def test_a_callable_s_own_number_that_changes_is_watched_again(how: str) -> None:
    """``eps`` held by a callable object, in a list a ``functools.partial`` holds, or in a
    list a function closes over: set negative after a passed call, the fallback is refused."""
    import functools

    torch.manual_seed(4)
    net = Regularised(lambda net, x: net.W)
    eps = [1.0]
    f: Any = Regularise(net, 1.0)
    if how == "partial":
        f = functools.partial(_regularised, net=net, eps=eps)
    elif how == "list":
        f = lambda x: _regularised(x, net, eps)  # noqa: E731
    x = torch.randn(4, 3, dtype=f64)
    torchdiv.divergence(f, x)
    if how == "object":
        f.eps = -100.0
    eps[0] = -100.0
    with pytest.raises(BatchInteractionError):
        torchdiv.divergence(f, x)
