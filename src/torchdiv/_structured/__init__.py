"""``method="structured"``: exact divergences and Jacobian diagonals that exploit the graph.

Generic recipes pay for the whole ``n x n`` Jacobian of every sample. Here ``f`` is captured
once (the Laplacian engine's recorder, ``torchdiv._taylor``), and the cheapest exact plan is
chosen from what it computes:

1. A *chain* (``factors``): shared linear maps and elementwise functions joined by sums,
   e.g. MLPs, residual MLPs ``x + g(x)``, time conditioning by concatenation or by gates
   (FFJORD's ``ConcatSquashLinear``). Its divergence by trace cyclicity (``cycle``) costs a
   few forward passes, whatever ``n``; its diagonal carries the first layer's columns
   through the middle layers and reads the last one on the diagonal only.
2. Otherwise forward propagation of Jacobian columns (``forward``), reading only the
   diagonal, with the unit vectors compressed by a colouring when the graph is local
   (``colors``: convolutions, pooling, resampling, elementwise ops), e.g. 48 instead of 768
   directions for a three-layer 3x3 conv net on 3 x 16 x 16 images. A conv net with group norms is
   coloured with its statistics held, plus their exact part (``statistics``), when that
   pays.

An op outside the engine's rules makes the plan fail: ``"auto"`` then uses the generic
engines, ``"structured"`` raises ``NotImplementedError`` naming the op.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from torchdiv._core import crossover
from torchdiv._core.basis import WHOLE, Share
from torchdiv._core.checks import out_of_memory, raised_by_f
from torchdiv._core.crossover import held, traced, work
from torchdiv._core.modes import recorded
from torchdiv._structured import colors, cycle, factors, forward, statistics
from torchdiv._taylor import RULES, Graph, UnsupportedOp, capture, values
from torchdiv._taylor import cache as _cache
from torchdiv._taylor.capture import Ref, way_out

Function = Callable[[torch.Tensor], torch.Tensor]


# "auto" leaves problems with at most this many (unit vectors x elements of x) to the generic
# engines: recording f costs more than their whole exact computation (a 2-D flow with B=256:
# 2.7 ms recorded and planned against 1.1 ms for two batched VJPs, on a 2-core CPU)
TINY_PROBLEM = 1 << 12

# the structures at which "auto" found no rule for an op of ``f`` (``Graph.unsupported``), by
# ``cache.site``: a later call there goes to the generic engines without recording ``f``
# again (``refused_before``)
_REFUSED = _cache.Refusals()


# "auto" leaves a Jacobian diagonal (not a trace) to the generic engines' plain-autograd rows
# (one batched backward pass, ``_exact.dispatch._plain_first``, up to ``_core.crossover.
# ROWS_PROBLEM``) where their work ``n x B x W`` (``crossover.work``) is at most this (frozen)
# or ``ROWS_DIAGONAL_WORK_TRAINED`` (parameters that require grad, under grad mode: the
# columns then carry their graph), for a module without convolutions (``rows_diagonal``). Per
# sample, the structured engine's diagonal of a chain costs less than the rows' backward
# passes at large batches, but each call also checks its recording and builds the chain's
# factors (Python at any size, one thread): the rows win below the work where the two meet.
# Structured / rows, tanh MLPs D -> w -> w -> D, thread CPU time, one thread, alternated in
# one process (bench/diagonal_choice.py, medians of 5-7 rounds, a 2-core machine shared with
# other sessions; percall32, after the chain's rows lost most of their Python, percall30-31),
# work in units of 2**20, frozen / trained: w = 64: 1.75 / 1.82 at 5.1 (D = 8, B = 128),
# 1.48 / 1.53 at 10.3 (B = 256), 1.41 / 1.45 at 15.4, 1.48 / 1.36 at 20.5 (B = 512), 1.28 /
# 1.39 at 24.6 (D = 16, B = 256), 1.24 / 1.25 at 32.6 (D = 32, B = 128), 1.23 / 1.35 at 36.8,
# 1.33 / 1.25 at 41.1 (D = 8, B = 1024; 1.04 / 1.12 in a second run), 1.21 / 1.27 at 33.8
# (D = 12, B = 512), 1.16 / 1.06 at 42.3 (B = 640), 1.56 / 1.22 at 37.0 (D = 4, B = 2048),
# 1.07 / 1.41 at 46.3 (B = 2560), 1.18 / 1.22 at 49.1 (D = 16, B = 512, just past the
# limit); from ~60 the two meet, by the batch more than by the work: 0.97 / 0.97 at 61.6
# (D = 8, B = 1536), 1.20 / 1.01 at 61.4 (D = 16, B = 640), 0.92 / 0.97 at 65.2 (D = 32,
# B = 256), 0.93-1.25 / 1.19-1.39 at 73.7 (D = 16, B = 768, two runs), 0.71-0.81 / 1.02-1.19
# at 82.1 (D = 8, B = 2048), 0.56 / 1.45 at 164 (B = 4096). w = 256: 1.12 / 1.14 at 68.5
# (D = 8, B = 128), 1.22 / 1.09 at 103. The earlier limits (20 / 28, measured before
# percall30-31 cut the rows' Python) left D = 8, B = 512 and D = 16, B = 256 (frozen: 1.48x,
# 1.28x) and D = 16, B = 384, D = 32, B = 128, D = 8, B = 1024 (both: 1.04-1.35x) to the
# slower engine.
ROWS_DIAGONAL_WORK = 48 << 20
ROWS_DIAGONAL_WORK_TRAINED = 48 << 20


def chosen(method: str, f: Function, x: torch.Tensor, batch_dims: int) -> bool:
    """Whether ``method`` plans ``f`` at ``x``: ``"structured"`` always, ``"auto"`` unless the
    problem is tiny (see ``TINY_PROBLEM``), or, when Dynamo traces the call, small for ``f``
    (``torchdiv._core.crossover.traced``: the generic engines are traced instead)."""
    if method != "auto":  # no size read: under dynamic shapes Dynamo would trace it
        return method == "structured"
    if torch.compiler.is_compiling():
        return not traced(f, x, batch_dims)
    return math.prod(x.shape[batch_dims:]) * x.numel() > TINY_PROBLEM


def rows_diagonal(f: Function, x: torch.Tensor, batch_dims: int) -> bool:
    """Whether ``"auto"``'s diagonal of ``f`` at ``x`` goes to the generic engines though
    ``chosen``: their plain-autograd rows are the cheaper engine there (``ROWS_DIAGONAL_WORK``;
    ``ROWS_DIAGONAL_WORK_TRAINED`` with a parameter that requires grad, under grad mode; at
    any work for at most ``crossover.LOOP_ROWS`` elements per sample, one pass each). Eager
    only, for ``f`` a module or one's bound method (``crossover.held``: a function's work and
    convolutions are not seen), and only where the generic engines take rows: at most
    ``ROWS_PROBLEM`` unit vectors x elements of ``x`` (beyond, ``torch.func``'s reverse mode
    is slower) and no convolution's kernel among the parameters (there they take forward
    mode, and the structured engine's colours are cheaper)."""
    if torch.compiler.is_compiling():
        return False
    n = math.prod(x.shape[batch_dims:])
    if n * x.numel() > crossover.ROWS_PROBLEM:
        return False
    found = held(f)
    if found is None or found.kernel:
        return False
    if n <= crossover.LOOP_ROWS:  # a pass per row, at any work:
        # D = 2, B = 4096 (36.8M), one thread: rows 0.61 / 0.75x the structured engine's
        # time (frozen / trained), 0.88 / 0.68x the loop of autograd.grad; B = 16384: 0.71x
        return True
    trained = found.grad and torch.is_grad_enabled()
    return work(f, x, batch_dims, found) <= (
        ROWS_DIAGONAL_WORK_TRAINED if trained else ROWS_DIAGONAL_WORK
    )


def refused_before(where: Any, f: Function, x: torch.Tensor, batch_dims: int) -> bool:
    """Whether ``plan`` found no rule for an op of ``f`` at this structure before
    (``_REFUSED``, ``cache.Refusals``), under ``where`` (``None``: never)."""
    return bool(_REFUSED.get(where, f, x, batch_dims))


def _remember_refusal(where: Any, f: Function, x: torch.Tensor, batch_dims: int) -> None:
    _REFUSED.put(where, f, x, batch_dims, True)


@recorded
def plan(
    fn: str,
    f: Function,
    x: torch.Tensor,
    batch_dims: int,
    chunk_size: int | None,
    strict: bool,
    trace: bool,
    share: Share = WHOLE,
    where: Any = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every sample's divergence ``(N,)`` (``trace``) or Jacobian diagonal ``(N, n)``, and
    ``f(x)`` from the same evaluation (an ODE's dynamics need both); ``None`` when the engine
    cannot run ``f`` (or, if ``strict``, ``UnsupportedOp`` naming what it cannot run).

    ``where`` (``torchdiv._taylor.cache.site`` of the caller's function) keeps the recording
    of ``f`` for the next call, which then checks ``f``'s calls against it instead of recording
    them again (``torchdiv._taylor.cache``), and, unless ``strict``, a refusal for an op
    without a rule (``refused_before``): the caller's generic engines then watch every
    call for sample mixing, as recording did; ``None``: recorded afresh."""
    if x.numel() == 0:  # nothing to plan: the generic engines keep the graph of empty results
        return None
    n_samples = x.shape[:batch_dims].numel()
    try:
        graph = _cache.recorded(where, f, x, RULES, batch_dims)
    except RuntimeError as exc:
        if strict or not _backward_without_grad(exc, x):
            raise
        if where is not None:  # no recording could replay a backward pass inside f anyway
            _remember_refusal(where, f, x, batch_dims)
        return None
    try:
        if graph.unsupported:
            ops = ", ".join(sorted(set(graph.unsupported)))
            raise UnsupportedOp(f"{ops} applied to a tensor that depends on x")
        kept = values(graph, x)
        chain = _chain(graph, kept, x, n_samples)
        if chain is not None and share.index > 0:  # a few forward passes: the first share's
            return x.new_zeros(n_samples), _output(graph, kept, x)
        if chain is not None:
            by_chain = cycle.trace if trace else cycle.diagonal
            return by_chain(chain, x, n_samples, chunk_size), _output(graph, kept, x)
        coloring = colors.colors(graph, kept, x, batch_dims)
        split = None
        if coloring is None and share == WHOLE:  # group norms: coloured, with a correction
            split = statistics.planned(f, graph, kept, x, batch_dims)
        diag = None if split is None else statistics.diagonal(split, graph, f, x, chunk_size)
        if split is not None and diag is not None:
            y = _output(split.fixed, values(split.fixed, x), x)
            return (diag.sum(-1) if trace else diag), y
        diag = forward.diagonal(graph, x, batch_dims, chunk_size, coloring, share)
        return (diag.sum(-1) if trace else diag), _output(graph, kept, x)
    except (RuntimeError, TypeError) as exc:  # UnsupportedOp included
        if out_of_memory(exc):  # a memory problem, not an unsupported op
            raise
        if strict and raised_by_f(exc):  # f's own error: the public function reports it
            raise
        if strict:
            raise _refusal(fn, exc) from exc
        if graph.unsupported and where is not None:  # by the ops alone, not their values
            _remember_refusal(where, f, x, batch_dims)
        graph.undo()  # the caller evaluates f again
        return None


def _backward_without_grad(exc: RuntimeError, x: torch.Tensor) -> bool:
    """Whether ``f`` raised because it took a backward pass with respect to the recording's
    alias of an ``x`` that does not require grad (a score ``-autograd.grad(E(x).sum(), x)``):
    no recording can replay a backward pass inside ``f`` (``capture`` refuses one), and the
    generic engines evaluate ``f`` on a copy of ``x`` that requires grad, so ``"auto"`` goes
    there instead of refusing a valid ``f`` that ``"reverse"`` and small problems run."""
    return not x.requires_grad and raised_by_f(exc) and "does not require grad" in str(exc)


def describe(f: Function, x: torch.Tensor, batch_dims: int = 1) -> str:
    """The plan ``method="structured"`` makes for ``f`` at ``x``, in words (for benchmarks):
    ``"chain: N paths"``, ``"colours: k directions for n unit vectors"``, ``"colours: k
    directions and K group-norm statistics for n unit vectors"`` (``statistics``) or
    ``"columns: n unit vectors"`` (``"generic engines: ..."`` if it cannot plan ``f``).
    Evaluates ``f`` once (three times where the group norms' split is tried)."""
    graph = capture(f, x, RULES, keep_values=True, batch_dims=batch_dims)
    if graph.unsupported:
        return f"generic engines: no rule for {', '.join(sorted(set(graph.unsupported)))}"
    kept = values(graph, x)
    found = factors.paths(graph, kept, x, x.shape[:batch_dims].numel())
    if found is not None:
        return f"chain: {len(found[0])} path{'s' * (len(found[0]) != 1)}"
    n = math.prod(x.shape[batch_dims:])
    coloring = colors.colors(graph, kept, x, batch_dims)
    split = None if coloring is not None else statistics.planned(f, graph, kept, x, batch_dims)
    if split is not None:
        return split.describe(n)
    if coloring is None:
        return f"columns: {n} unit vectors"
    return f"colours: {int(coloring.max()) + 1} directions for {n} unit vectors"


def _chain(
    graph: Graph, kept: list[list[Any]], x: torch.Tensor, n_samples: int
) -> list[factors.Path] | None:
    """``factors.paths``, along the routes kept with the graph's template when it has them
    (the walk is done once per structure; the factors are made from this call's values)."""
    routes = None if graph.template is None else graph.template.derived.get("chain")
    if routes is not None:
        chain = factors.followed(routes, graph, kept, x, n_samples)
        if chain is not None:
            return chain
    found = factors.paths(graph, kept, x, n_samples)
    if found is None:
        return None
    if graph.template is not None:
        graph.template.derived["chain"] = found[1]
    return found[0]


def _output(graph: Graph, kept: list[list[Any]], x: torch.Tensor) -> torch.Tensor:
    """``f(x)`` as the capture computed it (a tensor ``f`` returned unchanged is no node)."""
    out: torch.Tensor | Ref = graph.output
    if not isinstance(out, Ref):
        return out
    y: torch.Tensor = x if out.node < 0 else kept[out.node][out.leaf]
    return y


def _refusal(fn: str, exc: Exception) -> UnsupportedOp:
    if isinstance(exc, UnsupportedOp):
        what = f"has no propagation rule for {exc}"
    else:  # an op whose rule or plan failed on these arguments
        what = f"could not run f ({type(exc).__name__}: {exc})"
    way = way_out(what, "use method='auto' (falls back to the generic engines)")
    return UnsupportedOp(f"{fn}: method='structured' {what}; {way}")
