"""The documentation site's API reference names every public object by its public path."""

from __future__ import annotations

import re
from pathlib import Path

import torchdiv
from torchdiv import distributed, flows

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference"


def documented() -> set[str]:
    """What the reference pages render: ``::: torchdiv.name`` and the members listed under it."""
    names = set()
    for page in REFERENCE.glob("*.md"):
        text = page.read_text()
        names |= set(re.findall(r"^::: ([\w.]+)$", text, re.M))
        for module, members in re.findall(
            r"^::: ([\w.]+)\n\s+options:\n\s+members:\n((?:\s+- \w+\n)+)", text, re.M
        ):
            names |= {f"{module}.{m}" for m in re.findall(r"- (\w+)", members)}
    return names


def test_every_public_name_has_a_reference_entry():
    public = {f"torchdiv.{n}" for n in torchdiv.__all__}
    public |= {f"torchdiv.flows.{n}" for n in flows.__all__}
    public |= {f"torchdiv.distributed.{n}" for n in distributed.__all__}
    missing = public - documented()
    assert not missing, f"not in docs/reference/*.md: {sorted(missing)}"


def test_reference_uses_public_paths_only():
    """A private module path would break when the layout moves (and shows the wrong name)."""
    private = sorted(n for n in documented() if any(p.startswith("_") for p in n.split(".")))
    assert not private, private


def test_public_docstrings_use_examples_sections():
    """The reference renders an ``Examples:`` section as code; an ``Example:`` heading would be
    an admonition whose ``>>>`` lines run together into one paragraph of text."""
    objects = [getattr(torchdiv, n) for n in torchdiv.__all__]
    objects += [getattr(flows, n) for n in flows.__all__]
    objects += [getattr(distributed, n) for n in distributed.__all__]
    wrong = [o.__name__ for o in objects if re.search(r"^\s*Example:\s*$", o.__doc__ or "", re.M)]
    assert not wrong, wrong
