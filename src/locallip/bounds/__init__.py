"""Lipschitz bounds of the penultimate features of a plain ``nn.Sequential``, and margins built on them.

* ``layers``: the layer protocol (each layer type owns its products, boxes, norms and explicit
  matrix; activations their intervals and masks) and the one registry of layer types;
* ``operators``: masked operators built on the layers;
* ``settings``: ``NormSettings``, how the masked layer norms are computed, and the radius check;
* ``spectral``: batched spectral-norm estimates from below (power iteration, restarted Lanczos);
* ``krylov``: plain Lanczos for a fixed number of steps and its probabilistic guarantee;
* ``exact``: deterministic bounds of masked norms (explicit Gram matrix, Cholesky proof);
* ``globalbound``: GloRo's product of layer norms (estimate, or guaranteed upper bound);
* ``localbound``: Local-Lip's product of masked layer norms on an eps-ball, and the box bound
  (the same boxes with the guaranteed global norms);
* ``margins``: lower bounds of logit margins over the ball (ball, BCP ball ∩ box);
* ``empirical``: lower bounds by search, used to test the upper bounds from the other side.

Depends on torch alone: no configuration, files or datasets.
"""
from .globalbound import ESTIMATE, GUARANTEED, GlobalBound, global_bound, top_singular_vectors
from .krylov import KrylovResult, lanczos_inflation, lanczos_norm, steps_for_inflation
from .clean import CleanPass, check_input, clean_pass
from .layers import AffineLayer, LayerType, register_layer
from .localbound import GUARANTEE_LEVELS, LocalBound, box_bound, converged_layer_norms, local_bound
from .margins import (bottom_logit, global_margins, local_margins, logit_weights, margin_lower_bounds, penultimate,
                      worst_case_logits, worst_margin)
from .operators import AffineOp, network_layers
from .settings import LEVELS, MASKED_NORMS, NormSettings, as_batch_radius
from .spectral import NormEstimate, power_iteration_norm, restarted_lanczos_norm

__all__ = [
    "AffineLayer", "AffineOp", "CleanPass", "ESTIMATE", "GUARANTEE_LEVELS", "GUARANTEED", "GlobalBound",
    "KrylovResult", "LEVELS", "LayerType", "LocalBound", "MASKED_NORMS", "NormEstimate", "NormSettings",
    "as_batch_radius", "bottom_logit", "box_bound", "check_input", "clean_pass", "converged_layer_norms",
    "global_bound", "global_margins", "lanczos_inflation", "lanczos_norm", "local_bound", "local_margins",
    "logit_weights", "margin_lower_bounds", "network_layers", "penultimate", "power_iteration_norm",
    "register_layer", "restarted_lanczos_norm", "steps_for_inflation", "top_singular_vectors",
    "worst_case_logits", "worst_margin",
]
