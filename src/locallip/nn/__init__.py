"""Networks the bounds understand: 1-Lipschitz activations and plain ``nn.Sequential`` architectures."""
from .activations import (ClippedMaxMin, ClippedReLU, LipschitzActivation, MaxMin, ReLU, make_activation)
from .models import ARCHITECTURES, LipschitzNet, Normalize, build_model, model_from_spec

__all__ = ["ARCHITECTURES", "ClippedMaxMin", "ClippedReLU", "LipschitzActivation", "LipschitzNet", "MaxMin",
           "Normalize", "ReLU", "build_model", "make_activation", "model_from_spec"]
