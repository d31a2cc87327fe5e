"""rev-merges31: the TorchScript walk (``_core.script.scripted``) after walk31, attacked where
the code names what it reaches (``limitations.md``: a plain object's object is followed where
the code names it). Two ways it was not: a helper method (decorated or not) that ``__call__``
or a bound method calls, whose body reads ``self.state.run(z)`` (``_read`` looked up off
``self`` only the names the entry's own code reads, not its helpers'), and a module's
``forward`` (decorated or not) reading ``self.state.run(z)`` (a module's plain attribute
was followed only for the modules, scripts and containers it holds). Each time the scripted
module's optimized plan ran: forward mode's divergence off, parameter gradients gone.
References: per-sample ``autograd.grad`` loops on an eager copy (conftest's
``assert_scripted_as_eager``), float64 (its float64 tolerances)."""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import assert_scripted_as_eager

from torchdiv._core import script

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's own


def _apply(net: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    return net(z)


def _decorated(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(fn)
    def run(*args: Any) -> torch.Tensor:
        return fn(*args)

    return run


class _Runner:
    """``__call__`` calls a helper method, which reads a partial two attributes down."""

    def __init__(self, run: Any) -> None:
        self.state = types.SimpleNamespace(run=run)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.step(z)

    def step(self, z: torch.Tensor) -> torch.Tensor:
        return self.state.run(z)


class _DecoratedRunner(_Runner):
    @_decorated
    def step(self, z: torch.Tensor) -> torch.Tensor:
        return self.state.run(z)


class _Net(torch.nn.Module):
    """A module whose ``forward`` reads a partial two attributes down off ``self``."""

    def __init__(self, run: Any) -> None:
        super().__init__()
        self.state = types.SimpleNamespace(run=run)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.state.run(z)


class _DecoratedNet(_Net):
    @_decorated
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.state.run(z)


class _HelperNet(_Net):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.helper(z)

    def helper(self, z: torch.Tensor) -> torch.Tensor:
        return self.state.run(z)


@pytest.mark.parametrize(
    "make",
    [
        lambda run: _Runner(run),
        lambda run: _DecoratedRunner(run),
        lambda run: _Runner(run).__call__,
        lambda run: _Net(run),
        lambda run: _DecoratedNet(run),
        lambda run: _HelperNet(run),
        lambda run: torch.nn.Sequential(_HelperNet(run)),
    ],
    ids=[
        "helper",
        "decorated-helper",
        "bound",
        "forward",
        "decorated-forward",
        "module-helper",
        "child",
    ],
)
def test_what_the_code_names_two_attributes_down_is_followed(nets, make):
    f = make(functools.partial(_apply, nets[1]))
    assert_scripted_as_eager(f, *nets)
    assert nets[1] in script.scripted(f)


# (objects of a class with ``__slots__`` and no ``__dict__``: read as objects without
# attributes until rev-merges31, what their slots hold never followed)


@dataclasses.dataclass(slots=True)
class _Config:
    net: Any
    unset: Any = dataclasses.field(default=None, init=False)


class _SlottedRunner:
    __slots__ = ("__net", "spare")  # (a mangled name; ``spare`` never set)

    def __init__(self, net: Any) -> None:
        self.__net = net

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.__net(z)


class _ConfiguredNet(torch.nn.Module):
    def __init__(self, config: _Config) -> None:
        super().__init__()
        self.config = config

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.config.net(z)


def _configured(config: _Config, z: torch.Tensor) -> torch.Tensor:
    return config.net(z)


@pytest.mark.parametrize(
    "make",
    [
        lambda net: functools.partial(_configured, _Config(net)),
        lambda net: _SlottedRunner(net),
        lambda net: _ConfiguredNet(_Config(net)),
    ],
    ids=["config", "callable", "module"],
)
def test_what_a_slotted_object_holds_is_followed(nets, make):
    f = make(nets[1])
    assert_scripted_as_eager(f, *nets)
    assert nets[1] in script.scripted(f)


class _Holder:
    def __init__(self, net: Any) -> None:
        self.net = net


@pytest.mark.parametrize("holder", [_Holder, _Config], ids=["object", "slotted"])
def test_what_a_partials_function_reads_off_the_object_it_binds(nets, holder):
    """``partial(configured, config)`` whose ``configured`` runs ``config.net(z)``, ``net`` a
    partial of the scripted module: the walk read the bound object's modules, scripts and
    containers only, not what the function reads off it (as it does for a global or a
    closure cell's)."""
    f = functools.partial(_configured, holder(functools.partial(_apply, nets[1])))
    assert_scripted_as_eager(f, *nets)
    assert nets[1] in script.scripted(f)


class _CachedRunner:
    """``__call__`` runs what a ``functools.cache``d method returns, read off ``self``."""

    def __init__(self, run: Any) -> None:
        self.state = types.SimpleNamespace(run=run)

    @functools.cache  # noqa: B019 (the object lives as long as the test)
    def model(self) -> Any:
        return self.state.run

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.model()(z)


def test_what_a_cached_method_reads_off_self(nets):
    """A ``functools.lru_cache``/``cache`` wrapper is no Python function: its body (its
    ``__wrapped__``) was not read, ``self.state.run`` not followed."""
    f = _CachedRunner(functools.partial(_apply, nets[1]))
    assert_scripted_as_eager(f, *nets)
    assert nets[1] in script.scripted(f)
