"""Generators outside torch that ``f`` may draw from, put back between its evaluations as
torch's generators are (``_exact.state.Changes``; not after ``_taylor.capture``'s recordings,
where reading NumPy's state cost 4-9% of every small Laplacian)."""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from typing import Any, NamedTuple


class GlobalGenerator(NamedTuple):
    """A module-level generator outside torch that ``f`` may draw from (normflows' residual
    block draws its power series' length by ``np.random.geometric``), put back between
    evaluations as torch's generators are (the same ``get_state``/``set_state``);
    ``present``: whether its module is imported."""

    module: str
    get_state: Callable[[], Any]
    set_state: Callable[[Any], Any]

    def present(self) -> bool:
        return self.module in sys.modules


# Python's ``random`` and NumPy's legacy global ``np.random`` (not a generator object ``f``
# holds, ``np.random.default_rng()``: no call shows it)
GLOBALS = (
    GlobalGenerator("random", random.getstate, random.setstate),
    GlobalGenerator(
        "numpy",
        lambda: sys.modules["numpy"].random.get_state(),
        lambda state: sys.modules["numpy"].random.set_state(state),
    ),
)
