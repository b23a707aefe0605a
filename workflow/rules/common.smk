# Shared by all rules: the composed configuration and small lookups into the stage table
# (locallip.pipeline.table) and the graph built on it (locallip.pipeline.dag), which define
# every stage's inputs, outputs, settings and command (the same the DVC generator and the
# report read).
import re
from pathlib import Path

import yaml

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from locallip.foundation import layout
from locallip.foundation.compose import experiment_names
from locallip.foundation.provenance import code_deps
from locallip.foundation.schema import ConfigError
from locallip.pipeline import dag
from locallip.pipeline.table import STAGES


validate(config, schema="../schemas/config.schema.yaml")

try:
    SETTINGS = dag.normalize_settings(config)
    dag.compose_all(SETTINGS["overrides"], SETTINGS["experiment_overrides"], names=[])  # unknown names
except ConfigError as e:
    raise WorkflowError(f"locallip configuration error: {e}") from None


def _compose_each():
    """Hydra composition of every experiment, once, at parse time: a bad override or setting fails
    here, before any job is planned. An experiment whose own file does not compose (it fails without
    the overrides too) is kept aside with its error: only the targets that need it fail, naming the
    file, not every target of the workflow."""
    cfgs, broken = {}, {}
    for n in experiment_names():
        try:
            cfgs.update(dag.compose_all(SETTINGS["overrides"], SETTINGS["experiment_overrides"], names=[n]))
        except ConfigError as e:
            try:
                dag.compose_all(names=[n])
            except ConfigError:
                broken[n] = str(e)
                continue
            raise WorkflowError(f"locallip configuration error: {e}") from None
    unknown = [n for n in SETTINGS["experiments"] if n not in cfgs and n not in broken]
    if unknown:
        raise WorkflowError(f"locallip configuration error: unknown experiment {unknown[0]!r}; known: "
                            f"{', '.join(experiment_names())}")
    return cfgs, broken


EXPERIMENT_CONFIGS, BROKEN_EXPERIMENTS = _compose_each()


def experiment_config(name):
    """The composed configuration of ``name`` (and its baselines'): a broken one fails here, for the
    jobs that need it."""
    if name in BROKEN_EXPERIMENTS:
        raise WorkflowError(f"locallip configuration error: {BROKEN_EXPERIMENTS[name]}")
    cfg = EXPERIMENT_CONFIGS[name]
    for b in cfg.report.baselines:
        if b in BROKEN_EXPERIMENTS:
            raise WorkflowError(f"locallip configuration error (a baseline of {name}): {BROKEN_EXPERIMENTS[b]}")
    return cfg


def default_experiments():
    try:
        for n in SETTINGS["experiments"]:
            experiment_config(n)
        return dag.with_baselines(SETTINGS["experiments"], EXPERIMENT_CONFIGS)
    except ConfigError as e:
        raise WorkflowError(f"locallip configuration error: {e}") from None


wildcard_constraints:
    experiment="|".join(re.escape(n) for n in sorted({*EXPERIMENT_CONFIGS, *BROKEN_EXPERIMENTS})),
    radius=dag.RADIUS_TAG_RE,


EXP = "{experiment}"
LOGS = str(layout.logs_dir(EXP))


def default_reports():
    return [str(layout.report(n)) for n in default_experiments()]


def default_exports():
    """Every default experiment's model card (and its load-safe model files)."""
    return [str(layout.exported(n)["card"]) for n in default_experiments()]


def default_targets(wildcards):
    """input: function of the default target (evaluated only when it is asked for)."""
    return {"reports": default_reports(), "exports": default_exports()}


def _job(stage, wildcards):
    radius = dag.parse_radius_tag(wildcards.radius) if "radius" in wildcards.keys() else None
    experiment_config(wildcards.experiment)
    return dag.job(EXPERIMENT_CONFIGS, wildcards.experiment, stage, radius)


def stage_inputs(stage):
    """input: function -> the job's named input groups."""
    return lambda wildcards: _job(stage, wildcards).inputs


def stage_command(stage):
    """params: function -> the job's command line (its settings inline, tracked as a param)."""
    return lambda wildcards: dag.shell(dag.command(_job(stage, wildcards), "json", processes=processes(wildcards)))


def processes(wildcards):
    """run.processes of the experiment: data-parallel processes (GPUs) of the parallel stages."""
    return experiment_config(wildcards.experiment).run.processes


def gpus(wildcards):
    return max(1, processes(wildcards))


def stage_outputs(stage):
    """The job's outputs with wildcards ({experiment}, {radius}), those the table lists for
    Snakemake's HTML report wrapped in report()."""
    out = {}
    for key, path in stage.outputs(EXP, "{radius}").items():
        item = stage.report.get(key)
        if item is None:
            out[key] = path
            continue
        labels = {"experiment": "{experiment}", **({"radius": "{radius}"} if stage.per_radius else {}), **item.labels}
        extra = {"subcategory": item.subcategory} if item.subcategory else {}
        out[key] = report(path, caption=f"../report/{item.caption}", category=item.category, labels=labels, **extra)
    return out


def stage_log(stage):
    return f"{LOGS}/{stage.name}" + ("_{radius}" if stage.per_radius else "") + ".log"


def stage_resources(stage):
    """The table's resources; stages that run on a GPU ask for as many as they use processes."""
    return {**stage.resources, **({} if stage.local else {"gpu": gpus})}


# --------------------------------------------------------------------------- external models
EXTERNAL_DIR = Path("config") / "external"
EXTERNAL = sorted(p.stem for p in EXTERNAL_DIR.glob("*.yaml"))


def external_inputs(wildcards):
    """The declaration, the files it names (weights, layers, points) and the code that certifies."""
    path = EXTERNAL_DIR / f"{wildcards.name}.yaml"
    decl = yaml.safe_load(path.read_text()) or {}
    files = [decl[k] for k in ("model", "architecture") if k in decl]
    data = decl.get("data", "")
    files += [data] if data and not str(data).startswith("dataset:") else []
    return {"declaration": str(path), "files": files, "code": code_deps("stages.certify_model")}
