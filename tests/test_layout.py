"""The package layout stays true: ops <- models <- repro, repro's rooms import only downwards, no import cycle.

Every import in every module counts, also the ones inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ops", "models", "repro")
# repro's rooms, lowest first; a module may import from its own room and the rooms below it. The base
# modules (the package itself, the one write mechanism, the vocabulary) sit below every room; the thin
# `python -m repro.X` entry modules sit above all of them.
ROOMS = ("repro.engine", "repro.measure", "repro.parity", "repro.synthetic", "repro.pipeline")
BASE = ("repro", "repro.io", "repro.vocabulary")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The project modules `name` imports (anywhere in the file)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the submodule when there is one, else a name of pkg.
            candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                          for alias in node.names]
        else:
            continue
        for candidate in candidates:
            # `import a.b.c` depends on the deepest project module that prefix names.
            parts = candidate.split(".")
            while parts and ".".join(parts) not in MODULES:
                parts.pop()
            if parts and ".".join(parts) != name:
                targets.add(".".join(parts))
    return targets


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _rank(module: str) -> int:
    """0 ops, 1 models, 2 repro base, 3.. the rooms in order, then the entry modules."""
    if module.split(".")[0] == "ops":
        return 0
    if module.split(".")[0] == "models":
        return 1
    if module in BASE:
        return 2
    for index, room in enumerate(ROOMS):
        if module == room or module.startswith(room + "."):
            return 3 + index
    return 3 + len(ROOMS)


def test_the_walk_sees_the_layout():
    """Guards the test itself: it finds the packages, the rooms and real edges between them."""
    assert {"ops.criss_cross", "models.ccnet", "repro.engine.runner", "repro.measure.claims",
            "repro.synthetic.ablation", "repro.pipeline.report", "repro.run"} <= set(MODULES)
    assert "repro.engine.config" in GRAPH["repro.measure.profile"]
    assert "models.synthetic" in GRAPH["repro.synthetic.ablation"]
    assert _rank("repro.run") > _rank("repro.pipeline.report") > _rank("repro.engine.config") > _rank("repro.io")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module):
    upward = sorted(target for target in GRAPH[module] if _rank(target) > _rank(module))
    assert not upward, f"{module} imports from a layer above it: {upward}"


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state:
            cycle = visit(module)
            assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_detects_a_cycle_and_an_upward_import():
    """The checks fail on the two faults they exist for (run on a made-up graph)."""
    fake = {"repro.engine.a": {"repro.pipeline.b"}, "repro.pipeline.b": {"repro.engine.a"}}
    globals_backup = dict(GRAPH)
    GRAPH.clear()
    GRAPH.update(fake)
    try:
        with pytest.raises(AssertionError, match="import cycle"):
            test_no_import_cycle()
        with pytest.raises(AssertionError, match="layer above"):
            test_no_upward_import("repro.engine.a")
    finally:
        GRAPH.clear()
        GRAPH.update(globals_backup)
