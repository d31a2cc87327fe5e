"""TorchScript that ``f`` reaches through the attributes its code reads, where the walk of
``_core.script.scripted`` did not look (rev-merges29): a module's helper method that its
``forward`` calls (``self.block(z)``), a base class's ``forward`` run by ``super().forward``,
a method of a plain object that ``f`` calls (``holder.run(z)``), a bound method's own helper
method, a scripted module two plain objects deep (``runner.state.net(z)``). The scripted
code's executor optimized its plan at the caller's own calls before: the structured engine's
divergence (and forward mode's for a scripted module) was silently wrong, its parameter
gradients gone. References: per-sample ``autograd.grad`` loops on eager copies (conftest),
float64."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import assert_close, assert_run_as_written, loop_diagonal

import torchdiv

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's own


def _act(z: torch.Tensor) -> torch.Tensor:
    return torch.tanh(z) * z


_SCRIPTED_ACT = torch.jit.script(_act)
_ACT: Callable[[torch.Tensor], torch.Tensor] = _act  # (set to the scripted one by the test)


class _Helper(torch.nn.Module):
    """A forward that calls a helper method naming a scripted activation."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.block(z)

    def block(self, z: torch.Tensor) -> torch.Tensor:
        return _ACT(self.lin(z))


class _Base(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _ACT(self.lin(z))


class _Child(_Base):
    """A forward that runs its base class's by ``super()``."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return super().forward(z) * 2


class _Runner:
    """A plain object whose method names the scripted activation."""

    def __init__(self) -> None:
        self.lin = torch.nn.Linear(3, 3)

    def run(self, z: torch.Tensor) -> torch.Tensor:
        return self._go(z)

    def _go(self, z: torch.Tensor) -> torch.Tensor:
        return _ACT(self.lin(z))


class _State:
    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net


class _Trainer:
    """A plain object holding another that holds the model."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.state = _State(net)


_RUNNER: _Runner | None = None
_TRAINER: _Trainer | None = None


def _calls_runner(z: torch.Tensor) -> torch.Tensor:
    assert _RUNNER is not None
    return _RUNNER.run(z)


def _calls_trainer(z: torch.Tensor) -> torch.Tensor:
    assert _TRAINER is not None
    return _TRAINER.state.net(z)


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _case(where: str, scripted: bool) -> tuple[Callable[[torch.Tensor], torch.Tensor], object]:
    """``f`` and what holds its parameters, with the scripted code where ``scripted``."""
    global _ACT, _RUNNER, _TRAINER
    _ACT = _SCRIPTED_ACT if scripted else _act
    torch.manual_seed(0)
    if where == "a helper method forward calls":
        net: object = _Helper().double()
        return net, net  # type: ignore[return-value]
    if where == "a base class's forward by super()":
        net = _Child().double()
        return net, net  # type: ignore[return-value]
    if where == "a plain object's method f calls":
        _RUNNER = _Runner()
        _RUNNER.lin.double()
        return _calls_runner, _RUNNER.lin
    if where == "a bound method's helper method":
        runner = _Runner()
        runner.lin.double()
        return runner.run, runner.lin
    assert where == "two plain objects deep"
    mlp = _mlp().double()
    _TRAINER = _Trainer(torch.jit.script(mlp) if scripted else mlp)
    return _calls_trainer, _TRAINER.state.net


WHERE = [
    "a helper method forward calls",
    "a base class's forward by super()",
    "a plain object's method f calls",
    "a bound method's helper method",
    "two plain objects deep",
]


@pytest.mark.parametrize("method", ["forward", "structured"])
@pytest.mark.parametrize("where", WHERE)
def test_scripted_code_reached_through_attributes_is_run_as_written(
    where: str, method: str
) -> None:
    global _ACT, _RUNNER, _TRAINER
    x = torch.randn(4, 3, dtype=torch.float64)
    try:
        eager, eager_params = _case(where, scripted=False)
        want = loop_diagonal(eager, x, create_graph=True).sum(-1)
        params = list(eager_params.parameters())  # type: ignore[attr-defined]
        expected = torch.autograd.grad(
            want.sum(), params, allow_unused=True, materialize_grads=True
        )
        f, held = _case(where, scripted=True)
        assert_run_as_written(f, x, method, want, expected, held)  # type: ignore[arg-type]
    finally:
        _ACT, _RUNNER, _TRAINER = _act, None, None


class _RaisingList(list):  # type: ignore[type-arg]
    def __iter__(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("a holder's own iteration")


class _LazyMapping(dict):  # type: ignore[type-arg]
    def values(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("a lazy mapping's import failed")


def _first(held: object, net: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    return net(z)


@pytest.mark.parametrize("holder", ["a list whose __iter__ raises", "a dict whose values raises"])
def test_a_holder_whose_own_methods_raise_is_walked_by_the_builtins(holder: str) -> None:
    """A list or dictionary subclass that ``f`` binds (a lazy mapping: its ``values`` imports
    modules, and may raise) was iterated by its own methods: the call raised their error.
    Read by the built-in's methods, a scripted module in it is still found. Reference: the
    eager module's per-sample loop, float64."""
    import functools

    torch.manual_seed(0)
    eager = _mlp().double()
    scripted = torch.jit.script(_mlp().double())
    scripted.load_state_dict(eager.state_dict())
    held = (
        _RaisingList([scripted])
        if holder == "a list whose __iter__ raises"
        else _LazyMapping(net=scripted)
    )
    f = functools.partial(_first, held, scripted)
    x = torch.randn(4, 3, dtype=torch.float64)
    for _ in range(3):
        f(x)
    want = loop_diagonal(eager, x).sum(-1)
    assert_close(torchdiv.divergence(f, x, method="structured"), want)  # float64's tolerances
