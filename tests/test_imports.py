"""The house's shape, checked on every module of every package and subpackage (ih_sweep/**,
hydra_plugins/**): modules import each other in one direction only (no cycle), none imports
another module's private (``_underscore``) names, none is longer than 500 lines, and the
config package can be imported without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ih_sweep", "hydra_plugins")
MAX_LINES = 500


def _is_script_entry(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":`` at a module's top level."""
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__"
                    for c in test.comparators))


def _parse(path: Path) -> ast.Module:
    """The module without its ``if __name__ == "__main__":`` block: that block runs only
    when the file is run as a script, never when the module is imported, so its imports
    are no dependency of the module."""
    tree = ast.parse(path.read_text(), str(path))
    tree.body = [node for node in tree.body if not _is_script_entry(node)]
    return tree


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the packages by dotted name (a package's ``__init__`` under the
    package's own name)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name an ``ImportFrom`` names (relative ones resolved)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: set[str]) -> dict[str, set[str]]:
    """The package modules that ``module`` imports anywhere (top level or inside
    functions), relative or absolute, each with the names it takes from it."""
    is_package = path.name == "__init__.py"
    found: dict[str, set[str]] = {}

    def add(target: str, name: str | None) -> None:
        # the longest known module that ``target`` names (a name may be a function)
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != module:
            found.setdefault(target, set()).update({name} if name else set())

    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, None)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node)
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    add(f"{base}.{alias.name}", None)  # a submodule
                else:
                    add(base, alias.name)
    return found


def import_graph(root: Path = ROOT) -> dict[str, dict[str, set[str]]]:
    """module -> {imported module -> names taken from it}."""
    files = module_files(root)
    names = set(files)
    return {m: imports_of(m, p, names) for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]] | dict[str, dict[str, set[str]]]) -> list[str] | None:
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


def private_imports(graph: dict[str, dict[str, set[str]]]) -> list[str]:
    """``a imports b._name`` for every private name a module takes from another."""
    return sorted(f"{a} imports {b}.{n}" for a, deps in graph.items() for b, ns in deps.items()
                  for n in ns if n.startswith("_") and not n.startswith("__"))


def private_attributes(root: Path = ROOT) -> list[str]:
    """``a uses b._name`` where a module reaches a private name through another module it
    imported as a whole (``import ih_sweep.x as x; x._y``)."""
    files = module_files(root)
    found = []
    for module, path in files.items():
        tree = _parse(path)
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _absolute(module, path.name == "__init__.py", node)
                for a in node.names:
                    if f"{base}.{a.name}" in files:
                        aliases[a.asname or a.name] = f"{base}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in files and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases and node.attr.startswith("_") \
                    and not node.attr.startswith("__"):
                found.append(f"{module} uses {aliases[node.value.id]}.{node.attr}")
    return sorted(set(found))


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_reads_every_kind_of_import(tmp_path):
    """A made-up package: relative and absolute, top level and inside functions, a
    submodule taken by name, a private name, a script entry that does not count."""
    pkg = tmp_path / "ih_sweep"
    (pkg / "sub").mkdir(parents=True)
    (tmp_path / "hydra_plugins").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f(): ...\n_secret = 1\n")
    (pkg / "sub" / "deep.py").write_text("from ..low import f\n")
    (pkg / "sub" / "lazy.py").write_text("def g():\n    from ih_sweep.low import _secret\n")
    (pkg / "top.py").write_text("from ih_sweep.sub import deep\nimport ih_sweep.low as low\n"
                                "low._secret\n"
                                "if __name__ == '__main__':\n    import ih_sweep.sub.lazy\n")
    graph = import_graph(tmp_path)
    assert set(graph["ih_sweep.sub.deep"]) == {"ih_sweep.low"}
    assert graph["ih_sweep.sub.lazy"] == {"ih_sweep.low": {"_secret"}}
    assert set(graph["ih_sweep.top"]) == {"ih_sweep.sub.deep", "ih_sweep.low"}
    assert private_imports(graph) == ["ih_sweep.sub.lazy imports ih_sweep.low._secret"]
    assert private_attributes(tmp_path) == ["ih_sweep.top uses ih_sweep.low._secret"]


def test_every_package_and_subpackage_is_walked():
    modules = set(module_files())
    subpackages = {p.parent for p in (ROOT / "ih_sweep").rglob("*/__init__.py")}
    assert len(subpackages) >= 8, subpackages  # the stages: config, model, data, ...
    for folder in subpackages:
        parts = folder.relative_to(ROOT).parts
        assert ".".join(parts) in modules
    assert "hydra_plugins.ih_sweep_launcher.resilient" in modules


def test_no_import_cycle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_another_modules_private_names():
    graph = import_graph()
    assert private_imports(graph) + private_attributes() == []


def test_no_module_is_longer_than_500_lines():
    long = {m: n for m, p in module_files().items()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_config_does_not_import_torch():
    code = ("import sys, pkgutil, importlib, ih_sweep.config as c\n"
            "for m in pkgutil.iter_modules(c.__path__): importlib.import_module("
            "'ih_sweep.config.' + m.name)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "False", out.stderr
