"""Function-form API: ``jacobian``, ``jacobian_diagonal`` and ``divergence`` of ``f`` at ``x``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from torchdiv import _exact
from torchdiv._checks import (
    check_callable,
    check_chunk_size,
    check_exact_options,
    check_input,
    check_method,
    checked,
)
from torchdiv._modes import outside_inference_mode

Function = Callable[[torch.Tensor], torch.Tensor]


def _prepare(
    fn: str,
    f: Function,
    x: torch.Tensor,
    batch_dims: int,
    method: str,
    chunk_size: int | None,
    square: bool,
) -> Function:
    check_callable(fn, f)
    check_input(fn, x, batch_dims)
    check_method(fn, method, _exact.EXACT_METHODS)
    check_chunk_size(fn, chunk_size)
    return checked(fn, f, x, batch_dims, square)


@outside_inference_mode
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
    ``(N, m, N, n)`` tensor (see NOTE [Batching over basis vectors] in ``torchdiv._basis``).

    Args:
        f: ``f(x) -> y`` with ``y.shape[:batch_dims] == x.shape[:batch_dims]``, samples
            independent (``check_batch_independence`` tests that). Closures over per-sample
            tensors work: ``f`` always receives the whole batch.
        x: floating tensor; its first ``batch_dims`` dimensions index samples.
        batch_dims: number of leading batch dimensions (0: ``x`` is a single sample).
        method: ``"auto"``, ``"forward"`` (one JVP per input element) or ``"reverse"`` (one VJP
            per output element). ``"auto"`` follows the rule in ``divergence``.
        chunk_size: at most this many basis vectors in flight at once; ``None``: all of them
            (``"auto"``: a planned chunk, see ``divergence``).

    Returns:
        Shape ``x.shape[:batch_dims] + y.shape[batch_dims:] + x.shape[batch_dims:]``, dtype and
        device of ``x``; differentiable w.r.t. ``x`` and whatever ``f`` closes over.

    Raises:
        TypeError: ``f`` not callable, ``x`` or ``f(x)`` not a floating tensor.
        ValueError: ``batch_dims`` out of range, ``f`` changed the batch shape, unknown
            ``method``, ``chunk_size < 1``.

    Example:
        >>> A = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        >>> x = torch.randn(4, 2)
        >>> jacobian(lambda x: x @ A.T, x).shape
        torch.Size([4, 3, 2])
        >>> torch.equal(jacobian(lambda x: x @ A.T, x)[0], A)
        True
    """
    g = _prepare("jacobian", f, x, batch_dims, method, chunk_size, square=False)
    jac, y_shape = _exact.evaluate(g, x, batch_dims, method, chunk_size, _exact.dense)
    shape = x.shape[:batch_dims] + y_shape[batch_dims:] + x.shape[batch_dims:]
    return jac.reshape(shape).to(x.dtype)


@outside_inference_mode
def jacobian_diagonal(
    f: Function,
    x: torch.Tensor,
    *,
    batch_dims: int = 1,
    method: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""Diagonal of each sample's square Jacobian, reshaped like ``x``.

    ``out[b][i] = d f(x)_b[i] / d x_b[i]`` over the flattened event index ``i``. Computed from
    the same JVP (or VJP) blocks as the dense Jacobian, but only the diagonal of each block is
    kept, so memory stays at one chunk.

    Args:
        f, x, batch_dims, method, chunk_size: as in ``jacobian``. ``f(x)`` must have as many
            elements per sample as ``x`` (shapes may differ).

    Returns:
        Shape ``x.shape``, dtype and device of ``x``.

    Raises:
        ValueError: as ``jacobian``, and when the per-sample Jacobian is not square.

    Example:
        >>> x = torch.randn(3, 5)
        >>> torch.allclose(jacobian_diagonal(lambda x: x**2, x), 2 * x)
        True
    """
    g = _prepare("jacobian_diagonal", f, x, batch_dims, method, chunk_size, square=True)
    diag, _ = _exact.evaluate(g, x, batch_dims, method, chunk_size, _exact.diagonal)
    return diag.reshape(x.shape).to(x.dtype)


@outside_inference_mode
def divergence(
    f: Function,
    x: torch.Tensor,
    *,
    batch_dims: int = 1,
    method: str = "auto",
    chunk_size: int | None = None,
    num_probes: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Divergence of a batched vector field: the trace of each sample's Jacobian.

    ``div f(x)_b = sum_i d f(x)_b[i] / d x_b[i] = tr J_b`` over the flattened event, exactly,
    with one JVP (forward) or VJP (reverse) per event element, ``chunk_size`` of them at a time.
    Unlike ``grad(y, x, ones_like(y))`` (column sums of ``J``, not its trace) it is right for
    every ``f``; unlike ``torch.autograd.functional.jacobian`` it never builds cross-batch blocks.

    Rule for ``method="auto"`` (all functions; measured on CPU, see ``torchdiv._plan``): one
    evaluation of ``f`` is watched. Reverse mode is used unless the output has more elements
    than the input or ``f`` convolves, which use forward mode. With ``chunk_size=None`` the
    chunk is chosen so that chunk x (widest per-batch intermediate) is about 2M elements.
    Tiny problems (basis vectors x elements of ``x`` at most 2**15) are not watched: reverse
    mode (forward if the output is larger), one chunk. If
    ``torch.func`` cannot run ``f`` (an op without a forward-mode rule: a custom
    ``autograd.Function`` without ``jvp``, CPU fused attention; a legacy
    ``autograd.Function``; in-place writes or control flow on batched tangents) it silently
    uses plain autograd (``autograd.grad`` over batched VJPs), with the same chunking.

    Args:
        f: ``f(x) -> y`` with as many elements per sample as ``x``.
        x: floating tensor; its first ``batch_dims`` dimensions index samples.
        batch_dims: number of leading batch dimensions (0: ``x`` is a single sample).
        method: ``"auto"``, ``"forward"`` or ``"reverse"``.
        chunk_size: at most this many basis vectors in flight at once (bounds memory).
        num_probes: reserved for the stochastic estimators; must be ``None`` for exact methods.
        generator: reserved for the stochastic estimators; ignored by exact methods.

    Returns:
        Shape ``x.shape[:batch_dims]``, dtype and device of ``x``; differentiable w.r.t. ``x``
        and whatever ``f`` closes over (usable inside a training loss).

    Raises:
        TypeError, ValueError: see ``jacobian``; also for a non-square Jacobian.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [7.0, -5.0]])
        >>> divergence(lambda x: x @ A.T, torch.randn(3, 2))  # tr(A) for every sample
        tensor([-3., -3., -3.])
    """
    g = _prepare("divergence", f, x, batch_dims, method, chunk_size, square=True)
    check_exact_options("divergence", method, num_probes, generator)
    diag, _ = _exact.evaluate(g, x, batch_dims, method, chunk_size, _exact.diagonal)
    return diag.sum(-1).reshape(x.shape[:batch_dims]).to(x.dtype)
