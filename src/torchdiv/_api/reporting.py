"""Errors out of a public function: PyTorch's message from inside ``f``, with torchdiv's context.

An exception ``f`` raises (marked by ``_checks.call_f``) may be caught on the way by an
automatic fallback, which tries another engine; ``reported`` adds the context only when the
error leaves the public function: the call, the shapes and dtypes passed, the method, the
engine that evaluated ``f`` last, and a hint for the usual mistakes. The new exception has the
type of the original (so ``except RuntimeError`` still catches it) and is chained to it
(``raise ... from``), so PyTorch's traceback stays.

A ``torch.func`` transform refuses an ``f`` that updates state it closes over, as a train-mode
batch norm does; that error says nothing about batch norm, so ``f`` is first recorded once
more, watching the batch dimensions (``torchdiv._core.mixing``), to raise the clear
``BatchInteractionError`` instead. ``BatchInteractionError`` raised while watching ``f`` gets
the public function's name in front.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
from collections.abc import Callable, Iterator
from types import CodeType, FrameType, FunctionType
from typing import Any, TypeVar

import torch
import torch._higher_order_ops
import torch.nn.attention
import torch.utils.checkpoint as _checkpoint
import torch.utils.hooks as _hooks
from torch._C._autograd import _top_saved_tensors_default_hooks
from torch._C._functorch import peek_interpreter_stack

from torchdiv._core.checks import mark_final, raised_by_f
from torchdiv._core.mixing.errors import BatchInteractionError, unnamed
from torchdiv._core.mixing.transformed import public_call, public_call_ended
from torchdiv._core.modes import WrongDerivatives, underived, underived_refusal
from torchdiv._core.script import attribute
from torchdiv._exact.attributes import PlainAttributes
from torchdiv._exact.autograd import UndifferentiableBackward
from torchdiv._taylor.mixing import recorded_mixing

F = TypeVar("F", bound=Callable[..., Any])


def reported(fn: str, call: str = "f(x)") -> Callable[[F], F]:
    """Decorate the public function ``fn(f, x, ...)`` (``call``: how it calls ``f``)."""

    def decorate(function: F) -> F:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            # tensors f set on its modules under the engines' transforms, left plain
            attributes = PlainAttributes(args[0] if args else kwargs.get("f"))
            try:
                entry = public_call()  # (the level a caller's transform left: mixing.transformed)
                try:
                    return function(*args, **kwargs)
                finally:
                    public_call_ended(entry)
            except Exception as exc:
                try:
                    bound = signature.bind(*args, **kwargs)
                except TypeError:  # the call's own arguments are wrong: Python's message
                    raise exc from None
                bound.apply_defaults()
                final = final_error(fn, call, exc, bound.arguments)
                if final is None:
                    mark_final(exc)
                    raise
                cause = None if isinstance(exc, BatchInteractionError) else exc
                raise mark_final(final) from cause
            finally:
                attributes.close()

        return wrapper  # type: ignore[return-value]

    return decorate


def final_error(fn: str, call: str, exc: Exception, options: dict[str, Any]) -> Exception | None:
    """What ``fn`` raises instead of ``exc`` (``None``: ``exc`` itself). ``options``: the
    call's arguments (``f``, ``x``, ``batch_dims``, ``method``; ``evaluate``, ``f`` as a
    function of ``x`` alone, if it is not ``f``)."""
    if isinstance(exc, BatchInteractionError):
        if str(exc).startswith(f"{fn}:"):
            return None
        return BatchInteractionError(f"{fn}: {unnamed(str(exc))}")
    if isinstance(exc, UndifferentiableBackward):  # refused at the call, named "torchdiv"
        return renamed(fn, exc)
    if isinstance(exc, WrongDerivatives) and not exc.named:  # refused outside f (by the
        named = WrongDerivatives(f"{fn}: {exc}")  # recorder, after f ran): had no name
        named.named = True
        named._torchdiv_context = True  # type: ignore[attr-defined]  # (a caller renames it)
        return named
    refused = _HOOKS_REFUSED in str(exc) or isinstance(exc, HooksRefused)  # (a nested call's)
    if refused and _top_saved_tensors_default_hooks(True) is not None:
        return HooksRefused(_hooks_refused(fn, options.get("method")))
    nested = getattr(exc, "_torchdiv_context", False)  # a public call inside this one's
    missing = None if nested or raised_by_f(exc) else _NO_FORWARD_RULE.search(str(exc))
    if missing is not None:
        return _no_forward_rule(fn, missing.group(1), exc, options)
    if isinstance(exc, ValueError) and str(exc).startswith("f wrote other values"):
        return ValueError(f"{fn}: {exc}")  # (state's refusal, raised bare until nnsweep33)
    if not raised_by_f(exc) and not nested:
        lacking = _no_second_derivative(fn, str(exc)) or _unbatched_backward(
            fn, str(exc), options.get("method")
        )
        if lacking is not None:
            return in_context(fn, "a backward pass through f(x)", exc, options, lacking)
        if _checkpointed(exc) is None and control_flow(exc) is None:
            return None
        # a reentrant checkpoint's (or torch.cond's) backward refused torchdiv's autograd.grad
        return in_context(fn, "a backward pass through f(x)", exc, options)
    if "captured Tensor" in str(exc):  # a transform refused an update f makes
        evaluate = options.get("evaluate", options["f"])
        mixing = recorded_mixing(evaluate, options["x"], options["batch_dims"])
        if mixing is not None:
            return BatchInteractionError(f"{fn}: {mixing}")
    if not nested:
        return in_context(fn, call, exc, options)
    cause = exc.__cause__
    if cause is None:
        return renamed(fn, exc)
    method = options.get("method")
    return renamed(fn, exc, _hint(fn, str(cause), options["f"], options["x"], call, cause, method))


# torch.func's refusal of the caller's saved-tensor hooks (its vjp, jacrev, hessian)
_HOOKS_REFUSED = "don't yet support saved tensor hooks"
# the methods that take no torch.func reverse-mode product, by public function
_WITHOUT_VJP = {
    "divergence": "'auto' or 'forward'",
    "jacobian": "'auto' or 'forward'",
    "jacobian_diagonal": "'auto' or 'forward'",
    "biharmonic": "'auto' or 'taylor'",
    "value_grad_laplacian": "'auto' or 'taylor'",
}


class HooksRefused(RuntimeError):
    """``torch.func``'s refusal of the caller's saved-tensor hooks, named by torchdiv."""


def _hooks_refused(fn: str, method: object) -> str:
    """The message of ``fn``'s ``method`` refused by ``torch.func`` under the caller's
    saved-tensor hooks (``save_on_cpu``'s activation offloading, a non-reentrant checkpoint
    around the call), which PyTorch's own error ("Please open an issue") does not name."""
    ways = _WITHOUT_VJP.get(fn, "'auto', 'taylor' or 'grad-of-grad'")
    return (
        f"{fn}: method={method!r} takes torch.func's reverse-mode products, which refuse the "
        "saved-tensor hooks around the call (torch.autograd.graph.saved_tensors_hooks, "
        f"save_on_cpu, a non-reentrant torch.utils.checkpoint); use method={ways} (the hooks "
        "then apply to what the call saves; a checkpoint's only to the structured and Taylor "
        "engines'), or make the call outside the hooks (a checkpoint: "
        "around f instead)"
    )


def renamed(fn: str, exc: Exception, hint: str | None = None) -> Exception | None:
    """The error of a public call nested in ``fn``'s (``biharmonic``'s Laplacians,
    ``value_grad_laplacian``'s Jacobian), its name in front replaced by ``fn`` (every error
    of ``fn`` starts with it); its context line still names the call that raised it, its
    hint replaced by ``hint``, ``fn``'s own (the nested call's named its methods, which ``fn``
    may not take: ``'grad-of-grad'`` for ``biharmonic``). ``None``: already so named, or an
    exception type that wants other arguments."""
    name, _, rest = str(exc).partition(": ")
    if name == fn:
        return None
    if hint is not None and "\nHint: " in rest:
        rest = rest.partition("\nHint: ")[0] + f"\nHint: {hint}"
    return _retyped(exc, f"{fn}: {rest}")


# PyTorch's message where an op (or its backward, under forward over reverse) has no
# forward-mode derivative: raised by the engine's products, outside f, so it reached the caller
# bare (``laplacian(method="forward-over-reverse")`` through ``soft_margin_loss``, opinfo33)
_NO_FORWARD_RULE = re.compile(r"Trying to use forward AD with (\S+) that does not support it")


def _no_forward_rule(fn: str, op: str, exc: Exception, options: dict[str, Any]) -> Exception:
    """``exc`` named by ``fn``, the method and the op PyTorch has no forward-mode rule for,
    with the way out: ``method="auto"``, which falls back to backward passes."""
    text = (
        f"{fn}: method={options.get('method')!r} takes forward-mode derivatives through f, and "
        f"PyTorch has no forward-mode derivative of {op} (an op of f, or the backward of one); "
        "use method='auto' (it falls back to backward passes) or a method of backward passes "
        f"only.\nPyTorch: {str(exc).splitlines()[0]}"
    )
    return _retyped(exc, text) or exc


def _no_second_derivative(fn: str, message: str) -> str | None:
    """The hint for PyTorch's refusal to differentiate a backward pass of ``f`` (a second
    derivative: a Laplacian, a Hessian-vector product), ``None`` for another error: an op
    whose backward has no derivative formula ("derivative for
    aten::_embedding_bag_per_sample_weights_backward is not implemented": an
    ``nn.EmbeddingBag``'s ``per_sample_weights``, ``hardsigmoid``'s; an op of ``f`` itself
    without any derivative, ``geqrf``, named as one: no second derivative), or a legacy
    ``autograd.Function`` whose backward writes through ``out=`` (``nn.CrossMapLRN2d``).
    Until nnsweep33 the loop of backward passes raised them bare, without the call; so did
    a custom op's registered backward calling an op without a derivative (a NumPy kernel's
    derivative as its own ``custom_op``: "Trying to backward through ns.op.default but no
    autograd formula was registered", the lead)."""
    unregistered = _unregistered_hint(fn, message)
    if unregistered is not None:
        return unregistered
    found = re.search(r"derivative for (\S+) is not implemented", message)
    if found is None and "out=... arguments don't support automatic differentiation" not in message:
        return None
    if found is not None and "backward" not in found.group(1):
        # an op of f itself without a derivative ("the derivative for 'geqrf' is not
        # implemented"): the first backward pass already raises, whatever fn computes
        return (
            f"PyTorch has no derivative of {found.group(1)}, an op f applies to what x "
            "reaches, so plain autograd's backward passes cannot differentiate f through it; "
            "write that part of f with ops PyTorch differentiates, or keep it out of what x "
            "reaches"
        )
    what = f"of {found.group(1)}" if found else "of an out= op in a backward formula"
    return (
        f"PyTorch has no derivative {what}, which {fn}'s second derivatives of f (or a "
        "gradient of a first-order result) need: write that part of f with ops PyTorch "
        "differentiates twice, or keep it out of what x reaches"
    )


def _unregistered_hint(fn: str, message: str) -> str | None:
    """The hint for PyTorch's refusal of a backward pass through a custom op without a
    derivative ("Trying to backward through ns.op.default but no autograd formula was
    registered"), raised outside ``f`` (``_no_second_derivative``) or by ``f``'s own
    backward pass (``_hint``); ``None`` for another error."""
    unregistered = re.search(
        r"backward through (\S+) but no autograd formula was registered", message
    )
    if unregistered is None:
        return None
    op = unregistered.group(1)
    return (
        f"the custom op {op} has no derivative (torch.library.custom_op without "
        "register_autograd): where f calls it, no method differentiates f; where a custom "
        "op's registered backward calls it (a NumPy kernel's derivative as its own "
        f"custom_op), what needs that backward's derivative ({fn}'s second derivatives of "
        "f, or a gradient of a first-order result) cannot be taken by any method; "
        f"register_autograd for {op} too, or write it in differentiable torch ops"
    )


def _unbatched_backward(fn: str, message: str, method: object) -> str | None:
    """The hint for ``vmap``'s refusal of an op that PyTorch's backward formula of an op of
    ``f`` calls (``svd``'s and ``eig``'s of a complex matrix check the phase of the singular
    vectors with ``torch.allclose``; complex ``vecdot``'s and ``hfft``'s conjugate as a
    ``_neg_view``: neither has a batching rule): raised bare, outside ``f``, until
    opinfoc33; ``None`` for another error."""
    found = re.search(
        r"vmap over (\S+) isn't supported|Batching rule not implemented for (\S+?);", message
    )
    if found is None:
        return None
    return (
        f"PyTorch's backward formula of an op of f calls {found.group(1) or found.group(2)} "
        "(a complex svd's or eig's check of the vectors' phase, a complex conjugate's "
        "negative view), which torch.func's vmap cannot batch, and "
        f"method={method!r} batches its products with vmap; use {_plain_way(fn, method)}, "
        "which differentiate f by plain autograd"
    )


def in_context(
    fn: str, call: str, exc: Exception, options: dict[str, Any], hint: str | None = None
) -> Exception:
    """``exc`` again, its message followed by the call's context and a hint (``hint``, or
    ``_hint``'s)."""
    x, f = options["x"], options["f"]
    shown = ", ".join(
        f"{name}={options[name]!r}" for name in ("batch_dims", "method") if name in options
    )
    engine = getattr(exc, "_torchdiv_engine", "torchdiv")
    text = (
        f"{fn}: {call} raised {type(exc).__name__}: {exc}\n"
        f"[torchdiv] in {fn}(f, x, ..., {shown}) with x of shape {tuple(x.shape)} and dtype "
        f"{x.dtype}; f was evaluated by {engine}."
    )
    hint = hint or _hint(fn, str(exc), f, x, call, exc, options.get("method"))
    if hint:
        text += f"\nHint: {hint}"
    return _retyped(exc, text) or exc


def _retyped(exc: Exception, text: str) -> Exception | None:
    """An error of ``exc``'s type with the message ``text``, ``exc``'s attributes and torchdiv's
    mark of a named error (a caller renames it: ``renamed``); ``None`` for an exception type
    that wants other arguments (the caller keeps the original)."""
    try:
        new = type(exc)(text)
    except Exception:
        return None
    _carry_attributes(new, exc)
    with contextlib.suppress(AttributeError):
        new._torchdiv_context = True  # type: ignore[attr-defined]
    return new


# what built-in exceptions keep outside their ``__dict__`` and leave out of their message
# (ImportError's name and path, AttributeError's name and obj, OSError's errno; not its
# strerror and filename, from which it writes its message instead of the one given)
_BUILT_IN_ATTRIBUTES = ("name", "path", "obj", "errno")


def _carry_attributes(new: Exception, exc: Exception) -> None:
    """Give ``new``, made from ``exc``'s type and a new message, ``exc``'s attributes (but
    torchdiv's marks): a handler of the same type reads them (``error.code`` of the caller's
    own exception, ``error.name`` of an ``ImportError``, notes); the constructor's defaults,
    or nothing, stood in."""
    with contextlib.suppress(AttributeError, TypeError):  # (a type without __dict__)
        own = {k: v for k, v in vars(exc).items() if not k.startswith("_torchdiv")}
        new.__dict__.update(own)
    built_in = [c for c in type(exc).__mro__ if c.__module__ == "builtins"]
    names = [n for n in _BUILT_IN_ATTRIBUTES if any(n in vars(c) for c in built_in)]
    for c in type(exc).__mro__:  # the caller's ``__slots__`` (kept outside ``__dict__``)
        slots = vars(c).get("__slots__", ())
        slots = [slots] if isinstance(slots, str) else list(slots)
        names += [n for n in slots if not n.startswith("__")]  # (not __dict__, __weakref__)
    for name in names:
        with contextlib.suppress(AttributeError, TypeError):
            setattr(new, name, getattr(exc, name))


# what runs an f that draws random numbers off the CPU, where forward mode's vmap refuses it
_RANDOM_WAYS = {
    "laplacian": "method='grad-of-grad' or 'taylor'",
    "weighted_laplacian": "method='grad-of-grad' or 'taylor'",
    "value_grad_laplacian": "method='taylor'",
    "biharmonic": "chunk_size=1",
}


def _checkpointed(exc: BaseException) -> bool | None:
    """``use_reentrant`` of the ``torch.utils.checkpoint`` call that ``exc`` (or an error in
    its chain) was raised in, ``None`` if none: read off the traceback, the checkpoint's own
    frame (its argument) or a frame of the reentrant version's ``CheckpointFunction``."""
    for frame in _frames(exc):
        code = frame.f_code
        if code.co_filename == _CHECKPOINT_FILE:
            if "use_reentrant" in frame.f_locals:
                return frame.f_locals["use_reentrant"] is not False
            if code in _class_codes(_checkpoint.CheckpointFunction):
                return True
    return None


def _frames(exc: BaseException) -> Iterator[FrameType]:
    """The frames of the tracebacks of ``exc`` and of each error in its chain (causes, then
    contexts), innermost last within each, each error once."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None:
            yield tb.tb_frame
            tb = tb.tb_next
        error = error.__cause__ or error.__context__


_CHECKPOINT_FILE = _checkpoint.__file__

# the eager implementations of torch.cond, torch.while_loop and scan (``control_flow``), by file
_CONTROL_FLOW_FILES = {
    os.path.join(os.path.dirname(torch._higher_order_ops.__file__), f"{name}.py"): op
    for name, op in (
        ("cond", "torch.cond"),
        ("while_loop", "torch.while_loop"),
        ("scan", "torch._higher_order_ops.scan"),
    )
}


# flex_attention's public function and its higher-order op, whose errors ``_traceback_hint`` names
_FLEX_ATTENTION_FILES = {
    os.path.join(os.path.dirname(torch._higher_order_ops.__file__), "flex_attention.py"),
    os.path.join(os.path.dirname(torch.nn.attention.__file__), "flex_attention.py"),
}


def _flex_attention(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error in its chain) was raised inside ``flex_attention``: on CPU
    PyTorch 2.13 has no backward of it ("FlexAttention does not support backward on CPU",
    every method), and the recorders no rule for its higher-order op."""
    return any(frame.f_code.co_filename in _FLEX_ATTENTION_FILES for frame in _frames(exc))


def control_flow(exc: BaseException) -> str | None:
    """The control-flow op (``"torch.cond"``, ``"torch.while_loop"``, scan's) inside which
    ``exc`` (or an error in its chain) was raised, read off the traceback, or ``None``: their
    eager forms run under plain autograd's first derivatives only, and fail under ``torch.func``'s
    transforms, torchdiv's dispatch modes or a second backward pass with PyTorch's internal
    errors (``KeyError: <TransformType.Grad: 2>``, "no rule registered for
    HigherOrderOperator cond")."""
    names = (frame.f_code.co_filename for frame in _frames(exc))
    return next((_CONTROL_FLOW_FILES[n] for n in names if n in _CONTROL_FLOW_FILES), None)


def _hint(
    fn: str,
    message: str,
    f: Any,
    x: torch.Tensor,
    call: str,
    exc: BaseException | None = None,
    method: object = None,
) -> str | None:
    """A likely fix for the usual mistakes (``exc``: the error, whose traceback may show a
    ``torch.utils.checkpoint`` or a module's backward hook; ``method``: the one that raised,
    never named as the way out); the first of these kinds that knows the error, in turn."""
    return (
        _traceback_hint(message, exc)
        or _unregistered_hint(fn, message)
        or _transform_hint(fn, message, x, exc, method)
        or _plain_autograd_hint(fn, message, call, method)
        or _dtype_hint(message, f, x)
        or _call_hint(message, call)
    )


_COND_WAY = (
    "Write the branch as torch.where(pred, true_fn(x), false_fn(x)) (both branches evaluated; "
    "a pred that combines samples, x.abs().max() > 1, is refused as sample mixing: take one "
    "per sample, x.abs().amax(-1, keepdim=True) > 1) or as a Python if (watched for sample "
    "mixing at every call)."
)
_SCAN_WAY = (
    "Write the scan as a Python loop over its steps (h = step(h, xs[:, t]) for each t; "
    "torch.compile unrolls it); graph_divergence or graph_jacobian of its output (without "
    "create_graph) take its first derivatives as it is."
)
_WHILE_LOOP_WAY = (
    "Write the loop as a Python loop over its steps (a per-sample stopping rule: mask the "
    "samples done, while active.any()); graph_divergence or graph_jacobian of its output "
    "(without create_graph) take its first derivatives as it is."
)


def _traceback_hint(message: str, exc: BaseException | None) -> str | None:
    """``_hint`` for what the traceback of ``exc`` shows: ExpandedWeights, a checkpoint."""
    if "Expanded Weights" in message or (exc is not None and _expanded_weights(exc)):
        return (
            "f computes through torch's ExpandedWeights (call_for_per_sample_grads, Opacus's "
            "grad_sample_mode='ew'): torch.func's transforms and torchdiv's recorders cannot "
            "run it, and its backward, which writes per-sample gradients into grad_sample, is "
            "not differentiated again, so no method gives per-sample gradients of a loss built "
            "on derivatives of f. Take them by torch.func: vmap(grad(loss), in_dims=(None, "
            "0))(params, x) with each sample as a batch of one (functional_call inside f)."
        )
    op = None if exc is None else control_flow(exc)
    if op is not None:
        return (
            f"f calls {op}, which PyTorch runs outside torch.compile under plain autograd's "
            "first derivatives only: not under torch.func's transforms or torchdiv's dispatch "
            "modes (every method evaluates f under one), nor twice differentiated. "
            + {"torch.while_loop": _WHILE_LOOP_WAY, "torch.cond": _COND_WAY}.get(op, _SCAN_WAY)
        )
    if exc is not None and _flex_attention(exc):
        return (
            "f calls torch.nn.attention.flex_attention: on CPU PyTorch has no backward of it, "
            "and torchdiv's recorders (method='structured', 'taylor') have no rule for its "
            "higher-order op. Write the attention as "
            "torch.nn.functional.scaled_dot_product_attention (a block mask as a boolean "
            "attn_mask, a score_mod as an additive float attn_mask), which torchdiv runs on "
            "its math backend (softmax and matrix products: every method differentiates it)."
        )
    reentrant = None if exc is None else _checkpointed(exc)
    if reentrant is not None and peek_interpreter_stack() is not None:
        return (
            "f uses torch.utils.checkpoint under a torch.func transform around the call (an "
            "ensemble's vmap over stacked parameters): torch.func's products cannot run a "
            "checkpoint (either use_reentrant), and plain autograd, which can, does not run "
            "under the caller's transform. Take the checkpoint out of f, or make the call "
            "outside the transform, in a loop over the members with a module of each "
            "(copy.deepcopy, load_state_dict): not with functional_call, whose parameters the "
            "checkpoint's recomputation in the backward pass no longer sees."
        )
    if reentrant:
        return (
            "f uses torch.utils.checkpoint(use_reentrant=True), whose backward runs only under "
            ".backward(): torch.autograd.grad and torch.func transforms, which every torchdiv "
            "method takes, cannot differentiate it. Pass use_reentrant=False to "
            "torch.utils.checkpoint; method='auto' then differentiates f."
        )
    if reentrant is False:
        return (
            "f uses torch.utils.checkpoint(use_reentrant=False): torch.func's transforms (the "
            "methods 'forward', 'reverse', 'forward-over-reverse', 'hessian') cannot run its "
            "saved-tensor hooks, or, in forward mode, its recomputation. Use method='auto', "
            "which differentiates f with plain autograd there."
        )
    return None


def _transform_hint(
    fn: str, message: str, x: torch.Tensor, exc: BaseException | None, method: object
) -> str | None:
    """``_hint`` for what ``torch.func``'s transforms and dispatch modes refuse in ``f``:
    random draws under vmap, an ``autograd.Function`` without ``setup_context``, a tensor
    subclass made under a mode, an op without a forward-mode rule, saved-tensor hooks set
    inside ``f`` (``save_on_cpu`` around a block; around the call: ``_hooks_refused``)."""
    if _HOOKS_REFUSED in message:
        ways = _WITHOUT_VJP.get(fn.rpartition(".")[2], "'auto', 'taylor' or 'grad-of-grad'")
        return (
            "f sets saved-tensor hooks (torch.autograd.graph.save_on_cpu, saved_tensors_hooks) "
            f"around part of its forward, which torch.func's reverse-mode products (method="
            f"{method!r}) refuse; use method={ways}, which run them"
        )
    if "random operation" in message and "vmap" in message:
        way = _RANDOM_WAYS.get(fn.rpartition(".")[2], "method='reverse'")
        return (
            f"f draws random numbers (a train-mode dropout?); forward mode (also as a fallback "
            f"of 'auto', and the Hessian-vector products of 'forward-over-reverse') batches "
            f"its directions with vmap, which draws them on {x.device.type} other than an "
            f"evaluation of f does, so it refuses them there. Use {way}, which differentiate "
            f"f with the draws of one evaluation, chunk_size=1 (one direction at a time, no "
            f"vmap), or model.eval() for the deterministic model."
        )
    if "setup_context staticmethod" in message and exc is not None and _backward_hooked(exc):
        return (
            "a module f calls has a full backward hook (register_full_backward_hook or "
            "register_full_backward_pre_hook, also one registered for every module: a K-FAC "
            "optimiser's capture of output gradients), which PyTorch runs as an "
            "autograd.Function without setup_context: torch.func's transforms and the "
            "recording engines cannot run it. Remove the hook around the call (handle.remove(), "
            "then register it again) and capture its statistics in a plain forward and "
            f"backward pass of your own, or use {_plain_way(fn, method)}: its backward passes "
            "run the hook, which then sees torchdiv's inner gradients, not your loss's."
        )
    op = None if exc is None else _custom_op(exc)
    if "setup_context staticmethod" in message and op is not None and underived(op):
        return underived_refusal(op) + "."
    if "setup_context staticmethod" in message and op is not None:
        return (
            f"f calls the custom op {op}, whose derivative (torch.library.register_autograd) "
            "PyTorch runs as an autograd.Function that torch.func's transforms (the methods "
            "'reverse', 'forward-over-reverse', 'hessian') refuse; use "
            f"{_plain_way(fn, method)}, which runs it by plain autograd."
        )
    if "setup_context staticmethod" in message:  # torch.func refused an autograd.Function
        return (
            "f runs an autograd.Function without setup_context (also a torch.library custom "
            "op with register_autograd), which torch.func's transforms cannot run; use "
            f"{_plain_way(fn, method)} (plain autograd runs it)."
        )
    if message.startswith("Creating a new Tensor subclass"):  # refused under a dispatch mode
        return (
            "f builds a torch.Tensor subclass from an op's result (PINA's LabelTensor in "
            "x.extract), which PyTorch refuses under a TorchDispatchMode; this call evaluates f "
            "under one (value_grad_laplacian: to keep f's buffer updates and random draws to one "
            "evaluation). torchdiv.laplacian and torchdiv.jacobian run such an f (the parts of "
            "value_grad_laplacian, separately); or read the columns by position on "
            "x.as_subclass(torch.Tensor)."
        )
    if "Trying to use forward AD with" in message:  # an op without a forward-mode rule
        return _forward_ad_hint(fn, message)
    if message.startswith("vmap: we do not yet support"):  # an op without a batching rule
        op = message.partition("support ")[2].partition(".")[0]
        way = _BACKWARD_WAYS.get(fn.rpartition(".")[2], "method='auto' or 'reverse'")
        return (  # (nn.RReLU's rrelu_with_noise, in eval mode too: nnsweep33)
            f"torch.func's vmap has no batching rule for {op}, and method={method!r} batches "
            f"its directions with vmap; use {way}."
        )
    if "version_counter for inference tensor" in message:  # a view of one, under torch.func
        return (
            "f makes a view (a reshape, slice, expand) of a tensor computed under "
            "torch.inference_mode(), which torch.func's transforms cannot do; compute that "
            "block under torch.no_grad() instead (the same constant). "
            f"Plain autograd ({_plain_way(fn, method)}) runs it only where no op of f saves "
            "it for a backward pass (a product with it; PyTorch: 'Inference tensors cannot be "
            "saved for backward')."
        )
    if "inside vmap is only supported" in message:  # clone(memory_format=channels_last)
        return (
            f"torch.func's vmap, which batches the directions of method={method!r}, cannot run "
            f"an op in f as it is called there; use chunk_size=1 (one direction at a time, no "
            f"vmap) or {_plain_way(fn, method)}."
        )
    return None


def _plain_autograd_hint(fn: str, message: str, call: str, method: object) -> str | None:
    """``_hint`` for what plain autograd runs and ``torch.func``'s wrappers do not: an op
    reading memory directly, a sparse CSR product, a backward pass or ``requires_grad_``
    inside ``f``."""
    if "doesn't have storage" in message:  # an op reading memory under torch.func's wrappers
        return (
            "an op of f reads its input's memory directly (a packed sequence's "
            "pack_padded_sequence, a C++ extension), which torch.func's transforms (the "
            f"methods 'forward', 'reverse', 'forward-over-reverse', 'hessian') cannot run; use "
            f"{_plain_way(fn, method)}, which differentiates f with plain autograd there."
        )
    if "Sparse CSR tensors do not have strides" in message:  # torch.func's wrappers
        return (
            "f multiplies by a sparse CSR matrix (torch.sparse.mm(adj, h), adj @ h with "
            "adj.to_sparse_csr()), which torch.func's transforms (the methods 'forward', "
            "'reverse', 'forward-over-reverse', 'hessian') cannot run; use "
            f"{_plain_way(fn, method)}, which differentiates f with plain autograd, or a COO "
            "matrix (adj.to_sparse_coo()), which 'reverse' runs."
        )
    if "does not require grad" in message and call == "f(x)":  # autograd.grad inside f
        return _backward_inside_hint(fn, method)
    if "requires_grad_()" in message and "functorch transform" in message:
        way = _plain_way(fn).replace("'auto' or ", "")
        return (
            "f calls requires_grad_() (or torch.autograd.functional) inside the torch.func "
            "transforms this method evaluates it under, which refuse that; "
            f"{way} differentiates f with plain autograd. A score model that writes x = x if "
            "x.requires_grad else x.requires_grad_(True) runs under 'reverse' too (but not "
            "'forward', which cannot run a backward pass inside f)."
        )
    return None


def _dtype_hint(message: str, f: Any, x: torch.Tensor) -> str | None:
    """``_hint`` for a dtype mismatch: which of ``f``'s parameters and ``x`` differ."""
    if "dtype" in message or "scalar type" in message:
        params = [p for m in _modules(f) for p in m.parameters()]
        other = [p.dtype for p in params if p.is_floating_point() and p.dtype != x.dtype]
        if params and all(p.dtype == x.dtype for p in params):  # (no parameter is the mismatch)
            return (
                f"f's parameters and x are {x.dtype}: f makes a tensor of another dtype "
                "(torch.eye, zeros, tensor or arange without dtype= take the default dtype, "
                f"{torch.get_default_dtype()}); give it dtype=x.dtype."
            )
        # (a complex parameter of x's precision may be the mismatch: named by none)
        what = f"f's parameters are {other[0]}" if other else "f computes in another dtype"
        return (
            f"{what} but x is {x.dtype}: convert one to the other, e.g. model.to(x.dtype) or "
            f"x.to({other[0] if other else 'the model dtype'})."
        )
    return None


def _call_hint(message: str, call: str) -> str | None:
    """``_hint`` for the way torchdiv calls ``f`` (``call``): ``f(x)``, or ``f(t, z)`` with a
    0-dim ``t``."""
    if "positional argument" in message and call == "f(x)":
        return (
            "torchdiv calls f(x) with the batch alone; for a function of (t, x) pass "
            "lambda x: f(t, x) (torchdiv.flows calls f(t, z))."
        )
    if "positional argument" in message:
        return f"torchdiv.flows calls {call} with t a 0-dim tensor and z the batched state."
    zero_dim = ("0-dim", "dimension 0", "zero-dimensional")  # t[:, None]; torch.cat([z, t])
    if call != "f(x)" and any(words in message for words in zero_dim):
        return (
            "t is a 0-dim tensor, one time for the whole batch: broadcast it per sample, e.g. "
            "t.expand(z.shape[0])[:, None] or t * torch.ones_like(z[:, :1])."
        )
    return None


def _backward_inside_hint(fn: str, method: object) -> str:
    """The way out for a backward pass ``f`` takes inside (``torch.autograd.grad``) whose
    input does not require grad under the transforms of ``method``: with respect to ``x``
    (a score model), or to tensors ``f`` closes over (a MAML inner step on parameters, which
    no ``torch.func`` transform runs: only plain autograd). Only ``method='forward'`` is
    told of the methods a score runs under (another method's functions have none)."""
    forward = (
        "; method='forward' cannot run a backward pass inside f: use 'auto' or 'reverse'"
        if method == "forward"
        else ""
    )
    return (
        "f takes a backward pass inside (torch.autograd.grad) whose input does not require "
        "grad there. With respect to what f is given (a score torch.autograd.grad(E(x).sum(), "
        "x)): pass x with requires_grad=True, or let f make it so (with torch.enable_grad(): "
        f"x = x if x.requires_grad else x.requires_grad_(True)){forward}. With respect to "
        "tensors f closes over "
        "(parameters: a MAML inner step, torch.autograd.grad(loss, params)): torch.func's "
        "transforms (the methods 'forward', 'reverse', 'forward-over-reverse', 'hessian') "
        f"cannot run it; use {_plain_way(fn, method)}, which differentiates f with plain "
        "autograd (an inner loss over the batch x itself mixes samples, which 'auto' refuses)."
    )


def _forward_ad_hint(fn: str, message: str) -> str:
    """The way out where PyTorch has no forward-mode rule for an op of ``f`` (its error
    ``message`` names it): the methods of plain backward passes; for ``nn.LSTM`` in float32 on
    the CPU (oneDNN's ``mkldnn_rnn_layer``) also oneDNN turned off around the call
    (``torch.backends.mkldnn.flags`` warns about TF32 in PyTorch 2.13), which runs its steps
    as ATen ops with forward-mode rules (every method then runs it)."""
    op = message.partition("forward AD with ")[2].partition(" ")[0]
    name = fn.rpartition(".")[2]
    # (packed sequences' op reads its input's memory: torch.func's reverse mode cannot run it)
    default = "method='auto'" if op == "_pack_padded_sequence" else "method='auto' or 'reverse'"
    way = _BACKWARD_WAYS.get(name, default)
    hint = f"PyTorch has no forward-mode derivative for {op}" + (f"; use {way}" if way else "")
    if op == "mkldnn_rnn_layer":
        hint += (
            f"{', or' if way else ';'} set torch.backends.mkldnn.enabled = False around the "
            "call: nn.LSTM in float32 on the CPU runs oneDNN's kernel, which has none, and "
            "without oneDNN runs its steps as ATen ops, which have"
        )
    return hint + "."


# the methods that differentiate an op without a forward-mode rule, by public function
_LOOPING = "method='auto' or 'grad-of-grad' (exact; 'auto' loops over backward passes for it)"
# ``biharmonic`` has none: every one of its methods nests forward mode where Taylor fails,
# but the Laplacian of the Laplacian by backward passes is right
NESTED_LOOP = (
    "laplacian(lambda z: laplacian(f, z, method='grad-of-grad'), x, method='grad-of-grad') "
    "(every method of biharmonic nests forward mode)"
)
_BACKWARD_WAYS = {
    "laplacian": _LOOPING,
    "weighted_laplacian": _LOOPING,
    "value_grad_laplacian": "method='auto' (it loops over backward passes for it)",
    "biharmonic": NESTED_LOOP,
}
# ... and that differentiate f by plain autograd (no torch.func transform), by public function
_PLAIN_WAYS = {
    "laplacian": "method='auto' or 'grad-of-grad'",
    "weighted_laplacian": "method='auto' or 'grad-of-grad'",
    "value_grad_laplacian": (
        "method='auto', or laplacian(f, x, method='auto' or 'grad-of-grad') for the Laplacian"
    ),
    "biharmonic": NESTED_LOOP,
}
# ... where ``"auto"`` itself raised
_PLAIN_WAYS_BEYOND_AUTO = {
    "laplacian": "method='grad-of-grad'",
    "weighted_laplacian": "method='grad-of-grad'",
    "value_grad_laplacian": "laplacian(f, x, method='grad-of-grad') for the Laplacian",
}


def _plain_way(fn: str, method: object = None) -> str:
    """How ``fn`` (a public function's name) differentiates ``f`` by plain autograd; where
    ``method`` was ``"auto"`` and still raised (its loop of backward passes, where forward
    mode cannot run ``f``, raised too), the explicit method alone."""
    name = fn.rpartition(".")[2]
    if method == "auto" and name in _PLAIN_WAYS_BEYOND_AUTO:
        return _PLAIN_WAYS_BEYOND_AUTO[name]
    return _PLAIN_WAYS.get(name, "method='auto'")


# where PyTorch runs a custom op's registered derivative (its frame holds the op as ``op``)
_CUSTOM_OP_AUTOGRAD_FILE = os.path.join(os.path.dirname(torch._library.__file__), "autograd.py")


def _custom_op(exc: BaseException) -> str | None:
    """The qualified name (``"mylib::cube"``) of the ``torch.library`` custom op whose
    registered derivative raised ``exc`` (or an error in its chain), read off the traceback:
    PyTorch's own message names no op."""
    for frame in _frames(exc):
        op = (
            frame.f_locals.get("op")
            if frame.f_code.co_filename == _CUSTOM_OP_AUTOGRAD_FILE
            else None
        )
        if isinstance(op, torch._ops.OpOverload):
            return op._schema.name
    return None


def _backward_hooked(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error in its chain) was raised where a module's call set up its
    full backward hooks (``torch.utils.hooks.BackwardHook``, whose ``autograd.Function``
    ``torch.func`` refuses), read off the traceback."""
    return any(
        frame.f_code.co_filename == _HOOKS_FILE
        and frame.f_code in _class_codes(_hooks.BackwardHook)
        for frame in _frames(exc)
    )


@functools.cache
def _class_codes(cls: type) -> frozenset[CodeType]:
    """The code objects of the class ``cls``'s own functions (its methods, static and class
    methods, properties' getters) and of those defined in them: the frames whose qualified name
    is within ``cls``. (``code.co_qualname`` tells that from Python 3.11 on; 3.10 has none: the
    hints of ``_checkpointed`` and ``_backward_hooked`` raised ``AttributeError`` there,
    pyvers31.)"""
    todo = [
        v.__code__
        for value in vars(cls).values()
        if isinstance(v := getattr(value, "fget", getattr(value, "__func__", value)), FunctionType)
    ]
    found: set[CodeType] = set()
    while todo:
        code = todo.pop()
        found.add(code)
        todo += [c for c in code.co_consts if isinstance(c, CodeType)]
    return frozenset(found)


_HOOKS_FILE = _hooks.__file__


def _expanded_weights(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error in its chain) was raised inside an ExpandedWeights layer
    (``torch.nn.utils._expanded_weights``), read off the traceback."""
    return any("_expanded_weights" in frame.f_code.co_filename for frame in _frames(exc))


def _modules(f: Any) -> list[torch.nn.Module]:
    """``f`` if it is a module, else the modules its closure holds (``lambda x: net(x)``)."""
    if isinstance(f, torch.nn.Module):
        return [f]
    cells = attribute(f, "__closure__") or ()
    return [c.cell_contents for c in cells if isinstance(c.cell_contents, torch.nn.Module)]
