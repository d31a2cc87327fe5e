"""TorchScript that ``f`` reaches where the walk of ``_core.script.scripted`` did not look
(rev-lead29): a scripted module in a list, tuple or dictionary (a partial's argument, a
closure), held by a plain object whose bound method is ``f``, a class attribute, a child of
a scripted module that ``f`` calls directly, a scripted module's exported method (or its
``forward`` given as ``f``). Its executor's optimized plan, made by the caller's own calls
before (without gradients: sampling, evaluation), ran: forward mode's and the structured
engine's divergence 0 and no parameter gradients. References: per-sample ``autograd.grad``
loops on the eager module (conftest), float64."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from conftest import assert_close, assert_run_as_written, loop_diagonal

import torchdiv

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's own


class _Net(torch.nn.Module):
    """A small MLP with an exported method besides ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(3, 6), torch.nn.Linear(6, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.encode(z)

    @torch.jit.export
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(z)))


class _Plain:
    """A plain object (not callable, not a module) holding the model."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net

    def run(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class _Shared:
    """A class attribute holding the model (set by the test)."""

    net: torch.nn.Module | None = None


class _ClassHeld(torch.nn.Module):
    """An eager module calling a model its class holds."""

    net: torch.nn.Module | None = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        assert self.net is not None
        return self.net(z)


class _CallsChild(torch.nn.Module):
    """An eager module calling a child of a scripted module (or its exported method)."""

    def __init__(self, parent: torch.nn.Module, method: bool) -> None:
        super().__init__()
        self.parent, self.method = parent, method

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.method:
            return self.parent.encode(z)
        return getattr(self.parent, "0")(z)  # (a Sequential's child)


def _in_list(nets: list[torch.nn.Module], z: torch.Tensor) -> torch.Tensor:
    return nets[0](z)


def _in_dict(nets: dict[str, torch.nn.Module], z: torch.Tensor) -> torch.Tensor:
    return nets["net"](z)


def _run_shared(z: torch.Tensor) -> torch.Tensor:
    assert _Shared.net is not None
    return _Shared.net(z)


def _case(where: str, scripted: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    if where == "list a partial binds":
        return functools.partial(_in_list, [scripted])
    if where == "dict a partial binds":
        return functools.partial(_in_dict, {"net": scripted})
    if where == "tuple in a closure":
        held = (scripted,)
        return lambda z: held[0](z)
    if where == "plain object's bound method":
        return _Plain(scripted).run
    if where == "class attribute":
        _Shared.net = scripted
        return _run_shared
    if where == "module class's attribute":
        _ClassHeld.net = scripted
        return _ClassHeld()
    if where == "child of a scripted module":
        return _CallsChild(torch.jit.script(torch.nn.Sequential(scripted)), method=False)
    if where == "exported method, called":
        return _CallsChild(scripted, method=True)
    if where == "exported method as f":
        return scripted.encode
    assert where == "scripted forward as f"
    return scripted.forward


WHERE = [
    "list a partial binds",
    "dict a partial binds",
    "tuple in a closure",
    "plain object's bound method",
    "class attribute",
    "module class's attribute",
    "child of a scripted module",
    "exported method, called",
    "exported method as f",
    "scripted forward as f",
]


@pytest.mark.parametrize("method", ["forward", "structured"])
@pytest.mark.parametrize("where", WHERE)
def test_scripted_code_reached_another_way_is_run_as_written(where: str, method: str) -> None:
    torch.manual_seed(0)
    eager = _Net().double()
    scripted = torch.jit.script(_Net().double())
    scripted.load_state_dict(eager.state_dict())
    x = torch.randn(4, 3, dtype=torch.float64)
    want = loop_diagonal(eager, x, create_graph=True).sum(-1)
    params = list(eager.parameters())
    expected = torch.autograd.grad(want.sum(), params, allow_unused=True, materialize_grads=True)
    try:
        f = _case(where, scripted)
        if where == "child of a scripted module":  # (its own plan, called directly)
            scripted = getattr(f.parent, "0")
        assert_run_as_written(f, x, method, want, expected, scripted)
    finally:
        _Shared.net = _ClassHeld.net = None


@pytest.mark.parametrize("where", ["list a partial binds", "plain object's bound method"])
def test_a_lazy_module_held_there_is_refused(where: str) -> None:
    """The same walk finds the lazy modules ``check_initialized`` refuses: one in a list a
    partial binds, or held by a plain object, was not met, and the call initialized it
    inside ``torch.func``'s transforms (which crashed the process for some modules)."""
    lazy = torch.nn.LazyLinear(3)
    f = {
        "list a partial binds": functools.partial(_in_list, [lazy]),
        "plain object's bound method": _Plain(lazy).run,
    }[where]
    with pytest.raises(ValueError, match=r"^divergence: f has uninitialized .*LazyLinear"):
        torchdiv.divergence(f, torch.randn(4, 3), method="forward")


def test_the_refusal_under_a_checkpoint_says_what_it_saves() -> None:
    """The refusal of ``method="reverse"`` under a checkpoint around the call offered
    ``"forward"`` as one to which "the hooks then apply": inside a checkpoint region the
    generic engines' saves are kept apart (``_core.modes.saves_apart``), not recomputed."""
    from torch.utils.checkpoint import checkpoint

    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh())
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"a checkpoint's only to the structured and Taylor"):
        checkpoint(lambda z: torchdiv.divergence(net, z, method="reverse"), x, use_reentrant=False)


GRAPH_FORMS: dict[str, Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]] = {
    "graph_divergence": lambda net, z: torchdiv.graph_divergence(net(z), z, create_graph=True),
    "graph_jacobian": lambda net, z: torchdiv.graph_jacobian(net(z), z, create_graph=True),
    "graph_laplacian": lambda net, z: torchdiv.graph_laplacian(net(z)[:, 0], z, create_graph=True),
}


@pytest.mark.parametrize("form", GRAPH_FORMS)
def test_a_graph_form_in_nested_checkpoints(form: str) -> None:
    """A graph form inside a non-reentrant checkpoint nested in another: at the outer one's
    recomputation ``x`` is another Python tensor of the same leaf, and ``depends_on``'s
    ``node.variable is x`` refused ``y`` as "not computed from x" (a plain ``autograd.grad``
    loop there works). Reference: the same loss without checkpoints, float64."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    net = net.double()
    params = list(net.parameters())
    x = torch.randn(4, 3, dtype=torch.float64)

    def loss(z: torch.Tensor) -> torch.Tensor:
        result = GRAPH_FORMS[form](net, z)
        weights = torch.arange(1.0, 1.0 + result.numel(), dtype=z.dtype)
        return (result.square() * weights.reshape(result.shape)).sum()

    def outer(w: torch.Tensor) -> torch.Tensor:
        return checkpoint(loss, w, use_reentrant=False) * 1.0

    z, w = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got, want = checkpoint(outer, z, use_reentrant=False), loss(w)
    grads = torch.autograd.grad(got, [z, *params], allow_unused=True, materialize_grads=True)
    wanted = torch.autograd.grad(want, [w, *params], allow_unused=True, materialize_grads=True)
    assert_close(got, want)  # float64: the dtype's tolerances (conftest)
    for g, v in zip(grads, wanted, strict=True):
        assert_close(g, v)
