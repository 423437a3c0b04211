"""The package's dependencies point one way: no import cycles (function-level imports included), the
trainer imports no technique but through the catalog, and measure/ imports nothing above it."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "speedrun"


def _imports() -> dict[str, set[str]]:
    """module -> the speedrun modules it imports anywhere in its file (static: ast, every import statement)."""
    files = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for name, f in files.items():
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {t for t in found if t in files and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_import_cycles():
    assert _cycle(_imports()) is None


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_trainer_imports_techniques_only_through_the_catalog():
    allowed = {"speedrun.techniques", "speedrun.techniques.registry", "speedrun.techniques.optimizers",
               "speedrun.techniques.schedules"}  # the catalog, the optimizer registry, the LR schedule every run has
    used = {m for m in _imports()["speedrun.train.run"] if m.startswith("speedrun.techniques")}
    assert used <= allowed, used - allowed


def test_measure_imports_nothing_above_it():
    graph = _imports()
    for module, deps in graph.items():
        if module.startswith("speedrun.measure"):
            upward = {d for d in deps if d.startswith(("speedrun.techniques", "speedrun.train", "speedrun.models"))}
            assert not upward, (module, upward)
