"""Graph-form API: the same operators from an autograd graph the caller already built.

These functions assume that samples are independent (see NOTE [Batching over basis vectors]
in ``torchdiv._core.basis``): the graph is probed with one basis vector broadcast across the batch,
so a ``y`` whose samples mix gives a wrong answer. A built graph shows less than a function:
they raise ``BatchInteractionError`` for a train-mode batch norm in it and, when ``x`` has no
event dimensions, for any cross-sample gradient (one more VJP); other mixing (attention or a
reduction across the batch) goes unseen. Run ``torchdiv.check_batch_independence`` on the
function once if unsure.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from torchdiv._core.basis import chunks
from torchdiv._core.checks import (
    check_chunk_size,
    check_coordinates,
    check_exact_options,
    check_flag,
    check_input,
    check_method,
    check_not_dtensor,
    check_output,
    check_square,
    event_numel,
)
from torchdiv._core.mixing.watch import check_graph
from torchdiv._core.modes import (
    AT_KINKS,
    AT_ZERO_VECTORS,
    AT_ZEROS,
    POW_NODES,
    ROUNDED,
    UNDER_MODES,
    changed_nodes,
    fabric_guards_off,
    plain_derivatives,
)
from torchdiv._core.walk import towards
from torchdiv._estimators import stochastic as _stochastic
from torchdiv._estimators import trace as _trace
from torchdiv._estimators.registry import STOCHASTIC_METHODS
from torchdiv._exact import dispatch as _exact
from torchdiv._exact.autograd import GraphJacobian, depends_on

F = TypeVar("F", bound=Callable[..., torch.Tensor])

GRAPH_METHODS = ("auto", "reverse", *STOCHASTIC_METHODS)


# PyTorch's refusal of a module tracker's hook on a leaf x in autograd.grad (pytorch#131753)
_TRACKED_LEAF = "A leaf node was passed to _will_engine_execute_node"


def _trackers_named(form: F) -> F:
    """``form`` (a graph form), whose refusal of ``y``'s graph made under a module tracker
    (``FlopCounterMode``; ``ModTracker``'s ``CommDebugMode``, ``MemTracker``) names it: the
    tracker hooked the leaf ``x`` in the caller's forward, which PyTorch refuses in every
    ``autograd.grad`` to ``x`` (it came out as a graph that "cannot be walked twice")."""

    @functools.wraps(form)
    def named(y: Any, x: Any, **options: Any) -> torch.Tensor:
        try:
            return form(y, x, **options)
        except RuntimeError as exc:
            if _TRACKED_LEAF not in str(exc):
                raise
            raise RuntimeError(
                f"{form.__name__}: y was computed under a module tracker (FlopCounterMode, "
                "CommDebugMode, MemTracker) that hooked the leaf x, which PyTorch refuses in "
                "autograd.grad (pytorch#131753; torch.autograd.grad(y, x) raises the same): "
                "compute y from a non-leaf x (x = x0.view_as(x0), x0 requiring grad) or outside "
                f"the tracker, or use the function form torchdiv.{form.__name__[6:]}(f, x)"
            ) from exc

    return named  # type: ignore[return-value]


def _engine(
    fn: str,
    y: Any,
    x: Any,
    batch_dims: int,
    create_graph: bool,
    chunk_size: int | None,
    square: bool,
) -> tuple[GraphJacobian, int, list[Any]]:
    """The engine of ``y``'s graph, its chunk size and, where ``create_graph``, the nodes on
    a path from ``y`` to ``x`` (walked once, for the checks of a differentiated backward)."""
    check_input(fn, x, batch_dims)
    check_not_dtensor(fn, x, "the graph form")
    check_output(fn, y, x, batch_dims, name="y")
    check_chunk_size(fn, chunk_size)
    check_flag(fn, "create_graph", create_graph)
    if square:
        check_square(fn, y, x, batch_dims, "y")
    if not x.requires_grad:
        raise ValueError(
            f"{fn}: x does not require grad, so no graph leads from x to y; set "
            "x.requires_grad_(True) before computing y = f(x), or use the function form "
            f"torchdiv.{fn.removeprefix('graph_')}(f, x)"
        )
    if not y.requires_grad and y.is_inference():
        raise ValueError(
            f"{fn}: y has no autograd graph: it was computed under torch.inference_mode(), "
            "which records none even inside torch.enable_grad(); compute y outside inference "
            "mode, or use the function form "
            f"torchdiv.{fn.removeprefix('graph_')}(f, x), which runs under inference mode"
        )
    if not y.requires_grad:  # (under no_grad now or not: a y made in a no_grad block before)
        here = " (as they are here)" if not torch.is_grad_enabled() else ""
        raise ValueError(
            f"{fn}: y requires no grad, so it has no autograd graph: it was computed with "
            f"gradients disabled (torch.no_grad(){here}) or from a detached copy of x; compute "
            "y = f(x) from x itself inside torch.enable_grad() (this call may then run under "
            f"no_grad), or use the function form torchdiv.{fn.removeprefix('graph_')}(f, x), "
            "which runs under no_grad"
        )
    if not depends_on(y, x):
        raise ValueError(
            f"{fn}: y was not computed from x (its autograd graph does not reach x); pass the "
            "tensor you computed y from, not a copy or a reshaped view made afterwards "
            "(reshape x before calling f, and pass the reshaped tensor)"
        )
    check_graph(fn, y, x, batch_dims, empty_event=x.dim() == batch_dims)
    # (a differentiable result: the fused attention kernel's backward differentiated)
    nodes = towards(y, x) if create_graph else []
    _check_fused_attention(fn, nodes)
    engine = GraphJacobian(y, x, batch_dims, create_graph)
    return engine, chunk_size or max(engine.num_basis, 1), nodes


@fabric_guards_off
@_trackers_named
def graph_jacobian(
    y: torch.Tensor,
    x: torch.Tensor,
    *,
    batch_dims: int = 1,
    create_graph: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""Per-sample Jacobian ``d vec(y_b) / d vec(x_b)`` from an existing graph, by batched VJPs.

    Assumes sample ``b`` of ``y`` depends only on sample ``b`` of ``x``. The graph of ``y`` is
    retained, so ``y`` can still be backpropagated through afterwards.

    Args:
        y: tensor computed from ``x``, with ``y.shape[:batch_dims] == x.shape[:batch_dims]``.
        x: floating tensor with ``requires_grad=True``.
        batch_dims: number of leading batch dimensions.
        create_graph: keep the result differentiable (for a loss that contains it).
        chunk_size: at most this many VJPs in flight at once; ``None``: all of them.

    Returns:
        Shape ``x.shape[:batch_dims] + y.shape[batch_dims:] + x.shape[batch_dims:]``.

    Raises:
        ValueError: ``x`` does not require grad, ``y`` was not computed from ``x``, batch shapes
            differ, ``batch_dims`` out of range or ``chunk_size < 1``.
        TypeError: ``x`` or ``y`` not a floating tensor.
        BatchInteractionError: the graph holds a train-mode batch norm, or ``x`` has no event
            dimensions and ``y``'s samples depend on each other (module docstring).
        NotImplementedError: ``create_graph`` and ``y`` computed through a fused attention
            kernel (as ``graph_laplacian``).

    Examples:
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> y = x.sin()
        >>> torch.allclose(graph_jacobian(y, x)[0], torch.diag(x[0].cos()))
        True
    """
    engine, chunk, _ = _engine("graph_jacobian", y, x, batch_dims, create_graph, chunk_size, False)
    jac = _exact.dense(engine, chunk)
    return jac.reshape(x.shape[:batch_dims] + y.shape[batch_dims:] + x.shape[batch_dims:])


@fabric_guards_off
@_trackers_named
def graph_divergence(
    y: torch.Tensor,
    x: torch.Tensor,
    *,
    batch_dims: int = 1,
    method: str = "auto",
    create_graph: bool = False,
    chunk_size: int | None = None,
    num_probes: int | None = None,
    generator: torch.Generator | None = None,
    probe: str | None = None,
    probes: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Divergence ``tr(d vec(y_b) / d vec(x_b))`` of each sample, from an existing graph.

    Exact, with one VJP per event element (reverse mode is the only mode a built graph offers),
    or estimated with ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"`` from ``num_probes`` VJPs
    per sample, as in ``divergence``. Assumes sample ``b`` of ``y`` depends only on sample
    ``b`` of ``x``.

    Args:
        y: tensor computed from ``x``, same number of elements per sample as ``x``.
        x: floating tensor with ``requires_grad=True``.
        batch_dims: number of leading batch dimensions.
        method: ``"auto"`` or ``"reverse"`` (the same exact computation), or ``"hutchinson"``,
            ``"hutch++"``, ``"xtrace"`` (stochastic).
        create_graph: keep the result differentiable (e.g. a CNF or score-matching loss).
        chunk_size: at most this many VJPs in flight at once; ``None``: all of them.
        num_probes: as in ``divergence``, stochastic methods only.
        generator: as in ``divergence``, stochastic methods only.
        probe: as in ``divergence``, stochastic methods only.
        probes: as in ``divergence``, stochastic methods only.

    Returns:
        Shape ``x.shape[:batch_dims]``.

    Raises:
        ValueError, TypeError: as ``graph_jacobian``; also an unknown ``method`` and a
            non-square per-sample Jacobian.
        BatchInteractionError, NotImplementedError: as ``graph_jacobian``.

    Examples:
        >>> x = torch.randn(5, 3, requires_grad=True)
        >>> torch.allclose(graph_divergence(x**2, x), 2 * x.sum(-1))
        True
    """
    fn = "graph_divergence"
    check_method(fn, method, GRAPH_METHODS)
    if method in STOCHASTIC_METHODS:
        check_input(fn, x, batch_dims)
        s = _trace.sampling(fn, x, batch_dims, method, num_probes, probe, probes, generator)
        engine, _, _ = _engine(fn, y, x, batch_dims, create_graph, chunk_size, True)
        return _stochastic.trace_of_engine(engine, s, chunk_size).value
    check_exact_options(fn, method, num_probes, generator, probe, probes)
    engine, chunk, _ = _engine(fn, y, x, batch_dims, create_graph, chunk_size, True)
    return _exact.diagonal(engine, chunk).sum(-1).reshape(x.shape[:batch_dims])


@fabric_guards_off
@_trackers_named
def graph_laplacian(
    y: torch.Tensor,
    x: torch.Tensor,
    *,
    batch_dims: int = 1,
    create_graph: bool = False,
    chunk_size: int | None = None,
    coordinates: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Per-sample Laplacian ``Σ_j ∂²y_i / ∂x_j²`` of every output component, from an existing
    graph: for a ``pde(x, y)`` that receives the network's output (DeepXDE style).

    Nested reverse mode on the caller's graph: the per-sample Jacobian ``∂y/∂x`` with a graph
    of its own (one VJP per output component), then one VJP of it per output component and
    coordinate, keeping the diagonal entries. Assumes sample ``b`` of ``y`` depends only on
    sample ``b`` of ``x``. The function form ``laplacian(f, x)`` is faster from a few inputs
    on (it needs no second backward pass); this one spares a second forward pass. With
    ``create_graph`` and a ``det`` on the graph the passes run one product at a time: batched
    ones (``vmap``) take PyTorch's ``det`` backward for tensor subclasses, whose derivative is
    ``nan`` near a node (a float32 Slater determinant, electrons 1e-2 apart).

    Args:
        y: tensor computed from ``x``, ``y.shape[:batch_dims] == x.shape[:batch_dims]``.
        x: floating tensor with ``requires_grad=True``.
        batch_dims: number of leading batch dimensions.
        create_graph: keep the result differentiable (a PINN loss).
        chunk_size: at most this many VJPs in flight at once at each level; ``None``: all.
        coordinates: sum only over these elements of each sample's event (flat indices or a
            boolean mask, as in ``laplacian``); ``None``: all.

    Returns:
        Shape ``x.shape[:batch_dims] + y.shape[batch_dims:]``.

    Raises:
        ValueError, TypeError: as ``graph_jacobian``; also bad ``coordinates``.
        NotImplementedError: ``y`` was computed through a fused attention kernel (PyTorch's
            default ``scaled_dot_product_attention``), which has no second derivative.

    Examples:
        >>> x = torch.randn(5, 2, requires_grad=True)
        >>> y = x[:, 0] ** 2 * x[:, 1] ** 3                 # Δy = 2 x1³ + 6 x0² x1
        >>> expected = 2 * x[:, 1] ** 3 + 6 * x[:, 0] ** 2 * x[:, 1]
        >>> torch.allclose(graph_laplacian(y, x), expected)
        True
        >>> torch.allclose(graph_laplacian(y, x, coordinates=[1]), 6 * x[:, 0] ** 2 * x[:, 1])
        True
    """
    fn = "graph_laplacian"
    check_flag(fn, "create_graph", create_graph)
    engine, chunk, nodes = _engine(fn, y, x, batch_dims, True, chunk_size, False)
    if create_graph:
        _check_third_derivatives(fn, nodes)
    # det's third derivative through batched passes (vmap: PyTorch's formula for tensor
    # subclasses) was nan near a node: one pass per product there (UNDER_MODES, qmc27)
    batches = not any(type(node).__name__.startswith(UNDER_MODES) for node in nodes)
    engine = engine if batches else GraphJacobian(y, x, batch_dims, True, batches=False)
    n, batch = event_numel(x, batch_dims), x.shape[:batch_dims]
    with torch.inference_mode(False), torch.enable_grad():  # (whatever the caller's mode)
        index = torch.arange(n, device=x.device)
        if coordinates is not None:
            index = check_coordinates(fn, coordinates, x, batch_dims)
        gradients = _exact.dense(engine, chunk)[..., index]  # (N, m, k): ∂y_i/∂x_j, j chosen
        samples, m, k = gradients.shape
        second = GraphJacobian(
            gradients.reshape(*batch, m * k), x, batch_dims, create_graph, batches=batches
        )
    parts = []
    for start, stop in chunks(m * k, chunk_size or max(m * k, 1)):
        rows = second.block(start, stop)  # (r, N, n): row (i, j) of ∂(∂y_i/∂x_j)/∂x
        parts.append(rows[torch.arange(stop - start), :, index.repeat(m)[start:stop]])
    if not parts:  # no output components or no coordinates
        return x.new_zeros(y.shape)
    laplacians = torch.cat(parts).reshape(m, k, samples).sum(1).T  # (N, m)
    return laplacians.reshape(y.shape)


# (prelu's and a tensor exponent pow's derivatives differ only at an exact 0, sinc's at and
# near 0 (|pi x| < 1/2, cancelling), the norms' at a zero vector, celu's by a float32
# rounding: a graph with them keeps PyTorch's, not refused: documented); det's are wrong only
# where the Laplacian's passes run under a dispatch mode (``_WRONG_THIRD_UNDER_MODES``)
_WRONG_THIRD = tuple(
    n
    for n in changed_nodes(3, forward_mode=False)
    if n not in (*AT_KINKS, *AT_ZEROS, *AT_ZERO_VECTORS, *POW_NODES, *ROUNDED, *UNDER_MODES)
)
_WRONG_THIRD_UNDER_MODES = (*_WRONG_THIRD, *UNDER_MODES)


def _check_fused_attention(fn: str, nodes: list[Any]) -> None:
    """Refuse a graph holding a fused ``scaled_dot_product_attention`` kernel on a path from
    ``y`` to ``x`` (``ScaledDotProductFlashAttentionForCpuBackward0``, the efficient, flash
    and cuDNN ones): PyTorch has no derivative of their backward, which a Laplacian needs, so
    its error came out as a graph that "cannot be walked twice" (and a ``create_graph``
    divergence or Jacobian's gradient as "derivative ... not implemented"). The math backend builds
    attention from ``bmm`` and ``softmax``, which it differentiates twice."""
    fused = sorted({n for node in nodes if (n := type(node).__name__).startswith(_FUSED)})
    if fused:
        raise NotImplementedError(
            f"{fn}: y's graph holds PyTorch's fused attention ({', '.join(fused)}), which has "
            "no second derivative; compute y under torch.nn.attention.sdpa_kernel("
            f"SDPBackend.MATH), or use the function form torchdiv.{fn.removeprefix('graph_')}"
            "(f, x), which runs attention on the math backend"
        )


_FUSED = "ScaledDotProduct"  # the nodes of the fused kernels (the math backend has none)


def _check_third_derivatives(fn: str, nodes: list[Any]) -> None:
    """Refuse a graph holding an op whose PyTorch derivatives are wrong at the third order
    (the gradient of a Laplacian; ``_core.modes.REPLACEMENTS``): the function forms run those
    ops by right equivalents, which a graph the caller built cannot get. A batch norm's node
    counts where it normalises by the input's statistics (``instance_norm``); in eval mode
    it is affine, and its derivatives are right. Only nodes on a path from ``y`` to ``x``
    count: the rest (a branch of conditioning inputs, ``x``'s own history) is differentiated
    at most once by the Laplacian's gradient. ``det``'s counts under a dispatch mode (its
    third derivative was ``nan`` where the Laplacian's passes ran under one, det26)."""
    names = _WRONG_THIRD if plain_derivatives() else _WRONG_THIRD_UNDER_MODES
    wrong = sorted(
        {
            name
            for node in nodes
            if (name := type(node).__name__).startswith(names)
            and getattr(node, "_saved_training", True)
        }
    )
    if wrong:
        raise ValueError(
            f"{fn}: y's graph holds {', '.join(wrong)}, whose third derivative PyTorch gets "
            "wrong, and create_graph=True differentiates the Laplacian once more; a graph "
            "built outside torchdiv keeps PyTorch's formulas: use the function form "
            "torchdiv.laplacian(f, x), which runs that op by an equivalent whose derivatives "
            "are right"
        )
