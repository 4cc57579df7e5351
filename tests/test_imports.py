"""The import graph, read from the files' own import statements: no cycle, no arrow from a library module back
up to an entry point, first-party imports at the top of each file, and an inference tool that does not pull in
the trainer."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Programs run from the command line; everything else is a library module they build on.
ENTRY_POINTS = {"train", "predict", "selftest", "synthetic", "prepare_ctich"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _first_party_files() -> dict[str, Path]:
    files = [*ROOT.glob("*.py"), *ROOT.glob("data/*.py"), *ROOT.glob("modeling/*.py"), *ROOT.glob("bench/*.py")]
    return {_module_name(path): path for path in files}


MODULES = _first_party_files()


def _is_entry_point(module: str) -> bool:
    return module in ENTRY_POINTS or module.startswith("bench.")


def _resolve(name: str) -> str | None:
    """The first-party module ``name`` refers to (``data.io``, ``model``, the ``data`` package), or None."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(first-party module imported, whether the statement sits at the top level of the file)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from data import io`` names a module; ``from data.io import x`` names something inside one.
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            module = _resolve(name)
            if module is not None:
                found.append((module, id(node) in top_level))
    return found


GRAPH = {module: sorted({target for target, _ in _imports(path)} - {module}) for module, path in MODULES.items()}


def test_the_graph_covers_the_project():
    assert {"train", "predict", "dataloader", "data.io", "data.preprocess", "model", "modeling.checkpoint",
            "reporting", "memory", "utils", "bench.data_bench"} <= set(MODULES)
    assert "data.io" in GRAPH["data.cohort"] and "model" in GRAPH["predict"]


def test_no_import_cycle():
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in GRAPH[module]:
            if state.get(target) == "open":
                cycle = trail[trail.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_library_modules_never_import_an_entry_point():
    arrows = [f"{module} -> {target}" for module, targets in GRAPH.items() if not _is_entry_point(module)
              for target in targets if _is_entry_point(target)]
    assert arrows == []


def test_first_party_imports_sit_at_the_top_of_each_file():
    hidden = [f"{module} imports {target} inside a function or class" for module, path in MODULES.items()
              for target, at_top in _imports(path) if not at_top]
    assert hidden == []


def test_predict_does_not_depend_on_the_trainer():
    reachable, todo = set(), ["predict"]
    while todo:
        for target in GRAPH[todo.pop()]:
            if target not in reachable:
                reachable.add(target)
                todo.append(target)
    assert "trainer" not in reachable and "train" not in reachable
