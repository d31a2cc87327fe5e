"""The compiled and distributed stacks against the twenty-fourth session's changes: the
Laplacian's one-input loop keeping a plan (``f`` evaluated plain, ``_laplacian.methods.
_one_input``), ``value_grad_laplacian``'s loop at one chosen coordinate, and
``walk.batched_vjp`` batching at its own vmap level (legacy ``_vmap``'s three calls).

- DDP and FSDP2 (gloo, two ranks on localhost: ``ddp_cases.run_pairs`` with
  ``test_dist23.run_steps``), three SGD steps of a loss holding ``laplacian`` or
  ``value_grad_laplacian`` of a D = 1 tanh MLP (the one-input loop's plan at every call),
  and of one with a fused layer norm (the first call's plain evaluation of the DDP or FSDP2
  module discarded, ``f`` run again under the modes: two forwards before one backward):
  every rank's gradients equal the float64 one-process gradients by ``torch.func`` (of the
  layer norm by its formula).
- A compiled PINN step (``aot_eager``, float64) with ``laplacian`` at D = 1 and
  ``value_grad_laplacian`` along one chosen coordinate, ``fullgraph=True`` and resampled
  batch sizes: loss and parameter gradients against per-sample grad-of-grad loops; the
  Taylor method's replay serves every batch size in one graph under ``dynamic=True``
  (``"auto"``'s traced forward over reverse does not: PyTorch's ``jvp`` under Dynamo
  specialises the batch size, docs/guide/limitations.md).
- A Chebyshev KAN (the loop's batched second level, ``walk.batched_vjp``, once its plan is
  kept), then ``torch.func.grad`` and ``vmap`` around the call (an ensemble of parameters by
  ``functional_call``): values and parameter gradients against per-sample loops.

One fault, a graph break: ``value_grad_laplacian`` at D = 1 (at most 1024 samples) in a
compiled step took the loop (``methods.loops``) while Dynamo's replay recorded it, which the
replay refuses: ``fullgraph=True`` raised, the step ran in pieces, where ``laplacian`` and D >= 2
were one graph; recorded for the Taylor engine there now. Its always-run guard:
``test_value_grad_laplacian_at_one_input_is_one_graph``; the rest guards what was right, slow.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import ddp_cases
import pytest
import test_dist23
import torch
import torch._dynamo.testing
from conftest import assert_close
from test_compiled_losses import _fresh_dynamo  # noqa: F401  (autouse: Dynamo reset per test)
from torch import nn
from torch.func import functional_call

import torchdiv

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")]

f64 = torch.float64


def _normed_tanh(h: torch.Tensor) -> torch.Tensor:
    """``tanh`` of a layer norm (PyTorch's fused kernel: the loop's plain evaluation of ``f``
    is discarded and ``f`` evaluated again under the modes, ``loop.Settings``)."""
    return torch.tanh(torch.nn.functional.layer_norm(h, h.shape[-1:]))


def _normed_tanh_composite(h: torch.Tensor) -> torch.Tensor:
    """``_normed_tanh`` by its formula (plain autograd's third derivative through the fused
    layer norm is wrong: the reference's)."""
    centred = h - h.mean(-1, keepdim=True)
    return torch.tanh(centred / (centred.square().mean(-1, keepdim=True) + 1e-5).sqrt())


# D = 1 MLPs for test_dist23's runner (imported by the spawned processes too)
test_dist23.MODELS.update(
    tanh1=(1, torch.tanh), normed1=(1, _normed_tanh), normed1_ref=(1, _normed_tanh_composite)
)
REFERENCE = {"normed1": "normed1_ref"}  # the model whose one-process steps are the reference

ONE_INPUT = [
    *[(w, "tanh1", op, "steps") for w in ("ddp", "ddp-static", "fsdp")
      for op in ("laplacian", "value_grad_laplacian")],
    *[(w, "normed1", "laplacian", "steps") for w in ("ddp-static", "ddp-unused", "fsdp")],
]  # fmt: skip


def run_one_input(item: tuple[str, str, str, str], rank: int) -> tuple[str, Any]:
    """``test_dist23.run_steps`` on this module's D = 1 model (a spawned process imports
    this module, which adds it)."""
    return test_dist23.run_steps(item, rank)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_one_input_loop_under_ddp_and_fsdp_equals_one_process():
    """``ONE_INPUT`` on one pair of gloo processes: each step's gradients on every rank equal
    the float64 one-process gradients (the loop's plan kept at the first call, ``f`` a DDP or
    FSDP2 module evaluated outside the modes at the next ones), the ranks agree."""
    outcomes = ddp_cases.run_pairs(list(enumerate(ONE_INPUT)), run_one_input)
    for index, (_, name, op, _) in enumerate(ONE_INPUT):
        status, ranks = outcomes[index]
        assert status == "ok", (ONE_INPUT[index], ranks)
        assert [r[0] for r in ranks] == ["ok"] * ddp_cases.WORLD, (ONE_INPUT[index], ranks)
        want = test_dist23._reference_steps(REFERENCE.get(name, name), op, 1)
        (steps, *_), (other, *_) = ranks[0][1], ranks[1][1]
        assert steps == other, f"{ONE_INPUT[index]}: the ranks step apart"
        for got, expected in zip(steps, want, strict=True):
            for g, e in zip(got, expected, strict=True):
                error = (torch.tensor(g, dtype=f64) - e.flatten()).norm() / e.norm()
                assert error <= 1e-12, (ONE_INPUT[index], error.item())


class FNN(nn.Module):
    """A PINN's network as DeepXDE writes it (``D -> 16 -> 16 -> 1``, tanh, Glorot-normal
    weights, zero biases), float64."""

    def __init__(self, d: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linears = nn.ModuleList()
        for d_in, d_out in itertools.pairwise([d, 16, 16, 1]):
            layer = nn.Linear(d_in, d_out, dtype=f64)
            nn.init.xavier_normal_(layer.weight)
            nn.init.zeros_(layer.bias)
            self.linears.append(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.linears[:-1]:
            x = torch.tanh(layer(x))
        return self.linears[-1](x)


class ChebyKAN(nn.Module):
    """A Chebyshev KAN layer as the ChebyKAN repository writes it: ``tanh``, a view expanded
    over the degrees, ``acos``, an in-place product with a buffer of orders, ``cos`` and an
    einsum with the coefficients ``(in, out, degree + 1)``."""

    def __init__(self, d_in: int, d_out: int, degree: int) -> None:
        super().__init__()
        self.d_in, self.degree = d_in, degree
        self.coefficients = nn.Parameter(torch.empty(d_in, d_out, degree + 1, dtype=f64))
        nn.init.normal_(self.coefficients, mean=0.0, std=1 / (d_in * (degree + 1)))
        self.register_buffer("orders", torch.arange(0, degree + 1, dtype=f64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(x)
        x = x.view((-1, self.d_in, 1)).expand(-1, -1, self.degree + 1)
        x = x.acos()
        x *= self.orders
        x = x.cos()
        return torch.einsum("bid,iod->bo", x, self.coefficients)


def _laplacians(f: Callable, x: torch.Tensor, coordinates: list[int] | None = None):
    """Each sample's Laplacian of ``f``'s one output (along ``coordinates``: all if ``None``)
    by grad-of-grad on that sample alone, with a graph into ``f``'s parameters."""
    out = []
    for row in x:
        z = row.detach().clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(f(z[None]).sum(), z, create_graph=True)
        along = range(len(z)) if coordinates is None else coordinates
        second = [torch.autograd.grad(gradient[i], z, create_graph=True)[0][i] for i in along]
        out.append(torch.stack(second).sum())
    return torch.stack(out)


def _heat(f: Callable, x: torch.Tensor) -> torch.Tensor:
    """``u_t - 0.1 u_xx`` at ``(x, t)`` rows of a D = 2 ``x``, ``u_xx`` along coordinate 0."""
    out = torchdiv.value_grad_laplacian(f, x, coordinates=[0])
    return out.gradient[:, 0, 1] - 0.1 * out.laplacian[:, 0]


def _heat_reference(f: Callable, x: torch.Tensor) -> torch.Tensor:
    z = x.detach().clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(f(z).sum(), z, create_graph=True)
    return gradient[:, 1] - 0.1 * _laplacians(f, x, [0])


STEPS = {  # (D, the residual, its reference)
    "laplacian, D = 1": (1, lambda f, x: torchdiv.laplacian(f, x)[:, 0], _laplacians),
    "value_grad_laplacian along one of two": (2, _heat, _heat_reference),
}


def _gradients(net: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    params = list(net.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STEPS))
def test_a_compiled_pinn_step_equals_per_sample_loops(name):
    """``fullgraph=True``, batches of 8, 8, 11 and 40 (the one-input loop's and the partial
    loop's plans made by eager calls first, as a training script's validation does): each
    step's loss and parameter gradients equal float64 per-sample grad-of-grad loops."""
    d, residual, reference = STEPS[name]
    net = FNN(d)
    residual(net, torch.rand(8, d, dtype=f64)).sum().backward()  # an eager call: plans kept
    net.zero_grad()
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(
        lambda x: residual(net, x).square().mean(), backend=counter, fullgraph=True
    )
    for n in (8, 8, 11, 40):
        x = torch.rand(n, d, dtype=f64, generator=torch.Generator().manual_seed(n))
        loss = step(x)
        want = reference(net, x).square().mean()
        assert_close(loss, want)
        for got, expected in zip(_gradients(net, loss), _gradients(net, want), strict=True):
            assert_close(got, expected)
    assert counter.frame_count >= 1


@pytest.mark.slow
def test_taylor_serves_every_batch_size_of_a_one_input_pinn():
    """``method="taylor"`` at D = 1 under ``dynamic=True``: one graph for six batch sizes
    (the way out for ``"auto"``'s traced forward over reverse, whose ``torch.func.jvp`` PyTorch
    specialises per batch size: six graphs), each loss equal to the per-sample loop's."""
    net = FNN(1)
    counters = []
    for method in ("taylor", "auto"):
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounter()
        step = torch.compile(
            lambda x, m=method: torchdiv.laplacian(net, x, method=m).square().mean(),
            backend=counter,
            dynamic=True,
        )
        for n in (8, 9, 12, 40, 100, 333):
            x = torch.rand(n, 1, dtype=f64)
            assert_close(step(x), _laplacians(net, x).square().mean())
        counters.append(counter.frame_count)
    assert counters[0] == 1 and counters[1] <= 6  # (PyTorch 2.13: 6; fewer welcome)


@pytest.mark.slow
def test_transforms_around_a_kan_whose_loop_is_batched(monkeypatch):
    """Two ChebyKAN layers at two inputs, batch 64: the eager calls keep the loop's plan
    with its second level batched (``walk.batched_vjp``, counted); then ``torch.func.grad``
    of a Laplacian loss by ``functional_call`` and ``vmap`` over an ensemble of two parameter
    sets: values and parameter gradients equal per-sample grad-of-grad loops."""
    from torchdiv._laplacian import loop

    batched: list[int] = []
    original = loop.batched_vjp

    def counted(*args: Any) -> torch.Tensor | None:
        batched.append(1)
        return original(*args)

    monkeypatch.setattr(loop, "batched_vjp", counted)
    torch.manual_seed(0)
    net = nn.Sequential(ChebyKAN(2, 8, 4), ChebyKAN(8, 1, 4))
    x = 0.8 * torch.rand(64, 2, dtype=f64)
    want = _laplacians(net, x)
    want_grads = _gradients(net, want.square().mean())
    for _ in range(3):
        assert_close(torchdiv.laplacian(net, x)[:, 0], want.detach())
    assert batched, "the loop's second level was not batched: the path is not tested"
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torchdiv.laplacian(lambda z: functional_call(net, p, (z,)), x).square().mean()

    grads = torch.func.grad(loss)(params)
    for got, expected in zip(grads.values(), want_grads, strict=True):
        assert_close(got, expected)
    ensemble = {k: torch.stack([v, 1.1 * v]) for k, v in params.items()}
    got = torch.func.vmap(lambda p: torchdiv.laplacian(lambda z: functional_call(net, p, (z,)), x))(
        ensemble
    )
    with torch.no_grad():
        scaled = nn.Sequential(ChebyKAN(2, 8, 4), ChebyKAN(8, 1, 4))
        for target, source in zip(scaled.parameters(), net.parameters(), strict=True):
            target.copy_(1.1 * source)
    assert_close(got[0, :, 0], want.detach())
    assert_close(got[1, :, 0], _laplacians(scaled, x).detach())


def test_value_grad_laplacian_at_one_input_is_one_graph():
    """A D = 1 PINN residual by ``value_grad_laplacian`` in a ``fullgraph=True`` step
    (``aot_eager``), twice: one graph (the Taylor engine's replay; the loop there broke the
    graph), loss and parameter gradients equal to the per-sample loop's."""
    net = FNN(1)

    def loss(x: torch.Tensor) -> torch.Tensor:
        out = torchdiv.value_grad_laplacian(net, x)
        return (out.laplacian[:, 0] + out.value[:, 0] * out.gradient[:, 0, 0]).square().mean()

    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(loss, backend=counter, fullgraph=True)
    x = torch.linspace(-1, 1, 6, dtype=f64)[:, None]
    z = x.clone().requires_grad_(True)
    u = net(z)
    (du,) = torch.autograd.grad(u.sum(), z, create_graph=True)
    want = (_laplacians(net, x) + u[:, 0] * du[:, 0]).square().mean()
    want_grads = _gradients(net, want)
    for _ in range(2):
        got = step(x)
        assert_close(got, want.detach())
        for g, e in zip(_gradients(net, got), want_grads, strict=True):
            assert_close(g, e)
    assert counter.frame_count == 1
