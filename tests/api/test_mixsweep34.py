"""Sample mixing swept: ``f``'s that combine samples (PyTorch's OpInfo ops whose result on a
stacked batch is not the stack of per-sample results, and ops applied along the batch
dimension by hand), every public operator with ``"auto"`` and every explicit method.

Each result must be a refusal (``BatchInteractionError``, or an error that starts with the
operator's name) or the true per-sample quantity: the float64 per-sample loop of
``autograd.grad`` over the whole batch's ``f``, ``d f(X)[b] / d X[b]`` with the other samples
held fixed (``test_opinfo33``'s ``_jacobian_rows`` and ``_hessians``). A number that is
neither is the batched trick's, silently wrong; the contract (``docs/api-contract.md``, sample
mixing) checks only what the call watches, so silent values of the explicit ``"forward"``,
``"reverse"``, ``"structured"`` and nested Laplacian methods are documented and counted apart
(``EXPLICIT``), the rest are faults.

``f(x) = head(op(tail(x)))`` with ``tail(x) = x + 0.01 tanh(x Wᵀ + c)`` and ``head`` affine plus
``0.1 tanh`` (``test_opinfo33.Model``), ``g`` the same with two outputs for the Laplacians.
Each ``f`` is called three ways: fresh (``"first"``); after a first call of the same module
with the op applied to each sample alone (``"warm"``: the module's ``per_sample`` flag, a
``bool`` attribute, flipped between calls, the recorded plans and remembered choices path);
and with ``batch_dims=2`` (the ``(2, 2)`` batch folded into the op's four samples).

Tolerance (float64): ``1e-7`` relative to ``1 + max |reference|`` (``test_opinfo33.TOL``: a few
hundred flops of the same kernels; any batched trick over mixing here differs by ``>= 1e-5``).

Run all by hand: ``PYTHONPATH=src:. python tests/api/test_mixsweep34.py [NAME ...]``
(``NOTES_mixsweep34.md``: what ran, what it found).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import torchdiv
from tests.exact.test_opinfo33 import (
    TOL,
    Case,
    _batchable,
    _hessians,
    _jacobian_rows,
    cases,
)

f64 = torch.float64
Op = Callable[[torch.Tensor], torch.Tensor]

# explicit methods whose engines watch nothing (the contract: not checked for mixing)
EXPLICIT = {
    ("divergence", "structured"),
    ("divergence", "forward"),
    ("divergence", "reverse"),
    ("jacobian_diagonal", "structured"),
    ("jacobian_diagonal", "forward"),
    ("jacobian_diagonal", "reverse"),
    ("jacobian", "forward"),
    ("jacobian", "reverse"),
    ("laplacian", "forward-over-reverse"),
    ("laplacian", "hessian"),
    ("laplacian", "grad-of-grad"),
    ("value_grad_laplacian", "forward-over-reverse"),
    ("biharmonic", "forward-over-reverse"),
    ("weighted_laplacian", "forward-over-reverse"),
    ("weighted_laplacian", "hessian"),
    ("weighted_laplacian", "grad-of-grad"),
    # the graph forms: the caller's graph, taken as it is ("Assumes sample b of y depends
    # only on sample b of x"; a train-mode batch norm in it refused)
    ("graph_divergence", "auto"),
    ("graph_divergence", "reverse"),
    ("graph_divergence", "hutchinson"),
    ("graph_jacobian", "reverse"),
    ("graph_laplacian", "reverse"),
}


# --- the mixing ops ---------------------------------------------------------------------


def _per_sample(op: Op) -> Op:
    """``op`` on each sample alone, the results stacked: the same ops, no mixing."""
    return lambda t: torch.cat([op(t[i : i + 1]) for i in range(t.shape[0])])


class _MixGrad(torch.autograd.Function):
    """Identity forward; backward adds the batch mean of the incoming gradient (mixing only
    in the first derivative)."""

    @staticmethod
    def forward(ctx: object, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad + grad.mean(0, keepdim=True)


class _MixSecond(torch.autograd.Function):
    """``t**2 / 2`` per sample, first derivative right per sample (``grad * t``), its own
    derivative mixing: ``(t - t.detach()).mean(0)`` is zero in value, not in gradient."""

    @staticmethod
    def forward(ctx: object, t: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(t)  # type: ignore[attr-defined]
        return t * t / 2

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        (t,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad * (t + (t - t.detach()).mean(0, keepdim=True))


def _hooked(t: torch.Tensor) -> torch.Tensor:
    h = t * 1.0
    if h.requires_grad:
        h.register_hook(lambda g: g + g.mean(0, keepdim=True))
    return h


def _conv_batch_as_channel(t: torch.Tensor) -> torch.Tensor:
    B = t.shape[0]
    w = torch.linspace(-1, 1, 16 * 16 * 3, dtype=t.dtype).reshape(16, 16, 3)[:B, :B]
    return t + 0.3 * F.conv1d(t[None], w, padding=1)[0]


def _scatter_mix(t: torch.Tensor) -> torch.Tensor:
    B = t.shape[0]
    idx = torch.arange(B).roll(1)[:, None].expand_as(t)
    return t + 0.5 * torch.zeros_like(t).scatter_add(0, idx, t)


def _gather_mix(t: torch.Tensor) -> torch.Tensor:
    B = t.shape[0]
    idx = (torch.arange(B).flip(0))[:, None].expand_as(t)
    return t + 0.5 * t.gather(0, idx)


# name -> op on ``(B, n)`` to ``(B, n)``: the batch dimension mixed explicitly
HAND: dict[str, Op] = {
    "mean0": lambda t: t - t.mean(0, keepdim=True),
    "sum0": lambda t: t + 0.3 * t.sum(0, keepdim=True),
    "std0": lambda t: t / (1 + t.std(0, keepdim=True)),
    "var0": lambda t: t * t.var(0, keepdim=True),
    "prod0": lambda t: t + t.prod(0, keepdim=True),
    "amax0": lambda t: t + t.amax(0, keepdim=True),
    "logsumexp0": lambda t: t + t.logsumexp(0, keepdim=True),
    "norm0": lambda t: t / t.norm(dim=0, keepdim=True),
    "cumsum0": lambda t: t.cumsum(0),
    "cumprod0": lambda t: t.cumprod(0),
    "cummax0": lambda t: t + t.cummax(0).values,
    "logcumsumexp0": lambda t: t.logcumsumexp(0),
    "sort0": lambda t: t + t.sort(0).values,
    "topk0": lambda t: t + t.topk(t.shape[0], dim=0).values,
    "argsort0": lambda t: t + t.gather(0, t.argsort(0)),
    "flip0": lambda t: t + 0.5 * t.flip(0),
    "roll0": lambda t: t + 0.5 * t.roll(1, 0),
    "gram": lambda t: t + 0.1 * (t @ t.T) @ t,
    "matmul_T": lambda t: t + 0.1 * t @ (t.T @ t),
    "fft0": lambda t: torch.fft.fft(t, dim=0).real,
    "rfft0": lambda t: t + torch.fft.irfft(torch.fft.rfft(t, dim=0) * 0.5, n=t.shape[0], dim=0),
    "index_select0": lambda t: t + 0.5 * t.index_select(0, torch.arange(t.shape[0]).flip(0)),
    "gather0": _gather_mix,
    "scatter_add0": _scatter_mix,
    "getitem_perm": lambda t: t + 0.5 * t[torch.arange(t.shape[0]).roll(1)],
    "pad0": lambda t: t + 0.5 * F.pad(t, (0, 0, 1, 0))[:-1],
    "conv_batch_channel": _conv_batch_as_channel,
    "transpose_view": lambda t: t + 0.5 * t.T.reshape(t.shape),
    "view_fold": lambda t: t + 0.5 * t.reshape(-1).roll(1).reshape(t.shape),
    "softmax0": lambda t: t + t.softmax(0),
    "log_softmax0": lambda t: t + t.log_softmax(0),
    "batch_norm": lambda t: F.batch_norm(t, None, None, training=True),
    "eps_mean": lambda t: t + 1e-4 * t.mean(0, keepdim=True),
    "tiny_mean": lambda t: t + 1e-6 * t.mean(0, keepdim=True),
    "detached_stats": lambda t: (t - t.mean(0).detach()) * t.std(0).detach(),
    "detached_center": lambda t: t * (t - t.mean(0)).detach().sum(),
    "custom_grad_mix": _MixGrad.apply,
    "custom_second_mix": lambda t: t + _MixSecond.apply(t),
    "hook_mix": _hooked,
    "where_mean": lambda t: torch.where(t > t.mean(0), t, 2 * t),
    "max_dim0_index": lambda t: t + t[t.sum(1).argmax()],
    "cdist_batch": lambda t: t + 0.1 * torch.cdist(t, t) @ t,
    "attention_batch": lambda t: t + (t @ t.T / 4).softmax(-1) @ t,
    "group_norm_batch": lambda t: F.group_norm(t.T[None], 1)[0].T,
    "layer_norm_T": lambda t: F.layer_norm(t.T, (t.shape[0],)).T,
}
# cheap ones for the fast test (one per family); at the warm and batch_dims=2 calls, fewer
HAND_FAST = [
    "mean0", "sort0", "gram", "fft0", "index_select0", "transpose_view", "batch_norm",
    "eps_mean", "custom_grad_mix", "custom_second_mix", "hook_mix", "conv_batch_channel",
]  # fmt: skip
HAND_FAST_AGAIN = ["mean0", "index_select0", "custom_grad_mix"]

# left alone (NOTES_mixsweep34.md, docs/guide/limitations.md): a custom autograd.Function
# whose backward's own derivative mixes samples (its value per sample) under the Laplacians'
# "auto" and Hutchinson Laplacian (the first-order check passes it); counted apart. (One
# whose backward's value mixes: refused since rev-a34.)
LEFT_ALONE = {
    (mixer, operator, method)
    for mixer in ("custom_second_mix",)
    for operator, method in (
        ("laplacian", "auto"),
        ("laplacian", "auto (again)"),
        ("laplacian", "hutchinson"),
        ("value_grad_laplacian", "auto"),
        ("weighted_laplacian", "auto"),
    )
}


# --- the model around one op -------------------------------------------------------------


class Net(torch.nn.Module):
    """``head(op(tail(x)))`` over ``(B, n)``, with ``out`` outputs; ``per_sample`` (a ``bool``
    attribute) runs the op on each sample alone."""

    def __init__(self, op: Op, n: int, m: int, out: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def p(*shape: int, scale: float = 1.0) -> torch.nn.Parameter:
            return torch.nn.Parameter(scale * torch.randn(shape, generator=g, dtype=f64))

        self.op, self.n = op, n
        self.W, self.c = p(n, n, scale=n**-0.5), p(n, scale=0.5)
        self.V, self.hc = p(out, m, scale=m**-0.5), p(out, scale=0.5)
        self.per_sample = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x + 0.01 * torch.tanh(x @ self.W.t() + self.c)
        y = (_per_sample(self.op) if self.per_sample else self.op)(t).reshape(x.shape[0], -1)
        lin = y @ self.V.t() + self.hc
        return lin + 0.1 * torch.tanh(lin)


@dataclass
class Mixer:
    """One mixing op: ``op`` on ``(B, n)``, its ``m`` outputs per sample, ``x`` near which."""

    name: str
    op: Op
    n: int
    m: int
    center: torch.Tensor  # (n,)


def hand_mixers(names: list[str] | None = None, n: int = 3) -> Iterator[Mixer]:
    for name, op in HAND.items():
        if names is None or name in names:
            yield Mixer(name, op, n, n, torch.linspace(-0.7, 0.9, n, dtype=f64))


# random ops (their draws differ per call, not per sample)
RANDOM = {"nn.functional.rrelu", "nn.functional.dropout", "nn.functional.alpha_dropout", "normal"}


def _mixes(case: Case) -> bool:
    """The op runs on stacked batches of 2 and 4 samples with a result of that many rows, the
    per-sample shape, finite, deterministic, and *not* per-sample (``_batchable`` false)."""
    g = torch.Generator().manual_seed(1)
    x0 = case.center
    xs = x0 + 1e-2 * torch.randn((4, *x0.shape), generator=g, dtype=x0.dtype)
    with torch.no_grad():
        try:
            one = case.apply(x0[None])
            outs = [case.apply(xs[:k]) for k in (2, 4, 2)]
        except Exception:
            return False
    if case.name in RANDOM or one.dim() < 2 or one.shape[0] != 1 or not one[0].numel():
        return False
    if any(o.shape != (k, *one.shape[1:]) for o, k in zip(outs, (2, 4, 2), strict=True)):
        return False
    if not all(bool(o.isfinite().all()) for o in outs) or not torch.equal(outs[0], outs[2]):
        return False
    return not _batchable(case)


def opinfo_mixers(names: list[str] | None = None, per_op: int = 1) -> Iterator[Mixer]:
    """OpInfo's samples that mix the batch (``_mixes``), as ``Mixer``s over ``(B, numel)``."""
    for case in cases(names, per_op, keep=_mixes):
        n = case.shape.numel()
        with torch.no_grad():
            m = case.apply(case.center[None]).shape[1:].numel()

        def op(t: torch.Tensor, case: Case = case) -> torch.Tensor:
            return case.apply(t.reshape(t.shape[0], *case.shape)).reshape(t.shape[0], -1)

        yield Mixer(case.label, op, n, m, case.center.reshape(n))


# --- references and calls ----------------------------------------------------------------


def _x(mixer: Mixer, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    noise = 0.05 * torch.randn((*shape, mixer.n), generator=g, dtype=f64)
    return (mixer.center + noise).requires_grad_()


def _flat(net: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``net`` over a ``(B1, B2, n)`` batch: folded into ``B1 B2`` samples and back."""
    return lambda x: net(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def references(
    f: Callable[[torch.Tensor], torch.Tensor],
    g: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    probes: torch.Tensor,
    lap_probes: torch.Tensor,
    A: torch.Tensor,
    fourth: bool,
) -> dict[str, torch.Tensor]:
    """The per-sample quantities at ``x`` (``(B, n)``), by float64 loops of ``autograd.grad``."""
    out: dict[str, torch.Tensor] = {}
    jac = _jacobian_rows(f(x), x)
    out["jacobian"] = jac
    diag = jac.diagonal(dim1=1, dim2=2)
    out["jacobian_diagonal"] = diag
    out["divergence"] = diag.sum(-1)
    out["hutchinson"] = torch.einsum("rbi,bij,rbj->rb", probes, jac, probes).mean(0)
    for method, spec in (("hutch++", "bij,rbj->rbi"), ("xtrace", "bji,rbj->rbi")):
        est = torchdiv.estimate_trace(
            lambda v, spec=spec: torch.einsum(spec, jac, v),
            x,
            method=method,
            probes=_sketch(method, x.shape),
        )
        out[method] = est.value
    yg = g(x)
    jg = _jacobian_rows(yg, x)
    hess = _hessians(jg, x)
    lap = hess.diagonal(dim1=2, dim2=3).sum(-1)
    out["laplacian"], out["value"], out["gradient"] = lap, yg, jg
    out["laplacian_hutchinson"] = torch.einsum(
        "rbj,bijk,rbk->rbi", lap_probes, hess, lap_probes
    ).mean(0)
    out["weighted"] = torch.einsum("jk,bijk->bi", A, hess)
    if fourth:
        out["biharmonic"] = _hessians(_jacobian_rows(lap, x), x).diagonal(dim1=2, dim2=3).sum(-1)
    return {k: v.detach() for k, v in out.items()}


def _sketch(method: str, shape: torch.Size) -> torch.Tensor:
    """Fixed probes for Hutch++ (``2n``: its sketch spans the event) and XTrace (``n``)."""
    n = shape[-1]
    g = torch.Generator().manual_seed(11)
    return torch.randn(n if method == "xtrace" else 2 * n, *shape, generator=g, dtype=f64)


Call = tuple[str, str, str, Callable[[], object]]


def calls(
    f: Callable[[torch.Tensor], torch.Tensor],
    g: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    bd: int,
    probes: torch.Tensor,
    lap_probes: torch.Tensor,
    A: torch.Tensor,
    fourth: bool,
) -> Iterator[Call]:
    """(operator, method, reference key, thunk) of every call; ``probes`` shaped for ``x``."""
    td = torchdiv

    for m in ("auto", "structured", "forward", "reverse"):
        yield (
            "divergence",
            m,
            "divergence",
            lambda m=m: td.divergence(f, x, batch_dims=bd, method=m),
        )
    for m in ("auto", "structured", "forward", "reverse"):
        yield (
            "jacobian_diagonal",
            m,
            "jacobian_diagonal",
            lambda m=m: td.jacobian_diagonal(f, x, batch_dims=bd, method=m),
        )
    yield (
        "divergence",
        "hutchinson",
        "hutchinson",
        lambda: td.divergence(f, x, batch_dims=bd, method="hutchinson", probes=probes),
    )
    for m in ("hutchinson", "hutch++", "xtrace"):
        r = probes if m == "hutchinson" else _sketch(m, x.shape)
        yield (
            "estimate_divergence",
            m,
            m,
            lambda m=m, r=r: td.estimate_divergence(f, x, batch_dims=bd, method=m, probes=r).value,
        )
    for m in ("auto", "forward", "reverse"):
        yield "jacobian", m, "jacobian", lambda m=m: td.jacobian(f, x, batch_dims=bd, method=m)
    for m in ("auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad"):
        yield "laplacian", m, "laplacian", lambda m=m: td.laplacian(g, x, batch_dims=bd, method=m)
    yield (
        "laplacian",
        "hutchinson",
        "laplacian_hutchinson",
        lambda: td.laplacian(g, x, batch_dims=bd, method="hutchinson", probes=lap_probes),
    )
    for m in ("auto", "taylor", "forward-over-reverse"):
        yield (
            "value_grad_laplacian",
            m,
            "vgl",
            lambda m=m: td.value_grad_laplacian(g, x, batch_dims=bd, method=m),
        )
    for m in ("auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad"):
        yield (
            "weighted_laplacian",
            m,
            "weighted",
            lambda m=m: td.weighted_laplacian(g, x, diffusion=A, batch_dims=bd, method=m),
        )
    if fourth:
        for m in ("auto", "taylor", "forward-over-reverse"):
            yield (
                "biharmonic",
                m,
                "biharmonic",
                lambda m=m: td.biharmonic(g, x, batch_dims=bd, method=m),
            )
    # the graph forms: the caller's own graph of the batched f
    yield (
        "graph_divergence",
        "auto",
        "divergence",
        lambda: td.graph_divergence(f(x), x, batch_dims=bd),
    )
    yield (
        "graph_divergence",
        "reverse",
        "divergence",
        lambda: td.graph_divergence(f(x), x, batch_dims=bd, method="reverse"),
    )
    yield (
        "graph_divergence",
        "hutchinson",
        "hutchinson",
        lambda: td.graph_divergence(f(x), x, batch_dims=bd, method="hutchinson", probes=probes),
    )
    yield "graph_jacobian", "reverse", "jacobian", lambda: td.graph_jacobian(f(x), x, batch_dims=bd)
    yield (
        "graph_laplacian",
        "reverse",
        "laplacian",
        lambda: td.graph_laplacian(g(x), x, batch_dims=bd),
    )
    # "auto" again: the routes and plans cached by the first calls
    again = "auto (again)"
    yield "divergence", again, "divergence", lambda: td.divergence(f, x, batch_dims=bd)
    yield "jacobian", again, "jacobian", lambda: td.jacobian(f, x, batch_dims=bd)
    yield "laplacian", again, "laplacian", lambda: td.laplacian(g, x, batch_dims=bd)


def _is_refusal(operator: str, exc: Exception) -> bool:
    return isinstance(exc, torchdiv.BatchInteractionError) or str(exc).startswith(operator)


@dataclass
class Outcome:
    silent: list[str]  # wrong numbers from watched calls: faults
    explicit: list[str]  # wrong numbers from the explicit methods (documented), LEFT_ALONE
    bare: list[str]  # errors that do not start with the operator's name
    refused: list[str]
    right: list[str]
    false_refusal: list[str]  # refusals of an f whose samples do not mix


def check(mixer: Mixer, mode: str, seed: int = 0, explicit: bool = True) -> Outcome:
    """Every call for ``mixer`` in ``mode`` (``"first"``, ``"warm"``, ``"bd2"``); the
    ``EXPLICIT`` ones at the first call only, and only where ``explicit``."""
    B = 2
    f_net = Net(mixer.op, mixer.n, mixer.m, mixer.n, seed)
    g_net = Net(mixer.op, mixer.n, mixer.m, 2, seed + 1)
    shape = (2, 2) if mode == "bd2" else (B,)
    bd = len(shape)
    x = _x(mixer, shape)
    xf = x.reshape(-1, mixer.n)
    gp = torch.Generator().manual_seed(5)
    n = mixer.n
    probes = torch.randn(4, *shape, n, generator=gp, dtype=f64)
    lap_probes = torch.randn(3, *shape, n, generator=gp, dtype=f64)
    a = torch.randn(n, n, generator=gp, dtype=f64)
    A = a @ a.T / n + torch.eye(n, dtype=f64)
    fourth = explicit and n <= 4 and mode == "first"  # (its reference: seconds)
    out = Outcome([], [], [], [], [], [])
    try:
        refs = references(
            f_net, g_net, xf, probes.reshape(4, -1, n), lap_probes.reshape(3, -1, n), A, fourth
        )
    except Exception as exc:
        out.refused.append(f"reference raised {type(exc).__name__}: {str(exc)[:100]}")
        return out
    if not all(bool(v.isfinite().all()) for v in refs.values()):
        out.refused.append("reference not finite")
        return out
    # whether the batched f's Jacobian has off-diagonal blocks (the mixing autograd sees)
    full = torch.autograd.functional.jacobian(lambda z: f_net(z), xf.detach())
    blocks = full.reshape(xf.shape[0], n, xf.shape[0], n)
    off = blocks.clone()
    for b in range(xf.shape[0]):
        off[b, :, b] = 0
    # (check_batch_independence's default rtol: a leak below 1e-6 of the largest gradient
    # entry passes, as documented)
    mixes = float(off.abs().max()) > 1e-6 * float(blocks.abs().max())
    f: Callable[[torch.Tensor], torch.Tensor] = f_net
    g: Callable[[torch.Tensor], torch.Tensor] = g_net
    if bd == 2:
        f, g = _flat(f_net), _flat(g_net)
    for operator, method, key, thunk in calls(f, g, x, bd, probes, lap_probes, A, fourth):
        where = f"{mixer.name} {mode} {operator}({method})"
        if (mode != "first" or not explicit) and (operator, method) in EXPLICIT:
            continue  # (watch nothing: documented; their numbers at the first call)
        if mode == "warm":  # a first call with the op on each sample alone, then the op
            f_net.per_sample = g_net.per_sample = True
            try:
                thunk()
            except torchdiv.BatchInteractionError as exc:
                out.false_refusal.append(f"{where} per-sample: {exc}"[:300])
            except Exception:  # (a batch norm of one sample; a rule the engine lacks)
                pass
            f_net.per_sample = g_net.per_sample = False
        try:
            got = thunk()
        except Exception as exc:
            msg = f"{where}: {type(exc).__name__}: {str(exc)[:200]}"
            # (every op here mixes samples somewhere, if not at this x: a sort whose order
            # keeps the samples in place is refused rightly, its order decided by values)
            if _is_refusal(operator, exc):
                out.refused.append(msg)
            else:
                out.bare.append(msg)
            continue
        if key == "vgl":
            assert isinstance(got, torchdiv.ValueGradLaplacian)
            parts = [
                (got.value, refs["value"]),
                (got.gradient, refs["gradient"]),
                (got.laplacian, refs["laplacian"]),
            ]
        else:
            assert isinstance(got, torch.Tensor)
            parts = [(got, refs[key])]
        bad = []
        for a_, e in parts:
            a_ = a_.detach().reshape(e.shape)
            scale = 1.0 + float(e.abs().max())
            err = float((a_ - e).abs().max())
            if not err <= TOL * scale:
                bad.append(f"max error {err:.3e} (scale {scale:.2e})")
        if not bad:
            out.right.append(where)
        elif (operator, method) in EXPLICIT or (mixer.name, operator, method) in LEFT_ALONE:
            out.explicit.append(f"{where}: {'; '.join(bad)}")
        else:
            out.silent.append(f"{where}: {'; '.join(bad)}")
    # the check itself: raises exactly where autograd sees mixing
    try:
        torchdiv.check_batch_independence(f, x, batch_dims=bd)
        if mixes:
            out.silent.append(f"{mixer.name} {mode} check_batch_independence passed a mixing f")
    except torchdiv.BatchInteractionError as exc:
        if not mixes:
            out.false_refusal.append(f"{mixer.name} {mode} check_batch_independence: {exc}"[:300])
    return out


MODES = ("first", "warm", "bd2")


def run(
    mixers: Iterator[Mixer],
    modes: tuple[str, ...] = MODES,
    verbose: bool = True,
    explicit: bool = True,
) -> Outcome:
    total = Outcome([], [], [], [], [], [])
    for mixer in mixers:
        for mode in modes:
            start = time.perf_counter()
            o = check(mixer, mode, explicit=explicit)
            took = time.perf_counter() - start
            for k in vars(total):
                getattr(total, k).extend(getattr(o, k))
            if verbose:
                counts = " ".join(f"{k}={len(v)}" for k, v in vars(o).items())
                print(f"## {mixer.name} {mode} {took:.2f}s {counts}", flush=True)
                for k in ("silent", "false_refusal", "bare", "explicit"):
                    for line in getattr(o, k):
                        print(k.upper(), line, flush=True)
    return total


# --- the faults found (each fails without its fix) -----------------------------------------


def _custom_net() -> tuple[Net, torch.Tensor]:
    """``Net`` around ``_MixGrad`` (forward per-sample, backward ``grad + grad.mean(0)``): a
    gradient normalised over the batch, as a user's gradient-scaling ``autograd.Function``."""
    mixer = next(hand_mixers(["custom_grad_mix"]))
    return Net(mixer.op, 3, 3, 3, 0), _x(mixer, (2,)).detach()


@pytest.mark.parametrize(
    ("operator", "options"),
    [
        ("divergence", {}),
        ("jacobian_diagonal", {}),
        ("jacobian", {}),
        ("divergence", {"method": "hutchinson", "num_probes": 1}),
        ("estimate_divergence", {"method": "hutch++", "num_probes": 3}),
    ],
)
def test_a_custom_function_whose_backward_mixes_is_refused(operator: str, options: dict) -> None:
    """A custom ``autograd.Function`` with a per-sample ``forward`` and a ``backward`` that adds
    the batch mean of the gradient: the watch follows the forward only, so ``"auto"`` and the
    estimators returned the batched trick's numbers silently (the divergence 0.33 off the
    per-sample loop's at 2; mixsweep34). Now the engine's own two products are checked,
    ``P (s v) = s P v`` (``watch.custom_products``), and the call refused by name."""
    net, x = _custom_net()
    with pytest.raises(torchdiv.BatchInteractionError, match=rf"^{operator}: .*custom autograd"):
        getattr(torchdiv, operator)(net, x, **options)
    with pytest.raises(torchdiv.BatchInteractionError):  # the check agrees
        torchdiv.check_batch_independence(net, x)


def test_a_custom_function_whose_backward_keeps_samples_apart_is_served() -> None:
    """The same ``Net`` around a custom ``Function`` whose backward is per-sample (the
    identity's): served by ``"auto"``, right against the float64 loop (1e-10: float64, a few
    dozen flops)."""

    class Plain(torch.autograd.Function):
        @staticmethod
        def forward(ctx: object, t: torch.Tensor) -> torch.Tensor:
            return t.clone()

        @staticmethod
        def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
            return grad * 1.0

    mixer = next(hand_mixers(["custom_grad_mix"]))
    net = Net(Plain.apply, 3, 3, 3, 0)
    x = _x(mixer, (2,))
    expected = _jacobian_rows(net(x), x).detach()
    got = torchdiv.jacobian(net, x.detach())
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    div = torchdiv.divergence(net, x.detach())
    torch.testing.assert_close(
        div, expected.diagonal(dim1=1, dim2=2).sum(-1), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("operator", ["laplacian", "value_grad_laplacian", "weighted_laplacian"])
def test_a_custom_function_whose_backward_mixes_under_the_laplacian(operator: str) -> None:
    """Left alone by mixsweep34, fixed by rev-a34: the Laplacians' ``"auto"`` record ``f``
    for the Taylor engine (no graph: no products to check), find no rule for the custom
    ``Function`` and fell back unwatched: the first call returned the batched trick's number
    (0.05 off the loop's). The fallback's evaluation is now watched, the Function's products
    checked (``methods.fallback``, ``custom_refused``)."""
    mixer = next(hand_mixers(["custom_grad_mix"]))
    g = Net(mixer.op, 3, 3, 2, 1)
    options = {"diffusion": torch.eye(3, dtype=f64)} if operator == "weighted_laplacian" else {}
    with pytest.raises(torchdiv.BatchInteractionError):
        getattr(torchdiv, operator)(g, _x(mixer, (2,)).detach(), **options)


@pytest.mark.parametrize(
    "name",
    ["logcumsumexp0", "broadcast_sum_T"],
)
@pytest.mark.parametrize("operator", ["divergence", "laplacian"])
def test_a_reduction_over_the_batch_then_a_transpose_is_refused(name: str, operator: str) -> None:
    """``x.logcumsumexp(0)`` (torchdiv's replacement: ``movedim``, a broadcast against a mask,
    ``logsumexp`` over the samples, ``movedim`` back) and the same by hand: the reduction
    marked its result mixed but left the batch axis on it past its dimensions, and the
    transpose after it raised a bare ``KeyError: 2`` blamed on ``f`` (mixsweep34); now
    refused by name."""
    ops: dict[str, Op] = {
        "logcumsumexp0": HAND["logcumsumexp0"],
        "broadcast_sum_T": lambda t: (
            (t.T[..., None, :] * torch.ones(2, 1, dtype=t.dtype)).sum(-1).T
        ),
    }
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=f64)
    with pytest.raises(torchdiv.BatchInteractionError, match=rf"^{operator}: f mixes samples"):
        getattr(torchdiv, operator)(ops[name], x)


def _assert_none(o: Outcome) -> None:
    assert o.refused, "no call refused: the sample kept no mixing op"
    found = o.silent + o.bare + o.false_refusal
    assert not found, "\n".join(found)


@pytest.mark.parametrize("mode", MODES)
def test_hand_mixers_fixed_sample(mode: str) -> None:
    """``HAND_FAST``'s ops (one per family: reductions, sorts, products, FFTs, indexing,
    reshapes, batch norm, tiny mixing, mixing only in the first or second derivative), the
    watched calls: each refused or the per-sample value."""
    names = HAND_FAST if mode == "first" else HAND_FAST_AGAIN
    o = run(hand_mixers(names), (mode,), verbose=False, explicit=False)
    _assert_none(o)


@pytest.mark.slow
def test_hand_mixers_all() -> None:
    """All of ``HAND``, every call and mode (the explicit methods' numbers counted apart)."""
    _assert_none(run(hand_mixers(), verbose=False))


# OpInfo ops whose samples mix the batch: a fixed sample (cases(keep=_mixes) over all of
# op_db takes minutes: ``__main__``)
OPINFO_FAST = ["cumsum", "fft.fftshift"]
OPINFO_SLOW = [
    "cdist", "cumprod", "cummax", "flip", "roll", "rot90", "nn.functional.normalize",
    "nn.functional.batch_norm", "_batch_norm_with_update", "renorm", "log_softmax", "msort",
    "fft.fft2", "fft.rfftn", "fft.irfft2", "masked.cumsum", "masked.softmax", "put",
]  # fmt: skip


def test_opinfo_mixers_fixed_sample() -> None:
    """``OPINFO_FAST``'s first mixing sample each, at the first call, the watched calls."""
    _assert_none(run(opinfo_mixers(OPINFO_FAST), ("first",), verbose=False, explicit=False))


@pytest.mark.slow
def test_opinfo_mixers_larger_sample() -> None:
    _assert_none(run(opinfo_mixers(OPINFO_SLOW), verbose=False))


if __name__ == "__main__":
    torch.set_num_threads(1)
    # ``hand``: HAND's ops; ``opinfo``: OpInfo's; or names of either
    names = sys.argv[1:] or ["hand", "opinfo"]
    if "hand" in names or any(n in HAND for n in names):
        run(hand_mixers(None if "hand" in names else names))
    rest = [n for n in names if n not in HAND and n != "hand"]
    if rest:
        run(opinfo_mixers(None if "opinfo" in rest else rest))
