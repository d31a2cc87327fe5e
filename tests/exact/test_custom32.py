"""User-defined operators (``torch.library``) inside ``f``, as physics, graphics and HPC codes
write them (custom32).

Every public operator is compared, values and parameter gradients through its graph, with a
float64 per-sample loop of ``torch.autograd.grad`` over the same model written with the op's
math in plain torch (``_reference``). An op that autograd cannot follow must be refused by
name, never differentiated silently wrong:

- an op of the older ``torch.library.Library`` API implemented at a backend key alone
  (``"CPU"``), with no autograd kernel: PyTorch's autograd fallback ("warn") gave divergences
  3.1 off and Laplacians 7.7 off on a tanh MLP, every engine;
- a ``custom_op`` that writes its result into an argument (``mutates_args``) and returns
  nothing: the written result is a constant to autograd and forward mode (Jacobians all 0,
  the Taylor engine's Laplacian 0 where ``x`` alone carried derivatives).

Ops with a derivative (``register_autograd`` with a differentiable backward, a
``CompositeImplicitAutograd`` implementation, an ``Autograd``-key kernel) stay right.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest
import torch

import torchdiv

NS = "torchdiv_custom32"
D, B = 3, 4
# float64 throughout: the reference and torchdiv take the same derivatives in another
# order, so they agree to round-off (1e-10 relative is ~1e6 ulps of slack)
TOL = {"rtol": 1e-8, "atol": 1e-10}


@torch.library.custom_op(f"{NS}::tanh", mutates_args=())
def tanh_op(z: torch.Tensor) -> torch.Tensor:
    return torch.tanh(z)


@tanh_op.register_fake
def _(z: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(z)


def _save_input(ctx: object, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[0])  # type: ignore[attr-defined]


def _tanh_backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
    (z,) = ctx.saved_tensors  # type: ignore[attr-defined]
    return grad * (1 - tanh_op(z) ** 2)  # differentiable: through the op again


tanh_op.register_autograd(_tanh_backward, setup_context=_save_input)


@torch.library.custom_op(f"{NS}::tanh_into", mutates_args=("out",))
def tanh_into(z: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(torch.tanh(z))


_LIB = torch.library.Library(NS, "DEF")
_LIB.define("tanh_cpu(Tensor z) -> Tensor")
_LIB.impl("tanh_cpu", torch.tanh, "CPU")  # no autograd kernel
_LIB.define("tanh_cia(Tensor z) -> Tensor")
_LIB.impl("tanh_cia", torch.tanh, "CompositeImplicitAutograd")


def _into(z: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(z)
    tanh_into(z, out)
    return out


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "register_autograd": tanh_op,
    "composite_implicit": torch.ops.torchdiv_custom32.tanh_cia,
}
REFUSED: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]] = {
    "library_cpu_key": (torch.ops.torchdiv_custom32.tanh_cpu, f"{NS}::tanh_cpu"),
    "mutates_its_result": (_into, f"{NS}::tanh_into"),
}


def _params(trainable: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [(D, D), (D,), (D, D)]
    return [
        torch.randn(s, generator=g, dtype=torch.float64).requires_grad_(trainable) for s in shapes
    ]


def _x() -> torch.Tensor:
    return torch.randn(B, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _model(act: Callable[[torch.Tensor], torch.Tensor], p: list[torch.Tensor]) -> Callable:
    return lambda z: act(z @ p[0].T + p[1]) @ p[2].T


def _reference(p: list[torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per sample, in float64, the model with ``torch.tanh``: Jacobians by one backward pass
    per output, Laplacians by one more per input, graphs kept for parameter gradients."""
    f = _model(torch.tanh, p)
    jacobians, laplacians = [], []
    for b in range(B):
        z = x[b : b + 1].clone().requires_grad_(True)
        y = f(z)[0]
        rows = [torch.autograd.grad(y[i], z, create_graph=True)[0][0] for i in range(D)]
        jacobians.append(torch.stack(rows))
        laplacians.append(
            torch.stack(
                [
                    sum(torch.autograd.grad(r[j], z, create_graph=True)[0][0, j] for j in range(D))
                    for r in rows
                ]
            )
        )
    jac = torch.stack(jacobians)
    return {
        "jacobian": jac,
        "jacobian_diagonal": jac.diagonal(dim1=-2, dim2=-1),
        "divergence": jac.diagonal(dim1=-2, dim2=-1).sum(-1),
        "laplacian": torch.stack(laplacians),
    }


OPERATORS = {
    "divergence": lambda f, x: torchdiv.divergence(f, x),
    "jacobian_diagonal": lambda f, x: torchdiv.jacobian_diagonal(f, x),
    "jacobian": lambda f, x: torchdiv.jacobian(f, x),
    "laplacian": lambda f, x: torchdiv.laplacian(f, x),
    "laplacian_grad_of_grad": lambda f, x: torchdiv.laplacian(f, x, method="grad-of-grad"),
    "value_grad_laplacian": lambda f, x: torchdiv.value_grad_laplacian(f, x).laplacian,
}
KEY = {"laplacian_grad_of_grad": "laplacian", "value_grad_laplacian": "laplacian"}


def _check(out: torch.Tensor, ref: torch.Tensor, p: list[torch.Tensor]) -> None:
    torch.testing.assert_close(out, ref, **TOL)
    if p[0].requires_grad:
        w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=ref.dtype)
        got = torch.autograd.grad((out * w).sum(), p)
        want = torch.autograd.grad((ref * w).sum(), p)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("operator", sorted(OPERATORS))
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_differentiable_custom_ops_are_right(activation: str, operator: str, trainable: bool):
    p, x = _params(trainable), _x()
    out = OPERATORS[operator](_model(ACTIVATIONS[activation], p), x)
    _check(out, _reference(p, x)[KEY.get(operator, operator)], p)


def test_estimate_with_fixed_probes_through_a_custom_op():
    p, x = _params(True), _x()
    probes = torch.randn(5, B, D, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    out = torchdiv.estimate_divergence(_model(tanh_op, p), x, probes=probes).value
    jac = _reference(p, x)["jacobian"]
    ref = torch.einsum("kbi,bij,kbj->b", probes, jac, probes) / 5
    _check(out, ref, p)


_DIV_METHODS = ("auto", "forward", "reverse")
_LAP_METHODS = ("auto", "grad-of-grad")


def _with_method(fn: Callable, method: str, f: Callable, x: torch.Tensor) -> torch.Tensor:
    return fn(f, x, method=method)


REFUSING_CALLS = {
    **{f"divergence_{m}": partial(_with_method, torchdiv.divergence, m) for m in _DIV_METHODS},
    "jacobian_auto": lambda f, x: torchdiv.jacobian(f, x),
    "jacobian_diagonal_auto": lambda f, x: torchdiv.jacobian_diagonal(f, x),
    **{f"laplacian_{m}": partial(_with_method, torchdiv.laplacian, m) for m in _LAP_METHODS},
    "value_grad_laplacian_auto": lambda f, x: torchdiv.value_grad_laplacian(f, x),
    "hutchinson_probes": lambda f, x: torchdiv.estimate_divergence(
        f, x, probes=torch.randn(3, *x.shape, dtype=x.dtype)
    ),
    "augmented_dynamics": lambda f, x: torchdiv.flows.AugmentedDynamics(lambda t, z: f(z), x)(
        torch.tensor(0.0), (x, torch.zeros(1, B, dtype=x.dtype))
    ),
}


@pytest.mark.filterwarnings("ignore:.*autograd kernel was not registered")
@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("call", sorted(REFUSING_CALLS))
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_untracked_custom_ops_are_refused_by_name(case: str, call: str, trainable: bool):
    """Before: every call returned a value (3.1-7.7 off) or zeros, no error."""
    act, name = REFUSED[case]
    f = _model(act, _params(trainable))
    if call == "divergence_reverse" and case == "mutates_its_result":
        pytest.skip("torch.func refuses the op first (no setup_context), naming no op")
    with pytest.raises(NotImplementedError, match=name):
        REFUSING_CALLS[call](f, _x())


@pytest.mark.parametrize("fn", ["laplacian", "value_grad_laplacian"])
def test_taylor_refuses_a_custom_op_writing_its_result(fn: str):
    """Frozen parameters: only ``x`` carries derivatives, seen by the Taylor recorder alone
    (before: a Laplacian of 0, 7.7 off)."""
    f = _model(_into, _params(False))
    with pytest.raises(NotImplementedError, match=f"{NS}.tanh_into"):
        getattr(torchdiv, fn)(f, _x(), method="taylor")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["register_autograd", "library_cpu_key"])
def test_compiled_f(case: str):
    """``torch.compile(f)`` (aot_eager) runs the same rules."""
    p, x = _params(True), _x()
    act = ACTIVATIONS.get(case) or REFUSED[case][0]
    f = torch.compile(_model(act, p), backend="aot_eager")
    if case in REFUSED:
        with pytest.raises(NotImplementedError, match=REFUSED[case][1]):
            torchdiv.divergence(f, x)
        return
    _check(torchdiv.divergence(f, x), _reference(p, x)["divergence"], p)
    _check(torchdiv.laplacian(f, x), _reference(p, x)["laplacian"], p)


@torch.library.custom_op(f"{NS}::centred", mutates_args=())
def centred(z: torch.Tensor) -> torch.Tensor:
    """Mixes samples inside its kernel: each row less the batch's mean row."""
    return z - z.mean(0, keepdim=True)


@torch.library.custom_op(f"{NS}::row_softmax", mutates_args=())
def row_softmax(z: torch.Tensor) -> torch.Tensor:
    """Per sample (row-wise): mixes the event only."""
    return torch.softmax(z, -1)


for _op in (centred, row_softmax):
    _op.register_fake(torch.empty_like)
centred.register_autograd(lambda ctx, g: g - g.mean(0, keepdim=True))


def _softmax_backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
    (s,) = ctx.saved_tensors  # type: ignore[attr-defined]
    return s * (g - (g * s).sum(-1, keepdim=True))  # differentiable only once: s is constant


row_softmax.register_autograd(
    _softmax_backward, setup_context=lambda ctx, inputs, output: ctx.save_for_backward(output)
)

MIXING_CALLS = {
    "divergence": lambda f, x: torchdiv.divergence(f, x),
    "laplacian": lambda f, x: torchdiv.laplacian(f, x),
    "jacobian": lambda f, x: torchdiv.jacobian(f, x),
    "augmented_dynamics": REFUSING_CALLS["augmented_dynamics"],
}


@pytest.mark.parametrize("call", sorted(MIXING_CALLS))
def test_a_custom_op_mixing_samples_in_its_kernel_is_refused(call: str):
    """Before: ``"auto"`` returned the batch's derivatives (divergences 0.2-0.8 where each
    sample's is 0), the schema of the op being per sample."""
    f = _model(centred, _params(False))
    with pytest.raises(torchdiv.BatchInteractionError, match=f"{NS}::centred"):
        MIXING_CALLS[call](f, _x())


def test_a_row_wise_custom_op_is_not_taken_for_mixing():
    p, x = _params(True), _x()
    f = _model(row_softmax, p)
    out = torchdiv.divergence(f, x)
    ref = [
        torch.autograd.functional.jacobian(_model(lambda z: torch.softmax(z, -1), p), x[b])
        for b in range(B)
    ]
    torch.testing.assert_close(out, torch.stack([j.trace() for j in ref]), **TOL)


@torch.library.custom_op(f"{NS}::noisy", mutates_args=())
def noisy(z: torch.Tensor) -> torch.Tensor:
    """Per sample, random: its derivative is 1 whatever the noise."""
    return z + torch.randn_like(z)


noisy.register_fake(torch.empty_like)
noisy.register_autograd(lambda ctx, g: g)


def test_a_random_custom_op_is_not_judged_and_draws_once():
    """The watch's extra runs of the op (``inside_kernel``) put the generator back: ``f``
    draws as an unwatched evaluation would."""
    x = _x()
    torch.manual_seed(5)
    expected = noisy(x)
    torch.manual_seed(5)
    seen = []
    out = torchdiv.divergence(lambda z: seen.append(noisy(z)) or seen[-1], x)
    torch.testing.assert_close(out, torch.full((B,), float(D), dtype=x.dtype))
    torch.testing.assert_close(seen[0], expected)
