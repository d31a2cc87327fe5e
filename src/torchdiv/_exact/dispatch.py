"""The exact methods' one dispatch, and the operators read from a Jacobian engine.

``diagonal_and_output`` picks the structured engine first (``torchdiv._structured``), then the
generic ones (``evaluate``: forward mode, reverse mode, batched autograd, re-running ``f``).
An engine (``ForwardJacobian``, ``ReverseJacobian`` or ``GraphJacobian``) hands out blocks
of ``k`` Jacobian columns or rows of all ``N`` samples at once, shape ``(k, N, m)``. The
consumers here never touch autograd; they only slice and stack those blocks, so the memory in
flight is one block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import torch

from torchdiv import _structured
from torchdiv._core import crossover
from torchdiv._core.basis import WHOLE, Share, chunks
from torchdiv._core.checks import event_numel, out_of_memory, untransformed
from torchdiv._core.mixing.errors import BatchInteractionError, allowed
from torchdiv._core.mixing.reads import reading
from torchdiv._core.mixing.transformed import check_transformed
from torchdiv._core.mixing.watch import (
    check_empty_event,
    checks_empty_event,
    custom_products,
    tracker,
)
from torchdiv._core.modes import saves_apart
from torchdiv._core.tie import tied
from torchdiv._core.walk import GraphTooDeep
from torchdiv._exact import plan as _plan
from torchdiv._exact import state as _state
from torchdiv._exact.autograd import (
    GraphJacobian,
    RerunJacobian,
    UnderTransform,
    leaf,
    unwatched,
)
from torchdiv._exact.chain import widest as chain_widest
from torchdiv._exact.forward import ForwardJacobian
from torchdiv._exact.reverse import ReverseJacobian
from torchdiv._taylor.cache import PlanCache, key
from torchdiv._taylor.capture import argument
from torchdiv._taylor.mixing import Passed, passed, passed_before, recorded_mixing, structure

EXACT_METHODS = ("auto", "forward", "reverse")
T = TypeVar("T")


class Engine(Protocol):
    """What the consumers need: ``block(start, stop)`` gives ``(k, N, m)`` columns or rows."""

    blocks_are_rows: bool
    num_basis: int
    x: torch.Tensor
    batch_dims: int

    @property
    def y(self) -> torch.Tensor: ...  # f(x), differentiable like the products

    @property
    def y_shape(self) -> torch.Size: ...

    def block(self, start: int, stop: int) -> torch.Tensor: ...

    def apply(self, vectors: torch.Tensor, /) -> torch.Tensor: ...  # (k,) + in -> (k,) + out


E = TypeVar("E", bound=Engine)


def dense(engine: Engine, chunk_size: int) -> torch.Tensor:
    """Every sample's Jacobian, shape ``(N, m, n)`` (outputs by inputs)."""
    pieces = list(chunks(engine.num_basis, chunk_size))
    if not pieces:  # no basis vectors: an empty event on the side the engine walks along
        m = math.prod(engine.y_shape[engine.batch_dims :])
        return engine.x.new_zeros(_samples(engine), m, event_numel(engine.x, engine.batch_dims))
    if len(pieces) > 1 and untransformed():
        return _filled(engine, pieces)
    return _stacked(engine, [engine.block(start, stop) for start, stop in pieces])


def _stacked(engine: Engine, blocks: list[torch.Tensor]) -> torch.Tensor:
    """``dense`` from all its ``(basis, N, other side)`` blocks; one block as it is, unless it
    overlaps itself (a JVP through ``expand``): the result is the caller's to write to."""
    one = len(blocks) == 1 and blocks[0].is_contiguous()
    stacked = blocks[0] if one else torch.cat(blocks)
    return stacked.permute(1, 0, 2) if engine.blocks_are_rows else stacked.permute(1, 2, 0)


def _filled(engine: Engine, pieces: list[tuple[int, int]]) -> torch.Tensor:
    """``dense`` written into its result one block at a time, each block dropped before the
    next is made: the peak is the result plus one chunk, where the ``torch.cat`` of every
    block held two copies of the Jacobian whatever ``chunk_size``.

    Blocks with a graph are stacked instead (``_stacked``): written into one tensor they would
    chain one ``CopySlices`` per chunk, each copying the whole Jacobian's gradient backwards.
    Only outside the caller's ``torch.func`` transforms (``dense``), where a batched block
    cannot be written into a plain tensor."""
    out: torch.Tensor | None = None
    blocks: list[torch.Tensor] = []
    for start, stop in pieces:
        block = engine.block(start, stop)  # (k, N, n) rows or (k, N, m) columns
        if blocks or (out is None and block.requires_grad):
            blocks.append(block)
            continue
        if out is None:
            other = block.shape[2]
            sides = (
                (engine.num_basis, other) if engine.blocks_are_rows else (other, engine.num_basis)
            )
            out = block.new_empty(block.shape[1], *sides)
        if engine.blocks_are_rows:
            out[:, start:stop] = block.permute(1, 0, 2)
        else:
            out[:, :, start:stop] = block.permute(1, 2, 0)
        del block  # before the next block is made
    if out is None:
        return _stacked(engine, blocks)
    return out


# (site, key) -> whether f's output had x's event size there (``jacobian``)
_SQUARE = PlanCache(64)


def jacobian(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    batch_dims: int,
    method: str,
    chunk_size: int | None,
    where: Any = None,
) -> tuple[torch.Tensor, torch.Size]:
    """Every sample's Jacobian ``(N, m, n)`` (``dense``) and ``f(x).shape``.

    Whether ``f``'s output is as large as its input is known only once ``f`` has run; the
    last call at the same site (``where``, as ``torchdiv._taylor.cache.site`` names it) and
    key tells it beforehand, so that tiny square problems go by plain autograd rows
    (``_plain_first``). A wrong guess costs time, never correctness: rows are exact whatever
    the output's size. Not kept inside a compiled region, where plain autograd is not
    taken."""
    if torch.compiler.is_compiling():
        return evaluate(f, x, batch_dims, method, chunk_size, dense, draws=False)
    k = key(x, batch_dims)
    square = where is not None and bool(_SQUARE.get(where, k))
    jac, y_shape = evaluate(f, x, batch_dims, method, chunk_size, dense, square=square, draws=False)
    now = math.prod(y_shape[batch_dims:]) == event_numel(x, batch_dims)
    if where is not None and now != square:
        _SQUARE.put(where, k, now)
    return jac, y_shape


def diagonal(engine: Engine, chunk_size: int, share: Share = WHOLE) -> torch.Tensor:
    """Diagonal of every sample's square Jacobian, shape ``(N, n)``; of a ``share`` of the
    basis vectors, its entries only, ``(N, k)``."""
    parts = []
    pieces = list(share.chunks(engine.num_basis, chunk_size))
    for start, stop in pieces:
        # (N, k): entry (start+j, start+j) of each sample, a view of the (k, N, n) block,
        # copied where more blocks follow: a view keeps its whole block alive until the
        # ``cat`` (every chunk's block at once, ``(N, n, n)``: chunk_size would bound nothing)
        entries = engine.block(start, stop).diagonal(start, dim1=0, dim2=2)
        parts.append(entries if len(pieces) == 1 else entries.clone())
    if not parts:
        return engine.x.new_zeros(_samples(engine), 0)
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def diagonal_and_output(
    fn: str,
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    batch_dims: int,
    method: str,
    chunk_size: int | None,
    trace: bool,
    share: Share = WHOLE,
    where: Any = None,
    keep_y: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample's exact Jacobian diagonal ``(N, n)`` (with ``trace``: its sum, ``(N,)``) and
    ``f(x)`` from the same evaluation (an ODE's dynamics need both, ``torchdiv.flows``). With a
    ``share`` (and ``trace``), the part of the trace from that share of the directions (unit
    vectors, colours or columns; ``torchdiv.distributed``). ``keep_y=False``: the caller
    drops ``f(x)``, which is then handed back as the engine holds it (``output`` not taken:
    a ``detach``, one dispatched op of a tiny problem's call).

    The one dispatch of the exact methods for diagonals and traces: the structured engine
    where ``method`` asks for it (``"auto"``: unless tiny; ``"structured"`` raises, naming the
    op, if it cannot plan ``f``), else the generic engines (``evaluate``; ``"structured"`` on an
    empty ``x``, with nothing to plan, runs ``"auto"``). ``fn`` names the public function in
    errors; ``where`` is the caller's function as ``torchdiv._taylor.cache.site`` names it,
    under which the structured engine keeps its recording for the next call, or its refusal
    (``_structured.refused_before``: an op without a rule), after which ``"auto"`` goes to
    the generic engines without recording ``f``, their evaluation watched for sample mixing
    at every call (``evaluate``'s ``watched``), as the recording was.
    """
    refused = False  # the structured engine found no rule for an op of f here before
    if _structured.chosen(method, f, x, batch_dims):
        strict = method == "structured"
        refused = not strict and _structured.refused_before(where, f, x, batch_dims)
        planned = None
        # (a small diagonal: the generic engines' rows, watched as after a refusal if so)
        if not refused and (strict or trace or not _structured.rows_diagonal(f, x, batch_dims)):
            planned = _structured.plan(
                fn, f, x, batch_dims, chunk_size, strict, trace, share, where
            )
            # (refused just now: this call's watch may pass for the later ones)
            refused = planned is None and _structured.refused_before(where, f, x, batch_dims)
        if planned is not None:  # tied: on x's graph where f is piecewise linear in x (not a
            # share: torchdiv.distributed tells a rank's part without a graph by requires_grad)
            return (tied(planned[0], x) if share == WHOLE else planned[0]), planned[1]
    generic = "auto" if method == "structured" else method

    def consume(engine: Engine, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        diag = None
        if isinstance(engine, GraphJacobian):  # plain autograd: a chain's trace, or a few
            # rows' entries, if so
            diag = engine.trace() if trace and share == WHOLE else None
            if diag is None:  # (a few rows, one backward pass each: their entries, no block)
                diag = engine.entries(*share.of(engine.num_basis), trace)
        if diag is None:
            diag = diagonal(engine, chunk, share)
            # (one chunk's diagonal is a view of its (k, N, n) block: handed out as it is,
            # it kept the block alive with it, n times its own size, and torch.save wrote that)
            diag = diag.sum(-1) if trace else diag.contiguous()
        # (after the products: a forward-mode engine's y comes from its first block)
        return diag, output(engine) if keep_y else engine.y

    result, _ = evaluate(
        f, x, batch_dims, generic, chunk_size, consume, square=True, draws=False, watched=refused
    )
    return result


def output(engine: Engine) -> torch.Tensor:
    """``f(x)`` as the caller's autograd should see it. The plain-autograd engine evaluates ``f``
    on a leaf copy of its own when ``x`` does not require grad; unless its products keep a
    graph (``create_graph``: something else ``f`` depends on requires grad, under grad mode),
    nothing outside differentiates ``y``, which is then detached from that copy. Reverse mode
    evaluates ``f`` with grad on (``ReverseJacobian``): for a caller without grad, detached."""
    if isinstance(engine, GraphJacobian) and not engine.create_graph:
        return engine.y.detach()
    if isinstance(engine, ReverseJacobian) and not engine.outer_grad:
        return engine.y.detach()
    return engine.y


def _samples(engine: Engine) -> int:
    return engine.x.shape[: engine.batch_dims].numel()


def evaluate(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    batch_dims: int,
    method: str,
    chunk_size: int | None,
    consume: Callable[[Engine, int], T],
    generator: torch.Generator | None = None,
    square: bool = False,
    draws: bool = True,
    owner: Any = None,
    watched: bool = False,
    vectors: int | None = None,
) -> tuple[T, torch.Size]:
    """Run ``consume`` on the engine ``method`` names; returns its result and ``f(x).shape``.

    ``"forward"`` and ``"reverse"`` are taken as given (``chunk_size=None``: all at once).
    ``"auto"`` runs the first engine that can run ``f`` (``_first_that_runs``); ``generator``
    is the one ``consume`` draws from (``None``: the default one of ``x``'s device), if it
    ``draws`` (an exact ``consume`` does not); ``square``: ``f``'s output has as many
    elements per sample as ``x`` (``_engines``).

    The evaluations ``"auto"`` watches also follow the batch dimensions (``_mixing``): an ``f``
    that mixes samples raises ``BatchInteractionError``. The explicit methods are not watched,
    except for an empty event (elementwise functions only), which costs one more evaluation.
    Where an explicit method evaluates ``f`` more than once (that check, forward mode in
    several chunks), every evaluation starts from the state the first found
    (``_state.Once``): one function, its buffers and random draws changed once. ``f`` and the
    watches get a new alias of ``x``: the caller's ``x`` object read by ``f`` (a closure) is a
    constant, never taken for the argument (under ``torch.func`` the argument is that object).
    ``owner``: what ``f`` evaluates, if ``f`` is a closure made anew at every call over a new
    object (a flow's velocity ``f(t, z)`` at each time ``t``, ``torchdiv.flows``' estimators):
    tiny problems are watched for sample mixing until ``owner``, not each new ``f``, has
    passed (``_engines``); ``watched``: every call of ``"auto"`` is watched, whatever passed.
    ``vectors``: how many vectors ``consume`` multiplies at most, where not the engine's
    basis (a stochastic estimate's probes): ``"auto"``'s chunks hold up to that many.
    """
    if method not in ("forward", "reverse"):
        if not draws or torch.compiler.is_compiling():  # Dynamo cannot trace generator states
            generator = None
        else:
            generator = generator or _state.default_generator(x.device)
        with saves_apart():  # (inside the caller's checkpoint region: see there)
            return _first_that_runs(
                f, x, batch_dims, chunk_size, consume, generator, square, owner, watched, vectors
            )
    x = argument(x)
    # f evaluated by the check, and by forward mode once per chunk of directions
    check = checks_empty_event(x, batch_dims)
    several = method == "forward" and 0 < (chunk_size or 0) < event_numel(x, batch_dims)
    each = _state.Once(x, check or several)
    if check:
        each(lambda z: check_empty_event(f, z, batch_dims))(x)
    with saves_apart():  # (forward mode's saves: the checkpoint's would recompute them bare)
        if method == "forward":
            engine: Engine = ForwardJacobian(f, x, batch_dims, each)
        else:
            engine = each(lambda z: ReverseJacobian(f, z, batch_dims))(x)
        return consume(engine, chunk_size or max(engine.num_basis, 1)), engine.y_shape


Build = Callable[[], tuple[Engine, _plan.Sizes]]  # an engine and the sizes that plan its chunks


def _first_that_runs(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    batch_dims: int,
    chunk_size: int | None,
    consume: Callable[[Engine, int], T],
    generator: torch.Generator | None,
    square: bool,
    owner: Any = None,
    watched: bool = False,
    vectors: int | None = None,
) -> tuple[T, torch.Size]:
    """``consume`` on the first engine that runs: forward mode (if ``_plan`` picks it),
    reverse mode, batched plain autograd, then ``f`` re-run per vector (``_engines``, which
    gives each engine its new alias of the caller's ``x``; tiny square problems start with
    plain autograd).

    An engine that raises an error saying it cannot run ``f`` (``_cannot_run``: an op
    without a forward-mode rule, a legacy ``autograd.Function`` under ``torch.func``, a
    backward that PyTorch's legacy ``vmap`` cannot batch, a graph that can be walked once)
    hands over to the next, with the draws of ``generator`` undone (the same probes) and
    every later evaluation of ``f`` starting from the state the first one found
    (``_state.Changes.again``: buffers and random draws change once). Other errors propagate
    at once; if no engine runs ``f``, the last engine's error does. ``generator``: ``None``
    when ``consume`` draws nothing, or inside a compiled region (Dynamo cannot trace
    generator states). Chunks hold up to ``vectors`` vectors (``None``: the engine's basis,
    ``num_basis``), fewer where the plan's sizes say so (``Sizes.chunk``): a 2-D CNF's
    8-probe Hutchinson took 4 pullbacks of 2 probes each, 3.3x the hand-written recipe.
    """
    # (the caller's transform: the watch sees nothing there)
    check_transformed(f, x, batch_dims, lambda: _state.unchanged(f, x))
    failure: Exception | None = None
    for build in _engines(f, x, batch_dims, square, owner, watched):
        drawn = None
        try:
            engine, sizes = build()  # evaluates f, whose own draws are its side effect
            drawn = generator.get_state() if generator is not None else None
            chunk = chunk_size or sizes.chunk(vectors or engine.num_basis)
            return consume(engine, chunk), engine.y_shape
        except Exception as error:
            if not _cannot_run(error):
                raise
            if failure is None or not isinstance(error, UnderTransform):
                failure = error  # (the last error of f's own, under the caller's transform)
            if generator is not None and drawn is not None:  # the same probes next
                generator.set_state(drawn)
    assert failure is not None  # _engines always gives the re-running engine last
    raise failure


def _engines(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    batch_dims: int,
    square: bool,
    owner: Any = None,
    watched: bool = False,
) -> list[Build]:
    """The engines ``"auto"`` tries, in order, as functions that build them.

    Reverse mode's evaluation of ``f`` plans (rules in ``_plan``): forward mode goes first
    for conv nets and for outputs larger than inputs, unless an op without a forward-mode
    rule ran. Tiny problems are not planned; they are watched for sample mixing until this
    very ``f`` (or its ``owner``) has passed a watch at the structure of ``x``
    (``passed_before``), and always
    when the event is empty, where any op but an elementwise one mixes samples. Tiny
    ``square`` problems that passed start with plain autograd (``_plain_first``), as do
    ``square`` ones up to ``crossover.ROWS_PROBLEM`` whose planned evaluation passed the watch
    without a convolution (CPU convolution backward is the slower side), and up to
    ``crossover.CHAIN_ROWS_PROBLEM`` while no plain evaluation there has shown a graph that
    is not a chain (``Passed.chain``: an MLP's rows from its top layer's). If ``torch.func``
    cannot evaluate ``f``, the plain-autograd engine's evaluation is watched instead (not
    under the caller's own transform, which refuses its leaf copy of ``x``: there
    ``torch.func``'s error is raised, a buffer written in an ensemble's ``vmap``), on a
    leaf copy of ``x`` made before the watch starts (``leaf``), so that the watch follows
    the samples into ``f``; a tiny problem then starts there at its later calls
    (``Passed.reverse``): their unwatched evaluation by ``torch.func`` would fail again, after
    ``f`` changed its state (a spectral norm's power iteration before a train-mode batch
    norm's refused write), which nothing could put back. ``watched``: nothing that passed
    before is looked up or marked, and reverse mode's evaluation is watched.
    """
    num_inputs = event_numel(x, batch_dims)
    size = num_inputs * x.numel()
    tiny = size <= _plan.TINY_PROBLEM
    by_rows = square and x.dim() > batch_dims
    rows = by_rows and size <= crossover.ROWS_PROBLEM
    chain_rows = by_rows and not rows and size <= crossover.CHAIN_ROWS_PROBLEM
    compiling = torch.compiler.is_compiling()
    at = (
        structure(f if owner is None else owner, x, batch_dims)
        if (tiny or rows or chain_rows or watched) and not compiling
        else None
    )
    seen = None if at is None else passed_before(f, x, batch_dims, at)
    # (after a refusal: the sizes of the watch that passed, which plan the engines unwatched)
    kept = _REFUSED_SIZES.get(*at) if watched and seen is not None and at is not None else None
    plain_rows = rows or (chain_rows and seen is not None and seen.chain)
    if plain_rows and seen is not None and not (kept is not None and kept[2]):
        return _plain_first(f, x, batch_dims, seen, chain_rows)
    x = argument(x)  # (see evaluate)
    changes = _state.Changes(x)
    again = changes.again(f)
    planned = [_plan.Sizes(x.shape[:batch_dims])]  # the last watched evaluation's sizes

    def rerun() -> tuple[Engine, _plan.Sizes]:
        return RerunJacobian(again, x, batch_dims), planned[-1]

    def graph() -> tuple[Engine, _plan.Sizes]:
        built = watched_graph(again, x, batch_dims)
        # (a train-mode batch norm: plain autograd evaluates twice; an f evaluated again at
        # INNER_ORDER: unwatched, it could not start again from the caller's state)
        if tiny and not watched and not built[0].inner_again:
            plain = not built[0].guarded
            passed(f, x, batch_dims, at, plain, False, verdict=built[1].verdict)
        planned.append(built[1])
        return built

    if tiny and seen is not None and not seen.reverse:  # (unwatched, it could not put back)
        return [graph, rerun]
    if kept is not None:  # passed after a refusal: the engines its watch planned, unwatched
        sizes, forward, _ = kept
        planned.append(sizes)
        engines: list[Build] = [
            lambda: (ReverseJacobian(f, x, batch_dims), sizes),
            lambda: (GraphJacobian.of_function(again, x, batch_dims), sizes),
            rerun,
        ]
        first = lambda: (ForwardJacobian(f, x, batch_dims, changes.again), sizes)  # noqa: E731
        return [first, *engines] if forward else engines
    try:
        watch = not compiling and (
            not tiny or not (seen is not None and (x.dim() > batch_dims or allowed()))
        )
        reverse, sizes = watched_engine(
            lambda: ReverseJacobian(f, x, batch_dims, changes if watch else None),
            x,
            batch_dims,
            watch,
            changes,
        )
        later = watch and not reverse.inner_again  # later calls: unwatched
        if later and (watched or tiny or ((rows or chain_rows) and not sizes.convolves)):
            passed(f, x, batch_dims, at, not reverse.replaced, verdict=sizes.verdict)
        convolves = sizes.convolves
        if tiny:  # watched for sample mixing only: planned as every later call, not at all
            sizes = _plan.Sizes(x.shape[:batch_dims])
        forward = (reverse.num_basis > num_inputs or sizes.convolves) and sizes.forward_rules
        if later and watched and at is not None:
            _REFUSED_SIZES.put(*at, (_planned(sizes), forward, convolves))
    except Exception as error:
        if not _cannot_run(error):
            raise
        mixing = "captured Tensor" in str(error) and recorded_mixing(f, x, batch_dims)
        if mixing:  # a train-mode batch norm: raised before plain autograd updates it
            raise BatchInteractionError(mixing) from None
        if not untransformed() and not compiling:
            raise  # the caller's transform: plain autograd cannot run there (UnderTransform)
        return [graph, rerun]
    planned.append(sizes)
    engines = [
        lambda: (reverse, sizes),
        lambda: (GraphJacobian.of_function(again, x, batch_dims), sizes),
        rerun,
    ]
    if forward:
        engines.insert(0, lambda: (ForwardJacobian(f, x, batch_dims, changes.again), sizes))
    return engines


# what planned the engines at a watched evaluation that passed after the structured engine's
# refusal, by structure (``structure``): its sizes (``_plan.Sizes``, the widest tensor;
# unplanned for a tiny problem), whether forward mode went first, and whether an op convolved
# (plain autograd does not go first then: ``_plain_first``). A later call there that finds the
# pass (``passed_before``) runs those engines unwatched (neuraloperator's FNO at 8 x 8: watched
# at every call until leftovers19, 1.4-1.7x ``"reverse"``)
_REFUSED_SIZES = PlanCache(256)


def _planned(sizes: _plan.Sizes) -> _plan.Sizes:
    """What of ``sizes`` plans the engines (``_REFUSED_SIZES``), without the watch's state."""
    kept = _plan.Sizes(sizes.batch_shape)
    kept.widest, kept.convolves = sizes.widest, sizes.convolves
    kept.forward_rules = sizes.forward_rules
    return kept


def _plain_first(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    batch_dims: int,
    seen: Passed,
    chain_only: bool = False,
) -> list[Build]:
    """Tiny square problems: plain autograd first (one backward pass for all rows, batched
    by ``vmap``, ``GraphJacobian._batched_vjp``; the graph checked for what mixes samples
    there), then reverse mode and ``f`` re-run per vector. ``chain_only``: a larger problem
    that goes so only where ``f``'s graph is a chain (``crossover.CHAIN_ROWS_PROBLEM``): one
    that is not takes this call's plain rows, and the planned engines from the next call on
    (``Passed.chain``).

    ``torch.func``'s wrapping of ``f`` and of its pullback costs more than the whole
    computation here (D=2, B=256 MLP: about 0.5 ms against 0.7 ms for plain autograd); the
    output is as large as the input (``square``: a trace or a diagonal), so rows are the
    cheaper side. Unwatched as ``torch.func``'s engine is at this size; the evaluation
    changes what ``f`` changes once, as one evaluation of ``f``: an engine tried after it
    evaluates ``f`` again (``_state.Changes`` sees only its own evaluations). Plain
    autograd evaluates ``f`` outside ``SafeDerivatives`` while no evaluation at this
    structure has shown an op it changes (``seen.plain``, ``GraphJacobian.of_function``).

    ``x`` is the caller's: plain autograd evaluates ``f`` on a new alias or leaf copy of its
    own (``_evaluated``), the engines after it on a new alias made if it fails (``evaluate``).
    """
    sizes = _plan.Sizes(x.shape[:batch_dims])  # unwatched: one chunk
    made: list[Any] = []  # (the alias, f putting back its changes, those) if plain autograd fails
    evaluated: list[bool] = []  # plain autograd evaluated f, then its walk stopped (scale27)

    def alias() -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        if not made:
            z = argument(x)
            changes = _state.Changes(z)
            made.extend((z, changes.again(f), changes))
        return made[0], made[1]

    def plain() -> tuple[Engine, _plan.Sizes]:
        try:
            engine = unwatched(f, x, batch_dims, seen.plain)
        except GraphTooDeep:  # (raised by the walk of the graph f's evaluation made)
            evaluated.append(True)
            raise
        seen.plain = seen.plain and not engine.guarded
        seen.chain = seen.chain and not (chain_only and not engine.steps)
        sizes.widest = engine.y.numel()  # one chunk, unless the output is far larger than x
        if chain_only and engine.steps:  # (or a layer far wider: the rows in chunks)
            sizes.widest = chain_widest(engine.steps, engine.y)
        return engine, sizes

    def reverse() -> tuple[Engine, _plan.Sizes]:
        z, again = alias()
        engine = ReverseJacobian(again, z, batch_dims)
        if evaluated:  # (its writes put back, as ``written_once``: f's buffers move once)
            made[2].undo_writes()
        return engine, sizes

    def rerun() -> tuple[Engine, _plan.Sizes]:
        z, again = alias()
        return RerunJacobian(again, z, batch_dims), sizes

    return [plain, reverse, rerun]


def watched_engine(
    build: Callable[[], E],
    x: torch.Tensor,
    batch_dims: int,
    watch: bool = True,
    changes: _state.Changes | None = None,
) -> tuple[E, _plan.Sizes]:
    """Build an engine (which evaluates ``f`` once), with ``OpSizes`` watching the ops (and the
    batch dimensions, starting from ``x``: the very tensor ``f`` gets) and, in the same mode,
    ``changes`` the state ``f`` changes, if ``watch``; unwatched sizes record nothing, so their
    chunk is all basis vectors. ``BatchInteractionError`` if the watched ``f`` mixes samples."""
    if not watch:
        return build(), _plan.Sizes(x.shape[:batch_dims])
    sizes = _plan.OpSizes(x.shape[:batch_dims], tracker(x, batch_dims), changes)
    with sizes, reading(sizes.axes):
        engine = build()
        sizes.finish(engine.y)
        custom = sizes.axes is not None and sizes.axes.custom_forward
    if custom:  # (a custom Function's backward or jvp: unseen, its products checked)
        if engine.blocks_are_rows:  # (backward passes: ``engine.y``'s graph tells whose)
            custom_products(engine.apply, engine.y, x, batch_dims, engine.y)
        else:
            custom_products(engine.apply, engine.x, x, batch_dims)
    return engine, sizes


def watched_graph(
    f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_dims: int, plain: bool = False
) -> tuple[GraphJacobian, _plan.Sizes]:
    """Plain autograd's engine (``GraphJacobian.of_function``), its evaluation of ``f``
    watched (``watched_engine``) on a leaf copy of ``x`` made before the watch starts
    (``leaf``), so that the watch follows the samples into ``f``."""
    z = leaf(x)
    own = z is not x
    changes = _state.Changes(z) if plain else None  # (a plain evaluation made again: its writes)
    return watched_engine(
        lambda: GraphJacobian.of_function(f, z, batch_dims, plain, own, changes),
        z,
        batch_dims,
        changes=changes,
    )


def _cannot_run(error: Exception) -> bool:
    """Whether ``error`` says that an engine cannot run ``f`` (PyTorch raises those as
    ``RuntimeError`` or ``NotImplementedError``), rather than a lack of memory, which the
    next engine would meet as well, or a mistake of the caller's (``TypeError``, ...)."""
    return isinstance(error, RuntimeError) and not out_of_memory(error)
