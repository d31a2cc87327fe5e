"""``laplacian``: the trace of each sample's Hessian, for every output component.

Methods (one signature each, in ``_METHODS``):

- ``"taylor"``: forward Laplacian (collapsed Taylor mode, see ``torchdiv._taylor``): one
  forward sweep carries ``(value, K directional derivatives, summed second derivatives)``;
  costs about ``n`` forward passes for ``n`` inputs, no autograd needed.
- ``"forward-over-reverse"``: Hessian columns as JVPs of the per-sample gradients, ``k`` basis
  vectors at a time (NOTE [Batching over basis vectors] in ``_basis``), keeping only the
  diagonal entries.
- ``"hessian"``: the same products, ``chunk_size`` basis vectors at a time, assembled into
  every sample's full Hessian, then its trace: what ``torch.func.hessian`` users write.
- ``"hutchinson"``: the unbiased estimate ``(1/r) sum_j v_j^T H v_j`` with ``r = num_probes``
  random directions per sample (``_estimators.probes``), by the Taylor engine with the probes
  as directions (about ``r`` forward passes), or by Hessian-vector products if an op has no
  rule.
- ``"grad-of-grad"``: a loop of backward passes, the gradient then one more pass per input
  (``torchdiv._laplacian.loop``): what PINN codes write; no vmap, no recording.
- ``"auto"``: ``"taylor"``, in as few equal chunks of directions as keep the widest ``jac``
  tensor (directions x elements) within ``CHUNK_ELEMENTS``; ``"forward-over-reverse"`` with the
  same chunks if an op has no Taylor rule. At most ``LOOP_INPUTS`` inputs and
  ``LOOP_ELEMENTS`` elements of ``x`` (``LOOP_FALLBACK`` inputs if an op has no Taylor rule),
  ``"grad-of-grad"``: the Taylor engine's fixed costs and ``vmap``'s do not pay back there
  (``bench/laplacian_small.py``).

Attention runs on PyTorch's math backend in every method (``_modes.math_attention``): the
fused CPU kernel has no forward-mode derivative. The nested-autodiff methods run ``f`` under
``_modes.SafeDerivatives(3)``: the gradient of a Laplacian is a third derivative, and
PyTorch's through forward over reverse is wrong for fused layer norm, ``slogdet``/``logdet``/
``det``, ``solve`` and ``cholesky_inverse`` (replaced there by equivalents whose derivatives
are right) and ``nan`` for ``eigvalsh``/``eigh`` (refused, naming ``method='taylor'``, whose
rules cover all of them but eigenvectors, and ``'grad-of-grad'``: reverse over reverse is
right for all of them). Every method computes ``cdist`` from differences (``SafeDerivatives(1)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

import torch
from torch.func import vjp, vmap

from torchdiv._api.reporting import reported
from torchdiv._core.basis import basis, broadcast_basis, chunks
from torchdiv._core.checks import (
    check_callable,
    check_chunk_size,
    check_coordinates,
    check_exact_options,
    check_input,
    check_method,
    checked,
    event_numel,
)
from torchdiv._core.mixing import check_empty_event
from torchdiv._core.modes import SafeDerivatives, math_attention, outside_inference_mode
from torchdiv._estimators import trace as _trace
from torchdiv._exact.forward import ForwardJacobian
from torchdiv._laplacian.along import along, unit_columns
from torchdiv._laplacian.loop import grad_of_grad
from torchdiv._taylor import RULES, Context, Graph, Jet, UnsupportedOp, capture, propagate

Function = Callable[[torch.Tensor], torch.Tensor]
METHODS = ("auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad", "hutchinson")
# "auto" chunks only when the widest jac (directions x its elements) would pass this many
# elements (64 MiB in float32): each chunk replays the forward values, so fewer is faster
CHUNK_ELEMENTS = 2**24
# "auto" loops over backward passes at up to LOOP_INPUTS inputs while x has at most
# LOOP_ELEMENTS elements (fixed costs dominate; at larger batches the Taylor engine was 5-15%
# faster in training), and at up to LOOP_FALLBACK inputs where the Taylor engine cannot run f
# (measured on tanh FNNs and Chebyshev KANs, bench/laplacian_small.py)
LOOP_INPUTS = 2
LOOP_ELEMENTS = 1024
LOOP_FALLBACK = 10


@outside_inference_mode
@reported("laplacian")
def laplacian(
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
    coordinates: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Per-sample Laplacian of every output component of a batched function.

    For every sample ``b`` and output component ``i``,
    ``(Δf)_{b,i} = sum_j d^2 f(x)_{b,i} / d x_{b,j}^2`` over the flattened input event, or
    over the ``coordinates`` chosen (``Δ_x u`` of a heat equation's ``u(x, t)``): the same
    methods then run along those unit vectors only (``torchdiv._laplacian.along``).

    Args:
        f: ``f(x) -> y`` with ``y.shape[:batch_dims] == x.shape[:batch_dims]``, samples
            independent. Any output event shape; a scalar per sample is the usual case.
        x: floating tensor; its first ``batch_dims`` dimensions index samples.
        batch_dims: number of leading batch dimensions (0: ``x`` is a single sample).
        method: ``"auto"``, ``"taylor"``, ``"forward-over-reverse"``, ``"hessian"``,
            ``"grad-of-grad"`` or ``"hutchinson"`` (module docstring). ``"taylor"`` raises
            ``NotImplementedError`` naming any op it has no rule for; ``"auto"`` then uses
            ``"grad-of-grad"`` or ``"forward-over-reverse"``.
        chunk_size: at most this many directions (unit vectors or probes) in flight at once;
            bounds memory in every method. ``None``: all (``"auto"``: a planned chunk).
        num_probes: ``"hutchinson"`` only: random directions per sample (required unless
            ``probes`` is given).
        generator: ``"hutchinson"`` only: ``torch.Generator`` for the probes.
        probe: ``"hutchinson"`` only: ``"rademacher"`` (default), ``"gaussian"`` or ``"sphere"``.
        probes: ``"hutchinson"`` only: directions drawn beforehand, shape ``(r,) + x.shape``
            (``torchdiv.draw_probes``), so that several calls see the same noise.
        coordinates: sum only over these elements of each sample's event: flat event indices
            (ints, negative from the end, no repeats) or a boolean mask of the event's shape.
            ``None``: all. Hutchinson's probes are then restricted to them.

    Returns:
        Shape ``x.shape[:batch_dims] + y.shape[batch_dims:]``, dtype and device of ``x``;
        differentiable w.r.t. ``x`` and whatever ``f`` closes over.

    Raises:
        TypeError: ``f`` not callable, ``x`` or ``f(x)`` not a floating tensor, ``generator``
            not a ``torch.Generator``, ``probes`` not a floating tensor.
        ValueError: bad ``batch_dims``, ``method``, ``chunk_size`` or ``coordinates`` (out of
            range, repeated, a mask of the wrong shape), or ``f`` changed the
            batch shape; ``"hutchinson"`` without ``num_probes`` or ``probes``, a bad
            ``num_probes``, ``probe`` or ``probes`` shape; any of ``num_probes``,
            ``generator``, ``probe``, ``probes`` given to an exact method.
        NotImplementedError: ``method="taylor"`` met an op without a rule.
        BatchInteractionError: ``f`` mixes samples (seen by the Taylor recorder of ``"auto"``,
            ``"taylor"`` and ``"hutchinson"``; see ``torchdiv.jacobian``).

    Example:
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> u = lambda x: torch.sin(x[:, 0]) * x[:, 1] ** 2   # Δu = -sin(x0) x1^2 + 2 sin(x0)
        >>> expected = torch.sin(x[:, 0]) * (2 - x[:, 1] ** 2)
        >>> torch.allclose(laplacian(u, x), expected)
        True
        >>> torch.allclose(laplacian(u, x, coordinates=[1]), 2 * torch.sin(x[:, 0]))
        True
    """
    fn = "laplacian"
    check_callable(fn, f)
    check_input(fn, x, batch_dims)
    check_method(fn, method, METHODS)
    check_chunk_size(fn, chunk_size)
    g = checked(fn, f, x, batch_dims, square=False)
    index = None if coordinates is None else check_coordinates(fn, coordinates, x, batch_dims)
    v: torch.Tensor | None = None
    if method == "hutchinson":  # drawn over the whole event, as draw_probes(x) gives them
        s = _trace.sampling(
            fn, x, batch_dims, method, num_probes, probe, probes, generator, methods=(method,)
        )
        v = _trace.vectors(s, x, batch_dims)
        v = v if index is None else v[..., index]
    else:
        check_exact_options(fn, method, num_probes, generator, probe, probes)
    if index is not None:  # the Laplacian in z of f(x + S z), S's columns the chosen e_j
        g, x = along(g, x, batch_dims, unit_columns(index, x, batch_dims))
    if x.numel() == 0:  # no samples, or an empty event: every Laplacian is an empty sum
        return _zeros_like_output(g, x)
    if v is not None:
        return _hutchinson(g, x, batch_dims, chunk_size, v.reshape(-1, *x.shape).to(x.dtype))
    if method in ("forward-over-reverse", "hessian", "grad-of-grad"):  # not recorded: _mixing
        check_empty_event(g, x, batch_dims)
    return _METHODS[method](g, x, batch_dims, chunk_size)


def _auto(f: Function, x: torch.Tensor, batch_dims: int, chunk_size: int | None) -> torch.Tensor:
    n = event_numel(x, batch_dims)
    if loops(x, batch_dims):
        check_empty_event(f, x, batch_dims)  # not recorded: see _mixing
        return _loop(f, x, batch_dims, chunk_size)
    graph = capture(f, x, RULES, batch_dims=batch_dims)
    chunk = chunk_size or graph.chunk(n, CHUNK_ELEMENTS)
    out = _collapsed_or_none(graph, x, _unit_directions(x, batch_dims, chunk))
    if out is not None:
        return out
    if n <= LOOP_FALLBACK:
        return _loop(f, x, batch_dims, chunk)
    return _forward_over_reverse(f, x, batch_dims, chunk)


def loops(x: torch.Tensor, batch_dims: int) -> bool:
    """Whether ``"auto"`` runs the loop of backward passes rather than the Taylor engine."""
    return event_numel(x, batch_dims) <= LOOP_INPUTS and x.numel() <= LOOP_ELEMENTS


def _loop(f: Function, x: torch.Tensor, batch_dims: int, chunk_size: int | None) -> torch.Tensor:
    """``"grad-of-grad"``, or ``"forward-over-reverse"`` where it is not finite: some of
    PyTorch's double-backward formulas give NaN where the derivative exists (``0.0 ** x``:
    a ``where`` whose unused branch is ``0 * log(0)``); the JVP formulas do not."""
    out = grad_of_grad(f, x, batch_dims)
    if bool(out.isfinite().all()):
        return out
    return _forward_over_reverse(f, x, batch_dims, chunk_size)


def _taylor(f: Function, x: torch.Tensor, batch_dims: int, chunk_size: int | None) -> torch.Tensor:
    graph = capture(f, x, RULES, batch_dims=batch_dims)
    if graph.unsupported:
        _refuse(
            ", ".join(sorted(set(graph.unsupported))) + " applied to a tensor that depends on x"
        )
    chunk = chunk_size or event_numel(x, batch_dims)
    try:
        return _collapsed(graph, x, _unit_directions(x, batch_dims, chunk))
    except UnsupportedOp as exc:
        _refuse(str(exc))


def _refuse(what: str) -> NoReturn:
    raise UnsupportedOp(
        f"laplacian: method='taylor' has no propagation rule for {what}; use method='auto' "
        "(falls back to 'forward-over-reverse')"
    )


def _unit_directions(x: torch.Tensor, batch_dims: int, chunk: int) -> Iterator[torch.Tensor]:
    """The unit vectors of the event, ``chunk`` at a time, stored once for all samples."""
    for start, stop in chunks(event_numel(x, batch_dims), chunk):
        yield broadcast_basis(start, stop, x, batch_dims)


def _collapsed(graph: Graph, x: torch.Tensor, directions: Iterator[torch.Tensor]) -> torch.Tensor:
    """``sum_k D^2 f(x)[u_k, u_k]`` over all directions: the output's collapsed second-order
    terms, summed over the chunks ``directions`` yields (each ``(k,) + x.shape``, broadcast)."""
    total: torch.Tensor | None = None
    constants: dict[int, list[Any]] = {}
    for u in directions:
        out = propagate(graph, Jet(x, u, None), Context(len(u), True, jac=False), constants)
        if isinstance(out, Jet) and out.lap is not None:
            total = out.lap if total is None else total + out.lap
    if total is None:  # f(x) does not depend on x, or only linearly
        return x.new_zeros(graph.output_shape)
    return total.expand(graph.output_shape).clone()


def _collapsed_or_none(
    graph: Graph, x: torch.Tensor, directions: Iterator[torch.Tensor]
) -> torch.Tensor | None:
    """``_collapsed``, or ``None`` when the Taylor engine cannot run ``f``: an op without a
    rule (at capture or in a rule) or one that cannot be replayed. Callers then fall back,
    evaluating ``f`` again, so what recording it changed (buffers, RNG) is put back first."""
    try:
        if not graph.unsupported:
            return _collapsed(graph, x, directions)
    except torch.cuda.OutOfMemoryError:  # a memory problem, not an unsupported op
        raise
    except RuntimeError:  # UnsupportedOp included
        pass
    graph.undo()
    return None


class _Gradients:
    """``z -> (m,) + z.shape``: row ``i`` holds every sample's gradient of output ``i``;
    remembers ``f(z).shape``."""

    def __init__(self, f: Function, batch_dims: int):
        self.f, self.batch_dims = f, batch_dims
        self.y_shape = torch.Size()

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        y_and_pullback = vjp(self.f, z)  # typed as a 2- or 3-tuple (has_aux)
        y = y_and_pullback[0]
        pullback: Callable[[torch.Tensor], tuple[torch.Tensor]] = y_and_pullback[1]
        self.y_shape = y.shape
        (rows,) = vmap(pullback)(basis(0, event_numel(y, self.batch_dims), y, self.batch_dims))
        return rows


def _hessian_products(
    f: Function, x: torch.Tensor, batch_dims: int, directions: torch.Tensor
) -> tuple[torch.Tensor, torch.Size]:
    """``H_{b,i} v_j`` for every sample ``b``, output ``i`` and direction ``v_j`` (``(k,) +
    x.shape``), shape ``(k, m, N, n)``, and ``f(x).shape``: JVPs of the per-sample gradients."""
    grads = _Gradients(f, batch_dims)
    with math_attention(), SafeDerivatives(3, "method='taylor' or 'grad-of-grad'"):
        columns = ForwardJacobian(grads, x, batch_dims).apply(directions)
    k, m = columns.shape[:2]
    n_samples, n = x.shape[:batch_dims].numel(), event_numel(x, batch_dims)
    return columns.reshape(k, m, n_samples, n), grads.y_shape


def _forward_over_reverse(
    f: Function, x: torch.Tensor, batch_dims: int, chunk_size: int | None
) -> torch.Tensor:
    n = event_numel(x, batch_dims)

    def parts() -> Iterator[tuple[torch.Tensor, torch.Size]]:
        for start, stop in chunks(n, chunk_size or n):
            directions = basis(start, stop, x, batch_dims)
            columns, y_shape = _hessian_products(f, x, batch_dims, directions)
            j = torch.arange(stop - start, device=x.device)
            yield columns[j, :, :, start + j].sum(0), y_shape  # (m, N): entries (start+j, start+j)

    total, y_shape = _summed(parts())
    return total.T.reshape(y_shape)


def _summed(parts: Iterator[tuple[torch.Tensor, torch.Size]]) -> tuple[torch.Tensor, torch.Size]:
    """The sum of the per-chunk ``(m, N)`` parts (at least one: ``x`` is not empty) and
    ``f(x).shape``; parts are made one at a time, so one chunk's products are in memory."""
    total, y_shape = next(parts)
    for part, _ in parts:
        total = total + part
    return total, y_shape


def _zeros_like_output(f: Function, x: torch.Tensor) -> torch.Tensor:
    """An empty input event: every Laplacian is an empty sum."""
    with torch.no_grad():
        return x.new_zeros(f(x).shape)


def _hessian(f: Function, x: torch.Tensor, batch_dims: int, chunk_size: int | None) -> torch.Tensor:
    n = event_numel(x, batch_dims)
    products = [
        _hessian_products(f, x, batch_dims, basis(start, stop, x, batch_dims))
        for start, stop in chunks(n, chunk_size or n)
    ]
    hessians = torch.cat([columns for columns, _ in products]).permute(2, 1, 3, 0)  # (N, m, n, n)
    return hessians.diagonal(dim1=-2, dim2=-1).sum(-1).reshape(products[-1][1])


def _hutchinson(
    f: Function, x: torch.Tensor, batch_dims: int, chunk_size: int | None, probes: torch.Tensor
) -> torch.Tensor:
    """``(1/r) sum_j v_j^T H v_j`` per sample and output: collapsed Taylor mode along the probes,
    or Hessian-vector products dotted with the probes if an op has no Taylor rule."""
    r = len(probes)
    pieces = [probes[start:stop] for start, stop in chunks(r, chunk_size or r)]
    out = _collapsed_or_none(capture(f, x, RULES, batch_dims=batch_dims), x, iter(pieces))
    if out is not None:
        return out / r

    def parts() -> Iterator[tuple[torch.Tensor, torch.Size]]:
        for v in pieces:
            products, y_shape = _hessian_products(f, x, batch_dims, v)  # (k, m, N, n)
            k, _, n_samples, n = products.shape
            yield (products * v.reshape(k, 1, n_samples, n)).sum((0, 3)), y_shape  # (m, N)

    total, y_shape = _summed(parts())
    return (total / r).T.reshape(y_shape)


_METHODS: dict[str, Callable[[Function, torch.Tensor, int, int | None], torch.Tensor]] = {
    "auto": _auto,
    "taylor": _taylor,
    "forward-over-reverse": _forward_over_reverse,
    "hessian": _hessian,
    "grad-of-grad": lambda f, x, batch_dims, _: grad_of_grad(f, x, batch_dims),
}
