"""What the benchmark times: one registry entry per operator, each method behind one signature.

An ``Operator`` is the library call per method, the baselines people write by hand, the exact
reference every result is checked against, and the problem families it runs on. Every method
is ``call(f, x) -> Tensor``; its result is compared with ``reference(f, x)`` after a reshape, so
methods may return the operator in any layout with the right number of elements.

Adding an operator or a stochastic estimator is one entry in
``OPERATORS``: the CLI's ``--operator`` choices, the runner, the table and the plot all read
from it. Stochastic methods (``Method(stochastic=True)``) are not judged right or wrong; their
relative error is reported instead.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

import torchdiv
from torchdiv._bench import recipes as _recipes

Function = Callable[[torch.Tensor], torch.Tensor]
Call = Callable[[Function, torch.Tensor], torch.Tensor]

# autograd.functional.jacobian builds the (B*m, B*n) cross-batch Jacobian with B*m backward
# passes; beyond this many elements (16 MiB in float32) it is left out of the run.
CROSS_BATCH_LIMIT = 2**22


@dataclass(frozen=True)
class Method:
    """One way to compute an operator.

    Attributes:
        label: the name shown in tables and plots.
        call: ``call(f, x) -> Tensor``, the operator in any layout with the reference's numel.
        baseline: a hand-written recipe, not torchdiv (drawn grey and dashed).
        stochastic: an estimate: report its relative error, never call it wrong.
        skip: ``skip(x, y) -> reason`` when the method would not fit (``y = f(x)``), else None.
    """

    label: str
    call: Call
    baseline: bool = False
    stochastic: bool = False
    skip: Callable[[torch.Tensor, torch.Tensor], str | None] | None = None


@dataclass(frozen=True)
class Operator:
    """A differential operator: its methods (by short key), exact reference and problems."""

    name: str
    methods: dict[str, Method]
    reference: Call
    families: tuple[str, ...] = ("mlp", "conv")
    summary: str = ""
    square: bool = False  # needs f(x) with as many elements per sample as x


def cross_batch_too_big(x: torch.Tensor, y: torch.Tensor) -> str | None:
    """Why ``autograd.functional.jacobian`` is left out, or None when it fits."""
    rows, cols = y.numel(), x.numel()
    if rows * cols <= CROSS_BATCH_LIMIT:
        return None
    return (
        f"would build the {rows}x{cols} cross-batch Jacobian ({rows * cols / 1e6:.0f}M elements, "
        f"B={x.shape[0]} times the per-sample blocks; limit {CROSS_BATCH_LIMIT / 1e6:.1f}M)"
    )


def _ours(fn: Callable[..., torch.Tensor], *extra: str) -> dict[str, Method]:
    return {
        m: Method(f"torchdiv {m}", functools.partial(fn, method=m))
        for m in ("auto", *extra, "forward", "reverse")
    }


def _diagonal(jacobian: Call) -> Call:
    return lambda f, x: jacobian(f, x).diagonal(dim1=1, dim2=2)


def _baselines(of_jacobian: Callable[[Call], Call], loop: Call) -> dict[str, Method]:
    """The recipes of the seed threads, turned into the operator by ``of_jacobian``."""
    return {
        "jacrev": Method(
            "torch.func vmap(jacrev)", of_jacobian(_recipes.vmap_jacrev_jacobian), baseline=True
        ),
        "jacfwd": Method(
            "torch.func vmap(jacfwd)", of_jacobian(_recipes.vmap_jacfwd_jacobian), baseline=True
        ),
        "loop": Method("loop of autograd.grad", loop, baseline=True),
        "functional": Method(
            "autograd.functional.jacobian",
            of_jacobian(_recipes.functional_jacobian),
            baseline=True,
            skip=cross_batch_too_big,
        ),
    }


def _reference(of_jacobian: Callable[[Call], Call]) -> Call:
    return of_jacobian(_recipes.vmap_jacrev_jacobian)


def _same(jacobian: Call) -> Call:
    return jacobian


def _as_divergence(jacobian: Call) -> Call:
    return lambda f, x: _recipes.trace(jacobian(f, x))


DIVERGENCE = Operator(
    "divergence",
    {
        **_ours(torchdiv.divergence, "structured"),
        **_baselines(_as_divergence, _recipes.loop_grad),
        "batched-grad": Method(
            "autograd.grad(is_grads_batched)", _recipes.batched_grad, baseline=True
        ),
        "zuko": Method("zuko's exact trace", _recipes.zuko_trace, baseline=True),
        # torchdyn's loop always keeps the graph: the one row that pays for a differentiable
        # result on the frozen problems ("loop" is the same loop without it)
        "torchdyn": Method(
            "torchdyn's autograd_trace (create_graph=True)", _recipes.torchdyn_trace, baseline=True
        ),
        "ones-vjp": Method("grad(y, x, ones) [wrong]", _recipes.ones_vjp, baseline=True),
    },
    _reference(_as_divergence),
    families=("mlp", "conv", "cnf"),
    summary="trace of each sample's Jacobian",
    square=True,
)
JACOBIAN = Operator(
    "jacobian",
    {**_ours(torchdiv.jacobian), **_baselines(_same, _recipes.loop_grad_jacobian)},
    _reference(_same),
    summary="each sample's Jacobian",
)
JACOBIAN_DIAGONAL = Operator(
    "jacobian_diagonal",
    {
        **_ours(torchdiv.jacobian_diagonal, "structured"),
        **_baselines(_diagonal, _recipes.loop_grad_diagonal),
    },
    _reference(_diagonal),
    summary="diagonal of each sample's Jacobian",
    square=True,
)

# products per sample of every stochastic estimate (a multiple of 3 and of 2)
PRODUCTS = 30


def _sketch_too_wide(x: torch.Tensor, y: torch.Tensor) -> str | None:
    """XTrace sketches with ``PRODUCTS / 2`` vectors, at most one per element of the event."""
    n = x[0].numel()
    if n >= PRODUCTS // 2:
        return None
    return f"XTrace's sketch of {PRODUCTS // 2} vectors needs D >= {PRODUCTS // 2} (D={n})"


ESTIMATORS = Operator(
    "estimators",
    {
        "auto": Method(
            "torchdiv auto (exact)", functools.partial(torchdiv.divergence, method="auto")
        ),
        **{
            m: Method(
                f"torchdiv {m} ({PRODUCTS} products)",
                functools.partial(torchdiv.divergence, method=m, num_probes=PRODUCTS),
                stochastic=True,
                skip=_sketch_too_wide if m == "xtrace" else None,
            )
            for m in ("hutchinson", "hutch++", "xtrace")
        },
        "jacrev": DIVERGENCE.methods["jacrev"],
    },
    DIVERGENCE.reference,
    summary=f"stochastic divergence with {PRODUCTS} products per sample: error and cost",
    square=True,
)
LAPLACIAN = Operator(
    "laplacian",
    {
        **{
            m: Method(f"torchdiv {m}", functools.partial(torchdiv.laplacian, method=m))
            for m in ("auto", "taylor", "forward-over-reverse", "hessian")
        },
        "hutchinson": Method(
            "torchdiv hutchinson (10 probes)",
            functools.partial(torchdiv.laplacian, method="hutchinson", num_probes=10),
            stochastic=True,
        ),
        "vmap-hessian": Method(
            "torch.func vmap(hessian)", _recipes.vmap_hessian_trace, baseline=True
        ),
        "grad-of-grad": Method("loop of grad-of-grad", _recipes.grad_of_grad, baseline=True),
    },
    _recipes.vmap_hessian_trace,
    families=("scalar",),
    summary="trace of each sample's Hessian (one scalar per sample)",
)

OPERATORS: dict[str, Operator] = {
    op.name: op for op in (DIVERGENCE, JACOBIAN, JACOBIAN_DIAGONAL, ESTIMATORS, LAPLACIAN)
}
DEFAULT_OPERATORS = ("divergence", "laplacian")


def tolerance(dtype: torch.dtype) -> float:
    """Largest relative error (``max |out - ref| / max |ref|``) an exact method may show.

    The reference is computed in float64; the others carry their dtype's round-off through a
    few hundred flops and the sums of a trace: ~1000 eps for float32 (1e-4), float64 1e-9,
    half precisions a few per cent (their eps is 1e-3 and 8e-3).
    """
    eps = torch.finfo(dtype).eps
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, max(5e-2, 10 * eps))


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|`` (absolute when the reference is zero)."""
    diff = (out.detach().to(reference.dtype).reshape(reference.shape) - reference).abs().max()
    scale = reference.abs().max().item()
    return diff.item() / scale if scale > 0 and math.isfinite(scale) else diff.item()
