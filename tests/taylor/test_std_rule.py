"""``std`` and ``std_mean`` as one recorded op with a Taylor rule of their own.

The recorders took ``std`` as ``var`` and the six ops of its masked root (``_core.modes._std``:
``ne, ones_like, where, sqrt, zeros_like, where``), which made an ``"auto"`` divergence or
Laplacian of a net with a hand-written LayerNorm (the Annotated Transformer's,
``a * (x - mean) / (std + eps) + b``) 12-25 % slower than with the one op (perfcheck24). Now
they record ``aten.std.correction`` / ``aten.std_mean.correction``, whose rule
(``_taylor.composite._std_mean``) is the root of ``var`` masked at a zero variance: value and
derivatives 0 there, PyTorch's first derivatives (its second ones are ``nan``).

Reference: the float64 per-sample grad-of-grad loop (``jacobian_alone``,
``laplacians_by_grad_of_grad``) of the same map with the root masked at 0 written out, values
and parameter gradients, float64 tolerances (``assert_close``: 1e-10).
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
    sampled_daily,
)
from torch import nn

import torchdiv
from torchdiv._taylor import RULES, capture

aten = torch.ops.aten
D, H = 3, 4  # inputs, features


class HandLayerNorm(nn.Module):
    """The Annotated Transformer's ``LayerNorm``: ``a_2 * (x - mean) / (std + eps) + b_2``."""

    def __init__(self, features: int, eps: float = 1e-6, std=None) -> None:
        super().__init__()
        self.a_2 = nn.Parameter(torch.ones(features))
        self.b_2 = nn.Parameter(torch.zeros(features))
        self.eps = eps
        self.std = std or (lambda h: h.std(-1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        return self.a_2 * (x - mean) / (self.std(x) + self.eps) + self.b_2


def _masked(var: torch.Tensor) -> torch.Tensor:
    """The reference's root: every derivative 0 at a zero variance."""
    return torch.where(var > 0, var.clamp_min(1e-300).sqrt(), torch.zeros_like(var))


# each head: (the operator f runs on features ``h`` (B, H), its reference with the masked root)
HEADS = {
    "hand_layer_norm": (
        lambda h: h.std(-1, keepdim=True),
        lambda h: _masked(h.var(-1, keepdim=True)),
    ),
    "correction_0_dims": (
        lambda h: h.unflatten(-1, (2, 2)).std((1, 2), correction=0)[:, None],
        lambda h: _masked(h.unflatten(-1, (2, 2)).var((1, 2), correction=0))[:, None],
    ),
    "unbiased_positional": (
        lambda h: torch.std(h, -1, False, True),
        lambda h: _masked(torch.var(h, -1, False, True)),
    ),
    "correction_2": (
        lambda h: h.std(-1, correction=2, keepdim=True),
        lambda h: _masked(h.var(-1, correction=2, keepdim=True)),
    ),
    "std_mean": (
        lambda h: torch.mul(*torch.std_mean(h, -1, correction=0))[:, None],
        lambda h: (_masked(h.var(-1, correction=0)) * h.mean(-1))[:, None],
    ),
    # two equal entries (exactly: their mean is each), a zero variance at every x
    "equal_entries": (
        lambda h: h[:, :1].expand(-1, 2).std(-1, keepdim=True) + h.std(-1, keepdim=True),
        lambda h: (
            _masked(h[:, :1].expand(-1, 2).var(-1, keepdim=True)) + _masked(h.var(-1, keepdim=True))
        ),
    ),
}


def _net(head: str) -> nn.Module:
    """``Linear-tanh-HandLayerNorm-Linear`` whose features are 0 in samples with ``x_0 < 0``
    (a padding row: a zero variance that depends on the parameters)."""
    torch.manual_seed(0)
    norm = HandLayerNorm(H, std=HEADS[head][0])
    with torch.no_grad():
        norm.a_2.uniform_(0.5, 1.5)
        norm.b_2.uniform_(-0.5, 0.5)
    return nn.Sequential(nn.Linear(D, H), nn.Tanh(), norm, nn.Linear(H, D)).double()


def _masking(net: nn.Module):
    def f(z: torch.Tensor) -> torch.Tensor:
        h = net[1](net[0](z)) * (z[:, :1] > 0)
        return net[3](net[2](h)) + net[0](z)[:, :D]

    return f


X = torch.tensor([[0.3, -0.5, 0.9], [-0.7, 0.2, 0.4], [1.1, 0.6, -0.2]], dtype=torch.float64)


@pytest.mark.parametrize("head", sampled_daily(HEADS, set(HEADS) - {"hand_layer_norm", "std_mean"}))
def test_std_in_the_recording_engines_as_the_loop(head):
    """Laplacians (``"taylor"``, ``"auto"``) and divergences (``"structured"``, ``"auto"``,
    ``"forward"``) of a net with a hand-written LayerNorm, sample 1 a padding row (features
    0): values and parameter gradients as the float64 per-sample loop."""
    net = _net(head)
    reference = copy.deepcopy(net)
    reference[2].std = HEADS[head][1]
    f, g = _masking(net), _masking(reference)
    lap = laplacians_by_grad_of_grad(g, X)
    div = jacobian_alone(g, X).diagonal(0, 1, 2).sum(-1)
    for method in ("taylor", "auto"):
        got = torchdiv.laplacian(f, X, method=method)
        assert_close(got, lap)
        _same_gradients(net, reference, got, lap)
    for method in ("structured", "auto", "forward"):
        got = torchdiv.divergence(f, X, method=method)
        assert_close(got, div)
        _same_gradients(net, reference, got, div)


def _same_gradients(net: nn.Module, reference: nn.Module, got, want) -> None:
    """The parameter gradients of ``sum(got^2)`` (``net``'s) as ``sum(want^2)``'s
    (``reference``'s, a copy)."""
    ours = torch.autograd.grad(
        got.square().sum(), list(net.parameters()), retain_graph=True, materialize_grads=True
    )
    theirs = torch.autograd.grad(
        want.square().sum(), list(reference.parameters()), retain_graph=True, materialize_grads=True
    )
    for a, b in zip(ours, theirs, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: x.std(-1, keepdim=True),
        lambda x: torch.std(x, -1, False, True),
        lambda x: x.std((0,), correction=0),
        lambda x: torch.std_mean(x, -1)[0],
    ],
)
def test_std_is_one_recorded_op(call):
    """The recorders take ``std`` and ``std_mean`` as one op each (it was ``var`` and six
    more: ``sqrt``'s among them), with a rule."""
    graph = capture(lambda x: call(torch.tanh(x)), X, RULES)
    funcs = [node.func for node in graph.nodes]
    assert funcs[1:] in ([aten.std.correction], [aten.std_mean.correction])
    assert not graph.unsupported


def test_float16_std_of_large_entries():
    """A float16 ``std`` of entries ~300 (the squares' sum past float16's 65504): the rule
    computes in float32 and rounds once, as PyTorch's kernel; the Laplacian as the float32
    loop's on the same weights, within float16's rounding (a few ops deep: 2e-2)."""
    torch.manual_seed(0)
    layer = nn.Linear(D, H)
    with torch.no_grad():
        layer.weight.mul_(20.0)
        layer.bias.copy_(torch.tensor([300.0, -300.0, 250.0, -200.0]))
    half = layer.half()
    wide = copy.deepcopy(half).float()  # the same rounded weights

    def f(z, layer=half):
        h = layer(z)
        return h.std(-1, keepdim=True).expand(-1, D) / 100

    x = X.half()
    want = laplacians_by_grad_of_grad(lambda z: f(z, wide), x.float())
    got = torchdiv.laplacian(f, x, method="taylor")
    scale = float(want.detach().abs().max())
    torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-2 * scale)


def test_complex_variance_is_real():
    """``std``, ``var`` and ``std_mean`` of a complex tensor: ``|a - mean|^2``, real. The rule
    squared ``a - mean``, a complex "variance": ``"taylor"``, ``"structured"`` and ``"auto"``
    were silently off (Laplacians by 13 here). Values and parameter gradients as the loop's
    (PyTorch's complex autograd)."""
    torch.manual_seed(0)
    layer = nn.Linear(D, H).double()
    w = torch.tensor(1 + 2j, dtype=torch.complex128)

    def f(z):
        c = torch.sin(layer(z)) * w + layer(z).square().to(w.dtype)
        return torch.stack([c.std(-1), c.var(-1, correction=0), torch.std_mean(c, -1)[0]], -1)

    lap = laplacians_by_grad_of_grad(f, X)
    div = jacobian_alone(f, X).diagonal(0, 1, 2).sum(-1)
    got = {"taylor": torchdiv.laplacian(f, X, method="taylor")}
    got["structured"] = torchdiv.divergence(f, X, method="structured")
    got["auto"] = torchdiv.laplacian(f, X)
    for method, value in got.items():
        want = div if method == "structured" else lap
        assert_close(value, want)
        assert_same_parameter_gradients(layer, value.square().sum(), want.square().sum())
