"""Networks the bounds understand: 1-Lipschitz activations and plain ``nn.Sequential`` architectures.

The names (``locallip.foundation.catalog``) import without torch; the rest is loaded on first use.
"""
from importlib import import_module

_EXPORTS = {
    "ClippedMaxMin": "activations", "ClippedReLU": "activations", "LipschitzActivation": "activations",
    "MaxMin": "activations", "ReLU": "activations", "make_activation": "activations",
    "ARCHITECTURES": "..foundation.catalog", "ACTIVATIONS": "..foundation.catalog",
    "load_model": "checkpoint", "save_model": "checkpoint",
    "LipschitzNet": "models", "Normalize": "models", "build_model": "models", "model_from_spec": "models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        target = _EXPORTS[name]
        return getattr(import_module(target if target.startswith("..") else f".{target}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
