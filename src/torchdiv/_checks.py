"""Argument checks shared by every public function.

Each check raises a ``TypeError`` or ``ValueError`` whose message starts with the public
function's name (``"divergence: ..."``), names the offending argument, says what was expected
and what arrived (values and shapes), and, where one helps, gives a hint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def event_numel(t: torch.Tensor, batch_dims: int) -> int:
    """Number of elements in one sample of ``t``."""
    return math.prod(t.shape[batch_dims:])


def check_callable(fn: str, f: Any) -> None:
    if not callable(f):
        raise TypeError(
            f"{fn}: f must be callable (a function or nn.Module), got {type(f).__name__}"
        )


def check_input(fn: str, x: Any, batch_dims: Any) -> None:
    """Check that ``x`` is a floating tensor with at least ``batch_dims`` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{fn}: x must have a floating dtype (float16/bfloat16/float32/float64), "
            f"got {x.dtype}; convert it first, e.g. x.float()"
        )
    if isinstance(batch_dims, bool) or not isinstance(batch_dims, int):
        raise TypeError(f"{fn}: batch_dims must be an int, got {type(batch_dims).__name__}")
    if not 0 <= batch_dims <= x.dim():
        raise ValueError(
            f"{fn}: batch_dims must be in [0, x.dim()] = [0, {x.dim()}] for x of shape "
            f"{_shape(x)}, got {batch_dims}"
        )


def check_chunk_size(fn: str, chunk_size: Any) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"{fn}: chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be at least 1 (or None for all), got {chunk_size}")


def check_flag(fn: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be True or False, got {value!r}")


def check_generator(fn: str, generator: Any) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{fn}: generator must be a torch.Generator or None, got {type(generator).__name__}"
        )


def check_method(fn: str, method: Any, valid: Sequence[str]) -> None:
    if method not in valid:
        choices = ", ".join(repr(m) for m in valid)
        raise ValueError(f"{fn}: unknown method {method!r}; valid methods are {choices}")


def check_exact_options(fn: str, method: str, num_probes: Any, generator: Any) -> None:
    """Exact methods take no probes: reject ``num_probes`` instead of ignoring it."""
    check_generator(fn, generator)
    if num_probes is not None:
        raise ValueError(
            f"{fn}: num_probes is only used by stochastic methods; method={method!r} is exact, "
            f"got num_probes={num_probes}"
        )


def check_output(fn: str, y: Any, x: torch.Tensor, batch_dims: int, name: str = "f(x)") -> None:
    """Check that ``y`` is a floating tensor with the batch shape of ``x``."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(y).__name__}")
    if not y.is_floating_point():
        raise TypeError(
            f"{fn}: {name} must be a floating tensor to be differentiated, got {y.dtype}"
        )
    if y.shape[:batch_dims] != x.shape[:batch_dims]:
        raise ValueError(
            f"{fn}: {name} changed the batch shape: {name} has shape {_shape(y)} and x has shape "
            f"{_shape(x)}, so their first batch_dims={batch_dims} dimensions "
            f"{_shape(y)[:batch_dims]} != {_shape(x)[:batch_dims]}. Samples must map to samples; "
            f"check batch_dims"
        )


def check_square(fn: str, y: torch.Tensor, x: torch.Tensor, batch_dims: int, name: str) -> None:
    """Check that each sample's Jacobian is square (same event numel in and out)."""
    if event_numel(y, batch_dims) != event_numel(x, batch_dims):
        raise ValueError(
            f"{fn}: needs a square Jacobian, but the event of {name} "
            f"(shape {_shape(y)[batch_dims:]}) and the event of x "
            f"(shape {_shape(x)[batch_dims:]}) differ in size; full shapes "
            f"{_shape(y)} and {_shape(x)} with batch_dims={batch_dims}. Use jacobian() for "
            "non-square maps"
        )


def checked(
    fn: str, f: Callable[[torch.Tensor], Any], x: torch.Tensor, batch_dims: int, square: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap ``f`` so that its output is checked wherever it is evaluated (inside transforms too)."""

    def g(z: torch.Tensor) -> torch.Tensor:
        y = f(z)
        check_output(fn, y, x, batch_dims)
        if square:
            check_square(fn, y, x, batch_dims, "f(x)")
        return y

    return g
