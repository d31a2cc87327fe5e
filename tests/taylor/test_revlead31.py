"""rev-lead31: the structure key's walks after 8977fbfc read ``isinstance`` through
``cache.instance``, false where reading a value's ``__class__`` raises. A proxy whose
``__getattribute__`` raises (``__class__`` too) may still run what it stands for through its
type's slots (``__call__``): then nothing about it can be told, and

- the mixing watch's message (``_core.mixing.errors._module_in_stack``) read the proxy's
  ``__call__`` frame's ``self`` by ``isinstance``: the watch's own detection raised the
  proxy's error, which dispatch took for an engine that cannot run, and the fallback ran
  ``f`` per sample, unwatched: a mean over the batch silently dropped (before 8977fbfc the key
  raised first: loud);
- the structure key told such a proxy by its ``id`` alone: a function swapped in behind it
  was served the old one's pass (``_reached``: such a key is now untold, watched every call).

References: float64 per-sample loops of ``torch.autograd.grad`` over the whole batch (the
true divergence of ``f``, sample coupling included); tolerances 1e-10, float64 round-off of
a 3 x 3 linear layer's trace."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch

import torchdiv
from torchdiv._taylor import cache


class _Raising:
    """A proxy whose every attribute read raises (``__class__`` included) and whose call, a
    type slot, runs its target (set with ``object.__setattr__``)."""

    def __init__(self, target: Callable[[torch.Tensor], torch.Tensor]) -> None:
        object.__setattr__(self, "_target", target)

    def __getattribute__(self, name: str) -> Any:
        raise RuntimeError(f"unbound proxy: {name}")

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return object.__getattribute__(self, "_target")(z)


class _Holder:
    def __init__(self, run: Any) -> None:
        self.run = run

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.run(z)


def _reference(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``sum_j d f(x)[i, j] / d x[i, j]``: float64, one ``autograd.grad`` per output entry."""
    xr = x.detach().clone().requires_grad_(True)
    y = f(xr)
    out = torch.zeros(x.shape[0], dtype=x.dtype)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            out[i] += torch.autograd.grad(y[i, j], xr, retain_graph=True)[0][i, j]
    return out


def _holders(proxy: _Raising) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    return {
        "object": _Holder(proxy),
        "partial": functools.partial(lambda z, run: run(z), run=proxy),
        "closure": (lambda run: lambda z: run(z))(proxy),
    }


@pytest.fixture
def layer() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 3, dtype=torch.float64)


def _mixing(layer: torch.nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda z: layer(z) + layer(z).mean(0, keepdim=True)


def _divergence_or_refusal(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> None:
    """torchdiv's divergence of ``f`` equals the reference, or it refuses the mixing."""
    try:
        got = torchdiv.divergence(f, x)
    except torchdiv.BatchInteractionError:
        return
    torch.testing.assert_close(got, _reference(f, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("holder", ["object", "partial", "closure"])
def test_a_raising_proxy_of_a_mixing_function_is_watched(layer, holder):
    x = torch.randn(4, 3, dtype=torch.float64)
    f = _holders(_Raising(_mixing(layer)))[holder]
    with pytest.raises(torchdiv.BatchInteractionError, match="mean"):
        torchdiv.divergence(f, x)


@pytest.mark.parametrize("holder", ["object", "partial", "closure"])
def test_a_mixing_function_swapped_behind_a_raising_proxy_is_watched(layer, holder):
    x = torch.randn(4, 3, dtype=torch.float64)
    proxy = _Raising(layer)
    f = _holders(proxy)[holder]
    torch.testing.assert_close(torchdiv.divergence(f, x), _reference(f, x), rtol=1e-10, atol=1e-10)
    object.__setattr__(proxy, "_target", _mixing(layer))
    _divergence_or_refusal(f, x)


def test_a_key_reaching_a_raising_proxy_is_untold(layer):
    """Not told by its ``id`` alone: led by ``UNTOLD``, so no pass is kept for it."""
    x = torch.randn(4, 3, dtype=torch.float64)
    assert cache.structure_key(_Holder(_Raising(layer)), x, 1)[0] is cache.UNTOLD
    assert cache.structure_key(_Holder(layer), x, 1)[0] is not cache.UNTOLD


class _Forwarding:
    """A hand-written proxy claiming its target's class (``__class__``), forwarding what it
    lacks (``__getattr__``) and its call; its target may be swapped (``proxy._target = m``)."""

    def __init__(self, target: torch.nn.Module) -> None:
        self._target = target

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return type(self._target)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self._target(z)


class _MixingLinear(torch.nn.Linear):
    """A ``Linear`` (the same parameters) adding its output's mean over the batch."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = super().forward(z)
        return y + y.mean(0, keepdim=True)


@pytest.mark.parametrize("holder", ["object", "closure"])
def test_a_module_swapped_behind_a_forwarding_proxy_is_watched(layer, holder):
    """``_held`` read the proxy's own ``__dict__`` and type, its target's parameters through
    ``__getattr__``: a ``Linear`` swapped for a mixing one of the same parameters kept the
    key, served the old one's pass (before 8977fbfc too)."""
    x = torch.randn(4, 3, dtype=torch.float64)
    proxy = _Forwarding(layer)
    f = _Holder(proxy) if holder == "object" else (lambda run: lambda z: run(z))(proxy)
    torch.testing.assert_close(torchdiv.divergence(f, x), _reference(f, x), rtol=1e-10, atol=1e-10)
    proxy._target = _MixingLinear(3, 3, dtype=torch.float64)
    _divergence_or_refusal(f, x)


def test_a_detection_whose_message_cannot_name_the_module_still_raises(monkeypatch):
    """Reading the running module for the watch's message raised (a frame's ``self`` that
    cannot be read): dispatch took the error for an engine that cannot run, and ``f``
    (``x - x.mean(0)`` before a layer) ran per sample, its divergence silently 0 (the lead,
    after rev-lead31's design note)."""
    from torchdiv._core.mixing import tracker

    def unreadable() -> str | None:
        raise RuntimeError("a frame that cannot be read")

    monkeypatch.setattr(tracker, "_module_in_stack", unreadable)
    net = torch.nn.Linear(3, 3).double()
    with pytest.raises(ValueError, match="f mixes samples"):
        torchdiv.divergence(lambda z: net(z - z.mean(0)), torch.randn(5, 3, dtype=torch.float64))
