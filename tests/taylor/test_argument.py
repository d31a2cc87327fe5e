"""What the recording engines call ``f`` on: a new alias of ``x``, so that a tensor ``f``
reads from outside (the caller's own ``x`` object in a closure) is a constant of ``f``, as
every other method sees it; and what they refuse: ``torch.Tensor`` subclasses, whose
``__torch_function__`` wraps results in objects no recorded call made ("auto" then falls
back to the generic engines). References: per-sample ``autograd.grad`` loops (conftest)."""

from __future__ import annotations

import pytest
import torch

import torchdiv
from tests.conftest import assert_close, laplacian_by_grad_of_grad, loop_diagonal, tanh_mlp
from torchdiv._taylor import UnsupportedOp


def _bc(p: torch.Tensor) -> torch.Tensor:
    """A hard boundary factor, ``1 - |p|^2`` per sample, kept as a column."""
    return 1 - (p * p).sum(-1, keepdim=True)


@pytest.mark.parametrize("method", ["auto", "taylor"])
def test_laplacian_of_a_closure_over_the_callers_x(method: str) -> None:
    """``lambda z: bc(x) * net(z)``: ``bc(x)`` is a constant factor, ``Δf = bc(x) Δnet``
    (the product-rule terms of a ``bc(z)`` are not there); twice, the second call checked
    against the kept recording."""
    net = tanh_mlp(3, 6, 1)
    x = torch.randn(4, 3, dtype=torch.float64)
    want = _bc(x)[:, 0] * laplacian_by_grad_of_grad(lambda z: net(z)[:, 0], x)
    f = lambda z: (_bc(x) * net(z))[:, 0]  # noqa: E731
    for _ in range(2):
        assert_close(torchdiv.laplacian(f, x, method=method), want)


@pytest.mark.parametrize("op", ["divergence", "jacobian_diagonal"])
def test_structured_closure_over_the_callers_x(op: str) -> None:
    """``lambda z: vnet(z) + x``: ``x`` added as a constant, no identity in the Jacobian."""
    vnet = tanh_mlp(3, 6, 3)
    x = torch.randn(4, 3, dtype=torch.float64)
    diagonal = loop_diagonal(vnet, x)
    want = diagonal.sum(-1) if op == "divergence" else diagonal
    f = lambda z: vnet(z) + x  # noqa: E731
    for _ in range(2):
        assert_close(getattr(torchdiv, op)(f, x, method="structured"), want)


class Tagged(torch.Tensor):
    """A subclass as MONAI's ``MetaTensor`` is one: torch's default ``__torch_function__``
    returns every result as a new ``Tagged`` object."""


class Unwrapping(torch.Tensor):
    """A subclass that computes on plain aliases of its tensors (``as_subclass``): ATen sees
    plain tensors that no recorded call made."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        plain = lambda a: a.as_subclass(torch.Tensor) if isinstance(a, cls) else a  # noqa: E731
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*map(plain, args), **{k: plain(v) for k, v in (kwargs or {}).items()})
        return out.as_subclass(cls) if type(out) is torch.Tensor else out


def test_subclass_x_falls_back_or_is_refused() -> None:
    """``x`` a ``Tagged``: "auto" is right (it no longer records zeros), ``value_grad_laplacian``
    too, and an explicit recording engine names the subclass and the way out."""
    net = tanh_mlp(4, 8, 1)
    x = torch.randn(5, 4, dtype=torch.float64)
    u = lambda z: net(z)[:, 0]  # noqa: E731
    want = laplacian_by_grad_of_grad(u, x)
    tagged = x.as_subclass(Tagged)
    assert_close(torchdiv.laplacian(u, tagged).as_subclass(torch.Tensor), want)
    out = torchdiv.value_grad_laplacian(u, tagged)
    assert_close(out.laplacian.as_subclass(torch.Tensor), want)
    z = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(u(z).sum(), z)
    assert_close(out.gradient.as_subclass(torch.Tensor), grad)
    with pytest.raises(UnsupportedOp, match=r"subclass Tagged.*as_subclass\(torch\.Tensor\)"):
        torchdiv.laplacian(u, tagged, method="taylor")
    with pytest.raises(UnsupportedOp, match=r"subclass Tagged.*method='auto'"):
        torchdiv.divergence(tanh_mlp(4, 8, 4), tagged, method="structured")


def test_subclass_divergence_auto_at_a_size_it_plans() -> None:
    """At a size where "auto" plans by the structured engine (not tiny), ``x`` a ``Tagged``
    gives each sample's divergence, not zeros."""
    net = tanh_mlp(16, 16, 16)
    x = torch.randn(160, 16, dtype=torch.float64)
    want = loop_diagonal(net, x)
    tagged = x.as_subclass(Tagged)
    got = torchdiv.jacobian_diagonal(net, tagged).as_subclass(torch.Tensor)
    assert_close(got, want)


@pytest.mark.parametrize("kind", [Tagged, Unwrapping])
@pytest.mark.parametrize("where", ["middle", "end"])
def test_subclass_made_inside_f(kind: type, where: str) -> None:
    """A subclass made inside ``f`` from a tensor computed from ``x``: every later call on it
    would be a constant of a replay, a part of the derivative silently missing. "auto" is
    right; "structured" and "taylor" refuse."""
    net1 = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh()).double()
    net2 = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh()).double()
    plain = lambda z: net2(net1(z)) + z  # noqa: E731
    if where == "middle":
        f = lambda z: net2(net1(z).as_subclass(kind)) + z  # noqa: E731
    else:
        f = lambda z: (net2(net1(z)) + z).as_subclass(kind)  # noqa: E731
    x = torch.randn(5, 4, dtype=torch.float64)
    assert_close(
        torchdiv.divergence(f, x).as_subclass(torch.Tensor), loop_diagonal(plain, x).sum(-1)
    )
    with pytest.raises(UnsupportedOp):
        torchdiv.divergence(f, x, method="structured")
    u = lambda z: f(z).sum(-1)  # noqa: E731
    assert_close(
        torchdiv.laplacian(u, x).as_subclass(torch.Tensor),
        laplacian_by_grad_of_grad(lambda z: plain(z).sum(-1), x),
    )
    with pytest.raises(UnsupportedOp):
        torchdiv.laplacian(u, x, method="taylor")


def test_closure_over_x_that_sums_over_samples() -> None:
    """A kernel field over the particle set ``x`` itself (SVGD): the closure's sums over
    samples are of a constant, no sample mixing; "structured" neither refuses nor counts it."""
    x = torch.randn(6, 2, dtype=torch.float64)

    def field(z: torch.Tensor, particles: torch.Tensor) -> torch.Tensor:
        k = torch.exp(-((z[:, None] - particles[None]) ** 2).sum(-1))
        return (k[:, :, None] * (particles[None] - z[:, None])).sum(1) / len(particles)

    copy = x.clone()
    want = loop_diagonal(lambda z: field(z, copy), x).sum(-1)
    assert_close(torchdiv.divergence(lambda z: field(z, x), x, method="structured"), want)


@pytest.mark.parametrize("d", [3, 16])
def test_detach_in_place_is_a_constant(d: int) -> None:
    """``Tensor.detach_()`` inside ``f`` (no ATen call): "auto" gives what ``.detach()``
    gives (the norm a constant), also above ``LOOP_FALLBACK`` inputs, where its fallback is
    the loop of backward passes, not forward over reverse (which ignores ``detach_``);
    "taylor" and "structured" refuse, naming it."""
    lin = torch.nn.Linear(d, d).double()
    x = torch.randn(4, d, dtype=torch.float64)
    f = lambda z: lin(z) / z.norm(dim=-1, keepdim=True).detach_()  # noqa: E731
    g = lambda z: lin(z) / z.norm(dim=-1, keepdim=True).detach()  # noqa: E731
    u = lambda z: f(z).sum(-1) ** 2  # noqa: E731
    assert_close(
        torchdiv.laplacian(u, x), laplacian_by_grad_of_grad(lambda z: g(z).sum(-1) ** 2, x)
    )
    with pytest.raises(UnsupportedOp, match=r"detach_"):
        torchdiv.laplacian(u, x, method="taylor")
    for method in ("forward-over-reverse", "hessian"):  # (they saw through it, silently)
        with pytest.raises(NotImplementedError, match=r"detach_ in f.*write \.detach\(\)"):
            torchdiv.laplacian(u, x, method=method)
    with pytest.raises(UnsupportedOp, match=r"detach_"):
        torchdiv.divergence(f, x, method="structured")


@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
def test_generic_engines_watch_an_alias_of_x(method: str) -> None:
    """The generic engines' sample-mixing watch follows the argument ``f`` gets, not the
    caller's ``x`` object: a closure over ``x`` that reduces over samples is a constant, no
    ``BatchInteractionError`` (2-D ``x``: tiny, "auto" on the generic engines; 1-D ``x``:
    every element a sample, always watched)."""
    vnet = tanh_mlp(3, 6, 3)
    x = torch.randn(4, 3, dtype=torch.float64)
    scale = x.mean(0).clone()
    got = torchdiv.divergence(lambda z: vnet(z) * x.mean(0), x, method=method)
    assert_close(got, loop_diagonal(lambda z: vnet(z) * scale, x).sum(-1))
    x1 = torch.randn(5, dtype=torch.float64)
    got = torchdiv.divergence(lambda z: torch.tanh(z) * x1.sum(), x1, method=method)
    assert_close(got, (1 - torch.tanh(x1) ** 2) * x1.sum())
