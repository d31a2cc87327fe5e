"""audit29: what the state audit (``tests/audit_state.py``) found left changed by a public call.

Each test fails without its fix: see ``NOTES_audit29.md``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchdiv


def test_check_batch_independence_refuses_a_lazy_module_and_leaves_it_as_found() -> None:
    """A lazy module was initialised by the check's evaluation of ``f`` (a module changed: its
    class swapped, its parameters drawn) while the global RNG state its initialisation drew
    from was put back: the next draw repeated the numbers its weights were made of. Every
    operator refuses such an ``f``; the check now does too, leaving module and RNG alone."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.LazyLinear(3), nn.Tanh())
    x = torch.randn(4, 3)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"check_batch_independence: f has uninitialized"):
        torchdiv.check_batch_independence(net, x)
    assert isinstance(net[0], nn.LazyLinear) and net[0].has_uninitialized_params()
    assert torch.equal(torch.get_rng_state(), rng)
    net(x)  # initialised by the caller's forward, the check runs
    torchdiv.check_batch_independence(net, x)
