"""The architectures and activations by name: plain data, no torch (configuration reads it too)."""
from __future__ import annotations

from typing import Dict, List, Tuple

# (out_channels, kernel, stride, padding) per conv layer; dense widths before the logits.
# ``nCmF`` is n convolutions then m dense layers (the last dense layer gives the logits).
ARCHITECTURES: Dict[str, Tuple[List[Tuple[int, int, int, int]], List[int]]] = {
    "2c2f": ([(16, 4, 2, 1), (32, 4, 2, 1)], [100]),
    "4c3f": ([(32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 4, 2, 1)], [512, 512]),
    "6c2f": ([(32, 3, 1, 1), (32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 3, 1, 1), (64, 4, 2, 1)], [512]),
    "8c2f": ([(64, 3, 1, 1), (64, 3, 1, 1), (64, 4, 2, 1), (128, 3, 1, 1), (128, 3, 1, 1), (128, 4, 2, 1),
              (256, 3, 1, 1), (256, 4, 2, 1)], [512]),
}

#: Activations ``make_activation`` builds; the clipped ones have learnable thresholds.
ACTIVATIONS: Tuple[str, ...] = ("relu", "clipped_relu", "maxmin", "clipped_maxmin")
