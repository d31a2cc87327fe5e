"""Review of the compat-new25 merge and the version checks (rev-merges25d).

torchdiv follows two changes of PyTorch's derivatives: ``clamp``'s at its edges (torch 2.14)
and the Bessel functions' (torch 2.15). Gated on the version's number, a nightly or source
build of that release (``2.14.0.dev...``, ``2.15.0a0+git...``), which names its coming release
whether or not it has the change, got the other rule: the Taylor engine's ``clamp`` disagreed
with autograd at the edges (a Laplacian of ``clamp(z, -1, 1)^2`` at 1: 2 against 4), and
Bessel functions without derivatives were served, their derivatives 0 by ``"auto"``,
silently. The running torch's own backward now decides (``versions.slope``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from conftest import at_least
from torch._subclasses.fake_tensor import FakeTensorMode

from torchdiv._core.versions import slope
from torchdiv._taylor import elementwise

# version strings of releases on either side of the clamp change, as builds name them
OTHER_VERSIONS = ["2.13.0a0+gitabc", "2.14.0.dev20261201", "2.15.1"]


@pytest.mark.parametrize("version", OTHER_VERSIONS)
def test_the_clamp_rule_is_the_running_torchs_whatever_its_version_string(
    monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    """``_taylor/elementwise.py`` run afresh under another ``torch.__version__``: its rule at
    ``clamp``'s edges is the one autograd applies (slope 0 at a number bound from 2.14 on,
    1 before), which ``CLAMP_EDGES_SPLIT`` took from the version string."""
    x = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    split = torch.autograd.grad(x.clamp(-1.0, 1.0), x)[0].item() == 0
    monkeypatch.setattr(torch, "__version__", version)
    spec = importlib.util.spec_from_file_location("elementwise_afresh", elementwise.__file__)
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fresh)
    spec.loader.exec_module(fresh)
    assert fresh.CLAMP_EDGES_SPLIT == split == elementwise.CLAMP_EDGES_SPLIT


def test_slope_reads_the_running_torchs_backward() -> None:
    """``slope``: the derivative PyTorch's backward gives, ``None`` where it has none (a
    Bessel function below torch 2.15), inside ``no_grad``, ``inference_mode`` and a fake
    tensor mode too (``import torchdiv`` there raised, the probe's ``item()`` refused)."""
    with FakeTensorMode():
        assert slope(lambda t: t.clamp(max=1.0), 0.0) == 1.0
    with torch.inference_mode():
        assert slope(torch.tanh, 0.0) == 1.0
        assert slope(lambda t: t.clamp(max=1.0), 1.0) in (0.0, 1.0)
    with torch.no_grad():
        assert slope(torch.special.airy_ai, 1.0) is None
        j0 = slope(torch.special.bessel_j0, 1.0)
    assert (j0 is None) != at_least(2, 15)  # (the releases, as against the references)
    assert j0 is None or abs(j0 + torch.special.bessel_j1(torch.tensor(1.0)).item()) < 1e-6


# a build named as the release on the other side of the Bessel change
_BESSEL_AS_OTHER_RELEASE = """
import torch
torch.__version__ = {version!r}
x = torch.tensor(1.0, requires_grad=True)
derived = torch.special.bessel_j0(x).grad_fn is not None
import torchdiv
from torchdiv._core.modes import UNDERIVABLE_NAMES
print(derived, "bessel_j0" in UNDERIVABLE_NAMES)
"""


@pytest.mark.slow
def test_bessel_functions_are_served_as_the_running_torch_differentiates_them() -> None:
    """``import torchdiv`` under a version string of the release on the other side of the
    change: the Bessel functions refused exactly where PyTorch has no derivative of them
    (a 2.15 nightly without them: served, 0 by every engine of PyTorch derivatives)."""
    version = "2.14.1" if at_least(2, 15) else "2.15.0.dev20260301"
    script = _BESSEL_AS_OTHER_RELEASE.format(version=version)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=240)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    derived, refused = run.stdout.split()
    assert derived != refused, run.stdout
