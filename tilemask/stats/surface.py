"""Surface distances per class, as MONAI's ``compute_hausdorff_distance`` and ``compute_average_surface_distance``
(``distance_metric="euclidean"``, ``spacing=`` the voxel size) compute them.

* Surface (MONAI's ``get_mask_edges``): the voxels of the class that have a face neighbour (4 in 2D, 6 in 3D)
  outside it, the image's outer faces counting as outside (``mask ^ binary_erosion(mask)``). Pixels where either
  image holds its nodata value belong to no class in either image (MONAI's ``ignore_index`` zeroes both masks).
* Distances: from every surface voxel of one image to the nearest surface voxel of the other, between voxel
  positions in world units (a KD-tree, as MONAI on CPU): the NIfTI affine's linear part (mm), or the geotransform
  (CRS units). For an affine whose axes are at right angles (any scan) that is MONAI's ``spacing``, the voxel sizes.
* ``hd``: the larger of the two directed maxima; ``hd95``: the larger of the two directed 95th percentiles (linear
  interpolation, ``torch.quantile``); ``assd``: the mean of both directions' distances together.
* A class absent from both images: NaN (null) for all three. Absent from one only: ``hd`` and ``assd`` are
  infinite, and ``hd95`` is NaN, as MONAI gives (its quantile of infinite distances).

The whole image is read at once, so it is bounded (:data:`MAX_SURFACE_ELEMENTS`).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError
from .measure import Grid

SURFACE_METRICS = ("hd", "hd95", "assd")

MAX_SURFACE_ELEMENTS = 2**28
"""Pixels or voxels ``evaluate --surface`` reads at once (512 x 512 x 1024 voxels): both label images whole, then
about 4 bytes a voxel more (a uint8 pair: about 1.6 GiB in all, plus the surface voxels' coordinates)."""


def check_surface(grid: Grid, path) -> None:
    """Refuse what surface distances cannot measure here: a geographic CRS (degrees are no distance) or an image
    over :data:`MAX_SURFACE_ELEMENTS`."""
    size = math.prod(grid.shape)
    if size > MAX_SURFACE_ELEMENTS:
        shape = " x ".join(map(str, grid.shape))
        raise InputError(f"{path}: surface distances read the whole image at once, and {shape} = {size:,} "
                         f"{grid.units.count} is over the {MAX_SURFACE_ELEMENTS:,} they are bounded to")  # fmt: skip
    if grid.is_geographic:
        raise InputError(f"{path}: surface distances need a projected CRS, not a geographic one (degrees); "
                         "warp the images to a projected CRS first")  # fmt: skip


def world_axes(grid: Grid) -> tuple[np.ndarray, str | None]:
    """The linear map from array indexes to world coordinates (``world = index @ M.T``) and its unit: ``mm`` for a
    volume, the CRS's linear unit for a raster (None without a CRS: the geotransform's own units)."""
    if grid.is_volume:
        return np.asarray(grid.geometry.affine, dtype=float)[:3, :3], "mm"
    _, dx, rx, _, ry, dy = grid.geometry.transform  # x = x0 + col*dx + row*rx, y = y0 + col*ry + row*dy
    unit = None
    if grid.crs is not None:
        unit = grid.crs.axis_info[0].unit_name if grid.crs.axis_info else "metre"
    return np.array([[rx, dx], [dy, ry]], dtype=float), unit


def surfaces(labels: np.ndarray, valid: np.ndarray | None, axes: np.ndarray) -> dict[int, np.ndarray]:
    """World coordinates ``(n, ndim)`` of the surface voxels of every class of ``labels``, by label value."""
    ndim = labels.ndim
    edge = np.zeros(labels.shape, bool)
    for axis in range(ndim):
        lo = tuple(slice(None, -1) if a == axis else slice(None) for a in range(ndim))
        hi = tuple(slice(1, None) if a == axis else slice(None) for a in range(ndim))
        differ = labels[lo] != labels[hi]
        if valid is not None:
            differ |= ~valid[lo]
            differ |= ~valid[hi]
        edge[lo] |= differ
        edge[hi] |= differ
        del differ
        for end in (0, -1):  # the image's outer faces
            edge[tuple(end if a == axis else slice(None) for a in range(ndim))] = True
    if valid is not None:
        edge &= valid
    index = np.nonzero(edge)
    del edge
    values = labels[index]
    order = np.argsort(values, kind="stable")
    values = values[order]
    coords = np.stack(index, axis=1)[order].astype(float) @ axes.T
    found, starts = np.unique(values, return_index=True)
    return {int(v): part for v, part in zip(found, np.split(coords, starts[1:]))}


def class_distances(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """``hd``, ``hd95`` and ``assd`` between two surfaces (world coordinates, ``(n, ndim)``); see the module
    docstring for empty ones."""
    if not len(pred) and not len(truth):
        return {"hd": math.nan, "hd95": math.nan, "assd": math.nan}
    if not len(pred) or not len(truth):
        return {"hd": math.inf, "hd95": math.nan, "assd": math.inf}
    from scipy.spatial import KDTree

    to_truth = KDTree(truth, leafsize=32).query(pred, k=1)[0]
    to_pred = KDTree(pred, leafsize=32).query(truth, k=1)[0]
    return {
        "hd": float(max(to_truth.max(), to_pred.max())),
        "hd95": float(max(np.percentile(to_truth, 95), np.percentile(to_pred, 95))),
        "assd": float((to_truth.sum() + to_pred.sum()) / (len(to_truth) + len(to_pred))),
    }


def surface_distances(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None, grid: Grid,
                      values) -> tuple[dict[int, dict[str, float]], str | None]:  # fmt: skip
    """``{value: {"hd", "hd95", "assd"}}`` for each label value in ``values``, and the distances' unit."""
    axes, unit = world_axes(grid)
    pred_surfaces, truth_surfaces = surfaces(pred, valid, axes), surfaces(truth, valid, axes)
    empty = np.empty((0, pred.ndim))
    result = {int(v): class_distances(pred_surfaces.get(int(v), empty), truth_surfaces.get(int(v), empty))
              for v in values}  # fmt: skip
    return result, unit
