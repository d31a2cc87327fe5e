"""The real ``neuraloperator`` package's models (FNO, TFNO with Tucker and CP spectral
weights, UNO), built as its examples build them on 2-D Darcy-like inputs ``(B, C, H, W)``.

Divergences and Jacobian diagonals of the operator map ``u -> G(u)`` (input and output on the
same grid), Laplacians of the per-sample functional ``mean(G(u)^2)``, Hutchinson estimates
with given probes, and a PINO-style divergence with respect to coordinates given as input
channels through the library's ``GridEmbedding2D``; values and parameter gradients (the
complex spectral weights' included) against per-sample loops of autograd and, for the
complex weights' conjugation convention, central differences.

``SpectralConv`` writes its product into a ``torch.cfloat`` spectrum whatever the weights'
dtype, so a float64 model is float32-accurate along the spectral path: its derivatives by
forward and reverse mode differ by ~3e-9 relative (measured on ``fno``), hence ``TOL``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import laplacian_alone

import torchdiv
from torchdiv import BatchInteractionError
from torchdiv._laplacian import methods as laplacian_methods

neuralop = pytest.importorskip("neuralop")
from neuralop.layers.embeddings import GridEmbedding2D  # noqa: E402
from neuralop.layers.spectral_convolution import SpectralConv  # noqa: E402
from neuralop.models import FNO, TFNO, UNO  # noqa: E402

f64 = torch.float64
# round-off of the complex64 spectrum (eps 6e-8) carried through the layers, with margin
TOL = {"rtol": 1e-6, "atol": 1e-9}


def _double(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in float64 and complex128 (``Module.double()`` leaves complex weights alone
    and ``.to(float64)`` drops their imaginary parts)."""

    def cast(t: torch.Tensor) -> torch.Tensor:
        if t.is_complex():
            return t.to(torch.complex128)
        return t.to(f64) if t.is_floating_point() else t

    return model._apply(cast)


def _model(name: str, layers: int = 1) -> torch.nn.Module:
    """Small versions of the library's examples: ``n_modes``, ``hidden_channels`` and the
    rest as its Darcy scripts pass them."""
    torch.manual_seed(0)
    common = {"in_channels": 1, "out_channels": 1, "hidden_channels": 4}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "fno":
            model = FNO(n_modes=(3, 3), n_layers=layers, **common)
        elif name == "group_norm":  # a per-sample norm: no false refusal
            model = FNO(n_modes=(3, 3), n_layers=layers, norm="group_norm", **common)
        elif name == "fno_padded":
            model = FNO(n_modes=(3, 3), n_layers=1, domain_padding=0.25, **common)
        elif name in ("tucker", "cp"):
            model = TFNO(n_modes=(3, 3), n_layers=layers, factorization=name, rank=0.5, **common)
        else:
            model = UNO(
                hidden_channels=4,
                in_channels=1,
                out_channels=1,
                lifting_channels=4,
                projection_channels=4,
                n_layers=3,
                uno_out_channels=[4, 6, 4],
                uno_n_modes=[[3, 3], [2, 2], [3, 3]],
                uno_scalings=[[1, 1], [0.5, 0.5], [2, 2]],
                horizontal_skips_map={2: 0},
                channel_mlp_skip="linear",
            )
    return _double(model)


def _loop_jacobians(f, x: torch.Tensor) -> torch.Tensor:
    """Each sample's Jacobian ``(B, n, n)`` by plain autograd on that sample alone, with
    ``create_graph`` (``vmap(jacrev)`` cannot run these models: ``SpectralConv`` writes in
    place into a spectrum it made, which ``vmap`` refuses)."""
    n = x[0].numel()
    return torch.stack(
        [
            torch.autograd.functional.jacobian(f, x[b : b + 1], create_graph=True).reshape(n, n)
            for b in range(len(x))
        ]
    )


def _gradients(params: list[torch.Tensor], loss: torch.Tensor) -> list[torch.Tensor]:
    """``d loss / d p`` for every ``p`` (complex ones too), zeros where unused."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _assert_gradients(params: list[torch.Tensor], loss: torch.Tensor, expected) -> None:
    """``loss``'s parameter gradients are ``expected`` (``_gradients`` of the reference,
    computed once: differentiating the loop's graph again costs more than the methods)."""
    for got, want in zip(_gradients(params, loss), expected, strict=True):
        torch.testing.assert_close(got, want, **TOL)


def _complex_gradient_check(model: torch.nn.Module, loss) -> None:
    """The gradient of the real ``loss()`` w.r.t. every complex parameter is PyTorch's
    ``dL/dRe p + i dL/dIm p``: its real inner product with a complex direction ``v`` is the
    derivative along ``v``, checked by central differences (step 1e-2: the complex64
    spectrum's round-off over the step stays ~1e-5 relative)."""
    params = [p for p in model.parameters() if p.is_complex()]
    assert params
    grads = torch.autograd.grad(loss(), params)
    directions = [torch.randn_like(p) for p in params]
    along = sum(
        (torch.view_as_real(g) * torch.view_as_real(v)).sum()
        for g, v in zip(grads, directions, strict=True)
    )

    def shifted(t: float) -> torch.Tensor:
        with torch.no_grad():
            for p, v in zip(params, directions, strict=True):
                p.add_(v, alpha=t)
        try:
            return loss().detach()
        finally:
            with torch.no_grad():
                for p, v in zip(params, directions, strict=True):
                    p.sub_(v, alpha=t)

    h = 1e-2
    central = (8 * (shifted(h / 2) - shifted(-h / 2)) - (shifted(h) - shifted(-h))) / (6 * h)
    torch.testing.assert_close(along.detach(), central, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize(  # 0.15-0.34 s each (one thread); only the FNO always runs
    "name",
    [
        "fno",
        *(
            pytest.param(n, marks=pytest.mark.slow)
            for n in ("fno_padded", "group_norm", "tucker", "cp", "uno")
        ),
    ],
)
def test_divergence_and_diagonal_with_parameter_gradients_match_a_per_sample_loop(name):
    """Every exact method's Jacobian diagonal and ``"auto"``'s divergence of the operator
    map, and the gradients of a loss of the divergence with respect to every parameter
    (complex spectral weights, Tucker/CP factors, soft-gating skips, domain padding),
    against the loop; the complex weights' gradient convention against central
    differences."""
    model = _model(name)
    x = torch.randn(2, 1, 4, 4, dtype=f64)
    jac = _loop_jacobians(model, x)
    diagonal = jac.diagonal(dim1=1, dim2=2).reshape(x.shape)
    params = list(model.parameters())
    expected = _gradients(params, diagonal.square().sum())
    for method in ("auto", "reverse", "forward"):
        got = torchdiv.jacobian_diagonal(model, x, method=method)
        torch.testing.assert_close(got, diagonal, **TOL)
        _assert_gradients(params, got.square().sum(), expected)
    div = torchdiv.divergence(model, x)
    want = diagonal.sum((1, 2, 3))
    torch.testing.assert_close(div, want, **TOL)
    _assert_gradients(params, div.square().sum(), _gradients(params, want.square().sum()))
    if name == "fno":
        _complex_gradient_check(model, lambda: torchdiv.divergence(model, x).square().sum())


def test_structured_refuses_the_ffts_naming_them_and_the_way_out():
    model = _model("fno")
    x = torch.randn(2, 1, 6, 6, dtype=f64)
    with pytest.raises(NotImplementedError, match=r"_fft_r2c.*method='auto'"):
        torchdiv.divergence(model, x, method="structured")
    with pytest.raises(NotImplementedError, match="_fft_r2c"):
        torchdiv.laplacian(lambda u: model(u).square().mean((1, 2, 3)), x, method="taylor")


def test_laplacian_of_a_functional_runs_forward_over_reverse_not_the_loop(monkeypatch):
    """``"auto"``'s Laplacian of ``mean(G(u)^2)`` (16 inputs: the Taylor engine has no FFT
    rule) falls back to forward over reverse. ``SpectralConv``'s ``out_fft[idx] = ...`` into
    a fresh spectrum only sliced before the write was taken for a write reading the tensor
    it writes (the slice counted as a read), which sent ``"auto"`` to the loop of backward
    passes: 3.4x slower (FNO and Tucker TFNO, 2 layers, 8x8 grid, batch 4, one thread: 1.32
    and 1.59 s against 0.39 and 0.46 s)."""
    model = _model("fno")
    x = torch.randn(2, 1, 4, 4, dtype=f64)

    def functional(u: torch.Tensor) -> torch.Tensor:
        return model(u).square().mean((1, 2, 3))

    loops = []
    loop = laplacian_methods.grad_of_grad
    monkeypatch.setattr(
        laplacian_methods, "grad_of_grad", lambda *a, **k: loops.append(1) or loop(*a, **k)
    )
    got = torchdiv.laplacian(functional, x)
    assert not loops
    nested = torchdiv.laplacian(functional, x, method="forward-over-reverse")
    torch.testing.assert_close(got, nested, rtol=0, atol=0)


@pytest.mark.slow  # 0.25-0.32 s each (one thread): the forward-over-reverse fallback's test is fast
@pytest.mark.parametrize("name", ["fno", "tucker"])
def test_laplacian_of_a_functional_and_its_parameter_gradients_match_a_per_sample_loop(name):
    model = _model(name)
    x = torch.randn(2, 1, 4, 4, dtype=f64)

    def functional(u: torch.Tensor) -> torch.Tensor:
        return model(u).square().mean((1, 2, 3))

    want = laplacian_alone(functional, x)
    params = list(model.parameters())
    expected = _gradients(params, want.sum())
    for method in ("auto", "forward-over-reverse", "hessian"):
        got = torchdiv.laplacian(functional, x, method=method)
        torch.testing.assert_close(got, want, **TOL)
        _assert_gradients(params, got.sum(), expected)


def test_hutchinson_with_given_probes_is_the_probes_quadratic_form():
    """``divergence`` and ``laplacian`` by ``"hutchinson"`` with ``probes`` are the mean of
    ``v^T J v`` and ``v^T H v`` over the given probes, per sample."""
    model = _model("tucker")
    x = torch.randn(2, 1, 4, 4, dtype=f64)
    v = torch.randn(3, *x.shape, dtype=f64)
    flat = v.reshape(3, 2, 16)
    jac = _loop_jacobians(model, x)
    want = torch.einsum("kbi,bij,kbj->b", flat, jac, flat) / 3
    got = torchdiv.divergence(model, x, method="hutchinson", probes=v)
    torch.testing.assert_close(got, want, **TOL)
    params = list(model.parameters())
    _assert_gradients(params, got.square().sum(), _gradients(params, want.square().sum()))

    def functional(u: torch.Tensor) -> torch.Tensor:
        return model(u).square().mean((1, 2, 3))

    hessians = torch.stack(
        [
            torch.autograd.functional.hessian(lambda u: functional(u).sum(), x[b : b + 1]).reshape(
                16, 16
            )
            for b in range(2)
        ]
    )
    want = torch.einsum("kbi,bij,kbj->b", flat, hessians, flat) / 3
    got = torchdiv.laplacian(functional, x, method="hutchinson", probes=v)
    torch.testing.assert_close(got, want, **TOL)


def test_pino_divergence_with_respect_to_coordinate_channels_through_grid_embedding():
    """A velocity field ``G(c)`` of coordinate channels ``c`` (a perturbed grid, ``(B, 2, H,
    W)``), to which the library's ``GridEmbedding2D`` adds its own grid: the divergence
    ``sum_p d G_k(p) / d c_k(p)`` per sample, and its parameter gradients, against the
    loop."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FNO(
            n_modes=(3, 3),
            hidden_channels=4,
            in_channels=2,
            out_channels=2,
            n_layers=1,
            positional_embedding=GridEmbedding2D(in_channels=2),
        )
    model = _double(model)
    grid = torch.stack(
        torch.meshgrid(torch.linspace(0, 1, 4), torch.linspace(0, 1, 4), indexing="ij")
    )
    c = grid.to(f64) + 0.01 * torch.randn(2, 2, 4, 4, dtype=f64)
    want = _loop_jacobians(model, c).diagonal(dim1=1, dim2=2).sum(-1)
    params = list(model.parameters())
    expected = _gradients(params, want.sum())
    for method in ("auto", "forward"):
        got = torchdiv.divergence(model, c, method=method)
        torch.testing.assert_close(got, want, **TOL)
        _assert_gradients(params, got.sum(), expected)


def test_spectral_conv_along_the_batch_is_refused_and_along_space_passes():
    """The library's 2-D ``SpectralConv`` given ``(B, C, N)`` samples as one ``(1, C, B, N)``
    image transforms along the batch: refused by ``"auto"`` and Hutchinson (the explicit
    methods do not watch, as documented); the same layer on
    ``(B, C, H, W)`` passes."""
    torch.manual_seed(0)
    conv = _double(SpectralConv(2, 2, n_modes=(3, 3)))
    x = torch.randn(4, 2, 6, dtype=f64)

    def across(z: torch.Tensor) -> torch.Tensor:
        return conv(z.transpose(0, 1)[None])[0].transpose(0, 1)

    with pytest.raises(BatchInteractionError, match="_fft_r2c along samples"):
        torchdiv.divergence(across, x)
    with pytest.raises(BatchInteractionError, match="_fft_r2c along samples"):
        torchdiv.divergence(across, x, method="hutchinson", num_probes=2)
    image = torch.randn(2, 2, 4, 4, dtype=f64)
    want = _loop_jacobians(conv, image).diagonal(dim1=1, dim2=2).sum(-1)
    torch.testing.assert_close(torchdiv.divergence(conv, image), want, **TOL)
