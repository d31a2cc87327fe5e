"""Function-form API: ``jacobian``, ``jacobian_diagonal`` and ``divergence`` of ``f`` at ``x``."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from torchdiv._api.compiled import watch_compiled
from torchdiv._api.reporting import reported
from torchdiv._core.checks import (
    check_callable,
    check_chunk_size,
    check_exact_options,
    check_input,
    check_method,
    checked,
)
from torchdiv._core.crossover import COMPILED_F_WORK, TRACED_WORK, traceable
from torchdiv._core.modes import compiled_like_f, eager_when, entry, outside_inference_mode
from torchdiv._estimators import stochastic as _stochastic
from torchdiv._estimators import trace as _trace
from torchdiv._estimators.registry import STOCHASTIC_METHODS
from torchdiv._estimators.result import Estimate
from torchdiv._exact import dispatch as _exact
from torchdiv._structured.replay import replayed
from torchdiv._taylor.cache import site

DIVERGENCE_METHODS = (*_exact.EXACT_METHODS, "structured", *STOCHASTIC_METHODS)
DIAGONAL_METHODS = (*_exact.EXACT_METHODS, "structured", "hutchinson")

Function = Callable[[torch.Tensor], torch.Tensor]


def _prepare(
    fn: str,
    f: Function,
    x: torch.Tensor,
    batch_dims: int,
    method: str,
    chunk_size: int | None,
    square: bool,
    methods: tuple[str, ...] = _exact.EXACT_METHODS,
) -> Function:
    check_callable(fn, f)
    check_input(fn, x, batch_dims)
    check_method(fn, method, methods)
    check_chunk_size(fn, chunk_size)
    return checked(fn, f, x, batch_dims, square)


def _plans_within(
    limit: int,
    f: Function,
    x: object,
    /,
    *,
    method: str = "auto",
    batch_dims: int = 1,
    **_: object,
) -> bool:
    """Whether the structured engine records ``f`` at ``x`` when ``"auto"`` traces up to
    ``limit`` (``torchdiv._core.crossover``); arguments the call will refuse: no. ``_plans``:
    when Dynamo traces the call (``_structured.chosen`` there; such a call then runs eagerly as
    a whole: ``eager_when``); ``_plans_compiled_f``: when ``f`` is ``torch.compile``d (such a
    call then runs eagerly with ``f``'s original: ``compiled_like_f``)."""
    if not isinstance(x, torch.Tensor) or not isinstance(batch_dims, int):
        return False
    if method != "auto":
        return method == "structured"
    return 0 <= batch_dims <= x.dim() and not traceable(f, x, batch_dims, limit)


_plans = functools.partial(_plans_within, TRACED_WORK)
_plans_compiled_f = functools.partial(_plans_within, COMPILED_F_WORK)
# a compiled f's original watched before a compiled call, by the methods whose eager calls watch f
_watch = functools.partial(watch_compiled, ("auto", *STOCHASTIC_METHODS))
_watch_auto = functools.partial(watch_compiled, ("auto",))


@entry(compiled_like_f(watch=_watch_auto))
@reported("jacobian")
def jacobian(
    f: Function,
    x: torch.Tensor,
    *,
    batch_dims: int = 1,
    method: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""Per-sample Jacobian of a batched function.

    For every sample ``b``, ``J_b = d vec(f(x)_b) / d vec(x_b)``, never the cross-batch
    ``(N, m, N, n)`` tensor (see NOTE [Batching over basis vectors] in ``torchdiv._core.basis``).

    Args:
        f: ``f(x) -> y`` with ``y.shape[:batch_dims] == x.shape[:batch_dims]``, samples
            independent (``check_batch_independence`` tests that). Closures over per-sample
            tensors work: ``f`` always receives the whole batch.
        x: floating tensor; its first ``batch_dims`` dimensions index samples.
        batch_dims: number of leading batch dimensions (0: ``x`` is a single sample).
        method: ``"auto"``, ``"forward"`` (one JVP per input element) or ``"reverse"`` (one VJP
            per output element). ``"auto"`` follows the rule in ``divergence`` after its
            ``"structured"`` step (which serves traces and diagonals, not dense Jacobians).
        chunk_size: at most this many basis vectors in flight at once; ``None``: all of them
            (``"auto"``: a planned chunk, see ``divergence``).

    Returns:
        Shape ``x.shape[:batch_dims] + y.shape[batch_dims:] + x.shape[batch_dims:]``, dtype and
        device of ``x``; differentiable w.r.t. ``x`` and whatever ``f`` closes over.

    Raises:
        TypeError: ``f`` not callable, ``x`` or ``f(x)`` not a floating tensor.
        ValueError: ``batch_dims`` out of range, ``f`` changed the batch shape, unknown
            ``method``, ``chunk_size < 1``.
        BatchInteractionError: (a ``ValueError``) ``f`` mixes samples where torchdiv sees it
            (train-mode batch norm, a product or reduction over a batch dimension, e.g. an
            unbatched ``x`` with ``batch_dims=1``); ``torchdiv.allow_batch_interaction()``
            turns it off. Not checked by the explicit methods; tiny ``"auto"`` problems
            (square ones up to 2**18 elements) watch the first call of each ``f`` object at
            a structure ("How it works"); ``check_batch_independence`` tests any ``f``.
        Exception: whatever ``f`` raises, same type, its message followed by the call's
            shapes, dtypes, method and engine and a hint (``raise ... from`` the original).

    Examples:
        >>> A = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        >>> x = torch.randn(4, 2)
        >>> jacobian(lambda x: x @ A.T, x).shape
        torch.Size([4, 3, 2])
        >>> torch.equal(jacobian(lambda x: x @ A.T, x)[0], A)
        True
    """
    g = _prepare("jacobian", f, x, batch_dims, method, chunk_size, square=False)
    jac, y_shape = _exact.jacobian(g, x, batch_dims, method, chunk_size, where=site(f))
    shape = x.shape[:batch_dims] + y_shape[batch_dims:] + x.shape[batch_dims:]
    return _shaped(jac, shape, x.dtype)


@entry(
    eager_when(_plans, functools.partial(replayed, False)),
    compiled_like_f(_plans_compiled_f, watch=_watch),
)
@reported("jacobian_diagonal")
def jacobian_diagonal(
    f: Function,
    x: torch.Tensor,
    *,
    batch_dims: int = 1,
    method: str = "auto",
    chunk_size: int | None = None,
    num_probes: int | None = None,
    probe: str | None = None,
    probes: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Diagonal of each sample's square Jacobian, reshaped like ``x``.

    ``out[b][i] = d f(x)_b[i] / d x_b[i]`` over the flattened event index ``i``. Computed from
    the same JVP (or VJP) blocks as the dense Jacobian, but only the diagonal of each block is
    kept, so memory stays at one chunk.

    ``"structured"`` (``"auto"``'s first choice, see ``divergence``, but where plain
    autograd's one batched backward pass is faster: small work ``n x B x W``, or at most two
    elements per sample, ``torchdiv._structured.rows_diagonal``) propagates the columns
    forward from unit vectors stored once for the batch, summed by colour when the graph is
    local (a conv net: each output reads a small window of the input; with group norms, local
    once their statistics are held, whose part is then added exactly).

    ``method="hutchinson"`` estimates it instead, without bias, from ``num_probes`` products
    per sample (Bekas, Kokiopoulou and Saad 2007): ``diag J ~ (1/m) sum_j v_j * (J v_j)``
    with ``E[v v^T] = I``; with Rademacher probes the error of entry ``i`` is
    ``sum_{l != i} J_il v_i v_l / m``, small when ``J`` is diagonally dominant. Where reverse
    mode is the cheaper product (``"auto"``'s choice, as for ``divergence``) it computes
    ``v_j * (J^T v_j)``: the same expectation, with error ``sum_{l != i} J_li v_i v_l / m``
    (columns instead of rows), so the same probes give another estimate on another engine.

    Args:
        f: as in ``jacobian``; ``f(x)`` must have as many elements per sample as ``x``.
        x: as in ``jacobian``.
        batch_dims: as in ``jacobian``.
        method: as in ``jacobian``, or ``"structured"``, or ``"hutchinson"`` (an estimate).
        chunk_size: as in ``jacobian``.
        num_probes: as in ``divergence``, for ``"hutchinson"`` only.
        probe: as in ``divergence``, for ``"hutchinson"`` only.
        probes: as in ``divergence``, for ``"hutchinson"`` only.
        generator: as in ``divergence``, for ``"hutchinson"`` only.

    Returns:
        Shape ``x.shape``, dtype and device of ``x``.

    Raises:
        ValueError: as ``jacobian``, and when the per-sample Jacobian is not square; probe
            options with an exact method (see ``divergence``).
        BatchInteractionError: ``f`` mixes samples, see ``jacobian``.
        NotImplementedError: ``method="structured"`` met an op it has no rule for.

    Examples:
        >>> x = torch.randn(3, 5)
        >>> torch.allclose(jacobian_diagonal(lambda x: x**2, x), 2 * x)
        True
        >>> est = jacobian_diagonal(lambda x: x**2, x, method="hutchinson", num_probes=1)
        >>> torch.allclose(est, 2 * x)  # a diagonal Jacobian: exact with Rademacher probes
        True
    """
    fn = "jacobian_diagonal"
    g = _prepare(fn, f, x, batch_dims, method, chunk_size, True, DIAGONAL_METHODS)
    if method == "hutchinson":
        s = _trace.sampling(
            fn, x, batch_dims, method, num_probes, probe, probes, generator, methods=("hutchinson",)
        )
        return _stochastic.diagonal_of_function(g, x, batch_dims, s, chunk_size)
    check_exact_options(fn, method, num_probes, generator, probe, probes)
    diag, _ = _exact.diagonal_and_output(
        fn, g, x, batch_dims, method, chunk_size, trace=False, where=site(f), keep_y=False
    )
    return _shaped(diag, x.shape, x.dtype)


@entry(
    eager_when(_plans, functools.partial(replayed, True)),
    compiled_like_f(_plans_compiled_f, watch=_watch),
)
@reported("divergence")
def divergence(
    f: Function,
    x: torch.Tensor,
    *,
    batch_dims: int = 1,
    method: str = "auto",
    chunk_size: int | None = None,
    num_probes: int | None = None,
    generator: torch.Generator | None = None,
    probe: str | None = None,
    probes: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Divergence of a batched vector field: the trace of each sample's Jacobian.

    ``div f(x)_b = sum_i d f(x)_b[i] / d x_b[i] = tr J_b`` over the flattened event. The exact
    methods take one JVP (forward) or VJP (reverse) per event element, ``chunk_size`` of them
    at a time. Unlike ``grad(y, x, ones_like(y))`` (column sums of ``J``, not its trace) it is
    right for every ``f``; unlike ``torch.autograd.functional.jacobian`` it never builds
    cross-batch blocks.

    ``method="structured"`` captures the ATen ops ``f`` runs at ``x`` and plans from them
    (``torchdiv._structured``): for a chain of shared linear maps and elementwise functions
    joined by sums (MLPs, ``x + g(x)``, time given by concatenation or gates) trace
    cyclicity costs a few forward passes whatever the event size; otherwise Jacobian
    columns are propagated forward from unit vectors stored once for the batch, reading only
    the diagonal, with the unit vectors summed by colour when the graph is local
    (convolutions, pooling, resampling and elementwise ops; group norms with their statistics
    held, whose part is added exactly: ``torchdiv._structured.statistics``). It raises
    ``NotImplementedError`` naming any op it has no rule for.

    Rule for ``method="auto"`` (eager; inside a region ``torch.compile`` traces, problems where
    ``f``'s work is small, event size x samples x ``f``'s multiply-adds per sample estimated
    from its parameters at most ``10 x 2**20`` (``torchdiv._core.crossover``), take reverse
    mode traced into the graph, larger ones the rule below run eagerly: the training guide's
    torch.compile section; with a ``torch.compile``d ``f`` called from eager code, the limit is
    ``4 x 2**20``, ``COMPILED_F_WORK``: no graph break is at stake there):
    ``"structured"`` whenever it can run ``f``, unless the
    problem is tiny (event size x elements of ``x`` at most ``2**12``: recording ``f`` would
    cost more than the whole computation; where it found an op without a rule, later calls of
    the same ``f`` at the same structure do not record it again: the guide's "Plans kept
    across calls"); otherwise
    (measured on CPU, see ``torchdiv._exact.plan``) one evaluation of ``f`` is watched and reverse
    mode is used unless the output has more elements than the input or ``f`` convolves,
    which use forward mode. With ``chunk_size=None`` the chunk is chosen so that chunk x
    (widest per-batch intermediate) is about 2M elements. Tiny problems (basis vectors x
    elements of ``x`` at most ``2**15``) are not planned, watched only at the first call of
    each ``f`` object at a shape (for sample mixing), and go in one chunk: plain
    ``autograd.grad`` rows for divergences and diagonals (and Jacobians whose output was
    square at the last call; ``torch.func``'s wrapping costs more than the computation
    there), else reverse mode (forward if the output is larger); such square problems up
    to ``2**18`` go by the same rows once a planned call of that ``f`` object at that shape
    was watched and did not convolve. If ``torch.func`` cannot
    run ``f`` (an op without a forward-mode rule: a custom ``autograd.Function`` without
    ``jvp``, CPU fused attention; a legacy ``autograd.Function``; in-place writes or control
    flow on batched tangents) it silently uses plain autograd (``autograd.grad`` over batched
    VJPs), with the same chunking.

    ``"hutchinson"``, ``"hutch++"`` and ``"xtrace"`` are unbiased estimates from
    ``num_probes`` Jacobian-vector products per sample (required; a multiple of 3 for
    Hutch++, of 2 for XTrace), with independent probes for every sample, on the engine and
    chunks ``"auto"`` picks. See ``estimate_trace`` for the methods and which to use when, and
    ``estimate_divergence`` for standard errors and a stop-at-accuracy mode.

    Args:
        f: ``f(x) -> y`` with as many elements per sample as ``x``.
        x: floating tensor; its first ``batch_dims`` dimensions index samples.
        batch_dims: number of leading batch dimensions (0: ``x`` is a single sample).
        method: ``"auto"``, ``"structured"``, ``"forward"``, ``"reverse"`` (exact) or
            ``"hutchinson"``, ``"hutch++"``, ``"xtrace"`` (stochastic).
        chunk_size: at most this many basis, colour or probe vectors in flight at once
            (bounds memory; ``"structured"`` chains: columns carried around the cycle).
        num_probes: Jacobian-vector products per sample, stochastic methods only.
        generator: ``torch.Generator`` for the probes (same state -> same estimate).
        probe: ``"rademacher"`` (default), ``"gaussian"`` or ``"sphere"``.
        probes: probes drawn once by ``draw_probes`` (instead of ``probe``/``generator``):
            every call with them gives the same estimate, e.g. along one ODE solve.

    Returns:
        Shape ``x.shape[:batch_dims]``, dtype and device of ``x``; differentiable w.r.t. ``x``
        and whatever ``f`` closes over (usable inside a training loss).

    Raises:
        TypeError, ValueError: see ``jacobian``; also for a non-square Jacobian, probe options
            given with an exact method, and bad probe options (see ``estimate_trace``).
        BatchInteractionError: ``f`` mixes samples, see ``jacobian``.
        NotImplementedError: ``method="structured"`` met an op it has no rule for.

    Examples:
        >>> A = torch.tensor([[2.0, 1.0], [7.0, -5.0]])
        >>> divergence(lambda x: x @ A.T, torch.randn(3, 2))  # tr(A) for every sample
        tensor([-3., -3., -3.])
        >>> g = torch.Generator().manual_seed(0)
        >>> est = divergence(lambda x: x @ A.T, torch.randn(3, 2), method="hutch++", num_probes=6,
        ...                  generator=g)  # exact: the orthonormal basis of a 2-D event is complete
        >>> torch.allclose(est, torch.tensor([-3.0, -3.0, -3.0]))
        True
    """
    fn = "divergence"
    g = _prepare(fn, f, x, batch_dims, method, chunk_size, True, DIVERGENCE_METHODS)
    if method in STOCHASTIC_METHODS:
        s = _trace.sampling(fn, x, batch_dims, method, num_probes, probe, probes, generator)
        return _stochastic.trace_of_function(g, x, batch_dims, s, chunk_size).value
    check_exact_options(fn, method, num_probes, generator, probe, probes)
    div, _ = _exact.diagonal_and_output(
        fn, g, x, batch_dims, method, chunk_size, trace=True, where=site(f), keep_y=False
    )
    return _shaped(div, x.shape[:batch_dims], x.dtype)


@eager_when()
@compiled_like_f(watch=_watch)
@outside_inference_mode
@reported("estimate_divergence")
def estimate_divergence(
    f: Function,
    x: torch.Tensor,
    *,
    batch_dims: int = 1,
    method: str = "hutchinson",
    num_probes: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_probes: int = _trace.MAX_PROBES,
    probe: str | None = None,
    probes: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> Estimate:
    r"""Stochastic divergence with a standard error per sample, optionally to a set accuracy.

    With ``num_probes`` alone: one estimate from ``num_probes`` Jacobian-vector products per
    sample, as ``divergence(..., method=method)``, plus its standard error. With ``rtol``
    and/or ``atol``: independent blocks of ``num_probes`` products (default 16 for Hutchinson
    and XTrace, 24 for Hutch++) are averaged until **every** sample's standard error is at
    most ``max(atol, rtol * |estimate|)``; if another block would exceed ``max_probes``, it
    stops there and warns. A sample whose estimate is not finite (a nan or inf in its ``x``
    or ``f(x)``) is not waited for. All samples are estimated together (one batched pass per block),
    so samples that reach the target first keep improving until the last one does. Blocks are
    independent, so Hutch++ and XTrace do not grow their sketch across blocks.

    How each method's standard error is computed (details in ``estimate_trace``): Hutchinson,
    the sample standard deviation of its terms over ``sqrt(m)``; Hutch++, the same for its
    residual Hutchinson part (unbiased for the total variance, as the sketched part's
    conditional mean is the trace); XTrace, the spread of its left-out estimates (the paper's
    heuristic). With an unbiased estimate and a calibrated standard error, about 95% of
    samples land within 2 standard errors, so within ``2 * rtol * |div|`` in the tolerance
    mode (a large event costs the exact ``method="auto"`` only ``n`` products: compare).

    Args:
        f: as in ``divergence``.
        x: as in ``divergence``.
        batch_dims: as in ``divergence``.
        chunk_size: as in ``divergence``.
        probe: as in ``divergence``.
        probes: as in ``divergence``.
        generator: as in ``divergence``.
        method: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
        num_probes: products per sample (per block with ``rtol``/``atol``).
        rtol: target standard error, relative to ``|estimate|``.
        atol: target standard error, absolute.
        max_probes: the most products per sample the tolerance mode may spend.

    Returns:
        ``Estimate`` with ``value`` and ``stderr`` of shape ``x.shape[:batch_dims]`` (dtype and
        device of ``x``; ``value`` differentiable like ``divergence``) and ``num_probes``,
        the products per sample spent.

    Raises:
        TypeError, ValueError: as ``divergence``; also neither ``num_probes`` nor
            ``rtol``/``atol`` given, ``max_probes`` below one block, ``probes`` with
            ``rtol``/``atol``.

    Examples:
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 8))
        >>> x = torch.randn(64, 8)
        >>> est = estimate_divergence(net, x, rtol=0.05, max_probes=4000)
        >>> exact = divergence(net, x)
        >>> bool(((est.value - exact).abs() <= 2 * 0.05 * exact.abs()).float().mean() >= 0.9)
        True
    """
    fn = "estimate_divergence"
    g = _prepare(fn, f, x, batch_dims, method, chunk_size, True, STOCHASTIC_METHODS)
    s = _trace.sampling(
        fn, x, batch_dims, method, num_probes, probe, probes, generator, rtol, atol, max_probes
    )
    return _stochastic.trace_of_function(g, x, batch_dims, s, chunk_size)


def _shaped(t: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """``t.reshape(shape).to(dtype)``, ``t`` itself where it has that shape and dtype (a
    reshape is an autograd node of its own in training, a few microseconds of a small
    problem's call; ``to`` of the same dtype returns ``t`` after parsing its arguments)."""
    t = t if t.shape == shape else t.reshape(shape)
    return t if t.dtype == dtype else t.to(dtype)
