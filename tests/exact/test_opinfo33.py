"""PyTorch's own OpInfo database (``torch.testing._internal.common_methods_invocations.op_db``)
as a source of ops to put inside ``f``: every public operator, with ``"auto"`` and every
explicit method, against float64 per-sample loops of ``torch.autograd.grad``.

The earlier fuzzers (``tests/stacks/test_fuzz24/25/27/28.py``, ``test_fuzzchain29.py``) drew
their ops from hand-written lists, and so were the op rules the engines carry (structured
factors, Taylor jets, forward-mode and chain rules) checked. Here the ops are OpInfo's: for
each op that supports float64 and autograd, its own sample inputs
(``op.sample_inputs("cpu", torch.float64, requires_grad=True)``) are kept where the first
tensor input takes a leading batch dimension with per-sample results (decided here: the op
on a stacked batch of two samples equals the stack of the op on each, by value; the rest are
dropped), and the function is

    f(x) = head(op(tail(x), *args, **kwargs)),  x: (B, n), n = numel of the sample's input,

with ``tail(x) = x + 0.01 tanh(x Wᵀ + c)`` (a dense layer, small so that ``tail(x)`` stays
near OpInfo's input and in the op's domain) reshaped to the sample's shape, and
``head(y) = L(y) + 0.1 tanh(L(y))``, ``L`` an affine map of the flattened output to ``n``
outputs (square, for the divergence). A second, elementwise variant (``"diag"``, where the
op's output has ``n`` elements) keeps the op's own structure visible to the structured and
Taylor engines: ``tail(x) = a x + c``, ``L(y) = a' y + c'`` elementwise. The Laplacians take
``g``, the same with a head to two outputs (the reference costs a Hessian per output).

Reference: per sample, Jacobian rows by one ``autograd.grad`` per output, Hessians of ``g`` by
one more per row element (all with ``create_graph``), in float64; the gradients of a seeded
weighted sum of each result in every trainable tensor (``W``, ``c``, head, the op's own tensor
arguments that require grad) and ``x``, by one more ``autograd.grad`` of the reference's same
weighted sum (grad of grad; grad of grad of grad for the Laplacians). The reference is only
tried: where PyTorch cannot take it (no double backward, OpInfo's ``supports_gradgrad``
false) those values or gradients go unchecked. Where it can, every call must be right or
raise an error that starts with the operator's name (never a silent zero, never PyTorch's
bare message; ``"auto"`` refused only samples it sees mixing, rightly). Hutch++ and XTrace
are compared with ``estimate_trace``'s same formulas on the reference Jacobian's products
and the same fixed probes; ``"auto"`` is called a second time (the routes and plans cached
at the first call's shape). Where PyTorch's own third derivatives are wrong (``WRONG_THIRD``:
torchdiv agrees with central differences there) the Laplacians' gradients are not compared;
``SKIPPED`` names the ops left out and why (no reference, or a call the batch makes invalid).

Tolerance (float64): ``1e-7`` relative to ``1 + max |reference|``. Both sides are a few hundred
flops from the same inputs through the same ATen kernels or their formulas; 1e-7 leaves eight
digits over eps = 2.2e-16 for the op's own conditioning (special functions, powers near
their poles) and is far below any wrong formula (a dropped term: O(1)).

Run all by hand: ``PYTHONPATH=src python tests/exact/test_opinfo33.py [OP ...]``
(``NOTES_opinfo33.md``: what ran, what it found). Needs ``expecttest`` (which
``torch.testing._internal`` imports); the tests skip with the reason where it is missing.
"""

from __future__ import annotations

import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import internal_module

import torchdiv

f64 = torch.float64
TOL = 1e-7
MAX_NUMEL = 24
PER_OP = 2


def op_db() -> list[Any]:
    """OpInfo's database, or a skip naming why it cannot be imported."""
    try:
        db = internal_module("common_methods_invocations").op_db
    except Exception as exc:
        pytest.skip(f"torch.testing._internal cannot be imported: {type(exc).__name__}: {exc}")
    return list(db)


C128 = torch.complex128
# (a complex result is taken as its real view, (..., 2): test_opinfoc33's complex samples)
_KEPT = (f64, C128)


def _first_float(out: Any) -> torch.Tensor | None:
    """The op's result, or the first float64 (or complex128, as its real view ``(..., 2)``)
    tensor of a tuple or list of results."""
    items = [out] if isinstance(out, torch.Tensor) else out
    if isinstance(items, (tuple, list)):
        for o in items:
            if isinstance(o, torch.Tensor) and o.dtype in _KEPT:
                return torch.view_as_real(o) if o.is_complex() else o
    return None


@dataclass
class Case:
    """One OpInfo op and sample: ``apply(t)`` runs the op with ``t`` (``(B, *shape)``) as its
    first tensor input and the sample's other arguments."""

    name: str
    op: Any
    index: int
    shape: torch.Size
    center: torch.Tensor
    args: tuple
    kwargs: dict
    in_list: bool
    rest: list = field(default_factory=list)
    process: Callable[[Any], Any] = lambda out: out

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        first = [t, *self.rest] if self.in_list else t
        out = _first_float(self.process(self.op.op(first, *self.args, **self.kwargs)))
        assert out is not None
        return out

    def leaves(self) -> list[torch.Tensor]:
        """The sample's other tensors that require grad (closed over by ``f``)."""
        found = []
        for a in [*self.rest, *self.args, *self.kwargs.values()]:
            items = a if isinstance(a, (tuple, list)) else [a]
            for t in items:
                if isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf:
                    found.append(t)
        return found

    @property
    def label(self) -> str:
        return f"{self.name}[{self.index}]{tuple(self.shape)}"


def _batchable(case: Case) -> bool:
    """Whether the op on a stacked batch of two samples is the stack of the op on each,
    deterministic and a float64 tensor per sample."""
    g = torch.Generator().manual_seed(1)
    x0 = case.center
    x1 = x0 + 1e-2 * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    with torch.no_grad():
        try:
            outs = [case.apply(x[None]) for x in (x0, x1)]
            again = case.apply(x0[None])
            both = case.apply(torch.stack([x0, x1]))
            swapped = case.apply(torch.stack([x1, x0]))
        except Exception:  # an op that refuses a batch is dropped
            return False
    # both orders: an op over the batch dimension (cummax of a 0-d sample's batch) can agree
    # with the per-sample results in one order by chance
    if swapped.shape != both.shape or not torch.allclose(
        swapped, both.flip(0), rtol=1e-10, atol=1e-12
    ):
        return False
    if both.shape[:1] != (2,) or any(o.shape[:1] != (1,) for o in outs):
        return False
    if not both.numel() or both.shape[1:] != outs[0].shape[1:]:
        return False
    if not torch.equal(outs[0].isnan(), again.isnan()) or not torch.allclose(
        outs[0], again, equal_nan=True
    ):
        return False
    if not torch.isfinite(both).all():
        return False
    return torch.allclose(both, torch.cat(outs), rtol=1e-10, atol=1e-12)


def _cropped(t: torch.Tensor, max_numel: int = MAX_NUMEL) -> torch.Tensor | None:
    """``t``, or its leading corner of at most ``max_numel`` elements (each dimension cut to
    4, 3 or 2; an op whose arguments do not fit the cut sample fails the batch check)."""
    if t.numel() <= max_numel:
        return t
    for k in (4, 3, 2):
        corner = t[tuple(slice(0, k) for _ in t.shape)]
        if corner.numel() <= max_numel:
            return corner
    return None


# ops left out, with the reason (NOTES_opinfo33.md)
SKIPPED = {
    # reads one triangle of its input: off triangular inputs (where tail(x) takes it) PyTorch's
    # forward and reverse derivatives disagree with each other and with finite differences,
    # so there is no reference (torchdiv replaces it by inv(C C^T): modes.py)
    "cholesky_inverse": "reads one triangle; no reference off triangular inputs",
    # the CPU kernel does not check its weight against the channel dimension, which the
    # batch dimension shifts: it reads past the weight (values by chance), backward refuses
    "native_batch_norm": "batching shifts the channel dimension; unchecked CPU kernel",
    "_native_batch_norm_legit": "batching shifts the channel dimension; unchecked CPU kernel",
    "bernoulli": "random: no two evaluations agree",
    # read one triangle of a symmetric input: off symmetric inputs PyTorch's formulas (which
    # assume symmetry) disagree with each other, so there is no reference
    "linalg.cholesky": "reads one triangle of a symmetric input",
    "linalg.cholesky_ex": "reads one triangle of a symmetric input",
    "linalg.eigvalsh": "reads one triangle of a symmetric input",
    # eigenvectors fixed up to a phase: PyTorch refuses gradients that depend on it
    "linalg.eig": "eigenvector phase: PyTorch refuses the gradients",
    # the offsets keep the sample's leading size, which the batch dimension changes: the CPU
    # kernel reads past them unchecked (values by chance)
    "_segment_reduce.offsets": "offsets do not follow the batch dimension; unchecked kernel",
    "_segment_reduce.lengths": "lengths do not follow the batch dimension; unchecked kernel",
    # PyTorch's double backward is wrong (the divergence's gradients 10x off central
    # differences, the Laplacian's values by grad of grad 60% off), torchdiv replaces it
    # (modes.py) and agrees with central differences: no reference
    "logcumsumexp": "PyTorch's second derivative by backward passes is wrong",
}
# ops whose third derivative by PyTorch's backward passes (the Laplacians' gradients'
# reference) is wrong (modes.SafeDerivatives: pytorch#175754); torchdiv's agree with finite
# differences, so those gradients are not compared
WRONG_THIRD = {"native_layer_norm", "nn.functional.layer_norm", "nn.functional.instance_norm"}


def cases(
    ops: list[str] | None = None,
    per_op: int = PER_OP,
    dtype: torch.dtype = f64,
    keep: Callable[[Case], bool] = _batchable,
    max_numel: int = MAX_NUMEL,
) -> Iterator[Case]:
    """The kept (op, sample) pairs of the ops named (all that support ``dtype`` and autograd
    on CPU where ``ops`` is None), at most ``per_op`` of each. ``dtype`` complex128: the
    samples whose first input is complex (``test_opinfoc33.py``). ``keep``: which samples
    (``_batchable``; ``test_mixsweep34.py``: those that mix the batch). ``max_numel``: the
    first input cropped to at most that many elements (``test_opinfohi34.py``'s fourth-order
    references: smaller)."""
    for op in op_db():
        if (
            ops is not None
            and op.name not in ops
            and f"{op.name}.{op.variant_test_name}" not in ops
        ):
            continue
        if not op.supports_autograd or dtype not in op.supported_dtypes("cpu"):
            continue
        if dtype.is_complex and dtype not in op.supported_backward_dtypes("cpu"):
            continue
        name = op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")
        if name in SKIPPED:
            continue
        kept = 0
        torch.manual_seed(0)  # (OpInfo draws its samples from the global generator)
        try:
            samples = list(op.sample_inputs("cpu", dtype, requires_grad=True))
        except Exception:
            continue
        for i, s in enumerate(samples):
            inp = s.input
            in_list = isinstance(inp, (list, tuple))
            first = inp[0] if in_list and len(inp) else inp
            if not isinstance(first, torch.Tensor) or first.dtype != dtype:
                continue
            if not first.numel() or first.layout != torch.strided:
                continue
            if not first.isfinite().all():  # x with infinities (degenerate inputs: not here)
                continue
            first = _cropped(first, max_numel)
            if first is None:
                continue
            case = Case(
                name,
                op,
                i,
                first.shape,
                first.detach().clone(),
                tuple(s.args),
                dict(s.kwargs),
                in_list,
                list(inp[1:]) if in_list else [],
                s.output_process_fn_grad,
            )
            if keep(case):
                kept += 1
                yield case
                if kept >= per_op:
                    break


class Model:
    """``f`` (square, ``n`` outputs) and ``g`` (two outputs) around one case's op."""

    def __init__(self, case: Case, variant: str, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        n = case.shape.numel()
        with torch.no_grad():
            m = case.apply(case.center[None]).shape[1:].numel()
        self.case, self.variant, self.n, self.m = case, variant, n, m

        def p(*shape: int, scale: float = 1.0, mean: float = 0.0) -> torch.Tensor:
            t = mean + scale * torch.randn(shape, generator=g, dtype=f64)
            return t.requires_grad_()

        if variant == "diag":
            self.a, self.c = p(n, scale=0.01, mean=1.0), p(n, scale=0.01)
            self.ha, self.hc = p(n, scale=0.5, mean=1.0), p(n, scale=0.5)
            self.params = [self.a, self.c, self.ha, self.hc]
        else:
            self.W, self.c = p(n, n, scale=n**-0.5), p(n, scale=0.5)
            self.V, self.hc = p(n, m, scale=m**-0.5), p(n, scale=0.5)
            self.params = [self.W, self.c, self.V, self.hc]
        self.V2, self.c2 = p(2, m, scale=m**-0.5), p(2, scale=0.5)
        self.params += [self.V2, self.c2, *case.leaves()]
        self.x = (
            case.center.reshape(1, n)
            + torch.cat(
                [torch.zeros(1, n, dtype=f64), 0.01 * torch.randn(1, n, generator=g, dtype=f64)]
            )
        ).requires_grad_()

    def _inner(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant == "diag":
            t = self.a * x + self.c
        else:
            t = x + 0.01 * torch.tanh(x @ self.W.t() + self.c)
        return self.case.apply(t.reshape(x.shape[0], *self.case.shape)).reshape(x.shape[0], -1)

    def f(self, x: torch.Tensor) -> torch.Tensor:
        y = self._inner(x)
        lin = self.ha * y + self.hc if self.variant == "diag" else y @ self.V.t() + self.hc
        return lin + 0.1 * torch.tanh(lin)

    def g(self, x: torch.Tensor) -> torch.Tensor:
        lin = self._inner(x) @ self.V2.t() + self.c2
        return lin + 0.1 * torch.tanh(lin)


def _jacobian_rows(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(B, m, n)``: every sample's Jacobian, one ``autograd.grad`` per sample and output."""
    B, m = y.shape
    rows = []
    for s in range(B):
        for i in range(m):
            (r,) = torch.autograd.grad(
                y[s, i], x, create_graph=True, retain_graph=True, materialize_grads=True
            )
            rows.append(r[s])
    return torch.stack(rows).reshape(B, m, -1)


def _hessians(jac: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(B, m, n, n)`` from Jacobian rows: one more ``autograd.grad`` per row element."""
    B, m, n = jac.shape
    out = []
    for s in range(B):
        for i in range(m):
            for j in range(n):
                if jac.requires_grad:
                    (r,) = torch.autograd.grad(
                        jac[s, i, j],
                        x,
                        create_graph=True,
                        retain_graph=True,
                        materialize_grads=True,
                    )
                    out.append(r[s])
                else:
                    out.append(torch.zeros(n, dtype=f64))
    return torch.stack(out).reshape(B, m, n, n)


def _weights(shape: torch.Size, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=f64)


@dataclass
class Expected:
    """A reference result and its gradients (``None`` where the reference cannot be
    differentiated: the op lacks the order it needs)."""

    value: torch.Tensor
    grads: list[torch.Tensor] | None
    seed: int


def _expected(value: torch.Tensor, tensors: list[torch.Tensor], seed: int) -> Expected:
    loss = (value * _weights(value.shape, seed)).sum()
    grads = None
    if not tensors:
        grads = None
    elif loss.requires_grad:
        try:
            grads = list(
                torch.autograd.grad(loss, tensors, retain_graph=True, materialize_grads=True)
            )
        except Exception:
            grads = None
    else:
        grads = [torch.zeros_like(t) for t in tensors]
    return Expected(value.detach(), grads, seed)


def references(model: Model, probes: torch.Tensor, lap_probes: torch.Tensor) -> dict[str, Expected]:
    """Every operator's float64 reference at ``model.x``."""
    x = model.x
    tensors = [*model.params, x]
    out: dict[str, Expected] = {}
    y = model.f(x)
    jac = _jacobian_rows(y, x)
    out["jacobian"] = _expected(jac, tensors, 1)
    diag = jac.diagonal(dim1=1, dim2=2)
    out["jacobian_diagonal"] = _expected(diag, tensors, 2)
    out["divergence"] = _expected(diag.sum(-1), tensors, 3)
    vjv = torch.einsum("rbi,bij,rbj->rb", probes, jac, probes).mean(0)
    out["hutchinson"] = _expected(vjv, tensors, 4)
    # Hutch++ and XTrace: their formulas on the reference Jacobian's products (XTrace on the
    # transpose's: torchdiv's divergence sketches with vector-Jacobian products)
    for method, spec in (("hutch++", "bij,rbj->rbi"), ("xtrace", "bji,rbj->rbi")):
        est = torchdiv.estimate_trace(
            lambda v, spec=spec: torch.einsum(spec, jac, v),
            x,
            method=method,
            probes=_sketch_probes(method, model.n),
        )
        out[method] = _expected(est.value, tensors, 4)
    try:
        yg = model.g(x)
        jg = _jacobian_rows(yg, x)
        hess = _hessians(jg, x)
    except Exception:
        return out
    lap = hess.diagonal(dim1=2, dim2=3).sum(-1)
    if model.case.name in WRONG_THIRD:  # values only (second derivatives: right)
        tensors = []
    out["laplacian"] = _expected(lap, tensors, 5)
    out["value"] = _expected(yg, tensors, 6)
    out["gradient"] = _expected(jg, tensors, 7)
    vhv = torch.einsum("rbj,bijk,rbk->rbi", lap_probes, hess, lap_probes).mean(0)
    out["laplacian_hutchinson"] = _expected(vhv, tensors, 8)
    return out


def _compare(actual: torch.Tensor, exp: Expected, tensors: list[torch.Tensor]) -> list[str]:
    faults = []
    if actual.shape != exp.value.shape:
        return [f"shape {tuple(actual.shape)} != {tuple(exp.value.shape)}"]
    scale = 1.0 + float(exp.value.abs().max())
    err = float((actual.detach() - exp.value).abs().max())
    if not err <= TOL * scale:
        faults.append(f"value: max error {err:.3e} (scale {scale:.3e})")
    if exp.grads is None:
        return faults
    loss = (actual * _weights(exp.value.shape, exp.seed)).sum()
    if not loss.requires_grad:
        if any(float(w.abs().max()) > 0 for w in exp.grads if w.numel()):
            faults.append("no graph, but the reference's gradients are not zero")
        return faults
    try:
        got = torch.autograd.grad(
            loss, tensors, allow_unused=True, materialize_grads=True, retain_graph=True
        )
    except Exception as exc:
        return [*faults, f"grad raised {type(exc).__name__}: {str(exc)[:200]}"]
    for k, (a, e) in enumerate(zip(got, exp.grads, strict=True)):
        # where the reference's own gradient is not finite (an op at -inf: _safe_softmax's
        # masked entries) it says nothing; a nan where it is finite is an error of inf
        finite = e.isfinite()
        e, a = e[finite], torch.where(a[finite].isnan(), torch.inf, a[finite])
        s = 1.0 + float(e.abs().max()) if e.numel() else 1.0
        err = float((a - e).abs().max()) if e.numel() else 0.0
        if not err <= TOL * s:
            which = "x" if k == len(tensors) - 1 else f"param {k} {tuple(e.shape)}"
            faults.append(f"grad of {which}: max error {err:.3e} (scale {s:.3e})")
    return faults


def _calls(model: Model, probes: torch.Tensor, lap_probes: torch.Tensor) -> Iterator[tuple]:
    """(operator, method, reference key, thunk) of every call made."""
    f, g, x = model.f, model.g, model.x
    for method in ("auto", "structured", "forward", "reverse"):
        yield (
            "divergence",
            method,
            "divergence",
            lambda m=method: torchdiv.divergence(f, x, method=m),
        )
        yield (
            "jacobian_diagonal",
            method,
            "jacobian_diagonal",
            lambda m=method: torchdiv.jacobian_diagonal(f, x, method=m),
        )
    yield (
        "divergence",
        "hutchinson",
        "hutchinson",
        lambda: torchdiv.divergence(f, x, method="hutchinson", probes=probes),
    )
    for method in ("hutchinson", "hutch++", "xtrace"):
        r = probes if method == "hutchinson" else _sketch_probes(method, model.n)
        yield (
            "estimate_divergence",
            method,
            method,
            lambda m=method, r=r: torchdiv.estimate_divergence(f, x, method=m, probes=r).value,
        )
    for method in ("auto", "forward", "reverse"):
        yield "jacobian", method, "jacobian", lambda m=method: torchdiv.jacobian(f, x, method=m)
    for method in ("auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad"):
        yield "laplacian", method, "laplacian", lambda m=method: torchdiv.laplacian(g, x, method=m)
    yield (
        "laplacian",
        "hutchinson",
        "laplacian_hutchinson",
        lambda: torchdiv.laplacian(g, x, method="hutchinson", probes=lap_probes),
    )
    for method in ("auto", "taylor", "forward-over-reverse"):
        yield (
            "value_grad_laplacian",
            method,
            "vgl",
            lambda m=method: torchdiv.value_grad_laplacian(g, x, method=m),
        )
    # "auto" again at the same shape: the routes and plans cached by the first calls
    again = "auto (again)"
    yield "divergence", again, "divergence", lambda: torchdiv.divergence(f, x)
    yield "jacobian_diagonal", again, "jacobian_diagonal", lambda: torchdiv.jacobian_diagonal(f, x)
    yield "laplacian", again, "laplacian", lambda: torchdiv.laplacian(g, x)
    yield "value_grad_laplacian", again, "vgl", lambda: torchdiv.value_grad_laplacian(g, x)


def _sketch_probes(method: str, n: int) -> torch.Tensor:
    """Fixed probes for Hutch++ (``2n`` random vectors: its sketch spans the event) and
    XTrace (``n``, the most it takes)."""
    r = n if method == "xtrace" else 2 * n
    g = torch.Generator().manual_seed(11)
    return torch.randn(r, 2, n, generator=g, dtype=f64)


def check(
    case: Case, variant: str, make: Callable[[Case, str], Model] = Model
) -> tuple[list[str], list[str]]:
    """Every call's faults (wrong values or gradients, bare errors) and refusals (errors that
    name the operator) for one case and variant; ``make`` builds ``f`` and ``g`` around it
    (``Model``; ``test_opinfoc33.py``'s complex intermediates)."""
    model = make(case, variant)
    n = model.n
    gp = torch.Generator().manual_seed(5)
    probes = torch.randn(4, 2, n, generator=gp, dtype=f64)
    lap_probes = torch.randn(3, 2, n, generator=gp, dtype=f64)
    tensors = [*model.params, model.x]
    faults: list[str] = []
    refusals: list[str] = []
    try:
        refs = references(model, probes, lap_probes)
    except Exception as exc:
        return [], [f"reference raised {type(exc).__name__}: {str(exc)[:120]}"]
    if not all(bool(e.value.isfinite().all()) for e in refs.values()):  # (_safe_softmax's -inf)
        return [], ["reference not finite"]
    for operator, method, key, thunk in _calls(model, probes, lap_probes):
        where = f"{case.label} {variant} {operator}({method})"
        if key != "vgl" and key not in refs:
            continue
        if key == "vgl" and "laplacian" not in refs:
            continue
        try:
            got = thunk()
        except Exception as exc:
            msg = f"{type(exc).__name__}: {str(exc)[:300]}"
            (refusals if str(exc).startswith(operator) else faults).append(f"{where}: {msg}")
            continue
        if key == "vgl":
            parts = [
                (got.value, refs["value"]),
                (got.gradient, refs["gradient"]),
                (got.laplacian, refs["laplacian"]),
            ]
        else:
            parts = [(got, refs[key])]
        for k, (a, e) in enumerate(parts):
            for bad in _compare(a, e, tensors):
                faults.append(f"{where}{'' if len(parts) == 1 else f' part {k}'}: {bad}")
    return faults, refusals


VARIANTS = ("dense", "diag")


def run(ops: list[str] | None, per_op: int = PER_OP, verbose: bool = True) -> list[str]:
    """Check every kept case of ``ops`` (all where ``None``); the faults found."""
    all_faults = []
    for case in cases(ops, per_op):
        for variant in VARIANTS:
            if variant == "diag":
                with torch.no_grad():
                    if case.apply(case.center[None]).numel() != case.shape.numel():
                        continue
            start = time.perf_counter()
            if hasattr(signal, "alarm"):
                signal.alarm(60)
            try:
                faults, refusals = check(case, variant)
            except TimeoutError:
                faults, refusals = [], [f"{case.label} {variant}: over 60 s, skipped as slow"]
            except Exception:
                faults, refusals = (
                    [f"{case.label} {variant}: harness {traceback.format_exc()[-400:]}"],
                    [],
                )
            if hasattr(signal, "alarm"):
                signal.alarm(0)
            took = time.perf_counter() - start
            all_faults += faults
            if verbose:
                printed(f"{case.label} {variant}", took, faults, refusals)
    return all_faults


def printed(label: str, took: float, faults: list[str], refusals: list[str]) -> None:
    """Print one (case, variant)'s outcome for the ``__main__`` runs."""
    print(f"## {label} {took:.2f}s faults={len(faults)} refusals={len(refusals)}", flush=True)
    for line in faults:
        print("FAULT", line, flush=True)
    for line in refusals:
        print("REFUSED", line, flush=True)


# --- the faults found (each fails without its fix; no OpInfo needed) -----------------------


def _normed_net() -> tuple[Callable[[torch.Tensor], torch.Tensor], list[torch.Tensor]]:
    """``f(x) = native_layer_norm(tanh(x Wᵀ))[0] Vᵀ`` over ``(2, 3)`` events, with a weight
    and bias: the fused op called directly, as OpInfo's ``native_layer_norm``."""
    g = torch.Generator().manual_seed(0)
    W, V = (torch.randn(6, 6, generator=g, dtype=f64).requires_grad_() for _ in range(2))
    w, b = (torch.randn(2, 3, generator=g, dtype=f64).requires_grad_() for _ in range(2))

    def f(x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ W.t()).reshape(-1, 2, 3)
        return torch.native_layer_norm(h, (2, 3), w, b, 0.5)[0].reshape(-1, 6) @ V.t()

    return f, [W, V, w, b]


@pytest.mark.parametrize("operator", ["divergence", "jacobian"])
def test_native_layer_norm_through_forward_mode_keeps_parameter_gradients(operator: str) -> None:
    """``torch.native_layer_norm`` called directly: its forward-mode formula takes the saved
    mean and rstd as constants, so the forward engine's divergences and Jacobians had right
    values but parameter and ``x`` gradients off by 1-30% (opinfo33; ``F.layer_norm`` was
    already replaced). Reference: float64 loops of ``autograd.grad``, grad of grad. 1e-9:
    float64, a few hundred flops from the same inputs."""
    f, params = _normed_net()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=f64)
    x.requires_grad_()
    jac = _jacobian_rows(f(x), x)
    expected = jac.diagonal(dim1=1, dim2=2).sum(-1) if operator == "divergence" else jac
    got = getattr(torchdiv, operator)(f, x, method="forward")
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    w = _weights(expected.shape, 3)
    want = torch.autograd.grad(
        (expected * w).sum(), [*params, x], retain_graph=True, materialize_grads=True
    )
    have = torch.autograd.grad((got * w).sum(), [*params, x], materialize_grads=True)
    for a, e in zip(have, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("out", "method"), [(8, "auto"), (8, "forward"), (16, "auto")])
def test_instance_norm_tracking_statistics_in_training(out: int, method: str) -> None:
    """``nn.InstanceNorm1d(track_running_stats=True)`` in training (OpInfo's
    ``instance_norm`` samples with running statistics): the fused op's forward-mode
    derivatives gave the forward engine's Jacobian gradients silently wrong, by
    ``jacobian(method="auto")`` too where the Jacobian is tall (16 x 8: forward mode; 5.7
    absolute against gradients of ~1), ``"forward"`` everywhere (~1.8). Now the composite,
    the running statistics moved by the fused op as one plain call moves them. Reference:
    float64 loop of ``autograd.grad``, grad of grad; 1e-9 (float64, a few hundred flops)."""
    torch.manual_seed(0)
    norm = torch.nn.InstanceNorm1d(2, affine=True, track_running_stats=True)
    layers = [torch.nn.Linear(8, 8), torch.nn.Unflatten(1, (2, 4)), norm, torch.nn.Flatten()]
    net = torch.nn.Sequential(*layers, torch.nn.Tanh(), torch.nn.Linear(8, out)).to(f64)
    x = torch.randn(3, 8, dtype=f64)
    stats = [norm.running_mean.clone(), norm.running_var.clone()]
    got = torchdiv.jacobian(net, x, method=method)
    moved = [norm.running_mean.clone(), norm.running_var.clone()]
    norm.running_mean.copy_(stats[0]), norm.running_var.copy_(stats[1])
    xr = x.clone().requires_grad_()
    expected = _jacobian_rows(net(xr), xr)  # one plain call: moves the statistics once
    torch.testing.assert_close(moved, [norm.running_mean, norm.running_var], rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    w = _weights(expected.shape, 3)
    params = list(net.parameters())
    want = torch.autograd.grad(
        (expected * w).sum(), params, retain_graph=True, materialize_grads=True
    )
    have = torch.autograd.grad((got * w).sum(), params, materialize_grads=True)
    for a, e in zip(have, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    ("operator", "method"),
    [
        ("laplacian", "forward-over-reverse"),
        ("laplacian", "hessian"),
        ("value_grad_laplacian", "forward-over-reverse"),
    ],
)
def test_no_forward_rule_of_a_backward_is_refused_by_name(operator: str, method: str) -> None:
    """``soft_margin_loss_backward`` has no forward-mode derivative: the nested Laplacians
    raised PyTorch's bare ``NotImplementedError`` (from the engine's products, outside
    ``f``); now it starts with the operator, names the method and the op, and the way out
    (``"auto"``, which is right: checked against the grad-of-grad loop)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 5, generator=g, dtype=f64).requires_grad_()
    target = torch.randn(5, generator=g, dtype=f64).sign()

    def f(x: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.soft_margin_loss(
            x @ W.t(), target.expand(len(x), 5), reduction="none"
        )
        return loss.sum(-1, keepdim=True)

    x = torch.randn(2, 5, generator=g, dtype=f64)
    pattern = rf"^{operator}: method='{method}' .*soft_margin_loss_backward.*method='auto'"
    with pytest.raises(NotImplementedError, match=pattern):
        getattr(torchdiv, operator)(f, x, method=method)
    xr = x.clone().requires_grad_()
    jac = _jacobian_rows(f(xr), xr)
    expected = _hessians(jac, xr).diagonal(dim1=2, dim2=3).sum(-1)
    torch.testing.assert_close(torchdiv.laplacian(f, x), expected.detach(), rtol=1e-9, atol=1e-9)


# --- OpInfo's ops ------------------------------------------------------------------------

# a fixed sample of ops whose rules torchdiv carries (structured factors, Taylor jets,
# forward-mode rules, replacements): (OpInfo name, variant)
FAST = [
    ("tanh", "diag"),
    ("softmax", "dense"),
    ("cumsum", "diag"),
    ("mul", "dense"),
    ("native_layer_norm", "dense"),
    ("nn.functional.soft_margin_loss", "dense"),
]


def _faults(names: list[str], variants: tuple[str, ...], per_op: int) -> list[str]:
    found = []
    for case in cases(names, per_op):
        for variant in variants:
            if variant == "diag":
                with torch.no_grad():
                    if case.apply(case.center[None]).numel() != case.shape.numel():
                        continue
            found += check(case, variant)[0]
    return found


def test_opinfo_fixed_sample() -> None:
    """One kept sample of each op of ``FAST`` (the module docstring: every operator and
    method against float64 loops of ``autograd.grad``): no fault."""
    found = []
    for name, variant in FAST:
        found += _faults([name], (variant,), 1)
    assert not found, "\n".join(found)


# a larger sample (all of op_db: ``__main__``, about 30 min on one core)
SLOW = [
    "abs", "acos", "addcmul", "asinh", "atan2", "clamp", "cos", "cummax", "cumprod", "div",
    "erf", "expm1", "flip", "hypot", "lerp", "log1p", "logsumexp", "matmul", "maximum",
    "nn.functional.elu", "nn.functional.gelu", "nn.functional.layer_norm", "nn.functional.silu",
    "nn.functional.softplus", "pow", "prod", "rsqrt", "sigmoid", "sinc", "sqrt", "square",
    "std", "sum", "trace", "var", "where", "xlogy",
]  # fmt: skip


@pytest.mark.slow
def test_opinfo_larger_sample() -> None:
    """``SLOW``'s ops, one kept sample each, both variants: no fault."""
    found = _faults(SLOW, VARIANTS, 1)
    assert not found, "\n".join(found)


def _timeout(signum: int, frame: object) -> None:
    raise TimeoutError("over 60 s: skipped as slow")


if __name__ == "__main__":
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _timeout)
    run(sys.argv[1:] or None)
