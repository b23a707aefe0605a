# Shared by all rules: the composed configuration and small lookups into
# locallip.pipeline.dag, which defines every stage's inputs, outputs, settings and
# command (the same graph the DVC generator and the report read).
import re

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from locallip.pipeline import dag, layout
from locallip.pipeline.config import ConfigError


validate(config, schema="../schemas/config.schema.yaml")

try:
    # Hydra composition of every experiment, once, at parse time.
    SETTINGS = dag.normalize_settings(config)
    EXPERIMENT_CONFIGS = dag.compose_all(
        SETTINGS["overrides"], SETTINGS["experiment_overrides"], first=SETTINGS["experiments"]
    )
    DEFAULT_EXPERIMENTS = dag.with_baselines(SETTINGS["experiments"], EXPERIMENT_CONFIGS)
except ConfigError as e:
    raise WorkflowError(f"locallip configuration error: {e}") from None


wildcard_constraints:
    experiment="|".join(re.escape(n) for n in sorted(EXPERIMENT_CONFIGS)),
    radius=dag.RADIUS_TAG_RE,


EXP = "{experiment}"
LOGS = str(layout.logs_dir(EXP))


def default_reports():
    return [str(layout.report(n)) for n in DEFAULT_EXPERIMENTS]


def _job(stage, wildcards):
    radius = dag.parse_radius_tag(wildcards.radius) if stage == "certify" else None
    return dag.job(EXPERIMENT_CONFIGS, wildcards.experiment, stage, radius)


def stage_inputs(stage):
    """input: function -> the job's named input groups."""
    return lambda wildcards: _job(stage, wildcards).inputs


def stage_command(stage):
    """params: function -> the job's command line (its settings inline, tracked as a param)."""
    return lambda wildcards: dag.shell(dag.command(_job(stage, wildcards), "json",
                                                   processes=processes(wildcards)))


def processes(wildcards):
    """run.processes of the experiment: data-parallel processes (GPUs) of train, certify and radii."""
    return EXPERIMENT_CONFIGS[wildcards.experiment].run.processes


def gpus(wildcards):
    return max(1, processes(wildcards))


def output_patterns(stage):
    """The job's outputs with wildcards ({experiment}, {radius})."""
    return dag.outputs(stage, EXP, "{radius}")
