"""Merge review of taylorops25 (2466f2db): ``std``/``std_mean`` one recorded op with a masked
root shared with the 2-norm (``_taylor.composite._masked_root``), complex variances real.

Fault found: the shared root tests ``total != 0`` where the 2-norm's tested ``total > 0``,
which raised for a complex total (``>`` is not defined there), so a complex 2-norm
(``torch.linalg.vector_norm``, ``Tensor.norm``) had no rule and ``"auto"`` fell back to a
right engine. With ``!=`` the rule ran on the complex square ``a^2`` (the fault the merge fixed
for the variance): a complex "norm", ``"taylor"``/``"auto"`` Laplacians 130 % off and
``"structured"`` divergences 110 %, silently. Now ``|a|^2 = re^2 + im^2`` for both
(``_squared_modulus``).

Reference: the float64 per-sample grad-of-grad loop (PyTorch's complex autograd, right for
the norm away from a zero vector), values and parameter gradients, float64 tolerances.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_close,
    assert_same_parameter_gradients,
    jacobian_alone,
    laplacians_by_grad_of_grad,
)
from torch import nn

import torchdiv

D, H = 3, 4
X = torch.tensor([[0.3, -0.5, 0.9], [-0.7, 0.2, 0.4], [1.1, 0.6, -0.2]], dtype=torch.float64)


@pytest.mark.parametrize(
    "norm",
    [
        lambda c: torch.linalg.vector_norm(c, dim=-1),
        lambda c: c.norm(dim=-1, keepdim=True)[:, 0],
    ],
    ids=["linalg_vector_norm", "Tensor.norm"],
)
def test_complex_two_norm_is_of_the_modulus(norm):
    """A complex 2-norm ``sqrt(sum |c|^2)`` inside a net (a complex feature map, as a
    spectral or wave-function layer): ``"taylor"``, ``"auto"`` Laplacians and
    ``"structured"`` divergences as the loop's, values and parameter gradients."""
    torch.manual_seed(0)
    layer = nn.Linear(D, H).double()
    w = torch.tensor(1 + 2j, dtype=torch.complex128)

    def f(z):
        c = torch.sin(layer(z)) * w + layer(z).square().to(w.dtype)
        return norm(c)[:, None] * z.cos()

    lap = laplacians_by_grad_of_grad(f, X)
    div = jacobian_alone(f, X).diagonal(0, 1, 2).sum(-1)
    got = {
        "taylor": torchdiv.laplacian(f, X, method="taylor"),
        "auto": torchdiv.laplacian(f, X),
        "structured": torchdiv.divergence(f, X, method="structured"),
    }
    for method, value in got.items():
        want = div if method == "structured" else lap
        assert_close(value, want)
        assert_same_parameter_gradients(layer, value.square().sum(), want.square().sum())
