# Study tables, declared in config/study/<table>.yaml (locallip.foundation.study): one job per
# run of a row (train, calibrate, certify validation and test: `locallip study-row`), one table
# job (`locallip study-table`), and the splits the rows train on (`locallip download`). Each
# job's settings come from locallip.pipeline.study and travel inline in `params:` (tracked:
# a row whose settings change reruns, and only that row). A table's rows are composed only when
# one of its files is asked for, so a broken declaration fails only its own targets.
#
#   snakemake --cores 2 results/study/mnist5k_r158_equal_epochs/table.md
include: "study_common.smk"


wildcard_constraints:
    table="|".join(re.escape(n) for n in STUDIES) or "(?!x)x",
    run=TAG_RE.pattern,


localrules:
    study_download,
    study_table,


rule study_download:
    output:
        str(layout.study_splits("{table}", "{key}")),
    params:
        cmd=lambda wildcards: dag.shell(study_jobs.download_command(study_plan(wildcards.table), wildcards.key)),
    log:
        f"{STUDY}/logs/download_{{key}}.log",
    wildcard_constraints:
        key=r"[A-Za-z0-9_]+-[0-9a-f]{10}",
    conda:
        "../envs/locallip.yaml"
    shell:
        "{params.cmd} > {log:q} 2>&1"


rule study_row:
    input:
        unpack(study_row_inputs),
    output:
        **STUDY_RUN,
    params:
        cmd=lambda wildcards: dag.shell(study_jobs.row_command(study_plan(wildcards.table), wildcards.run)),
    log:
        f"{STUDY}/logs/row_{{run}}.log",
    threads: 1
    priority: 1
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=24 * 60,
    conda:
        "../envs/locallip.yaml"
    shell:
        "OMP_NUM_THREADS={threads} {params.cmd} --threads {threads} > {log:q} 2>&1"


rule study_table:
    input:
        unpack(study_table_inputs),
    output:
        **STUDY_TABLE,
    params:
        cmd=lambda wildcards: dag.shell(study_jobs.table_command(study_plan(wildcards.table))),
    log:
        f"{STUDY}/logs/table.log",
    conda:
        "../envs/locallip.yaml"
    shell:
        "{params.cmd} > {log:q} 2>&1"
