"""regress29: a structured replay of a net whose activations take scalar arguments (Softplus's
``beta``/``threshold``, ELU's ``alpha``) under ``torch.compile(dynamic=True)``. Since the
first derivatives of these activations became PyTorch's backward kernels (``FIRST``), the
replay handed them the module's floats, which Dynamo turns into tensors under
``dynamic=True``: it restarted its analysis once per scalar, 19 backend compilations for a
Softplus conv net where 2 before (``bench/compile_matrix.py --nets conv --methods
structured --modes loss,dynamic``; first bad commit fb982363). Values are right; the count
(compile time: each restart traces the whole loss again) is the fault. Left, strict xfail:
taking ``DERIVATIVES``' first derivative where Dynamo traces an op with scalar arguments
(the rule before fb982363) brought the count to 4 but gave ``test_compiled_replay_colours``'s
``Averaged`` (a Softplus conv net's diagonal, ``4 / N`` in ``f``) a fourth graph where 3:
the formulas changed since (rev-chain28's kink masks) trace apart too (NOTES_regress29).
Slow: 12-20 s with the restarts."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from test_compiled_losses import Counting, _fresh_dynamo  # noqa: F401  (autouse reset)

import torchdiv

pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not")


def _conv(act: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    conv = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), act, torch.nn.Conv2d(8, 3, 3, padding=1)
    )
    return conv.double()


def _mlp(act: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), act, torch.nn.Linear(32, 8)).double()


def _loss(net: torch.nn.Module):
    return lambda x: torchdiv.divergence(net, x, method="structured").square().mean()


CASES = {
    "conv-softplus": (lambda: _conv(torch.nn.Softplus()), (3, 6, 6)),
    "mlp-elu": (lambda: _mlp(torch.nn.ELU()), (8,)),
}


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="restarts per scalar argument (fb982363), left")
@pytest.mark.parametrize("name", list(CASES))
def test_dynamic_replay_of_scalar_activations_is_not_restarted(name):
    """A compiled loss of the net, then a new copy's loss compiled with ``dynamic=True`` at
    three batch sizes (the order of ``bench/compile_matrix.py``'s cells): values equal
    eager's, and at most 4 backend compilations (19 for the conv net, 8 for the MLP before
    the fix; 2-3 at 61e4db00, before ``FIRST`` took scalar arguments; the 2 left over that
    are not this fault's)."""
    make, event = CASES[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, *event, generator=g, dtype=torch.float64)
    net = make()
    _loss(net)(x).backward()
    static = torch.compile(_loss(net), backend=Counting())
    for _ in range(2):
        net.zero_grad()
        static(x).backward()
    torch._dynamo.reset()
    net = make()
    loss = _loss(net)
    backend = Counting()
    dynamic = torch.compile(loss, backend=backend, dynamic=True)
    for n in (4, 7, 9):
        xn = torch.randn(n, *event, generator=g, dtype=torch.float64)
        assert_close(dynamic(xn), loss(xn))  # float64 rtol as conftest's: the same arithmetic
    assert backend.compiled <= 4, backend.compiled
