"""Lipschitz bounds of the penultimate features of a plain ``nn.Sequential``, and margins built on them.

* ``operators``: layers as linear operators, masked operators;
* ``spectral``: batched spectral-norm solvers (power iteration, restarted Lanczos), from below;
* ``krylov``: plain Lanczos for a fixed number of steps and its probabilistic guarantee;
* ``exact``: deterministic bounds of masked norms (explicit Gram matrix, Cholesky proof);
* ``globalbound``: GloRo's product of layer norms (estimate, or guaranteed upper bound);
* ``localbound``: Local-Lip's product of masked layer norms on an eps-ball;
* ``margins``: lower bounds of logit margins over the ball (ball, BCP ball ∩ box);
* ``empirical``: lower bounds by search, used to test the upper bounds from the other side.

Depends on torch alone: no configuration, files or datasets.
"""
from .globalbound import ESTIMATE, GUARANTEED, GlobalBound, global_bound
from .localbound import LocalBound, converged_layer_norms, local_bound
from .margins import (bottom_logit, global_margins, local_margins, margin_lower_bounds, penultimate,
                      worst_case_logits, worst_margin)
from .operators import AffineOp, network_layers
from .krylov import KrylovResult, lanczos_inflation, masked_operator_norm_krylov, steps_for_inflation
from .localbound import GUARANTEE_LEVELS
from .spectral import PowerIterationResult, masked_operator_norm, masked_operator_norm_lanczos

__all__ = [
    "AffineOp", "ESTIMATE", "GUARANTEE_LEVELS", "lanczos_inflation", "steps_for_inflation", "GUARANTEED", "GlobalBound", "KrylovResult", "LocalBound", "PowerIterationResult",
    "bottom_logit", "converged_layer_norms", "global_bound", "global_margins", "local_bound", "local_margins",
    "margin_lower_bounds", "masked_operator_norm", "masked_operator_norm_krylov", "masked_operator_norm_lanczos",
    "network_layers", "penultimate", "worst_case_logits", "worst_margin",
]
