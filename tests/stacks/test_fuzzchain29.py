"""A seeded differential fuzzer of the engine-free chain route (``_exact.chain``: ``chain``,
``_sliced``, ``trace``, ``unit_products``; ``_laplacian.chain``, the Laplacian's forward pass
on a call's saved tensors), which replaces autograd's engine by hand-applied ATen backward
formulas wherever ``f``'s graph is a chain: every gating condition is a chance to be silently
wrong.

A program is a chain or a near-chain on the last axis of ``x`` (``(N, D)``; ``(T, D)`` with
``batch_dims=0``; ``(N, T, D)`` with ``batch_dims=2``): linear steps (``nn.Linear`` with or
without bias, ``F.linear``, ``torch.addmm`` with ``alpha``/``beta``, ``h @ W.t()``), the
activations the chain lists (tanh, sigmoid, ReLU, both GELUs, ELU/SELU/CELU with odd alphas,
Softplus with ``beta``/``threshold``, LeakyReLU) and some it does not (SiLU, Mish, Hardtanh),
a time input concatenated first or last along the last axis (zuko's ``t.expand``, FFJORD's
``ConcatLinear`` at a hidden layer, torchdyn's ``DepthCat``, a learned embedding expanded, a
closed-over tensor that requires grad, an integer column), ``x.expand`` to its own shape, a
layer used twice; and the near-chains that must leave the route to the engine (a residual, a
weight used twice in one layer, ``x`` concatenated twice, a bias computed from ``x``, a
closed-over factor that requires grad, a concatenation along another axis, a slice or view of
``x``, an expand of a hidden tensor, a time embedding computed by a layer). It prints as code.

Each program is called over five rounds (the route is taken from the second call on,
``Passed.chain``): as drawn; again at another ``x``; after an in-place optimiser step
(``torch.optim.SGD`` with momentum); after one activation is switched to another kind or
``alpha`` (the same module object); with the parameters' and ``x``'s ``requires_grad``
flipped at another batch size. Operators: ``divergence``, ``jacobian_diagonal`` (``chunk_size``
1..n), ``jacobian``, ``laplacian`` (``"auto"``) and ``value_grad_laplacian``, under grad mode
and ``no_grad``, float32 and float64. Reference: float64 per-sample loops of
``torch.autograd.grad`` (grad of grad for the Laplacian, ``test_fuzz27._rows``) on a copy whose
activations are written in elementary ops (``test_fuzz24.plain_activation``), values and the
gradients of a weighted sum of the result in every trainable tensor and ``x``. A spy on
``chain.chain`` (through ``GraphJacobian`` and the Laplacian) checks that each program takes
the way it is drawn for: a near-chain never, a chain of listed nodes from its second round on.

Run many by hand: ``PYTHONPATH=src:tests/stacks:tests python tests/stacks/test_fuzzchain29.py
FIRST COUNT`` (``NOTES_fuzzchain29.md``: what ran, what it found).
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from fuzzing import Switch, far, gradient_faults, taken_paths, weighted
from fuzzing import pick as _pick
from fuzzing import randn as _randn
from fuzzing import uniform_int as _int
from test_fuzz24 import plain_activation
from test_fuzz27 import _laplacian_rows, _rows, tolerance
from torch import nn

import torchdiv
from torchdiv._exact import autograd as exact_autograd
from torchdiv._laplacian import chain as laplacian_chain

f64 = torch.float64
_PLAIN = Switch()  # the reference's elementary activations
_PEAKS = [False]  # the activations keep their largest |pre-activation| (``Act.peak``)


# --- steps ---------------------------------------------------------------------------------------


class Step(nn.Module):
    """One step of a program: ``forward(h, x)``; ``chain``: whether the route may take a
    graph holding it (``False``: it must not), ``text`` as code, ``closed``: tensors it holds
    that require grad without being parameters (closed over)."""

    chain = True
    text = ""
    closed: tuple[str, ...] = ()

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


LISTED = (
    *("tanh", "sigmoid", "relu", "gelu", "gelu-tanh"),
    *("elu", "selu", "celu", "softplus", "leaky"),
)
UNLISTED = ("silu", "mish", "hardtanh")
LAPLACIAN = ("tanh", "sigmoid", "relu", "leaky")  # (``_laplacian.chain._RULES``)


class Act(Step):
    """An activation module, switched in place between rounds (``draw``)."""

    def __init__(self, g: torch.Generator, names: tuple[str, ...]) -> None:
        super().__init__()
        self.draw(g, names)

    def draw(self, g: torch.Generator, names: tuple[str, ...]) -> None:
        self.name = name = _pick(g, list(names))
        alpha = _pick(g, [0.37, 1.0, 1.7, 2.3])
        beta, threshold = _pick(g, [1.0, 2.0, 0.5]), _pick(g, [20.0, 1.5, 0.5])
        make: dict[str, Callable[[], nn.Module]] = {
            "tanh": nn.Tanh,
            "sigmoid": nn.Sigmoid,
            "relu": nn.ReLU,
            "gelu": nn.GELU,
            "gelu-tanh": lambda: nn.GELU("tanh"),
            "elu": lambda: nn.ELU(alpha),
            "selu": nn.SELU,
            "celu": lambda: nn.CELU(alpha),
            "softplus": lambda: nn.Softplus(beta, threshold),
            "leaky": lambda: nn.LeakyReLU(_pick(g, [0.01, 0.2, 1.7])),
            "silu": nn.SiLU,
            "mish": nn.Mish,
            "hardtanh": lambda: nn.Hardtanh(-0.8, 1.3),
        }
        self.m = make[name]()
        self.chain = name in LISTED
        self.peak = 0.0  # the largest |pre-activation| (``nan_third_derivatives``)
        self.text = f"{self.m!r}(h)"

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if _PEAKS[0] and h.numel():  # (f run by check_call itself, not by torchdiv)
            self.peak = max(self.peak, float(h.detach().abs().max()))
        if not _PLAIN:
            return self.m(h)
        if isinstance(self.m, nn.ReLU):
            return torch.where(h > 0, h, 0 * h)
        if isinstance(self.m, nn.Hardtanh):
            low, high = self.m.min_val, self.m.max_val
            return torch.where(h < low, 0 * h + low, torch.where(h > high, 0 * h + high, h))
        return plain_activation(self.m, h)


class Lin(Step):
    """``k -> k2`` as users write a linear layer (``kind``)."""

    KINDS = ("linear", "linear", "linear-nobias", "F.linear", "addmm", "mm")

    def __init__(self, g: torch.Generator, kind: str, k: int, k2: int) -> None:
        super().__init__()
        self.kind, self.k, self.k2 = kind, k, k2
        self.w = nn.Parameter(_randn(g, k2, k, scale=1.3 / math.sqrt(k)))
        self.b = None if kind in ("linear-nobias", "mm") else nn.Parameter(_randn(g, k2, scale=0.3))
        self.alpha, self.beta = _pick(g, [1.0, 0.5, 2.0]), _pick(g, [1.0, 0.0, 0.7, 3.0])
        self.text = {
            "linear": f"nn.Linear({k}, {k2})(h)",
            "linear-nobias": f"nn.Linear({k}, {k2}, bias=False)(h)",
            "F.linear": f"F.linear(h, W({k2}, {k}), b)",
            "addmm": f"torch.addmm(b, h, W({k2}, {k}).t(), beta={self.beta}, alpha={self.alpha})",
            "mm": f"h @ W({k2}, {k}).t()",
        }[kind]

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.kind in ("linear", "linear-nobias", "F.linear"):
            return F.linear(h, self.w, self.b)
        if self.kind == "mm":
            return h @ self.w.t()
        assert self.b is not None
        flat = h.reshape(-1, self.k) if h.dim() != 2 else h
        out = torch.addmm(self.b, flat, self.w.t(), beta=self.beta, alpha=self.alpha)
        return out if h.dim() == 2 else out.reshape(*h.shape[:-1], self.k2)


class Again(Step):
    """An earlier ``Lin`` used again (tied: one parameter, two nodes of the chain)."""

    def __init__(self, layer: Lin) -> None:
        super().__init__()
        self.layer = [layer]  # (not a submodule: listed once)
        self.text = f"{layer.text}  (the layer {id(layer) % 1000} again)"

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.layer[0](h, x)


class Time(Step):
    """``k`` time features concatenated first or last along the last axis (``style``)."""

    STYLES = ("zuko", "ffjord", "depthcat", "embedding", "closed", "integer", "computed")

    def __init__(self, g: torch.Generator, style: str, first: bool, k: int) -> None:
        super().__init__()
        self.style, self.first, self.k = style, first, k
        self.t = float(torch.rand((), generator=g))
        if style == "embedding":
            self.e = nn.Parameter(_randn(g, 1, k))
        if style == "closed":
            self.c = _randn(g, k).requires_grad_(True)
            self.closed = ("c",)
        if style == "computed":
            self.emb = Lin(g, "linear", 1, k)
        feature = {
            "zuko": f"t.expand(*h.shape[:-1], {k})",
            "ffjord": f"torch.ones_like(h[..., :{k}]) * t",
            "depthcat": f"torch.full((*h.shape[:-1], {k}), t)",
            "embedding": f"E(1, {k}).expand(*h.shape[:-1], {k})",
            "closed": f"c({k}).expand(*h.shape[:-1], {k})  (c closed over, requires grad)",
            "integer": f"torch.arange(N)[..., None].expand(..., {k}) % 3  (int64)",
            "computed": f"nn.Linear(1, {k})(t.expand(*h.shape[:-1], 1))",
        }[style]
        self.text = f"torch.cat(({feature}, h) if first else (h, ...), -1)"

    @property
    def chain(self) -> bool:  # type: ignore[override]
        """A time embedding computed by a trained layer is off the chain."""
        return self.style != "computed" or not self.emb.w.requires_grad

    def feature(self, h: torch.Tensor) -> torch.Tensor:
        lead, k = h.shape[:-1], self.k
        if self.style == "zuko":
            return h.new_tensor(self.t).expand(*lead, k)
        if self.style == "ffjord":
            return torch.ones_like(h[..., :1]).expand(*lead, k) * self.t
        if self.style == "depthcat":
            return torch.full((*lead, k), self.t, dtype=h.dtype)
        if self.style == "embedding":
            return self.e.expand(*lead, k)
        if self.style == "closed":
            return self.c.expand(*lead, k)
        if self.style == "integer":
            index = torch.arange(lead.numel()).reshape(lead) if lead else torch.tensor(0)
            return (index[..., None] % 3).expand(*lead, k)
        return self.emb(h.new_tensor(self.t).expand(*lead, 1), h)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = self.feature(h)
        return torch.cat((t, h) if self.first else (h, t), -1)


class Expand(Step):
    """``x.expand`` to its own shape (zuko broadcasts ``x`` beside its time input)."""

    text = "x.expand(x.shape)"

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return h.expand(h.shape)


class Near(Step):
    """A step the route must leave to the engine (``kind``), ``k -> width``."""

    KINDS = (
        "residual",
        "weight-twice",
        "x-twice",
        "x-bias",
        "closed-factor",
        "cat-other-axis",
        "view",
        "slice",
        "expand-hidden",
    )

    @property
    def chain(self) -> bool:  # type: ignore[override]
        """A weight used twice in one layer, frozen, is a chain (its bias no graph)."""
        return self.kind == "weight-twice" and not self.lin.w.requires_grad

    def __init__(self, g: torch.Generator, kind: str, k: int, d: int) -> None:
        super().__init__()
        self.kind, self.width = kind, k
        if kind in ("residual", "weight-twice", "x-bias"):
            self.lin = Lin(g, "linear", k, k)
            self.act = Act(g, ("tanh", "sigmoid", "gelu"))
        if kind == "x-twice":
            self.width = k + d
        if kind == "closed-factor":
            self.c = (1 + _randn(g, k, scale=0.3)).requires_grad_(True)
            self.closed = ("c",)
        self.text = {
            "residual": f"h + {self.act.text if kind == 'residual' else ''}(Linear({k}, {k})(h))",
            "weight-twice": f"F.linear(h, W({k}, {k}), W[:, 0])",
            "x-twice": "torch.cat((h, x), -1)",
            "x-bias": f"torch.addmm(b * (1 + tanh(x[..., :1])), h, W({k}, {k}).t())",
            "closed-factor": f"h * c({k})  (c closed over, requires grad)",
            "cat-other-axis": "torch.cat((h, zeros_like(h[..., :1, :])), -2)[..., :-1, :]",
            "view": "h.view_as(h)",
            "slice": f"h[..., :{k}]",
            "expand-hidden": "h.expand(h.shape)  (not x)",
        }[kind]

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        kind = self.kind
        if kind == "residual":
            return h + self.act(self.lin(h, x), x)
        if kind == "weight-twice":
            return F.linear(h, self.lin.w, self.lin.w[:, 0])
        if kind == "x-twice":
            return torch.cat((h, x), -1)
        if kind == "x-bias":
            bias = self.lin.b * (1 + torch.tanh(x[..., :1]))
            flat = h.reshape(-1, h.shape[-1])
            out = torch.addmm(bias.reshape(-1, bias.shape[-1]), flat, self.lin.w.t())
            return out.reshape(h.shape)
        if kind == "closed-factor":
            return h * self.c
        if kind == "cat-other-axis":
            return torch.cat((h, torch.zeros_like(h[..., :1, :])), -2)[..., :-1, :]
        if kind == "view":
            return h.view_as(h)
        if kind == "slice":
            return h[..., : self.width]
        return (h + 0).expand(h.shape)


# --- programs ------------------------------------------------------------------------------------


class Program(nn.Module):
    """``x`` through ``steps``; prints as code."""

    def __init__(self, steps: list[Step]) -> None:
        super().__init__()
        self.steps = nn.ModuleList(steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for step in self.steps:
            h = step(h, x)
        return h

    @property
    def chain(self) -> bool:
        """Whether every step may be on a chain (the route's to take, from x's shape on)."""
        return all(step.chain for step in self.steps)

    def trainables(self) -> dict[str, torch.Tensor]:
        """The parameters and the closed-over tensors, by name."""
        out = dict(self.named_parameters())
        for i, step in enumerate(self.steps):
            for name in step.closed:
                out[f"steps.{i}.{name} (closed)"] = getattr(step, name)
        return out

    def to_dtype(self, dtype: torch.dtype) -> Program:
        self.to(dtype)
        for step in self.steps:
            for name in step.closed:
                t = getattr(step, name)
                setattr(step, name, t.detach().to(dtype).requires_grad_(t.requires_grad))
        return self

    def train_(self, on: bool) -> None:
        for t in self.trainables().values():
            t.requires_grad_(on)

    def __repr__(self) -> str:
        lines = [f"    h = {step.text}" for step in self.steps]
        return "def f(x):\n    h = x\n" + "\n".join(lines) + "\n    return h"


def program(
    g: torch.Generator, d: int, out: int, near: bool, names: tuple[str, ...], wide: int = 9
) -> Program:
    """A random chain ``d -> ... -> out`` of at most three hidden layers (widths 1 to
    ``wide``); with ``near``, one step that breaks it; activations of ``names`` (a palette:
    the chain's, those and unlisted ones, or the forward Laplacian's)."""
    steps: list[Step] = []
    k = d
    if out == d and not near and _int(g, 0, 7) == 0:  # elementwise: any x (3-D too)
        steps = [Expand()] if _int(g, 0, 2) == 0 else []
        steps += [Act(g, names) for _ in range(_int(g, 1, 3))]
        return Program(steps)
    depth = _int(g, 0, 3)
    breaker = _int(g, -1, depth) if near else -2
    if _int(g, 0, 4) == 0:
        steps.append(Expand())
    if breaker == -1:  # at x itself: a view, a slice, x twice, an expand of no x
        kind = _pick(g, ["view", "slice", "x-twice", "expand-hidden", "cat-other-axis"])
        steps.append(Near(g, kind, k, d))
        k = steps[-1].width  # type: ignore[assignment]
    linears: list[Lin] = []
    for i in range(depth + 1):
        if _int(g, 0, 3) == 0:  # a time input beside h (FFJORD's ConcatLinear at any layer)
            style = _pick(g, list(Time.STYLES[:-1]) * 2 + ["computed"])
            width = _int(g, 1, 2)
            steps.append(Time(g, style, bool(_int(g, 0, 1)), width))
            k += width
        k2 = out if i == depth else k if _int(g, 0, 2) == 0 else _int(g, 1, wide)
        same = [lin for lin in linears if (lin.k, lin.k2) == (k, k2)]
        if same and _int(g, 0, 1) == 0:  # (a square layer used again: tied)
            steps.append(Again(same[0]))
        else:
            lin = Lin(g, _pick(g, list(Lin.KINDS)), k, k2)
            linears.append(lin)
            steps.append(lin)
        k = k2
        if i == breaker:
            kind = _pick(g, list(Near.KINDS))
            steps.append(Near(g, kind, k, d))
            k = steps[-1].width  # type: ignore[assignment]
            if kind == "x-twice":  # (back to k2 wide)
                lin = Lin(g, "linear", k, k2)
                steps.append(lin)
                k = k2
        if i < depth and _int(g, 0, 4) > 0:
            steps.append(Act(g, names))
            if _int(g, 0, 4) == 0:
                steps.append(Act(g, names))
            if _int(g, 0, 4) == 0:  # a time input between two activations (no product)
                width = _int(g, 1, 2)
                steps.append(Time(g, _pick(g, list(Time.STYLES)), bool(_int(g, 0, 1)), width))
                steps.append(Act(g, names))
                k += width
    if _int(g, 0, 2) == 0:
        steps.append(Act(g, names))
    return Program(steps)


# --- references ----------------------------------------------------------------------------------


class Reference:
    """The float64 references of ``f`` at ``x``: ``y``, ``jac`` ``(S, m, n)``, ``lap``
    ``(S, m)`` (where asked), differentiable in the copy's trainables and in ``leaf``."""

    def __init__(self, f: Program, x: torch.Tensor, batch_dims: int, laplacian: bool) -> None:
        self.f = copy.deepcopy(f).to_dtype(f64)
        self.leaf = x.detach().to(f64).requires_grad_(True)
        with _PLAIN:
            self.y = self.f(self.leaf)
        rows = _rows(self.y, self.leaf, batch_dims)
        count = self.leaf.shape[:batch_dims].numel()
        n = self.leaf.numel() // max(count, 1)
        m = self.y.shape[batch_dims:].numel()
        jac = [torch.stack(r) for r in rows]
        self.jac = torch.stack(jac) if jac else self.leaf.new_zeros(0, m, n)
        self.lap = _laplacian_rows(rows, self.leaf, n) if laplacian else None

    def of(self, what: str, shape: torch.Size) -> torch.Tensor:
        if what == "y":
            return self.y.reshape(shape)
        if what == "jac":
            return self.jac.reshape(shape)
        if what == "lap":
            assert self.lap is not None
            return self.lap.reshape(shape)
        diag = self.jac.diagonal(dim1=1, dim2=2)
        return (diag.sum(-1) if what == "div" else diag).reshape(shape)

    def grads(self, loss: torch.Tensor, names: list[str], wrt_x: bool) -> list[torch.Tensor]:
        own = self.f.trainables()
        wrt = [own[n] for n in names] + ([self.leaf] if wrt_x else [])
        if not wrt:
            return []
        if not loss.requires_grad:
            return [torch.zeros_like(t) for t in wrt]
        return list(
            torch.autograd.grad(
                loss, wrt, retain_graph=True, allow_unused=True, materialize_grads=True
            )
        )


# --- the calls -----------------------------------------------------------------------------------


def calls(case: Case) -> dict[str, tuple[str, Callable]]:
    """(what it computes, a call ``(f, x) -> result``) per operator."""
    kw = {"batch_dims": case.batch_dims}
    out: dict[str, tuple[str, Callable]] = {}
    if case.square:
        chunk = case.chunk
        out["divergence"] = ("div", lambda f, x: torchdiv.divergence(f, x, **kw))
        out["jacobian_diagonal"] = ("diag", lambda f, x: torchdiv.jacobian_diagonal(f, x, **kw))
        out[f"jacobian_diagonal/chunk{chunk}"] = (
            "diag",
            lambda f, x: torchdiv.jacobian_diagonal(f, x, chunk_size=chunk, **kw),
        )
        out["divergence/no_grad"] = ("div", lambda f, x: _no_grad(torchdiv.divergence, f, x, kw))
    out["jacobian"] = ("jac", lambda f, x: torchdiv.jacobian(f, x, **kw))
    if case.laplacian:
        out["laplacian"] = ("lap", lambda f, x: torchdiv.laplacian(f, x, **kw))
        out["laplacian/no_grad"] = ("lap", lambda f, x: _no_grad(torchdiv.laplacian, f, x, kw))
        out["value_grad_laplacian"] = (
            "vgl",
            lambda f, x: torchdiv.value_grad_laplacian(f, x, **kw),
        )
    return out


def _no_grad(op: Callable, f: Callable, x: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return op(f, x, **kw)


# PyTorch's derivatives that are ``nan`` from some order on where a pre-activation is large,
# not replaced by torchdiv (docs/guide/limitations.md, rev-fuzz24): the order and the
# |pre-activation| from which they are, per dtype
NAN_DERIVATIVES = {
    "gelu-tanh": (3, {torch.float32: 13.0, f64: 26.0}),
    "mish": (2, {torch.float32: 88.0, f64: 709.0}),
}
# the order of the derivatives of f in each result (its gradients: one more)
ORDERS = {"div": 1, "diag": 1, "jac": 1, "lap": 2, "vgl": 2}


def nan_from(f: Program, x: torch.Tensor) -> float:
    """The lowest order from which PyTorch's derivatives of an activation of ``f`` are
    ``nan`` at ``x`` (``NAN_DERIVATIVES``; ``inf`` if none)."""
    acts = [s for s in f.steps if isinstance(s, Act) and s.name in NAN_DERIVATIVES]
    if not acts:
        return math.inf
    for act in acts:
        act.peak = 0.0
    _PEAKS[0] = True
    try:
        with torch.no_grad():
            f(x.detach())
    finally:
        _PEAKS[0] = False
    reached = [NAN_DERIVATIVES[a.name] + (a.peak,) for a in acts]
    return min(
        (float(order) for order, limits, peak in reached if peak >= limits[x.dtype]),
        default=math.inf,
    )


def check_call(
    name: str, what: str, call: Callable, f: Program, x: torch.Tensor, ref: Reference
) -> list[str]:
    """One call's disagreements: its value, and the gradients of a weighted sum of it in
    every trainable tensor that requires grad and in ``x`` where it does."""
    tol = tolerance(x.dtype)
    named = {n: t for n, t in f.trainables().items() if t.requires_grad}
    for t in named.values():
        t.grad = None
    wrt_x = x.requires_grad
    x.grad = None
    try:
        got = call(f, x)
    except Exception as exc:  # (every program is per-sample: a refusal is a fault)
        return [f"{name} raised {type(exc).__name__}: {str(exc)[:400]}"]
    outs = list(got) if isinstance(got, tuple) else [got]
    whats = ["y", "jac", "lap"] if what == "vgl" else [what]
    faults, expected = [], []
    for w, o in zip(whats, outs, strict=True):
        e = ref.of(w, o.shape)
        expected.append(e)
        if o.dtype != x.dtype:
            faults.append(f"{name} ({w}): dtype {o.dtype} != {x.dtype}")
        if (bad := far(o, e, tol)) is not None:
            faults.append(f"{name} ({w}): {bad}")
    if faults or name.endswith("no_grad") or not (named or wrt_x):
        return faults
    if ORDERS[what] + 1 >= nan_from(f, x):  # (their gradients: PyTorch's nan)
        return faults
    loss, ref_loss = weighted(outs, expected)
    want = ref.grads(ref_loss, list(named), wrt_x)
    tensors = [*named.values()] + [x] * wrt_x
    return gradient_faults(name, loss, tensors, [*named] + ["x"] * wrt_x, want, tol)


# --- a case --------------------------------------------------------------------------------------


class Case:
    """The program of ``seed`` and what to call it at."""

    def __init__(self, seed: int, near: bool | None = None) -> None:
        g = torch.Generator().manual_seed(29_000_000 + seed)
        self.seed, self.g = seed, g
        self.batch_dims = _pick(g, [1, 1, 1, 1, 1, 1, 0, 2])
        self.d = _pick(g, [1, 2, 2, 3, 3, 4, 5, 6])
        self.t = _int(g, 2, 3) if self.batch_dims != 1 else 0
        self.sizes = [_pick(g, [1, 2, 3, 5, 8]), _pick(g, [0, 2, 3, 4, 6])]
        self.dtype = _pick(g, [f64, f64, torch.float32])
        self.near = bool(_int(g, 0, 2) == 0) if near is None else near
        self.palette = _pick(g, [LISTED, LISTED + UNLISTED, LAPLACIAN])
        self.out = self.d if _int(g, 0, 4) else _int(g, 1, 4)
        self.square = self.out == self.d
        self.chunk = _int(g, 1, max(self.n, 1))
        self.laplacian = self.n <= 4 and self.out <= 4
        self.train = _pick(g, ["frozen", "params", "params+x", "x"])
        self.program = program(g, self.d, self.out, self.near, self.palette).to_dtype(self.dtype)
        self.program.train_(self.train in ("params", "params+x"))

    @property
    def n(self) -> int:
        """The event's size."""
        return self.d * (self.t if self.batch_dims == 0 else 1)

    def x(self, count: int) -> torch.Tensor:
        lead = {0: (self.t,), 1: (count,), 2: (count, self.t)}[self.batch_dims]
        x = torch.randn((*lead, self.d), generator=self.g, dtype=f64).to(self.dtype)
        return x.requires_grad_(self.train in ("x", "params+x"))

    def __repr__(self) -> str:
        return (
            f"seed {self.seed}: {self.dtype} batch_dims={self.batch_dims} T={self.t} "
            f"D={self.d} out={self.out} sizes={self.sizes} {self.train} near={self.near}\n"
            f"{self.program!r}"
        )


def _stepped(case: Case, x: torch.Tensor) -> None:
    """An optimiser's in-place step (SGD with momentum, twice) of the trainables, on a loss of
    ``f(x)`` (their values move by ``add_``, their versions with them)."""
    f = case.program
    trainables = [t for t in f.trainables().values() if t.requires_grad]
    if not trainables:
        with torch.no_grad():
            for t in f.trainables().values():
                t.mul_(1.1).add_(0.05)
        return
    opt = torch.optim.SGD(trainables, lr=0.05, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        f(x.detach()).square().mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


# the numbers of an activation module that a call reads (set in place by ``_switched``)
NUMBERS = {
    nn.ELU: ("alpha",),
    nn.CELU: ("alpha",),
    nn.Softplus: ("beta", "threshold"),
    nn.LeakyReLU: ("negative_slope",),
    nn.Hardtanh: ("max_val",),
}


def _switched(case: Case) -> None:
    """One activation switched to another module (``Act.draw``), or its numbers set in place
    (``alpha``, ``beta``...: the same module object)."""
    acts = [s for s in case.program.steps if isinstance(s, Act)]
    if not acts:
        return
    act = _pick(case.g, acts)
    numbers = NUMBERS.get(type(act.m), ())
    if numbers and _int(case.g, 0, 1):
        for name in numbers:
            setattr(act.m, name, getattr(act.m, name) * 1.37 + 0.11)
        act.text = f"{act.m!r}(h)  (numbers set in place)"
        return
    act.draw(case.g, case.palette)


# the ways the route answers (``taken_paths``): chain's steps found for GraphJacobian or the
# Laplacian, the products, the trace by cyclicity, the top layer's rows, the forward Laplacian
PATHS: dict[str, tuple[object, str]] = {
    "chain": (exact_autograd, "chain"),
    "chain (Laplacian)": (laplacian_chain, "chain"),
    "products": (exact_autograd, "chain_products"),
    "trace": (exact_autograd, "chain_trace"),
    "unit rows": (exact_autograd, "unit_products"),
    "forward Laplacian": (laplacian_chain, "_forward_laplacian"),
}


# the steps whose ways through the route the fixed seeds must cover (``covered``: a way
# ``+`` a feature of the program that took it)
FEATURES = {Time: "time", Expand: "expand", Again: "again"}


def expects_chain(case: Case, x: torch.Tensor) -> bool:
    """Whether a square call of ``case`` at ``x`` should take the route from its second round
    on: a chain of listed steps, ``x`` ``(N, D)`` with one batch axis (``addmm`` is 2-D), an
    expand of x only where none of x's sizes is 1."""
    if not (case.program.chain and case.batch_dims == 1 and case.square):
        return False
    expands = any(isinstance(s, Expand) for s in case.program.steps)
    return not (expands and min(x.shape) <= 1) and _placeable(case.program.steps)


def _placeable(steps: Iterable[nn.Module]) -> bool:
    """Whether a linear step lies between any two concatenations (``chain._sliced`` tells a
    concatenation's slice by the widths of the products above and below it; two with only
    activations between them take the engine: ``NOTES_fuzzchain29.md``)."""
    concatenated = False
    for step in steps:
        if isinstance(step, Time):
            if concatenated:
                return False
            concatenated = True
        elif isinstance(step, Lin | Again) or (isinstance(step, Near) and step.chain):
            concatenated = False
    return True


def fuzz_one(seed: int, taken: set[str], covered: set[str], near: bool | None = None) -> list[str]:
    """Every disagreement of the case of ``seed`` over its five rounds, and its ways: a
    near-chain that took the route, or a chain of listed steps whose square calls did not
    from the second round on."""
    case = Case(seed, near)
    f = case.program
    chosen = calls(case)
    faults: list[str] = []
    features = {FEATURES[type(s)] for s in f.steps if type(s) in FEATURES}
    for i, label in enumerate(("first", "again", "stepped", "switched", "flipped")):
        count = case.sizes[1] if label == "flipped" else case.sizes[0]
        if label == "stepped":
            _stepped(case, case.x(count))
        if label == "switched":
            _switched(case)
        if label == "flipped":
            trained = any(t.requires_grad for t in f.trainables().values())
            f.train_(not trained)
        x = case.x(count)
        if label == "flipped":
            x.requires_grad_(not x.requires_grad)
        if label in ("switched", "flipped") and case.square:  # (a new structure: its first
            with contextlib.suppress(Exception):  # call watched; raising, checked below)
                torchdiv.divergence(f, x, batch_dims=case.batch_dims)
        ref = Reference(f, x, case.batch_dims, case.laplacian)
        for name, (what, call) in chosen.items():
            taken.clear()
            found = check_call(name, what, call, f, x, ref)
            took = bool(taken & {"chain", "chain (Laplacian)"})
            covered.update(taken)
            covered.update(f"{way} + {feature}" for way in taken for feature in features)
            if not f.chain and took:
                found.append(f"{name}: took the route on a near-chain ({sorted(taken)})")
            if i and name == "divergence" and not took and expects_chain(case, x):
                found.append(f"{name}: a chain of listed steps took the engine")
            at = f"round {label} x{tuple(x.shape)}{'+grad' * x.requires_grad}"
            faults += [f"{case!r}\n  {at} {m}" for m in found]  # (as drawn at this round)
    return faults


# --- tests ---------------------------------------------------------------------------------------


class _TimeBeside(nn.Module):
    """A PINN's or a CNF's ``u(x, t) = MLP(cat(t, x))`` (``first``) or ``MLP(cat(x, t))``,
    ``t`` a float beside ``x`` (zuko's ``t.expand``), a hidden tanh layer."""

    def __init__(self, d: int, first: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = first
        self.net = nn.Sequential(nn.Linear(d + 1, 8), nn.Tanh(), nn.Linear(8, 2)).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.new_tensor(0.3).expand(*x.shape[:-1], 1)
        return self.net(torch.cat((t, x) if self.first else (x, t), -1))


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("d", [1, 2])
@pytest.mark.parametrize("first", [True, False], ids=["t first", "t last"])
def test_the_laplacian_of_a_chain_beside_a_time_input(monkeypatch, first, d, grad):
    """``laplacian`` ("auto") of a frozen ``MLP(cat(t, x))`` or under ``no_grad`` at one or two
    inputs: the loop reads the Laplacian off the chain (``_laplacian.chain``), whose steps hold
    the concatenation as a slice (``_exact.chain._Slice``) since the twenty-seventh session;
    ``chain_laplacian`` asked the slice for its node's ``name()`` and raised AttributeError at
    every call (zuko's velocity, a PINN's ``u(x, t)``). Now the forward Laplacian takes the
    slice's rows of the product above it; the float64 reference (``Reference``: per-sample
    grad of grad) holds to 1e-10 (float64, a few dozen flops)."""
    taken = taken_paths(monkeypatch, {"forward Laplacian": PATHS["forward Laplacian"]})
    f = _TimeBeside(d, first).requires_grad_(False)
    for _ in range(3):
        x = torch.randn(5, d, dtype=f64)
        leaf = x.detach().requires_grad_(True)
        rows = _rows(f(leaf), leaf, 1)
        want = _laplacian_rows(rows, leaf, d)
        with torch.enable_grad() if grad else torch.no_grad():
            got = torchdiv.laplacian(f, x)
        torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-10)
    assert taken == {"forward Laplacian"}


# seeds whose programs take every way of the route between them, with a time input, an expand
# of x and a layer used again too, and hold every near-chain step and every time input (~3 s)
FAST_SEEDS = [287, 468, 250, 466, 132, 281, 30, 129, 460, 15, 91, 291, 209]


def _drawn(seed: int) -> set[str]:
    """The near-chain kinds and time styles of the program of ``seed``."""
    steps = Case(seed).program.steps
    return {s.kind for s in steps if isinstance(s, Near)} | {
        f"time: {s.style}" for s in steps if isinstance(s, Time)
    }


def test_fuzz_fixed_seeds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixed seeds agree with their references and took each way of the route (with a
    time input and an expand of x), their programs holding every near-chain step and time
    input: a seed list that stops reaching one (a change of the generator or of "auto"'s
    rules) fails here rather than checks less."""
    taken = taken_paths(monkeypatch, PATHS)
    covered: set[str] = set()
    faults = [m for seed in FAST_SEEDS for m in fuzz_one(seed, taken, covered)]
    assert not faults, "\n\n".join(faults[:5])
    ways = set(PATHS) - {"chain (Laplacian)"}
    want = set(PATHS) | {f"{w} + {f}" for w in ways for f in FEATURES.values()}
    assert covered >= want, want - covered
    drawn = set().union(*map(_drawn, FAST_SEEDS))
    assert drawn == set(Near.KINDS) | {f"time: {s}" for s in Time.STYLES}, drawn


def _wide_reference(
    f: Program, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(N, m, n)`` Jacobians of a float64 copy of ``f`` (plain activations) at a float64
    leaf copy of ``x``, one ``autograd.grad`` per output component over the whole batch (the
    programs do not mix samples), with a graph; the leaf and the copy's trainables."""
    copied = copy.deepcopy(f).to_dtype(f64)
    leaf = x.detach().to(f64).requires_grad_(True)
    with _PLAIN:
        y = copied(leaf)
    rows = [
        torch.autograd.grad(y[:, i].sum(), leaf, create_graph=True, materialize_grads=True)[0]
        for i in range(y.shape[1])
    ]
    return torch.stack(rows, 1), leaf, copied.trainables()


def fuzz_wide(seed: int, taken: set[str]) -> list[str]:
    """A square chain of listed steps at ``D`` 40-64 and a batch that makes the problem
    (``N D²``) larger than ``crossover.ROWS_PROBLEM``: "auto" goes by the chain's rows only
    while its plain evaluations show a chain (``Passed.chain``, ``_plain_first``'s
    ``chain_only``; ``chain.widest`` plans the chunks). Four rounds (as drawn, again, after an
    optimiser step, flipped), ``divergence``, ``jacobian_diagonal`` in chunks and
    ``jacobian`` (the one that goes by rows there: from its third call on, ``stepped``),
    values and gradients against ``_wide_reference``."""
    g = torch.Generator().manual_seed(29_500_000 + seed)
    d = _int(g, 40, 64)
    dtype = _pick(g, [f64, torch.float32])
    f = program(g, d, d, near=False, names=LISTED, wide=96).to_dtype(dtype)
    count = (1 << 18) // (d * d) + _int(g, 1, 40)
    case = Case(seed)  # (its generator for _stepped's x only)
    case.program, case.batch_dims, case.dtype, case.g = f, 1, dtype, g
    trained = bool(_int(g, 0, 1))
    f.train_(trained)
    chunk = _int(g, 1, d)
    faults: list[str] = []
    for label in ("first", "again", "stepped", "flipped"):
        if label == "stepped":
            _stepped(case, torch.randn(count, d, generator=g, dtype=f64).to(dtype))
        if label == "flipped":
            trained = not trained
            f.train_(trained)
        x = torch.randn(count, d, generator=g, dtype=f64).to(dtype)
        x.requires_grad_(label == "flipped")
        jac, leaf, own = _wide_reference(f, x)
        diag = jac.diagonal(dim1=1, dim2=2)
        operators: dict[str, tuple[torch.Tensor, Callable]] = {
            "divergence": (diag.sum(-1), torchdiv.divergence),
            f"jacobian_diagonal/chunk{chunk}": (
                diag,
                lambda f, x: torchdiv.jacobian_diagonal(f, x, chunk_size=chunk),
            ),
            "jacobian": (jac, torchdiv.jacobian),
        }
        for name, (want, call) in operators.items():
            named = {n: t for n, t in f.trainables().items() if t.requires_grad}
            for t in named.values():
                t.grad = None
            x.grad = None
            taken.clear()
            got = call(f, x)
            tol = tolerance(dtype)
            at = f"{label} x{tuple(x.shape)}{'+grad' * x.requires_grad} {name}"
            if (bad := far(got, want, tol)) is not None:
                faults.append(f"{at}: {bad}")
                continue
            if label == "stepped" and name == "jacobian" and f.chain and "chain" not in taken:
                faults.append(f"{at}: the chain's rows were not taken ({sorted(taken)})")
            if not f.chain and "chain" in taken:
                faults.append(f"{at}: took the route on a near-chain")
            wrt = [own[n] for n in named] + ([leaf] if x.requires_grad else [])
            if not wrt:
                continue
            weights = torch.randn(want.shape, generator=g, dtype=f64)
            ref_loss = (want * weights).sum()
            expected = (
                torch.autograd.grad(ref_loss, wrt, retain_graph=True, materialize_grads=True)
                if ref_loss.requires_grad
                else tuple(torch.zeros_like(t) for t in wrt)
            )
            if not got.requires_grad:
                if any(e.any() for e in expected):
                    faults.append(f"{at}: no graph, its reference's gradients != 0")
                continue
            (got * weights.to(dtype)).sum().backward()
            have = [t.grad for t in named.values()] + ([x.grad] if x.requires_grad else [])
            for label_, a, e in zip([*named, "x"], have, expected, strict=False):
                if (bad := far(torch.zeros_like(e) if a is None else a, e, tol)) is not None:
                    faults.append(f"{at}: grad of {label_}: {bad}")
    return [f"wide seed {seed}: {dtype} D={d} N={count}\n{f!r}\n  {m}" for m in faults]


@pytest.mark.slow
def test_fuzz_wide(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = taken_paths(monkeypatch, PATHS)
    faults = [m for s in range(6) for m in fuzz_wide(s, taken)]
    assert not faults, "\n\n".join(faults[:5])


@pytest.mark.slow
@pytest.mark.parametrize("first", [100, 200])
def test_fuzz_many(monkeypatch: pytest.MonkeyPatch, first: int) -> None:
    taken = taken_paths(monkeypatch, PATHS)
    faults = [m for s in range(first, first + 25) for m in fuzz_one(s, taken, set())]
    assert not faults, "\n\n".join(faults[:5])


if __name__ == "__main__":
    first, count = int(sys.argv[1]), int(sys.argv[2])
    if len(sys.argv) > 3 and sys.argv[3] == "wide":
        with pytest.MonkeyPatch.context() as patch:
            taken = taken_paths(patch, PATHS)
            for s in range(first, first + count):
                print(f"wide seed {s}", file=sys.stderr, flush=True)
                for message in fuzz_wide(s, taken):
                    print(message, "\n", flush=True)
        sys.exit()
    with pytest.MonkeyPatch.context() as patch:
        taken, covered = taken_paths(patch, PATHS), set()
        for s in range(first, first + count):
            if s % 20 == 0:
                print(f"at seed {s}", file=sys.stderr, flush=True)
            before = set(covered)
            for message in fuzz_one(s, taken, covered):
                print(message, "\n", flush=True)
            if covered - before:
                print(f"seed {s} covers {sorted(covered - before)}", file=sys.stderr, flush=True)
