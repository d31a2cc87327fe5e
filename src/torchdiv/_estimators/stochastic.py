"""Stochastic estimates of Jacobian traces and diagonals: the engines as ``matmat`` operators.

An engine (``_exact.dispatch``) gives ``J V`` (forward: JVPs) or ``J^T U`` (reverse: VJPs)
for ``k`` vectors at once. Here each vector is a full batched tensor holding every sample's own
probe, and one batched JVP/VJP gives every sample's product at once (the NOTE [Batching over
basis vectors] in ``torchdiv._core.basis``, with probes in place of basis vectors).
``tr(J^T) = tr(J)`` and ``diag(J^T) = diag(J)``, so either engine serves every estimator.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from torchdiv._core.checks import untransformed
from torchdiv._core.walk import GraphTooDeep
from torchdiv._estimators import trace as _trace
from torchdiv._estimators.probes import draw
from torchdiv._estimators.registry import Matmat, num_vectors
from torchdiv._estimators.result import Estimate
from torchdiv._estimators.sketch import Operator
from torchdiv._exact import dispatch as _exact
from torchdiv._exact.autograd import GraphJacobian, unwatched, written_once
from torchdiv._taylor.cache import PlanCache, site
from torchdiv._taylor.mixing import Structure, passed, passed_before, shape_key, structure

T = TypeVar("T")


def jacobian_matmat(engine: _exact.Engine) -> Matmat:
    """``(k,) + x.shape`` vectors -> ``J V`` (forward engines) or ``J^T V`` (reverse), x-shaped.

    Events are flattened, so ``f(x)`` may have another event shape with as many elements.
    """

    def matmat(v: torch.Tensor) -> torch.Tensor:
        k = v.shape[0]
        if engine.blocks_are_rows:  # VJPs take cotangents shaped like f(x)
            v = v.reshape(k, *engine.y_shape)
        return engine.apply(v).reshape(k, *engine.x.shape)

    return matmat


def _operator(engine: _exact.Engine, s: _trace.Sampling, chunk: int | None) -> Operator:
    return _trace.flat_operator(s.fn, jacobian_matmat(engine), engine.x, engine.batch_dims, chunk)


def trace_of_function(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    batch_dims: int,
    s: _trace.Sampling,
    chunk_size: int | None,
) -> Estimate:
    """The estimate ``s`` of every sample's ``tr J``, on the engine ``"auto"`` picks.

    A one-product estimate (Hutchinson, ``num_probes=1``, the CNF training staple) takes one
    plain ``autograd.grad`` instead: no plan to watch ``f`` for, no ``torch.func`` wrapping
    (B=128, D=256 tanh MLP: 0.9 ms against 1.2 ms through the planned engine; one forward
    pass takes 0.30 ms, forward plus ``autograd.grad`` 0.72 ms). Not where Dynamo traces the
    call: AOTAutograd cannot differentiate a traced ``autograd.grad`` again (the training
    loss's backward raised), the traced engines' ``torch.func`` products it can; nor under
    the caller's ``torch.func`` transform (``untransformed``: the leaf copy of ``x`` raised).
    """
    deep = _GENERIC
    if s.num_probes == 1 and untransformed():
        one = _one_product(f, x, batch_dims)
        if isinstance(one, GraphJacobian):
            value = _one_probe(one, s)
            return Estimate(value, torch.full_like(value.detach(), math.nan), 1)
        deep = one  # (its walk of f's graph stopped: the generic engines)

    def consume(engine: _exact.Engine, chunk: int) -> Estimate:
        return _trace.run(s, _operator(engine, s, chunk), x, batch_dims)

    with deep.context:
        estimate, _ = _evaluate(f, x, batch_dims, s, chunk_size, consume, method=deep.method)
    return estimate


def terms_of_function(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    batch_dims: int,
    s: _trace.Sampling,
    chunk_size: int | None,
    owner: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample terms of one estimate ``s`` (not adaptive) of every sample's ``tr J``,
    shape ``(m,) + x.shape[:batch_dims]`` and dtype of ``x`` (``_trace.summary`` makes them the
    estimate and its standard error), and ``f(x)`` from the same evaluation. Sums of terms
    with the same probes (an integral along an ODE solve) keep that meaning
    (``torchdiv.flows``). ``owner``: what ``f`` evaluates (a flow's velocity ``f(t, z)``,
    whose closure ``f`` is made anew at every step); with one probe, its first evaluation at
    the structure of ``x`` is watched for sample mixing (``_one_product``), later ones are
    not. Where Dynamo traces the call or under a transform, as ``trace_of_function``: by the
    generic engines."""
    batch = x.shape[:batch_dims]
    deep = _GENERIC
    if s.num_probes == 1 and untransformed():  # watched once as ``owner``
        one = _one_product(f, x, batch_dims, owner)
        if isinstance(one, GraphJacobian):
            return _one_probe(one, s, terms=True), _exact.output(one)
        deep = one  # (its walk of f's graph stopped: the generic engines)

    def consume(engine: _exact.Engine, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _trace.terms(s, _operator(engine, s, chunk), x, batch_dims), _exact.output(engine)

    with deep.context:
        (flat, y), _ = _evaluate(
            f, x, batch_dims, s, chunk_size, consume, owner=owner, method=deep.method
        )
    return flat.reshape(len(flat), *batch).to(x.dtype), y


# the structures of f and x (``torchdiv._taylor.mixing.shape_key``, f by its ``cache.site``)
# at which a plain evaluation of f showed an op that ``SafeDerivatives`` changes:
# ``_one_product`` evaluates f there under the mode at once (two functions with the same code
# share it: at worst one runs under the mode without need, as before)
_GUARDED = PlanCache(256)


@dataclass
class _Deep:
    """How a one-product estimate whose walk of ``f``'s graph stopped (``walk.GraphTooDeep``)
    evaluates ``f`` again, by the generic engines (reverse mode walks nothing): ``method``,
    ``"auto"`` (watched for sample mixing where the first evaluation was: the watch did not
    finish) or ``"reverse"`` (unwatched, as the first: ``"auto"``'s plain rows would walk
    the graph again, a third evaluation), in ``context``: ``written_once`` where the first
    evaluation's changes stand (``f``'s buffers move once; a random draw inside ``f`` is
    made twice, as ``"auto"``'s past the bound), none where its watch put them back."""

    context: contextlib.AbstractContextManager[None] = field(default_factory=contextlib.nullcontext)
    method: str = "auto"


_GENERIC = _Deep()  # (the generic engines' own call: ``"auto"``, no context)


def _one_product(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    batch_dims: int,
    owner: object = None,
) -> GraphJacobian | _Deep:
    """The plain-autograd engine of a one-product estimate, ``f`` evaluated outside
    ``SafeDerivatives``, whose dispatch costs 13 us to enter and 2-4 us per op of ``f`` (a
    2-D CNF's MLP at batch 256: 30 us of a 0.4 ms estimate, one thread), unless an
    evaluation at this structure showed an op the mode changes. Such an evaluation is
    discarded and made again under the mode (``GraphJacobian.of_function``: the result is
    the mode's either way), and later calls at the structure start there, so ``f``'s state
    (a random generator) moves twice once per structure.

    Sample mixing: the first call of this very object ``f`` at the structure of ``x``
    (``torchdiv._taylor.mixing.passed_before``) is watched op by op (``_exact.watched_graph``:
    ``BatchInteractionError`` if ``f`` mixes samples); later ones are not (``unwatched``:
    the watch's ~10 us an op would be a large part of the estimate), their graph searched
    for a train-mode batch norm. A lambda made anew over the same objects is the same ``f``
    (``torchdiv._taylor.mixing.identity``); one over other objects is watched again.
    ``owner``: what ``f`` evaluates, watched and remembered in its place (a flow's velocity
    ``f(t, z)`` behind the closure made at every step: ``terms_of_function``); ``f`` itself if
    ``None``. Eager calls only (``trace_of_function``).

    Where the walk of ``f``'s graph stopped (``walk.GraphTooDeep``: an unrolled solve of
    thousands of steps; it raised at every call, rev-qmc28, where two probes took reverse
    mode): how the caller evaluates ``f`` again (``_Deep``)."""
    at = structure(f if owner is None else owner, x, batch_dims)
    where = site(at[0])  # a lambda made anew over other objects: its code, found again
    plain = _GUARDED.get(where, shape_key(at)) is None
    watch = passed_before(f, x, batch_dims, at) is None
    try:
        engine = _watched_once(f, x, batch_dims, at, plain, watch)
    except GraphTooDeep:  # (raised by the walk of the graph f's evaluation made)
        if not watch:
            return _Deep(written_once(x), "reverse")
        # (a plain watched evaluation's changes were put back by its watch's ``Changes``)
        return _GENERIC if plain else _Deep(written_once(x))
    if engine.guarded:
        _GUARDED.put(where, shape_key(at), True)
    return engine


def _watched_once(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    batch_dims: int,
    at: Structure,
    plain: bool,
    watch: bool,
) -> GraphJacobian:
    """``unwatched``'s engine if the object of ``at`` (``structure``) passed a watch for sample
    mixing there before (``passed_before``: not ``watch``), else ``_exact.watched_graph``'s
    (whose ``Changes`` puts back what a failed evaluation changed, if ``plain``), and it has
    passed now."""
    if not watch:
        return unwatched(f, x, batch_dims, plain)
    engine, sizes = _exact.watched_graph(f, x, batch_dims, plain)
    passed(f, x, batch_dims, at, verdict=sizes.verdict)
    return engine


def _one_probe(engine: GraphJacobian, s: _trace.Sampling, terms: bool = False) -> torch.Tensor:
    """Hutchinson with one product, ``v^T J^T v`` of every sample: shape batch, or with
    ``terms`` the one term ``(1,) + batch``; with as few tensor ops as it takes (two: a
    product and one sum over the probe and event dimensions). At one forward pass of 0.3 ms
    (B=128, D=256 MLP) every op of the general path's reshapes, casts and spreads costs 2-3%
    of the estimate, in training an autograd node more each (a D = 2 CNF evaluation: six
    nodes after the VJP here before, FFJORD's recipe two)."""
    x, batch_dims = engine.x, engine.batch_dims
    if s.probes is not None:
        v = s.probes if s.probes.dtype == x.dtype else s.probes.to(x.dtype)
    else:  # drawn as draw_probes draws: at least float32, then rounded to x's dtype
        dtype = torch.promote_types(x.dtype, torch.float32)
        v = draw(s.probe, 1, x, batch_dims, s.generator, dtype, s.fn).to(x.dtype)
    product = engine.apply(v.reshape(1, *engine.y_shape))  # J^T v: (1,) + x.shape
    v = v if v.shape == product.shape else v.reshape(product.shape)
    dims = tuple(range(1 + batch_dims, product.dim()))  # the event's
    if not terms:
        return (v * product).sum((0, *dims))
    return (v * product).sum(dims) if dims else v * product


def diagonal_of_function(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    batch_dims: int,
    s: _trace.Sampling,
    chunk_size: int | None,
) -> torch.Tensor:
    """The Hutchinson (Bekas et al.) estimate of every sample's Jacobian diagonal, x-shaped."""

    def consume(engine: _exact.Engine, chunk: int) -> torch.Tensor:
        return _trace.diagonal(s, _operator(engine, s, chunk), x, batch_dims)

    diag, _ = _evaluate(f, x, batch_dims, s, chunk_size, consume)
    return diag


def _evaluate(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    batch_dims: int,
    s: _trace.Sampling,
    chunk_size: int | None,
    consume: Callable[[_exact.Engine, int], T],
    owner: object = None,
    method: str = "auto",
) -> tuple[T, torch.Size]:
    """``_exact.evaluate`` by ``method`` (``"auto"``; ``"reverse"``: ``_Deep``) for the
    estimate ``s``: chunks of at most its random
    vectors (a block's, with ``rtol``/``atol``), not the engine's basis; plain autograd from
    the second call of a small problem that passed the watch (``square``), for Hutchinson only
    (a D = 16 CNF, 8 probes: 0.81 -> 0.53 ms, the hand recipe 0.37): its terms change by the
    engines' rounding (1e-16), while Hutch++'s and XTrace's QR of a sketch that Rademacher
    probes of a tiny event made rank-deficient turns that rounding into another basis and
    another estimate (0.015 against 0.140 for one sample of a 3-D MLP): they stay on the
    engine of their first call, so that the same probes give the same estimate."""
    return _exact.evaluate(
        f,
        x,
        batch_dims,
        method,
        chunk_size,
        consume,
        s.generator,
        square=s.method == "hutchinson",
        owner=owner,
        vectors=num_vectors(s.method, s.num_probes),
    )


def trace_of_engine(engine: _exact.Engine, s: _trace.Sampling, chunk: int | None) -> Estimate:
    """The estimate ``s`` of every sample's ``tr J`` from a given engine (graph form)."""
    return _trace.run(s, _operator(engine, s, chunk), engine.x, engine.batch_dims)
