"""torchdiv called inside the caller's own ``torch.func`` transforms: an ensemble of models
(``vmap`` over stacked parameters with ``functional_call``) or of inputs. Forward mode's
batched pushes return ``f(x)`` unbatched at their own level but batched at the caller's, which
``vmap``'s ``out_dims=None`` check refused (forward mode, and ``"auto"`` on conv nets, raised).
References: a per-sample ``autograd.grad`` loop (conftest), its parameter gradients by
grad-of-grad, and each member of the model ensemble computed on its own by reverse mode."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

import torchdiv
from tests.conftest import assert_close, loop_diagonal


def _conv() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 2, 3, padding=1)
    ).double()


@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
def test_divergence_of_an_ensemble_of_inputs(method: str) -> None:
    torch.manual_seed(0)
    net = _conv()
    xs = torch.randn(2, 3, 2, 5, 5, dtype=torch.float64)
    got = vmap(lambda xb: torchdiv.divergence(net, xb, method=method))(xs)
    want = torch.stack([loop_diagonal(net, xb, create_graph=True).flatten(1).sum(-1) for xb in xs])
    assert_close(got, want.detach())
    weight = net[0].weight  # parameter gradients: against grad-of-grad of the loop's trace
    (grad,) = torch.autograd.grad(got.square().sum(), weight)
    assert_close(grad, torch.autograd.grad(want.square().sum(), weight)[0])


@pytest.mark.parametrize("method", ["auto", "forward"])
def test_divergence_of_an_ensemble_of_models(method: str) -> None:
    torch.manual_seed(0)
    members = [_conv() for _ in range(3)]
    params, buffers = stack_module_state(members)  # type: ignore[arg-type]
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)

    def one(p: dict, b: dict) -> torch.Tensor:
        return torchdiv.divergence(
            lambda z: functional_call(members[0], (p, b), (z,)), x, method=method
        )

    got = vmap(one)(params, buffers)
    for i, m in enumerate(members):
        assert_close(got[i], torchdiv.divergence(m, x, method="reverse"))
