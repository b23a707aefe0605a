"""What a dataset loader returns: the source pool(s) before splitting."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np


@dataclass
class Raw:
    """What a loader returns: the source pool(s) before splitting."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: Optional[np.ndarray]
    test_y: Optional[np.ndarray]
    source: str
    class_names: Optional[List[str]]
