"""The pipeline graph, from the stage table: every job's inputs, outputs, tracked settings and command.

The Snakemake rules (``workflow/rules/stages.smk``), the DVC generator (``pipeline.dvc``)
and the report's "how to reproduce" section all read ``job(...)`` and ``command(...)``
from here, so a stage's command is written once. A stage also depends on the package
code it runs (``provenance.code_deps``: its own module and the core it imports).

No torch is imported here: orchestrators parse the graph without it.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

from ..foundation.compose import compose, experiment_names, plain
from ..foundation.provenance import SRC_DIR, code_deps
from ..foundation.ranges import parse_radius_tag, radius_tag  # noqa: F401 (re-exported for the rules)
from ..foundation.schema import Config, ConfigError
from .table import NAMES, STAGES, Stage, stage

RADIUS_TAG_RE = r"[0-9]+(\.[0-9]+)?(e[-+]?[0-9]+)?"
SNAKEMAKE_CONFIG = Path("workflow") / "config" / "config.yaml"
SETTINGS_SCHEMA = Path("workflow") / "schemas" / "config.schema.yaml"


# --------------------------------------------------------------------------- orchestration settings


def _schema_file() -> Path:
    here = Path.cwd() / SETTINGS_SCHEMA
    return here if here.is_file() else Path(__file__).resolve().parents[3] / SETTINGS_SCHEMA


def normalize_settings(settings: Mapping) -> dict:
    """The orchestration settings (``experiments``, ``overrides``, ``experiment_overrides``) checked
    against the workflow's JSON schema (the one Snakemake validates its config with), defaults filled in."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(_schema_file().read_text())
    data = dict(settings)
    try:
        jsonschema.validate(data, schema)
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "the workflow settings"
        raise ConfigError(f"workflow setting {where}: {e.message}") from None
    for key, spec in schema["properties"].items():
        data.setdefault(key, json.loads(json.dumps(spec.get("default"))))
    return data


def load_settings(configfile: Optional[Path] = None) -> dict:
    """The Snakemake configuration file's settings (``workflow/config/config.yaml`` by default)."""
    import yaml

    path = Path(configfile or SNAKEMAKE_CONFIG)
    if configfile is not None and not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) if path.is_file() else {}
    return normalize_settings(data or {})


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
        for b in cfg.report.baselines:
            if b not in known:
                raise ConfigError(f"experiment {n}: report.baselines names {b!r}, which is not an experiment; "
                                  f"known: {', '.join(known)}")
            if b == n:
                raise ConfigError(f"experiment {n}: report.baselines names the experiment itself")
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
        todo.extend(cfgs[n].report.baselines)
    return out


def radii(cfg: Config) -> List[float]:
    return [float(r) for r in cfg.certify.radii]


def certify_radii(cfgs: Mapping[str, Config], names: Sequence[str]) -> Dict[str, List[float]]:
    """Radii each experiment is certified at: its own, plus those of the reports that show it
    as a baseline (a report compares every system at the main experiment's radii)."""
    out = {n: radii(cfgs[n]) for n in names}
    for n in names:
        for b in cfgs[n].report.baselines:
            if b in out:
                out[b] += [r for r in radii(cfgs[n]) if r not in out[b]]
    return out


def needs(cfgs: Mapping[str, Config], names: Sequence[str], s: Stage, name: str) -> bool:
    """Whether experiment ``name`` runs stage ``s``: its own setting, or a report showing it needs it."""
    if s.enabled(cfgs[name]):
        return True
    return s.run_for_baselines and any(name in cfgs[m].report.baselines and s.enabled(cfgs[m]) for m in names)


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
    options: Dict[str, object] = field(default_factory=dict)  # untracked CLI paths (resume state, baseline dirs)


def outputs(stage_name: str, name: str, radius=None) -> Dict[str, str]:
    """The files ``stage`` writes for experiment ``name`` (and ``radius``); names and radii may be
    wildcard patterns ('{experiment}', '{radius}'), as Snakemake's rules use them."""
    return stage(stage_name).outputs(name, radius)


def job(cfgs: Mapping[str, Config], name: str, stage_name: str, radius: Optional[float] = None,
        src_dir: Optional[Path] = SRC_DIR) -> Job:
    """The job of ``stage`` for experiment ``name`` (and ``radius`` for a per-radius stage).

    ``src_dir`` is where the package's sources are, for the job's code inputs (None: leave them out,
    e.g. when only the settings or the command are wanted)."""
    s = stage(stage_name)
    if s.per_radius and radius is None:
        raise ConfigError(f"{s.name} needs a radius")
    settings = _job_settings(s, cfgs, name, radius if s.per_radius else None)
    inputs = dict(s.inputs(settings))
    inputs["code"] = code_deps(s.module, src_dir) if src_dir is not None else []
    return Job(s.name, name, float(radius) if s.per_radius else None, inputs,
               s.outputs(name, radius if s.per_radius else None), plain(settings), dict(s.options(settings)))


def _job_settings(s, cfgs: Mapping[str, Config], name: str, radius: Optional[float]):
    """Stage ``s``'s typed settings for one job; the report's also carry the commands that rebuild it."""
    settings = s.settings(cfgs, name, radius)
    if s.shows_reproduce_commands:
        settings.reproduce = reproduce_commands(cfgs, name)
    return settings


def reproduce_commands(cfgs: Mapping[str, Config], name: str) -> List[str]:
    """The stage commands (composed from config/) that rebuild experiment ``name``, in order."""
    out, last = [], []
    for s in STAGES:
        if s.shows_reproduce_commands:  # its job's settings hold this very list: not built here
            last.append(shell(["locallip", s.name, f"experiment={name}"]))
        elif s.enabled(cfgs[name]):
            for r in (radii(cfgs[name]) if s.per_radius else [None]):
                out.append(shell(command(job(cfgs, name, s.name, r, src_dir=None), "experiment")))
    return out + last


def jobs(cfgs: Mapping[str, Config], names: Sequence[str]) -> Iterator[Job]:
    """Every job the experiments ``names`` need (their baselines included in ``names``), in table order."""
    all_radii = certify_radii(cfgs, names)
    for n in names:
        for s in STAGES:
            if not needs(cfgs, names, s, n):
                continue
            for r in (all_radii[n] if s.per_radius else [None]):
                yield job(cfgs, n, s.name, r)


def command(j: Job, source: str = "json", *, params_file: str = "params.yaml",
            overrides: Sequence[str] = (), processes: int = 1) -> List[str]:
    """The ``locallip`` command line (argv) that runs job ``j``.

    source="json": the settings inline (``--cfg-json``; Snakemake tracks them as params);
    source="params": read from ``params_file`` under ``<experiment>.<stage>`` (DVC);
    source="experiment": composed again from ``config/`` (``experiment=NAME`` plus ``overrides``).
    ``processes`` > 1 launches a parallel stage with torchrun on one node (one process per GPU).
    """
    s = stage(j.stage)
    argv = ["locallip", j.stage]
    if processes > 1 and s.parallel:
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
    if source != "experiment":  # composed runs use the default layout
        given = {k: v[0] for k, v in j.inputs.items() if k in s.flags and v}
        given.update({k: v for k, v in list(j.outputs.items()) + list(j.options.items()) if k in s.flags})
        for key, flag in s.flags.items():
            value = given.get(key)
            for v in (value if isinstance(value, list) else [] if value is None else [value]):
                argv += [flag, str(v)]
    return argv


def shell(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def params_block(cfg: Config, stage_name: str, cfgs: Optional[Mapping[str, Config]] = None) -> dict:
    """A stage's block of params.yaml; a per-radius stage's block is shared by all radii (the radius is a flag)."""
    s = stage(stage_name)
    everything = dict(cfgs or {})
    everything[cfg.name] = cfg
    p = plain(_job_settings(s, everything, cfg.name, 0.0 if s.per_radius else None))
    if s.per_radius:
        p.pop("radius")
    return p


__all__ = ["Job", "NAMES", "RADIUS_TAG_RE", "SNAKEMAKE_CONFIG", "certify_radii", "command", "compose_all", "job",
           "jobs", "load_settings", "needs", "normalize_settings", "outputs", "params_block", "parse_radius_tag",
           "radii", "radius_tag", "shell", "with_baselines"]
