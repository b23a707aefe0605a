# Lookups of the study rules (workflow/rules/study.smk): each table's jobs, composed by
# locallip.pipeline.study from config/study/<table>.yaml when one of its files is first asked for.
import functools

from locallip.foundation.study import TAG_RE, study_names
from locallip.pipeline import study as study_jobs

STUDIES = study_names(Path("config"))


@functools.lru_cache(maxsize=None)
def _study_plan(table):
    try:
        return study_jobs.plan(table)
    except ConfigError as e:
        return e


def study_plan(table):
    """The table's jobs, composed once per run of Snakemake; a bad declaration fails here, in one line."""
    p = _study_plan(table)
    if isinstance(p, ConfigError):
        raise WorkflowError(f"locallip study error: {p}")
    return p


def study_row_inputs(wildcards):
    p = study_plan(wildcards.table)
    if wildcards.run not in p.runs:
        raise WorkflowError(f"locallip study error: study {wildcards.table} has no run {wildcards.run!r}")
    return {"data": str(layout.study_splits(p.table, p.splits[wildcards.run])),
            "code": code_deps("stages.study")}


def study_table_inputs(wildcards):
    return {"rows": study_jobs.row_files(study_plan(wildcards.table)), "code": code_deps("stages.study_table")}


STUDY = str(layout.study_dir("{table}"))
STUDY_RUN = {k: str(v) for k, v in layout.study_run("{table}", "{run}").items()}
STUDY_TABLE = {k: str(v) for k, v in layout.study_table("{table}").items()}
