"""The Laplacian's methods, each ``(f, x, batch_dims, chunk_size) -> Δf`` per sample and output.

``"taylor"`` propagates collapsed second-order jets (``torchdiv._taylor``) along the unit
directions of the event, a chunk at a time; ``"forward-over-reverse"`` and ``"hessian"`` take
JVPs of the per-sample gradients (``torch.func``); ``"grad-of-grad"`` loops over backward passes
(``loop``); ``"auto"`` picks between them (``auto``). ``hutchinson`` takes the random
directions as given. Arguments are checked by the public functions (``torchdiv._api``).
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, replace
from typing import Any, NoReturn, TypeVar

import torch
from torch._C._functorch import peek_interpreter_stack
from torch.func import vjp

from torchdiv._core.basis import (
    WHOLE,
    Share,
    accumulated,
    basis,
    batched,
    broadcast_basis,
    chunks,
)
from torchdiv._core.checks import event_numel, out_of_memory, unwrapped
from torchdiv._core.crossover import traced
from torchdiv._core.mixing.errors import BatchInteractionError
from torchdiv._core.mixing.transformed import check_transformed
from torchdiv._core.mixing.watch import Verdicts, verdicts
from torchdiv._core.mixing.watch import watched as mixing_watched
from torchdiv._core.modes import checkpointed, recorded
from torchdiv._core.subclass import attributes_of
from torchdiv._core.tie import tied
from torchdiv._core.walk import GraphTooDeep
from torchdiv._exact.attributes import unwrap_between_evaluations
from torchdiv._exact.autograd import written_once
from torchdiv._exact.forward import ForwardJacobian, holds_dual_level, under_tangents
from torchdiv._exact.plan import WITHOUT_FORWARD_RULE
from torchdiv._exact.state import Once, unchanged, wrote_alike
from torchdiv._laplacian.loop import Check, Settings, all_finite, grad_of_grad, probed
from torchdiv._taylor import (
    RULES,
    Context,
    Graph,
    Jet,
    UnsupportedOp,
    cache,
    capture,
    mixing,
    propagate,
)
from torchdiv._taylor.capture import CUSTOM_FUNCTION, IN_PLACE_DETACH, Ref, argument, way_out
from torchdiv._taylor.sparse import Sparse, per_particle
from torchdiv._taylor.tree import leaves

Function = Callable[[torch.Tensor], torch.Tensor]
# "auto" chunks only when the widest jac (directions x its elements) would pass this many
# elements (64 MiB in float32): each chunk replays the forward values, so fewer is faster
CHUNK_ELEMENTS = 2**24
# "auto" loops over backward passes instead of running the Taylor engine (bench/laplacian_small.py,
# tanh FNNs of width 64 and Chebyshev KANs at 2-3 inputs): at one input while x has at most
# LOOP_ELEMENTS elements, decided before recording f; where f's recorded graph does little
# arithmetic per call (Graph.work_per_call): the Taylor engine's fixed cost per call (recording
# it, a rule in Python: 50-100 us) then outweighs what its n + 2 jets save against the loop's
# 2n + 3 backward passes; and where the Taylor engine cannot run f, at up to LOOP_FALLBACK
# inputs times output components per sample (``fallback``).
# On one thread (``bench/laplacian_crossover.py``, "auto" forced to each engine, 7 alternated
# rounds, 2026-12-06; loop / Taylor at work per call w, products' share s below): the loop
# while n x w < 2 x limit x (1 + tilt x s), n <= LOOP_INPUTS, where s is the share of the
# graph's work in matrix products (``_products_share``): a tanh FNN's large ops are products
# (s = 0.26 / 0.41 / 0.57 at widths 32 / 64 / 128), which the loop's backward passes run as
# well as the Taylor engine's wider ones, a Chebyshev KAN's are elementwise (s = 0.02), whose
# second-order Taylor rules are cheaper than their double backward passes:
# - not differentiated (frozen; limit LOOP_WORK_ONE_THREAD, tilt LOOP_TILT): the FNN of width
#   64 at D = 2 0.61 / 0.82 / 1.01 / 1.09 at batch 256 / 1024 / 2048 / 4096 (w 24k-379k), at
#   D = 3 0.73 / 0.98 / 1.14 / 1.33; width 32 at 1024 (38k) 0.67 / 0.81 (D = 2 / 3), width
#   128 (264k) 1.03 / 1.25; the KAN at D = 2 0.46 / 0.71 / 0.87 / 1.12 (w 5.5k-87k), at
#   D = 3 0.51 / 0.90 / 1.11 / 1.24: the rule puts each case on its faster side but those
#   within 3% of even (the FNN at D = 2, B = 2048 loops: 1.01 here, 0.93 in an A/B run);
# - differentiated (training; limit LOOP_WORK_TRAINED_ONE_THREAD, tilt 1): the FNN at D = 2
#   0.93 at 256 (24k), 1.35 at 1024, width 32 at 1024 (38k) 1.09; at D = 3 1.15 at 256; the
#   KAN at D = 2 0.75 / 1.02 at 256 / 1024, at D = 3 0.82 / 1.29.
# With more threads (not measured again): frozen while n x w < 2 x LOOP_WORK (the FNN at
# batch 256 loops at 2 inputs, 1.0-1.3x, not at 3: Taylor 1.1-1.2x faster on two threads, its
# n + 2 times wider ops are what a second thread speeds up), trained at up to 2 inputs while
# w < LOOP_WORK_TRAINED (a KAN at batch 256, 5.5k: the loop ~1.1-1.3x faster).
# Read when a structure is first decided (``_LOOPS`` keeps the decision).
LOOP_INPUTS = 3
LOOP_ELEMENTS = 1024
LOOP_WORK = 32768
LOOP_WORK_ONE_THREAD = 57344
LOOP_TILT = 6
LOOP_WORK_TRAINED = 16384
LOOP_WORK_TRAINED_ONE_THREAD = 20480
# ``value_grad_laplacian`` along k of its n inputs (``coordinates``, k < n) of one output per
# sample (a heat residual's ``Δ_x u`` of ``u(x, t)``), one thread: the loop takes 2 + k
# passes, while the Taylor sweep carries the n - k other first-order directions in a sweep of
# their own, so the loop reaches further than for the Laplacian: at k = 1 always, at more
# while k² x w < 2 x limit x (1 + LOOP_TILT_PARTIAL x s), limit LOOP_WORK_PARTIAL if
# differentiated, 4 x that if not. ``bench/laplacian_crossover.py --vgl [--frozen]`` (a heat
# step or its residual alone, "auto" forced to each engine, 7 alternated rounds, 2026-12-06),
# loop / Taylor, trained: k = 1 of 2, 3 or 10, the width-32 tanh / LAAF / RFF nets (s
# 0.16-0.25) 0.43-0.64 at batch 1024 (w 31k-35k), 0.62-0.83 at 8192, 0.69-0.82 at 32768 (1.1M),
# the width-64 FNN (s 0.41) 0.56-0.67 at 1024 (95k), 0.73-0.89 at 8192, 0.82 at 32768 (3M);
# k = 2 of 3 or 10: width 32 0.57-0.83 at 1024, 0.95-1.09 at 4096 (125k-141k), 1.03-1.31 at
# 8192, width 64 0.78-0.93 at 1024, 0.96-1.03 at 2048 (190k), 1.08 at 4096; k = 3 of 4: width
# 32 0.84 at 1024, 1.02 at 2048 (68k), width 64 1.07 at 1024. Frozen: k = 1 0.42-0.61 (1024 to
# 32768), k = 2 of 3 0.52-0.76 (width 32, 1024 to 8192), 0.61-0.83 (width 64). With more
# output components (Navier-Stokes' three: the loop's 1 + m (1 + k) passes), the rules above.
LOOP_WORK_PARTIAL = 147456
LOOP_TILT_PARTIAL = 4
# Several output components m per sample (a Navier-Stokes net's u, v, p), one thread, an f
# whose recording is not a chain (``chained``: the chain's forward Laplacian takes all of them
# at once, a tanh MLP's loop costing the same at m = 1, 2 and 3): the loop's passes grow with m
# (its 1 + m (1 + n)), the Taylor engine's do not. ``bench/laplacian_crossover.py --only=-m``
# (pinn23_idioms' width-32 LAAF and random-Fourier-feature nets, n = 2, 3, m = 1-3, batch 256 to
# 2048, 7 alternated rounds, 2026-12-07), loop / Taylor: frozen at m = 2 0.74 / 0.80 (LAAF,
# n = 2 / 3, batch 256; m n w 34k / 51k), 0.90 / 0.97 (RFF, 31k / 47k), 0.97 at batch 1024
# (LAAF, n = 2, 134k), 1.17-1.55 beyond; at m = 3 0.97 (LAAF, n = 2, 256), 1.06-2.6 otherwise
# (the rule for one component looped at all of them but batch 2048); trained 1.24-2.3 at m = 2
# and 1.65-2.3 at m = 3 already at batch 256 (it looped there). So: frozen only, while
# m (1 + n) <= LOOP_PASSES_OUTPUTS and m n w < 2 x LOOP_WORK_OUTPUTS.
LOOP_PASSES_OUTPUTS = 8
LOOP_WORK_OUTPUTS = 26624
# ``value_grad_laplacian``'s whole sweep (every coordinate) not differentiated, one thread: the
# loop's gradient is its first pass, the Taylor sweep's an extra output, and the chain never
# runs there (the Jacobian), so the Laplacian's rule took the Taylor sweep where the loop was
# faster. ``bench/laplacian_crossover.py --vgl --frozen --only=2-k2-`` (and ``3-k3-``, 7
# alternated rounds, 2026-12-07, load 9), loop / Taylor: width-32 tanh D = 2 0.65 / 0.75 /
# 0.86 / 0.98 at batch 1024 / 2048 / 4096 / 8192 (it took Taylor from 4096), width 64 0.78 /
# 0.90 / 1.02 / 1.18; D = 3 width 32 0.74 / 0.87 / 1.01 / 1.21, width 64 0.93 / 1.05 / 1.25 /
# 1.36. The loop while n² x w < 2 x LOOP_WORK_SWEEP x (1 + LOOP_TILT x s) puts each on its
# faster side or within 5% of even; with several output components, as the Laplacian's
# (``LOOP_WORK_OUTPUTS``: the chain, which made m free, is not taken).
LOOP_WORK_SWEEP = 196608
# Beyond that rule, a frozen f whose recording is a chain (``chained``: a tanh / sigmoid MLP)
# at up to CHAIN_INPUTS inputs loops too, for the forward Laplacian along its chain
# (``_laplacian.chain``, from the loop's evaluation), while its ``(n + 1) x widest`` block has
# at most CHAIN_ELEMENTS elements. One thread, thread CPU time (kanlap23, load 6-9), chain /
# Taylor for the FNN of width 64: D = 3, B = 2048 (0.5M) 0.68-0.72; D = 10, B = 256 (0.2M)
# 0.51-0.58; larger blocks even or slower: D = 10, B = 2048 (1.4M) 0.88 in one run, 1.37 in
# the matrix; D = 100, B = 256 (1.7M) 0.94-1.0. Differentiated it is 1.5-1.9x slower at
# B = 2048 or D = 10 (its block's graph), so frozen only.
CHAIN_INPUTS = 10
CHAIN_ELEMENTS = 2**20
# The loop's 1 + m (1 + n) passes against forward over reverse's n batched products of m rows
# (an FFT net and an S4D layer, float64, batch 64, one thread, a helper's probe, 2026-12-05):
# at m = 1 the loop 0.46-0.71x at 4 inputs, 0.84-1.0x at 10 (frozen); n = 4, m = 2 even
# (0.78-1.13x); n m >= 12 the loop 1.1-8.4x slower (n = m = 10: 109 against 26 ms).
LOOP_FALLBACK = 10
# the loop batches its second-level backward passes (``loop.Settings``) below this much
# work per call: a KAN at batch 256 (5.5k) 10-25% faster, frozen or trained, at 2 and 3
# inputs; the FNN at 256 (24k) from 8% slower to 10% faster by the threads: it keeps n passes
BATCHED_WORK = 16384
# the ``Loop`` "auto" decided on for a structure it recorded (``loops_for``, ``_chains``), by
# ``_site`` and structure key (``mixing.shape_key``: a lambda made anew over another time or
# tensor finds it too): a later call with the same structure loops without recording f
_LOOPS = cache.PlanCache(256)
# True for each ``_site`` with a structure in ``_LOOPS``: only such a site's calls make their
# structure key (``mixing.structure``) to look it up, ~50 us of Python per call otherwise spent
# by every call the Taylor engine runs at 2-3 inputs (2-4% of a trained FNN's Laplacian at
# batch 256, issue 18); False for one recorded that did not loop. A module's or a function
# code's first call makes it too, before ``f`` runs: the call that decides to loop marks ``f``
# passed there, and a key made after ``f`` ran holds what ``f`` set (a flag that centres its
# later calls' batch)
_LOOPING_SITES = cache.PlanCache(256)
# the structures at which the Taylor engine found no rule for an op of f (``Graph.unsupported``),
# each with the fallback ``"auto"`` takes there (``fallback``: ``Loop`` or ``Nested``), by
# ``_site``: later calls take it without recording f, watched for sample mixing at every call
_REFUSED = cache.Refusals()
# the structures at which Hutchinson's recording found no rule for an op of f and forward mode
# then could not run it (``grid_sample``): later Hutchinson calls there take the probes by
# backward passes (``loop.probed``) straight away, watched for sample mixing at every call. Not
# ``_REFUSED``: its ``Loop`` there may be "auto"'s choice at few inputs (``fallback``), which
# says nothing of forward mode
_PROBED = cache.Refusals()


def auto(f: Function, x: torch.Tensor, batch_dims: int, chunk_size: int | None) -> torch.Tensor:
    # in a compiled graph, where recording f would break it; under the caller's torch.func
    # transform (an ensemble of models), where nothing is recorded and the loop's
    # requires_grad_ on x is refused
    if traced(f, x, batch_dims) or peek_interpreter_stack() is not None:
        check_transformed(f, x, batch_dims, lambda: unchanged(f, x))  # (no watch sees f there)
        return forward_over_reverse(f, x, batch_dims, chunk_size)
    return _recorded_auto(f, x, batch_dims, chunk_size)


@recorded
def _recorded_auto(
    f: Function, x: torch.Tensor, batch_dims: int, chunk_size: int | None
) -> torch.Tensor:
    plan = recorded_or_loop(f, x, batch_dims, chain=True)
    if isinstance(plan, Graph):
        chunk = chunk_size or plan.chunk(event_numel(x, batch_dims), CHUNK_ELEMENTS)
        out = collapsed_or_none(plan, x, unit_directions(x, batch_dims, chunk))
        if out is not None:
            return out
        recording = plan
        plan, chunk_size = at_this_call(fallback(plan, x, batch_dims, chunk)), chunk
        out = _fallen_back(f, x, batch_dims, chunk_size, plan, recording.undo)
        try:  # the recording was evaluation one: the fallback's must write what it wrote
            wrote_alike(recording.wrote or [])
        except ValueError:
            recording.undo()  # (a refused call leaves f's tensors as they were)
            raise
        return out
    return _fallen_back(f, x, batch_dims, chunk_size, plan)


def _fallen_back(
    f: Function,
    x: torch.Tensor,
    batch_dims: int,
    chunk_size: int | None,
    plan: Loop | Nested,
    undo: Callable[[], None] | None = None,
) -> torch.Tensor:
    """``"auto"``'s Laplacian by ``plan``: the loop of backward passes, or forward over
    reverse; forward over reverse too where the loop's walk of ``f``'s graph stopped
    (``walk.GraphTooDeep``: a graph too deep to free once walked, an ODE solve of thousands
    of steps), which walks nothing (its own fallback, the loop, raises that again). ``undo``:
    puts back the state from before a recording of ``f`` (``Graph.undo``), which the loop's
    evaluation then changed as the recording did: called before forward over reverse
    evaluates ``f`` again there (without it a buffer written in place moved twice, refused
    by ``wrote_alike``, and a dropout's generator was drawn from twice, rev-merges27). That
    fallback is remembered for ``f``'s structure (``_REFUSED``): a later call that looped
    first, unrecorded, moved its buffers twice (a running average at every call). A call
    without a recording (a loop remembered for speed, past the bound only now) has forward
    over reverse's writes put back after it (``written_once``: buffers move once; its
    evaluations read the loop's, and the generators are drawn from twice there)."""
    if isinstance(plan, Loop):
        try:
            return looped(f, x, batch_dims, chunk_size, plan)
        except GraphTooDeep:
            too_deep(f, x, batch_dims)
            deep = Nested(event_numel(x, batch_dims), watch=plan.check == "watch")
            if undo is not None:
                undo()
                return nested(f, x, batch_dims, chunk_size, deep)
            with written_once(x):  # (unrecorded: its writes put back after, as the loop's)
                return nested(f, x, batch_dims, chunk_size, deep)
    return nested(f, x, batch_dims, chunk_size, plan)


def too_deep(f: Function, x: torch.Tensor, batch_dims: int) -> None:
    """Remember that the loop's walk of ``f``'s graph stopped (``GraphTooDeep``) at ``f``'s
    structure: later calls there take forward over reverse straight away (``_REFUSED``),
    whose evaluations start from one state, not the loop's unwatched evaluation first, whose
    writes and draws nothing could put back (rev-merges27)."""
    _REFUSED.put(_site(f), f, x, batch_dims, Nested(event_numel(x, batch_dims)))


def fallback(graph: Graph, x: torch.Tensor, batch_dims: int, chunk: int) -> Loop | Nested:
    """What ``"auto"`` runs where the Taylor engine could not run ``f`` (recorded as
    ``graph``): the loop of backward passes while inputs times output components per sample
    are at most ``LOOP_FALLBACK`` (its ``1 + m (1 + n)`` passes), or at any size where ``f``
    runs an op that only the loop differentiates right (``_backward_passes_only``); forward
    over reverse, ``chunk`` directions at a time (the Taylor engine's planned chunk), otherwise.
    Kept for ``f``'s structure where the recording refused an op (``_REFUSED``). Watched for
    sample mixing where the recording refused ``x`` itself, a tensor subclass, before evaluating
    ``f``: until a review found it, such a first call's ``f`` went unwatched (a mean over the
    batch inside ``f`` gave a Laplacian, the second call ``BatchInteractionError``)."""
    # the recording evaluated f, watched, but not a custom Function's backward (no graph):
    # the fallback's evaluation is watched again, its products checked (``custom_products``)
    unwatched = type(x) is torch.Tensor and not custom_refused(graph)
    outputs = math.prod(graph.output_shape[batch_dims:])
    if event_numel(x, batch_dims) * outputs <= LOOP_FALLBACK or _backward_passes_only(graph):
        return Loop(refused=True) if unwatched else Loop("watch", refused=True)
    return Nested(chunk, watch=not unwatched, custom=custom_refused(graph))


def custom_refused(graph: Graph) -> bool:
    """Whether the recording refused a custom ``autograd.Function`` (``custom_function``):
    its ``backward``, unseen by the recording's watch, is checked by ``fallback``'s plan."""
    return any(CUSTOM_FUNCTION in what for what in graph.unsupported)


def at_this_call(plan: Loop | Nested) -> Loop | Nested:
    """``plan`` (``fallback``), or the loop inside the caller's ``forward_ad.dual_level()``,
    where forward mode cannot nest."""
    if isinstance(plan, Nested) and holds_dual_level():
        return Loop("watch" if plan.watch else None, refused=True)
    return plan


def _backward_passes_only(graph: Graph) -> bool:
    """Whether ``f`` ran an op that only the loop of backward passes differentiates right: one
    outside ``aten`` (a ``torch.library`` custom op without a forward-mode rule, which
    ``torch.func`` cannot run at all where it has only ``register_autograd``), an ATen op
    without one (``WITHOUT_FORWARD_RULE``: ``nn.LSTM`` in float32 on the CPU runs oneDNN's
    ``mkldnn_rnn_layer``; packed sequences), a ``Tensor.detach_`` of a tensor computed
    from ``x``, which forward mode ignores, or an in-place write reading the tensor it writes
    (``Graph.reads_written``: forward mode's parameter gradients raise)."""
    return (
        graph.reads_written
        or IN_PLACE_DETACH in graph.unsupported
        or any(
            node.func.namespace != "aten" or node.func in WITHOUT_FORWARD_RULE
            for node in graph.nodes
        )
    )


@dataclass(frozen=True)
class Loop:
    """``"auto"`` runs the loop of backward passes, checking its evaluation of ``f`` for
    sample mixing by ``check`` (``loop.Check``); ``watched``: the ``f``, ``x``,
    ``batch_dims`` (and structure, if made) to mark as ``mixing.passed`` once a watched
    evaluation has passed;
    ``settings``: how the loop runs (``loop.Settings``; ``None``: the defaults), shared by
    the calls at one structure; ``refused``: the Taylor engine cannot run ``f`` (the loop is
    the fallback, not the faster choice)."""

    check: Check = None
    watched: tuple[Function, torch.Tensor, int, mixing.Structure | None] | None = None
    settings: Settings | None = None
    refused: bool = False

    def passed(self, seen: Verdicts) -> None:
        """The loop ran: a watched ``f`` does not mix samples at this structure, for the
        calls its watch's verdict says (``seen``: ``torchdiv._core.mixing.watch.verdicts`` of
        the loop's evaluation; not where values reached Python or indices were read along
        the batch after values decided something: without it, a radius graph built inside
        ``f`` crossed samples at a third call, unwatched)."""
        if self.watched is not None:
            mixing.passed(*self.watched, verdict=seen.verdict)


@dataclass(frozen=True)
class Nested:
    """``"auto"`` runs forward over reverse where the Taylor engine cannot run ``f``
    (``fallback``), ``chunk`` directions at a time; ``watch``: ``f`` was not recorded at this
    call (its refusal was remembered), so one evaluation of it is watched for sample mixing
    first (``nested``), as the recording was at every call; ``custom``: the recording refused
    a custom ``autograd.Function`` (``custom_refused``), whose ``backward`` that watch checks
    where ``f`` is evaluated at a tensor that requires grad (``watch_evaluation``)."""

    chunk: int
    watch: bool = False
    custom: bool = False


def recorded_or_loop(
    f: Function,
    x: torch.Tensor,
    batch_dims: int,
    chain: bool = False,
    chosen: int | None = None,
    gradient: bool = False,
) -> Graph | Loop | Nested:
    """``f`` recorded at ``x`` for the Taylor engine, or ``Loop`` where ``"auto"`` loops over
    backward passes instead (``loops``, ``loops_for``). A decision to loop is remembered per
    ``_site`` and structure: the next such call records nothing; the call that decides it
    gets its recording (the Taylor engine runs from it: looping there evaluated ``f`` a
    second time, ``test_every_call_evaluates_f_once``). The fallback (``fallback``: the loop,
    or ``Nested``, forward over reverse) of a refused recording (an op without a Taylor rule,
    a backward pass inside ``f``: a write through a view whose base is read after it, a
    curvature ``div(grad f / |grad f|)``, an FFT) is remembered too, by ``refusal_key``
    (``f``'s structure and its parameters' identities, ``_REFUSED``; before, ``f`` was
    recorded again at every call: 1.1-1.5x the loop's own time); that call still gets the
    refused graph, for its caller's fallback. Only a site remembered to loop at some
    structure (``_LOOPING_SITES``), or a module or function code seen for the first time,
    has its structure key made before recording (at up to LOOP_INPUTS inputs, CHAIN_INPUTS
    for ``"auto"``'s chain: where a plan may be kept), and only one with a refusal its
    refusal key; any other call records ``f`` straight away. A call that decides to loop
    without that key leaves ``f`` unmarked (the next call watches it): a key made after
    ``f`` ran holds what ``f`` set.

    Sample mixing (``torchdiv._core.mixing``): recording watches ``f``. A call that does not
    record it watches the loop's own evaluation of ``f`` (~10 us per op, no extra
    evaluation) unless this very object ``f`` passed a watch at the same structure before
    (``torchdiv._taylor.mixing.passed_before``): then only the autograd graph is searched
    for a train-mode batch norm (``check_graph``, a few microseconds). A lambda made anew
    over other objects (another module: ``mixing.identity``) is watched. An empty event
    (every element a sample) is always watched. A remembered loop shares one
    ``loop.Settings`` across its calls: second-level passes batched below ``BATCHED_WORK``,
    ``f`` evaluated outside the modes unless its graph needed them.

    ``chosen``: the number of coordinates the second derivatives run along
    (``value_grad_laplacian``'s ``coordinates``; ``None``: all), which the loop's rules
    count (its second-level passes) and its plans are kept by: a heat residual's
    ``Δ_x u`` of ``u(x, t)`` took the Taylor sweep at batch 1024 for two inputs where the
    loop at one was 1.5-2.9x faster (rev-pinn23). ``gradient``: the caller takes the gradient
    too (``value_grad_laplacian``: the loop's first pass), which the rules (``loops_for``) and
    the plans' keys count."""
    n = event_numel(x, batch_dims)
    k = n if chosen is None else chosen
    if loops(x, batch_dims):
        return _one_input(f, x, batch_dims)
    site = _site(f)
    refused = _REFUSED.get(site, f, x, batch_dims)
    if refused is not None:
        return _unrecorded(f, x, batch_dims, at_this_call(refused))
    kept = k <= LOOP_INPUTS or (chain and k <= CHAIN_INPUTS)  # (where a plan may be kept)
    looping = _LOOPING_SITES.get(site, None)
    # (a lasting site's first call: a module, a function's code; not a partial or a callable
    # object, which may be a new site at every call, each call then paying for a key)
    fresh = looping is None and isinstance(site, (types.CodeType, torch.nn.Module))
    at = mixing.structure(f, x, batch_dims) if kept and (looping or fresh) else None
    key = None if at is None else _plan_key(at, n, k, gradient)
    remembered: Loop | None = None if key is None else _LOOPS.get(site, key)
    settings = None if remembered is None else remembered.settings
    if (
        remembered is not None
        and settings is not None
        and (not settings.chain_only or (chain and settings.chain))
    ):
        return _unrecorded(f, x, batch_dims, remembered, at)
    graph = capture(f, x, RULES, keep_values=True, batch_dims=batch_dims)
    if graph.unsupported:  # as the callers fall back (``fallback``), at the planned chunk
        chunk = graph.chunk(n, CHUNK_ELEMENTS)
        _REFUSED.put(site, f, x, batch_dims, fallback(graph, x, batch_dims, chunk))
        return graph
    if remembered:  # a chain's plan not for this caller, or one whose chain gave way
        return graph
    if k <= LOOP_INPUTS and loops_for(graph, x, batch_dims, k, gradient):
        chain_only = False
    elif chain and k == n and _chains(graph, x, batch_dims):
        chain_only = True
    else:
        if fresh:
            _LOOPING_SITES.put(site, None, False)
        return graph
    batched = graph.work_per_call() < BATCHED_WORK
    plan = Loop(settings=Settings(batched, plain=True, chain=True, chain_only=chain_only))
    if at is not None:  # recording watched f at the structure made before it ran
        mixing.passed(f, x, batch_dims, at, verdict=graph.verdict)
    _remember(site, f, x, batch_dims, at, plan, k, gradient)
    return graph  # this call: the recording's evaluation, not a second one for the loop


def _one_input(f: Function, x: torch.Tensor, batch_dims: int) -> Loop | Nested:
    """The loop at one input and a small batch (``loops``), by the plan kept for ``f``'s site
    and structure (made for the watch's look-up anyway): ``f`` evaluated plain, and the
    forward Laplacian where ``f`` is a chain (``loop.Settings``), as a remembered loop runs.
    With the defaults at every call, ``f`` ran under the modes and the chain was not taken:
    a 1-D Poisson residual's training step took 1.3-1.4x the user's loop (issue 18). Inside
    a non-reentrant checkpoint, where no plan is kept, the defaults (its forward and its
    recomputation take the same path)."""
    site, at = _site(f), mixing.structure(f, x, batch_dims)
    key = mixing.shape_key(at)
    plan: Loop | None = _LOOPS.get(site, key)
    if plan is None and not checkpointed():
        plan = Loop(settings=Settings(plain=True, chain=True))
        _LOOPS.put(site, key, plan)
    return _unrecorded(f, x, batch_dims, plan or Loop(), at)


def _remember(
    site: Any,
    f: Function,
    x: torch.Tensor,
    batch_dims: int,
    at: mixing.Structure | None,
    plan: Loop,
    chosen: int,
    gradient: bool = False,
) -> None:
    """Keep ``plan`` for ``site`` at the structure of ``f`` and ``x`` (``at``, if made
    already), ``chosen`` coordinates and ``gradient`` (``_plan_key``)."""
    if at is None:
        at = mixing.structure(f, x, batch_dims)
    _LOOPS.put(site, _plan_key(at, event_numel(x, batch_dims), chosen, gradient), plan)
    _LOOPING_SITES.put(site, None, True)


def _plan_key(at: mixing.Structure, n: int, chosen: int, gradient: bool = False) -> Hashable:
    """``_LOOPS``' key for the structure ``at`` with second derivatives along ``chosen`` of
    the ``n`` inputs: the structure's alone for all of them, else with their number (the
    choice counts them: a plan decided at one coordinate would loop at all of them, where the
    Taylor engine may be faster); for a caller that takes the ``gradient`` too along all of
    them, with a mark of it (its rule differs: the Laplacian's calls do not take its plan)."""
    key = mixing.shape_key(at)
    if chosen != n:
        return (key, chosen)
    return (key, "gradient") if gradient else key


def _unrecorded(
    f: Function,
    x: torch.Tensor,
    batch_dims: int,
    plan: Loop | Nested,
    at: mixing.Structure | None = None,
) -> Loop | Nested:
    """``plan`` for an ``f`` not recorded at this call: watched unless it passed before (at
    the structure ``at``, if made already). A ``refused`` plan's (or ``Nested``'s) ``f`` was
    recorded and watched at every call before it was remembered, and still is watched at
    every call (an index tensor it holds, changed in place, may make it mix samples): never
    marked as passed."""
    if isinstance(plan, Nested):
        return replace(plan, watch=True)
    # (``Loop(...)``, not ``dataclasses.replace``, which reads the fields at every call: ~5 us
    # warm, 15-20 after the loop's kernels, of a 1.5 ms call at D = 3, B = 256; issue 18)
    if plan.refused:
        return Loop("watch", None, plan.settings, refused=True)
    if at is None:  # (made before the loop runs f: made after, it holds what f set)
        at = mixing.structure(f, x, batch_dims)
    if x.dim() > batch_dims and mixing.passed_before(f, x, batch_dims, at) is not None:
        return Loop("graph", None, plan.settings, plan.refused)
    return Loop("watch", (f, x, batch_dims, at), plan.settings, plan.refused)


def nested(
    f: Function, x: torch.Tensor, batch_dims: int, chunk_size: int | None, plan: Nested
) -> torch.Tensor:
    """``"forward-over-reverse"`` where the Taylor engine cannot run ``f`` (``fallback``),
    ``chunk_size`` (else ``plan.chunk``) directions at a time; where ``plan.watch`` (``f``
    not recorded at this call), one evaluation of ``f`` watched for sample mixing first
    (``BatchInteractionError``; ``torchdiv._core.mixing.watch.watched``: its ops ~10 us each,
    against ~50 us to record them). Where forward mode cannot run ``f`` (an op without a
    forward-mode rule: ``grid_sample``; it raised for the whole call), the loop of backward
    passes, remembered for ``f``'s structure. Every evaluation starts from the state the
    first found (``Once``): ``f``'s buffers and random draws change once."""
    each = Once(x)
    if plan.watch:
        each(lambda z: watch_evaluation(f, z, batch_dims))(x)
    return loop_where_forward_fails(
        lambda: forward_over_reverse(f, x, batch_dims, chunk_size or plan.chunk, each=each),
        lambda: looped(each(f), x, batch_dims, chunk_size, Loop(refused=True)),
        f,
        x,
        batch_dims,
    )


def loop_where_forward_fails(
    forward: Callable[[], T],
    loop: Callable[[], T],
    f: Function,
    x: torch.Tensor,
    batch_dims: int,
) -> T:
    """``forward()`` (forward over reverse), or, where forward mode cannot run ``f`` (a
    ``RuntimeError`` but a lack of memory, or the ``ValueError`` of a torchdiv call inside
    ``f`` refusing the transforms, as ``loop_unless_rerun``; sample mixing is raised),
    ``loop()`` (the loop of backward passes), kept as ``"auto"``'s fallback for ``f`` at
    ``x``: later calls loop without recording ``f`` or trying forward mode again, watched for
    sample mixing at every call (``_unrecorded``). Under the caller's ``torch.func`` transform
    (an ensemble's ``vmap``) forward mode's error is raised instead: plain autograd does not
    run there (``_exact.autograd.UnderTransform``)."""
    try:
        return forward()
    except (RuntimeError, ValueError) as error:
        if out_of_memory(error) or isinstance(error, BatchInteractionError):
            raise
        # (the caller's transform, not in a region Dynamo traces, as ``_exact.autograd``'s:
        # the loop's plain backward passes cannot run there, silently wrong where x requires
        # grad)
        if not torch.compiler.is_compiling() and peek_interpreter_stack() is not None:
            raise
    out = loop()
    _REFUSED.put(_site(f), f, x, batch_dims, Loop(refused=True))
    return out


def watch_evaluation(f: Function, x: torch.Tensor, batch_dims: int) -> None:
    """Evaluate ``f`` at an alias of ``x`` (``capture.argument``, as recording does) with grad
    on, watched for sample mixing (``BatchInteractionError``); the result is dropped."""
    with torch.enable_grad():
        # (a leaf that requires grad where ``x`` does not, as the loop's: the products of a
        # custom Function's backward are checked only where they reach the argument)
        z = argument(x) if x.requires_grad else attributes_of(x, _leaf(x))
        mixing_watched(f, z, batch_dims)


def _leaf(x: torch.Tensor) -> torch.Tensor:
    """``torch.Tensor``'s own ``detach`` and ``requires_grad_`` (not a subclass's)."""
    return torch.Tensor.requires_grad_(torch.Tensor.detach(x), True)


def loops(x: torch.Tensor, batch_dims: int) -> bool:
    """Whether ``"auto"`` runs the loop of backward passes without recording ``f``: one input
    and a small batch. (Not one chosen coordinate of several: that loop, not kept, would run
    with the defaults, ``f`` under the modes and its passes not batched, where a remembered
    plan, ``loops_for``, runs it plain: 1.1x slower at B = 256, one of two inputs.)"""
    return event_numel(x, batch_dims) == 1 and x.numel() <= LOOP_ELEMENTS


def loops_for(
    graph: Graph,
    x: torch.Tensor,
    batch_dims: int,
    chosen: int | None = None,
    gradient: bool = False,
) -> bool:
    """Whether ``"auto"`` runs the loop of backward passes for ``f`` recorded as ``graph``:
    at up to ``LOOP_INPUTS`` coordinates ``n`` to take second derivatives along (``chosen``;
    ``None``: all inputs; the loop's second-level passes) while ``n x work`` is below a
    limit that depends on whether the result is differentiated (``graph.requires_grad``), on
    the threads and, on one thread, on the share of matrix products in the work; on one
    thread, ``value_grad_laplacian`` along some of the inputs of a scalar ``f``
    (``_partial``) loops at one coordinate, and at more by ``n² x work``; an ``f`` of ``m > 1``
    output components per sample that is not a chain (``chained``), or any such ``f`` where the
    caller takes the ``gradient`` too (``value_grad_laplacian``: no chain), loops only frozen,
    by ``m (1 + n)`` passes and ``m x n x work``; the ``gradient`` with every coordinate,
    frozen, by ``n² x work``: the constants' comments."""
    n = event_numel(x, batch_dims) if chosen is None else chosen
    work = graph.work_per_call()
    if torch.get_num_threads() > 1:
        if graph.requires_grad:
            return n <= 2 and work < LOOP_WORK_TRAINED
        return n <= LOOP_INPUTS and work * n < 2 * LOOP_WORK
    if _partial(graph, x, batch_dims, n):
        limit = LOOP_WORK_PARTIAL * (1 if graph.requires_grad else 4)
        share = 1 + LOOP_TILT_PARTIAL * _products_share(graph)
        return n == 1 or (n <= LOOP_INPUTS and work * n * n < 2 * limit * share)
    m = math.prod(graph.output_shape[batch_dims:])
    if m > 1 and (gradient or not chained(graph)):
        return (
            not graph.requires_grad
            and m * (1 + n) <= LOOP_PASSES_OUTPUTS
            and m * n * work < 2 * LOOP_WORK_OUTPUTS
        )
    if gradient and not graph.requires_grad:
        share = 1 + LOOP_TILT * _products_share(graph)
        return n <= LOOP_INPUTS and work * n * n < 2 * LOOP_WORK_SWEEP * share
    if graph.requires_grad:
        limit, tilt = LOOP_WORK_TRAINED_ONE_THREAD, 1
    else:
        limit, tilt = LOOP_WORK_ONE_THREAD, LOOP_TILT
    return n <= LOOP_INPUTS and work * n < 2 * limit * (1 + tilt * _products_share(graph))


def _partial(graph: Graph, x: torch.Tensor, batch_dims: int, chosen: int) -> bool:
    """Whether the second derivatives run along ``chosen`` of more inputs (the Taylor sweep
    then carries the others in a sweep of their own) of one output component per sample."""
    return chosen < event_numel(x, batch_dims) and math.prod(graph.output_shape[batch_dims:]) == 1


aten = torch.ops.aten
# the recorded calls of a chain that ``_laplacian.chain`` takes, each with the position of
# its argument computed from ``x`` (a product's left factor, an activation's input); the
# curved activations, without which the chain gives way (a piecewise-linear ``f``)
_CHAIN_CALLS = {
    aten.mm.default: 0,
    aten.addmm.default: 1,
    aten.tanh.default: 0,
    aten.sigmoid.default: 0,
    aten.relu.default: 0,
    aten.leaky_relu.default: 0,
}
_CURVED = frozenset((aten.tanh.default, aten.sigmoid.default))
_PRODUCTS_RECORDED = frozenset((aten.mm.default, aten.addmm.default))


def _chains(graph: Graph, x: torch.Tensor, batch_dims: int) -> bool:
    """Whether ``"auto"`` loops for the chain alone beyond ``loops_for``: a frozen ``f`` (its
    result not differentiated) of ``x`` ``(N, n)`` recorded as a chain, at up to
    CHAIN_INPUTS inputs, its block within CHAIN_ELEMENTS."""
    n = event_numel(x, batch_dims)
    return (
        batch_dims == 1
        and x.dim() == 2
        and n <= CHAIN_INPUTS
        and (n + 1) * graph.widest <= CHAIN_ELEMENTS
        and not graph.requires_grad
        and chained(graph)
    )


def chained(graph: Graph) -> bool:
    """Whether ``f``'s recording looks like a chain that ``_laplacian.chain`` takes: its calls
    computed from ``x`` are products and listed activations, each reading the one before
    (``x`` first, a product's left factor) and nothing else computed from ``x``, a curved
    activation among them, and ``f``'s result the last. A prediction only: the chain is
    read off each call's autograd graph again (``_laplacian.loop``)."""
    last, curved = -1, False
    for i, node in enumerate(graph.nodes):
        if not node.depends:
            continue
        position = _CHAIN_CALLS.get(node.func)
        if position is None or (last == -1 and node.func not in _PRODUCTS_RECORDED):
            return False
        arguments = [*node.args, *node.kwargs.values()]
        computed = [
            k
            for k, a in enumerate(arguments)
            if isinstance(a, Ref) and (a.node == -1 or graph.nodes[a.node].depends)
        ]
        if computed != [position] or arguments[position] != Ref(last):
            return False
        last, curved = i, curved or node.func in _CURVED
    return curved and graph.output == Ref(last)


def _products_share(graph: Graph) -> float:
    """The share of matrix products in ``graph``'s work (``Graph.work_per_call``: elements
    plus multiply-adds / 32), 0 for a graph without work."""
    products = graph.products / 32
    return products / max(graph.elements + products, 1)


def _site(f: Function) -> Any:
    """What ``_LOOPS`` keys ``f``'s decisions by, with the key of its structure for sample
    mixing (``mixing.structure``: ``cache.structure_key``, for a module also its submodules'
    train modes and which parameters require grad): ``f``'s ``cache.site`` (its code for a
    Python function, so that a lambda made anew at every call counts as one). Two functions
    with the same code but different graphs share a decision: it only chooses between two
    exact methods (sample mixing is checked per object: ``recorded_or_loop``), so at worst
    it is slower."""
    return cache.site(unwrapped(f))


def looped(
    f: Function, x: torch.Tensor, batch_dims: int, chunk_size: int | None, plan: Loop = Loop()
) -> torch.Tensor:
    """``"grad-of-grad"`` (its evaluation of ``f`` checked for sample mixing as ``plan``
    says), or ``"forward-over-reverse"`` where it is not finite: some of PyTorch's
    double-backward formulas give NaN where the derivative exists (``0.0 ** x``: a ``where``
    whose unused branch is ``0 * log(0)``); the JVP formulas do not. Where forward mode
    cannot run ``f`` (a custom ``autograd.Function`` without ``setup_context``), the loop's
    result stands, as PyTorch's own loop gives it: one sample that is not finite (a nan in
    its ``x``) made the whole batch raise forward mode's error."""
    with verdicts() as seen:
        out = grad_of_grad(f, x, batch_dims, plan.check, plan.settings)
    plan.passed(seen)
    if all_finite(out):
        return out
    return loop_unless_rerun(out, lambda: forward_over_reverse(f, x, batch_dims, chunk_size))


T = TypeVar("T")


def loop_unless_rerun(looped: T, rerun: Callable[[], T]) -> T:
    """``rerun()`` (by forward mode) in place of the loop's ``looped``, which is not finite,
    or ``looped`` where ``rerun`` cannot run ``f``, which the loop ran: a ``RuntimeError``
    (not a lack of memory), or the ``ValueError`` of a torchdiv call inside ``f`` refusing
    the transforms."""
    try:
        return rerun()
    except (RuntimeError, ValueError) as error:
        if out_of_memory(error):
            raise
        return looped


@recorded
def taylor(f: Function, x: torch.Tensor, batch_dims: int, chunk_size: int | None) -> torch.Tensor:
    graph = capture(f, x, RULES, keep_values=True, batch_dims=batch_dims)
    if graph.unsupported:
        _refuse(
            graph,
            ", ".join(sorted(set(graph.unsupported))) + " applied to a tensor that depends on x",
        )
    chunk = chunk_size or event_numel(x, batch_dims)
    try:
        return collapsed(graph, x, unit_directions(x, batch_dims, chunk))
    except UnsupportedOp as exc:
        _refuse(graph, str(exc))


def _refuse(graph: Graph, what: str) -> NoReturn:
    """Raise, with what recording ``f`` changed put back (``biharmonic``'s ``"auto"``
    evaluates ``f`` again by another method: its buffers and random draws change once).
    ``"auto"``'s fallback depends on the op (a custom op: the loop of backward passes, as
    forward over reverse refuses one too; complex ``eigvalsh``: grad of grad): not named."""
    graph.undo()
    way = way_out(what, "use method='auto' (it falls back to another engine)")
    raise UnsupportedOp(f"laplacian: method='taylor' has no propagation rule for {what}; {way}")


def unit_directions(
    x: torch.Tensor, batch_dims: int, chunk: int, share: Share = WHOLE
) -> Iterator[torch.Tensor | Sparse]:
    """The unit vectors of the event (of a ``share`` of them), ``chunk`` at a time, stored
    once for all samples; all of them in one chunk, for an event of ``N`` particles in ``d``
    dimensions, as a per-particle ``Sparse`` jet (``torchdiv._taylor.sparse``)."""
    n = event_numel(x, batch_dims)
    particles = per_particle(x, batch_dims) if share is WHOLE and chunk >= n else None
    if particles is not None:
        yield particles
        return
    for first, stop in share.chunks(n, chunk):
        yield broadcast_basis(first, stop, x, batch_dims)


def input_jet(x: torch.Tensor, u: torch.Tensor | Sparse) -> tuple[Jet | Sparse, int]:
    """The jet of ``x`` along a chunk ``u`` of ``unit_directions``, and its number of directions."""
    return (u, u.num_directions) if isinstance(u, Sparse) else (Jet(x, u, None), len(u))


def collapsed(
    graph: Graph, x: torch.Tensor, directions: Iterator[torch.Tensor | Sparse], divisor: int = 1
) -> torch.Tensor:
    """``sum_k D^2 f(x)[u_k, u_k] / divisor`` over all directions: the output's collapsed
    second-order terms, summed over the chunks ``directions`` yields (each ``(k,) + x.shape``,
    broadcast, or a ``Sparse`` jet at ``x``). The sum is divided before it is cast to ``x``'s
    dtype: a float16 mean over 1000 probes overflowed as a sum (``inf``)."""
    total: torch.Tensor | None = None
    constants: dict[int, list[Any]] = {}
    known: list[list[Any]] | None = None
    for chunk, u in enumerate(directions):
        jet, k = input_jet(x, u)
        if chunk == 0:
            known = reused_values(graph, k)
        out = propagate(graph, jet, Context(k, True, jac=False), constants, known)
        if isinstance(out, Jet) and out.lap is not None:
            total = accumulated(total, out.lap)
    if total is None:  # f(x) does not depend on x, or only linearly
        out = x.new_zeros(graph.output_shape)
    else:
        out = (total if divisor == 1 else total / divisor).to(x.dtype).expand(graph.output_shape)
    return tied(out, x, tensors_read(graph, out))  # (with x requiring grad: a new tensor)


def tensors_read(graph: Graph, out: torch.Tensor) -> list[Any]:
    """For ``tied``: where ``f`` was trained (its recording requires grad) and its result
    ``out`` has no graph (``f`` piecewise linear: a ReLU network's Laplacian), the tensors
    ``f`` read that were not computed in it (its parameters, buffers, constants), as its
    recorded calls hold them; else none (nothing to tie, no walk)."""
    if not graph.requires_grad or out.requires_grad:
        return []
    return [t for node in graph.nodes for t in leaves((node.args, node.kwargs))]


# the values f computed are reused by a replay whose result is not differentiated only while
# keeping them adds at most this share of its jets' memory (``reused_values``)
REUSE_MEMORY = 0.05


def reused_values(graph: Graph, k: int) -> list[list[Any]] | None:
    """``graph.values`` for ``propagate``'s ``known`` at ``k`` directions a chunk (the replay
    then computes no value again: 0.8-0.95x the time at 2-100 inputs), or ``None``, with the
    values let go.

    Memory: a differentiated result (``graph.requires_grad``) keeps the values anyway, as
    autograd saves them. Otherwise a replay frees each value after its last use, and keeping
    them all adds their size, ``Graph.elements``, to its peak (0.8 -> 1.1 MiB for a tanh FNN
    at 2 inputs, 160 -> 300 MiB for a 20-layer one at 10): they are reused only while that is
    at most ``REUSE_MEMORY`` of one jet of the widest tensor, ``(k + 2) x Graph.widest``.
    Values: ``f`` was recorded with grad on, so under an outer ``no_grad`` its values may
    carry a graph that the result must not: they are reused only if none requires grad."""
    values, graph.values = graph.values, None
    if values is None:
        return None
    if not graph.requires_grad and graph.elements > REUSE_MEMORY * (k + 2) * graph.widest:
        return None
    if not torch.is_grad_enabled() and _requires_grad(graph, values):
        return None
    return values


def _requires_grad(graph: Graph, values: list[list[Any]]) -> bool:
    """Whether a recorded value ``f`` computed from ``x`` requires grad."""
    return any(
        node.depends and any(isinstance(v, torch.Tensor) and v.requires_grad for v in out)
        for node, out in zip(graph.nodes, values, strict=True)
    )


def collapsed_or_none(
    graph: Graph, x: torch.Tensor, directions: Iterator[torch.Tensor | Sparse], divisor: int = 1
) -> torch.Tensor | None:
    """``collapsed``, or ``None`` when the Taylor engine cannot run ``f``: an op without a
    rule (at capture or in a rule) or one that cannot be replayed. Callers then fall back,
    evaluating ``f`` again, so what recording it changed (buffers, RNG) is put back first."""
    try:
        if not graph.unsupported:
            return collapsed(graph, x, directions, divisor)
    except RuntimeError as error:  # UnsupportedOp included
        if out_of_memory(error):  # a memory problem, not an unsupported op
            raise
    graph.undo()
    return None


class _Gradients:
    """``z -> (m,) + z.shape``: row ``i`` holds every sample's gradient of output ``i``;
    remembers ``f(z).shape``. The pullback runs with grad on: under the caller's ``no_grad``
    the JVP of a backward op without a forward-mode formula of its own (``silu_backward``,
    ``mish_backward``: ``nn.SiLU``, ``nn.Mish``) raised PyTorch's "Trying to use forward AD
    with aten::silu_backward" (with grad on PyTorch differentiates it; the forward engine
    detaches the result there, ``ForwardJacobian._push``)."""

    def __init__(self, f: Function, batch_dims: int, value: bool = False):
        self.f, self.batch_dims, self.value = f, batch_dims, value
        self.y_shape = torch.Size()

    def __call__(self, z: torch.Tensor) -> Any:
        """The rows; with ``value``, ``(rows, f(z))`` (for ``jvp``'s ``has_aux``)."""
        y_and_pullback = vjp(self.f, z)  # typed as a 2- or 3-tuple (has_aux)
        y = y_and_pullback[0]
        pullback: Callable[[torch.Tensor], tuple[torch.Tensor]] = y_and_pullback[1]
        self.y_shape = y.shape
        vectors = basis(0, event_numel(y, self.batch_dims), y, self.batch_dims)
        with torch.enable_grad():
            (rows,) = batched(pullback, vectors)
        return (rows, y) if self.value else rows


NESTED_WAY_OUT = "method='taylor' or 'grad-of-grad'"  # what to use where an op is refused


def hessian_products(
    f: Function,
    x: torch.Tensor,
    batch_dims: int,
    directions: torch.Tensor,
    way_out: str = NESTED_WAY_OUT,
    gradients: list[torch.Tensor] | None = None,
    values: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Size]:
    """``H_{b,i} v_j`` for every sample ``b``, output ``i`` and direction ``v_j`` (``(k,) +
    x.shape``), shape ``(k, m, N, n)``, and ``f(x).shape``: JVPs of the per-sample gradients.
    ``way_out``: what the error for an op whose derivatives through forward mode are refused
    (``WrongDerivatives``) tells the caller to use instead. ``gradients``: a list to which the
    gradients themselves (the JVPs' primal, ``(m,) + x.shape``) are appended; ``values``: one
    to which ``f(x)`` of that same evaluation is (a random ``f`` draws there what its
    derivatives are of: torch.func's transforms may draw otherwise than a plain call)."""
    grads = _Gradients(under_tangents(f, 3, way_out), batch_dims, value=values is not None)
    engine = ForwardJacobian(grads, x, batch_dims, order=None, has_aux=values is not None)
    columns = engine.apply(directions)
    if gradients is not None:
        gradients.append(engine.y)
    if values is not None and engine.aux is not None:
        values.append(engine.aux)
    k, m = columns.shape[:2]
    n_samples, n = x.shape[:batch_dims].numel(), event_numel(x, batch_dims)
    return columns.reshape(k, m, n_samples, n), grads.y_shape


def products_along(
    f: Function,
    batch_dims: int,
    directions: torch.Tensor,
    way_out: str = NESTED_WAY_OUT,
    gradients: list[torch.Tensor] | None = None,
    values: list[torch.Tensor] | None = None,
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Size]]:
    """``x -> hessian_products(f, x, batch_dims, directions, way_out, gradients, values)``, for
    ``Once`` to wrap."""
    return lambda x: hessian_products(f, x, batch_dims, directions, way_out, gradients, values)


def forward_over_reverse(
    f: Function,
    x: torch.Tensor,
    batch_dims: int,
    chunk_size: int | None,
    share: Share = WHOLE,
    each: Once | None = None,
    gradients: list[torch.Tensor] | None = None,
    values: list[torch.Tensor] | None = None,
    way_out: str = NESTED_WAY_OUT,
) -> torch.Tensor:
    """The Laplacian (the part of a ``share`` of the directions, which must not be empty) by
    Hessian columns, JVPs of the per-sample gradients, keeping only the diagonal entries
    (``way_out``: the methods an op's refusal names, ``hessian_products``).
    ``each``: the caller's ``Once``, whose evaluations of ``f`` every chunk's starts from.
    ``gradients``: a list to which the gradients (``(m,) + batch + (n,)``, the event flat, of
    the whole share) are appended, each coordinate ``j`` from the JVPs' primal of the chunk
    whose products give ``∂²/∂x_j²``: differentiated, as a local energy's parameter
    gradients, ``∂_j log ψ`` and ``∂²_j log ψ`` then go back through one graph, where near a
    node their ``1 / r²`` rounding errors cancel as the loop's do; the first chunk's primal
    for every coordinate gave 5-1800x the loop's error (electrons 0.1-1e-4 apart, float32,
    rev-qmc28). ``values``: a list to which ``f(x)`` of the first chunk's evaluation is
    appended (every chunk's from one state: the draw the derivatives are of, rev-b33)."""
    n = event_numel(x, batch_dims)
    pieces = list(share.chunks(n, chunk_size or n))
    each = each or Once(x, len(pieces) > 1)  # f evaluated once per chunk: from one state
    rows: list[torch.Tensor] = []  # each chunk's primal gradients, its coordinates only

    def parts() -> Iterator[tuple[torch.Tensor, torch.Size]]:
        for start, stop in pieces:
            directions = basis(start, stop, x, batch_dims)
            kept: list[torch.Tensor] | None = None if gradients is None else []
            value = values if values is not None and not values else None  # (the first's)
            # f's own evaluation watched, not its backward and tangent passes (see hutchinson)
            along = products_along(each(f), batch_dims, directions, way_out, kept, value)
            columns, y_shape = along(x)
            if kept:  # (m,) + x.shape -> (m,) + batch + (stop - start,)
                primal = kept[0]
                rows.append(primal.reshape(*primal.shape[: 1 + batch_dims], n)[..., start:stop])
            unwrap_between_evaluations()
            j = torch.arange(stop - start, device=x.device)
            yield columns[j, :, :, start + j].sum(0), y_shape  # (m, N): entries (start+j, start+j)

    total, y_shape = each.undoing(lambda: summed(parts()))
    if gradients is not None:
        gradients.append(rows[0] if len(rows) == 1 else torch.cat(rows, -1))
    return total.to(x.dtype).T.reshape(y_shape)


def summed(parts: Iterator[tuple[torch.Tensor, torch.Size]]) -> tuple[torch.Tensor, torch.Size]:
    """The sum of the per-chunk ``(m, N)`` parts (at least one: ``x`` is not empty), in at
    least float32 (``accumulated``: the caller casts it), and ``f(x).shape``; parts are made
    one at a time, so one chunk's products are in memory."""
    total: torch.Tensor | None = None
    y_shape = torch.Size()
    for part, shape in parts:  # a loop: Dynamo traces no next() of a generator
        total, y_shape = accumulated(total, part), shape
    assert total is not None
    return total, y_shape


def zeros_like_output(f: Function, x: torch.Tensor) -> torch.Tensor:
    """An empty input event: every Laplacian is an empty sum."""
    with torch.no_grad():
        return x.new_zeros(f(x).shape)


def hessian(f: Function, x: torch.Tensor, batch_dims: int, chunk_size: int | None) -> torch.Tensor:
    n = event_numel(x, batch_dims)
    pieces = list(chunks(n, chunk_size or n))
    each = Once(x, len(pieces) > 1)  # f evaluated once per chunk: from one state

    def along(start: int, stop: int) -> tuple[torch.Tensor, torch.Size]:
        # f's own evaluation watched, not its backward and tangent passes (see hutchinson)
        out = products_along(each(f), batch_dims, basis(start, stop, x, batch_dims))(x)
        unwrap_between_evaluations()
        return out

    products = each.undoing(lambda: [along(start, stop) for start, stop in pieces])
    hessians = torch.cat([columns for columns, _ in products]).permute(2, 1, 3, 0)  # (N, m, n, n)
    return hessians.diagonal(dim1=-2, dim2=-1).sum(-1).reshape(products[-1][1])


def hutchinson(
    f: Function, x: torch.Tensor, batch_dims: int, chunk_size: int | None, probes: torch.Tensor
) -> torch.Tensor:
    """``(1/r) sum_j v_j^T H v_j`` per sample and output: collapsed Taylor mode along the probes,
    or Hessian-vector products dotted with the probes if an op has no Taylor rule: by forward
    over reverse, or, where forward mode cannot run ``f`` (``grid_sample``: it raised for the
    whole call), by backward passes (``loop.probed``; remembered as ``"auto"``'s fallback,
    ``loop_where_forward_fails``). Every evaluation starts from the state the first found.
    Where the recording refused an op, that fallback is remembered for ``f``'s structure
    (``_PROBED``): a later call there evaluates ``f`` once, watched for sample mixing, instead
    of three times (recording, forward mode's attempt, the loop)."""
    if peek_interpreter_stack() is None and _PROBED.get(_site(f), f, x, batch_dims):
        return probed(f, x, batch_dims, probes, check="watch")
    check_transformed(f, x, batch_dims, lambda: unchanged(f, x))  # (no watch sees f there)
    r = len(probes)
    pieces = [probes[start:stop] for start, stop in chunks(r, chunk_size or r)]
    graph = None
    if not torch.compiler.is_compiling():  # no recording in a compiled graph: HVPs there
        graph = capture(f, x, RULES, batch_dims=batch_dims)
        out = collapsed_or_none(graph, x, iter(pieces), divisor=r)
        if out is not None:
            return out

    each = Once(x)  # f evaluated once per chunk, and again by the loop: from one state
    if graph is not None and custom_refused(graph):  # (its backward, unseen by the recording)
        each(lambda z: watch_evaluation(f, z, batch_dims))(x)

    def parts() -> Iterator[tuple[torch.Tensor, torch.Size]]:
        for v in pieces:
            # only f's own evaluation watched, inside the transforms (watching the whole
            # products cost 10-20% of an estimate): its backward and tangent passes cannot
            # change state there (torch.func refuses their writes to tensors f did not make,
            # vmap their random draws, checkpoints' saved-tensor hooks and modules' backward
            # hooks: forward mode "fails" and the loop runs); a tensor f set as an attribute
            # under this chunk's transforms, dead after them, unwrapped before the next reads
            # it (``unwrap_between_evaluations``; inside, it was still alive)
            products, y_shape = products_along(each(f), batch_dims, v)(x)  # (k, m, N, n)
            unwrap_between_evaluations()
            k, _, n_samples, n = products.shape
            yield (products * v.reshape(k, 1, n_samples, n)).sum((0, 3)), y_shape  # (m, N)

    def hessian_vector_products() -> torch.Tensor:
        total, y_shape = summed(parts())
        return (total / r).to(x.dtype).T.reshape(y_shape)

    def by_backward_passes() -> torch.Tensor:
        out = probed(each(f), x, batch_dims, probes)
        if graph is not None and graph.unsupported:  # a refusal by f's ops, not its values
            _PROBED.put(_site(f), f, x, batch_dims, True)
        return out

    return loop_where_forward_fails(hessian_vector_products, by_backward_passes, f, x, batch_dims)


BY_NAME: dict[str, Callable[[Function, torch.Tensor, int, int | None], torch.Tensor]] = {
    "auto": auto,
    "taylor": taylor,
    "forward-over-reverse": forward_over_reverse,
    "hessian": hessian,
    # its graph searched for a train-mode batch norm (a few microseconds): unchecked, the
    # Laplacian of a net with one was the batch-summed one, 0 for a batch norm with running
    # statistics (every other exact method refuses it: torch.func refuses its write)
    "grad-of-grad": recorded(
        lambda f, x, batch_dims, _: grad_of_grad(f, x, batch_dims, check="graph")
    ),
}
