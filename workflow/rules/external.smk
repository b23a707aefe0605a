# Models trained elsewhere, declared like the experiments: one config/external/<name>.yaml each
# (locallip.foundation.schema.ExternalModel: weights, layer list, points, radii, ...). Their
# target is results/external/<name>/report.md; the rule runs `locallip certify-model`.
rule certify_model:
    input:
        unpack(external_inputs),
    output:
        report=str(layout.external_dir("{name}") / "report.md"),
    params:
        out=lambda wildcards: str(layout.external_dir(wildcards.name)),
    log:
        # beside the output directory, not in it: certify-model replaces that directory as a whole
        str(layout.external_dir("{name}").parent / "{name}.certify_model.log"),
    wildcard_constraints:
        name="|".join(re.escape(n) for n in EXTERNAL) or "(?!x)x",
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    conda:
        "../envs/locallip.yaml"
    shell:
        "OMP_NUM_THREADS={threads} locallip certify-model --config {input.declaration:q} --out {params.out:q} "
        "--threads {threads} --no-progress > {log:q} 2>&1"
