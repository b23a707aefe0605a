"""The choices of the configuration, as string enums: a typo fails when the config is composed.

Datasets, architectures and activations come from ``catalog``, so each list is written once.
"""
from __future__ import annotations

from enum import Enum
from typing import Sequence

from .catalog import ACTIVATIONS, ARCHITECTURES, DATASETS, RESIDUAL_ARCHITECTURES


class Choice(str, Enum):
    """A string choice: compares, hashes, formats and serialises as its value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


def _choices(name: str, values: Sequence[str]):
    return Choice(name, [(v, v) for v in values])


# One list per concept: the registries are the source of the choices.
DatasetName = _choices("DatasetName", list(DATASETS))
Arch = _choices("Arch", list(ARCHITECTURES) + list(RESIDUAL_ARCHITECTURES))
Activation = _choices("Activation", list(ACTIVATIONS))


Bound = _choices("Bound", ["local", "global"])  # `global` is a Python keyword: Bound["global"]


class Loss(Choice):
    bcp_mix = "bcp_mix"
    gloro = "gloro"
    gloro_trades = "gloro_trades"  # TRADES-KL with the ⊥ logit at the label, unclipped
    trades_kl = "trades_kl"  # the GloRo reference's sparse_trades_kl (⊥ at the prediction, Keras clipping)
    emma = "emma"  # LiResNet's EMMA


class LastLayer(Choice):
    ball = "ball"
    ball_box = "ball_box"


class Ramp(Choice):
    linear = "linear"
    log = "log"


class Device(Choice):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class NormSolver(Choice):
    krylov = "krylov"
    power = "power"


class MaskedNorms(Choice):
    """Training: when the local step runs the masked solver (``bounds.local_bound``)."""

    always = "always"
    adaptive = "adaptive"  # only for the samples and layers whose masks can change the norm
    never = "never"  # the global norm for every layer: BCP's bound (with the boxes kept)


class Guarantee(Choice):
    probabilistic = "probabilistic"
    exact = "exact"
    estimate = "estimate"


class Audit(Choice):
    """How certify-model attacks its certificates: the configured PGD, a cheaper one, or not at all."""
    full = "full"
    quick = "quick"
    off = "off"


class AttackMethod(Choice):
    """The audit's search (``locallip.attack``): the margin attack, or plain PGD (kept for comparison)."""
    margin = "margin"
    pgd = "pgd"


class Method(Choice):
    lanczos = "lanczos"
    power = "power"


class Switch(Choice):
    """on, off, or auto (decided where it is used, and said there)."""
    auto = "auto"
    on = "on"
    off = "off"


class DType(Choice):
    float32 = "float32"
    float64 = "float64"
