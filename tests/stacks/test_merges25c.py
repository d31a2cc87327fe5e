"""Merge review of rev-fuzz25 (replacements refuse forward mode nested in forward mode, the
Taylor product rule at broadcast shapes, graph forms refusing fused attention under
``create_graph``) and lapcall25 (the Laplacian's loop rule counts output components,
``value_grad_laplacian``'s own loop plans): the refusal fires under two ``jvp`` levels only
and names a way out that works (``torch.func.vjp`` around the call: right); one level
(``"forward"``, forward over reverse, ``"hessian"``) stays right; broadcast products'
Laplacians and parameter gradients; a vector-valued ``u`` at ``batch_dims=2`` by every path
while frozen and trained calls alternate. References: closed-form determinants, float64
``torch.func.jacrev`` and grad-of-grad."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, assert_same_parameter_gradients, laplacians_by_grad_of_grad
from torch import nn

import torchdiv

f64 = torch.float64
D = 3


def _det3(m: torch.Tensor) -> torch.Tensor:
    """``det`` of ``(..., 3, 3)`` by cofactors (no linalg kernel, no replacement)."""
    return (
        m[..., 0, 0] * (m[..., 1, 1] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 1])
        - m[..., 0, 1] * (m[..., 1, 0] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 0])
        + m[..., 0, 2] * (m[..., 1, 0] * m[..., 2, 1] - m[..., 1, 1] * m[..., 2, 0])
    )


class _Orbitals(nn.Module):
    """A one-determinant wavefunction ``ψ(x) = det(1 + tanh(W x))`` (``(B, 3) -> (B,)``),
    ``det`` as ``torch.linalg.det`` (``closed``: by cofactors, the reference)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(
            torch.randn(D, D, D, dtype=f64, generator=torch.Generator().manual_seed(0))
        )

    def forward(self, x: torch.Tensor, closed: bool = False) -> torch.Tensor:
        m = torch.tanh(torch.einsum("ijk,bk->bij", self.w, x)) + torch.eye(D, dtype=x.dtype)
        return _det3(m) if closed else torch.linalg.det(m)


def _hessian_traces(f, x: torch.Tensor) -> torch.Tensor:
    """Per-sample ``Δf`` of a scalar ``f`` by reverse over reverse (``torch.func.jacrev``)."""
    one = lambda z: f(z[None])[0]  # noqa: E731
    return torch.stack([torch.func.jacrev(torch.func.jacrev(one))(z).trace() for z in x])


def test_one_forward_level_through_determinants_and_solves_is_right() -> None:
    """One ``jvp`` level through the replacements (forward mode, forward over reverse,
    ``"hessian"``, a caller's ``jvp`` around a reverse-mode divergence) is not refused."""
    psi = _Orbitals()
    x = torch.randn(2, D, dtype=f64, generator=torch.Generator().manual_seed(1))
    expected = _hessian_traces(lambda z: psi(z, closed=True), x)
    for method in ("forward-over-reverse", "hessian", "auto"):
        assert_close(torchdiv.laplacian(psi, x, method=method), expected)

    def field(z: torch.Tensor) -> torch.Tensor:
        m = torch.tanh(torch.einsum("ijk,bk->bij", psi.w, z)) + 2 * torch.eye(D, dtype=f64)
        return torch.linalg.solve(m, z.unsqueeze(-1)).squeeze(-1)

    jac = torch.stack([torch.func.jacrev(lambda z: field(z[None])[0])(z) for z in x])
    assert_close(torchdiv.divergence(field, x, method="forward"), jac.diagonal(0, -2, -1).sum(-1))
    v = torch.ones_like(x)
    _, got = torch.func.jvp(lambda z: torchdiv.divergence(field, z, method="reverse"), (x,), (v,))
    _, want = torch.func.jvp(
        lambda z: torch.stack(
            [torch.func.jacrev(lambda w: field(w[None])[0])(s).trace() for s in z]
        ),
        (x,),
        (v,),
    )
    assert_close(got, want)


def test_a_callers_jvp_around_a_laplacian_refuses_and_its_way_out_is_right() -> None:
    """``torch.func.jvp`` around ``laplacian`` of a determinant wavefunction (a local
    energy's forward-mode derivative): before rev-fuzz25 56% off, silently (the replacement's
    ``jvp`` a constant at the caller's level); now refused, and the message named
    ``"auto"``, the method that had just refused, as the way out. The way out it names now,
    ``torch.func.vjp`` around the call, is right."""
    psi = _Orbitals()
    x = torch.randn(2, D, dtype=f64, generator=torch.Generator().manual_seed(2))
    with pytest.raises(NotImplementedError, match=r"det/slogdet/logdet .*torch\.func\.vjp"):
        torch.func.jvp(lambda z: torchdiv.laplacian(psi, z), (x,), (torch.ones_like(x),))
    weights = torch.tensor([1.0, -2.0], dtype=f64)
    (got,) = torch.func.vjp(lambda z: torchdiv.laplacian(psi, z), x)[1](weights)
    (want,) = torch.func.vjp(lambda z: _hessian_traces(lambda w: psi(w, closed=True), z), x)[1](
        weights
    )
    assert_close(got, want)


B, T = 2, 3
_BROADCAST = {
    "(B, 1, D) x (B, T, D)": (
        lambda x, w: torch.tanh(x.mean(1, keepdim=True) @ w) * torch.sin(x),
        (B, T, D),
        1,
    ),
    "(1, D) x (B, D), one sample": (lambda x, w: torch.tanh(x[:1] @ w) * torch.sin(x), (B, D), 0),
    "(B, T, 1) @ (B, 1, D)": (
        lambda x, w: (1.0 - x.square().sum(-1, keepdim=True)) @ torch.tanh(x[:, :1] @ w),
        (B, T, D),
        1,
    ),
    "scalar x tensor": (
        lambda x, w: torch.sin(x).sum() * torch.tanh(x @ w),
        (D,),
        0,
    ),
}


@pytest.mark.parametrize("case", list(_BROADCAST))
def test_taylor_products_at_broadcast_shapes(case: str) -> None:
    """Both factors carrying jets, broadcast against each other (the product rule's full-shape
    Laplacians): values and a parameter's gradient against ``torch.func.jacrev`` twice."""
    fn, shape, batch_dims = _BROADCAST[case]
    g = torch.Generator().manual_seed(3)
    w = torch.randn(D, D, dtype=f64, generator=g).requires_grad_(True)
    x = torch.randn(*shape, dtype=f64, generator=g)
    got = torchdiv.laplacian(lambda z: fn(z, w), x, batch_dims=batch_dims, method="taylor")
    samples = x.reshape(-1, *x.shape[batch_dims:]) if batch_dims else x[None]

    def one(z: torch.Tensor) -> torch.Tensor:
        y = fn(z[None] if batch_dims else z, w)
        return y[0] if batch_dims else y

    hess = [torch.func.jacrev(torch.func.jacrev(one))(z) for z in samples]
    n = samples[0].numel()
    want = torch.stack(
        [
            h.reshape(*h.shape[: h.dim() - 2 * z.dim()], n, n)
            for h, z in zip(hess, samples, strict=True)
        ]
    )
    want = want.diagonal(0, -2, -1).sum(-1)
    want = want.reshape(*x.shape[:batch_dims], *want.shape[1:]) if batch_dims else want[0]
    assert_close(got, want)
    weights = torch.randn(want.shape, dtype=f64, generator=g)
    (a,) = torch.autograd.grad((got * weights).sum(), w)
    (b,) = torch.autograd.grad((want * weights).sum(), w)
    assert_close(a, b)


class _FourierNet(nn.Module):
    """``(x, t) -> (u, v)``: random Fourier features, a trainable slope, a tanh layer (not a
    chain), as pinn23's RFF nets; per point of a ``(T, X, 2)`` grid (``batch_dims=2``)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.b = nn.Parameter(torch.randn(2, 8, dtype=f64, generator=g))
        self.slope = nn.Parameter(torch.ones(1, dtype=f64))
        self.hidden = nn.Linear(16, 16).to(f64)
        self.out = nn.Linear(16, 2).to(f64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x @ self.b
        return self.out(torch.tanh(self.slope * self.hidden(torch.cat([z.sin(), z.cos()], -1))))


def _second_derivatives_along_x(net: nn.Module, points: torch.Tensor) -> torch.Tensor:
    """``∂²u_i / ∂x²`` of every output component at ``(N, 2)`` points, by grad of grad."""
    z = points.detach().requires_grad_(True)
    columns = []
    for i in range(2):
        (grad,) = torch.autograd.grad(net(z)[:, i].sum(), z, create_graph=True)
        (second,) = torch.autograd.grad(grad[:, 0].sum(), z, create_graph=True)
        columns.append(second[:, 0])
    return torch.stack(columns, 1)


def test_vector_valued_u_on_a_grid_alternating_frozen_and_trained() -> None:
    """lapcall25's rules (``m (1 + n)`` passes, frozen only; ``value_grad_laplacian``'s own
    plans) on one thread: ``laplacian`` and ``value_grad_laplacian`` (all coordinates and
    ``coordinates=[0]``) at the same site, frozen, trained, frozen again (each call
    re-deciding or taking the plan kept for its own caller): values and parameter
    gradients against float64 grad-of-grad per component."""
    net = _FourierNet()
    x = torch.randn(3, 4, 2, dtype=f64, generator=torch.Generator().manual_seed(5))
    flat = x.reshape(-1, 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for trained in (False, True, False):
            net.requires_grad_(trained)
            full = laplacians_by_grad_of_grad(net, flat).reshape(3, 4, 2)
            along_x = _second_derivatives_along_x(net, flat).reshape(3, 4, 2)
            calls = {
                "laplacian": (lambda: torchdiv.laplacian(net, x, batch_dims=2), full),
                "vgl": (
                    lambda: torchdiv.value_grad_laplacian(net, x, batch_dims=2).laplacian,
                    full,
                ),
                "vgl x": (
                    lambda: (
                        torchdiv.value_grad_laplacian(
                            net, x, batch_dims=2, coordinates=[0]
                        ).laplacian
                    ),
                    along_x,
                ),
                "taylor": (lambda: torchdiv.laplacian(net, x, batch_dims=2, method="taylor"), full),
            }
            for name in [*calls, *reversed(calls)]:
                call, want = calls[name]
                got = call()
                assert_close(got, want)
                if trained:
                    assert_same_parameter_gradients(net, got.square().sum(), want.square().sum())
    finally:
        torch.set_num_threads(threads)


def test_differentiable_graph_forms_take_fused_attention_before_x() -> None:
    """The ``create_graph`` refusal looks at ``y``'s graph down to ``x`` only: fused
    attention that computed ``x`` (an encoder's output fed to a head) is differentiated once,
    by the result's own backward, and not refused."""
    g = torch.Generator().manual_seed(6)
    z = torch.randn(2, 1, 3, 4, dtype=f64, generator=g, requires_grad=True)
    w = torch.randn(4, 4, dtype=f64, generator=g)
    for form in (torchdiv.graph_divergence, torchdiv.graph_jacobian):
        x = nn.functional.scaled_dot_product_attention(z, z, z)  # the fused CPU kernel
        y = torch.tanh(x @ w) * x
        got = form(y, x, create_graph=True)
        (grad,) = torch.autograd.grad(got.sum(), z)
        assert grad.isfinite().all()


def test_biharmonic_under_a_callers_vmap_names_the_determinant() -> None:
    """``biharmonic`` ("auto") of a determinant wavefunction under the caller's ``vmap`` (an
    ensemble): the Taylor engine records nothing there, forward over reverse twice is refused
    (rev-fuzz25; silently wrong before), and the fallback rev-fuzz25 added, backward passes
    for the outer Laplacian, is refused by PyTorch there too: the error read "laplacian:
    method='grad-of-grad' ... use method='auto' or 'forward-over-reverse'", a method the
    caller never named and two that fail. Now it names the replacement and the way out."""
    psi = _Orbitals()
    x = torch.randn(1, 2, D, dtype=f64, generator=torch.Generator().manual_seed(7))
    with pytest.raises(NotImplementedError, match=r"biharmonic: .*det.*outside the transform"):
        torch.vmap(lambda z: torchdiv.biharmonic(psi, z))(x)
