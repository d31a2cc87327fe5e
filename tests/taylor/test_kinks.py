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
    "clamp": lambda z: torch.clamp(z, -1.0, 1.0),  # edges included, as autograd has it
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
    if name == "hardsigmoid" and method == "structured":  # exact 1/6: PyTorch's backward and
        expected = (expected != 0).to(f64) / 6  # forward-mode formulas round it to float32
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
