"""rev-late30: the TorchScript walk of 09b25c47/3923345d attacked. Each ``f`` below reaches a
scripted module in a way the walk missed (or crashed on): a ``forward`` set on an instance of a
PyTorch module, a forward hook or pre-hook (the module's or every module's), a class whose
``__call__`` or ``forward`` is a script, a partial or a static method of one, a class
attribute ``staticmethod(scripted)`` read as ``self.act``. A missed script runs its optimized
plan (made by the three calls outside torchdiv): forward mode's divergence 0, no parameter
gradients. References: per-sample ``autograd.grad`` loops on an eager copy (conftest), float64
(conftest's float64 tolerances)."""

from __future__ import annotations

import functools
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from conftest import PARTIAL_ON_A_CLASS, assert_close, assert_scripted_as_eager

import torchdiv
from torchdiv._core import script

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's own


class _Scripted:
    module: torch.jit.ScriptModule | None = None


def _run(net: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    return net(z)


@pytest.fixture
def nets(
    nets: tuple[torch.nn.Module, torch.jit.ScriptModule],
) -> Iterator[tuple[torch.nn.Module, torch.jit.ScriptModule]]:
    """conftest's ``nets``, the scripted copy also held by ``_Scripted`` meanwhile."""
    _Scripted.module = nets[1]
    yield nets
    _Scripted.module = None


def _assert_run_as_written(f: Callable[[torch.Tensor], torch.Tensor], nets: Any) -> None:
    """``conftest.assert_scripted_as_eager`` with the fixture's eager and scripted copies."""
    assert_scripted_as_eager(f, *nets)


def test_a_forward_set_on_an_instance_of_a_pytorch_module(nets):
    """``nn.Module.__call__`` runs ``self.forward``: an instance's own (``seq.forward = g``)."""
    seq = torch.nn.Sequential(torch.nn.Identity())
    seq.forward = lambda z: nets[1](z)  # type: ignore[method-assign]
    _assert_run_as_written(seq, nets)


def test_a_bound_forward_set_on_a_layer(nets):
    lin = torch.nn.Linear(3, 3).double()

    def forward(self: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        return _Scripted.module(z)  # type: ignore[misc]

    lin.forward = types.MethodType(forward, lin)  # type: ignore[method-assign]
    _assert_run_as_written(lin, nets)


def test_a_forward_hook_that_runs_a_script(nets):
    ident = torch.nn.Identity()
    ident.register_forward_hook(lambda m, args, out: nets[1](args[0]))
    _assert_run_as_written(ident, nets)


def test_a_forward_pre_hook_of_a_users_module(nets):
    class Net(torch.nn.Module):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return z * 1.0

    net = Net()
    net.register_forward_pre_hook(functools.partial(lambda s, m, args: (s(args[0]),), nets[1]))
    _assert_run_as_written(net, nets)


def test_a_global_forward_hook(nets):
    ident = torch.nn.Identity()

    def hook(m: torch.nn.Module, args: Any, out: torch.Tensor) -> Any:
        return nets[1](args[0]) if m is ident else None

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        _assert_run_as_written(ident, nets)
    finally:
        handle.remove()


@pytest.mark.filterwarnings(PARTIAL_ON_A_CLASS)  # (Python 3.13: ``Partial()(z)`` warns)
def test_a_class_whose_call_is_a_partial_or_a_static_one(nets):
    class Partial:
        __call__ = functools.partial(_run, nets[1])

    class Static:
        __call__ = staticmethod(functools.partial(_run, nets[1]))

    class Script:
        __call__ = nets[1]

    for cls in (Partial, Static, Script):
        _assert_run_as_written(cls(), nets)


def test_a_module_class_whose_forward_is_a_static_partial(nets):
    class Net(torch.nn.Module):
        forward = staticmethod(functools.partial(_run, nets[1]))

    _assert_run_as_written(Net(), nets)


def test_a_static_script_read_as_self_act(nets):
    class Holder:
        act = staticmethod(nets[1])

        def __call__(self, z: torch.Tensor) -> torch.Tensor:
            return self.act(z)

    _assert_run_as_written(Holder(), nets)


class _Hostile(type):
    def __getattribute__(cls, name: str) -> Any:
        if name in ("forward", "__call__", "__module__"):
            raise RuntimeError(name)
        return super().__getattribute__(name)


def test_objects_that_raise_when_read_walk_without_error(nets):
    """A module class whose metaclass raises for ``forward`` (its forward is still found), a
    callable object whose ``__getattribute__`` raises (``isinstance`` reads ``__class__``), a
    dead ``weakref.proxy`` a function reads."""

    class Module(torch.nn.Module, metaclass=_Hostile):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return _Scripted.module(z)  # type: ignore[misc]

    class Proxy:
        def __getattribute__(self, name: str) -> Any:
            raise RuntimeError(name)

        def __call__(self, z: torch.Tensor) -> torch.Tensor:
            return z

    class Gone:
        pass

    gone = Gone()
    dead = weakref.proxy(gone)
    del gone

    def reads_dead(z: torch.Tensor) -> torch.Tensor:
        return dead.net(z)

    assert script.scripted(Module()) == [nets[1]]
    assert script.scripted(Proxy()) == []
    assert script.scripted(reads_dead) == []


class _Checked(torch.nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _Scripted.module(z)  # type: ignore[misc]


_CHECKED = _Checked()


def _checked(z: torch.Tensor) -> torch.Tensor:
    assert isinstance(_CHECKED, _Checked)
    return _CHECKED(z)


def test_a_module_class_named_beside_its_instance(nets):
    """``f`` names the class too (``isinstance``): the class, met first as a holder, was marked
    seen, and its instance's ``forward`` (read once per class) was skipped (before and after
    fuzzscript30's level stacks)."""
    _assert_run_as_written(_checked, nets)


class _Finalized:
    """A callable object that holds a ``weakref.finalize`` (a resource's clean-up)."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net
        self._finalizer = weakref.finalize(self, lambda: None)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def test_a_callable_object_holding_a_finalizer():
    """The walk reads ``finalize.__call__``'s ``self._registry`` (a class attribute read off
    the instance, followed since 09b25c47) and walks that dictionary's values; telling their
    type (first met: as in a fresh process) registered a finalizer for it, which changed the
    registry's size during the iteration: a RuntimeError from a public call."""
    info = weakref.finalize._Info  # type: ignore[attr-defined]
    script._WATCHED.pop(id(info), None)
    script._KINDS.pop(id(info), None)
    torch.manual_seed(0)
    lin = torch.nn.Linear(2, 2).double()
    x = torch.randn(3, 2, dtype=torch.float64)
    got = torchdiv.divergence(_Finalized(lin), x)
    assert_close(got, lin.weight.diagonal().sum().expand(3).detach())  # (the trace, exact)
