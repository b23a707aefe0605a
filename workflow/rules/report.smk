# The report of an experiment also shows its report.baseline experiment side by
# side: it depends on the baseline's train metrics, calibration and certificates.
# Its outputs are part of Snakemake's own HTML report (snakemake --report report.html).
rule report:
    input:
        unpack(stage_inputs("report")),
    output:
        out=report(str(layout.report(EXP)), caption="../report/report.rst", category="Report",
                   labels={"experiment": "{experiment}", "figure": "report (markdown)"}),
        training_plot=report(str(layout.training_plot(EXP)), caption="../report/training.rst",
                             category="Training", labels={"experiment": "{experiment}", "figure": "training curves"}),
        diagnostics_plot=report(str(layout.diagnostics_plot(EXP)), caption="../report/diagnostics.rst",
                                category="Training",
                                labels={"experiment": "{experiment}", "figure": "fixed neurons, bound ratio"}),
        radius_plot=report(str(layout.radius_plot(EXP)), caption="../report/certified_vs_radius.rst",
                           category="Certification",
                           labels={"experiment": "{experiment}", "figure": "certified accuracy vs radius"}),
        steps_table=report(str(layout.steps_table(EXP)), caption="../report/steps.rst", category="Certification",
                           subcategory="{experiment}",
                           labels={"experiment": "{experiment}", "file": "certified points per step (CSV)"}),
    params:
        cmd=stage_command("report"),
    log:
        f"{LOGS}/report.log",
    conda:
        "../envs/locallip.yaml"
    shell:
        "{params.cmd} > {log:q} 2>&1"
