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

import copy

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


@pytest.mark.parametrize(
    "root",
    [
        lambda h: h.std(-1, keepdim=True),
        lambda h: torch.std_mean(h, -1, keepdim=True)[0],
        lambda h: torch.linalg.vector_norm(h, dim=-1, keepdim=True),
    ],
    ids=["std", "std_mean", "vector_norm"],
)
def test_float32_root_of_a_tiny_total(root):
    """A float32 ``std`` (2-norm) of features ~1e-15 (a variance ~1e-30, far from 0 in
    float32: PyTorch's loop and forward over reverse are right to its round-off). The masked
    root's ``d2 = -1 / (4 t^1.5)`` overflowed to ``-inf`` from ``t ~ 1e-26`` and met a
    ``sum_k jac_k^2`` that underflowed to 0: ``nan`` Laplacians by ``"taylor"`` and
    ``"auto"``, now ``-sum_k (d1 jac_k)^2 / sqrt(t)``. Against the float64 loop on the same
    weights, float32 tolerances (a few ops: 1e-5 of the largest)."""
    torch.manual_seed(0)
    narrow = nn.Linear(D, H)
    wide = copy.deepcopy(narrow).double()  # the same weights

    def f(z, layer=narrow):
        return root(torch.tanh(layer(z)) * 1e-15) * z.cos()

    want = laplacians_by_grad_of_grad(lambda z: f(z, wide), X)
    for method in ("taylor", "auto"):
        got = torchdiv.laplacian(f, X.float(), method=method)
        scale = float(want.detach().abs().max())
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * scale)
