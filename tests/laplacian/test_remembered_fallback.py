"""The Laplacian's ``"auto"`` where the Taylor engine refuses ``f`` (an FFT convolution): the
fallback (the loop of backward passes, or forward over reverse where inputs times outputs per
sample pass ``LOOP_FALLBACK``) is remembered per structure (``methods._REFUSED``), so later
calls do not record ``f`` again; every call is still watched for sample mixing; a new
``f``, parameter, batch shape, dtype or train mode records again. Values and parameter
gradients against per-sample grad-of-grad loops (float64, each sample evaluated alone)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    Stateful,
    assert_close,
    assert_one_state,
    assert_same_parameter_gradients,
    laplacian_alone,
    laplacian_by_grad_of_grad,
    one_state,
)
from torch import nn

import torchdiv
from torchdiv._laplacian import methods
from torchdiv._taylor import cache

f64 = torch.float64


class S4D(nn.Module):
    """An S4D layer as the state-spaces repository's ``s4d.py`` writes it (Gu et al. 2022): a
    diagonal complex state matrix discretised by zero-order hold, its convolution kernel a
    Vandermonde product, applied by FFT (no Taylor rule), a skip term, GELU and a GLU output
    mixing by a 1x1 convolution. ``readout``: one number per sample (else the whole
    ``(H, L)`` sequence); ``shift`` (an integer, outside every structure key) rolls the
    batch when set."""

    def __init__(self, channels: int = 1, state: int = 4, readout: bool = True) -> None:
        super().__init__()
        h, n = channels, state // 2
        self.log_dt = nn.Parameter(torch.rand(h, dtype=f64) * math.log(10) + math.log(0.01))
        self.C = nn.Parameter(torch.randn(h, n, 2, dtype=f64) * 0.5**0.5)
        self.log_A_real = nn.Parameter(torch.log(0.5 * torch.ones(h, n, dtype=f64)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(n, dtype=f64).repeat(h, 1))
        self.D = nn.Parameter(torch.randn(h, dtype=f64))
        self.output = nn.Conv1d(h, 2 * h, 1).double()
        self.readout, self.shift = readout, 0

    def kernel(self, length: int) -> torch.Tensor:
        dt = self.log_dt.exp()
        c = torch.view_as_complex(self.C)
        a = -self.log_A_real.exp() + 1j * self.A_imag
        dta = a * dt[:, None]
        k = dta[..., None] * torch.arange(length, dtype=dt.dtype)
        c = c * (dta.exp() - 1.0) / a
        return 2 * torch.einsum("hn,hnl->hl", c, k.exp()).real

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # (B, H, L)
        if self.shift:
            u = u.roll(self.shift, 0)
        length = u.shape[-1]
        k_f = torch.fft.rfft(self.kernel(length), n=2 * length)
        u_f = torch.fft.rfft(u, n=2 * length)
        y = torch.fft.irfft(u_f * k_f, n=2 * length)[..., :length] + u * self.D[:, None]
        y = F.glu(self.output(F.gelu(y)), dim=-2)
        return y.sum((-2, -1)) if self.readout else y.flatten(1)


def alone(f, x: torch.Tensor) -> torch.Tensor:
    """Every sample's Laplacian of every output component, each sample evaluated alone by grad
    of grad (``conftest.laplacian_alone`` per output component): ``(B,)`` or ``(B, m)``."""
    m = f(x[:1]).shape[1:].numel()
    if f(x[:1]).dim() == 1:
        return laplacian_alone(f, x)
    return torch.stack([laplacian_alone(lambda z, i=i: f(z)[:, i], x) for i in range(m)], 1)


@pytest.fixture
def counts(monkeypatch) -> dict[str, int]:
    """Fresh caches; how many times the Laplacian's ``"auto"`` recorded ``f``, looped over
    backward passes and took forward over reverse."""
    monkeypatch.setattr(methods, "_REFUSED", cache.Refusals(), raising=False)
    monkeypatch.setattr(methods, "_LOOPS", cache.PlanCache(256))
    monkeypatch.setattr(methods, "_LOOPING_SITES", cache.PlanCache(256))
    counted = {"recorded": 0, "looped": 0, "nested": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counted[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(methods, "capture", counting("recorded", methods.capture))
    monkeypatch.setattr(methods, "grad_of_grad", counting("looped", methods.grad_of_grad))
    monkeypatch.setattr(
        methods, "forward_over_reverse", counting("nested", methods.forward_over_reverse)
    )
    return counted


# (length L = inputs, readout) -> the fallback: inputs x outputs at most 10 loop
CASES = {"n=4, m=1": (4, True, "looped"), "n=6, m=6": (6, False, "nested")}
CASES_SLOW = {"n=12, m=1": (12, True, "nested")}


def _case(length: int, readout: bool, batch: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return S4D(readout=readout), torch.randn(batch, 1, length, dtype=f64)


def _check_remembered(counts, length: int, readout: bool, engine: str) -> None:
    net, x = _case(length, readout)
    want = alone(net, x)
    for call in range(3):
        for name in counts:
            counts[name] = 0
        got = torchdiv.laplacian(net, x)
        assert_close(got, want)
        assert_same_parameter_gradients(net, got.square().sum(), want.square().sum())
        assert counts["recorded"] == (call == 0), call  # recorded once: remembered
        other = "nested" if engine == "looped" else "looped"
        assert counts[engine] >= 1 and counts[other] == 0, (call, counts)


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_the_fallback_is_remembered_with_per_sample_values_and_gradients(counts, case):
    """Recorded at the first call only (it was recorded at every call above three inputs);
    the loop at inputs x outputs <= 10, forward over reverse above (the loop was taken at up
    to 10 inputs whatever the outputs: 109 against 26 ms at 10 x 10)."""
    _check_remembered(counts, *case)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES_SLOW.values(), ids=list(CASES_SLOW))
def test_the_fallback_is_remembered_at_more_inputs(counts, case):
    _check_remembered(counts, *case)


@pytest.mark.parametrize("readout", [True, False], ids=["loop", "forward-over-reverse"])
@pytest.mark.parametrize("fn", ["laplacian", "value_grad_laplacian"])
def test_a_remembered_fallback_still_watches_every_call(counts, readout, fn):
    """An integer attribute (in no structure key) turns on a roll along the batch after the
    refusal was remembered: refused, as the recording refused it (the remembered fallback
    evaluates ``f`` watched at every call)."""
    net, x = _case(4 if readout else 6, readout)
    call = getattr(torchdiv, fn)
    call(net, x)
    call(net, x)
    assert counts["recorded"] == 1
    net.shift = 1
    with pytest.raises(torchdiv.BatchInteractionError):
        call(net, x)


def test_changes_of_structure_record_again(counts):
    """Another module, a replaced parameter, another batch, dtype or train mode: recorded
    again; a lambda made anew over the same module finds the refusal."""
    net, x = _case(6, False)
    for _ in range(2):
        torchdiv.laplacian(net, x)
        torchdiv.laplacian(lambda z: net(z), x)  # (another site: its code)
    assert counts["recorded"] == 2
    other, _ = _case(6, False, seed=1)
    changes = [
        lambda: torchdiv.laplacian(other, x),
        lambda: torchdiv.laplacian(net, x[:3]),
        lambda: torchdiv.laplacian(net.float(), x.float()),
        lambda: torchdiv.laplacian(net.double().train(False), x),
    ]
    for made, change in enumerate(changes, start=3):
        change()
        assert counts["recorded"] == made, made
    net.D = nn.Parameter(torch.randn(1, dtype=f64))
    got = torchdiv.laplacian(net, x)
    assert counts["recorded"] == len(changes) + 3
    assert_close(got, alone(net, x))


def test_value_grad_laplacian_shares_the_remembered_forward_over_reverse(counts):
    """``value_grad_laplacian`` takes the remembered fallback (``f(x)``, ``jacobian`` and forward
    over reverse), without recording ``f`` again: the three as the per-sample references."""
    net, x = _case(6, False)
    torchdiv.laplacian(net, x)
    out = torchdiv.value_grad_laplacian(net, x)
    assert counts["recorded"] == 1
    assert_close(out.value, net(x))
    want = torch.stack([torch.autograd.functional.jacobian(net, xb[None])[0, :, 0] for xb in x])
    assert_close(out.gradient, want)
    assert_close(out.laplacian, alone(net, x))


class Warped(nn.Module):
    """An FFT feature layer (no Taylor rule) sampled by ``grid_sample`` (no forward-mode rule in
    PyTorch 2.13) at 16 inputs: ``"auto"`` raised forward mode's ``NotImplementedError``."""

    def __init__(self) -> None:
        super().__init__()
        self.grid = nn.Parameter(torch.rand(1, 3, 3, 2, dtype=f64) * 1.6 - 0.8)
        self.lin = nn.Linear(9, 1).double()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        image = torch.fft.irfft(torch.fft.rfft(z), n=16).tanh().reshape(-1, 1, 4, 4)
        grid = self.grid.expand(len(z), -1, -1, -1)
        sampled = F.grid_sample(image, grid, align_corners=False).flatten(1)
        return self.lin(sampled.square()).squeeze(-1)


@pytest.mark.parametrize("fn", ["laplacian", "value_grad_laplacian"])
def test_forward_mode_failing_falls_back_to_the_loop_and_is_remembered(counts, fn):
    """Forward over reverse cannot run ``grid_sample``: the loop of backward passes from the
    same state, remembered (the second call neither records nor tries forward mode)."""
    torch.manual_seed(0)
    net, x = Warped(), torch.randn(5, 16, dtype=f64)
    want = laplacian_alone(net, x)
    for call in range(2):
        for name in counts:
            counts[name] = 0
        out = getattr(torchdiv, fn)(net, x)
        got = out if fn == "laplacian" else out.laplacian
        assert_close(got, want)
        assert_same_parameter_gradients(net, got.square().sum(), want.square().sum())
        assert (counts["recorded"], counts["nested"]) == ((1, 1), (0, 0))[call], (call, counts)


@pytest.mark.parametrize("fn", ["laplacian", "value_grad_laplacian"])
def test_a_stateful_f_changes_its_state_once_at_a_remembered_fallback(counts, fn):
    """A buffer written and a dropout mask drawn at every evaluation, an op without a Taylor
    rule (``lgamma``), 12 inputs: forward over reverse. At the first call (recorded) and at
    the remembered ones (one watched evaluation first), every evaluation starts from the
    caller's state: the derivatives of one evaluation's function, the state moved once."""
    head = lambda y: torch.lgamma(y.square() + 1).sum(-1)  # noqa: E731
    x, net = torch.randn(3, 12, dtype=f64), Stateful(12, 2, head=head)
    for call in range(2):
        net.calls.zero_()  # (a count of evaluations: a value, not structure)
        once, state = one_state(net, x, seed=call)
        torch.manual_seed(call)
        out = getattr(torchdiv, fn)(net, x)
        got = out if fn == "laplacian" else out.laplacian
        assert_close(got, laplacian_by_grad_of_grad(once, x))  # (its mask is the batch's)
        assert_one_state(net, once, state)
        assert counts["recorded"] == 1 and counts["looped"] == 0, counts
