"""Review of kanlap23's merge (rev-merges23e): ``"auto"``'s deciding Laplacian call runs the
Taylor engine from its recording (``f`` evaluated once), a frozen tanh / sigmoid MLP chain takes
``_laplacian.chain`` from its second call at up to 10 inputs, and the loop's batched second
level goes to PyTorch's engine under its legacy ``_vmap`` (``walk.batched_vjp``). No fault was
found; these pin what the review checked against float64 grad-of-grad references."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_close,
    assert_same_parameter_gradients,
    laplacian_by_grad_of_grad,
    laplacians_by_grad_of_grad,
)

import torchdiv
from torchdiv._core import walk
from torchdiv._laplacian import methods as _laplacian
from torchdiv._taylor.cache import PlanCache

f64 = torch.float64


def _chain_net(d: int) -> torch.nn.Module:
    """``d -> 16 -> 16 -> 1``, tanh then sigmoid: a chain ``_laplacian.methods.chained`` takes."""
    return torch.nn.Sequential(
        torch.nn.Linear(d, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Sigmoid(),
        torch.nn.Linear(16, 1),
    ).to(f64)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``"auto"``'s decisions forgotten first; one entry per recording of ``f``."""
    monkeypatch.setattr(_laplacian, "_LOOPS", PlanCache(256))
    capture = _laplacian.capture
    calls: list[int] = []
    monkeypatch.setattr(_laplacian, "capture", lambda *a, **k: calls.append(1) or capture(*a, **k))
    return calls


@pytest.mark.parametrize("train", [False, True], ids=["frozen", "train"])
def test_the_deciding_call_and_the_loop_draw_dropout_as_one_evaluation(laplacian_chained, train):
    """A dropout net at two inputs: the deciding call (the Taylor engine from its recording)
    and the later loops each draw one mask, the one a single evaluation of ``f`` draws from
    the same seed (values, the generator's state after, parameter gradients)."""
    torch.manual_seed(0)
    layers = torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 1)
    net = torch.nn.Sequential(*layers).to(f64).requires_grad_(train)
    x = torch.randn(16, 2, dtype=f64)
    for seed in range(3):
        torch.manual_seed(seed)
        got = torchdiv.laplacian(net, x).reshape(-1)
        after = torch.rand(1)
        torch.manual_seed(seed)
        want = laplacian_by_grad_of_grad(lambda z: net(z)[:, 0], x)
        assert_close(got, want)
        assert torch.equal(after, torch.rand(1)), seed
        if train:
            assert_same_parameter_gradients(net, got.square().sum(), want.square().sum())


@pytest.mark.parametrize("how", ["module", "functional-call"])
def test_a_frozen_chain_whose_parameters_start_to_train(recorded, how):
    """The frozen chain's plan at 6 inputs, then the parameters require grad: through the
    module, a new structure (recorded: the Taylor engine); through ``functional_call``'s
    dict, which the structure key does not read, the plan's next call needs a graph: it
    leaves the chain as one that gives way (the loop once, then the Taylor engine). Until
    this review such calls kept the chain with its graph, 1.83x the Taylor engine's time
    for the Laplacian and its parameter gradients (D = 10, width 64, B = 256, float32, one
    thread). Values and parameter gradients equal the float64 loop's at every call."""
    torch.manual_seed(0)
    net = _chain_net(6).requires_grad_(False)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    if how == "module":
        f, trained = net, list(net.parameters())
    else:
        f, trained = (lambda z: torch.func.functional_call(net, params, (z,))), [*params.values()]
    x = torch.randn(8, 6, dtype=f64)
    for _ in range(2):
        torchdiv.laplacian(f, x)
    assert len(recorded) == 1  # (the second call took the chain)
    for p in trained:
        p.requires_grad_(True)
    for call in range(2):
        recorded.clear()
        got = torchdiv.laplacian(f, x)
        assert len(recorded) == (1 if how == "module" else call), call
        want = laplacians_by_grad_of_grad(f, x)
        assert got.requires_grad
        assert_close(got, want)
        losses = got.square().sum(), want.square().sum()
        grads = (torch.autograd.grad(loss, trained, materialize_grads=True) for loss in losses)
        for a, b in zip(*grads, strict=True):  # (the output bias: zero in both)
            assert_close(a, b)


def test_a_sample_that_is_not_finite_stays_its_own_in_the_chain(recorded):
    """A ``nan`` in one sample's ``x``: that sample's Laplacian is ``nan`` at both calls,
    the others equal the float64 loop's (the chain, then the loop's forward-mode rerun)."""
    torch.manual_seed(0)
    net = _chain_net(6).requires_grad_(False)
    x = torch.randn(8, 6, dtype=f64)
    x[3, 2] = float("nan")
    want = laplacians_by_grad_of_grad(net, x)
    others = [0, 1, 2, 4, 5, 6, 7]
    for _ in range(2):
        got = torchdiv.laplacian(net, x)
        assert got[3].isnan().all()
        assert_close(got[others], want[others])


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("mode", ["anomaly", "saved-tensor-hooks"])
def test_the_chain_under_debugging_modes(recorded, mode):
    """Anomaly mode or saved-tensor hooks around the calls: the chain gives way (its saved
    tensors are not read there), the loop's passes, then the Taylor engine again; values
    equal the float64 loop's at every call."""
    torch.manual_seed(0)
    net = _chain_net(6).requires_grad_(False)
    x = torch.randn(8, 6, dtype=f64)
    want = laplacians_by_grad_of_grad(net, x)
    if mode == "anomaly":
        around = torch.autograd.detect_anomaly(check_nan=False)
    else:
        around = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    with around:
        for _ in range(3):
            assert_close(torchdiv.laplacian(net, x), want)


@pytest.mark.parametrize("d", [10, 11])
def test_the_chain_stops_at_ten_inputs(recorded, d):
    """At 10 inputs the second call takes the chain (no recording); at 11 every call
    records (the Taylor engine). Values equal the float64 loop's."""
    torch.manual_seed(0)
    net = _chain_net(d).requires_grad_(False)
    x = torch.randn(8, d, dtype=f64)
    want = laplacians_by_grad_of_grad(net, x)
    for _ in range(3):
        assert_close(torchdiv.laplacian(net, x), want)
    assert len(recorded) == (1 if d == 10 else 3)


@pytest.mark.parametrize("create_graph", [False, True])
def test_the_batched_pass_equals_autograd_grad(create_graph):
    """``walk.batched_vjp`` (PyTorch's engine under its legacy ``_vmap``, private APIs) gives
    ``autograd.grad(..., is_grads_batched=True)``'s rows, a graph in ``x`` with
    ``create_graph``, and ``None`` for an ``x`` the output does not depend on."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=f64, requires_grad=True)
    (gradient,) = torch.autograd.grad(torch.tanh(x).pow(3).sum(), x, create_graph=True)
    eye = torch.eye(3, dtype=f64).unsqueeze(1).expand(3, 5, 3)
    got = walk.batched_vjp(gradient, x, eye, create_graph)
    (want,) = torch.autograd.grad(
        gradient, x, eye, retain_graph=True, create_graph=create_graph, is_grads_batched=True
    )
    assert_close(got, want)
    assert got.requires_grad == create_graph
    if create_graph:
        got_x, want_x = (torch.autograd.grad(t.sum(), x, retain_graph=True)[0] for t in (got, want))
        assert_close(got_x, want_x)
    unused = torch.randn(5, 3, dtype=f64, requires_grad=True)
    assert walk.batched_vjp(gradient, unused, eye, create_graph) is None
