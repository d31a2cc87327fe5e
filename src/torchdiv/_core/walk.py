"""Walking an autograd graph: every node below a root, once."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def nodes(root: Any) -> Iterator[Any]:
    """Every node of the autograd graph below ``root`` (a ``grad_fn``; itself included), each
    once, depth first; nothing for ``None`` (a tensor that does not require grad)."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(child for child, _ in node.next_functions)
