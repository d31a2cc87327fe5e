"""Review of hop32 and compile32's changes to torchdiv's compiled call (rev-compile32).

References: float64 per-sample loops of ``torch.autograd.grad`` on the eager model (each
sample's Jacobian rows with ``create_graph``; parameter gradients of a loss of the result by
one more ``autograd.grad``, grad of grad). Compilations counted by a backend that runs the
captured graph as it is. Found here:

- a call that raised ``f``'s own error while Dynamo traced it (a shape check, an assertion, an
  index out of range at a wrong input) marked the model's operator as one that cannot be
  compiled: every later call of it, at right inputs, ran eagerly for the rest of the process.
- Dynamo's stance is one global that two holders of torchdiv's set ("force_eager" while ``f``
  runs, "eager_on_recompile" for a compiled call under the caller's "fail_on_recompile"), each
  putting back what it had found: calls of two threads that overlapped put the caller's
  "fail_on_recompile" back in the middle of the other's ``f``, then left "eager_on_recompile"
  for good (the caller's guard gone for the rest of the process).
"""

from __future__ import annotations

import threading

import pytest
import torch
from test_compile32 import Counting
from torch.overrides import TorchFunctionMode

import torchdiv

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning")]

f64 = torch.float64
# float64 throughout: the same function by other arithmetic (transforms against autograd
# loops), terms O(1): agreement to ~1e-13; 1e-9 leaves room and still tells a wrong term
TOL = {"rtol": 1e-9, "atol": 1e-10}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test's compilations alone (the classes' code objects are shared by the tests), and
    the process's stance as it was."""
    import torch._dynamo.eval_frame as frames

    stance = frames._stance
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    frames._stance = stance


class Checked(torch.nn.Module):
    """A tanh layer whose forward checks its input's width (``check``: how)."""

    def __init__(self, check: str) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3, dtype=f64)
        self.check = check

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.check == "assert":
            assert x.shape[-1] == 3, "x must have 3 features"
        elif self.check == "raise" and x.shape[-1] != 3:
            raise ValueError("x must have 3 features")
        elif self.check == "index":
            x = x + 0 * x[..., 2 + 5 * (x.shape[-1] != 3), None]  # (index 7 of 4 at width 4)
        return torch.tanh(self.lin(x))


def _caller_state(net: torch.nn.Module, x: torch.Tensor) -> tuple[object, ...]:
    """What a call must leave as it found it: ``x``'s flag and gradient, the parameters'
    gradients, the train flag, Dynamo's config and grad modes."""
    grads = tuple(p.grad for p in net.parameters())
    config = torch._dynamo.config.get_config_copy()
    return x.requires_grad, x.grad, grads, net.training, config, torch.is_grad_enabled()


def _divergence_loop(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Each sample's divergence, alone, from its Jacobian rows (``create_graph``)."""
    out = []
    for b in range(len(x)):
        leaf = x[b : b + 1].detach().requires_grad_(True)
        y = net(leaf).reshape(-1)
        rows = [torch.autograd.grad(y[i], leaf, create_graph=True)[0][0, i] for i in range(3)]
        out.append(torch.stack(rows).sum())
    return torch.stack(out)


def _assert_divergence(net: torch.nn.Module, x: torch.Tensor, value: torch.Tensor) -> None:
    """``value`` and the parameter gradients of a loss of it as the loop's (grad of grad)."""
    expected = _divergence_loop(net, x)
    torch.testing.assert_close(value, expected, **TOL)
    params = list(net.parameters())
    got = torch.autograd.grad((value**2 + value.sin()).sum(), params)
    want = torch.autograd.grad((expected**2 + expected.sin()).sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize(
    ("check", "method"), [("assert", "reverse"), ("raise", "forward"), ("index", "reverse")]
)
def test_f_s_error_at_a_wrong_input_leaves_later_calls_compiled(check: str, method: str) -> None:
    """Fails without the fix (``backend.runs`` unchanged: the right call ran eagerly): one call
    at a wrong input (f's own error, raised while Dynamo traced it: an ``AssertionError``, a
    ``ValueError`` by Dynamo's ``Unsupported``, an ``IndexError``) marked the operator of the
    model as failed to compile, and every later call at right inputs ran eagerly. The error is
    f's, named as in an eager call; the right call compiles, runs its graph, and is right."""
    torch.manual_seed(0)
    net = Checked(check)
    backend = Counting()
    model = torch.compile(net, backend=backend)
    with pytest.raises((AssertionError, ValueError, IndexError), match="divergence: f"):
        torchdiv.divergence(model, torch.randn(2, 4, dtype=f64), method=method)
    x = torch.randn(2, 3, dtype=f64)
    runs = backend.runs
    value = torchdiv.divergence(model, x, method=method)
    assert backend.runs == runs + 1  # its compiled call
    _assert_divergence(net, x, value)


class _Waits(torch.nn.Module):
    """A tanh layer whose forward, run eagerly, sets ``mine`` then waits for ``other``
    (each forward of a call after the first passes at once), noting Dynamo's stance after
    the wait in ``stances``. ``graph_break``: Dynamo cannot trace it whole (fullgraph)."""

    def __init__(self, mine: threading.Event, other: threading.Event, graph_break: bool) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3, dtype=f64)
        self.mine, self.other, self.graph_break = mine, other, graph_break
        self.stances: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._dynamo.eval_frame as frames

        if self.graph_break:
            torch._dynamo.graph_break()
        self.mine.set()
        assert self.other.wait(60)
        self.stances.append(frames._stance.stance)
        return torch.tanh(self.lin(x))


def test_overlapping_calls_of_two_threads_put_the_caller_s_stance_back() -> None:
    """Fails without the fix (the stance left "eager_on_recompile"; "fail_on_recompile" inside
    the other thread's ``f``): thread A's call of a compiled model under the caller's
    "fail_on_recompile" (torchdiv's "eager_on_recompile" meanwhile; its call falls back to an
    eager one: ``f`` breaks the graph) and thread B's call of an eager model overlap, A's
    ending first. B's ``f`` ran under "fail_on_recompile" once A had put it back, and B then
    put back "eager_on_recompile", which it had found, for good. Now B's ``f`` runs under
    "force_eager" throughout, the caller's stance is put back by the last call to end, and
    both values and parameter gradients are the loop's."""
    import torch._dynamo.eval_frame as frames

    torch.manual_seed(0)
    a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()
    net_a = _Waits(a_inside, b_inside, graph_break=True)
    net_b = _Waits(b_inside, a_done, graph_break=False)
    model_a = torch.compile(net_a, backend=Counting())
    x = torch.randn(2, 3, dtype=f64)
    values: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []

    def run(name: str, model: torch.nn.Module) -> None:
        try:
            values[name] = torchdiv.divergence(model, x, method="reverse")
        except BaseException as error:  # (reported below)
            errors.append(error)
            a_inside.set(), b_inside.set(), a_done.set()

    torch.compiler.set_stance("fail_on_recompile")
    try:
        thread_a = threading.Thread(target=run, args=("a", model_a))
        thread_b = threading.Thread(target=run, args=("b", net_b))
        thread_a.start()
        assert a_inside.wait(60)
        thread_b.start()
        thread_a.join(60)
        a_done.set()
        thread_b.join(60)
        stance = frames._stance.stance
    finally:
        torch.compiler.set_stance("default")
    assert not errors, errors
    assert set(net_b.stances) == {"force_eager"}
    assert stance == "fail_on_recompile"
    a_done.set()  # (the loops' forwards pass at once)
    _assert_divergence(net_a, x, values["a"])
    _assert_divergence(net_b, x, values["b"])


def test_fail_on_recompile_kept_through_an_error_a_nested_call_and_a_decorator() -> None:
    """Under the caller's "fail_on_recompile" (a warmed-up model): a call that raises f's own
    error, a torchdiv call inside the ``f`` of another (``f(x) = tanh(x) * div(model)(x)``)
    and a step decorated by ``set_stance`` leave the caller's stance object itself in place
    inside and "default" after; nothing new compiled; the nested divergence's values and
    parameter gradients as a per-sample loop's (the inner divergence by its Jacobian rows with
    ``create_graph``, the outer by grad of that)."""
    import torch._dynamo.eval_frame as frames

    torch.manual_seed(0)
    net = Checked("assert")
    backend = Counting()
    model = torch.compile(net, backend=backend)
    x = torch.randn(2, 3, dtype=f64)
    torchdiv.divergence(model, x, method="reverse")  # (warmed up)
    compiles = backend.compiles

    def outer(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z) * torchdiv.divergence(model, z, method="reverse")[:, None]

    with torch.compiler.set_stance("fail_on_recompile"):
        caller = frames._stance
        with pytest.raises(AssertionError, match="divergence: f"):
            torchdiv.divergence(model, torch.randn(2, 4, dtype=f64), method="reverse")
        assert frames._stance is caller
        value = torchdiv.divergence(outer, x, method="reverse")
        assert frames._stance is caller

    @torch.compiler.set_stance("fail_on_recompile")
    def step(z: torch.Tensor) -> torch.Tensor:
        return torchdiv.divergence(model, z, method="reverse")

    step(torch.randn(5, 3, dtype=f64))  # (a new size: eagerly, nothing compiled)
    assert frames._stance.stance == "default" and backend.compiles == compiles

    expected = []
    for b in range(len(x)):
        leaf = x[b : b + 1].detach().requires_grad_(True)
        y = outer_reference(net, leaf).reshape(-1)
        rows = [torch.autograd.grad(y[i], leaf, create_graph=True)[0][0, i] for i in range(3)]
        expected.append(torch.stack(rows).sum())
    reference = torch.stack(expected)
    torch.testing.assert_close(value, reference, **TOL)
    params = list(net.parameters())
    got = torch.autograd.grad((value**2 + value.sin()).sum(), params)
    want = torch.autograd.grad((reference**2 + reference.sin()).sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)


def outer_reference(net: torch.nn.Module, leaf: torch.Tensor) -> torch.Tensor:
    """``tanh(z) * div(net)(z)`` of one sample ``leaf``, the divergence from its Jacobian rows
    (``create_graph``: a function of ``leaf``)."""
    y = net(leaf).reshape(-1)
    rows = [torch.autograd.grad(y[i], leaf, create_graph=True)[0][0, i] for i in range(3)]
    return torch.tanh(leaf) * torch.stack(rows).sum()


@pytest.mark.parametrize("stance", ["eager_then_compile", "aot_eager_then_compile"])
def test_a_then_compile_stance_compiles_torchdiv_s_call_whole(stance: str) -> None:
    """Fails without the fix for "eager_then_compile" (Dynamo's "AssertionError: Guard failed
    on the same frame it was created", PyTorch's internal error, at the first call): under
    that stance Dynamo runs a frame's first call eagerly with its callback still on, and
    compiles each frame called inside it at its second call: torchdiv's own helpers (the
    walk of ``f``'s objects, whose guard on ``weakref.finalize``'s registry failed as it ran)
    and ``f`` under the engines' transforms. torchdiv's compiled call is compiled whole
    (fullgraph) as under "default" now; the caller's stance meanwhile for its own calls. Three
    calls right (values and parameter gradients); the stance the caller's object inside."""
    import torch._dynamo.eval_frame as frames

    torch.manual_seed(0)
    net = Checked("none")
    backend = Counting()
    model = torch.compile(net, backend=backend)
    x = torch.randn(2, 3, dtype=f64)
    state = _caller_state(net, x)
    with torch.compiler.set_stance(stance):
        caller = frames._stance
        values = [torchdiv.divergence(model, x, method="reverse") for _ in range(3)]
        assert frames._stance is caller and _caller_state(net, x) == state
        torch.testing.assert_close(model(x), net(x), **TOL)
    for value in values:
        _assert_divergence(net, x, value)


class Gathers(torch.nn.Module):
    """A tanh layer whose outputs are gathered by a buffer of indices (``idx``): an index out
    of range raises as the compiled graph runs, not while Dynamo traces."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3, dtype=f64)
        self.register_buffer("idx", torch.arange(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))[..., self.idx]


@pytest.mark.parametrize("method", ["reverse", "forward"])
def test_an_error_as_the_compiled_call_runs_leaves_the_process_as_it_was(method: str) -> None:
    """Fails without the fix: f's error raised as torchdiv's compiled call ran (an index out
    of range, a buffer's) left what the graph had entered: ``method="reverse"`` left
    ``torch.func``'s ban on saved-tensor hooks on (every later backward pass through a
    checkpoint raised) and the math attention backend alone; ``"forward"`` left a forward-AD
    level open (every later ``torch.func.jvp`` and ``fwAD.dual_level()`` of the process raised
    "Nested forward mode AD is not supported"). Now the error is raised with all of it put
    back, and the next call (the buffer mended) is right."""
    from torch._C._autograd import _saved_tensors_hooks_get_disabled_error_message as ban
    from torch.nn.attention import _cur_sdpa_kernel_backends

    torch.manual_seed(0)
    net = Gathers()
    model = torch.compile(net, backend=Counting())
    x = torch.randn(2, 3, dtype=f64)
    _assert_divergence(net, x, torchdiv.divergence(model, x, method=method))
    backends = _cur_sdpa_kernel_backends()
    net.idx[2] = 7
    state = _caller_state(net, x)
    with pytest.raises(IndexError, match="index 7 is out of bounds"):
        torchdiv.divergence(model, x, method=method)
    assert ban() is None and _cur_sdpa_kernel_backends() == backends
    assert _caller_state(net, x) == state
    one = torch.ones(2, dtype=f64)
    torch.testing.assert_close(torch.func.jvp(torch.sin, (one,), (one,))[1], one.cos())
    with torch.autograd.forward_ad.dual_level():
        pass
    net.idx[2] = 2
    _assert_divergence(net, x, torchdiv.divergence(model, x, method=method))


class _Interrupts(TorchFunctionMode):
    """Raises ``KeyboardInterrupt`` at ``torch.tanh`` while ``armed`` (a Ctrl-C mid-graph)."""

    armed = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if self.armed and func is torch.tanh:
            raise KeyboardInterrupt
        return func(*args, **(kwargs or {}))


def _interrupting(gm: torch.fx.GraphModule, example: list[torch.Tensor]):
    """A backend running the captured graph under ``_Interrupts``."""

    def run(*args: torch.Tensor):
        with _Interrupts():
            return gm.forward(*args)

    return run


@pytest.mark.parametrize("method", ["reverse", "forward"])
def test_an_interrupt_as_the_compiled_call_runs_leaves_the_process_as_it_was(method: str) -> None:
    """Fails without the fix: a ``KeyboardInterrupt`` (no ``Exception``) as the compiled
    graph ran left ``torch.func``'s ban, the math attention backend alone, or a forward-AD
    level open, as an error did (the test above). Now they are put back; the next call right."""
    from torch._C._autograd import _saved_tensors_hooks_get_disabled_error_message as ban
    from torch.nn.attention import _cur_sdpa_kernel_backends

    torch.manual_seed(0)
    net = Checked("none")
    model = torch.compile(net, backend=_interrupting)
    x = torch.randn(2, 3, dtype=f64)
    _assert_divergence(net, x, torchdiv.divergence(model, x, method=method))
    backends = _cur_sdpa_kernel_backends()
    _Interrupts.armed = True
    try:
        with pytest.raises(KeyboardInterrupt):
            torchdiv.divergence(model, x, method=method)
    finally:
        _Interrupts.armed = False
    assert ban() is None and _cur_sdpa_kernel_backends() == backends
    one = torch.ones(2, dtype=f64)
    torch.testing.assert_close(torch.func.jvp(torch.sin, (one,), (one,))[1], one.cos())
    _assert_divergence(net, x, torchdiv.divergence(model, x, method=method))
