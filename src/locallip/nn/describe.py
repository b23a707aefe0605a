"""A network as a short declarative layer list (JSON), and back: for models trained anywhere.

    {"input_shape": [1, 28, 28],
     "layers": [{"type": "conv2d", "in_channels": 1, "out_channels": 16, "kernel_size": 4, "stride": 2, "padding": 1},
                {"type": "relu"},
                {"type": "residual_conv2d", "channels": 16, "kernel_size": 3},  # y = x + conv(x)
                {"type": "relu"}, {"type": "flatten"},
                {"type": "linear", "in_features": 3136, "out_features": 10}]}

The weights travel separately, as a state_dict of the ``nn.Sequential`` that ``build``
makes (keys ``"<index>.weight"``, ``"<index>.bias"``, ``"<index>.theta"``...), in
safetensors or torch weights-only format: neither runs code when loaded. Only layers the
bounds understand are accepted (``SUPPORTED``); anything else is refused with a message
naming it, before any work.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from .activations import ClippedMaxMin, ClippedReLU, MaxMin, ReLU
from .blocks import ResidualConv2d
from .models import LipschitzNet, Normalize, pooling_problem
from .shapes import output_shape

FORMAT = "locallip-sequential-1"
SUPPORTED = ("conv2d", "residual_conv2d", "linear", "flatten", "normalize", "relu", "clipped_relu", "maxmin",
             "clipped_maxmin", "batchnorm2d", "batchnorm1d", "avgpool2d")
_HINT = (f"supported layers: {', '.join(SUPPORTED)} (a plain Sequential: no max pooling, and skips only as "
         f"residual_conv2d blocks; a batchnorm right after a conv2d or linear layer, in eval mode)")


class UnsupportedModel(ValueError):
    """A layer or description the bounds cannot handle."""


def _conv(m: nn.Conv2d) -> dict:
    if m.groups != 1 or m.dilation != (1, 1) or m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise UnsupportedModel(f"layer Conv2d with groups={m.groups}, dilation={m.dilation}, padding={m.padding!r}, "
                               f"padding_mode={m.padding_mode!r}: only plain zero-padded Conv2d is supported")
    return {"type": "conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
            "kernel_size": list(m.kernel_size), "stride": list(m.stride), "padding": list(m.padding),
            "bias": m.bias is not None}


def _batchnorm(m: nn.Module) -> dict:
    kind = "batchnorm2d" if isinstance(m, nn.BatchNorm2d) else "batchnorm1d"
    if not m.track_running_stats or m.running_mean is None:
        raise UnsupportedModel(f"layer {kind} without running statistics (track_running_stats=False) normalises "
                               f"with each batch's own: it is no fixed map to certify")
    # The running statistics and the affine parameters travel in the weights file.
    return {"type": kind, "num_features": m.num_features, "eps": float(m.eps), "affine": m.affine}


def _avgpool(m: nn.AvgPool2d) -> dict:
    if pooling_problem(m):
        raise UnsupportedModel(f"layer {pooling_problem(m)}")
    pair = (lambda v: list(v) if isinstance(v, (tuple, list)) else [int(v), int(v)])
    return {"type": "avgpool2d", "kernel_size": pair(m.kernel_size),
            "stride": pair(m.kernel_size if m.stride is None else m.stride), "padding": pair(m.padding)}


def describe(model: nn.Module, input_shape: Sequence[int]) -> dict:
    """The layer list of a plain ``nn.Sequential`` (``UnsupportedModel`` names any other layer)."""
    if not isinstance(model, nn.Sequential):
        raise UnsupportedModel(f"model {type(model).__name__} is not an nn.Sequential; {_HINT}")
    layers: List[dict] = []
    for i, m in enumerate(model):
        if isinstance(m, nn.Conv2d):
            layers.append(_conv(m))
        elif isinstance(m, ResidualConv2d):
            layers.append({"type": "residual_conv2d", "channels": m.channels, "kernel_size": m.kernel_size,
                           "bias": m.conv.bias is not None})
        elif isinstance(m, nn.Linear):
            layers.append({"type": "linear", "in_features": m.in_features, "out_features": m.out_features,
                           "bias": m.bias is not None})
        elif isinstance(m, nn.Flatten):
            layers.append({"type": "flatten"})
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            layers.append(_batchnorm(m))
        elif isinstance(m, nn.AvgPool2d):
            layers.append(_avgpool(m))
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
    return {"format": FORMAT, "input_shape": [int(s) for s in input_shape], "layers": layers}


#: Sizes beyond these are refused before anything is allocated (a 269-byte description could
#: otherwise ask for gigabytes): per layer dimension, per point's activations, and in all.
MAX_SIZE = 1 << 24
MAX_ACTIVATIONS = 1 << 28
MAX_PARAMETERS = 1 << 28
MAX_LAYERS = 1000
MAX_DESCRIPTION_BYTES = 1 << 22


def _int(spec: dict, key: str, where: str, low: int = 1, default: Any = None) -> int:
    v = spec.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= MAX_SIZE:
        raise UnsupportedModel(f"{where}: {key} must be an integer in [{low}, {MAX_SIZE}], got {_short(v)}")
    return v


def _int_pair(spec: dict, key: str, where: str, low: int = 1, default: Any = None) -> tuple:
    v = spec.get(key, default)
    pair = [v, v] if isinstance(v, int) and not isinstance(v, bool) else v
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
        raise UnsupportedModel(f"{where}: {key} must be an integer or a pair of integers, got {_short(v)}")
    return tuple(_int({key: a}, key, where, low) for a in pair)


def _floats(spec: dict, key: str, where: str) -> list:
    v = spec.get(key)
    if not (isinstance(v, list) and 0 < len(v) <= MAX_SIZE and all(
            isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in v)):
        raise UnsupportedModel(f"{where}: {key} must be a non-empty list of finite numbers, got {_short(v)}")
    return [float(a) for a in v]


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _require(spec: dict, keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in spec]
    if missing:
        raise UnsupportedModel(f"{where}: missing {', '.join(missing)}")


def _bias(spec: dict, where: str) -> bool:
    if not isinstance(spec.get("bias", True), bool):
        raise UnsupportedModel(f"{where}: bias must be true or false, got {_short(spec['bias'])}")
    return spec.get("bias", True)


def _layer(spec: Any, i: int) -> nn.Module:
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise UnsupportedModel(f"layer {i} must be an object with a 'type' string, got {_short(spec)}")
    kind = spec["type"]
    where = f"layer {i} ({kind[:40]})"
    if kind == "conv2d":
        _require(spec, ("in_channels", "out_channels", "kernel_size"), where)
        return nn.Conv2d(_int(spec, "in_channels", where), _int(spec, "out_channels", where),
                         _int_pair(spec, "kernel_size", where), stride=_int_pair(spec, "stride", where, default=1),
                         padding=_int_pair(spec, "padding", where, low=0, default=0), bias=_bias(spec, where))
    if kind == "residual_conv2d":
        _require(spec, ("channels", "kernel_size"), where)
        k = _int(spec, "kernel_size", where)
        if k % 2 != 1:
            raise UnsupportedModel(f"{where}: kernel_size must be odd (same padding), got {k}")
        return ResidualConv2d(_int(spec, "channels", where), k, bias=_bias(spec, where))
    if kind == "linear":
        _require(spec, ("in_features", "out_features"), where)
        return nn.Linear(_int(spec, "in_features", where), _int(spec, "out_features", where), bias=_bias(spec, where))
    if kind == "normalize":
        _require(spec, ("mean", "std"), where)
        mean, std = _floats(spec, "mean", where), _floats(spec, "std", where)
        if len(mean) != len(std) or min(std) <= 0:
            raise UnsupportedModel(f"{where}: mean and std need one value per channel each, and std > 0")
        return Normalize(mean, std)
    if kind in ("clipped_relu", "clipped_maxmin"):
        _require(spec, ("shape",), where)
        shape = spec["shape"]
        if not (isinstance(shape, (list, tuple)) and shape and len(shape) <= 3):
            raise UnsupportedModel(f"{where}: shape must be a list of 1 to 3 sizes, got {_short(shape)}")
        shape = [_int({"shape": a}, "shape", where) for a in shape]
        if kind == "clipped_maxmin" and shape[0] % 2:
            raise UnsupportedModel(f"{where}: shape[0] must be even (channels are paired), got {shape[0]}")
        return (ClippedReLU if kind == "clipped_relu" else ClippedMaxMin)(shape)
    if kind in ("batchnorm2d", "batchnorm1d"):
        _require(spec, ("num_features",), where)
        eps = spec.get("eps", 1e-5)
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps <= 1):
            raise UnsupportedModel(f"{where}: eps must be a number in (0, 1], got {_short(eps)}")
        if not isinstance(spec.get("affine", True), bool):
            raise UnsupportedModel(f"{where}: affine must be true or false, got {_short(spec['affine'])}")
        bn = nn.BatchNorm2d if kind == "batchnorm2d" else nn.BatchNorm1d
        return bn(_int(spec, "num_features", where), eps=float(eps), affine=spec.get("affine", True))
    if kind == "avgpool2d":
        _require(spec, ("kernel_size",), where)
        kernel = _int_pair(spec, "kernel_size", where)
        return nn.AvgPool2d(kernel, stride=_int_pair(spec, "stride", where, default=list(kernel)),
                            padding=_int_pair(spec, "padding", where, low=0, default=0))
    simple = {"flatten": nn.Flatten, "relu": ReLU, "maxmin": MaxMin}
    if kind in simple:
        return simple[kind]()
    raise UnsupportedModel(f"{where} is not supported; {_HINT}")


def _checked_shape(description: Any) -> list:
    """The description's outline (an object with a known format, an input shape, a list of layers)."""
    if not isinstance(description, dict) or "layers" not in description or "input_shape" not in description:
        raise UnsupportedModel("an architecture description needs 'input_shape' and 'layers'")
    if description.get("format", FORMAT) != FORMAT:
        raise UnsupportedModel(f"format must be {FORMAT!r}, got {_short(description['format'])}")
    shape = description["input_shape"]
    if not (isinstance(shape, list) and len(shape) in (1, 3) and all(
            isinstance(s, int) and not isinstance(s, bool) and 0 < s <= MAX_SIZE for s in shape)):
        raise UnsupportedModel(f"input_shape must be [channels, height, width] (or [features]), got {_short(shape)}")
    layers = description["layers"]
    if not isinstance(layers, list) or not 0 < len(layers) <= MAX_LAYERS:
        raise UnsupportedModel(f"layers must be a list of 1 to {MAX_LAYERS} layer objects, got {_short(layers)}")
    return shape


def outline(description: Dict[str, Any]) -> tuple:
    """The layers built on the meta device (no memory), each checked against its input's shape,
    sizes within the limits. Returns ({name: shape} of the weights, classes)."""
    shape = tuple(_checked_shape(description))
    with torch.device("meta"):
        # eval mode: what is certified, and a batchnorm takes a batch of one point
        modules = [_layer(spec, i).eval() for i, spec in enumerate(description["layers"])]
    for i, m in enumerate(modules):
        where = f"layer {i} ({description['layers'][i]['type']})"
        if isinstance(m, Normalize) and (len(shape) != 3 or m.mean.numel() != shape[0]):
            raise UnsupportedModel(f"{where} has {m.mean.numel()} channel(s), its input of shape "
                                   f"{shape} has {shape[0] if len(shape) == 3 else 'no'} channels")
        try:
            shape = _shape_after(m, shape)
        except (RuntimeError, ValueError) as e:
            raise UnsupportedModel(f"{where} does not fit its input of shape {shape}: "
                                   f"{str(e).splitlines()[0]}") from None
        if math.prod(shape) > MAX_ACTIVATIONS:
            raise UnsupportedModel(f"{where} gives {math.prod(shape):,} values per point (the limit is "
                                   f"{MAX_ACTIVATIONS:,})")
    if len(shape) != 1:
        raise UnsupportedModel(f"the network must end with a Linear layer giving the logits, it gives shape {shape}")
    weights = {k: tuple(v.shape) for k, v in nn.Sequential(*modules).state_dict().items()}
    total = sum(math.prod(s) for s in weights.values())
    if total > MAX_PARAMETERS:
        raise UnsupportedModel(f"the architecture declares {total:,} parameters (the limit is {MAX_PARAMETERS:,})")
    return weights, int(shape[0])


def _shape_after(m: nn.Module, shape: tuple) -> tuple:
    """By formula where ``shapes`` has one (fast), else by running ``m`` on a meta input."""
    known = output_shape(m, shape)
    if known is not None:
        return tuple(known)
    return tuple(m(torch.zeros(1, *shape, device="meta")).shape[1:])


def read_description(path: Any) -> dict:
    """A layer list from a JSON file; UnsupportedModel naming the file if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"architecture description not found: {path}")
    if path.stat().st_size > MAX_DESCRIPTION_BYTES:
        raise UnsupportedModel(f"{path} is {path.stat().st_size:,} bytes: too large for a layer list")
    def refuse(token: str):
        raise UnsupportedModel(f"{path} holds {token}")

    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)
    except UnicodeDecodeError:
        raise UnsupportedModel(f"{path} is not a text file (a JSON layer list is expected)") from None
    except json.JSONDecodeError as e:
        raise UnsupportedModel(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise UnsupportedModel(f"{path} is nested too deeply to be a layer list") from None


def build(description: Dict[str, Any], state: Optional[Dict[str, Any]] = None) -> LipschitzNet:
    """The network a layer list describes (untrained: load its state_dict next), checked end to end.

    With ``state``, its names, types and shapes are compared with the description's first: nothing
    is allocated for a description the weights do not fit.
    """
    weights, classes = outline(description)
    if state is not None:
        check_state(weights, state)
    modules = [_layer(spec, i) for i, spec in enumerate(description["layers"])]
    return LipschitzNet(*modules, input_shape=description["input_shape"], num_classes=classes,
                        spec={"description": description})


def real_tensor(k: str, v: Any) -> None:
    """A tensor that holds ordinary real numbers (a bool, complex, sparse, meta or quantized one would be
    cast, or fail, silently or deep inside)."""
    if type(v) not in (torch.Tensor, nn.Parameter):
        raise UnsupportedModel(f"weight {k} is a {type(v).__name__}, not a tensor")
    problem = ("holds no data (a meta tensor)" if v.is_meta else
               f"is a sparse tensor ({v.layout})" if v.layout != torch.strided else
               "is quantized" if v.is_quantized else
               f"is complex ({v.dtype})" if v.is_complex() else
               f"is {v.dtype}, not floating point" if not v.is_floating_point() else None)
    if problem:
        raise UnsupportedModel(f"weight {k} {problem}; weights must be real floating-point tensors")


def check_state(expected: Dict[str, tuple], state: Any) -> Dict[str, Any]:
    """``state`` against the expected names and shapes; the names the network loads."""
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise UnsupportedModel("the weights must be a state_dict: a mapping of names to tensors")
    # A normalize layer's mean and std are in its description: the weights need not carry them; a
    # batchnorm's batch counter plays no part in eval mode (read if present, never needed).
    needed = {k for k in expected if (not k.endswith((".mean", ".std")) or k in state)
              and not k.endswith(".num_batches_tracked")}
    missing = sorted(needed - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not k.startswith("power_vector"))
    if missing or unexpected:
        raise UnsupportedModel(f"the weights do not match the architecture: missing {missing or 'none'}, "
                               f"unexpected {unexpected or 'none'}")
    for k in sorted(needed):
        real_tensor(k, state[k])
        if tuple(state[k].shape) != tuple(expected[k]):
            raise UnsupportedModel(f"weight {k} has shape {tuple(state[k].shape)}, the architecture needs "
                                   f"{tuple(expected[k])}")
    return {k: state[k] for k in needed}


def load_weights(net: LipschitzNet, state: Dict[str, Any]) -> LipschitzNet:
    """Load a state_dict into ``build``'s network: every parameter present, real, of the right shape, and
    finite in the network's own precision (1e300 in float64 is inf in float32)."""
    expected = weights_of(net)
    given = check_state({k: tuple(v.shape) for k, v in expected.items()}, state)
    cast = {}
    for k, v in given.items():
        cast[k] = v.detach().to(dtype=expected[k].dtype, device="cpu")
        if not torch.isfinite(cast[k]).all():
            raise UnsupportedModel(f"weight {k} holds NaN or inf" + (
                "" if v.dtype == expected[k].dtype else f" once converted from {v.dtype} to {expected[k].dtype}"))
    net.load_state_dict(cast, strict=False)
    return net


def weights_of(net: nn.Module) -> Dict[str, torch.Tensor]:
    """The state_dict ``build`` expects: the layers' parameters, without warm-start buffers."""
    return {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items() if not k.startswith("power_vector")}
