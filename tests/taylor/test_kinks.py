"""At the kinks of piecewise functions, the derivatives autograd's backward formulas give.

Image inputs sit on kinks often: pixels quantised to a few levels, saturated at exactly -1, 0
or 1, ties inside a window. There the structured and Taylor engines read ``hardtanh``'s slope
at its edges as ``clamp``'s (1, where autograd has 0), ``hardswish`` through a ``clamp``
decomposition (1.5 at 3 and -0.5 at -3, where autograd has 1 and 0), and gave a tie of
``maximum`` or ``amax`` all to one place (autograd spreads it evenly): ``method="forward"``
and ``"reverse"`` agreed with autograd and ``"structured"`` and ``"auto"`` did not.
References: a loop of ``autograd.grad`` per diagonal entry and the grad-of-grad loop.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchdiv
from tests.conftest import assert_close, laplacian_by_grad_of_grad, loop_diagonal

f64 = torch.float64
# every kink of the functions below, and rows that tie with their mirror image and in their
# extremes (3 twice, -1 twice)
X = torch.tensor(
    [[-3.0, -1.0, 0.0, 1.0, 3.0, 6.0, 0.5, -0.5], [2.0, 1.0, -1.0, 3.0, 3.0, -1.0, 1.0, 2.0]],
    dtype=f64,
)

CASES = {
    "hardtanh": F.hardtanh,
    "relu6": F.relu6,
    "hardsigmoid": F.hardsigmoid,
    "hardswish": F.hardswish,
    "clamp": lambda z: torch.clamp(z, -1.0, 1.0),  # edges included up to torch 2.13
    # X's rows tie with a bound once each (torch 2.14 on: half to ``z``, half to the bound)
    "clamp between tensors": lambda z: torch.clamp(z, z.roll(1, -1), z.roll(1, -1) + 2.0),
    "maximum": lambda z: torch.maximum(z, z.flip(-1) * 1.0),
    "minimum": lambda z: torch.minimum(z.sin(), z.flip(-1).sin()),
    "amax": lambda z: z * z.amax(-1, keepdim=True),
    "amin": lambda z: z * z.amin(1, keepdim=True),
    "amax over two dimensions": lambda z: z * z.reshape(2, 2, 4).amax((1, 2)).unsqueeze(-1),
}
# hardsigmoid has no double backward in PyTorch (its second derivative is 0 wherever defined)
SECOND_ORDER = [name for name in CASES if name != "hardsigmoid"]


@pytest.mark.parametrize("method", ["structured", "auto", "forward"])
@pytest.mark.parametrize("name", CASES)
def test_the_jacobian_diagonal_at_kinks_is_autograds(name: str, method: str) -> None:
    f, x = CASES[name], X.clone()
    expected = loop_diagonal(f, x)
    got = torchdiv.jacobian_diagonal(f, x, method=method)
    if name == "hardsigmoid":  # exact 1/6: PyTorch's backward (the loop) rounds it to float32;
        # the recording engines have their own rule, the others run hardsigmoid's composite
        # under grad mode (PyTorch has no second derivative of it)
        expected = (expected != 0).to(f64) / 6
    assert_close(got, expected)
    assert_close(torchdiv.divergence(f, x, method=method), expected.sum(-1))


@pytest.mark.parametrize("method", ["taylor", "auto"])
@pytest.mark.parametrize("name", SECOND_ORDER)
def test_the_laplacian_at_kinks_is_the_grad_of_grad_loops(name: str, method: str) -> None:
    lin = torch.nn.Linear(8, 8, dtype=f64)
    with torch.no_grad():  # the identity plus a weight that the gradient check can move
        lin.weight.copy_(torch.eye(8, dtype=f64))
        lin.bias.zero_()

    def g(z: torch.Tensor) -> torch.Tensor:
        return (CASES[name](lin(z)) ** 2).sum(-1)

    x = X.clone()
    expected = laplacian_by_grad_of_grad(g, x)
    got = torchdiv.laplacian(g, x, method=method)
    assert_close(got, expected)
    want = torch.autograd.grad(expected.sum(), lin.weight)[0]
    assert_close(torch.autograd.grad(got.sum(), lin.weight)[0], want)


# PReLU's slopes, one per feature (channel dimension 1); X holds an exact 0 (row 0, feature 2)
SLOPES = torch.tensor([0.2, 0.5, -0.3, 0.1, 0.7, 0.25, 0.4, 0.05], dtype=f64)


def _prelu_layers() -> tuple[torch.nn.Linear, torch.nn.PReLU, torch.nn.Linear]:
    """The identity (x's zeros reach PReLU exactly; a weight the gradient check can move),
    ``nn.PReLU`` with ``SLOPES``, a random linear layer."""
    torch.manual_seed(0)
    first, prelu = torch.nn.Linear(8, 8, dtype=f64), torch.nn.PReLU(8, dtype=f64)
    with torch.no_grad():
        first.weight.copy_(torch.eye(8, dtype=f64))
        first.bias.zero_()
        prelu.weight.copy_(SLOPES)
    return first, prelu, torch.nn.Linear(8, 8, dtype=f64)


def _branch(h: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """PReLU as the reference writes it: the branch ``slopes * h`` at 0, whose derivatives
    there are that branch's at every order (PyTorch's first backward takes that slope; its
    forward-mode formula and double backward took 1)."""
    return torch.where(h > 0, h, slopes * h)


@pytest.mark.parametrize("method", ["structured", "auto", "forward", "reverse"])
def test_prelu_at_zero_takes_the_backward_slope_in_every_method(method: str) -> None:
    """The Jacobian diagonal and the divergence at an exact 0 use PReLU's slope there, as a
    per-sample ``autograd.grad`` loop; the divergence's parameter gradients too, against the
    loop of the branch form (``create_graph``). ``method="forward"`` took slope 1 (3.0
    against 0.6 for three zeros at slope 0.2)."""
    first, prelu, last = _prelu_layers()
    params = [first.weight, prelu.weight, last.weight]
    x = X.clone()
    expected = loop_diagonal(lambda z: last(prelu(first(z))), x)
    got = torchdiv.jacobian_diagonal(lambda z: last(prelu(first(z))), x, method=method)
    assert_close(got, expected)
    divergence = torchdiv.divergence(lambda z: last(prelu(first(z))), x, method=method)
    assert_close(divergence, expected.sum(-1))

    def reference(z: torch.Tensor) -> torch.Tensor:
        return last(_branch(first(z), prelu.weight))

    wanted = torch.autograd.grad(loop_diagonal(reference, x, create_graph=True).sum(), params)
    for g, w in zip(torch.autograd.grad(divergence.sum(), params), wanted, strict=True):
        assert_close(g, w)


@pytest.mark.parametrize(
    "method", ["taylor", "auto", "grad-of-grad", "forward-over-reverse", "hessian"]
)
def test_prelu_at_zero_laplacian_takes_the_backward_slope_in_every_method(method: str) -> None:
    """The Laplacian of ``|prelu(z)|^2 + sum prelu(z)`` at an exact 0 is the branch's (``2 a^2``
    per zero coordinate): it was 0.24 (Taylor), 1.2 (grad-of-grad) or 6.0 (forward over
    reverse) for three zeros at slope 0.2; values and parameter gradients against the
    grad-of-grad loop of the branch form."""
    first, prelu, _ = _prelu_layers()

    def g(z: torch.Tensor) -> torch.Tensor:
        p = prelu(first(z))
        return (p**2).sum(-1) + p.sum(-1)

    def reference(z: torch.Tensor) -> torch.Tensor:
        p = _branch(first(z), prelu.weight)
        return (p**2).sum(-1) + p.sum(-1)

    x = X.clone()
    expected = laplacian_by_grad_of_grad(reference, x)
    got = torchdiv.laplacian(g, x, method=method)
    assert_close(got, expected)
    params = [first.weight, prelu.weight]
    wanted = torch.autograd.grad(expected.sum(), params)
    for grad, want in zip(torch.autograd.grad(got.sum(), params), wanted, strict=True):
        assert_close(grad, want)


def test_a_graph_through_prelu_is_not_refused_for_third_derivatives() -> None:
    """``graph_laplacian(create_graph=True)`` refuses a caller's graph holding an op whose
    PyTorch third derivatives are wrong (``REPLACEMENTS``); PReLU's differ from the branch's
    only at an exact 0, so its graph is kept, with PyTorch's formulas, as before."""
    first, prelu, _ = _prelu_layers()
    x = torch.randn(4, 8, dtype=f64, requires_grad=True)
    y = (prelu(first(x)) ** 2).sum(-1)
    got = torchdiv.graph_laplacian(y, x, create_graph=True)
    assert_close(got, laplacian_by_grad_of_grad(lambda z: (prelu(first(z)) ** 2).sum(-1), x))
    assert got.requires_grad
