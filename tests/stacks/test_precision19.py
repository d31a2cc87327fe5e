"""Precision settings as training stacks set them: ``torch.autocast`` and ``GradScaler``
around the step, half-precision models beside float32 buffers and inputs, the default dtype
switched between calls, PyTorch's float32 matrix-product precision and complex operators.

Faults found by the review rev-amp19, each a test here:

* the structured engine multiplied a layer's weights with a neighbour of another dtype (a
  bfloat16 MLP whose output a float32 buffer scales, a float32 one scaled by a float64 tensor
  made under ``torch.set_default_dtype(torch.float64)``): ``method="structured"`` refused
  ``f`` ("expected m1 and m2 to have the same dtype"), ``"auto"`` left it for the generic
  engines;
* the sample-mixing check under the caller's ``torch.func`` transform read PyTorch's legacy
  TF32 flags, which raise once the new ``fp32_precision`` settings are used: every call under
  ``vmap``/``grad`` crashed with PyTorch's "mix of the legacy and new APIs"; and it took
  float32's round-off where ``torch.set_float32_matmul_precision("medium")`` makes oneDNN's
  CPU matrix products bfloat16 ones (AMX, AVX512-BF16): independent ensembles were refused
  with ``BatchInteractionError``;
* the structured engine's kept ``W_1 W_L`` was served across that setting: computed under
  ``"medium"``, served after ``"highest"`` was set again (7e-4 off, float32 2.5e-7);
* ``estimate_trace`` of a ``matmat`` returning complex products cast them to the probes'
  real dtype: the imaginary part of the trace was dropped (with PyTorch's warning only).

References: float64 ``torch.func`` on the same rounded weights and inputs; tolerances a few
unit roundoffs of the dtype (``eps``: bfloat16 ``2^-7``, float16 ``2^-10``) of the largest
element.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import pytest
import torch
from torch.func import functional_call, grad, stack_module_state, vmap

import torchdiv
from tests.conftest import (
    assert_close,
    parameter_gradients,
    reference_diagonal,
    reference_divergence,
    tanh_mlp,
)

Tensor = torch.Tensor
HALF = (torch.bfloat16, torch.float16)


def _close(actual: Tensor, expected: Tensor, dtype: torch.dtype, units: float = 8.0) -> None:
    """Within ``units`` unit roundoffs of ``dtype`` of the largest element of ``expected``."""
    scale = float(expected.detach().abs().max())
    tol = units * torch.finfo(dtype).eps * scale
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=tol)


# ----------------------------------------------------------------- the structured engine


class _ScaledMLP(torch.nn.Module):
    """A tanh MLP whose output is scaled per feature by a buffer (data standardisation
    undone: ``y * std``); ``depth`` hidden layers of 16."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = [torch.nn.Linear(4, 16)]
        for _ in range(depth - 1):
            layers += [torch.nn.Tanh(), torch.nn.Linear(16, 16)]
        self.body = torch.nn.Sequential(*layers, torch.nn.Tanh(), torch.nn.Linear(16, 4))
        self.register_buffer("std", torch.linspace(0.5, 2.0, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) * self.std


@pytest.mark.parametrize("depth", [1, 3])  # the cycle of two matrices, and of four
@pytest.mark.parametrize(
    ("low", "high"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float64),
    ],
)
@pytest.mark.parametrize("operator", ["divergence", "jacobian_diagonal"])
def test_structured_engine_takes_a_buffer_of_a_wider_dtype(
    operator: str, low: torch.dtype, high: torch.dtype, depth: int
) -> None:
    """``model.to(low)`` with its ``std`` buffer kept in ``high`` (mixed precision keeping
    statistics wide): the scaled last layer was joined to the first by a matrix product of
    two dtypes, which raised. Values (in ``x``'s dtype) and the parameter gradients of a
    squared loss against float64 on the same rounded weights."""
    torch.manual_seed(0)
    model = _ScaledMLP(depth).to(low)
    model.std = model.std.to(high)
    x = torch.randn(5, 4).to(low)
    wide = copy.deepcopy(model).double()
    want = {"divergence": reference_divergence, "jacobian_diagonal": reference_diagonal}[operator](
        wide, x.double()
    )
    got = getattr(torchdiv, operator)(model, x, method="structured")
    assert got.dtype == low
    _close(got, want, low)
    got_grads = parameter_gradients(model, got.float().square().sum())
    want_grads = parameter_gradients(wide, want.square().sum())
    for g, w in zip(got_grads, want_grads, strict=True):
        _close(g, w, low, units=16.0)


def test_structured_plans_follow_the_default_dtype_between_calls() -> None:
    """``f`` scales a float32 model by a tensor it makes at every call in the default dtype:
    float64 after ``torch.set_default_dtype(torch.float64)``, so ``f(x)`` is float64 there.
    Calls alternate float32, float64, float32 defaults: each within float32 round-off of the
    float64 reference (the float64 call was refused), its result float32 as ``x``, and the
    default dtype as the caller set it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    x = torch.randn(5, 4)

    def f(z: Tensor) -> Tensor:
        return model(z) * torch.linspace(0.5, 2.0, 4)

    wide = copy.deepcopy(model).double()
    want = reference_divergence(
        lambda z: wide(z) * torch.linspace(0.5, 2.0, 4).double(), x.double()
    )
    before = torch.get_default_dtype()
    try:
        for default in (torch.float32, torch.float64, torch.float32):
            torch.set_default_dtype(default)
            got = torchdiv.divergence(f, x, method="structured")
            assert torch.get_default_dtype() == default
            assert got.dtype == torch.float32
            assert_close(got, want.float())
    finally:
        torch.set_default_dtype(before)


# ------------------------------------------- float32 products at a reduced precision


@contextlib.contextmanager
def _fp32_precision_kept() -> Iterator[None]:
    """Put back the float32 precision of matrix products: the legacy setting, then (as it
    sets them too) the new API's CPU and CUDA ones."""
    legacy = torch.get_float32_matmul_precision()
    leaves = [torch.backends.mkldnn.matmul, torch.backends.cuda.matmul]
    saved = [leaf.fp32_precision for leaf in leaves]
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(legacy)
        for leaf, value in zip(leaves, saved, strict=True):
            leaf.fp32_precision = value


def _ensemble() -> tuple[list[torch.nn.Module], Tensor]:
    torch.manual_seed(0)
    return [tanh_mlp(3, 32, 3, torch.float32) for _ in range(2)], torch.randn(32, 3)


def _under_vmap(members: list[torch.nn.Module], x: Tensor) -> Tensor:
    params, buffers = stack_module_state(members)  # type: ignore[arg-type]

    def member(p: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
        return torchdiv.divergence(lambda z: functional_call(members[0], (p, b), (z,)), x)

    return vmap(member)(params, buffers)


def _under_grad(members: list[torch.nn.Module], x: Tensor) -> dict[str, Tensor]:
    params = {k: v.detach() for k, v in members[0].named_parameters()}

    def loss(p: dict[str, Tensor]) -> Tensor:
        div = torchdiv.divergence(lambda z: functional_call(members[0], p, (z,)), x)
        return div.square().sum()

    return grad(loss)(params)


_SETTINGS: dict[str, Callable[[], None]] = {
    "cuda matmul tf32 (new API)": lambda: setattr(
        torch.backends.cuda.matmul, "fp32_precision", "tf32"
    ),
    "cpu matmul bf16 (new API)": lambda: setattr(
        torch.backends.mkldnn.matmul, "fp32_precision", "bf16"
    ),
    "matmul precision medium": lambda: torch.set_float32_matmul_precision("medium"),
}


@pytest.mark.parametrize("setting", sorted(_SETTINGS))
def test_the_mixing_check_under_a_transform_reads_the_float32_precision(setting: str) -> None:
    """An independent ensemble under ``vmap`` and a MAML-style ``grad`` in the parameters,
    with float32 matrix products set to a reduced precision: not refused (the new API made the
    check's legacy reads raise; bfloat16 products on a CPU with them leaked ``1e-2`` of the
    largest element, above float32's ``sqrt(eps)``), the divergences within bfloat16
    round-off of float64's."""
    members, x = _ensemble()
    want = torch.stack(
        [reference_divergence(copy.deepcopy(m).double(), x.double()) for m in members]
    )
    with _fp32_precision_kept():
        _SETTINGS[setting]()
        got = _under_vmap(members, x)
        grads = _under_grad(members, x)
    _close(got, want, torch.bfloat16, units=4.0)
    assert all(bool(g.isfinite().all()) for g in grads.values())
    assert torch.get_float32_matmul_precision() == "highest"


def test_a_mixing_ensemble_is_still_refused_under_reduced_precision() -> None:
    """The check's tolerance widens to bfloat16's ``sqrt(eps)`` (0.088), not off: features
    centred over the batch leak their whole share and are refused as before."""
    torch.manual_seed(0)

    class Centred(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 16), torch.nn.Linear(16, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.tanh(self.a(x))
            return self.b(h - h.mean(0))

    members = [Centred() for _ in range(2)]
    with (
        _fp32_precision_kept(),
        pytest.raises(torchdiv.BatchInteractionError, match=r"torch\.func"),
    ):
        torch.set_float32_matmul_precision("medium")
        _under_vmap(members, torch.randn(8, 3))  # type: ignore[arg-type]


def test_a_product_kept_at_reduced_precision_is_not_served_at_full_precision() -> None:
    """The structured engine keeps ``W_1 W_L`` across calls; computed under ``"medium"``
    (bfloat16 products on a CPU with them) it was served after ``"highest"`` was set again:
    7e-4 off where float32 gives 2.5e-7. (On a CPU without bfloat16 products both calls
    run in float32, and this passes either way.)"""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64))
    x = torch.randn(8, 64)
    want = reference_divergence(copy.deepcopy(model).double(), x.double())
    with _fp32_precision_kept():
        torch.set_float32_matmul_precision("medium")
        _close(torchdiv.divergence(model, x, method="structured"), want, torch.bfloat16)
        torch.set_float32_matmul_precision("highest")
        _close(torchdiv.divergence(model, x, method="structured"), want, torch.float32, units=64)


# ------------------------------------------------------------------- complex operators


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_estimate_trace_refuses_complex_products(method: str) -> None:
    """A complex ``matmat`` on real probes (a non-Hermitian operator): its products were cast
    to the probes' dtype, the trace's imaginary part dropped."""
    a = torch.randn(4, 3, 3, dtype=torch.complex64)
    like = torch.zeros(4, 3)

    def matmat(v: Tensor) -> Tensor:
        return (a @ v.to(a.dtype)[..., None])[..., 0]

    with pytest.raises(TypeError, match=r"estimate_trace: matmat\(V\) must return a real"):
        torchdiv.estimate_trace(matmat, like, method=method, num_probes=6)
    # the way out the message names: real and imaginary parts apart (the scaled basis as
    # probes, E[v v^T] = I: exact)
    basis = 3**0.5 * torch.eye(3).unsqueeze(1).expand(3, 4, 3)
    parts = [
        torchdiv.estimate_trace(lambda v, p=p: getattr(matmat(v), p), like, probes=basis).value
        for p in ("real", "imag")
    ]
    torch.testing.assert_close(parts[0] + 1j * parts[1], a.diagonal(dim1=-2, dim2=-1).sum(-1))


# --------------------------------------- autocast and GradScaler around a training step


def _step_gradients(
    dtype: torch.dtype | None, x: Tensor, divergence: str, laplacian: str
) -> tuple[Tensor, list[Tensor], torch.amp.GradScaler]:
    """One step of a loss with a divergence, a Laplacian and a Hutchinson term: under
    ``torch.autocast("cpu", dtype)`` with a ``GradScaler`` (``dtype`` given), else in float64
    without. The unscaled parameter gradients."""
    torch.manual_seed(1)
    field, potential = tanh_mlp(4, 16, 4, torch.float32), tanh_mlp(4, 16, 1, torch.float32)
    if dtype is None:
        field, potential, x = field.double(), potential.double(), x.double()
    params = [*field.parameters(), *potential.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype is not None)
    probes = torch.randn(3, *x.shape, generator=torch.Generator().manual_seed(2)).sign().to(x)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = (
            torchdiv.divergence(field, x, method=divergence).square().mean()
            + torchdiv.laplacian(potential, x, method=laplacian).square().mean()
            + torchdiv.divergence(field, x, method="hutchinson", probes=probes).square().mean()
        )
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), grads, scaler


@pytest.mark.parametrize(
    ("divergence", "laplacian"), [("auto", "auto"), ("structured", "grad-of-grad")]
)
@pytest.mark.parametrize("dtype", HALF)
def test_an_autocast_step_with_a_grad_scaler_matches_float64(
    dtype: torch.dtype, divergence: str, laplacian: str
) -> None:
    """The loss is float32 (as ``x``), within the autocast dtype's round-off of float64's, and
    so are the unscaled parameter gradients; no inf found, the scale kept; autocast off after."""
    x = torch.randn(6, 4)
    loss, grads, scaler = _step_gradients(dtype, x, divergence, laplacian)
    want_loss, want_grads, _ = _step_gradients(None, x, divergence, laplacian)
    assert loss.dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")
    _close(loss, want_loss, dtype, units=8.0)
    for g, w in zip(grads, want_grads, strict=True):
        _close(g, w, dtype, units=8.0)
    assert scaler.get_scale() == 2.0**16


def test_grad_scaler_skips_a_step_whose_operators_overflow() -> None:
    """One sample far out (``x * 1e5``) overflows float16 inside ``f``: the loss is not finite,
    ``GradScaler`` finds an inf among the unscaled gradients, skips the step and halves its
    scale."""
    x = torch.randn(6, 4)
    x[2] *= 1e5
    loss, _, scaler = _step_gradients(torch.float16, x, "auto", "auto")
    assert not bool(loss.isfinite())
    assert scaler.get_scale() == 2.0**15


def test_log_likelihood_under_autocast_names_the_cast_that_runs() -> None:
    """A CNF's velocity under ``torch.autocast`` returns the autocast dtype, which the ODE's
    float32 state refuses; the error's hint named only ``model.to(x.dtype)``, which changes
    nothing there. The way out it names now (the output cast) gives the float64 likelihood
    within the dtype's round-off of the divergence's share."""
    pytest.importorskip("torchdiffeq")
    from torchdiv import flows

    torch.manual_seed(0)
    net = tanh_mlp(4, 16, 3, torch.float32)
    wide = copy.deepcopy(net).double()

    def velocity(model: torch.nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
        return lambda t, z: model(torch.cat([z, t.expand(len(z), 1)], 1))

    def base(z: Tensor) -> Tensor:
        return -0.5 * z.square().sum(-1)

    x = torch.randn(5, 3)
    fixed: dict = {"solver": "euler", "options": {"step_size": 0.5}}  # the same steps in both
    want = flows.log_likelihood(velocity(wide), x.double(), 0.0, 1.0, base, **fixed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match=r"f\(t, z\)\.to\(z\.dtype\)"):
            flows.log_likelihood(velocity(net), x, 0.0, 1.0, base, **fixed)
        f = velocity(net)
        got = flows.log_likelihood(lambda t, z: f(t, z).to(z.dtype), x, 0.0, 1.0, base, **fixed)
    assert got.dtype == torch.float32
    _close(got, want, torch.bfloat16, units=2.0)
