"""Forward-mode engine: Jacobian columns of every sample by batched JVPs (see NOTE in _basis)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.utils.checkpoint as _checkpoint
from torch._C._autograd import _top_saved_tensors_default_hooks
from torch._C._dynamo.eval_frame import _FrameAction, _FrameExecStrategy, set_code_exec_strategy
from torch._C._functorch import (
    TransformType,
    is_batchedtensor,
    maybe_current_level,
    maybe_get_level,
    peek_interpreter_stack,
)
from torch._functorch import eager_transforms as _eager_transforms
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.autograd.forward_ad import _set_fwd_grad_enabled, unpack_dual
from torch.func import jvp

from torchdiv._core.basis import as_blocks, basis, batched
from torchdiv._core.checks import event_numel
from torchdiv._core.modes import (
    _OPS,
    _TRUSTED,
    SafeDerivatives,
    _namespace,
    _op_name,
    math_attention,
    read_requires_grad_false,
    reader_module,
    underived,
    underived_refusal,
)
from torchdiv._core.tie import detached
from torchdiv._exact.attributes import transforming
from torchdiv._taylor.tree import leaves

Products = Callable[[torch.Tensor], torch.Tensor]  # tangents -> JVPs

_BACKWARD_HOOKS = "torch.utils.hooks"  # (where a module's full backward hooks read the flag)
# held around every ``torch.func.jvp``: its nesting count (``JVP_NESTING``) and forward AD's
# dual levels are the process's, not a thread's, so two threads pushing tangents at once left
# the second without a level ("no level exists", a thread that exits a level also drops the
# other's tangents); re-entrant, for a torchdiv call inside ``f``. A process forked while
# another thread held it gets a new one (that thread does not exist there: its first forward
# mode call hung)
_FORWARD_AD = threading.RLock()


def _new_lock_after_fork() -> None:
    global _FORWARD_AD
    _FORWARD_AD = threading.RLock()


if hasattr(os, "register_at_fork"):  # (POSIX)
    os.register_at_fork(after_in_child=_new_lock_after_fork)


# what forward mode's refusals name by default: reverse mode, which runs what forward mode cannot
REVERSE_WAY_OUT = "method='reverse'"


class NoForwardRule(NotImplementedError):
    """An op in ``f`` that forward mode would differentiate silently wrong: a custom op (one
    outside ``aten``/``prims``, ``torch.library.custom_op`` with only ``register_autograd``)
    whose result has no tangent though an input has one (``torch.func.jvp`` takes it for a
    constant), or ``Tensor.detach_`` under forward over reverse (it detaches the inner,
    reverse level only: the Laplacian went through the detached value, 229 off on a value of
    about 10). The public function names itself in front."""


class NestedForwardMode(NotImplementedError):
    """Forward mode inside the caller's ``torch.autograd.forward_ad.dual_level()`` (dual
    parameters, ``torch.autograd.functional.jacobian(..., strategy="forward-mode")``): a
    ``torch.func.jvp`` outside any other opens a dual level of its own, and PyTorch allows one
    ("Nested forward mode AD is not supported at the moment", naming neither the call nor a
    way out). ``"auto"`` takes it as an engine that cannot run ``f`` and moves on to backward
    passes; the public function names itself in front (``_torchdiv_context``)."""


def _nested_forward_mode() -> NestedForwardMode:
    error = NestedForwardMode(
        "torchdiv: forward-mode products (torch.func.jvp) cannot run inside the caller's "
        "torch.autograd.forward_ad.dual_level() (PyTorch allows one level); take the JVP "
        "of the call with torch.func.jvp instead of dual tensors (every method), or use a "
        "method of backward passes only: 'auto' or 'reverse' for divergences and Jacobians, "
        "'auto' or 'grad-of-grad' for laplacian and weighted_laplacian"
    )
    error._torchdiv_context = True  # type: ignore[attr-defined]
    return error


def holds_dual_level() -> bool:
    """Whether the caller holds a ``torch.autograd.forward_ad`` level that a ``torch.func.jvp``
    would have to nest in (not the level of a ``torch.func.jvp`` around the call, inside which
    another ``jvp`` opens none)."""
    return _forward_ad._current_level >= 0 and _eager_transforms.JVP_NESTING == 0


class Tangents(SafeDerivatives):
    """``SafeDerivatives`` for an engine that pushes tangents through ``f`` (forward mode,
    forward over reverse), keeping the convention of reverse mode and of the Taylor engine:

    - an op ``f`` runs under ``torch.no_grad()`` is a constant (a stop-gradient statistic);
      PyTorch's forward AD ignores grad mode, so such an op runs with forward AD off (a
      custom ``autograd.Function``'s ``forward``, which runs with both off, and its ``jvp``,
      are left as they are);
    - a custom op whose result has no tangent though an input has one is refused
      (``NoForwardRule``, naming ``way_out``) rather than taken for a constant;
    - ``f`` reading ``requires_grad`` of a tensor with a tangent reads ``True``, as under
      plain autograd (``False`` here: ``f`` may branch on it, ``_requires_grad_read``);
    - ``graph=False`` (the caller's ``torch.no_grad()``): the engine evaluates ``f`` with grad
      on, so that ``f``'s own ``no_grad`` blocks show, and runs each of its other ops under
      ``no_grad``: no graph is built, as the caller asked; not the ops inside a
      backward-pass ``torch.func`` transform ``f`` opens itself (a Hamiltonian field
      ``vmap(grad(H))(x) @ J.T``, ``jacrev``, ``hessian``: ``_differentiated_below``; a plain
      ``vmap`` or ``jacfwd`` keeps ``no_grad``), whose gradients need grad mode:
      under ``no_grad`` they took them for constants, and ``method="forward"`` gave a
      Jacobian, diagonal and divergence of 0 there (the graph those ops build at the
      caller's level is dropped with the engine's results: ``ForwardJacobian._push``);
    - ``torch.utils.checkpoint(use_reentrant=False)`` in ``f`` is refused: its hooks save what
      forward mode computes, and the gradient of a product then recomputes the checkpointed
      part without the tangents, which PyTorch refuses in the caller's backward pass
      (``CheckpointError``: 10 tensors saved, 4 recomputed, for a two-layer MLP). Refused at
      the call instead, by one look at the saved-tensor hooks per op (~0.1 us); ``"auto"``
      takes it as an engine that cannot run ``f`` and moves on (``torchdiv._api.reporting``
      names the way out). Not in a compiled region, where Dynamo cannot trace the look.

    Costs a grad-mode read per op (and, under the caller's ``no_grad``, a grad-mode switch).
    """

    def __init__(self, order: int, way_out: str, graph: bool = True):
        super().__init__(order, way_out)
        self.graph = graph
        self.looks = not torch.compiler.is_compiling()
        # the transform level the engine evaluates f at; f's own transforms open deeper ones
        # (not read where Dynamo traces, where grad mode was then on after a no_grad call:
        # there every op keeps grad mode, and the results are detached)
        self.level = maybe_current_level() if self.looks else None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        hooks = _top_saved_tensors_default_hooks(True) if self.looks else None
        if hooks is not None and getattr(hooks[0], "__module__", None) == _checkpoint.__name__:
            raise RuntimeError(
                "forward mode cannot differentiate through torch.utils.checkpoint with "
                "use_reentrant=False: the gradient of its products would recompute the "
                "checkpointed part without the tangents"
            )
        if func is torch.Tensor.detach_ and self.order > 2 and torch.is_grad_enabled():
            raise NoForwardRule(
                "Tensor.detach_ in f (a detach in place) is not followed by forward over "
                f"reverse; write .detach(), or use {self.way_out}"
            )
        if not torch.is_grad_enabled():
            if not torch._C._is_fwd_grad_enabled():  # a custom Function's forward
                return super().__torch_function__(func, types, args, kwargs)
            with _set_fwd_grad_enabled(False):  # f's own no_grad block
                return super().__torch_function__(func, types, args, kwargs)
        if (
            not self.graph
            and func is not torch._C._set_grad_enabled  # (f's no_grad itself)
            and self.level is not None
            and not _differentiated_below(self.level)  # (not inside f's own grad/vjp/jacrev)
        ):
            torch._C._set_grad_enabled(False)
            try:
                out = super().__torch_function__(func, types, args, kwargs)
            finally:
                torch._C._set_grad_enabled(True)
        else:
            out = super().__torch_function__(func, types, args, kwargs)
        if isinstance(func, _OPS) and _namespace(func) not in _TRUSTED:
            self._check_tangents(func, (args, kwargs), out)
        if (
            self.looks
            and read_requires_grad_false(func, out)
            and not self._batched_in_f(args[0])
            and _has_tangent(args[0])
        ):
            return self._requires_grad_read()
        return out

    def _batched_in_f(self, t: Any) -> bool:
        """Whether ``t`` is a tensor of a ``torch.vmap`` that ``f`` runs (a batching level
        deeper than the engine's ``jvp``): plain autograd reads its ``requires_grad`` as
        ``False`` (vmap's batched tensors do not carry the flag), so forward mode leaves it
        so (``unpack_dual`` has no batching rule there either)."""
        return (
            self.level is not None
            and isinstance(t, torch.Tensor)
            and is_batchedtensor(t)
            and maybe_get_level(t) > self.level
        )

    def _requires_grad_read(self) -> bool:
        """``requires_grad`` of a tensor with a tangent (``False`` here) as plain autograd reads
        it where ``x`` requires grad, ``True``, so that ``f`` takes the branch the engines of
        backward passes take (``if z.requires_grad:`` gating a gradient hook, which
        ``refuse_gradient_hook`` then refuses, or extra work), as ``method="auto"`` runs it.
        Left ``False`` where torchdiv's own code inside ``f`` reads it; a module's full
        backward hook (``torch.utils.hooks`` reads the flag of the module's inputs) is
        refused: backward passes run it, forward mode never does, and a hook that returns no
        gradients cannot be told from one that changes them (forward mode gave half of plain
        autograd's divergence for a hook doubling ``grad_input``)."""
        reader = reader_module()
        if reader.startswith("torchdiv."):
            return False
        if reader == _BACKWARD_HOOKS:
            raise NoForwardRule(
                "f calls a module with a full backward hook (register_full_backward_hook or "
                "register_full_backward_pre_hook): backward passes run it, forward mode "
                "never does, so a hook that changes gradients would be left out; register it "
                "outside the call (or remove it around the call), or use method='auto', which "
                "runs it as plain autograd does"
            )
        return True

    def _check_tangents(self, func: Any, inputs: Any, out: Any) -> None:
        """Refuse a custom op whose floating results have no tangent though an input has."""
        if any(_has_tangent(t) for t in leaves(out)) or not any(map(_has_tangent, leaves(inputs))):
            return
        if not any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in leaves(out)):
            return
        name = _op_name(func)
        if underived(func):  # (no method is a way out)
            raise NoForwardRule(underived_refusal(name))
        # a registered derivative (register_autograd) runs under plain autograd alone:
        # torch.func's reverse mode refuses it too, so 'reverse' is no way out here
        way = "method='auto'" if self.way_out == REVERSE_WAY_OUT else self.way_out
        raise NoForwardRule(
            f"the custom op {name} in f has no forward-mode derivative "
            f"(torch.func.jvp would take it for a constant); use {way}, which "
            "differentiates it by plain autograd's backward passes"
        )


# Dynamo runs the mode's frames eagerly where it would compile them on their own (after a graph
# break), and still inlines them into the frames it traces: a frame compiled on its own was kept
# for tensor arguments of the same dtype, shape and dispatch keys, with or without a tangent
# (no guard on it, torch 2.13 to 2.15), so the check compiled for a custom op of a constant (no
# input tangent) passed the same op of x (products of 0), and one compiled for a refused op
# refused an op with a forward rule (tests/exact/test_merges26c.py)
set_code_exec_strategy(
    Tangents.__torch_function__.__code__, _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.SKIP)
)


def _differentiated_below(level: int) -> bool:
    """Whether a backward-pass transform (``grad``, ``vjp``, ``jacrev``, ``hessian``) deeper
    than ``level`` is open: its gradients need grad mode. Not a plain ``vmap`` or ``jvp``
    (``jacfwd``), whose derivatives grad mode does not touch: under the caller's ``no_grad``
    their ops keep running without a graph (``f = vmap(mlp)`` kept grad mode on: a graph to
    the parameters for the length of the call, peak memory 392 MB instead of 202 MB for
    ``divergence`` of a 64-1024-1024-1024-64 MLP at B = 256)."""
    return any(
        i.key() == TransformType.Grad and i.level() > level
        for i in retrieve_all_functorch_interpreters()
    )


def _has_tangent(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and unpack_dual(t).tangent is not None


def under_tangents(
    f: Callable[[torch.Tensor], torch.Tensor], order: int, way_out: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f`` evaluated under ``Tangents(order, way_out)``, for ``torch.func.jvp`` to push
    tangents through (entered inside the transforms: their own calls are not ``f``'s). Where
    grad mode is off as ``f`` starts (the caller's ``no_grad``; inside ``torch.func.vjp`` it
    is on) ``f`` runs with grad on and every op of it under ``no_grad`` (``Tangents``), so
    that its own ``no_grad`` blocks show and no graph is built. The order counts every
    derivative taken of ``f``: the forward engine's products are first derivatives and
    their parameter gradients second ones (``SafeDerivatives``)."""

    def pushed(z: torch.Tensor) -> torch.Tensor:
        graph = torch.is_grad_enabled()
        with Tangents(order, way_out, graph), nullcontext() if graph else torch.enable_grad():
            return f(z)

    return pushed


class ForwardJacobian:
    """``J @ V`` for the batched ``f`` at ``x``, by ``vmap`` of ``torch.func.jvp`` over tangents.

    ``f`` is evaluated on the caller's batched ``x``; only the tangents carry the extra ``k``
    dimension. Results are differentiable, through ordinary autograd, with respect to ``x``
    and anything ``f`` closes over.
    """

    blocks_are_rows = False

    def __init__(
        self,
        f: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        batch_dims: int,
        again: Callable[[Products], Products] | None = None,
        order: int | None = 2,
        way_out: str = REVERSE_WAY_OUT,
        has_aux: bool = False,
    ):
        # ``has_aux``: f returns ``(output, aux)``, aux a tensor not differentiated here,
        # kept (``aux``) from the evaluation whose tangents the last product took: forward
        # over reverse's value of f, of the draw its derivatives are of (a train-mode
        # transformer layer's dropout draws other masks under torch.func than in a plain
        # call from the same generator state, rev-b33)
        # f pushes tangents under ``Tangents(order)`` naming ``way_out`` (``under_tangents``);
        # ``order=None``: f enters it itself (forward over reverse: around its own f, inside
        # its ``torch.func.vjp``)
        self._pushed = f if order is None else under_tangents(f, order, way_out)
        # jvp cannot make a dual tensor of a primal whose elements share memory (stride 0)
        self.f, self.x, self.batch_dims = f, x.contiguous(), batch_dims
        # each product evaluates f: from the state before the first, outside the transforms
        # (``_state.Once``, ``Changes.again``); None: one product, or f without state
        # (wrapped at each ``apply``: a bound method of its own kept on the engine was a
        # cycle that held ``x``, ``f`` and its output's graph after the call, until Python's
        # cycle collector ran)
        self._again = again
        # a transform of the caller's around the call (its ``torch.func.jvp`` over parameters):
        # results under no_grad keep its tangents (``detached``); else plain ``detach``, as a
        # tangent of the engine's own vmap, kept as it was, came out requiring grad where f
        # opened a ``vmap(jacrev)`` (the full suite after rev-b34's merge)
        self._outer = peek_interpreter_stack() is not None
        self.num_basis = event_numel(x, batch_dims)
        self._y_shape: torch.Size | None = None
        self._y: torch.Tensor | None = None
        self._has_aux = has_aux
        self.aux: torch.Tensor | None = None

    @property
    def y(self) -> torch.Tensor:
        """``f(x)``, as the last product computed it (evaluates ``f`` if none was taken)."""
        if self._y is None:
            self._y = self.f(self.x)
            self._y_shape = self._y.shape
        return self._y

    @property
    def y_shape(self) -> torch.Size:
        """Shape of ``f(x)``; evaluates ``f`` once if no product has been taken yet."""
        if self._y_shape is None:
            with torch.no_grad():
                self._y_shape = self.f(self.x).shape
        return self._y_shape

    def apply(self, tangents: torch.Tensor) -> torch.Tensor:
        """JVPs: ``(k,) + x.shape`` tangents -> ``(k,) + f(x).shape`` products.

        One tangent (a one-probe estimate) skips ``vmap``; attention runs as primitives (the
        fused kernels have no forward mode).
        """
        transforming()  # (f may set module attributes to the transform's tensors)
        products = self._apply if self._again is None else self._again(self._apply)
        with math_attention():
            return products(tangents)

    def _apply(self, tangents: torch.Tensor) -> torch.Tensor:
        """On the CPU ``randomness="same"``: only the tangents are batched, so a random call
        of ``f`` (a train-mode dropout) gets inputs without the ``k`` dimension and draws
        once, as an evaluation of ``f`` outside ``vmap`` does: the same numbers from the same
        generator state, which it leaves where that evaluation would (every ``k``
        differentiates the one function; ``tests/exact/test_state.py``). Not on a GPU: on an
        H200 (torch 2.11) CUDA's fused dropout drew another mask under ``vmap`` than outside
        it (same generator state after), so reverse mode, the loop and a chunk of one
        direction would differentiate another function: vmap's randomness error stays there
        (the hint names what runs). A caller that applies the engine more than once
        evaluates ``f`` from the same state each time (``_state.Once``)."""
        if len(tangents) == 1:
            y, out, *aux = self._push(tangents[0])
            self._y, self._y_shape, self.aux = y, y.shape, aux[0] if aux else None
            return out[None]
        randomness = "same" if self.x.device.type == "cpu" else "error"
        out_dims = (None, 0, None) if self._has_aux else (None, 0)
        y, out, *aux = batched(self._push, tangents, out_dims=out_dims, randomness=randomness)
        self._y, self._y_shape, self.aux = y, y.shape, aux[0] if aux else None
        return out

    def _push(self, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(f(x), J v)``, with ``has_aux`` then f's aux (torch types ``jvp``'s result as a
        2- or 3-tuple). One thread at a time (``_FORWARD_AD``), but in a region Dynamo traces
        (it cannot enter a lock; the compiled graph does not count levels).
        ``NestedForwardMode`` inside the caller's dual level."""
        if not torch.compiler.is_compiling() and holds_dual_level():
            raise _nested_forward_mode()
        with nullcontext() if torch.compiler.is_compiling() else _FORWARD_AD:
            pushed = jvp(self._pushed, (self.x,), (v,), has_aux=self._has_aux)
        out = tuple(pushed)
        if not torch.is_grad_enabled():  # (the graph of a transform f opened: ``Tangents``)
            return tuple(detached(t) if self._outer else t.detach() for t in out)
        return out

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Columns ``start..stop-1`` of every sample's Jacobian, shape ``(k, N, m)``."""
        out = self.apply(basis(start, stop, self.x, self.batch_dims))
        return as_blocks(out, self.batch_dims)
