# Every test point's largest certified radius: results/<experiment>/certify/radii.csv
# (the report's certified-accuracy-vs-radius curve).
rule radii:
    input:
        unpack(stage_inputs("radii")),
    output:
        **output_patterns("radii"),
    params:
        cmd=stage_command("radii"),
    log:
        f"{LOGS}/radii.log",
    threads: 1
    resources:
        gpu=gpus,
        mem_mb=8000,
        runtime=240,
    conda:
        "../envs/locallip.yaml"
    shell:
        "OMP_NUM_THREADS={threads} {params.cmd} --threads {threads} > {log:q} 2>&1"
