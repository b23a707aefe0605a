# One rule per stage of the stage table (locallip.pipeline.table): its inputs, outputs,
# command, threads, priority, resources and HTML-report entries all come from the table, so a new
# stage needs no rule of its own. Each rule runs one `locallip` CLI command.
for _stage in STAGES:

    rule:
        name:
            _stage.name
        input:
            unpack(stage_inputs(_stage.name)),
        output:
            **stage_outputs(_stage),
        params:
            cmd=stage_command(_stage.name),
        log:
            stage_log(_stage),
        threads: _stage.threads
        priority: _stage.priority
        resources:
            **stage_resources(_stage),
        conda:
            "../envs/locallip.yaml"
        shell:
            ("OMP_NUM_THREADS={threads} {params.cmd} --threads {threads} > {log:q} 2>&1" if not _stage.local
             else "{params.cmd} > {log:q} 2>&1")
