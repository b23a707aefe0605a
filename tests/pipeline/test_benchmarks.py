"""The GPU readiness benchmark runs on the CPU at small sizes, so it cannot rot unnoticed."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline_helpers import REPO, env_for

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
    assert data["cifar10_epochs"]["epochs"] == 1 and data["cifar10_epochs"]["arch"] == "6c2f"
