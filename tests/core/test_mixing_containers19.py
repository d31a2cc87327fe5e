"""Lists, dictionaries and ``functools.partial``s in ``f`` (leftovers19): the structure key
tells them by their items, so a lambda or partial made anew at every call over the same ones
is watched once, and one whose items change in a way that may turn mixing on is watched
again.

Until leftovers19 such an ``f`` made anew was watched at every call (a list has no weak
reference; a partial was its own site), and one kept across calls was served by its first
call's pass whatever its list or dictionary came to hold: a module swapped into a list of
layers, a flag set in a dictionary, a module of a tuple set to mix (silently wrong). Each
change below is one the key must see (a module replaced, a module's flag, a tensor's shape
or an index tensor's version, a partial's arguments, a dictionary's keys, a list's length):
the call after it turns mixing on, and must be watched (``BatchInteractionError``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import assert_close, reference_divergence
from torch import nn

import torchdiv
from torchdiv import BatchInteractionError

f64 = torch.float64


class Centre(nn.Module):
    """``z - z.mean(0)`` where ``mix`` is set (mixes samples), else ``z``."""

    def __init__(self, mix: bool = True) -> None:
        super().__init__()
        self.mix = mix

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z - z.mean(0) if self.mix else z


def _layer() -> nn.Module:
    return nn.Linear(3, 3).to(f64)


def _run(layers: list[nn.Module] | tuple[nn.Module, ...], z: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        z = torch.tanh(layer(z))
    return z


def _field(net: nn.Module, z: torch.Tensor, t: torch.Tensor, shift: int = 0) -> torch.Tensor:
    """A time-dependent field (``shift``: rolls the batch, a mixing the key must tell)."""
    return net(torch.cat([z, t.expand(len(z), 1)], 1)).roll(shift, 0)


class Holder:
    """An ODE function object holding a plain list of layers (not a module)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return _run(self.layers, z)


def _cases() -> dict[str, Callable[[], tuple[Callable[[], Any], Callable[[], None]]]]:
    """Each case: a maker of ``f`` (a new object at every call where it is a lambda or partial)
    and the change after which ``f`` mixes samples."""

    def list_swapped() -> tuple[Callable[[], Any], Callable[[], None]]:
        layers = [_layer(), Centre(mix=False)]
        return (lambda: lambda z: _run(layers, z)), lambda: layers.__setitem__(1, Centre())

    def list_flag() -> tuple[Callable[[], Any], Callable[[], None]]:
        layers = [_layer(), Centre(mix=False)]
        return (lambda: lambda z: _run(layers, z)), lambda: setattr(layers[1], "mix", True)

    def list_grown() -> tuple[Callable[[], Any], Callable[[], None]]:
        centre = Centre(mix=False)
        layers: list[nn.Module] = [centre]

        def f(z: torch.Tensor) -> torch.Tensor:  # (mixes where a layer is run twice)
            return z * 2 if len(layers) == 1 else layers[0](z) - z.mean(0)

        return (lambda: f), lambda: layers.append(centre)

    def tuple_flag() -> tuple[Callable[[], Any], Callable[[], None]]:
        layers = (_layer(), Centre(mix=False))
        return (lambda: lambda z: _run(layers, z)), lambda: setattr(layers[1], "mix", True)

    def dict_module() -> tuple[Callable[[], Any], Callable[[], None]]:
        blocks: dict[str, nn.Module] = {"a": _layer(), "b": Centre(mix=False)}
        change = lambda: blocks.__setitem__("b", Centre())  # noqa: E731
        return (lambda: lambda z: blocks["b"](blocks["a"](z))), change

    def dict_keys() -> tuple[Callable[[], Any], Callable[[], None]]:
        blocks: dict[str, nn.Module] = {"a": _layer()}

        def f(z: torch.Tensor) -> torch.Tensor:
            return blocks["a"](z) if "a" in blocks else blocks["b"](z) - z.mean(0)

        return (lambda: f), lambda: blocks.__setitem__("b", blocks.pop("a"))

    def dict_tensor_resized() -> tuple[Callable[[], Any], Callable[[], None]]:
        held = {"w": torch.randn(3, dtype=f64)}

        def f(z: torch.Tensor) -> torch.Tensor:  # (rolls the batch by the scale's extra size)
            return (z * held["w"][:3]).roll(len(held["w"]) - 3, 0)

        return (lambda: lambda z: f(z)), lambda: held.__setitem__("w", torch.randn(4, dtype=f64))

    def dict_index_written() -> tuple[Callable[[], Any], Callable[[], None]]:
        held = {"order": torch.arange(8)}
        change = lambda: held["order"].copy_(torch.arange(8).roll(1))  # noqa: E731
        return (lambda: lambda z: z[held["order"]] * 2), change

    def partial_module() -> tuple[Callable[[], Any], Callable[[], None]]:
        net = nn.Sequential(nn.Linear(4, 3), nn.Tanh()).to(f64)
        made = {"net": net}
        t = torch.tensor(0.5, dtype=f64)

        def change() -> None:
            made["net"] = nn.Sequential(nn.Linear(4, 3), Centre()).to(f64)

        return (lambda: functools.partial(_field, made["net"], t=t)), change

    def partial_argument() -> tuple[Callable[[], Any], Callable[[], None]]:
        net = nn.Sequential(nn.Linear(4, 3), nn.Tanh()).to(f64)
        shift = [0]

        def change() -> None:
            shift[0] = 1

        t = torch.tensor(0.5, dtype=f64)
        return (lambda: functools.partial(_field, net, t=t, shift=shift[0])), change

    def partial_list() -> tuple[Callable[[], Any], Callable[[], None]]:
        layers = [_layer()]
        f = functools.partial(_run, layers)
        return (lambda: f), lambda: layers.append(Centre())

    def holder_list() -> tuple[Callable[[], Any], Callable[[], None]]:
        f = Holder([_layer(), Centre(mix=False)])
        return (lambda: f), lambda: f.layers.__setitem__(1, Centre())

    return {
        "list: a module replaced": list_swapped,
        "list: a module's flag": list_flag,
        "list: grown": list_grown,
        "tuple: a module's flag": tuple_flag,
        "dict: a module replaced": dict_module,
        "dict: a key renamed": dict_keys,
        "dict: a tensor resized": dict_tensor_resized,
        "dict: an index written": dict_index_written,
        "partial: another module": partial_module,
        "partial: another argument": partial_argument,
        "partial: its list grown": partial_list,
        "object: its list's module replaced": holder_list,
    }


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
def test_a_container_is_watched_once_and_again_when_an_item_changes(
    case: str, watches: list[int]
) -> None:
    """Three calls of a new ``f`` over the same items: one watch, values the per-sample
    Jacobians' traces (float64, ``jacrev`` of the whole batch's diagonal blocks); after the
    change, the next call is watched and refused."""
    torch.manual_seed(0)
    make, change = CASES[case]()
    x = torch.randn(8, 3, dtype=f64)
    for _ in range(3):
        f = make()
        assert_close(torchdiv.divergence(f, x), reference_divergence(f, x))
    assert len(watches) == 1
    change()
    with pytest.raises(BatchInteractionError, match="f mixes samples"):
        torchdiv.divergence(make(), x)


def test_a_partial_over_a_new_time_at_every_step_is_watched_once(watches: list[int]) -> None:
    """``partial(field, net, t=t)`` made at every step of an ODE solve, over a new floating
    time: watched once (no value decided anything), values per step against the per-sample
    traces; a partial over another module is watched again."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(f64)
    x = torch.randn(8, 3, dtype=f64)
    for step in range(4):
        f = functools.partial(_field, net, t=torch.tensor(0.1 * step, dtype=f64))
        assert_close(torchdiv.divergence(f, x), reference_divergence(f, x))
    assert len(watches) == 1
    other = nn.Sequential(nn.Linear(4, 3)).to(f64)
    torchdiv.divergence(functools.partial(_field, other, t=torch.tensor(0.0, dtype=f64)), x)
    assert len(watches) == 2


def test_a_partial_s_positional_and_keyword_arguments_are_told_apart() -> None:
    """``partial(g, "shift", 1)`` and ``partial(g, shift=1)`` hold the same objects in order,
    and compute differently: two structures."""
    from torchdiv._taylor import mixing

    def g(*args: Any, **kwargs: Any) -> Any:
        return args, kwargs

    a, b = functools.partial(g, "shift", 1), functools.partial(g, shift=1)
    assert mixing.identity(a) != mixing.identity(b)
    assert mixing.identity(a) == mixing.identity(functools.partial(g, "shift", 1))
