"""No import circles, in any package: a module that two others need lives in a module
both import (lab/trials/probing.py), and a probe's command-line program is its
package's __main__.py, never the loader importing the tool machinery back. Checked from
the source, every import statement (function-level ones too), as
tests/test_import_rules.py checks who may import whom; no module is exempt."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("device", "workloads", "probes", "fuzz", "fmt", "system", "reports", "lab", "benchmarks", "scripts")


def module_names(root: Path, rooms: tuple[str, ...]) -> dict[str, Path]:
    out = {}
    for room in rooms:
        for f in (root / room).rglob("*.py"):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (a submodule importing its own package's
    __init__ is not counted: Python has already run it)."""
    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, f in modules.items():
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                r = resolve(t)
                if r and r != m and not m.startswith(r + "."):
                    graph[m].add(r)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles_in_any_package():
    modules = module_names(ROOT, ROOMS)
    assert "probes.kicks" in modules and "lab.trials.model.runner" in modules and "device.vmm.process" in modules
    found = circles(import_graph(modules))
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_check_sees_a_circle_through_a_function_level_import(tmp_path):
    """The checker itself: a loader whose main block imports the tool that imports it."""
    (tmp_path / "probes").mkdir()
    (tmp_path / "probes" / "__init__.py").write_text("")
    (tmp_path / "probes" / "tool.py").write_text("from probes.loader import Probe\n")
    (tmp_path / "probes" / "loader.py").write_text(
        "class Probe: ...\n\nif __name__ == '__main__':\n    from probes.tool import main\n")
    found = circles(import_graph(module_names(tmp_path, ("probes",))))
    assert found == [["probes.loader", "probes.tool"]]
