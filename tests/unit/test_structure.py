"""The package's shape: which way dependencies flow, small modules, one home per concept.

* the core (nn, bounds, certify, losses, attack) never imports the stages or the pipeline;
* the pipeline package imports no torch (orchestrators parse the graph without it);
* the data catalog and the network catalog import without torch (the configuration reads them);
* no module is much longer than 400 lines.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "locallip"
CORE = ("nn", "bounds", "certify", "losses", "attack")
MAX_LINES = 420


def _modules(*roots):
    for root in roots:
        path = SRC / root
        yield from (sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")])


def _imports(path: Path, top_level_only: bool = False):
    """Absolute dotted names of the package modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(SRC.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                out.append(".".join(base + (node.module.split(".") if node.module else [])))
            elif node.module:
                out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


@pytest.mark.parametrize("path", list(_modules(*CORE)), ids=lambda p: str(p.relative_to(SRC)))
def test_core_never_imports_stages_or_pipeline(path):
    bad = [m for m in _imports(path) if m.startswith(("locallip.stages", "locallip.pipeline"))]
    assert not bad, f"{path.relative_to(SRC)} imports {bad}"


@pytest.mark.parametrize("path", list(_modules("pipeline")), ids=lambda p: str(p.relative_to(SRC)))
def test_pipeline_imports_no_torch_at_import_time(path):
    bad = [m for m in _imports(path, top_level_only=True)
           if m.split(".")[0] in ("torch", "torchvision", "numpy")
           or m.startswith(("locallip.stages", "locallip.bounds", "locallip.nn.models", "locallip.nn.activations",
                            "locallip.certify", "locallip.data.splits", "locallip.data.sources"))]
    assert not bad, f"{path.relative_to(SRC)} imports {bad} at import time"


def test_pipeline_and_catalogs_load_without_torch():
    code = ("import sys; import locallip.pipeline.config, locallip.pipeline.dag, locallip.pipeline.cli, "
            "locallip.pipeline.layout, locallip.pipeline.files, locallip.pipeline.checkpoints, "
            "locallip.nn.catalog, locallip.data.catalog; "
            "print(sorted(m for m in ('torch', 'torchvision', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_modules_are_small(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(SRC)} has {n} lines"


def test_no_module_shadows_the_standard_library():
    names = {p.stem for p in SRC.rglob("*.py")}
    assert not names & {"io", "json", "random", "types", "typing", "copy", "csv", "logging"}
