"""The one registry of layer types the bounds understand, and the split of a network into them.

Each entry says what a module type is for the bounds (its ``role``) and how to make its bound
object:

* ``affine``: ``make(module, in_shape, norm, flatten) -> AffineLayer`` (``norm``: a folded leading
  ``Normalize``; ``flatten``: a ``Flatten`` just before it);
* ``activation``: ``make(module) -> ActivationBounds`` (an object with ``interval`` and ``masks``);
* ``normalize`` / ``flatten``: folded into the next affine layer (``make`` is None).

Adding a layer type is writing its bound object and one ``register_layer`` call. Lookups
follow the class hierarchy, so a subclass of a registered module is accepted as its base.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn

from .base import AffineLayer
from .composed import ComposedLayer

ROLES = ("affine", "activation", "normalize", "flatten")


@dataclass(frozen=True)
class LayerType:
    """One module type the bounds understand."""

    name: str  # the name in layer lists (``describe``'s JSON)
    module: type  # the nn.Module class
    role: str  # one of ROLES
    make: Optional[Callable] = None  # builds the bound object (see the module docstring)
    #: ``module -> dict`` of its settings for a layer list, and ``dict -> module`` back (None: no settings)
    to_json: Optional[Callable] = None
    from_json: Optional[Callable] = None


_REGISTRY: Dict[type, LayerType] = {}


def register_layer(kind: LayerType) -> LayerType:
    """Make ``kind.module`` known to the bounds (and to layer lists); returns ``kind``."""
    if kind.role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {kind.role!r}")
    if kind.role in ("affine", "activation") and kind.make is None:
        raise ValueError(f"an {kind.role} layer type needs a make function")
    taken = [k for k in _REGISTRY.values() if k.name == kind.name and k.module is not kind.module]
    if taken:
        raise ValueError(f"layer type name {kind.name!r} is already registered for {taken[0].module.__name__}")
    _REGISTRY[kind.module] = kind
    return kind


def layer_type(module: nn.Module) -> Optional[LayerType]:
    """The registered type of ``module`` (by its class, then its base classes), or None."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def layer_type_named(name: str) -> Optional[LayerType]:
    return next((k for k in _REGISTRY.values() if k.name == name), None)


def registered_names() -> List[str]:
    return [k.name for k in _REGISTRY.values()]


def affine_layer(module: nn.Module, in_shape: Sequence[int], norm=None, flatten: bool = False) -> AffineLayer:
    """The bound object of one affine module on inputs of ``in_shape``."""
    kind = layer_type(module)
    if kind is None or kind.role != "affine":
        raise TypeError(f"unsupported layer {type(module).__name__}")
    return kind.make(module, tuple(in_shape), norm, flatten)


def is_affine(module: nn.Module) -> bool:
    kind = layer_type(module)
    return kind is not None and kind.role == "affine"


def is_activation(module: nn.Module) -> bool:
    kind = layer_type(module)
    return kind is not None and kind.role == "activation"


def network_layers(model: nn.Sequential, input_shape: Optional[Sequence[int]] = None
                   ) -> Tuple[List[AffineLayer], List]:
    """Split a Sequential into affine layers and the activations between them.

    Returns ``(ops, acts)`` with ``len(acts) == len(ops) - 1``: act l follows op l,
    and the last op gives the logits.
    """
    shape = tuple(input_shape or getattr(model, "input_shape", ()))
    if not shape:
        raise ValueError("the input shape is unknown: pass input_shape=(C, H, W) (or (features,)), "
                         "or give the model an input_shape attribute")
    ops: List[AffineLayer] = []
    acts: List = []
    norm, flatten, expect_op = None, False, True
    for m in model:
        kind = layer_type(m)
        role = None if kind is None else kind.role
        if role == "normalize":
            if ops or norm is not None:
                raise ValueError("Normalize is only supported as the first module")
            norm = m
        elif role == "flatten":
            flatten = True
        elif role == "affine":
            op = kind.make(m, shape, norm, flatten)
            if not expect_op:
                # A layer without weights of its own (pooling) joins its neighbour into one operator.
                if not (getattr(ops[-1], "joins_neighbours", False) or getattr(op, "joins_neighbours", False)):
                    raise ValueError("two affine layers in a row: put an activation between them")
                op = ComposedLayer(ops.pop(), op)
            ops.append(op)
            shape = tuple(op.out_shape)
            norm, flatten, expect_op = None, False, False
        elif role == "activation":
            if expect_op:
                raise ValueError(f"activation {type(m).__name__} must follow an affine layer")
            if getattr(ops[-1], "joins_neighbours", False):  # nothing with weights to join: no dtype, no norm to mask
                raise ValueError(f"{type(ops[-1].owner).__name__} must sit next to a Conv2d or Linear layer (nothing "
                                 f"but Flatten between), not between two activations")
            acts.append(kind.make(m))
            expect_op = True
        else:
            fold = ("; fold it into the layer before it first: locallip.nn.fold.fold_batchnorm"
                    if "BatchNorm" in type(m).__name__ else "")
            raise ValueError(f"unsupported module {type(m).__name__}: the bounds handle "
                             f"{', '.join(registered_names())} (registered layer types; see docs/extending.md){fold}")
    if not ops or expect_op or not ops[-1].gives_logits:
        raise ValueError("the model must end with a Linear layer giving the logits")
    return ops, acts
