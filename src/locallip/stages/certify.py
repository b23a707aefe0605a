"""The certify stage: one radius, the test split, every certificate audited by an attack.

Writes ``certify/radius_<r>.json`` (accuracies per guarantee level, what each level rests
on, the attack audit, and everything that shaped the certificate: settings, the model's
sha256, the test split's digest, the code version) and ``radius_<r>.csv`` (per sample).
A failed audit removes the radius's previous certificate (it no longer matches what this
code and model produce) and records the failure; a later good run removes that record.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from ..certify.split import AuditFailure, certify_split, write_certificate  # noqa: F401 (AuditFailure: re-exported)
from ..data.splits import load_splits, to_tensors
from ..nn.checkpoint import load_model
from ..foundation.compose import plain, with_linear_relaxation
from ..foundation.schema import CertifyStage, RunConfig
from ..foundation.audit_words import audit_share
from ..foundation.provenance import code_version
from ..foundation.files import file_digest, stage_lock
from ..distributed import Group, process_group, set_threads


def run_certify(cfg: CertifyStage, data: Path, model: Path, out: Path, table: Path,
                run: RunConfig = RunConfig()) -> dict:
    """Certify stage: test split at ``cfg.radius`` -> summary JSON + per-sample CSV.

    Under torchrun the batches are shared out over the ranks and rank 0 writes the merged result.
    """
    with process_group() as group:
        with (stage_lock(out, "certify") if group.main else nullcontext()):
            set_threads(run.threads, group)
            result = _certify(cfg, Path(data), Path(model), Path(out), Path(table), run, group)
        group.barrier()
    return result


def _certify(cfg: CertifyStage, data: Path, model: Path, out: Path, table: Path, run: RunConfig,
             group: Group) -> dict:
    radius = cfg.radius
    splits = load_splits(data)
    net, ckpt = load_model(model)
    x, y = to_tensors(splits.test_x, splits.test_y)
    if tuple(x.shape[1:]) != tuple(net.input_shape):
        raise ValueError(f"test images of shape {tuple(x.shape[1:])} do not fit the model input {net.input_shape}")
    cfg = replace(cfg, certify=with_linear_relaxation(cfg.certify, auto_on=False))
    result = certify_split(net, x, y, radius, cfg.certify, progress=run.progress, group=group)
    if not group.main:
        return result["summary"]
    s = result["summary"]
    s["experiment"] = cfg.name
    s["bound_used_for_training"] = ckpt.get("train", {}).get("bound", "unknown")
    s["provenance"] = {
        "settings": plain(cfg),
        "model": {"path": str(model), "sha256": file_digest(model), "epoch": ckpt.get("epoch"),
                  "experiment": ckpt.get("experiment"), "train_code_version": ckpt.get("code_version"),
                  "calibration": ckpt.get("calibration")},
        "test_split_sha256": {k: splits.meta.get("sha256", {}).get(k) for k in ("test_x", "test_y")},
        "code_version": code_version("stages.certify"),
    }
    write_certificate(out, table, result)
    levels = "  ".join(f"{lv} {v['certified_acc']:.3f}" for lv, v in s["levels"].items())
    st = s["steps"]
    share = "" if st["deterministic_share"] is None else f", {100 * st['deterministic_share']:.1f}% deterministic"
    print(f"[certify] {cfg.name} r={radius:g}: clean {s['clean_acc']:.3f}  certified local ({levels})  "
          f"global {s['certified_acc_global']:.3f}{share}  audit {s['attack']['broken']}/{s['attack']['checked']} broken  "
          f"{_audited(s['attack'])}({s['samples_per_s']:.1f} samples/s)")
    return s


def _audited(attack: dict) -> str:
    share = audit_share(attack)
    return f"({share})  " if share else ""
