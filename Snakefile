# Entry point. Snakemake looks for ./Snakefile before workflow/Snakefile; the
# workflow itself lives in workflow/ (standard snakemake-workflows layout).
include: "workflow/Snakefile"


# An included file cannot set the default target (Snakemake restores the
# includer's): make workflow/Snakefile's `rule all` the default here.
localrules:
    default,


rule default:
    default_target: True
    input:
        unpack(default_targets),
