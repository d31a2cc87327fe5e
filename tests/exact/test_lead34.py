"""The lead's checks of the thirty-fourth session: refusals name a way out that runs.

``laplacian(method="taylor")`` refuses a ``torch.library`` custom op with a registered
derivative (the Taylor engine has no rule for it); its way out, ``"auto"``, differentiates the
op by its loop of backward passes, not by forward over reverse, which refuses custom ops
(``torch.func``'s ``setup_context`` error): the message must not name the engine that refuses.
"""

from __future__ import annotations

import pytest
import torch
from test_lead33 import f

import torchdiv


def test_laplacian_taylor_refusal_of_a_custom_op_names_the_loop_auto_runs() -> None:
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(NotImplementedError, match="torchdiv_lead33") as info:
        torchdiv.laplacian(f, x, method="taylor")
    way = str(info.value).partition("; use ")[2]
    assert way.startswith("method='auto' (falls back to its loop of backward passes)"), way
    with pytest.raises(RuntimeError, match="setup_context"):  # the engine not to name
        torchdiv.laplacian(f, x, method="forward-over-reverse")
    # the way out: each output's Laplacian of 2 x_i**3 is 12 x_i (float64, a few ops)
    torch.testing.assert_close(torchdiv.laplacian(f, x, method="auto"), 12 * x)
