"""The activation package has no import circle, lazy (function-level) imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import dgc.activation

PACKAGE = Path(dgc.activation.__file__).parent
PREFIX = "dgc.activation."


def _imports(path: Path) -> set[str]:
    """Sibling modules ``path`` imports anywhere in its body (top level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = node.module
            if node.level:  # from .x import y
                module = PREFIX + module
            if module.startswith(PREFIX):
                found.add(module.removeprefix(PREFIX).split(".")[0])
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix(PREFIX).split(".")[0]
                      for a in node.names if a.name.startswith(PREFIX)}
    return found


def _graph() -> dict[str, set[str]]:
    return {p.stem: _imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a list of modules, first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_activation_modules_import_no_circle():
    graph = _graph()
    assert {"break_even", "sparse_linear", "sparse_product"} <= graph.keys()
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph) or [])}"
