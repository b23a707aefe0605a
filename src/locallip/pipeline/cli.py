"""``locallip`` command line: one thin command per stage of the table (``pipeline.table``).

Configuration comes either composed by Hydra from ``config/`` (positional
overrides, ``experiment=NAME`` picks the experiment) or, as orchestrators pass
it, already composed: ``--cfg-json`` (a JSON string) or ``--cfg-file`` (JSON or
YAML, optionally ``--cfg-key a.b`` inside it). Paths default to the layout in
``locallip.foundation.layout``. Overrides may come before or after the options.

    locallip config experiment=mnist5k_r158 train.epochs=3
    locallip download experiment=mnist5k_r158
    locallip train experiment=mnist5k_r158
    locallip certify experiment=mnist5k_r158 --radius 1.58
    locallip report experiment=mnist5k_r158
    locallip certify-model --model net.safetensors --arch net.json --data test.npz --radius 0.5
    locallip study-row --study mnist5k_r158_equal_epochs --run r158_gloro
    locallip study-table --study mnist5k_r158_equal_epochs

Exit status: 0 done, 1 a system error (disk full, read-only file system), 2 bad input (a one-line message), 3 the attack audit broke a
certificate, 4 training diverged, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from importlib import import_module
from pathlib import Path
from typing import List, Optional, Tuple

from ..foundation.compose import compose, experiment_names, from_plain, plain, settings_json
from ..foundation.radius import check_radius
from ..foundation.schema import ConfigError, RunConfig
from . import dag
from .table import NAMES, STAGES, Stage, stage, stage_config


def _parse_radius(text: str) -> float:
    try:
        return check_radius(float(text))  # the one radius rule (foundation.radius)
    except ValueError:
        raise argparse.ArgumentTypeError(f"radius must be a finite number >= 0, got {text!r}") from None


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


def _composed(experiment: Optional[str], overrides: List[str]):
    """The experiment's configuration, and those its report shows beside it."""
    cfg = compose(experiment, overrides)
    cfgs = {cfg.name: cfg}
    for b in cfg.report.baselines:
        cfgs[b] = compose(b, overrides)
    return cfg, cfgs


def resolve(args, s: Stage):
    """(the stage's typed configuration, run options), from --cfg-json / --cfg-file or composed."""
    radius = getattr(args, "radius", None)
    run = RunConfig()
    if args.cfg_json or args.cfg_file:
        if args.overrides:
            raise ConfigError("overrides cannot be combined with --cfg-json/--cfg-file")
        data = settings_json(args.cfg_json) if args.cfg_json else _load_cfg_file(args.cfg_file, args.cfg_key)
        if not isinstance(data, dict):
            raise ConfigError("stage configuration must be a mapping")
        if s.per_radius:
            radius = data.get("radius") if radius is None else radius
            if radius is None:
                raise ConfigError(f"{s.name} needs --radius")
            data = dict(data, radius=float(radius))
        cfg = from_plain(s.config, data, f"{s.name} configuration")
    else:
        if s.per_radius and radius is None:
            raise ConfigError(f"{s.name} needs --radius")
        full, cfgs = _composed(*_split_overrides(args.overrides))
        cfg, run = from_plain(s.config, dag.job(cfgs, full.name, s.name, radius, src_dir=None).params), full.run
    if getattr(args, "threads", None) is not None:
        run = RunConfig(progress=run.progress, threads=args.threads, processes=run.processes)
    if getattr(args, "progress", None) is not None:
        run = RunConfig(progress=args.progress, threads=run.threads, processes=run.processes)
    return cfg, run


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=mnist5k_r158 train.epochs=3")
    p.add_argument("--cfg-json", help="already composed stage configuration (JSON)")
    p.add_argument("--cfg-file", help="already composed configuration file (JSON or YAML)")
    p.add_argument("--cfg-key", help="dotted key of the stage configuration inside --cfg-file")
    p.add_argument("--threads", type=int, help="torch threads (overrides run.threads)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (overrides run.progress)")


def _run_stage(args) -> int:
    """Any stage of the table: its settings, its paths (given, or the layout's), then its function."""
    s = stage(args.command)
    cfg, run = resolve(args, s)
    radius = cfg.radius if s.per_radius else None
    defaults = {k: (v[0] if v else None) for k, v in s.inputs(cfg).items()}
    outputs = s.outputs(s.experiment(cfg), radius)
    defaults.update(outputs)
    defaults.update(s.options(cfg))
    paths = {}
    for key in s.flags:
        given = getattr(args, key)
        value = given if given not in (None, []) else defaults.get(key)
        paths[key] = [Path(v) for v in value] if isinstance(value, list) else (None if value is None else Path(value))
    from ..foundation.files import check_distinct

    check_distinct({k: v for k, v in paths.items() if k not in outputs},
                   {k: v for k, v in paths.items() if k in outputs}, f"locallip {s.name}")
    fn = getattr(import_module(f"locallip.{s.module}"), s.function)
    fn(cfg, run=run, **paths)
    return 0


def _cmd_config(args) -> int:
    experiment, rest = _split_overrides(args.overrides)
    cfg, cfgs = _composed(experiment, rest)
    out = plain(stage_config(cfg, args.stage, args.radius, cfgs) if args.stage else cfg)
    if args.format == "yaml":
        import yaml
        print(yaml.safe_dump(out, sort_keys=False), end="")
    else:
        print(json.dumps(out, indent=2))
    return 0


def _cmd_certify_model(args) -> int:
    """A model trained anywhere: its settings from --config and the flags, checked, then certified."""
    from ..foundation.layout import external_dir
    from ..foundation.schema import ExternalModel

    data = _load_cfg_file(args.config, None) if args.config else {}
    flags = {"name": args.name, "model": args.model, "architecture": args.arch, "data": args.data,
             "limit": args.limit}
    data.update({k: v for k, v in flags.items() if v is not None})
    if args.radius:
        data["radii"] = list(args.radius)
    if args.mean or args.std:
        data["normalization"] = {"mean": list(args.mean or []), "std": list(args.std or [])}
    if args.guarantee:
        data.setdefault("certify", {})["guarantee"] = args.guarantee
    if args.audit:
        data["audit"] = args.audit
    if args.no_radii:
        data.setdefault("curve", {})["enabled"] = False
    if args.max_radius is not None:
        data.setdefault("curve", {})["max_radius"] = args.max_radius
    if "name" not in data:  # inferred from the weights' file name: made a valid name, not refused
        data["name"] = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(data.get("model") or "external").stem).strip("_-") \
            or "external"
    if any(float(r) <= 0 for r in data.get("radii") or []):
        raise ConfigError("certify-model radii must be > 0 (a radius of 0 certifies nothing)")
    cfg = from_plain(ExternalModel, data, "certify-model settings")
    run = RunConfig(progress=True if args.progress is None else args.progress, threads=args.threads or 0)
    from ..stages.certify_model import run_certify_model

    run_certify_model(cfg, Path(args.out) if args.out else external_dir(cfg.name), run=run)
    return 0


def _add_certify_model_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("certify-model", help="certify a model trained anywhere (weights + a layer list)")
    p.add_argument("--config", help="settings file (YAML or JSON), e.g. config/external/<name>.yaml")
    p.add_argument("--name", help="results go to results/external/<name>/ (default: the weights file's name)")
    p.add_argument("--model", help="weights: a state_dict in safetensors or torch weights-only format")
    p.add_argument("--arch", help="architecture: a JSON layer list (locallip.nn.describe)")
    p.add_argument("--data", help="points: an .npz of x and y, a locallip splits file, or dataset:<name>")
    p.add_argument("--radius", type=_parse_radius, action="append", help="l2 radius in [0, 1] pixel units (repeatable)")
    p.add_argument("--guarantee", choices=("probabilistic", "exact", "estimate"))
    p.add_argument("--mean", type=float, action="append", help="per-channel normalization the model expects")
    p.add_argument("--std", type=float, action="append")
    p.add_argument("--limit", type=int, help="certify only the first N points")
    p.add_argument("--audit", choices=("full", "quick", "off"),
                   help="the attack on every certified point: full (default; certify.attack), quick (10 steps, "
                        "one start) or off (the report says nothing was attacked)")
    p.add_argument("--no-radii", action="store_true", help="skip the per-point radii (certify/radii.csv)")
    p.add_argument("--max-radius", type=_parse_radius,
                   help="the per-point radii's search range [0, R] (default: twice the largest --radius)")
    p.add_argument("--out", help="output directory (default results/external/<name>)")
    p.add_argument("--threads", type=int)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    p.set_defaults(func=_cmd_certify_model)
    return p


def _cmd_experiments(args) -> int:
    for name in experiment_names():
        print(name)
    return 0


def _add_stage_parser(sub, s: Stage) -> argparse.ArgumentParser:
    p = sub.add_parser(s.name, help=s.help)
    _add_config_args(p)
    if s.per_radius:
        p.add_argument("--radius", type=_parse_radius)
    for key, flag in s.flags.items():
        if key in s.repeated_flags:
            p.add_argument(flag, dest=key, action="append", default=[], help=f"{key.replace('_', ' ')} (repeatable)")
        else:
            p.add_argument(flag, dest=key, help=key.replace("_", " "))
    p.set_defaults(func=_run_stage)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="locallip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.stage_parsers = {}  # name -> subparser, for intermixed parsing in main()

    p = sub.add_parser("config", help="print the composed configuration")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--stage", choices=NAMES, help="print only what this stage receives")
    p.add_argument("--radius", type=_parse_radius)
    p.add_argument("--format", choices=("json", "yaml"), default="json")
    p.set_defaults(func=_cmd_config)
    parser.stage_parsers["config"] = p

    p = sub.add_parser("experiments", help="list the experiments in config/experiment/")
    p.set_defaults(func=_cmd_experiments)

    for s in STAGES:
        parser.stage_parsers[s.name] = _add_stage_parser(sub, s)
    _add_certify_model_parser(sub)
    from .study import add_study_parsers

    add_study_parsers(sub)  # study-row, study-table (config/study/<table>.yaml)
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
    from ..foundation.checkpoints import CheckpointError
    from ..foundation.files import StageBusy
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, StageBusy, PermissionError) as e:
        print(f"locallip {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"locallip {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a read-only mount, a device error: the system's, not the input's
        print(f"locallip {args.command}: error: {e}", file=sys.stderr)
        return 1
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
