"""Adversarial review of two merges of the twentieth session: the walks that stop at ``x``'s
history (rev-scoresde20: ``walk.search``/``nodes``/``towards``, ``check_graph``,
``_custom_functions``) and Lightning Fabric's guard switched off during a call
(rev-lightning20: ``_core.modes._fabric_guards_off``).

The history stop is checked where what those walks look for (a custom ``autograd.Function``
with a ``@once_differentiable`` backward, a train-mode batch norm, a hooked leaf, a tensor
shared with ``f``) sits in ``x``'s history *and* is reached by ``f``'s output through another
path: values and every parameter gradient (``create_graph``) against a float64 loop of one
``autograd.grad`` per sample and coordinate."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch
from conftest import assert_close
from torch.autograd.function import once_differentiable

import torchdiv

B, D = 4, 3


class OnceTanh(torch.autograd.Function):
    """``tanh`` with a ``@once_differentiable`` backward (a fused kernel's, as extension
    libraries write them): a second derivative through it would be silently missing;
    ``setup_context``: ``torch.func`` runs it."""

    @staticmethod
    def forward(x):
        return x.tanh()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad * (1 - out * out)


def _net(seed: int, d_in: int = D, d_out: int = D) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, 8), torch.nn.Tanh(), torch.nn.Linear(8, d_out)
    ).double()


class Case:
    """``x`` made by a history with parameters of its own (``history()`` -> ``x`` and a tensor
    ``f`` may close over), and ``f(x, kept)``."""

    def __init__(self) -> None:
        seeded = torch.Generator().manual_seed(3)
        self.raw = torch.randn(B, D, dtype=torch.float64, generator=seeded)
        self.enc, self.net = _net(1), _net(2)
        self.bn = torch.nn.BatchNorm1d(D).double()  # (train mode, where a case uses it)
        self.params = [*self.enc.parameters(), *self.net.parameters(), *self.bn.parameters()]

    def history(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def f(self, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ClosesOverACustomFunction(Case):
    """``x = h.view_as(h)``, ``h`` made through a ``@once_differentiable`` Function, and
    ``f(x) = net(x) * h``: ``f`` reaches the Function through ``h`` too."""

    def history(self):
        h = OnceTanh.apply(self.enc(self.raw))
        return h.view_as(h), h

    def f(self, x, kept):
        return self.net(x) * kept


class AddsAFunctionOfAnAncestor(Case):
    """``x = 2 h``; ``y = net(x) + g(h)``, ``g`` a ``@once_differentiable`` Function."""

    def history(self):
        h = self.enc(self.raw)
        return 2 * h, h

    def f(self, x, kept):
        return self.net(x) + OnceTanh.apply(kept)


class ViewOfAHookedLeaf(Case):
    """``x`` a view of a leaf whose hook doubles its gradients (the caller's own)."""

    def __init__(self) -> None:
        super().__init__()
        self.leaf = torch.nn.Parameter(self.raw.repeat(1, 2))
        self.leaf.register_hook(lambda g: 2 * g)
        self.params.append(self.leaf)

    def history(self):
        return self.leaf[:, 1 : 1 + D], self.leaf

    def f(self, x, kept):
        return self.net(x) + kept[:, :D].sin()


class MadeByABatchNorm(Case):
    """``x = bn(h)``, a train-mode batch norm (``x.grad_fn``: it mixes the history's samples,
    not ``f``'s), and ``f`` closes over its input: ``f(x) = net(x) * h ** 2``."""

    def history(self):
        h = self.enc(self.raw)
        return self.bn(h), h

    def f(self, x, kept):
        return self.net(x) * kept.square()


class BatchNormOfAnAncestor(Case):
    """``x = tanh(h)``; ``y = net(x) + bn(h)``: a train-mode batch norm on ``f``'s graph
    whose input is an ancestor of ``x``, not ``x``: per sample in ``x``."""

    def history(self):
        h = self.enc(self.raw)
        return h.tanh(), h

    def f(self, x, kept):
        return self.net(x) + self.bn(kept)


class SharesAFactor(Case):
    """``x = 2 a`` and ``f(x) = net(x) * a``: a node of ``x``'s history in ``f``'s graph."""

    def history(self):
        a = self.enc(self.raw)
        return a * 2, a

    def f(self, x, kept):
        return self.net(x) * kept


class BatchNormOfASibling(Case):
    """``x, z = enc(raw).split(3, 1)`` (one node, ``x.grad_fn``, makes both) and
    ``y = net(x) + bn(z)``: the batch norm reaches ``x.grad_fn`` through ``z``'s edge, not
    ``x``'s. The graph forms refused it as a batch norm of ``x`` (``_reaches``)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = _net(1, D, 2 * D)
        self.params = [*self.enc.parameters(), *self.net.parameters(), *self.bn.parameters()]

    def history(self):
        x, z = self.enc(self.raw).split(D, 1)
        return x, z

    def f(self, x, kept):
        return self.net(x) + self.bn(kept)


CASES = [
    ClosesOverACustomFunction,
    AddsAFunctionOfAnAncestor,
    ViewOfAHookedLeaf,
    MadeByABatchNorm,
    BatchNormOfAnAncestor,
    SharesAFactor,
    BatchNormOfASibling,
]


def _reference(case: Case) -> torch.Tensor:
    """Each sample's divergence, one ``autograd.grad`` per sample and coordinate (with a
    graph), ``x`` made once: the history's batch norm normalises the whole batch."""
    x, kept = case.history()
    y = case.f(x, kept)
    terms = [
        torch.stack(
            [torch.autograd.grad(y[b, i], x, create_graph=True)[0][b, i] for i in range(D)]
        ).sum()
        for b in range(B)
    ]
    return torch.stack(terms)


def _gradients(case: Case, value: torch.Tensor) -> list[torch.Tensor]:
    grads = torch.autograd.grad(value.square().sum(), case.params, allow_unused=True)
    pairs = zip(case.params, grads, strict=True)
    return [torch.zeros_like(p) if g is None else g for p, g in pairs]


def _function_form(method: str) -> Callable[[Case], torch.Tensor]:
    def call(case: Case) -> torch.Tensor:
        x, kept = case.history()
        return torchdiv.divergence(lambda z: case.f(z, kept), x, method=method)

    return call


def _graph_form(case: Case) -> torch.Tensor:
    x, kept = case.history()
    return torchdiv.graph_divergence(case.f(x, kept), x, create_graph=True)


CALLS = {
    "auto": _function_form("auto"),
    "reverse": _function_form("reverse"),
    "graph": _graph_form,
}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_what_the_walks_look_for_in_x_s_history_and_f_s_graph(case, call):
    """The walks stop at ``x.grad_fn``; what they look for sits below it and is reached by
    ``f`` through another path: values and the parameter gradients of a loss on them (the
    history's, through ``x``, included) equal the float64 loop's."""
    ours, want = case(), case()
    got = CALLS[call](ours)
    expected = _reference(want)
    assert_close(got, expected)
    for a, b in zip(_gradients(ours, got), _gradients(want, expected), strict=True):
        assert_close(a, b)


def _laplacian_reference(case: Case) -> torch.Tensor:
    """Each sample's Laplacian of every output, by ``autograd.grad`` of each gradient entry."""
    x, kept = case.history()
    y = case.f(x, kept)
    out = []
    for b in range(B):
        for i in range(D):
            (g,) = torch.autograd.grad(y[b, i], x, create_graph=True)
            seconds = [
                torch.autograd.grad(g[b, j], x, create_graph=True)[0][b, j] for j in range(D)
            ]
            out.append(torch.stack(seconds).sum())
    return torch.stack(out).reshape(B, D)


def _laplacian(case: Case) -> torch.Tensor:
    x, kept = case.history()
    return torchdiv.laplacian(lambda z: case.f(z, kept), x, method="grad-of-grad")


def _graph_laplacian(case: Case) -> torch.Tensor:
    x, kept = case.history()
    return torchdiv.graph_laplacian(case.f(x, kept), x, create_graph=True)


@pytest.mark.parametrize("call", [_laplacian, _graph_laplacian], ids=lambda c: c.__name__[1:])
@pytest.mark.parametrize(
    "case",
    [ClosesOverACustomFunction, MadeByABatchNorm, BatchNormOfASibling],
    ids=lambda c: c.__name__,
)
def test_laplacians_through_the_stopped_walks(case, call):
    """The same for the Laplacian's loop (``_laplacian.loop``'s ``search``) and graph form
    (``towards``, ``_custom_functions`` of the gradients' graph)."""
    ours, want = case(), case()
    got = call(ours)
    expected = _laplacian_reference(want)
    assert_close(got, expected)
    for a, b in zip(_gradients(ours, got), _gradients(want, expected), strict=True):
        assert_close(a, b)


# ---------------------------------------------------------------- Fabric's guard flag


class _Paused(torch.autograd.Function):
    """The identity whose backward waits for an event (a step of two threads, in order)."""

    @staticmethod
    def forward(ctx, y, inside, go):
        ctx.events = inside, go
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        inside, go = ctx.events
        inside.set()
        go.wait(30)
        return grad, None, None


def test_fabric_guards_stay_off_until_the_last_thread_s_call_ends():
    """Two threads' calls overlap on a ``bf16-mixed`` Fabric module: the first to end switched
    Fabric's guard back on while the second's own backward passes ran, which raised
    "requires you to call fabric.backward(loss)" (as ``GraphSpent``). Held by a count now, as
    the other process-wide settings: the second call right, the flag off at the end."""
    fabric = pytest.importorskip("lightning.fabric").Fabric(
        accelerator="cpu", devices=1, precision="bf16-mixed"
    )
    wrappers = pytest.importorskip("lightning.fabric.wrappers")
    net = _net(0).float()
    model = fabric.setup_module(net)
    first_inside, second_inside, first_done = (threading.Event() for _ in range(3))
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(0))
    results: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []

    def first() -> None:
        def f(z: torch.Tensor) -> torch.Tensor:
            first_inside.set()
            second_inside.wait(30)  # the second call is inside its backward passes
            return z.sin()

        try:
            torchdiv.divergence(f, x, method="reverse")
        except BaseException as error:  # reported below, not lost in the thread
            errors.append(error)
        finally:
            first_done.set()

    def second() -> None:
        first_inside.wait(30)
        z = x.clone().requires_grad_(True)
        y = _Paused.apply(model(z), second_inside, first_done)
        try:
            results["second"] = torchdiv.graph_divergence(y, z)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    want = torch.stack([torch.func.jacrev(net)(s).trace() for s in x])  # (bf16 autocast: 3e-2)
    torch.testing.assert_close(results["second"].float(), want, rtol=0, atol=3e-2)
    assert wrappers._in_fabric_backward is False
    with pytest.raises(RuntimeError, match=r"fabric\.backward"):
        model(x.requires_grad_(True)).sum().backward()
