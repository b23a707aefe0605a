"""The markdown text of the report (pure: no files read or written)."""
from __future__ import annotations

import re
import shlex
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ...pipeline import dag
from ...pipeline.config import Config, plain, stage_config
from .tables import (calibration_lines, fmt_num, fmt_radius, fmt_seconds, format_headline,
                     headline_header, headline_rows, level_details, level_label, levels_of, markdown_table,
                     paper_rows, side_by_side, steps_table)

#: Where a recorded stage setting lives in the full configuration (for Hydra overrides).
_PREFIX = {"train": {"model": "model", "train": "train", "normalization": "dataset"},
           "calibrate": {"calibrate": "calibrate"}, "certify": {"certify": "certify"}}


def recorded_settings(main: dict) -> Dict[str, dict]:
    """The settings each stage recorded beside its outputs (what produced these numbers)."""
    out = {}
    if main["metrics"].get("settings"):
        out["train"] = main["metrics"]["settings"]
    if (main.get("calibration") or {}).get("settings"):
        out["calibrate"] = main["calibration"]["settings"]
    if main["certificates"]:
        s = dict(main["certificates"][0]["provenance"]["settings"])
        s.pop("radius", None)
        out["certify"] = s
    return out


def _hydra_value(v: Any) -> Optional[str]:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_./-]*", v) and v not in ("null", "true", "false"):
            return v
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(v, list):
        items = [_hydra_value(x) for x in v]
        if any(i is None or isinstance(x, (dict, list)) for i, x in zip(items, v)):
            return None
        return "[" + ",".join(items) + "]"
    return None


def overrides_between(recorded: dict, current: dict, prefix: str) -> Tuple[List[str], List[str]]:
    """Hydra overrides turning ``current`` into ``recorded``; keys that cannot be written as one."""
    overrides, unexpressible = [], []
    for key in list(recorded) + [k for k in current if k not in recorded]:
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in current or key not in recorded:
            unexpressible.append(dotted)
            continue
        a, b = recorded[key], current[key]
        if isinstance(a, dict) and isinstance(b, dict):
            o, u = overrides_between(a, b, dotted)
            overrides += o
            unexpressible += u
        elif a != b:
            v = _hydra_value(a)
            (unexpressible.append(dotted) if v is None else overrides.append(f"{dotted}={v}"))
    return overrides, unexpressible


def settings_drift(cfg: Config, recorded: Dict[str, dict]) -> Tuple[List[str], List[str]]:
    """Overrides that turn what config/ composes to now into the recorded settings of each stage."""
    overrides, unexpressible = [], []
    for stage, rec in recorded.items():
        current = plain(stage_config(cfg, stage, 0.0 if stage == "certify" else None))
        current.pop("radius", None)
        for part, prefix in _PREFIX[stage].items():
            if part in rec and part in current:
                o, u = overrides_between(rec[part], current[part], prefix)
                overrides += [x for x in o if x not in overrides]
                unexpressible += u
    return overrides, unexpressible


def _reproduce(cfg: Config, cfgs_for_dag: Dict[str, Config], overrides: Sequence[str]) -> Tuple[str, str]:
    name = cfg.name
    stages = [dag.shell(dag.command(dag.job(cfgs_for_dag, name, s), "experiment", overrides=overrides))
              for s in ("download", "train", "calibrate")]
    stages += [dag.shell(dag.command(dag.job(cfgs_for_dag, name, "certify", r), "experiment", overrides=overrides))
               for r in cfg.certify.radii]
    if cfg.certify.curve:
        stages.append(dag.shell(dag.command(dag.job(cfgs_for_dag, name, "radii"), "experiment", overrides=overrides)))
    stages.append(dag.shell(dag.command(dag.job(cfgs_for_dag, name, "report"), "experiment", overrides=overrides)))
    return f"snakemake --cores 8 {shlex.quote(f'results/{name}/report.md')}", "\n".join(stages)


def render_report(cfg: Config, main: dict, plots: Dict[str, str], baseline: Optional[dict] = None,
                  baseline_name: Optional[str] = None, generated: str = "", drift: Tuple[List[str], List[str]] = ([], []),
                  cfgs_for_dag: Optional[Dict[str, Config]] = None, version: str = "") -> str:
    """The markdown of the report. ``plots`` maps a plot name to its path relative to the report."""
    import yaml

    name = cfg.name
    m = main["metrics"]
    certs = main["certificates"]
    rows = headline_rows(certs)
    levels = levels_of(certs)
    brows = headline_rows(baseline["certificates"]) if baseline is not None else None
    system = "Local-Lip" if m["bound"] == "local" else "GloRo"
    rec = recorded_settings(main)
    model = (rec.get("train") or {}).get("model") or plain(cfg.model)
    L: List[str] = []
    add = L.append

    add(f"# {name}: certified l2 robustness report")
    add("")
    if cfg.description:
        add(cfg.description)
        add("")
    add(f"Generated {generated} by locallip {version}. Model trained with the **{m['bound']}** bound ({system}), "
        f"loss `{m['loss']}`, {str(model.get('arch', '?')).upper()} with `{model.get('activation', '?')}`, "
        f"{m['params']:,} parameters, dataset `{cfg.dataset.name}`. Headline certificates: "
        f"**{level_label(levels[0], certs[0]) if levels else '?'}**.")
    add("")
    for w in consistency_warnings(main, baseline, baseline_name):
        add(w)
        add("")

    # 1. reproduction
    add("## How to reproduce")
    add("")
    overrides, unexpressible = drift
    snake, stages = _reproduce(cfg, cfgs_for_dag or {name: cfg}, overrides)
    if not overrides and not unexpressible:
        add(f"These results were produced with exactly the settings `config/experiment/{name}.yaml` composes to "
            f"(as recorded by each stage), so the whole pipeline{', baseline included,' if baseline else ''} is "
            f"rebuilt by:")
    else:
        add("**Note**: these results were produced with settings that differ from what "
            f"`config/experiment/{name}.yaml` composes to now (as recorded by the stages); the stage commands "
            f"below carry the differences as overrides. The whole pipeline with the committed settings:")
        if unexpressible:
            add("")
            add(f"Keys that differ but cannot be passed as one override: {', '.join(unexpressible)}.")
    add("")
    add("```sh")
    add(snake)
    add("```")
    add("")
    add("Stage by stage (the commands the workflow runs, from `locallip.pipeline.dag`):")
    add("")
    add("```sh")
    add(stages)
    add("```")
    add("")

    # 2. results
    add("## Results (test split)")
    add("")
    add(f"### {name} ({system}, trained with the {m['bound']} bound)")
    add("")
    add(markdown_table(headline_header(certs), format_headline(rows, levels)))
    add("")
    add("Accuracies in percent of the test split. *certified* = predicted correctly and every worst-case margin "
        f"strictly positive at that radius. The attack audit runs PGD ({certs[0]['attack']['steps']} steps, "
        f"{certs[0]['attack']['restarts']} restarts, step {certs[0]['attack']['step_size']:g} x radius) against "
        "every point certified at any level; any success is a soundness bug. Per-sample tables: "
        + ", ".join(f"[radius {fmt_radius(c['radius'])}]({plots['table_' + str(i)]})" for i, c in enumerate(certs))
        + ".")
    add("")
    L.extend(steps_lines(certs))
    if baseline is not None:
        bm = baseline["metrics"]
        blev = levels_of(baseline["certificates"])
        add(f"### {baseline_name} (baseline)")
        add("")
        add(f"Same data and budget, trained with the **{bm['bound']}** bound, loss `{bm['loss']}`, "
            f"{bm['params']:,} parameters.")
        add("")
        add(markdown_table(headline_header(baseline["certificates"]), format_headline(brows, blev)))
        add("")
        add("### Side by side")
        add("")
        add(f"Each model's certified accuracy at its headline guarantee level ({level_label(levels[0], certs[0])}; "
            "the local certificate includes the global one), at equal training epochs:")
        add("")
        header, body = side_by_side(rows, brows, name, baseline_name)
        add(markdown_table(header, body))
        add("")

    # 3. plots
    add("## Plots")
    add("")
    add(f"![training curves]({plots['training']})")
    add("")
    add(f"Training loss and validation accuracy per epoch (validation split, held out from training), training "
        f"eps on the right axis; the dotted line marks the chosen epoch ({m['best_epoch']}).")
    add("")
    add(f"![fixed neurons and bound ratio]({plots['diagnostics']})")
    add("")
    add("Top: fraction of neurons fixed (constant on the ball) per layer, during the training steps (at each "
        "step's eps) and on validation points at the epoch's eps. Bottom: the local bound the training step "
        "optimises divided by the converged one on the same masks, per layer (median and worst over the points) "
        "and for the whole bound: 1 means training sees the bound certification computes.")
    add("")
    add(f"![certified accuracy vs radius]({plots['certified_vs_radius']})")
    add("")
    add("Certified accuracy on the test split against the radius: curves from each point's largest certified "
        "radius (`certify/radii.csv`, when computed), markers at the certified radii, stars for the papers' "
        "numbers (see *Reference numbers* for whether their setting matches ours).")
    add("")

    # 4. calibration
    add("## Calibration")
    add("")
    L.extend(calibration_lines(main["calibration"]))
    add("")

    # 5. reference numbers
    add("## Reference numbers (from the papers, not reproduced here)")
    add("")
    if not cfg.report.paper:
        add("No paper numbers are configured for this experiment (`report.paper`).")
    else:
        header, prow, notes = paper_rows(cfg, rows, brows, baseline_name)
        add("Columns marked *paper* are numbers published by the cited source; columns marked *ours* are this "
            "report's test-split results at the same radius.")
        add("")
        add(markdown_table(header, prow))
        add("")
        for n_ in notes:
            add(f"- {n_}")
        add("")
        add("Even where dataset, architecture and radius match, our training schedule, data splits (we hold out "
            "validation and calibration data from training) and hyperparameters are our own: the paper numbers "
            "are context, not a controlled comparison.")
    add("")

    # 6. guarantees
    add("## What the certificates guarantee")
    add("")
    L.extend(guarantee_lines(certs))
    add("")
    n_test = rows[0]["n"] if rows else "?"
    add(f"Data use: the checkpoint (epoch {m['best_epoch']}) was chosen on the validation split and the "
        f"calibration used the calibration split, both held out of the training data. The test split "
        f"({n_test} examples) was used once, by certification.")
    add("")

    # 7. timings
    add("## Timings and environment")
    add("")
    L.extend(timing_lines(main, baseline, baseline_name))
    add("")

    # 8. settings
    add("## Settings (as recorded by each stage)")
    add("")
    prov = certs[0]["provenance"] if certs else {}
    add(f"Certified model: `{prov.get('model', {}).get('path')}` (sha256 `{prov.get('model', {}).get('sha256')}`, "
        f"epoch {prov.get('model', {}).get('epoch')}); code versions: train `{m.get('code_version')}`, "
        f"certify `{prov.get('code_version')}`.")
    add("")
    add("```yaml")
    add(yaml.safe_dump(rec, sort_keys=False, default_flow_style=False, width=100).rstrip())
    add("```")
    add("")
    return "\n".join(L)


def consistency_warnings(main: dict, baseline: Optional[dict], baseline_name: Optional[str]) -> List[str]:
    """Things a reader must not miss: broken certificates, mixed-up bounds."""
    out = []
    for label, exp in (("this model", main), (f"{baseline_name} (baseline)", baseline)):
        if exp is None:
            continue
        for c in exp["certificates"]:
            b = int(c["attack"]["broken"])
            if b > 0:
                out.append(f"**WARNING**: {label}, radius {fmt_radius(c['radius'])}: the attack broke {b} of "
                           f"{c['attack']['checked']} certified points. A certificate that an attack breaks is a "
                           f"bug, not noise: these certified accuracies cannot be trusted.")
        bound = exp["metrics"]["bound"]
        for c in exp["certificates"]:
            if c["bound_used_for_training"] in ("local", "global") and c["bound_used_for_training"] != bound:
                out.append(f"**WARNING**: {label}: certificate says the model was trained with the "
                           f"{c['bound_used_for_training']} bound, train/metrics.json says {bound}.")
                break
    return out


def steps_lines(certs: Sequence[dict]) -> List[str]:
    """How each certified point was certified: the cascade's steps, and the deterministic share."""
    if not certs or not certs[0].get("steps"):
        return []
    header, body = steps_table(certs)
    det = sum(c["steps"]["deterministic"] for c in certs)
    total = sum(c["steps"]["certified"] for c in certs)
    prob = sum(c["steps"]["probabilistic"] for c in certs)
    delta = next((c["steps"]["delta_per_probabilistic_point"] for c in certs
                  if c["steps"].get("delta_per_probabilistic_point")), None)
    share = f"{100 * det / total:.1f} %" if total else "—"
    text = (f"How each certified point was certified (each point stops at the first step that decides it): "
            f"over all radii, {det} of {total} certified points ({share}) have a deterministic certificate")
    text += (f"; {prob} rest on the probabilistic bound, each with P(false) <= {delta:g}." if prob else
             "; none rests on a random start.")
    return [text, "", markdown_table(header, body), ""]


def guarantee_lines(certs: Sequence[dict]) -> List[str]:
    lines = []
    details = level_details(certs)
    n = certs[0]["n"] if certs else 0
    for lv, d in details.items():
        lines.append(f"- **{level_label(lv, certs[0])}**: {d['guarantee']}.")
        if lv == "probabilistic" and d.get("layers") and all("steps" in x for x in d["layers"]):
            steps = ", ".join(f"layer {i + 1}: {x['steps']} steps (order {x['n_max']}, largest inflation "
                              f"{100 * (x['inflation_max'] or 0):.2f}%)" for i, x in enumerate(d["layers"]))
            lines.append(f"  Per certified point P(false) <= {d['delta']:g} (delta per layer {d['delta_layer']:.3g}); "
                         f"{steps}. Expected number of false certificates in a table of {n} points: at most "
                         f"{d['expected_false_certificates_at_most']:.2g}.")
        if d.get("layers") and any("proven" in x for x in d["layers"]):
            parts = ", ".join(f"layer {i + 1}: {x.get('proven', 0)} proven, {x['global_fallback']} global fallback"
                              + (f", {x['probabilistic_fallback']} probabilistic" if x.get("probabilistic_fallback")
                                 else "") for i, x in enumerate(d["layers"]))
            pts = (d.get("steps") or {}).get("points") or {}
            lines.append(f"  Masked norms were computed for {pts.get('masked_points', '?')} points at radius "
                         f"{fmt_radius(certs[0]['radius'])} ({pts.get('screened', '?')} screened, "
                         f"{pts.get('excluded', '?')} excluded by the from-below screen); per layer: {parts}.")
    lines.append("- **global bound, exact**: " + (certs[0]["guarantee"]["global"] if certs else "") + ".")
    lines.append("")
    lines.append("Ties (margin exactly 0) are never certified; the estimate level is shown for comparison only and "
                 "guarantees nothing.")
    return lines


def timing_lines(main: dict, baseline: Optional[dict], baseline_name: Optional[str]) -> List[str]:
    m = main["metrics"]
    trows = [["training", fmt_seconds(m["train_time_s"]), "—", m["device"], m["torch"]]]
    if main["calibration"] and isinstance(main["calibration"].get("time_s"), (int, float)):
        trows.append(["calibration", fmt_seconds(main["calibration"]["time_s"]), "—", "—", "—"])
    for c in main["certificates"]:
        trows.append([f"certify, radius {fmt_radius(c['radius'])}", fmt_seconds(c["time_s"]),
                      fmt_num(c["samples_per_s"], 4), c["device"], c["torch"]])
    if baseline is not None:
        bm = baseline["metrics"]
        trows.append([f"{baseline_name}: training", fmt_seconds(bm["train_time_s"]), "—", bm["device"], bm["torch"]])
        for c in baseline["certificates"]:
            trows.append([f"{baseline_name}: certify, radius {fmt_radius(c['radius'])}", fmt_seconds(c["time_s"]),
                          fmt_num(c["samples_per_s"], 4), c["device"], c["torch"]])
    lines = [markdown_table(("stage", "time", "samples/s (headline local bound)", "device", "torch"), trows), ""]
    n_ep = len(m["epochs"])
    if n_ep:
        lines.append(f"{n_ep} epochs recorded; mean epoch time "
                     f"{fmt_seconds(sum(e.get('time_s') or 0.0 for e in m['epochs']) / n_ep)}.")
    return lines
