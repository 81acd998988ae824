"""The code depends one way: foundation (inside workbench/) → methods (adapters/, merge/, quant/)
→ orchestration (the recipe union, stages, CLI, jobs, UI). Read from the source with `ast`, every
import counted, module-level and inside functions alike."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("workbench", "adapters", "merge", "quant")
ORCHESTRATION = {"workbench.recipes", "workbench.stages", "workbench.cli", "workbench.jobs",
                 "workbench.base", "workbench.demo", "workbench.exporting", "workbench.__main__"}
METHOD_PACKAGES = ("adapters", "merge", "quant")

def layer(module: str) -> str:
    if module.startswith("workbench.ui") or module in ORCHESTRATION:
        return "orchestration"
    if module.startswith("workbench"):
        return "foundation"
    return "method"


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (a package's submodule when `from pkg import sub`)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                prefix = package[:len(package) - (node.level - 1)]
                base = ".".join(prefix + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert [sorted(c) for c in cycles(graph())] == []


def test_the_foundation_imports_no_method_and_methods_no_orchestration():
    wrong = [(m, t) for m, targets in graph().items() for t in targets
             if (layer(m) == "foundation" and layer(t) != "foundation")
             or (layer(m) == "method" and layer(t) == "orchestration")]
    assert wrong == []


def test_no_private_name_is_imported_across_modules():
    known = modules()
    found = []
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                found += [f"{name}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []


def test_the_checker_sees_cycles_and_layers():
    """The graph code itself, on a hand-made example: a → b → c → a is one cycle; d is alone."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [frozenset({"a", "b", "c"})]
    assert layer("workbench.models") == "foundation" and layer("workbench.ui.app") == "orchestration"
    assert layer("merge.dense") == "method" and layer("workbench.stages") == "orchestration"
