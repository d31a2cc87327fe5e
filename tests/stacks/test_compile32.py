"""Newer ways of compiling models in training stacks, meeting torchdiv (compile32).

Checked here (values and the parameter gradients of a loss of the result against float64
per-sample loops of ``torch.autograd.grad`` on the eager model; grad of grad for the
parameter gradients): regional compilation (``blk.compile()`` for each block, in place: a
compiled block inside an eager model) and a model compiled in place (``net.compile()``)
passed as ``f``, which stay compiled after the call; ``torch.compiler.set_stance`` around the
call. Found here:

- an AOTInductor model (``torch._inductor.aoti_load_package``'s ``AOTICompiledModel``) runs
  without autograd: every method returned zeros for its divergence, diagonal, Laplacian and
  estimate, silently. Refused now, naming it (``script.scripted``'s walk finds it in ``f``).
- every ``torch.compile``d ``f`` had torchdiv compile its call by one function's code (the
  decorator's ``wrapper``), shared by every operator: Dynamo counts recompilations per code
  object, so a first ``laplacian`` after a ``divergence`` of the same compiled model was a
  "recompile" (``set_stance("fail_on_recompile")`` raised on it, naming torchdiv's
  ``wrapper``) and all the operators' calls shared one recompile limit (8). Each compiled
  operator has a code object of its own now.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

import torchdiv

try:
    from torch.export.pt2_archive._package import AOTICompiledModel
except ImportError:  # (before PyTorch 2.8: torch._inductor.package's)
    from torch._inductor.package.package import AOTICompiledModel  # type: ignore[no-redef]

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    # Dynamo reads .grad of a compiled block's input, a non-leaf (regional compilation)
    pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not"),
]

f64 = torch.float64
# float64 throughout: the same function by other arithmetic (transforms against autograd
# loops), terms O(1): agreement to ~1e-13; 1e-9 leaves room and still tells a wrong term
TOL = {"rtol": 1e-9, "atol": 1e-10}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test's compilations alone: the classes' code objects are shared by the tests, and
    Dynamo's recompile limit counts their compilations for every backend object."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Block(torch.nn.Module):
    def __init__(self, d: int = 3, h: int = 6) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(d, h), torch.nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(torch.tanh(self.a(x)))


class Net(torch.nn.Module):
    """Two residual tanh blocks and a linear head (``out`` outputs): a tiny transformer-like
    stack, compiled block by block in regional compilation."""

    def __init__(self, out: int = 3) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.head = torch.nn.Linear(3, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def jacobians(f, x: torch.Tensor) -> torch.Tensor:
    """Each sample's Jacobian ``(B, n, n)``, alone, row by row (``create_graph``)."""
    out = []
    for b in range(len(x)):
        leaf = x[b : b + 1].detach().requires_grad_(True)
        y = f(leaf).reshape(-1)
        rows = [
            torch.autograd.grad(y[i], leaf, create_graph=True)[0].reshape(-1) for i in range(len(y))
        ]
        out.append(torch.stack(rows))
    return torch.stack(out)


def laplacians(f, x: torch.Tensor) -> torch.Tensor:
    """Each sample's Laplacian of the scalar ``f``, alone, by grad of grad (``create_graph``)."""
    out = []
    for b in range(len(x)):
        leaf = x[b : b + 1].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(f(leaf).sum(), leaf, create_graph=True)
        g = g.reshape(-1)
        out.append(
            sum(
                torch.autograd.grad(g[i], leaf, create_graph=True)[0].reshape(-1)[i]
                for i in range(len(g))
            )
        )
    return torch.stack(out)


class _Loaded(AOTICompiledModel):
    """An AOTInductor model as ``aoti_load_package`` returns one, its kernels stood in for by
    the eager module run without autograd (what the C++ runner does): no compiler needed."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.net(x.detach())


class _Holder(torch.nn.Module):
    def __init__(self, runner: object) -> None:
        super().__init__()
        self.runner = runner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner(x)


_CALLS = {
    "divergence": lambda f, x: torchdiv.divergence(f, x),
    "divergence-forward": lambda f, x: torchdiv.divergence(f, x, method="forward"),
    "divergence-structured": lambda f, x: torchdiv.divergence(f, x, method="structured"),
    "jacobian_diagonal": lambda f, x: torchdiv.jacobian_diagonal(f, x),
    "laplacian": lambda f, x: torchdiv.laplacian(lambda z: f(z)[:, :1], x),
    "estimate": lambda f, x: (
        torchdiv.estimate_divergence(f, x, probes=torchdiv.draw_probes(x, 2)).value
    ),
}


def _forms(runner: object) -> dict[str, object]:
    return {"itself": runner, "closure": lambda z: runner(z), "attribute": _Holder(runner)}


@pytest.mark.parametrize("form", ["itself", "closure", "attribute"])
@pytest.mark.parametrize("call", sorted(_CALLS))
def test_an_aotinductor_model_is_refused_naming_it(call: str, form: str) -> None:
    """Fails without the fix: zeros (every method), silently. An AOTInductor model carries
    no autograd, so its derivatives cannot be taken: refused, naming it and the way out."""
    torch.manual_seed(0)
    f = _forms(_Loaded(Net().double()))[form]
    x = torch.randn(4, 3, dtype=f64)
    with pytest.raises(TypeError, match=r"AOTInductor.*eager module"):
        _CALLS[call](f, x)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler"
)
def test_a_real_aotinductor_package_is_refused(tmp_path) -> None:
    """``torch.export`` -> ``aoti_compile_and_package`` -> ``aoti_load_package`` (about 40 s of
    C++ compilation): before the fix its divergence, diagonal, Laplacian and estimate were
    zeros (and PyTorch's C++ printed an error for the reverse and forward engines)."""
    torch.manual_seed(0)
    net = Net().double()
    x = torch.randn(4, 3, dtype=f64)
    program = torch.export.export(net, (x,))
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "m.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    torch.testing.assert_close(runner(x), net(x).detach())  # (it runs: only autograd is missing)
    for form, f in _forms(runner).items():
        for name, call in _CALLS.items():
            with pytest.raises(TypeError, match="AOTInductor"):
                call(f, x)
                pytest.fail(f"{name} of the {form} form did not raise")


class Counting:
    """A Dynamo backend that runs the captured graph as it is (no compiler: fast) and counts
    compilations and runs of compiled graphs."""

    def __init__(self) -> None:
        self.compiles = 0
        self.runs = 0

    def __call__(self, gm: torch.fx.GraphModule, example: list[torch.Tensor]):
        self.compiles += 1

        def run(*args: torch.Tensor):
            self.runs += 1
            return gm.forward(*args)

        return run


def _compiled(net: torch.nn.Module, how: str, backend: Counting) -> torch.nn.Module:
    """``net`` compiled ``"regional"``ly (each block in place: ``blk.compile()``), ``"in
    place"`` (``net.compile()``, which sets ``_compiled_call_impl``) or ``"wrapped"``
    (``torch.compile(net)``, an ``OptimizedModule``)."""
    if how == "regional":
        for block in net.blocks:
            block.compile(backend=backend)
        return net
    if how == "in place":
        net.compile(backend=backend)
        return net
    return torch.compile(net, backend=backend)


def _values(model, lap_model, x, probes, method):
    """The four operators' values by ``method`` (the Laplacian of the first output by
    ``"auto"`` where ``method`` is no Laplacian's), and a loss of them."""
    lap_method = method if method in ("auto", "forward-over-reverse") else "auto"
    values = {
        "divergence": torchdiv.divergence(model, x, method=method),
        "diagonal": torchdiv.jacobian_diagonal(model, x, method=method),
        "estimate": torchdiv.estimate_divergence(model, x, probes=probes).value,
        "laplacian": torchdiv.laplacian(lap_model, x, method=lap_method).reshape(-1),
    }
    return values


def _references(net, lap_net, x, probes):
    jac = jacobians(net, x)
    diagonal = jac.diagonal(dim1=1, dim2=2)
    return {
        "divergence": diagonal.sum(1),
        "diagonal": diagonal,
        "estimate": torch.einsum("kbi,bij,kbj->b", probes, jac, probes) / len(probes),
        "laplacian": laplacians(lap_net, x),
    }


def _loss(values: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(v.square().sum() + v.sin().sum() for v in values.values())


def _assert_gradients(model_params, ours, eager_params, reference) -> None:
    got = torch.autograd.grad(ours, model_params, allow_unused=True)
    want = torch.autograd.grad(reference, eager_params, allow_unused=True)
    for a, b, p in zip(got, want, eager_params, strict=True):
        zero = torch.zeros_like(p)
        torch.testing.assert_close(zero if a is None else a, zero if b is None else b, **TOL)


@pytest.mark.parametrize("how", ["regional", "in place"])
@pytest.mark.parametrize("method", ["auto", "forward", "structured"])
def test_regional_and_in_place_compilation(how: str, method: str) -> None:
    """Values and parameter gradients (grad of grad) as the eager model's per-sample loops;
    the model still runs compiled after the calls (its graphs run, none compiled again)."""
    torch.manual_seed(0)
    backend = Counting()
    net, lap_net = Net().double(), Net(out=1).double()
    eager, lap_eager = copy.deepcopy(net), copy.deepcopy(lap_net)
    model, lap_model = _compiled(net, how, backend), _compiled(lap_net, how, backend)
    x = torch.randn(4, 3, dtype=f64)
    model(x), lap_model(x)
    probes = torchdiv.draw_probes(x, 3)
    config = torch._dynamo.config.get_config_copy()
    values = _values(model, lap_model, x, probes, method)
    # the caller's state as it was: x, .grad, train flags, Dynamo's config
    assert not x.requires_grad and all(p.grad is None for p in net.parameters())
    assert net.training and all(m.training for m in net.modules())
    assert torch._dynamo.config.get_config_copy() == config
    want = _references(eager, lap_eager, x, probes)
    for name in values:
        torch.testing.assert_close(values[name], want[name], **TOL)
    params = [*net.parameters(), *lap_net.parameters()]
    eager_params = [*eager.parameters(), *lap_eager.parameters()]
    _assert_gradients(params, _loss(values), eager_params, _loss(want))
    compiles, runs = backend.compiles, backend.runs
    model(x)
    assert backend.runs > runs and backend.compiles == compiles  # still compiled, no recompile
    if how != "wrapped":  # (in place: the module's own compiled call is kept)
        assert all(
            m._compiled_call_impl is not None for m in (net.blocks if how == "regional" else [net])
        )


def _warmed(backend: Counting):
    torch.manual_seed(0)
    net = Net().double()
    eager = copy.deepcopy(net)
    model = torch.compile(net, backend=backend)
    x = torch.randn(4, 3, dtype=f64)
    model(x)
    torchdiv.divergence(model, x)  # (warmed up: its own call compiled)
    return net, eager, model, x


def _assert_diagonal(net, eager, x, diagonal) -> None:
    want = jacobians(eager, x).diagonal(dim1=1, dim2=2)
    torch.testing.assert_close(diagonal, want, **TOL)
    _assert_gradients(
        list(net.parameters()), _loss({"d": diagonal}), list(eager.parameters()), _loss({"d": want})
    )


@pytest.mark.slow
def test_each_operator_compiles_its_own_call() -> None:
    """Fails without the fix: torchdiv's compiled calls of every operator were one code
    object's compilations, so the first ``jacobian_diagonal`` of a compiled model after its
    ``divergence`` was a recompilation: past a recompile limit of 1 it ran eagerly (Dynamo
    counts per code object; at the default 8, the operators, grad modes and batch sizes of a
    process shared 8). Now its own first compilation; values and parameter gradients as the
    eager model's loop; the model still compiled."""
    backend = Counting()
    net, eager, model, x = _warmed(backend)
    compiles = backend.compiles
    with torch._dynamo.config.patch(recompile_limit=1):
        diagonal = torchdiv.jacobian_diagonal(model, x)
    assert backend.compiles == compiles + 1  # (compiled, not run eagerly)
    _assert_diagonal(net, eager, x, diagonal)
    runs = backend.runs
    model(x)
    assert backend.runs == runs + 1 and backend.compiles == compiles + 1


def test_fail_on_recompile_compiles_nothing_new_and_does_not_raise() -> None:
    """Fails without the fix: under ``set_stance("fail_on_recompile")`` (a warmed-up training
    loop's guard), torchdiv's first compiled call of an operator raised "Detected recompile",
    naming torchdiv's ``wrapper``, where the caller's model compiled nothing new. Now it runs
    eagerly (nothing compiled), the warmed-up operator from its graph; values and parameter
    gradients as the eager model's loop; the caller's stance as it was, inside and after."""
    import torch._dynamo.eval_frame as frames

    backend = Counting()
    net, eager, model, x = _warmed(backend)
    compiles, runs = backend.compiles, backend.runs
    with torch.compiler.set_stance("fail_on_recompile"):
        divergence = torchdiv.divergence(model, x)
        assert backend.runs > runs  # (its compiled call, warmed up)
        diagonal = torchdiv.jacobian_diagonal(model, x)
        assert frames._stance.stance == "fail_on_recompile"
        with pytest.raises(RuntimeError, match="fail_on_recompile"):  # (the caller's own)
            model(torch.randn(5, 2, 3, dtype=f64))
    assert backend.compiles == compiles and frames._stance.stance == "default"
    torch.testing.assert_close(
        divergence, jacobians(eager, x).diagonal(dim1=1, dim2=2).sum(1), **TOL
    )
    _assert_diagonal(net, eager, x, diagonal)


@pytest.mark.slow
@pytest.mark.parametrize("stance", ["force_eager", "eager_on_recompile"])
def test_a_stance_around_the_call(stance: str) -> None:
    """torchdiv calls ``f`` at new batch sizes and grad modes (a recompilation where the
    model is compiled): under the caller's stance, right values and parameter gradients at a
    new size, under ``no_grad`` too; nothing compiled; the stance as it was."""
    import torch._dynamo.eval_frame as frames

    backend = Counting()
    net, eager, model, _ = _warmed(backend)
    compiles = backend.compiles
    x6 = torch.randn(6, 3, dtype=f64)
    with torch.compiler.set_stance(stance):
        diagonal = torchdiv.jacobian_diagonal(model, x6)
        with torch.no_grad():
            frozen = torchdiv.divergence(model, x6)
        assert frames._stance.stance == stance
    assert backend.compiles == compiles and frames._stance.stance == "default"
    _assert_diagonal(net, eager, x6, diagonal)
    torch.testing.assert_close(frozen, diagonal.detach().sum(1), **TOL)


class _Disabled(Block):
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


@pytest.mark.parametrize("how", ["regional", "in place"])
def test_a_disabled_submodule_in_a_compiled_model(how: str) -> None:
    """A ``torch.compiler.disable``d block inside a model compiled in place or regionally:
    values and parameter gradients as the eager model's loops."""
    torch.manual_seed(0)
    backend = Counting()
    net, lap_net = Net().double(), Net(out=1).double()
    for m in (net, lap_net):
        m.blocks[1] = _Disabled().double()
    eager, lap_eager = copy.deepcopy(net), copy.deepcopy(lap_net)
    model, lap_model = _compiled(net, how, backend), _compiled(lap_net, how, backend)
    x = torch.randn(4, 3, dtype=f64)
    model(x), lap_model(x)
    probes = torchdiv.draw_probes(x, 3)
    values = _values(model, lap_model, x, probes, "auto")
    want = _references(eager, lap_eager, x, probes)
    for name in values:
        torch.testing.assert_close(values[name], want[name], **TOL)
    params = [*net.parameters(), *lap_net.parameters()]
    _assert_gradients(
        params, _loss(values), [*eager.parameters(), *lap_eager.parameters()], _loss(want)
    )


@pytest.mark.slow
@pytest.mark.parametrize("estimate", [False, True], ids=["divergence", "estimate"])
def test_a_cnf_solve_with_dynamic_compiled_dynamics(estimate: bool) -> None:
    """torchdiffeq's ``odeint`` (RK4, 4 steps) of a CNF whose dynamics are compiled with
    ``dynamic=True`` (the batch fixed, ``t`` moving; the estimator's probes drawn once): the
    log-density change and the parameter gradients of a loss of the solve as the same solve
    whose divergence is a per-sample loop of ``torch.autograd.grad`` on the eager dynamics;
    at most two graphs (a ``t`` of each type)."""
    odeint = pytest.importorskip("torchdiffeq").odeint
    torch.manual_seed(0)

    class Dynamics(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)

        def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return self.b(torch.tanh(self.a(torch.cat([z, t.expand(len(z), 1)], 1))))

    backend = Counting()
    net = Dynamics().double()
    eager = copy.deepcopy(net)
    model = torch.compile(net, backend=backend, dynamic=True)
    z0 = torch.randn(4, 3, dtype=f64)
    probes = torchdiv.draw_probes(z0, 2)

    def solve(vf, trace):
        def rhs(t, state):
            z = state[0]
            return vf(t, z), -trace(lambda zz: vf(t, zz), z)

        times = torch.tensor([0.0, 1.0], dtype=f64)
        start = (z0, torch.zeros(4, dtype=f64))
        zs, logs = odeint(rhs, start, times, method="rk4", options={"step_size": 0.25})
        return zs[-1], logs[-1]

    def ours(f, z):
        if estimate:
            return torchdiv.estimate_divergence(f, z, probes=probes).value
        return torchdiv.divergence(f, z)

    def loop(f, z):  # (z is the solver's state: each sample's rows through its graph)
        rows = []
        for b in range(len(z)):
            zb = z[b : b + 1] if z.requires_grad else z[b : b + 1].detach().requires_grad_(True)
            y = f(zb).reshape(-1)
            rows.append(
                torch.stack(
                    [
                        torch.autograd.grad(y[i], zb, create_graph=True)[0].reshape(-1)
                        for i in range(3)
                    ]
                )
            )
        jac = torch.stack(rows)
        if estimate:
            return torch.einsum("kbi,bij,kbj->b", probes, jac, probes) / len(probes)
        return jac.diagonal(dim1=1, dim2=2).sum(1)

    z1, log1 = solve(model, ours)
    z2, log2 = solve(eager, loop)
    torch.testing.assert_close(log1, log2, **TOL)
    torch.testing.assert_close(z1, z2, **TOL)
    _assert_gradients(
        list(net.parameters()),
        log1.square().sum() + z1.square().sum(),
        list(eager.parameters()),
        log2.square().sum() + z2.square().sum(),
    )
    assert backend.compiles <= 2


@pytest.mark.slow
def test_a_compiled_training_step_calling_torchdiv() -> None:
    """``torch.compile(training_step)`` (``fullgraph=False``) around a step whose loss holds a
    divergence and a Laplacian of a model compiled in place, ``backward()`` in the step: the
    parameters' ``.grad`` as the eager model's loops (grad of grad), two steps; the only
    graph break is PyTorch's at ``backward()``."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    backend = Counting()
    net, lap_net = Net().double(), Net(out=1).double()
    eager, lap_eager = copy.deepcopy(net), copy.deepcopy(lap_net)
    net.compile(backend=backend)
    params = [*net.parameters(), *lap_net.parameters()]
    x = torch.randn(4, 3, dtype=f64)

    def step(x: torch.Tensor) -> torch.Tensor:
        values = {
            "divergence": torchdiv.divergence(net, x),
            "laplacian": torchdiv.laplacian(lap_net, x).reshape(-1),
        }
        loss = _loss(values)
        loss.backward()
        return loss.detach()

    compiled = torch.compile(step, backend=backend)
    counters.clear()
    want = {
        "divergence": jacobians(eager, x).diagonal(dim1=1, dim2=2).sum(1),
        "laplacian": laplacians(lap_eager, x),
    }
    expected = torch.autograd.grad(
        _loss(want), [*eager.parameters(), *lap_eager.parameters()], allow_unused=True
    )
    for _ in range(2):
        for p in params:
            p.grad = None
        torch.testing.assert_close(compiled(x), _loss(want).detach(), **TOL)
        for p, e in zip(params, expected, strict=True):
            torch.testing.assert_close(
                p.grad if p.grad is not None else torch.zeros_like(p),
                torch.zeros_like(p) if e is None else e,
                **TOL,
            )
    assert sum(counters["graph_break"].values()) <= 1, dict(counters["graph_break"])
