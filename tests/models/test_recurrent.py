"""Recurrent models as time-series and neural-ODE codes write them: ``nn.LSTM`` over each
sample's sequence (``(B, T, D)``, ``batch_first=True``), in float32 on the CPU, where PyTorch
runs oneDNN's fused layer ``aten.mkldnn_rnn_layer`` (no forward-mode derivative; a
differentiable backward), not the steps it runs in float64 (which
``tests/core/test_sample_mixing.py`` covers); and a GRU-ODE (``nn.GRUCell`` with zero input,
De Brouwer et al.'s ``dh/dt = (1 - z)(n - h)``), an ``nn.LSTMCell`` state and an ``nn.GRU``
on the recording engines (``"structured"``, ``"taylor"``), which PyTorch's cells reach with
their gates written in place into the pieces of one ``unsafe_chunk``.

References: a composite LSTM written from the paper's equations in float64 with the module's
own weights, differentiated one sample at a time by plain autograd (Hessian diagonals by
grad of grad); float32 results within 2e-5 of them (eps 1.2e-7 through a few hundred
flops of sigmoids and tanhs, as ``conftest.tolerances``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from conftest import laplacian_alone
from torch import nn

import torchdiv
from torchdiv import BatchInteractionError

f64 = torch.float64
T, D = 3, 4  # 12 inputs per sample: above the 10 at which "auto" loops anyway

one_dnn = pytest.mark.skipif(
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


def _pair(seed: int) -> tuple[nn.LSTM, nn.LSTM]:
    torch.manual_seed(seed)
    lstm = nn.LSTM(D, D, batch_first=True)
    return lstm, copy.deepcopy(lstm).to(f64)


@one_dnn
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


@one_dnn
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


@one_dnn
def test_forward_mode_error_names_the_way_out() -> None:
    """``method="forward"`` on a float32 ``nn.LSTM`` keeps PyTorch's error, with a hint naming
    the methods of backward passes and turning oneDNN off, under which it runs. The Hutchinson
    Laplacian, whose Hessian-vector products raised the same error, takes them by backward
    passes there (``loop.probed``): the float64 twin's estimate at the same probes (float32:
    7e-7 off at most in three draws)."""
    lstm, twin = _pair(2)
    x = torch.randn(2, T, D)
    probes = torch.randn(2, *x.shape)

    def energy(s):
        return lstm(s)[0].sum((1, 2))

    way = r"torch\.backends\.mkldnn\.enabled = False"
    with pytest.raises(NotImplementedError, match=rf"(?s)Hint: .*'reverse'.*{way}"):
        torchdiv.divergence(lambda s: lstm(s)[0], x, method="forward")
    looped = torchdiv.laplacian(energy, x, method="hutchinson", probes=probes)
    again = torchdiv.laplacian(energy, x, method="hutchinson", probes=probes)  # remembered
    torch.testing.assert_close(again, looped, rtol=0, atol=0)  # the same ops in the same order
    before, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False
    try:
        estimate = torchdiv.laplacian(energy, x, method="hutchinson", probes=probes)
    finally:
        torch.backends.mkldnn.enabled = before
    assert estimate.shape == (2,) and bool(estimate.isfinite().all())
    expected = torchdiv.laplacian(
        lambda s: twin(s)[0].sum((1, 2)), x.to(f64), method="hutchinson", probes=probes.to(f64)
    )
    torch.testing.assert_close(looped, expected.float(), rtol=2e-5, atol=2e-5)


@one_dnn
def test_biharmonic_error_names_its_own_way_out() -> None:
    """``biharmonic`` takes no ``'grad-of-grad'``: its hint (for a float32 ``nn.LSTM``,
    where each of its methods nests forward mode) was its inner Laplacian's, naming
    ``method='auto' or 'grad-of-grad'``; it names the Laplacian of the Laplacian by backward
    passes, which is right (against oneDNN off, which every method runs)."""
    torch.manual_seed(3)
    lstm, x = nn.LSTM(2, 3, batch_first=True), torch.randn(2, 1, 2)

    def energy(s):
        return lstm(s)[0].sum((1, 2))

    for method in ("auto", "forward-over-reverse"):
        with pytest.raises(NotImplementedError) as info:
            torchdiv.biharmonic(energy, x, method=method)
        hint = str(info.value).partition("Hint: ")[2]
        assert "method='auto' or 'grad-of-grad'" not in hint
        assert "laplacian(lambda z: laplacian(f, z, method='grad-of-grad'), x" in hint

    def inner(z):
        return torchdiv.laplacian(energy, z, method="grad-of-grad")

    got = torchdiv.laplacian(inner, x, method="grad-of-grad")
    before, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False
    try:
        expected = torchdiv.biharmonic(energy, x)
    finally:
        torch.backends.mkldnn.enabled = before
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def composite_gru_cell(x: torch.Tensor, h: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    """A GRU cell from its equations (Cho et al., PyTorch's gate order r, z, n), with
    ``weights`` ``w_ih, w_hh, b_ih, b_hh`` as ``nn.GRUCell`` and ``nn.GRU`` hold them."""
    w_ih, w_hh, b_ih, b_hh = weights
    i_r, i_z, i_n = (x @ w_ih.T + b_ih).chunk(3, -1)
    h_r, h_z, h_n = (h @ w_hh.T + b_hh).chunk(3, -1)
    r, z = (i_r + h_r).sigmoid(), (i_z + h_z).sigmoid()
    return (1 - z) * (i_n + r * h_n).tanh() + z * h


def _recurrent_fields(case: str) -> tuple[nn.Module, Callable, Callable, torch.Tensor]:
    """The module, ``f``, the same ``f`` from the equations and ``x``, in float64."""
    torch.manual_seed(4)
    if case == "GRU-ODE":  # GRU-ODE-Bayes: the cell at zero input minus the state
        cell = nn.GRUCell(2, 5).to(f64)
        weights = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
        zero = torch.zeros(3, 2, dtype=f64)
        return (
            cell,
            lambda h: cell(zero[: len(h)], h) - h,
            lambda h: composite_gru_cell(zero[: len(h)], h, *weights) - h,
            torch.randn(3, 5, dtype=f64),
        )
    if case == "LSTMCell state":  # the state (h, c) as one vector, a constant input
        cell = nn.LSTMCell(2, 3).to(f64)
        u = torch.ones(3, 2, dtype=f64)

        def lstm_state_ref(hc: torch.Tensor) -> torch.Tensor:
            h, c = hc.chunk(2, -1)
            g = u[: len(hc)] @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T
            i, f, gg, o = (g + cell.bias_hh).chunk(4, -1)
            c2 = f.sigmoid() * c + i.sigmoid() * gg.tanh()
            return torch.cat([o.sigmoid() * c2.tanh(), c2], -1) - hc

        return (
            cell,
            lambda hc: torch.cat(cell(u[: len(hc)], hc.chunk(2, -1)), -1) - hc,
            lstm_state_ref,
            torch.randn(3, 6, dtype=f64),
        )
    gru = nn.GRU(3, 3, batch_first=True).to(f64)  # over each sample's sequence (B, T, D)
    weights = (gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0)

    def gru_ref(s: torch.Tensor) -> torch.Tensor:
        h, out = s.new_zeros(len(s), 3), []
        for t in range(s.shape[1]):
            h = composite_gru_cell(s[:, t], h, *weights)
            out.append(h)
        return torch.stack(out, 1)

    return gru, lambda s: gru(s)[0], gru_ref, torch.randn(3, 4, 3, dtype=f64)


@pytest.mark.parametrize("case", ["GRU-ODE", "LSTMCell state", "nn.GRU"])
def test_pytorch_recurrent_cells_run_on_the_recording_engines(case: str) -> None:
    """PyTorch's cells write their gates in place into the pieces of one ``unsafe_chunk``
    (``chunk[0].add_(other).sigmoid_()``): the recording engines refused them (the pieces
    share memory), so ``"auto"`` fell back to the generic engines (a GRU-ODE at hidden size
    128, batch 256: divergence 2.5x, Laplacian 3.9x slower than the same cell written out).
    The pieces do not overlap; ``"structured"`` divergences and ``"taylor"`` Laplacians now
    run, and match the cell written from its equations, values and parameter gradients."""
    module, f, f_ref, x = _recurrent_fields(case)
    params = list(module.parameters())
    n = x[0].numel()

    def alone(z: torch.Tensor) -> torch.Tensor:
        return f_ref(z[None]).reshape(n)

    jacobians = torch.stack(
        [torch.func.jacrev(alone)(z.reshape(x.shape[1:])).reshape(n, n) for z in x]
    )
    expected = {"div": jacobians.diagonal(0, -2, -1).sum(-1)}
    expected["lap"] = laplacian_alone(lambda s: f_ref(s).tanh().sum(), x)
    got = {
        "div": torchdiv.divergence(f, x, method="structured"),
        "lap": torchdiv.laplacian(lambda s: f(s).tanh().flatten(1).sum(-1), x, method="taylor"),
    }
    weights = torch.tensor([0.3, -1.2, 0.7], dtype=f64)
    for key, value in got.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-10, atol=1e-10)
        grads = torch.autograd.grad((value * weights).sum(), params)
        wanted = torch.autograd.grad((expected[key] * weights).sum(), params)
        for g, e in zip(grads, wanted, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def _read_after_write(case: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f`` writing in place into one tensor of several that share memory, then reading
    another: one overlapping the written elements (a replay would read their old values),
    or, ``"disjoint"``, only elements the write left alone."""
    w = torch.linspace(-1, 1, 24, dtype=f64).reshape(4, 6)

    def f(x: torch.Tensor) -> torch.Tensor:
        g = x.sin() @ w
        a, b = g.unsafe_chunk(2, 1)
        if case == "base after a piece":
            a.sigmoid_()
            return g[:, :4]
        if case == "piece after the base":
            g.mul_(2)
            return torch.cat([a[:, :2], b[:, :2]], 1)
        if case == "overlapping view":
            view = g[:, 1:5]
            g[:, :3].mul_(2)
            return view.cos()
        a.mul_(b)  # disjoint: the written piece read through itself, the other one alone
        return torch.cat([a[:, :2], b[:, 1:3]], 1).sin()

    return f


@pytest.mark.parametrize(
    "case", ["base after a piece", "piece after the base", "overlapping view", "disjoint"]
)
def test_reads_after_a_write_through_shared_memory(case: str) -> None:
    """A tensor read after an in-place write changed its elements through another tensor
    sharing its memory is refused by the recording engines (``"auto"`` falls back, right);
    a write that left its elements alone records, right."""
    f, x = _read_after_write(case), torch.randn(3, 4, dtype=f64)
    expected = torchdiv.laplacian(f, x, method="grad-of-grad")
    torch.testing.assert_close(torchdiv.laplacian(f, x), expected, rtol=1e-10, atol=1e-10)
    if case != "disjoint":
        with pytest.raises(
            NotImplementedError, match="writing into memory shared with a tensor read after it"
        ):
            torchdiv.laplacian(f, x, method="taylor")
        with pytest.raises(
            NotImplementedError, match="writing into memory shared with a tensor read after it"
        ):
            torchdiv.divergence(f, x, method="structured")
    else:
        taylor = torchdiv.laplacian(f, x, method="taylor")
        torch.testing.assert_close(taylor, expected, rtol=1e-10, atol=1e-10)
        reverse = torchdiv.divergence(f, x, method="reverse")
        structured = torchdiv.divergence(f, x, method="structured")
        torch.testing.assert_close(structured, reverse, rtol=1e-10, atol=1e-10)


def test_packed_sequences_laplacian_loops_over_backward_passes() -> None:
    """``pack_padded_sequence`` (sequences of other lengths, ``enforce_sorted=False``) has no
    forward-mode rule: the Laplacian's ``"auto"`` (Taylor has no rule for it either; 24
    inputs, so forward over reverse) raised forward mode's NotImplementedError; it now loops
    over backward passes, and matches each sample's composite LSTM run on its own length."""
    torch.manual_seed(5)
    lstm = nn.LSTM(D, D, batch_first=True).to(f64)
    steps, lengths = 6, torch.tensor([6, 2, 4])

    def energy(s: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(s, lengths, True, enforce_sorted=False)
        out = nn.utils.rnn.pad_packed_sequence(lstm(packed)[0], True, total_length=steps)[0]
        return out.tanh().sum((1, 2))

    x = torch.randn(3, steps, D, dtype=f64)
    expected = torch.cat(
        [
            laplacian_alone(
                lambda s, n=int(n): composite_lstm(lstm, s[:, :n]).tanh().sum(), xb[None]
            )
            for xb, n in zip(x, lengths, strict=True)
        ]
    )
    torch.testing.assert_close(torchdiv.laplacian(energy, x), expected, rtol=1e-10, atol=1e-10)


def test_packed_sequences_explicit_methods_name_the_way_out() -> None:
    """torch.func's reverse mode cannot run ``pack_padded_sequence`` ("Cannot access data
    pointer of Tensor that doesn't have storage", with no hint before) and forward mode has
    no rule for it: both errors now name ``method='auto'``, which runs it (the forward-mode
    hint no longer offers ``'reverse'`` there)."""
    lstm, lengths = nn.LSTM(D, D, batch_first=True).to(f64), torch.tensor([3, 1, 2])

    def f(s: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(s, lengths, True, enforce_sorted=False)
        return nn.utils.rnn.pad_packed_sequence(lstm(packed)[0], True, total_length=3)[0]

    x = torch.randn(3, 3, D, dtype=f64)
    with pytest.raises(RuntimeError, match=r"(?s)Hint: an op of f reads .*method='auto'"):
        torchdiv.divergence(f, x, method="reverse")
    with pytest.raises(NotImplementedError, match=r"_pack_padded_sequence; use method='auto'\."):
        torchdiv.divergence(f, x, method="forward")
    assert torchdiv.divergence(f, x).shape == (3,)
