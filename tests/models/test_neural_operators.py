"""Neural operators as their repositories write them: a Fourier neural operator (Li et al.
2021: a lifting ``Linear``, ``SpectralConv1d`` with ``torch.cfloat`` weights on the lowest
``rfft`` modes written into a fresh spectrum, ``irfft`` back, a pointwise ``Conv1d`` skip,
GELU, a projection), whose sample is a whole function on a grid, ``(B, N, 1)``.

Values and parameter gradients (the complex weights' too) of its divergence, Jacobian
diagonal and Jacobian with respect to the input function, against a per-sample loop of plain
autograd in float64; and the sample-mixing watch on the mistakes spectral code makes along the
batch (an FFT over every dimension, a spectrum averaged over the batch, a train-mode batch norm
after a spectral layer), which complex intermediates took past it: the watch dropped every
complex tensor, so ``"auto"`` returned other samples' terms silently.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchdiv
from torchdiv import BatchInteractionError

f64 = torch.float64
c128 = torch.complex128


class SpectralConv1d(nn.Module):
    """neuraloperator's ``fourier_1d.py`` layer: complex weights on the lowest ``modes``."""

    def __init__(self, width: int, modes: int) -> None:
        super().__init__()
        self.modes = modes
        scale = 1 / (width * width)
        self.weights = nn.Parameter(scale * torch.rand(width, width, modes, dtype=c128))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, width, N)
        h_ft = torch.fft.rfft(h)
        out_ft = torch.zeros(len(h), h.shape[1], h.shape[-1] // 2 + 1, dtype=c128)
        low = torch.einsum("bix,iox->box", h_ft[:, :, : self.modes], self.weights)
        out_ft[:, :, : self.modes] = low
        return torch.fft.irfft(out_ft, n=h.shape[-1])


class FNO1d(nn.Module):
    """Lift ``(a(x), x)`` to ``width`` channels, two Fourier layers with skips, project. With
    ``batch_norm``, the early FNO code's batch norm after each spectral layer (no skip)."""

    def __init__(self, width: int = 5, modes: int = 3, batch_norm: bool = False) -> None:
        super().__init__()
        self.fc0 = nn.Linear(2, width, dtype=f64)
        self.convs = nn.ModuleList(SpectralConv1d(width, modes) for _ in range(2))
        self.ws = nn.ModuleList(nn.Conv1d(width, width, 1, dtype=f64) for _ in range(2))
        self.bn = nn.BatchNorm1d(width, dtype=f64) if batch_norm else None
        self.fc1 = nn.Linear(width, 1, dtype=f64)

    def forward(self, a: torch.Tensor) -> torch.Tensor:  # (B, N, 1) -> (B, N, 1)
        grid = torch.linspace(0, 1, a.shape[1], dtype=a.dtype).reshape(1, -1, 1)
        h = self.fc0(torch.cat([a, grid.repeat(len(a), 1, 1)], -1)).permute(0, 2, 1)
        for conv, w in zip(self.convs, self.ws, strict=True):
            h = F.gelu(self.bn(conv(h)) if self.bn is not None else conv(h) + w(h))
        return self.fc1(h.permute(0, 2, 1))


def _loop_jacobians(f, x: torch.Tensor) -> torch.Tensor:
    """Each sample's Jacobian, ``(B, N, N)``, by plain autograd on that sample alone."""
    n = x[0].numel()
    rows = [
        torch.autograd.functional.jacobian(f, x[b : b + 1], create_graph=True).reshape(n, n)
        for b in range(len(x))
    ]
    return torch.stack(rows)


@pytest.mark.slow
def test_fno_operators_and_complex_weight_gradients_match_a_per_sample_loop() -> None:
    """Every exact method's divergence, Jacobian diagonal and Jacobian of the FNO's output
    function with respect to its input function, and the gradients of a loss of each with
    respect to every parameter (the complex spectral weights included), agree with the loop."""
    torch.manual_seed(0)
    net = FNO1d()
    x = torch.randn(3, 8, 1, dtype=f64)
    jac = _loop_jacobians(net, x)
    expected = {
        "divergence": jac.diagonal(0, -2, -1).sum(-1),
        "jacobian_diagonal": jac.diagonal(0, -2, -1).reshape(x.shape),
        "jacobian": jac.reshape(3, 8, 1, 8, 1),
    }
    params = list(net.parameters())
    for name, want in expected.items():
        weights = torch.randn_like(want)
        want_grads = torch.autograd.grad(
            (want * weights).sum(), params, retain_graph=True, materialize_grads=True
        )
        for method in ("auto", "forward", "reverse"):
            got = getattr(torchdiv, name)(net, x, method=method)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
            grads = torch.autograd.grad((got * weights).sum(), params, materialize_grads=True)
            for g, w in zip(grads, want_grads, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def _spectrum_mean(z: torch.Tensor) -> torch.Tensor:
    spectrum = torch.fft.rfft(z)
    return torch.fft.irfft(spectrum - spectrum.mean(0), n=z.shape[-1])


def _spectrum_shifted(z: torch.Tensor) -> torch.Tensor:
    spectrum = torch.fft.rfft(z)
    out = torch.zeros_like(spectrum)
    out[1:] = spectrum[:-1]  # sample b's modes written into sample b + 1's row
    return torch.fft.irfft(out, n=z.shape[-1])


def _pairs_mean(z: torch.Tensor) -> torch.Tensor:
    pairs = torch.view_as_complex(z.reshape(len(z), -1, 2))
    return torch.view_as_real(pairs * pairs.mean(0)).reshape(z.shape)


MIXING = {  # f of z (B, 8): a spectral mistake along the batch -> what the error names
    "fftn without dim": (lambda z: torch.fft.ifftn(torch.fft.fftn(z) ** 2).real, "_fft_c2c along"),
    "complex fft over the batch": (
        lambda z: torch.fft.fft(z.to(c128), dim=0).abs(),
        "_fft_c2c along samples",
    ),
    "irfft over the batch": (
        lambda z: torch.fft.irfft(z.to(c128), n=2 * len(z) - 2, dim=0)[: len(z)],
        "_fft_c2r along samples",
    ),
    "spectrum averaged over the batch": (_spectrum_mean, "a mean over samples"),
    "complex pairs averaged over the batch": (_pairs_mean, "a mean over samples"),
    "spectrum written into the next sample's row": (_spectrum_shifted, "moved samples"),
    "spectrum rolled along the batch": (
        lambda z: torch.fft.irfft(torch.fft.rfft(z).roll(1, 0), n=z.shape[-1]),
        "aten.roll.default moved samples",
    ),
    "spectra summed over the batch": (
        lambda z: z * torch.view_as_real(torch.fft.rfft(z)).sum((0, 1, 2)),
        "a sum over samples",
    ),
}


@pytest.mark.parametrize("case", list(MIXING))
@pytest.mark.parametrize(
    ("name", "method"), [("divergence", "auto"), ("jacobian", "auto"), ("laplacian", "auto")]
)
def test_spectral_mistakes_along_the_batch_are_refused(case: str, name: str, method: str) -> None:
    """Before: the watch dropped complex tensors (``fftn`` casts to complex first, every
    ``rfft`` result is complex), so these passed and ``"auto"`` returned other samples' terms.
    Each truly mixes (plain autograd's cross-batch Jacobian has blocks off the diagonal)."""
    f, what = MIXING[case]
    torch.manual_seed(1)
    x = torch.randn(4, 8, dtype=f64)
    full = torch.autograd.functional.jacobian(f, x).reshape(4, 8, 4, 8)
    blocks = full.diagonal(0, 0, 2)
    assert float(full.abs().sum() - blocks.abs().sum()) > 1e-3
    g = (lambda z: f(z).square().sum(-1)) if name == "laplacian" else f
    with pytest.raises(BatchInteractionError, match=rf"^{name}: f mixes samples: .*{what}"):
        getattr(torchdiv, name)(g, x, method=method)


def test_view_as_complex_of_pairs_of_samples_is_refused() -> None:
    """Two samples along the last dimension (``x.T`` with ``B = 2``) viewed as one complex
    number each: squaring it combines them (a cross-sample Jacobian block of norm ~2). It
    passed; now ``view_as_complex`` is named."""
    torch.manual_seed(5)
    x = torch.randn(2, 4, dtype=f64)
    f = lambda z: torch.view_as_real(torch.view_as_complex(z.T.contiguous()) ** 2).T  # noqa: E731
    full = torch.autograd.functional.jacobian(f, x)
    assert float(full[0, :, 1].abs().max()) > 0.1
    with pytest.raises(BatchInteractionError, match=r"view_as_complex pairing samples"):
        torchdiv.divergence(f, x)


def test_batch_norm_after_a_spectral_layer_is_refused() -> None:
    """The early FNO code's train-mode batch norm after the spectral convolution (here without
    the skip, whose real path the watch followed): ``"auto"`` returned divergences 5-24% off
    the per-sample blocks' traces (5.09, 3.08, 2.30 for 5.36, 3.47, 3.02) without an error."""
    torch.manual_seed(0)
    net = FNO1d(batch_norm=True)
    x = torch.randn(3, 8, 1, dtype=f64)
    for method, kwargs in [("auto", {}), ("hutchinson", {"num_probes": 2})]:
        with pytest.raises(BatchInteractionError, match=r"a batch norm in train mode"):
            torchdiv.divergence(net, x, method=method, **kwargs)
    with pytest.raises(BatchInteractionError, match=r"a batch norm in train mode"):
        torchdiv.jacobian(net, x)


@pytest.mark.parametrize("batch", [3, 64])  # tiny; recorded and watched by "auto"
def test_spectral_models_per_sample_are_not_refused(batch: int) -> None:
    """The complex intermediates now followed keep each sample apart: an FNO (a fresh
    spectrum written by slices), ``view_as_complex`` pairs, ``torch.polar`` weights, the real
    and imaginary parts of a spectrum; ``"auto"`` gives the per-sample loop's divergence."""
    torch.manual_seed(2)
    net = FNO1d()
    amp, phase = torch.rand(5, dtype=f64) + 0.5, torch.randn(5, dtype=f64)

    def spectral(z: torch.Tensor) -> torch.Tensor:
        pairs = torch.view_as_complex(z.reshape(len(z), -1, 2))
        spectrum = torch.fft.rfft(torch.tanh(z)) * torch.polar(amp, phase)
        mixed = torch.fft.irfft(spectrum, n=z.shape[-1]) + spectrum.real.sum(-1, keepdim=True)
        return mixed + torch.view_as_real(pairs**2).reshape(z.shape) * spectrum.imag[:, 1:2]

    for f, x in [
        (net, torch.randn(batch, 8, 1, dtype=f64)),
        (spectral, torch.randn(batch, 8, dtype=f64)),
    ]:
        got = torchdiv.divergence(f, x)
        want = _loop_jacobians(f, x[:3]).diagonal(0, -2, -1).sum(-1)
        torch.testing.assert_close(got[:3], want.detach(), rtol=1e-10, atol=1e-12)


def test_recording_engines_refuse_real_rules_on_complex_values_naming_the_op() -> None:
    """``abs`` of a complex tensor (an amplitude) ran the rules of its real function:
    ``torch.sign`` of a complex raised PyTorch's bare ``NotImplementedError`` ("Unlike NumPy,
    torch.sign is not intended to support complex numbers") out of ``method="taylor"``. Now an
    ``UnsupportedOp`` names the call and the op and says ``"auto"``, which gives the
    per-sample loop's Laplacian. A complex 2-norm has its own rule (of the squared modulus):
    ``"taylor"`` gives the reference's Laplacian there."""
    torch.manual_seed(3)
    w = torch.randn(4, dtype=c128)
    x = torch.randn(3, 4, dtype=f64)
    amplitude = lambda z: (z.to(c128) * w).abs().square().sum(-1)  # noqa: E731
    norm = lambda z: torch.linalg.vector_norm(z.to(c128) * w, dim=-1)  # noqa: E731
    op = "aten.abs.default"
    for name in ("laplacian", "value_grad_laplacian"):
        with pytest.raises(NotImplementedError, match=rf"^{name}: method='taylor' .*{op}"):
            getattr(torchdiv, name)(amplitude, x, method="taylor")
        with pytest.raises(NotImplementedError, match=r"use method='auto'"):
            getattr(torchdiv, name)(amplitude, x, method="taylor")
    for f, methods in [(amplitude, ("auto",)), (norm, ("auto", "taylor"))]:
        hessians = [torch.autograd.functional.hessian(f, x[b]) for b in range(3)]
        want = torch.stack([h.diagonal().sum() for h in hessians])
        for method in methods:
            got = torchdiv.laplacian(f, x, method=method)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


class DeepONet(nn.Module):
    """Lu et al. 2021 (DeepXDE's layout): a branch net on ``m`` sensor values, a trunk net on
    coordinates (activated at its last layer too), their dot product plus a bias."""

    def __init__(self, m: int = 6, d: int = 2, p: int = 5, width: int = 8) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(m, width), nn.Tanh(), nn.Linear(width, p))
        trunk = [nn.Linear(d, width), nn.Tanh(), nn.Linear(width, p), nn.Tanh()]
        self.trunk = nn.Sequential(*trunk)
        self.bias = nn.Parameter(torch.zeros(1))
        self.to(f64)

    def forward(self, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.branch(u) * self.trunk(y)).sum(-1) + self.bias


def test_deeponet_laplacian_in_its_batch_layouts_matches_a_point_loop() -> None:
    """The PDE residual's Laplacian with respect to the trunk coordinates, in the layouts
    DeepONet codes use: ``(B, P, d)`` points per function with ``batch_dims=2``, the points
    flattened with the branch input repeated, the two concatenated with ``coordinates=``,
    and one point set shared by every function (``(P, d)`` to ``(P, B)``). Each method's
    values and parameter gradients against a grad-of-grad loop over single points."""
    torch.manual_seed(4)
    net, (b, p, m, d) = DeepONet(), (2, 3, 6, 2)
    u, y = torch.randn(b, m, dtype=f64), torch.rand(b, p, d, dtype=f64)

    def point(i: int, yi: torch.Tensor) -> torch.Tensor:
        """The Laplacian of function ``i``'s output at the single point ``yi``."""
        leaf = yi.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(net(u[i], leaf), leaf, create_graph=True)
        rows = [torch.autograd.grad(g[k], leaf, create_graph=True)[0][k] for k in range(d)]
        return torch.stack(rows).sum()

    # (B, P): function i at its own points; (P, B): every function at the points y[0]
    per_function = torch.stack(
        [torch.stack([point(i, y[i, q]) for q in range(p)]) for i in range(b)]
    )
    shared = torch.stack([torch.stack([point(i, y[0, q]) for i in range(b)]) for q in range(p)])
    flat_u = u.repeat_interleave(p, 0)
    layouts = [
        (lambda z: net(u[:, None].expand(-1, p, -1), z), y, {"batch_dims": 2}, per_function),
        (lambda z: net(flat_u, z), y.reshape(-1, d), {}, per_function.reshape(-1)),
        (
            lambda z: net(z[:, :m], z[:, m:]),
            torch.cat([flat_u, y.reshape(-1, d)], 1),
            {"coordinates": list(range(m, m + d))},
            per_function.reshape(-1),
        ),
        (lambda z: (net.branch(u) @ net.trunk(z).T).T + net.bias, y[0], {}, shared),
    ]
    params = list(net.parameters())
    for f, x, kwargs, expected in layouts:
        weights = torch.randn_like(expected)
        want_grads = torch.autograd.grad(
            (expected * weights).sum(), params, retain_graph=True, materialize_grads=True
        )
        for method in ("auto", "taylor", "forward-over-reverse", "grad-of-grad"):
            got = torchdiv.laplacian(f, x, method=method, **kwargs)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
            grads = torch.autograd.grad((got * weights).sum(), params, materialize_grads=True)
            for g, w in zip(grads, want_grads, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_deeponet_splitting_its_batch_inside_f_is_refused_with_the_batch_dims_way_out() -> None:
    """Points grouped per function by a reshape inside ``f`` (``z.reshape(B, P, d)``, then an
    ``einsum`` or ``bmm`` with the branch output): each point stays apart, but the watch cannot
    follow a batch split inside ``f`` through them, so ``"auto"`` refuses; the message names
    the way out (``x`` in that shape, ``batch_dims=2``), which gives the per-point Laplacian."""
    torch.manual_seed(5)
    net, (b, p, m, d) = DeepONet(), (2, 3, 6, 2)
    u, y = torch.randn(b, m, dtype=f64), torch.rand(b, p, d, dtype=f64)

    def grouped(z: torch.Tensor) -> torch.Tensor:  # (b, p, d) -> (b, p)
        return torch.einsum("bk,bqk->bq", net.branch(u), net.trunk(z)) + net.bias

    def batched(z: torch.Tensor) -> torch.Tensor:  # (b * p, d) -> (b * p,)
        return grouped(z.reshape(b, p, d)).reshape(-1)

    with pytest.raises(BatchInteractionError, match=r"split in order.*batch_dims=2 for \(F, P"):
        torchdiv.laplacian(batched, y.reshape(-1, d))
    hessians = [
        torch.autograd.functional.hessian(lambda yi, i=i: net(u[i], yi), y[i, q])
        for i in range(b)
        for q in range(p)
    ]
    want = torch.stack([h.diagonal().sum() for h in hessians]).reshape(b, p)
    got = torchdiv.laplacian(grouped, y, batch_dims=2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_deeponet_batch_norm_is_refused_only_where_it_crosses_the_points() -> None:
    """A train-mode batch norm in the branch net normalises over the *functions* (sensor
    values closed over, not ``x``): per point in the trunk coordinates, so neither the aligned
    layout nor the shared points ``(P, d) -> (P, F)`` are refused, the branch's running
    statistics move once as in one forward, and values and gradients match a point loop. In
    the trunk net it normalises over the points, and with ``u`` concatenated into ``x``
    (``coordinates=``) over ``x``'s samples: both refused, ``BatchInteractionError``."""
    torch.manual_seed(6)
    net, (n, m, d) = DeepONet(), (4, 6, 2)
    net.branch.insert(1, nn.BatchNorm1d(8, dtype=f64))
    u, y = torch.randn(n, m, dtype=f64), torch.rand(n, d, dtype=f64)
    params = list(net.parameters())

    def point_loop(f, z: torch.Tensor) -> torch.Tensor:  # row q's Laplacian, batch evaluated
        leaf = z.clone().requires_grad_(True)
        out = f(leaf)
        rows = []
        for q in range(len(z)):
            comps = []
            for k in range(out[q].numel()):
                (g,) = torch.autograd.grad(out[q].reshape(-1)[k], leaf, create_graph=True)
                hess = [torch.autograd.grad(g[q, i], leaf, create_graph=True)[0] for i in range(d)]
                comps.append(sum(h[q, i] for i, h in enumerate(hess)))
            rows.append(torch.stack(comps).reshape(out[q].shape))
        return torch.stack(rows)

    aligned = lambda z: net(u, z)  # noqa: E731
    shared = lambda z: (net.branch(u) @ net.trunk(z).T).T + net.bias  # noqa: E731
    for f in (aligned, shared):
        want = point_loop(f, y)
        weights = torch.randn_like(want)
        want_grads = torch.autograd.grad((want * weights).sum(), params, materialize_grads=True)
        for method in ("auto", "taylor", "grad-of-grad"):
            tracked = int(net.branch[1].num_batches_tracked)
            got = torchdiv.laplacian(f, y, method=method)
            assert int(net.branch[1].num_batches_tracked) == tracked + 1
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
            grads = torch.autograd.grad((got * weights).sum(), params, materialize_grads=True)
            for g, w in zip(grads, want_grads, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    concatenated = lambda z: net(z[:, :m], z[:, m:])  # noqa: E731
    with pytest.raises(BatchInteractionError, match="batch norm in train mode"):
        torchdiv.laplacian(concatenated, torch.cat([u, y], 1), coordinates=[m, m + 1])
    net.trunk.insert(1, nn.BatchNorm1d(8, dtype=f64))
    for f in (aligned, shared):
        with pytest.raises(BatchInteractionError, match="batch norm in train mode"):
            torchdiv.laplacian(f, y)
