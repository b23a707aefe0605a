"""``locallip`` command line: one thin command per pipeline stage.

Configuration comes either composed by Hydra from ``config/`` (positional
overrides, ``experiment=NAME`` picks the experiment) or, as orchestrators pass
it, already composed: ``--cfg-json`` (a JSON string) or ``--cfg-file`` (JSON or
YAML, optionally ``--cfg-key a.b`` inside it). Paths default to the layout in
``locallip.paths``.

    locallip config experiment=mnist5k train.epochs=3
    locallip download experiment=mnist5k
    locallip train experiment=mnist5k
    locallip certify experiment=mnist5k --radius 1.58
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import List, Optional

from . import paths
from .config import STAGES, ConfigError, compose, experiment_names, stage_config


def _parse_radius(text: str) -> float:
    try:
        r = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"radius must be a number, got {text!r}")
    if not math.isfinite(r) or r < 0:
        raise argparse.ArgumentTypeError(f"radius must be a finite number >= 0, got {text!r}")
    return r


def _split_overrides(items: List[str]):
    experiment, rest = None, []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        if item.startswith("experiment="):
            experiment = item.split("=", 1)[1]
        else:
            rest.append(item)
    return experiment, rest


def _load_cfg_file(path: str, key: Optional[str]) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    for part in (key.split(".") if key else []):
        if not isinstance(data, dict) or part not in data:
            raise ConfigError(f"{p} has no key {key!r}")
        data = data[part]
    if not isinstance(data, dict):
        raise ConfigError(f"{p}{':' + key if key else ''} is not a mapping")
    return data


def resolve_config(args, stage: str) -> dict:
    """The stage's configuration, from --cfg-json / --cfg-file or composed from overrides."""
    radius = getattr(args, "radius", None)
    if args.cfg_json:
        try:
            cfg = json.loads(args.cfg_json)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--cfg-json is not valid JSON: {e}") from e
    elif args.cfg_file:
        cfg = _load_cfg_file(args.cfg_file, args.cfg_key)
    else:
        experiment, rest = _split_overrides(args.overrides)
        full = compose(experiment, rest)
        if stage == "certify" and radius is None:
            raise ConfigError("certify needs --radius")
        return stage_config(full, stage, radius)
    if args.overrides:
        raise ConfigError("overrides cannot be combined with --cfg-json/--cfg-file")
    if not isinstance(cfg, dict) or "name" not in cfg:
        raise ConfigError("stage configuration must be a mapping with a 'name'")
    if stage == "certify":
        if radius is None:
            radius = cfg.get("radius")
        if radius is None:
            raise ConfigError("certify needs --radius")
        cfg = dict(cfg, radius=_parse_radius(str(radius)))
    return cfg


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=mnist5k train.epochs=3")
    p.add_argument("--cfg-json", help="already composed stage configuration (JSON)")
    p.add_argument("--cfg-file", help="already composed configuration file (JSON or YAML)")
    p.add_argument("--cfg-key", help="dotted key of the stage configuration inside --cfg-file")


def _cmd_config(args) -> int:
    experiment, rest = _split_overrides(args.overrides)
    cfg = compose(experiment, rest)
    if args.stage:
        cfg = stage_config(cfg, args.stage, args.radius)
    if args.format == "yaml":
        import yaml
        print(yaml.safe_dump(cfg, sort_keys=False), end="")
    else:
        print(json.dumps(cfg, indent=2))
    return 0


def _cmd_experiments(args) -> int:
    for name in experiment_names():
        print(name)
    return 0


def _cmd_download(args) -> int:
    from .data import run_download
    cfg = resolve_config(args, "download")
    run_download(cfg, Path(args.out or paths.splits(cfg["name"])))
    return 0


def _cmd_train(args) -> int:
    from .train import run_train
    cfg = resolve_config(args, "train")
    name = cfg["name"]
    run_train(cfg, data=Path(args.data or paths.splits(name)), out=Path(args.out or paths.model(name)),
              metrics=Path(args.metrics or paths.train_metrics(name)),
              state=Path(args.state or paths.train_state(name)))
    return 0


def _cmd_calibrate(args) -> int:
    from .calibrate import run_calibrate
    cfg = resolve_config(args, "calibrate")
    name = cfg["name"]
    run_calibrate(cfg, data=Path(args.data or paths.splits(name)), model=Path(args.model or paths.model(name)),
                  out=Path(args.out or paths.calibrated_model(name)),
                  summary=Path(args.summary or paths.calibration(name)))
    return 0


def _cmd_certify(args) -> int:
    from .certify import run_certify
    cfg = resolve_config(args, "certify")
    name, radius = cfg["name"], cfg["radius"]
    run_certify(cfg, data=Path(args.data or paths.splits(name)),
                model=Path(args.model or paths.calibrated_model(name)),
                out=Path(args.out or paths.certificate(name, radius)),
                table=Path(args.table or paths.certificate_table(name, radius)))
    return 0


def _cmd_report(args) -> int:
    from .report import run_report
    cfg = resolve_config(args, "report")
    name = cfg["name"]
    baseline = cfg.get("report", {}).get("baseline")
    baseline_dir = args.baseline_dir or (str(paths.experiment_dir(baseline)) if baseline else None)
    run_report(cfg, experiment_dir=Path(args.experiment_dir or paths.experiment_dir(name)),
               out=Path(args.out or paths.report(name)),
               baseline_dir=Path(baseline_dir) if baseline_dir else None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="locallip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="print the composed configuration")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--stage", choices=STAGES, help="print only what this stage receives")
    p.add_argument("--radius", type=_parse_radius)
    p.add_argument("--format", choices=("json", "yaml"), default="json")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("experiments", help="list the experiments in config/experiment/")
    p.set_defaults(func=_cmd_experiments)

    p = sub.add_parser("download", help="fetch and verify the dataset, write the splits")
    _add_config_args(p)
    p.add_argument("--out", help="splits file (.npz)")
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("train", help="train with the local (or global) bound")
    _add_config_args(p)
    p.add_argument("--data")
    p.add_argument("--out", help="best checkpoint (by validation certified accuracy)")
    p.add_argument("--metrics", help="per-epoch metrics (JSON)")
    p.add_argument("--state", help="resume checkpoint, rewritten every epoch")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("calibrate", help="choose clipping thresholds on the calibration split")
    _add_config_args(p)
    p.add_argument("--data")
    p.add_argument("--model")
    p.add_argument("--out", help="calibrated checkpoint")
    p.add_argument("--summary", help="what was tried and chosen (JSON)")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("certify", help="certify the test split at one radius")
    _add_config_args(p)
    p.add_argument("--radius", type=_parse_radius)
    p.add_argument("--data")
    p.add_argument("--model")
    p.add_argument("--out", help="summary (JSON)")
    p.add_argument("--table", help="per-sample table (CSV)")
    p.set_defaults(func=_cmd_certify)

    p = sub.add_parser("report", help="write results/<experiment>/report.md")
    _add_config_args(p)
    p.add_argument("--experiment-dir")
    p.add_argument("--baseline-dir")
    p.add_argument("--out")
    p.set_defaults(func=_cmd_report)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .certify import AuditFailure
    from .io import CheckpointError
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"locallip {args.command}: error: {e}", file=sys.stderr)
        return 2
    except AuditFailure as e:
        print(f"locallip {args.command}: CERTIFICATE AUDIT FAILED: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"locallip {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
