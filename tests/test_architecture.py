"""The shape of the code base: checked by walking the installed packages.

* no module imports itself back through others (no import cycle), counting imports inside
  functions too;
* no package attribute hides a submodule of the same name;
* no file over 400 lines and no function over 80;
* the folders tracer/ and criteria/ are imported only as graphprune.tracer and
  graphprune.criteria (a plain ``import tracer`` would load a second copy of them).
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import networkx as nx
import pytest

import graphprune

MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules() -> dict:
    """Every module of graphprune (and of the packages installed inside its namespace): name -> file."""
    found = {"graphprune": Path(graphprune.__file__)}
    for info in pkgutil.walk_packages(graphprune.__path__, "graphprune."):
        spec = importlib.util.find_spec(info.name)
        found[info.name] = Path(spec.origin)
    return found


MODULES = _modules()


def _imported(name: str, path: Path) -> set:
    """The graphprune modules that the module ``name`` at ``path`` imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    return {t for t in targets if t in MODULES and t != name}


def test_no_import_cycle():
    graph = nx.DiGraph()
    for name, path in MODULES.items():
        graph.add_node(name)
        graph.add_edges_from((name, target) for target in _imported(name, path)
                             if not (name.startswith(target + ".")))  # a module may import its own package
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, cycles[:5]


def test_the_pipeline_stages_never_reach_back_to_the_entry_points():
    """tracer/, analysis/, criteria/, pruning/ and reporting/ feed the entry points (api,
    session, workflow, cli), never the other way round: a measure or a report never analyses."""
    stages = ("graphprune.tracer", "graphprune.analysis", "graphprune.criteria", "graphprune.pruning",
              "graphprune.reporting")
    entry_points = ("graphprune.api", "graphprune.session", "graphprune.workflow", "graphprune.cli")
    back = {(name, target) for name, path in MODULES.items() if name.startswith(stages)
            for target in _imported(name, path) if target.startswith(entry_points)}
    assert not back, sorted(back)


def test_no_attribute_shadows_a_submodule():
    shadowed = []
    for name, path in MODULES.items():
        if path.name != "__init__.py":
            continue
        package = importlib.import_module(name)
        for child in (n for n in MODULES if n.rpartition(".")[0] == name):
            attribute = child.rpartition(".")[2]
            value = vars(package).get(attribute)
            if value is not None and value is not importlib.import_module(child):
                shadowed.append(f"{name}.{attribute} is {type(value).__name__}, not the submodule")
    assert not shadowed


@pytest.mark.parametrize("name", sorted(MODULES))
def test_files_and_functions_are_short(name):
    path = MODULES[name]
    text = path.read_text()
    assert text.count("\n") <= MAX_FILE_LINES, f"{path}: {text.count(chr(10))} lines"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path}: {long}"


def test_tracer_and_criteria_are_imported_inside_graphprune_only():
    roots = [*MODULES.values(), *Path(__file__).parent.glob("*.py"), *(Path(__file__).parent.parent / "benchmarks").glob("*.py")]
    stray = []
    for path in roots:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            stray += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in ("tracer", "criteria")]
    assert not stray
