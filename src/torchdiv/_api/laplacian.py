"""``laplacian``: the trace of each sample's Hessian, for every output component.

Methods (one signature each, in ``BY_NAME``):

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
  same chunks if an op has no Taylor rule. ``"grad-of-grad"`` where the Taylor engine's fixed
  cost per call does not pay back: at one input and at most ``LOOP_ELEMENTS`` samples (``f``
  is not recorded; a plan kept per structure evaluates it outside the modes where its graph
  allows, by the chain below where the call keeps no graph), at up to three inputs where
  ``f``'s recorded graph does little arithmetic per call (``_laplacian.methods.loops_for``:
  a small batch of a network of many small ops, such as a Chebyshev KAN), and if an op has
  no Taylor rule, at up to ``LOOP_FALLBACK`` inputs times output components per sample and
  where forward mode cannot run ``f``
  (``_laplacian.methods.fallback``; kept per structure of ``f``, its parameters and ``x``,
  so later calls do not record ``f``). The inputs counted are those the second derivatives
  run along: with ``coordinates`` (or ``weighted_laplacian``'s ``sigma``) the chosen ones,
  the columns of ``S``. A decision to loop is kept per structure of ``f`` and ``x`` (and
  number of coordinates): the call that makes it runs the Taylor engine from its recording
  (``f`` evaluated once), later calls loop without recording ``f``. Where that loop runs on
  a chain of linear layers and tanh, sigmoid, ReLU or LeakyReLU, its result comes from the
  tensors the call's autograd graph saved, without backward passes (``_laplacian.chain``:
  the same values and derivatives, graph kept alike); a frozen tanh or sigmoid MLP (no
  parameter requires grad, nor ``x``) is taken that way at up to ``CHAIN_INPUTS = 10``
  inputs, beyond the loop's rule, while its ``(n + 1) x widest`` block stays within
  ``CHAIN_ELEMENTS`` (the Taylor engine at its deciding call, the chain from its second).
  Inside a region ``torch.compile`` traces, problems where ``f``'s work is small (inputs x
  samples x ``f``'s multiply-adds per sample, estimated from its parameters, at most
  ``10 x 2**20``: ``torchdiv._core.crossover``) take ``"forward-over-reverse"`` traced into the
  graph (the training guide's torch.compile section); with a ``torch.compile``d ``f`` called
  from eager code, at most ``4 x 2**20`` (``COMPILED_F_WORK``: no graph break at stake there),
  traced into a compiled call, else recorded eagerly with ``f``'s original.

Attention runs on PyTorch's math backend in every method (``_modes.math_attention``): the
fused CPU kernel has no forward-mode derivative. The nested-autodiff methods run ``f`` under
``_modes.SafeDerivatives(3)``: the gradient of a Laplacian is a third derivative, and
PyTorch's through forward over reverse is wrong for fused layer norm, ``slogdet``/``logdet``/
``det``, ``solve`` and ``cholesky_inverse``, and raises for norms, ``std`` and ``copysign``
(replaced there by equivalents whose derivatives are right) and ``nan`` for
``eigvalsh``/``eigh`` (refused, naming ``method='taylor'``, whose rules cover all of them but
eigenvectors, and ``'grad-of-grad'``: reverse over reverse is right for all of them).
Every method computes ``cdist`` from differences (``SafeDerivatives(1)``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from torchdiv._api.compiled import watch_compiled
from torchdiv._api.reporting import reported
from torchdiv._core.checks import (
    check_callable,
    check_chunk_size,
    check_coordinates,
    check_exact_options,
    check_input,
    check_method,
    check_untransformed,
    checked,
)
from torchdiv._core.crossover import COMPILED_F_WORK, TRACED_WORK, traceable
from torchdiv._core.mixing.watch import check_empty_event, checks_empty_event
from torchdiv._core.modes import compiled_like_f, eager_when, entry
from torchdiv._core.tie import tied, trained
from torchdiv._estimators import trace as _trace
from torchdiv._exact.state import Once
from torchdiv._laplacian import methods, traced
from torchdiv._laplacian.along import along, unit_columns

Function = Callable[[torch.Tensor], torch.Tensor]
METHODS = ("auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad", "hutchinson")


RECORDING = ("auto", "taylor", "grad-of-grad")  # methods.BY_NAME's engines that are recorded


def _records_within(
    limit: int,
    f: object,
    x: object,
    /,
    *,
    method: str = "auto",
    batch_dims: object = 1,
    **_: object,
) -> bool:
    """Whether the call's engine records ``f`` when ``"auto"`` traces up to ``limit``: ``"auto"``
    unless it traces forward-over-reverse (``torchdiv._core.crossover.traceable``;
    ``coordinates`` only shrink the problem it decides on); arguments the call will refuse:
    yes. ``_records``: when Dynamo traces the call (such a call then runs eagerly as a whole:
    ``eager_when``); ``_records_compiled_f``: when ``f`` is ``torch.compile``d (such a call then
    runs eagerly with ``f``'s original: ``compiled_like_f``)."""
    if method != "auto" or not isinstance(x, torch.Tensor) or not isinstance(batch_dims, int):
        return method in RECORDING
    return not (0 <= batch_dims <= x.dim() and traceable(f, x, batch_dims, limit))


_records = functools.partial(_records_within, TRACED_WORK)
_records_compiled_f = functools.partial(_records_within, COMPILED_F_WORK)
# a compiled f's original watched before a compiled call, by the methods whose eager calls watch f
_watch = functools.partial(watch_compiled, ("auto", "hutchinson"))


def _replayed(f: object, x: object, *args: object, **options: object) -> torch.Tensor | None:
    """``laplacian`` replayed in a compiled graph where it records (``_laplacian.traced``)."""
    return traced.replayed(laplacian, f, x, *args, **options)  # type: ignore[no-any-return]


@entry(eager_when(_records, _replayed), compiled_like_f(_records_compiled_f, watch=_watch))
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
            not a ``torch.Generator``, ``probes`` not a floating tensor, ``coordinates``
            neither integers nor a bool mask (a ``uint8`` tensor, which PyTorch reads as a
            mask, included).
        ValueError: bad ``batch_dims``, ``method``, ``chunk_size`` or ``coordinates`` (out of
            range, repeated, a mask of the wrong shape), or ``f`` changed the
            batch shape; ``"hutchinson"`` without ``num_probes`` or ``probes``, a bad
            ``num_probes``, ``probe`` or ``probes`` shape; any of ``num_probes``,
            ``generator``, ``probe``, ``probes`` given to an exact method.
        NotImplementedError: ``method="taylor"`` met an op without a rule.
        BatchInteractionError: ``f`` mixes samples (seen by the Taylor recorder of ``"auto"``,
            ``"taylor"`` and ``"hutchinson"``; a train-mode batch norm by every method; see
            ``torchdiv.jacobian``).

    Examples:
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
    if method == "grad-of-grad":
        check_untransformed(
            fn, "method='grad-of-grad'", "use method='auto' or 'forward-over-reverse' there"
        )
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
    if index is None:
        out = _laplacian(g, x, batch_dims, method, chunk_size, v)
        # on x's graph where the nested methods' result has none: a piecewise-linear f whose
        # double backward gives constant zeros (hardsigmoid; gradcheck34), whose loss's
        # backward() raised where the other methods' gradients are zeros
        return out if out.requires_grad else tied(out, x, trained(f, out))
    # the Laplacian in z of f(x + S z), S's columns the chosen e_j; on x's graph (tied) where
    # the recording engines' result has no path to it (f piecewise linear in x)
    h, z = along(g, x, batch_dims, unit_columns(index, x, batch_dims))
    out = _laplacian(h, z, batch_dims, method, chunk_size, v)
    return tied(out, x, trained(f, out))


def _laplacian(
    g: Function,
    x: torch.Tensor,
    batch_dims: int,
    method: str,
    chunk_size: int | None,
    v: torch.Tensor | None,
) -> torch.Tensor:
    """``laplacian``'s engines on its checked arguments (``v``: Hutchinson's probes)."""
    if x.numel() == 0:  # no samples, or an empty event: every Laplacian is an empty sum
        return methods.zeros_like_output(g, x)
    if v is not None:
        probes = v.reshape(-1, *x.shape).to(x.dtype)
        return methods.hutchinson(g, x, batch_dims, chunk_size, probes)
    run = methods.BY_NAME[method]
    if method in ("forward-over-reverse", "hessian", "grad-of-grad") and checks_empty_event(
        x, batch_dims
    ):  # not recorded: _mixing evaluates f once more, from the same state as the method
        each = Once(x)
        each(lambda z: check_empty_event(g, z, batch_dims))(x)
        return each(lambda z: run(g, z, batch_dims, chunk_size))(x)
    return run(g, x, batch_dims, chunk_size)
