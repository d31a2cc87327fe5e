"""What the structure key left out until keyleft21: a module's own numbers (a float that sets
an index, ``h.roll(int(self.shift), 0)``; an integer, ``h.mean(self.dim)``), a plain object's
bound method it holds itself (``self.act = helper.apply``), the dictionary subclasses it holds
(diffusers' ``FrozenDict`` config, Lightning's ``AttributeDict`` hyperparameters, an
``OrderedDict``, a ``defaultdict``) and the class attributes its ``forward`` reads
(``type(self).shift``, ``Net.forward = g``).

Each case: three calls served (values against the per-sample Jacobians, float64), then the
change after which ``f`` mixes samples: the next call is watched and refused
(``BatchInteractionError``), not served mixed by the first calls' pass (each case failed so on
main before keyleft21: ``DID NOT RAISE``).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import assert_close, reference_divergence, sampled_daily
from test_module_containers20 import CALLS
from torch import nn

import torchdiv
from torchdiv import BatchInteractionError

f64 = torch.float64


class _Rolled(nn.Module):
    """``tanh(lin(z))`` moved ``int(shift)`` samples along the batch: ``shift`` read from the
    module (a float or an integer attribute), its ``cfg`` dictionary or its class."""

    cls_shift = 0

    def __init__(self, d: int, shift: Any = 0.0, read: str = "own") -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.shift = shift
        self.cfg = {"shift": shift}
        self.read = read

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        shift = {"own": self.shift, "cfg": self.cfg["shift"], "class": type(self).cls_shift}
        return torch.tanh(self.lin(z)).roll(int(shift[self.read]), 0)


class _Thresholded(nn.Module):
    """Centres the batch (mixes samples) where ``alpha`` passes 0.5; reduces ``tanh`` over
    ``dim`` (``-1``: each sample's own elements; ``0``: across samples)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.alpha = 0.0
        self.dim = -1

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(z))
        h = h - h.mean(0) if self.alpha > 0.5 else h
        return h + h.sum(self.dim, keepdim=True) / 4


class _Helper:
    """A plain object whose method a module holds (``self.act = helper.apply``)."""

    def __init__(self) -> None:
        self.shift = 0

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h).roll(self.shift, 0)


class _Acting(nn.Module):
    """A linear layer, then ``act`` (a plain object's bound method)."""

    def __init__(self, d: int, act: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.act = act

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(z))


class _Centred(nn.Module):
    """Centres the batch where its ``cfg`` mapping (of any dictionary type) says ``centre``."""

    def __init__(self, d: int, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.cfg = cfg

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(z))
        return h - h.mean(0) if self.cfg["centre"] else h


class _FrozenDict(collections.OrderedDict):
    """A configuration type as diffusers writes one (``FrozenDict``: an ``OrderedDict``)."""


def _long_config() -> _FrozenDict:
    """``centre`` among 60 entries, with tuples of block types (a UNet's configuration: more
    than the key's 32 mixed items, told as values)."""
    cfg = _FrozenDict((f"option_{i}", (i, f"Block{i}") if i % 3 else i * 0.5) for i in range(59))
    cfg["centre"] = False
    return cfg


Case = Callable[[int], tuple[nn.Module, Callable[[], None]]]


def _made(m: nn.Module) -> nn.Module:
    return m.double().eval()


def _cases() -> dict[str, Case]:
    """Each: a module of ``d`` features and the change after which it mixes samples."""

    def own_float(d: int):
        m = _made(_Rolled(d, 0.0))
        return m, lambda: setattr(m, "shift", 1.0)

    def dict_float(d: int):
        m = _made(_Rolled(d, 0.0, read="cfg"))
        return m, lambda: m.cfg.__setitem__("shift", 1.0)

    def float_threshold(d: int):
        m = _made(_Thresholded(d))
        return m, lambda: setattr(m, "alpha", 1.0)

    def own_integer(d: int):
        m = _made(_Rolled(d, 0))
        return m, lambda: setattr(m, "shift", 1)

    def integer_dim(d: int):
        m = _made(_Thresholded(d))
        return m, lambda: setattr(m, "dim", 0)

    def bound_method(d: int):
        helper = _Helper()
        return _made(_Acting(d, helper.apply)), lambda: setattr(helper, "shift", 1)

    def ordered_dict(d: int):
        m = _made(_Centred(d, collections.OrderedDict(centre=False)))
        return m, lambda: m.cfg.__setitem__("centre", True)

    def defaultdict(d: int):
        m = _made(_Centred(d, collections.defaultdict(bool, centre=False)))
        return m, lambda: m.cfg.__setitem__("centre", True)

    def long_config(d: int):
        m = _made(_Centred(d, _long_config()))
        return m, lambda: m.cfg.__setitem__("centre", True)

    def class_attribute(d: int):
        kind = type("Rolled", (_Rolled,), {"cls_shift": 0})  # (its own class: set below)
        m = _made(kind(d, read="class"))
        return m, lambda: setattr(kind, "cls_shift", 1)

    def base_class_attribute(d: int):
        base = type("Base", (_Rolled,), {"cls_shift": 0})
        m = _made(type("Rolled", (base,), {})(d, read="class"))
        return m, lambda: setattr(base, "cls_shift", 1)

    def forward_on_the_class(d: int):
        kind = type("Plain", (nn.Sequential,), {})
        m = _made(kind(nn.Linear(d, d), nn.Tanh()))

        def mixing(self: nn.Module, z: torch.Tensor) -> torch.Tensor:
            return nn.Sequential.forward(self, z).roll(1, 0)

        return m, lambda: setattr(kind, "forward", mixing)

    return {
        "a float that sets a roll": own_float,
        "a float in a dict that sets a roll": dict_float,
        "a float threshold": float_threshold,
        "an integer that sets a roll": own_integer,
        "an integer dimension": integer_dim,
        "a plain object's bound method": bound_method,
        "an OrderedDict's flag": ordered_dict,
        "a defaultdict's flag": defaultdict,
        "a 60-entry configuration's flag": long_config,
        "a class attribute": class_attribute,
        "a base class's attribute": base_class_attribute,
        "a forward set on the class": forward_on_the_class,
    }


CASES = _cases()


def _served_then_refused(m: nn.Module, change: Callable[[], None], call: str, x: torch.Tensor):
    """Three calls of ``call`` (values against the reference up to 64 samples), ``change``,
    a fourth call: refused."""
    op, reference = CALLS[call]
    for _ in range(3):
        got = op(m, x)
        if reference is not None and x.shape[0] <= 64:
            assert_close(got, reference(m, x))
    change()
    with pytest.raises(BatchInteractionError, match="mixes samples"):
        op(m, x)


def _x(batch: int, d: int) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, d, dtype=f64)


@pytest.mark.parametrize("case", list(CASES))
def test_a_change_outside_the_old_key_is_refused(case: str) -> None:
    """Every case through ``divergence``, 8 samples of 3."""
    torch.manual_seed(0)
    _served_then_refused(*CASES[case](3), "divergence", _x(8, 3))


_OPERATORS = ["jacobian_diagonal", "jacobian", "laplacian", "structured divergence"]


@pytest.mark.parametrize("call", sampled_daily(_OPERATORS, set(_OPERATORS[1:])))
@pytest.mark.parametrize("case", list(CASES))
def test_every_operator_refuses_it(case: str, call: str) -> None:
    """Every case through the other operators, 8 samples of 3 (the diagonal always, the
    Jacobian, the Laplacian and ``"structured"`` in the daily sample; the last two record
    ``f`` at every call, so refused on main too: guards). Explicit ``"reverse"`` watches
    nothing (documented)."""
    torch.manual_seed(0)
    _served_then_refused(*CASES[case](3), call, _x(8, 3))


_LARGE = [
    f"{case}, {kind}"
    for case in ("a float that sets a roll", "an integer that sets a roll", "a class attribute")
    for kind in ("trained", "frozen")
]


@pytest.mark.parametrize("name", sampled_daily(_LARGE, set(_LARGE[1:])))
def test_a_large_diagonal_refuses_it(name: str) -> None:
    """Above ``TINY_PROBLEM`` (2048 x 8: the generic rows), trained and frozen (~0.4 s each:
    one always, the others in the daily sample)."""
    case, kind = name.split(", ")
    torch.manual_seed(0)
    m, change = CASES[case](8)
    m.requires_grad_(kind == "trained")
    _served_then_refused(m, change, "jacobian_diagonal", _x(2048, 8))


@pytest.mark.slow  # (diffusers' import: ~2 s; the OrderedDict cases always run)
def test_a_diffusers_config_is_read() -> None:
    """diffusers' ``@register_to_config`` keeps the configuration in a ``FrozenDict``
    (``self._internal_dict``), replaced by ``register_to_config``; ``forward`` reads
    ``self.config``."""
    pytest.importorskip("diffusers")
    from diffusers.configuration_utils import ConfigMixin, register_to_config

    class Denoiser(nn.Module, ConfigMixin):
        config_name = "config.json"

        @register_to_config
        def __init__(self, d: int = 3, centre: bool = False) -> None:
            super().__init__()
            self.lin = nn.Linear(d, d)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.lin(z))
            return h - h.mean(0) if self.config.centre else h

    torch.manual_seed(0)
    m = _made(Denoiser())
    _served_then_refused(m, lambda: m.register_to_config(centre=True), "divergence", _x(8, 3))


@pytest.mark.slow  # (Lightning's import: ~6 s; the dict subclass cases always run)
def test_lightning_hyperparameters_are_read() -> None:
    """Lightning's ``save_hyperparameters`` keeps them in an ``AttributeDict``
    (``self._hparams``), written in place (``self.hparams.centre = True``)."""
    pl = pytest.importorskip("lightning.pytorch")

    class Model(pl.LightningModule):
        def __init__(self, d: int = 3, centre: bool = False) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.lin = nn.Linear(d, d)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.lin(z))
            return h - h.mean(0) if self.hparams.centre else h

    torch.manual_seed(0)
    m = _made(Model())
    _served_then_refused(m, lambda: setattr(m.hparams, "centre", True), "divergence", _x(8, 3))


def _kept() -> dict[str, Callable[[], nn.Module]]:
    """Modules whose numbers, dictionaries and classes stay as they are."""
    return {
        "MLP": lambda: nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)),
        "a float and an integer": lambda: _Thresholded(3),
        "an OrderedDict": lambda: _Centred(3, collections.OrderedDict(centre=False)),
        "a 60-entry configuration": lambda: _Centred(3, _long_config()),
        "a class attribute": lambda: _Rolled(3, read="class"),
        "a plain object's bound method": lambda: _Acting(3, _Helper().apply),
        "an LSTM": lambda: nn.LSTM(3, 3),
    }


@pytest.mark.parametrize("name", list(_kept()))
def test_unchanged_ones_keep_the_pass(name: str, watches: list[int]) -> None:
    """Three divergences: watched once."""
    torch.manual_seed(0)
    m = _made(_kept()[name]())
    f = (lambda z: m(z[None])[0][0]) if name == "an LSTM" else m
    x = _x(8, 3)
    for _ in range(3):
        assert_close(torchdiv.divergence(f, x), reference_divergence(f, x))
    assert len(watches) == 1


class _Reordered(nn.Module):
    """Hands its outputs back in the order a buffer gives (``y[self.order]``): per sample only
    while ``order`` is the identity."""

    def __init__(self, d: int, batch: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.register_buffer("order", torch.arange(batch))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z))[self.order]


class _State:
    """A training script's state object (flax's ``TrainState``, mutable): ``buffers``, or
    another state inside."""

    def __init__(self, **held: Any) -> None:
        self.__dict__.update(held)


class _Stateful(nn.Module):
    """Runs ``model`` over the buffers of its ``state`` object (``torch.func.functional_call``
    with ``self.state.buffers``)."""

    def __init__(self, model: nn.Module, state: _State) -> None:
        super().__init__()
        self.model, self.state = model, state

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.model, self.state.buffers, (z,))


def _deep_states() -> dict[str, Callable[[nn.Module, _State], tuple[Any, _State]]]:
    """Each: ``f`` reading the module's buffer dictionary from a plain object beyond the
    three levels ``mixing._aliased`` looked through, and the object whose ``buffers`` the
    change replaces."""

    def nested(model: nn.Module, state: _State):
        outer = _State(inner=state)
        return (lambda z: torch.func.functional_call(model, outer.inner.buffers, (z,))), state

    def held_by_a_module(model: nn.Module, state: _State):
        return _Stateful(model, state), state

    def three_states_down(model: nn.Module, state: _State):
        outer = _State(a=_State(b=_State(c=state)))
        return (lambda z: torch.func.functional_call(model, outer.a.b.c.buffers, (z,))), state

    return {
        "a state in a state": nested,
        "a module's state": held_by_a_module,
        "three states down": three_states_down,
    }


@pytest.mark.parametrize("case", list(_deep_states()))
def test_buffers_read_from_a_deeper_plain_object_are_watched(case: str) -> None:
    """``dict(model.named_buffers())`` kept in a state object ``f`` reaches deeper than
    ``mixing._aliased`` looked (three levels, then one object's attributes), or through a
    module's attribute: the module's own buffer vouched for the index ``f`` read, so the
    pass served the calls after ``state.buffers`` was replaced by one whose ``order`` moves
    samples (rev-functional20 fixed the shallow ones). Now such an ``f`` keeps no pass for
    those indices, or sees the object."""
    torch.manual_seed(0)
    model = _made(_Reordered(3, 4))
    state = _State(buffers=dict(model.named_buffers()))
    f, held = _deep_states()[case](model, state)
    x = _x(4, 3)
    for _ in range(2):
        assert_close(torchdiv.divergence(f, x), reference_divergence(f, x))
    held.buffers = {"order": torch.tensor([1, 2, 3, 0])}
    with pytest.raises(BatchInteractionError, match="mixes samples"):
        torchdiv.divergence(f, x)


def test_an_installed_library_s_classes_are_not_read_the_caller_s_are():
    """The key reads the attributes of the caller's own classes, not of installed libraries'
    (their modules' files under ``site-packages``: a BERT call read 18 classes, 87 -> 167 us a
    key, rev-merges21d)."""
    from torchdiv._taylor.cache import _installed

    class Own(torch.nn.Module):
        pass

    assert _installed(pytest.MonkeyPatch)
    assert not _installed(Own)
