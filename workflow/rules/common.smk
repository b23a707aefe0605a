# Shared by all rules: the composed configuration and the small functions
# they use to look it up. Nothing else is defined here.
import re

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from locallip import orchestrate, paths
from locallip.config import ConfigError


validate(config, schema="../schemas/config.schema.yaml")

try:
    # Hydra composition of every experiment, once, at parse time.
    EXPERIMENT_CONFIGS = orchestrate.compose_all(
        config["overrides"], config["experiment_overrides"], first=config["experiments"]
    )
    DEFAULT_EXPERIMENTS = orchestrate.with_baselines(
        config["experiments"], EXPERIMENT_CONFIGS
    )
except ConfigError as e:
    raise WorkflowError(f"locallip configuration error: {e}") from None


wildcard_constraints:
    experiment="|".join(re.escape(n) for n in sorted(EXPERIMENT_CONFIGS)),
    radius=orchestrate.RADIUS_TAG_RE,


# Output and log paths, with wildcards (the same layout as locallip.paths everywhere).
EXP = "{experiment}"
SPLITS = str(paths.splits(EXP))
MODEL = str(paths.model(EXP))
TRAIN_METRICS = str(paths.train_metrics(EXP))
TRAIN_STATE = str(paths.train_state(EXP))  # resume checkpoint: deliberately not an output
CALIBRATED_MODEL = str(paths.calibrated_model(EXP))
CALIBRATION = str(paths.calibration(EXP))
CERTIFICATE = str(paths.experiment_dir(EXP) / "certify" / "radius_{radius}.json")
CERTIFICATE_TABLE = str(paths.experiment_dir(EXP) / "certify" / "radius_{radius}.csv")
EXPERIMENT_DIR = str(paths.experiment_dir(EXP))
LOGS = str(paths.experiment_dir(EXP) / "logs")
REPORT_OUTPUTS = orchestrate.report_outputs(EXP)


def default_reports():
    return [str(paths.report(n)) for n in DEFAULT_EXPERIMENTS]


def code(stage):
    """Package source files the stage runs (a change reruns the stage and what follows)."""
    return orchestrate.code_deps(stage)


def stage_cfg(stage):
    """params: function -> the stage's configuration as a JSON string."""

    def get(wildcards):
        cfg = EXPERIMENT_CONFIGS[wildcards.experiment]
        radius = None
        if stage == "certify":
            radius = orchestrate.parse_radius_tag(wildcards.radius)
        return orchestrate.stage_json(cfg, stage, radius)

    return get


def report_inputs(wildcards):
    return orchestrate.report_inputs(EXPERIMENT_CONFIGS, wildcards.experiment)


def baseline_args(wildcards):
    return orchestrate.baseline_args(EXPERIMENT_CONFIGS[wildcards.experiment])
