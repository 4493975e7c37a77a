"""Imports flow one way: cli -> spec -> launchers -> engine (the foundation modules serve all)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["cli", "spec", "launchers", "engine"]
# Importable from every layer: schemas, errors, paths, the spec.yaml reader, machine facts, model families.
FOUNDATION = {"qlorax", "qlorax.schema", "qlorax.errors", "qlorax.paths", "qlorax.specfile", "qlorax.hardware",
              "qlorax.runstatus", "qlorax.families", "qlorax.runlock"}


def layer_of(module: str) -> str | None:
    if module.startswith("qlorax.cli") or module == "qlorax.__main__":
        return "cli"
    if module.startswith("qlorax.launchers"):
        return "launchers"
    if module.startswith("qlorax.engine"):
        return "engine"
    if module in ("qlorax.spec", "qlorax.memory"):
        return "spec"
    return None


def module_files():
    for path in (REPO / "qlorax").rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        yield ".".join(rel.parts).replace(".__init__", ""), path
    for path in (REPO / "launchers").rglob("*.py"):
        rel = path.relative_to(REPO / "launchers").with_suffix("")
        yield ".".join(("qlorax", "launchers") + rel.parts).replace(".__init__", ""), path


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n.startswith("qlorax")}


def test_imports_flow_one_way():
    violations = []
    for module, path in module_files():
        mine = layer_of(module)
        for name in imported(path):
            theirs = layer_of(name)
            if mine is None and theirs is not None:
                violations.append(f"foundation module {module} imports {name} ({theirs})")
            elif mine is not None and theirs is not None and LAYERS.index(theirs) < LAYERS.index(mine):
                violations.append(f"{module} ({mine}) imports {name} ({theirs})")
    assert not violations, "\n".join(violations)


def test_the_check_catches_a_backward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from qlorax.launchers import launch\nimport qlorax.spec\n")
    found = {layer_of(n) for n in imported(bad)}
    assert {"launchers", "spec"} <= found
    assert all(LAYERS.index(t) < LAYERS.index("engine") for t in found if t)


def test_launchers_import_under_qlorax_namespace():
    import importlib.util

    import qlorax.launchers

    assert Path(qlorax.launchers.__file__).parent.name == "launchers"
    assert importlib.util.find_spec("launchers") is None or "site-packages" not in str(
        importlib.util.find_spec("launchers").origin), "launchers must not install as a top-level package"


def module_graph() -> dict[str, set[str]]:
    """Module -> the qlorax modules it imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    modules = dict(module_files())
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("qlorax"))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qlorax"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in modules else node.module)
        graph[module] = {t for t in targets if t in modules and t != module}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or through others (Tarjan's SCCs of size > 1)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles():
    """No pair (or ring) of modules imports each other, not even through a function-level import."""
    assert import_cycles(module_graph()) == []


def test_the_cycle_check_catches_a_ring():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
