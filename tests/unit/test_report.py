"""Report stage: synthetic stage outputs in the stages' formats -> report.md + plots.

Checks the tables (every guarantee level named, the baseline side by side with the winner),
the plots, what the certificates guarantee, that settings come from the certificates, and
that inputs which do not belong together (other models, other settings, a failed audit)
are refused without writing anything.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from locallip.foundation.compose import compose
from locallip.foundation.ranges import radius_tag
from locallip.foundation.schema import ReportStage
from locallip.stages.report import run_report
from locallip.stages.report import plots as P
from locallip.stages.report import tables as T
from locallip.stages.report.render import overrides_between

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RADII = [0.1, 0.3, 0.5]


def make_cfg(name="toy", baseline="toy_gloro", radii=RADII, curve=True):
    """The report's settings: this experiment's configuration and its baseline's."""
    cfg = compose("mnist5k", config_dir=REPO / "config")
    cfg.name = name
    cfg.description = "synthetic report test"
    cfg.certify.radii = list(radii)
    cfg.curve.enabled = curve
    cfg.report.baselines = [baseline] if baseline else []
    baselines = {}
    if baseline:
        b = compose("mnist5k_gloro", config_dir=REPO / "config")
        b.name = baseline
        baselines[baseline] = b
    return ReportStage(config=cfg, baselines=baselines, reproduce=[f"locallip download experiment={name}"])


def report(cfg, main, base=None):
    return run_report(cfg, main, main / "report.md", baseline_dirs=[base] if base else [])


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def certificate(r, *, bound="local", cert_local=0.81, cert_global=0.70, broken=0, levels=None, sha="a" * 64,
                settings=None, epoch=3, code="c0de"):
    levels = levels or {"probabilistic": {"certified_acc": cert_local, "guarantee": "probabilistic: test text",
                                          "points_computed": 500, "time_s": 1.0, "samples_per_s": 500.0,
                                          "broken": 0, "delta": 1e-9, "delta_layer": 1e-9 / 3,
                                          "expected_false_certificates_at_most": 5e-7,
                                          "layers": [{"side": "input", "steps": 92, "n_max": 784,
                                                      "inflation_max": 0.0106, "fp_margin_max": 6e-4,
                                                      "global_fallback": 0}]}}
    return {"radius": float(r), "n": 500, "clean_acc": 0.95, "certified_acc_local": cert_local,
            "certified_acc_global": cert_global, "median_bound_ratio": 0.9, "not_converged": 0,
            "samples_per_s": 500.0, "time_s": 2.0, "device": "cpu", "torch": "2.x",
            "guarantee": {"local": "probabilistic: test text", "global": "upper bound: exact SVD"},
            "guarantee_level": "probabilistic", "levels": levels,
            "attack": {"steps": 50, "restarts": 5, "step_size": 0.1, "checked": 300, "broken": broken},
            "bound_used_for_training": bound,
            "provenance": {"settings": settings or {"name": "toy", "radius": float(r), "certify": {"tol": 1e-4}},
                           "model": {"path": "results/toy/calibrate/model.pt", "sha256": sha, "epoch": epoch,
                                     "train_code_version": code},
                           "code_version": "ce57"}}


def make_experiment(d: Path, bound="local", radii=RADII, cert_local=(0.93, 0.87, 0.72),
                    cert_global=(0.92, 0.81, 0.66), curve=True, applicable=True):
    epochs = [{"epoch": e, "loss": 2.0 / e, "val_clean_acc": 0.8 + 0.02 * e, "val_certified_acc": 0.3 + 0.05 * e,
               "eps": min(0.35, 0.1 * e), "time_s": 3.25,
               "fixed_per_layer": [0.01 * e, 0.02 * e, 0.4] if bound == "local" else None,
               "bound_ratio_layers_median": [0.99, 0.995, 1.0] if bound == "local" else None,
               "bound_ratio_layers_worst": [0.97, 0.98, 0.95] if bound == "local" else None,
               "bound_ratio_median": 0.99 if bound == "local" else None} for e in range(1, 5)]
    _write(d / "train" / "metrics.json", {
        "epochs": epochs, "best_epoch": 3, "device": "cpu", "torch": "2.x", "train_time_s": 13.0,
        "bound": bound, "loss": "bcp_mix" if bound == "local" else "gloro", "params": 123456,
        "code_version": "c0de", "settings": {"name": d.name, "model": {"arch": "2c2f", "activation": "clipped_relu"},
                                             "train": {"epochs": 4}}})
    cal = ({"applicable": True, "message": "chose scales [1.25]", "eps": 0.3, "max_clean_drop": 0.02,
            "tried": [{"scale": 0.5, "layer": None, "clean_acc": 0.95, "certified_acc": 0.52, "accepted": False},
                      {"scale": 1.25, "layer": None, "clean_acc": 0.971, "certified_acc": 0.6487, "accepted": True}],
            "chosen_scale": 1.25, "before": {"clean_acc": 0.9733, "certified_acc": 0.6012},
            "after": {"clean_acc": 0.971, "certified_acc": 0.6487}, "time_s": 4.5}
           if applicable else
           {"applicable": False, "message": "activation 'relu' has no clipping thresholds", "eps": 0.3,
            "max_clean_drop": 0.02, "tried": [], "chosen_scale": None, "before": None, "after": None, "time_s": 0.01})
    _write(d / "calibrate" / "calibration.json", cal)
    for i, r in enumerate(radii):
        _write(d / "certify" / f"radius_{radius_tag(r)}.json",
               certificate(r, bound=bound, cert_local=cert_local[i], cert_global=cert_global[i]))
        (d / "certify" / f"radius_{radius_tag(r)}.csv").write_text("index,label,prediction\n")
    if curve:
        rows = ["index,label,prediction,certified_radius_local,certified_radius_global"]
        rows += [f"{i},1,1,{0.05 * (i % 12)},{0.04 * (i % 12)}" for i in range(40)] + ["40,1,2,0.0,0.0"]
        (d / "certify" / "radii.csv").write_text("\n".join(rows) + "\n")
    return d


@pytest.fixture
def dirs(tmp_path):
    main = make_experiment(tmp_path / "results" / "toy")
    base = make_experiment(tmp_path / "results" / "toy_gloro", bound="global", applicable=False,
                           cert_local=(0.92, 0.85, 0.70), cert_global=(0.92, 0.84, 0.69))
    return main, base


def _row(text: str, first_cell: str) -> list:
    rows = [ln for ln in text.splitlines() if ln.startswith(f"| {first_cell} |")]
    assert rows, f"no table row starting with {first_cell!r}"
    return [c.strip() for c in rows[0].strip().strip("|").split("|")]


def _assert_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000, path


# ----------------------------------------------------------------------------- formatting


def test_formatting():
    assert T.fmt_pct(0.6234) == "62.3" and T.fmt_pct(None) == "—" and T.fmt_pct(float("nan")) == "n/a"
    assert T.fmt_radius(1.58) == "1.58" and T.fmt_radius(36 / 255) == "0.1412 (36/255)" and T.fmt_radius(1.0) == "1"
    assert T.markdown_table(["a", "b|c"], [[1, "x\ny"]]).splitlines() == ["| a | b\\|c |", "|---|---|", "| 1 | x y |"]


# ----------------------------------------------------------------------------- full report


def test_report_with_baseline(dirs):
    main, base = dirs
    out = report(make_cfg(), main, base)
    text = out.read_text()
    # every guarantee level is named in the column it heads
    assert "certified, local bound, probabilistic: P(false) <= 1e-09 per point (%)" in text
    assert "certified, global bound, exact (%)" in text
    assert _row(text, "0.3")[:5] == ["0.3", "500", "95.0", "87.0", "81.0"]
    # side by side: each model's headline certificate, the winner and the difference
    assert "| 0.3 | 87.0 | 85.0 | **toy** | +2.0 |" in text
    assert "| 0.5 | 72.0 | 70.0 | **toy** | +2.0 |" in text
    # equal training time: both runs' times and the answer from the validation curves
    equal = text.split("### At equal training time")[1].split("## Plots")[0]
    assert "toy (this model): Local-Lip" in equal and "toy_gloro: GloRo" in equal and "13.00 s" in equal
    assert "by 13.00 s of training" in equal
    # how to reproduce: the stage commands it was given
    assert "locallip download experiment=toy" in text
    # what the certificates guarantee: delta, steps, the expected number of false certificates
    assert "P(false) <= 1e-09 (delta per layer" in text and "92 steps" in text and "at most 5e-07" in text
    # settings come from what the stages recorded, with the model digest and code versions
    assert "sha256 `" + "a" * 64 + "`" in text and "certify `ce57`" in text
    for name in ("training.png", "bound_diagnostics.png", "certified_vs_radius.png", "certified_vs_time.png"):
        _assert_png(main / "plots" / name)
        assert f"(plots/{name})" in text
    assert "(certify/radius_0.1.csv)" in text


def test_report_without_baseline_and_without_curve(tmp_path):
    main = make_experiment(tmp_path / "results" / "toy", curve=False)
    report(make_cfg(baseline=None, curve=False), main)
    text = (main / "report.md").read_text()
    assert "### Side by side" not in text and "baseline" not in text.split("## Plots")[0].lower()
    _assert_png(main / "plots" / "certified_vs_radius.png")


def test_a_winner_per_radius_with_ties_and_losses(dirs):
    main, base = dirs
    for r, local in ((0.1, 0.92), (0.3, 0.80)):  # a tie at 0.1, the baseline wins at 0.3
        p = main / "certify" / f"radius_{radius_tag(r)}.json"
        c = json.loads(p.read_text())
        c["certified_acc_local"] = local
        p.write_text(json.dumps(c))
    report(make_cfg(), main, base)
    lines = (main / "report.md").read_text().split("### Side by side")[1].split("## Plots")[0]
    assert "| 0.1 | 92.0 | 92.0 | tie: toy, toy_gloro | +0.0 |" in lines
    assert "| 0.3 | 80.0 | 85.0 | **toy_gloro** | -5.0 |" in lines


def test_broken_attack_is_flagged(dirs):
    main, base = dirs
    p = main / "certify" / "radius_0.3.json"
    c = json.loads(p.read_text())
    c["attack"]["broken"] = 2
    p.write_text(json.dumps(c))
    report(make_cfg(), main, base)
    text = (main / "report.md").read_text()
    assert "**WARNING**: this model, radius 0.3: the attack broke 2 of 300" in text
    assert "**WARNING: 2/300 broken**" in text


def test_a_budgeted_audit_says_how_many_points_it_audited(dirs):
    main, base = dirs
    p = main / "certify" / "radius_0.3.json"
    c = json.loads(p.read_text())
    c["attack"].update(budget=1.0, robust_points=410, unaudited=110)
    p.write_text(json.dumps(c))
    report(make_cfg(), main, base)
    text = (main / "report.md").read_text()
    assert "radius 0.3: audited 300 of 410 certified points (budget 1 x certification time)" in text
    assert "| 0/300 (of 410) |" in text
    assert text.count("audited 300 of") == 1  # the other radii (no budget recorded) keep today's text


def test_calibration_sections(dirs):
    main, base = dirs
    report(make_cfg(), main, base)
    text = (main / "report.md").read_text()
    assert "| before calibration | 97.3 | 60.1 |" in text and "| all | 1.25 | 97.1 | 64.9 | yes |" in text


# ----------------------------------------------------------------------------- refused inputs


@pytest.mark.parametrize("which", ["certificate", "metrics", "calibration", "baseline_certificate", "radii"])
def test_missing_input_raises_and_writes_nothing(dirs, which):
    main, base = dirs
    path = {"certificate": main / "certify" / "radius_0.3.json", "metrics": main / "train" / "metrics.json",
            "calibration": main / "calibrate" / "calibration.json",
            "baseline_certificate": base / "certify" / "radius_0.5.json", "radii": main / "certify" / "radii.csv"}[which]
    path.unlink()
    with pytest.raises(FileNotFoundError, match=path.name):
        report(make_cfg(), main, base)
    assert not (main / "report.md").exists() and not (main / "plots").exists()


def test_a_failed_audit_record_refuses_the_report(dirs):
    main, base = dirs
    (main / "certify" / "radius_0.3.json.audit-failed.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="attack audit"):
        report(make_cfg(), main, base)


@pytest.mark.parametrize("change, message", [
    (lambda c: c["provenance"]["model"].update(sha256="b" * 64), "different models"),
    (lambda c: c["provenance"]["settings"]["certify"].update(tol=1e9), "different settings"),
    (lambda c: c["provenance"].update(code_version="other"), "different code versions"),
    (lambda c: c.update(radius=0.31), "holds radius 0.31"),
])
def test_certificates_that_do_not_belong_together_are_refused(dirs, change, message):
    main, base = dirs
    p = main / "certify" / "radius_0.3.json"
    c = json.loads(p.read_text())
    change(c)
    p.write_text(json.dumps(c))
    with pytest.raises(ValueError, match=message):
        report(make_cfg(), main, base)
    assert not (main / "report.md").exists()


def test_a_model_other_than_the_trained_one_is_refused(dirs):
    main, base = dirs
    m = json.loads((main / "train" / "metrics.json").read_text())
    m["best_epoch"] = 4  # a retrain chose another epoch; the certificates are from the old model
    (main / "train" / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="epoch 3.*epoch 4"):
        report(make_cfg(), main, base)


def test_malformed_certificate_names_file_and_key(dirs):
    main, base = dirs
    p = main / "certify" / "radius_0.1.json"
    c = json.loads(p.read_text())
    del c["attack"]
    p.write_text(json.dumps(c))
    with pytest.raises(ValueError, match=r"radius_0.1.json: missing key\(s\) attack"):
        report(make_cfg(), main, base)


# ----------------------------------------------------------------------------- pieces


def test_overrides_between_recorded_and_current():
    o, u = overrides_between({"a": 1, "b": {"c": "x y", "d": [1.0, 2.0]}, "e": None},
                             {"a": 2, "b": {"c": "z", "d": [1.0]}, "e": None}, "train")
    assert o == ["train.a=1", "train.b.c='x y'", "train.b.d=[1.0,2.0]"] and u == []


def test_curve_from_radii():
    rows = [{"label": 1, "prediction": 1, "local": 0.3, "global": 0.1},
            {"label": 1, "prediction": 2, "local": 0.0, "global": 0.0},
            {"label": 2, "prediction": 2, "local": 0.05, "global": 0.05}]
    assert T.curve(rows, "local", [0.0, 0.05, 0.2, 0.4]) == [2 / 3, 2 / 3, 1 / 3, 0.0]
    assert T.curve(rows, "global", [0.1]) == [1 / 3]


def test_plot_functions_directly(tmp_path):
    metrics = json.loads((make_experiment(tmp_path / "results" / "p") / "train" / "metrics.json").read_text())
    _assert_png(P.plot_training(metrics, tmp_path / "t.png"))
    _assert_png(P.plot_bound_diagnostics(metrics, tmp_path / "d.png"))
    _assert_png(P.plot_bound_diagnostics({"epochs": [{"epoch": 1}]}, tmp_path / "d0.png"))
    rows = T.headline_rows([certificate(r) for r in RADII])
    _assert_png(P.plot_certified_vs_radius(rows, tmp_path / "r.png"))


def test_report_names_settings_that_differ_from_the_committed_config(dirs):
    main, base = dirs
    cfg = make_cfg(name="mnist5k")  # a real experiment name: its composition is compared
    for d in (main,):
        for r in RADII:
            p = d / "certify" / f"radius_{radius_tag(r)}.json"
            c = json.loads(p.read_text())
            c["provenance"]["settings"] = {"name": "mnist5k", "radius": r,
                                           "certify": {**copy.deepcopy(_certify_settings()), "tol": 1e-5}}
            p.write_text(json.dumps(c))
    report(cfg, main, base)
    text = (main / "report.md").read_text()
    assert "differ from what `config/experiment/mnist5k.yaml` composed to" in text
    assert "certify.tol=1e-05" in text


def _certify_settings():
    from locallip.foundation.compose import plain
    from locallip.pipeline.table import stage_config
    s = plain(stage_config(compose("mnist5k", config_dir=REPO / "config"), "certify", 0.3))
    return s["certify"]


def test_baselines_are_paired_with_their_directories_in_the_listed_order(tmp_path):
    """The job configuration reaches the report with sorted keys; the directories come in the
    order ``report.baselines`` lists them. Each baseline's numbers must carry its own name."""
    main = make_experiment(tmp_path / "results" / "toy")
    zz = make_experiment(tmp_path / "results" / "zz_gloro", bound="global", applicable=False,
                         cert_local=(0.50, 0.40, 0.30), cert_global=(0.50, 0.40, 0.30))
    aa = make_experiment(tmp_path / "results" / "aa_bcp", cert_local=(0.60, 0.55, 0.45),
                         cert_global=(0.58, 0.52, 0.41))
    cfg = make_cfg(baseline="zz_gloro")
    b = copy.deepcopy(cfg.baselines["zz_gloro"])
    b.name = "aa_bcp"
    cfg.config.report.baselines = ["zz_gloro", "aa_bcp"]
    cfg.baselines = {"aa_bcp": b, "zz_gloro": cfg.baselines["zz_gloro"]}  # sorted, as the JSON arrives
    out = run_report(cfg, main, main / "report.md", baseline_dirs=[zz, aa])
    text = out.read_text()
    assert "| 0.3 | 87.0 | 40.0 | 55.0 | **toy** |" in text
    assert "### zz_gloro (baseline: GloRo" in text and "### aa_bcp (baseline:" in text
    zz_section = text.split("### zz_gloro")[1].split("###")[0]
    assert "| 0.3 |" in zz_section and "40.0" in _row(zz_section, "0.3")


def test_report_links_the_exported_model_when_the_export_stage_ran(dirs):
    main, base = dirs
    assert "Exported model" not in report(make_cfg(), main, base).read_text()
    for f in ("model.safetensors", "model.json", "model_card.md", "model_card.json"):
        (main / "export").mkdir(exist_ok=True)
        (main / "export" / f).write_text("x")
    text = report(make_cfg(), main, base).read_text()
    assert "[weights](export/model.safetensors)" in text and "[model card](export/model_card.md)" in text


def test_the_certify_stages_resolved_linear_relaxation_is_not_a_settings_drift():
    """The certify stage records auto as what ran (off in the pipeline); the report must not call that a
    difference from the configuration (a fresh clone's report did), but must still see a real one."""
    from dataclasses import replace

    from locallip.foundation.compose import compose, plain, with_linear_relaxation
    from locallip.stages.report.render import settings_drift

    cfg = compose("smoke")
    assert str(cfg.certify.linear_relaxation) == "auto"
    recorded = {"certify": {"certify": plain(with_linear_relaxation(cfg.certify, auto_on=False))}}
    assert settings_drift(cfg, recorded) == ([], [])
    recorded = {"certify": {"certify": plain(with_linear_relaxation(cfg.certify, auto_on=True))}}
    assert settings_drift(cfg, recorded)[0] == ["certify.linear_relaxation=on"]
    explicit = replace(cfg, certify=replace(cfg.certify, linear_relaxation=type(cfg.certify.linear_relaxation)("on")))
    assert settings_drift(explicit, recorded) == ([], [])
