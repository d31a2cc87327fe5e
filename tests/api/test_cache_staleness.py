"""What a call keeps for the next one (the plan cache, the recorded templates, the objects that
passed a watch for sample mixing, the loop decisions) never gives a later call a stale value,
a stale parameter gradient, or a skipped watch.

The watch for sample mixing runs on the first call of each ``f`` object at each structure
(``torchdiv._taylor.cache.structure_key``); later calls of tiny problems, one-probe
Hutchinson and the Laplacian's loop search only the autograd graph (for a train-mode batch
norm). So the structure must change whenever the state that makes ``f`` mix samples does,
wherever ``f`` reads it from."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import torchdiv
from torchdiv import BatchInteractionError

f64 = torch.float64


class _CentredInTraining(nn.Module):
    """Subtracts the batch mean in train mode only (a hand-written normalisation)."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y - y.mean(0) if self.training else y


def _net(d: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, d), _CentredInTraining(), nn.Tanh()).double().eval()


def _call(m: nn.Module, z: torch.Tensor) -> torch.Tensor:
    return m(z)


class _Field:
    """A plain object holding a module: its bound method and itself are ``f``."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def velocity(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class _Flagged(nn.Module):
    """Mixes samples when its flag says so."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 3).double()
        self.mix = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.net(z)
        return y + z.mean(0) if self.mix else y


def _centred_output(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return output - output.mean(0)


def _centred_input(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    return (inputs[0] - inputs[0].mean(0),)


_MIX = False
_INNER: nn.Module | None = None  # a module only an inner lambda names


def _global_flag(z: torch.Tensor) -> torch.Tensor:
    return torch.tanh(z) + (z.mean(0) if _MIX else 0)


def _set_global(value: bool) -> None:
    global _MIX
    _MIX = value


def _rebound() -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[], None]]:
    act: Callable[[torch.Tensor], torch.Tensor] = torch.tanh

    def f(z: torch.Tensor) -> torch.Tensor:
        return act(z * 2)

    def rebind() -> None:
        nonlocal act
        act = torch.flipud  # a builtin that reverses the batch

    return f, rebind


def _keyword(z: torch.Tensor, mix: bool) -> torch.Tensor:
    return torch.tanh(z) + (z.mean(0) if mix else 0)


def _cases() -> dict[str, Callable[[], tuple[Any, Callable[[], None]]]]:
    """``f`` and what makes it mix samples afterwards, by where ``f`` reads that state."""

    def partial_argument():
        net = _net()
        return functools.partial(_call, net), net.train

    def partial_keyword():
        f = functools.partial(_keyword, mix=False)
        return f, lambda: f.keywords.update(mix=True)

    def default_argument():
        net = _net()
        return (lambda z, m=net: m(z)), net.train

    def method_of_a_plain_object():
        net = _net()
        return _Field(net).velocity, net.train

    def callable_object():
        net = _net()
        return _Field(net), net.train

    def module_flag():
        m = _Flagged()
        return m, lambda: setattr(m, "mix", True)

    def closure_axis():
        axis = 1

        def f(z: torch.Tensor) -> torch.Tensor:
            return z.tanh() - z.tanh().mean(axis, keepdim=True)

        def rebind() -> None:
            nonlocal axis
            axis = 0

        return f, rebind

    def hook_on_a_submodule():
        net = _net()
        return net, lambda: net[0].register_forward_hook(_centred_output)

    def pre_hook_through_a_function():
        net = _net()
        return (lambda z: net(z)), lambda: net[2].register_forward_pre_hook(_centred_input)

    def global_flag():
        _set_global(False)
        return _global_flag, lambda: _set_global(True)

    def module_named_in_an_inner_lambda():
        global _INNER
        _INNER = _Flagged()
        return (lambda z: (lambda w: _INNER(w))(z)), lambda: setattr(_INNER, "mix", True)

    return {
        "forward hook on a submodule": hook_on_a_submodule,
        "pre-hook on a module a function calls": pre_hook_through_a_function,
        "global flag": global_flag,
        "closure rebound to a builtin": _rebound,
        "module in a partial's arguments": partial_argument,
        "partial's keyword": partial_keyword,
        "module as a default argument": default_argument,
        "bound method of a plain object": method_of_a_plain_object,
        "callable object": callable_object,
        "module's bool attribute": module_flag,
        "closure's int (an axis)": closure_axis,
        "global module named in an inner lambda only": module_named_in_an_inner_lambda,
    }


def _laplacian(f: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The Laplacian's loop (two inputs) of a function made once around ``f``."""
    u = lambda z: f(torch.cat([z, z[:, :1]], -1)).sum(-1)  # noqa: E731
    return lambda x: torchdiv.laplacian(u, x[:, :2])


CALLS = {  # calls whose later evaluations, at a structure that passed, are not watched
    "divergence": lambda f: lambda x: torchdiv.divergence(f, x),
    "jacobian": lambda f: lambda x: torchdiv.jacobian(f, x),
    "hutchinson": lambda f: (
        lambda x: torchdiv.divergence(
            f, x, method="hutchinson", num_probes=1, generator=torch.Generator().manual_seed(0)
        )
    ),
    "laplacian": _laplacian,
}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("case", _cases())
def test_state_that_makes_f_mix_samples_is_watched_again(case: str, call: str) -> None:
    """The same ``f`` object, after a change of what it reads, mixes samples: the later call
    is refused, not served unwatched (it returned other samples' terms: the sum over the
    batch of off-diagonal Jacobian blocks). Each of these was unwatched before its state
    became part of the structure."""
    f, mix = _cases()[case]()
    run = CALLS[call](f)
    x = torch.randn(4, 3, dtype=f64)
    for _ in range(2):
        run(x)
    mix()
    with pytest.raises(BatchInteractionError):
        run(x)


class _Unbound:
    """A proxy-like callable whose ``__dict__`` raises (a context-local proxy unbound)."""

    @property
    def __dict__(self) -> dict[str, Any]:  # type: ignore[override]
        raise RuntimeError("unbound")

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z)


def test_a_callable_whose_attributes_cannot_be_read_is_left_alone() -> None:
    """The structure looks into callable objects' ``__dict__``; one that raises there (itself
    ``f``, or held by ``f``) is not looked into, and the call gives the divergence."""
    x = torch.randn(4, 3, dtype=f64)
    expected = (1 - x.tanh() ** 2).sum(-1)
    proxy = _Unbound()
    for f in (proxy, lambda z, p=proxy: p(z)):
        for _ in range(2):
            torch.testing.assert_close(torchdiv.divergence(f, x), expected)


class _FlaggedField(nn.Module):
    """A velocity ``f(t, z)`` that mixes samples when its flag says so."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 2).double()
        self.mix = False

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.net(z))
        return y + z.mean(0) if self.mix else y


def test_a_one_probe_flow_watches_a_field_switched_to_mixing() -> None:
    """``log_likelihood`` with one probe watches its velocity module once per structure; the
    module's flag is part of it (the solve returned other samples' terms, unrefused)."""
    field = _FlaggedField()
    x = torch.randn(8, 2, dtype=f64)

    def solve() -> torch.Tensor:
        return torchdiv.flows.log_likelihood(
            field, x, 0.0, 1.0, lambda z: -0.5 * z.square().sum(-1), method="hutchinson",
            num_probes=1, rtol=1e-3, atol=1e-3, solver="rk4", options={"step_size": 0.5},
        )  # fmt: skip

    for _ in range(2):
        solve()
    field.mix = True
    with pytest.raises(BatchInteractionError):
        solve()


def test_a_hook_registered_for_every_module_is_watched_again() -> None:
    """``register_module_forward_hook`` reaches every module's forward: a later call is
    watched again, and the hook that mixes samples is refused (it was served unwatched)."""
    net = _net()
    x = torch.randn(4, 3, dtype=f64)
    for _ in range(2):
        torchdiv.divergence(net, x)
    hook: Any = _centred_output  # (typed as returning None: a hook may return the output)
    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        with pytest.raises(BatchInteractionError):
            torchdiv.divergence(net, x)
    finally:
        handle.remove()


_helper: Callable[[torch.Tensor], torch.Tensor] = torch.tanh  # a global that f names


def _names_helper(z: torch.Tensor) -> torch.Tensor:
    return _helper(z)


def test_a_global_defined_again_at_a_freed_ones_address_is_watched_again() -> None:
    """A global function defined again (a notebook cell run again) that took the ``id`` of one
    freed before found the entries of a key that held that ``id``: the new one's sample
    mixing went unwatched, and its "divergence" came back. Defined again until an ``id``
    comes back (CPython's allocator reuses a freed function's memory within a few tries)."""
    global _helper
    x = torch.randn(5, 3, dtype=f64)
    seen = set()
    try:
        for _ in range(300):
            _helper = eval("lambda z: torch.tanh(z)")  # a new function object each time
            torchdiv.divergence(_names_helper, x)
            seen.add(id(_helper))
            _helper = eval("lambda z: torch.tanh(z) + z.mean(0)")  # mixes samples
            if id(_helper) in seen:
                break
            with pytest.raises(BatchInteractionError):
                torchdiv.divergence(_names_helper, x)
        else:
            pytest.skip("no id came back")
        with pytest.raises(BatchInteractionError):
            torchdiv.divergence(_names_helper, x)
    finally:
        _helper = torch.tanh


_INDEXED = {  # f moving the samples of tanh(z) along the batch by the index tensor ``perm``
    "index": lambda perm: lambda z: torch.tanh(z)[perm],
    "index_select": lambda perm: lambda z: torch.tanh(z).index_select(0, perm),
    "gather": lambda perm: lambda z: torch.tanh(z).gather(0, perm[:, None].expand_as(z)),
    "argsort": lambda perm: lambda z: torch.tanh(z)[perm.argsort()],  # indices made in f
}


@pytest.mark.parametrize("method", ["structured", "auto"])
@pytest.mark.parametrize("op", _INDEXED)
def test_an_index_changed_in_place_after_a_recorded_call_is_watched_again(
    op: str, method: str
) -> None:
    """The structured engine checks later calls against the first one's recording by
    structure, which holds an index tensor by its shape; whether samples moved by it mix
    depends on its values. A closure's ``perm`` reversed in place after two calls as the
    identity (each the divergence of ``tanh``) is refused, not served unwatched (the
    divergence of the sample moved into each place came back)."""
    x = torch.randn(80, 8, dtype=f64)  # 8 x 640 elements: "auto" runs the structured engine
    perm = torch.arange(80)
    f = _INDEXED[op](perm)
    for _ in range(2):
        got = torchdiv.divergence(f, x, method=method)
        torch.testing.assert_close(got, (1 - x.tanh() ** 2).sum(-1), rtol=1e-12, atol=1e-12)
    perm.copy_(perm.flip(0))
    with pytest.raises(BatchInteractionError, match="samples"):
        torchdiv.divergence(f, x, method=method)
