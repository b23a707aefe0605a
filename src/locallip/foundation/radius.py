"""The one rule for a radius (l2, in input units): a finite number >= 0. Torch- and config-free, so
the configuration, the command line and the bounds all check it here."""
from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_radius(value: Any, what: str = "radius") -> float:
    """A radius is a finite number >= 0; returns it as a float."""
    if not (is_number(value) and math.isfinite(value) and value >= 0):
        raise ConfigError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)
