"""OpInfo's ops inside ``f`` for the public operators and paths ``test_opinfo33.py`` did not
reach: ``biharmonic``, ``weighted_laplacian`` (a shared and a per-sample matrix, as
``diffusion`` and as ``sigma``, and a diffusion that requires grad), ``graph_divergence``,
``graph_jacobian``, ``graph_laplacian`` (the caller computes ``y = f(x)`` first),
``estimate_trace`` (products by the caller's own backward passes), ``jacobian`` and
``divergence`` with ``batch_dims=2`` and a ``(k, d1, d2)`` event (``f`` reshapes, so the op
sees its sample's shape), ``chunk_size`` values that do not divide the work, and
``flows.AugmentedDynamics`` (``d/dt [z, Delta] = [v, -div v]``) with the op inside the
velocity field.

The samples, ``f`` and ``g`` are ``test_opinfo33.py``'s (``cases``, ``Model``: its docstring).
Reference: float64 per-sample loops of ``torch.autograd.grad`` with ``create_graph``: the
Jacobian's rows, the Hessians of ``g`` (``tr(A H)`` for the weighted Laplacian), and for the
biharmonic the Laplacian of the Laplacian, grad of grad of grad of grad (its gradients one
order more); values and the gradients of a seeded weighted sum in every trainable tensor and
``x``. Where PyTorch's fourth derivative is in doubt, ``fd_biharmonic`` arbitrates by central
differences in float64 of the third derivative ``∂_j Δg`` (``__main__``, by hand).
``estimate_trace``'s references are closed forms: Hutchinson ``mean vᵀ J v`` with the same
probes, Hutch++ with ``2n`` probes (a sketch of ``n`` spans the event: the exact trace);
XTrace, exact only below half its probes, on the same estimator fed the reference Jacobian.
Errors: a refusal must start with the operator's name; anything else is a fault.

Tolerance (float64): ``test_opinfo33.TOL`` (``1e-7`` relative to ``1 + max |reference|``): a
few thousand flops from the same inputs, far below a wrong formula's O(1).

Run all by hand: ``PYTHONPATH=src python tests/exact/test_opinfohi34.py [OP ...]``
(``NOTES_opinfohi34.md``).
"""

from __future__ import annotations

import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator

import pytest
import torch

import torchdiv
from tests.exact.test_opinfo33 import (
    TOL,
    WRONG_THIRD,
    Case,
    Expected,
    Model,
    _compare,
    _expected,
    _hessians,
    _jacobian_rows,
    cases,
    f64,
    printed,
)

# the biharmonic's reference costs about 2 (n + 1) backward passes per sample and output, each
# through a graph of fourth order, and one more order for its gradients: tiny events only
BIHARMONIC_MAX_N = 8
# every case cropped to that many elements (test_opinfo33 covered its 24)
MAX_NUMEL = 8
LAPLACIAN_METHODS = ("auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad")
SWEEP_METHODS = ("auto", "taylor", "forward-over-reverse")


def _odd_chunk(n: int) -> int | None:
    """A chunk size that does not divide ``n`` (the last chunk short), if any."""
    return next((c for c in range(2, n) if n % c), None)


def _event3(n: int) -> tuple[int, int, int]:
    """``(k, d1, d2)`` with ``k d1 d2 = n``, as many factors above 1 as ``n`` has."""
    factors = [p for p in range(2, n + 1) for _ in range(_multiplicity(n, p))]
    dims = [1, 1, 1]
    for p in sorted(factors, reverse=True):
        dims[dims.index(min(dims))] *= p
    return dims[0], dims[1], dims[2]


def _multiplicity(n: int, p: int) -> int:
    if any(p % q == 0 for q in range(2, p)):
        return 0
    k = 0
    while n % p == 0:
        n, k = n // p, k + 1
    return k


def laplacian_rows(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(B, m)``: every sample's Laplacian of every output of ``y`` (``(B, m)``, on ``x``'s
    graph), one ``autograd.grad`` per sample and output, and one per event element of the
    row found, all with ``create_graph`` (differentiable again)."""
    B, m = y.shape
    out = []
    for s in range(B):
        for i in range(m):
            (r,) = torch.autograd.grad(
                y[s, i], x, create_graph=True, retain_graph=True, materialize_grads=True
            )
            total = torch.zeros((), dtype=f64)
            for j in range(x.shape[1]):
                if not r.requires_grad:
                    break
                (h,) = torch.autograd.grad(
                    r[s, j], x, create_graph=True, retain_graph=True, materialize_grads=True
                )
                total = total + h[s, j]
            out.append(total)
    return torch.stack(out).reshape(B, m)


def fd_biharmonic(
    g: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, third: bool = True
) -> torch.Tensor:
    """``Δ²g`` by central differences in float64, the arbiter where PyTorch's own fourth
    derivative is in doubt: of the third derivatives ``∂_j Δg`` (``laplacian_rows`` and one
    more ``autograd.grad``; step ``1e-4``: truncation ``h²`` ~ 1e-8 relative, round-off
    ``eps/h`` ~ 1e-12), or where the third is in doubt too (``WRONG_THIRD``), second
    differences of the Laplacian (step ``1e-3``: truncation ~ 1e-6, round-off ``eps/h²`` ~
    2e-10)."""
    x = x.detach()

    def lap(z: torch.Tensor) -> torch.Tensor:
        z = z.clone().requires_grad_()
        return laplacian_rows(g(z), z)

    def third_(z: torch.Tensor, j: int) -> torch.Tensor:
        z = z.clone().requires_grad_()
        rows = laplacian_rows(g(z), z)
        cols = []
        for i in range(rows.shape[1]):
            (r,) = torch.autograd.grad(rows[:, i].sum(), z, retain_graph=True, allow_unused=True)
            cols.append(torch.zeros(len(z), dtype=f64) if r is None else r[:, j])
        return torch.stack(cols, -1)

    h = 1e-4 if third else 1e-3
    middle = None if third else lap(x).detach()
    total = torch.zeros(())
    for j in range(x.shape[1]):
        e = torch.zeros_like(x)
        e[:, j] = h
        if third:
            total = total + (third_(x + e, j) - third_(x - e, j)).detach() / (2 * h)
        else:
            assert middle is not None
            total = total + (lap(x + e) - 2 * middle + lap(x - e)).detach() / h**2
    return total


Call = tuple[str, str, Callable[[], torch.Tensor], str]  # (operator, method, thunk, ref key)


class Sweep:
    """One case and variant's references (lazily, by key) and calls."""

    def __init__(self, case: Case, variant: str, fast: bool = False) -> None:
        # fast: each path once (the odd chunk where there is one; the weighted Laplacian's
        # matrices each with one method, in turn), for the fixed sample's time budget
        self.fast = fast
        self.model = model = Model(case, variant)
        self.case, self.n, self.x = case, model.n, model.x
        self.chunk = _odd_chunk(model.n)
        g = torch.Generator().manual_seed(21)
        n = model.n
        # weighted Laplacian's matrices: a symmetric indefinite shared A, a per-sample one
        # (positive definite), factors S with n + 1 and n - 1 columns
        a = torch.randn(n, n, generator=g, dtype=f64)
        self.shared = (a + a.T) / 2
        s = torch.randn(2, n, n, generator=g, dtype=f64)
        self.per_sample = s @ s.mT / n + torch.eye(n, dtype=f64)
        self.sigma_shared = torch.randn(n, n + 1, generator=g, dtype=f64)
        self.sigma_per_sample = torch.randn(2, n, max(n - 1, 1), generator=g, dtype=f64)
        self.learned = (0.5 * torch.randn(n, n, generator=g, dtype=f64)).requires_grad_()
        self.probes = torch.randn(4, 2, n, generator=g, dtype=f64)
        # (the learned diffusion among them: its gradients compared too, zero elsewhere)
        self.tensors = [*model.params, self.learned, model.x]
        self._refs: dict[str, Expected] = {}

    # --- references ---------------------------------------------------------------------

    def jac(self) -> torch.Tensor:
        if "jac" not in self._refs:
            y = self.model.f(self.x)
            self._refs["jac"] = Expected(_jacobian_rows(y, self.x), None, 0)
        return self._refs["jac"].value

    def hess(self) -> torch.Tensor:
        if "hess" not in self._refs:
            jg = _jacobian_rows(self.model.g(self.x), self.x)
            self._refs["hess"] = Expected(_hessians(jg, self.x), None, 0)
        return self._refs["hess"].value

    def ref(self, key: str) -> Expected:
        if key in self._refs:
            return self._refs[key]
        tensors = self.tensors
        third = [] if self.case.name in WRONG_THIRD else tensors
        n = self.n
        if key == "divergence":
            value, seed = self.jac().diagonal(dim1=1, dim2=2).sum(-1), 3
        elif key == "jacobian":
            value, seed = self.jac(), 1
        elif key == "jacobian_diagonal":
            value, seed = self.jac().diagonal(dim1=1, dim2=2), 2
        elif key == "hutchinson":
            value = torch.einsum("rbi,bij,rbj->rb", self.probes, self.jac(), self.probes)
            value, seed = value.mean(0), 4
        elif key == "laplacian":
            value, seed, tensors = self.hess().diagonal(dim1=2, dim2=3).sum(-1), 5, third
        elif key.startswith("weighted:"):
            a = self.matrix(key.split(":", 1)[1])
            value = torch.einsum("bij,bmji->bm", a.expand(2, n, n), self.hess())
            seed, tensors = 6, third
        elif key == "biharmonic":
            if self.case.name in WRONG_THIRD:  # its fourth too: fd_biharmonic(third=False)
                raise ValueError("PyTorch's third derivative is wrong (WRONG_THIRD)")
            x = self.x
            value = laplacian_rows(laplacian_rows(self.model.g(x), x), x)
            seed, tensors = 7, third
        elif key == "trace":  # Hutch++ with a spanning sketch: the exact trace
            value, seed = self.jac().diagonal(dim1=1, dim2=2).sum(-1), 8
        elif key == "solve":
            value, seed = self.solved_reference(), 10
        elif key == "xtrace":
            jac = self.jac()
            value = torchdiv.estimate_trace(
                lambda v: torch.einsum("bji,rbj->rbi", jac, v),
                self.x,
                method="xtrace",
                probes=self.sketch("xtrace"),
            ).value
            seed = 9
        else:
            raise KeyError(key)
        self._refs[key] = _expected(value, tensors, seed)
        return self._refs[key]

    def matrix(self, which: str) -> torch.Tensor:
        """``A`` of a weighted-Laplacian call (``sigma``'s ``S Sᵀ``)."""
        return {
            "diffusion shared": self.shared,
            "diffusion per sample": self.per_sample,
            "sigma shared": self.sigma_shared @ self.sigma_shared.T,
            "sigma per sample": self.sigma_per_sample @ self.sigma_per_sample.mT,
            "diffusion learned": self.learned,
        }[which]

    def sketch(self, method: str) -> torch.Tensor:
        # Hutch++: 2 random vectors per 3 products, half of them the sketch (n: spanning);
        # XTrace: n, the most it takes
        r = 2 * self.n if method == "hutch++" else self.n
        g = torch.Generator().manual_seed(11)
        return torch.randn(r, 2, self.n, generator=g, dtype=f64)

    # --- calls --------------------------------------------------------------------------

    def calls(self, operators: set[str] | None = None) -> Iterator[Call]:
        f, g, x, chunk = self.model.f, self.model.g, self.x, self.chunk
        chunks = [None] if chunk is None else [chunk] if self.fast else [None, chunk]

        def want(name: str) -> bool:
            return operators is None or name in operators

        if want("biharmonic") and self.n <= BIHARMONIC_MAX_N:
            for c in chunks:
                for m in SWEEP_METHODS:
                    yield (
                        "biharmonic",
                        f"{m} chunk={c}",
                        lambda m=m, c=c: torchdiv.biharmonic(g, x, method=m, chunk_size=c),
                        "biharmonic",
                    )
        if want("weighted_laplacian"):
            options: list[tuple[str, dict[str, torch.Tensor]]] = [
                ("diffusion shared", {"diffusion": self.shared}),
                ("diffusion per sample", {"diffusion": self.per_sample}),
                ("sigma shared", {"sigma": self.sigma_shared}),
                ("sigma per sample", {"sigma": self.sigma_per_sample}),
                ("diffusion learned", {"diffusion": self.learned}),
            ]
            for k, (which, kw) in enumerate(options):
                rotated = [LAPLACIAN_METHODS[k % len(LAPLACIAN_METHODS)]]
                for m in rotated if self.fast else LAPLACIAN_METHODS:
                    for c in chunks if which != "diffusion shared" else [None]:
                        yield (
                            "weighted_laplacian",
                            f"{which} {m} chunk={c}",
                            lambda m=m, c=c, kw=kw: torchdiv.weighted_laplacian(
                                g, x, method=m, chunk_size=c, **kw
                            ),
                            f"weighted:{which}",
                        )
        if want("graph"):
            for c in chunks:
                for m in ("auto", "reverse"):
                    yield (
                        "graph_divergence",
                        f"{m} chunk={c}",
                        lambda m=m, c=c: torchdiv.graph_divergence(
                            f(x), x, method=m, create_graph=True, chunk_size=c
                        ),
                        "divergence",
                    )
                yield (
                    "graph_jacobian",
                    f"chunk={c}",
                    lambda c=c: torchdiv.graph_jacobian(f(x), x, create_graph=True, chunk_size=c),
                    "jacobian",
                )
                yield (
                    "graph_laplacian",
                    f"chunk={c}",
                    lambda c=c: torchdiv.graph_laplacian(g(x), x, create_graph=True, chunk_size=c),
                    "laplacian",
                )
            yield (
                "graph_divergence",
                "hutchinson",
                lambda: torchdiv.graph_divergence(
                    f(x), x, method="hutchinson", probes=self.probes, create_graph=True
                ),
                "hutchinson",
            )
        if want("estimate_trace"):
            for m, key in (
                ("hutchinson", "hutchinson"),
                ("hutch++", "trace"),
                ("xtrace", "xtrace"),
            ):
                probes = self.probes if m == "hutchinson" else self.sketch(m)
                for c in chunks:
                    yield (
                        "estimate_trace",
                        f"{m} chunk={c}",
                        lambda m=m, c=c, p=probes: self.trace_by_vjp(m, p, c),
                        key,
                    )
        if want("chunked") and chunk is not None:
            for m in ("auto", "structured", "forward", "reverse"):
                yield (
                    "divergence",
                    f"{m} chunk={chunk}",
                    lambda m=m: torchdiv.divergence(f, x, method=m, chunk_size=chunk),
                    "divergence",
                )
                yield (
                    "jacobian_diagonal",
                    f"{m} chunk={chunk}",
                    lambda m=m: torchdiv.jacobian_diagonal(f, x, method=m, chunk_size=chunk),
                    "jacobian_diagonal",
                )
            for m in ("auto", "forward", "reverse"):
                yield (
                    "jacobian",
                    f"{m} chunk={chunk}",
                    lambda m=m: torchdiv.jacobian(f, x, method=m, chunk_size=chunk),
                    "jacobian",
                )
            for m in LAPLACIAN_METHODS:
                yield (
                    "laplacian",
                    f"{m} chunk={chunk}",
                    lambda m=m: torchdiv.laplacian(g, x, method=m, chunk_size=chunk),
                    "laplacian",
                )
            for m in SWEEP_METHODS:
                yield (
                    "value_grad_laplacian",
                    f"{m} chunk={chunk}",
                    lambda m=m: (
                        torchdiv.value_grad_laplacian(g, x, method=m, chunk_size=chunk).laplacian
                    ),
                    "laplacian",
                )
        if want("flows"):
            for m in ("auto", "structured", "forward", "reverse"):
                for c in chunks:
                    yield (
                        "AugmentedDynamics",
                        f"{m} chunk={c}",
                        lambda m=m, c=c: self.dynamics(method=m, chunk_size=c),
                        "divergence",
                    )
            yield (
                "AugmentedDynamics",
                "hutchinson",
                lambda: self.dynamics(method="hutchinson", probes=self.probes),
                "hutchinson",
            )
            for m in ("auto", "forward", "reverse"):
                yield ("AugmentedDynamics", f"{m} Euler solve", lambda m=m: self.solved(m), "solve")
            yield (  # a sketch of n spans the event: the exact trace, as one estimate's
                "AugmentedDynamics",
                "hutch++",
                lambda: self.dynamics(method="hutch++", probes=self.sketch("hutch++")),
                "trace",
            )

    def solved(self, method: str) -> torch.Tensor:
        """``Delta`` at ``t0 = 0`` of ``torchdiffeq``'s Euler solve (two steps from ``t1 =
        1``) of ``flows.AugmentedDynamics`` around ``v(t, z) = (1 + t) f(z) / 1.5``."""
        from torchdiffeq import odeint

        from torchdiv.flows import AugmentedDynamics

        f, x = self.model.f, self.x
        dyn = AugmentedDynamics(lambda t, z: (1 + t) * f(z) / 1.5, x, method=method)
        times = torch.tensor([1.0, 0.5, 0.0], dtype=f64)
        _, delta = odeint(dyn, dyn.initial_state(x), times, method="euler")
        return delta[-1].mean(0)

    def solved_reference(self) -> torch.Tensor:
        """The same Euler steps by hand, ``-div v`` by float64 loops of ``autograd.grad`` at
        each step's ``z`` (on ``x``'s graph: differentiable)."""
        f, z = self.model.f, self.x
        delta = torch.zeros(2, dtype=f64)
        for t in (1.0, 0.5):
            y = (1 + t) * f(z) / 1.5
            delta = delta + (-0.5) * (-self._div_at(z, t))
            z = z + (-0.5) * y
        return delta

    def _div_at(self, z: torch.Tensor, t: float) -> torch.Tensor:
        """``div v(t, ·)`` at ``z`` (on ``z``'s graph), by a leaf copy's Jacobian rows with
        ``create_graph`` and the chain rule back to ``z``: per sample,
        ``Σ_i ∂v_i/∂w_i`` at ``w = z``."""
        f = self.model.f
        rows = []
        for s in range(len(z)):
            for i in range(self.n):
                e = torch.zeros_like(z)
                e[s, i] = 1.0
                # directional derivative along e_i of sample s: jvp by double backward
                y = (1 + t) * f(z) / 1.5
                u = torch.zeros_like(y, requires_grad=True)
                (vjp,) = torch.autograd.grad(y, z, u, create_graph=True)
                (jvp,) = torch.autograd.grad(vjp, u, e, create_graph=True)
                rows.append(jvp[s, i])
        return torch.stack(rows).reshape(len(z), self.n).sum(-1)

    def trace_by_vjp(self, method: str, probes: torch.Tensor, chunk: int | None) -> torch.Tensor:
        """``estimate_trace`` with products ``Jᵀ v`` by the caller's backward passes
        through ``f`` (one per probe; ``create_graph``: differentiable)."""
        x, f = self.x, self.model.f
        y = f(x)

        def matmat(v: torch.Tensor) -> torch.Tensor:
            rows = [
                torch.autograd.grad(
                    y, x, vk, create_graph=True, retain_graph=True, materialize_grads=True
                )[0]
                for vk in v
            ]
            return torch.stack(rows)

        est = torchdiv.estimate_trace(matmat, x, method=method, probes=probes, chunk_size=chunk)
        return est.value

    def dynamics(self, **options: object) -> torch.Tensor:
        """``-Delta'`` of ``flows.AugmentedDynamics`` at ``t = 0.5`` around ``v(t, z) = (1 +
        t) f(z) / 1.5`` (``= f`` at ``t = 0.5``: the reference's divergence), its velocity
        checked equal to ``f(x)``'s."""
        from torchdiv.flows import AugmentedDynamics

        f, x = self.model.f, self.x
        dyn = AugmentedDynamics(lambda t, z: (1 + t) * f(z) / 1.5, x, **options)  # type: ignore[arg-type]
        v, d = dyn(torch.tensor(0.5, dtype=f64), dyn.initial_state(x))
        err = float((v - f(x)).detach().abs().max())
        if not err <= TOL * (1 + float(v.detach().abs().max())):
            raise AssertionError(f"velocity off by {err:.3e}")
        return -d.mean(0)

    # --- batch_dims=2 with a (k, d1, d2) event ------------------------------------------

    def event_calls(self) -> Iterator[tuple[str, str, Callable[[], torch.Tensor], Expected]]:
        """``jacobian``/``jacobian_diagonal``/``divergence`` of ``F(X)``, ``X: (2, 2, k,
        d1, d2)``, ``F`` reshaping to ``f``'s ``(4, n)`` and back: their references from one
        float64 loop on the flattened batch, gradients in ``X`` and the parameters."""
        model, n = self.model, self.n
        event = _event3(n)
        g = torch.Generator().manual_seed(31)
        base = self.x.detach()[:1].expand(4, n)
        X = (base + 0.01 * torch.randn(4, n, generator=g, dtype=f64)).reshape(2, 2, *event)
        X.requires_grad_()

        def F(z: torch.Tensor) -> torch.Tensor:
            return model.f(z.reshape(-1, n)).reshape(*z.shape[:2], *event)

        flat = X.reshape(4, n)
        jac = _jacobian_rows(model.f(flat), flat)
        tensors = [*model.params, X]
        refs = {
            "jacobian": _expected(jac.reshape(2, 2, *event, *event), tensors, 1),
            "jacobian_diagonal": _expected(
                jac.diagonal(dim1=1, dim2=2).reshape(2, 2, *event), tensors, 2
            ),
            "divergence": _expected(jac.diagonal(dim1=1, dim2=2).sum(-1).reshape(2, 2), tensors, 3),
        }
        self.event_tensors = tensors
        probes = torch.randn(3, 2, 2, *event, generator=g, dtype=f64)
        vjv = torch.einsum("rbi,bij,rbj->rb", probes.reshape(3, 4, n), jac, probes.reshape(3, 4, n))
        refs["hutchinson"] = _expected(vjv.mean(0).reshape(2, 2), tensors, 4)
        chunk = self.chunk
        for c in [None] if chunk is None else [None, chunk]:
            for m in ("auto", "forward", "reverse"):
                yield (
                    "jacobian",
                    f"{m} chunk={c}",
                    lambda m=m, c=c: torchdiv.jacobian(F, X, batch_dims=2, method=m, chunk_size=c),
                    refs["jacobian"],
                )
            for m in ("auto", "structured", "forward", "reverse"):
                for op in ("divergence", "jacobian_diagonal"):
                    yield (
                        op,
                        f"{m} chunk={c}",
                        lambda m=m, c=c, op=op: getattr(torchdiv, op)(
                            F, X, batch_dims=2, method=m, chunk_size=c
                        ),
                        refs[op],
                    )
        yield (
            "divergence",
            "hutchinson",
            lambda: torchdiv.divergence(F, X, batch_dims=2, method="hutchinson", probes=probes),
            refs["hutchinson"],
        )


def check(
    case: Case, variant: str, operators: set[str] | None = None, fast: bool = False
) -> tuple[list[str], list[str]]:
    """Every call's faults (wrong values or gradients, bare errors) and refusals (errors that
    start with the operator's name) for one case and variant."""
    sweep = Sweep(case, variant, fast)
    faults: list[str] = []
    refusals: list[str] = []

    def one(
        where: str,
        operator: str,
        thunk: Callable[[], torch.Tensor],
        get: Callable[[], Expected],
        tensors: list[torch.Tensor],
    ) -> None:
        try:
            exp = get()
        except TimeoutError:
            raise
        except Exception as exc:
            refusals.append(f"{where}: reference raised {type(exc).__name__}: {str(exc)[:120]}")
            return
        if not bool(exp.value.isfinite().all()):
            refusals.append(f"{where}: reference not finite")
            return
        try:
            got = thunk()
        except TimeoutError:  # the case's time budget (run): the whole case skipped as slow
            raise
        except Exception as exc:
            msg = f"{type(exc).__name__}: {str(exc)[:300]}"
            (refusals if str(exc).startswith(operator) else faults).append(f"{where}: {msg}")
            return
        bad = _compare(got, exp, tensors)
        if any("TimeoutError" in b for b in bad):  # (the budget ran out in its backward pass)
            raise TimeoutError(where)
        faults.extend(f"{where}: {b}" for b in bad)

    for operator, method, thunk, key in sweep.calls(operators):
        where = f"{case.label} {variant} {operator}({method})"
        one(where, operator, thunk, lambda key=key: sweep.ref(key), sweep.tensors)
    if operators is None or "batch_dims" in operators:
        try:
            event = list(sweep.event_calls())
        except Exception as exc:
            return faults, [*refusals, f"event reference raised {type(exc).__name__}: {exc}"]
        for operator, method, thunk, exp in event:
            where = f"{case.label} {variant} {operator}(batch_dims=2 {method})"
            one(where, operator, thunk, lambda exp=exp: exp, sweep.event_tensors)
    return faults, refusals


VARIANTS = ("dense", "diag")


def _timeout(signum: int, frame: object) -> None:
    raise TimeoutError("over the time budget: skipped as slow")


def run(
    ops: list[str] | None, per_op: int = 1, budget: int = 120, verbose: bool = True
) -> list[str]:
    """Check every kept case of ``ops`` (all where ``None``), each (case, variant) under an
    alarm of ``budget`` seconds (over it: skipped as slow, said); the faults found."""
    all_faults = []
    for case in cases(ops, per_op, max_numel=MAX_NUMEL):
        for variant in VARIANTS:
            if variant == "diag":
                with torch.no_grad():
                    if case.apply(case.center[None]).numel() != case.shape.numel():
                        continue
            start = time.perf_counter()
            signal.alarm(budget)
            try:
                faults, refusals = check(case, variant)
            except TimeoutError:
                faults, refusals = [], [f"{case.label} {variant}: over {budget} s, skipped as slow"]
            except Exception:
                faults = [f"{case.label} {variant}: harness {traceback.format_exc()[-600:]}"]
                refusals = []
            signal.alarm(0)
            took = time.perf_counter() - start
            all_faults += faults
            if verbose:
                printed(f"{case.label} {variant}", took, faults, refusals)
    return all_faults


# --- where PyTorch's own fourth derivative is wrong --------------------------------------


@pytest.mark.parametrize("method", SWEEP_METHODS)
def test_biharmonic_through_layer_norm_agrees_with_central_differences(method: str) -> None:
    """``torch.native_layer_norm`` (``WRONG_THIRD``): PyTorch's grad of grad of grad of grad
    reference is off by 10-40% here (-7.50 and -7.62 against -8.23 and -5.36: its third
    derivative is wrong, pytorch#175754), torchdiv's Taylor in Taylor and nested forward over
    reverse (through its replacement) are right: checked against second central differences
    of the Laplacian in float64 (``fd_biharmonic(third=False)``; truncation ~1e-6 relative
    at step 1e-3, so 1e-5; PyTorch's fourth derivative is off by 1e-1 here)."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(6, 6, generator=g, dtype=f64) / 6**0.5
    w, b = (1 + 0.3 * torch.randn(2, 3, generator=g, dtype=f64) for _ in range(2))
    v = torch.randn(6, 1, generator=g, dtype=f64)

    def f(x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ W.t()).reshape(-1, 2, 3)
        return torch.native_layer_norm(h, (2, 3), w, b, 0.5)[0].reshape(-1, 6) @ v

    x = torch.randn(2, 6, generator=g, dtype=f64)
    expected = fd_biharmonic(f, x, third=False)
    got = torchdiv.biharmonic(f, x, method=method)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("p", [1, 3])
@pytest.mark.parametrize("method", ["auto", "forward-over-reverse"])
def test_biharmonic_through_mvlgamma_of_a_parameter(method: str, p: int) -> None:
    """``torch.mvlgamma`` (no Taylor rule: ``"auto"`` runs forward over reverse) of ``a x``
    with ``a`` requiring grad: PyTorch's ``mvlgamma_backward`` writes in place into a tensor
    whose tangent is an immutable zero under nested forward mode, and the biharmonic raised
    PyTorch's bare "ZeroTensors are immutable" (opinfohi34; OpInfo ``mvlgamma``). Now the
    composite ``Σ lgamma(a x - j/2)``. Reference: grad^4 loops (lgamma's derivatives by
    backward passes: right), its gradient in ``a`` grad^5; 1e-8 (float64, fourth order)."""
    g = torch.Generator().manual_seed(0)
    a = (1 + 0.1 * torch.randn(3, generator=g, dtype=f64)).requires_grad_()
    v = torch.randn(3, 2, generator=g, dtype=f64)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.mvlgamma(a * x, p) @ v

    x = 2 + torch.rand(2, 3, generator=g, dtype=f64)
    got = torchdiv.biharmonic(f, x, method=method)
    xr = x.clone().requires_grad_()
    expected = laplacian_rows(laplacian_rows(f(xr), xr), xr)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-8, atol=1e-8)
    w = torch.randn(expected.shape, generator=g, dtype=f64)
    (want,) = torch.autograd.grad((expected * w).sum(), a)
    (have,) = torch.autograd.grad((got * w).sum(), a)
    torch.testing.assert_close(have, want, rtol=1e-8, atol=1e-8)


# --- OpInfo's ops ------------------------------------------------------------------------

ALL = {
    "biharmonic",
    "weighted_laplacian",
    "graph",
    "estimate_trace",
    "chunked",
    "flows",
    "batch_dims",
}
# a fixed sample: (OpInfo name, variant, the operators checked, the event's size cap; the
# biharmonic's fifth-order gradients on a 3-element event)
FAST = [
    ("cos", "diag", {"biharmonic"}, 3),
    ("tanh", "diag", ALL - {"biharmonic"}, MAX_NUMEL),
    ("softmax", "dense", ALL - {"biharmonic"}, MAX_NUMEL),
]


def _faults(
    names: list[str],
    variants: tuple[str, ...],
    operators: set[str] | None,
    fast: bool = False,
    max_numel: int = MAX_NUMEL,
) -> list[str]:
    found = []
    for case in cases(names, 1, max_numel=max_numel):
        for variant in variants:
            if variant == "diag":
                with torch.no_grad():
                    if case.apply(case.center[None]).numel() != case.shape.numel():
                        continue
            found += check(case, variant, operators, fast)[0]
    return found


@pytest.mark.parametrize(("name", "variant", "operators", "max_numel"), FAST)
def test_opinfo_fixed_sample(name: str, variant: str, operators: set[str], max_numel: int) -> None:
    """One kept sample of each op of ``FAST`` (the module docstring: every operator, path and
    method against float64 loops of ``autograd.grad``): no fault."""
    found = _faults([name], (variant,), operators, fast=True, max_numel=max_numel)
    assert not found, "\n".join(found)


# a larger sample (``__main__``: all of op_db, every method at both chunk sizes), each path
# once as in the fixed sample: about 1-2 min on one core
SLOW = ["cumprod", "linalg.det", "logsumexp", "mvlgamma.mvlgamma_p_1", "prod", "sinc"]


@pytest.mark.slow
def test_opinfo_larger_sample() -> None:
    """``SLOW``'s ops, one kept sample each, both variants, every operator: no fault."""
    found = _faults(SLOW, VARIANTS, None, fast=True)
    assert not found, "\n".join(found)


if __name__ == "__main__":
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _timeout)
    run(sys.argv[1:] or None)
