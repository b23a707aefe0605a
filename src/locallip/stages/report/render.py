"""The markdown text of the report (pure: no files read or written).

Sections, in order: summary, how to reproduce, results (this model, then each baseline),
side by side at equal epochs, equal training time, plots, calibration, reference numbers,
what the certificates guarantee, timings, settings. Each section is a function of the
systems it compares (``compare.System``) and returns its lines.
"""
from __future__ import annotations

import re
import shlex
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ...foundation.audit_words import audit_share
from ...foundation.compose import plain, with_linear_relaxation
from ...foundation.schema import Config
from .compare import System, equal_time, side_by_side
from .tables import (calibration_lines, fmt_num, fmt_radius, fmt_seconds, format_headline, headline_header,
                     level_details, level_label, levels_of, markdown_table, paper_rows, steps_table)

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


def _current(cfg: Config) -> Dict[str, dict]:
    """The parts of a composed configuration each stage records, as plain values."""
    return {"train": {"model": plain(cfg.model), "train": plain(cfg.train),
                      "normalization": {"mean": list(cfg.dataset.mean), "std": list(cfg.dataset.std)}},
            "calibrate": {"calibrate": plain(cfg.calibrate)},
            # the certify stage records its settings with auto resolved by the pipeline's rule
            "certify": {"certify": plain(with_linear_relaxation(cfg.certify, auto_on=False))}}


def settings_drift(cfg: Config, recorded: Dict[str, dict]) -> Tuple[List[str], List[str]]:
    """Overrides that turn ``cfg`` (as the workflow composed it) into the recorded settings of each stage."""
    overrides, unexpressible = [], []
    current = _current(cfg)
    for stage, rec in recorded.items():
        for part, prefix in _PREFIX.get(stage, {}).items():
            if part in rec and part in current.get(stage, {}):
                cur = current[stage][part]
                if part == "certify":  # the per-radius stages record only their part of certify
                    cur = {k: v for k, v in cur.items() if k in rec[part]}
                o, u = overrides_between(rec[part], cur, prefix)
                overrides += [x for x in o if x not in overrides]
                unexpressible += u
    return overrides, unexpressible


def render_report(cfg: Config, systems: Sequence[System], plots: Dict[str, str], reproduce: Sequence[str] = (),
                  generated: str = "", version: str = "") -> str:
    """The markdown of the report. ``systems[0]`` is this model; ``plots`` maps a plot name to its path
    relative to the report; ``reproduce`` are the stage commands that rebuild it."""
    main = systems[0]
    sections = [_summary(cfg, main, systems, generated, version), _reproduction(cfg, main, systems, reproduce),
                _results(main, plots), *[_baseline(s) for s in systems[1:]]]
    if len(systems) > 1:
        sections += [_side_by_side(main, systems), _equal_time(cfg, systems)]
    sections += [_plots(main, plots, len(systems) > 1), _calibration(main), _references(cfg, systems),
                 _guarantees(main), _timings(systems), _settings(main)]
    return "\n".join(line for section in sections for line in section + [""])


def _summary(cfg: Config, main: System, systems: Sequence[System], generated: str, version: str) -> List[str]:
    m, certs = main.metrics, main.exp["certificates"]
    model = (recorded_settings(main.exp).get("train") or {}).get("model") or plain(cfg.model)
    levels = levels_of(certs)
    lines = [f"# {cfg.name}: certified l2 robustness report", ""]
    if cfg.description:
        lines += [cfg.description, ""]
    lines.append(f"Generated {generated} by locallip {version}. Model trained with **{main.method}** (the "
                 f"{m['bound']} bound, loss `{m['loss']}`), {str(model.get('arch', '?')).upper()} with "
                 f"`{model.get('activation', '?')}`, {m['params']:,} parameters, dataset `{cfg.dataset.name}`. "
                 f"Headline certificates: **{level_label(levels[0], certs[0]) if levels else '?'}**."
                 + (f" Compared with {', '.join(f'{s.name} ({s.method})' for s in systems[1:])}." if len(systems) > 1
                    else ""))
    for w in consistency_warnings(systems):
        lines += ["", w]
    return lines


def _reproduction(cfg: Config, main: System, systems: Sequence[System], reproduce: Sequence[str]) -> List[str]:
    overrides, unexpressible = settings_drift(cfg, recorded_settings(main.exp))
    name = cfg.name
    lines = ["## How to reproduce", ""]
    if not overrides and not unexpressible:
        lines.append(f"These results were produced with exactly the settings `config/experiment/{name}.yaml` "
                     f"composed to when the workflow ran (as recorded by each stage), so the whole pipeline"
                     f"{', baselines included,' if len(systems) > 1 else ''} is rebuilt by:")
    else:
        lines.append("**Note**: these results were produced with settings that differ from what "
                     f"`config/experiment/{name}.yaml` composed to when the workflow ran (as recorded by the "
                     f"stages); these overrides carry the differences: `{' '.join(overrides) or '(none)'}`.")
        if unexpressible:
            lines += ["", f"Keys that differ but cannot be passed as one override: {', '.join(unexpressible)}."]
        lines += ["", "The whole pipeline with the committed settings:"]
    lines += ["", "```sh", f"snakemake --cores 8 {shlex.quote(f'results/{name}/report.md')}", "```", ""]
    if reproduce:
        extra = f" (add `{' '.join(overrides)}` to each)" if overrides else ""
        lines += [f"Stage by stage, the commands the workflow runs (from the stage table){extra}:", "", "```sh",
                  *reproduce, "```"]
    return lines


def _results(main: System, plots: Dict[str, str]) -> List[str]:
    certs = main.exp["certificates"]
    a = certs[0]["attack"]
    tables = ", ".join(f"[radius {fmt_radius(c['radius'])}]({plots['table_' + str(i)]})" for i, c in enumerate(certs))
    return (["## Results (test split)", "", f"### {main.name} ({main.method}, {main.epochs} epochs)", "",
             markdown_table(headline_header(certs), format_headline(main.rows, levels_of(certs))), "",
             "Accuracies in percent of the test split. *certified* = predicted correctly and every worst-case margin "
             f"strictly positive at that radius. The attack audit runs {_attack_words(a)} against "
             f"{_audit_scope(certs)}; any success is a soundness bug. The audit is an "
             f"empirical check, not part of the guarantee. Per-sample tables: {tables}.", ""]
            + steps_lines(certs) + _export(plots))


def _audit_scope(certs) -> str:
    """Which points the audit attacked: all certified ones, or, within a time budget, how many per radius."""
    shares = [f"radius {fmt_radius(c['radius'])}: {audit_share(c['attack'])}" for c in certs
              if audit_share(c["attack"])]
    if not shares:
        return "every point certified at any level"
    return ("the points certified at any level within a time budget, a seeded random subset of each batch's "
            "certified points where the budget did not cover them all (" + "; ".join(shares) + ")")


def _attack_words(a: dict) -> str:
    """The certificate's ``attack`` record in words (one written before the margin attack names no method)."""
    common = f"{a['steps']} steps, {a['restarts']} restarts, step {a['step_size']:g} x radius"
    if a.get("method", "pgd") == "pgd":
        return f"PGD ({common})"
    return f"a margin attack (up to {common}; early stop once a point breaks or a restart stalls)"


def _export(plots: Dict[str, str]) -> List[str]:
    if "export_weights" not in plots:
        return []
    return [f"Exported model (loads without running code; re-certify it with `locallip certify-model`): "
            f"[weights]({plots['export_weights']}) (safetensors), [layers]({plots['export_architecture']}), "
            f"[model card]({plots['export_card']}) ([JSON]({plots['export_card_json']})).", ""]


def _baseline(s: System) -> List[str]:
    certs, m = s.exp["certificates"], s.metrics
    return [f"### {s.name} (baseline: {s.method}, {s.epochs} epochs)", "",
            f"Same data, trained with the **{m['bound']}** bound, loss `{m['loss']}`, {m['params']:,} parameters, "
            f"{fmt_seconds(m['train_time_s'])} of training.", "",
            markdown_table(headline_header(certs), format_headline(s.rows, levels_of(certs)))]


def _side_by_side(main: System, systems: Sequence[System]) -> List[str]:
    header, body = side_by_side(systems)
    certs = main.exp["certificates"]
    return ["### Side by side, at each model's own training budget", "",
            f"Each model's best sound certificate ({level_label(levels_of(certs)[0], certs[0])}; the local "
            "certificate includes the global one). Models with the same number of epochs are compared at equal "
            "epochs; their training times differ (next section).", "", markdown_table(header, body)]


def _equal_time(cfg: Config, systems: Sequence[System]) -> List[str]:
    header, body, answer = equal_time(systems, float(cfg.eps))
    return (["### At equal training time", "",
             "Training time of every run (wall clock on its machine, as its metrics recorded it), its test "
             "certified accuracy at the training radius, and its validation certified accuracy reached within "
             "this model's training time (from the per-epoch validation metrics; validation runs only once the "
             "training radius is reached).", "", markdown_table(header, body), ""] + [f"- {a}" for a in answer])


def _plots(main: System, plots: Dict[str, str], compared: bool) -> List[str]:
    lines = ["## Plots", "", f"![training curves]({plots['training']})", "",
             "Training loss and validation accuracy per epoch (validation split, held out from training), training "
             f"eps on the right axis; the dotted line marks the chosen epoch ({main.metrics['best_epoch']}).", "",
             f"![fixed neurons and bound ratio]({plots['diagnostics']})", "",
             "Top: fraction of neurons fixed (constant on the ball) per layer, during the training steps (at each "
             "step's eps) and on validation points at the epoch's eps. Bottom: the local bound the training step "
             "optimises divided by the converged one on the same masks, per layer (median and worst over the "
             "points) and for the whole bound: 1 means training sees the bound certification computes.", "",
             f"![certified accuracy vs radius]({plots['certified_vs_radius']})", "",
             "Certified accuracy on the test split against the radius: curves from each point's largest certified "
             "radius (`certify/radii.csv`, when computed), markers at the certified radii, stars for the papers' "
             "numbers (see *Reference numbers* for whether their setting matches ours)."]
    if compared:
        lines += ["", f"![certified accuracy vs training time]({plots['certified_vs_time']})", "",
                  "Validation certified accuracy at the training radius against cumulative training time, every "
                  "system; the dotted line is this model's training time."]
    return lines


def _calibration(main: System) -> List[str]:
    return ["## Calibration", ""] + calibration_lines(main.exp["calibration"])


def _references(cfg: Config, systems: Sequence[System]) -> List[str]:
    lines = ["## Reference numbers (from the papers, not reproduced here)", ""]
    if not cfg.report.paper:
        return lines + ["No paper numbers are configured for this experiment (`report.paper`)."]
    header, prow, notes = paper_rows(cfg, systems[0].rows, [(s.name, s.rows) for s in systems[1:]])
    return (lines + ["Columns marked *paper* are numbers published by the cited source; columns marked *ours* are "
                     "this report's test-split results at the same radius.", "", markdown_table(header, prow), ""]
            + [f"- {n_}" for n_ in notes]
            + ["", "Even where dataset, architecture and radius match, our training schedule, data splits (we hold "
               "out validation and calibration data from training) and hyperparameters are our own: the paper "
               "numbers are context, not a controlled comparison."])


def _guarantees(main: System) -> List[str]:
    certs = main.exp["certificates"]
    n_test = main.rows[0]["n"] if main.rows else "?"
    return (["## What the certificates guarantee", ""] + guarantee_lines(certs)
            + ["", f"Data use: the checkpoint (epoch {main.metrics['best_epoch']}) was chosen on the validation "
               f"split and the calibration used the calibration split, both held out of the training data. The test "
               f"split ({n_test} examples) was used once, by certification."])


def _settings(main: System) -> List[str]:
    import yaml

    certs, m = main.exp["certificates"], main.metrics
    prov = certs[0]["provenance"] if certs else {}
    model = prov.get("model", {})
    return ["## Settings (as recorded by each stage)", "",
            f"Certified model: `{model.get('path')}` (sha256 `{model.get('sha256')}`, epoch {model.get('epoch')}); "
            f"code versions: train `{m.get('code_version')}`, certify `{prov.get('code_version')}`.", "",
            "```yaml", yaml.safe_dump(recorded_settings(main.exp), sort_keys=False, default_flow_style=False,
                                      width=100).rstrip(), "```"]


def consistency_warnings(systems: Sequence[System]) -> List[str]:
    """Things a reader must not miss: broken certificates, mixed-up bounds."""
    out = []
    for s in systems:
        label = "this model" if s.main else f"{s.name} (baseline)"
        for c in s.exp["certificates"]:
            b = int(c["attack"]["broken"])
            if b > 0:
                out.append(f"**WARNING**: {label}, radius {fmt_radius(c['radius'])}: the attack broke {b} of "
                           f"{c['attack']['checked']} certified points. A certificate that an attack breaks is a "
                           f"bug, not noise: these certified accuracies cannot be trusted.")
        bound = s.metrics["bound"]
        for c in s.exp["certificates"]:
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


def _timings(systems: Sequence[System]) -> List[str]:
    trows = []
    for s in systems:
        prefix = "" if s.main else f"{s.name}: "
        m = s.metrics
        trows.append([f"{prefix}training", fmt_seconds(m["train_time_s"]), "—", m["device"], m["torch"]])
        cal = s.exp.get("calibration")
        if s.main and cal and isinstance(cal.get("time_s"), (int, float)):
            trows.append(["calibration", fmt_seconds(cal["time_s"]), "—", "—", "—"])
        for c in s.exp["certificates"]:
            trows.append([f"{prefix}certify, radius {fmt_radius(c['radius'])}", fmt_seconds(c["time_s"]),
                          fmt_num(c["samples_per_s"], 4), c["device"], c["torch"]])
    lines = ["## Timings and environment", "",
             markdown_table(("stage", "time", "samples/s (headline local certificate)", "device", "torch"), trows), ""]
    m = systems[0].metrics
    if m["epochs"]:
        n_ep = len(m["epochs"])
        lines.append(f"{n_ep} epochs recorded; mean epoch time "
                     f"{fmt_seconds(sum(e.get('time_s') or 0.0 for e in m['epochs']) / n_ep)}.")
    return lines
