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

import torch


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
