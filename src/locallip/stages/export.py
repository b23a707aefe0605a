"""The export stage: the calibrated model in a load-safe format others can use, with a model card.

Writes ``export/model.safetensors`` (the state_dict: tensors only, nothing that runs when
loaded), ``export/model.json`` (its layers, ``locallip.nn.describe``: with the weights, enough
to rebuild the network in plain PyTorch or to re-certify it with ``locallip certify-model``)
and ``export/model_card.md`` / ``.json``: architecture, normalization, training settings, the
data's digest, and the certified accuracy per radius with what each certificate guarantees.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

from ..data.splits import load_splits
from ..foundation.compose import plain
from ..foundation.files import atomic_path, file_digest, read_json, stage_lock, write_json, write_text
from ..foundation.layout import certificate
from ..foundation.schema import ExportStage, RunConfig
from ..nn.checkpoint import load_model
from ..nn.describe import describe, weights_of


def run_export(cfg: ExportStage, data: Path, model: Path, weights: Path, architecture: Path, card: Path,
               card_json: Path, run: RunConfig = RunConfig()) -> dict:
    """Calibrated checkpoint + certificates -> safetensors, layer list, model card."""
    from safetensors.torch import save_file

    net, ck = load_model(Path(model))
    results = Path(model).parents[2]  # results/<experiment>/calibrate/model.pt
    certs = [read_json(certificate(cfg.name, r, results)) for r in cfg.radii]
    _check_certified_this_model(certs, model, [certificate(cfg.name, r, results) for r in cfg.radii])
    splits = load_splits(Path(data))
    description = describe(net, net.input_shape)
    info = {"experiment": cfg.name, "format": "safetensors state_dict + locallip-sequential-1 layer list",
            "architecture": {"spec": dict(net.spec), "layers": description["layers"],
                             "input_shape": list(net.input_shape), "num_classes": net.num_classes,
                             "parameters": sum(p.numel() for p in net.parameters())},
            "normalization": {"mean": list(net.spec.get("mean") or []), "std": list(net.spec.get("std") or [])},
            "training": (ck.get("settings") or {}).get("train") or ck.get("train"),
            "epoch": ck.get("epoch"), "calibration": ck.get("calibration"),
            "data": {"dataset": splits.meta.get("name"), "sizes": splits.meta.get("sizes"),
                     "sha256": splits.meta.get("sha256")},
            "checkpoint_sha256": file_digest(model), "train_code_version": ck.get("code_version"),
            "certified": [_card_row(c) for c in certs]}
    with stage_lock(weights, "export"):
        with atomic_path(weights) as tmp:
            save_file(weights_of(net), str(tmp), metadata={"format": "pt", "experiment": cfg.name})
        write_text(architecture, json.dumps(description, indent=1) + "\n")
        write_json(card_json, info)
        write_text(card, _card_text(info, weights, architecture))
    return info


def _check_certified_this_model(certs: List[dict], model: Path, paths: List[Path]) -> None:
    """Refuse certificates made for another model (an older calibration, another training run):
    the card would attach their accuracies to these weights."""
    digest = file_digest(model)
    for c, path in zip(certs, paths):
        made_for = ((c.get("provenance") or {}).get("model") or {}).get("sha256")
        if made_for != digest:
            raise ValueError(f"{path} certifies another model (sha256 {str(made_for)[:12]}..., {model} is "
                             f"{digest[:12]}...): stale certificate; rerun certify for every radius, then export")


def _card_row(c: dict) -> dict:
    st = c.get("steps") or {}
    return {"radius": c["radius"], "n": c["n"], "clean_acc": c["clean_acc"], "certified_acc": c["certified_acc_local"],
            "global_certified_acc": c["certified_acc_global"], "guarantee": c["guarantee"]["local"],
            "deterministic_share": st.get("deterministic_share"), "attack": c["attack"]}


def _card_text(info: dict, weights: Path, architecture: Path) -> str:
    a, t = info["architecture"], info["training"] or {}
    lines = [f"# Model card: {info['experiment']}", "",
             f"A certifiably robust (l2) classifier: {str(a['spec'].get('arch', 'custom')).upper()} with "
             f"`{a['spec'].get('activation', '?')}`, {a['parameters']:,} parameters, input {a['input_shape']} in "
             f"[0, 1] pixel units, {a['num_classes']} classes, trained by locallip with the "
             f"**{t.get('bound', '?')}** bound (loss `{t.get('loss', '?')}`, eps_train {t.get('eps_train', '?')}, "
             f"{t.get('epochs', '?')} epochs; the best epoch, {info['epoch']}, chosen on a validation split).", "",
             f"Files: `{weights.name}` (the weights: a state_dict, tensors only) and `{architecture.name}` (its "
             f"layers, in order). Normalization (folded into the first layer): {info['normalization']}.", "",
             "## Certified accuracy (test split)", "",
             "| radius | n | clean (%) | certified (%) | global bound (%) | deterministic share (%) | attack audit |",
             "|---|---|---|---|---|---|---|"]
    for r in info["certified"]:
        share = r["deterministic_share"]
        lines.append(f"| {r['radius']:g} | {r['n']} | {100 * r['clean_acc']:.1f} | {100 * r['certified_acc']:.1f} | "
                     f"{100 * r['global_certified_acc']:.1f} | {'—' if share is None else f'{100 * share:.1f}'} | "
                     f"{r['attack']['broken']}/{r['attack']['checked']} broken |")
    if info["certified"]:
        lines += ["", f"What a certificate promises: {info['certified'][0]['guarantee']}."]
    lines += ["", "## Data", "", f"Dataset `{info['data']['dataset']}`, split sizes {info['data']['sizes']}; "
              f"sha256 of the test images `{(info['data']['sha256'] or {}).get('test_x')}`.", "",
              "## Use and re-certify", "", "```python",
              "import json",
              "from safetensors.torch import load_file",
              "from locallip.nn.describe import build, load_weights",
              f"net = load_weights(build(json.load(open('{architecture.name}'))), load_file('{weights.name}'))",
              "```", "", "```sh",
              f"locallip certify-model --model {weights} --arch {architecture} --data <points.npz> --radius 0.5",
              "```", ""]
    return "\n".join(lines)
