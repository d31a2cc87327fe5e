"""Second adversarial review of the structured engine's compiled replay
(``_structured.replay``): what the replay trusts beyond Dynamo's guards on ``f``."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import assert_close
from test_compiled_losses import mlp

import torchdiv

pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("nested", [False, True], ids=["", "in_a_helper"])
def test_inference_mode_inside_the_compiled_code_runs_eagerly(nested):
    """``torch.inference_mode()`` entered inside the compiled function: the replay's graph
    failed the backend (``aot_eager``: "Cannot set version_counter for inference tensor") where
    eager serves, and left the process broken: every later dispatch, ``x @ x.T`` included,
    raised PyTorch's INTERNAL ASSERT "PythonDispatcherTLS was not set". Such a call runs
    eagerly; the process stays usable."""
    net, x = mlp(), torch.randn(5, 3, dtype=torch.float64)

    def inferred(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torchdiv.divergence(net, x, method="structured")

    def step(x: torch.Tensor) -> torch.Tensor:
        return inferred(x * 1.0) if nested else inferred(x)

    want = inferred(x)
    assert_close(torch.compile(step, backend="aot_eager")(x), want)
    assert_close(torchdiv.divergence(net, x, method="structured"), want)
