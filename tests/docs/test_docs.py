"""The documentation site's API reference names every public object by its public path."""

from __future__ import annotations

import ast
import inspect
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


OVERVIEW = REFERENCE.parent / "guide" / "overview.md"


def overview_signatures() -> list[str]:
    """The calls the API-at-a-glance table (the page's first) shows in its first column,
    ``name(arguments)`` (``flows.`` and ``distributed.`` names included)."""
    table = OVERVIEW.read_text().split("| call |", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| (.*?) \|", table, re.M)
    return [c for row in rows for c in re.findall(r"`([\w.]+\(.*?\))`", row)]


def test_overview_signatures_are_the_real_ones():
    """Every argument the table names exists with the default it shows, in its place
    (positional, then keyword-only after ``*``); a row without ``...`` names them all."""
    calls = overview_signatures()
    assert len(calls) >= 18, calls
    for call in calls:
        name, arguments = re.fullmatch(r"([\w.]+)\((.*)\)", call).groups()
        obj = torchdiv
        for part in name.split("."):
            obj = getattr(obj, part)
        params = inspect.signature(obj).parameters
        shown = [a.strip() for a in arguments.split(", ") if a.strip()]
        keyword_only = False
        for argument in shown:
            if argument in ("*", "..."):
                keyword_only |= argument == "*"
                continue
            key, _, default = argument.partition("=")
            assert key in params, f"{call}: {key} is not an argument"
            kind = params[key].kind
            assert (kind is inspect.Parameter.KEYWORD_ONLY) == keyword_only, f"{call}: {key}"
            if default:
                assert params[key].default == ast.literal_eval(default), f"{call}: {key}"
            else:
                assert params[key].default is inspect.Parameter.empty, f"{call}: {key}"
        if "..." not in shown:
            named = {a.partition("=")[0] for a in shown} - {"*"}
            assert named == set(params), f"{call}: not shown {sorted(set(params) - named)}"
