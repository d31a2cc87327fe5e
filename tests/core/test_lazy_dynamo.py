"""``import torchdiv`` leaves ``torch._dynamo`` unimported (1-2 s of every process), and what
Dynamo's decorators mark (``_core.dynamo``) is marked before anything is traced, whichever of
torchdiv and Dynamo is imported first: the first torchdiv calls inside a compiled loss break
the graph where and as often as when Dynamo was imported before torchdiv."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SRC = str(Path(__file__).resolve().parents[2] / "src")
CASE = str(Path(__file__).with_name("lazy_dynamo_case.py"))


def _python(*args: str) -> str:
    """stdout of a fresh interpreter with this checkout's torchdiv first on the path."""
    path = os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_import_leaves_dynamo_unimported() -> None:
    """Without Dynamo imported nothing is marked yet; importing it marks everything (the
    disabled versions rebound, the constants marked)."""
    out = _python(
        "-c",
        "import sys, torchdiv\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "from torchdiv._core import checks, modes\n"
        "from torchdiv._exact import autograd\n"
        "from torchdiv._structured import products\n"
        "assert not hasattr(modes._without_dynamo, '_torchdynamo_disable')\n"
        "import torch._dynamo\n"
        "for fn in (modes._without_dynamo, autograd._refused, products._Product.backward):\n"
        "    assert fn._torchdynamo_disable, fn\n"
        "for fn in (modes._materialized_zero_tangents, checks._lazy_in):\n"
        "    assert fn._dynamo_marked_constant, fn\n"
        "print('ok')\n",
    )
    assert out.strip() == "ok"


def test_dynamo_imported_first_marks_at_once() -> None:
    """Dynamo imported before torchdiv: every mark is applied as torchdiv is imported, and the
    module-level disabled functions stay rebound (the ``def`` bound the plain function over
    the rebinding: ``_refused``'s refusal of a compiled graph's gradients was traced, and
    lost, in a compiled loss)."""
    out = _python(
        "-c",
        "import torch._dynamo, torchdiv\n"
        "from torchdiv._core import checks, modes\n"
        "from torchdiv._exact import autograd\n"
        "from torchdiv._structured import products\n"
        "for fn in (modes._without_dynamo, autograd._refused, products._Product.backward):\n"
        "    assert getattr(fn, '_torchdynamo_disable', False), fn\n"
        "for fn in (modes._materialized_zero_tangents, checks._lazy_in):\n"
        "    assert fn._dynamo_marked_constant, fn\n"
        "print('ok')\n",
    )
    assert out.strip() == "ok"


def _compiled_run(order: str) -> dict[str, object]:
    result: dict[str, object] = json.loads(_python(CASE, order))
    breaks = result["breaks"]
    assert isinstance(breaks, list)
    result["breaks"] = sorted(re.sub(r"0x[0-9a-f]+", "0x", b) for b in breaks)  # (ids)
    return result


@pytest.mark.slow
def test_first_call_inside_compiled_loss_breaks_as_before() -> None:
    """A compiled loss (``backend="eager"``) whose torchdiv calls are the process's first,
    torchdiv imported before Dynamo: the same graph breaks (the generator's call run eagerly
    as a whole, the tensor exponent's ``pow`` run eagerly), graphs, losses and parameter
    gradients as with Dynamo imported first, before and after ``torch._dynamo.reset()``, and
    the eager call's. Without the import hook the trace recursed into ``eager_when``'s
    wrapper (``RecursionError`` inside Dynamo)."""
    lazy, first = _compiled_run("torchdiv-first"), _compiled_run("dynamo-first")
    assert first["imported"] and not lazy["imported"]
    assert lazy["breaks"] == first["breaks"] and lazy["graphs"] == first["graphs"]
    runs = lazy["runs"]
    assert isinstance(runs, list) and runs == first["runs"]
    (value, grads), *others = runs
    for other_value, other_grads in others:  # float64 throughout: rounding apart
        torch.testing.assert_close(other_value, value, rtol=1e-12, atol=0)
        for g, h in zip(grads, other_grads, strict=True):
            torch.testing.assert_close(torch.tensor(h), torch.tensor(g), rtol=1e-12, atol=1e-14)
