"""The one registry of certification steps: what can decide a point, and what each decision promises.

A point's ``Certificate.step`` is an index into this registry. A step that *runs* in the
cascade has a ``run`` function (``run(state, settings)``: it certifies what it can among the
points ``state.open()`` returns, through ``state.apply``); the others are outcomes another
step assigns (``exact`` and ``probabilistic`` come out of the masked step; ``misclassified``,
``excluded``, ``not_certified`` certify nothing). The cascade, the per-split summaries and CSV
rows, the report's steps table and the guarantee sentence all loop over this registry, so a
new step is written once and registered once (``register_step``).

Indices are registration order and never change: a new step is appended, and ``before``
places it in the cascade's running order only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

#: What a certificate issued by a step rests on.
GUARANTEES = ("deterministic", "probabilistic", "estimate")


@dataclass(frozen=True)
class Step:
    name: str
    certifies: bool  # a point it decides is certified
    guarantee: Optional[str] = None  # one of GUARANTEES for a certifying step
    words: str = ""  # the report's steps table: "certified by <words>"
    promise: str = ""  # its clause in the guarantee sentence ("then <promise>")
    run: Optional[Callable] = None  # run(state, settings): a step of the cascade (None: an outcome)
    #: enabled(settings): whether it runs under these settings (None: always). A step that does not
    #: run is left out of the guarantee sentence too.
    enabled: Optional[Callable] = None

    def runs_with(self, settings) -> bool:
        return self.run is not None and (self.enabled is None or settings is None or bool(self.enabled(settings)))

    def __post_init__(self):
        if self.certifies != (self.guarantee in GUARANTEES):
            raise ValueError(f"step {self.name!r}: a certifying step needs a guarantee in {GUARANTEES}, "
                             f"and only a certifying step has one")


_STEPS: List[Step] = []
_ORDER: List[str] = []  # the cascade's running order (steps with a run function)
#: Older views of the registry, kept live: names in index order, name -> index, and the certifying
#: and deterministic names.
STEPS: List[str] = []
STEP: Dict[str, int] = {}
CERTIFYING_STEPS: List[str] = []
DETERMINISTIC_STEPS: List[str] = []


def register_step(step: Step, *, before: Optional[str] = None) -> Step:
    """Add ``step`` (its index is the next free one); a running step joins the cascade at its end,
    or just before the running step ``before``."""
    if step.name in STEP:
        raise ValueError(f"a certification step named {step.name!r} is already registered")
    _STEPS.append(step)
    STEP[step.name] = len(STEPS)
    STEPS.append(step.name)
    if step.certifies:
        CERTIFYING_STEPS.append(step.name)
    if step.guarantee == "deterministic":
        DETERMINISTIC_STEPS.append(step.name)
    if step.run is not None:
        _ORDER.insert(_ORDER.index(before) if before is not None else len(_ORDER), step.name)
    return step


def unregister_step(name: str) -> None:
    """Remove the last registered step (tests register steps of their own and take them back)."""
    if not STEPS or STEPS[-1] != name:
        raise ValueError(f"only the last registered step can be removed, not {name!r}")
    step = _STEPS.pop()
    STEPS.pop()
    del STEP[name]
    for names in (CERTIFYING_STEPS, DETERMINISTIC_STEPS, _ORDER):
        if name in names:
            names.remove(name)
    del step


def steps() -> Tuple[Step, ...]:
    return tuple(_STEPS)


def step_named(name: str) -> Step:
    return _STEPS[STEP[name]]


def running_order() -> Tuple[Step, ...]:
    """The steps the cascade runs, in order (the global step runs first, when the state is made)."""
    return tuple(step_named(n) for n in _ORDER)


def certifying_steps() -> Tuple[Step, ...]:
    return tuple(s for s in _STEPS if s.certifies)
