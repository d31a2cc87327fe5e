"""A ``torch.compile``d model passed as ``f`` runs compiled inside torchdiv where the engine
allows it, and stays compiled after torchdiv calls.

Dynamo cannot compile under ``torch.func`` transforms or dispatch modes; without care it
marks the model's code "skip" there, and every later call of the model runs eagerly. torchdiv
compiles the call itself with the model's backend instead (the transforms are then traced). A
counting backend tells whether compiled graphs ran during and after each torchdiv call.
"""

from __future__ import annotations

import pytest
import torch

import torchdiv
from torchdiv import flows

pytest.importorskip("torch._dynamo")
# Dynamo reads .grad of the non-leaf tensors it resumes with after a graph break (structured,
# Taylor) behind a filter of its own, which pytest's "error" filter overrides
pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not")


class Counting:
    """A Dynamo backend that runs the captured graph as it is and counts its executions."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self, graph: torch.fx.GraphModule, inputs: list[torch.Tensor]):
        def run(*args: torch.Tensor):
            self.runs += 1
            return graph(*args)

        return run


CALLS = {
    "divergence auto": lambda f, x: torchdiv.divergence(f, x),
    "divergence reverse": lambda f, x: torchdiv.divergence(f, x, method="reverse"),
    "divergence forward": lambda f, x: torchdiv.divergence(f, x, method="forward"),
    "divergence structured": lambda f, x: torchdiv.divergence(f, x, method="structured"),
    "divergence hutchinson": lambda f, x: torchdiv.divergence(
        f, x, method="hutchinson", num_probes=1, generator=torch.Generator().manual_seed(0)
    ),
    "estimate_divergence": lambda f, x: (
        torchdiv.estimate_divergence(
            f, x, num_probes=4, generator=torch.Generator().manual_seed(0)
        ).value
    ),
    "jacobian": lambda f, x: torchdiv.jacobian(f, x),
    "jacobian_diagonal": lambda f, x: torchdiv.jacobian_diagonal(f, x),
    "laplacian": lambda f, x: torchdiv.laplacian(f, x),
    "laplacian forward-over-reverse": lambda f, x: torchdiv.laplacian(
        f, x, method="forward-over-reverse"
    ),
    "flows dynamics": lambda f, x: flows.AugmentedDynamics(lambda t, z: f(z), x)(
        torch.tensor(0.0, dtype=x.dtype), (x, x.new_zeros(1, len(x)))
    )[1],
}


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 6))
    backend = Counting()
    model = torch.compile(net.double(), backend=backend)
    yield net, model, backend
    torch._dynamo.reset()


# products by torch.func transforms, traced into the compiled call (the others record f, draw
# probes or run an ODE's dynamics: eagerly)
COMPILED_INSIDE = {
    "divergence auto",
    "divergence reverse",
    "divergence forward",
    "jacobian",
    "jacobian_diagonal",
    "laplacian forward-over-reverse",
}


@pytest.mark.parametrize("name", list(CALLS))
def test_compiled_model_stays_compiled(compiled, name):
    net, model, backend = compiled
    x = torch.randn(64, 6, dtype=torch.float64)
    call = CALLS[name]
    expected = call(net, x)
    before = backend.runs
    torch.testing.assert_close(call(model, x), expected, rtol=1e-10, atol=1e-10)
    if name in COMPILED_INSIDE:
        assert backend.runs > before, f"{name} ran the compiled model's products eagerly"
    before = backend.runs
    model(x)
    assert backend.runs == before + 1, f"{name} left the compiled model running eagerly"


def test_compiled_function_runs_compiled_inside():
    """A ``torch.compile``d function (not a module) as ``f``: the same."""
    torch._dynamo.reset()  # the calls above used up Dynamo's recompile limit of the entry point
    torch.manual_seed(0)
    weight = torch.randn(3, 3, dtype=torch.float64)

    def g(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ weight.T)

    backend = Counting()
    compiled = torch.compile(g, backend=backend)
    x = torch.randn(4, 3, dtype=torch.float64)
    expected = torchdiv.divergence(g, x, method="reverse")
    torch.testing.assert_close(torchdiv.divergence(compiled, x, method="reverse"), expected)
    assert backend.runs == 1
    compiled(x)
    assert backend.runs == 2
    torch._dynamo.reset()


@pytest.mark.parametrize("method", ["auto", "reverse", "structured"])
def test_a_compiled_module_keeps_its_hooks(method: str):
    """The module's call (its forward hooks, pre-hooks), not only its ``forward``: a hook that
    doubles the output gave half the divergence, silently."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    net = net.double()
    net.register_forward_hook(lambda module, inputs, out: out * 2)
    x = torch.randn(16, 3, dtype=torch.float64)
    expected = torchdiv.divergence(net, x, method=method)
    compiled = torch.compile(net, backend=Counting())
    torch.testing.assert_close(torchdiv.divergence(compiled, x, method=method), expected)
    torch._dynamo.reset()
