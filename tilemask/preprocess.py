"""What turns stored pixel values into the network's input.

Applied per block on the worker, after the block is read (on the model grid when
the input is resampled, :mod:`tilemask.spatial`) and before windows are cut, in
MONAI's order: values become float32, ``ScaleIntensityRange`` (``intensity``),
then ``NormalizeIntensity`` (``(x - mean) / std``, per channel or over all of
them, only the nonzero voxels with ``nonzero``).  The z-score's mean and
standard deviation are the whole volume's: :func:`moments` gives one block's,
:func:`combine` joins them (the engine runs that reduction before predicting),
and :meth:`Preprocessing.with_statistics` fixes them.  Padding (an axis smaller
than the roi) is added afterwards with zeros, in the normalized space, as MONAI
pads the tensor it is given.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Intensity:
    """``ScaleIntensityRange(a_min, a_max, b_min, b_max, clip)``."""

    a_min: float
    a_max: float
    b_min: float | None = None
    b_max: float | None = None
    clip: bool = False

    def apply(self, data: np.ndarray) -> np.ndarray:
        data -= np.float32(self.a_min)
        data /= np.float32(self.a_max - self.a_min)
        if self.b_min is not None and self.b_max is not None:
            data *= np.float32(self.b_max - self.b_min)
            data += np.float32(self.b_min)
            if self.clip:
                np.clip(data, self.b_min, self.b_max, out=data)
        return data


@dataclass(frozen=True)
class Preprocessing:
    intensity: Intensity | None = None
    mean: tuple[float, ...] | None = None  # per channel, or one value for all channels
    std: tuple[float, ...] | None = None
    zscore: bool = False  # mean and std are the volume's (:meth:`with_statistics`)
    nonzero: bool | str = False  # only nonzero voxels are counted and normalized; "any": nonzero in some channel
    channel_wise: bool = False  # z-score statistics per channel

    @property
    def needs_statistics(self) -> bool:
        return self.zscore and self.mean is None

    def with_statistics(self, mean: tuple[float, ...], std: tuple[float, ...]) -> Preprocessing:
        """The z-score fixed: a zero standard deviation divides by 1, as MONAI."""
        return replace(self, mean=tuple(map(float, mean)), std=tuple(float(s) if s > 0 else 1.0 for s in std))

    def scaled(self, block: np.ndarray) -> np.ndarray:
        """``(C, *spatial)`` stored values -> float32 after ``intensity`` (what the z-score is measured on)."""
        data = block.astype(np.float32, copy=True)
        return self.intensity.apply(data) if self.intensity else data

    def apply(self, block: np.ndarray) -> np.ndarray:
        """``(C, *spatial)`` stored values -> float32 network input."""
        if self.needs_statistics:
            raise RuntimeError("the z-score's statistics were not computed")  # the engine computes them first
        data = self.scaled(block)
        if self.mean is not None and self.std is not None:
            shape = (-1,) + (1,) * (data.ndim - 1)
            mean = np.asarray(self.mean, np.float32).reshape(shape)
            std = np.asarray(self.std, np.float32).reshape(shape)
            if self.nonzero:
                mask = nonzero_mask(data, self.nonzero)
                data = np.where(mask, (data - mean) / std, data).astype(np.float32, copy=False)
            else:
                data -= mean
                data /= std
        return data


Moments = np.ndarray
"""``(groups, 3)`` float64: count, mean and sum of squared deviations per channel (or one group for all)."""


def nonzero_mask(data: np.ndarray, nonzero: bool | str) -> np.ndarray:
    """Where ``data`` (``(C, *spatial)``) is normalized with ``nonzero``: each channel's nonzero voxels (True, MONAI's
    ``NormalizeIntensity(nonzero=True)``), or every channel's voxels nonzero in some channel (``"any"``, nnU-Net's
    ``use_mask_for_norm``: ``crop_to_nonzero``'s mask, without its holes filled)."""
    nonzero_ = data != 0
    return np.broadcast_to(nonzero_.any(axis=0), data.shape) if nonzero == "any" else nonzero_


def moments(data: np.ndarray, nonzero: bool | str, channel_wise: bool, valid: np.ndarray | None = None) -> Moments:
    """One block's moments (``data``: ``(C, *spatial)`` after :meth:`Preprocessing.scaled`), over its ``valid``
    voxels (None: all), and only the values of :func:`nonzero_mask` with ``nonzero``."""
    mask = nonzero_mask(data, nonzero) if nonzero else np.ones(data.shape, bool)
    groups = list(zip(data, mask)) if channel_wise else [(data, mask)]
    rows = []
    for values, keep in groups:
        keep = keep.copy()
        if valid is not None:
            keep &= np.broadcast_to(valid, values.shape)
        values = values[keep].astype(np.float64)
        mean = float(values.mean()) if values.size else 0.0
        rows.append((values.size, mean, float(((values - mean) ** 2).sum())))
    return np.asarray(rows, dtype=np.float64)


def combine(parts: list[Moments]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and (population) standard deviation of the union of blocks (Chan et al.'s pairwise update)."""
    total = parts[0].copy()
    for part in parts[1:]:
        for row, (n, mean, m2) in zip(total, part):
            count = row[0] + n
            if count == 0:
                continue
            delta = mean - row[1]
            row[2] += m2 + delta * delta * row[0] * n / count
            row[1] += delta * n / count
            row[0] = count
    std = np.sqrt(np.where(total[:, 0] > 0, total[:, 2] / np.maximum(total[:, 0], 1), 0.0))
    return tuple(total[:, 1]), tuple(std)
