"""The layer protocol (``base``), the layer types the bounds understand, and their one registry.

Registered here: ``Linear`` (``dense``), ``Conv2d`` (``conv``), the residual block
``ResidualConv2d`` (``residual``: the operator I + W), ``AvgPool2d`` (``pooling``; it joins
the affine layer next to it into one, ``composed``), the activations of
``locallip.nn.activations`` and ``torch.nn.ReLU`` (``activation``), and ``Normalize`` / ``Flatten``
(folded into the next affine layer). A new layer type registers itself the same way
(docs/extending.md).
"""
from torch import nn

from ...nn.activations import ClippedMaxMin, ClippedReLU, LipschitzActivation, MaxMin, ReLU
from ...nn.blocks import ResidualConv2d
from ...nn.models import Normalize
from .activation import TorchReLUBounds, itself
from .base import ActivationBounds, AffineLayer
from .composed import ComposedLayer
from .conv import ConvLayer
from .dense import DenseLayer
from .pooling import AvgPoolLayer, avgpool_layer
from .residual import ResidualConvLayer
from .registry import (LayerType, affine_layer, is_activation, is_affine, layer_type, layer_type_named, network_layers,
                       register_layer, registered_names)

for _kind in (
    LayerType("conv2d", nn.Conv2d, "affine", ConvLayer),
    LayerType("linear", nn.Linear, "affine", DenseLayer),
    LayerType("avgpool2d", nn.AvgPool2d, "affine", avgpool_layer),
    LayerType("residual_conv2d", ResidualConv2d, "affine", ResidualConvLayer),
    LayerType("flatten", nn.Flatten, "flatten"),
    LayerType("normalize", Normalize, "normalize"),
    LayerType("relu", ReLU, "activation", itself),
    LayerType("torch_relu", nn.ReLU, "activation", TorchReLUBounds),
    LayerType("clipped_relu", ClippedReLU, "activation", itself),
    LayerType("maxmin", MaxMin, "activation", itself),
    LayerType("clipped_maxmin", ClippedMaxMin, "activation", itself),
    # Any other 1-Lipschitz activation of locallip's base class answers for itself too.
    LayerType("lipschitz_activation", LipschitzActivation, "activation", itself),
):
    register_layer(_kind)

__all__ = ["ActivationBounds", "AffineLayer", "AvgPoolLayer", "ComposedLayer", "ConvLayer", "DenseLayer", "LayerType",
           "ResidualConvLayer", "TorchReLUBounds", "affine_layer", "is_activation", "is_affine", "layer_type",
           "layer_type_named", "network_layers", "register_layer", "registered_names"]
