"""Review of det26 (``det`` replaced from the third order only where PyTorch's is wrong).

PyTorch's backward of ``det`` with grad mode on takes its SVD formula not only for tensor
subclasses but also for plain tensors where ``|det| < 100 eps`` of the dtype
(``linalg_det_backward``'s ``masked_fmap``); that formula's derivatives divide by
``s_i^2 - s_j^2``: ``nan`` at equal singular values (``det(s^2 I)`` of an isotropic
covariance, float32, ``s < 0.15``), up to 1e-2 off at nearly equal ones, where det25's
replacement was right. And its formula for tensor subclasses is taken where the cotangents
are a subclass (``f``'s output), though ``det``'s argument is plain.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading

import pytest
import torch
from torch import nn

import torchdiv
from tests.conftest import assert_close, laplacian_alone
from tests.core.test_det25 import _Passing, _slater
from torchdiv._laplacian import loop

f64 = torch.float64


class _IsotropicGaussian(nn.Module):
    """``p(y | x)`` of a heteroscedastic isotropic Gaussian (a mixture density network's
    component): mean and scale from an MLP of ``x``, at a fixed target ``y``; the normaliser
    written with ``det`` of the covariance ``scale^2 I``."""

    def __init__(self, d: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, d + 1))
        self.register_buffer("target", torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        mu, scale = out[..., :-1], 0.05 + 0.1 * torch.sigmoid(out[..., -1])
        d = mu.shape[-1]
        cov = scale[..., None, None] ** 2 * torch.eye(d, dtype=x.dtype)
        r = (self.target - mu).unsqueeze(-1)
        quad = (r.mT @ torch.linalg.inv(cov) @ r).squeeze((-1, -2))
        return torch.exp(-0.5 * quad) / torch.sqrt((2 * math.pi) ** d * torch.linalg.det(cov))


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def _weighted_alone(f, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Each sample's ``sum_jk a_jk d_j d_k f`` by grad of grad on that sample alone: ``(B,)``."""
    out = []
    for xb in x:
        leaf = xb.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(f(leaf), leaf, create_graph=True)
        rows = [torch.autograd.grad(g[i], leaf, create_graph=True)[0] for i in range(g.numel())]
        out.append((a * torch.stack(rows)).sum())
    return torch.stack(out)


def _errors(
    net: nn.Module, x: torch.Tensor, ours: torch.Tensor, a: torch.Tensor | None = None
) -> list[float]:
    """Relative errors of a float32 (weighted, by ``a``) Laplacian ``ours`` of ``net`` and of
    its parameter gradients against the float64 per-sample grad-of-grad loop."""
    net64 = copy.deepcopy(net).double()
    want = laplacian_alone(net64, x) if a is None else _weighted_alone(net64, x, a.double())
    want_grads = torch.autograd.grad(want.sum(), list(net64.parameters()))
    grads = torch.autograd.grad(ours.sum(), list(net.parameters()))
    return [_relative(ours.detach(), want.detach())] + [
        _relative(g, w) for g, w in zip(grads, want_grads, strict=True)
    ]


@pytest.mark.parametrize("diffusion", [None, "indefinite"])
def test_isotropic_covariance_in_float32(diffusion: str | None) -> None:
    """``det(s^2 I)`` with ``s`` 0.05-0.15 in float32 (below ``100 eps``: PyTorch's SVD
    formula, at three equal singular values): the ``"grad-of-grad"`` Laplacian (weighted by
    an indefinite diffusion: ``f`` under the state-keeping mode) and its parameter gradients
    within 1e-4 of the float64 loop (measured 1e-6; det26: ``nan``)."""
    torch.manual_seed(0)
    net = _IsotropicGaussian()
    x = 0.1 * torch.randn(4, 3, dtype=f64)
    a = None if diffusion is None else torch.diag(torch.tensor([1.0, -1.0, 1.0]))
    if a is None:
        ours = torchdiv.laplacian(net, x.float(), method="grad-of-grad")
    else:
        ours = torchdiv.weighted_laplacian(net, x.float(), diffusion=a, method="grad-of-grad")
    errors = _errors(net, x, ours, a)
    assert max(errors) < 1e-4, errors


def _near_identity(m: nn.Module, spread: float) -> torch.Tensor:
    """``det(0.01 (I + spread W tanh(x)))`` of each sample's 3 coordinates (a scaled
    near-identity map): ``|det|`` about 1e-6, singular values ``spread`` apart (relative)."""

    def f(z: torch.Tensor) -> torch.Tensor:
        rows = m(torch.tanh(z)).unflatten(-1, (3, 3))
        return torch.linalg.det(0.01 * (torch.eye(3, dtype=z.dtype) + spread * rows))

    return f


@pytest.mark.parametrize("plain", [False, True])
def test_nearly_equal_singular_values_in_float32(plain: bool) -> None:
    """Singular values 1e-4 apart at ``|det|`` 1e-6 in float32: the loop (``Settings.plain``:
    the plain evaluation ``"auto"``'s loop makes) within 1e-4 of the float64 loop, values and
    parameter gradients (measured 2e-6; det26 kept PyTorch's SVD formula: gradients 2.4e-3
    off, 1.3e-2 at 1e-5 apart)."""
    torch.manual_seed(0)
    m = nn.Linear(3, 9)
    x = torch.randn(4, 3, dtype=f64)
    settings = loop.Settings(plain=plain)
    ours = loop.grad_of_grad(_near_identity(m, 1e-4), x.float(), 1, None, settings)
    m64 = copy.deepcopy(m).double()
    want = laplacian_alone(_near_identity(m64, 1e-4), x)
    want_grads = torch.autograd.grad(want.sum(), list(m64.parameters()))
    grads = torch.autograd.grad(ours.sum(), list(m.parameters()))
    errors = [_relative(ours.detach(), want.detach())]
    errors += [_relative(g, w) for g, w in zip(grads, want_grads, strict=True)]
    assert max(errors) < 1e-4, errors


@pytest.mark.parametrize("method", ["grad-of-grad", "auto"])
def test_a_tensor_subclass_after_det(method: str) -> None:
    """``det``'s argument plain but ``f``'s output a ``__torch_dispatch__`` subclass (PyTorch's
    test ``TwoTensor``, as a DTensor scale): the backward passes' cotangents are subclasses,
    so PyTorch takes ``det``'s formula for them, whose third derivative is ``nan`` here
    (det25's matrices ``I + W logsigmoid(x)``): parameter gradients those of the float64
    loop without the factor (det26: ``nan``, values right)."""
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    torch.manual_seed(2)
    m = nn.Linear(3, 9).double()
    x = torch.randn(3, 3, dtype=f64)
    one = torch.tensor(1.0, dtype=f64)
    w = two_tensor.TwoTensor(one, one.clone())
    want = laplacian_alone(lambda z: _slater(m, z), x)
    want_grads = torch.autograd.grad(want.sum(), list(m.parameters()))
    ours = torchdiv.laplacian(lambda z: _slater(m, z) * w, x, method=method)
    grads = torch.autograd.grad(ours.sum(), list(m.parameters()))
    assert_close(ours.a.detach(), want.detach())
    for got, ref in zip(grads, want_grads, strict=True):
        assert_close(got.a, ref)
        assert_close(got.b, ref)


def test_threads_with_and_without_a_dispatch_mode() -> None:
    """Two threads at once, one under a dispatch mode (``det`` replaced there), one plain
    (PyTorch's kept): the modes and the lookup's choice are per thread and per call (the
    cached ``changed_nodes`` are pure), so both give the float64 loop's parameter gradients."""
    torch.manual_seed(2)
    m = nn.Linear(3, 9).double()
    x = torch.randn(3, 3, dtype=f64)
    want = laplacian_alone(lambda z: _slater(m, z), x)
    want_grads = torch.autograd.grad(want.sum(), list(m.parameters()))
    barrier, got = threading.Barrier(2), []

    def run(under_mode: bool) -> None:
        for _ in range(3):
            barrier.wait()
            with _Passing() if under_mode else contextlib.nullcontext():
                ours = torchdiv.laplacian(lambda z: _slater(m, z), x, method="grad-of-grad")
                got.append(torch.autograd.grad(ours.sum(), list(m.parameters())))

    threads = [threading.Thread(target=run, args=(mode,)) for mode in (True, False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 6
    for grads in got:
        for g, w in zip(grads, want_grads, strict=True):
            assert_close(g, w)
