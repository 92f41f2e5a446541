"""What one pixel or voxel measures, and where it is: pure functions of the geometry.

* Raster, projected CRS: every pixel has the same area, ``|a*e - b*d|`` in CRS
  units squared, times the square of the CRS's linear unit in metres.
* Raster, geographic CRS (north-up): a pixel of row ``r`` is the quadrilateral
  between longitudes ``x0 + c*dx .. x0 + (c+1)*dx`` and latitudes
  ``y0 + r*dy .. y0 + (r+1)*dy``; its geodesic area on the CRS's ellipsoid
  (``crs.get_geod().polygon_area_perimeter``; WGS84 for EPSG:4326, the rule
  polygons use too) depends on the row only, so areas are one value per row.
* Volume: every voxel has volume ``|det(A[:3, :3])|`` mm^3 (A the nibabel
  voxel-to-RAS affine), ``/ 1000`` in mL.

World coordinates: a raster pixel ``(row, col)`` has its centre at
``transform @ (col + 0.5, row + 0.5)`` (CRS units); a voxel ``(i, j, k)`` has its
centre at ``A @ (i, j, k, 1)`` (RAS millimetres, nibabel's convention).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from pyproj import CRS, Geod

from ..errors import InputError
from ..geometry import Geometry, VolumeGeometry

logger = logging.getLogger(__name__)

WGS84 = Geod(ellps="WGS84")


@dataclass(frozen=True)
class Units:
    """Column names for a raster (pixels, m^2) or a volume (voxels, mL)."""

    count: str  # "pixels" | "voxels"
    size: str  # "area_m2" | "volume_ml"


RASTER_UNITS = Units("pixels", "area_m2")
VOLUME_UNITS = Units("voxels", "volume_ml")


@dataclass(frozen=True)
class Grid:
    """A label image's grid: shape and geometry, with the measures derived from them."""

    shape: tuple[int, ...]
    geometry: Geometry

    @property
    def is_volume(self) -> bool:
        return isinstance(self.geometry, VolumeGeometry)

    @property
    def units(self) -> Units:
        return VOLUME_UNITS if self.is_volume else RASTER_UNITS

    @property
    def sizes_known(self) -> bool:
        """Whether a pixel has an area (a raster without a CRS has none: its size columns are empty)."""
        return self.is_volume or self.crs is not None

    @cached_property
    def crs(self) -> CRS | None:
        if self.is_volume or not self.geometry.crs_wkt:
            return None
        return CRS.from_wkt(self.geometry.crs_wkt)

    @property
    def is_geographic(self) -> bool:
        return self.crs is not None and self.crs.is_geographic

    @property
    def north_up(self) -> bool:
        return not self.is_volume and self.geometry.transform[2] == 0 and self.geometry.transform[4] == 0

    def check_sizes(self, path) -> None:
        """Refuse what :attr:`row_sizes` cannot measure: geodesic areas of a rotated geographic raster."""
        if self.is_geographic and not self.north_up:
            raise InputError(f"{path}: geodesic areas need a north-up geographic raster (no rotation in the "
                             "geotransform)")  # fmt: skip

    @cached_property
    def row_sizes(self) -> np.ndarray:
        """Area (m^2) or volume (mL) of one pixel/voxel, per row (axis 0); NaN when unknown.

        Constant except for geographic rasters, where it is the geodesic area of
        the row's pixels.
        """
        n_rows = self.shape[0]
        if self.is_volume:
            affine = np.asarray(self.geometry.affine, dtype=float)
            return np.full(n_rows, abs(np.linalg.det(affine[:3, :3])) / 1000.0)
        x0, dx, rx, y0, ry, dy = self.geometry.transform
        if self.crs is None:
            logger.warning("the raster has no CRS: area_m2 is left empty")
            return np.full(n_rows, np.nan)
        if not self.is_geographic:
            unit = self.crs.axis_info[0].unit_conversion_factor if self.crs.axis_info else 1.0
            planar = abs(dx * dy - rx * ry) * unit * unit
            _warn_of_planar_distortion(self, planar)
            return np.full(n_rows, planar)
        self.check_sizes("the labels")
        return geodesic_row_areas(x0, dx, y0, dy, n_rows, self.crs.get_geod() or WGS84)

    def pixel_centres(self, index: np.ndarray) -> np.ndarray:
        """World coordinates of index-space points ``(n, ndim)`` (fractional indexes allowed).

        Rasters: ``(x, y)`` in CRS units of the pixel centres; volumes: ``(x, y, z)``
        RAS millimetres.
        """
        index = np.asarray(index, dtype=float)
        if self.is_volume:
            affine = np.asarray(self.geometry.affine, dtype=float)
            return index @ affine[:3, :3].T + affine[:3, 3]
        return self.raster_xy(index[:, 0] + 0.5, index[:, 1] + 0.5)

    def raster_xy(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        x0, dx, rx, y0, ry, dy = self.geometry.transform
        return np.stack([x0 + cols * dx + rows * rx, y0 + cols * ry + rows * dy], axis=-1)

    def world_bounds(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned world envelope of the index boxes ``lo..hi`` (inclusive, ``(n, ndim)``).

        The box's outer corners are taken: pixel edges ``lo .. hi + 1`` for rasters,
        voxel faces ``lo - 0.5 .. hi + 0.5`` for volumes (voxel centres are at integer
        indexes in NIfTI).
        """
        lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
        ndim = lo.shape[1]
        corners = []
        for pick in np.ndindex(*(2,) * ndim):
            corner = np.where(np.array(pick, bool), hi, lo)
            if self.is_volume:
                affine = np.asarray(self.geometry.affine, dtype=float)
                corner = corner + np.where(np.array(pick, bool), 0.5, -0.5)
                corners.append(corner @ affine[:3, :3].T + affine[:3, 3])
            else:
                corner = corner + np.array(pick, float)
                corners.append(self.raster_xy(corner[:, 0], corner[:, 1]))
        stacked = np.stack(corners)
        return stacked.min(axis=0), stacked.max(axis=0)


PLANAR_DISTORTION = 0.05  # a projected CRS whose planar pixel area is further than this from the ground's is said


def _centre_pixels(grid: Grid) -> list[np.ndarray]:
    """The four corners (CRS units) of each of a raster's centre column's top, middle and bottom pixels."""
    rows = (0, grid.shape[0] // 2, grid.shape[0] - 1)
    return [grid.raster_xy(np.array([0.0, 1.0, 1.0, 0.0]) + row, np.array([0.0, 0.0, 1.0, 1.0]) + grid.shape[1] // 2)
            for row in rows]  # fmt: skip


def _worst_distortion(grid: Grid, ratios) -> tuple[str, float, float] | None:
    """``(the CRS's name, latitude, ratio)`` of the ratio furthest from 1 of ``ratios(geod, lon, lat)`` (planar over
    ground, per pixel of :func:`_centre_pixels`, its corners in degrees) where it is further than
    :data:`PLANAR_DISTORTION`; None within it, or for a CRS pyproj cannot take to its ellipsoid."""
    from pyproj import Transformer

    seen = []  # (ratio, latitude)
    try:
        crs = grid.crs
        to_degrees, geod = Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True), crs.get_geod() or WGS84
        for corners in _centre_pixels(grid):
            lon, lat = to_degrees.transform(corners[:, 0], corners[:, 1])
            seen += [(ratio, float(np.mean(lat))) for ratio in ratios(geod, lon, lat)]
    except Exception:  # noqa: BLE001 - a CRS pyproj cannot take to its ellipsoid: nothing to compare with
        return None
    ratio, latitude = max(seen, key=lambda s: abs(s[0] - 1), default=(1.0, 0.0))
    if abs(ratio - 1) <= PLANAR_DISTORTION:
        return None
    return (crs.to_string() if crs.to_epsg() else crs.name), latitude, ratio


def _warn_of_planar_distortion(grid: Grid, planar: float) -> None:
    """Warn where ``area_m2``'s ``planar`` pixel area is more than :data:`PLANAR_DISTORTION` from a pixel's area on
    the CRS's ellipsoid (:func:`_worst_distortion`): Web Mercator (EPSG:3857), the web tiles' CRS, gave 1.69x the
    ground area of a hillshade at 39.6 degrees north with nothing said (a first-contact review), and a global one 4x
    at 60 degrees; UTM stays within 0.1% in its zone."""

    def ratios(geod, lon, lat):
        ground = abs(geod.polygon_area_perimeter(lon, lat)[0])
        return [planar / ground] if np.isfinite(ground) and ground > 0 else []

    worst = _worst_distortion(grid, ratios)
    if worst is not None:
        logger.warning("area_m2 is planar in %s: at latitude %.1f a pixel's planar area is %.2fx its area on the "
                       "ellipsoid; reproject the labels to an equal-area CRS for ground areas", *worst)  # fmt: skip


def warn_of_planar_distances(grid: Grid) -> None:
    """Warn where a raster's distances in its projected CRS are more than :data:`PLANAR_DISTORTION` from their length
    on the CRS's ellipsoid, along a pixel's side (:func:`_worst_distortion`), as :func:`_warn_of_planar_distortion`
    warns of areas: Web Mercator at 60 degrees north has a metre of the CRS for half a metre on the ground, and
    ``evaluate --surface`` said its distances were metres."""
    if grid.is_volume or grid.crs is None or grid.is_geographic:
        return
    _, dx, rx, _, ry, dy = grid.geometry.transform
    unit = grid.crs.axis_info[0].unit_conversion_factor if grid.crs.axis_info else 1.0
    sides = ((1, math.hypot(dx, ry) * unit), (3, math.hypot(rx, dy) * unit))  # corner 0 to 1: a row; to 3: a column

    def ratios(geod, lon, lat):
        grounds = [(planar, geod.line_length([lon[0], lon[corner]], [lat[0], lat[corner]])) for corner, planar in sides]
        return [planar / ground for planar, ground in grounds if np.isfinite(ground) and ground > 0]

    worst = _worst_distortion(grid, ratios)
    if worst is not None:
        logger.warning("surface distances are planar in %s: at latitude %.1f a pixel's side is %.2fx its length on "
                       "the ellipsoid; reproject the labels to a CRS that keeps distances there (UTM, say) for ground "
                       "distances", *worst)  # fmt: skip


def geodesic_row_areas(x0: float, dx: float, y0: float, dy: float, n_rows: int, geod: Geod = WGS84) -> np.ndarray:
    """Geodesic area (m^2, on ``geod``'s ellipsoid) of one pixel of each row of a north-up lon/lat grid."""
    areas = np.empty(n_rows)
    lons = [x0, x0 + dx, x0 + dx, x0]
    for row in range(n_rows):
        top, bottom = y0 + row * dy, y0 + (row + 1) * dy
        area, _ = geod.polygon_area_perimeter(lons, [top, top, bottom, bottom])
        areas[row] = abs(area)
    return areas


def same_grid(a: Grid, b: Grid, tolerance: float = 1e-9) -> str | None:
    """Why two grids differ (shape, CRS, transform/affine), or None when they are the same."""
    if a.shape != b.shape:
        return f"shapes differ: {a.shape} vs {b.shape}"
    if a.is_volume != b.is_volume:
        return "one is a raster, the other a volume"
    if a.is_volume:
        if not np.allclose(a.geometry.affine, b.geometry.affine, rtol=0, atol=tolerance * 1e3):
            return "affines differ"
        return None
    if (a.crs is None) != (b.crs is None) or (a.crs is not None and not a.crs.equals(b.crs)):
        return "CRSs differ"
    scale = max(abs(v) for v in a.geometry.transform) or 1.0
    if not np.allclose(a.geometry.transform, b.geometry.transform, rtol=0, atol=tolerance * scale):
        return "geotransforms differ"
    return None
