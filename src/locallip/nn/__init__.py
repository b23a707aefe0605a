"""Networks the bounds understand: 1-Lipschitz activations and plain ``nn.Sequential`` architectures.

``catalog`` (names only) imports without torch; the rest is loaded on first use.
"""
from importlib import import_module

_EXPORTS = {
    "ClippedMaxMin": "activations", "ClippedReLU": "activations", "LipschitzActivation": "activations",
    "MaxMin": "activations", "ReLU": "activations", "make_activation": "activations",
    "ARCHITECTURES": "catalog", "ACTIVATIONS": "catalog",
    "LipschitzNet": "models", "Normalize": "models", "build_model": "models", "model_from_spec": "models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
