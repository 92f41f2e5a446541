"""Instances: connected components of each foreground class, across chunk borders.

For each foreground class ``c`` (every label value but 0 and nodata),
:func:`tilemask.stats.components.label` labels the components of
``labels == c`` chunk by chunk and merges those that touch across chunk
borders (dask-image's algorithm, with a graph linear in blocks).  Each chunk then
reports, per component it holds: the voxel count, the integer sum of each index
coordinate, the per-axis index minimum and maximum, and the smallest C-order
flat index (the component's first voxel in a raster scan).  Integer sums over
chunks do not depend on the chunking.

Components are numbered as ``scipy.ndimage.label`` numbers them on the whole
image (by first voxel in C order), class after class: the instances of class 1
are ``1..n1``, those of class 2 follow, and so on.

Per instance: ``instance_id``, ``class``, ``value``, ``pixels``/``voxels``,
``area_m2``/``volume_ml``, ``centroid_x``, ``centroid_y`` (``centroid_z``) -- the
mean of the voxel centres in world coordinates (CRS units; RAS mm for volumes)
-- and ``bbox_xmin .. bbox_zmax``, the world envelope of the voxel box.

Connectivity: ``face`` (4 in 2D, 6 in 3D, scipy's default) or ``full`` (8 / 26).
"""

from __future__ import annotations

import logging

import dask
import dask.array as da
import numpy as np
import pandas as pd
from scipy import ndimage

from ..errors import InputError
from ..sources.labels import LabelImage
from .components import label
from .crosstab import compute
from .measure import Grid
from .tables import class_names
from .totals import excluded_values, grid_of

logger = logging.getLogger(__name__)

CONNECTIVITIES = ("face", "full")
AXES = "xyz"


def structure(ndim: int, connectivity: str) -> np.ndarray:
    """scipy's structuring element: rank 1 for face connectivity, rank ``ndim`` for full."""
    if connectivity not in CONNECTIVITIES:
        raise InputError(f"connectivity must be 'face' or 'full', got {connectivity!r}")
    return ndimage.generate_binary_structure(ndim, 1 if connectivity == "face" else ndim)


def find_instances(
    image: LabelImage,
    connectivity: str = "face",
    names=None,
    values: list[int] | None = None,
    client=None,
) -> pd.DataFrame:
    """One row per instance of each foreground class of ``image`` (see the module docstring)."""
    grid = grid_of(image)
    structure(image.array.ndim, connectivity)  # validate early
    if values is None:
        values = foreground_values(image, client)
    frames = []
    offset = 0
    for value in values:
        stats = _class_components(image.array == value, connectivity, client, grid)
        stats.insert(0, "value", value)
        stats.insert(0, "instance_id", np.arange(offset + 1, offset + 1 + len(stats), dtype=np.int64))
        offset += len(stats)
        frames.append(stats.reset_index(drop=True))
    raw = pd.concat(frames, ignore_index=True) if frames else _empty(image.array.ndim)
    return _describe(raw, grid, names if names is not None else image.class_names)


def foreground_values(image: LabelImage, client=None) -> list[int]:
    """Label values present in the image, but 0 and nodata."""
    blocks = image.array.to_delayed().ravel()
    parts = compute([dask.delayed(np.unique)(b) for b in blocks], client)
    present = np.unique(np.concatenate(parts)) if parts else np.array([], np.int64)
    skip = {0, *excluded_values(image)}
    return [int(v) for v in present if int(v) not in skip]


def _class_components(mask: da.Array, connectivity: str, client, grid: Grid | None = None) -> pd.DataFrame:
    """Per-component integer moments and ``size`` (area/volume), numbered in scipy's order."""
    row_sizes = grid.row_sizes if grid is not None and grid.is_geographic else None
    components = label(mask, structure(mask.ndim, connectivity), client, row_sizes=row_sizes)
    moments = components.moments
    if row_sizes is None and grid is not None:
        moments["size"] = moments["count"].to_numpy(dtype=float) * grid.row_sizes[0]
    return moments


def _empty(ndim: int) -> pd.DataFrame:
    columns = ["instance_id", "value", "count", "first"]
    for axis in range(ndim):
        columns += [f"sum{axis}", f"min{axis}", f"max{axis}"]
    frame = pd.DataFrame({c: pd.Series([], dtype=np.int64) for c in columns})
    return frame.assign(size=pd.Series([], dtype=float))


def _describe(raw: pd.DataFrame, grid: Grid, names) -> pd.DataFrame:
    """Integer moments to the published columns, in world coordinates."""
    ndim = len(grid.shape)
    units = grid.units
    named = class_names(raw["value"].unique(), names)
    count = raw["count"].to_numpy(dtype=np.int64)
    mean_index = np.stack([raw[f"sum{a}"].to_numpy(dtype=float) for a in range(ndim)], axis=1) / np.maximum(count, 1)[:, None]
    lo = np.stack([raw[f"min{a}"].to_numpy() for a in range(ndim)], axis=1)
    hi = np.stack([raw[f"max{a}"].to_numpy() for a in range(ndim)], axis=1)
    centroid = grid.pixel_centres(mean_index)
    sizes = raw["size"].to_numpy(dtype=float)
    env_lo, env_hi = grid.world_bounds(lo.reshape(-1, ndim), hi.reshape(-1, ndim))
    table = {
        "instance_id": raw["instance_id"].to_numpy(dtype=np.int64),
        "class": [named[int(v)] for v in raw["value"]],
        "value": raw["value"].to_numpy(dtype=np.int64),
        units.count: count,
        units.size: np.asarray(sizes, dtype=float),
    }
    for a in range(ndim):
        table[f"centroid_{AXES[a]}"] = centroid[:, a] if len(centroid) else np.array([], float)
    for a in range(ndim):
        table[f"bbox_{AXES[a]}min"] = env_lo[:, a] if len(env_lo) else np.array([], float)
        table[f"bbox_{AXES[a]}max"] = env_hi[:, a] if len(env_hi) else np.array([], float)
    return pd.DataFrame(table)


def instance_labels(image: LabelImage, connectivity: str = "face", values: list[int] | None = None, client=None) -> da.Array:
    """A lazy array of instance ids (0 outside instances), numbered as :func:`find_instances`."""
    if values is None:
        values = foreground_values(image, client)
    out = da.zeros(image.array.shape, dtype=np.int64, chunks=image.array.chunks)
    offset = 0
    for value in values:
        components = label(image.array == value, structure(image.array.ndim, connectivity), client)
        ids = components.labels()
        out = da.where(ids > 0, ids + offset, out)
        offset += components.count
    return out
