"""No import circle anywhere in the package (``dgc`` and ``dgc.kernels``), function-level imports
included; ``if TYPE_CHECKING:`` imports and imports of a module's own parent packages do not count."""

from __future__ import annotations

import ast
from pathlib import Path

import dgc.kernels
from test_activation_imports import _cycle

import dgc

ROOTS = {"dgc": Path(dgc.__file__).parent, "dgc.kernels": Path(dgc.kernels.__file__).parent}


def _modules() -> dict[str, Path]:
    out = {}
    for prefix, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = [prefix, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _skipped(tree: ast.AST) -> set[int]:
    return {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}


def _targets(node: ast.AST, package: str) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        base = package.split(".")[: len(package.split(".")) - max(0, node.level - 1)] if node.level else []
        module = ".".join([*base, node.module] if node.module else base)
        return [module, *(f"{module}.{a.name}" for a in node.names)]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return []


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
        skip = _skipped(tree)
        graph[name] = {
            t for node in ast.walk(tree) if id(node) not in skip for t in _targets(node, package)
            if t in modules and t != name and not name.startswith(t + ".")
        }
    return graph


def test_the_package_imports_no_circle():
    graph = _graph()
    assert {"dgc.codec", "dgc.state", "dgc.ddp_hook", "dgc.kernels.reference"} <= graph.keys()
    assert "dgc.codec" in graph["dgc.state"]  # the graph sees real edges
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph) or [])}"
