"""Leaves of the nested tuples, lists and dicts that ATen calls take and return.

``torch.utils._pytree`` does the same for any registered container, at about ten times the
cost; recording and replaying a graph flattens every call's arguments, so the cheap version
matters (it took half of a capture's time). Only exact ``tuple``, ``list`` and ``dict`` are
containers here, in the order ``tree_flatten`` uses for them; anything else is a leaf
(``torch.Size`` included, as in ``_pytree``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def leaves(tree: Any) -> list[Any]:
    """The leaves of ``tree``, depth first.

    Examples:
        >>> leaves((1, [2, {"a": 3}], "b"))
        [1, 2, 3, 'b']
    """
    out: list[Any] = []
    _collect(tree, out)
    return out


def _collect(tree: Any, out: list[Any]) -> None:
    kind = type(tree)
    if kind is tuple or kind is list:
        for item in tree:
            _collect(item, out)
    elif kind is dict:
        for item in tree.values():
            _collect(item, out)
    else:
        out.append(tree)


def map_leaves(fn: Callable[[Any], Any], tree: Any) -> Any:
    """``tree`` with every leaf ``v`` replaced by ``fn(v)``, containers rebuilt.

    Examples:
        >>> map_leaves(lambda v: v * 10, (1, [2, {"a": 3}]))
        (10, [20, {'a': 30}])
    """
    kind = type(tree)
    if kind is tuple or kind is list:
        return kind(map_leaves(fn, item) for item in tree)
    if kind is dict:
        return {key: map_leaves(fn, item) for key, item in tree.items()}
    return fn(tree)
