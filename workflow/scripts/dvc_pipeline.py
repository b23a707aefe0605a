#!/usr/bin/env python3
"""dvc.yaml / params.yaml from the stage table, and keeping DVC and Snakemake in step.

A thin shell over ``locallip.pipeline.dvc`` (see its docstring, or ``--help``).
"""
import sys

from locallip.pipeline.dvc import main

if __name__ == "__main__":
    sys.exit(main())
