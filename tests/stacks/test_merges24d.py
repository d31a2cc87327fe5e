"""Review of rev-fuzz24's merge (the 2-norms replaced from the second order through forward
mode too, ``std``/``std_mean`` as the masked root of ``var`` when recorded and from order 2
by backward passes, the Taylor ELU rule's exponential of the negative side only).

Fault found: the replacements computed float16 and bfloat16 norms and standard deviations in
the input's dtype, where PyTorch sums in float32 and rounds once: ``|a|^2`` overflows float16
from ``|a| = 256``, so a norm was ``inf``, ``F.normalize`` and ``cosine_similarity`` 0 and a
divergence through them 0 (by ``"reverse"`` and ``"auto"``: silently) or ``nan``; a float16
variance overflows from a standard deviation of 256.

Fault found: ``std`` and ``std_mean`` kept PyTorch's forward-mode formula at the second
order, whose derivative at a zero variance is ``0 / 0``: ``"forward"``'s parameter gradients
were ``nan`` (the norms' fault rev-fuzz24 fixed; ``std`` was left at the third order).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_close,
    assert_same_parameter_gradients,
    jacobian_alone,
    laplacians_by_grad_of_grad,
    loop_diagonal,
)
from torch import nn

import torchdiv

f16 = torch.float16


def _half_net(scale: float) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.mul_(scale)
    return layer.to(f16)


_HEADS = {
    "normalize": lambda h: F.normalize(h, dim=-1),
    "cosine_similarity": lambda h: h * F.cosine_similarity(h, h.flip(-1), dim=-1)[:, None] / 400,
    "std": lambda h: h / h.std(-1, keepdim=True),
    "std_mean": lambda h: (
        (h - torch.std_mean(h, -1, keepdim=True)[1]) / torch.std_mean(h, -1, keepdim=True)[0]
    ),
}


_CASES = [
    *[("reverse", head) for head in _HEADS],
    ("auto", "normalize"),
    ("forward", "normalize"),
    ("forward", "cosine_similarity"),
    ("forward", "std"),
]


@pytest.mark.parametrize(("method", "head"), _CASES)
def test_float16_norms_of_large_entries(method, head):
    """A float16 layer of outputs ~400 (``|h|^2`` past float16's 65504) under a norm or a
    standard deviation: the divergence by each engine as plain autograd's in float16, within
    float16's rounding (eps 1e-3, a few ops deep: 2e-2)."""
    layer = _half_net(400.0)
    f = lambda z: _HEADS[head](layer(z))  # noqa: E731
    x = torch.randn(3, 4).to(f16)
    assert layer(x).abs().max() > 256
    want = loop_diagonal(lambda z: f(z.to(f16)), x.float()).sum(-1)
    got = torchdiv.divergence(f, x, method=method)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def _masked_std(h: torch.Tensor) -> torch.Tensor:
    """``h.std(-1, keepdim=True)`` with every derivative 0 at a zero variance."""
    var = h.var(-1, keepdim=True)
    return torch.where(var > 0, var.clamp_min(1e-300).sqrt(), torch.zeros_like(var))


@pytest.mark.parametrize("operator", ["divergence", "jacobian_diagonal", "jacobian"])
def test_std_of_a_zero_vector_by_forward_mode(operator):
    """A sample whose features are 0 near its ``x`` but depend on the parameters (a padding
    atom's, ``h * (x_0 > 0)``) under ``std``: its replacement applied from the third order
    through forward mode, and PyTorch's JVP's derivative at a zero variance is ``0 / 0``, so
    the parameter gradients of ``"forward"`` were ``nan`` (the norms' fault rev-fuzz24 fixed,
    left for ``std``). Values and parameter gradients as the float64 per-sample loop of the
    same map with the root masked at 0."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)).double()

    def f(z, std=lambda h: h.std(-1, keepdim=True)):
        h = net(z) * (z[:, :1] > 0)
        return h * std(h) + net(z)

    x = torch.tensor([[-1.0, 0.5, 0.2], [1.0, -0.3, 0.7]], dtype=torch.float64)
    jac = jacobian_alone(lambda z: f(z, _masked_std), x)
    want = {"jacobian": jac, "jacobian_diagonal": jac.diagonal(0, 1, 2)}
    want["divergence"] = want["jacobian_diagonal"].sum(-1)
    got = getattr(torchdiv, operator)(f, x, method="forward")
    assert_close(got, want[operator])
    assert_same_parameter_gradients(net, got.square().sum(), want[operator].square().sum())


@pytest.mark.parametrize("method", ["taylor", "auto"])
def test_float16_taylor_norm_of_large_entries(method):
    """The Taylor rule of ``linalg.vector_norm`` squared a float16 input in float16: the sum
    of squares ``inf`` from 65504, so ``laplacian`` by ``"taylor"`` and ``"auto"`` was ``inf``
    where PyTorch's norm (in float32, rounded once) is finite. Against the float32 loop of
    the same weights, within float16's rounding (a few ops deep: 2e-2 of the largest)."""
    layer = _half_net(20.0)
    with torch.no_grad():
        layer.bias.fill_(150.0)  # entries ~150: squares finite, their sum past 65504
    wide = copy.deepcopy(layer).float()

    def f(z, layer=layer):
        h = layer(z)
        return h * torch.linalg.vector_norm(h, dim=-1, keepdim=True) / 1e4

    x = torch.randn(3, 4).to(f16)
    assert float(layer(x).detach().float().square().sum(-1).min()) > 65504
    want = laplacians_by_grad_of_grad(lambda z: f(z, wide), x.float())
    got = torchdiv.laplacian(f, x, method=method)
    scale = float(want.detach().abs().max())
    torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-2 * scale)
