"""Which engine ``"auto"`` runs on a Fourier neural operator, pinned (``bench/neuralop_choice.py``
measures what it costs).

The model is written the way neuraloperator writes its FNO, in plain PyTorch: a lifting and a
projection by kernel-size-1 ``Conv1d`` over the flattened grid (its ``ChannelMLP``), and a
spectral convolution (``rfft2``, the lowest modes times complex weights written into a
zero spectrum, ``irfft2``) plus a kernel-size-1 skip. Two facts decide ``"auto"`` there:

* the structured engine has no rule for the FFTs: it refuses, and every later call goes to
  the generic engines, their evaluation watched for sample mixing until one passes at the
  structure (``_exact.dispatch.diagonal_and_output``; at every call until leftovers19,
  1.4-1.7x reverse mode at 8 x 8), then unwatched with the engines that watch planned;
* kernel-size-1 convolutions count as convolving (``_exact.plan.OpSizes``), so planned
  problems take forward mode. Measured (thread CPU time, one thread, 16 x 16 grids):
  forward mode is 1.1-1.2x faster than reverse on FNO/TFNO in float64, 0.84-0.90x in float32,
  and even (0.92x) on a channel MLP of kernel-1 convolutions: no rule of kernel size or
  dtype wins both, so the choice stays (notes: NOTES_fnoauto18.md).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from torch import nn

import torchdiv
from torchdiv import BatchInteractionError
from torchdiv._exact import plan as _plan
from torchdiv._exact.dispatch import evaluate
from torchdiv._exact.forward import ForwardJacobian
from torchdiv._exact.reverse import ReverseJacobian


class _PointwiseConv(nn.Module):
    """``Conv1d(kernel_size=1)`` over the flattened grid: (B, C, H, W) -> (B, out, H, W)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.flatten(2)).reshape(x.shape[0], -1, *x.shape[2:])


class _FNO(nn.Module):
    """Lift 1 -> 4, one Fourier layer (2 x 2 modes, gelu, kernel-1 skip), project 4 -> 1."""

    def __init__(self, width: int = 4, modes: int = 2) -> None:
        super().__init__()
        self.lift, self.project = _PointwiseConv(1, width), _PointwiseConv(width, 1)
        self.skip = _PointwiseConv(width, width)
        weight = torch.randn(width, width, modes, modes, dtype=torch.cdouble) / width
        self.weight = nn.Parameter(weight)
        self.modes = modes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lift(x)
        spectrum = torch.fft.rfft2(h)
        out = torch.zeros_like(spectrum)
        m = self.modes
        out[..., :m, :m] = torch.einsum("bixy,ioxy->boxy", spectrum[..., :m, :m], self.weight)
        h = nn.functional.gelu(torch.fft.irfft2(out, s=h.shape[-2:]) + self.skip(h))
        return self.project(h)


def _planned(f, x):
    """The engine ``"auto"``'s generic dispatch starts with."""
    return evaluate(f, x, 1, "auto", None, lambda engine, chunk: type(engine))[0]


def test_planned_fourier_operator_takes_forward_mode_for_its_kernel_one_convolutions():
    torch.manual_seed(0)
    net = _FNO().double()
    x = torch.randn(2, 1, 12, 12, dtype=torch.float64)  # 144 x 288 > 2**15: planned
    with _plan.OpSizes(torch.Size([2])) as sizes:
        net(x)
    assert sizes.convolves and sizes.forward_rules
    assert _planned(net, x) is ForwardJacobian


@pytest.mark.parametrize("n", [8, 12])
def test_a_refused_fourier_operator_is_watched_once(n: int, monkeypatch) -> None:
    """After the structured engine's refusal (the FFTs), the generic engines' evaluation is
    watched until it passes, then runs unwatched, with the engine that watch chose: reverse
    mode at 8 x 8 (tiny), forward mode at 12 x 12 (planned: the kernel-1 convolutions), not
    reverse mode first (its evaluation only watched, then thrown away). Values against
    ``method="reverse"`` (float64)."""
    torch.manual_seed(0)
    net = _FNO().double()
    x = torch.randn(4 if n == 8 else 2, 1, n, n, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="_fft_r2c"):
        torchdiv.divergence(net, x, method="structured")
    want = torchdiv.divergence(net, x, method="reverse")
    torchdiv.divergence(net, x)  # the refusal, remembered; watched and passed
    entered, built = [], []
    enter = _plan.OpSizes.__enter__
    monkeypatch.setattr(_plan.OpSizes, "__enter__", lambda self: entered.append(1) or enter(self))
    for kind in (ForwardJacobian, ReverseJacobian):
        init = kind.__init__
        monkeypatch.setattr(
            kind,
            "__init__",
            lambda self, *a, init=init, **k: built.append(type(self)) or init(self, *a, **k),
        )
    for _ in range(3):
        assert_close(torchdiv.divergence(net, x), want)
    assert not entered
    assert built == [ReverseJacobian if n == 8 else ForwardJacobian] * 3


class _Switched(_FNO):
    """``_FNO`` that centres its output over the batch (mixes samples) where ``mix`` is set."""

    mix = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y - y.mean(0) if self.__dict__.get("mix") else y


@pytest.mark.parametrize("change", ["flag", "list", "index"])
def test_a_refused_operator_that_starts_mixing_is_watched_again(change: str) -> None:
    """The pass kept after a refusal holds only at its structure: a flag set on the module
    (``net.mix = True``), a mixing module put into the list a lambda runs, or an index
    tensor the lambda reads its samples by written in place (the refusal's key holds no
    tensor: the refusal is still found, and the pass must not be) is another structure,
    watched again (``BatchInteractionError``), not served unwatched."""
    torch.manual_seed(0)
    net = _Switched().double()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    layers, held = [net], {"order": torch.arange(4)}
    f = {
        "flag": net,
        "list": lambda z: layers[0](z),
        "index": lambda z: net(z)[held["order"]],
    }[change]
    for _ in range(3):
        torchdiv.divergence(f, x)
    if change == "flag":
        net.mix = True
    elif change == "list":
        other = _Switched().double()
        other.load_state_dict(net.state_dict())
        other.mix = True
        layers[0] = other
    else:
        held["order"].copy_(torch.arange(4).roll(1))
    with pytest.raises(BatchInteractionError, match="f mixes samples"):
        torchdiv.divergence(f, x)
