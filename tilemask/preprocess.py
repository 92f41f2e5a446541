"""What turns stored pixel values into the network's input.

Applied per block on the worker, before windows are cut: values become float32
and, when asked, are normalized per channel, ``(x - mean) / std``.  Padding (an
axis smaller than the roi) is added afterwards with zeros, in the normalized
space, as MONAI pads the tensor it is given.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocessing:
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def apply(self, block: np.ndarray) -> np.ndarray:
        """``(C, *spatial)`` stored values -> float32 network input."""
        data = block.astype(np.float32, copy=True)
        if self.mean is not None and self.std is not None:
            shape = (-1,) + (1,) * (data.ndim - 1)
            data -= np.asarray(self.mean, np.float32).reshape(shape)
            data /= np.asarray(self.std, np.float32).reshape(shape)
        return data
