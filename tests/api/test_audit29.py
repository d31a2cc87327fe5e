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


class _ScriptedVelocity(nn.Module):
    """A velocity field with a scripted submodule (``torch.jit.script`` of a layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3).double()
        self.b = torch.jit.script(nn.Linear(3, 3).double())

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(z)))


def test_adjoint_log_likelihood_of_a_velocity_with_a_scripted_submodule() -> None:
    """``adjoint=True`` read each submodule class's ``forward`` for what it could lose to the
    adjoint; a scripted submodule's class attribute raised ``AttributeError`` ('_CachedForward'
    object has no attribute '__getattr__'), so such a flow could not use the adjoint at all.
    The same fixed-step solve forward: the values agree to float64 rounding (1e-12)."""
    torch.manual_seed(0)
    f, x = _ScriptedVelocity(), torch.randn(4, 3, dtype=torch.float64)

    def base(z: torch.Tensor) -> torch.Tensor:
        return -0.5 * z.square().sum(-1)

    kw = {"solver": "rk4", "options": {"step_size": 0.25}}
    adjoint = torchdiv.flows.log_likelihood(f, x, 0.0, 0.5, base, adjoint=True, **kw)
    plain = torchdiv.flows.log_likelihood(f, x, 0.0, 0.5, base, **kw)
    torch.testing.assert_close(adjoint, plain, rtol=1e-12, atol=1e-12)
