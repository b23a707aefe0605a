#!/usr/bin/env bash
# Run by Snakemake inside the freshly created conda env (see locallip.yaml), from
# the workflow's working directory: install the locallip package from the tree.
set -euo pipefail
python -m pip install --no-deps --no-build-isolation -e .
