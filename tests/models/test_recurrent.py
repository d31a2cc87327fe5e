"""Recurrent models as time-series and neural-ODE codes write them: ``nn.LSTM`` over each
sample's sequence (``(B, T, D)``, ``batch_first=True``), in float32 on the CPU, where PyTorch
runs oneDNN's fused layer ``aten.mkldnn_rnn_layer`` (no forward-mode derivative; a
differentiable backward), not the steps it runs in float64 (which
``tests/core/test_sample_mixing.py`` covers).

References: a composite LSTM written from the paper's equations in float64 with the module's
own weights, differentiated one sample at a time by plain autograd (Hessian diagonals by
grad of grad); float32 results within 2e-5 of them (eps 1.2e-7 through a few hundred
flops of sigmoids and tanhs, as ``conftest.tolerances``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchdiv
from torchdiv import BatchInteractionError

f64 = torch.float64
T, D = 3, 4  # 12 inputs per sample: above the 10 at which "auto" loops anyway

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="nn.LSTM runs oneDNN's layer only with it"
)


def composite_lstm(lstm: nn.LSTM, x: torch.Tensor) -> torch.Tensor:
    """One layer of ``nn.LSTM(batch_first=True)`` from its equations (Hochreiter and
    Schmidhuber, with PyTorch's gate order i, f, g, o), zero initial state: ``(B, T, H)``."""
    w_ih, w_hh, b_ih, b_hh = lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0
    h = c = x.new_zeros(x.shape[0], lstm.hidden_size)
    outputs = []
    for t in range(x.shape[1]):
        i, f, g, o = (x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, -1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h = o.sigmoid() * c.tanh()
        outputs.append(h)
    return torch.stack(outputs, 1)


def laplacian_alone(f, x: torch.Tensor) -> torch.Tensor:
    """Each sample's Laplacian of the scalar ``f``, alone, by grad of grad: ``(B,)``."""
    out = []
    for xb in x:
        leaf = xb[None].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(f(leaf).sum(), leaf, create_graph=True)
        g = g.flatten()
        rows = [
            torch.autograd.grad(g[i], leaf, create_graph=True)[0].flatten()[i]
            for i in range(g.numel())
        ]
        out.append(torch.stack(rows).sum())
    return torch.stack(out)


def _pair(seed: int) -> tuple[nn.LSTM, nn.LSTM]:
    torch.manual_seed(seed)
    lstm = nn.LSTM(D, D, batch_first=True)
    return lstm, copy.deepcopy(lstm).to(f64)


def test_float32_lstm_laplacians_on_the_cpu_loop_over_backward_passes() -> None:
    """``laplacian`` and ``value_grad_laplacian`` with ``"auto"`` of a float32 ``nn.LSTM``
    raised forward mode's NotImplementedError for ``mkldnn_rnn_layer`` (no Taylor rule, more
    than 10 inputs: forward over reverse); they now loop over backward passes, whose values
    and parameter gradients match the composite float64 reference."""
    lstm, lstm64 = _pair(0)
    x64 = torch.randn(3, T, D, dtype=f64)

    def energy(m):
        return lambda s: m(s)[0].tanh().square().sum((1, 2))

    expected = laplacian_alone(lambda s: composite_lstm(lstm64, s).tanh().square().sum((1, 2)), x64)
    weights = torch.tensor([0.3, -1.2, 0.7], dtype=f64)
    expected_grads = torch.autograd.grad((expected * weights).sum(), list(lstm64.parameters()))
    for got in (
        torchdiv.laplacian(energy(lstm), x64.float()),
        torchdiv.value_grad_laplacian(energy(lstm), x64.float()).laplacian,
    ):
        torch.testing.assert_close(got, expected.float(), rtol=2e-5, atol=2e-5)
        grads = torch.autograd.grad((got * weights.float()).sum(), list(lstm.parameters()))
        for g, e in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(g, e.float(), rtol=2e-5, atol=2e-5)


def test_float32_lstm_run_over_the_samples_is_refused() -> None:
    """``nn.LSTM`` left at ``batch_first=False`` and fed ``(B, T, D)`` runs its recurrence over
    the samples: in float32 on the CPU (one ``mkldnn_rnn_layer`` op, unknown to the watch)
    the divergence and Laplacian were returned silently; now refused, and the right model is
    per sample (its divergence matches the composite reference)."""
    wrong = nn.LSTM(D, D)
    x = torch.randn(3, T, D)
    for call in (
        lambda: torchdiv.divergence(lambda s: wrong(s)[0], x),
        lambda: torchdiv.laplacian(lambda s: wrong(s)[0].sum((1, 2)), x),
    ):
        with pytest.raises(BatchInteractionError, match=r"a recurrent net run over samples"):
            call()
    right, right64 = _pair(1)
    f64_rows = torch.func.vmap(torch.func.jacrev(lambda s: composite_lstm(right64, s[None])[0]))
    expected = f64_rows(x.to(f64)).flatten(1, 2).flatten(2).diagonal(0, -2, -1).sum(-1)
    got = torchdiv.divergence(lambda s: right(s)[0], x)
    torch.testing.assert_close(got, expected.float(), rtol=2e-5, atol=2e-5)


def test_forward_mode_error_names_the_way_out() -> None:
    """A method that needs forward mode (the Hutchinson Laplacian's Hessian-vector products,
    ``method="forward"``) on a float32 ``nn.LSTM`` keeps PyTorch's error, with a hint naming
    the methods of backward passes and turning oneDNN off, under which it runs."""
    lstm, _ = _pair(2)
    x = torch.randn(2, T, D)

    def energy(s):
        return lstm(s)[0].sum((1, 2))

    way = r"torch\.backends\.mkldnn\.enabled = False"
    with pytest.raises(NotImplementedError, match=rf"(?s)Hint: .*'grad-of-grad'.*{way}"):
        torchdiv.laplacian(energy, x, method="hutchinson", num_probes=2)
    with pytest.raises(NotImplementedError, match=rf"(?s)Hint: .*'reverse'.*{way}"):
        torchdiv.divergence(lambda s: lstm(s)[0], x, method="forward")
    before, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False
    try:
        estimate = torchdiv.laplacian(energy, x, method="hutchinson", num_probes=2)
    finally:
        torch.backends.mkldnn.enabled = before
    assert estimate.shape == (2,) and bool(estimate.isfinite().all())
