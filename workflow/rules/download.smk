rule download:
    input:
        unpack(stage_inputs("download")),
    output:
        **output_patterns("download"),
    params:
        cmd=stage_command("download"),
    log:
        f"{LOGS}/download.log",
    conda:
        "../envs/locallip.yaml"
    shell:
        "{params.cmd} > {log:q} 2>&1"
