"""A ``torch.compile``d model passed as ``f`` runs compiled inside torchdiv where the engine
allows it, and stays compiled after torchdiv calls.

Dynamo cannot compile under ``torch.func`` transforms or dispatch modes; without care it
marks the model's code "skip" there, and every later call of the model runs eagerly. torchdiv
compiles the call itself with the model's backend instead (the transforms are then traced),
except for the engines that record ``f`` eagerly by design, which run the model's original
module eagerly. A counting backend tells whether compiled graphs ran during and after each
torchdiv call.
"""

from __future__ import annotations

import pytest
import torch
from conftest import sampled_daily

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


# in the daily sample of slow tests: the divergences (reverse checked always by
# test_compiled_model_as_f_gradients_equal_eager; auto and forward mode always here through the
# Laplacian's auto and forward-over-reverse); the others always
SAMPLED_CALLS = {"divergence auto", "divergence reverse", "divergence forward"}


@pytest.mark.parametrize(
    "name",
    sampled_daily(CALLS, SAMPLED_CALLS),
)
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


# "auto" (traced products) and "structured" (the original module recorded) always; "reverse"
# (traced products, as "auto" here) in the daily sample of slow tests
@pytest.mark.parametrize(
    "method", ["auto", pytest.param("reverse", marks=pytest.mark.slow), "structured"]
)
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
    backend = Counting()
    compiled = torch.compile(net, backend=backend)
    torch.testing.assert_close(torchdiv.divergence(compiled, x, method=method), expected)
    # the products ran compiled, hooks included; "structured" records the original module
    assert (backend.runs > 0) == (method != "structured"), backend.runs
    torch._dynamo.reset()


@pytest.mark.parametrize("method", ["reverse", "structured"])
def test_hooks_on_the_compiled_wrapper_run(method: str):
    """A hook registered on ``torch.compile(net)`` itself (not on ``net``) runs: calling the
    original module dropped it, silently (half the divergence for a hook doubling ``f``)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    net = net.double()
    x = torch.randn(16, 3, dtype=torch.float64)
    compiled = torch.compile(net, backend=Counting())
    compiled.register_forward_hook(lambda module, inputs, out: out * 2)
    expected = 2 * torchdiv.divergence(net, x, method=method)
    torch.testing.assert_close(torchdiv.divergence(compiled, x, method=method), expected)
    torch._dynamo.reset()


class CountingAot:
    """A backend around ``aot_eager`` (traces and differentiates like inductor, generates no
    code) that counts the graphs it compiled and their runs."""

    def __init__(self) -> None:
        self.compiled = self.runs = 0

    def __call__(self, graph: torch.fx.GraphModule, inputs: list[torch.Tensor]):
        self.compiled += 1
        compiled = torch._dynamo.lookup_backend("aot_eager")(graph, inputs)

        def run(*args: torch.Tensor):
            self.runs += 1
            return compiled(*args)

        return run


def _mlp(d: int, d_out: int) -> torch.nn.Module:
    """A tanh MLP ``d -> 16 -> 16 -> d_out`` (``d_out == 1``: one number per sample)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(d, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh()
    )
    last = [torch.nn.Linear(16, 1), torch.nn.Flatten(0)] if d_out == 1 else [torch.nn.Linear(16, d)]
    return torch.nn.Sequential(*net, *last)


# every method, each with the net it applies to; p: probes drawn once (a call that draws runs
# eagerly, tested above)
METHODS = {
    "divergence auto": (3, lambda f, x, p: torchdiv.divergence(f, x)),
    "divergence structured": (3, lambda f, x, p: torchdiv.divergence(f, x, method="structured")),
    "divergence reverse": (3, lambda f, x, p: torchdiv.divergence(f, x, method="reverse")),
    "divergence forward": (3, lambda f, x, p: torchdiv.divergence(f, x, method="forward")),
    "divergence hutchinson": (
        3,
        lambda f, x, p: torchdiv.divergence(f, x, method="hutchinson", probes=p),
    ),
    "laplacian auto": (1, lambda f, x, p: torchdiv.laplacian(f, x)),
    "laplacian taylor": (1, lambda f, x, p: torchdiv.laplacian(f, x, method="taylor")),
    "laplacian forward-over-reverse": (
        1,
        lambda f, x, p: torchdiv.laplacian(f, x, method="forward-over-reverse"),
    ),
    "laplacian grad-of-grad": (
        1,
        lambda f, x, p: torchdiv.laplacian(f, x, method="grad-of-grad"),
    ),
    "laplacian hessian": (1, lambda f, x, p: torchdiv.laplacian(f, x, method="hessian")),
    "laplacian hutchinson": (
        1,
        lambda f, x, p: torchdiv.laplacian(f, x, method="hutchinson", probes=p),
    ),
}
# the engines that record f (eagerly by design): with a compiled f they run eagerly with its
# original, compiling nothing ("auto" records here: the MLPs' work is small only for Dynamo's
# rule when traced, see below)
RECORDING = {"divergence structured", "laplacian taylor", "laplacian grad-of-grad"}


def _loss_and_grads(op, f, net: torch.nn.Module, x: torch.Tensor, probes: torch.Tensor):
    """``op(f, x).square().mean()`` and its gradients in ``x`` and ``net``'s parameters (zero
    for a parameter it does not depend on: a divergence's last bias)."""
    leaf = x.detach().requires_grad_(True)
    loss = op(f, leaf, probes).square().mean()
    inputs = [leaf, *net.parameters()]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    pairs = zip(inputs, grads, strict=True)
    return [loss] + [torch.zeros_like(i) if g is None else g for i, g in pairs]


# compiling takes 1-3 s a case (4-13 s on a loaded run): float32, float64 of the Laplacian's
# traced methods and of the divergence's auto, forward and hutchinson, slow; always: the
# recording engines (the fault: compiled around their eager engine) and one traced engine
# (reverse; forward mode through a compiled model: stays_compiled's forward-over-reverse)
FAST = RECORDING | {"divergence reverse"}
CASES = [
    pytest.param(name, dtype, marks=() if fast else pytest.mark.slow, id=f"{name}-{dtype}")
    for name in METHODS
    for dtype in (torch.float64, torch.float32)
    for fast in [dtype == torch.float64 and name in FAST]
]


@pytest.mark.parametrize(("name", "dtype"), CASES)
def test_compiled_model_as_f_gradients_equal_eager(name: str, dtype: torch.dtype):
    """Each method with ``torch.compile(net)`` as ``f``: the loss and its gradients in ``x``
    and the parameters equal those with ``net`` itself (float64 1e-10, float32 1e-5); repeated
    calls compile nothing more; the model keeps running compiled on plain calls; the recording
    engines compile nothing at all (they ran compiled around an eager engine before: 1.04-1.14x
    the time of the same call with ``net``)."""
    torch._dynamo.reset()
    d_out, op = METHODS[name]
    net = _mlp(3, d_out).to(dtype)
    x = torch.randn(8, 3, dtype=dtype)
    probes = torchdiv.draw_probes(x, 2, generator=torch.Generator().manual_seed(1))
    backend = CountingAot()
    model = torch.compile(net, backend=backend)
    frames = torch._dynamo.utils.counters["frames"]["total"]
    expected = _loss_and_grads(op, net, net, x, probes)
    got = _loss_and_grads(op, model, net, x, probes)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for value, want in zip(got, expected, strict=True):
        torch.testing.assert_close(value, want, rtol=tol, atol=tol)
    compiled = backend.compiled
    if name in RECORDING:  # Dynamo never saw a frame (a frame that breaks at once compiles none)
        frames = torch._dynamo.utils.counters["frames"]["total"] - frames
        assert compiled == frames == 0, f"{name} was compiled around its eager engine"
    else:
        assert compiled > 0 and backend.runs > 0, f"{name} ran the products eagerly"
    for _ in range(2):
        _loss_and_grads(op, model, net, x, probes)
    assert backend.compiled == compiled, f"{name} recompiled on a repeated call"
    runs = backend.runs
    model(x)
    assert backend.runs == runs + 1, f"{name} left the compiled model running eagerly"
    torch._dynamo.reset()


def _width64(d: int, d_out: int) -> torch.nn.Module:
    """A tanh MLP ``d -> 64 -> 64 -> d_out`` in float64 (``d_out == 1``: a PINN)."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(d, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh()]
    last = [torch.nn.Linear(64, 1), torch.nn.Flatten(0)] if d_out == 1 else [torch.nn.Linear(64, d)]
    return torch.nn.Sequential(*layers, *last).double()


# "auto" with a compiled model as f, work n x B x W (torchdiv._core.crossover) above
# COMPILED_F_WORK and below TRACED_WORK: traced inside a compiled region, recorded here
AUTO_WITH_COMPILED_F = {
    "divergence, MLP 16-64-64-16, B=64 (6.4M)": (16, 16, 64, torchdiv.divergence),
    "laplacian, PINN 8-64-64-1, B=256 (9.8M)": (8, 1, 256, torchdiv.laplacian),
}


@pytest.mark.parametrize("name", list(AUTO_WITH_COMPILED_F))
def test_auto_with_a_compiled_model_records_where_f_works_more(name: str) -> None:
    """Called from eager code with ``torch.compile(net)`` as ``f``, ``"auto"`` runs its
    recording engine eagerly with the original module (no graph runs, nothing compiles)
    where ``f``'s work exceeds ``COMPILED_F_WORK``: no graph break is at stake there, and
    tracing was slower than recording (the MLP's step 1.07-1.12x, the PINN's 1.19-1.27x).
    Values equal those with ``net`` (float64 1e-10)."""
    from torchdiv._core.crossover import COMPILED_F_WORK, TRACED_WORK, work_per_sample

    torch._dynamo.reset()
    d, d_out, batch, op = AUTO_WITH_COMPILED_F[name]
    net, x = _width64(d, d_out), torch.randn(batch, d, dtype=torch.float64)
    assert COMPILED_F_WORK < d * batch * work_per_sample(net, d) <= TRACED_WORK
    backend = CountingAot()
    model = torch.compile(net, backend=backend)
    torch.testing.assert_close(op(model, x), op(net, x), rtol=1e-10, atol=1e-10)
    assert backend.compiled == backend.runs == 0, f"{name}: traced into a compiled call"
    torch._dynamo.reset()


@pytest.mark.parametrize("fn", ["graph_divergence", "graph_jacobian"])
def test_graph_form_of_a_compiled_model_refuses_second_derivatives(fn: str) -> None:
    """AOTAutograd's backward is not differentiable again, and with torchdiv's cotangents
    (which do not require grad) it raised nothing: the graph form's result, with
    ``create_graph=True``, silently had no gradient (a loss ``div**2 + y**2`` trained on the
    second term only). Its values stay right; its backward raises, naming the way out."""
    torch._dynamo.reset()
    net = _mlp(3, 3).double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.compile(net, backend="aot_eager")(x)
    got = getattr(torchdiv, fn)(y, x, create_graph=True)
    want = getattr(torchdiv, fn.removeprefix("graph_"))(net, x.detach())
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match=r"torch\.compile.*function form"):
        (got.square().sum() + y.square().sum()).backward()


def test_a_call_past_the_recompile_limit_runs_eagerly():
    """torchdiv's compiled call is traced with ``fullgraph``, under which Dynamo raises
    ``FailOnRecompileLimitHit`` past its recompile limit, an ``Exception`` but no
    ``TorchDynamoException``: the call crashed (rev-lines16) where the training guide says
    it runs eagerly with the same results (a ninth shape or option set of any public
    function, whose compiled calls share one entry point). Limit lowered to 2 here; values
    and parameter gradients against a per-sample loop of plain autograd, float64."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    net = net.double()
    model = torch.compile(net, backend="aot_eager", dynamic=False)
    params = [net[0].weight, net[0].bias, net[2].weight]
    with torch._dynamo.config.patch(recompile_limit=2):
        for batch in (2, 3, 4, 5):
            x = torch.randn(batch, 3, dtype=torch.float64)
            got = torchdiv.divergence(model, x, method="reverse")
            want = torch.stack([_trace_of_jacobian(net, row) for row in x])
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            grads = torch.autograd.grad(got.square().sum(), params)
            expected = torch.autograd.grad(want.square().sum(), params)
            torch.testing.assert_close(grads, expected, rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()


def _trace_of_jacobian(net: torch.nn.Module, row: torch.Tensor) -> torch.Tensor:
    """``tr J`` of one sample by plain autograd, kept differentiable."""
    z = row.clone().requires_grad_(True)
    y = net(z)
    return sum(torch.autograd.grad(y[k], z, create_graph=True)[0][k] for k in range(len(row)))
