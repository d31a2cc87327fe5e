"""The README's examples run as written, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3, "README.md lost its python examples"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # the quickstart
    assert namespace["div"].shape == (128,) and namespace["jac"].shape == (128, 3, 3)
    assert namespace["net"][0].weight.grad is not None
    assert namespace["est"].shape == (128,) and namespace["lap"].shape == (128, 1)
    for block in blocks[1:]:
        exec(compile(block, "README.md", "exec"), namespace)
