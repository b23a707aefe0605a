"""Reliability, one test (or more) per defect found by trying the tool as a careful user would:

1. a retrain is a retrain (only an unfinished run with the same settings, data and code resumes);
2. weakened settings are refused before any work;
3. stale or failed certificates never reach a report, and certificates say what made them;
4. a second run on the same stage output fails at once;
5. cosmetic settings and touched files with the same content rerun nothing; identical weights
   give identical bytes;
6. errors name the problem in one line (no tracebacks, no advice to load files unsafely);
7. tiny radii give no NaN in any output;
8. bad data, bad names, divergence, dead layers and reduced precision end in a one-line error
   (or, for a dead layer, a correct certificate), and no file under results/<experiment>/ changes.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from locallip.pipeline import cli
from locallip.foundation import layout as paths
from locallip.nn.checkpoint import load_model, save_model
from locallip.foundation.compose import compose, plain
from locallip.foundation.schema import RunConfig
from locallip.pipeline.table import stage_config
from locallip.foundation.files import StageBusy, stage_lock
from locallip.stages.certify import run_certify
from locallip.stages.report import run_report
from locallip.stages.train import run_train

from pipeline_helpers import (REPO, SMALL_DATA_OVERRIDES, SMOKE, SMOKE_BASELINE, clone_project, env_for, planned_jobs,
                              small_splits, smoke_cfg, smoke_config, smoke_project, touch_later)

QUIET = RunConfig(progress=False)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    return smoke_project(tmp_path_factory)


def _short_train_cfg():
    return stage_config(smoke_cfg(SMOKE, [*SMALL_DATA_OVERRIDES, "train.epochs=2", "train.ramp_epochs=1"]), "train")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return small_splits(tmp_path_factory.mktemp("small") / "splits.npz")


# --------------------------------------------------------------------------- 1. a retrain is a retrain


def test_a_finished_run_is_retrained_not_resumed(small_data, tmp_path, capsys):
    cfg = _short_train_cfg()
    kw = dict(data=small_data, out=tmp_path / "model.pt", metrics=tmp_path / "m.json",
              state=tmp_path / "state" / "last.pt", run=QUIET)
    first = run_train(cfg, **kw)
    capsys.readouterr()
    again = run_train(cfg, **kw)  # e.g. snakemake --forcerun train, dvc repro -f
    out = capsys.readouterr().out
    assert "resuming" not in out and "finished run; retraining from scratch" in out
    assert [e["epoch"] for e in again["epochs"]] == [1, 2]
    assert all(e["time_s"] > 0 for e in again["epochs"])
    assert again["epochs"][0]["loss"] == pytest.approx(first["epochs"][0]["loss"])  # same seed, same run


def test_other_code_is_never_resumed(small_data, tmp_path, capsys, monkeypatch):
    import locallip.stages.train as train_mod

    cfg = _short_train_cfg()
    kw = dict(data=small_data, out=tmp_path / "model.pt", metrics=tmp_path / "m.json",
              state=tmp_path / "state" / "last.pt", run=QUIET)
    calls = {"n": 0}
    real = train_mod.evaluate

    def killed(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3))
    monkeypatch.setattr(train_mod, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, **kw)
    monkeypatch.setattr(train_mod, "evaluate", real)
    monkeypatch.setattr(train_mod, "code_version", lambda stage: "changed-bound-code")
    capsys.readouterr()
    s = run_train(cfg, **kw)
    out = capsys.readouterr().out
    assert "other settings, data or code; starting afresh" in out and "resuming" not in out
    assert [e["epoch"] for e in s["epochs"]] == [1, 2, 3] and s["code_version"] == "changed-bound-code"


def test_bound_code_change_retrains_through_snakemake(smoke, tmp_path):
    project = clone_project(smoke, tmp_path / "p")
    touch_later(project / "src" / "locallip" / "bounds" / "margins.py", append="\n# changed\n")
    from pipeline_helpers import snakemake
    snakemake(project, "--cores", "2", f"results/{SMOKE_BASELINE}/train/model.pt", timeout=600)
    log = (project / paths.logs_dir(SMOKE_BASELINE) / "train.log").read_text()
    assert "resuming" not in log and "epoch 1/3" in log


# --------------------------------------------------------------------------- 2. weakened settings


@pytest.mark.parametrize("overrides, message", [
    (["certify.tol=inf", "certify.max_iter=1", "certify.attack.step_size=-1"], "certify.tol"),
    (["certify.method=power", "certify.tol=1e9", "certify.max_iter=1"], "certify.tol"),
    (["certify.attack.step_size=-1"], "certify.attack.step_size"),
    (["certify.batch_size=0"], "certify.batch_size"),
])
def test_weakened_certify_settings_fail_before_any_work(overrides, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    out = tmp_path / "c.json"
    rc = cli.main(["certify", "experiment=smoke", "--radius", "0.3", "--out", str(out), *overrides])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1 and not out.exists()


def test_val_every_zero_fails_before_training(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    rc = cli.main(["train", "experiment=smoke", "train.val_every=0", "--out", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and "train.val_every must be an integer >= 1" in err


# --------------------------------------------------------------------------- 3. stale certificates


def test_a_failed_audit_removes_the_old_certificate_and_blocks_the_report(smoke, tmp_path, monkeypatch):
    import locallip.certify.split as certify_split
    import locallip.stages.certify as certify_stage

    project = clone_project(smoke, tmp_path / "p")
    cfg = smoke_cfg()
    r = cfg.certify.radii[0]
    out, table = project / paths.certificate(SMOKE, r), project / paths.certificate_table(SMOKE, r)
    good = json.loads(out.read_text())
    # what made the certificate is recorded in it: every setting (attack step size too), model, code
    prov = good["provenance"]
    assert prov["settings"]["certify"]["attack"]["step_size"] == cfg.certify.attack.step_size
    assert prov["settings"]["certify"]["tol"] == cfg.certify.tol and prov["settings"]["radius"] == r
    assert len(prov["model"]["sha256"]) == 64 and prov["code_version"]
    stage = stage_config(cfg, "certify", r)
    args = dict(data=project / paths.splits(SMOKE), model=project / paths.calibrated_model(SMOKE), out=out,
                table=table, run=QUIET)
    monkeypatch.setattr(certify_split, "audit_l2",
                        lambda m, x, y, eps, *a, **kw: torch.full((x.shape[0],), -1.0, dtype=x.dtype))
    with pytest.raises(certify_stage.AuditFailure):
        run_certify(stage, **args)
    assert not out.exists() and not table.exists()
    failed = paths.audit_failure(out)
    assert failed.is_file()
    with pytest.raises(FileNotFoundError, match="attack audit"):
        run_report(stage_config(compose(SMOKE, config_dir=project / "config"), "report"), project / "results" / SMOKE,
                   project / "results" / SMOKE / "report.md", [project / "results" / SMOKE_BASELINE])
    monkeypatch.undo()
    run_certify(stage, **args)  # a later good run
    assert out.is_file() and not failed.exists()


def test_report_settings_come_from_the_certificates(smoke):
    text = (smoke / paths.report(SMOKE)).read_text()
    settings = text.split("## Settings (as recorded by each stage)")[1]
    cfg = smoke_cfg()
    assert f"step_size: {cfg.certify.attack.step_size}" in settings
    assert f"max_iter: {cfg.certify.max_iter}" in settings  # the speed override the run used, not the default
    assert "sha256 `" in settings


# --------------------------------------------------------------------------- 4. one run per output


def test_a_second_run_on_the_same_output_fails_at_once(tmp_path, monkeypatch, capsys):
    out = tmp_path / "results" / "smoke" / "train" / "model.pt"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from locallip.foundation.files import stage_lock\n"
        f"with stage_lock({str(out)!r}, 'train'):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, env=env_for(REPO))
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.chdir(REPO)
        t0 = time.perf_counter()
        rc = cli.main(["train", "experiment=smoke", "--out", str(out), "--data", str(tmp_path / "none.npz")])
        err = capsys.readouterr().err
        assert rc == 2 and "train is already running for" in err and f"pid {holder.pid}" in err
        assert time.perf_counter() - t0 < 20  # at once, not after a training run
    finally:
        holder.kill()
        holder.wait()
    with stage_lock(out, "train"):  # released when the holder died
        with pytest.raises(StageBusy):
            with stage_lock(out, "train"):
                pass
    assert not any(p.name.endswith(".lock") for p in out.parent.iterdir())


# --------------------------------------------------------------------------- 5. wasted recompute


def test_cosmetic_settings_rerun_nothing(smoke):
    jobs = planned_jobs(smoke, targets=(), config=smoke_config(["run.progress=false", "run.threads=1"]))
    assert jobs == []


def test_touched_splits_rerun_nothing_without_a_profile(smoke, tmp_path):
    project = clone_project(smoke, tmp_path / "p")
    touch_later(project / paths.splits(SMOKE))
    touch_later(project / paths.model(SMOKE))
    assert planned_jobs(project, targets=()) == []


def test_identical_weights_give_identical_bytes(smoke, tmp_path):
    """A checkpoint's bytes depend on its contents only (no temporary file name inside), so content
    checksums (Snakemake, DVC) see a rerun that produced the same weights as no change."""
    model, ck = load_model(smoke / paths.model(SMOKE))
    extra = {k: v for k, v in ck.items() if k not in ("format", "spec", "state_dict")}
    save_model(tmp_path / "a.pt", model, **extra)
    save_model(tmp_path / "sub" / "b.pt", model, **extra)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "sub" / "b.pt").read_bytes()
    from locallip.stages.calibrate import run_calibrate
    cfg = stage_config(smoke_cfg(), "calibrate")
    for name in ("c1", "c2"):
        run_calibrate(cfg, data=smoke / paths.splits(SMOKE), model=smoke / paths.model(SMOKE),
                      out=tmp_path / name / "model.pt", summary=tmp_path / name / "calibration.json", run=QUIET)
    assert (tmp_path / "c1" / "model.pt").read_bytes() == (tmp_path / "c2" / "model.pt").read_bytes()
    assert (tmp_path / "c1" / "model.pt").read_bytes() == (smoke / paths.calibrated_model(SMOKE)).read_bytes()


# --------------------------------------------------------------------------- 6. errors


def test_override_after_options_is_accepted(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli.main(["config", "--stage", "certify", "--radius", "0.3", "experiment=smoke", "certify.tol=1e-5"]) == 0
    assert json.loads(capsys.readouterr().out)["certify"]["tol"] == 1e-5


def test_divergence_is_a_clean_error(small_data, tmp_path, capsys, monkeypatch):
    import locallip.training as train_mod

    monkeypatch.setattr(train_mod, "robust_loss", lambda *a, **k: (torch.tensor(float("nan"), requires_grad=True), {}))
    cfg = json.dumps(plain(_short_train_cfg()))
    rc = cli.main(["train", "--cfg-json", cfg, "--data", str(small_data), "--out", str(tmp_path / "m.pt"),
                   "--metrics", str(tmp_path / "m.json"), "--state", str(tmp_path / "s.pt"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 4 and "training diverged at epoch 1, step 1" in err and "Traceback" not in err
    assert not (tmp_path / "m.pt").exists()


def test_loading_errors_never_advise_unsafe_loading(smoke, tmp_path, capsys, monkeypatch):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    bad = tmp_path / "evil.pt"
    torch.save({"format": "locallip-checkpoint-1", "spec": {}, "state_dict": {}, "x": Evil()}, bad)
    monkeypatch.chdir(REPO)
    rc = cli.main(["certify", "experiment=smoke", "--radius", "0.1", "--model", str(bad),
                   "--data", str(smoke / paths.splits(SMOKE)), "--out", str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "refused, since loading them could run code" in err
    assert "weights_only=False" not in err and "trust" not in err
    arrays = tmp_path / "pickled.npz"
    np.savez(arrays, train_x=np.array([object()], dtype=object))
    rc = cli.main(["certify", "experiment=smoke", "--radius", "0.1", "--data", str(arrays),
                   "--model", str(smoke / paths.calibrated_model(SMOKE)), "--out", str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "pickled.npz" in err and "allow_pickle=True" not in err


# --------------------------------------------------------------------------- 7. tiny radii


def test_a_tiny_radius_gives_no_nan(smoke, tmp_path):
    cfg = stage_config(smoke_cfg(), "certify", 1e-300)
    s = run_certify(cfg, data=smoke / paths.splits(SMOKE), model=smoke / paths.calibrated_model(SMOKE),
                    out=tmp_path / "c.json", table=tmp_path / "c.csv", run=QUIET)
    def refuse(token):
        raise AssertionError(f"non-finite number {token} in the certificate")

    json.loads((tmp_path / "c.json").read_text(), parse_constant=refuse)
    rows = list(csv.DictReader(open(tmp_path / "c.csv")))
    assert not {v.lower() for r in rows for v in r.values()} & {"nan", "inf", "-inf"}
    correct = sum(r["label"] == r["prediction"] for r in rows)
    assert s["certified_acc_local"] * s["n"] == pytest.approx(correct)  # every correct point certified
    assert all(math.isfinite(float(r["worst_margin_local"])) for r in rows)


# --------------------------------------------------------------------------- 8. bad data, names, faults


def _digests(directory: Path) -> dict:
    """sha256 of every file under ``directory`` (what must not change when a run fails)."""
    import hashlib

    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def _bad_splits(src: Path, dst: Path, edit) -> Path:
    """A splits file as a user could make by hand: ``edit(arrays)`` changes the arrays, and the meta's
    sizes and sha256 are recomputed so that only what ``edit`` did is wrong."""
    from locallip.data.splits import ARRAY_KEYS, array_sha256

    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays.pop("meta").item())
    edit(arrays)
    meta["sha256"] = {k: array_sha256(arrays[k]) for k in ARRAY_KEYS}
    meta["sizes"] = {s: int(len(arrays[f"{s}_y"])) for s in ("train", "val", "calib", "test")}
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    np.savez_compressed(dst, **arrays)
    return dst


def _cli(argv, capsys):
    rc = cli.main(list(argv) + ["--no-progress"] if argv[0] not in ("download", "config") else list(argv))
    err = capsys.readouterr().err
    return rc, err


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_layer_whose_mask_removes_every_neuron_certifies_at_every_level():
    """A dead layer makes the network constant on the ball: robust, so certified (it used to crash the
    probabilistic level in scipy's tridiagonal eigensolver)."""
    from torch import nn

    from locallip.certify import certify

    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(100, 80), nn.ReLU(), nn.Linear(80, 10)).double()
    m[1].bias.data.fill_(-3.0)
    x = torch.rand(8, 1, 10, 10, dtype=torch.float64)
    y = m(x).argmax(1)
    for level in ("probabilistic", "exact", "estimate"):
        for cascade in (True, False):
            c = certify(m, x, y, 0.3, guarantee=level, cascade=cascade, generator=torch.Generator().manual_seed(0))
            assert c.certified.all(), (level, cascade)


@pytest.mark.parametrize("stage_name", ["certify", "calibrate", "train"])
def test_labels_outside_the_classes_are_refused_and_nothing_is_overwritten(smoke, tmp_path, capsys, monkeypatch,
                                                                           stage_name):
    project = clone_project(smoke, tmp_path / "p")
    monkeypatch.chdir(project)
    bad = _bad_splits(project / paths.splits(SMOKE), tmp_path / "bad.npz",
                      lambda a: [a["test_y"].__setitem__(0, 10), a["calib_y"].__setitem__(0, -1),
                                 a["train_y"].__setitem__(0, 12)])
    before = _digests(project / "results" / SMOKE)
    argv = {"certify": ["certify", "experiment=smoke", "--radius", "0.1", "--data", str(bad)],
            "calibrate": ["calibrate", "experiment=smoke", "--data", str(bad)],
            "train": ["train", "experiment=smoke", "--data", str(bad)]}[stage_name]
    rc, err = _cli(argv, capsys)
    line = _one_line(err)
    assert rc == 2 and "labels outside [0, 10)" in line, line
    assert _digests(project / "results" / SMOKE) == before


@pytest.mark.parametrize("name", ["../../escape", "", "a/b", ".."])
def test_names_that_would_leave_results_are_refused(tmp_path, capsys, monkeypatch, name):
    project = tmp_path / "p"
    shutil.copytree(REPO / "config", project / "config")
    monkeypatch.chdir(project)
    rc, err = _cli(["download", "experiment=smoke", f"name={name}"], capsys)
    line = _one_line(err)
    assert rc == 2 and "name must be letters, digits" in line, line
    assert not any(tmp_path.rglob("splits.npz")) and not (project / "results").exists()


def test_divergence_is_the_divergence_error_and_keeps_the_previous_run(smoke, tmp_path, capsys, monkeypatch):
    project = clone_project(smoke, tmp_path / "p")
    monkeypatch.chdir(project)
    before = _digests(project / "results" / SMOKE)
    rc, err = _cli(["train", "experiment=smoke", "train.epochs=1", "train.lr=1e30"], capsys)
    line = _one_line(err)
    assert rc == 4 and "training diverged" in line, line
    assert _digests(project / "results" / SMOKE) == before  # the earlier run's model, metrics and state


def test_an_empty_test_split_is_a_one_line_error(smoke, tmp_path, capsys, monkeypatch):
    project = clone_project(smoke, tmp_path / "p")
    monkeypatch.chdir(project)
    empty = _bad_splits(project / paths.splits(SMOKE), tmp_path / "empty.npz",
                        lambda a: [a.__setitem__("test_x", a["test_x"][:0]), a.__setitem__("test_y", a["test_y"][:0])])
    before = _digests(project / "results" / SMOKE)
    rc, err = _cli(["certify", "experiment=smoke", "--radius", "0.1", "--data", str(empty)], capsys)
    line = _one_line(err)
    assert rc == 2 and "the test split is empty" in line, line
    assert _digests(project / "results" / SMOKE) == before


def test_a_read_only_output_directory_is_a_one_line_error(smoke, tmp_path, capsys, monkeypatch):
    import os

    project = clone_project(smoke, tmp_path / "p")
    monkeypatch.chdir(project)
    ro = tmp_path / "read-only"
    ro.mkdir()
    real_open = os.open

    def denied(path, *a, **k):  # what a directory without write permission gives (root ignores chmod)
        if str(path).startswith(str(ro)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    ro.chmod(0o555)
    monkeypatch.setattr(os, "open", denied)
    try:
        rc, err = _cli(["certify", "experiment=smoke", "--radius", "0.1", "--out", str(ro / "c.json"),
                        "--table", str(ro / "c.csv")], capsys)
    finally:
        monkeypatch.undo()
        ro.chmod(0o755)
    line = _one_line(err)
    assert rc == 2 and "cannot write to" in line and "permission denied" in line, line
    assert list(ro.iterdir()) == []


def test_api_misuse_is_a_one_line_error():
    from torch import nn

    from locallip.bounds import local_bound
    from locallip.certify import certified_radius, certify
    from locallip.nn import build_model

    model = build_model("2c2f", "relu", (1, 28, 28), 10).double().eval()
    empty = torch.zeros(0, 1, 28, 28, dtype=torch.float64)
    for call in (lambda: certify(model, empty, torch.zeros(0, dtype=torch.long), 0.1),
                 lambda: local_bound(model, empty, 0.1), lambda: certified_radius(model, empty)):
        with pytest.raises(ValueError, match="empty batch"):
            call()
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)).double()
    three_d = torch.rand(5, 28, 28, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"Conv2d needs inputs of shape \(channels, height, width\)"):
        certify(conv, three_d, torch.zeros(5, dtype=torch.long), 0.1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_is_refused(dtype):
    from torch import nn

    from locallip.certify import certify

    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)
    x = torch.rand(4, 1, 4, 4).to(dtype)
    with pytest.raises(ValueError, match="reduced precision is refused"):
        certify(net, x, torch.zeros(4, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match="parameters are torch.float16|parameters are torch.bfloat16"):
        certify(net, x.float(), torch.zeros(4, dtype=torch.long), 0.1)


def test_calibrate_names_an_input_shape_mismatch(smoke, tmp_path, capsys, monkeypatch):
    project = clone_project(smoke, tmp_path / "p")
    monkeypatch.chdir(project)
    from locallip.nn import build_model

    other = build_model("2c2f", "clipped_relu", (1, 64, 64), 10)
    save_model(tmp_path / "other.pt", other, train={"bound": "local"})
    before = _digests(project / "results" / SMOKE)
    rc, err = _cli(["calibrate", "experiment=smoke", "--model", str(tmp_path / "other.pt")], capsys)
    line = _one_line(err)
    assert rc == 2 and "calibration images of shape (1, 28, 28) do not fit the model input (1, 64, 64)" in line, line
    assert _digests(project / "results" / SMOKE) == before


def test_the_readme_says_what_a_new_radius_reruns(smoke):
    """The README's account of what a new radius reruns is what the workflow plans."""
    from pipeline_helpers import job_keys, new_radius, radii_override, smoke_radii

    readme = (REPO / "README.md").read_text()
    assert "a new radius adds one certify job per system of the report" in readme
    top = max(smoke_radii(SMOKE)) * 2  # above the largest: the curve's range follows it
    jobs = job_keys(planned_jobs(smoke, targets=[f"results/{SMOKE}/report.md"], config=smoke_config(
        experiment_overrides={SMOKE: [radii_override(smoke_radii(SMOKE) + [top])]})))
    from locallip.foundation.ranges import radius_tag

    assert ("certify", SMOKE, radius_tag(top)) in jobs and ("certify", SMOKE_BASELINE, radius_tag(top)) in jobs
    assert ("radii", SMOKE) in jobs and ("report", SMOKE) in jobs
    assert "radius above the largest also reruns `radii`" in readme


def test_a_dry_run_of_dvc_works_in_a_fresh_clone(tmp_path):
    """`dvc repro --dry` cannot plan past a stage whose outputs do not exist yet (DVC's limitation):
    `python workflow/scripts/dvc_pipeline.py dry` lists what `dvc repro` would run, in order."""
    from pipeline_helpers import copy_project, dvc_pipeline, git

    project = copy_project(tmp_path / "p")
    git(project, "init", "-q")
    p = dvc_pipeline(project, "dry")
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert lines[0].startswith("download-") and any(ln.startswith("report-") for ln in lines)
    names = [ln.split()[0] for ln in lines]
    assert names.index("download-mnist5k_r158") < names.index("train-mnist5k_r158") < names.index(
        "report-mnist5k_r158")
    assert "dvc_pipeline.py dry" in (REPO / "README.md").read_text()
