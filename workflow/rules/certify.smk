# One job per radius: results/<experiment>/certify/radius_<r>.json (+ .csv).
rule certify:
    input:
        unpack(stage_inputs("certify")),
    output:
        out=report(str(layout.certificate(EXP, "{radius}")), caption="../report/certificate.rst",
                   category="Certification", subcategory="{experiment}",
                   labels={"experiment": "{experiment}", "radius": "{radius}", "file": "summary (JSON)"}),
        table=report(str(layout.certificate_table(EXP, "{radius}")), caption="../report/certificate_table.rst",
                     category="Certification", subcategory="{experiment}",
                     labels={"experiment": "{experiment}", "radius": "{radius}", "file": "per sample (CSV)"}),
    params:
        cmd=stage_command("certify"),
    log:
        f"{LOGS}/certify_{{radius}}.log",
    threads: 1
    resources:
        gpu=gpus,
        mem_mb=8000,
        runtime=240,
    conda:
        "../envs/locallip.yaml"
    shell:
        "OMP_NUM_THREADS={threads} {params.cmd} --threads {threads} > {log:q} 2>&1"

