"""regress29: a structured replay of a net whose activations take scalar arguments (Softplus's
``beta``/``threshold``, ELU's ``alpha``) under ``torch.compile(dynamic=True)``, compiled after
another compilation and ``torch._dynamo.reset()`` (``bench/compile_matrix.py --nets conv
--methods structured --modes loss,dynamic``): 19 backend compilations for a Softplus conv net
where 2 before fb982363. Values were right; the count (compile time: each restart traces the
whole loss again) was the fault. The cause (compile30): ``replay.restarted`` kept the first
attempt's keys by ``CompileId``, which the reset starts again from "0/0", so each restart
read the earlier compilation's calls, unlike its own, and recorded again under a new key
whose floats Dynamo made new symbols, which restarted it again; fb982363 only made those
floats reach kernels Dynamo cannot take them as tensors into (``FIRST``), which restarts.
Now kept by the compilation (``test_compile30``: where the calls did match, a changed
module's restart replayed the old plan, silently wrong). Slow: 4-10 s."""

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
@pytest.mark.parametrize("name", list(CASES))
def test_dynamic_replay_of_scalar_activations_is_not_restarted(name):
    """A compiled loss of the net, then a new copy's loss compiled with ``dynamic=True`` at
    three batch sizes (the order of ``bench/compile_matrix.py``'s cells): values equal
    eager's, and at most 2 backend compilations (10 for the conv net, 9 for the MLP before
    compile30; PyTorch restarts once for a Softplus's or ELU's float under ``dynamic=True``,
    the net compiled alone too: 2, as at 61e4db00)."""
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
    assert backend.compiled <= 2, backend.compiled
