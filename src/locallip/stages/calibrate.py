"""The calibrate stage: rescale clipping thresholds on the calibration split.

Lower thresholds saturate more neurons (tighter local bound, more certified
points) but clip more signal (lower clean accuracy). We pick per-layer scales
that maximise certified accuracy at the target radius on the *calibration*
split, accepting a clean-accuracy loss of at most ``max_clean_drop``. The test
split is never looked at.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

from ..certify.evaluate import evaluate
from ..data.splits import load_splits, to_tensors
from ..nn.checkpoint import load_model, save_model
from ..foundation.compose import plain
from ..foundation.schema import CalibrateConfig, CalibrateStage, RunConfig
from ..foundation.provenance import code_version
from ..foundation.files import file_digest, stage_lock, write_json


def threshold_layers(model: nn.Module) -> List[nn.Module]:
    """Every activation with clipping thresholds, nested ones (inside a block) included, in order."""
    return [m for m in model.modules() if getattr(m, "has_thresholds", False)]


def _set_scales(model: nn.Module, base: List[Dict[str, torch.Tensor]], scales: List[float]) -> None:
    """Thresholds := base thresholds * per-layer scale."""
    with torch.no_grad():
        for layer, params, s in zip(threshold_layers(model), base, scales):
            for name, value in params.items():
                getattr(layer, name).copy_(value * s)


def calibrate_thresholds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bound: str, cfg: CalibrateConfig,
                         log=print) -> dict:
    """Search threshold scales; leaves the model at the chosen scales. Returns what was tried.

    First one scale for every layer (each of ``scales``), then, if ``per_layer``,
    one coordinate pass moving each layer's scale to its grid neighbours.
    Candidates losing more than ``max_clean_drop`` clean accuracy are rejected.
    """
    layers = threshold_layers(model)
    base = [{n: p.detach().clone() for n, p in layer.named_parameters() if n.startswith("theta")}
            for layer in layers]
    cache: Dict[tuple, Dict[str, float]] = {}

    def score(scales: List[float]) -> Dict[str, float]:
        key = tuple(scales)
        if key not in cache:
            _set_scales(model, base, scales)
            cache[key] = evaluate(model, x, y, cfg.eps, bound, max_iter=cfg.max_iter, tol=cfg.tol,
                                  batch_size=cfg.batch_size)
        return cache[key]

    ones = [1.0] * len(layers)
    before = score(ones)
    floor = before["clean_acc"] - cfg.max_clean_drop
    tried = []

    def consider(scales, layer):
        r = score(scales)
        ok = r["clean_acc"] >= floor
        tried.append({"scale": scales[layer] if layer is not None else scales[0], "layer": layer,
                      "scales": list(scales), **r, "accepted": ok})
        log(f"[calibrate] scales {['%g' % s for s in scales]}: clean {r['clean_acc']:.4f} "
            f"certified {r['certified_acc']:.4f}{'' if ok else ' (clean drop too large)'}")
        return r, ok

    best_scales, best = ones, before
    for s in cfg.scales:
        cand = [float(s)] * len(layers)
        r, ok = consider(cand, None)
        if ok and r["certified_acc"] > best["certified_acc"]:
            best_scales, best = cand, r
    chosen_uniform = best_scales[0]
    if cfg.per_layer and len(layers) > 1:
        grid = sorted({float(s) for s in cfg.scales} | {1.0})
        for i in range(len(layers)):
            # One coordinate step per layer: the grid neighbours of its current scale.
            k = grid.index(best_scales[i]) if best_scales[i] in grid else 0
            for s in grid[max(k - 1, 0):k + 2]:
                cand = list(best_scales)
                cand[i] = s
                if cand == best_scales:
                    continue
                r, ok = consider(cand, i)
                if ok and r["certified_acc"] > best["certified_acc"]:
                    best_scales, best = cand, r
    _set_scales(model, base, best_scales)
    return {"before": before, "after": best, "chosen_scale": chosen_uniform, "chosen_scales": best_scales,
            "tried": tried}


def run_calibrate(cfg: CalibrateStage, data: Path, model: Path, out: Path, summary: Path,
                  run: RunConfig = RunConfig()) -> dict:
    """Calibrate stage: trained checkpoint -> calibrated checkpoint + JSON of what was tried and chosen."""
    with stage_lock(out, "calibrate"):
        if run.threads > 0:
            torch.set_num_threads(run.threads)
        return _calibrate(cfg, Path(data), Path(model), Path(out), Path(summary))


def _calibrate(cfg: CalibrateStage, data: Path, model: Path, out: Path, summary: Path) -> dict:
    cc = cfg.calibrate
    t0 = time.perf_counter()
    net, ckpt = load_model(model)
    bound = ckpt.get("train", {}).get("bound", "local")
    extra = {k: v for k, v in ckpt.items() if k not in ("format", "spec", "state_dict", "calibration")}
    result = {"applicable": False, "eps": float(cc.eps), "max_clean_drop": float(cc.max_clean_drop),
              "tried": [], "chosen_scale": None, "chosen_scales": None, "before": None, "after": None,
              "bound": bound, "trained_model_sha256": file_digest(model), "code_version": code_version("stages.calibrate"),
              "settings": plain(cfg)}
    # The data is checked even where calibration has nothing to choose: a bad file fails here, not later.
    splits = load_splits(data)
    x, y = to_tensors(splits.calib_x, splits.calib_y)
    if tuple(x.shape[1:]) != tuple(net.input_shape):
        raise ValueError(f"calibration images of shape {tuple(x.shape[1:])} do not fit the model input "
                         f"{tuple(net.input_shape)}")
    if not threshold_layers(net):
        result["message"] = (f"model activation {net.spec.get('activation')!r} has no clipping thresholds: "
                             f"passed through unchanged")
        print(f"[calibrate] {cfg.name}: {result['message']}")
    else:
        net.eval()
        result.update(calibrate_thresholds(net, x, y, bound, cc))
        result["applicable"] = True
        result["message"] = (f"chose scales {result['chosen_scales']} on the calibration split "
                             f"({x.shape[0]} examples)")
    result["time_s"] = time.perf_counter() - t0
    save_model(out, net, **extra, calibration={k: result[k] for k in ("chosen_scales", "eps", "applicable")})
    write_json(summary, result)
    return result
