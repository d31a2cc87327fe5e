"""What the documentation tells users, checked where no other test pins it (rev-docs30).

Training through attention: the U-Net and training guides told users to wrap a divergence of
an attention net in ``sdpa_kernel(SDPBackend.MATH)`` to get parameter gradients, since
PyTorch's fused CPU kernel has no second derivative. The function-form engines already run
attention on the math backend themselves (``_core.modes.math_attention``), so the call trains
as it is; only the graph form, on a ``y`` the caller computed with the fused kernel, needs it
(``tests/models/test_attention.py``). References: float64 loops of ``torch.autograd.grad``
over the event, under the math backend (the fused kernel cannot be differentiated twice).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import torchdiv

B, T, E = 2, 4, 6  # samples, tokens, features: an event of 24 elements


def _net() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(E, 3 * E).double()


def _attention(lin: torch.nn.Linear):
    def f(x: torch.Tensor) -> torch.Tensor:  # (B, T, E) -> (B, T, E), one head
        q, k, v = lin(x).chunk(3, -1)
        return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]

    return f


def _x() -> torch.Tensor:
    return torch.randn(B, T, E, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _loop_divergence(f, x: torch.Tensor, probes: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample trace by one backward pass per event element (or ``v_jᵀ J v_j`` averaged over
    ``probes``), with a graph, under the math backend."""
    x = x.detach().requires_grad_()
    with sdpa_kernel(SDPBackend.MATH):
        y = f(x).reshape(B, -1)
        if probes is None:
            rows = [
                torch.autograd.grad(y[:, i].sum(), x, create_graph=True)[0]
                for i in range(y.shape[1])
            ]
            return sum(r.reshape(B, -1)[:, i] for i, r in enumerate(rows))
        terms = []
        for v in probes:
            (g,) = torch.autograd.grad(y, x, v.reshape(B, -1), create_graph=True)
            terms.append((g * v).reshape(B, -1).sum(-1))
        return torch.stack(terms).mean(0)


def _gradient(loss: torch.Tensor, lin: torch.nn.Linear) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(lin.parameters()))])


def test_the_default_backend_here_is_the_fused_kernel_without_second_derivatives():
    """The premise of the tests below: without a backend set, this attention runs PyTorch's
    fused CPU kernel, whose backward plain autograd cannot differentiate."""
    lin, x = _net(), _x().requires_grad_()
    y = _attention(lin)(x)
    assert "FlashAttention" in type(y.grad_fn.next_functions[0][0]).__name__
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        g.sum().backward()


@pytest.mark.parametrize("method", ["auto", "reverse", "forward", "structured", "hutchinson"])
def test_divergence_trains_through_fused_attention_without_sdpa_kernel(method):
    lin, x = _net(), _x()
    f = _attention(lin)
    probes = torchdiv.draw_probes(x, 3, generator=torch.Generator().manual_seed(2))
    options = {"probes": probes} if method == "hutchinson" else {}
    reference = _loop_divergence(f, x, probes if method == "hutchinson" else None)
    expected = _gradient(reference.square().sum(), lin)
    for _ in range(2):  # the first call plans; the second reuses what it kept
        div = torchdiv.divergence(f, x, method=method, **options)
        # float64 throughout: the engines and the loop differ by round-off only
        torch.testing.assert_close(div, reference, rtol=1e-10, atol=1e-12)
        got = _gradient(div.square().sum(), lin)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_auto_trains_through_fused_attention_where_the_structured_engine_refuses():
    """``lgamma`` has no structured rule: ``"auto"`` takes the generic engines, whose later
    calls plan from a kept watch (and evaluate ``f`` once more on the fused kernel)."""
    lin, x = _net(), _x()
    attention = _attention(lin)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.lgamma(attention(x).abs() + 1)

    reference = _loop_divergence(f, x)
    expected = _gradient(reference.sum(), lin)
    for _ in range(3):
        div = torchdiv.divergence(f, x)
        torch.testing.assert_close(div, reference, rtol=1e-10, atol=1e-12)  # float64
        torch.testing.assert_close(_gradient(div.sum(), lin), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["auto", "taylor", "grad-of-grad"])
def test_laplacian_trains_through_fused_attention_without_sdpa_kernel(method):
    lin, x = _net(), _x()
    f = _attention(lin)

    def u(x: torch.Tensor) -> torch.Tensor:  # one output per sample
        return f(x).square().sum((-1, -2))

    lap = torchdiv.laplacian(u, x, method=method)
    xr = x.detach().requires_grad_()
    with sdpa_kernel(SDPBackend.MATH):
        (g,) = torch.autograd.grad(u(xr).sum(), xr, create_graph=True)
        g = g.reshape(B, -1)
        reference = sum(
            torch.autograd.grad(g[:, i].sum(), xr, create_graph=True)[0].reshape(B, -1)[:, i]
            for i in range(g.shape[1])
        )
    torch.testing.assert_close(lap, reference, rtol=1e-10, atol=1e-12)  # float64
    got = _gradient(lap.sum(), lin)
    torch.testing.assert_close(got, _gradient(reference.sum(), lin), rtol=1e-9, atol=1e-12)


def test_jacobian_diagonal_trains_through_fused_attention_without_sdpa_kernel():
    lin, x = _net(), _x()
    f = _attention(lin)
    diag = torchdiv.jacobian_diagonal(f, x)
    xr = x.detach().requires_grad_()
    with sdpa_kernel(SDPBackend.MATH):
        y = f(xr).reshape(B, -1)
        reference = torch.stack(
            [
                torch.autograd.grad(y[:, i].sum(), xr, create_graph=True)[0].reshape(B, -1)[:, i]
                for i in range(y.shape[1])
            ],
            -1,
        ).reshape(x.shape)
    torch.testing.assert_close(diag, reference, rtol=1e-10, atol=1e-12)  # float64
    weights = torch.linspace(-1, 1, diag.numel(), dtype=diag.dtype).reshape(diag.shape)
    got = _gradient((weights * diag).sum(), lin)
    torch.testing.assert_close(
        got, _gradient((weights * reference).sum(), lin), rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize(
    "method", ["auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad", "hutchinson"]
)
def test_every_laplacian_method_refuses_a_train_mode_batch_norm(method):
    """``laplacian``'s docstring: a train-mode batch norm is refused by every method."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh())
    options = {"num_probes": 2} if method == "hutchinson" else {}
    with pytest.raises(torchdiv.BatchInteractionError, match=r"^laplacian: .*batch norm"):
        torchdiv.laplacian(net, torch.randn(5, 3), method=method, **options)
