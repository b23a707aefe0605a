# GPU stages use as many CPU threads as they are given (raise with --set-threads train=N
# or in a profile); threads are not a tracked setting, so changing them reruns nothing.
rule train:
    input:
        unpack(stage_inputs("train")),
    output:
        **output_patterns("train"),
    params:
        cmd=stage_command("train"),
    log:
        f"{LOGS}/train.log",
    threads: 2
    resources:
        gpu=gpus,
        mem_mb=16000,
        runtime=24 * 60,
    conda:
        "../envs/locallip.yaml"
    shell:
        "OMP_NUM_THREADS={threads} {params.cmd} --threads {threads} > {log:q} 2>&1"
