"""Modes the function-form API runs under: outside inference mode, compiled code run eagerly,
math attention, layer norm as primitives for third derivatives, and host-side planning."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes

F = TypeVar("F", bound=Callable[..., Any])


def outside_inference_mode(fn: F) -> F:
    """Decorate ``fn(f, x, ...)`` so that it works when called under ``torch.inference_mode()``
    and leaves the caller's compiled code compiled (``CompiledCodeEager``).

    Derivatives need autograd, which inference mode switches off (silently: ``enable_grad``
    does not undo it). The wrapper leaves inference mode for the call, keeps the caller's grad
    mode, and clones an inference-tensor ``x`` into a normal one; the caller's ``x`` is not
    touched.
    """

    @functools.wraps(fn)
    def wrapper(f: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # Dynamo traces the call: no mode checks to break on
            return fn(f, x, *args, **kwargs)
        with CompiledCodeEager():
            inference_x = isinstance(x, torch.Tensor) and x.is_inference()
            if not torch.is_inference_mode_enabled() and not inference_x:
                return fn(f, x, *args, **kwargs)  # the usual case
            grad_mode = torch.is_grad_enabled()
            with torch.inference_mode(False), torch.set_grad_enabled(grad_mode):
                if inference_x:
                    x = x.clone()
                return fn(f, x, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class CompiledCodeEager(contextlib.ContextDecorator):
    """Run ``torch.compile``d code that ``f`` calls eagerly for the duration of the block
    (or of every call of a function decorated with ``@CompiledCodeEager()``).

    torchdiv evaluates ``f`` under ``torch.func`` transforms and dispatch modes, where Dynamo
    cannot compile; a compiled model called there is not only run eagerly: Dynamo marks its
    code objects "skip", so that every later call of the model, outside torchdiv too, runs
    eagerly (measured: 0 compiled-graph executions after one ``divergence`` call). Dynamo's
    "force_eager" stance runs compiled code eagerly without marking anything. Nothing is done
    when Dynamo was never imported (no compiled code exists) or inside a compiled region
    (Dynamo is tracing torchdiv itself).
    """

    def _recreate_cm(self) -> CompiledCodeEager:  # a decorated function: one per call
        return type(self)()

    def __enter__(self) -> None:
        self.prior = None
        frames = sys.modules.get("torch._dynamo.eval_frame")
        if frames is None or not hasattr(frames, "_set_stance"):  # no Dynamo, or torch < 2.6
            return
        if torch.compiler.is_compiling():  # Dynamo traces the call: nothing to protect
            return
        from torch._C._dynamo.eval_frame import get_eval_frame_callback

        if get_eval_frame_callback() in (None, False):
            self.prior = frames._set_stance(frames.DynamoStance("force_eager"))

    def __exit__(self, *exc: object) -> None:
        if self.prior is not None:
            sys.modules["torch._dynamo.eval_frame"]._set_stance(self.prior)


def math_attention() -> contextlib.AbstractContextManager[None]:
    """Run ``scaled_dot_product_attention`` on PyTorch's math backend: its primitives have
    forward-mode and second-order derivatives (and Taylor rules); the fused CPU kernel has
    neither."""
    return sdpa_kernel([SDPBackend.MATH])


class LayerNormAsPrimitives(TorchFunctionMode):
    """Compute ``layer_norm`` from means, a square root and products inside the mode.

    PyTorch's fused ``native_layer_norm`` has exact first and second derivatives, but its
    third derivative is wrong (its backward treats the saved mean and inverse standard
    deviation as constants; pytorch/pytorch#175754). The gradient of a Laplacian computed by
    nested autodiff is a third derivative, so those methods run ``f`` under this mode.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is torch.nn.functional.layer_norm or func is torch.layer_norm:
            return _layer_norm(*args, **kwargs)
        return func(*args, **kwargs)


def _layer_norm(
    a: torch.Tensor,
    normalized_shape: Any,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *_: Any,
) -> torch.Tensor:
    dims = tuple(range(-len(normalized_shape), 0))
    centred = a - a.mean(dims, keepdim=True)
    out = centred * torch.rsqrt(centred.square().mean(dims, keepdim=True) + eps)
    out = out if weight is None else out * weight
    return out if bias is None else out + bias


@contextlib.contextmanager
def host_planning() -> Any:
    """Bookkeeping of a plan on small CPU index tensors (index maps, colours), which reads
    their values but never waits for the device: hidden from the caller's dispatch modes, so
    that a counter of host synchronisations sees only work on the data."""
    with _disable_current_modes():
        yield


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A plan's CPU tensor on ``device`` without making the host wait: to a GPU, copied
    asynchronously from pinned memory (a copy from ordinary memory synchronises)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
