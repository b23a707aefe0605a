# The report of an experiment also shows its report.baseline experiment side by
# side: it depends on the baseline's train metrics, calibration and certificates.
rule report:
    input:
        unpack(report_inputs),
    output:
        **REPORT_OUTPUTS,
    params:
        cfg=stage_cfg("report"),
        experiment_dir=EXPERIMENT_DIR,
        baseline=baseline_args,
    log:
        f"{LOGS}/report.log",
    conda:
        "../envs/locallip.yaml"
    shell:
        "locallip report --cfg-json {params.cfg:q} --experiment-dir {params.experiment_dir:q}"
        " {params.baseline} --out {output.report:q} > {log:q} 2>&1"
