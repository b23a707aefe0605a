"""Certify a model trained anywhere: ``locallip certify-model``.

Reads a state_dict (safetensors, or torch weights-only: neither runs code when loaded) and a
JSON layer list (``locallip.nn.describe``), and points (an ``.npz``, a locallip splits file,
or a configured dataset's test split). Everything is checked before any work: layers the
bounds do not support, weights that do not fit the layers, images whose shape or value
range does not fit the model, labels outside its classes. Then it writes what the
pipeline's certify, radii and report stages write, under one directory:
``certify/radius_<r>.json`` and ``.csv`` (every certified point attacked by PGD, unless the audit
is off), ``certify/steps.csv``, ``certify/radii.csv`` with ``radii.json`` (the search's range and
tolerance; unless the radii are off), ``summary.json`` (counts, audit, seconds per step) and a
short ``report.md`` (``certify_model_report``).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Tuple

import numpy as np
import torch

from ..bounds import network_layers
from ..certify.relaxation_step import pays_by_default
from ..certify.split import AuditFailure, certify_split, radii_split, write_certificate
from ..data.splits import DataError, load_splits, read_npz
from ..foundation.compose import plain, with_linear_relaxation
from ..foundation.files import check_replaceable, csv_text, file_digest, replaced_directory, write_json, write_text
from ..foundation.provenance import code_version
from ..foundation.ranges import radius_tag
from ..foundation.schema import ExternalModel, RunConfig
from ..foundation.checkpoints import load_error
from ..nn.describe import UnsupportedModel, build, check_state, load_weights, outline, read_description
from ..nn.fold import fold_batchnorm
from .certify_model_report import audit_cell, audit_settings, overview, radii_record, render_report, settle
from .report.tables import steps_csv


#: What certify-model writes in its output directory, which it replaces as a whole: anything
#: else there (a pipeline experiment's train/, data/...) makes it refuse the directory.
OUTPUTS = ("report.md", "summary.json", "certify")


def load_weights_file(path: Path) -> dict:
    """A state_dict from safetensors or a torch weights-only file; never unpickles code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with warnings.catch_warnings():  # torch's notes on what it checks: the refusal below says what matters
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or holding pickled objects
        raise UnsupportedModel(f"cannot load weights {path}: {load_error(e)} (only tensors are read; nothing in "
                               f"the file runs)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def load_network(cfg: ExternalModel):
    """The network: its layers from the description (the normalization in front), then its weights.

    The description is checked and compared with the weights' names and shapes before the network
    is allocated; an error names the file at fault."""
    arch = Path(cfg.architecture)
    description = read_description(arch)
    state = load_weights_file(Path(cfg.model))
    if cfg.normalization.mean and isinstance(description, dict):
        layers = description.get("layers")
        layers = layers if isinstance(layers, list) else []
        if layers and isinstance(layers[0], dict) and layers[0].get("type") == "normalize":
            raise UnsupportedModel(f"{arch} already starts with a normalize layer; leave normalization empty")
        description = dict(description, layers=[{"type": "normalize", "mean": list(cfg.normalization.mean),
                                                 "std": list(cfg.normalization.std)}] + layers)
        # the layers' indices in the state_dict move by one
        state = {(f"{int(k.split('.', 1)[0]) + 1}.{k.split('.', 1)[1]}" if k.split(".", 1)[0].isdigit() else k): v
                 for k, v in state.items()} if isinstance(state, dict) else state
    try:
        expected, _ = outline(description)
    except UnsupportedModel as e:
        raise UnsupportedModel(f"{arch}: {e}") from None
    try:
        check_state(expected, state)
        net = load_weights(build(description), state)
    except UnsupportedModel as e:
        raise UnsupportedModel(f"{cfg.model}: {e}") from None
    try:  # BatchNorm folded into the layer before it (exact up to one rounding): the bounds see that network
        net = fold_batchnorm(net.eval())
        network_layers(net)  # the bounds' own check of the layer order
    except ValueError as e:
        raise UnsupportedModel(f"{arch}: {e}") from None
    return net, description


def load_points(cfg: ExternalModel, net) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """Images as floats in [0, 1] [N, C, H, W] and int64 labels, checked against the model."""
    src = cfg.data
    if src.startswith("dataset:"):
        from ..data.sources import prepare_splits
        from ..foundation.compose import from_plain
        from ..foundation.schema import DatasetConfig

        splits = prepare_splits(from_plain(DatasetConfig, {"name": src.split(":", 1)[1]}, "dataset"))
        x, y, what = splits.test_x, splits.test_y, f"{src} (test split)"
    else:
        path = Path(src)
        arrays = read_npz(path, "points file")
        if "test_x" in arrays:
            splits = load_splits(path)
            x, y, what = splits.test_x, splits.test_y, f"{path} (test split)"
        elif {"x", "y"} <= set(arrays):
            x, y, what = arrays["x"], arrays["y"], str(path)
        else:
            raise DataError(f"{path} holds neither arrays 'x' and 'y' nor a locallip splits file")
    return _checked(np.asarray(x), np.asarray(y), net, what, cfg.limit)


def _checked(x: np.ndarray, y: np.ndarray, net, what: str, limit) -> Tuple[torch.Tensor, torch.Tensor, str]:
    if x.ndim == 3:  # [N, H, W]: one channel
        x = x[:, None]
    shape = tuple(net.input_shape)
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise DataError(f"{what}: images of shape {tuple(x.shape[1:])} do not fit the model input {shape}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{what}: labels must be integers, one per image ({len(x)}), got {y.dtype} {list(y.shape)}")
    if len(y) == 0:
        raise DataError(f"{what}: no points to certify")
    if int(y.min()) < 0 or int(y.max()) >= net.num_classes:
        raise DataError(f"{what}: labels outside [0, {net.num_classes}) (the model has {net.num_classes} classes)")
    if x.dtype == np.uint8:
        xt = torch.from_numpy(x.astype(np.float32) / 255.0)
    elif np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise DataError(f"{what}: images hold NaN or inf (x, {int((~np.isfinite(x)).sum())} values)")
        if x.min() < 0 or x.max() > 1:
            raise DataError(f"{what}: float images must lie in [0, 1] (radii are l2 distances in those units); got "
                            f"values in [{float(np.nanmin(x)):.3g}, {float(np.nanmax(x)):.3g}]")
        xt = torch.from_numpy(x.astype(np.float32))
    else:
        raise DataError(f"{what}: images must be uint8 or floats in [0, 1], got {x.dtype}")
    if limit:
        xt, y = xt[:limit], y[:limit]
    return xt, torch.from_numpy(y.astype(np.int64)), what


def run_certify_model(cfg: ExternalModel, out: Path, run: RunConfig = RunConfig()) -> dict:
    """Check everything, then certify at every radius, the per-point radii and a short report under ``out``."""
    t_start = time.perf_counter()
    out = Path(out)
    check_replaceable(out, "certify-model", OUTPUTS)  # before any work: never over a pipeline experiment
    net, description = load_network(cfg)
    cfg = replace(cfg, certify=with_linear_relaxation(cfg.certify, auto_on=pays_by_default(net)))
    x, y, what = load_points(cfg, net)
    if run.threads > 0:
        torch.set_num_threads(run.threads)
    prov = {"model": {"path": str(cfg.model), "sha256": file_digest(cfg.model)},
            "architecture": {"path": str(cfg.architecture), "sha256": file_digest(cfg.architecture)},
            "data": what, "settings": plain(cfg), "code_version": code_version("stages.certify_model")}
    settings, attack = audit_settings(cfg.certify, cfg.audit)
    summaries = []
    # The run writes into a staging directory that replaces ``out`` only when complete (Ctrl-C: old kept).
    with replaced_directory(out, "certify-model", OUTPUTS, publish_on=(AuditFailure,)) as out:
        for r in cfg.radii:
            result = certify_split(net, x, y, float(r), settings, progress=run.progress, audit=attack)
            result["summary"].update(experiment=cfg.name, bound_used_for_training="unknown", provenance=prov)
            s = settle(result["summary"], cfg.audit)
            cert = out / "certify" / f"radius_{radius_tag(r)}"
            summaries.append(write_certificate(Path(f"{cert}.json"), Path(f"{cert}.csv"), result))
            print(f"[certify-model] {cfg.name} {s['headline']}; clean {s['clean_acc']:.3f}; audit {audit_cell(s)} "
                  f"(certification {s['timing']['certification_s']:.2f}s, audit {s['timing']['audit_s']:.2f}s)")
        radii = None
        if cfg.curve.enabled:
            rows, radii = _per_point_radii(cfg, net, x, y, run)
            write_text(out / "certify" / "radii.csv", csv_text(rows))
            write_json(out / "certify" / "radii.json", radii)
        write_text(out / "certify" / "steps.csv", steps_csv(summaries))
        total = time.perf_counter() - t_start
        write_json(out / "summary.json", overview(cfg, summaries, radii, total))
        write_text(out / "report.md", render_report(cfg, summaries, what, description, radii, total))
    return {"radii": [s["radius"] for s in summaries], "certified": [s["certified_acc_local"] for s in summaries]}


def _per_point_radii(cfg: ExternalModel, net, x, y, run: RunConfig) -> Tuple[list, dict]:
    """The rows of ``certify/radii.csv`` and what ``radii.json`` says beside it (the search's range,
    tolerance and seconds)."""
    t0 = time.perf_counter()
    top = cfg.curve.max_radius or 2 * max(cfg.radii)
    rows = radii_split(net, x, y, cfg.certify, top, cfg.curve.tol, progress=run.progress,
                       batch_size=cfg.curve.batch_size)
    record = radii_record(rows, top, cfg.curve.tol, str(cfg.certify.guarantee), time.perf_counter() - t0)
    print(f"[certify-model] {cfg.name} per-point radii on [0, {top:g}], tolerance {cfg.curve.tol:g} "
          f"({record['time_s']:.2f}s)")
    return rows, record
