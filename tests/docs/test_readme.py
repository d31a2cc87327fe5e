"""The README's python examples: each block runs on its own, as a reader would paste it."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    """The README's ```python blocks, in order."""
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@functools.cache
def run_block(index: int) -> dict[str, object]:
    """Block ``index`` run alone in a fresh namespace (once per test session)."""
    namespace: dict[str, object] = {"__name__": f"readme_block_{index + 1}"}
    exec(compile(python_blocks()[index], f"README.md python block {index + 1}", "exec"), namespace)
    return namespace


def test_readme_has_its_examples():
    assert len(python_blocks()) >= 4, "README.md lost its python examples"


# the diffusers block: PyTorch warns that vmap over CPU fused attention's backward loops
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_block_runs_on_its_own(index):
    run_block(index)


def test_quickstart_shapes_and_gradients():
    ns = run_block(0)
    assert ns["div"].shape == (128,) and ns["jac"].shape == (128, 3, 3)
    assert ns["net"][0].weight.grad is not None
    assert ns["est"].shape == (128,) and ns["lap"].shape == (128, 1)


def test_stochastic_block_reports_finite_standard_errors():
    """Every estimate the block shows has a standard error (Hutch++ with one residual term
    would have none: nan)."""
    ns = run_block(next(i for i, b in enumerate(python_blocks()) if "hutch++" in b))
    for name in ("est", "adaptive"):
        assert torch.isfinite(ns[name].stderr).all(), name


def test_relative_links_point_to_files_in_the_repository():
    root = README.parent.resolve()
    for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", README.read_text()):
        if "://" in target:
            continue
        path = (root / target).resolve()
        assert path.is_relative_to(root) and path.exists(), target
