"""The python examples of the README and of the documentation site (``docs/``): each block runs
on its own, as a reader would paste it, and the links between the pages lead somewhere."""

from __future__ import annotations

import contextlib
import functools
import io
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCUMENTS = (README, *sorted((ROOT / "docs").rglob("*.md")))


def python_blocks(document: Path = README) -> list[str]:
    """The ```python blocks of ``document``, in order."""
    return re.findall(r"```python\n(.*?)```", document.read_text(), re.S)


def examples() -> list[tuple[Path, int]]:
    """Every python block of every document, as ``(document, index)``."""
    return [(doc, i) for doc in DOCUMENTS for i in range(len(python_blocks(doc)))]


def example_name(document: Path, index: int) -> str:
    """``docs/guide/flows.md`` block 2 -> ``docs_guide_flows_2`` (an identifier)."""
    stem = document.relative_to(ROOT).with_suffix("").as_posix()
    return f"{re.sub(r'[^0-9a-zA-Z]', '_', stem).lower()}_{index + 1}"


@functools.cache
def run_block(document: Path, index: int) -> dict[str, object]:
    """Block ``index`` of ``document`` run alone in a fresh namespace (once per session)."""
    source = python_blocks(document)[index]
    namespace: dict[str, object] = {"__name__": example_name(document, index)}
    where = f"{document.relative_to(ROOT)} python block {index + 1}"
    exec(compile(source, where, "exec"), namespace)
    return namespace


def test_readme_has_its_quickstart_and_docs_their_examples():
    assert len(python_blocks(README)) >= 1, "README.md lost its quickstart"
    assert len(examples()) >= 10, "the documentation lost its python examples"


def _block_case(document: Path, index: int) -> object:
    """A block as a test case: slow (sampled) where it compiles (Dynamo and AOTAutograd
    tracing torchdiv's calls: several seconds a block, the same calls as
    ``tests/stacks/test_compiled_models.py`` and ``test_compiled_losses.py`` check in every
    run; ``test_typing`` type-checks every block in every run)."""
    compiles = "torch.compile(" in python_blocks(document)[index]
    marks = pytest.mark.slow if compiles else ()
    return pytest.param(document, index, marks=marks, id=example_name(document, index))


# (warnings are errors here: a block that makes one, PyTorch's vmap fallback warning that
# torchdiv is meant to keep to itself included, fails)
@pytest.mark.parametrize(("document", "index"), [_block_case(d, i) for d, i in examples()])
def test_block_runs_on_its_own(document, index):
    run_block(document, index)


def test_quickstart_shapes_and_gradients():
    ns = run_block(README, 0)
    assert ns["div"].shape == (128,) and ns["jac"].shape == (128, 3, 3)
    assert ns["net"][0].weight.grad is not None
    assert ns["est"].shape == (128,) and ns["lap"].shape == (128, 1)


def test_stochastic_block_reports_finite_standard_errors():
    """Every estimate the block shows has a standard error (Hutch++ with one residual term
    would have none: nan)."""
    ns = run_block(*next((d, i) for d, i in examples() if "hutch++" in python_blocks(d)[i]))
    for name in ("est", "adaptive"):
        assert torch.isfinite(ns[name].stderr).all(), name


def test_printed_errors_match_the_comments_that_show_them():
    """A block that prints an error and shows it in comments (``print(error)  # text``, the
    comment continued on the next lines, ``...`` for what is left out) prints that text."""
    for document, index in examples():
        source = python_blocks(document)[index]
        shown = re.search(r"print\(error\)  # (.*\n(?:\s*# .*\n)*)", source)
        if shown is None:
            continue
        text = " ".join(re.sub(r"^\s*# ", "", line) for line in shown[1].splitlines())
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(source, str(document), "exec"), {"__name__": "printed_error"})
        printed = " ".join(out.getvalue().split())
        for fragment in filter(None, (part.strip() for part in text.split("..."))):
            assert fragment in printed, f"{document.name}: {fragment!r} not in {printed!r}"


def relative_links(document: Path) -> list[str]:
    """The targets of ``document``'s markdown links that are paths, anchors cut off."""
    targets = re.findall(r"\]\(([^)#\s]+)[^)]*\)", document.read_text())
    return [t for t in targets if "://" not in t]


def test_readme_links_point_to_files_in_the_repository():
    for target in relative_links(README):
        path = (ROOT / target).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), target


@pytest.mark.parametrize("document", DOCUMENTS[1:], ids=lambda d: d.name)
def test_docs_links_to_pages_point_to_pages(document):
    """Links between pages (the strict site build checks the rest, anchors included)."""
    for target in relative_links(document):
        if target.endswith(".md"):
            assert (document.parent / target).resolve().is_file(), f"{document}: {target}"
