"""rev-a34: review of mixsweep34's check of custom ``autograd.Function`` products
(``watch.custom_products``) and of the lead's way-out texts."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch

import torchdiv
from tests.api.test_mixsweep34 import _MixGrad  # (identity; its backward adds the mean)

f64 = torch.float64


class _Clip(torch.autograd.Function):
    """Identity forward; backward clips each element of its cotangent (per sample, but not
    linear in the cotangent: ``P(s v) != s P v``)."""

    @staticmethod
    def forward(ctx: object, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp(-0.05, 0.05)


class _RowNormalised(torch.autograd.Function):
    """Identity forward; backward normalises each sample's cotangent (per sample, degree 0
    homogeneous in it)."""

    @staticmethod
    def forward(ctx: object, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class _ClipMixed(torch.autograd.Function):
    """Identity forward; backward adds the batch mean, then clips: mixing and not linear."""

    @staticmethod
    def forward(ctx: object, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return (grad + grad.mean(0, keepdim=True)).clamp(-0.05, 0.05)


class _NeighbourDifference(torch.autograd.Function):
    """Identity forward; backward adds the difference of the next two samples' cotangents
    (linear, mixing; zero for a cotangent shared by the samples)."""

    @staticmethod
    def forward(ctx: object, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad + grad.roll(1, 0) - grad.roll(2, 0)


def _net(
    function: Callable[..., torch.Tensor],
) -> tuple[torch.nn.Linear, Callable[..., torch.Tensor]]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3).to(f64)
    return lin, lambda x: torch.tanh(lin(function(x)))


def _loop_divergence(f: Callable[..., torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The float64 per-sample loop: sum_i d f(X)[b, i] / d X[b, i] by ``autograd.grad`` with
    one-hot cotangents (the other samples' zero), kept differentiable in the parameters."""
    z = x.detach().clone().requires_grad_()
    y = f(z)
    out = []
    for b in range(x.shape[0]):
        total = z.new_zeros(())
        for i in range(x.shape[1]):
            (g,) = torch.autograd.grad(y[b, i], z, retain_graph=True, create_graph=True)
            total = total + g[b, i]
        out.append(total)
    return torch.stack(out)


@pytest.mark.parametrize("function", [_Clip, _RowNormalised], ids=["clip", "row_normalised"])
def test_a_per_sample_backward_not_linear_in_its_cotangent_is_served(function: type) -> None:
    """A ``backward`` that keeps samples apart but is not linear in its cotangent failed
    ``P(s v) = s P v`` and was refused as mixing samples (mixsweep34's check; before it, the
    per-sample loop's numbers): now served, values and parameter gradients the loop's (float64
    throughout: round-off ~1e-15, 1e-10 leaves room for the loop's other summation order)."""
    lin, f = _net(function.apply)
    x = torch.randn(6, 3, dtype=f64, generator=torch.Generator().manual_seed(1))
    ref = _loop_divergence(f, x)
    (ref_grad,) = torch.autograd.grad(ref.sum(), lin.weight)
    got = torchdiv.divergence(f, x)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    (grad,) = torch.autograd.grad(got.sum(), lin.weight)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "function", [_ClipMixed, _NeighbourDifference], ids=["clip_mixed", "neighbour_difference"]
)
@pytest.mark.parametrize("operator", ["divergence", "jacobian_diagonal"])
def test_a_mixing_backward_is_still_refused(function: type, operator: str) -> None:
    """The confirmation of a leak (the leaking sample's product from the other samples'
    cotangents alone) keeps refusing a mixing backward, nonlinear or one whose coupling
    vanishes for a cotangent shared by the samples."""
    _, f = _net(function.apply)
    x = torch.randn(6, 3, dtype=f64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(torchdiv.BatchInteractionError, match=r"custom autograd\.Function"):
        getattr(torchdiv, operator)(f, x)


class _SmallMean(torch.autograd.Function):
    """Identity forward; backward adds ``1e-3`` of the batch mean of its cotangent."""

    @staticmethod
    def forward(ctx: object, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad + 1e-3 * grad.mean(0, keepdim=True)


def test_a_small_coupling_through_the_batch_mean_is_still_refused_in_float32() -> None:
    """The confirmation takes the check's own leak (``(s - s_b) v``), not the other samples'
    ``s_c v`` alone, whose product at ``B = 1024`` is ``sqrt(B)`` times smaller: ``1e-3`` of
    the batch mean (the leak ``1e-3 |mean(s) - s_b|``, above float32's ``sqrt(eps)`` = 3.5e-4
    of the largest product) stays refused."""
    lin = torch.nn.Linear(3, 3)
    x = torch.randn(1024, 3, generator=torch.Generator().manual_seed(1))
    with pytest.raises(torchdiv.BatchInteractionError, match=r"custom autograd\.Function"):
        torchdiv.divergence(lambda t: torch.tanh(lin(_SmallMean.apply(t))), x)


class _Square(torch.autograd.Function):
    """``t**2 / 2`` per sample, its backward ``grad * t``."""

    @staticmethod
    def forward(ctx: object, t: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(t)  # type: ignore[attr-defined]
        return t * t / 2

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        (t,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad * t


class _Counted(torch.nn.Module):
    """``tanh(W fn(tanh x) + c) (1 + 0.01 u)``, ``u`` a fresh uniform draw per evaluation, a
    buffer counting evaluations."""

    def __init__(self, n: int, function: type) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.function = torch.nn.Linear(n, n).to(f64), function
        self.register_buffer("count", torch.zeros((), dtype=f64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count += 1
        noise = torch.rand(x.shape[-1], dtype=f64)
        return torch.tanh(self.lin(self.function.apply(torch.tanh(x)))) * (1 + 0.01 * noise)


LAPLACIANS = ["laplacian", "value_grad_laplacian", "weighted_laplacian", "hutchinson"]


def _laplacian(operator: str, f: Callable[..., torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    if operator == "hutchinson":
        probes = torch.randn(8, *x.shape, dtype=f64, generator=torch.Generator().manual_seed(2))
        return torchdiv.laplacian(f, x, method="hutchinson", probes=probes)
    if operator == "weighted_laplacian":
        return torchdiv.weighted_laplacian(f, x, diffusion=torch.eye(n, dtype=f64))
    out = getattr(torchdiv, operator)(f, x)
    return out.laplacian if operator == "value_grad_laplacian" else out


@pytest.mark.parametrize("n", [3, 12], ids=["loop", "forward_over_reverse"])
@pytest.mark.parametrize("operator", LAPLACIANS)
def test_a_mixing_backward_is_refused_at_the_laplacians_first_call(operator: str, n: int) -> None:
    """The Laplacians' ``"auto"`` (and the Hutchinson Laplacian) record ``f`` for the Taylor
    engine, which refuses the custom Function and has no graph to check its ``backward`` on;
    the fallback (the loop at 3 inputs, forward over reverse at 12) ran unwatched: the first
    call returned the batched trick's numbers (mixsweep34's left-alone case; at 12 inputs
    ``value_grad_laplacian``'s later calls too, once the first refused). Refused at every call
    now."""
    module = _Counted(n, _MixGrad)
    for call in range(2):
        x = torch.randn(4, n, dtype=f64, generator=torch.Generator().manual_seed(call))
        with pytest.raises(torchdiv.BatchInteractionError, match=r"custom autograd\.Function"):
            _laplacian(operator, module, x)


@pytest.mark.parametrize("n", [3, 12], ids=["loop", "forward_over_reverse"])
@pytest.mark.parametrize("operator", LAPLACIANS)
def test_a_per_sample_custom_function_under_the_laplacians_first_call(
    operator: str, n: int
) -> None:
    """The fallback's watch of a per-sample custom Function: served, the buffer moved and the
    generator drawn from as by one evaluation (the watched evaluation starts from the state
    the others do, ``Once``), the Laplacian the float64 loop's of ``autograd.grad`` at that
    draw (1e-10: float64 round-off of a few sums; Hutchinson against the probes' estimate
    from the loop's Hessians)."""
    module = _Counted(n, _Square)
    x = torch.randn(4, n, dtype=f64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    got = _laplacian(operator, module, x)
    after = torch.rand(1)
    assert module.count.item() == 1
    torch.manual_seed(5)
    z = x.clone().requires_grad_()
    y = module(z)
    assert torch.equal(torch.rand(1), after)
    hessians = torch.zeros(4, n, n, n, dtype=f64)  # (b, output, i, j)
    for b in range(4):
        for k in range(n):
            (g,) = torch.autograd.grad(y[b, k], z, create_graph=True)
            for i in range(n):
                (h,) = torch.autograd.grad(g[b, i], z, retain_graph=True)
                hessians[b, k, i] = h[b]
    if operator == "hutchinson":
        probes = torch.randn(8, 4, n, dtype=f64, generator=torch.Generator().manual_seed(2))
        ref = torch.einsum("rbi,bkij,rbj->bk", probes, hessians, probes) / 8
    else:
        ref = hessians.diagonal(dim1=2, dim2=3).sum(-1)
    torch.testing.assert_close(got.detach(), ref, rtol=1e-10, atol=1e-10)


class _CountingBackward(torch.autograd.Function):
    """``t * w`` per sample; its backward counts its calls into ``owner.count`` and draws from
    the global generator (gradient noise of ``1e-3`` scale per sample: affine, not linear, in
    its cotangent)."""

    @staticmethod
    def forward(ctx: object, t: torch.Tensor, owner: torch.nn.Module) -> torch.Tensor:
        ctx.owner = owner  # type: ignore[attr-defined]
        return t * 2

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        owner = ctx.owner  # type: ignore[attr-defined]
        with torch.no_grad():
            owner.count.add_(1)
        return 2 * grad + 1e-3 * torch.randn_like(grad), None


class _CountingNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 3).to(f64)
        self.register_buffer("count", torch.zeros((), dtype=f64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(_CountingBackward.apply(x, self)))


@pytest.mark.parametrize("operator", ["divergence", "jacobian_diagonal", "laplacian"])
def test_the_checks_products_leave_no_state(operator: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """mixsweep34's check of a custom Function's products runs its ``backward`` twice more:
    a backward that writes a buffer or draws (gradient noise) changed state by those passes
    (and its noise, affine in the cotangent, was refused as mixing). The same call with the
    check off leaves the same buffer and generator state; with it on, the call is served."""
    from torchdiv._core.mixing import watch

    x = torch.randn(4, 3, dtype=f64, generator=torch.Generator().manual_seed(1))
    after = []
    for check in (True, False):
        if not check:
            monkeypatch.setattr(watch, "_put_back", _not_put_back)
            monkeypatch.setattr(watch, "scaled_vjps", _no_products)
        net = _CountingNet()
        torch.manual_seed(3)
        getattr(torchdiv, operator)(net, x)
        after.append((net.count.item(), torch.get_rng_state()))
    assert after[0][0] == after[1][0]
    assert torch.equal(after[0][1], after[1][1])


def _no_products(apply: object, y: torch.Tensor, batch: torch.Size) -> tuple[torch.Tensor, ...]:
    """``scaled_vjps`` for the check turned off: no products, nothing leaks."""
    zeros = torch.zeros(2, *y.shape, dtype=y.dtype)
    return zeros, torch.ones(batch, dtype=y.dtype)


def _not_put_back(x: torch.Tensor) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def _hermitian(z: torch.Tensor, complex_: bool) -> torch.Tensor:
    """``c c^H + (c c^H)^H + diag(0, 1, 2, 3)`` of the sample's 4-vector ``c`` (complex: of
    its 8 real inputs; real: of its first 4), distinct eigenvalues."""
    c = torch.view_as_complex(z.reshape(*z.shape[:-1], 4, 2)) if complex_ else z[..., :4]
    a = c[..., :, None] * c.conj()[..., None, :]
    return a + a.mH + torch.diag(torch.arange(4.0, dtype=z.dtype)).to(a.dtype)


def _spectrum(z: torch.Tensor) -> torch.Tensor:
    """The eigenvalues of the complex ``_hermitian``, twice (8 outputs, one per input)."""
    w = torch.linalg.eigvalsh(_hermitian(z, True))
    return torch.cat([w, w], -1)


def _eigenvector_weights(z: torch.Tensor) -> torch.Tensor:
    """``eigh`` of the real ``_hermitian`` with its eigenvectors used: ``sum_i v_ij^2 w_j``."""
    w, v = torch.linalg.eigh(_hermitian(z, False))
    out = (v**2 * w[..., None, :]).sum(-1)
    return torch.cat([out, out], -1)


def _loop_laplacian(f: Callable[..., torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Each sample's Hessian traces by float64 ``torch.autograd.functional.hessian``."""
    m = f(x[:1]).shape[-1]
    return torch.stack(
        [
            torch.stack(
                [
                    torch.autograd.functional.hessian(lambda z, k=k: f(z[None])[0, k], s).trace()
                    for k in range(m)
                ]
            )
            for s in x
        ]
    )


def _named_way(error: BaseException) -> str:
    return str(error).rpartition("; use ")[2]


def test_value_grad_laplacians_forward_over_reverse_refusal_names_a_method_it_has() -> None:
    """Forward over reverse refuses ``eigvalsh`` (PyTorch's forward-mode derivatives are
    ``nan`` at that order); ``value_grad_laplacian``'s refusal named ``'grad-of-grad'``
    (``NESTED_WAY_OUT``), which it rejects as an unknown method, and of a complex matrix
    only that (the lead's ``_real_way_out`` dropped ``'taylor'``). Now ``'auto'``, which runs
    (the loop of backward passes): the Laplacian the float64 loop's (1e-8: eigenvalue
    derivatives of a 4x4 matrix, float64 round-off amplified by gaps of ~1)."""
    x = torch.randn(3, 8, dtype=f64, generator=torch.Generator().manual_seed(2))
    with pytest.raises(NotImplementedError, match="eigvalsh") as info:
        torchdiv.value_grad_laplacian(_spectrum, x, method="forward-over-reverse")
    assert _named_way(info.value) == "method='auto'", str(info.value)
    got = torchdiv.value_grad_laplacian(_spectrum, x, method="auto").laplacian
    torch.testing.assert_close(got, _loop_laplacian(_spectrum, x), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("method", ["forward-over-reverse", "hessian"])
def test_eighs_refusal_does_not_name_taylor(method: str) -> None:
    """``eigh`` refused by forward over reverse ("backward passes only are right") named
    ``'taylor' or 'grad-of-grad'``; the Taylor engine has rules for its eigenvalues only and
    refuses ``f``'s use of the eigenvectors. Only ``'grad-of-grad'`` now, which runs
    (1e-8 as above)."""
    x = torch.randn(3, 8, dtype=f64, generator=torch.Generator().manual_seed(2))
    with pytest.raises(NotImplementedError, match="eigh") as info:
        torchdiv.laplacian(_eigenvector_weights, x, method=method)
    assert _named_way(info.value) == "method='grad-of-grad'", str(info.value)
    with pytest.raises(NotImplementedError, match="eigenvectors"):  # what it left out
        torchdiv.laplacian(_eigenvector_weights, x, method="taylor")
    got = torchdiv.laplacian(_eigenvector_weights, x, method="grad-of-grad")
    torch.testing.assert_close(got, _loop_laplacian(_eigenvector_weights, x), rtol=1e-8, atol=1e-8)
