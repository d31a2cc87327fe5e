"""A tensor to a constant tensor exponent (polynomial features ``h[..., None] ** powers``).

PyTorch's forward-mode formula of ``pow(a, e)`` with a tensor ``e`` holds ``log(a)`` in its
exponent term even where ``e`` carries no tangent: at a negative base every second derivative
through forward mode was ``nan`` (the parameter gradients of a forward-mode divergence, of a
forward-over-reverse or Hessian Laplacian, and of ``laplacian(method="auto")`` at D = 32), with
values right. ``SafeDerivatives`` runs it by ``_core.power.power``. Reference: backward passes
only (the grad-of-grad loop and a per-sample loop of ``autograd.grad``: PyTorch's reverse
formulas of ``pow`` are right), in float64 (``tolerances``).
"""

from __future__ import annotations

import pytest
import torch
from conftest import laplacian_by_grad_of_grad, tolerances

import torchdiv
from torchdiv._core.power import power

f64 = torch.float64


class _Polynomial(torch.nn.Module):
    """Features ``tanh(W x)_i ** p_k`` (negative bases), the powers a buffer, summed by a
    linear layer: a polynomial KAN's or a power-series PINN's first layer."""

    def __init__(self, d: int, out: int, powers: torch.Tensor | None = None) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(d, d, dtype=f64)
        self.outer = torch.nn.Linear(4 * d, out, dtype=f64)
        powers = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=f64) if powers is None else powers
        self.register_buffer("powers", powers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inner(x))
        return self.outer((h[..., None] ** self.powers).flatten(-2))


def _divergence_by_loop(f, x: torch.Tensor) -> torch.Tensor:
    z = x if x.requires_grad else x.detach().requires_grad_()
    y = f(z)
    columns = [torch.autograd.grad(y[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(3)]
    return torch.stack(columns).sum(0)


def _parameter_gradients(net: torch.nn.Module, result: torch.Tensor) -> list[torch.Tensor]:
    weights = torch.linspace(1, 2, len(result), dtype=f64)  # (the outer bias: zeros)
    loss = (result * weights).sum()
    return list(torch.autograd.grad(loss, list(net.parameters()), materialize_grads=True))


def _assert_same_with_gradients(
    net: torch.nn.Module, got: torch.Tensor, expected: torch.Tensor
) -> None:
    """``got`` equals ``expected``, and so do the parameter gradients of a weighted sum."""
    torch.testing.assert_close(got, expected, **tolerances(f64))
    for g, w in zip(
        _parameter_gradients(net, got), _parameter_gradients(net, expected), strict=True
    ):
        torch.testing.assert_close(g, w, **tolerances(f64))


@pytest.mark.parametrize("method", ["forward", "reverse", "auto"])
def test_divergence_through_polynomial_features(method: str) -> None:
    torch.manual_seed(0)
    net, x = _Polynomial(3, 3), torch.randn(8, 3, dtype=f64)
    div = torchdiv.divergence(net, x, method=method)
    expected = _divergence_by_loop(net, x)
    _assert_same_with_gradients(net, div, expected)


@pytest.mark.parametrize("method", ["forward", "auto"])
def test_integer_powers_keep_parameter_gradients(method: str) -> None:
    """Powers ``torch.arange(4)`` (int64, the base float64: the usual way to write them) are
    a constant exponent too: the parameter and ``x`` gradients of a forward-mode divergence
    were ``nan`` at negative bases while only a float64 exponent was replaced."""
    torch.manual_seed(0)
    net, x = _Polynomial(3, 3, torch.arange(4)), torch.randn(8, 3, dtype=f64)
    x = x.requires_grad_()
    div = torchdiv.divergence(net, x, method=method)
    expected = _divergence_by_loop(net, x)
    assert div.dtype == f64
    torch.testing.assert_close(div, expected, **tolerances(f64))
    params = [*net.parameters(), x]
    got = torch.autograd.grad(div.sum(), params, materialize_grads=True)
    want = torch.autograd.grad(expected.sum(), params, materialize_grads=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tolerances(f64))


@pytest.mark.parametrize("method", ["forward-over-reverse", "hessian", "auto"])
@pytest.mark.parametrize("d", [3, 32])  # "auto" at 32: not the loop
def test_laplacian_through_polynomial_features(method: str, d: int) -> None:
    torch.manual_seed(0)
    net, x = _Polynomial(d, 1), torch.randn(6, d, dtype=f64)
    lap = torchdiv.laplacian(lambda z: net(z)[:, 0], x, method=method)
    expected = laplacian_by_grad_of_grad(lambda z: net(z)[:, 0], x)
    _assert_same_with_gradients(net, lap, expected)


@pytest.mark.parametrize("shape", [(4, 6), (4, 1)])  # elementwise; broadcast against e
def test_power_has_pytorch_s_values_and_derivatives(shape: tuple[int, int]) -> None:
    """``power`` against ``torch.pow`` at negative, zero and positive bases, exponents 0,
    integers, fractions and negatives: values and the first two derivatives by backward
    passes (PyTorch's, right there), ``nan``/``inf`` where PyTorch's are, but at a zero base
    with exponent 0, whose second derivative PyTorch takes as ``0 * inf``."""
    bases = torch.tensor([[-1.5], [0.0], [0.7], [2.0]], dtype=f64)
    e = torch.tensor([0.0, 1.0, 2.0, 3.0, 0.5, -1.0], dtype=f64)
    if shape[1] == 1:  # one base against every exponent: finite ones only
        bases, e = bases[[0, 2, 3]], e[:4]
    a = bases.expand(len(bases), shape[1]).clone().requires_grad_()

    def derivatives(pow_):
        out = pow_(a, e)
        (first,) = torch.autograd.grad(out.sum(), a, create_graph=True)
        (second,) = torch.autograd.grad(first.sum(), a)
        return out, first, second

    got, want = derivatives(power), derivatives(torch.pow)
    if shape[1] == 6:
        assert want[2][1, 0].isnan() and got[2][1, 0] == 0  # d^2 (a^0) / da^2 at a = 0
        got[2][1, 0] = want[2][1, 0]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, equal_nan=True, **tolerances(f64))


# Dynamo reads .grad of the non-leaf tensors it resumes with after the graph break at the eager
# pow (hidden by Dynamo's own filter, which the "error" filter of pytest's config overrides)
_RESUMED = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not")


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches emptied before and after a compile test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@_RESUMED
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize(
    "scalar",  # h ** 2, h[..., None] ** self.powers (the eager power: 7 s, a graph break)
    [True, pytest.param(False, marks=pytest.mark.slow)],
)
def test_compiled_divergence_through_powers(scalar: bool) -> None:
    """``torch.compile`` of a loss through ``**``: Dynamo failed ("Guard failed on the same
    frame it was created") while ``Tensor.__pow__``, a ``functools.wraps`` function, was a key
    of ``REPLACEMENTS``, for any ``f`` with ``**``, a Python scalar exponent too. With a
    tensor exponent PyTorch's ``pow`` was traced: the parameter gradients of the compiled
    forward-mode divergence were ``nan`` at negative bases (values right); the op now runs
    eagerly (a graph break) by ``_core.power.power``."""
    torch.manual_seed(0)
    net, x = _Polynomial(3, 3), torch.randn(8, 3, dtype=f64)
    f = (lambda z: net.outer(torch.tanh(net.inner(z)).repeat(1, 4) ** 2)) if scalar else net
    div = torch.compile(lambda z: torchdiv.divergence(f, z, method="forward"), backend="aot_eager")(
        x
    )
    expected = _divergence_by_loop(f, x)
    _assert_same_with_gradients(net, div, expected)


@pytest.mark.slow
@_RESUMED
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("where", ["loss", "model"])
def test_compiled_laplacian_through_polynomial_features(where: str) -> None:
    """``laplacian``'s default method in a compiled loss (and with a compiled model) runs
    forward over reverse: its parameter gradients were ``nan`` at negative bases (PyTorch's
    ``pow`` traced), also with ``dynamic=True``."""
    torch.manual_seed(0)
    net, x = _Polynomial(3, 1), torch.randn(6, 3, dtype=f64)
    f = lambda z: net(z)[:, 0]  # noqa: E731
    if where == "loss":
        lap = torch.compile(lambda z: torchdiv.laplacian(f, z), backend="aot_eager", dynamic=True)(
            x
        )
    else:
        lap = torchdiv.laplacian(torch.compile(f, backend="aot_eager"), x)
    expected = laplacian_by_grad_of_grad(f, x)
    _assert_same_with_gradients(net, lap, expected)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_fullgraph_names_the_eager_power(method: str) -> None:
    """Under ``fullgraph=True`` the eager ``pow`` cannot break the graph: Dynamo raises,
    with torchdiv's reason and the way out (no ``nan`` gradients); powers by Python numbers
    make one graph."""
    torch.manual_seed(0)
    net, x = _Polynomial(3, 3), torch.randn(4, 3, dtype=f64)

    def by_numbers(z: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(net.inner(z))
        return net.outer(torch.stack([h**k for k in range(4)], -1).flatten(-2))

    with pytest.raises(Exception, match=r"raise to Python numbers"):
        torch.compile(
            lambda z: torchdiv.divergence(net, z, method=method),
            backend="aot_eager",
            fullgraph=True,
        )(x)
    div = torch.compile(
        lambda z: torchdiv.divergence(by_numbers, z, method=method),
        backend="aot_eager",
        fullgraph=True,
    )(x)
    torch.testing.assert_close(div, _divergence_by_loop(net, x), **tolerances(f64))


@pytest.mark.slow
@_RESUMED  # (raised as an error, Dynamo runs the loss eagerly)
@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_loss_auto_divergence_through_polynomial_features_names_the_power() -> None:
    """In a compiled loss, ``"auto"``'s divergence by backward passes through ``h **
    self.powers`` was right at 6c6dbd5; since the ``pow`` runs eagerly there (a graph break:
    ``nan`` at an exact 0 base otherwise), ``f`` is compiled apart and its parameter gradients
    are refused (they would miss the compiled parts): the refusal named a break in ``f``
    the caller did not write; it names torchdiv's ``pow`` and Python-number powers, and
    ``method="reverse"`` (named there too) is right."""
    torch.manual_seed(0)
    net, x = _Polynomial(3, 3), torch.randn(4, 3, dtype=f64)
    div = torch.compile(lambda z: torchdiv.divergence(net, z), backend="aot_eager")(x)
    with pytest.raises(Exception, match=r"(?s)method='reverse'.*raise to Python numbers"):
        _parameter_gradients(net, div)
    div = torch.compile(
        lambda z: torchdiv.divergence(net, z, method="reverse"), backend="aot_eager"
    )(x)
    expected = _divergence_by_loop(net, x)
    _assert_same_with_gradients(net, div, expected)


class _ZeroBases(torch.nn.Module):
    """``(W tanh(x) ** p) (1 + sum x)``, ``p`` a buffer or Python numbers (the reference:
    PyTorch's scalar-exponent formulas are right at 0), evaluated where ``x`` has zeros."""

    def __init__(self, powers: list[float]) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 3, dtype=f64)
        self.register_buffer("powers", torch.tensor(powers, dtype=f64))
        self.numbers = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(x)
        if self.numbers:
            features = torch.stack([t[..., i] ** float(p) for i, p in enumerate(self.powers)], -1)
        else:
            features = t**self.powers
        return self.linear(features) * (1 + x.sum(-1, keepdim=True))


@pytest.mark.parametrize(
    ("operator", "method", "powers"),
    [
        ("divergence", "reverse", [0.0, 1.0, 2.0]),
        ("divergence", "auto", [0.0, 1.0, 2.0]),
        ("laplacian", "auto", [1.0, 2.0, 3.0]),
        ("laplacian", "grad-of-grad", [0.0, 1.0, 2.0]),
    ],
)
def test_zero_bases_keep_parameter_gradients(
    operator: str, method: str, powers: list[float]
) -> None:
    """PyTorch's backward formulas of ``pow(a, e)`` are ``nan`` at ``a = 0`` from the second
    derivative where ``e = 0``, the third where ``e = 1``: the parameter gradients of reverse
    and ``"auto"`` divergences and of the loop's Laplacians (``"auto"`` at D = 3) were ``nan``
    where a feature's base was 0 (values right)."""
    torch.manual_seed(0)
    net = _ZeroBases(powers)
    x = torch.randn(5, 3, dtype=f64)
    x[0], x[1, 1] = 0.0, 0.0
    if operator == "divergence":
        result = torchdiv.divergence(net, x, method=method)
        net.numbers = True
        expected = _divergence_by_loop(net, x)
    else:
        result = torchdiv.laplacian(lambda z: net(z).sum(-1), x, method=method)
        net.numbers = True
        expected = laplacian_by_grad_of_grad(lambda z: net(z).sum(-1), x)
    torch.testing.assert_close(result, expected, **tolerances(f64))
    for got, want in zip(
        _parameter_gradients(net, result), _parameter_gradients(net, expected), strict=True
    ):
        assert want.isfinite().all()
        torch.testing.assert_close(got, want, **tolerances(f64))
