"""``test_opinfo33.py``'s OpInfo sweep carried to two regions it did not reach.

(A) Complex intermediates. ``x`` and ``f(x)`` are real, but torchdiv differentiates complex
intermediates as PyTorch's complex autograd does (``docs/guide/limitations.md``, "Complex
numbers"; FNO spectra, wavefunctions, plane waves). For each OpInfo op with complex128 and
complex autograd on CPU, its complex samples (the same per-sample batch filter as opinfo33),

    f(x) = head(view_as_real(op(tail(x)))),
    tail(x) = complex(x + 0.01 (x W1ᵀ + b1), b2 + 0.1 x W2ᵀ)  (reshaped to the sample's shape),
    head(y) = L(y) + 0.1 tanh(L(y)),  L affine from the flattened real view to n outputs,

``x`` starting at the sample's real part and ``b2`` (trainable) at its imaginary part, so that
``tail(x)`` stays near OpInfo's input. A real result (``abs``, ``angle``) is taken as it is.
Every public operator and method of opinfo33 (``check``, ``_calls``), against its float64
(complex128 inside) per-sample loops of ``torch.autograd.grad``, grad of grad for the
gradients in every trainable tensor, the op's own complex tensor arguments included
(PyTorch's convention: the gradient of a real loss in a complex leaf is ``∂L/∂re + i ∂L/∂im``,
both sides alike). Refusals must start with the operator's name.

(B) Sizes where ``"auto"`` routes to the structured engine (divergence, diagonal) and the Taylor
engine (Laplacian, ``value_grad_laplacian``) by itself: event x elements of ``x`` above
``_structured.TINY_PROBLEM`` (``2**12``). opinfo33's samples (at most 24 elements, batch 2)
stayed below, where ``"auto"`` takes the generic engines. Here ``n = 16..64``, batch 64:

- ``"tiled"`` (elementwise ops, opinfo33's ``"diag"``): ``r`` copies of the sample side by side
  in each sample's event, ``x`` of ``(B, r k)`` reshaped to ``(B r, *shape)`` for the op (the
  op is per-sample along its leading dimension: the batch filter), ``tail``/``head``
  elementwise affine maps, so the Jacobian is diagonal and the structured engine's colours
  are one direction;
- ``"padded"`` (any kept op): ``tail(x) = x[:, :k] + 0.01 tanh(x Wᵀ + c)`` from ``n`` inputs to
  the sample's ``k`` elements, ``head`` a dense affine + tanh map to ``n`` outputs.

Checked: which engine ``"auto"`` ran (``Route``: the structured engine's plan or the Taylor
engine's sweep returned a result), and its values and parameter gradients against a per-sample
loop that evaluates ``f`` on each sample alone (``x[s:s+1]``; Jacobian rows and Hessians by
``autograd.grad``, grad of grad for the gradients), plus the explicit ``"structured"`` and
``"taylor"``. A route to the generic engines is a finding about speed, not a fault: listed.

Tolerance (float64): ``TOL = 1e-7`` relative to ``1 + max |reference|``, opinfo33's (same
kernels or formulas, a few hundred flops; far below a wrong formula's O(1)).

Run all by hand: ``PYTHONPATH=src python tests/exact/test_opinfoc33.py [complex|sizes] [OP ...]``
(``NOTES_opinfoc33.md``: what ran, what it found).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator

import pytest
import torch

import torchdiv
from tests.exact.test_opinfo33 import (
    C128,
    WRONG_THIRD,
    Case,
    Expected,
    Model,
    _compare,
    _expected,
    _hessians,
    _jacobian_rows,
    _timeout,
    cases,
    check,
)

f64 = torch.float64

# --- (A) complex intermediates -------------------------------------------------------------


class ComplexModel(Model):
    """``f`` (``n`` real outputs) and ``g`` (two) around a complex sample's op: the module
    docstring's (A). ``n``: the sample's number of (complex) elements, ``x`` real ``(2, n)``."""

    def __init__(self, case: Case, variant: str, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        n = case.shape.numel()
        with torch.no_grad():
            m = case.apply(case.center[None]).shape[1:].numel()
        self.case, self.variant, self.n, self.m = case, variant, n, m

        def p(*shape: int, scale: float = 1.0) -> torch.Tensor:
            return (scale * torch.randn(shape, generator=g, dtype=f64)).requires_grad_()

        center = case.center.reshape(n)
        self.W1, self.b1 = p(n, n, scale=n**-0.5), p(n, scale=0.5)
        self.W2 = p(n, n, scale=n**-0.5)
        self.b2 = center.imag.detach().clone().requires_grad_()
        self.V, self.hc = p(n, m, scale=m**-0.5), p(n, scale=0.5)
        self.V2, self.c2 = p(2, m, scale=m**-0.5), p(2, scale=0.5)
        self.params = [self.W1, self.b1, self.W2, self.b2, self.V, self.hc, self.V2, self.c2]
        self.params += case.leaves()
        start = center.real.detach().reshape(1, n)
        shift = 0.01 * torch.randn(1, n, generator=g, dtype=f64)
        self.x = torch.cat([start, start + shift]).requires_grad_()

    def _inner(self, x: torch.Tensor) -> torch.Tensor:
        re = x + 0.01 * (x @ self.W1.t() + self.b1)
        t = torch.complex(re, self.b2 + 0.1 * (x @ self.W2.t()))
        return self.case.apply(t.reshape(x.shape[0], *self.case.shape)).reshape(x.shape[0], -1)

    def f(self, x: torch.Tensor) -> torch.Tensor:
        lin = self._inner(x) @ self.V.t() + self.hc
        return lin + 0.1 * torch.tanh(lin)


# beside opinfo33's ``SKIPPED`` (NOTES_opinfoc33.md)
LEFT_OUT = {
    # randomised sketches (a draw from the global generator at every call): torchdiv's
    # "grad-of-grad" Laplacian, the reference's own algorithm, differs from it by 1e-6..1e-5
    # in the gradients, by the draws alone
    "svd_lowrank": "random sketch",
    "pca_lowrank": "random sketch",
    # PyTorch's eig backward refuses the tangents of forward over reverse at the caller's
    # backward pass (docs/guide/limitations.md, "Complex numbers"; "grad-of-grad" is right)
    "linalg.eigvals": "eig's phase check at the Laplacian's gradients (documented)",
}


def complex_cases(ops: list[str] | None, per_op: int) -> Iterator[Case]:
    """opinfo33's kept cases of complex samples (``cases`` with complex128), but ``LEFT_OUT``."""
    for case in cases(ops, per_op, dtype=C128):
        if case.name not in LEFT_OUT:
            yield case


def _checked(case: Case, make: Callable[[Case, str], Model]) -> tuple[list[str], list[str]]:
    if hasattr(signal, "alarm"):
        signal.alarm(60)
    try:
        return check(case, "complex", make)
    except TimeoutError:
        return [], [f"{case.label}: over 60 s, skipped as slow"]
    except Exception:
        return [f"{case.label}: harness {traceback.format_exc()[-400:]}"], []
    finally:
        if hasattr(signal, "alarm"):
            signal.alarm(0)


def run_complex(ops: list[str] | None, per_op: int = 2, verbose: bool = True) -> list[str]:
    """(A) for every kept complex case of ``ops`` (all where ``None``); the faults found."""
    found = []
    for case in complex_cases(ops, per_op):
        start = time.perf_counter()
        faults, refusals = _checked(case, ComplexModel)
        found += faults
        if verbose:
            took = time.perf_counter() - start
            counts = f"faults={len(faults)} refusals={len(refusals)}"
            print(f"## {case.label} complex {took:.2f}s {counts}", flush=True)
            for line in faults:
                print("FAULT", line, flush=True)
            for line in refusals:
                print("REFUSED", line, flush=True)
    return found


# --- (B) sizes where "auto" takes the structured and Taylor engines -----------------------


class Route:
    """Which engine ``"auto"`` ran: ``structured`` (``_structured.plan`` returned a plan's
    result) and ``taylor`` (the Laplacian's ``collapsed_or_none`` or ``value_grad_laplacian``'s
    ``_sweep`` returned), counted while ``watching``."""

    def __init__(self) -> None:
        self.structured = 0
        self.taylor = 0

    @contextlib.contextmanager
    def watching(self) -> Iterator[Route]:
        import torchdiv._api.second_order as second_order
        import torchdiv._laplacian.methods as methods
        import torchdiv._structured as structured

        saved = structured.plan, methods.collapsed_or_none, second_order._sweep

        def plan(*a: object, **k: object) -> object:
            out = saved[0](*a, **k)
            self.structured += out is not None
            return out

        def collapsed(*a: object, **k: object) -> object:
            out = saved[1](*a, **k)
            self.taylor += out is not None
            return out

        def sweep(*a: object, **k: object) -> object:
            out = saved[2](*a, **k)
            self.taylor += 1
            return out

        structured.plan, methods.collapsed_or_none, second_order._sweep = plan, collapsed, sweep
        try:
            yield self
        finally:
            structured.plan, methods.collapsed_or_none, second_order._sweep = saved


class SizedModel(Model):
    """The module docstring's (B): ``"tiled"`` (``r`` copies of an elementwise op's sample per
    event) or ``"padded"`` (a dense map from ``n`` inputs to the sample), batch ``batch``."""

    def __init__(self, case: Case, variant: str, n: int = 16, batch: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        k = case.shape.numel()
        with torch.no_grad():
            m = case.apply(case.center[None]).shape[1:].numel()
        self.case, self.variant, self.k = case, variant, k

        def p(*shape: int, scale: float = 1.0, mean: float = 0.0) -> torch.Tensor:
            t = mean + scale * torch.randn(shape, generator=g, dtype=f64)
            return t.requires_grad_()

        if variant == "tiled":
            self.r = -(-n // k)
            n = self.r * k
            self.n, self.m = n, n
            self.a, self.c = p(n, scale=0.01, mean=1.0), p(n, scale=0.01)
            self.ha, self.hc = p(n, scale=0.5, mean=1.0), p(n, scale=0.5)
            self.params = [self.a, self.c, self.ha, self.hc]
            mg = n
            start = case.center.reshape(1, k).repeat(1, self.r)
        else:
            n = max(n, k)
            self.n, self.m = n, m
            self.W, self.c = p(k, n, scale=n**-0.5), p(k, scale=0.5)
            self.V, self.hc = p(n, m, scale=m**-0.5), p(n, scale=0.5)
            self.params = [self.W, self.c, self.V, self.hc]
            mg = m
            start = torch.zeros(1, n, dtype=f64)
            start[:, :k] = case.center.reshape(1, k)
        self.V2, self.c2 = p(2, mg, scale=mg**-0.5), p(2, scale=0.5)
        self.params += [self.V2, self.c2, *case.leaves()]
        self.x = (start + 0.01 * torch.randn(batch, n, generator=g, dtype=f64)).requires_grad_()

    def _inner(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        if self.variant == "tiled":
            t = (self.a * x + self.c).reshape(B * self.r, *self.case.shape)
            return self.case.apply(t).reshape(B, -1)
        t = x[:, : self.k] + 0.01 * torch.tanh(x @ self.W.t() + self.c)
        return self.case.apply(t.reshape(B, *self.case.shape)).reshape(B, -1)

    def f(self, x: torch.Tensor) -> torch.Tensor:
        y = self._inner(x)
        lin = self.ha * y + self.hc if self.variant == "tiled" else y @ self.V.t() + self.hc
        return lin + 0.1 * torch.tanh(lin)


def _sample_loop(model: SizedModel) -> dict[str, Expected]:
    """Every sample's references by ``f`` and ``g`` evaluated on that sample alone: Jacobian
    rows and Hessians of ``g`` by ``autograd.grad`` (``create_graph``), float64."""
    x = model.x
    tensors = [*model.params, x]
    diags, laps, grads, values = [], [], [], []
    for s in range(x.shape[0]):
        xs = x[s : s + 1]
        y = model.f(xs)[0]
        rows = [
            torch.autograd.grad(y[i], xs, create_graph=True, materialize_grads=True)[0][0, i]
            for i in range(model.n)
        ]
        diags.append(torch.stack(rows))
        yg = model.g(xs)[0]
        values.append(yg)
        lap, jrows = [], []
        for i in range(2):
            (gr,) = torch.autograd.grad(yg[i], xs, create_graph=True, materialize_grads=True)
            jrows.append(gr[0])
            lap.append(
                sum(
                    torch.autograd.grad(gr[0, j], xs, create_graph=True, materialize_grads=True)[0][
                        0, j
                    ]
                    for j in range(model.n)
                )
            )
        laps.append(torch.stack(lap))
        grads.append(torch.stack(jrows))
    diag = torch.stack(diags)
    third = [] if model.case.name in WRONG_THIRD else tensors
    return {
        "jacobian_diagonal": _expected(diag, tensors, 2),
        "divergence": _expected(diag.sum(-1), tensors, 3),
        "laplacian": _expected(torch.stack(laps), third, 5),
        "value": _expected(torch.stack(values), third, 6),
        "gradient": _expected(torch.stack(grads), third, 7),
    }


def _sized_calls(model: SizedModel) -> Iterator[tuple[str, str, str, Callable[[], object]]]:
    f, g, x = model.f, model.g, model.x
    for method in ("auto", "structured"):
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
    for method in ("auto", "taylor"):
        yield "laplacian", method, "laplacian", lambda m=method: torchdiv.laplacian(g, x, method=m)
        yield (
            "value_grad_laplacian",
            method,
            "vgl",
            lambda m=method: torchdiv.value_grad_laplacian(g, x, method=m),
        )


def check_sized(
    case: Case, variant: str, n: int = 16, batch: int = 64
) -> tuple[list[str], list[str], list[str]]:
    """(faults, refusals, routes) of (B) for one case: each call's engine in ``routes``
    (``"auto"`` to the generic engines marked ``generic``)."""
    model = SizedModel(case, variant, n, batch)
    tensors = [*model.params, model.x]
    refs = _sample_loop(model)
    faults: list[str] = []
    refusals: list[str] = []
    routes: list[str] = []
    for operator, method, key, thunk in _sized_calls(model):
        where = f"{case.label} {variant} n={model.n} B={batch} {operator}({method})"
        route = Route()
        try:
            with route.watching():
                got = thunk()
        except Exception as exc:
            msg = f"{type(exc).__name__}: {str(exc)[:300]}"
            (refusals if str(exc).startswith(operator) else faults).append(f"{where}: {msg}")
            continue
        if method == "auto":
            fast = route.taylor if key in ("laplacian", "vgl") else route.structured
            routes.append(f"{where}: {'fast' if fast else 'generic'}")
        if key == "vgl":
            parts = [
                (got.value, refs["value"]),  # type: ignore[attr-defined]
                (got.gradient, refs["gradient"]),  # type: ignore[attr-defined]
                (got.laplacian, refs["laplacian"]),  # type: ignore[attr-defined]
            ]
        else:
            parts = [(got, refs[key])]
        for k, (a, e) in enumerate(parts):
            for bad in _compare(a, e, tensors):
                faults.append(f"{where}{'' if len(parts) == 1 else f' part {k}'}: {bad}")
    return faults, refusals, routes


def _elementwise(case: Case) -> bool:
    with torch.no_grad():
        return case.apply(case.center[None]).numel() == case.shape.numel()


def run_sized(
    ops: list[str] | None, n: int = 16, batch: int = 64, verbose: bool = True
) -> list[str]:
    """(B) for one kept case of each of ``ops`` (all where ``None``), both variants."""
    found = []
    for case in cases(ops, 1):
        for variant in ("tiled", "padded"):
            if variant == "tiled" and not _elementwise(case):
                continue
            start = time.perf_counter()
            if hasattr(signal, "alarm"):
                signal.alarm(120)
            try:
                faults, refusals, routes = check_sized(case, variant, n, batch)
            except TimeoutError:
                faults, refusals, routes = [], [f"{case.label} {variant}: slow, skipped"], []
            except Exception:
                faults = [f"{case.label} {variant}: harness {traceback.format_exc()[-400:]}"]
                refusals, routes = [], []
            finally:
                if hasattr(signal, "alarm"):
                    signal.alarm(0)
            found += faults
            if verbose:
                took = time.perf_counter() - start
                print(f"## {case.label} {variant} {took:.2f}s faults={len(faults)}", flush=True)
                for line in faults:
                    print("FAULT", line, flush=True)
                for line in refusals:
                    print("REFUSED", line, flush=True)
                for line in routes:
                    print("ROUTE", line, flush=True)
    return found


# --- the faults found (each fails without its fix; no OpInfo needed) -----------------------


def _phase_net() -> tuple[Callable[[torch.Tensor], torch.Tensor], list[torch.Tensor]]:
    """``g(x) = L(view_as_real(sgn(z))) + 0.1 tanh(...)``, ``z = complex(x W1ᵀ, x W2ᵀ)``: a
    plane wave's phase ``z / |z|`` by ``torch.sgn``, two outputs, parameters ``W1, W2, V``."""
    g = torch.Generator().manual_seed(0)
    W1, W2 = (torch.randn(6, 6, generator=g, dtype=f64).requires_grad_() for _ in range(2))
    V = torch.randn(2, 12, generator=g, dtype=f64).requires_grad_()

    def f(x: torch.Tensor) -> torch.Tensor:
        phase = torch.sgn(torch.complex(x @ W1.t(), x @ W2.t()))
        lin = torch.view_as_real(phase).reshape(len(x), 12) @ V.t()
        return lin + 0.1 * torch.tanh(lin)

    return f, [W1, W2, V]


@pytest.mark.parametrize(
    ("operator", "method"),
    [
        ("laplacian", "auto"),
        ("laplacian", "forward-over-reverse"),
        ("laplacian", "hessian"),
        ("value_grad_laplacian", "auto"),
    ],
)
def test_complex_sgn_laplacian_parameter_gradients(operator: str, method: str) -> None:
    """``torch.sgn`` of a complex tensor: PyTorch's forward-mode derivative of its backward
    (``sgn_backward``'s ``masked_fill_``) writes in place into a tensor its own graph saved,
    so the gradient of every forward-over-reverse Laplacian (``"auto"`` included: complex ops
    have no Taylor rule) raised PyTorch's bare "modified by an inplace operation" at the
    caller's backward pass (pure PyTorch: ``grad`` of ``jvp(grad(f))`` raises it too). Now
    ``z / |z|`` (0 at 0, as ``sgn``) under ``SafeDerivatives`` from the third order through
    forward mode. Reference: float64 loop of ``autograd.grad``, grad of grad of grad; 1e-9
    (float64, a few hundred flops)."""
    f, params = _phase_net()
    # 6 inputs x 2 outputs: "auto" runs forward over reverse (the loop of backward passes at
    # most LOOP_FALLBACK = 10 inputs times outputs where an op has no Taylor rule)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=f64)
    xr = x.clone().requires_grad_()
    rows = _jacobian_rows(f(xr), xr)
    expected = _hessians(rows, xr).diagonal(dim1=2, dim2=3).sum(-1)
    got = getattr(torchdiv, operator)(f, x, method=method)
    got = got.laplacian if operator == "value_grad_laplacian" else got
    torch.testing.assert_close(got, expected.detach(), rtol=1e-9, atol=1e-9)
    w = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2), dtype=f64)
    want = torch.autograd.grad((expected * w).sum(), params)
    have = torch.autograd.grad((got * w).sum(), params)
    for a, e in zip(have, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    ("operator", "method"),
    [
        ("divergence", "reverse"),
        ("jacobian", "reverse"),
        ("laplacian", "forward-over-reverse"),
        ("value_grad_laplacian", "forward-over-reverse"),
    ],
)
def test_complex_svd_under_vmap_is_refused_by_name(operator: str, method: str) -> None:
    """PyTorch's backward of a complex ``svd`` checks the singular vectors' phase with
    ``torch.allclose``, which ``vmap`` cannot batch: the methods that batch their products
    with ``vmap`` raised PyTorch's bare "vmap over torch.allclose isn't supported yet"
    (outside ``f``, OpInfo's ``svd``/``svd_lowrank``). Now it starts with the operator, names
    the method and the way out, ``"auto"``, which is right (float64 loop of
    ``autograd.grad``; 1e-9: float64, a few hundred flops)."""
    g = torch.Generator().manual_seed(0)
    W1, W2 = (torch.randn(4, 4, generator=g, dtype=f64) for _ in range(2))

    def f(x: torch.Tensor) -> torch.Tensor:
        a = torch.complex(x @ W1.t(), x @ W2.t()).reshape(len(x), 2, 2)
        u = torch.linalg.svd(a)[0]  # |U|: independent of the vectors' phase
        return u.abs().reshape(len(x), 4)

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=f64)
    pattern = rf"(?s)^{operator}: .*torch.allclose.*method='{method}'.*method='auto'"
    _refused_then_right_by_auto(operator, method, pattern, f, x)


@pytest.mark.parametrize(
    ("operator", "method"), [("divergence", "reverse"), ("laplacian", "forward-over-reverse")]
)
def test_complex_conjugate_view_under_vmap_is_refused_by_name(operator: str, method: str) -> None:
    """Complex ``vecdot`` (OpInfo's ``linalg.vecdot``, ``fft.hfft``): its backward conjugates
    as a ``_neg_view``, which ``vmap`` cannot batch: PyTorch's bare "Batching rule not
    implemented for aten::_neg_view" from the methods that batch with ``vmap``. Now named,
    with the way out, ``"auto"``, which is right (float64 loop of ``autograd.grad``; 1e-9)."""
    g = torch.Generator().manual_seed(0)
    W1, W2 = (torch.randn(4, 4, generator=g, dtype=f64) for _ in range(2))
    w = torch.randn(4, 4, generator=g, dtype=C128)

    def f(x: torch.Tensor) -> torch.Tensor:
        z = torch.complex(x @ W1.t(), x @ W2.t())
        return torch.view_as_real(torch.linalg.vecdot(z[:, None, :], w)).reshape(len(x), 8)[:, :4]

    x = torch.randn(3, 4, generator=g, dtype=f64)
    pattern = rf"(?s)^{operator}: .*_neg_view.*method='{method}'.*method='auto'"
    _refused_then_right_by_auto(operator, method, pattern, f, x)


# --- tests -----------------------------------------------------------------------------------

COMPLEX_FAST = ["mul", "exp", "abs", "sum"]


def test_complex_fixed_sample() -> None:
    """(A) on one kept complex sample of each op of ``COMPLEX_FAST``: no fault."""
    found = []
    for case in complex_cases(COMPLEX_FAST, 1):
        found += check(case, "complex", ComplexModel)[0]
    assert not found, "\n".join(found)


SIZED_FAST = ["tanh", "mul"]


def test_sized_fixed_sample_routes_to_the_fast_engines() -> None:
    """(B) on ``SIZED_FAST`` (n = 16, batch 32: 16 x 512 elements, above ``2**12``): no
    fault, and ``"auto"`` ran the structured and Taylor engines (``Route``) on the tiled
    elementwise variant."""
    found, generic = [], []
    for case in cases(SIZED_FAST, 1):
        faults, _, routes = check_sized(case, "tiled", 16, 32)
        found += faults
        generic += [r for r in routes if r.endswith("generic")]
    assert not found, "\n".join(found)
    assert not generic, "\n".join(generic)


COMPLEX_SLOW = [
    "add", "div", "pow", "log", "sqrt", "sin", "tanh", "sigmoid", "reciprocal", "angle",
    "real", "imag", "conj", "prod", "cumsum", "matmul", "linalg.det", "linalg.slogdet",
    "linalg.inv", "linalg.solve", "fft.fft", "fft.ifft", "fft.fftn", "polar", "square",
]  # fmt: skip


@pytest.mark.slow
def test_complex_larger_sample() -> None:
    """(A) on ``COMPLEX_SLOW``: no fault."""
    found = []
    for case in complex_cases(COMPLEX_SLOW, 1):
        found += check(case, "complex", ComplexModel)[0]
    assert not found, "\n".join(found)


SIZED_SLOW = ["sigmoid", "exp", "sin", "softmax", "cumsum", "add", "log1p", "square", "erf"]


@pytest.mark.slow
def test_sized_larger_sample() -> None:
    """(B) on ``SIZED_SLOW``, both variants, n = 16 and 32: no fault."""
    found = []
    for n in (16, 32):
        for case in cases(SIZED_SLOW, 1):
            for variant in ("tiled", "padded"):
                if variant == "tiled" and not _elementwise(case):
                    continue
                found += check_sized(case, variant, n)[0]
    assert not found, "\n".join(found)


if __name__ == "__main__":
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _timeout)
    which, names = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("complex", [])
    if which == "complex":
        run_complex(names or None)
    else:
        run_sized(names or None)


def _refused_then_right_by_auto(
    operator: str,
    method: str,
    pattern: str,
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
) -> None:
    """``operator``'s ``method`` refuses ``f`` with ``pattern``; the divergence by ``"auto"``,
    the way out named, equals a float64 loop of ``autograd.grad`` (1e-9)."""
    with pytest.raises(RuntimeError, match=pattern):
        getattr(torchdiv, operator)(f, x, method=method)
    xr = x.clone().requires_grad_()
    jac = _jacobian_rows(f(xr), xr)
    expected = jac.diagonal(dim1=1, dim2=2).sum(-1).detach()
    torch.testing.assert_close(torchdiv.divergence(f, x), expected, rtol=1e-9, atol=1e-9)
