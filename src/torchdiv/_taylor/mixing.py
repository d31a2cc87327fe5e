"""Recording ``f`` once to find where it mixes samples, for errors that do not say so."""

from __future__ import annotations

from typing import Any

import torch

from torchdiv._core.mixing import BatchInteractionError, allowed, unnamed
from torchdiv._taylor import RULES, capture


def recorded_mixing(f: Any, x: torch.Tensor, batch_dims: int) -> str | None:
    """The ``BatchInteractionError`` message of recording ``f`` once (state put back), or
    ``None`` if it does not mix samples where the recorder can see it. For an ``f`` that a
    ``torch.func`` transform refused for updating state (a train-mode batch norm)."""
    if allowed():
        return None
    try:
        capture(f, x, RULES, batch_dims=batch_dims).undo()
    except BatchInteractionError as exc:
        return unnamed(str(exc))
    except Exception:  # f fails otherwise: the original error stands
        return None
    return None
