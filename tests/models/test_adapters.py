"""Fine-tuning with adapters as peft-style code writes it: a frozen base ``nn.Linear`` wrapped
with ``lora_A``/``lora_B`` per adapter (``scaling = alpha / r``), an active-adapter switch and
merging into the base weight between calls; and a base weight fake-quantized by
``torch.ao.quantization.FakeQuantize`` whose observer is enabled (quantization-aware
fine-tuning). Values and the adapters' gradients against a float64 per-sample grad-of-grad
loop; frozen parameters keep ``.grad`` at ``None``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchdiv

f64 = torch.float64


class LoraLinear(nn.Module):
    """A frozen ``base_layer`` plus ``scaling * B A x`` of the active adapter; ``merge`` adds
    ``scaling * B A`` to the base weight (through ``.data``) and skips the adapter path."""

    def __init__(self, base: nn.Linear, adapters: dict[str, tuple[int, float]]):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        for name, (r, alpha) in adapters.items():
            self.lora_A[name] = nn.Linear(base.in_features, r, bias=False, dtype=f64)
            self.lora_B[name] = nn.Linear(r, base.out_features, bias=False, dtype=f64)
            nn.init.normal_(self.lora_B[name].weight, 0.0, 0.5)  # trained: not zero
            self.scaling[name] = alpha / r
        self.active_adapter = next(iter(adapters))
        self.merged_adapters: list[str] = []

    def delta(self, name: str) -> torch.Tensor:
        return self.lora_B[name].weight @ self.lora_A[name].weight * self.scaling[name]

    def merge(self) -> None:
        self.base_layer.weight.data += self.delta(self.active_adapter)
        self.merged_adapters.append(self.active_adapter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged_adapters:
            return y
        a = self.active_adapter
        return y + self.lora_B[a](self.lora_A[a](x)) * self.scaling[a]


def lora_mlp(d: int, out: int) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(d, 8, dtype=f64), nn.Linear(8, out, dtype=f64)]
    adapters = {"default": (2, 4.0), "other": (3, 12.0)}
    return nn.Sequential(
        LoraLinear(layers[0], adapters), nn.SiLU(), LoraLinear(layers[1], adapters)
    )


def per_sample(f: nn.Module, x: torch.Tensor, op: str) -> torch.Tensor:
    """The divergence of ``f`` (shape ``(B,)``) or the Laplacian of its one output (``(B, 1)``),
    one sample at a time."""
    out = []
    for b in range(x.shape[0]):
        xb = x[b : b + 1].detach().requires_grad_(True)
        y = f(xb)[0]
        if op == "laplacian":
            y = torch.autograd.grad(y[0], xb, create_graph=True)[0][0]
        rows = [torch.autograd.grad(y[i], xb, create_graph=True)[0][0, i] for i in range(len(y))]
        out.append(torch.stack(rows).sum())
    return torch.stack(out) if op == "divergence" else torch.stack(out)[:, None]


def check(f: nn.Module, x: torch.Tensor, op: str, method: str) -> None:
    """Values and the trainable parameters' gradients of ``(op(f, x) * w).sum()`` against the
    loop (float64: 1e-10); the frozen ones' ``.grad`` stays ``None``."""
    trained = [p for p in f.parameters() if p.requires_grad]
    expected = per_sample(f, x, op)
    w = torch.linspace(0.5, 1.5, x.shape[0], dtype=f64).reshape(expected.shape)
    expected_grads = torch.autograd.grad((expected * w).sum(), trained, allow_unused=True)
    result = getattr(torchdiv, op)(f, x, method=method)
    torch.testing.assert_close(result, expected, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad((result * w).sum(), trained, allow_unused=True)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(
            torch.zeros(()) if g is None else g, torch.zeros(()) if e is None else e,
            rtol=1e-10, atol=1e-10,
        )  # fmt: skip
    assert all(p.grad is None for p in f.parameters())


@pytest.mark.parametrize(
    ("op", "method"),
    [("divergence", m) for m in ("auto", "forward", "reverse", "structured")]
    + [("laplacian", m) for m in ("auto", "taylor", "forward-over-reverse", "grad-of-grad")],
)
def test_lora_adapters_switched_and_merged_between_calls(op: str, method: str) -> None:
    d = 3
    f = lora_mlp(d, d if op == "divergence" else 1)
    x = torch.randn(4, d, dtype=f64, generator=torch.Generator().manual_seed(1))
    check(f, x, op, method)
    for layer in (f[0], f[2]):
        layer.active_adapter = "other"  # peft's set_adapter
    check(f, x, op, method)
    for layer in (f[0], f[2]):
        layer.merge()
    torch.testing.assert_close(getattr(torchdiv, op)(f, x, method=method), per_sample(f, x, op))


class FakeQuantLora(nn.Module):
    """QAT fine-tuning: a frozen base weight through ``FakeQuantize`` (its observer enabled:
    each evaluation writes the weight's moving range into the observer's buffers) plus a
    trainable low-rank path."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.base = nn.Linear(d_in, d_out, dtype=f64).requires_grad_(False)
        self.fake_quant = torch.ao.quantization.FakeQuantize(
            observer=torch.ao.quantization.MovingAverageMinMaxObserver,
            quant_min=-128,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=torch.per_tensor_symmetric,
        )
        self.lora_A = nn.Linear(d_in, 2, bias=False, dtype=f64)
        self.lora_B = nn.Linear(2, d_out, bias=False, dtype=f64)
        nn.init.normal_(self.lora_B.weight, 0.0, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fake_quant(self.base.weight)
        return F.linear(x, w, self.base.bias) + 2.0 * self.lora_B(self.lora_A(x))


@pytest.mark.parametrize(
    ("op", "method"),
    [("divergence", "forward"), ("divergence", "reverse")]
    + [("laplacian", m) for m in ("forward-over-reverse", "hessian")],
)
def test_fake_quantized_frozen_weight_with_its_observer_on(op: str, method: str) -> None:
    """The observer writes a range computed from the frozen weight, not from ``x``: the
    ``torch.func`` engines refused the write ("a value computed from x") while ``"auto"``
    ran it. The result is that of the state one evaluation leaves, which the call leaves."""
    d = 3
    torch.manual_seed(0)
    out = d if op == "divergence" else 1
    f = nn.Sequential(FakeQuantLora(d, 6), nn.Tanh(), FakeQuantLora(6, out))
    x = torch.randn(4, d, dtype=f64, generator=torch.Generator().manual_seed(1))
    f(x)  # calibrated once
    once = copy.deepcopy(f)
    once(x)  # the state one more evaluation leaves
    once.apply(torch.ao.quantization.disable_observer)
    state = {k: v.clone() for k, v in once.state_dict().items() if "observer_enabled" not in k}
    check_against = per_sample(once, x, op)
    result = getattr(torchdiv, op)(f, x, method=method)
    torch.testing.assert_close(result, check_against, rtol=1e-10, atol=1e-10)
    for k, v in state.items():
        torch.testing.assert_close(f.state_dict()[k], v, rtol=0, atol=0)
    f.apply(torch.ao.quantization.disable_observer)
    check(f, x, op, method)


class CachedScale(nn.Module):
    """A scale computed from a trainable parameter and cached in a buffer at every evaluation
    (``self.scale.copy_(1 + g**2)``, as weight-norm-style caches write it), then read by the
    output: its gradient reaches ``g`` through the buffer, as in a plain evaluation."""

    def __init__(self, d: int, out: int):
        super().__init__()
        self.inner, self.outer = nn.Linear(d, 8, dtype=f64), nn.Linear(8, out, dtype=f64)
        self.g = nn.Parameter(torch.tensor(0.7, dtype=f64))
        self.register_buffer("scale", torch.zeros((), dtype=f64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.scale.copy_(1 + self.g**2)
        return self.outer(torch.tanh(self.inner(x))) * self.scale


@pytest.mark.parametrize(
    ("op", "method"),
    [("divergence", m) for m in ("auto", "forward", "reverse")]
    + [("laplacian", m) for m in ("auto", "forward-over-reverse", "hessian")],
)
def test_buffer_written_from_a_trainable_parameter_and_read_back(op: str, method: str) -> None:
    """The write reads no derivative of the transforms but the parameter's own graph: run
    below them with plain autograd on (the ``torch.func`` engines refused it before lora15),
    values and the parameter gradients through the buffer against grad of grad of one eager
    evaluation (``f`` keeps samples apart; the per-sample loop rewrites the buffer at each
    sample, which cuts the earlier samples' graphs to ``g``, eagerly too)."""
    d = 3
    torch.manual_seed(0)
    f = CachedScale(d, d if op == "divergence" else 1)
    x = torch.randn(4, d, dtype=f64, generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(f)
    expected = batch_of_grad_of_grad(reference, x, op)
    w = torch.linspace(0.5, 1.5, x.shape[0], dtype=f64).reshape(expected.shape)
    # (the output bias has no derivative in x: materialized as zeros)
    expected_grads = torch.autograd.grad(
        (expected * w).sum(), list(reference.parameters()), materialize_grads=True
    )
    result = getattr(torchdiv, op)(f, x, method=method)
    torch.testing.assert_close(result, expected, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad((result * w).sum(), list(f.parameters()), materialize_grads=True)
    torch.testing.assert_close(grads, expected_grads, rtol=1e-10, atol=1e-10)
    assert grads[0].abs() > 0.1  # (the gradient through the buffer, to g)
    torch.testing.assert_close(f.scale, (1 + f.g**2).detach(), rtol=0, atol=0)
    assert all(p.grad is None for p in f.parameters())


def batch_of_grad_of_grad(f: nn.Module, x: torch.Tensor, op: str) -> torch.Tensor:
    """``per_sample``'s operator from one evaluation of ``f`` on the whole batch, by plain
    autograd: gradients of sums over the batch are per-sample where ``f`` keeps samples apart."""
    z = x.detach().requires_grad_(True)
    y = f(z)
    if op == "laplacian":
        y = torch.autograd.grad(y.sum(), z, create_graph=True)[0]
    rows = [torch.autograd.grad(y[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(3)]
    total = torch.stack(rows).sum(0)
    return total if op == "divergence" else total[:, None]
