"""rev-b34: adversarial review of gradcheck34 (the caller's forward-mode tangents through the
operators) and opinfohi34 (``mvlgamma``'s replacement).

References: central differences in float64 of the operator's value along the parameters'
tangents (``eps = 1e-6``: truncation ``O(eps^2)``, rounding ``O(1e-16 / eps) = 1e-10``
relative to values of order 1, so ``rtol = 1e-6``/``atol = 1e-8`` sits far above both and far
below a dropped or wrong tangent, an error of order 1); closed forms for ``mvlgamma``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.func import functional_call

import torchdiv
from tests.exact.test_gradcheck34 import _net

DT = torch.float64
EPS = 1e-6


def _jvp_tangents(
    operator: Callable[..., object], op: Callable[[torch.Tensor], torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The tangents of ``operator``'s outputs by ``torch.func.jvp`` over ``f``'s parameters
    under the caller's ``torch.no_grad()``, and their central differences."""
    net = _net(op)
    names = [n for n, _ in net.named_parameters()]
    params = tuple(p.detach() for p in net.parameters())
    gen = torch.Generator().manual_seed(2)
    tangents = tuple(torch.randn(p.shape, dtype=DT, generator=gen) for p in params)
    x = torch.randn(2, 4, dtype=DT, generator=gen) * 0.7

    def outputs(*ps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        result = operator(
            lambda z: functional_call(net, dict(zip(names, ps, strict=True)), (z,)), x
        )
        return tuple(result) if isinstance(result, tuple) else (result,)  # type: ignore[arg-type]

    with torch.no_grad():
        up = outputs(*(p + EPS * t for p, t in zip(params, tangents, strict=True)))
        down = outputs(*(p - EPS * t for p, t in zip(params, tangents, strict=True)))
        _, got = torch.func.jvp(outputs, params, tangents)
    return [(g, (u - d) / (2 * EPS)) for g, u, d in zip(got, up, down, strict=True)]


_FORWARD_ENGINES: dict[str, Callable[..., object]] = {
    "divergence-forward": lambda f, x: torchdiv.divergence(f, x, method="forward"),
    "jacobian-forward": lambda f, x: torchdiv.jacobian(f, x, method="forward"),
    "laplacian-forward-over-reverse": lambda f, x: torchdiv.laplacian(
        f, x, method="forward-over-reverse"
    ),
    "laplacian-auto": torchdiv.laplacian,
    "value_grad_laplacian-auto": torchdiv.value_grad_laplacian,
    "value_grad_laplacian-forward-over-reverse": lambda f, x: torchdiv.value_grad_laplacian(
        f, x, method="forward-over-reverse"
    ),
}


@pytest.mark.parametrize("name", sorted(_FORWARD_ENGINES))
def test_jvp_over_parameters_under_no_grad(name: str) -> None:
    """``torch.func.jvp`` over ``f``'s parameters around an operator called under the
    caller's ``torch.no_grad()`` (forward AD ignores grad mode; a JVP of a PINN loss in
    parameters inside an evaluation block): every engine that pushes tangents gave tangents
    of exactly 0, silently. Its results were ``detach``ed to drop a graph under ``no_grad``,
    and ``detach`` also cuts the caller's ``jvp`` level."""
    for got, ref in _jvp_tangents(_FORWARD_ENGINES[name], torch.tanh):
        assert ref.abs().max() > 0.1  # (a tangent worth dropping)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8)


def _loop_laplacian(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Every sample's Laplacian of every output by a float64 loop of ``autograd.grad``."""
    rows = []
    for b in range(x.shape[0]):
        z = x[b : b + 1].detach().requires_grad_()
        y = f(z)[0].flatten()
        lap = torch.zeros_like(y)
        for i in range(y.numel()):
            (g,) = torch.autograd.grad(y[i], z, create_graph=True)
            for j in range(z.shape[1]):
                lap[i] += torch.autograd.grad(g[0, j], z, retain_graph=True)[0][0, j]
        rows.append(lap)
    return torch.stack(rows)


def _solve_by_keywords(h: torch.Tensor) -> torch.Tensor:
    a = h.unflatten(-1, (2, 2))
    return torch.linalg.solve(A=a + 3 * torch.eye(2, dtype=h.dtype), B=a).flatten(-2)


_BY_KEYWORD: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mvlgamma": lambda h: torch.mvlgamma(input=h + 3, p=2),
    "multigammaln": lambda h: torch.special.multigammaln(input=h + 3, p=3),
    "cumprod": lambda h: torch.cumprod(input=h, dim=-1),
    "prelu": lambda h: torch.nn.functional.prelu(input=h, weight=torch.tensor([0.3], dtype=DT)),
    "sgn": lambda h: torch.sgn(input=h) * h**3,
    "solve": _solve_by_keywords,
    "det": lambda h: h * torch.linalg.det(A=h.unflatten(-1, (2, 2))).unsqueeze(-1),
}


@pytest.mark.parametrize("name", sorted(_BY_KEYWORD))
def test_replaced_op_with_its_tensor_by_keyword(name: str) -> None:
    """A replaced op called with its tensor by keyword (``torch.cumprod(input=h, dim=-1)``,
    ``torch.linalg.solve(A=a, B=b)``) in ``f``: the replacement, whose parameters are named
    otherwise, raised ``TypeError: _cumprod() got an unexpected keyword argument 'input'``
    under forward over reverse (and every engine that replaces it)."""
    f = _BY_KEYWORD[name]
    x = torch.randn(2, 4, dtype=DT, generator=torch.Generator().manual_seed(3)) * 0.7
    got = torchdiv.laplacian(f, x, method="forward-over-reverse")
    torch.testing.assert_close(got, _loop_laplacian(f, x), rtol=1e-9, atol=1e-9)


def _hardsigmoid_net() -> torch.nn.Module:
    torch.manual_seed(4)
    return torch.nn.Sequential(torch.nn.Linear(4, 4, dtype=DT), torch.nn.Hardsigmoid())


_PIECEWISE_LINEAR: dict[str, Callable[..., torch.Tensor]] = {
    "laplacian": lambda f, x, m: torchdiv.laplacian(f, x, method=m),
    "laplacian-coordinates": lambda f, x, m: torchdiv.laplacian(f, x, method=m, coordinates=[0, 2]),
    "weighted_laplacian": lambda f, x, m: torchdiv.weighted_laplacian(
        f, x, diffusion=torch.eye(4, dtype=DT), method=m
    ),
}


@pytest.mark.parametrize("method", ["forward-over-reverse", "hessian"])
@pytest.mark.parametrize("name", sorted(_PIECEWISE_LINEAR))
def test_piecewise_linear_laplacian_trained_module_frozen_x(name: str, method: str) -> None:
    """A hardsigmoid network's Laplacian (PyTorch's double backward of hardsigmoid: constant
    zeros, so the nested methods' result has no graph) with ``x`` frozen and the module's
    parameters trained (a PINN's collocation points): ``loss.backward()`` raised "element 0
    of tensors does not require grad", where ``"auto"``, ``"taylor"`` and ``"grad-of-grad"``
    give the parameters zero gradients (the Laplacian is 0 whatever the weights)."""
    net = _hardsigmoid_net()
    x = torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(5))
    out = _PIECEWISE_LINEAR[name](net, x, method)
    grads = torch.autograd.grad(out.sum(), list(net.parameters()))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_piecewise_linear_value_grad_laplacian_keeps_x_graph() -> None:
    """``value_grad_laplacian(method="forward-over-reverse")`` of a hardsigmoid network with
    ``x`` requiring grad: its Laplacian had no graph (``backward`` raised), where
    ``laplacian``'s own is tied to ``x`` (gradcheck34) and ``"auto"``'s has one (its
    parameters' zero gradients are not given there: left, NOTES_rev-b34)."""
    net = _hardsigmoid_net()
    x = torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(5))
    x.requires_grad_()
    out = torchdiv.value_grad_laplacian(net, x, method="forward-over-reverse")
    (gx,) = torch.autograd.grad(out.laplacian.sum(), x)
    assert torch.equal(gx, torch.zeros_like(x))
