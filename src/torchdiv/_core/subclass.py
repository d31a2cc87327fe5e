"""Tensors of ``torch.Tensor`` subclasses met at the library's edges.

A subclass's ``__torch_function__`` wraps the result of every op in the subclass by
``as_subclass`` (PyTorch's default), which keeps none of the instance's Python attributes: PINA's
``LabelTensor`` made that way has no labels, and its own ``to``, ``permute``, ``detach``,
``requires_grad_`` and indexing, which read them, raise ``AttributeError``. The library's
bookkeeping therefore runs on plain aliases (``plain_tensor``), and an input it rebuilds from
the caller's ``x`` before ``f`` sees it (a view, a shifted point) gets ``x``'s attributes back
(``attributes_of``), so ``f`` can use them (``x.extract(['x'])``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch._C._functorch import get_unwrapped, is_gradtrackingtensor, maybe_get_level

DEAD_LEVEL = -2  # maybe_get_level of a torch.func wrapper whose transform has ended


def plain_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as a plain ``torch.Tensor`` where it is of a subclass: an alias of the same memory,
    on the same autograd graph (``as_subclass``); ``None`` and plain tensors as they are."""
    if t is None or type(t) is torch.Tensor:
        return t
    return t.as_subclass(torch.Tensor)


def attributes_of(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` (made from ``x``, of ``x``'s shape) given the Python attributes of ``x`` it lacks,
    where both are of the same subclass of ``torch.Tensor``; ``t`` itself, changed in place
    (it is the library's own tensor); anything else as it is."""
    kind = type(x)
    if kind is torch.Tensor or kind is torch.nn.Parameter or type(t) is not kind:
        return t
    for name, value in vars(x).items():
        if not hasattr(t, name):
            setattr(t, name, value)
    return t


def dead_unwrapped(value: Any) -> Any:
    """``value`` under the ``torch.func`` wrappers around it whose transforms have ended
    (``value`` itself if there is none)."""
    while (
        type(value) is torch.Tensor
        and is_gradtrackingtensor(value)
        and maybe_get_level(value) == DEAD_LEVEL
    ):
        value = get_unwrapped(value)
    return value


def plain_unwrapped(value: torch.Tensor) -> torch.Tensor | None:
    """``value`` under the dead wrappers around it (``dead_unwrapped``), if that is a plain
    tensor (not a wrapper of a transform, live or dead, that cannot be taken off: a
    ``vmap``'s); else ``None``."""
    value = dead_unwrapped(value)
    return value if maybe_get_level(value) == -1 else None
