"""Exact divergences and Laplacians of one batch, their directions shared out across ranks.

An exact divergence costs one Jacobian-vector product per event element (or per colour, or per
column of the structured engine); a Laplacian, one Taylor-mode direction per element. For an
event too large for one device's time budget (the exact likelihood of an image), the ranks of
a ``torch.distributed`` process group that hold the *same* batch can each take a contiguous
share of those directions (or of the probes of a Hutchinson estimate) and add their partial
traces with one all-reduce:

    div f(x)_b = sum_{r < R} sum_{i in S_r} J_b[i, i],      S_r = [n r / R, n (r + 1) / R)

Every rank gets the same result, equal to one process's up to the order of the sum.

Gradients. The all-reduce is differentiable; its backward adds the ranks' incoming gradients,
so each rank's parameters receive ``R`` times the gradient of its own share. Averaging
parameter gradients over the ranks (what ``DistributedDataParallel`` does) then gives one
process's gradient. ``x``'s gradient is averaged by nobody, so ``x`` enters the computation
through an identity whose backward averages over the ranks (``_Replicated``): every rank's
``x`` gets ``(1/R) sum_r R grad_r = sum_r grad_r``, the gradient of the whole batch, as in one
process (``torch.autograd.grad(loss, x)``, gradient penalties, ``create_graph=True``: that
backward is an all-reduce too, so it can be differentiated again). Other tensors ``f`` closes
over count as parameters: one that requires grad receives ``R`` times its own share's
gradient on each rank; average its gradient over the ranks (``all_reduce``, divide by ``R``)
or pass it through ``x``. With a different loss on each rank, the gradients are those of the
mean of the ranks' losses. Composed with data parallelism over samples, each group of ranks
that shares a batch passes its own ``group`` (``torch.distributed.new_group``), DDP averages
over all ranks, and the result is again the gradient of the mean loss over all batches.

Every rank's backward pass must run the same collectives. A rank whose share is empty (fewer
directions or probes than ranks, or a chain the first rank computes whole) therefore
computes the whole part times zero (cheap: fewer directions than ranks, or a few forward
passes): its graph then reaches what the other ranks' graphs reach, at every order of
differentiation, and so do its backward all-reduces. Where ``f`` is piecewise linear in
``x`` (ReLU), a share of the structured or Taylor engine has no path to ``x`` while another
rank's may: every rank's divergence part is tied to ``x`` (a zero derivative at every order,
``_core.tie``; the Laplacian's engine ties its own), so every rank reaches ``x``'s backward
all-reduce (``_Replicated``), and ``torch.autograd.grad(result.sum(), x)`` gives zeros
rather than raising.

Every rank must call with the same ``f`` (same parameters), the same ``x`` and the same
options: the work is split by position, not negotiated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from torchdiv._api.reporting import reported
from torchdiv._core.basis import WHOLE, Share
from torchdiv._core.checks import (
    check_callable,
    check_chunk_size,
    check_exact_options,
    check_input,
    check_method,
    checked,
    event_numel,
)
from torchdiv._core.ddp import joined
from torchdiv._core.modes import outside_inference_mode
from torchdiv._core.tie import tied
from torchdiv._estimators import stochastic as _stochastic
from torchdiv._estimators import trace as _trace
from torchdiv._exact import dispatch as _exact
from torchdiv._laplacian import methods as _laplacian
from torchdiv._taylor import RULES, capture

__all__ = ["divergence", "laplacian"]

Function = Callable[[torch.Tensor], torch.Tensor]
DIVERGENCE_METHODS = ("auto", "structured", "forward", "reverse", "hutchinson")


@outside_inference_mode
@reported("distributed.divergence")
def divergence(
    f: Function,
    x: torch.Tensor,
    *,
    group: torch.distributed.ProcessGroup | None = None,
    batch_dims: int = 1,
    method: str = "auto",
    chunk_size: int | None = None,
    num_probes: int | None = None,
    generator: torch.Generator | None = None,
    probe: str | None = None,
) -> torch.Tensor:
    r"""``torchdiv.divergence`` of one batch, its directions shared out across ``group``'s ranks.

    Each rank takes a contiguous share of the directions ``method`` uses and the partial
    traces are added by one differentiable all-reduce (module docstring): the exact methods
    share the unit vectors (``"forward"``, ``"reverse"``), the colours or columns of the
    structured engine (``"auto"``, ``"structured"``; a chain such as an MLP costs a few forward
    passes whatever the event, so the first rank computes it whole); ``"hutchinson"`` shares
    its ``num_probes`` probes, drawn on the group's first rank and broadcast.

    Args:
        f: as in ``torchdiv.divergence``, the same on every rank of ``group``.
        x: as in ``torchdiv.divergence``, the same batch on every rank of ``group``.
        group: the process group whose ranks share the work (``None``: the default group).
        batch_dims: number of leading batch dimensions.
        method: ``"auto"``, ``"structured"``, ``"forward"``, ``"reverse"`` (exact) or
            ``"hutchinson"``.
        chunk_size: at most this many of the rank's directions in flight at once.
        num_probes: Hutchinson's products per sample, over all ranks.
        generator: ``torch.Generator`` for the probes (used on the group's first rank).
        probe: ``"rademacher"`` (default), ``"gaussian"`` or ``"sphere"``.

    Returns:
        Shape ``x.shape[:batch_dims]``, the same on every rank of ``group``; differentiable:
        averaging the parameters' gradients over the ranks (as ``DistributedDataParallel``
        does) gives one process's gradient, and ``x``'s gradient is one process's on every
        rank (module docstring).

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        ValueError: this process is not in ``group``; otherwise as ``torchdiv.divergence``.

    Examples:
        >>> import tempfile, torch.distributed as dist
        >>> store = f"file://{tempfile.mkdtemp()}/store"
        >>> dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
        >>> A = torch.tensor([[2.0, 1.0], [7.0, -5.0]])
        >>> divergence(lambda x: x @ A.T, torch.randn(3, 2))  # every rank: tr(A)
        tensor([-3., -3., -3.])
        >>> dist.destroy_process_group()
    """
    fn = "distributed.divergence"
    check_callable(fn, f)
    check_input(fn, x, batch_dims)
    check_method(fn, method, DIVERGENCE_METHODS)
    check_chunk_size(fn, chunk_size)
    share = _share(fn, group)  # after the arguments: a bad one is named, group or none
    g = checked(fn, f, x, batch_dims, square=True)
    x = _replicated(x, group)
    if method == "hutchinson":
        part = _hutchinson_share(fn, g, x, batch_dims, chunk_size, share, group,
                                 num_probes, probe, generator)  # fmt: skip
    else:
        check_exact_options(fn, method, num_probes, generator, probe, None)
        part, y = _exact.diagonal_and_output(fn, g, x, batch_dims, method, chunk_size, True, share)
        if y.requires_grad and not part.requires_grad:  # no colours here, or a chain (above)
            whole, y = _exact.diagonal_and_output(fn, g, x, batch_dims, method, chunk_size, True)
            part = part + whole * 0  # the graph of the others (module docstring)
        part = joined(part, y)  # x empty, or f's divergence depends on nothing differentiable
    part = part.reshape(x.shape[:batch_dims]).to(x.dtype)
    return _all_reduce(tied(part, x), group)  # on x's graph on every rank (module docstring)


@outside_inference_mode
@reported("distributed.laplacian")
def laplacian(
    f: Function,
    x: torch.Tensor,
    *,
    group: torch.distributed.ProcessGroup | None = None,
    batch_dims: int = 1,
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""``torchdiv.laplacian`` of one batch, its unit directions shared out across ``group``.

    Each rank propagates a contiguous share of the event's unit directions through the
    collapsed Taylor engine (``method="taylor"``; Hessian columns by forward over reverse,
    ``"forward-over-reverse"``, where an op has no Taylor rule) and the partial sums of second
    derivatives are added by one differentiable all-reduce (module docstring).

    Args:
        f: as in ``torchdiv.laplacian``, the same on every rank of ``group``.
        x: as in ``torchdiv.laplacian``, the same batch on every rank of ``group``.
        group: the process group whose ranks share the work (``None``: the default group).
        batch_dims: number of leading batch dimensions.
        chunk_size: at most this many of the rank's directions in flight at once.

    Returns:
        Shape ``x.shape[:batch_dims] + f(x).shape[batch_dims:]``, the same on every rank;
        differentiable as ``divergence``'s.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        ValueError: this process is not in ``group``; otherwise as ``torchdiv.laplacian``.

    Examples:
        >>> import tempfile, torch.distributed as dist
        >>> store = f"file://{tempfile.mkdtemp()}/store"
        >>> dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> lap = laplacian(lambda x: x.pow(3).sum(-1), x)  # sum_i 6 x_i
        >>> torch.allclose(lap, 6 * x.sum(-1))
        True
        >>> dist.destroy_process_group()
    """
    fn = "distributed.laplacian"
    check_callable(fn, f)
    check_input(fn, x, batch_dims)
    check_chunk_size(fn, chunk_size)
    share = _share(fn, group)  # after the arguments: a bad one is named, group or none
    g = checked(fn, f, x, batch_dims, square=False)
    x = _replicated(x, group)
    if x.numel() == 0:  # nothing to add on any rank; they all still reduce
        return _all_reduce(_idle(g, x), group)
    n = event_numel(x, batch_dims)
    start, stop = share.of(n)
    if start == stop:  # fewer directions than ranks: the whole, times zero (module docstring)
        return _all_reduce(_laplacian_share(g, x, batch_dims, chunk_size, WHOLE) * 0, group)
    return _all_reduce(_laplacian_share(g, x, batch_dims, chunk_size, share), group)


def _laplacian_share(
    f: Function, x: torch.Tensor, batch_dims: int, chunk_size: int | None, share: Share
) -> torch.Tensor:
    """The part of the Laplacian from a (non-empty) ``share`` of the unit directions, shape
    ``x.shape[:batch_dims] + f(x).shape[batch_dims:]``: Taylor mode, else forward over
    reverse."""
    graph = capture(f, x, RULES, batch_dims=batch_dims)
    chunk = chunk_size or graph.chunk(event_numel(x, batch_dims), _laplacian.CHUNK_ELEMENTS)
    part = _laplacian.collapsed_or_none(
        graph, x, _laplacian.unit_directions(x, batch_dims, chunk, share)
    )
    if part is None:
        part = _laplacian.forward_over_reverse(f, x, batch_dims, chunk, share)
    return part


def _share(fn: str, group: torch.distributed.ProcessGroup | None) -> Share:
    """This rank's share of the directions."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(
            f"{fn}: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first (in one process, use torchdiv's "
            "functions of the same name)"
        )
    rank = torch.distributed.get_rank(group)
    if rank < 0:
        raise ValueError(f"{fn}: this process is not a member of group {group!r}")
    return Share(rank, torch.distributed.get_world_size(group))


def _hutchinson_share(
    fn: str,
    f: Function,
    x: torch.Tensor,
    batch_dims: int,
    chunk_size: int | None,
    share: Share,
    group: torch.distributed.ProcessGroup | None,
    num_probes: int | None,
    probe: str | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """This rank's part of a Hutchinson estimate: its share of the probes (drawn on the
    group's first rank, broadcast), weighted by its share of their number."""
    s = _trace.sampling(
        fn, x, batch_dims, "hutchinson", num_probes, probe, None, generator, methods=("hutchinson",)
    )
    v = _trace.vectors(s, x, batch_dims).contiguous()  # (m, N, n)
    first = 0 if group is None else torch.distributed.get_global_rank(group, 0)
    torch.distributed.broadcast(v, src=first, group=group)
    start, stop = share.of(s.num_probes)
    if start == stop:  # fewer probes than ranks: all of them, times zero (module docstring)
        return _probes_part(f, x, batch_dims, chunk_size, s, v, 0, s.num_probes) * 0
    return _probes_part(f, x, batch_dims, chunk_size, s, v, start, stop)


def _probes_part(
    f: Function,
    x: torch.Tensor,
    batch_dims: int,
    chunk_size: int | None,
    s: _trace.Sampling,
    v: torch.Tensor,
    start: int,
    stop: int,
) -> torch.Tensor:
    """The part of the Hutchinson estimate from probes ``start:stop`` of ``v`` (``(m, N, n)``),
    weighted by their share of ``s.num_probes``; shape ``(N,)``."""
    mine = v[start:stop].reshape(stop - start, *x.shape).to(x.dtype)
    part = dataclasses.replace(s, num_probes=stop - start, probes=mine, generator=None)
    estimate = _stochastic.trace_of_function(f, x, batch_dims, part, chunk_size)
    return estimate.value * ((stop - start) / s.num_probes)


def _idle(f: Function, x: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like ``f(x)``, for an empty ``x`` (every rank alike): with a zero gradient
    to what ``f(x)`` depends on, so that the backward pass's all-reduce runs."""
    y = f(x)
    return joined(torch.zeros_like(y), y)


def _all_reduce(part: torch.Tensor, group: torch.distributed.ProcessGroup | None) -> torch.Tensor:
    """The sum of every rank's ``part``, differentiably (``_Summed``)."""
    summed: torch.Tensor = _Summed.apply(part, group)
    return summed


def _replicated(x: torch.Tensor, group: torch.distributed.ProcessGroup | None) -> torch.Tensor:
    """``x`` through ``_Replicated`` where a gradient can reach it; else ``x`` itself."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return x
    replicated: torch.Tensor = _Replicated.apply(x, group)
    return replicated


class _Replicated(torch.autograd.Function):
    """The identity on ``x``, the same batch on every rank of ``group``, whose backward
    averages the ranks' gradients: each rank's is ``R`` times its share's (``_Summed``), so
    the mean is the sum of the shares, the whole batch's gradient. The backward is ``_Summed``
    divided by ``R``, itself differentiable (twice and more)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: torch.distributed.ProcessGroup | None) -> Any:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> tuple[torch.Tensor, None]:
        summed = _Summed.apply(grad_outputs[0], ctx.group)
        return summed / torch.distributed.get_world_size(ctx.group), None


class _Summed(torch.autograd.Function):
    """All-reduce (sum) over ``group``, whose backward all-reduces the incoming gradients: the
    gradient of the sum with respect to each rank's part is the sum of every rank's gradient
    of its loss with respect to the sum (twice differentiable)."""

    @staticmethod
    def forward(
        ctx: Any, part: torch.Tensor, group: torch.distributed.ProcessGroup | None
    ) -> torch.Tensor:
        ctx.group = group
        out = part.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> tuple[torch.Tensor, None]:
        return _Summed.apply(grad_outputs[0], ctx.group), None
