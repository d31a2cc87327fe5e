"""A ``torch.jit.script`` module as ``f``: TorchScript's profiling executor runs the second
call on through an optimized graph that carries no forward-mode tangents, functorch levels or
dispatch-mode recording (every engine then saw a constant: zeros, parameter gradients gone).
torchdiv runs TorchScript code unoptimized during its calls (``CompiledCodeEager``).
References: per-sample ``autograd.grad`` loops on the eager module (conftest)."""

from __future__ import annotations

import pytest
import torch

import torchdiv
from tests.conftest import assert_close, laplacian_by_grad_of_grad, loop_diagonal

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's own


def _scripted(d_out: int, how: str = "script") -> tuple[torch.nn.Module, torch.nn.Module]:
    """An eager MLP and its ``torch.jit.script`` or ``torch.jit.trace`` (a traced module's
    ``__dict__`` holds neither ``_parameters`` nor ``_modules``: the structure key of a tiny
    call raised ``KeyError: '_parameters'``)."""
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, d_out)
    ).double()
    if how == "trace":
        return net, torch.jit.trace(net, torch.randn(4, 3, dtype=torch.float64))
    return net, torch.jit.script(net)


def _grads(result: torch.Tensor, module: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """The parameter gradients of ``result.sum()`` (the last bias, unused by a divergence: 0)."""
    params = list(module.parameters())
    return torch.autograd.grad(result.sum(), params, allow_unused=True, materialize_grads=True)


def _checked(result: torch.Tensor, want: torch.Tensor, scripted, expected) -> None:
    """Values and parameter gradients equal the eager module's."""
    assert_close(result, want)
    for a, b in zip(_grads(result, scripted), expected, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("method", ["auto", "structured", "forward", "reverse"])
def test_divergence_of_a_scripted_module(method: str, how: str) -> None:
    net, scripted = _scripted(3, how)
    x = torch.randn(4, 3, dtype=torch.float64)
    want = loop_diagonal(net, x, create_graph=True).sum(-1)
    expected = _grads(want, net)
    scripted(x), scripted(x)  # the executor's profiled runs, outside torchdiv
    for _ in range(3):
        _checked(torchdiv.divergence(scripted, x, method=method), want.detach(), scripted, expected)


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("method", ["auto", "taylor", "forward-over-reverse", "grad-of-grad"])
def test_laplacian_of_a_scripted_module(method: str, how: str) -> None:
    net, scripted = _scripted(1, how)
    x = torch.randn(4, 3, dtype=torch.float64)
    want = laplacian_by_grad_of_grad(lambda z: net(z)[:, 0], x)
    expected = _grads(want, net)
    scripted(x), scripted(x)
    for _ in range(3):
        got = torchdiv.laplacian(lambda z: scripted(z)[:, 0], x, method=method)
        _checked(got, want.detach(), scripted, expected)


class _Velocity(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(3, 8), torch.nn.Linear(8, 2)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(torch.cat([z, t.expand(z.shape[0], 1)], -1))))


def test_scripted_submodule_and_flow() -> None:
    """A scripted submodule inside an eager module, and a scripted velocity field integrated
    by ``flows.log_likelihood``, after the executor optimized its plans: as the eager ones."""
    net, scripted = _scripted(3)
    outer = torch.nn.Sequential(scripted, torch.nn.Tanh())
    x = torch.randn(4, 3, dtype=torch.float64)
    outer(x), outer(x)
    want = loop_diagonal(torch.nn.Sequential(net, torch.nn.Tanh()), x).sum(-1)
    assert_close(torchdiv.divergence(outer, x, method="forward"), want)
    eager = _Velocity().double()
    velocity = torch.jit.script(_Velocity().double())
    velocity.load_state_dict(eager.state_dict())
    z, t = torch.randn(3, 2, dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    velocity(t, z), velocity(t, z)
    base = lambda z: -0.5 * (z * z).sum(-1)  # noqa: E731
    options = {"solver": "rk4", "options": {"step_size": 0.25}}
    got = torchdiv.flows.log_likelihood(velocity, z, 0.0, 1.0, base, **options)
    assert_close(got, torchdiv.flows.log_likelihood(eager, z, 0.0, 1.0, base, **options))


@torch.jit.script
def _swish(h: torch.Tensor) -> torch.Tensor:
    return h * torch.sigmoid(h)


class _SwishNet(torch.nn.Module):
    """An eager module whose forward calls a scripted activation (a global function)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(3, 8), torch.nn.Linear(8, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.l2(_swish(self.l1(z)))


@pytest.mark.parametrize("method", ["structured", "taylor"])
def test_scripted_helper_in_an_eager_forward(method: str) -> None:
    """The scripted function, optimized by the caller's own calls first, is found through
    the module class's ``forward``: the recording engines see its ops, not zeros."""
    net = _SwishNet().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    net(x), net(x), net(x)
    eager = lambda z: net.l2(net.l1(z) * torch.sigmoid(net.l1(z)))  # noqa: E731
    for _ in range(2):
        if method == "structured":
            got = torchdiv.divergence(net, x, method=method)
            assert_close(got, loop_diagonal(eager, x).sum(-1))
        else:
            got = torchdiv.laplacian(lambda z: net(z)[:, 0], x, method=method)
            assert_close(got, laplacian_by_grad_of_grad(lambda z: eager(z)[:, 0], x))


def _sin_times(y: torch.Tensor) -> torch.Tensor:
    return torch.sin(y) * y


_ACT = None  # rebound to a scripted function by the test below


def _through_act(net: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    y = net(z)
    return _ACT(y) if _ACT is not None else y


def test_a_global_rebound_to_a_scripted_function_after_a_first_call_is_run_as_written() -> None:
    global _ACT
    net = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    net = net.double()
    x = torch.randn(4, 3, dtype=torch.float64)
    torchdiv.divergence(lambda z: _through_act(net, z), x)  # _ACT is None: nothing followed
    # (the executor's own state, whatever earlier tests left: optimized, as in a fresh process)
    with torch.jit.optimized_execution(True):
        try:
            _ACT = torch.jit.script(_sin_times)
            for _ in range(3):  # the executor's profiled runs, outside torchdiv
                _through_act(net, x.clone().requires_grad_(True)).sum().backward()
            eager = lambda z: _sin_times(net(z))  # noqa: E731
            want = loop_diagonal(eager, x, create_graph=True).sum(-1)
            expected = _grads(want, net)
            got = torchdiv.divergence(lambda z: _through_act(net, z), x)
            _checked(got, want.detach(), net, expected)
        finally:
            _ACT = None


class _Holder(torch.nn.Module):
    """An eager module holding its activation as an attribute (``None``: none)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
        )
        self.act = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.net(z)
        return self.act(y) if self.act is not None else y


def _outer(net: torch.nn.Module):
    """``f`` three functions above the global it reads (``_through_act`` reads ``_ACT``)."""
    inner = lambda z: (lambda w: _through_act(net, w))(z)  # noqa: E731
    return lambda z: inner(z)


@pytest.mark.parametrize("where", ["module attribute", "three functions down"])
@pytest.mark.parametrize("method", ["auto", "structured"])
def test_a_scripted_function_held_by_a_module_or_read_deep_is_run_as_written(where, method):
    """A scripted function a module holds as an attribute (not a submodule), or a global read
    three functions below ``f``: both were not found, and the optimized plan dropped the
    parameter gradients (0.64 off) or gave zeros (structured)."""
    global _ACT
    torch.manual_seed(0)
    holder = _Holder().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    f = holder if where == "module attribute" else _outer(holder.net)
    torchdiv.divergence(f, x, method=method)  # a first call, with no activation
    with torch.jit.optimized_execution(True):
        try:
            act = torch.jit.script(_sin_times)
            holder.act, _ACT = (act, None) if where == "module attribute" else (None, act)
            for _ in range(3):  # the executor's profiled runs, outside torchdiv
                f(x.clone().requires_grad_(True)).sum().backward()
            eager = lambda z: _sin_times(holder.net(z))  # noqa: E731
            want = loop_diagonal(eager, x, create_graph=True).sum(-1)
            expected = _grads(want, holder.net)
            _checked(torchdiv.divergence(f, x, method=method), want.detach(), holder.net, expected)
        finally:
            _ACT = None


class _Applies:
    """A callable object (not a module) holding its activation."""

    def __init__(self, net: torch.nn.Module, act) -> None:
        self.net, self.act = net, act

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.act(self.net(z))


@pytest.mark.parametrize("where", ["default argument", "partial's argument", "callable object"])
def test_a_scripted_function_given_as_an_argument_is_run_as_written(where: str) -> None:
    """A scripted activation in a default argument (``def f(z, act=scripted)``), bound by
    ``functools.partial`` or held by a callable object: not followed, its optimized plan gave
    the right divergence with parameter gradients 5% off (reverse mode), and no graph at all
    (structured)."""
    import functools

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    net = net.double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with torch.jit.optimized_execution(True):
        act = torch.jit.script(_sin_times)

        def through(z: torch.Tensor, act=act) -> torch.Tensor:
            return act(net(z))

        def applied(z: torch.Tensor, act) -> torch.Tensor:
            return act(net(z))

        f = {
            "default argument": through,
            "partial's argument": functools.partial(applied, act=act),
            "callable object": _Applies(net, act),
        }[where]
        for _ in range(3):  # the executor's profiled runs, outside torchdiv
            f(x.clone().requires_grad_(True)).sum().backward()
        eager = lambda z: _sin_times(net(z))  # noqa: E731
        want = loop_diagonal(eager, x, create_graph=True).sum(-1)
        expected = _grads(want, net)
        _checked(torchdiv.divergence(f, x, method="reverse"), want.detach(), net, expected)


def _run(net: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    return net(z)


class _Keeps:
    """A callable object (not a module) holding a module."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


@pytest.mark.parametrize("where", ["partial's argument", "callable object"])
@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
def test_a_module_given_as_an_argument_is_walked_for_scripted_code(where: str, method: str):
    """An eager module holding a scripted submodule, bound by ``functools.partial``
    (``partial(run, net)``) or held by a callable object: the walk followed only functions
    there, not modules, so the executor's optimized plan ran: forward mode's divergence was 0
    and no engine's result carried parameter gradients."""
    import functools

    torch.manual_seed(0)
    net, scripted = _scripted(3)
    holder = torch.nn.Sequential(scripted)
    x = torch.randn(4, 3, dtype=torch.float64)
    want = loop_diagonal(net, x, create_graph=True).sum(-1)
    expected = _grads(want, net)
    f = {"partial's argument": functools.partial(_run, holder), "callable object": _Keeps(holder)}
    holder(x), holder(x), holder(x)  # the executor's profiled runs, outside torchdiv
    for _ in range(3):
        result = torchdiv.divergence(f[where], x, method=method)
        _checked(result, want.detach(), scripted, expected)
