"""rev-late33: late review of the session's error and refusal paths (``_api/reporting.py``,
``_core/modes.py``'s ``underived``, forward mode's and the Taylor recorder's refusals).

Each test pins a fault found: a refusal's hint that says something untrue of the call, or a way
out that fails. References: the closed forms of ``f`` in float64 (exact to rounding)."""

from __future__ import annotations

import pytest
import torch

import torchdiv


def _geqrf(z: torch.Tensor) -> torch.Tensor:
    """An op of ``f`` PyTorch has no derivative for at all (``geqrf``: "the derivative for
    'geqrf' is not implemented" from the first backward pass)."""
    return torch.geqrf(z.reshape(z.shape[0], 2, 2))[0].reshape(z.shape)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: torchdiv.divergence(_geqrf, x),
        lambda x: torchdiv.jacobian(_geqrf, x, method="reverse"),
        lambda x: torchdiv.laplacian(_geqrf, x, method="grad-of-grad"),
    ],
    ids=["divergence", "jacobian", "laplacian"],
)
def test_an_op_of_f_without_any_derivative_is_not_called_a_second_derivative(call) -> None:
    """``geqrf`` applied by ``f`` itself has no first derivative: the hint said
    "which divergence's second derivatives of f ... need: write that part of f with ops PyTorch
    differentiates twice", untrue of a first-order call and of the cause."""
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(NotImplementedError) as info:
        call(x)
    hint = str(info.value).partition("Hint: ")[2]
    assert "'geqrf'" in hint and "second derivatives" not in hint
    assert "differentiates twice" not in hint
    # the hint's claim: plain autograd cannot take f's first derivative through it
    y = x.clone().requires_grad_()
    with pytest.raises(NotImplementedError, match="derivative for 'geqrf'"):
        torch.autograd.grad(_geqrf(y).sum(), y)


def _pairwise(z: torch.Tensor) -> torch.Tensor:
    """Per sample, the sums of distances between its entries: ``torch.cdist`` batched over
    the samples (within each sample only), whose backward ``torch.func.vmap`` batches wrong."""
    return torch.cdist(z.unsqueeze(-1), z.unsqueeze(-1)).sum(-1)


def _per_sample_jacobians(f, x: torch.Tensor) -> torch.Tensor:
    """The reference: each sample's Jacobian by a float64 loop of ``torch.autograd.grad``,
    one unit cotangent at a time."""
    z = x.clone().requires_grad_()
    y = f(z)
    rows = []
    for j in range(y.shape[-1]):
        cot = torch.zeros_like(y)
        cot[:, j] = 1
        (g,) = torch.autograd.grad(y, z, cot, retain_graph=True)
        rows.append(g)
    return torch.stack(rows, 1)  # (N, out, in)


def test_graph_jacobian_through_cdist_matches_backward_passes() -> None:
    """``graph_jacobian`` of a caller's graph through ``torch.cdist``: the engine's batched
    pass by ``torch.func.vmap`` of ``autograd.grad`` is wrong for ``_cdist_backward`` (off by
    2 at D = 4); the graph form keeps PyTorch's own cdist (torchdiv does not evaluate f)."""
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z = x.clone().requires_grad_()
    got = torchdiv.graph_jacobian(_pairwise(z), z)
    # float64, sums of a few terms of size ~1: rounding below 1e-12
    torch.testing.assert_close(got, _per_sample_jacobians(_pairwise, x), rtol=1e-12, atol=1e-12)


def test_check_batch_independence_passes_a_per_sample_cdist() -> None:
    """A per-sample ``cdist`` was refused as mixing samples ("samples interact", a
    cross-sample gradient of 4.4 from the wrong batched pullback)."""
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    full = torch.autograd.functional.jacobian(_pairwise, x)  # (3, 4, 3, 4): block diagonal
    assert all(full[b, :, c].abs().max() == 0 for b in range(3) for c in range(3) if b != c)
    torchdiv.check_batch_independence(_pairwise, x)


def _inference_scaled(lin: torch.nn.Module):
    """``f(z) = z * c``, ``c = lin(z)`` computed under ``torch.inference_mode()`` (a constant
    to f's derivatives) and viewed: torch.func's transforms refuse the view ("Cannot set
    version_counter for inference tensor"); plain autograd refuses the product, which saves
    ``c`` for its backward ("Inference tensors cannot be saved for backward")."""

    def f(z: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            c = lin(z.detach())
        return z * c.view(z.shape)

    return f


def _no_grad_scaled(lin: torch.nn.Module):
    """The way out: the same constant computed under ``torch.no_grad()``."""

    def f(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            c = lin(z.detach())
        return z * c.view(z.shape)

    return f


@pytest.mark.parametrize(
    ("fn", "method", "auto"),
    [
        ("divergence", "forward", "auto"),
        ("divergence", "reverse", "auto"),
        ("laplacian", "forward-over-reverse", "grad-of-grad"),
    ],
)
def test_an_inference_view_hint_names_no_plain_way_that_raises(fn, method, auto) -> None:
    """The hint named ``method='auto'`` ("plain autograd runs it") as a way out of the view of
    an inference tensor; here plain autograd refuses the product that saves it. The way out
    that runs, ``torch.no_grad()``, gives the closed form: ``div(z * c) = sum_i c_i``,
    ``lap(z * c) = 0`` (float64: rounding of a sum of 4 terms, 1e-12)."""
    lin = torch.nn.Linear(4, 4).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    call = getattr(torchdiv, fn)
    with pytest.raises(RuntimeError, match="version_counter") as info:
        call(_inference_scaled(lin), x, method=method)
    hint = str(info.value).partition("Hint: ")[2]
    assert "torch.no_grad()" in hint
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved"):
        call(_inference_scaled(lin), x, method=auto)  # so the hint may not promise it
    assert "(plain autograd runs it)" not in hint
    got = call(_no_grad_scaled(lin), x, method=method)
    with torch.no_grad():
        c = lin(x)
    want = c.sum(-1) if fn == "divergence" else torch.zeros_like(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


_LIB = torch.library.Library("revlate33", "DEF")  # (kept alive: the op lives with it)
_LIB.define("square(Tensor x) -> Tensor")
# a backend kernel alone (no autograd kernel, no derivative): PyTorch's autograd fallback
# would take its result for a constant, which torchdiv refuses by name (WrongDerivatives)
_LIB.impl("square", lambda t: torch.from_numpy(t.detach().numpy() ** 2), "CPU")
torch.library.register_fake("revlate33::square")(lambda t: torch.empty_like(t))


@pytest.mark.parametrize(
    "call",
    [
        lambda f, x: torchdiv.laplacian(f, x, method="taylor"),
        lambda f, x: torchdiv.biharmonic(f, x, method="taylor"),
        lambda f, x: torchdiv.weighted_laplacian(
            f, x, diffusion=torch.eye(4, dtype=x.dtype), method="taylor"
        ),
        lambda f, x: torchdiv.divergence(f, x, method="structured"),
        lambda f, x: torchdiv.value_grad_laplacian(f, x, method="taylor"),
    ],
    ids=["laplacian", "biharmonic", "weighted_laplacian", "divergence", "value_grad_laplacian"],
)
def test_a_recording_refusal_of_an_op_without_autograd_kernel_names_no_method(call) -> None:
    """A ``torch.library`` op with a CPU kernel alone: the recorders' refusal named
    ``method='auto'`` (or the nested grad-of-grad loop), which refuse the op too: PyTorch's
    autograd fallback would differentiate it silently wrong. The way out is its derivative."""
    f = torch.ops.revlate33.square
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(NotImplementedError) as info:
        call(f, x)
    message = str(info.value)
    assert "revlate33" in message
    assert "method='auto'" not in message and "grad-of-grad" not in message, message
    assert "register_autograd" in message
    for way in (torchdiv.laplacian, torchdiv.divergence):  # every method refuses it
        with pytest.raises(RuntimeError, match="revlate33::square in f has no autograd kernel"):
            way(f, x)


@torch.library.custom_op("revlate33::numpy_cube", mutates_args=())
def _numpy_cube(t: torch.Tensor) -> torch.Tensor:
    """``t ** 3`` by NumPy, no ``register_autograd``: no derivative at all."""
    return torch.from_numpy(t.detach().numpy() ** 3)


_numpy_cube.register_fake(lambda t: torch.empty_like(t))


def _gradient_field(z: torch.Tensor) -> torch.Tensor:
    """``f = grad E`` taken by ``f`` itself, ``E`` through ``_numpy_cube``: ``f``'s own
    ``autograd.grad`` raises PyTorch's "no autograd formula was registered"."""
    with torch.enable_grad():
        w = z if z.requires_grad else z.detach().requires_grad_()
        return torch.autograd.grad(_numpy_cube(w).sum(), w, create_graph=True)[0]


@pytest.mark.parametrize("fn", ["divergence", "laplacian"])
def test_f_own_backward_through_an_op_without_derivative_keeps_its_hint(fn) -> None:
    """The lead's hint for a custom op without a derivative ("register_autograd for ...") on
    an error raised inside ``f`` (``f``'s own backward pass) was lost in the merge of
    nnsweep33's ``_no_second_derivative`` (reached only outside ``f``): the refusal of
    ``"auto"`` came with no hint."""
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="no autograd formula was registered") as info:
        getattr(torchdiv, fn)(_gradient_field, x)
    hint = str(info.value).partition("Hint: ")[2]
    assert "revlate33" in hint and "register_autograd" in hint, str(info.value)
