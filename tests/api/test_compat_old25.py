"""The oldest PyTorch torchdiv claims (``pyproject.toml``'s ``torch>=``) is refused below by name.

On torch 2.4.1 to 2.10 ``import torchdiv`` raised an ``ImportError`` on a private name deep
inside (``_top_saved_tensors_default_hooks``, ``any_torch_dispatch_mode_on_stack``); on 2.11
and 2.12 a ``torch.compile``d loss around a call, FSDP2 modules (2.12: a segmentation fault)
and DTensors failed (``NOTES_compat-old25.md``)."""

from __future__ import annotations

import pathlib
import re

import pytest

from torchdiv._core.versions import MINIMUM, check_torch


@pytest.mark.parametrize("version", ["2.4.1+cu121", "2.11.0+cu130", "2.12.0", "1.13.1"])
def test_an_older_pytorch_is_refused_by_name(version):
    found = re.escape(version)
    with pytest.raises(ImportError, match=rf"needs PyTorch >= 2\.13 \(found {found}\)"):
        check_torch(version)


@pytest.mark.parametrize("version", ["2.13.0+cpu", "2.14.0a0+git1234", "2.15.0", "3.0.0", "dev"])
def test_the_claimed_and_newer_pytorch_are_taken(version):
    check_torch(version)


def test_pyproject_asks_for_the_version_checked():
    text = (pathlib.Path(__file__).parents[2] / "pyproject.toml").read_text()
    found = re.search(r'"torch>=(\d+)\.(\d+)"', text)
    assert found is not None
    assert (int(found.group(1)), int(found.group(2))) == MINIMUM
