"""Implicit layers: a deep equilibrium model (DEQ) and a fixed point behind a custom
``autograd.Function``, against the closed-form implicit Jacobian of the fixed point.

A DEQ written as its repositories write it (locuslab/deq, the implicit-layers tutorial,
deepinv) solves ``z* = tanh(W z* + U x)`` under ``torch.no_grad()``, takes one differentiable
step and registers a tensor hook that solves the backward fixed point: the hook holds the only
derivative of the function's values, which forward mode and the recording engines never see
(they differentiate the step: the one-step Jacobian, 0.07 off here). Every method refuses a
hook registered inside ``f`` (``"auto"`` gave the one-step Jacobian without a word). The
one-step ("phantom", Jacobian-free) variant without a hook is f's forward code, the same in
every method; a ``Function`` with ``setup_context``, ``backward`` and ``jvp`` from the implicit
function theorem is followed by forward and reverse mode alike. A DEQ whose hook waits for
``z.requires_grad`` skipped it where the engines' tensors do not require grad (frozen
parameters: ``"auto"`` one-step again): reading that flag leaves those engines.

An ODE-Net block through torchdiffeq's ``odeint_adjoint`` (its backward solved under
``no_grad``) refuses second derivatives (a Laplacian of 0, divergence parameter gradients
without its part); through ``odeint`` it is the per-sample loop in every engine.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchdiv
from tests.conftest import assert_close, assert_same_parameter_gradients
from torchdiv._core.modes import WrongDerivatives

D, H, B = 3, 6, 4


def _iterate(g, z: torch.Tensor, tol: float = 1e-13, steps: int = 400) -> torch.Tensor:
    """Plain fixed-point iteration, stopped when the whole batch has converged (as DEQ
    solvers stop)."""
    for _ in range(steps):
        new = g(z)
        if (new - z).norm() <= tol * (1 + z.norm()):
            return new
        z = new
    return z


class DEQ(nn.Module):
    """``z* = tanh(W z* + U x)``, ``out(z*)``: solved under ``no_grad``, one differentiable
    step, and (``hooked``) the implicit backward in a tensor hook, registered where the step
    requires grad (locuslab/deq's ``backward_hook``, without its self-removal)."""

    def __init__(self, hooked: bool) -> None:
        super().__init__()
        self.inj, self.lin, self.out = nn.Linear(D, H), nn.Linear(H, H, bias=False), nn.Linear(H, D)
        with torch.no_grad():  # a contraction: the fixed point exists and iteration finds it
            self.lin.weight.mul_(0.6 / torch.linalg.matrix_norm(self.lin.weight, 2))
        self.hooked = hooked

    def step(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z) + u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.inj(x)
        with torch.no_grad():
            z_star = _iterate(lambda z: self.step(z, u), x.new_zeros(x.shape[0], H))
        z = self.step(z_star, u)
        if self.hooked and z.requires_grad:
            z0 = z_star.clone().detach().requires_grad_()
            f0 = self.step(z0, u)

            def backward_hook(grad: torch.Tensor) -> torch.Tensor:
                return _iterate(
                    lambda y: torch.autograd.grad(f0, z0, y, retain_graph=True)[0] + grad,
                    torch.zeros_like(grad),
                )

            z.register_hook(backward_hook)
        return self.out(z)


def _jacobians(net: DEQ, x: torch.Tensor, implicit: bool) -> torch.Tensor:
    """Each sample's Jacobian of ``net`` in closed form at the fixed point: the implicit one
    ``W_out (I - S W)^-1 S U`` (``S``: the step's ``tanh'``), or, if not ``implicit``, the
    one-step one ``W_out S U`` (``z*`` held)."""
    u = net.inj(x)
    z = _iterate(lambda z: net.step(z, u), x.new_zeros(x.shape[0], H)).detach()
    s = 1 - net.step(z, u) ** 2  # tanh' at the step, (B, H)
    du = s[:, :, None] * net.inj.weight  # (B, H, D)
    if implicit:
        a = torch.eye(H, dtype=x.dtype) - s[:, :, None] * net.lin.weight
        du = torch.linalg.solve(a, du)
    return net.out.weight @ du


@pytest.fixture
def deq() -> tuple[DEQ, torch.Tensor]:
    return DEQ(hooked=True).double(), torch.randn(B, D, dtype=torch.float64)


def test_the_hooks_derivative_is_not_the_one_step_one(deq) -> None:
    """What the refusal protects: a plain backward pass through the DEQ gives the implicit
    Jacobian, forward mode of its code the one-step one, and they differ."""
    net, x = deq
    leaf = x.clone().requires_grad_()
    y = net(leaf)
    rows = [torch.autograd.grad(y[:, i].sum(), leaf, retain_graph=True)[0] for i in range(D)]
    implicit = _jacobians(net, x, implicit=True).detach()
    assert_close(torch.stack(rows, 1), implicit, scale=1e3)  # (the solvers' 1e-13)
    assert (implicit - _jacobians(net, x, implicit=False)).abs().max() > 1e-2


@pytest.mark.parametrize(
    "op, method",
    [
        ("divergence", "auto"),
        ("divergence", "structured"),
        ("divergence", "hutchinson"),
        ("jacobian", "auto"),
        ("jacobian_diagonal", "auto"),
        ("laplacian", "auto"),
        ("laplacian", "taylor"),
        ("laplacian", "grad-of-grad"),
    ],
)
def test_a_gradient_hook_inside_f_is_refused_naming_it(deq, op: str, method: str) -> None:
    net, x = deq
    kwargs = {"num_probes": 2} if method == "hutchinson" else {}
    with pytest.raises(WrongDerivatives, match=rf"^{op}: .*backward_hook.*register_hook"):
        getattr(torchdiv, op)(net, x, method=method, **kwargs)
    with pytest.raises(WrongDerivatives, match="register_hook"):  # the second call too
        getattr(torchdiv, op)(net, x, method=method, **kwargs)


def test_a_scaling_hook_is_refused_in_the_tiny_problem_path() -> None:
    """A gradient-scaling hook made the tiny problems' plain rows (``"auto"``) twice the
    derivative of ``f``'s values, every other engine not."""
    w = torch.randn(4, 4, dtype=torch.float64)

    def doubled(z: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(z @ w)
        if y.requires_grad:
            y.register_hook(lambda g: 2 * g)
        return y

    x = torch.randn(8, 4, dtype=torch.float64)
    for _ in range(2):
        with pytest.raises(WrongDerivatives, match="register_hook"):
            torchdiv.divergence(doubled, x)


def test_the_one_step_deq_is_its_code_in_every_method() -> None:
    """Without the hook (the "phantom"/Jacobian-free variant) ``f``'s derivative is the
    step's, ``z*`` a constant: every method gives it, parameter gradients included."""
    net, x = DEQ(hooked=False).double(), torch.randn(B, D, dtype=torch.float64)
    want = _jacobians(net, x, implicit=False)
    want_div = want.diagonal(dim1=1, dim2=2).sum(-1)
    params = [net.inj.weight, net.lin.weight, net.out.weight]
    want_grads = torch.autograd.grad(want_div.pow(2).sum(), params)
    for method in ("auto", "forward", "reverse", "structured"):
        for _ in range(2):
            div = torchdiv.divergence(net, x, method=method)
            assert_close(div, want_div, scale=1e3)
            grads = torch.autograd.grad(div.pow(2).sum(), params)
            for got, expected in zip(grads, want_grads, strict=True):
                assert_close(got, expected, scale=1e3)
    assert_close(torchdiv.jacobian(net, x), want, scale=1e3)


def _fixed_point(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return _iterate(lambda z: torch.tanh(z @ w.T + u), torch.zeros_like(u))


def _implicit(z: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``S = diag(1 - z^2)`` and ``A = I - S W`` per sample: ``dz = A^-1 S (du + dW z)``."""
    s = 1 - z * z
    return s, torch.eye(w.shape[0], dtype=z.dtype) - s[:, :, None] * w


class FixedPoint(torch.autograd.Function):
    """``z = tanh(W z + u)`` solved in ``forward``; ``backward`` and ``jvp`` by the implicit
    function theorem (written in torch ops: differentiable again)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return _fixed_point(u, w)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.save_for_backward(output, inputs[1])
        ctx.saved = (output, inputs[1])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        z, w = ctx.saved_tensors
        s, a = _implicit(z, w)
        v = s * torch.linalg.solve(a.transpose(1, 2), grad[..., None])[..., 0]
        return v, v.T @ z

    @staticmethod
    def jvp(ctx, du, dw):  # type: ignore[no-untyped-def]
        z, w = ctx.saved
        s, a = _implicit(z, w)
        push = du if dw is None else du + z @ dw.T
        return torch.linalg.solve(a, (s * push)[..., None])[..., 0]


def test_an_implicit_function_with_backward_and_jvp_is_followed_by_every_engine() -> None:
    torch.manual_seed(0)
    inj, out = nn.Linear(D, H).double(), nn.Linear(H, D).double()
    w = nn.Parameter(0.3 * torch.randn(H, H, dtype=torch.float64))

    def f(x: torch.Tensor) -> torch.Tensor:
        return out(torch.tanh(FixedPoint.apply(inj(x), w)))

    x = torch.randn(5, D, dtype=torch.float64)
    z = _fixed_point(inj(x), w)  # differentiable: the unrolled solve to 1e-13
    s, a = _implicit(z, w)
    t = 1 - torch.tanh(z) ** 2
    want = out.weight @ (t[:, :, None] * torch.linalg.solve(a, s[:, :, None] * inj.weight))
    want_div = want.diagonal(dim1=1, dim2=2).sum(-1)
    params = [inj.weight, w, out.weight]
    want_grads = torch.autograd.grad(want_div.pow(2).sum(), params)
    for method in ("auto", "forward", "reverse"):
        assert_close(torchdiv.jacobian(f, x, method=method), want, scale=1e3)
        div = torchdiv.divergence(f, x, method=method)
        assert_close(div, want_div, scale=1e3)
        grads = torch.autograd.grad(div.pow(2).sum(), params)
        for got, expected in zip(grads, want_grads, strict=True):
            assert_close(got, expected, scale=1e3)
    by_loop = torchdiv.laplacian(lambda z: f(z).sum(-1), x, method="grad-of-grad")
    for method in ("auto", "forward-over-reverse", "hessian"):
        laplacian = torchdiv.laplacian(lambda z: f(z).sum(-1), x, method=method)
        assert_close(laplacian, by_loop)


class ODEBlock(nn.Module):
    """An ODE-Net block (torchdiffeq's examples): ``odeint`` of ``dz/dt = net([t, z])`` from
    0 to 1, by RK4, through ``odeint_adjoint`` if ``adjoint``."""

    def __init__(self, adjoint: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D + 1, 8), nn.Tanh(), nn.Linear(8, D))
        self.adjoint = adjoint
        self.register_buffer("t", torch.tensor([0.0, 1.0]))

    def dynamics(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([t * torch.ones_like(z[:, :1]), z], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torchdiffeq = pytest.importorskip("torchdiffeq")
        solve = torchdiffeq.odeint_adjoint if self.adjoint else torchdiffeq.odeint
        options = {"method": "rk4", "options": {"step_size": 0.25}}
        if self.adjoint:
            options["adjoint_params"] = tuple(self.net.parameters())
        return solve(self.dynamics, x, self.t, **options)[-1]


def test_odeint_adjoint_inside_f_refuses_second_derivatives() -> None:
    """torchdiffeq's adjoint solves its ODE under ``no_grad``: the Laplacian through it was
    0, a divergence's parameter gradients lacked its part (a score-matching loss
    ``div + |s|^2 / 2`` trained on the second term only)."""
    from torchdiv._exact.autograd import UndifferentiableBackward

    block = ODEBlock(adjoint=True).double()
    x = torch.randn(3, D, dtype=torch.float64)
    with pytest.raises(UndifferentiableBackward, match="odeint_adjoint"):
        torchdiv.laplacian(lambda z: block(z).pow(2).sum(-1), x)
    with pytest.raises(UndifferentiableBackward, match="odeint_adjoint"):
        torchdiv.laplacian(lambda z: block(z).pow(2).sum(-1), x, method="grad-of-grad")
    div = torchdiv.divergence(block, x)
    backprop = ODEBlock(adjoint=False).double()
    backprop.load_state_dict(block.state_dict())
    assert_close(div, torchdiv.divergence(backprop, x), scale=1e4)  # (the adjoint ODE's)
    loss = div.mean() + 0.5 * block(x).pow(2).sum(-1).mean()
    with pytest.raises(UndifferentiableBackward, match="odeint_adjoint"):
        loss.backward()


def test_odeint_inside_f_is_the_per_sample_loop_in_every_engine() -> None:
    block = ODEBlock(adjoint=False).double()
    x = torch.randn(3, D, dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    y = block(leaf)
    rows = [torch.autograd.grad(y[:, i].sum(), leaf, create_graph=True)[0][:, i] for i in range(D)]
    want = sum(rows)
    for method in ("auto", "forward", "reverse"):
        div = torchdiv.divergence(block, x, method=method)
        assert_close(div, want)
        assert_same_parameter_gradients(block, div.pow(2).sum(), want.pow(2).sum())


def test_pytorchs_own_tensor_hooks_pass_and_a_partial_of_a_users_hook_is_refused() -> None:
    """Hooks PyTorch registers inside a forward (FSDP's pre-backward hooks, through
    ``functools.partial`` in FSDP1; ``register_multi_grad_hook``'s) change no gradient."""
    import functools

    w = torch.randn(3, 3, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)

    def watched(z: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(z @ w)
        if y.requires_grad:
            torch.autograd.graph.register_multi_grad_hook((y,), lambda grads: None)
        return y

    want = torchdiv.divergence(lambda z: torch.tanh(z @ w), x)
    assert_close(torchdiv.divergence(watched, x), want)

    def scaled(scale: float, grad: torch.Tensor) -> torch.Tensor:
        return scale * grad

    def partial(z: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(z @ w)
        if y.requires_grad:
            y.register_hook(functools.partial(scaled, 2.0))
        return y

    with pytest.raises(WrongDerivatives, match=r"gradient hook \(.*\.scaled\)"):
        torchdiv.divergence(partial, x)


def test_biharmonic_names_itself_in_the_hook_refusal(deq) -> None:
    """Its inner Laplacians named the error twice ("laplacian: laplacian: biharmonic: ...")."""
    net, x = deq
    with pytest.raises(WrongDerivatives, match=r"^biharmonic: f registers a gradient hook"):
        torchdiv.biharmonic(lambda z: net(z).pow(2).sum(-1), x)


def test_a_frozen_deq_whose_hook_waits_for_requires_grad_is_refused(deq) -> None:
    """With no parameter requiring grad, ``z`` requires grad neither in the recording nor in
    forward mode, so the DEQ skipped its hook there: ``"auto"`` (structured) gave the
    one-step Jacobian, 0.12 off the implicit divergence, where a plain autograd loop (its
    ``x`` requiring grad) runs the hook. Reading ``requires_grad`` of a tensor computed from
    ``x`` (False there) now leaves the recording engines; forward mode reads ``True`` there,
    as plain autograd does, and the DEQ's hook branch then fails in PyTorch (its
    ``requires_grad_()`` inside the transforms; the hint names ``"auto"``, which refuses the
    hook)."""
    from torchdiv._taylor.jet import UnsupportedOp

    net, x = deq
    net.requires_grad_(False)
    x = torch.randn(64, D, dtype=torch.float64)  # (planned: the structured engine's size)
    with pytest.raises(WrongDerivatives, match="register_hook"):
        torchdiv.divergence(net, x)
    with pytest.raises(UnsupportedOp, match="requires_grad read on a tensor computed from x"):
        torchdiv.divergence(net, x, method="structured")
    with pytest.raises(RuntimeError, match=r"requires_grad_\(\)(.|\n)*Hint: .*method='auto'"):
        torchdiv.divergence(net, x, method="forward")
    with pytest.raises(WrongDerivatives, match="register_hook"):
        torchdiv.laplacian(lambda z: net(z).pow(2).sum(-1), x[:4])


def test_reading_requires_grad_without_branching_keeps_auto_right() -> None:
    w = torch.randn(4, 4, dtype=torch.float64)

    def f(z: torch.Tensor) -> torch.Tensor:
        tracked = z.requires_grad  # read (a debugging print, a fast-path check), not used
        return torch.tanh(z @ w) + 0 * tracked

    x = torch.randn(64, 4, dtype=torch.float64)
    g = lambda z: torch.tanh(z @ w)  # noqa: E731
    want = torchdiv.divergence(g, x, method="reverse")
    want_laplacian = torchdiv.laplacian(lambda z: g(z).sum(-1), x, method="grad-of-grad")
    for _ in range(2):
        assert_close(torchdiv.divergence(f, x), want)
        assert_close(torchdiv.laplacian(lambda z: f(z).sum(-1), x), want_laplacian)


def test_a_gradient_changing_hook_made_of_a_torch_function_is_refused() -> None:
    """``y.register_hook(F.normalize)`` (a gradient-normalizing hook) passed as "PyTorch's own"
    (its ``__module__`` starts with ``torch.``): ``"auto"`` and ``"reverse"`` gave the
    divergence of the normalized backward pass (2.298 for every sample), forward mode failed
    in PyTorch. Only the autograd, distributed and data-parallel packages' hooks pass."""
    w = torch.randn(3, 3, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)

    def normalized(z: torch.Tensor) -> torch.Tensor:
        h = z @ w
        if h.requires_grad:
            h.register_hook(torch.nn.functional.normalize)
        return torch.tanh(h)

    for method in ("auto", "reverse"):
        with pytest.raises(WrongDerivatives, match=r"gradient hook \(normalize\)"):
            torchdiv.divergence(normalized, x, method=method)
