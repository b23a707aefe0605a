"""Benchmarks run at small sizes on the CPU (the GPU readiness check, the certification cascade
against one level, and the summary of its figures), so they cannot rot unnoticed."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline_helpers import REPO, SMOKE, env_for, smoke_project
from locallip.foundation import layout as paths

pytestmark = pytest.mark.slow


def test_gpu_benchmark_quick_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, "-m", "bench.gpu", "--quick", "--out", str(out)], cwd=REPO,
                       env=env_for(REPO), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["quick"] and data["device"] in ("cpu", "cuda")
    for s in data["train_step"]:
        assert s["local_over_plain"]["median"] > 1 and s["local_over_gloro"]["median"] > 1
    assert set(data["certification"]["samples_per_s"]) == {"probabilistic", "estimate", "reference"}
    assert [s["arch"] for s in data["train_step"]] == ["4c3f", "6c2f", "liresnet"]
    recipes = {r["experiment"]: r for r in data["cifar10_recipes"]}
    assert set(recipes) == {"cifar10", "cifar10_gloro", "cifar10_liresnet"}
    for r in recipes.values():  # one epoch, the recipe's epochs, and both stages timed on the test points
        assert r["epochs"] == 1 and r["recipe_epochs"] >= 100 and r["recipe_hours"] > 0
        assert r["certify_s"] > 0 and r["radii_s"] > 0 and r["certify_10k_s"] > r["certify_s"]


def test_certification_throughput_quick_runs_and_summarizes(tmp_path, tmp_path_factory):
    """The cascade against one level on the smoke model: same certified points, a table of figures."""
    project = smoke_project(tmp_path_factory)
    out = tmp_path / "certify_throughput.json"
    p = subprocess.run([sys.executable, "-m", "bench.certify_throughput", "--quick", "--n", "24", "--rounds", "1",
                        "--model", str(project / paths.calibrated_model(SMOKE)),
                        "--data", str(project / paths.splits(SMOKE)), "--experiment", SMOKE, "--out", str(out)],
                       cwd=REPO, env=env_for(REPO), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["n"] == 24 and data["targets"]["at_least_as_many"]["met"]
    assert data["radii_comparison"]["smaller_beyond_tolerance"] == 0
    assert data["audit_of_cascade_certificates"]["broken"] == 0
    from bench.summarize import certify

    text = "\n".join(certify(data))
    assert "| cascade |" in text and "Attack audit of every cascade certificate: 0 broken" in text
