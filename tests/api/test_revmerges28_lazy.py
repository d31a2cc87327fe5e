"""rev-merges28: lazy modules a module reaches only the way ``_core.script.scripted`` follows
(an attribute that is not a submodule, a partial it holds): refused as those a function or
a partial reaches (the walk at the start of the call met them; ``check_initialized`` walked
``_modules`` alone and let ``f`` run them inside the engines' transforms)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import torchdiv


def _lazy() -> nn.Module:
    return nn.Sequential(nn.LazyLinear(3), nn.Tanh())


def _run(net: nn.Module, z: torch.Tensor) -> torch.Tensor:
    return net(z)


class _Hidden(nn.Module):
    """Holds a lazy module as a plain attribute (not registered: ``object.__setattr__``)."""

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "hidden", _lazy())
        self.lin = nn.Linear(3, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.lin(z))


class _Bound(nn.Module):
    """Holds a partial that binds a lazy module."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.fn = functools.partial(_run, _lazy())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fn(self.lin(z))


@pytest.mark.parametrize("holder", [_Hidden, _Bound])
@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
def test_a_lazy_module_a_module_holds_is_refused(holder: type[nn.Module], method: str) -> None:
    f = holder()
    with pytest.raises(ValueError, match="uninitialized parameters"):
        torchdiv.divergence(f, torch.randn(4, 3), method=method)
    with pytest.raises(ValueError, match="uninitialized parameters"):
        torchdiv.divergence(f.forward, torch.randn(4, 3), method=method)  # its bound method


def test_once_initialized_it_runs() -> None:
    f = _Hidden()
    x = torch.randn(4, 3)
    f(x)  # initializes it
    want = torch.stack(
        [torch.autograd.functional.jacobian(f, x[i : i + 1])[0, :, 0].trace() for i in range(4)]
    )
    # float32: assert_close's float32 tolerances (one matmul chain, 3 wide)
    torch.testing.assert_close(torchdiv.divergence(f, x, method="reverse"), want)
