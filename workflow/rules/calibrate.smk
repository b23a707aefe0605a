rule calibrate:
    input:
        unpack(stage_inputs("calibrate")),
    output:
        **output_patterns("calibrate"),
    params:
        cmd=stage_command("calibrate"),
    log:
        f"{LOGS}/calibrate.log",
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    conda:
        "../envs/locallip.yaml"
    shell:
        "OMP_NUM_THREADS={threads} {params.cmd} --threads {threads} > {log:q} 2>&1"
