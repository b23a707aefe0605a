"""A network as a short declarative layer list (JSON), and back: for models trained anywhere.

    {"input_shape": [1, 28, 28],
     "layers": [{"type": "conv2d", "in_channels": 1, "out_channels": 16, "kernel_size": 4, "stride": 2, "padding": 1},
                {"type": "relu"}, {"type": "flatten"},
                {"type": "linear", "in_features": 3136, "out_features": 10}]}

The weights travel separately, as a state_dict of the ``nn.Sequential`` that ``build``
makes (keys ``"<index>.weight"``, ``"<index>.bias"``, ``"<index>.theta"``...), in
safetensors or torch weights-only format: neither runs code when loaded. Only layers the
bounds understand are accepted (``SUPPORTED``); anything else is refused with a message
naming it, before any work.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch
from torch import nn

from .activations import ClippedMaxMin, ClippedReLU, MaxMin, ReLU
from .models import LipschitzNet, Normalize

SUPPORTED = ("conv2d", "linear", "flatten", "normalize", "relu", "clipped_relu", "maxmin", "clipped_maxmin")
_HINT = f"supported layers: {', '.join(SUPPORTED)} (a plain Sequential: no pooling, normalisation layers or skips)"


class UnsupportedModel(ValueError):
    """A layer or description the bounds cannot handle."""


def _conv(m: nn.Conv2d) -> dict:
    if m.groups != 1 or m.dilation != (1, 1) or m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise UnsupportedModel(f"layer Conv2d with groups={m.groups}, dilation={m.dilation}, padding={m.padding!r}, "
                               f"padding_mode={m.padding_mode!r}: only plain zero-padded Conv2d is supported")
    return {"type": "conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
            "kernel_size": list(m.kernel_size), "stride": list(m.stride), "padding": list(m.padding),
            "bias": m.bias is not None}


def describe(model: nn.Module, input_shape: Sequence[int]) -> dict:
    """The layer list of a plain ``nn.Sequential`` (``UnsupportedModel`` names any other layer)."""
    if not isinstance(model, nn.Sequential):
        raise UnsupportedModel(f"model {type(model).__name__} is not an nn.Sequential; {_HINT}")
    layers: List[dict] = []
    for i, m in enumerate(model):
        if isinstance(m, nn.Conv2d):
            layers.append(_conv(m))
        elif isinstance(m, nn.Linear):
            layers.append({"type": "linear", "in_features": m.in_features, "out_features": m.out_features,
                           "bias": m.bias is not None})
        elif isinstance(m, nn.Flatten):
            layers.append({"type": "flatten"})
        elif isinstance(m, Normalize):
            layers.append({"type": "normalize", "mean": m.mean.flatten().tolist(), "std": m.std.flatten().tolist()})
        elif isinstance(m, (nn.ReLU, ReLU)):
            layers.append({"type": "relu"})
        elif isinstance(m, (ClippedReLU, ClippedMaxMin)):
            layers.append({"type": "clipped_relu" if isinstance(m, ClippedReLU) else "clipped_maxmin",
                           "shape": list(m.shape)})
        elif isinstance(m, MaxMin):
            layers.append({"type": "maxmin"})
        else:
            raise UnsupportedModel(f"layer {i} ({type(m).__name__}) is not supported; {_HINT}")
    return {"format": "locallip-sequential-1", "input_shape": [int(s) for s in input_shape], "layers": layers}


def _int_pair(v: Any, key: str) -> tuple:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(a, int) for a in v):
        return tuple(v)
    raise UnsupportedModel(f"{key} must be an integer or a pair of integers, got {v!r}")


def _require(spec: dict, keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in spec]
    if missing:
        raise UnsupportedModel(f"{where}: missing {', '.join(missing)}")


def _layer(spec: Any, i: int) -> nn.Module:
    if not isinstance(spec, dict) or "type" not in spec:
        raise UnsupportedModel(f"layer {i} must be an object with a 'type', got {spec!r}")
    kind, where = spec["type"], f"layer {i} ({spec['type']})"
    if kind == "conv2d":
        _require(spec, ("in_channels", "out_channels", "kernel_size"), where)
        return nn.Conv2d(int(spec["in_channels"]), int(spec["out_channels"]), _int_pair(spec["kernel_size"], where),
                         stride=_int_pair(spec.get("stride", 1), where), padding=_int_pair(spec.get("padding", 0), where),
                         bias=bool(spec.get("bias", True)))
    if kind == "linear":
        _require(spec, ("in_features", "out_features"), where)
        return nn.Linear(int(spec["in_features"]), int(spec["out_features"]), bias=bool(spec.get("bias", True)))
    if kind == "normalize":
        _require(spec, ("mean", "std"), where)
        return Normalize(spec["mean"], spec["std"])
    if kind in ("clipped_relu", "clipped_maxmin"):
        _require(spec, ("shape",), where)
        return (ClippedReLU if kind == "clipped_relu" else ClippedMaxMin)(spec["shape"])
    simple = {"flatten": nn.Flatten, "relu": ReLU, "maxmin": MaxMin}
    if kind in simple:
        return simple[kind]()
    raise UnsupportedModel(f"{where} is not supported; {_HINT}")


def build(description: Dict[str, Any]) -> LipschitzNet:
    """The network a layer list describes (untrained: load its state_dict next), checked end to end."""
    if not isinstance(description, dict) or "layers" not in description or "input_shape" not in description:
        raise UnsupportedModel("an architecture description needs 'input_shape' and 'layers'")
    shape = description["input_shape"]
    if not (isinstance(shape, list) and len(shape) in (1, 3) and all(isinstance(s, int) and s > 0 for s in shape)):
        raise UnsupportedModel(f"input_shape must be [channels, height, width] (or [features]), got {shape!r}")
    modules = [_layer(spec, i) for i, spec in enumerate(description["layers"])]
    x = torch.zeros(1, *shape)
    for i, m in enumerate(modules):
        try:
            x = m(x)
        except (RuntimeError, ValueError) as e:
            raise UnsupportedModel(f"layer {i} ({description['layers'][i]['type']}) does not fit its input of shape "
                                   f"{tuple(x.shape[1:])}: {str(e).splitlines()[0]}") from None
    if x.dim() != 2:
        raise UnsupportedModel(f"the network must end with a Linear layer giving the logits, it gives shape "
                               f"{tuple(x.shape[1:])}")
    return LipschitzNet(*modules, input_shape=shape, num_classes=int(x.shape[1]), spec={"description": description})


def load_weights(net: LipschitzNet, state: Dict[str, Any]) -> LipschitzNet:
    """Load a state_dict into ``build``'s network: every parameter present, finite, of the right shape."""
    expected = weights_of(net)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnsupportedModel("the weights must be a state_dict: a mapping of names to tensors")
    # A normalize layer's mean and std are in its description: the weights need not carry them.
    state = dict(state)
    for i, m in enumerate(net):
        if isinstance(m, Normalize):
            state.setdefault(f"{i}.mean", m.mean)
            state.setdefault(f"{i}.std", m.std)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not k.startswith("power_vector"))
    if missing or unexpected:
        raise UnsupportedModel(f"the weights do not match the architecture: missing {missing or 'none'}, "
                               f"unexpected {unexpected or 'none'}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise UnsupportedModel(f"weight {k} has shape {tuple(state[k].shape)}, the architecture needs "
                                   f"{tuple(v.shape)}")
        if state[k].is_floating_point() and not torch.isfinite(state[k]).all():
            raise UnsupportedModel(f"weight {k} holds NaN or inf")
    net.load_state_dict({k: state[k] for k in expected}, strict=False)
    return net


def weights_of(net: nn.Module) -> Dict[str, torch.Tensor]:
    """The state_dict ``build`` expects: the layers' parameters, without warm-start buffers."""
    return {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items() if not k.startswith("power_vector")}
