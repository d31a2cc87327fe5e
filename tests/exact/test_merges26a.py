"""Review of issue 19's per-call cuts (rev-merges26a): the thread switches of sample-mixing
detection under ``torch.compile``, and the top layer's rows broadcast by every activation's
ATen formula (``_exact.chain.unit_products``) at one sample and one row, second derivatives
included."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import torchdiv
from torchdiv._core.mixing import errors

ACTIVATIONS = {
    "tanh": torch.nn.Tanh,
    "sigmoid": torch.nn.Sigmoid,
    "relu-inplace": lambda: torch.nn.ReLU(inplace=True),
    "gelu": torch.nn.GELU,
    "gelu-tanh": lambda: torch.nn.GELU("tanh"),
    "selu": torch.nn.SELU,  # (elu with alpha and scale)
    "softplus": lambda: torch.nn.Softplus(2.0, 0.5),
    "leaky-relu": lambda: torch.nn.LeakyReLU(0.2),
}


def test_allow_batch_interaction_inside_a_compiled_function_leaves_detection_on():
    """``allow_batch_interaction()`` traced by Dynamo: it put back ``allowed()``, which is
    ``True`` while Dynamo traces, so the replayed block left the switch on and every later
    eager call in the thread computed a mixing ``f`` without the error (a train-mode batch
    norm's divergence, silently); with the switches as class defaults of the thread-local
    state Dynamo guarded on their absence from the instance, and the recompile raised
    Dynamo's ``AssertionError`` (``Guard failed on the same frame it was created``)."""

    def g(x: torch.Tensor) -> torch.Tensor:
        with torchdiv.allow_batch_interaction():
            return x.sin()

    compiled = torch.compile(g, backend="eager", dynamic=False)
    for n in (3, 4):  # (the second shape recompiles)
        x = torch.randn(n)
        torch.testing.assert_close(compiled(x), x.sin())
    assert not errors.allowed()
    with pytest.raises(torchdiv.BatchInteractionError):
        torchdiv.divergence(torch.nn.BatchNorm1d(3), torch.randn(4, 3))


def test_allow_batch_interaction_puts_back_its_own_switch_while_dynamo_traces(monkeypatch):
    """The block puts back the switch it found, not ``allowed()``, which is ``True`` while
    Dynamo traces (outside ``watched()``): a block traced with its side effects replayed
    (PyTorch 2.13, the thread state a plain ``threading.local``) left detection off for
    every later eager call of the thread."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torchdiv.allow_batch_interaction():
        assert errors.allowed()
    assert not errors._state.allowed


def _loop(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Each sample's Jacobian diagonal by a float64 loop of ``autograd.grad`` per sample and
    row on ``x``'s own graph (the products depend on ``x`` and the parameters)."""
    rows = []
    for s in range(len(x)):
        xs = x[s : s + 1]
        ys = net(xs)
        entries = [
            torch.autograd.grad(ys[0, i], xs, create_graph=True)[0][0, i] for i in range(x.shape[1])
        ]
        rows.append(torch.stack(entries))
    return torch.stack(rows)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_unit_rows_broadcast_at_one_sample_and_one_row(unit_rows, activation):
    """The top layer's rows ``(k, 1, h)`` against the activation's saved ``(N, h)`` at
    ``N = 1`` and ``k = 1`` (D = 1) and at ``k = 2``, ``N = 3``, ``x`` and the parameters
    requiring grad: the diagonal, its gradient in ``x`` and the parameters (a loss on it)
    and that gradient's own gradient equal a float64 per-sample grad-of-grad loop."""
    for d, n in ((1, 1), (2, 1), (2, 3)):
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(d, 5), ACTIVATIONS[activation](), torch.nn.Linear(5, d)
        ).double()
        x = (1.5 * torch.randn(n, d, dtype=torch.float64)).requires_grad_(True)
        torchdiv.jacobian_diagonal(net, x)  # (the first call: watched)
        del unit_rows[:]
        ours, theirs = torchdiv.jacobian_diagonal(net, x), _loop(net, x.view_as(x))
        assert unit_rows == [True], (d, n, unit_rows)  # (the rows from the top layer)
        assert_close(ours, theirs)
        weights = torch.randn_like(theirs)
        inputs = [x, *net.parameters()]
        gradients = [
            torch.autograd.grad((y * weights).sum(), inputs, create_graph=True, allow_unused=True)
            for y in (ours, theirs)
        ]
        for a, b in zip(*gradients, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert_close(a, b)
        v = [torch.randn_like(g) for g in gradients[1] if g is not None]
        second = [
            sum((g * u).sum() for g, u in zip([g for g in gs if g is not None], v, strict=True))
            for gs in gradients
        ]
        got, want = (
            torch.autograd.grad(s, inputs, allow_unused=True)
            if s.requires_grad
            else [None] * len(inputs)  # (relu's: no second derivative)
            for s in second
        )
        for p, a, b in zip(inputs, got, want, strict=True):
            zero = torch.zeros_like(p)
            assert_close(zero if a is None else a, zero if b is None else b)
