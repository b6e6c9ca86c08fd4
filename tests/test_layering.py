"""The package layers: dependencies point one way, with no import cycle and no import inside a function
that reaches into the project (the way cycles get dodged)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# lower number = lower layer; a module may import only from its own layer or below
# edit.eval.datasets only turns data files into requests and cases (no scoring): the methods that need
# data (IKE's demonstration pool) may read it, so it sits with edit's layer
LAYERS = [("locate", 0), ("edit.eval.datasets", 1), ("edit.eval", 2), ("edit", 1), ("viz", 3), ("locate_edit", 4)]
PACKAGES = ("locate", "edit", "viz", "locate_edit")


def _layer(module: str) -> int:
    for prefix, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return rank
    raise AssertionError(module)


def _modules():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            yield ".".join(parts), path, is_pkg


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        keep = parts if is_pkg else parts[:-1]
        keep = keep[: len(keep) - (node.level - 1)]
        base = ".".join(keep + ([node.module] if node.module else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def _project_imports(module, path, is_pkg):
    top, inner = set(), []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = _resolve(module, is_pkg, node)
        names = [n for n in names if n.split(".")[0] in PACKAGES]
        if not names:
            continue
        if node.col_offset == 0 or _guarded(tree, node):
            top.update(names)
        else:
            inner.append((node.lineno, names))
    return top, inner


def _guarded(tree, node) -> bool:
    """An import under a module-level ``if TYPE_CHECKING:``/``try:`` still runs at import time."""
    for top in tree.body:
        if isinstance(top, (ast.If, ast.Try)) and any(n is node for n in ast.walk(top)):
            return True
    return False


def test_dependencies_point_one_way_and_no_import_hides_in_a_function():
    known = {m for m, _, _ in _modules()}
    graph = {}
    for module, path, is_pkg in _modules():
        top, inner = _project_imports(module, path, is_pkg)
        assert not inner, f"{module}: project imports inside functions at {inner}"
        deps = {n for n in top if n in known and n != module}
        for d in deps if not is_pkg else ():  # a package __init__ is a facade that re-exports its subpackages
            assert _layer(d) <= _layer(module), f"{module} (layer {_layer(module)}) imports {d} (layer {_layer(d)})"
        graph[module] = deps
    # no cycle among modules (package __init__ files are facades that re-export, so skip their edges)
    facades = {m for m, _, is_pkg in _modules() if is_pkg}
    seen, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in seen or m in facades:
            return
        stack.append(m)
        for d in graph.get(m, ()):
            visit(d)
        stack.pop()
        seen.add(m)

    for m in graph:
        visit(m)
