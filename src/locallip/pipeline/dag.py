"""The pipeline graph: every stage's inputs, outputs, tracked settings and command, in one place.

    download --> train --> calibrate --> certify (one job per radius) --> report

The Snakemake rules (``workflow/rules/*.smk``), the DVC generator
(``workflow/scripts/dvc_pipeline.py``) and the report's "how to reproduce"
section all read ``job(...)`` and ``command(...)`` from here, so a stage's
command is written once. A stage also depends on the package code it runs
(``code_deps``: its own module and the core it imports; the pipeline package
itself is infrastructure whose changes do not alter results).

No torch is imported here: orchestrators parse the graph without it.
"""
from __future__ import annotations

import ast
import hashlib
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from . import layout
from .config import STAGES, Config, ConfigError, compose, experiment_names, plain, radius_tag, stage_config

PACKAGE = "locallip"
SRC_DIR = Path("src") / PACKAGE
#: Stage -> the package module it runs.
STAGE_MODULES = {"download": "stages.download", "train": "stages.train", "calibrate": "stages.calibrate",
                 "certify": "stages.certify", "radii": "stages.radii", "report": "stages.report"}
#: Module prefixes whose changes never change a stage's results: the pipeline (CLI, composition,
#: layout, file helpers; settings are tracked as parameters, paths as file names) and the package root.
INFRA_PREFIXES = ("pipeline",)
INFRA_MODULES = frozenset({""})
RADIUS_TAG_RE = r"[0-9]+(\.[0-9]+)?(e[-+]?[0-9]+)?"


# --------------------------------------------------------------------------- code dependencies


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


def code_deps(stage: str, src_dir: Path = SRC_DIR) -> List[str]:
    """Source files (paths as given by ``src_dir``) whose changes must rerun ``stage``.

    The stage module plus, transitively, every package module it imports (and the
    ``__init__`` of their packages), minus the infrastructure. Sorted.
    """
    if stage not in STAGE_MODULES:
        raise ConfigError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    src_dir = Path(src_dir)
    start = STAGE_MODULES[stage]
    if _module_file(start, src_dir) is None:
        raise ConfigError(f"stage {stage!r} runs module {start}, which is not in {src_dir}")
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


def code_version(stage: str) -> str:
    """Digest of the code ``stage`` runs (file names and contents of ``code_deps``), from the
    installed package: a checkpoint or certificate records it, and resuming requires it."""
    src = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in code_deps(stage, src):
        h.update(Path(f).relative_to(src).as_posix().encode() + b"\0" + Path(f).read_bytes() + b"\0")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- orchestration settings


def normalize_settings(settings: Mapping) -> dict:
    """Defaults and type checks of the orchestration settings (``experiments``, ``overrides``,
    ``experiment_overrides``), as the workflow's JSON schema states them."""
    unknown = set(settings) - {"experiments", "overrides", "experiment_overrides"}
    if unknown:
        raise ConfigError(f"unknown workflow setting(s): {', '.join(sorted(unknown))}")
    experiments = settings.get("experiments", ["mnist5k", "mnist5k_r158"])
    overrides = settings.get("overrides", []) or []
    per = settings.get("experiment_overrides", {}) or {}

    def strings(x, what):
        if not isinstance(x, (list, tuple)) or not all(isinstance(s, str) for s in x):
            raise ConfigError(f"{what} must be a list of strings, got {x!r}")
        return list(x)

    experiments = strings(experiments, "experiments")
    overrides = strings(overrides, "overrides")
    if not isinstance(per, Mapping):
        raise ConfigError(f"experiment_overrides must be a mapping, got {per!r}")
    per = {str(k): strings(v, f"experiment_overrides[{k}]") for k, v in per.items()}
    return {"experiments": experiments, "overrides": overrides, "experiment_overrides": per}


def load_settings(configfile: Optional[Path] = None) -> dict:
    """The Snakemake configuration file's settings (``workflow/config/config.yaml`` by default)."""
    import yaml

    path = Path(configfile or SNAKEMAKE_CONFIG)
    if configfile is not None and not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) if path.is_file() else {}
    return normalize_settings(data or {})


SNAKEMAKE_CONFIG = Path("workflow") / "config" / "config.yaml"


def compose_all(overrides: Sequence[str] = (), experiment_overrides: Optional[Mapping] = None,
                names: Optional[Iterable[str]] = None, config_dir: Optional[Path] = None,
                first: Optional[Iterable[str]] = None) -> Dict[str, Config]:
    """Compose and validate every experiment once: ``{name: Config}``.

    ``overrides`` apply to every experiment, ``experiment_overrides[name]`` to one;
    ``first`` are composed first (so an error names an experiment the user asked for).
    """
    known = experiment_names(config_dir)
    experiment_overrides = dict(experiment_overrides or {})
    unknown = sorted(set(experiment_overrides) - set(known))
    if unknown:
        raise ConfigError(f"experiment_overrides names unknown experiment(s) {', '.join(unknown)}; "
                          f"known: {', '.join(known)}")
    names = list(known if names is None else names)
    first = [n for n in (first or ()) if n in names]
    names = first + [n for n in names if n not in first]
    for n in names:
        if n not in known:
            raise ConfigError(f"unknown experiment {n!r}; known: {', '.join(known)}")
    cfgs: Dict[str, Config] = {}
    for n in names:
        try:
            cfgs[n] = compose(n, list(overrides) + list(experiment_overrides.get(n, [])), config_dir)
        except ConfigError as e:
            raise ConfigError(f"experiment {n}: {e}") from None
        if cfgs[n].name != n:
            raise ConfigError(f"experiment {n}: its name is {cfgs[n].name!r}; "
                              f"results/<name>/ must match config/experiment/{n}.yaml")
    for n, cfg in cfgs.items():
        b = cfg.report.baseline
        if b is not None and b not in known:
            raise ConfigError(f"experiment {n}: report.baseline {b!r} is not an experiment; "
                              f"known: {', '.join(known)}")
    return cfgs


def with_baselines(names: Iterable[str], cfgs: Mapping[str, Config]) -> List[str]:
    """``names`` plus the experiments their reports show side by side, transitively, in order."""
    out: List[str] = []
    todo = list(names)
    while todo:
        n = todo.pop(0)
        if n in out:
            continue
        if n not in cfgs:
            raise ConfigError(f"unknown experiment {n!r}")
        out.append(n)
        if cfgs[n].report.baseline is not None:
            todo.append(cfgs[n].report.baseline)
    return out


def radii(cfg: Config) -> List[float]:
    return [float(r) for r in cfg.certify.radii]


def certify_radii(cfgs: Mapping[str, Config], names: Sequence[str]) -> Dict[str, List[float]]:
    """Radii each experiment is certified at: its own, plus those of the reports that show it
    as their baseline (a report compares both at the main experiment's radii)."""
    out = {n: radii(cfgs[n]) for n in names}
    for n in names:
        b = cfgs[n].report.baseline
        if b is not None and b in out:
            out[b] += [r for r in radii(cfgs[n]) if r not in out[b]]
    return out


def parse_radius_tag(tag: str) -> float:
    """A file-name radius tag back to the radius; only the canonical spelling is accepted."""
    try:
        r = float(tag)
    except ValueError:
        raise ConfigError(f"radius tag {tag!r} is not a number") from None
    if radius_tag(r) != tag:
        raise ConfigError(f"radius tag {tag!r} is not canonical; use {radius_tag(r)!r}")
    return r


# --------------------------------------------------------------------------- jobs


@dataclass
class Job:
    """One stage of one experiment (and radius): what it reads, writes and is configured with."""

    stage: str
    experiment: str
    radius: Optional[float]
    inputs: Dict[str, List[str]]  # named groups of files (data, model, code, ...)
    outputs: Dict[str, str]  # named files the stage writes
    params: dict  # the stage's tracked settings (plain values)
    options: Dict[str, str] = field(default_factory=dict)  # untracked CLI paths (resume state, baseline dir)


def outputs(stage: str, name: str, radius=None) -> Dict[str, str]:
    """The files ``stage`` writes for experiment ``name`` (and ``radius``); names and radii may be
    wildcard patterns ('{experiment}', '{radius}'), as Snakemake's rules use them."""
    if stage == "download":
        return {"out": str(layout.splits(name))}
    if stage == "train":
        return {"out": str(layout.model(name)), "metrics": str(layout.train_metrics(name))}
    if stage == "calibrate":
        return {"out": str(layout.calibrated_model(name)), "summary": str(layout.calibration(name))}
    if stage == "certify":
        return {"out": str(layout.certificate(name, radius)), "table": str(layout.certificate_table(name, radius))}
    if stage == "radii":
        return {"out": str(layout.radii_table(name))}
    if stage == "report":
        return report_outputs(name)
    raise ConfigError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")


def job(cfgs: Mapping[str, Config], name: str, stage: str, radius: Optional[float] = None,
        src_dir: Path = SRC_DIR) -> Job:
    """The job of ``stage`` for experiment ``name`` (and ``radius`` for certify)."""
    cfg = cfgs[name]
    code = code_deps(stage, src_dir)
    splits = str(layout.splits(name))
    if stage == "certify" and radius is None:
        raise ConfigError("certify needs a radius")
    outs = outputs(stage, name, radius)
    if stage == "download":
        return Job(stage, name, None, {"code": code}, outs, plain(stage_config(cfg, stage)))
    if stage == "train":
        return Job(stage, name, None, {"data": [splits], "code": code}, outs, plain(stage_config(cfg, stage)),
                   {"state": str(layout.train_state(name))})
    if stage == "calibrate":
        return Job(stage, name, None, {"data": [splits], "model": [str(layout.model(name))], "code": code},
                   outs, plain(stage_config(cfg, stage)))
    if stage in ("certify", "radii"):
        return Job(stage, name, None if radius is None else float(radius),
                   {"data": [splits], "model": [str(layout.calibrated_model(name))], "code": code},
                   outs, plain(stage_config(cfg, stage, radius)))
    if stage == "report":
        rs = radii(cfg)
        inputs = {"metrics": [str(layout.train_metrics(name))], "calibration": [str(layout.calibration(name))],
                  "certificates": [str(layout.certificate(name, r)) for r in rs],
                  "tables": [str(layout.certificate_table(name, r)) for r in rs],
                  "radii": [str(layout.radii_table(name))] if cfg.certify.curve else [],
                  "baseline": [], "code": code}
        options = {"experiment-dir": str(layout.experiment_dir(name))}
        b = cfg.report.baseline
        if b is not None:
            inputs["baseline"] = ([str(layout.train_metrics(b)), str(layout.calibration(b))]
                                  + [str(layout.certificate(b, r)) for r in rs]
                                  + ([str(layout.radii_table(b))] if (cfgs[b] if b in cfgs else cfg).certify.curve
                                     else []))
            options["baseline-dir"] = str(layout.experiment_dir(b))
        return Job(stage, name, None, inputs, outs, plain(stage_config(cfg, stage)), options)
    raise ConfigError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")


def report_outputs(name: str) -> Dict[str, str]:
    return {"out": str(layout.report(name)), "training_plot": str(layout.training_plot(name)),
            "diagnostics_plot": str(layout.diagnostics_plot(name)), "radius_plot": str(layout.radius_plot(name)),
            "steps_table": str(layout.steps_table(name))}


#: CLI flag of each named output / input / option, per stage.
_FLAGS = {
    "download": {"out": "--out"},
    "train": {"data": "--data", "out": "--out", "metrics": "--metrics", "state": "--state"},
    "calibrate": {"data": "--data", "model": "--model", "out": "--out", "summary": "--summary"},
    "certify": {"data": "--data", "model": "--model", "out": "--out", "table": "--table"},
    "radii": {"data": "--data", "model": "--model", "out": "--out"},
    "report": {"experiment-dir": "--experiment-dir", "baseline-dir": "--baseline-dir", "out": "--out"},
}


#: Stages that run data-parallel under torchrun when ``run.processes`` > 1.
PARALLEL_STAGES = ("train", "certify", "radii")


def command(j: Job, source: str = "json", *, params_file: str = "params.yaml",
            overrides: Sequence[str] = (), processes: int = 1) -> List[str]:
    """The ``locallip`` command line (argv) that runs job ``j``.

    source="json": the settings inline (``--cfg-json``; Snakemake tracks them as params);
    source="params": read from ``params_file`` under ``<experiment>.<stage>`` (DVC);
    source="experiment": composed again from ``config/`` (``experiment=NAME`` plus ``overrides``).
    ``processes`` > 1 launches a parallel stage with torchrun on one node (one process per GPU).
    """
    argv = ["locallip", j.stage]
    if processes > 1 and j.stage in PARALLEL_STAGES:
        argv = ["torchrun", "--standalone", f"--nproc-per-node={processes}", "--no-python"] + argv
    if source == "json":
        argv += ["--cfg-json", json.dumps(j.params, sort_keys=True, separators=(",", ":"))]
    elif source == "params":
        argv += ["--cfg-file", params_file, "--cfg-key", f"{j.experiment}.{j.stage}"]
    elif source == "experiment":
        argv += [f"experiment={j.experiment}", *overrides]
    else:
        raise ValueError(f"unknown command source {source!r}")
    if j.radius is not None:
        argv += ["--radius", radius_tag(j.radius)]
    flags = _FLAGS[j.stage]
    if source != "experiment":  # composed runs use the default layout
        for group in ("data", "model"):
            if group in j.inputs and group in flags:
                argv += [flags[group], j.inputs[group][0]]
        for key, value in list(j.outputs.items()) + list(j.options.items()):
            if key in flags:
                argv += [flags[key], value]
    return argv


def shell(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def params_block(cfg: Config, stage: str) -> dict:
    """A stage's block of params.yaml; certify's is shared by all radii (the radius is a flag)."""
    if stage == "certify":
        p = plain(stage_config(cfg, stage, 0.0))
        p.pop("radius")
        return p
    return plain(stage_config(cfg, stage))
