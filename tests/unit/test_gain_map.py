"""bench.gain_map's core on tiny models: the records' fields, local >= global in every record, the
study-row path (safe loader, the table's splits, the row's settings and radii) and the training
comparison from table.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is a package of the checkout, not installed
from bench import gain_map  # noqa: E402
from locallip.data.splits import Splits, save_splits  # noqa: E402
from locallip.foundation.compose import plain  # noqa: E402
from locallip.foundation.schema import CertifySettings  # noqa: E402
from locallip.nn.checkpoint import save_model  # noqa: E402
from locallip.nn.models import build_model  # noqa: E402

SHAPE = (1, 8, 8)
FIELDS = {"model", "family", "dataset", "radius", "n", "clean", "certified_local", "certified_global", "gain",
          "gain_se", "gain_points", "gain_se_points", "gain_of_open", "fixed_per_layer", "fixed_mean", "fixed_weighted",
          "neurons_per_layer", "fixed_box_per_layer", "fixed_box_weighted", "level", "attack_checked",
          "attack_broken", "seconds", "measured"}
SETTINGS = CertifySettings(batch_size=16)


def _model(seed: int):
    torch.manual_seed(seed)
    return build_model("2c2f", "clipped_relu", SHAPE, num_classes=3).eval()


def _data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,) + SHAPE, generator=g, dtype=torch.uint8)


def _check(rec: dict) -> None:
    assert FIELDS <= set(rec), FIELDS - set(rec)
    assert rec["certified_local"] >= rec["certified_global"]
    assert rec["gain_points"] == pytest.approx(100 * (rec["certified_local"] - rec["certified_global"]))
    assert len(rec["fixed_per_layer"]) == len(rec["neurons_per_layer"]) == 3  # conv, conv, dense
    assert all(0 <= b <= f + 1e-12 <= 1 + 1e-12 for b, f in zip(rec["fixed_box_per_layer"], rec["fixed_per_layer"]))


def test_records_of_a_tiny_model(tmp_path):
    net = _model(0)
    x = _data(24).double() / 255
    y = net.double()(x).argmax(1)  # labels = predictions: the radii decide, not the accuracy
    records = gain_map.model_records("tiny", "plain", "random", net, x, y, [0.02, 0.2], SETTINGS)
    assert [r["radius"] for r in records] == [0.02, 0.2] and all(r["n"] == 24 for r in records)
    for rec in records:
        _check(rec)
        assert rec["attack_broken"] == 0
    assert records[0]["certified_local"] > 0 and records[0]["fixed_weighted"] > records[1]["fixed_weighted"]
    out = tmp_path / "gain_map.json"
    gain_map.write_result("gain_map", {"records": records}, out)
    assert json.loads(out.read_text())["records"] == json.loads(json.dumps(records))
    png = gain_map.plot(records, tmp_path / "gain_map.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="unknown family"):
        gain_map.model_records("tiny", "mlp", "random", net, x, y, [0.1], SETTINGS)


def _run(root, run: str, bound: str, epochs: int, seed: int) -> None:
    d = root / run
    d.mkdir(parents=True)
    save_model(d / "calibrated.pt", _model(seed))
    settings = {"radii": [0.05], "certify": plain(SETTINGS), "train": {"train": {"masked_norms": "adaptive"}}}
    row = {"table": root.name, "run": run, "tag": run, "bound": bound, "epochs": epochs, "train_time_s": 10.0 * seed,
           "test_points": 30, "test": {"0.05": {"local": 0.5, "global": 0.4}}, "settings": settings}
    (d / "row.json").write_text(json.dumps(row))


def test_study_rows_and_the_training_comparison(tmp_path):
    table = tmp_path / "study" / "tiny"
    xs = {s: _data(k, i).numpy() for i, (s, k) in enumerate((("train", 8), ("val", 8), ("calib", 8), ("test", 30)))}
    ys = {s: np.arange(len(v), dtype=np.int64) % 3 for s, v in xs.items()}
    splits = Splits(**{f"{s}_{k}": (xs if k == "x" else ys)[s] for s in xs for k in ("x", "y")},
                    meta={"name": "tinyset", "num_classes": 3, "input_shape": list(SHAPE)})
    (table / "data").mkdir(parents=True)
    save_splits(splits, table / "data" / "tinyset-0123456789.npz")
    _run(table, "ll", "local", 10, 1)
    _run(table, "gloro", "global", 10, 2)
    _run(table, "gloro_long", "global", 100, 30)  # trained 3x longer than ll: not at equal time
    rows = [{"tag": t, "runs": [t], "test_points": 30, "train_s": s, "test_cert_0.05": c}
            for t, s, c in (("ll", 10.0, 0.6), ("gloro", 20.0, 0.55), ("gloro_long", 300.0, 0.9))]
    (table / "table.json").write_text(json.dumps({"table": "tiny", "radii": [0.05], "rows": rows}))
    records = gain_map.study_records([str(table / "*")], 12, False, 0.25, None)
    by_model = {r["model"]: r for r in records}
    assert set(by_model) == {"tiny/ll", "tiny/gloro", "tiny/gloro_long"}
    for rec in records:
        _check(rec)
        assert rec["n"] == 12 and rec["dataset"] == "tinyset" and rec["radius"] == 0.05
    assert by_model["tiny/ll"]["family"] == "local-lip" and by_model["tiny/gloro"]["family"] == "gloro"
    assert by_model["tiny/gloro"]["training"] is None
    cmp = by_model["tiny/ll"]["training"]
    assert cmp["equal_epochs"]["best_gloro"]["tag"] == "gloro"  # gloro_long has 100 epochs
    assert cmp["equal_epochs"]["difference_points"] == pytest.approx(5.0)
    # equal time: ll trained 10 s; gloro (20 s) is over the 25% slack too, so no GloRo row qualifies
    assert cmp["equal_time"] is None
    slack = gain_map.training_comparison("ll", gain_map.table_entries(table, table / "data" / "x.npz"), 0.05, 1.5)
    assert slack["equal_time"]["best_gloro"]["tag"] == "gloro"
    # before the table is rendered: the rows' own test numbers (row.json: 0.5 each) and training seconds
    (table / "table.json").unlink()
    early = gain_map.training_comparison("ll", gain_map.table_entries(table, table / "data" / "x.npz"), 0.05, 1.5)
    assert early["equal_epochs"]["difference_points"] == 0.0 and early["equal_time"]["best_gloro"]["tag"] == "gloro"
    assert early["equal_epochs"]["best_gloro"]["source"].endswith("row.json")


def test_a_glob_without_rows_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gain_map.main(["--rows", str(tmp_path / "nothing*"), "--no-external", "--out", str(tmp_path / "g.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gain_map: --rows") and "\n" not in err and not (tmp_path / "g.json").exists()


def test_earlier_records_are_kept_unless_measured_again(tmp_path):
    out = tmp_path / "gain_map.json"
    out.write_text(json.dumps({"records": [{"model": "a", "radius": 0.1}, {"model": "b", "radius": 0.1}]}))
    old = gain_map.earlier_records(out, fresh=False)
    assert gain_map.merged(old, [{"model": "b", "radius": 0.3}]) == [{"model": "a", "radius": 0.1},
                                                                    {"model": "b", "radius": 0.3}]
    assert gain_map.earlier_records(out, fresh=True) == []
    out.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a gain_map result"):
        gain_map.earlier_records(out, fresh=False)


def test_a_row_without_its_fields_is_one_line(tmp_path, capsys):
    d = tmp_path / "study" / "t" / "r"
    d.mkdir(parents=True)
    save_model(d / "calibrated.pt", _model(0))
    (d / "row.json").write_text(json.dumps({"table": "t", "test": {}}))
    with pytest.raises(SystemExit):
        gain_map.main(["--rows", str(d), "--no-external", "--out", str(tmp_path / "g.json")])
    err = capsys.readouterr().err.strip()
    assert err == f"gain_map: {d / 'row.json'}: not a study row of the pipeline (no run, settings)"


def test_coincident_points_share_one_label():
    recs = [{"model": "t/a", "radius": r, "fixed_per_layer": [0.0], "gain_points": 0.0} for r in (0.25, 0.5)]
    recs.append({"model": "b", "radius": 0.1, "fixed_per_layer": [0.2], "gain_points": 3.0})
    assert gain_map._labels(recs) == {(0.0, 0.0): "a 0.25/0.5", (20.0, 3.0): "b 0.1"}


def test_the_plot_places_a_model_by_its_most_fixed_layer():
    """A model whose last hidden layer fixes 40 % and whose convolutions fix nothing sits at 40, not at its
    neuron-weighted 1 %."""
    rec = {"model": "t/a", "radius": 0.5, "fixed_per_layer": [0.0, 0.0, 0.4], "fixed_weighted": 0.01,
           "gain_points": 5.0, "gain_of_open": 0.25}
    assert gain_map.largest_fixed(rec) == 0.4
    assert gain_map._labels([rec]) == {(40.0, 5.0): "a 0.5"}
    assert gain_map._labels([rec], "gain_of_open") == {(40.0, 25.0): "a 0.5"}
