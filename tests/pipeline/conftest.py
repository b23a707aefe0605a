"""Pipeline tests run stages, Snakemake, DVC and SLURM on the smoke experiment: all marked slow
(``pytest -m "not slow"`` is the quick loop), except the README checks."""
import pytest

QUICK = ("test_readme.py",)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "pipeline" in item.path.parts and item.path.name not in QUICK:
            item.add_marker(pytest.mark.slow)
