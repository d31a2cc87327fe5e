"""The sample-mixing check under a ``torch.func`` transform around the call, where the watch
cannot see ``f``'s tensors.

``Watching`` and the recorders are dispatch modes, below ``torch.func``'s layers: under the
caller's ``vmap`` (an ensemble of models by ``functional_call``, or of batches of inputs),
``grad`` in the parameters or ``jacrev`` in ``x``, they see physical tensors (a member
dimension in front, the caller's ``x`` never seen at all), so ``BatchAxes`` follows nothing,
and a model centring its features over the batch (``h - h.mean(0)``) gave the diagonal blocks
of the cross-batch Jacobian as per-sample derivatives, silently. ``check_transformed`` tests
the logical ``f`` numerically instead, with ``torch.func.vjp`` (which composes with the
caller's transforms): with a cotangent ``v`` (one Gaussian event vector for all samples) and
a Gaussian weight ``s_b`` per sample, a block-diagonal Jacobian gives
``J^T (s * v) = s * J^T v``, while a cross-sample block ``J_cb`` adds
``sum_c (s_c - s_b) J_cb^T v_c`` to sample ``b``, non-zero with probability 1. A coupling
with zero derivative (statistics of the batch under ``torch.no_grad()`` or ``detach()``) is
not seen: its values are those batched autograd gives, as outside the transform. Costs one
evaluation of ``f`` and two VJPs, under a transform only (outside one it returns before
anything).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar, Token
from typing import Any

import torch
from torch._C._functorch import get_unwrapped, is_functorch_wrapped_tensor, peek_interpreter_stack

from torchdiv._core.mixing.errors import BatchInteractionError, allowed, explain
from torchdiv._core.modes import SafeDerivatives
from torchdiv._core.precision import full_float32

# the level of the innermost torch.func transform (0: none) where the outermost public call in
# flight started; unset outside any public call (``public_call``)
_ENTRY: ContextVar[int | None] = ContextVar("torchdiv_entry_level", default=None)


def public_call() -> Token[int | None] | None:
    """A public call starts: the outermost one in flight notes the transform level it starts
    at, so that ``check_transformed`` leaves alone the calls nested in ``f`` that the engines
    evaluate under their own transforms (``biharmonic``'s inner ``laplacian``, a
    ``divergence`` inside ``f``): the outermost call checks (or watches) the ``f`` they are
    part of, and such a call outside any transform of the caller's costs nothing more.
    Returns the token for ``public_call_ended`` (``None``: nothing noted). A plain function
    pair, not a generator's context manager: four Python frames and a generator fewer in
    every public call (a few microseconds of a tiny problem's, issue 19)."""
    # (Dynamo traces no checks, nor a context variable: is_compiling first)
    if torch.compiler.is_compiling() or _ENTRY.get() is not None:
        return None
    return _ENTRY.set(_level())


def public_call_ended(token: Token[int | None] | None) -> None:
    """The public call whose ``public_call`` returned ``token`` ended."""
    if token is not None:
        _ENTRY.reset(token)


def _level() -> int:
    interpreter = peek_interpreter_stack()
    return 0 if interpreter is None else interpreter.level()


def check_transformed(
    f: Callable[[torch.Tensor], Any],
    x: torch.Tensor,
    batch_dims: int,
    keep: Callable[[], AbstractContextManager[Any]] | None = None,
) -> None:
    """Under a ``torch.func`` transform around the call, raise ``BatchInteractionError`` if
    the VJP of ``f`` at ``x`` carries cotangents across samples: for independent samples,
    ``J^T (s * v) = s * J^T v`` up to round-off (``_tolerance``: ``sqrt(eps)`` of the largest
    element; round-off of the VJPs is a few ``eps`` of it, while a coupling through a batch
    mean leaks its share of it, whatever ``B``). Nothing outside a transform, while
    ``allow_batch_interaction()`` is active, for fewer than two samples, or where
    ``torch.func.vjp`` cannot evaluate ``f`` (a ``RuntimeError``: the engines then raise
    theirs, naming what), nor in a call nested in ``f`` under the engines' own transforms
    (``public_call``). What the check's evaluation changes is put back after, so that the
    engines' evaluation starts from the caller's state: inside ``keep()`` (the engines'
    ``_exact.state.unchanged``: buffers ``f`` writes, as a spectral norm's power iteration
    under a ``vmap`` over inputs, and generators), else the default generators. The public
    function's ``reported`` wrapper names it in the error.

    Example:
        >>> from torch.func import vmap
        >>> centred = lambda z: z - z.mean(0)  # mixes samples
        >>> vmap(lambda z: check_transformed(centred, z, 1) or z)(torch.randn(2, 4, 3))
        Traceback (most recent call last):
        ...
        torchdiv.BatchInteractionError: f mixes samples: ...
    """
    batch = x.shape[:batch_dims]
    if peek_interpreter_stack() is None or allowed() or batch.numel() < 2:
        return
    entry = _ENTRY.get()
    if entry is not None and entry != _level():  # in f, under the engines' own transforms
        return
    with _generators_kept(x.device) if keep is None else keep():
        try:
            # (cdist and pdist replaced, as every engine evaluates f: PyTorch's batched
            # pullback of cdist is wrong, a false leak under the caller's grad; gradcheck34)
            with SafeDerivatives(1, "method='auto'"):
                y, pullback = torch.func.vjp(f, x)  # type: ignore[misc]  # (no aux: two)
        except RuntimeError:
            return
        if not isinstance(y, torch.Tensor) or not y.is_floating_point():
            return
        (plain, weighted), s = scaled_vjps(lambda c: torch.func.vmap(pullback)(c)[0], y, batch)
    if leaks(plain, weighted, s, y.dtype):
        what = (
            "under a torch.func transform around the call (vmap, grad, jacrev), the VJP of f "
            "carries each sample's cotangent into other samples' gradients (a reduction, "
            "normalisation or matrix product over the batch)"
        )
        raise BatchInteractionError(
            explain(what, x, batch_dims)
            + " Outside the transform (on one member of an ensemble) the same call names the op "
            "that mixes them, and torchdiv.check_batch_independence(f, x) tests f."
        )


def scaled_vjps(
    vjps: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, batch: torch.Size
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(J^T v, J^T (s * v))`` stacked, and ``s`` (of shape ``batch``): ``v`` and ``s`` drawn
    by ``_draws``, ``vjps`` given both cotangents stacked (``(2, *y.shape)``) and returning
    both VJPs stacked (one batched backward pass), run with float32 products at full
    precision whatever the caller's setting (``torchdiv._core.precision.full_float32``)."""
    v, s = _draws(y.shape, batch, y.dtype, y.device)
    on_y = s.reshape(*batch, *[1] * (y.dim() - len(batch)))
    with full_float32(y.device):  # (float32's round-off: ``_tolerance``)
        return vjps(torch.stack([v, on_y * v])), s


def leaks(plain: torch.Tensor, weighted: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``weighted = J^T (s * v)`` differs from ``s * plain`` (``plain = J^T v``) by more
    than ``_tolerance`` of the largest of either: a cotangent carried across samples."""
    scaled = s.reshape(*s.shape, *[1] * (plain.dim() - s.dim())) * plain
    leak = _physical((weighted - scaled).abs()).max()
    scale = torch.maximum(_physical(weighted.abs()).max(), _physical(scaled.abs()).max())
    return float(leak) > _tolerance(dtype) * float(scale)


def _draws(
    shape: torch.Size, batch: torch.Size, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A cotangent of ``shape``, one Gaussian event vector ``u`` for every sample, and a
    Gaussian weight per sample, from a generator of their own seeded alike at every call:
    drawn below the transforms, as plain constants (``vmap``'s ``randomness="error"`` refuses
    any draw above them). ``u`` shared by the samples, as the engines' probes are: sample
    ``b`` leaks ``sum_c (s_c - s_b) J_cb^T u``, which for a coupling through a batch mean
    (``J_cb = K / B``) is ``(mean(s) - s_b) K^T u``, not ``1/sqrt(B)`` of it as independent
    cotangents would leave (a ``1e-3`` share of the mean in float32 at ``B=1024`` was below
    round-off then)."""
    generator = torch.Generator(device=device).manual_seed(0)
    with torch._C._DisableFuncTorch():
        u = torch.randn(shape[len(batch) :], generator=generator, device=device, dtype=dtype)
        s = torch.randn(batch, generator=generator, device=device, dtype=dtype)
    return u.expand(shape), s


def _tolerance(dtype: torch.dtype) -> float:
    """``sqrt(eps)`` of ``dtype``, the precision the VJPs run at (float32 ones with full
    precision products, ``scaled_vjps``: at bfloat16's, under ``"medium"``, round-off leaked
    up to ``0.019`` of the largest element, and couplings of ``0.1`` of the batch mean passed
    under its ``sqrt(eps)``).
    Measured on CPU: round-off at most ``1e-6`` of the largest element in float32 (a 9-layer
    tanh MLP, a conv net with group norm, dropout; ``2e-15`` in float64), against
    ``sqrt(eps)`` = ``3.5e-4`` (``1.5e-8``)."""
    return float(torch.finfo(dtype).eps ** 0.5)


def _physical(t: torch.Tensor) -> torch.Tensor:
    """``t`` under every ``torch.func`` wrapper: all members of a ``vmap`` together."""
    while is_functorch_wrapped_tensor(t):
        t = get_unwrapped(t)
    return t.detach()


@contextmanager
def _generators_kept(device: torch.device) -> Iterator[None]:
    """Put back the default generators (CPU and ``device``'s) after the check's evaluation."""
    generators: list[Any] = [torch.default_generator]
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        generators.append(torch.cuda.default_generators[index])
    states = [g.get_state() for g in generators]
    try:
        yield
    finally:
        for g, state in zip(generators, states, strict=True):
            g.set_state(state)
