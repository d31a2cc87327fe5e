"""Discrete normalizing flows as their repositories write them, under torchdiv's operators.

Glow (Kingma and Dhariwal 2018) initialises ActNorm from the data: the first forward ever
sets each channel's bias and log-scale from the batch's statistics (under ``no_grad``, into
the parameters' ``.data``) and sets a flag. Glow-PyTorch (y0ast) keeps that flag as a plain
attribute, ``self.inited = True``; glow-pytorch (rosinality) as a buffer it fills in place.
When the first call a model ever sees is a torchdiv call that evaluates ``f`` more than once
(forward mode in chunks, the Laplacian's fallbacks), torchdiv puts back what an evaluation
wrote before the next: it put the parameters back but not the plain flag, so the next
evaluation differentiated the uninitialised layer and the model stayed uninitialised.

References: the same model initialised by a plain forward of the same batch, differentiated
one sample at a time by plain autograd (grad of grad for the Laplacian), in float64.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch
from conftest import laplacian_alone
from torch import nn

import torchdiv

f64 = torch.float64


class GlowPyTorchActNorm(nn.Module):
    """ActNorm as Glow-PyTorch writes it: data-dependent initialisation, a plain flag."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.inited = False

    def initialize_parameters(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            bias = -torch.mean(x.clone(), dim=[0, 2, 3], keepdim=True)
            var = torch.mean((x.clone() + bias) ** 2, dim=[0, 2, 3], keepdim=True)
            self.bias.data.copy_(bias.data)
            self.logs.data.copy_(torch.log(1.0 / (torch.sqrt(var) + 1e-6)).data)
            self.inited = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.inited:
            self.initialize_parameters(x)
        return (x + self.bias) * torch.exp(self.logs)


def _flow() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        GlowPyTorchActNorm(2), nn.Flatten(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)
    ).to(f64)


def _jacobian_alone(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.stack(
        [
            torch.autograd.functional.jacobian(lambda s: f(s[None])[0], xb, create_graph=True)
            for xb in x
        ]
    )


CALLS = {
    "divergence forward chunks": lambda f, x: torchdiv.divergence(
        lambda s: f(s).reshape(s.shape), x, method="forward", chunk_size=1
    ),
    "jacobian forward chunks": lambda f, x: torchdiv.jacobian(f, x, method="forward", chunk_size=1),
    "laplacian auto": lambda f, x: torchdiv.laplacian(lambda s: f(s).tanh().sum(-1), x),
    "value_grad_laplacian": lambda f, x: (
        torchdiv.value_grad_laplacian(lambda s: f(s).tanh().sum(-1), x).laplacian
    ),
    "laplacian forward-over-reverse chunks": lambda f, x: torchdiv.laplacian(
        lambda s: f(s).tanh().sum(-1), x, method="forward-over-reverse", chunk_size=1
    ),
}


def _reference(name: str, flow: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if name.startswith("divergence"):
        jac = _jacobian_alone(flow, x).reshape(len(x), 8, 8)
        return jac.diagonal(0, 1, 2).sum(-1)
    if name.startswith("jacobian"):
        return _jacobian_alone(flow, x)
    return laplacian_alone(lambda s: flow(s).tanh().sum(-1), x)


@pytest.mark.parametrize("name", list(CALLS))
def test_a_glow_actnorm_first_initialised_inside_a_call_is_initialised_once_and_right(
    name: str,
) -> None:
    """The first forward of a Glow-PyTorch ActNorm inside a call that evaluates ``f`` more
    than once: its parameters and flag end as one plain forward leaves them (from the whole
    batch), and the values and parameter gradients are those of the initialised model (they
    were those of the uninitialised one: 0.11-0.49 off)."""
    x = torch.randn(5, 2, 2, 2, dtype=f64) * 3 + 2
    plain = _flow()
    plain(x)  # the reference: initialised by a plain forward of the same batch
    flow = _flow()
    got = CALLS[name](flow, x)
    assert flow[0].inited
    for p, q in zip(flow.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    expected = _reference(name, plain, x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    weights = torch.linspace(-1, 1, got.numel(), dtype=f64).reshape(got.shape)
    grads = torch.autograd.grad(
        (got * weights).sum(), list(flow.parameters()), materialize_grads=True
    )
    expected_grads = torch.autograd.grad(
        (expected * weights).sum(), list(plain.parameters()), materialize_grads=True
    )
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_a_plain_counter_of_forwards_moves_once_per_call() -> None:
    """A plain attribute ``f`` changes (a step counter ``self.steps += 1``) moves once per
    call, as a buffer does, however many times the call evaluates ``f``."""

    class Counted(nn.Linear):
        steps = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.steps += 1
            return super().forward(x).tanh()

    net = Counted(3, 3).to(f64)
    torchdiv.divergence(net, torch.randn(4, 3, dtype=f64), method="forward", chunk_size=1)
    assert net.steps == 1


class NormflowsActNorm(nn.Module):
    """ActNorm as normflows writes it: ``.data`` set from the first batch, a buffer set anew."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.zeros(1, features))
        self.t = nn.Parameter(torch.zeros(1, features))
        self.register_buffer("data_dep_init_done", torch.tensor(0.0))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not self.data_dep_init_done > 0.0:
            s_init = -torch.log(z.std(dim=[0], keepdim=True) + 1e-6)
            self.s.data = s_init.data
            self.t.data = (-z.mean(dim=[0], keepdim=True) * torch.exp(self.s)).data
            self.data_dep_init_done = torch.ones(1)
        return z * torch.exp(self.s) + self.t


class FreiaActNorm(nn.Module):
    """ActNorm as FrEIA writes it: ``.data`` set from the first batch, a boolean buffer."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(1, features))
        self.bias = nn.Parameter(torch.zeros(1, features))
        self.register_buffer("is_initialized", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_initialized:
            data = x.transpose(0, 1).contiguous().view(x.shape[1], -1)
            self.scale.data = torch.log(1 / data.std(dim=-1)).view(1, -1)
            self.bias.data = -data.mean(dim=-1).view(1, -1)
            self.is_initialized.data = torch.tensor(True)
        return x * self.scale.exp() + self.bias


SET_DATA_CALLS = {
    "divergence reverse": lambda f, x: torchdiv.divergence(f, x, method="reverse"),
    "divergence forward chunks": lambda f, x: torchdiv.divergence(
        f, x, method="forward", chunk_size=1
    ),
    "jacobian auto": lambda f, x: torchdiv.jacobian(f, x),
    "laplacian forward-over-reverse chunks": lambda f, x: torchdiv.laplacian(
        lambda s: f(s).tanh().sum(-1), x, method="forward-over-reverse", chunk_size=1
    ),
}


@pytest.mark.parametrize("layer", [NormflowsActNorm, FreiaActNorm])
@pytest.mark.parametrize("name", list(SET_DATA_CALLS))
def test_an_actnorm_setting_data_on_its_first_forward_inside_a_call(
    layer: type[nn.Module], name: str
) -> None:
    """An ActNorm that sets its parameters' ``.data`` on its first forward, first run inside
    a call: under the engines' ``torch.func`` transforms that crashed the process (a
    segmentation fault), and a buffer it set anew under the first chunk's transforms raised
    PyTorch's internal assert in the next. Now initialised from the whole batch, as a plain
    forward does, with plain tensors (the model saves), and the result is that of the
    initialised model."""

    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(layer(4), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).to(f64)

    x = torch.randn(6, 4, dtype=f64) * 2 + 1
    plain = make()
    plain(x)
    flow = make()
    got = SET_DATA_CALLS[name](flow, x)
    for p, q in zip(flow.state_dict().values(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    torch.save(flow.state_dict(), io.BytesIO())
    if name.startswith("divergence"):
        expected = _jacobian_alone(plain, x).diagonal(0, 1, 2).sum(-1)
    elif name.startswith("jacobian"):
        expected = _jacobian_alone(plain, x)
    else:
        expected = laplacian_alone(lambda s: plain(s).tanh().sum(-1), x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_a_layer_put_in_between_calls_has_its_flag_put_back() -> None:
    """The modules whose plain values a call puts back between its evaluations
    (``torchdiv._core.settings``) are found anew at every call: an ActNorm put into the model
    after a first call of the same ``f``, first run inside the second (forward mode in chunks:
    one evaluation per chunk), is initialised once from the whole batch and the divergence
    is the initialised model's. A list of modules kept from the first call misses it: its
    flag stayed set while its parameters were put back, and the later chunks differentiated
    the uninitialised layer."""
    x = torch.randn(5, 2, 2, 2, dtype=f64) * 3 + 2
    plain = _flow()
    plain(x)
    flow = _flow()
    layer = flow[0]
    flow[0] = nn.Identity()

    def f(s: torch.Tensor) -> torch.Tensor:
        return flow(s).reshape(s.shape)

    torchdiv.divergence(f, x, method="forward", chunk_size=1)
    flow[0] = layer
    got = torchdiv.divergence(f, x, method="forward", chunk_size=1)
    assert layer.inited
    for p, q in zip(flow.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    expected = _reference("divergence", plain, x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_the_modules_of_a_call_are_walked_once_and_only_when_asked(monkeypatch) -> None:
    """``f``'s modules are walked for ``_core.settings`` once per call however many
    evaluations ask (eight chunks; the end of a call under ``torch.func`` transforms walks
    once more, for the module attributes to unwrap), and not at all by a call that keeps no
    state (a tiny problem's call after its first, watched one)."""
    from torchdiv._exact import attributes

    walks: list[object] = []
    walk = attributes.modules_of

    def counted(f: object):  # type: ignore[no-untyped-def]
        walks.append(f)
        return walk(f)

    monkeypatch.setattr(attributes, "modules_of", counted)
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)).to(f64)
    x = torch.randn(5, 8, dtype=f64)
    torchdiv.divergence(net, x)  # watched: its evaluation keeps the state it may change
    walks.clear()
    torchdiv.divergence(net, x)
    assert walks == []
    torchdiv.divergence(net, x, method="forward", chunk_size=1)
    assert walks == [net, net]
    torchdiv.divergence(net, x, method="forward", chunk_size=1)
    assert walks == [net] * 4
