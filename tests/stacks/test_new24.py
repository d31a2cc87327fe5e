"""Adversarial checks of the twenty-third session's new code (rev-new24): the Laplacian
loop's plans, the chains of ``_exact.chain`` and ``_laplacian.chain``, the structure key.

The watch for sample mixing marks ``f`` as passed at the structure of ``f`` and ``x``
(``torchdiv._taylor.mixing.structure``: its modules' flags among the rest); a later call at
that structure is not watched again. That structure must be the one ``f`` was watched at,
read before ``f`` ran: read after it, it holds what ``f`` set while it ran.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import torchdiv
from torchdiv import BatchInteractionError

f64 = torch.float64


class _WarmedUp(nn.Module):
    """A layer that centres its output over the batch once warmed up: its first forward
    runs per sample and sets the flag (``self.warm = True``) that later ones read."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n, 16), nn.Tanh(), nn.Linear(16, n))
        self.warm = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.net(z)
        if self.warm:
            out = out - out.mean(0)
        self.warm = True
        return out


# the calls whose "auto" takes the Laplacian's loop of backward passes at these sizes
LOOPED: dict[str, tuple[int, Callable[[Any, torch.Tensor], Any]]] = {
    "laplacian, one input": (1, lambda f, x: torchdiv.laplacian(f, x)),
    "laplacian, two inputs": (2, lambda f, x: torchdiv.laplacian(f, x)),
    "value_grad_laplacian": (2, lambda f, x: torchdiv.value_grad_laplacian(f, x)),
    # (a partial is no lasting site: its first call makes no key, the next call is watched)
    "laplacian of a partial": (2, lambda f, x: torchdiv.laplacian(_partial(f), x)),
}
_PARTIALS: dict[int, Any] = {}


def _partial(model: nn.Module) -> Any:
    """One ``functools.partial(model.forward)`` per model, the same object at every call."""
    return _PARTIALS.setdefault(id(model), functools.partial(model.forward))


@pytest.mark.parametrize("case", list(LOOPED))
def test_a_flag_f_sets_while_it_runs_is_not_taken_for_the_watched_structure(case: str) -> None:
    """The first call, per sample, passes; the second, centred over the batch, is refused
    as the divergence and the Taylor engine refuse it. Both Laplacian loops read the
    structure after the first call's ``f`` had set its flag and marked it passed there: the
    second call found that pass and ran unwatched, returning the centred batch's
    Laplacians as every sample's own."""
    n, call = LOOPED[case]
    torch.manual_seed(0)
    model = _WarmedUp(n).double()
    x = torch.randn(4, n, dtype=f64)
    call(model, x)
    with pytest.raises(BatchInteractionError):
        call(model, x)


def test_a_loop_decided_at_a_later_structure_watches_its_next_call() -> None:
    """A site first recorded where the Taylor engine runs (batch 4096), then at a small batch
    where ``"auto"`` decides to loop: that deciding call made no structure before ``f`` ran
    (the site had not looped), so it marks nothing, and the next call, centred, is watched
    and refused."""
    from torchdiv._laplacian import methods

    torch.manual_seed(0)
    model = _WarmedUp(2).double()
    big = torch.randn(4096, 2, dtype=f64)
    torchdiv.laplacian(model, big)
    assert methods._LOOPING_SITES.get(model, None) is False  # (recorded, did not loop)
    model.warm = False
    x = torch.randn(4, 2, dtype=f64)
    torchdiv.laplacian(model, x)
    with pytest.raises(BatchInteractionError):
        torchdiv.laplacian(model, x)
