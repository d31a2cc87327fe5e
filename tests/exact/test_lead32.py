"""The lead, thirty-second session: ``weakref.proxy`` objects that ``f`` reaches.

- A live proxy of a module (held by a callable object, bound by a partial, a
  ``Sequential``'s child) made every call raise ``TypeError: cannot create weak reference to
  'weakref.CallableProxyType' object`` (``Settings`` and the watch keep weak references to
  the modules ``f`` reaches, and ``attributes.modules_of`` gave them the proxy).
- The structure key (``cache.named``) skipped a proxy of a function: a module swapped in a
  global that the proxied function names, for one that mixes samples, was served the first
  call's pass (``z - z.mean(0)``'s divergence silently 0, not ``BatchInteractionError``).

Both now read a proxy as what it stands for (``script.referent``).

References: float64 per-sample loops of ``torch.autograd.grad`` (``conftest``'s
``reference_*``) and grad-of-grad for the parameter gradients; float64 round-off of a
3-64-3 tanh net's derivatives: ``assert_close``'s float64 tolerances."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import pytest
import torch

import torchdiv
from tests.conftest import (
    assert_close,
    assert_same_parameter_gradients,
    reference_diagonal,
    reference_divergence,
    tanh_mlp,
)


class _Holder:
    """A callable object running what it holds (an ODE function's ``self.net``)."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.run = run

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.run(z)


def _apply(net: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    return net(z)


_HOLDERS: dict[str, Callable[[torch.nn.Module], Callable[[torch.Tensor], torch.Tensor]]] = {
    "object": lambda proxy: _Holder(proxy),
    "partial": lambda proxy: functools.partial(_apply, proxy),
    "child": lambda proxy: torch.nn.Sequential(proxy),
}


@pytest.mark.parametrize("held", sorted(_HOLDERS))
@pytest.mark.parametrize("method", ["auto", "reverse", "forward"])
def test_a_proxy_of_a_module_is_read_as_the_module(held: str, method: str) -> None:
    net = tanh_mlp(3, 64, 3)
    f = _HOLDERS[held](weakref.proxy(net))
    x = torch.randn(5, 3, dtype=torch.float64)
    ours = torchdiv.divergence(f, x, method=method)
    want = reference_divergence(net, x)
    assert_close(ours, want)
    assert_same_parameter_gradients(net, ours.square().sum(), want.square().sum())
    assert_close(torchdiv.jacobian_diagonal(f, x), reference_diagonal(net, x))


def test_a_proxy_of_a_module_that_mixes_samples_is_refused() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)).double()
    f = _Holder(weakref.proxy(net))
    with pytest.raises(torchdiv.BatchInteractionError):
        torchdiv.divergence(f, torch.randn(5, 3, dtype=torch.float64))
    assert net.training  # (the caller's flag as it was)


def _proxied(p: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Callable]:
    return {"itself": p, "object": _Holder(p), "closure": lambda z: p(z)}


_NET = tanh_mlp(3, 8, 3)


def _through_net(z: torch.Tensor) -> torch.Tensor:
    return _NET(z)


def _mean_free(z: torch.Tensor) -> torch.Tensor:
    return z - z.mean(0)


@pytest.mark.parametrize("held", ["itself", "object", "closure"])
def test_a_module_swapped_behind_a_proxied_function_is_watched(
    held: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = _proxied(weakref.proxy(_through_net))[held]
    x = torch.randn(5, 3, dtype=torch.float64)
    assert_close(torchdiv.divergence(f, x), reference_divergence(_NET, x))
    monkeypatch.setitem(globals(), "_NET", _mean_free)  # (the module's global, put back after)
    with pytest.raises(torchdiv.BatchInteractionError):
        torchdiv.divergence(f, x)
