"""At the kinks of ELU (and SELU, CELU: ``x == 0``) and of Softplus (``beta * x == threshold``),
the second derivatives autograd's double backward gives (rev-chain28).

There PyTorch's first derivative takes one side (ELU's negative branch at ``x <= 0``,
Softplus's curve at ``beta * x <= threshold``) and its double backward the *other* (ELU's
``x < 0``, Softplus's ``beta * x < threshold``, both strict: 0 at the kink). The recording
engines' rules (``_taylor.elementwise``) gave the second derivative of the first derivative's
side there: the Laplacian (``method="taylor"`` and ``"auto"``) and the parameter gradients of
``method="structured"``'s divergence and diagonal (autograd's derivative of that rule's first
derivative) disagreed with the grad-of-grad loop, ``"forward-over-reverse"`` and
``"hessian"`` wherever a pre-activation sat exactly on the kink: an integer-valued grid, or
``x = 0`` under zero biases (a PINN's collocation point at the origin). References: loops of
``torch.autograd.grad`` (grad of grad) in float64, never ``torch.func``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, laplacian_by_grad_of_grad, loop_diagonal

import torchdiv

f64 = torch.float64
# integer weights and inputs: the pre-activations are exact integers, 0 and 1 among them
W1 = torch.tensor([[1.0, -1.0], [1.0, 0.0], [2.0, 1.0]], dtype=f64)  # (3, 2)
W2 = torch.tensor([[1.0, -1.0, 1.0], [0.0, 2.0, -1.0]], dtype=f64)  # (2, 3)
X = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, -1.0], [-1.0, 2.0], [0.5, -1.0]], dtype=f64)

# (the activation, the value of its pre-activation at its kink)
CASES = {
    "elu": (lambda z: F.elu(z, 0.5), 0.0),
    "elu alpha 1": (F.elu, 0.0),
    "elu alpha -1": (lambda z: F.elu(z, -1.0), 0.0),
    "selu": (torch.selu, 0.0),
    "celu": (lambda z: F.celu(z, 2.0), 0.0),  # (1/alpha exact in float32: PyTorch's agrees)
    "softplus beta 2": (lambda z: F.softplus(z, 2.0, 2.0), 1.0),
    "softplus threshold 0": (lambda z: F.softplus(z, 1.0, 0.0), 0.0),
}
# in place (``elu_``: autograd's formulas from its result, the same strict double backward);
# the structured engine's diagonals did not differ there
IN_PLACE = {"elu in place": (lambda z: F.elu(z, 0.5, inplace=True), 0.0)}


def _net(activation):  # type: ignore[no-untyped-def]
    """``(B, 2) -> (B, 2)``: two layers of ``activation``, weights ``W1``, ``W2`` (leaves)."""
    w1, w2 = W1.clone().requires_grad_(), W2.clone().requires_grad_()

    def f(z: torch.Tensor) -> torch.Tensor:
        return activation(activation(z @ w1.t()) @ w2.t())

    return f, [w1, w2]


def _on_kinks(name: str) -> None:
    """The test's premise: the first layer's pre-activations hit the kink exactly (in 2 of
    the 5 samples at least)."""
    assert ((X @ W1.t()) == {**CASES, **IN_PLACE}[name][1]).any(-1).sum() >= 2


@pytest.mark.parametrize("method", ["taylor", "auto"])
@pytest.mark.parametrize("name", [*CASES, *IN_PLACE])
def test_the_laplacian_at_the_kink_is_the_grad_of_grad_loops(name: str, method: str) -> None:
    _on_kinks(name)
    f, weights = _net({**CASES, **IN_PLACE}[name][0])

    def g(z: torch.Tensor) -> torch.Tensor:
        return (f(z) ** 2).sum(-1)

    expected = laplacian_by_grad_of_grad(g, X)
    got = torchdiv.laplacian(g, X, method=method)
    assert_close(got, expected)
    cotangent = torch.linspace(-1.0, 2.0, len(X), dtype=f64)
    want = torch.autograd.grad(expected @ cotangent, weights)
    for a, b in zip(torch.autograd.grad(got @ cotangent, weights), want, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("operator", ["divergence", "jacobian_diagonal"])
@pytest.mark.parametrize("name", CASES)
def test_structured_parameter_gradients_at_the_kink_are_the_loops(name: str, operator: str) -> None:
    """Values equal the loop's before too (first derivatives); their gradients in the
    weights are second derivatives at the kink."""
    _on_kinks(name)
    f, weights = _net(CASES[name][0])
    expected = loop_diagonal(f, X, create_graph=True)
    if operator == "divergence":
        expected = expected.sum(-1)
    got = getattr(torchdiv, operator)(f, X, method="structured")
    assert_close(got, expected)
    cotangent = torch.linspace(-1.0, 2.0, expected.numel(), dtype=f64).reshape(expected.shape)
    want = torch.autograd.grad((expected * cotangent).sum(), weights)
    for a, b in zip(torch.autograd.grad((got * cotangent).sum(), weights), want, strict=True):
        assert_close(a, b)


# logsigmoid is smooth, but PyTorch's decomposition of it, min(x, 0) - log1p(exp(-|x|)), has
# a kink at 0 in each part: through ``abs``'s derivative sign(0) = 0 the Laplacian lost the
# second derivative -1/4 at x == 0 (and the structured engine's parameter gradients there)
def test_logsigmoid_at_zero_has_its_second_derivative() -> None:
    f, weights = _net(F.logsigmoid)

    def g(z: torch.Tensor) -> torch.Tensor:
        return (f(z) ** 2).sum(-1)

    assert ((X @ W1.t()) == 0).any(-1).sum() >= 2
    expected = laplacian_by_grad_of_grad(g, X)
    cotangent = torch.linspace(-1.0, 2.0, len(X), dtype=f64)
    want = torch.autograd.grad(expected @ cotangent, weights)
    for method in ("taylor", "auto"):
        got = torchdiv.laplacian(g, X, method=method)
        assert_close(got, expected)
        for a, b in zip(torch.autograd.grad(got @ cotangent, weights), want, strict=True):
            assert_close(a, b)
    expected = loop_diagonal(f, X, create_graph=True)
    got = torchdiv.jacobian_diagonal(f, X, method="structured")
    assert_close(got, expected)
    cotangent = torch.linspace(-1.0, 2.0, expected.numel(), dtype=f64).reshape(expected.shape)
    want = torch.autograd.grad((expected * cotangent).sum(), weights)
    for a, b in zip(torch.autograd.grad((got * cotangent).sum(), weights), want, strict=True):
        assert_close(a, b)


# xlogy(a, b) = a log(b) (and xlog1py: a log(1 + b)) has the derivative log(b) in a at a == 0
# (0 there only where b <= 0, autograd's); PyTorch's decomposition where(a == 0, 0, a log(b))
# gave 0 at every a == 0: the first derivative itself
X_LOG = {
    "xlogy": lambda z: torch.xlogy(z, 2.0 + z * z),
    "xlogy, a number": lambda z: torch.xlogy(z, 3.0),
    "xlog1py": lambda z: torch.special.xlog1py(z, 1.0 + z),
    "xlog1py, a number": lambda z: torch.special.xlog1py(z, 0.5),
}
ZEROS = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, -0.5], [0.5, 2.0, 0.0]], dtype=f64)


@pytest.mark.parametrize("name", X_LOG)
def test_xlogy_at_zero_has_the_derivative_log_b(name: str) -> None:
    lin = torch.nn.Linear(3, 3, dtype=f64)
    with torch.no_grad():  # (the identity: x's zeros stay exact)
        lin.weight.copy_(torch.eye(3, dtype=f64))
        lin.bias.zero_()

    def f(z: torch.Tensor) -> torch.Tensor:
        return X_LOG[name](lin(z))

    expected = loop_diagonal(f, ZEROS, create_graph=True)
    got = torchdiv.jacobian_diagonal(f, ZEROS, method="structured")
    assert_close(got, expected)
    want = torch.autograd.grad((expected * ZEROS.cos()).sum(), lin.weight)[0]
    assert_close(torch.autograd.grad((got * ZEROS.cos()).sum(), lin.weight)[0], want)

    def g(z: torch.Tensor) -> torch.Tensor:
        return (f(z) ** 2).sum(-1)

    expected = laplacian_by_grad_of_grad(g, ZEROS)
    for method in ("taylor", "auto"):
        got = torchdiv.laplacian(g, ZEROS, method=method)
        assert_close(got, expected)
        want = torch.autograd.grad(expected.sum(), lin.weight, retain_graph=True)[0]
        assert_close(torch.autograd.grad(got.sum(), lin.weight)[0], want)
