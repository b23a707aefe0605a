"""The map of where the local bound pays (issue 28): per model and radius, the share of neurons fixed
on the certified ball against local - global certified accuracy on the same model and points.

Models:
  (a) study rows (``--rows``, a glob of ``results/study/<table>/<run>/`` directories, repeatable): the
      row's ``calibrated.pt`` (the safe loader), the first ``--n`` (500) points of the test split of
      the splits its table trained on (``results/study/<table>/data/<key>.npz``), the row's certify
      settings, at the table's radii. A Local-Lip row also gets Local-Lip - the best GloRo-line
      row (bound global: GloRo loss, TRADES, ...) on the same splits at equal epochs and at equal
      training time (at most ``--time-slack`` longer), from the tables' ``table.json``;
  (b) the ordinary ReLU networks of ``bench.certify_external`` (mlp, cnn: plain; cnn_pgd: l2 PGD),
      trained there with fixed seeds, on its 200 test digits at its radii 0.1 / 0.3 / 0.5;
  (c) the stored showcase model (``tests/fixtures/showcase``: mnist5k_r158, Local-Lip, clipped
      MaxMin, calibrated) on its 500 test digits at 0.5 / 1.0 / 1.58.

Per model and radius, ``locallip.certify.gain.local_gain``: fixed share per layer (the local bound's
masks at the certificate's level, every point; the box step's beside it), certified local and
global, their difference in points with its paired standard error, and the attack audit of every
certified point. Records of models not measured in this run are kept from the JSON already there
(``--fresh`` drops them). Plot: fixed share (neuron-weighted) against the gain, one marker per family.

    python -m bench.gain_map [--rows 'results/study/*/*/'] [--n 500] [--no-external] [--no-showcase] [--quick]
    python -m bench.gain_map --replot    # redraw docs/img/gain_map.png from bench/results/gain_map.json
"""
from __future__ import annotations

import argparse
import glob
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from bench._common import REPO, RESULTS_DIR, git_commit, machine_info, parser, set_threads, write_result

FAMILIES = ("local-lip", "gloro", "bcp", "plain", "pgd")
MARKERS = {"local-lip": "o", "gloro": "s", "bcp": "^", "plain": "D", "pgd": "v"}
COLORS = {"local-lip": "tab:red", "gloro": "tab:blue", "bcp": "tab:purple", "plain": "tab:orange", "pgd": "tab:green"}
PLOT = REPO / "docs" / "img" / "gain_map.png"
ROW_FILES = ("row.json", "calibrated.pt")


def log(text: str) -> None:
    print(f"[gain_map] {text}", file=sys.stderr, flush=True)


def model_records(name: str, family: str, dataset: str, model, x, y, radii, settings, *, audit: bool = True,
                  extra: Optional[dict] = None) -> List[dict]:
    """One record per radius: ``local_gain`` of the model on (x, y), with the model's name and family."""
    from locallip.certify.gain import local_gain

    if family not in FAMILIES:
        raise ValueError(f"{name}: unknown family {family!r} (one of {', '.join(FAMILIES)})")
    commit = git_commit()
    out = []
    for r in radii:
        t0 = time.perf_counter()
        rec = {"model": name, "family": family, "dataset": dataset}
        rec.update(local_gain(model, x, y, float(r), settings, audit=audit))
        rec["seconds"] = time.perf_counter() - t0
        rec["measured"] = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": commit["commit"],
                           "dirty": commit["dirty"]}
        rec.update((extra or {}).get(repr(float(r)), {}))
        log(f"{name} r={float(r):g}: fixed {100 * rec['fixed_weighted']:.1f}% "
            f"({'/'.join(f'{100 * f:.0f}' for f in rec['fixed_per_layer'])}), local {100 * rec['certified_local']:.1f}"
            f" global {100 * rec['certified_global']:.1f} gain {rec['gain_points']:+.1f} pt, {rec['seconds']:.0f}s")
        out.append(rec)
    return out


# --------------------------------------------------------------------------- (b) ordinary networks


def external_models(quick: bool, n: int) -> Iterator[Tuple[str, str, str, object, object, object, tuple]]:
    """(name, family, dataset, model, x, y, radii) of bench.certify_external's networks, trained here."""
    import torch

    from bench.certify_external import EPOCHS, QUICK_EPOCHS, RADII, mnist5k, train

    x_tr, y_tr, x_te, y_te = mnist5k()
    for name, epochs in (QUICK_EPOCHS if quick else EPOCHS).items():
        log(f"training {name} ({epochs} epochs, as bench.certify_external)")
        model = train(name, x_tr, y_tr, epochs)["model"].double()
        with torch.no_grad():
            acc = float((model(x_te.double()).argmax(1) == y_te).float().mean())
        log(f"{name}: test accuracy {acc:.3f}")
        yield (f"external/{name}", "pgd" if name == "cnn_pgd" else "plain", "mnist5k", model, x_te[:n].double(),
               y_te[:n], RADII)


# --------------------------------------------------------------------------- (a) study rows


def row_dirs(patterns: List[str]) -> List[Path]:
    """The run directories the globs name (each holding row.json and calibrated.pt)."""
    out: Dict[Path, None] = {}
    for pattern in patterns:
        found = [Path(p) for p in sorted(glob.glob(pattern)) if Path(p).is_dir()]
        rows = [d for d in found if all((d / f).is_file() for f in ROW_FILES)]
        if not rows:
            raise ValueError(f"--rows {pattern}: no directory with {' and '.join(ROW_FILES)}")
        out.update(dict.fromkeys(d.resolve() for d in rows))
    return list(out)


def row_family(row: dict) -> str:
    """gloro (bound global), bcp (local bound, global norms: masked_norms never) or local-lip."""
    if row.get("bound") == "global":
        return "gloro"
    masked = (((row.get("settings") or {}).get("train") or {}).get("train") or {}).get("masked_norms")
    return "bcp" if masked == "never" else "local-lip"


def splits_file(run_dir: Path, row: dict, config_dir: Optional[Path]) -> Path:
    """The splits the row's table trained on: the one file in results/study/<table>/data/, or the one
    the table's declaration names."""
    data = run_dir.parent / "data"
    files = sorted(data.glob("*.npz"))
    if len(files) == 1:
        return files[0]
    if not files:
        raise ValueError(f"{data}: no splits file for {run_dir / 'row.json'}")
    from locallip.pipeline.study import plan

    key = plan(str(row.get("table")), config_dir).splits.get(str(row.get("run")))
    if key is None or not (data / f"{key}.npz").is_file():
        raise ValueError(f"{run_dir / 'row.json'}: its table's declaration names no splits file in {data}")
    return data / f"{key}.npz"


def load_row(run_dir: Path, n: int, config_dir: Optional[Path]):
    """(row, model, dataset name, x, y, certify settings, splits file) of one study run."""
    from locallip.data.splits import load_splits, to_tensors
    from locallip.foundation.compose import from_plain
    from locallip.foundation.files import read_json
    from locallip.foundation.schema import CertifySettings
    from locallip.nn.checkpoint import load_model

    row = read_json(run_dir / "row.json")
    missing = [k for k in ("table", "run", "settings", "test") if not isinstance(row, dict) or k not in row]
    if missing or not isinstance(row["settings"], dict):
        what = ", ".join(missing) or "settings"
        raise ValueError(f"{run_dir / 'row.json'}: not a study row of the pipeline (no {what})")
    model, _ = load_model(run_dir / "calibrated.pt")
    data = splits_file(run_dir, row, config_dir)
    splits = load_splits(data)
    x, y = to_tensors(splits.test_x[:n], splits.test_y[:n])
    settings = from_plain(CertifySettings, row["settings"].get("certify"), f"{run_dir / 'row.json'}: settings.certify")
    return row, model, str(splits.meta.get("name")), x, y, settings, data


# --------------------------------------------------------------------------- training comparison


def _row_entries(table_dir: Path, splits: Path) -> List[dict]:
    """A table not rendered yet (no table.json): one entry per run whose row.json is there."""
    from locallip.foundation.files import read_json

    out = []
    for path in sorted(table_dir.glob("*/row.json")):
        row = read_json(path)
        cert = {k: v["local"] for k, v in (row.get("test") or {}).items() if v.get("local") is not None}
        out.append({"table": table_dir.name, "tag": row.get("tag", path.parent.name), "runs": [path.parent.name],
                    "family": row_family(row), "epochs": row.get("epochs"), "train_s": float(row["train_time_s"]),
                    "test_points": row.get("test_points"), "splits": splits.name, "cert": cert,
                    "source": str(path)})
    return out


def table_entries(table_dir: Path, splits: Path) -> List[dict]:
    """The rows of a table's table.json, each with its family, epochs and training seconds (its first run's
    row.json where table.json lacks them) and the splits it trained on; the runs' row.json files where the
    table has no table.json yet."""
    from locallip.foundation.files import read_json

    path = table_dir / "table.json"
    if not path.is_file():
        return _row_entries(table_dir, splits)
    doc = read_json(path)
    out = []
    for rec in doc.get("rows", []):
        runs = [table_dir / run / "row.json" for run in rec.get("runs", [])]
        if not runs or not all(p.is_file() for p in runs):
            continue  # a row whose runs are not here cannot be classified
        rows = [read_json(p) for p in runs]
        train_s = rec.get("train_s")
        if train_s is None:
            train_s = sum(r["train_time_s"] for r in rows) / len(rows)
        cert = {k[len("test_cert_"):]: v for k, v in rec.items()
                if k.startswith("test_cert_") and not k.endswith("_se") and v is not None}
        out.append({"table": doc.get("table", table_dir.name), "tag": rec["tag"], "runs": list(rec["runs"]),
                    "family": row_family(rows[0]), "epochs": rows[0].get("epochs"), "train_s": float(train_s),
                    "test_points": rec.get("test_points"), "splits": splits.name, "cert": cert, "source": str(path)})
    return out


def _best(mine: dict, candidates: List[dict], key: str, rule: str) -> Optional[dict]:
    if not candidates:
        return None
    best = max(candidates, key=lambda c: c["cert"][key])
    return {"rule": rule, "local_lip": {"table": mine["table"], "tag": mine["tag"], "epochs": mine["epochs"],
                                        "train_s": mine["train_s"], "certified": mine["cert"][key],
                                        "source": mine["source"]},
            "best_gloro": {"table": best["table"], "tag": best["tag"], "epochs": best["epochs"],
                           "train_s": best["train_s"], "certified": best["cert"][key], "source": best["source"]},
            "difference_points": 100 * (mine["cert"][key] - best["cert"][key]),
            "gloro_rows_considered": [f"{c['table']}/{c['tag']}" for c in candidates]}


def training_comparison(run: str, pool: List[dict], radius: float, slack: float) -> Optional[dict]:
    """Local-Lip (the table row holding ``run``) - the best GloRo-line row on the same splits and test
    points, at equal epochs and at equal time (trained at most ``slack`` longer), certified on test at
    ``radius`` as the tables report it (their test points, not this map's)."""
    key = repr(float(radius))
    mine = next((e for e in pool if run in e["runs"] and e["family"] == "local-lip" and key in e["cert"]), None)
    if mine is None:
        return None
    gloro = [e for e in pool if e["family"] == "gloro" and e["splits"] == mine["splits"]
             and e["test_points"] == mine["test_points"] and key in e["cert"]]
    if not gloro:
        return None
    return {"equal_epochs": _best(mine, [e for e in gloro if e["epochs"] == mine["epochs"]], key,
                                  "the best GloRo-line row trained for as many epochs"),
            "equal_time": _best(mine, [e for e in gloro if e["train_s"] <= (1 + slack) * mine["train_s"]], key,
                                f"the best GloRo-line row trained at most {100 * slack:.0f}% longer"),
            "source": "the tables' table.json, or their rows' row.json before the table is rendered (their test "
                      "points, not this map's)"}


def study_records(patterns: List[str], n: int, audit: bool, slack: float, config_dir: Optional[Path]) -> List[dict]:
    """The records of every study run the globs name (see the module docstring, (a))."""
    dirs = row_dirs(patterns)
    loaded = [(d,) + load_row(d, n, config_dir) for d in dirs]
    pool: List[dict] = []
    for table_dir, splits in {d.parent: s for d, *_, s in loaded}.items():
        pool += table_entries(table_dir, splits)
    out = []
    for d, row, model, dataset, x, y, settings, splits in loaded:
        radii = [float(r) for r in row["settings"].get("radii") or [float(k) for k in row["test"]]]
        extra = {}
        for r in radii:
            own = (row.get("test") or {}).get(repr(r)) or {}
            extra[repr(r)] = {"table": row["table"], "run": row["run"], "splits": str(splits),
                              "epochs": row.get("epochs"), "train_s": row.get("train_time_s"),
                              "row_test": {"points": row.get("test_points"), "local": own.get("local"),
                                           "global": own.get("global")},
                              "training": training_comparison(row["run"], pool, r, slack)}
        out += model_records(f"{row['table']}/{row['run']}", row_family(row), dataset, model, x, y, radii, settings,
                             audit=audit, extra=extra)
    return out


def external_records(quick: bool, n: int, audit: bool) -> List[dict]:
    from locallip.foundation.schema import CertifySettings

    out = []
    for name, family, dataset, model, x, y, radii in external_models(quick, n):
        # bench.certify_external's certificate: the default cascade (probabilistic) in float64
        out += model_records(name, family, dataset, model, x, y, radii, CertifySettings(), audit=audit)
    return out


def showcase_records(quick: bool, audit: bool) -> List[dict]:
    """The stored showcase model (tests/fixtures/showcase: mnist5k_r158, Local-Lip, calibrated) on its 500
    test digits at its radii, certified as the certify stage does (its default settings)."""
    from locallip.foundation.schema import CertifySettings

    sys.path.insert(0, str(REPO / "tests" / "fixtures"))
    from make_showcase_fixture import RADII, load_showcase

    model, x, y = load_showcase()
    n = 50 if quick else x.shape[0]
    return model_records("showcase/mnist5k_r158", "local-lip", "mnist5k", model, x[:n], y[:n], RADII,
                         CertifySettings(), audit=audit)


# --------------------------------------------------------------------------- output


def earlier_records(path: Path, fresh: bool) -> List[dict]:
    """The records already in ``path`` (none with ``fresh``), read before anything is measured."""
    import json

    if fresh or not path.is_file():
        return []
    try:
        old = json.loads(path.read_text())["records"]
        if not isinstance(old, list) or not all(isinstance(r, dict) and "model" in r for r in old):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: not a gain_map result (move it away or pass --fresh)") from None
    return old


def merged(old: List[dict], records: List[dict]) -> List[dict]:
    """This run's records, after the earlier ones of the models this run did not measure."""
    measured = {r["model"] for r in records}
    return [r for r in old if r["model"] not in measured] + records


def largest_fixed(rec: dict) -> float:
    """The largest share of one hidden layer's neurons the masks fix (the x of the plot: a model whose
    convolutions fix nothing and whose last hidden layer fixes 40 % has 1 % of all its neurons fixed)."""
    return max(rec["fixed_per_layer"], default=0.0)


def _labels(records: List[dict], y: str = "gain_points") -> Dict[Tuple[float, float], str]:
    """One label per plotted position: the models there, each with its radii (coincident points share one)."""
    at: Dict[Tuple[float, float], Dict[str, List[str]]] = {}
    for r in records:
        pos = (round(100 * largest_fixed(r), 1), round(_y(r, y), 1))
        at.setdefault(pos, {}).setdefault(r["model"].split("/")[-1], []).append(f"{r['radius']:g}")
    return {pos: "; ".join(f"{m} {'/'.join(radii)}" for m, radii in models.items()) for pos, models in at.items()}


def _y(rec: dict, y: str) -> float:
    return rec["gain_points"] if y == "gain_points" else 100 * (rec.get("gain_of_open") or 0.0)


def plot(records: List[dict], path: Path) -> Path:
    """Against the largest share of a hidden layer fixed, per model and radius: local - global certified
    (points, left) and the share of the correct points the global certificate leaves open that the local one
    certifies (right); one marker and colour per family, each point labelled with its model and radius."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, y in zip(axes, ("gain_points", "gain_of_open")):
        for family in FAMILIES:
            recs = [r for r in records if r["family"] == family]
            if recs:
                err = [r["gain_se_points"] or 0.0 for r in recs] if y == "gain_points" else None
                ax.errorbar([100 * largest_fixed(r) for r in recs], [_y(r, y) for r in recs], yerr=err,
                            fmt=MARKERS[family], capsize=2, color=COLORS[family], label=family)
        placed: List[Tuple[float, float]] = []
        span = max([_y(r, y) for r in records] + [1.0]) / 20
        for (x, yy), text in sorted(_labels(records, y).items()):
            # labels of nearby points go one above the other instead of over each other
            near = sum(1 for px, py in placed if abs(px - x) < 8 and abs(py - yy) < span)
            ax.annotate(text, (x, yy), xytext=(3, 3 + 9 * near), textcoords="offset points", fontsize=6)
            placed.append((x, yy))
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("largest share of one hidden layer fixed on the certified ball (%, local bound's masks)")
    axes[0].set_ylabel("local - global certified accuracy (points, ± 1 s.e.)")
    axes[1].set_ylabel("of the correct points the global bound leaves open:\n certified by the local bound (%)")
    fig.suptitle("Where the local bound pays: one point per model and radius")
    axes[0].legend(title="family")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"wrote {path}")
    return path


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rows", action="append", default=[], help="glob of study run directories (repeatable)")
    p.add_argument("--n", type=int, default=None, help="test points of each study row (default 500, --quick 50)")
    p.add_argument("--external-n", type=int, default=None, help="test digits of the ordinary nets (200, --quick 20)")
    p.add_argument("--no-external", action="store_true", help="skip the ordinary networks (b)")
    p.add_argument("--no-showcase", action="store_true", help="skip the stored showcase model (c)")
    p.add_argument("--audit", action=argparse.BooleanOptionalAction, default=True,
                   help="attack every certified point (default on; 0 broken expected)")
    p.add_argument("--time-slack", type=float, default=0.25, help="equal time: GloRo trained at most this much longer")
    p.add_argument("--config-dir", type=Path, default=None, help="config/ of the study declarations (default ours)")
    p.add_argument("--plot", type=Path, default=None, help="the plot (default docs/img/gain_map.png; with --out, "
                                                           "next to it)")
    p.add_argument("--fresh", action="store_true", help="drop the records already in the output JSON")
    p.add_argument("--replot", action="store_true", help="only redraw the plot from the output JSON's records")
    args = p.parse_args(argv)
    set_threads(args.threads)
    info = machine_info()  # before measuring: the load average at the start
    out = Path(args.out) if args.out else RESULTS_DIR / "gain_map.json"
    plot_path = args.plot or (out.with_suffix(".png") if args.out else PLOT)
    if args.replot:
        try:
            records = earlier_records(out, fresh=False)
        except ValueError as e:
            print(f"gain_map: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        plot(records, plot_path)
        return {"records": records}
    try:
        old = earlier_records(out, args.fresh)
        records = study_records(args.rows, args.n or (50 if args.quick else 500), args.audit, args.time_slack,
                                args.config_dir) if args.rows else []
        if not args.no_showcase:
            records += showcase_records(args.quick, args.audit)
        if not args.no_external:
            records += external_records(args.quick, args.external_n or (20 if args.quick else 200), args.audit)
        records = merged(old, records)
    except (ValueError, OSError, RuntimeError) as e:  # the loaders' errors name the file and the problem
        print(f"gain_map: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    data = {"quick": args.quick, "machine": info, "families": list(FAMILIES), "records": records,
            "time_slack": args.time_slack,
            "fixed_share": "local bound's masks at the certificate's level on every point (fixed_*); the box "
                           "step's masks on the guaranteed global norms (fixed_box_*)"}
    write_result("gain_map", data, out)
    plot(records, plot_path)
    return data


if __name__ == "__main__":
    main()
