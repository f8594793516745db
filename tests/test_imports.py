"""The package's modules import each other in one direction only (no cycle), and the config
schema can be imported without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ih_sweep"


def _is_script_entry(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":`` at a module's top level."""
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__"
                    for c in test.comparators))


def _without_script_entry(tree: ast.Module) -> ast.Module:
    """The module without its ``if __name__ == "__main__":`` block: that block runs only
    when the file is run as a script (``python -m ih_sweep.report.summarize`` hands over to
    ``summarize_command`` there), never when the module is imported, so its imports are
    no dependency of the module."""
    tree.body = [node for node in tree.body if not _is_script_entry(node)]
    return tree


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules that ``path`` imports anywhere (top level or inside functions),
    relative (``from .x import y``, ``from . import x``) or absolute (``ih_sweep.x``)."""
    found = set()
    for node in ast.walk(_without_script_entry(ast.parse(path.read_text(), str(path)))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1:
                raise AssertionError(f"{path.name}: import from above the package")
            base = node.module or ""
            if node.level == 0 and base != "ih_sweep" and not base.startswith("ih_sweep."):
                continue
            if node.level == 1:
                base = "ih_sweep" + ("." + base if base else "")
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "ih_sweep" and len(parts) > 1 and parts[1] in modules:
                found.add(parts[1])
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return {m: _imports(PACKAGE / f"{m}.py", modules) - {m} for m in sorted(modules)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_lazy_relative_and_absolute_imports():
    graph = import_graph()
    assert "architecture" in graph["scoring"]  # top level, relative
    assert "architecture" in graph["eval_attention"]  # inside a function
    assert "launch" in graph["__main__"]  # absolute
    assert "data" in graph["tiny_model"]  # from . import data as babi
    assert "summarize_command" not in graph["summarize"]  # only its script entry imports it
    assert {"summarize", "cross_model"} <= graph["summarize_command"]


def test_no_import_cycle_between_package_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_schema_does_not_import_torch():
    code = "import sys, ih_sweep.config.schema; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=PACKAGE.parent, check=True)
    assert out.stdout.strip() == "False", out.stderr
