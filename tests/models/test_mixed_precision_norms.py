"""Norm layers under CPU mixed precision, as Accelerate's ``mixed_precision="bf16"`` and
Lightning's ``precision="bf16-mixed"`` run a model: ``torch.autocast("cpu", dtype=...)``
around float32 parameters, so linear layers and convolutions hand the norms a bfloat16 (or
float16) input while their weights and running statistics stay float32.

PyTorch's mixed kernels normalise in float32 and round once, but their derivatives under
``torch.func`` failed (PyTorch 2.13): ``vmap`` over the pullback of an eval-mode batch norm
raised "expected scalar type BFloat16 but found Float" (``method="reverse"``), and the
forward-mode formulas of the batch, group, instance and layer norms gave a float32 tangent
to a bfloat16 value, which the next convolution refused (``"forward"``, ``"structured"``,
``"taylor"``, the forward-over-reverse and Hessian Laplacians of a group-norm U-Net block).
``SafeDerivatives`` now runs such a norm on its input cast to the parameters' dtype and
rounds the result back (``torchdiv._core.modes._widened_norm``).

The models are written as their repositories write them: an MLP score net with
``nn.BatchNorm1d`` in eval mode or ``nn.LayerNorm``, and diffusers' ``ResnetBlock2D``
(norm, SiLU, convolution, twice, plus the skip) with a group norm, an eval-mode batch norm
or an instance norm. The reference is a per-sample loop of backward passes over plain
autograd on a float64 copy of the model (one sample at a time): values and the gradients of
a weighted loss with respect to every parameter.

Tolerance: autocast rounds each matrix product's operands and result, and the norm's result,
to the low-precision dtype (unit roundoff ``u = 2**-8`` for bfloat16, ``2**-11`` for
float16), in the forward pass and again in the backward and forward-mode passes that
differentiate it; a derivative through the two layers' ~8 roundings on each side, summed
over the event, is off by a small multiple of ``u`` relative to its scale. We allow
``24 u`` of the reference's largest entry, or, where an operator cancels (a divergence of
0.01 summed from entries of about 1), 4 times the error of PyTorch's own per-sample loop
under the same autocast (measured, every model, dtype, operator and method: at most 0.65 of
that bound); a derivative that missed a normalisation or a layer would be off by order 1.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch

import torchdiv

f64 = torch.float64
B, D, H = 3, 4, 8  # the MLP: D inputs, H hidden features
C, S = 2, 2  # the convolution block: C channels on S x S images, H hidden channels
ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ALLOWED = 24  # unit roundoffs of the reference's scale (see the module docstring)
LOOPS = 4  # or this many times the error of PyTorch's per-sample loop under autocast

Model = Callable[[], torch.nn.Module]


class ScoreMLP(torch.nn.Module):
    """A score net's MLP with a norm between its two linear layers."""

    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.inp, self.norm, self.out = torch.nn.Linear(D, H), norm, torch.nn.Linear(H, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.nn.functional.silu(self.norm(self.inp(x))))


class ResnetBlock(torch.nn.Module):
    """diffusers' ``ResnetBlock2D`` without its time embedding: norm, SiLU, 3 x 3
    convolution, twice, added to the input (a 1 x 1 shortcut between channel counts)."""

    def __init__(self, norm: Callable[[int], torch.nn.Module]) -> None:
        super().__init__()
        self.norm1, self.conv1 = norm(C), torch.nn.Conv2d(C, H, 3, padding=1)
        self.norm2, self.conv2 = norm(H), torch.nn.Conv2d(H, C, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        silu = torch.nn.functional.silu
        h = self.conv1(silu(self.norm1(x)))
        return x + self.conv2(silu(self.norm2(h)))


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Norm weights, biases and running statistics away from their identity defaults, so
    that each one shows in the derivatives."""
    generator = torch.Generator().manual_seed(1)

    def draw(like: torch.Tensor, shift: float, spread: float) -> torch.Tensor:
        return shift + spread * torch.randn(like.shape, generator=generator)

    norms = torch.nn.modules.batchnorm._NormBase | torch.nn.GroupNorm | torch.nn.LayerNorm
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, norms) and getattr(module, "weight", None) is not None:
                module.weight.copy_(draw(module.weight, 1.0, 0.5))
                module.bias.copy_(draw(module.bias, 0.0, 0.5))
            if getattr(module, "running_mean", None) is not None:
                module.running_mean.copy_(draw(module.running_mean, 0.0, 0.3))
                module.running_var.copy_(draw(module.running_var, 1.0, 0.2).abs() + 0.3)
    return model


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    nn = torch.nn
    models: dict[str, Model] = {
        "mlp-batch-norm-eval": lambda: ScoreMLP(nn.BatchNorm1d(H)).eval(),
        "mlp-layer-norm": lambda: ScoreMLP(nn.LayerNorm(H)),
        "resnet-group-norm": lambda: ResnetBlock(lambda c: nn.GroupNorm(2, c)),
        "resnet-batch-norm-eval": lambda: ResnetBlock(nn.BatchNorm2d).eval(),
        "resnet-instance-norm": lambda: ResnetBlock(lambda c: nn.InstanceNorm2d(c, affine=True)),
        "resnet-instance-norm-tracked-eval": lambda: ResnetBlock(
            lambda c: nn.InstanceNorm2d(c, affine=True, track_running_stats=True)
        ).eval(),
    }
    return _randomized(models[name]())


def _input(model: torch.nn.Module) -> torch.Tensor:
    shape = (B, C, S, S) if isinstance(model, ResnetBlock) else (B, D)
    return torch.randn(shape, generator=torch.Generator().manual_seed(3))


def _half_square(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``|f(x)|^2 / 2`` per sample: the Laplacian's scalar function (a score-matching norm)."""
    return lambda z: model(z).float().square().flatten(1).sum(-1) / 2


def _per_sample(model: torch.nn.Module, x: torch.Tensor, op: str) -> torch.Tensor:
    """The reference: ``op`` of one sample at a time by backward passes, with a graph."""
    out = []
    for b in range(len(x)):
        z = x[b : b + 1].to(next(model.parameters()).dtype).requires_grad_(True)
        if op == "laplacian":
            (g,) = torch.autograd.grad(_half_square(model)(z).sum(), z, create_graph=True)
            g = g.reshape(-1)
            second = [torch.autograd.grad(g[j], z, create_graph=True)[0] for j in range(len(g))]
            out.append(sum(s.reshape(-1)[j] for j, s in enumerate(second)))
            continue
        y = model(z).reshape(-1)
        rows = [torch.autograd.grad(y[i], z, create_graph=True)[0] for i in range(len(y))]
        jacobian = torch.stack([row.reshape(-1) for row in rows])
        if op == "jacobian":
            out.append(jacobian)
        else:
            out.append(jacobian.diagonal() if op == "jacobian_diagonal" else jacobian.trace())
    return torch.stack(out)


def _by_torchdiv(
    model: torch.nn.Module, x: torch.Tensor, op: str, method: str, dtype: torch.dtype
) -> torch.Tensor:
    with torch.autocast("cpu", dtype=dtype):
        if op == "laplacian":
            return torchdiv.laplacian(_half_square(model), x, method=method)
        return getattr(torchdiv, op)(model, x, method=method)


def _loss(result: torch.Tensor) -> torch.Tensor:
    """A training loss on the operator's result: its squares, as a PDE residual, a
    Jacobian's Frobenius penalty (Hoffman et al. 2019) or a divergence penalty take them.
    (A loss weighting a group norm's Jacobian entries by a smooth ramp cancels to 1% of its
    terms, and bfloat16's rounding of forward mode's tangents then shows at 30% of it, in
    ``torch.func.jvp`` itself.)"""
    return result.square().sum()


def _assert_within_roundoff(
    got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str, loop: float = 0.0
) -> None:
    """``got`` within ``ALLOWED`` unit roundoffs of ``dtype`` of ``want``'s largest entry, or
    within ``LOOPS`` times the error ``loop`` of PyTorch's own per-sample loop under the same
    autocast (``_loop_errors``), where that is larger: each engine rounds at other places
    (the structured divergence's gradients through the batch-norm MLP: 23 u in bfloat16
    where the loop's are 9 u)."""
    scale = float(want.abs().max())
    error = float((got.to(f64) - want.to(f64).reshape(got.shape)).abs().max())
    bound = max(ALLOWED * ROUNDOFF[dtype] * scale, LOOPS * loop)
    assert error <= bound, f"{what}: {error:.3g} off at scale {scale:.3g}"


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _gradients(loss: torch.Tensor, model: torch.nn.Module) -> list[torch.Tensor]:
    """``loss``'s gradient with respect to each parameter, zeros where it does not depend on
    one (the last bias, for a Jacobian)."""
    parameters = list(model.parameters())
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads, strict=True)]


def _normalized(h: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    centred = h - h.mean(dims, keepdim=True)
    return centred / torch.sqrt(centred.square().mean(dims, keepdim=True) + eps)


def _composite_layer_norm(norm: torch.nn.LayerNorm, h: torch.Tensor) -> torch.Tensor:
    return _normalized(h, (-1,), norm.eps) * norm.weight + norm.bias


def _composite_instance_norm(norm: torch.nn.InstanceNorm2d, h: torch.Tensor) -> torch.Tensor:
    per_channel = (1, -1, 1, 1)
    out = _normalized(h.to(norm.weight.dtype), (2, 3), norm.eps)  # (under autocast: float32)
    return (out * norm.weight.reshape(per_channel) + norm.bias.reshape(per_channel)).to(h.dtype)


def _composite_norms(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its layer norms and its instance norms by their input's statistics
    written as means and variances: PyTorch's fused kernels' third derivatives are wrong
    (pytorch#175754; the gradients of a Laplacian are third derivatives), and the reference
    takes them by plain autograd. The same parameters."""
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.forward = functools.partial(_composite_layer_norm, module)  # type: ignore[method-assign]
        if isinstance(module, torch.nn.InstanceNorm2d) and not module.track_running_stats:
            module.forward = functools.partial(_composite_instance_norm, module)  # type: ignore[method-assign]
    return model


@functools.cache
def _reference(name: str, op: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The float64 per-sample loop's ``op`` and its loss's parameter gradients (once per
    model and operator: the loop is most of the test's time)."""
    reference = _composite_norms(_model(name).to(f64))
    want = _per_sample(reference, _input(reference), op)
    return want.detach(), _gradients(_loss(want), reference)


def _autocast_loop(
    model: torch.nn.Module, op: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample loop's ``op`` under ``dtype`` autocast and its loss's parameter
    gradients (one vector)."""
    with torch.autocast("cpu", dtype=dtype):
        got = _per_sample(model, _input(model), op)
    return got, _flat(_gradients(_loss(got.float()), model))


@functools.cache
def _loop_errors(name: str, op: str, dtype: torch.dtype) -> tuple[float, float]:
    """How far the same per-sample loop of plain autograd, run on the float32 model under
    ``dtype`` autocast, is from the float64 reference: the largest error of the values and of
    the parameter gradients. Where the operator cancels (a divergence of about 0.01 summed
    from Jacobian entries of about 1) the dtype's rounding shows many times over in PyTorch's
    own per-sample result: 57 unit roundoffs in the float16 gradients of the batch-norm MLP's
    squared divergence."""
    try:
        got, grads = _autocast_loop(_model(name), op, dtype)
    except RuntimeError as error:  # torch >= 2.14 refuses the fused batch norm's (an instance
        if "3rd+ order" not in str(error):  # norm's) third derivatives, wrong before: the
            raise  # loop takes the composite, normalising in float32 as the mixed kernel does
        got, grads = _autocast_loop(_composite_norms(_model(name)), op, dtype)
    want, want_grads = _reference(name, op)
    value_error = float((got.detach().to(f64) - want).abs().max())
    return value_error, float((grads.to(f64) - _flat(want_grads)).abs().max())


def _check(name: str, op: str, method: str, dtype: torch.dtype) -> None:
    """``op`` by ``method`` under ``dtype`` autocast against the reference: values, the
    loss's parameter gradients (as one vector: a parameter whose exact gradient is 0, a bias
    before an instance norm, gets rounding noise of the others' scale), a second call (where
    ``"auto"`` may take another engine, another rounding) and the model's state unchanged."""
    model = _model(name)
    x = _input(model)
    want, want_grads = _reference(name, op)
    loop_value, loop_grads = _loop_errors(name, op, dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = _by_torchdiv(model, x, op, method, dtype)
    _assert_within_roundoff(got.detach(), want, dtype, f"{op} by {method}", loop_value)
    got_grads = _gradients(_loss(got.float()), model)
    what = f"parameter gradients through {op} by {method}"
    _assert_within_roundoff(_flat(got_grads), _flat(want_grads), dtype, what, loop_grads)
    again = _by_torchdiv(model, x, op, method, dtype)
    _assert_within_roundoff(again.detach(), got.detach(), dtype, f"second {op} by {method}")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


OPERATORS = [
    ("divergence", "reverse"),
    ("divergence", "forward"),
    ("divergence", "structured"),
    ("divergence", "auto"),
    ("jacobian", "reverse"),
    ("jacobian", "forward"),
    ("jacobian_diagonal", "reverse"),
    ("jacobian_diagonal", "forward"),
    ("jacobian_diagonal", "structured"),
    ("laplacian", "auto"),
    ("laplacian", "taylor"),
    ("laplacian", "forward-over-reverse"),
    ("laplacian", "hessian"),
    ("laplacian", "grad-of-grad"),
]


@pytest.mark.parametrize(
    ("name", "op", "method"),
    [
        *[("mlp-batch-norm-eval", op, "reverse") for op in ("divergence", "jacobian")],
        ("mlp-batch-norm-eval", "jacobian_diagonal", "reverse"),
        ("mlp-batch-norm-eval", "laplacian", "forward-over-reverse"),
        ("resnet-group-norm", "divergence", "forward"),
        ("resnet-group-norm", "jacobian_diagonal", "structured"),
        ("resnet-group-norm", "laplacian", "taylor"),
    ],
)
def test_mixed_precision_norms(name: str, op: str, method: str) -> None:
    """An eval-mode batch norm and a group norm under bfloat16 autocast: values and parameter
    gradients within bfloat16's rounding of the float64 per-sample loop (``"reverse"``
    raised PyTorch's dtype error on the first; ``"forward"``, ``"structured"`` and
    ``"taylor"`` the convolution's on the second). Every method: the slow sweep below."""
    _check(name, op, method, torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "name",
    [
        "mlp-batch-norm-eval",
        "mlp-layer-norm",
        "resnet-group-norm",
        "resnet-batch-norm-eval",
        "resnet-instance-norm",
        "resnet-instance-norm-tracked-eval",
    ],
)
def test_mixed_precision_norm_sweep(name: str, dtype: torch.dtype) -> None:
    """Every norm layer, both autocast dtypes, every operator and exact method."""
    for op, method in OPERATORS:
        _check(name, op, method, dtype)


@pytest.mark.parametrize("op", ["divergence", "jacobian", "jacobian_diagonal"])
def test_reverse_without_grad_and_samples_apart(op: str) -> None:
    """Under the caller's ``torch.no_grad()`` the reverse engine takes first derivatives only
    (PyTorch's fused layer norm and batch norm, not their composites: the batched pullback
    raised there too): the same values, and a change to sample 2 changes no other sample."""
    model = _model("mlp-batch-norm-eval")
    x = _input(model)
    want, _ = _reference("mlp-batch-norm-eval", op)
    loop, _ = _loop_errors("mlp-batch-norm-eval", op, torch.bfloat16)
    with torch.no_grad():
        got = _by_torchdiv(model, x, op, "reverse", torch.bfloat16)
        _assert_within_roundoff(got, want, torch.bfloat16, f"{op} without grad", loop)
        moved = x.clone()
        moved[2] += 1.0
        changed = _by_torchdiv(model, moved, op, "reverse", torch.bfloat16)
    torch.testing.assert_close(changed[:2], got[:2], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["auto", "reverse", "forward"])
@pytest.mark.parametrize("op", ["divergence", "jacobian", "jacobian_diagonal", "laplacian"])
def test_train_mode_batch_norm_under_autocast_is_refused(op: str, method: str) -> None:
    """A train-mode batch norm under bfloat16 autocast normalises by the batch's statistics:
    refused as sample mixing (``BatchInteractionError`` naming it), not PyTorch's dtype
    error. Its running statistics are left as they were, but by the explicit grad-of-grad
    loop, which searches the graph of its one evaluation (as a training forward pass, it
    moved them once; unchecked, it returned the batch-summed Laplacian: 0 here, in float32
    too)."""
    model = ScoreMLP(torch.nn.BatchNorm1d(H)).train()
    x = _input(model)
    if op == "laplacian":
        method = {"reverse": "grad-of-grad", "forward": "forward-over-reverse"}.get(method, method)
    elif op == "jacobian" and method == "auto":
        method = "reverse"
    before = model.norm.running_mean.clone()
    with pytest.raises(torchdiv.BatchInteractionError, match="batch norm"):
        _by_torchdiv(model, x, op, method, torch.bfloat16)
    if method != "grad-of-grad":
        torch.testing.assert_close(model.norm.running_mean, before, rtol=0, atol=0)
