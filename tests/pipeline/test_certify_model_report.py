"""``locallip certify-model`` on the docs' worked example, as its users meet it (issue 30):

* ``radii.csv`` never gives a local radius below the global one, and its search range and tolerance
  are in the outputs; ``--no-radii`` writes none and the report says so; ``--max-radius`` sets the range;
* the audit attacks the certified points and, counted apart, the misclassified points proven robust for
  their wrong class; every misclassified point's ``step_local`` is ``misclassified``;
* the report opens with the counts (deterministic / probabilistic), ``guarantee_level`` says what the
  certificates rest on, ``steps.csv`` is written, seconds per step are in the JSON and the report;
* ``--audit quick`` attacks every certified point with a shorter search; ``--audit off`` says in the
  report's first lines that nothing was attacked.
"""
from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest
import torch

from locallip.pipeline import cli

from pipeline_helpers import REPO

pytestmark = pytest.mark.usefixtures("own_rng")

RADII = (0.1, 0.3)


@pytest.fixture(scope="module")
def docs_model(tmp_path_factory, one_thread):
    """The docs' example network, trained by the docs' own first block (in this process: a few seconds)."""
    doc = (REPO / "docs" / "certify-your-own-model.md").read_text()
    train = re.findall(r"```python\n(.*?)```", doc, flags=re.S)[0]
    d = tmp_path_factory.mktemp("docs_model")
    here = os.getcwd()
    with torch.random.fork_rng():
        os.chdir(d)
        try:
            exec(compile(train, "docs-block-1", "exec"), {"__name__": "docs_example"})
        finally:
            os.chdir(here)
    return d


def _run(d: Path, out: str, *flags: str) -> Path:
    before = torch.get_num_threads()
    try:
        rc = cli.main(["certify-model", "--model", str(d / "net.safetensors"), "--arch", str(d / "net.json"),
                       "--data", str(d / "test.npz"), "--limit", "200", "--out", str(d / out), "--no-progress",
                       "--threads", "1"] + [a for r in RADII for a in ("--radius", str(r))] + list(flags))
    finally:
        torch.set_num_threads(before)
    assert rc == 0
    return d / out


@pytest.fixture(scope="module")
def default_run(docs_model):
    """The docs' command as written (full audit, per-point radii up to the default cap)."""
    return _run(docs_model, "default")


def _rows(path: Path):
    return list(csv.DictReader(open(path)))


def test_no_local_radius_is_below_the_global_one_and_the_search_range_is_stated(default_run):
    rows = _rows(default_run / "certify" / "radii.csv")
    assert len(rows) == 200
    below = [r["index"] for r in rows if float(r["certified_radius_local"]) < float(r["certified_radius_global"])]
    assert not below, f"local radius below the global one at {below}"
    cap = 2 * max(RADII)
    # the case the issue saw: global radii beyond the search's cap, now written as the local radius too
    assert any(float(r["certified_radius_global"]) > cap for r in rows)
    record = json.loads((default_run / "certify" / "radii.json").read_text())
    assert record["max_radius"] == pytest.approx(cap) and record["tol"] == 0.02
    assert record["global_above_max_radius"] == sum(float(r["certified_radius_global"]) > cap for r in rows)
    overview = json.loads((default_run / "summary.json").read_text())
    assert overview["per_point_radii"]["max_radius"] == record["max_radius"]
    report = (default_run / "report.md").read_text()
    assert f"searched on [0, {cap:g}]" in report and "relative tolerance of 0.02" in report


def test_no_radii_writes_no_radii_csv_and_the_report_says_so(docs_model, default_run):
    out = _run(docs_model, "no_radii", "--no-radii", "--audit", "quick")
    assert not (out / "certify" / "radii.csv").exists() and not (out / "certify" / "radii.json").exists()
    report = (out / "report.md").read_text()
    assert "Not computed (`--no-radii`): no `certify/radii.csv`." in report
    assert json.loads((out / "summary.json").read_text())["per_point_radii"] is None
    # the certificates themselves do not depend on the audit or the radii
    for r in RADII:
        ours, full = _rows(out / "certify" / f"radius_{r!r}.csv"), _rows(default_run / "certify" / f"radius_{r!r}.csv")
        assert [q["certified_local"] for q in ours] == [q["certified_local"] for q in full]


def test_max_radius_sets_the_search_range(docs_model):
    out = _run(docs_model, "max_radius", "--max-radius", "1.5", "--audit", "off")
    record = json.loads((out / "certify" / "radii.json").read_text())
    assert record["max_radius"] == 1.5
    rows = _rows(out / "certify" / "radii.csv")
    assert all(float(r["certified_radius_local"]) >= float(r["certified_radius_global"]) for r in rows)
    assert record["at_max_radius"] == sum(float(r["certified_radius_local"]) == 1.5 for r in rows)
    assert "searched on [0, 1.5]" in (out / "report.md").read_text()


def test_the_audit_counts_certified_and_misclassified_robust_points_apart(default_run):
    report = (default_run / "report.md").read_text()
    misclassified_robust_total = 0
    for r in RADII:
        rows = _rows(default_run / "certify" / f"radius_{r!r}.csv")
        s = json.loads((default_run / "certify" / f"radius_{r!r}.json").read_text())
        wrong = [q for q in rows if q["label"] != q["prediction"]]
        assert wrong and all(q["step_local"] == "misclassified" for q in wrong), r
        certified = [q for q in rows if q["certified_local"] == "True"]
        # a misclassified point is robust for its wrong class when its margin lower bound is positive
        robust_wrong = [q for q in wrong if float(q["worst_margin_local"]) > 0]
        a = s["attack"]
        assert a["certified"]["checked"] == len(certified)
        assert a["misclassified_robust"]["checked"] == len(robust_wrong)
        assert a["checked"] == a["certified"]["checked"] + a["misclassified_robust"]["checked"]
        attacked = {q["index"] for q in rows if q["attack_margin"] != ""}
        assert attacked == {q["index"] for q in certified + robust_wrong}
        assert f"| {r:g} |" in report and (f"0/{len(certified)} broken (+ 0/{len(robust_wrong)} misclassified-robust)"
                                           in report)
        misclassified_robust_total += len(robust_wrong)
    assert misclassified_robust_total > 0  # the docs' model has such points: the split is exercised


def test_the_report_opens_with_what_was_certified_and_on_what(default_run):
    lines = (default_run / "report.md").read_text().splitlines()
    steps = _rows(default_run / "certify" / "steps.csv")
    assert [float(s["radius"]) for s in steps] == list(RADII)
    for r, line, st in zip(RADII, lines[2:4], steps):
        rows = _rows(default_run / "certify" / f"radius_{r!r}.csv")
        s = json.loads((default_run / "certify" / f"radius_{r!r}.json").read_text())
        by = {k: sum(q["certified_local"] == "True" and q["step_local"] == k for q in rows)
              for k in ("global", "box", "exact", "probabilistic", "linear_relaxation")}
        n_cert = sum(q["certified_local"] == "True" for q in rows)
        deterministic = by["global"] + by["box"] + by["exact"] + by["linear_relaxation"]
        assert line == (f"- r={r:g}: {n_cert} of 200 certified: {deterministic} deterministic "
                        f"({by['global']} global / {by['box']} box / {by['exact']} exact / {by['linear_relaxation']} "
                        f"linear relaxation), {by['probabilistic']} probabilistic")
        assert [int(st[k]) for k in by] == list(by.values()) and int(st["certified"]) == n_cert
        assert s["guarantee_level"] == ("probabilistic" if by["probabilistic"] else "exact")
        assert s["guarantee_configured"] == "probabilistic"
        assert s["timing"]["certification_s"] > 0 and s["timing"]["audit_s"] > 0
    timing = json.loads((default_run / "summary.json").read_text())["timing"]
    assert set(timing) == {"certification_s", "audit_s", "radii_s", "total_s"} and timing["radii_s"] > 0
    text = "\n".join(lines)
    assert "## Time" in text and "| attack audit, r=0.1 |" in text and "| per-point radii |" in text


def test_a_quick_audit_attacks_every_certified_point_and_off_says_so_first(docs_model, default_run):
    quick = _run(docs_model, "quick", "--no-radii", "--audit", "quick")
    off = _run(docs_model, "off", "--no-radii", "--audit", "off")
    for r in RADII:
        full_s = json.loads((default_run / "certify" / f"radius_{r!r}.json").read_text())
        s = json.loads((quick / "certify" / f"radius_{r!r}.json").read_text())
        assert s["attack"]["mode"] == "quick" and s["attack"]["performed"]
        assert (s["attack"]["steps"], s["attack"]["restarts"]) == (10, 1)
        assert s["attack"]["steps"] * s["attack"]["restarts"] < full_s["attack"]["steps"] * full_s["attack"]["restarts"]
        assert s["attack"]["certified"] == full_s["attack"]["certified"]
        rows = _rows(quick / "certify" / f"radius_{r!r}.csv")
        assert all(q["attack_margin"] != "" for q in rows if q["certified_local"] == "True")
        s_off = json.loads((off / "certify" / f"radius_{r!r}.json").read_text())
        assert not s_off["attack"]["performed"] and s_off["attack"]["checked"] == 0
        assert all(q["attack_margin"] == "" for q in _rows(off / "certify" / f"radius_{r!r}.csv"))
    assert "not attacked" not in "\n".join((quick / "report.md").read_text().splitlines()[:4])
    assert "**The certificates were not attacked**" in (off / "report.md").read_text().splitlines()[2]
