"""gradcheck34: torchdiv's operators as functions of (x, parameters), checked to the next
orders against central finite differences in float64: ``torch.autograd.gradcheck`` and
``gradgradcheck`` (gradients of the outputs and their gradients: a Laplacian's are fourth
derivatives of ``f``), and the outputs' tangents under the caller's
``torch.autograd.forward_ad`` (dual parameters through ``torch.func.functional_call``) and
``torch.func.jvp``/``hessian``.

Tolerances: float64 central differences with ``eps = 1e-6`` have truncation ``O(eps^2)`` and
rounding ``O(1e-16 / eps) = 1e-10`` relative to the values (of order 1 here), so
``atol = 1e-6``/``rtol = 1e-4`` (gradcheck) and ``1e-5``/``1e-3`` (gradgradcheck, one level of
differences more) sit far above both and far below a wrong formula's error (> 1e-2).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call

import torchdiv
from torchdiv._core import basis

DT = torch.float64
EPS = 1e-6


def _net(op: Callable[[torch.Tensor], torch.Tensor], d: int = 4) -> torch.nn.Module:
    torch.manual_seed(1)
    layer = torch.nn.Linear(d, d, dtype=DT)
    return torch.nn.Sequential(layer, _Op(op))


class _Op(torch.nn.Module):
    def __init__(self, op: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.op = op

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.op(h)


def _dual_tangents(
    operator: Callable[..., object], op: Callable[[torch.Tensor], torch.Tensor]
) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """The tangents of ``operator``'s outputs with dual parameters (the caller's
    ``forward_ad``) and their central differences along the same parameter tangents."""
    net = _net(op)
    names = [n for n, _ in net.named_parameters()]
    params = [p.detach() for p in net.parameters()]
    gen = torch.Generator().manual_seed(2)
    tangents = [torch.randn(p.shape, dtype=DT, generator=gen) for p in params]
    x = torch.randn(2, 4, dtype=DT, generator=gen) * 0.7

    def outputs(ps: list[torch.Tensor]) -> list[torch.Tensor]:
        result = operator(
            lambda z: functional_call(net, dict(zip(names, ps, strict=True)), (z,)), x
        )
        return list(result) if isinstance(result, tuple) else [result]  # type: ignore[arg-type]

    with torch.no_grad():
        up = outputs([p + EPS * t for p, t in zip(params, tangents, strict=True)])
        down = outputs([p - EPS * t for p, t in zip(params, tangents, strict=True)])
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(params, tangents, strict=True)]
        got = [fwAD.unpack_dual(y).tangent for y in outputs(duals)]
    return [(g, (u - d) / (2 * EPS)) for g, u, d in zip(got, up, down, strict=True)]


@pytest.mark.parametrize("op", [torch.tanh, torch.sinc], ids=["tanh", "sinc"])
def test_value_grad_laplacian_keeps_dual_parameter_tangents(
    op: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """``value_grad_laplacian(method="auto")`` on the loop of backward passes (a small tanh
    layer, a sinc one) with dual parameters: the value's and gradient's tangents were dropped
    (``None``, a zero derivative without a word: the loop detached both where no graph was
    needed), while the Laplacian's were right."""
    for got, ref in _dual_tangents(torchdiv.value_grad_laplacian, op):
        assert got is not None
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8)


def _det(h: torch.Tensor) -> torch.Tensor:
    eye = 2 * torch.eye(2, dtype=h.dtype)
    return h * torch.linalg.det(h.unflatten(-1, (2, 2)) + eye).unsqueeze(-1)


def _solve(h: torch.Tensor) -> torch.Tensor:
    a = h.unflatten(-1, (2, 2))
    return torch.linalg.solve(a + 2 * torch.eye(2, dtype=h.dtype), a).flatten(-2)


def _cholesky_inverse(h: torch.Tensor) -> torch.Tensor:
    a = h.unflatten(-1, (2, 2))
    spd = a @ a.transpose(-1, -2) + torch.eye(2, dtype=h.dtype)
    return torch.cholesky_inverse(torch.linalg.cholesky(spd)).flatten(-2)


def _slogdet(h: torch.Tensor) -> torch.Tensor:
    eye = 2 * torch.eye(2, dtype=h.dtype)
    return h * torch.linalg.slogdet(h.unflatten(-1, (2, 2)) + eye)[1].unsqueeze(-1)


@pytest.mark.parametrize("op", [_det, _solve], ids=["det", "solve"])
def test_reverse_divergence_dual_parameters(op: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """The reverse engine under the caller's ``forward_ad`` level (dual parameters, no grad):
    the tangents differentiate its VJPs in forward mode, a second derivative through forward
    mode, where PyTorch's ``det``/``solve`` formulas are wrong: 12-32% off, silently, until
    ``SafeDerivatives`` replaced them under a dual level (``dual_order``)."""
    with torch.no_grad():
        for got, ref in _dual_tangents(
            lambda f, x: torchdiv.divergence(f, x, method="reverse"), op
        ):
            assert got is not None
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("op", [_slogdet, _cholesky_inverse], ids=["slogdet", "cholesky_inverse"])
def test_loop_laplacian_dual_parameters(op: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """The loop of backward passes (``"grad-of-grad"``, ``"auto"``'s choice inside a dual
    level) with dual parameters: PyTorch's ``slogdet`` and ``cholesky_inverse`` formulas,
    right by backward passes, were differentiated by the caller's tangents (2-38% off)."""
    with torch.no_grad():
        for got, ref in _dual_tangents(
            lambda f, x: torchdiv.laplacian(f, x, method="grad-of-grad"), op
        ):
            assert got is not None
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8)


def _layer_norm(h: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.layer_norm(h, h.shape[-1:])


def _logcumsumexp(h: torch.Tensor) -> torch.Tensor:
    return torch.logcumsumexp(h, -1)


def _cdist(h: torch.Tensor) -> torch.Tensor:
    p = h.unflatten(-1, (2, 2))
    return torch.cdist(p, p + 0.3).flatten(-2)


def _gradgradcheck(
    operator: Callable[..., torch.Tensor], op: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """``gradcheck`` and ``gradgradcheck`` of ``operator(f, x)`` as a function of ``x`` and
    ``f``'s parameters (``functional_call``): its first and second derivatives against central
    differences of the value and of the first derivative."""
    net = _net(op)
    names = [n for n, _ in net.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in net.parameters())
    x = torch.randn(2, 4, dtype=DT, generator=torch.Generator().manual_seed(2)) * 0.7
    x.requires_grad_()

    def fn(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return operator(lambda z: functional_call(net, dict(zip(names, ps, strict=True)), (z,)), x)

    inputs = (x, *params)
    assert torch.autograd.gradcheck(fn, inputs, eps=EPS, atol=1e-6, rtol=1e-4)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=EPS, atol=1e-5, rtol=1e-3)


_OPS = {
    "layer_norm": _layer_norm,
    "logcumsumexp": _logcumsumexp,
    "cdist": _cdist,
    "det": _det,
    "slogdet": _slogdet,
    "solve": _solve,
    "cholesky_inverse": _cholesky_inverse,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["layer_norm", "det"])
def test_laplacian_gradgradcheck(name: str) -> None:
    """The Laplacian's second derivatives in ``x`` and parameters (fourth derivatives of
    ``f``, through ``"auto"``'s choice) against differences of its first: the replaced
    ``layer_norm`` (PyTorch's third derivative wrong) and ``det``."""
    _gradgradcheck(torchdiv.laplacian, _OPS[name])


def test_reverse_divergence_gradgradcheck() -> None:
    """The reverse engine's divergence, second derivatives (third of ``f``) through
    ``logcumsumexp``'s replacement (PyTorch's third derivative by reverse mode ``nan``)."""
    _gradgradcheck(lambda f, x: torchdiv.divergence(f, x, method="reverse"), _logcumsumexp)


_METHODS = [
    ("laplacian", m) for m in ("auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad")
] + [("divergence", m) for m in ("auto", "forward", "reverse")]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "method"), _METHODS)
@pytest.mark.parametrize("name", sorted(_OPS))
def test_gradgradcheck_sweep(kind: str, method: str, name: str) -> None:
    """Every method of the Laplacian and divergence through each replaced op, checked to the
    second derivative of the result (every one has a Taylor rule)."""
    operator = getattr(torchdiv, kind)
    _gradgradcheck(lambda f, x: operator(f, x, method=method), _OPS[name])


def test_parameter_hessian_of_laplacian_after_jvp() -> None:
    """``torch.func``'s second derivatives of a Laplacian loss in the parameters (a
    second-order optimiser's Hessian-vector products: ``jvp`` of ``grad``, then ``jacrev`` of
    ``grad``): the unit vectors ``basis`` keeps per shape were made inside the first call's
    transforms, and the next call's nested transforms failed PyTorch's internal assert
    ("level <= current_level"). Both against central differences of the parameter gradient."""
    basis._KEPT.clear()  # (a block kept by an earlier test would hide it)
    net = _net(torch.tanh)
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = torch.randn(2, 4, dtype=DT, generator=torch.Generator().manual_seed(3))

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return (torchdiv.laplacian(lambda z: functional_call(net, p, (z,)), x) ** 2).sum()

    gen = torch.Generator().manual_seed(4)
    t = {k: torch.randn(v.shape, dtype=DT, generator=gen) for k, v in params.items()}

    def grad(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
        return dict(
            zip(leaves, torch.autograd.grad(loss(leaves), list(leaves.values())), strict=True)
        )

    up = grad({k: v + EPS * t[k] for k, v in params.items()})
    down = grad({k: v - EPS * t[k] for k, v in params.items()})
    ref = {k: (up[k] - down[k]) / (2 * EPS) for k in params}
    by_jvp = torch.func.jvp(torch.func.grad(loss), (params,), (t,))[1]
    hessian = torch.func.jacrev(torch.func.grad(loss))(params)
    for k in params:
        by_jacrev = sum(
            (hessian[k][j].reshape(params[k].numel(), -1) @ t[j].reshape(-1)) for j in params
        )
        torch.testing.assert_close(by_jvp[k], ref[k], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(by_jacrev.reshape(ref[k].shape), ref[k], rtol=1e-6, atol=1e-8)


def test_cdist_under_the_callers_grad_is_not_taken_for_mixing() -> None:
    """``torch.func.grad`` of a divergence loss through a per-sample ``cdist``: the check for
    sample mixing under the caller's transform took PyTorch's batched pullback of ``cdist``
    (wrong) and raised ``BatchInteractionError`` for independent samples; now evaluated with
    ``cdist`` replaced, and the parameter gradient against central differences."""
    net = _net(_cdist)
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = torch.randn(2, 4, dtype=DT, generator=torch.Generator().manual_seed(5))

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return (torchdiv.divergence(lambda z: functional_call(net, p, (z,)), x) ** 2).sum()

    got = torch.func.grad(loss)(params)
    t = {
        k: torch.randn(v.shape, dtype=DT, generator=torch.Generator().manual_seed(6))
        for k, v in params.items()
    }
    with torch.no_grad():
        up = loss({k: v + EPS * t[k] for k, v in params.items()})
        down = loss({k: v - EPS * t[k] for k, v in params.items()})
    along = sum((got[k] * t[k]).sum() for k in params)
    torch.testing.assert_close(along, (up - down) / (2 * EPS), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", ["forward-over-reverse", "hessian"])
def test_piecewise_linear_laplacian_keeps_x_graph(method: str) -> None:
    """A hardsigmoid network's Laplacian (0: piecewise linear) by the nested methods had no
    graph although ``x`` requires grad (PyTorch's double backward of ``hardsigmoid`` gives
    constant zeros), so a PINN loss's ``backward()`` raised where ``"auto"``, ``"taylor"`` and
    ``"grad-of-grad"`` give zero gradients; now tied to ``x`` as those are."""
    net = _net(torch.nn.functional.hardsigmoid)
    x = torch.randn(2, 4, dtype=DT, generator=torch.Generator().manual_seed(7))
    x.requires_grad_()
    out = torchdiv.laplacian(net, x, method=method)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, torch.zeros_like(x))
