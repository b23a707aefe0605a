"""What the two orchestrators (Snakemake, DVC) share: one composition, one layout.

Both run the same five ``locallip`` CLI commands on the same paths
(``locallip.paths``) with the same per-stage configuration
(``locallip.config.stage_config``):

* Snakemake composes every experiment once at parse time (``compose_all``) and
  hands each job its stage configuration as a JSON string in ``params:``
  (``stage_json``), so Snakemake's params trigger sees every value.
* DVC reads the same stage configurations from ``params.yaml``; this module
  writes ``params.yaml`` and ``dvc.yaml`` from the same composition
  (``python -m locallip.orchestrate dvc``), so the two can never disagree.

Each stage also depends on the package source it runs (``code_deps``: the
stage module and everything it imports inside the package, except the
infrastructure modules in ``INFRA_MODULES`` whose changes do not alter results),
so e.g. a change to ``bounds.py`` reruns train onward and a change to
``report.py`` reruns only the report.

Neither orchestrator redoes the other's work:

* after ``snakemake``: ``python -m locallip.orchestrate commit`` records what
  Snakemake produced in ``dvc.lock`` (``dvc commit``) -- ``dvc repro`` then has
  nothing to do;
* after ``dvc pull`` (or ``dvc repro``): ``python -m locallip.orchestrate sync``
  checks that DVC's workspace matches ``dvc.lock`` and ``params.yaml`` matches
  the composition, then marks the files up to date for Snakemake
  (``snakemake --touch --forceall``, which also records its metadata) --
  ``snakemake -n`` then has nothing to do.

Typical use (from the repository root)::

    snakemake --cores 2                                  # mnist5k report (+ its GloRo baseline)
    snakemake --cores 2 results/smoke/report.md          # any results/<experiment>/report.md
    snakemake --cores 2 --config overrides='["train.epochs=5"]'   # targets before --config
    python -m locallip.orchestrate commit [train.epochs=5]  # after snakemake, same overrides
    dvc repro                                            # same pipeline under DVC (nothing to do now)
    dvc push                                             # default remote `local`
    git clone ... && dvc pull && python -m locallip.orchestrate sync   # snakemake -n: nothing to do

Commands::

    python -m locallip.orchestrate dvc    [-e EXP ...] [--configfile F] [--check] [OVERRIDE ...]
    python -m locallip.orchestrate commit [-e EXP ...] [--configfile F] [OVERRIDE ...]
    python -m locallip.orchestrate sync   [--cores N]
    python -m locallip.orchestrate code-deps [STAGE ...]
    python -m locallip.orchestrate stage-json EXPERIMENT STAGE [--radius R] [OVERRIDE ...]

``-e``/``OVERRIDE`` select experiments and add Hydra overrides on top of the
Snakemake config (``workflow/config/config.yaml`` or ``--configfile``); use the
same ones you gave Snakemake. ``params.yaml`` records them (``_orchestrate``),
so ``sync`` in a fresh clone needs no arguments.
"""
from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from . import paths
from .config import STAGES, ConfigError, compose, experiment_names, radius_tag, stage_config

PACKAGE = "locallip"
SRC_DIR = Path("src") / PACKAGE
#: Snakemake's default configuration; its ``experiments`` are also what ``dvc.yaml`` covers by default.
SNAKEMAKE_CONFIG = Path("workflow") / "config" / "config.yaml"
PARAMS_FILE = Path("params.yaml")
DVC_FILE = Path("dvc.yaml")
#: params.yaml key recording how it was generated (the Snakemake config that reproduces it).
META_KEY = "_orchestrate"
#: Stage -> the package module it runs.
STAGE_MODULES = {"download": "data", "train": "train", "calibrate": "calibrate",
                 "certify": "certify", "report": "report"}
#: Modules whose changes never change a stage's results: the CLI, config composition (its values
#: are tracked as parameters), the path layout (tracked as file names) and file helpers.
INFRA_MODULES = frozenset({"__init__", "cli", "config", "paths", "io", "orchestrate"})
RADIUS_TAG_RE = r"[0-9]+(\.[0-9]+)?(e[-+]?[0-9]+)?"


# --------------------------------------------------------------------------- code dependencies

def _module_file(module: str, src_dir: Path) -> Optional[Path]:
    """The file of dotted package module ``module`` ('bounds.spectral'), or None."""
    base = src_dir.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _package_imports(module: str, path: Path, src_dir: Path) -> set:
    """Dotted names of the package modules ``module`` (at ``path``) imports, at any depth.

    ``from .x import y`` may name a submodule ``y`` of package ``x``: both are candidates,
    and names that are not modules are dropped by the caller.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    here = module.split(".") if module else []
    package = here if is_pkg else here[:-1]
    found = set()

    def add(base: List[str], names) -> None:
        mod = ".".join(base)
        if mod:
            found.add(mod)
        for a in names:
            found.add(".".join(base + a.name.split(".")))

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y / from . import x / from ..nn import z
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else list(package)
                add(base + (node.module.split(".") if node.module else []), node.names)
            elif node.module and node.module.split(".")[0] == PACKAGE:
                add(node.module.split(".")[1:], node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == PACKAGE and len(parts) > 1:
                    found.add(".".join(parts[1:]))
    return found


def code_deps(stage: str, src_dir: Path = SRC_DIR) -> List[str]:
    """Source files (paths as given by ``src_dir``) whose changes must rerun ``stage``.

    The stage module plus, transitively, every package module it imports, minus
    ``INFRA_MODULES``. Sorted, so the list is stable.
    """
    if stage not in STAGE_MODULES:
        raise ConfigError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    src_dir = Path(src_dir)
    start = STAGE_MODULES[stage]
    if _module_file(start, src_dir) is None:
        raise ConfigError(f"stage {stage!r} runs {src_dir / (start + '.py')}, which does not exist")
    files, seen, todo = {}, set(), [start]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = _module_file(mod, src_dir)
        if path is None:
            continue  # an imported name that is not a module: nothing to track
        # A module's parent packages run their __init__ first.
        parts = mod.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        files[mod] = path
        todo.extend(_package_imports(mod, path, src_dir) - seen)
    return sorted(p.as_posix() for m, p in files.items() if m not in INFRA_MODULES)


# --------------------------------------------------------------------------- composition

def load_settings(configfile: Optional[Path] = None) -> dict:
    """The Snakemake configuration (``experiments``, ``overrides``, ``experiment_overrides``)."""
    import yaml

    path = Path(configfile or SNAKEMAKE_CONFIG)
    data = yaml.safe_load(path.read_text()) if path.is_file() else {}
    if configfile is not None and not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    return normalize_settings(data or {})


def normalize_settings(settings: Mapping) -> dict:
    """Defaults and type checks of the orchestration settings (what the JSON schema says)."""
    unknown = set(settings) - {"experiments", "overrides", "experiment_overrides"}
    if unknown:
        raise ConfigError(f"unknown workflow setting(s): {', '.join(sorted(unknown))}")
    experiments = settings.get("experiments", ["mnist5k"])
    overrides = settings.get("overrides", []) or []
    per = settings.get("experiment_overrides", {}) or {}

    def strings(x, what):
        if not isinstance(x, (list, tuple)) or not all(isinstance(s, str) for s in x):
            raise ConfigError(f"{what} must be a list of strings, got {x!r}")
        return list(x)

    experiments = strings(experiments, "experiments")
    overrides = strings(overrides, "overrides")
    if not isinstance(per, Mapping):
        raise ConfigError(f"experiment_overrides must map experiment names to lists, got {per!r}")
    per = {str(k): strings(v, f"experiment_overrides[{k}]") for k, v in per.items()}
    return {"experiments": experiments, "overrides": overrides, "experiment_overrides": per}


def compose_all(overrides: Sequence[str] = (), experiment_overrides: Optional[Mapping] = None,
                names: Optional[Iterable[str]] = None, config_dir: Optional[Path] = None,
                first: Optional[Iterable[str]] = None) -> Dict[str, dict]:
    """Compose (Hydra) and validate every experiment once: ``{name: plain config dict}``.

    ``overrides`` apply to every experiment, ``experiment_overrides[name]`` to one;
    ``first`` are composed first (so an error names an experiment the user asked for).
    Raises ConfigError naming the experiment and the problem.
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
    cfgs = {}
    for n in names:
        try:
            cfgs[n] = compose(n, list(overrides) + list(experiment_overrides.get(n, [])), config_dir)
        except ConfigError as e:
            raise ConfigError(f"experiment {n}: {_explain(e)}") from None
        if cfgs[n]["name"] != n:
            raise ConfigError(f"experiment {n}: its name is {cfgs[n]['name']!r}; "
                              f"results/<name>/ must match config/experiment/{n}.yaml")
    for n, cfg in cfgs.items():
        b = baseline(cfg)
        if b is not None and b not in known:
            raise ConfigError(f"experiment {n}: report.baseline {b!r} is not an experiment; "
                              f"known: {', '.join(known)}")
    return cfgs


def _explain(e: BaseException) -> str:
    """The error and its causes (Hydra's 'Error merging override' hides why in its cause)."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        msg = str(e).strip()
        if msg and "$VALUE" not in msg and not any(msg in p for p in parts):
            parts.append(msg)
        e = e.__cause__ or e.__context__
    return "\n  caused by: ".join(parts)


def baseline(cfg: dict) -> Optional[str]:
    return (cfg.get("report") or {}).get("baseline")


def with_baselines(names: Iterable[str], cfgs: Mapping[str, dict]) -> List[str]:
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
        b = baseline(cfgs[n])
        if b is not None:
            todo.append(b)
    return out


def radii(cfg: dict) -> List[float]:
    return [float(r) for r in cfg["certify"]["radii"]]


def certify_radii(cfgs: Mapping[str, dict], names: Sequence[str]) -> Dict[str, List[float]]:
    """Radii each experiment is certified at: its own, plus those of the reports that show it
    as their baseline (a report compares both at the main experiment's radii)."""
    out = {n: radii(cfgs[n]) for n in names}
    for n in names:
        b = baseline(cfgs[n])
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


def stage_json(cfg: dict, stage: str, radius: Optional[float] = None) -> str:
    """The stage's configuration as one JSON string (a plain, trackable ``params:`` value)."""
    return json.dumps(stage_config(cfg, stage, radius), sort_keys=True, separators=(",", ":"))


def stage_params(cfg: dict, stage: str) -> dict:
    """The stage's block of params.yaml; certify's is shared by all radii (the radius is a flag)."""
    if stage == "certify":
        sc = stage_config(cfg, stage, 0.0)
        sc.pop("radius")
        return sc
    return stage_config(cfg, stage)


# --------------------------------------------------------------------------- stage inputs

def report_inputs(cfgs: Mapping[str, dict], name: str, src_dir: Path = SRC_DIR) -> Dict[str, List[str]]:
    """Everything the report of ``name`` reads: its own results and its baseline's at the same radii."""
    cfg = cfgs[name]
    rs = radii(cfg)
    inputs = {
        "metrics": [str(paths.train_metrics(name))],
        "calibration": [str(paths.calibration(name))],
        "certificates": [str(paths.certificate(name, r)) for r in rs],
        "tables": [str(paths.certificate_table(name, r)) for r in rs],
        "baseline": [],
        "code": code_deps("report", src_dir),
    }
    b = baseline(cfg)
    if b is not None:
        inputs["baseline"] = ([str(paths.train_metrics(b)), str(paths.calibration(b))]
                              + [str(paths.certificate(b, r)) for r in rs])
    return inputs


def report_outputs(name: str) -> Dict[str, str]:
    return {"report": str(paths.report(name)),
            "training_plot": str(paths.plots_dir(name) / "training.png"),
            "radius_plot": str(paths.plots_dir(name) / "certified_vs_radius.png")}


def baseline_args(cfg: dict) -> str:
    b = baseline(cfg)
    return f"--baseline-dir {paths.experiment_dir(b)}" if b else ""


# --------------------------------------------------------------------------- DVC

def dvc_stage_name(stage: str, name: str, radius: Optional[float] = None) -> str:
    """DVC stage names allow only letters, digits, '_' and '-': certify-smoke-0_5."""
    base = f"{stage}-{name}"
    return base if radius is None else f"{base}-{radius_tag(radius).replace('.', '_').replace('+', '')}"


def dvc_params(cfgs: Mapping[str, dict], names: Sequence[str], settings: Optional[dict] = None) -> dict:
    doc: dict = {}
    if settings is not None:
        doc[META_KEY] = {"experiments": list(settings["experiments"]),
                         "overrides": list(settings["overrides"]),
                         "experiment_overrides": {k: list(v) for k, v in settings["experiment_overrides"].items()}}
    for n in names:
        doc[n] = {stage: stage_params(cfgs[n], stage) for stage in STAGES}
    return doc


def dvc_pipeline(cfgs: Mapping[str, dict], names: Sequence[str], src_dir: Path = SRC_DIR,
                 params_file: str = str(PARAMS_FILE)) -> dict:
    """dvc.yaml: the same CLI commands on the same paths as the Snakemake rules."""
    code = {s: code_deps(s, src_dir) for s in STAGE_MODULES}
    pf = params_file
    stages: dict = {}
    plots: list = []
    all_radii = certify_radii(cfgs, names)
    for n in names:
        cfg = cfgs[n]
        splits, model, metrics = str(paths.splits(n)), str(paths.model(n)), str(paths.train_metrics(n))
        cal_model, calibration = str(paths.calibrated_model(n)), str(paths.calibration(n))
        stages[dvc_stage_name("download", n)] = {
            "cmd": f"locallip download --cfg-file {pf} --cfg-key {n}.download --out {splits}",
            "deps": code["download"],
            "params": [f"{n}.download"],
            "outs": [splits],
        }
        stages[dvc_stage_name("train", n)] = {
            "cmd": (f"locallip train --cfg-file {pf} --cfg-key {n}.train --data {splits} --out {model} "
                    f"--metrics {metrics} --state {paths.train_state(n)}"),
            "deps": [splits] + code["train"],
            "params": [f"{n}.train"],
            "outs": [model],
            "metrics": [metrics],
        }
        stages[dvc_stage_name("calibrate", n)] = {
            "cmd": (f"locallip calibrate --cfg-file {pf} --cfg-key {n}.calibrate --data {splits} "
                    f"--model {model} --out {cal_model} --summary {calibration}"),
            "deps": [splits, model] + code["calibrate"],
            "params": [f"{n}.calibrate"],
            "outs": [cal_model],
            "metrics": [calibration],
        }
        for r in all_radii[n]:
            cert, table = str(paths.certificate(n, r)), str(paths.certificate_table(n, r))
            stages[dvc_stage_name("certify", n, r)] = {
                "cmd": (f"locallip certify --cfg-file {pf} --cfg-key {n}.certify --radius {radius_tag(r)} "
                        f"--data {splits} --model {cal_model} --out {cert} --table {table}"),
                "deps": [splits, cal_model] + code["certify"],
                "params": [f"{n}.certify"],
                "outs": [table],
                "metrics": [cert],
            }
        ri, ro = report_inputs(cfgs, n, src_dir), report_outputs(n)
        extra = baseline_args(cfg)
        stages[dvc_stage_name("report", n)] = {
            "cmd": (f"locallip report --cfg-file {pf} --cfg-key {n}.report --experiment-dir "
                    f"{paths.experiment_dir(n)}{' ' + extra if extra else ''} --out {ro['report']}"),
            "deps": (ri["metrics"] + ri["calibration"] + ri["certificates"] + ri["tables"]
                     + ri["baseline"] + ri["code"]),
            "params": [f"{n}.report"],
            "outs": [ro["report"]],
            "plots": [ro["training_plot"], ro["radius_plot"]],
        }
        plots.append({f"training-{n}": {
            "title": f"{n}: validation accuracy per epoch",
            "x": "epoch",
            "y": {metrics: ["val_clean_acc", "val_certified_acc"]},
        }})
        plots.append({f"loss-{n}": {"title": f"{n}: training loss per epoch", "x": "epoch",
                                    "y": {metrics: ["loss"]}}})
    return {"stages": stages, "plots": plots}


DVC_HEADER = """\
# Generated by `python -m locallip.orchestrate dvc` from the Hydra configuration
# under config/ (the same composition the Snakemake workflow uses); do not edit.
# Experiments: {names}. Regenerate after changing config/ (or for other
# experiments: `python -m locallip.orchestrate dvc -e NAME [OVERRIDE ...]`).
"""


def _dump(doc: dict) -> str:
    import yaml

    class NoAliasDumper(yaml.SafeDumper):  # repeated values are written out, not as &anchors
        def ignore_aliases(self, data):
            return True

    return yaml.dump(doc, Dumper=NoAliasDumper, sort_keys=False, default_flow_style=False, width=10_000)


def dvc_files(settings: dict, config_dir: Optional[Path] = None, src_dir: Path = SRC_DIR) -> Dict[Path, str]:
    """The text of params.yaml and dvc.yaml for ``settings`` (experiments + overrides)."""
    cfgs = compose_all(settings["overrides"], settings["experiment_overrides"], config_dir=config_dir)
    names = with_baselines(settings["experiments"], cfgs)
    header = DVC_HEADER.format(names=", ".join(names))
    return {PARAMS_FILE: header + _dump(dvc_params(cfgs, names, settings)),
            DVC_FILE: header + _dump(dvc_pipeline(cfgs, names, src_dir))}


def settings_from_params(params_file: Path = PARAMS_FILE) -> dict:
    import yaml

    if not Path(params_file).is_file():
        raise ConfigError(f"{params_file} not found: run `python -m locallip.orchestrate dvc` first")
    doc = yaml.safe_load(Path(params_file).read_text()) or {}
    if META_KEY not in doc:
        raise ConfigError(f"{params_file} has no {META_KEY!r} block: it was not generated by locallip.orchestrate")
    return normalize_settings(doc[META_KEY])


def snakemake_config_args(settings: dict) -> List[str]:
    """``--config`` arguments that give Snakemake exactly these settings."""
    return ["--config"] + [f"{k}={json.dumps(settings[k])}"
                           for k in ("experiments", "overrides", "experiment_overrides")]


def report_targets(settings: dict, config_dir: Optional[Path] = None) -> List[str]:
    cfgs = compose_all(settings["overrides"], settings["experiment_overrides"], config_dir=config_dir)
    return [str(paths.report(n)) for n in with_baselines(settings["experiments"], cfgs)]


# --------------------------------------------------------------------------- commands

def _run(cmd: List[str], capture: bool = False) -> subprocess.CompletedProcess:
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, text=True, capture_output=capture)


def _settings_from_args(args) -> dict:
    settings = load_settings(args.configfile)
    if args.experiments:
        settings["experiments"] = list(args.experiments)
    if args.overrides:
        settings["overrides"] = settings["overrides"] + list(args.overrides)
    return settings


def cmd_dvc(args) -> int:
    files = dvc_files(_settings_from_args(args))
    if args.check:
        stale = [str(p) for p, text in files.items() if not p.is_file() or p.read_text() != text]
        if stale:
            print(f"out of date with config/: {', '.join(stale)}; run `python -m locallip.orchestrate dvc`",
                  file=sys.stderr)
            return 1
        print("params.yaml and dvc.yaml match the composition")
        return 0
    for p, text in files.items():
        if not p.is_file() or p.read_text() != text:
            p.write_text(text)
            print(f"wrote {p}")
        else:
            print(f"{p} is up to date")
    return 0


def _snakemake_up_to_date(settings: dict, targets: List[str]) -> Optional[str]:
    """None if ``snakemake -n`` has nothing to do for ``targets``, else its output."""
    p = _run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", *targets,
              *snakemake_config_args(settings)], capture=True)
    out = p.stdout + p.stderr
    if p.returncode != 0 or "Nothing to be done" not in out:
        return out
    return None


def cmd_commit(args) -> int:
    """After a Snakemake run: record its outputs in dvc.lock, then re-sync Snakemake's mtimes."""
    settings = _settings_from_args(args)
    targets = report_targets(settings)
    pending = _snakemake_up_to_date(settings, targets)
    if pending is not None:
        print(pending[-4000:], file=sys.stderr)
        print("snakemake still has work to do for " + " ".join(targets)
              + ": run it first (with the same experiments and overrides)", file=sys.stderr)
        return 1
    for p, text in dvc_files(settings).items():
        p.write_text(text)
    rc = _run([sys.executable, "-m", "dvc", "commit", "--force"]).returncode
    if rc != 0:
        return rc
    # dvc commit re-links the files into the workspace, which renews their mtimes in no
    # particular order: mark them up to date again for Snakemake.
    return _touch(settings, targets, args.cores)


def _touch(settings: dict, targets: List[str], cores: int) -> int:
    """``snakemake --touch --forceall``: every output up to date, metadata recorded for all."""
    return _run([sys.executable, "-m", "snakemake", *targets, "--touch", "--forceall", "--cores", str(cores),
                 *snakemake_config_args(settings)]).returncode


def cmd_sync(args) -> int:
    """After dvc pull / dvc repro: Snakemake adopts DVC's workspace (mtimes and metadata)."""
    settings = settings_from_params(PARAMS_FILE)
    files = dvc_files(settings)
    stale = [str(p) for p, text in files.items() if not p.is_file() or p.read_text() != text]
    if stale:
        print(f"{', '.join(stale)} no longer match(es) config/: the results DVC holds were made with "
              f"another configuration. Regenerate (`python -m locallip.orchestrate dvc`) and "
              f"`dvc repro` instead.", file=sys.stderr)
        return 1
    p = _run([sys.executable, "-m", "dvc", "status", "--json"], capture=True)
    if p.returncode != 0:
        print(p.stdout + p.stderr, file=sys.stderr)
        return p.returncode
    status = json.loads(p.stdout.strip() or "{}")
    if status:
        print("dvc status: the workspace does not match dvc.lock (run `dvc pull` or `dvc repro` first):\n"
              + json.dumps(status, indent=2), file=sys.stderr)
        return 1
    return _touch(settings, report_targets(settings), args.cores)


def cmd_code_deps(args) -> int:
    for stage in args.stages or list(STAGE_MODULES):
        print(f"{stage}: {' '.join(code_deps(stage))}")
    return 0


def cmd_stage_json(args) -> int:
    cfg = compose_all(args.overrides, names=[args.experiment])[args.experiment]
    print(stage_json(cfg, args.stage, args.radius))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m locallip.orchestrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def selection(p):
        p.add_argument("-e", "--experiments", action="append",
                       help="experiment to include (repeatable; default: `experiments` of the Snakemake config); "
                            "baselines are added")
        p.add_argument("--configfile", type=Path, default=None,
                       help=f"Snakemake config to read experiments/overrides from (default {SNAKEMAKE_CONFIG})")
        p.add_argument("overrides", nargs="*", help="Hydra overrides applied to every experiment")

    p = sub.add_parser("dvc", help="write params.yaml and dvc.yaml")
    selection(p)
    p.add_argument("--check", action="store_true", help="only check that they are up to date (exit 1 if not)")
    p.set_defaults(func=cmd_dvc)

    p = sub.add_parser("commit", help="after snakemake: dvc commit its outputs, keep Snakemake in sync")
    selection(p)
    p.add_argument("--cores", type=int, default=1)
    p.set_defaults(func=cmd_commit)

    p = sub.add_parser("sync", help="after dvc pull / dvc repro: mark DVC's files up to date for Snakemake")
    p.add_argument("--cores", type=int, default=1)
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("code-deps", help="print the source files each stage depends on")
    p.add_argument("stages", nargs="*", help=f"stages (default: all of {', '.join(STAGE_MODULES)})")
    p.set_defaults(func=cmd_code_deps)

    p = sub.add_parser("stage-json", help="print the JSON a stage receives")
    p.add_argument("experiment")
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--radius", type=float)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_stage_json)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"locallip.orchestrate {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
