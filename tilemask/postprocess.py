"""Post-processing of label arrays, chunk-aware so the result never depends on the chunking.

Applied per foreground class ``c`` (every value but 0 and ``nodata``), classes
in ascending order, steps in this order:

1. ``remove_small=N``: components of ``labels == c`` with fewer than ``N``
   pixels/voxels become 0 (components found across chunks by
   :func:`tilemask.stats.components.label`, exact).
2. ``fill_holes``: MONAI's ``FillHoles`` rule: pixels not reachable from outside
   the image through pixels other than ``c`` become ``c``.  "Reachable" is a
   component of ``labels != c`` holding an image-border pixel, found across
   chunks like (1).
3. ``opening=r``: pixels of ``c`` outside ``binary_opening(labels == c, ball(r))``
   become 0.
4. ``closing=r``: pixels that are 0 inside ``binary_closing(labels == c, ball(r))``
   become ``c``.

``ball(r)`` is the set of offsets with Euclidean length <= r (index units).
Opening and closing run as ``scipy.ndimage`` on each chunk with a halo of
``2r`` (``dask.array.map_overlap``, no padding at the image border), which is
exactly the whole-image result: ``scipy``'s ``border_value=0`` is kept at the
image border, and interior chunk edges see ``2r`` of real neighbours, enough
for an erosion followed by a dilation (or the reverse).

The result of each step is persisted on the cluster before the next one, so
the work grows linearly with the number of classes (a lazy chain would be
recomputed by every later step's component labelling).
"""

from __future__ import annotations

import logging

import dask
import dask.array as da
import numpy as np
from scipy import ndimage

from .stats.components import label
from .stats.config import PostprocessConfig
from .stats.crosstab import compute
from .stats.instances import structure

logger = logging.getLogger(__name__)


def ball(radius: int, ndim: int) -> np.ndarray:
    grid = np.indices((2 * radius + 1,) * ndim) - radius
    return (grid**2).sum(axis=0) <= radius * radius


def apply(labels: da.Array, config: PostprocessConfig | dict, nodata: int | None = None, client=None) -> da.Array:
    """``labels`` after the steps of ``config`` (see the module docstring); lazy where possible.

    Removing small components and filling holes need the components first: they
    are computed (on ``client`` when given) before this returns.
    """
    if isinstance(config, dict):
        config = PostprocessConfig(**config)
    if not config.active:
        return labels
    values = _foreground(labels, nodata, client)
    for value in values:
        if config.remove_small:
            labels = _persist(remove_small(labels, value, config.remove_small, config.connectivity, client), client)
        if config.fill_holes:
            labels = _persist(fill_holes(labels, value, config.connectivity, client), client)
        if config.opening:
            labels = _persist(opening(labels, value, config.opening), client)
        if config.closing:
            labels = _persist(closing(labels, value, config.closing), client)
    return labels


def _persist(labels: da.Array, client) -> da.Array:
    """Compute a step once: later steps label its result, and must not recompute the chain before it."""
    return client.persist(labels) if client is not None else labels.persist(scheduler="threads")


def _foreground(labels: da.Array, nodata, client) -> list[int]:
    parts = compute([dask.delayed(np.unique)(b) for b in labels.to_delayed().ravel()], client)
    present = np.unique(np.concatenate(parts)) if parts else []
    return [int(v) for v in present if int(v) != 0 and (nodata is None or int(v) != int(nodata))]


def remove_small(labels: da.Array, value: int, min_size: int, connectivity: str = "face", client=None) -> da.Array:
    components = label(labels == value, structure(labels.ndim, connectivity), client)
    small = np.zeros(components.count + 1, dtype=bool)
    small[1:] = components.moments["count"].to_numpy() < min_size
    ids = components.labels()
    drop = ids.map_blocks(_take, small, dtype=bool)
    return da.where(drop, labels.dtype.type(0), labels)


def fill_holes(labels: da.Array, value: int, connectivity: str = "face", client=None) -> da.Array:
    components = label(labels != value, structure(labels.ndim, connectivity), client)
    moments = components.moments
    touches = np.zeros(components.count + 1, dtype=bool)
    for axis, size in enumerate(labels.shape):
        touches[1:] |= (moments[f"min{axis}"].to_numpy() == 0) | (moments[f"max{axis}"].to_numpy() == size - 1)
    hole = np.ones(components.count + 1, dtype=bool)
    hole[1:] = ~touches[1:]
    hole[0] = False
    ids = components.labels()
    filled = ids.map_blocks(_take, hole, dtype=bool)
    return da.where(filled, labels.dtype.type(value), labels)


def opening(labels: da.Array, value: int, radius: int) -> da.Array:
    kept = _morphology(labels == value, ndimage.binary_opening, radius)
    return da.where((labels == value) & ~kept, labels.dtype.type(0), labels)


def closing(labels: da.Array, value: int, radius: int) -> da.Array:
    closed = _morphology(labels == value, ndimage.binary_closing, radius)
    return da.where(closed & (labels == 0), labels.dtype.type(value), labels)


def _morphology(mask: da.Array, operation, radius: int) -> da.Array:
    element = ball(radius, mask.ndim)
    depth = {axis: min(2 * radius, size) for axis, size in enumerate(mask.shape)}
    return mask.map_overlap(_apply_structure, operation=operation, element=element, depth=depth, boundary="none", dtype=bool)


def _apply_structure(block, operation, element):
    return operation(block, structure=element)


def _take(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    return table[ids]
