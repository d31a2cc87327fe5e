"""``laplacian``: the trace of each sample's Hessian, for every output component.

Methods (one signature each, in ``_METHODS``):

- ``"taylor"``: forward Laplacian (collapsed Taylor mode, see ``torchdiv._taylor``): one
  forward sweep carries ``(value, K directional derivatives, summed second derivatives)``;
  costs about ``n`` forward passes for ``n`` inputs, no autograd needed.
- ``"forward-over-reverse"``: Hessian columns as JVPs of the per-sample gradients, ``k`` basis
  vectors at a time (NOTE [Batching over basis vectors] in ``_basis``), keeping only the
  diagonal entries.
- ``"hessian"``: the same products for all ``n`` basis vectors at once, materialising every
  sample's Hessian and taking its trace: what ``torch.func.hessian`` users write.
- ``"auto"``: ``"taylor"`` with a planned chunk, or ``"forward-over-reverse"`` if an op has no
  Taylor rule.

Attention runs on PyTorch's math backend in every method (``_modes.math_attention``): the
fused CPU kernel has no forward-mode derivative.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import vjp, vmap

from torchdiv._basis import basis, broadcast_basis, chunks
from torchdiv._checks import (
    check_callable,
    check_chunk_size,
    check_exact_options,
    check_input,
    check_method,
    checked,
    event_numel,
)
from torchdiv._forward import ForwardJacobian
from torchdiv._modes import math_attention, outside_inference_mode
from torchdiv._taylor import RULES, Context, Graph, Jet, UnsupportedOp, capture, propagate

Function = Callable[[torch.Tensor], torch.Tensor]
METHODS = ("auto", "taylor", "forward-over-reverse", "hessian")
# elements of jac (all directions, all samples, widest tensor) in flight under "auto"
CHUNK_ELEMENTS = 2**22


@outside_inference_mode
def laplacian(
    f: Function,
    x: torch.Tensor,
    *,
    batch_dims: int = 1,
    method: str = "auto",
    chunk_size: int | None = None,
    num_probes: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Per-sample Laplacian of every output component of a batched function.

    For every sample ``b`` and output component ``i``,
    ``(Δf)_{b,i} = sum_j d^2 f(x)_{b,i} / d x_{b,j}^2`` over the flattened input event.

    Args:
        f: ``f(x) -> y`` with ``y.shape[:batch_dims] == x.shape[:batch_dims]``, samples
            independent. Any output event shape; a scalar per sample is the usual case.
        x: floating tensor; its first ``batch_dims`` dimensions index samples.
        batch_dims: number of leading batch dimensions (0: ``x`` is a single sample).
        method: ``"auto"``, ``"taylor"``, ``"forward-over-reverse"`` or ``"hessian"`` (module
            docstring). ``"taylor"`` raises ``NotImplementedError`` naming any op it has no
            rule for; ``"auto"`` then uses ``"forward-over-reverse"``.
        chunk_size: at most this many input directions in flight at once (bounds memory in
            every method); ``None``: all (``"auto"``: a planned chunk).
        num_probes, generator: for stochastic methods only; exact methods reject them.

    Returns:
        Shape ``x.shape[:batch_dims] + y.shape[batch_dims:]``, dtype and device of ``x``;
        differentiable w.r.t. ``x`` and whatever ``f`` closes over.

    Raises:
        TypeError: ``f`` not callable, ``x`` or ``f(x)`` not a floating tensor.
        ValueError: bad ``batch_dims``, ``method`` or ``chunk_size``, or ``f`` changed the
            batch shape.
        NotImplementedError: ``method="taylor"`` met an op without a rule.

    Example:
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> u = lambda x: torch.sin(x[:, 0]) * x[:, 1] ** 2   # Δu = -sin(x0) x1^2 + 2 sin(x0)
        >>> expected = torch.sin(x[:, 0]) * (2 - x[:, 1] ** 2)
        >>> torch.allclose(laplacian(u, x), expected)
        True
    """
    fn = "laplacian"
    check_callable(fn, f)
    check_input(fn, x, batch_dims)
    check_method(fn, method, METHODS)
    check_chunk_size(fn, chunk_size)
    check_exact_options(fn, method, num_probes, generator)
    return _METHODS[method](checked(fn, f, x, batch_dims, square=False), x, batch_dims, chunk_size)


def _auto(f: Function, x: torch.Tensor, batch_dims: int, chunk_size: int | None) -> torch.Tensor:
    graph = capture(f, x, RULES)
    chunk = chunk_size or _planned_chunk(graph, event_numel(x, batch_dims))
    if not graph.unsupported:
        try:
            return _propagated(graph, x, batch_dims, chunk)
        except UnsupportedOp:
            pass
    return _forward_over_reverse(f, x, batch_dims, chunk)


def _planned_chunk(graph: Graph, num_inputs: int) -> int:
    return max(8, CHUNK_ELEMENTS // graph.widest) if num_inputs else 1


def _taylor(f: Function, x: torch.Tensor, batch_dims: int, chunk_size: int | None) -> torch.Tensor:
    graph = capture(f, x, RULES)
    if graph.unsupported:
        ops = ", ".join(sorted(set(graph.unsupported)))
        raise UnsupportedOp(
            f"laplacian: method='taylor' has no propagation rule for {ops} applied to a tensor "
            "that depends on x; use method='auto' (falls back to 'forward-over-reverse')"
        )
    return _propagated(graph, x, batch_dims, chunk_size or event_numel(x, batch_dims))


def _propagated(graph: Graph, x: torch.Tensor, batch_dims: int, chunk: int) -> torch.Tensor:
    """Sum of the output's collapsed second-order terms over chunks of unit directions."""
    total = None
    for start, stop in chunks(event_numel(x, batch_dims), chunk):
        directions = broadcast_basis(start, stop, x, batch_dims)
        out = propagate(graph, Jet(x, directions, None), Context(stop - start, True, jac=False))
        if isinstance(out, Jet) and out.lap is not None:
            total = out.lap if total is None else total + out.lap
    if total is None:  # f(x) does not depend on x, or only linearly
        return x.new_zeros(graph.output_shape)
    return total.expand(graph.output_shape).clone()


class _Gradients:
    """``z -> (m,) + z.shape``: row ``i`` holds every sample's gradient of output ``i``;
    remembers ``f(z).shape``."""

    def __init__(self, f: Function, batch_dims: int):
        self.f, self.batch_dims = f, batch_dims
        self.y_shape = torch.Size()

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        y, pullback = vjp(self.f, z)
        self.y_shape = y.shape
        (rows,) = vmap(pullback)(basis(0, event_numel(y, self.batch_dims), y, self.batch_dims))
        return rows


def _hessian_columns(
    f: Function, x: torch.Tensor, batch_dims: int, start: int, stop: int
) -> tuple[torch.Tensor, torch.Size]:
    """Columns ``start..stop-1`` of every sample's Hessian of every output, shape
    ``(k, m, N, n)``, and ``f(x).shape``: JVPs of the per-sample gradients."""
    grads = _Gradients(f, batch_dims)
    with math_attention():
        columns = ForwardJacobian(grads, x, batch_dims).apply(basis(start, stop, x, batch_dims))
    k, m = columns.shape[:2]
    return columns.reshape(k, m, x.shape[:batch_dims].numel(), -1), grads.y_shape


def _forward_over_reverse(
    f: Function, x: torch.Tensor, batch_dims: int, chunk_size: int | None
) -> torch.Tensor:
    n = event_numel(x, batch_dims)
    if n == 0:
        return _zeros_like_output(f, x)
    total = None
    for start, stop in chunks(n, chunk_size or n):
        columns, y_shape = _hessian_columns(f, x, batch_dims, start, stop)
        j = torch.arange(stop - start, device=x.device)
        part = columns[j, :, :, start + j].sum(0)  # (m, N): entries (start+j, start+j)
        total = part if total is None else total + part
    return total.T.reshape(y_shape)


def _zeros_like_output(f: Function, x: torch.Tensor) -> torch.Tensor:
    """An empty input event: every Laplacian is an empty sum."""
    with torch.no_grad():
        return x.new_zeros(f(x).shape)


def _hessian(f: Function, x: torch.Tensor, batch_dims: int, chunk_size: int | None) -> torch.Tensor:
    n = event_numel(x, batch_dims)
    if n == 0:
        return _zeros_like_output(f, x)
    columns, y_shape = _hessian_columns(f, x, batch_dims, 0, n)
    hessians = columns.permute(2, 1, 3, 0)  # (N, m, n, n)
    return hessians.diagonal(dim1=-2, dim2=-1).sum(-1).reshape(y_shape)


_METHODS: dict[str, Callable[[Function, torch.Tensor, int, int | None], torch.Tensor]] = {
    "auto": _auto,
    "taylor": _taylor,
    "forward-over-reverse": _forward_over_reverse,
    "hessian": _hessian,
}
