"""Post-processing of label arrays, chunk-aware so the result never depends on the chunking.

Applied per foreground class ``c`` (every value but 0 and ``nodata``), classes
in ascending order, steps in this order:

1. ``remove_small=N``: components of ``labels == c`` with fewer than ``N``
   pixels/voxels become 0 (components found across chunks by
   :func:`tilemask.stats.components.label`, exact).
2. ``keep_largest``: every component of ``labels == c`` but the largest
   becomes 0 (MONAI's ``KeepLargestConnectedComponent(independent=True)``; of
   equal largest ones, the one whose first pixel comes first in C order stays, whatever the chunking: MONAI
   keeps the one numpy's unstable ``argsort`` puts last, the later of two equal squares with numpy 2.4).
3. ``fill_holes``: MONAI's ``FillHoles`` rule: pixels not reachable from outside
   the image through pixels other than ``c`` become ``c``, except ``nodata``
   pixels, which stay nodata.  "Reachable" is a component of ``labels != c``
   holding an image-border pixel, found across chunks like (1).
4. ``opening=r``: pixels of ``c`` outside ``binary_opening(labels == c, ball(r))``
   become 0.
5. ``closing=r``: pixels that are 0 inside ``binary_closing(labels == c, ball(r))``
   become ``c``.

``ball(r)`` is the set of offsets with Euclidean length <= r; a radius in mm (or
m) makes it an ellipsoid in index units, ``sum((d_i * spacing_i) ** 2) <= r**2``,
and a size in mL (or m2) is turned into pixels/voxels with the voxel size, both
taken from the image's affine.
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


def ball(radius: float | tuple[float, ...], ndim: int) -> np.ndarray:
    """Offsets within ``radius`` (one per axis: an ellipsoid), as a boolean structuring element."""
    radii = np.broadcast_to(np.asarray(radius, dtype=float), (ndim,))
    reach = np.floor(radii + 1e-9).astype(int)
    grid = np.indices(tuple(2 * reach + 1)) - reach.reshape((ndim,) + (1,) * ndim)
    scaled = np.where(
        radii.reshape((ndim,) + (1,) * ndim) > 0, grid / np.maximum(radii, 1e-12).reshape((ndim,) + (1,) * ndim), 0.0
    )
    return (scaled**2).sum(axis=0) <= 1 + 1e-9


def spacing_of(geometry) -> tuple[float, ...] | None:
    """Pixel/voxel size along each array axis: mm for volumes (the affine), metres for rasters in a projected
    CRS (whatever its unit: feet are converted); None when the image has no physical size (a geographic CRS, no
    CRS)."""
    from .geometry import RasterGeometry

    if not isinstance(geometry, RasterGeometry):
        return tuple(float(v) for v in np.linalg.norm(np.asarray(geometry.affine)[:3, :3], axis=0))
    metres = metres_per_unit(geometry)
    if metres is None:
        return None
    _, a, b, _, d, e = geometry.transform
    return (float(np.hypot(b, e)) * metres, float(np.hypot(a, d)) * metres)  # rows, columns


def metres_per_unit(geometry) -> float | None:
    """Metres in one unit of a raster's projected CRS (0.3048006 in US survey feet); None in a geographic CRS,
    or with no CRS."""
    if not geometry.crs_wkt:
        return None
    from pyproj import CRS

    crs = CRS.from_user_input(geometry.crs_wkt)
    factors = {axis.unit_conversion_factor for axis in crs.axis_info[:2]}
    if not crs.is_projected or len(factors) != 1 or not all(factors):
        return None
    return float(factors.pop())


def cell_size(spacing: tuple[float, ...], geometry=None) -> float:
    """The volume (mm3) or area (m2) of one voxel/pixel: |det| of the geometry's linear part when it is given (the
    volume's affine, the raster's geotransform in its CRS's unit, made metres: a sheared grid's cell is smaller
    than the product of its edge lengths), else the product of the spacing."""
    from .geometry import RasterGeometry

    if isinstance(geometry, RasterGeometry):
        _, a, b, _, d, e = geometry.transform
        return float(abs(a * e - b * d)) * (metres_per_unit(geometry) or 1.0) ** 2
    if geometry is not None:
        return float(abs(np.linalg.det(np.asarray(geometry.affine)[:3, :3])))
    return float(np.prod(spacing))


def _config_of(given: dict) -> PostprocessConfig:
    """A ``postprocess`` section given as a dict, or one line naming its first wrong key (a WorkflowError, as the
    workflow's own section is refused)."""
    from pydantic import ValidationError

    from .errors import WorkflowError

    try:
        return PostprocessConfig(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        said = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
        raise WorkflowError(f"postprocess: {'.'.join(map(str, first['loc']))}: {said}") from None


def apply(
    labels: da.Array, config: PostprocessConfig | dict, nodata: int | None = None, client=None,
    spacing: tuple[float, ...] | None = None, geometry=None,
) -> da.Array:  # fmt: skip
    """``labels`` after the steps of ``config`` (see the module docstring); lazy where possible.

    ``labels``: a dask array, whose ``nodata`` value stays as it is (given: it was a class like the others), or the
    DataArray :func:`tilemask.open_result` gives, whose ``_FillValue`` is its nodata, returned as a DataArray too.
    ``spacing`` (:func:`spacing_of` of ``geometry`` when left out; a DataArray's own grid when both are) turns
    physical sizes and radii into pixels/voxels. Removing small components, keeping the largest and filling
    holes need the components first: they are computed (on ``client`` when
    given) before this returns.
    """
    if hasattr(labels, "dims") and hasattr(labels, "attrs"):  # an xarray DataArray (open_result's)
        nodata = labels.attrs.get("_FillValue") if nodata is None else nodata
        if spacing is None and geometry is None:  # its grid: sizes in m2 / mL and radii in m / mm need it
            geometry = _geometry_of(labels)
            spacing = spacing_of(geometry) if geometry is not None else None
        return labels.copy(data=apply(da.asarray(labels.data), config, nodata, client, spacing, geometry))
    if isinstance(config, dict):
        config = _config_of(config)
    if not config.active:
        return labels
    if spacing is None and geometry is not None:  # the geometry alone holds the pixel size
        spacing = spacing_of(geometry)
    try:
        config.check_units(volume=labels.ndim == 3)
        min_size = config.min_size(cell_size(spacing, geometry) if spacing else None)
        radii = {name: config.radius(name, spacing) for name in ("opening", "closing")}
    except ValueError as exc:
        from .errors import InputError

        raise InputError(str(exc)) from None
    values = _foreground(labels, nodata, client)
    for value in values:
        if min_size:
            labels = _persist(remove_small(labels, value, min_size, config.connectivity or "face", client), client)
        if config.keep_largest:
            labels = _persist(keep_largest(labels, value, config.connectivity or "full", client), client)
        if config.fill_holes:
            labels = _persist(fill_holes(labels, value, config.connectivity or "full", client, nodata), client)
        if any(radii["opening"]):
            labels = _persist(opening(labels, value, radii["opening"]), client)
        if any(radii["closing"]):
            labels = _persist(closing(labels, value, radii["closing"]), client)
    return labels


def _geometry_of(array):
    """The grid of a DataArray :func:`tilemask.open_result` gives: a volume's ``affine`` attribute, a raster's CRS
    and transform (rioxarray's); None without either."""
    from .geometry import RasterGeometry, VolumeGeometry

    if "affine" in array.attrs:
        return VolumeGeometry(tuple(tuple(float(v) for v in row) for row in array.attrs["affine"]))
    if array.ndim != 2 or "spatial_ref" not in array.coords:
        return None
    crs = array.rio.crs
    return RasterGeometry(crs.to_wkt() if crs is not None else None, tuple(array.rio.transform().to_gdal()))


def _persist(labels: da.Array, client) -> da.Array:
    """Compute a step once: later steps label its result, and must not recompute the chain before it."""
    return client.persist(labels) if client is not None else labels.persist(scheduler="threads")


def _foreground(labels: da.Array, nodata, client) -> list[int]:
    parts = compute([dask.delayed(np.unique)(b) for b in labels.to_delayed().ravel()], client)
    present = np.unique(np.concatenate(parts)) if parts else []
    return [int(v) for v in present if int(v) != 0 and (nodata is None or int(v) != int(nodata))]


def remove_small(labels: da.Array, value: int, min_size: float, connectivity: str = "face", client=None) -> da.Array:
    components = label(labels == value, structure(labels.ndim, connectivity), client)
    small = np.zeros(components.count + 1, dtype=bool)
    small[1:] = components.moments["count"].to_numpy() < min_size
    ids = components.labels()
    drop = ids.map_blocks(_take, small, dtype=bool)
    return da.where(drop, labels.dtype.type(0), labels)


def keep_largest(labels: da.Array, value: int, connectivity: str = "face", client=None) -> da.Array:
    components = label(labels == value, structure(labels.ndim, connectivity), client)
    if components.count <= 1:
        return labels
    sizes = components.moments["count"].to_numpy()
    # ids follow the first voxel in C order (scipy's and skimage's numbering), so argmax takes the first of equals;
    # MONAI's get_largest_connected_component_mask takes argsort(counts)[::-1][0], which numpy does not promise
    # stable: of two equal components it kept the later one (MONAI 1.6.1, numpy 2.4)
    drop = np.ones(components.count + 1, dtype=bool)
    drop[0] = False
    drop[int(np.argmax(sizes)) + 1] = False
    ids = components.labels()
    return da.where(ids.map_blocks(_take, drop, dtype=bool), labels.dtype.type(0), labels)


def fill_holes(
    labels: da.Array, value: int, connectivity: str = "face", client=None, nodata: int | None = None
) -> da.Array:
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
    if nodata is not None:
        filled &= labels != nodata
    return da.where(filled, labels.dtype.type(value), labels)


def opening(labels: da.Array, value: int, radius) -> da.Array:
    kept = _morphology(labels == value, ndimage.binary_opening, radius)
    return da.where((labels == value) & ~kept, labels.dtype.type(0), labels)


def closing(labels: da.Array, value: int, radius) -> da.Array:
    closed = _morphology(labels == value, ndimage.binary_closing, radius)
    return da.where(closed & (labels == 0), labels.dtype.type(value), labels)


def _morphology(mask: da.Array, operation, radius) -> da.Array:
    element = ball(radius, mask.ndim)
    reach = [(n - 1) // 2 for n in element.shape]
    depth = {axis: min(2 * r, size) for axis, (r, size) in enumerate(zip(reach, mask.shape))}
    return mask.map_overlap(
        _apply_structure, operation=operation, element=element, depth=depth, boundary="none", dtype=bool
    )


def _apply_structure(block, operation, element):
    return operation(block, structure=element)


def _take(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    return table[ids]
