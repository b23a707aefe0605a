rule download:
    input:
        code=code("download"),
    output:
        splits=SPLITS,
    params:
        cfg=stage_cfg("download"),
    log:
        f"{LOGS}/download.log",
    conda:
        "../envs/locallip.yaml"
    shell:
        "locallip download --cfg-json {params.cfg:q} --out {output.splits:q} > {log:q} 2>&1"
