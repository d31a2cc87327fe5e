"""The forward-mode engines keep reverse mode's conventions (``_exact.forward.Tangents``).

References are closed forms, independent of every engine: a statistic computed under
``torch.no_grad()`` inside ``f`` is a constant, as reverse mode and the Taylor engine take it
(PyTorch's forward AD alone would differentiate through it); a ``torch.library`` custom op
with only a backward formula is refused by forward mode, not taken for a constant.
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch

import torchdiv

torch.manual_seed(0)
W = torch.randn(3, 3, dtype=torch.float64)
A = torch.randn(3, dtype=torch.float64)


def normalised(z: torch.Tensor) -> torch.Tensor:
    """``W z / s`` with ``s = |z|`` a stop-gradient statistic: Jacobian ``W / s``."""
    with torch.no_grad():
        s = z.norm(dim=-1, keepdim=True)
    return z @ W.T / s


def squared(z: torch.Tensor) -> torch.Tensor:
    """``(a . z)^2 / s``, ``s = |z|`` under ``no_grad``: Laplacian ``2 |a|^2 / s``."""
    with torch.no_grad():
        s = z.norm(dim=-1, keepdim=True)
    return (z @ A)[:, None] ** 2 / s


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("method", ["forward", "reverse", "auto"])
def test_no_grad_statistic_is_a_constant_in_every_exact_method(method, grad):
    x = torch.randn(5, 3, dtype=torch.float64)
    s = x.norm(dim=-1)
    with torch.set_grad_enabled(grad):
        div = torchdiv.divergence(normalised, x, method=method)
        jac = torchdiv.jacobian(normalised, x, method=method)
    torch.testing.assert_close(div, W.trace() / s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jac, W / s[:, None, None], rtol=1e-12, atol=1e-12)


def test_tall_jacobian_auto_keeps_no_grad_constant():
    # a tall output: "auto" runs forward mode (outputs outnumber inputs)
    V = torch.randn(32, 2, dtype=torch.float64)
    x = torch.randn(4, 2, dtype=torch.float64)

    def tall(z):
        with torch.no_grad():
            s = z.norm(dim=-1, keepdim=True)
        return z @ V.T / s

    jac = torchdiv.jacobian(tall, x)
    torch.testing.assert_close(jac, V / x.norm(dim=-1)[:, None, None], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("method", ["forward-over-reverse", "hessian", "auto", "grad-of-grad"])
def test_laplacian_no_grad_statistic_is_a_constant(method, grad):
    x = torch.randn(5, 3, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        lap = torchdiv.laplacian(squared, x, method=method)
    expected = 2 * A.square().sum() / x.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(lap, expected, rtol=1e-12, atol=1e-12)


@torch.library.custom_op("torchdiv_tests::tanh_without_jvp", mutates_args=())
def tanh_without_jvp(z: torch.Tensor) -> torch.Tensor:
    return torch.tanh(z)


@tanh_without_jvp.register_fake
def _(z):
    return torch.empty_like(z)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _backward(ctx, grad):
    (y,) = ctx.saved_tensors
    return grad * (1 - y * y)


tanh_without_jvp.register_autograd(_backward, setup_context=_setup)  # no forward-mode rule


@pytest.mark.parametrize("op", ["divergence", "jacobian", "jacobian_diagonal"])
def test_forward_refuses_a_custom_op_without_forward_rule(op):
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match=r"custom op torchdiv_tests::tanh_without_jvp"):
        getattr(torchdiv, op)(tanh_without_jvp, x, method="forward")


def test_auto_jacobian_of_a_custom_op_is_right():
    lin = torch.nn.Linear(2, 16, dtype=torch.float64)  # tall: forward mode is "auto"'s choice
    x = torch.randn(4, 2, dtype=torch.float64)
    jac = torchdiv.jacobian(lambda z: tanh_without_jvp(lin(z)), x)
    slope = 1 - torch.tanh(lin(x)).square()
    torch.testing.assert_close(jac, slope[:, :, None] * lin.weight, rtol=1e-12, atol=1e-12)


def test_laplacian_auto_of_a_custom_op_loops_instead_of_forward_over_reverse():
    # 16 inputs: no Taylor rule for the op, beyond the loop's fallback size; torch.func
    # cannot run the op (forward over reverse raised), the loop of backward passes can
    x = torch.randn(3, 16, dtype=torch.float64)
    lap = torchdiv.laplacian(lambda z: tanh_without_jvp(z).sum(-1, keepdim=True), x)
    t = torch.tanh(x)
    expected = (-2 * t * (1 - t * t)).sum(-1, keepdim=True)
    torch.testing.assert_close(lap, expected, rtol=1e-12, atol=1e-12)


class TanhWithJvp(torch.autograd.Function):
    """A custom Function with a forward-mode rule: its forward runs with grad off, and is
    not a ``no_grad`` block of ``f``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z):
        return torch.tanh(z)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)

    @staticmethod
    def jvp(ctx, tangent):
        (y,) = ctx.saved_tensors
        return tangent * (1 - y * y)


@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_custom_function_with_jvp_is_differentiated(method):
    x = torch.randn(4, 3, dtype=torch.float64)
    div = torchdiv.divergence(TanhWithJvp.apply, x, method=method)
    torch.testing.assert_close(div, (1 - torch.tanh(x).square()).sum(-1), rtol=1e-12, atol=1e-12)
    u = lambda z: TanhWithJvp.apply(z).sum(-1, keepdim=True)  # noqa: E731
    lap = torchdiv.laplacian(u, x, method="forward-over-reverse")
    t = torch.tanh(x)
    torch.testing.assert_close(
        lap, (-2 * t * (1 - t * t)).sum(-1, keepdim=True), rtol=1e-12, atol=1e-12
    )


class Counting(torch.nn.Module):
    """``W tanh(z)``, counting its calls in a buffer and keeping a running mean of its
    activations under ``no_grad`` (writes ``torch.func`` refuses inside its transforms)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(3, dtype=torch.float64))

    def forward(self, z):
        h = torch.tanh(z)
        self.steps += 1
        with torch.no_grad():
            self.mean.lerp_(h.mean(0), 0.5)
        return h @ W.T


@pytest.mark.parametrize("chunk_size", [None, 1])
@pytest.mark.parametrize(
    ("op", "method"),
    [
        ("divergence", "forward"),
        ("divergence", "reverse"),
        ("jacobian", "forward"),
        ("laplacian", "forward-over-reverse"),
        ("laplacian", "hessian"),
    ],
)
def test_buffer_writes_run_once_under_every_torch_func_method(op, method, chunk_size):
    net, x = Counting(), torch.randn(4, 3, dtype=torch.float64)
    t = torch.tanh(x)
    if op == "laplacian":  # of the first output: W_0 . tanh''(x)
        out = torchdiv.laplacian(lambda z: net(z)[:, :1], x, method=method, chunk_size=chunk_size)
        expected = (-2 * t * (1 - t * t)) @ W[0]
        torch.testing.assert_close(out, expected[:, None], rtol=1e-12, atol=1e-12)
    else:
        out = getattr(torchdiv, op)(net, x, method=method, chunk_size=chunk_size)
        jac = W * (1 - t * t)[:, None, :]
        expected = jac.diagonal(dim1=1, dim2=2).sum(-1) if op == "divergence" else jac
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert net.steps.item() == 1  # one evaluation's worth of state
    torch.testing.assert_close(net.mean, 0.5 * t.mean(0), rtol=1e-12, atol=1e-12)


def test_buffer_write_of_a_value_computed_from_x_names_the_way_out():
    class Keeping(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("last", torch.zeros(3, dtype=torch.float64))

        def forward(self, z):
            self.last.copy_(z[0])  # with grad on: torch.func cannot write it
            return torch.tanh(z)

    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"copy_ in f writes in place.*method='auto'"):
        torchdiv.divergence(Keeping(), x, method="forward")
    net = Keeping()
    div = torchdiv.divergence(net, x)
    torch.testing.assert_close(div, (1 - torch.tanh(x).square()).sum(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net.last, x[0])


@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_functional_train_mode_batch_norm_is_refused_with_its_statistics_unmoved(method):
    # torch.func does not refuse batch norm's own write of its statistics: forward mode gave 0
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    x = torch.randn(16, 3, dtype=torch.float64)

    def f(z):
        return torch.tanh(torch.nn.functional.batch_norm(z @ W.T, mean, var, training=True))

    with pytest.raises(torchdiv.BatchInteractionError, match="batch norm in train mode"):
        torchdiv.divergence(f, x, method=method)
    assert torch.equal(mean, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(var, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize(
    ("op", "method", "way"),
    [
        ("divergence", "reverse", "method='auto'"),
        ("laplacian", "forward-over-reverse", "method='auto' or 'grad-of-grad'"),
        ("laplacian", "hessian", "method='auto' or 'grad-of-grad'"),
        # (their hints were their nested Laplacian's: methods they do not take)
        ("biharmonic", "auto", "laplacian(lambda z: laplacian(f, z, method='grad-of-grad')"),
        ("value_grad_laplacian", "forward-over-reverse", "laplacian(f, x, method='auto' or"),
    ],
)
def test_torch_func_refusing_a_custom_op_names_the_way_out(op, method, way):
    x = torch.randn(4, 3, dtype=torch.float64)
    f = (
        (lambda z: tanh_without_jvp(z).sum(-1, keepdim=True))
        if op in ("laplacian", "biharmonic", "value_grad_laplacian")
        else tanh_without_jvp
    )
    with pytest.raises(
        RuntimeError, match=rf"(?s)setup_context.*Hint: .*{re.escape(way)}.*, which run"
    ):
        getattr(torchdiv, op)(f, x, method=method)


class Gated(torch.nn.Module):
    """A net doing work only while gradients are tracked (``if h.requires_grad:``, as an
    implicit layer gates its backward hook, or ``torch.is_grad_enabled() and x.requires_grad``,
    as memory-saving code gates checkpointing); here the work changes the value, so that the
    branch taken shows in every derivative. Plain autograd differentiating in ``x`` takes it."""

    def __init__(self, gate: str):
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b, self.gate = torch.nn.Linear(3, 6), torch.nn.Linear(6, 3), gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if self.gate == "requires_grad" and h.requires_grad:
            h = h + 0.5 * h**2
        if self.gate == "grad_mode" and torch.is_grad_enabled() and x.requires_grad:
            h = 2 * h
        return self.b(h)


def per_sample_jacobians(f, x: torch.Tensor) -> torch.Tensor:
    """Each sample's ``(3, 3)`` Jacobian by plain autograd, one sample at a time, row by row
    with ``create_graph=True`` (its parameter gradients are grad-of-grad)."""
    rows = []
    for sample in x:
        leaf = sample[None].clone().requires_grad_(True)
        y = f(leaf)[0]
        grads = [torch.autograd.grad(y[i], leaf, create_graph=True)[0][0] for i in range(3)]
        rows.append(torch.stack(grads))
    return torch.stack(rows)


_FROM_JACOBIAN = {
    "divergence": lambda j: j.diagonal(dim1=-2, dim2=-1).sum(-1),
    "jacobian": lambda j: j,
    "jacobian_diagonal": lambda j: j.diagonal(dim1=-2, dim2=-1),
}


@pytest.mark.parametrize("context", ["train", "frozen", "no_grad"])
@pytest.mark.parametrize("gate", ["requires_grad", "grad_mode"])
@pytest.mark.parametrize("op", sorted(_FROM_JACOBIAN))
def test_forward_mode_reads_requires_grad_as_plain_autograd(op, gate, context):
    """``method="forward"`` refused an ``f`` reading ``requires_grad`` of a tensor computed from
    ``x`` (``False`` under ``torch.func.jvp``) while ``"auto"`` ran it; it now reads ``True``,
    as plain autograd does: values and parameter gradients of the per-sample loop (float64),
    frozen parameters and the caller's ``no_grad`` included, the second call the same."""
    net = Gated(gate).double()
    net.requires_grad_(context == "train")
    x = torch.randn(4, 3, dtype=torch.float64)
    with torch.enable_grad():
        want = _FROM_JACOBIAN[op](per_sample_jacobians(net, x))
    with torch.no_grad() if context == "no_grad" else contextlib.nullcontext():
        got = getattr(torchdiv, op)(net, x, method="forward")
        again = getattr(torchdiv, op)(net, x, method="forward")
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    assert torch.equal(got, again)
    if context == "train":
        params = list(net.parameters())
        got_grads = torch.autograd.grad(got.square().sum(), params, allow_unused=True)
        want_grads = torch.autograd.grad(want.square().sum(), params, allow_unused=True)
        for p, a, b in zip(params, got_grads, want_grads, strict=True):
            zero = torch.zeros_like(p)  # (the output bias reaches no derivative)
            torch.testing.assert_close(
                zero if a is None else a, zero if b is None else b, rtol=1e-12, atol=1e-12
            )


@pytest.mark.parametrize("returned", ["none", "doubled"])
def test_forward_mode_refuses_a_modules_full_backward_hook_naming_it(returned):
    """PyTorch's module backward hook reads ``requires_grad`` of the module's inputs to decide
    whether to wrap them; forward mode never runs the hook, and one returning changed
    gradients (here doubled: plain autograd's divergence doubles) cannot be told from one
    returning none, so forward mode refuses both, naming the hook; ``"auto"`` runs it as
    plain autograd does."""
    net = Gated("none").double()

    def hook(module, grad_in, grad_out):
        return None if returned == "none" else tuple(2 * g for g in grad_in)

    net.a.register_full_backward_hook(hook)
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match=r"a full backward hook(.|\n)*method='auto'"):
        torchdiv.divergence(net, x, method="forward")
    want = _FROM_JACOBIAN["divergence"](per_sample_jacobians(net, x))
    torch.testing.assert_close(torchdiv.divergence(net, x), want, rtol=1e-12, atol=1e-12)


class VmappedGate(torch.nn.Module):
    """A per-sample net ``f`` maps over its batch with ``torch.vmap`` (``vmap(net)(x)``),
    gating work on ``requires_grad`` inside: plain autograd reads ``False`` there (vmap's
    batched tensors do not carry the flag), so ``h`` stays as it is."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.a, self.b = torch.nn.Linear(3, 6), torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def one(sample: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.a(sample))
            return self.b(h + 0.5 * h**2 if h.requires_grad else h)

        return torch.vmap(one)(x)


@pytest.mark.parametrize("op", sorted(_FROM_JACOBIAN))
def test_forward_mode_reads_requires_grad_inside_fs_vmap_as_plain_autograd(op):
    """Inside ``f``'s own ``vmap`` the flag reads ``False`` under plain autograd; forward mode
    raised "Batching rule not implemented for aten::_unpack_dual" there (checking the
    tangent), and read as ``True`` would take the other branch (values 0.33 off)."""
    net = VmappedGate().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    want = _FROM_JACOBIAN[op](per_sample_jacobians(net, x))
    got = getattr(torchdiv, op)(net, x, method="forward")
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    params = list(net.a.parameters())
    got_grads = torch.autograd.grad(got.square().sum(), params)
    want_grads = torch.autograd.grad(want.square().sum(), params)
    torch.testing.assert_close(got_grads, want_grads, rtol=1e-12, atol=1e-12)
