"""``locallip`` command line: one thin command per pipeline stage.

Configuration comes either composed by Hydra from ``config/`` (positional
overrides, ``experiment=NAME`` picks the experiment) or, as orchestrators pass
it, already composed: ``--cfg-json`` (a JSON string) or ``--cfg-file`` (JSON or
YAML, optionally ``--cfg-key a.b`` inside it). Paths default to the layout in
``locallip.pipeline.layout``. Overrides may come before or after the options.

    locallip config experiment=mnist5k train.epochs=3
    locallip download experiment=mnist5k
    locallip train experiment=mnist5k
    locallip certify experiment=mnist5k --radius 0.3
    locallip radii experiment=mnist5k
    locallip report experiment=mnist5k

Exit status: 0 done, 2 bad input (a one-line message), 3 the attack audit broke a
certificate, 4 training diverged, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from . import layout
from .config import (STAGE_TYPES, STAGES, Config, ConfigError, RunConfig, compose, experiment_names, from_plain,
                     plain, stage_config)


def _parse_radius(text: str) -> float:
    try:
        r = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"radius must be a number, got {text!r}")
    if not math.isfinite(r) or r < 0:
        raise argparse.ArgumentTypeError(f"radius must be a finite number >= 0, got {text!r}")
    return r


def _split_overrides(items: List[str]) -> Tuple[Optional[str], List[str]]:
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
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml / json parse errors
        raise ConfigError(f"{p} cannot be parsed: {type(e).__name__}: {e}") from None
    for part in (key.split(".") if key else []):
        if not isinstance(data, dict) or part not in data:
            raise ConfigError(f"{p} has no key {key!r}")
        data = data[part]
    if not isinstance(data, dict):
        raise ConfigError(f"{p}{':' + key if key else ''} is not a mapping")
    return data


def resolve(args, stage: str):
    """(the stage's typed configuration, run options), from --cfg-json / --cfg-file or composed."""
    radius = getattr(args, "radius", None)
    run = RunConfig()
    if args.cfg_json or args.cfg_file:
        if args.overrides:
            raise ConfigError("overrides cannot be combined with --cfg-json/--cfg-file")
        if args.cfg_json:
            try:
                data = json.loads(args.cfg_json)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--cfg-json is not valid JSON: {e}") from None
        else:
            data = _load_cfg_file(args.cfg_file, args.cfg_key)
        if not isinstance(data, dict):
            raise ConfigError("stage configuration must be a mapping")
        if stage == "certify":
            if radius is None:
                radius = data.get("radius")
            if radius is None:
                raise ConfigError("certify needs --radius")
            data = dict(data, radius=float(radius))
        cfg = from_plain(STAGE_TYPES[stage], data, f"{stage} configuration")
    else:
        experiment, rest = _split_overrides(args.overrides)
        full = compose(experiment, rest)
        if stage == "certify" and radius is None:
            raise ConfigError("certify needs --radius")
        cfg, run = stage_config(full, stage, radius), full.run
    if getattr(args, "threads", None) is not None:
        run = RunConfig(progress=run.progress, threads=args.threads)
    if getattr(args, "progress", None) is not None:
        run = RunConfig(progress=args.progress, threads=run.threads)
    return cfg, run


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=mnist5k train.epochs=3")
    p.add_argument("--cfg-json", help="already composed stage configuration (JSON)")
    p.add_argument("--cfg-file", help="already composed configuration file (JSON or YAML)")
    p.add_argument("--cfg-key", help="dotted key of the stage configuration inside --cfg-file")
    p.add_argument("--threads", type=int, help="torch threads (overrides run.threads)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (overrides run.progress)")


def _cmd_config(args) -> int:
    experiment, rest = _split_overrides(args.overrides)
    cfg = compose(experiment, rest)
    out = plain(stage_config(cfg, args.stage, args.radius) if args.stage else cfg)
    if args.format == "yaml":
        import yaml
        print(yaml.safe_dump(out, sort_keys=False), end="")
    else:
        print(json.dumps(out, indent=2))
    return 0


def _cmd_experiments(args) -> int:
    for name in experiment_names():
        print(name)
    return 0


def _cmd_download(args) -> int:
    from ..stages.download import run_download
    cfg, _ = resolve(args, "download")
    run_download(cfg, Path(args.out or layout.splits(cfg.name)))
    return 0


def _cmd_train(args) -> int:
    from ..stages.train import run_train
    cfg, run = resolve(args, "train")
    name = cfg.name
    run_train(cfg, data=Path(args.data or layout.splits(name)), out=Path(args.out or layout.model(name)),
              metrics=Path(args.metrics or layout.train_metrics(name)),
              state=Path(args.state or layout.train_state(name)), run=run)
    return 0


def _cmd_calibrate(args) -> int:
    from ..stages.calibrate import run_calibrate
    cfg, run = resolve(args, "calibrate")
    name = cfg.name
    run_calibrate(cfg, data=Path(args.data or layout.splits(name)), model=Path(args.model or layout.model(name)),
                  out=Path(args.out or layout.calibrated_model(name)),
                  summary=Path(args.summary or layout.calibration(name)), run=run)
    return 0


def _cmd_certify(args) -> int:
    from ..stages.certify import run_certify
    cfg, run = resolve(args, "certify")
    name, radius = cfg.name, cfg.radius
    run_certify(cfg, data=Path(args.data or layout.splits(name)),
                model=Path(args.model or layout.calibrated_model(name)),
                out=Path(args.out or layout.certificate(name, radius)),
                table=Path(args.table or layout.certificate_table(name, radius)), run=run)
    return 0


def _cmd_radii(args) -> int:
    from ..stages.radii import run_radii
    cfg, run = resolve(args, "radii")
    run_radii(cfg, data=Path(args.data or layout.splits(cfg.name)),
              model=Path(args.model or layout.calibrated_model(cfg.name)),
              out=Path(args.out or layout.radii_table(cfg.name)), run=run)
    return 0


def _cmd_report(args) -> int:
    from ..stages.report import run_report
    cfg, _ = resolve(args, "report")
    assert isinstance(cfg, Config)
    baseline = cfg.report.baseline
    baseline_dir = args.baseline_dir or (str(layout.experiment_dir(baseline)) if baseline else None)
    run_report(cfg, experiment_dir=Path(args.experiment_dir or layout.experiment_dir(cfg.name)),
               out=Path(args.out or layout.report(cfg.name)),
               baseline_dir=Path(baseline_dir) if baseline_dir else None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="locallip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.stage_parsers = {}  # name -> subparser, for intermixed parsing in main()

    p = sub.add_parser("config", help="print the composed configuration")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--stage", choices=STAGES, help="print only what this stage receives")
    p.add_argument("--radius", type=_parse_radius)
    p.add_argument("--format", choices=("json", "yaml"), default="json")
    p.set_defaults(func=_cmd_config)
    parser.stage_parsers["config"] = p

    p = sub.add_parser("experiments", help="list the experiments in config/experiment/")
    p.set_defaults(func=_cmd_experiments)

    p = sub.add_parser("download", help="fetch and verify the dataset, write the splits")
    _add_config_args(p)
    p.add_argument("--out", help="splits file (.npz)")
    p.set_defaults(func=_cmd_download)
    parser.stage_parsers["download"] = p

    p = sub.add_parser("train", help="train with the local (or global) bound")
    _add_config_args(p)
    p.add_argument("--data")
    p.add_argument("--out", help="best checkpoint (by validation certified accuracy)")
    p.add_argument("--metrics", help="per-epoch metrics (JSON)")
    p.add_argument("--state", help="resume checkpoint, rewritten every epoch")
    p.set_defaults(func=_cmd_train)
    parser.stage_parsers["train"] = p

    p = sub.add_parser("calibrate", help="choose clipping thresholds on the calibration split")
    _add_config_args(p)
    p.add_argument("--data")
    p.add_argument("--model")
    p.add_argument("--out", help="calibrated checkpoint")
    p.add_argument("--summary", help="what was tried and chosen (JSON)")
    p.set_defaults(func=_cmd_calibrate)
    parser.stage_parsers["calibrate"] = p

    p = sub.add_parser("certify", help="certify the test split at one radius")
    _add_config_args(p)
    p.add_argument("--radius", type=_parse_radius)
    p.add_argument("--data")
    p.add_argument("--model")
    p.add_argument("--out", help="summary (JSON)")
    p.add_argument("--table", help="per-sample table (CSV)")
    p.set_defaults(func=_cmd_certify)
    parser.stage_parsers["certify"] = p

    p = sub.add_parser("radii", help="per test point, the largest certified radius (for the report's curve)")
    _add_config_args(p)
    p.add_argument("--data")
    p.add_argument("--model")
    p.add_argument("--out", help="per-point radii (CSV)")
    p.set_defaults(func=_cmd_radii)
    parser.stage_parsers["radii"] = p

    p = sub.add_parser("report", help="write results/<experiment>/report.md")
    _add_config_args(p)
    p.add_argument("--experiment-dir")
    p.add_argument("--baseline-dir")
    p.add_argument("--out")
    p.set_defaults(func=_cmd_report)
    parser.stage_parsers["report"] = p
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Overrides may follow options (`certify --radius 0.3 experiment=smoke`): parse intermixed.
    sub_name = next((a for a in argv if not a.startswith("-")), None)
    if sub_name in parser.stage_parsers:
        i = argv.index(sub_name)
        args = parser.stage_parsers[sub_name].parse_intermixed_args(argv[i + 1:])
        args.command = sub_name
    else:
        args = parser.parse_args(argv)
    from .checkpoints import CheckpointError
    from .files import StageBusy
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, StageBusy) as e:
        print(f"locallip {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"locallip {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # stage-specific failures with a message of their own
        name = type(e).__name__
        if name == "AuditFailure":
            print(f"locallip {args.command}: CERTIFICATE AUDIT FAILED: {e}", file=sys.stderr)
            return 3
        if name == "TrainingDiverged":
            print(f"locallip {args.command}: error: {e}", file=sys.stderr)
            return 4
        raise


if __name__ == "__main__":
    sys.exit(main())
