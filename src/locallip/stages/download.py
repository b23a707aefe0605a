"""The download stage: fetch and verify a dataset, cut it into splits, write one ``.npz``."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Union

from ..data.sources import prepare_splits
from ..data.splits import DataError, save_splits
from ..foundation.compose import from_plain
from ..foundation.schema import ConfigError, DownloadStage, RunConfig
from ..foundation.files import stage_lock


def run_download(cfg: Union[DownloadStage, Mapping], out: Path, run: RunConfig = RunConfig()) -> dict:
    """Prepare the splits of ``cfg.dataset`` and write them to ``out``; returns their meta.

    ``out`` is written only after everything succeeded (atomic rename), so a failure
    never leaves a partial file nor replaces a good one.
    """
    if not isinstance(cfg, DownloadStage):
        try:
            cfg = from_plain(DownloadStage, dict(cfg), "download configuration")
        except (ConfigError, TypeError, ValueError) as e:
            raise DataError(str(e)) from None
    with stage_lock(out, "download"):
        splits = prepare_splits(cfg.dataset)
        splits.meta["experiment"] = cfg.name
        save_splits(splits, out)
    m = splits.meta
    sizes = m["sizes"]
    print(f"{m['name']}: train {sizes['train']}, val {sizes['val']}, calib {sizes['calib']}, "
          f"test {sizes['test']} ({'x'.join(map(str, m['input_shape']))}, {m['num_classes']} classes, "
          f"seed {m['seed']}) from {m['source']} -> {out}")
    return m
