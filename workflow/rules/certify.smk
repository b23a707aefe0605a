# One job per radius: results/<experiment>/certify/radius_<r>.json (+ .csv).
# GPU stages use as many CPU threads as they are given (OMP_NUM_THREADS={threads};
# raise with --set-threads certify=N or in a profile).
rule certify:
    input:
        data=SPLITS,
        model=CALIBRATED_MODEL,
        code=code("certify"),
    output:
        summary=CERTIFICATE,
        table=CERTIFICATE_TABLE,
    params:
        cfg=stage_cfg("certify"),
    log:
        f"{LOGS}/certify_{{radius}}.log",
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    conda:
        "../envs/locallip.yaml"
    shell:
        "OMP_NUM_THREADS={threads} locallip certify --cfg-json {params.cfg:q} --radius {wildcards.radius} --data {input.data:q}"
        " --model {input.model:q} --out {output.summary:q} --table {output.table:q} > {log:q} 2>&1"
