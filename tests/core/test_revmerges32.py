"""rev-merges32: review of walk32's TorchScript walk and the lead's ``script.referent``.

- A scripted module that ``f`` reaches through a weak reference (a ``weakref.proxy`` of it, a
  ``weakref.ref`` called in ``f``, a ``weakref.WeakValueDictionary`` registry or a
  ``weakref.WeakSet``, each also held in a list or by an object) was not walked: its
  optimized plan, made by the runs outside torchdiv, ran, forward mode's divergence off and
  parameter gradients gone.
- ``cache.referent`` read a proxy's target by ``proxy.__getattribute__.__self__``: a proxy of
  a class (an unbound slot wrapper, no ``__self__``) and a proxy of an object whose
  ``__getattribute__`` raises made every call of ``f`` raise (``AttributeError``, the
  object's own error) where the commit before it gave the right divergence.

References: per-sample ``autograd.grad`` loops on an eager copy, values and parameter
gradients (conftest's ``assert_scripted_as_eager``, the scripted copy run three times outside
torchdiv first), and float64 per-sample loops (``reference_divergence``); float64 round-off of
3-6-3 and 3-8-3 tanh nets: ``assert_close``'s float64 tolerances."""

from __future__ import annotations

import functools
import weakref
from typing import Any

import pytest
import torch
from conftest import (
    assert_close,
    assert_same_parameter_gradients,
    assert_scripted_as_eager,
    reference_divergence,
    tanh_mlp,
)

import torchdiv
from torchdiv._core import script
from torchdiv._core.script import referent

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's own


class _Holder:
    def __init__(self, net: Any) -> None:
        self.lr, self.net = 0.1, net


class _Runner:
    """A trainer's object: a method running its script, a partial binding it."""

    def __init__(self, net: Any) -> None:
        self.net, self.act = net, functools.partial(_run, net)

    def step(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def _run(net: Any, z: torch.Tensor) -> torch.Tensor:
    return net(z)


def _weakly(net: Any, keep: list[Any]) -> dict[str, Any]:
    """Each way ``f`` reaches ``net`` weakly, ``f`` a partial binding the holder (``keep``:
    what must outlive the test's calls)."""
    registry: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary(model=net)
    members: weakref.WeakSet[Any] = weakref.WeakSet([net])
    runner = _Runner(net)
    keep += [registry, members, runner]
    ways: dict[str, tuple[Any, Any]] = {
        "proxy": (weakref.proxy(net), lambda h, z: h(z)),
        "ref called": (weakref.ref(net), lambda h, z: h()(z)),
        "weak value dictionary": (registry, lambda h, z: h["model"](z)),
        "weak set": (members, lambda h, z: next(iter(h))(z)),
        "proxy in a list": ([weakref.proxy(net)], lambda h, z: h[0](z)),
        "ref held by an object": (_Holder(weakref.ref(net)), lambda h, z: h.net()(z)),
        "ref held by an object in a list": (
            [_Holder(weakref.ref(net))],
            lambda h, z: h[0].net()(z),
        ),
        "weak method": (weakref.WeakMethod(runner.step), lambda h, z: h()(z)),
    }
    out = {way: functools.partial(body, held) for way, (held, body) in ways.items()}
    # (a proxy in a closure, what ``f`` reads off it a partial: by ``_read`` of its target)
    out["proxy read by name"] = (lambda p: lambda z: p.act(z))(weakref.proxy(runner))
    return out


@pytest.mark.parametrize("way", list(_weakly(torch.nn.Identity(), [])))
def test_a_script_reached_weakly_runs_unoptimized(nets, way: str):
    keep: list[Any] = []  # (the registry, the set, the runner: alive through the test)
    f = _weakly(nets[1], keep)[way]
    assert_scripted_as_eager(f, *nets)
    assert nets[1] in script.scripted(f)


def test_a_dead_reference_is_not_followed(nets):
    f = functools.partial(lambda h, z: h()(z) if h() is not None else z, weakref.ref(_Holder(1)))
    assert script.scripted(f) == []


class _Raising:
    """An object whose every attribute read raises (a context-local proxy not bound)."""

    def __getattribute__(self, name: str) -> Any:
        raise RuntimeError(f"unbound: {name}")


class _Layer(torch.nn.Module):
    pass


@pytest.mark.parametrize("target", ["class", "raising"])
@pytest.mark.parametrize("method", ["auto", "forward"])
def test_a_proxy_whose_target_has_no_bound_getattribute(target: str, method: str):
    net = tanh_mlp(3, 8, 3)
    held = _Layer if target == "class" else _Raising()
    proxy = weakref.proxy(held)
    f = functools.partial(lambda p, z: net(z) if p is not None else z, proxy)
    x = torch.randn(5, 3, dtype=torch.float64)
    ours = torchdiv.divergence(f, x, method=method)
    want = reference_divergence(net, x)
    assert_close(ours, want)
    assert_same_parameter_gradients(net, ours.square().sum(), want.square().sum())
    assert referent(proxy) is (_Layer if target == "class" else proxy)  # (rev-late32: unread)


def test_a_small_holder_beside_a_large_one_is_read_first(nets):
    """A training state bound to a step, ``{"config": <70 hyperparameters>, "models":
    {"flow": net}}``: read breadth first in order, the configuration spent the 64 items and
    the models' dictionary was never read (its script's optimized plan ran, divergence off);
    each level's holders are read smallest first."""
    config = {f"h{i}": 0.1 for i in range(script._HELD_ITEMS + 6)}
    state = {"config": config, "models": {"flow": nets[1]}}
    f = functools.partial(lambda s, z: s["models"]["flow"](z), state)
    assert_scripted_as_eager(f, *nets)
    assert nets[1] in script.scripted(f)
