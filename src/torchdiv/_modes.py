"""Modes the function-form API runs under: outside inference mode, math attention."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

F = TypeVar("F", bound=Callable[..., Any])


def outside_inference_mode(fn: F) -> F:
    """Decorate ``fn(f, x, ...)`` so that it works when called under ``torch.inference_mode()``.

    Derivatives need autograd, which inference mode switches off (silently: ``enable_grad``
    does not undo it). The wrapper leaves inference mode for the call, keeps the caller's grad
    mode, and clones an inference-tensor ``x`` into a normal one; the caller's ``x`` is not
    touched.
    """

    @functools.wraps(fn)
    def wrapper(f: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        grad_mode = torch.is_grad_enabled()
        with torch.inference_mode(False), torch.set_grad_enabled(grad_mode):
            if isinstance(x, torch.Tensor) and x.is_inference():
                x = x.clone()
            return fn(f, x, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def math_attention() -> contextlib.AbstractContextManager[None]:
    """Run ``scaled_dot_product_attention`` on PyTorch's math backend: its primitives have
    forward-mode and second-order derivatives (and Taylor rules); the fused CPU kernel has
    neither."""
    return sdpa_kernel([SDPBackend.MATH])
