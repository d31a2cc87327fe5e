"""Spectrogram models as speech-enhancement and audio-diffusion code writes them: each
sample a signal ``(B, L)`` (or ``(B, C, L)`` channels reshaped to ``(B * C, L)``),
``torch.stft`` with a Hann window, a mask computed from the magnitude by a small network over
the frequencies, ``torch.istft`` back.

``torch.stft`` cuts its frames by ``as_strided`` (after a reflection pad when centred), which
ended the sample-mixing watch's tracking: ``stft`` of ``x.T`` (the batch taken for the time
axis) without centring, or centred with ``pad_mode="constant"``, passed ``"auto"`` and
one-probe Hutchinson silently, and so did any batch mistake after a per-sample ``stft``
(a spectrum averaged over the batch) or ``istft`` (its overlap-add, ``unfold_backward``).
The watch now reads ``as_strided`` through its strides, and pads, ``unfold`` and
``unfold_backward`` keep the batch dimensions they leave alone. Values and parameter gradients
of per-sample models against a per-sample loop of plain autograd in float64.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import laplacian_alone
from torch import nn

import torchdiv
from torchdiv import BatchInteractionError

f64 = torch.float64
N_FFT, HOP = 8, 2


def _window(dtype: torch.dtype = f64) -> torch.Tensor:
    return torch.hann_window(N_FFT, dtype=dtype)


def _stft(z: torch.Tensor, **kwargs: object) -> torch.Tensor:
    return torch.stft(
        z,
        N_FFT,
        HOP,
        window=_window(z.dtype),
        return_complex=True,
        **kwargs,  # type: ignore[arg-type]
    )


def _istft(s: torch.Tensor, length: int) -> torch.Tensor:
    return torch.istft(s, N_FFT, HOP, window=_window(s.real.dtype), length=length)


class MaskNet(nn.Module):
    """A spectral mask: ``sigmoid`` of a two-layer net over each frame's log magnitudes,
    applied to the complex spectrum, ``istft`` back (Conv-TasNet/DCCRN-style enhancement, in
    miniature). ``x``: ``(B, L)`` or ``(B, C, L)``."""

    def __init__(self, dtype: torch.dtype = f64) -> None:
        super().__init__()
        bins = N_FFT // 2 + 1
        self.net = nn.Sequential(
            nn.Linear(bins, 6, dtype=dtype), nn.Tanh(), nn.Linear(6, bins, dtype=dtype)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        signals = x.reshape(-1, x.shape[-1])
        spectrum = _stft(signals)  # (B * C, bins, frames)
        magnitude = torch.log1p(spectrum.abs().square())
        mask = torch.sigmoid(self.net(magnitude.transpose(1, 2))).transpose(1, 2)
        return _istft(spectrum * mask, x.shape[-1]).reshape(x.shape) * torch.tanh(x)


def _loop_jacobians(f, x: torch.Tensor) -> torch.Tensor:
    """Each sample's Jacobian ``(B, n, n)`` by plain autograd on that sample alone (with a
    graph: parameter gradients of losses built from it are the reference's)."""
    n = x[0].numel()
    blocks = [
        torch.autograd.functional.jacobian(f, x[b : b + 1], create_graph=True).reshape(n, n)
        for b in range(len(x))
    ]
    return torch.stack(blocks)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*window overlap add.*")


def _stft_of_the_batch(z: torch.Tensor) -> torch.Tensor:
    """The batch taken for the time axis (``x.T``): frames of neighbouring samples."""
    return z * _stft(z.T, center=False).abs().sum((1, 2))


def _stft_of_the_batch_zero_padded(z: torch.Tensor) -> torch.Tensor:
    return z * _stft(z.T, pad_mode="constant").abs().sum((1, 2))


def _spectrum_averaged(z: torch.Tensor) -> torch.Tensor:
    spectrum = _stft(z)
    return _istft(spectrum - spectrum.mean(0), z.shape[-1])


def _istft_centred_over_the_batch(z: torch.Tensor) -> torch.Tensor:
    y = _istft(_stft(z) * 1.5, z.shape[-1])
    return y - y.mean(0)


def _frames_averaged(z: torch.Tensor) -> torch.Tensor:
    return z * z.unfold(-1, 4, 2).mean(0).sum()


def _frames_are_samples(z: torch.Tensor) -> torch.Tensor:
    """``istft`` of a spectrogram whose frames are the samples (each sample 5 bins, real and
    imaginary parts): the overlap-add sums neighbouring samples."""
    spectrum = torch.complex(z[:, :5], z[:, 5:]).T[None]
    y = torch.istft(spectrum, N_FFT, HOP, window=torch.ones(N_FFT, dtype=f64), center=False)
    return z * y[0, : len(z), None]


def _strided_past_a_slice(z: torch.Tensor) -> torch.Tensor:
    """``as_strided`` of ``z[1:]`` reading ``z[0]`` too (its storage offset 0: ``z`` again),
    then flipped along the batch: the view read storage outside its tensor, and the watch
    stopped following it (``"auto"`` returned other samples' terms)."""
    whole = z[1:].as_strided(z.shape, z.stride(), z.storage_offset())
    return z + whole.flip(0).sin()


MIXING = {  # f, x's shape, what the error names
    "stft of x.T": (_stft_of_the_batch, (16, 3), "as_strided laying x's samples across"),
    "stft of x.T, zero-padded": (_stft_of_the_batch_zero_padded, (16, 3), "as_strided laying"),
    "spectrum averaged over the batch": (_spectrum_averaged, (3, 16), "a mean over samples"),
    "istft output centred over the batch": (_istft_centred_over_the_batch, (3, 16), "a mean"),
    "frames averaged over the batch": (_frames_averaged, (3, 16), "a mean over samples"),
    "istft of frames that are samples": (_frames_are_samples, (16, 10), "an overlap-add of"),
    "as_strided past a slice, flipped": (_strided_past_a_slice, (6, 3), "samples moved by"),
}


@pytest.mark.parametrize("case", list(MIXING))
@pytest.mark.parametrize("method", ["auto", "hutchinson"])
def test_spectrogram_mistakes_along_the_batch_are_refused(case: str, method: str) -> None:
    """Each truly mixes (the cross-batch Jacobian has blocks off its diagonal); the first five
    passed the watch (``as_strided`` and ``unfold_backward`` ended its tracking) and
    ``"auto"`` returned other samples' terms without an error. The last was refused only
    because its result had no dimension a multiple of 16 in size; now by its overlap-add."""
    f, shape, what = MIXING[case]
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=f64)
    full = torch.autograd.functional.jacobian(f, x, vectorize=True)
    off = full.reshape(len(x), -1, len(x), shape[1]).clone()
    for b in range(len(x)):
        off[b, :, b] = 0
    assert float(off.abs().max()) > 1e-2
    kwargs = {"num_probes": 1} if method == "hutchinson" else {}
    with pytest.raises(BatchInteractionError, match=rf"^divergence: f mixes samples: .*{what}"):
        torchdiv.divergence(f, x, method=method, **kwargs)
    with pytest.raises(BatchInteractionError, match=rf"^laplacian: f mixes samples: .*{what}"):
        torchdiv.laplacian(lambda z: f(z).square().sum(-1), x, method=method, **kwargs)


@pytest.mark.parametrize("shape", [(3, 24), pytest.param((2, 2, 16), marks=pytest.mark.slow)])
def test_mask_net_divergence_and_gradients_match_a_per_sample_loop(shape: tuple[int, ...]) -> None:
    """The per-sample model is not refused (centred and not), and its divergence by every
    method, with the parameter gradients of a loss built from it, is the loop's; a second
    call (kept recordings) equals the first."""
    torch.manual_seed(1)
    net = MaskNet()
    x = torch.randn(*shape, dtype=f64)
    n = x[0].numel()
    flat = lambda z: net(z.reshape(-1, *shape[1:])).reshape(len(z), n)  # noqa: E731
    want = _loop_jacobians(flat, x.reshape(len(x), n)).diagonal(0, -2, -1).sum(-1)
    (want_grads) = torch.autograd.grad(want.square().sum(), list(net.parameters()))
    for method in ["auto", "reverse", "forward"]:
        for _ in range(2):
            got = torchdiv.divergence(net, x, method=method)
            torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-10)
            grads = torch.autograd.grad(got.square().sum(), list(net.parameters()))
            for g, w in zip(grads, want_grads, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_mask_net_laplacian_matches_grad_of_grad() -> None:
    """The Laplacian of an energy ``|MaskNet(x)|^2 / 2`` through ``stft``/``istft`` (the
    recording engines do not run FFTs: ``"auto"`` falls back) with its parameter gradients,
    and its float32 value within float32's round-off of float64's."""
    torch.manual_seed(2)
    net = MaskNet()
    x = torch.randn(3, 16, dtype=f64)
    energy = lambda z: 0.5 * net(z).square().sum(-1)  # noqa: E731
    want = laplacian_alone(energy, x)
    want_grads = torch.autograd.grad(want.sum(), list(net.parameters()))
    got = torchdiv.laplacian(energy, x)
    torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(got.sum(), list(net.parameters()))
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
    net32 = MaskNet(torch.float32)
    net32.load_state_dict({k: v.float() for k, v in net.state_dict().items()})
    low = torchdiv.laplacian(lambda z: 0.5 * net32(z).square().sum(-1), x.float())
    # float32: eps 1.2e-7 over a few hundred operations per second derivative
    torch.testing.assert_close(low.double(), want.detach(), rtol=2e-4, atol=2e-4)


def test_per_sample_isolation_through_stft() -> None:
    """Changing sample 2 leaves the others' divergences as they were."""
    torch.manual_seed(3)
    net = MaskNet()
    x = torch.randn(4, 24, dtype=f64)
    before = torchdiv.divergence(net, x).detach()
    x2 = x.clone()
    x2[2] += 1.0
    after = torchdiv.divergence(net, x2).detach()
    torch.testing.assert_close(after[[0, 1, 3]], before[[0, 1, 3]], rtol=0, atol=0)
    assert float((after[2] - before[2]).abs()) > 1e-6


def _windows_past_a_slice(z: torch.Tensor) -> torch.Tensor:
    """Each sample's sliding windows of 3, cut by ``as_strided`` from ``z[:, 1:]`` but
    starting at its first element (read outside the slice, inside the same sample)."""
    rows, n = z.shape
    windows = z[:, 1:].as_strided((rows, n - 2, 3), (z.stride(0), 1, 1), z.storage_offset())
    return torch.cat([windows.tanh().sum(-1), z[:, :2]], dim=1) * z


def test_per_sample_as_strided_past_a_slice_is_not_refused() -> None:
    """An ``as_strided`` view of a slice that reads the rest of each sample (read through the
    followed tensor on the same storage) is per sample: not refused (a one-probe estimate
    is watched too), its divergence the loop's."""
    x = torch.randn(5, 7, dtype=f64, generator=torch.Generator().manual_seed(6))
    want = _loop_jacobians(_windows_past_a_slice, x).diagonal(0, -2, -1).sum(-1)
    got = torchdiv.divergence(_windows_past_a_slice, x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torchdiv.divergence(_windows_past_a_slice, x, method="hutchinson", num_probes=1)
