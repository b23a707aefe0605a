"""Composing the configuration: Hydra into the schema's dataclasses, validated once, and back to plain values.

``compose(experiment, overrides)`` gives a ``Config``; orchestrators track a stage's part as
plain values (``plain``), and ``from_plain`` turns such values back into the typed object
(and validates them) in the job.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import fields, is_dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional, Type, TypeVar

from omegaconf import OmegaConf

from .ranges import check_radius, parse_radius_tag, radius_tag, validate, validate_stage  # noqa: F401
from .schema import (CalibrateConfig, CertifyConfig, Config, ConfigError, CurveConfig, DatasetConfig, ModelConfig,
                     RunConfig, TrainConfig)


# --------------------------------------------------------------------------- plain values


def with_linear_relaxation(certify: Any, auto_on: bool) -> Any:
    """The certify settings with ``linear_relaxation: auto`` made ``on`` or ``off`` (a copy; an explicit
    choice is kept), so that what ran is what the certificates record. The pipeline's rule is
    ``auto_on=False`` (its models are trained for their Lipschitz bound, and its baselines are certified
    as their papers do): the certify stage certifies with it and the report compares the recorded
    settings with it. certify-model passes ``certify.relaxation_step.pays_by_default(model)``."""
    if str(getattr(certify, "linear_relaxation", "off")) != "auto":
        return certify
    value = "on" if auto_on else "off"
    if is_dataclass(certify):
        return replace(certify, linear_relaxation=type(certify.linear_relaxation)(value))
    resolved = certify.copy()
    resolved.linear_relaxation = value
    return resolved


def plain(obj: Any) -> Any:
    """A dataclass (or list/dict of them) as plain JSON/YAML values; enums become their values."""
    if isinstance(obj, Enum):
        return obj.value
    if is_dataclass(obj):
        return {f.name: plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


T = TypeVar("T")


def settings_json(text: str) -> Any:
    """The value of a ``--cfg-json`` argument (settings passed inline, as the workflow's rules do)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--cfg-json is not valid JSON: {e}") from None


def from_plain(cls: Type[T], data: Any, what: str = "configuration") -> T:
    """Plain values (e.g. a stage's JSON) as a typed ``cls`` object, type- and range-checked."""
    from omegaconf.errors import OmegaConfBaseException

    outer = sys.exc_info()[1]  # what a caller is handling (e.g. Snakemake's input function): no cause of ours
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a mapping, got {type(data).__name__}")
    try:
        node = OmegaConf.merge(OmegaConf.structured(cls), data)
        obj = OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid {what}: {explain(e, outer)}") from None
    validate_stage(obj)
    return obj


def explain(e: BaseException, outer: Optional[BaseException] = None) -> str:
    """The error and its causes on one line (Hydra's 'Error merging override' hides why in its cause),
    down to ``outer``, an exception the caller was already handling (not one of its causes)."""
    parts, seen = [], set()
    while e is not None and e is not outer and id(e) not in seen:
        seen.add(id(e))
        lines = [ln.strip() for ln in str(e).strip().splitlines()]
        msg = next((ln for ln in lines if ln and not ln.startswith(("full_key", "reference_type", "object_type"))), "")
        if msg and "$VALUE" not in msg and not any(msg in p for p in parts):
            parts.append(msg)
        e = e.__cause__ or e.__context__
    return "; caused by: ".join(parts)


# --------------------------------------------------------------------------- composition


def default_config_dir() -> Path:
    """`config/` of the repository (the working directory first, then the source tree)."""
    here = Path.cwd() / "config"
    if (here / "config.yaml").exists():
        return here
    return Path(__file__).resolve().parents[3] / "config"


def _register() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for group, node in (("dataset", DatasetConfig), ("model", ModelConfig), ("train", TrainConfig),
                        ("calibrate", CalibrateConfig), ("certify", CertifyConfig), ("curve", CurveConfig),
                        ("run", RunConfig)):
        cs.store(group=group, name="schema", node=node)
    for name, fn in (("mul", lambda *a: math.prod(float(v) for v in a)),
                     ("div", lambda a, b: float(a) / float(b))):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def experiment_names(config_dir: Optional[Path] = None) -> List[str]:
    d = Path(config_dir or default_config_dir()) / "experiment"
    return sorted(p.stem for p in d.glob("*.yaml"))


def compose(experiment: Optional[str] = None, overrides: Optional[List[str]] = None,
            config_dir: Optional[Path] = None) -> Config:
    """Compose, resolve and validate the configuration of one experiment; ConfigError names any problem."""
    import yaml
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    outer = sys.exc_info()[1]  # see from_plain
    config_dir = Path(config_dir or default_config_dir()).resolve()
    if not (config_dir / "config.yaml").exists():
        raise ConfigError(f"no config.yaml in config directory {config_dir}")
    overrides = list(overrides or [])
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form key=value")
    if experiment is not None:
        known = experiment_names(config_dir)
        if experiment not in known:
            raise ConfigError(f"unknown experiment {experiment!r}; known: {', '.join(known)}")
        overrides = [f"experiment={experiment}"] + overrides
    _register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            raw = hydra_compose(config_name="config", overrides=overrides)
        if OmegaConf.is_missing(raw, "name"):  # results/<name>/ would be a guess: refuse instead
            raise ConfigError(f"no experiment name: choose one (experiment=NAME; known: "
                              f"{', '.join(experiment_names(config_dir))}) or set `name:` in the experiment file")
        raw_plain = OmegaConf.to_container(raw, resolve=True, throw_on_missing=True)
        raw_plain.pop("experiment", None)
        # Merging into the schema in struct mode rejects keys the schema lacks (`+train.epochz=3`).
        node = OmegaConf.merge(OmegaConf.structured(Config), raw_plain)
        cfg = OmegaConf.to_object(node)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"invalid configuration: {explain(e, outer)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid configuration: {yaml_error(e)}") from None
    finally:
        GlobalHydra.instance().clear()
    return validate(cfg)


def yaml_error(e: Exception) -> str:
    """A YAML syntax error on one line: the file, the line and column, and the problem."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
    if mark is None:
        return f"YAML syntax error: {problem}"
    return f"{mark.name} line {mark.line + 1}, column {mark.column + 1}: YAML syntax error: {problem}"
