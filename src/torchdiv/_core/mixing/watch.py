"""The watch's entry points: ``Watching`` (a dispatch mode running ``BatchAxes`` alone),
``watched``/``watch_once``/``check_empty_event`` (evaluate ``f`` watched), ``tracker`` (a
``BatchAxes`` for a dispatch mode that watches ``f`` anyway), and ``check_graph`` (for a graph
nobody watched: a train-mode batch norm in it, and for an empty event one signed VJP, exactly
``J^T (s * u) = s * J^T u`` for independent samples). Each does nothing while
``allow_batch_interaction()`` is active.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Protocol

import torch
from torch._C._functorch import is_functorch_wrapped_tensor

from torchdiv._core.checks import out_of_memory
from torchdiv._core.mixing.errors import BatchInteractionError, allowed, explain
from torchdiv._core.mixing.reads import Verdict, reading
from torchdiv._core.mixing.tracker import BatchAxes
from torchdiv._core.mixing.transformed import (
    _draws,
    _tolerance,
    check_transformed,
    leaks,
    scaled_vjps,
)
from torchdiv._core.modes import (
    UNDERIVABLE_OPS,
    DispatchMode,
    refuse_underivable,
)
from torchdiv._core.precision import full_float32
from torchdiv._core.subclass import attributes_of
from torchdiv._core.walk import BATCH_NORM_NODES, nodes

# the list ``verdicts`` collects into, while one is open
_VERDICTS: ContextVar[list[Verdict] | None] = ContextVar("torchdiv_verdicts", default=None)


class Verdicts:
    """The verdicts of the evaluations ``watched`` while ``verdicts`` is open (``seen``),
    and what they say together (``verdict``: ``Verdict.joined``; nothing watched, nothing
    to keep)."""

    def __init__(self) -> None:
        self.seen: list[Verdict] = []

    @property
    def verdict(self) -> Verdict:
        """What the evaluations watched say together (``Verdict.joined``)."""
        return Verdict.joined(self.seen)


@contextlib.contextmanager
def verdicts() -> Iterator[Verdicts]:
    """Collect the ``Verdict`` of each evaluation ``watched`` inside that passed: for a
    caller that remembers a pass (``torchdiv._taylor.mixing.passed``, the compiled-model
    watch's memo) after an evaluation another function watched. A pass holds for other
    values of ``x`` only where each of them does (not where values reached Python, nor where
    indices were read along the batch after values decided something: a radius graph
    ``nonzero(cdist(p, p) < r)`` over a flattened batch, within each sample at one call,
    across samples at the next).

    Example:
        >>> with verdicts() as seen:
        ...     _ = watched(torch.sin, torch.randn(4, 2), 1)
        >>> seen.verdict
        Verdict(for_any_x=True, for_any_held=True, while_held=None, indexed_by=(), numbers=False)
    """
    seen = Verdicts()
    token = _VERDICTS.set(seen.seen)
    try:
        yield seen
    finally:
        _VERDICTS.reset(token)


class Watching(DispatchMode):
    """Watch ``f`` with ``BatchAxes`` alone: ``with Watching(x, batch_dims): f(x)`` (nothing
    when ``allow_batch_interaction()`` is active)."""

    def __init__(self, x: torch.Tensor, batch_dims: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        self.tracker = None if allowed() else BatchAxes(x, batch_dims)

    def dispatch(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        if self.tracker is None:
            return func(*args, **kwargs)
        # an op PyTorch cannot differentiate, on the way from x (the engines of plain
        # autograd evaluate f outside SafeDerivatives and would find no trace of it)
        underivable = UNDERIVABLE_OPS.get(func)
        if underivable is not None:
            grad = torch.is_grad_enabled()
            refuse_underivable(underivable, grad and any(_requires_grad(a) for a in args))
        carry = self.tracker.before(func, args, kwargs)
        out = func(*args, **kwargs)
        self.tracker.after(carry, args, out)
        return out

    def __exit__(self, *exc: Any) -> None:
        self.tracker = None  # let go of the tensors it tracked
        super().__exit__(*exc)  # type: ignore[no-untyped-call]  # torch leaves it unannotated


def _requires_grad(a: Any) -> bool:
    return isinstance(a, torch.Tensor) and a.requires_grad


def check_empty_event(f: Callable[[torch.Tensor], Any], x: torch.Tensor, batch_dims: int) -> None:
    """For an engine that does not watch ``f``: when ``x`` has no event dimensions (every
    element a sample), evaluate ``f`` once more, watched by ``Watching`` (with grad enabled,
    so that ``no_grad`` blocks in ``f`` show as constants). Only an elementwise ``f`` is then
    batch independent, and the problem is small."""
    if checks_empty_event(x, batch_dims):
        watch_once(f, x, batch_dims)


def checks_empty_event(x: torch.Tensor, batch_dims: int) -> bool:
    """Whether ``check_empty_event`` evaluates ``f`` (a caller that evaluates it again then
    makes the two evaluations compute one function: ``torchdiv._exact.state.once``)."""
    return x.dim() == batch_dims and x.numel() > 1 and not allowed()


def watch_once(f: Callable[[torch.Tensor], Any], x: torch.Tensor, batch_dims: int) -> None:
    """Evaluate ``f`` once, watched by ``Watching`` (with grad enabled, so that ``no_grad``
    blocks in ``f`` show as constants): ``BatchInteractionError`` if it mixes samples."""
    if not allowed():
        with torch.enable_grad():
            watched(f, x, batch_dims)


def watched(f: Callable[[torch.Tensor], Any], x: torch.Tensor, batch_dims: int) -> Any:
    """``f(x)``, watched by ``Watching`` unless ``allow_batch_interaction()`` is active:
    ``BatchInteractionError`` if it mixes samples. For an engine that evaluates ``f`` anyway
    (with grad enabled, so that ``no_grad`` blocks in ``f`` show as constants), the check
    costs no extra evaluation, only the mode's few microseconds per op."""
    if allowed():
        return f(x)
    check_transformed(f, x, batch_dims)  # (where Watching sees physical tensors only)
    try:
        with Watching(x, batch_dims) as mode, reading(mode.tracker):  # (``BatchAxes.follow``)
            y = f(x)
            if mode.tracker is not None:
                mode.tracker.finish(y)
                if mode.tracker.custom_forward and _differentiable(y, x):
                    custom_products(lambda c: _vjps(y, x, c), y, x, batch_dims, y)
                seen = _VERDICTS.get()
                if seen is not None:
                    seen.append(mode.tracker.verdict())
    except RuntimeError as exc:
        if not str(exc).startswith(_NO_SUBCLASS):
            raise
        # PyTorch makes no tensor subclass of an op's result under a TorchDispatchMode (PINA's
        # LabelTensor(x[:, [i]], labels) in x.extract): f again, unwatched, checked by its VJPs
        y = _unwatched(f, x, batch_dims)
    return y


def _unwatched(f: Callable[[torch.Tensor], Any], x: torch.Tensor, batch_dims: int) -> Any:
    """``f(x)`` for an ``f`` that cannot run watched (it builds a tensor subclass), checked
    numerically: ``BatchInteractionError`` for a train-mode batch norm in its graph
    (``check_graph``), or where ``J^T (s * v) = s * J^T v`` fails (``v`` one Gaussian event
    vector for all samples, ``s`` a Gaussian weight per sample; ``check_transformed``'s
    argument: a cross-sample block leaks with probability 1, a per-sample ``f`` only round-off).
    Evaluated (grad on) at ``x`` where it requires grad, else at a leaf alias of it (of its
    subclass, its attributes kept), so that the VJPs reach it. The check holds at this ``x``
    only (a sort along the batch may leave it in order), so the pass is not remembered: a
    ``Verdict()`` that keeps nothing joins the open ``verdicts``, and later calls check
    again. A coupling with zero derivative (statistics under ``no_grad``) goes unseen, as
    under a transform."""
    z = x
    if not x.requires_grad:
        z = attributes_of(x, torch.Tensor.requires_grad_(torch.Tensor.detach(x), True))
    with torch.enable_grad():
        y = f(z)
    seen = _VERDICTS.get()
    if seen is not None:
        seen.append(Verdict())
    check_graph(None, y, z, batch_dims, False)
    if not isinstance(y, torch.Tensor) or not y.is_floating_point() or y.grad_fn is None:
        return y
    batch = x.shape[:batch_dims]
    if batch.numel() < 2:
        return y
    (plain, weighted), s = scaled_vjps(lambda c: _vjps(y, z, c), y, batch)
    if leaks(plain, weighted, s, y.dtype):
        what = (
            "f builds a tensor subclass, which PyTorch refuses under the watch, and its VJP "
            "carries each sample's cotangent into other samples' gradients (a reduction, "
            "normalisation, sort or matrix product over the batch)"
        )
        raise BatchInteractionError(explain(what, x, batch_dims))
    return y


# the check's own run of a custom Function's backward raised: the user's error, or one a
# backward that frees what it needs gives when run again (an old-style checkpoint)
_UNCHECKED = (
    "{error} (f applies a custom autograd.Function whose backward torchdiv runs again, two "
    "backward passes more, to check that it keeps samples apart, and that run raised it; a "
    "backward that frees what it needs, an old-style gradient checkpoint, cannot run again: "
    "where it keeps samples apart, make the call inside torchdiv.allow_batch_interaction(), "
    "no check; for a checkpoint, torch.utils.checkpoint(..., use_reentrant=False))"
)


def _unchecked(error: Exception) -> Exception:
    """``error``, raised by the check's run of a custom ``backward``, of its own type where
    that takes a message (a ``ValueError`` of the user's stays one), with what happened."""
    text = _UNCHECKED.format(error=error)
    try:
        return type(error)(text)
    except Exception:  # (a constructor that takes other arguments)
        return RuntimeError(text)


def custom_products(
    apply: Callable[[torch.Tensor], torch.Tensor],
    like: torch.Tensor,
    x: torch.Tensor,
    batch_dims: int,
    y: torch.Tensor | None = None,
) -> None:
    """After a watched ``f`` that applied a custom ``autograd.Function`` to values from ``x``
    (``BatchAxes.custom_forward``): its ``backward`` (and ``jvp``) is Python code the watch
    does not see (a gradient normalised over the batch, ``grad + grad.mean(0)``, while
    ``forward`` keeps samples apart), so the engine's own products ``apply`` (VJPs, ``like``
    the output; or JVPs, ``like`` the input) are checked as ``_unwatched`` checks them:
    ``P (s * v) = s * P v`` for one Gaussian event vector ``v`` shared by the samples and a
    Gaussian weight ``s`` per sample, exact for independent samples up to round-off, a
    cross-sample block leaks with probability 1. Two products more, only for such an ``f``.
    The derivative of that ``backward`` (a Laplacian's second order) is not checked
    (``docs/guide/limitations.md``). ``y``: ``f``'s output with its graph, where the
    products are backward passes: unchecked where none of its custom Functions is the
    user's (``_users_function``)."""
    batch = like.shape[:batch_dims]
    if allowed() or batch.numel() < 2 or not like.is_floating_point():
        return
    if y is not None and not _users_function(y, x):
        return
    try:
        with _put_back(x):  # (what the Function's backward writes or draws)
            (plain, weighted), s = scaled_vjps(apply, like, batch)
            leaked = leaks(plain, weighted, s, like.dtype)
            leaked = leaked and _received(apply, plain, weighted, s, like)
    except BatchInteractionError:
        raise
    except Exception as error:
        if out_of_memory(error):
            raise
        raise _unchecked(error) from error
    if leaked:
        what = (
            "a custom autograd.Function's backward (or jvp) carries each sample's cotangent "
            "into other samples' gradients (its forward keeps samples apart; its derivative "
            "reduces or normalises over the batch)"
        )
        raise BatchInteractionError(explain(what, x, batch_dims))


def _users_function(y: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``y``'s graph above ``x`` holds a custom ``autograd.Function`` that is not
    PyTorch's own (those keep samples apart: a reentrant checkpoint's, whose backward
    recomputes the watched forward and may run once only, so the check's products used up
    its graph; DTensor's conversions, whose products are DTensors the check cannot weigh by
    plain tensors: both raised in the call). ``True`` where ``y`` has no graph to tell by."""
    if y.grad_fn is None:
        return True
    stop: Any = x.grad_fn
    for node in nodes(y.grad_fn, stop):
        cls: Any = getattr(node, "_forward_cls", None)  # (a custom Function's node's)
        if cls is not None and node is not stop and not cls.__module__.startswith("torch."):
            return True
    return False


def _received(
    apply: Callable[[torch.Tensor], torch.Tensor],
    plain: torch.Tensor,
    weighted: torch.Tensor,
    s: torch.Tensor,
    like: torch.Tensor,
) -> bool:
    """Whether the check's leak at the sample ``b`` that leaked most comes from the other
    samples' cotangents: ``P(w)_b`` for ``w = (s - s_b) v``, zero at sample ``b``. For a
    linear ``P`` that is the leak itself, ``P(s v)_b - s_b P(v)_b = sum_c (s_c - s_b) J_cb^T
    u``, whatever the batch (a product from the other samples' plain ``s_c v``, ``mean(s) K^T
    u`` for a coupling through the batch mean, was ``sqrt(B)`` times smaller than the check's
    leak). A ``backward`` that keeps samples apart but is not linear in its cotangent (a
    gradient clipped, ``g.clamp(-c, c)``, or normalised per sample, ``g / g.norm(dim=-1)``)
    fails ``P(s v) = s P v`` too, and was refused as mixing although the per-sample loop gives
    the batched numbers (rev-a34); it gives ``P_b(0)``, zero, which is taken off: a
    ``backward`` that adds a random draw to its gradient (``tests/backward_state.py``) is
    affine in its cotangent, each product made from one state (the same draws). Two products
    more, only where the check leaked. Under a ``torch.func`` transform (wrapped tensors):
    ``True``."""
    if is_functorch_wrapped_tensor(plain) or is_functorch_wrapped_tensor(weighted):
        return True
    plain, weighted, count = plain.detach(), weighted.detach(), s.numel()
    on_plain = s.reshape(*s.shape, *[1] * (plain.dim() - s.dim())) * plain
    b = int((weighted - on_plain).abs().reshape(count, -1).amax(1).argmax())
    v, _ = _draws(like.shape, s.shape, like.dtype, like.device)  # (``scaled_vjps``' ``v``)
    kept = s.reshape(-1) - s.reshape(-1)[b]  # (exactly zero at ``b``)
    w = kept.reshape(*s.shape, *[1] * (like.dim() - s.dim())) * v
    products = []
    for cotangent in (w, torch.zeros_like(w)):  # (each from the state before: the same draws)
        with _put_back(like), full_float32(like.device):
            products.append(apply(cotangent[None])[0].detach().reshape(count, -1)[b])
    got = (products[0] - products[1]).abs().max()
    scale = torch.maximum(weighted.abs().max(), on_plain.abs().max())
    return float(got) > _tolerance(like.dtype) * float(scale)


class Undoable(Protocol):
    """What notes the writes and draws made inside it and puts them back (``undo``)."""

    def __enter__(self) -> Any: ...

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...

    def undo(self) -> None: ...


# the maker of ``_put_back``'s ``Undoable``: ``_exact.state.Changes``, a layer above this one,
# which registers itself as it is imported (``put_back_with``)
_CHANGES: list[Callable[[torch.Tensor], Undoable]] = []


def put_back_with(changes: Callable[[torch.Tensor], Undoable]) -> None:
    """Register ``changes`` (``Changes``) as what ``_put_back`` notes and undoes with."""
    _CHANGES[:] = [changes]


@contextlib.contextmanager
def _put_back(x: torch.Tensor) -> Iterator[None]:
    """Put back what the products inside write to tensors (a buffer counting backward passes,
    a backward hook's) and the generators they draw from (``_exact.state.Changes``): the
    checks' products are no part of the call (a custom ``backward`` with such effects changed
    state by two more passes: the Hutchinson Laplacian's second call by more than its first,
    ``tests/laplacian/test_hutchinson_backward_state.py``, until rev-a34)."""
    changes = _CHANGES[0](x)  # (registered when torchdiv is imported)
    try:
        with changes:
            yield
    finally:
        changes.undo()


def _differentiable(y: Any, x: torch.Tensor) -> bool:
    """Whether ``y`` is a floating tensor with a graph that may reach ``x``."""
    return (
        isinstance(y, torch.Tensor)
        and y.is_floating_point()
        and y.grad_fn is not None
        and x.requires_grad
        and torch.is_grad_enabled()
    )


def _vjps(y: torch.Tensor, z: torch.Tensor, cotangents: torch.Tensor) -> torch.Tensor:
    """The VJPs of ``y`` at ``z`` for each of the stacked ``cotangents`` (zeros where ``y``
    does not depend on ``z``), plain tensors, ``y``'s graph kept: one backward pass each, not
    ``is_grads_batched``'s vmap, which a custom ``autograd.Function`` may not support."""
    out = []
    for v in cotangents:
        (g,) = torch.autograd.grad(y, z, v, retain_graph=True, allow_unused=True)
        # (plain: PINA's detach reads labels a gradient lacks)
        out.append(v.new_zeros(z.shape) if g is None else g.as_subclass(torch.Tensor))
    return torch.stack(out)


# the start of PyTorch's message (torch/csrc/autograd/python_variable.cpp)
_NO_SUBCLASS = "Creating a new Tensor subclass"


def check_graph(
    fn: str | None,
    y: torch.Tensor,
    x: torch.Tensor,
    batch_dims: int,
    empty_event: bool,
    batch_norms: list[Any] | None = None,
) -> None:
    """For ``y`` computed from ``x`` by a graph nobody watched: raise ``BatchInteractionError``
    if the graph holds a train-mode batch norm over more than one row, and, with
    ``empty_event`` (every element of ``x`` a sample), if one VJP with a random sign per
    sample differs from the signed VJP of ones: for independent samples, exactly
    ``J^T (s * u) = s * J^T u`` (a sign flip rounds exactly). Walking the graph costs a few
    microseconds; the signed VJP, one more VJP, is done only for empty events. ``fn``: the
    public function to name (``None``: its ``reported`` wrapper names it); ``batch_norms``:
    the graph's batch-norm nodes, if a walk of the caller's found them already."""
    if allowed() or x.shape[:batch_dims].numel() < 2 or y.grad_fn is None:
        return
    # not ``x``'s producer nor its history (an ODE solve's earlier steps), which are not f's:
    # the graph forms refused an ``x`` made by a train-mode batch norm until rev-scoresde20
    found = nodes(y.grad_fn, x.grad_fn) if batch_norms is None else batch_norms
    for node in found:
        if (
            node is not x.grad_fn
            and type(node).__name__ in BATCH_NORM_NODES
            # saved attributes of the C++ node, absent from torch's stubs
            and node._saved_training
            and node._saved_input.shape[0] > 1
            and _reaches(node, x)  # a batch norm of something computed from x
        ):
            what = "a batch norm in train mode, normalising with statistics of the whole batch"
            raise BatchInteractionError(_named(fn, explain(what, x, batch_dims)))
    if empty_event:
        _signed_vjp(fn, y, x, batch_dims)


def _reaches(start: torch.autograd.graph.Node, x: torch.Tensor) -> bool:
    """Whether the graph below ``start`` reaches ``x``: the edge into ``x.grad_fn`` at
    ``x.output_nr``, not another of its outputs (``x, z = h.split(...)``: a batch norm of ``z``
    was taken for one of ``x``, refused), or a leaf's ``AccumulateGrad`` node; depth first,
    each node once."""
    if x.grad_fn is None:
        return any(getattr(node, "variable", None) is x for node in nodes(start))
    edge = (x.grad_fn, x.output_nr)
    found = nodes(start, x.grad_fn)  # (nothing below ``x.grad_fn`` reaches ``x``)
    return any(
        child is edge[0] and nr == edge[1] for node in found for child, nr in node.next_functions
    )


def _named(fn: str | None, message: str) -> str:
    return message if fn is None else f"{fn}: {message}"


def _signed_vjp(fn: str | None, y: torch.Tensor, x: torch.Tensor, batch_dims: int) -> None:
    batch = x.shape[:batch_dims]
    generator = torch.Generator().manual_seed(0)
    signs = (torch.randint(0, 2, batch, generator=generator) * 2 - 1).to(y)
    on_y = signs.reshape(*batch, *[1] * (y.dim() - batch_dims)).expand(y.shape)
    cotangents = torch.stack([torch.ones_like(y), on_y])
    (grads,) = torch.autograd.grad(
        y, x, cotangents, retain_graph=True, is_grads_batched=True, allow_unused=True
    )
    if grads is None:
        return
    leak = (grads[1] - grads[0] * signs.reshape(*batch, *[1] * (x.dim() - batch_dims))).abs()
    if float(leak.max()) > 1e-6 * float(grads.abs().max()):
        what = (
            "y's gradient with respect to each element of x depends on the cotangents of other "
            "elements (a matrix product, reduction or normalisation over the batch)"
        )
        raise BatchInteractionError(_named(fn, explain(what, x, batch_dims)))


def tracker(x: torch.Tensor, batch_dims: int) -> BatchAxes | None:
    """A ``BatchAxes`` for a dispatch mode that watches ``f`` anyway, unless detection is off."""
    return None if allowed() else BatchAxes(x, batch_dims)
