"""The folder layout draws the architecture: every import points down the layers, no cycles."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# top to bottom: a module imports from its own part or from parts below it
LAYERS = [
    ("torchdiv.__main__", "torchdiv._bench"),  # the CLI, a user of the public API
    ("torchdiv",),  # the public names
    ("torchdiv.flows", "torchdiv.distributed"),  # the public face's flows, sharded operators
    ("torchdiv._api",),  # the public face's functions, graph form, error reporting
    ("torchdiv._laplacian",),  # the Laplacian family's methods
    ("torchdiv._estimators",),  # stochastic estimators
    ("torchdiv._exact",),  # the exact engines and their dispatch
    ("torchdiv._structured",),  # the structured planner
    ("torchdiv._taylor",),  # recording f, Taylor-mode rules
    ("torchdiv._core",),  # checks, modes, basis vectors, sample mixing
]


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _part(module: str) -> tuple[int, str]:
    """The layer of ``module``: the longest prefix listed in ``LAYERS``."""
    best = (-1, "")
    for rank, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best[1]):
                best = (rank, name)
    assert best[0] >= 0, f"{module} sits in no layer"
    return best


def _run_time(tree: ast.AST) -> list[ast.AST]:
    """The nodes of ``tree`` outside ``if TYPE_CHECKING:`` blocks (imports for annotations
    only, never run: the rules of ``_core.mixing`` name the ``BatchAxes`` that calls them)."""
    found: list[ast.AST] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        found.append(node)
        checking = isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        stack += [
            child for child in ast.iter_child_nodes(node) if not checking or child in node.orelse
        ]
    return found


def _imports(tree: ast.AST, annotations: bool = True) -> set[str]:
    """The torchdiv modules the parsed module ``tree`` imports (``from torchdiv._x import y``:
    ``torchdiv._x.y`` when ``y`` is a module, else ``torchdiv._x``); ``annotations=False``:
    those run (not under ``if TYPE_CHECKING:``)."""
    found = set()
    for node in ast.walk(tree) if annotations else _run_time(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torchdiv"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                is_module = (SRC / child.replace(".", "/")).with_suffix(".py").exists() or (
                    SRC / child.replace(".", "/")
                ).is_dir()
                found.add(child if is_module else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("torchdiv")}
    return found


MODULES = {_module(p): p for p in sorted((SRC / "torchdiv").rglob("*.py"))}


@functools.cache
def _graph(annotations: bool = True) -> dict[str, set[str]]:
    """Each module's imports (``_imports``), every file parsed once per process and only when a
    test asks (not at collection: each pytest-xdist worker collects the whole suite).
    ``annotations=False``: the imports that run (a cycle through an ``if TYPE_CHECKING:`` import
    never executes)."""
    return {module: _imports(_tree(path), annotations) for module, path in MODULES.items()}


@functools.cache
def _tree(path: Path) -> ast.AST:
    return ast.parse(path.read_text())


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    rank, _ = _part(module)
    upward = [m for m in _graph()[module] if _part(m)[0] < rank]
    assert not upward, f"{module} imports {upward} from a layer above it"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    run_graph = _graph(annotations=False)

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for child in sorted(run_graph.get(module, ())):
            child_package = child if child in run_graph else child.rsplit(".", 1)[0]
            if child_package == module or child_package not in run_graph:
                continue
            assert state.get(child_package) != 1, " -> ".join([*path, child_package])
            if child_package not in state:
                visit(child_package, [*path, child_package])
        state[module] = 2

    for module in run_graph:
        if module not in state:
            visit(module, [module])


def test_a_layer_above_is_caught():
    assert _part("torchdiv._core.checks")[0] > _part("torchdiv._api.operators")[0]
