rule train:
    input:
        data=SPLITS,
        code=code("train"),
    output:
        model=MODEL,
        metrics=TRAIN_METRICS,
    params:
        cfg=stage_cfg("train"),
        state=TRAIN_STATE,
    log:
        f"{LOGS}/train.log",
    threads: 2
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=24 * 60,
    conda:
        "../envs/locallip.yaml"
    shell:
        "OMP_NUM_THREADS={threads} locallip train --cfg-json {params.cfg:q} --data {input.data:q} --out {output.model:q}"
        " --metrics {output.metrics:q} --state {params.state:q} > {log:q} 2>&1"
