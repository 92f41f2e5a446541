"""Overlap-add of weighted partial sums, normalization, activation and labels.

An output voxel is ``sum_w(w * pred) / sum_w(w)`` over the windows covering it
(MONAI's blending).  Each inference block returns the two sums over its own
region (:class:`Partial`); a chunk adds the parts of its neighbours' partials
that fall inside it, divides, then applies the activation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy.special import softmax

from .geometry import Region, intersect, local_slices, region_shape

logger = logging.getLogger(__name__)


@dataclass
class Partial:
    """Weighted sums of one block's windows over ``region`` (image coordinates)."""

    region: Region
    weighted: np.ndarray  # (C, *region) sum of w * prediction
    weights: np.ndarray  # (*region) sum of w
    valid: np.ndarray | None = None  # (*region) input validity, None when every pixel is valid

    @property
    def origin(self) -> tuple[int, ...]:
        return tuple(lo for lo, _ in self.region)


def cut(partial: Partial, regions: dict[tuple[int, ...], Region]) -> dict[tuple[int, ...], Partial]:
    """The parts of ``partial`` inside each of ``regions`` (copies, so the whole partial can be freed)."""
    pieces = {}
    for key, region in regions.items():
        common = intersect(region, partial.region)
        if common is None:
            continue
        src = local_slices(common, partial.origin)
        pieces[key] = Partial(
            region=common,
            weighted=partial.weighted[(slice(None), *src)].copy(),
            weights=partial.weights[src].copy(),
            valid=None if partial.valid is None else partial.valid[src].copy(),
        )
    return pieces


def overlap_add(chunk: Region, partials: Iterable[Partial]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The sums of all partials over ``chunk``, and the chunk's input validity (None: all valid)."""
    weighted = weights = valid = None
    chunk_origin = tuple(lo for lo, _ in chunk)
    for part in partials:
        common = intersect(chunk, part.region)
        if common is None:
            continue
        if weighted is None:
            weighted = np.zeros((part.weighted.shape[0], *region_shape(chunk)), np.float32)
            weights = np.zeros(region_shape(chunk), np.float32)
        dst = local_slices(common, chunk_origin)
        src = local_slices(common, part.origin)
        weighted[(slice(None), *dst)] += part.weighted[(slice(None), *src)]
        weights[dst] += part.weights[src]
        if part.valid is not None:
            if valid is None:
                valid = np.zeros(region_shape(chunk), bool)
            valid[dst] = part.valid[src]
    if weighted is None:
        raise ValueError(f"no partial covers chunk {chunk}")
    return weighted, weights, valid


def blend(chunk: Region, partials: Iterable[Partial]) -> tuple[np.ndarray, np.ndarray | None]:
    """Blended network output over ``chunk``, ``sum(w * pred) / sum(w)``, and its input validity."""
    weighted, weights, valid = overlap_add(chunk, partials)
    weighted /= weights
    return weighted, valid


def activate(blended: np.ndarray, activation: str) -> np.ndarray:
    if activation == "softmax":
        return softmax(blended, axis=0).astype(np.float32, copy=False)
    if activation == "sigmoid":
        return (1.0 / (1.0 + np.exp(-blended))).astype(np.float32, copy=False)
    return blended


def labels_from_sums(
    weighted: np.ndarray, weights: np.ndarray, activation: str, threshold: float, dtype: np.dtype
) -> np.ndarray:
    """Labels straight from the sums, when no probabilities are written.

    ``sum(w) > 0`` scales every channel of a pixel alike and softmax is monotonic,
    so ``argmax`` of the sums is ``argmax`` of the probabilities; for a sigmoid,
    ``sigmoid(z) >= t`` is ``z >= logit(t)``, i.e. ``sum(w*z) >= logit(t) * sum(w)``.
    This skips a division and an exponential per voxel and channel.
    """
    if activation == "sigmoid":
        return (weighted[0] >= np.float32(np.log(threshold / (1.0 - threshold))) * weights).astype(dtype)
    return np.argmax(weighted, axis=0).astype(dtype)


def to_labels(probabilities: np.ndarray, activation: str, threshold: float, dtype: np.dtype) -> np.ndarray:
    """Class per voxel: argmax over channels, or ``p >= threshold`` for a one-channel sigmoid."""
    if activation == "sigmoid":
        return (probabilities[0] >= threshold).astype(dtype)
    return np.argmax(probabilities, axis=0).astype(dtype)


def encode_probabilities(probabilities: np.ndarray, kind: str) -> np.ndarray:
    """float32 as is, or uint8 as ``round(p * 255)``."""
    if kind == "uint8":
        return np.rint(np.clip(probabilities, 0.0, 1.0) * 255.0).astype(np.uint8)
    return probabilities.astype(np.float32, copy=False)


def labels_dtype(n_classes: int) -> np.dtype:
    """The smallest unsigned integer type that holds the class indexes."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if n_classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"{n_classes} classes")
