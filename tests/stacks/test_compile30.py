"""compile30: a compiled replay's restart after ``torch._dynamo.reset()``.

The replays (``_structured.replay``, ``_laplacian.traced``) give each restarted attempt of a
compilation the keys its first attempt recorded (``replay.restarted``). They were kept by
``CompileId``, which ``torch._dynamo.reset()`` starts again from "0/0": the first compilation
after a reset read an earlier compilation's keys. Where the calls matched (the same module,
changed: a Softplus's ``beta``), the restart replayed the earlier plan, its numbers the old
ones: **silently wrong** values and gradients under ``dynamic=True`` (PyTorch restarts once
for a Softplus's or ELU's float there, the model alone too). Where they did not, each attempt
recorded again under a new key, whose floats Dynamo made new symbols: a restart per attempt
(19 backend compilations for a Softplus conv net, regress29's reproducer). Compiled with
``aot_eager`` in float64; values and parameter gradients against per-sample loops of
``torch.autograd.grad``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import assert_close
from test_compiled_losses import Counting, _fresh_dynamo  # noqa: F401  (autouse reset)

import torchdiv

pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not")
f64 = torch.float64


def _mlp(act: torch.nn.Module) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 16), act, torch.nn.Linear(16, 3)).double()


def _reference(net: torch.nn.Module, x: torch.Tensor, order: int) -> torch.Tensor:
    """Per sample, the divergence ``sum_j df_j/dx_j`` (``order`` 1) or each output's Laplacian
    ``sum_j d^2 f_k / dx_j^2`` (``order`` 2), by ``torch.autograd.grad`` one sample and
    coordinate at a time, differentiable in the parameters."""
    out = []
    for xi in x:
        xi = xi.detach().requires_grad_(True)
        y = net(xi[None])[0]
        rows = [torch.autograd.grad(y[k], xi, create_graph=True)[0] for k in range(y.numel())]
        if order == 1:
            out.append(sum(rows[j][j] for j in range(xi.numel())))
            continue
        laps = []
        for g in rows:
            second = [
                torch.autograd.grad(g[j], xi, create_graph=True)[0] for j in range(xi.numel())
            ]
            laps.append(sum(h[j] for j, h in enumerate(second)))
        out.append(torch.stack(laps))
    return torch.stack(out)


def _grads(net: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters' gradients, zeros where none (the last bias: no part of a divergence)."""
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in net.parameters()]


CASES: dict[str, tuple[Callable[[], torch.nn.Module], str, Callable[..., torch.Tensor], int]] = {
    "structured-softplus": (
        lambda: torch.nn.Softplus(),
        "beta",
        lambda f, x: torchdiv.divergence(f, x, method="structured"),
        1,
    ),
    "structured-elu": (
        lambda: torch.nn.ELU(),
        "alpha",
        lambda f, x: torchdiv.divergence(f, x, method="structured"),
        1,
    ),
    "taylor-softplus": (
        lambda: torch.nn.Softplus(),
        "beta",
        lambda f, x: torchdiv.laplacian(f, x, method="taylor"),
        2,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_a_restart_after_a_reset_replays_this_compilations_plan(name):
    """A loss compiled, Dynamo reset, the activation's number changed (``beta`` 1 -> 3,
    ``alpha`` 1 -> 0.3), the loss compiled with ``dynamic=True``: its value and parameter
    gradients are the changed net's (before: the first compilation's plan, its old number,
    on the restart Dynamo makes for that float). Slow: two compilations, 4-15 s."""
    act, attribute, call, order = CASES[name]
    net = _mlp(act())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, generator=g, dtype=f64)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return call(net, x).square().sum()

    before = torch.compile(loss, backend=Counting())(x).detach()
    torch._dynamo.reset()
    setattr(net[1], attribute, 3.0 if attribute == "beta" else 0.3)
    net.zero_grad()
    compiled = torch.compile(loss, backend=Counting(), dynamic=True)(x)
    compiled.backward()
    grads = _grads(net)
    net.zero_grad()
    expected = _reference(net, x, order).square().sum()
    expected.backward()
    # float64: the same function by other arithmetic, a few ulps of terms O(1)-O(10)
    assert_close(compiled.detach(), expected.detach())
    for got, want in zip(grads, _grads(net), strict=True):
        assert_close(got, want)
    assert (before - expected).abs() > 1e-3  # (the test tells the two numbers apart)
