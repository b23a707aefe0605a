"""Certification: ``certify`` (per point, at one radius: the cascade of sound steps),
``certified_radius`` (per point, the largest certified radius), ``evaluate`` (a split's
accuracy, for model selection), and the sentences that say what each certificate promises.
"""
from .cascade import CERTIFYING_STEPS, DETERMINISTIC_STEPS, SCREEN_STEPS, STEP, STEPS, Certificate, certify
from .settings import CascadeSettings
from .steps import Step, register_step, steps
from .evaluate import evaluate
from .guarantees import cascade_guarantee, local_guarantee
from .radius import certified_radius

__all__ = ["CERTIFYING_STEPS", "CascadeSettings", "Certificate", "DETERMINISTIC_STEPS", "SCREEN_STEPS", "STEP", "STEPS",
           "Step", "cascade_guarantee", "certified_radius", "certify", "evaluate", "local_guarantee",
           "register_step", "steps"]
