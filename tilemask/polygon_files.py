"""Polygon files: the features of :func:`tilemask.vectors.write_polygons` in world coordinates with their areas
(:class:`AreaRule`), streamed into a GeoPackage, FlatGeobuf or GeoJSON (OGR, through pyogrio) or a GeoParquet file
under a temporary name, renamed when whole.

Columns: ``geometry`` (polygons in the label raster's CRS), ``class`` (name) and ``area_m2`` (planar area times the
CRS unit's metres squared for a projected CRS; for a geographic CRS, the area on the CRS's ellipsoid: planar area in
its cylindrical equal-area projection, exact for the parallels and meridians bounding the pixels of a north-up grid;
empty (null) without a CRS, as in the statistics). Each file carries tilemask's mark
(:func:`~tilemask.formats.product_mark`) where its format keeps metadata; a GeoJSON keeps its coordinates and areas
to the decimals its pixel size needs (:func:`coordinate_decimals`, :meth:`AreaRule.area_decimals`).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from pyproj import CRS, Proj

from .errors import InputError, OutputError
from .formats import product_mark, product_mark_text
from .outputs import atomic_path, check_spatial_index

if TYPE_CHECKING:
    from .vectors import FeatureBatch

logger = logging.getLogger(__name__)

VECTOR_DRIVERS = {".gpkg": "GPKG", ".fgb": "FlatGeobuf", ".geojson": "GeoJSON"}


@dataclass(frozen=True)
class AreaRule:
    """Pixel-to-world mapping and the area rule of the label image's CRS."""

    transform: tuple[float, float, float, float, float, float]  # GDAL order
    crs_wkt: str | None

    def to_world(self, geoms: np.ndarray) -> np.ndarray:
        gt = self.transform

        def affine(xy: np.ndarray) -> np.ndarray:
            x, y = xy[:, 0], xy[:, 1]
            return np.column_stack([gt[0] + x * gt[1] + y * gt[2], gt[3] + x * gt[4] + y * gt[5]])

        return shapely.transform(geoms, affine)

    def area_m2(self, geoms: np.ndarray) -> np.ndarray:
        if len(geoms) == 0:
            return np.zeros(0)
        if not self.crs_wkt:  # coordinates in no known unit: no area, as in the statistics
            return np.full(len(geoms), np.nan)
        crs = CRS.from_wkt(self.crs_wkt)
        if crs.is_geographic:
            return shapely.area(shapely.transform(geoms, equal_area(crs)))
        factor = (crs.axis_info[0].unit_conversion_factor or 1.0) if crs.axis_info else 1.0
        return shapely.area(geoms) * factor**2

    def area_decimals(self, rows: int) -> int:
        """The decimals a GeoJSON's ``area_m2`` keeps, as :func:`coordinate_decimals` for its vertices: a step of at
        most 1/100 of the smallest pixel's area ``a`` (m2), ``d = ceil(2 - log10(a))``, at least 0. The smallest
        pixel of a grid in degrees is in its first or last row, the one nearer a pole."""
        corners = np.array([0, rows - 1])
        area = np.nanmin(self.area_m2(self.to_world(shapely.box(0, corners, 1, corners + 1))), initial=np.inf)
        return max(0, math.ceil(2 - math.log10(area))) if np.isfinite(area) else 0


def equal_area(crs: CRS):
    """The map from ``crs``'s longitude/latitude (x, y, in its angular unit) to the cylindrical equal-area projection
    (``+proj=cea``) on its ellipsoid, longitudes beyond +-180 kept as they are (``+over``).

    Planar areas there are areas on the ellipsoid, and parallels and meridians (the pixel edges of a north-up
    grid) are straight lines, so a polygon of such pixels gets its exact area, however wide: a geodesic between
    its vertices would cut across the pixels (the whole globe's edges along +-90 and +-180 enclose nothing).
    """
    geod = crs.get_geod()
    proj = Proj(f"+proj=cea +a={geod.a!r} +f={geod.f!r} +over")
    to_degrees = np.degrees(crs.axis_info[0].unit_conversion_factor)

    def forward(xy: np.ndarray) -> np.ndarray:
        return np.column_stack(proj(xy[:, 0] * to_degrees, xy[:, 1] * to_degrees))

    return forward


def check_polygons_crs(out_path: str, crs_wkt: str | None, raster: str) -> None:
    """Refuse polygons in GeoJSON where GDAL's GeoJSON writer would not name the raster's CRS in the file (its
    ``crs`` member): with no CRS, or one without an authority code, the file holds none, and every reader then takes
    the coordinates for WGS 84 longitudes and latitudes (RFC 7946), a map place near (0, 0) degrees."""
    if Path(out_path).suffix.lower() != ".geojson" or (crs_wkt and _geojson_names(crs_wkt)):
        return
    what = "has no CRS" if not crs_wkt else "has a CRS without an authority code (EPSG, ESRI, ...)"
    raise InputError(f"{out_path}: {raster} {what}, and a GeoJSON without one is read as WGS 84 longitude/latitude; "
                     "write the polygons to .gpkg, .fgb or .parquet, which keep the raster's CRS as it is")  # fmt: skip


@functools.lru_cache(maxsize=16)
def _geojson_names(crs_wkt: str) -> bool:
    """Whether GDAL's GeoJSON writer gives a layer in ``crs_wkt`` a ``crs`` member: asked of the writer itself,
    on an empty layer in memory (it names a CRS it finds an authority code for), once per CRS (a run asks it of
    each input as it is planned, then as its polygons are written)."""
    import pyogrio

    buffer = io.BytesIO()
    empty = pa.RecordBatchReader.from_batches(_schema(), [])
    pyogrio.write_arrow(empty, buffer, driver="GeoJSON", layer="crs", geometry_type="Polygon", crs=crs_wkt)
    return "crs" in json.loads(buffer.getvalue())


def coordinate_decimals(gt: tuple[float, ...]) -> int:
    """The decimals a GeoJSON's coordinates keep (GDAL's ``COORDINATE_PRECISION``) for the GDAL geotransform
    ``gt``: a step of at most 1/100 of the shorter pixel side ``s``, ``d = ceil(2 - log10(s))``, so rounding moves a
    vertex by at most 1/200 of a pixel along each axis; GDAL's default, 15 significant digits, wrote float noise
    (``104085.265486726`` for a corner of 300 m pixels)."""
    side = min(math.hypot(gt[1], gt[4]), math.hypot(gt[2], gt[5]))
    return max(0, math.ceil(2 - math.log10(side)))



def _record_batches(batches: Iterator[FeatureBatch], area_decimals: int | None = None) -> Iterator[pa.RecordBatch]:
    """The features as Arrow; their areas rounded to ``area_decimals`` when given (a GeoJSON's text)."""
    for batch in batches:
        area = batch.area_m2 if area_decimals is None else np.round(batch.area_m2, area_decimals)
        yield pa.record_batch(
            [
                pa.array(batch.wkb, pa.binary()),
                pa.array(batch.classes, pa.string()),
                pa.array(area, pa.float64(), from_pandas=True),  # NaN (no CRS: no area) as null
            ],
            schema=_schema(),
        )


def _schema(geo: dict | None = None) -> pa.Schema:
    """The features' columns; with ``geo``, GeoParquet's metadata and tilemask's mark
    (:func:`~tilemask.formats.product_mark`)."""
    geometry = pa.field("geometry", pa.binary(), metadata={b"ARROW:extension:name": b"geoarrow.wkb"})
    schema = pa.schema([geometry, pa.field("class", pa.string()), pa.field("area_m2", pa.float64())])
    mark = {key.encode(): value.encode() for key, value in product_mark().items()}
    return schema.with_metadata({b"geo": json.dumps(geo).encode(), **mark}) if geo else schema


def _ogr_options(driver: str, transform: tuple[float, ...]) -> dict:
    """tilemask's mark (:func:`~tilemask.formats.product_mark`) as ``pyogrio.write_arrow`` keywords: the layer's
    metadata item of a GeoPackage or a FlatGeobuf (not a GeoPackage's dataset item: GDAL copies that into its PAM
    on every read and writes a ``.aux.xml`` beside the file), a GeoJSON's ``description`` member (it keeps no
    metadata); a GeoJSON's coordinates rounded to :func:`coordinate_decimals`."""
    if driver == "GeoJSON":
        decimals = str(coordinate_decimals(transform))
        return {"layer_options": {"DESCRIPTION": product_mark_text(), "COORDINATE_PRECISION": decimals}}
    return {"layer_metadata": product_mark()}


FLATGEOBUF_FEATURE_BYTES = 128
"""What a FlatGeobuf holds of a feature beyond its columns' Arrow bytes (its FlatBuffers header and its spatial index
node): about 88 bytes for the demo scene's polygons."""


def _leave_crs_unsaid() -> None:
    """pyogrio's "UserWarning: 'crs' was not provided" silenced for this module's calls, for good: not inside
    ``warnings.catch_warnings()``, which puts back the process's filters as they were when it began, so that another
    thread's :func:`~tilemask.imports.ignoring_warnings` left meanwhile (every warning ignored) stayed for good. Set
    at each write, not once at import: a ``catch_warnings`` of the caller's may have put the filters back since
    (pytest's around each test does)."""
    warnings.filterwarnings("ignore", "'crs' was not provided", UserWarning, module=__name__)


def write_features(out_path: str, suffix: str, batches: Iterator[FeatureBatch], rule: AreaRule, rows: int) -> str:
    """Stream the features of a label raster of ``rows`` rows into ``out_path`` under a temporary name; rename when
    whole."""
    crs_wkt = rule.crs_wkt
    target = Path(out_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with atomic_path(target) as staged:
        if suffix == ".parquet":
            geo = {
                "version": "1.1.0",
                "primary_column": "geometry",
                "columns": {
                    "geometry": {
                        "encoding": "WKB",
                        "geometry_types": ["Polygon"],
                        "crs": CRS.from_wkt(crs_wkt).to_json_dict() if crs_wkt else None,
                    }
                },
            }
            with pq.ParquetWriter(staged, _schema(geo), compression="zstd") as writer:
                for record in _record_batches(batches):
                    writer.write_batch(record)
                    count += record.num_rows
        else:
            import pyogrio
            from pyogrio.errors import DataLayerError, DataSourceError

            decimals = rule.area_decimals(rows) if suffix == ".geojson" else None
            counted = _counting(_record_batches(batches, decimals))
            reader = pa.RecordBatchReader.from_batches(_schema(), counted)
            free = shutil.disk_usage(Path(staged).parent).free
            try:
                if not crs_wkt:  # said by tilemask's "has no CRS" warning, not again with a line of code
                    _leave_crs_unsaid()
                pyogrio.write_arrow(
                    reader,
                    str(staged),
                    layer=target.stem,
                    driver=VECTOR_DRIVERS[suffix],
                    geometry_name="geometry",
                    geometry_type="Polygon",
                    crs=crs_wkt,
                    **_ogr_options(VECTOR_DRIVERS[suffix], rule.transform),
                )
            except BaseException as exc:
                if counted.failure is None and isinstance(exc, (DataLayerError, DataSourceError)):
                    # FlatGeobuf writes the features into a temporary file, then the file from it (its spatial index
                    # first), and GDAL removes the temporary file when a write fails: the disk no longer looks full
                    gdal = str(exc).rsplit("; ", 1)[-1]  # (its first part names the staged file)
                    size = counted.nbytes + FLATGEOBUF_FEATURE_BYTES * counted.count
                    if suffix == ".fgb" and "I/O failure" in gdal and free < 2 * size:
                        raise OutputError(f"{target}: no space left on device ({free / 2**20:.1f} MiB free there, for "
                                          f"about {size / 2**20:.1f} MiB of features, which FlatGeobuf writes twice; "
                                          f"GDAL: {gdal})") from None  # fmt: skip
                if counted.failure is None:
                    raise
            if counted.failure is not None:  # a chunk's failure, or Ctrl-C: GDAL's is "Error while accessing batch"
                raise counted.failure  # outside the handler: pyogrio's RuntimeError is no part of it
            count = counted.count
            if suffix == ".gpkg":
                check_spatial_index(staged, target)
    logger.info("wrote %d polygons to %s", count, target)
    return str(target)


class _counting:
    """An iterator of record batches that counts the rows (and their bytes) going through."""

    def __init__(self, batches: Iterator[pa.RecordBatch]):
        self.batches, self.count, self.nbytes = batches, 0, 0
        self.failure: BaseException | None = None  # what the batches raised: Arrow's stream hands GDAL none of it

    def __iter__(self):
        try:
            for batch in self.batches:
                self.count += batch.num_rows
                self.nbytes += batch.nbytes
                yield batch
        except GeneratorExit:  # closed by its reader: GDAL stopped reading (its own error)
            raise
        except BaseException as exc:
            self.failure = exc
            raise
