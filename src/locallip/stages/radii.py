"""The radii stage: per test point, the largest radius it is certified at.

Local bound (at the headline guarantee level): ``certify.certified_radius``, a
root search on the certificate's worst-case margin up to ``max_radius``, to a
relative width ``tol``; the value written is a radius at which the point *was*
certified.
Global bound: closed form, min_j margin_j / (K ||w_y - w_j||). Misclassified points
get 0. Writes ``certify/radii.csv``; the report draws certified accuracy against
the radius from it.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ..bounds import global_bound, penultimate
from ..bounds.margins import margin_lower_bounds
from ..certify import certified_radius
from ..data.splits import load_splits, to_tensors
from ..pipeline.checkpoints import load_model
from ..pipeline.config import RadiiStage, RunConfig
from ..pipeline.files import stage_lock, write_text
from .certify import _device, _local_settings, rows_to_csv
from .distributed import Group, process_group, set_threads, shard

Tensor = torch.Tensor


def global_certified_radius(model, x: Tensor, y: Tensor, lipschitz: Tensor) -> Tensor:
    """[B] closed-form radius of the global certificate: min_j (z_y - z_j) / (K ||w_y - w_j||), 0 if wrong."""
    last = [m for m in model if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        logits = model(x)
        pred = logits.argmax(1)
        margins = margin_lower_bounds(last.weight, last.bias, penultimate(model, x), torch.zeros_like(logits[:, 0]),
                                      pred, mode="ball")  # clean margins
        c = last.weight[pred][:, None, :] - last.weight[None, :, :]
        slope = lipschitz * c.norm(dim=-1)
        ratio = torch.where(slope > 0, margins / slope.clamp_min(torch.finfo(slope.dtype).tiny),
                            torch.full_like(margins, float("inf")))
        ratio = ratio.masked_fill(torch.nn.functional.one_hot(pred, logits.shape[1]).bool(), float("inf"))
        r = ratio.min(1).values.clamp_min(0)
    return torch.where(pred == y, r, torch.zeros_like(r))


def run_radii(cfg: RadiiStage, data: Path, model: Path, out: Path, run: RunConfig = RunConfig()) -> dict:
    """Radii stage: per test point, the largest certified radius -> CSV. Sharded under torchrun."""
    with process_group() as group:
        with (stage_lock(out, "radii") if group.main else nullcontext()):
            set_threads(run.threads, group)
            result = _radii(cfg, Path(data), Path(model), Path(out), group)
        group.barrier()
    return result


def _radii(cfg: RadiiStage, data: Path, model: Path, out: Path, group: Group) -> dict:
    t0 = time.perf_counter()
    splits = load_splits(data)
    net, _ = load_model(model)
    x, y = to_tensors(splits.test_x, splits.test_y)
    c = cfg.certify
    dtype = torch.float64 if c.dtype == "float64" else torch.float32
    device = _device()
    net = net.to(device=device, dtype=dtype).eval()
    g = global_bound(net, input_shape=tuple(x.shape[1:]))
    starts = list(range(0, x.shape[0], c.batch_size))
    rows = []
    for s in (starts[i] for i in shard(len(starts), group)):
        gen = torch.Generator().manual_seed(c.seed * 1_000_003 + s)
        xb = x[s:s + c.batch_size].to(device=device, dtype=dtype)
        yb = y[s:s + c.batch_size].to(device)
        with torch.no_grad():
            pred = net(xb).argmax(1)
            r_glob = global_certified_radius(net, xb, yb, g.lipschitz).cpu()
            kw = dict(_local_settings(c, str(c.guarantee)), global_result=g)
            guarantee = kw.pop("guarantee")
            r_loc = certified_radius(net, xb, yb, guarantee=guarantee, max_radius=cfg.max_radius, rtol=cfg.tol,
                                     generator=gen, **kw)
        for i in range(xb.shape[0]):
            rows.append({"index": s + i, "label": int(yb[i]), "prediction": int(pred[i]),
                         "certified_radius_local": float(r_loc[i]), "certified_radius_global": float(r_glob[i])})
    rows = sorted((r for part in group.all_gather(rows) for r in part), key=lambda r: r["index"])
    if group.main:
        write_text(out, rows_to_csv(rows))
        print(f"[radii] {cfg.name}: {len(rows)} points, local bound at the {c.guarantee} level, up to radius "
              f"{cfg.max_radius:g} ({time.perf_counter() - t0:.1f}s) -> {out}")
    return {"n": len(rows)}
