"""The package's shape: floors, which way dependencies flow, no cycles, small modules and functions.

Floors, lowest first (a module may import from its own floor or any lower one, never a higher):

* 0 foundation: ``foundation`` (schema, composition, files, checkpoints, layout, provenance), torch-free;
* 1 library: ``nn``, ``bounds``, ``certify``, ``training``, ``losses``, ``attack``, ``data``, ``distributed``;
* 2 stages: ``stages``;
* 3 orchestration: ``pipeline`` (the stage table, the graph, the CLI, the DVC generator).

Imports inside functions count too: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "locallip"
FLOORS = {"foundation": 0, "nn": 1, "bounds": 1, "certify": 1, "training": 1, "losses": 1, "attack": 1, "data": 1,
          "distributed": 1, "stages": 2, "pipeline": 3}
MAX_LINES = 400
MAX_FUNCTION_LINES = 80
MAX_PUBLIC_PARAMETERS = 10  # settings objects carry the rest (bounds.NormSettings, certify.CascadeSettings)


def _name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
    return ".".join(parts)


MODULES: Dict[str, Path] = {_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _resolve(candidate: str) -> str:
    """The package module a dotted name refers to (a name imported from a module resolves to that module)."""
    while candidate and candidate not in MODULES:
        candidate = candidate.rsplit(".", 1)[0] if "." in candidate else ""
    return candidate


def imports(module: str, top_level_only: bool = False) -> Set[str]:
    """The locallip modules ``module`` imports (relative imports resolved; ``from p import m`` gives p.m)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: Set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                mod = ".".join(base + (node.module.split(".") if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "locallip":
                continue
            for a in node.names:
                out.add(_resolve(f"{mod}.{a.name}"))
        elif isinstance(node, ast.Import):
            out |= {_resolve(a.name) for a in node.names if a.name.split(".")[0] == "locallip"}
    return {m for m in out if m and m != module}


def _floor(module: str) -> int:
    parts = module.split(".")
    return FLOORS.get(parts[1], -1) if len(parts) > 1 else -1  # -1: the package root (its version)


@pytest.mark.parametrize("module", sorted(MODULES), ids=str)
def test_no_import_from_a_lower_floor_to_a_higher_one(module):
    me = _floor(module)
    bad = sorted(m for m in imports(module) if _floor(m) > me >= 0)
    assert not bad, f"{module} (floor {me}) imports {bad} from a higher floor"


def test_every_package_has_a_floor():
    tops = {m.split(".")[1] for m in MODULES if "." in m}
    assert tops <= set(FLOORS), f"modules without a floor: {tops - set(FLOORS)}"


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_between_files():
    graph = {m: imports(m) for m in MODULES}
    # A package's __init__ re-exporting its own modules is not a cycle of the code's logic.
    for m in graph:
        graph[m] = {d for d in graph[m] if not (MODULES[d].name == "__init__.py" and m.startswith(d + "."))}
    assert not _cycles(graph), _cycles(graph)


def test_no_import_cycles_between_packages():
    graph: Dict[str, Set[str]] = {}
    for m in MODULES:
        if m.count(".") < 1:
            continue
        top = m.split(".")[1]
        graph.setdefault(top, set()).update(d.split(".")[1] for d in imports(m) if d.count(".") >= 1
                                            and d.split(".")[1] != top)
    assert not _cycles(graph), _cycles(graph)


def test_the_foundation_and_the_orchestration_load_without_torch():
    mods = [m for m in MODULES if m.startswith(("locallip.foundation", "locallip.pipeline"))]
    code = ("import sys; " + "; ".join(f"import {m}" for m in mods)
            + "; print(sorted(m for m in ('torch', 'torchvision', 'numpy', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("locallip.foundation")), ids=str)
def test_the_foundation_imports_nothing_above_it(module):
    above = sorted(m for m in imports(module) if not m.startswith("locallip.foundation") and m != "locallip")
    assert not above, f"{module} imports {above}"


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_modules_are_small(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(SRC)} has {n} lines"


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_functions_are_short(path):
    tree = ast.parse(path.read_text())
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.relative_to(SRC)}: {long}"


def _parameters(node: ast.FunctionDef) -> int:
    a = node.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    return len(names) - (1 if names[:1] in (["self"], ["cls"]) else 0)


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_public_functions_take_few_parameters(path):
    tree = ast.parse(path.read_text())
    many = [(n.name, _parameters(n)) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and not n.name.startswith("_")
            and _parameters(n) > MAX_PUBLIC_PARAMETERS]
    assert not many, f"{path.relative_to(SRC)}: {many} (pass a settings object)"


def test_the_structure_checks_can_fail(tmp_path):
    """The checks above are not vacuous: a long function with many parameters is caught."""
    args = ", ".join(f"a{i}" for i in range(MAX_PUBLIC_PARAMETERS + 1))
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES + 1))
    tree = ast.parse(f"def public({args}):\n{body}\n")
    node = tree.body[0]
    assert _parameters(node) > MAX_PUBLIC_PARAMETERS
    assert node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES


def test_no_module_shadows_the_standard_library():
    names = {p.stem for p in SRC.rglob("*.py")}
    assert not names & {"io", "json", "random", "types", "typing", "copy", "csv", "logging"}
