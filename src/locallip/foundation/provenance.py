"""Provenance: which source files a stage's results depend on, and a digest of them.

A stage depends on the package code it runs: its own module and, transitively, what it
imports, minus the infrastructure (the foundation and the orchestration: settings are
tracked as parameters and paths as file names, so their code does not alter results).
A checkpoint or certificate records the digest (``code_version``); resuming requires it,
and the workflows list the files (``code_deps``) as inputs.
"""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path
from typing import Dict, List, Optional

from .schema import ConfigError

PACKAGE = "locallip"
SRC_DIR = Path("src") / PACKAGE
#: Packages whose changes never change a stage's results, and the package root.
INFRA_PREFIXES = ("foundation", "pipeline")
INFRA_MODULES = frozenset({""})


def _module_file(module: str, src_dir: Path) -> Optional[Path]:
    """The file of dotted package module ``module`` ('bounds.spectral'), or None."""
    if not module:
        path = src_dir / "__init__.py"
        return path if path.is_file() else None
    base = src_dir.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _package_imports(module: str, path: Path) -> set:
    """Dotted names of the package modules ``module`` (at ``path``) imports, at any depth.

    ``from .x import y`` may name a submodule ``y`` of package ``x``: both are candidates,
    and names that are not modules are dropped by the caller.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module.split(".") if module else []
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()

    def add(base: List[str], names) -> None:
        found.add(".".join(base))
        for a in names:
            found.add(".".join(base + a.name.split(".")))

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y / from . import x / from ..nn import z
                base = package[:len(package) - (node.level - 1)]
                add(base + (node.module.split(".") if node.module else []), node.names)
            elif node.module and node.module.split(".")[0] == PACKAGE:
                add(node.module.split(".")[1:], node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == PACKAGE and len(parts) > 1:
                    found.add(".".join(parts[1:]))
    return found


def _is_infra(module: str) -> bool:
    return module in INFRA_MODULES or module.split(".")[0] in INFRA_PREFIXES


def code_deps(module: str, src_dir: Path = SRC_DIR) -> List[str]:
    """Source files (paths as given by ``src_dir``) whose changes must rerun what ``module`` computes.

    The module ('stages.train') plus, transitively, every package module it imports (and the
    ``__init__`` of their packages), minus the infrastructure. Sorted.
    """
    src_dir = Path(src_dir)
    start = module
    if _module_file(start, src_dir) is None:
        raise ConfigError(f"module {start} is not in {src_dir}")
    files: Dict[str, Path] = {}
    seen: set = set()
    todo = [start]
    while todo:
        mod = todo.pop()
        if mod in seen or _is_infra(mod):
            continue
        seen.add(mod)
        path = _module_file(mod, src_dir)
        if path is None:
            continue  # an imported name that is not a module
        files[mod] = path
        parts = mod.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run first
        todo.extend(_package_imports(mod, path) - seen)
    return sorted(p.as_posix() for p in files.values())


def code_version(module: str) -> str:
    """Digest of the code ``module`` runs (file names and contents of ``code_deps``), from the
    installed package: a checkpoint or certificate records it, and resuming requires it."""
    src = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in code_deps(module, src):
        h.update(Path(f).relative_to(src).as_posix().encode() + b"\0" + Path(f).read_bytes() + b"\0")
    return h.hexdigest()[:16]
