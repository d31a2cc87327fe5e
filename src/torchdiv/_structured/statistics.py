"""Group norms split off: a coloured diagonal plus an exact low-rank correction.

A group norm reads every position of its group, so a conv net with one has no local
Jacobian and no colouring (``colors``). Its dependence on far positions goes through two
numbers per group and image, the mean and the inverse standard deviation. Write ``f`` as
``F(x, s)``, the net whose group norms use the statistics ``s`` given instead of their own,
and ``S(x)`` for the statistics the real net computes (each group norm's from its real
input, later ones through earlier ones); then ``f(x) = F(x, S(x))`` and, per sample,

    J = F_x + F_s dS/dx,        J_ii = (F_x)_ii + sum_k (F_s e_k)_i (dS_k/dx)_i.

``F_x`` (statistics held at their values) is local again: its diagonal comes from the
colouring of ``F(., S(x))`` (``forward``). Each of the ``K`` statistics of an image costs
one forward direction through ``F(x, .)`` (a column ``F_s e_k``, for all images at once:
an image's statistics reach only its own output) and one vector-Jacobian product of the
real net (a row ``dS_k/dx``, by autograd); their products summed over ``k`` are the
correction. The plan is chosen only when its directions, ``colours + 3 K`` (a backward
pass counted as two), are fewer than ``PAYS`` of the ``n`` unit vectors of plain column
propagation: torchdiffeq's MNIST ODE-Net dynamics on 64 x 8 x 8 states take 576 colours
and 192 statistics for 4096 unit vectors, an attention-free U-Net on 3 x 64 x 64 images 3072
colours and 136 statistics for 12288 (timed in ``bench/images.py``); and only on states
large enough for its fixed cost (``SPLIT_WORK``).

Values and gradients: the statistics enter ``F`` as tensors of the autograd graph (through
the parameters, and ``x`` when it requires grad), so the diagonal is differentiable as
the other plans' (a gradient through ``F``'s use of ``S`` and through ``dS/dx`` included).
``f`` is evaluated three more times (the statistics with autograd, two recordings): not
planned where it draws random numbers or changes state outside its tensors, for group
norms of half-precision inputs (autocast), under a process group, for a share of the
directions (``torchdiv.distributed``), or inside ``allow_batch_interaction`` (the correction
assumes that an image's statistics reach only its own output).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from torchdiv._core.basis import basis, batched, chunks
from torchdiv._core.checks import event_numel, out_of_memory
from torchdiv._core.ddp import in_process_group
from torchdiv._core.mixing.errors import allowed
from torchdiv._core.modes import SafeDerivatives
from torchdiv._core.walk import search, vjp
from torchdiv._structured import colors, forward
from torchdiv._taylor import RULES, Graph, capture, values

Function = Callable[[torch.Tensor], torch.Tensor]

# the split plan runs when colours + 3 K is at most this share of the n unit vectors
PAYS = 0.75
# ... and when N n^2 (n unit vectors through N samples of n elements) is at least this: its
# three more evaluations of f and two recordings cost ~14 ms whatever the size, which plain
# columns beat on small states (bench/split_threshold.py: torchdiffeq's dynamics with 4
# channels and 2 groups, one thread: 3.4x slower at N = 3, n = 100, 1.28x at n = 256, 0.61x
# at n = 400; at N = 32, 1.17x at n = 100, 0.59x at n = 144)
SPLIT_WORK = 1 << 18
_GROUP_NORMS = (F.group_norm, torch.group_norm)
_GROUP_NORM = torch.ops.aten.native_group_norm.default
_NAMES = ("input", "num_groups", "weight", "bias", "eps")


class _Mismatch(RuntimeError):
    """A later evaluation of ``f`` called its group norms otherwise than the first."""


@dataclass
class Split:
    """The plan: ``F(., S(x))`` recorded (``fixed``, whose output is ``f(x)``) with its
    colouring, and what the correction needs (``_measured``'s input and statistics, those
    statistics as ``F`` reads them, ``held``: detached where no graph is kept, so that
    ``held.requires_grad`` says whether the products keep one)."""

    fixed: Graph
    coloring: torch.Tensor
    x_in: torch.Tensor
    stats: torch.Tensor
    held: torch.Tensor
    sizes: list[int]

    def describe(self, n: int) -> str:
        colours, k = int(self.coloring.max()) + 1, self.held.shape[1]
        return f"colours: {colours} directions and {k} group-norm statistics for {n} unit vectors"


def planned(
    f: Function, graph: Graph, kept: list[list[Any]], x: torch.Tensor, batch_dims: int
) -> Split | None:
    """The split of ``f`` at ``x`` if it applies and pays (see the module), else ``None``;
    ``graph``: ``f``'s own recording at ``x``, ``kept`` its values. Whether it pays is read
    first from ``graph`` itself, its group norms taken as position-wise (the colouring
    ``F(., S(x))`` will have), before ``f`` is evaluated again; a structure found not to pay
    is also remembered with the graph's template (``torchdiv._taylor.cache``)."""
    n, k = event_numel(x, batch_dims), _statistics(graph)
    derived = {} if graph.template is None else graph.template.derived
    if derived.get("statistics") is False or not _splittable(graph, x, batch_dims, n, k):
        return None
    coloring = colors.colors(graph, kept, x, batch_dims, held=True)
    if coloring is None or _directions(coloring, k) > PAYS * n:
        derived["statistics"] = False
        return None
    try:
        found = _plan(f, x, batch_dims, n)
    except (RuntimeError, TypeError) as error:  # _Mismatch included: columns instead
        if out_of_memory(error):
            raise
        found = None
    if found is None:
        derived["statistics"] = False
    return found


def diagonal(
    split: Split, graph: Graph, f: Function, x: torch.Tensor, chunk_size: int | None
) -> torch.Tensor | None:
    """Every sample's Jacobian diagonal ``(N, n)`` by ``split``, or ``None`` (remembered with
    ``graph``'s template, as in ``planned``) where its backward passes fail: a checkpointed
    block's recomputation in them runs the real group norms, which autograd refuses to match
    with the measured ones."""
    try:
        diag = forward.diagonal(split.fixed, x, 1, chunk_size, split.coloring)
        correction = _correction(split, f, x, chunk_size)
    except (RuntimeError, TypeError) as error:
        if out_of_memory(error):
            raise
        if graph.template is not None:
            graph.template.derived["statistics"] = False
        return None
    return diag if correction is None else diag + correction


def _splittable(graph: Graph, x: torch.Tensor, batch_dims: int, n: int, k: int) -> bool:
    """One batch dimension, group norms with few enough statistics (``k`` per sample), a
    state large enough for the split's fixed cost (``SPLIT_WORK``), nothing random or
    stateful, no process group, mixing detection on
    (``allow_batch_interaction``: one image's statistics may reach another's output, which
    the correction's columns and rows, each for all images at once, would sum over
    separately)."""
    return (
        batch_dims == 1
        and x.dim() > 2
        and 0 < 3 * k < PAYS * n
        and x.numel() * n >= SPLIT_WORK
        and not graph.changed
        and not in_process_group()
        and not allowed()
        and not any(torch.Tag.nondeterministic_seeded in node.func.tags for node in graph.nodes)
    )


def _statistics(graph: Graph) -> int:
    """Statistics per sample of ``graph``'s group norms: a mean and an inverse standard
    deviation per group."""
    return sum(2 * int(node.args[6]) for node in graph.nodes if node.func is _GROUP_NORM)


def _directions(coloring: torch.Tensor, k: int) -> int:
    """The split's cost in forward directions: its colours, and per statistic (``k``) a
    forward direction and a backward pass counted as two."""
    return int(coloring.max()) + 1 + 3 * k


def _plan(f: Function, x: torch.Tensor, batch_dims: int, n: int) -> Split | None:
    x_in, stats, sizes = _measured(f, x)
    if stats is None:
        return None
    graphs = torch.is_grad_enabled() and (x.requires_grad or search(stats, x_in).others)
    held = stats if graphs else stats.detach()
    fixed = capture(lambda z: _given(f, z, held, sizes), x, RULES, keep_values=True)
    if fixed.unsupported:
        return None
    coloring = colors.colors(fixed, values(fixed, x), x, batch_dims)
    if coloring is None or _directions(coloring, held.shape[1]) > PAYS * n:
        return None
    return Split(fixed, coloring, x_in, stats, held, sizes)


def _measured(f: Function, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """``f`` at a copy of ``x`` that requires grad (``x`` itself if it does), with its group
    norms' statistics computed by autograd: that input, ``S(x)`` flat ``(N, K)`` (per group
    norm, its means then its inverse standard deviations), and each group norm's groups."""
    x_in = x if x.requires_grad else x.detach().requires_grad_(True)
    mode = _Statistics(x.shape[0], None, [])
    with torch.enable_grad():
        with mode, SafeDerivatives(1, "method='auto'"):
            f(x_in)
        stats = torch.cat(mode.found, 1) if mode.found else None
    return x_in, stats, mode.sizes


def _given(f: Function, z: torch.Tensor, held: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``F(z, held)``: ``f`` at ``z`` with its group norms' statistics read from ``held``."""
    mode = _Statistics(z.shape[0], held, sizes)
    with mode:
        y = f(z)
    if mode.at != len(sizes):
        raise _Mismatch("f called fewer group norms than when measured")
    return y


def _correction(
    split: Split, f: Function, x: torch.Tensor, chunk_size: int | None
) -> torch.Tensor | None:
    """``sum_k (F_s e_k) * dS_k/dx`` per sample, ``(N, n)``; ``None`` if ``S`` does not
    depend on ``x``. Columns by forward propagation through ``F(x, .)``, rows by batched
    vector-Jacobian products, ``chunk_size`` statistics (or a planned chunk) at a time."""
    held = split.held
    tail = capture(lambda s: _given(f, x, s, split.sizes), held, RULES)  # s -> F(x, s)
    if tail.unsupported:
        raise _Mismatch(", ".join(tail.unsupported))
    k_all = held.shape[1]
    chunk = chunk_size or tail.chunk(k_all, forward.CHUNK_ELEMENTS)
    every = torch.arange(k_all)
    constants: dict[int, list[Any]] = {}
    total = None
    for start, stop in chunks(k_all, chunk):
        columns = forward.columns(tail, held, 1, every, start, stop, constants)
        cotangents = basis(start, stop, split.stats, 1)
        rows = _rows(split.stats, split.x_in, cotangents, held.requires_grad)
        if rows is None:
            return None
        part = (columns * rows.reshape(columns.shape)).sum(0)
        total = part if total is None else total + part
    return total


def _rows(
    stats: torch.Tensor, x_in: torch.Tensor, basis: torch.Tensor, graphs: bool
) -> torch.Tensor | None:
    """``basis @ dS/dx`` for ``(k, N, K)`` cotangents: one batched backward pass, or one per
    cotangent where ``vmap`` cannot batch the graph's backward (a channels-last group norm)."""
    try:
        found = batched(lambda v: _product(stats, x_in, v, graphs), basis)
        return found[0] if found else None
    except RuntimeError as error:
        if out_of_memory(error):
            raise
    products = [vjp(stats, x_in, v, graphs) for v in basis]
    if products[0] is None:
        return None
    return torch.stack([p for p in products if p is not None])


def _product(
    stats: torch.Tensor, x_in: torch.Tensor, v: torch.Tensor, graphs: bool
) -> tuple[torch.Tensor, ...]:
    out = vjp(stats, x_in, v, graphs)
    return () if out is None else (out,)


class _Statistics(TorchFunctionMode):
    """Group norms computed from statistics: measured from their inputs (``held`` is
    ``None``; kept in ``found``, their group counts in ``sizes``) or read from ``held``, a
    flat ``(N, K)`` tensor laid out as ``_measured`` makes it, in call order."""

    def __init__(self, samples: int, held: torch.Tensor | None, sizes: list[int]) -> None:
        super().__init__()
        self.samples, self.held, self.sizes = samples, held, sizes
        self.found: list[torch.Tensor] = []
        self.at = self.offset = 0

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func not in _GROUP_NORMS:
            return func(*args, **kwargs)
        a, groups, weight, bias, eps = _arguments(args, kwargs)
        if a.dim() < 2 or a.shape[0] != self.samples or a.shape[1] % groups:
            raise _Mismatch("a group norm whose input is not laid out by sample and channel")
        if a.dtype not in (torch.float32, torch.float64):  # (autocast: its own precision)
            raise _Mismatch("a group norm of a half-precision input")
        mean, rstd = self._statistics(a, groups, eps)
        return _normalized(a, mean, rstd, weight, bias)

    def _statistics(
        self, a: torch.Tensor, groups: int, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.held is None:
            grouped = a.reshape(a.shape[0], groups, -1)
            var, mean = torch.var_mean(grouped, -1, correction=0)
            rstd = torch.rsqrt(var + eps)
            self.found += [mean, rstd]
            self.sizes.append(groups)
            return mean, rstd
        if self.at >= len(self.sizes) or self.sizes[self.at] != groups:
            raise _Mismatch("f called its group norms otherwise than when measured")
        start = self.offset
        self.at, self.offset = self.at + 1, start + 2 * groups
        return self.held[:, start : start + groups], self.held[:, start + groups : self.offset]


def _arguments(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """``(input, num_groups, weight, bias, eps)`` of a ``group_norm`` call."""
    given = dict(zip(_NAMES, args, strict=False)) | {k: kwargs[k] for k in _NAMES if k in kwargs}
    return (
        given["input"],
        given["num_groups"],
        given.get("weight"),
        given.get("bias"),
        given.get("eps", 1e-5),
    )


def _normalized(
    a: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``(a - mean) * rstd * weight + bias`` with ``(N, G)`` statistics spread over each
    group's channels by ``index_select`` (a position-wise op: no spatial axes merged)."""
    channels = a.shape[1]
    group = torch.arange(channels, device=a.device) // (channels // mean.shape[1])
    spread = (a.shape[0], channels, *[1] * (a.dim() - 2))
    scale = rstd.index_select(1, group)
    if weight is not None:
        scale = scale * weight
    out = (a - mean.index_select(1, group).reshape(spread)) * scale.reshape(spread)
    if bias is not None:
        out = out + bias.reshape(1, channels, *[1] * (a.dim() - 2))
    return out
