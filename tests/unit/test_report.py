"""Report stage: synthetic stage outputs in the fixed formats -> report.md + plots."""
from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from locallip import report as R
from locallip.config import Config, radius_tag

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RADII = [0.5, 1.0, 1.58]
GUARANTEE = {"local": "power-iteration ESTIMATE of the masked norms (tol 1e-6, may under-estimate)",
             "global": "guaranteed upper bound (exact SVD of every layer)"}


def make_cfg(name="toy", baseline="toy_gloro", dataset="mnist5k", arch="4c3f", radii=RADII, paper=None):
    cfg = OmegaConf.to_container(OmegaConf.structured(Config), resolve=True)
    cfg["name"] = name
    cfg["description"] = "synthetic report test"
    cfg["dataset"]["name"] = dataset
    cfg["model"]["arch"] = arch
    cfg["certify"]["radii"] = list(radii)
    cfg["report"]["baseline"] = baseline
    cfg["report"]["paper"] = paper if paper is not None else [
        {"setting": "MNIST (60k), eps 1.58, 4C3F", "system": "GloRo (repo README)", "eps": 1.58,
         "clean": None, "certified": 62.8, "source": "Leino et al. 2021, github klasleino/gloro"}]
    return cfg


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def make_experiment(d: Path, bound="local", radii=RADII, clean=0.9812, cert_local=(0.8123, 0.7031, 0.6234),
                    cert_global=(0.7011, 0.5544, 0.4102), broken=(0, 0, 0), applicable=True,
                    not_converged=(0, 1, 0)):
    epochs = [{"epoch": e, "loss": 2.0 / e, "val_clean_acc": 0.8 + 0.02 * e, "val_certified_acc": 0.3 + 0.05 * e,
               "eps": min(1.74, 0.6 * e), "kappa": max(0.0, 1 - 0.3 * e), "lr": 1e-3,
               "theta_mean": 1.0 if bound == "local" else None, "fixed_fraction": 0.5 if bound == "local" else None,
               "time_s": 3.25} for e in range(1, 5)]
    _write(d / "train" / "metrics.json", {
        "epochs": epochs, "best_epoch": 3, "device": "cpu", "torch": "2.15.0", "train_time_s": 13.0,
        "bound": bound, "loss": "bcp_mix" if bound == "local" else "gloro", "params": 123456})
    if applicable:
        cal = {"applicable": True, "message": "", "eps": 1.58, "max_clean_drop": 0.02,
               "tried": [{"scale": 0.5, "clean_acc": 0.95, "certified_acc": 0.52, "accepted": False},
                         {"scale": 1.25, "clean_acc": 0.971, "certified_acc": 0.6487, "accepted": True}],
               "chosen_scale": 1.25, "before": {"clean_acc": 0.9733, "certified_acc": 0.6012},
               "after": {"clean_acc": 0.971, "certified_acc": 0.6487}, "time_s": 4.5}
    else:
        cal = {"applicable": False, "message": "activation relu has no clipping threshold to calibrate",
               "eps": 1.58, "max_clean_drop": 0.02, "tried": [], "chosen_scale": None,
               "before": None, "after": None, "time_s": 0.01}
    _write(d / "calibrate" / "calibration.json", cal)
    for i, r in enumerate(radii):
        _write(d / "certify" / f"radius_{radius_tag(r)}.json", {
            "radius": float(r), "n": 500, "clean_acc": clean, "certified_acc_local": cert_local[i],
            "certified_acc_global": cert_global[i], "median_bound_ratio": 0.4321 + 0.1 * i,
            "not_converged": not_converged[i], "samples_per_s": 812.5, "time_s": 0.6154, "device": "cpu",
            "torch": "2.15.0", "guarantee": GUARANTEE,
            "attack": {"steps": 50, "restarts": 5, "checked": 300, "broken": broken[i]},
            "bound_used_for_training": bound})
        (d / "certify" / f"radius_{radius_tag(r)}.csv").write_text("index,label,pred,certified\n")
    return d


@pytest.fixture
def dirs(tmp_path):
    main = make_experiment(tmp_path / "results" / "toy")
    base = make_experiment(tmp_path / "results" / "toy_gloro", bound="global", applicable=False,
                           cert_local=(0.7502, 0.6011, 0.4901), cert_global=(0.7402, 0.5911, 0.4801))
    return main, base


def _row(text: str, first_cell: str) -> str:
    rows = [ln for ln in text.splitlines() if ln.startswith(f"| {first_cell} |")]
    assert rows, f"no table row starting with {first_cell!r}"
    return rows[0]


def _cells(line: str):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _assert_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 1000
    import matplotlib.image
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100


# ----------------------------------------------------------------------------- formatting

def test_fmt_pct():
    assert R.fmt_pct(0.6234) == "62.3"
    assert R.fmt_pct(1.0) == "100.0"
    assert R.fmt_pct(0.0) == "0.0"
    assert R.fmt_pct(None) == "—"
    assert R.fmt_pct(float("nan")) == "n/a"
    assert R.fmt_paper(62.8) == "62.8"


def test_fmt_radius():
    assert R.fmt_radius(1.58) == "1.58"
    assert R.fmt_radius(0.5) == "0.5"
    assert R.fmt_radius(36 / 255) == "0.1412 (36/255)"
    assert R.fmt_radius(1.0) == "1"


# ----------------------------------------------------------------------------- full report

def test_report_with_baseline(dirs):
    main, base = dirs
    out = main / "report.md"
    cfg = make_cfg()
    assert R.run_report(cfg, main, out, baseline_dir=base) == out
    text = out.read_text()

    assert text.startswith("# toy:")
    assert "synthetic report test" in text
    assert "snakemake --cores 8 results/toy/report.md" in text
    for stage in ("download", "train", "calibrate", "report"):
        assert f"locallip {stage} experiment=toy" in text
    for r in RADII:
        assert f"locallip certify experiment=toy --radius {radius_tag(r)}" in text

    # headline rows of this model: radius | n | clean | local | global | ratio | attack | not converged
    cells = _cells(_row(text, "1.58"))
    assert cells == ["1.58", "500", "98.1", "62.3", "41.0", "0.6321", "0/300", "0"]
    assert _cells(_row(text, "0.5"))[2:5] == ["98.1", "81.2", "70.1"]
    assert _cells(_row(text, "1"))[-1] == "1"  # not converged at radius 1.0

    # baseline rows, labelled, side by side
    assert "### toy_gloro (GloRo baseline)" in text
    assert "74.0" in text and "48.0" in text  # baseline global-bound certified acc at 0.5 and 1.58
    side = [ln for ln in text.splitlines() if ln.startswith("| 1.58 | 62.3 | 41.0 |")]
    assert side and _cells(side[0])[3] == "48.0"

    # plots embedded with relative links, valid PNGs
    assert "](plots/training.png)" in text
    assert "](plots/certified_vs_radius.png)" in text
    _assert_png(main / "plots" / "training.png")
    _assert_png(main / "plots" / "certified_vs_radius.png")
    assert not list((main / "plots").glob("*.tmp"))

    # calibration effect
    assert "Chosen scale: **1.25**" in text
    assert _cells(_row(text, "before calibration"))[1:] == ["97.3", "60.1"]
    assert _cells(_row(text, "after calibration"))[1:] == ["97.1", "64.9"]
    assert "activation relu has no clipping threshold" in text  # the baseline's calibration message

    # guarantees, tolerance, data use
    assert GUARANTEE["local"] in text and GUARANTEE["global"] in text
    assert f"tolerance of {cfg['certify']['tol']}" in text
    assert "validation split" in text and "calibration split" in text and "used once, by certification" in text

    # timings and environment
    assert "13.00 s" in text and "812.5" in text and "2.15.0" in text and "cpu" in text

    # no soundness warning when nothing was broken
    assert "WARNING" not in text

    # settings: the YAML block is the full config
    block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    assert yaml.safe_load(block) == cfg

    # per-sample CSV linked
    assert "](certify/radius_1.58.csv)" in text


def test_report_without_baseline(dirs):
    main, _ = dirs
    out = main / "report.md"
    R.run_report(make_cfg(baseline=None), main, out)
    text = out.read_text()
    assert "(GloRo baseline)" not in text
    assert "toy_gloro" not in text
    assert _cells(_row(text, "1.58"))[3] == "62.3"
    _assert_png(main / "plots" / "certified_vs_radius.png")


def test_broken_attack_is_flagged(tmp_path):
    main = make_experiment(tmp_path / "toy", broken=(0, 3, 0))
    out = tmp_path / "toy" / "report.md"
    R.run_report(make_cfg(baseline=None), main, out)
    text = out.read_text()
    row = _row(text, "1")
    assert "**WARNING: 3/300 broken**" in row
    assert "WARNING" not in _row(text, "0.5") and "WARNING" not in _row(text, "1.58")
    # and loudly above the tables
    head = text.split("## How to reproduce")[0]
    assert "**WARNING**" in head and "radius 1" in head and "3 of 300" in head


def test_broken_baseline_attack_is_flagged(dirs, tmp_path):
    main, _ = dirs
    base = make_experiment(tmp_path / "b", bound="global", broken=(1, 0, 0))
    out = main / "report.md"
    R.run_report(make_cfg(), main, out, baseline_dir=base)
    text = out.read_text()
    assert "**WARNING**: toy_gloro (GloRo baseline), radius 0.5" in text
    assert "**WARNING: 1/300 broken**" in text


def test_baseline_not_global_is_flagged(dirs, tmp_path):
    main, _ = dirs
    base = make_experiment(tmp_path / "b", bound="local")
    out = main / "report.md"
    R.run_report(make_cfg(), main, out, baseline_dir=base)
    assert "not the global (GloRo) bound" in out.read_text()


def test_paper_row_beside_ours_and_labelled(dirs):
    main, base = dirs
    out = main / "report.md"
    paper = [
        {"setting": "MNIST (60k), eps 1.58, 4C3F", "system": "GloRo (repo README)", "eps": 1.58 + 5e-7,
         "clean": None, "certified": 62.8, "source": "Leino et al. 2021"},
        {"setting": "MNIST, eps 0.3, 2C2F", "system": "GloRo (repo README)", "eps": 0.3,
         "clean": None, "certified": 95.7, "source": "Leino et al. 2021"},
    ]
    R.run_report(make_cfg(paper=paper), main, out, baseline_dir=base)
    text = out.read_text()
    section = text.split("## Reference numbers")[1].split("\n## ")[0]
    row = _row(section, "MNIST (60k), eps 1.58, 4C3F")
    cells = _cells(row)
    assert cells[1] == "GloRo (repo README) — paper (Leino et al. 2021)"
    assert cells[4] == "62.8"  # paper: certified
    assert cells[6] == "62.3"  # ours, local bound, at radius 1.58
    assert cells[8] == "48.0"  # baseline, global bound, at radius 1.58
    # mnist5k is not MNIST: said plainly
    assert "not like-for-like" in row and "not full MNIST" in row
    header = [ln for ln in section.splitlines() if ln.startswith("| paper setting")][0]
    assert "paper: certified (%)" in header and "ours: certified, local bound (%)" in header
    # the eps 0.3 row has no radius of ours: nothing placed beside it
    cells = _cells(_row(section, "MNIST, eps 0.3, 2C2F"))
    assert cells[4] == "95.7" and cells[5:9] == ["—", "—", "—", "—"]
    assert "none of our radii equals" in cells[-1]


def test_paper_row_same_setting(tmp_path):
    main = make_experiment(tmp_path / "mnist")
    cfg = make_cfg(name="mnist", dataset="mnist", baseline=None)
    R.run_report(cfg, main, tmp_path / "mnist" / "report.md")
    row = _row((tmp_path / "mnist" / "report.md").read_text(), "MNIST (60k), eps 1.58, 4C3F")
    assert "not like-for-like" not in row
    assert "dataset, architecture and radius match" in row
    # a different architecture is called out
    diffs = R.setting_differences(make_cfg(dataset="mnist", arch="2c2f"), cfg["report"]["paper"][0])
    assert diffs == ["architecture differs: ours 2C2F, paper 4C3F"]
    assert R.paper_dataset("CIFAR-10, eps 36/255, 6C2F") == "cifar10"
    assert R.paper_dataset("Tiny-ImageNet, eps 36/255, 8C2F") == "tinyimagenet"


def test_per_layer_calibration_shown(tmp_path):
    cal = {"applicable": True, "message": "chose scales [1.25, 0.5]", "eps": 1.58, "max_clean_drop": 0.02,
           "tried": [{"scale": 1.25, "layer": None, "clean_acc": 0.97, "certified_acc": 0.6, "accepted": True},
                     {"scale": 0.5, "layer": 1, "clean_acc": 0.965, "certified_acc": 0.61, "accepted": True}],
           "chosen_scale": 1.25, "chosen_scales": [1.25, 0.5], "before": {"clean_acc": 0.98, "certified_acc": 0.5},
           "after": {"clean_acc": 0.965, "certified_acc": 0.61}, "time_s": 1.0}
    text = R.calibration_section(cal)
    assert "Per-layer scales in the calibrated model: 1.25, 0.5." in text
    assert _cells(_row(text, "1"))[:2] == ["1", "0.5"] and _cells(_row(text, "all"))[1] == "1.25"
    assert "chose scales [1.25, 0.5]" in text


def test_not_applicable_calibration(tmp_path):
    main = make_experiment(tmp_path / "toy", applicable=False)
    out = tmp_path / "toy" / "report.md"
    R.run_report(make_cfg(baseline=None), main, out)
    section = out.read_text().split("## Calibration")[1].split("\n## ")[0]
    assert "not applicable: activation relu has no clipping threshold to calibrate" in section
    assert "Chosen scale" not in section


@pytest.mark.parametrize("which", ["main_certify", "main_metrics", "main_calibration", "baseline_certify"])
def test_missing_input_raises_and_writes_nothing(dirs, which):
    main, base = dirs
    out = main / "report.md"
    out.write_text("previous report\n")
    victim = {"main_certify": main / "certify" / "radius_1.0.json",
              "main_metrics": main / "train" / "metrics.json",
              "main_calibration": main / "calibrate" / "calibration.json",
              "baseline_certify": base / "certify" / "radius_1.58.json"}[which]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(victim))):
        R.run_report(make_cfg(), main, out, baseline_dir=base)
    assert out.read_text() == "previous report\n"
    assert not (main / "plots").exists()
    assert [p.name for p in main.iterdir() if p.is_file()] == ["report.md"]


def test_stale_certificate_radius_is_rejected(dirs):
    main, _ = dirs
    p = main / "certify" / "radius_1.0.json"
    d = json.loads(p.read_text())
    d["radius"] = 1.5
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="radius_1.0.json"):
        R.run_report(make_cfg(baseline=None), main, main / "report.md")
    assert not (main / "report.md").exists()


def test_malformed_certificate_names_file_and_key(dirs):
    main, _ = dirs
    p = main / "certify" / "radius_0.5.json"
    d = json.loads(p.read_text())
    del d["certified_acc_local"]
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="radius_0.5.json.*certified_acc_local"):
        R.run_report(make_cfg(baseline=None), main, main / "report.md")


def test_radius_file_names_use_radius_tag(tmp_path):
    r = 36 / 255
    main = make_experiment(tmp_path / "c", radii=[0.0, r], cert_local=(0.9, 0.6), cert_global=(0.9, 0.5),
                           broken=(0, 0), not_converged=(0, 0))
    assert (main / "certify" / f"radius_{r!r}.json").exists()
    out = main / "report.md"
    R.run_report(make_cfg(radii=[0.0, r], baseline=None, paper=[]), main, out)
    text = out.read_text()
    assert _cells(_row(text, "0.1412 (36/255)"))[3] == "60.0"
    assert f"--radius {r!r}" in text
    assert "No paper numbers are configured" in text


# ----------------------------------------------------------------------------- pieces

def test_headline_rows_and_table():
    certs = [{"radius": 1.58, "n": 10, "clean_acc": 0.9, "certified_acc_local": 0.6234,
              "certified_acc_global": float("nan"), "median_bound_ratio": 0.5, "not_converged": 2,
              "attack": {"steps": 1, "restarts": 1, "checked": 6, "broken": 1}}]
    rows = R.headline_rows(certs)
    assert rows[0]["warning"] is True
    assert R.format_headline(rows)[0] == ["1.58", "10", "90.0", "62.3", "n/a", "0.5", "**WARNING: 1/6 broken**", "2"]
    table = R.markdown_table(["a", "b"], [["x|y", 1]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 1 |"]


def test_config_overrides():
    ref = {"name": "x", "train": {"epochs": 10, "lr": 0.001, "device": "auto"},
           "certify": {"radii": [0.5, 1.58]}, "report": {"paper": [{"setting": "a"}]}}
    cfg = copy.deepcopy(ref)
    assert R.config_overrides(cfg, ref) == ([], [])
    cfg["train"]["epochs"] = 3
    cfg["train"]["device"] = "cuda"
    cfg["certify"]["radii"] = [0.25]
    cfg["report"]["paper"] = [{"setting": "b"}]  # a list of mappings: not one override
    cfg["extra"] = 1  # not in the schema
    overrides, unexpressible = R.config_overrides(cfg, ref)
    assert overrides == ["train.epochs=3", "train.device=cuda", "certify.radii=[0.25]"]
    assert unexpressible == ["report.paper", "extra"]
    cfg["report"]["paper"] = []
    cfg["train"]["device"] = "my device"
    overrides, _ = R.config_overrides(cfg, ref)
    assert "train.device='my device'" in overrides and "report.paper=[]" in overrides


def test_reproduce_with_overrides_of_real_experiment(tmp_path):
    """A report of a real experiment names exactly the overrides that differ from config/."""
    from locallip.config import compose
    cfg = compose("smoke")
    main = make_experiment(tmp_path / "smoke", radii=cfg["certify"]["radii"], cert_local=(0.8, 0.6),
                           cert_global=(0.7, 0.5), broken=(0, 0), not_converged=(0, 0))
    out = main / "report.md"
    R.run_report(cfg, main, out)
    text = out.read_text()
    assert "exactly what `config/experiment/smoke.yaml` composes to" in text
    cfg["train"]["epochs"] += 4
    R.run_report(cfg, main, out)
    text = out.read_text()
    assert f"locallip train experiment=smoke train.epochs={cfg['train']['epochs']}" in text
    assert "differ from what `config/experiment/smoke.yaml` composes to" in text


def test_plot_functions_directly(tmp_path):
    metrics = json.loads((make_experiment(tmp_path / "e") / "train" / "metrics.json").read_text())
    p = R.plot_training(metrics, tmp_path / "p" / "t.png")
    _assert_png(p)
    empty = dict(metrics, epochs=[])
    _assert_png(R.plot_training(empty, tmp_path / "p" / "empty.png"))
    rows = [{"radius": 0.5, "cert_local": 0.8, "cert_global": 0.7},
            {"radius": 1.0, "cert_local": 0.6, "cert_global": math.nan}]
    _assert_png(R.plot_certified_vs_radius(rows, tmp_path / "p" / "c.png", baseline_rows=rows,
                                           paper=[{"eps": 1.0, "certified": 62.8, "system": "s", "setting": "x"}]))
