rule calibrate:
    input:
        data=SPLITS,
        model=MODEL,
        code=code("calibrate"),
    output:
        model=CALIBRATED_MODEL,
        summary=CALIBRATION,
    params:
        cfg=stage_cfg("calibrate"),
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
        "OMP_NUM_THREADS={threads} locallip calibrate --cfg-json {params.cfg:q} --data {input.data:q} --model {input.model:q}"
        " --out {output.model:q} --summary {output.summary:q} > {log:q} 2>&1"
