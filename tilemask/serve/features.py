"""Polygon outputs as OGC API - Features (Part 1: Core, GeoJSON): what QGIS's OAPIF provider reads.

Each polygons file (GeoPackage, FlatGeobuf, GeoJSON, GeoParquet) is a collection
named by its stem. Items are read with pyogrio, a page at a time. A ``bbox`` (in
CRS84): its envelope in the layer's CRS goes to OGR as a spatial filter, which
finds the candidates (GeoPackage and FlatGeobuf from their spatial index); those
whose geometry, in CRS84, intersects the bbox are the matches, as the standard
asks; their ids give ``numberMatched``, and ``offset`` / ``limit`` page through
them. GeoParquet, which pyogrio's GDAL cannot read, goes through geopandas
(:class:`GeoParquetLayer`).
Geometries go out in CRS84 (longitude, latitude), as the standard asks.
"""

from __future__ import annotations

import functools
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pyogrio
from fastapi import HTTPException
from pyproj import CRS, Transformer

from .catalog import Entry

CRS84_URI = "http://www.opengis.net/def/crs/OGC/1.3/CRS84"  # how OGC API names longitude/latitude
CRS84 = "OGC:CRS84"  # the same, as pyproj names it
CONFORMANCE = [
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/html",
]
DEFAULT_LIMIT = 10
MAX_LIMIT = 10_000


def collection(entry: Entry, base: str) -> dict:
    here = f"{base}collections/{quote(entry.id)}"
    return {
        "id": entry.id,
        "title": entry.id,
        "description": f"polygons of {entry.path}",
        "itemType": "feature",
        "crs": [CRS84_URI],
        "extent": {"spatial": {"bbox": [list(entry.bounds or (-180, -90, 180, 90))], "crs": CRS84_URI}},
        "links": [
            {"href": here, "rel": "self", "type": "application/json"},
            {"href": f"{here}/items", "rel": "items", "type": "application/geo+json", "title": entry.id},
            {"href": f"{base}files/{quote(entry.path)}", "rel": "enclosure", "title": Path(entry.path).name},
        ],
    }


def parse_bbox(text: str | None) -> tuple[float, float, float, float] | None:
    """``minlon,minlat,maxlon,maxlat`` (or the 6 numbers of a 3D bbox, heights ignored), finite and on the Earth."""
    if not text:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 6:
        values = [values[0], values[1], values[3], values[4]]
    if (
        len(values) != 4
        or not all(math.isfinite(v) for v in values)
        or values[0] > values[2]
        or values[1] > values[3]
        or not (-180 <= values[0] and values[2] <= 180 and -90 <= values[1] and values[3] <= 90)
    ):
        raise HTTPException(400, "bbox must be minlon,minlat,maxlon,maxlat in degrees")
    return tuple(values)


def items(root: Path, entry: Entry, base: str, bbox, limit: int, offset: int) -> dict:
    layer = open_layer(root / entry.path)
    if bbox is None:
        frame, matched = layer.page(offset, limit), layer.features
    else:
        ids = layer.matching(bbox)  # once: the page and the count come from it
        frame, matched = layer.rows(ids[offset : offset + limit]), len(ids)
    features = _features(frame, layer.crs)
    query = f"limit={limit}" + (f"&bbox={','.join(map(str, bbox))}" if bbox else "")
    here = f"{base}collections/{quote(entry.id)}/items?{query}"
    links = [{"href": f"{here}&offset={offset}", "rel": "self", "type": "application/geo+json"}]
    if offset + len(features) < matched:
        links.append({"href": f"{here}&offset={offset + len(features)}", "rel": "next", "type": "application/geo+json"})
    return {
        "type": "FeatureCollection",
        "features": features,
        "numberMatched": matched,
        "numberReturned": len(features),
        "timeStamp": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "links": links,
    }


def item(root: Path, entry: Entry, fid: int) -> dict:
    layer = open_layer(root / entry.path)
    try:
        frame = layer.one(fid)
    except (pyogrio.errors.FeatureError, OverflowError, ValueError):
        frame = None
    if frame is None or frame.empty:
        raise HTTPException(404, f"no feature {fid} in {entry.id}")
    return _features(frame, layer.crs)[0]


def _envelope(bbox, crs: str | None) -> tuple[float, float, float, float]:
    """The CRS84 ``bbox``'s envelope in the layer's CRS: where the features that meet it are found."""
    return _transformer(CRS84, crs).transform_bounds(*bbox, densify_pts=21) if crs else tuple(bbox)


def _meeting(geometries, crs: str | None, bbox) -> np.ndarray:
    """Which ``geometries`` (in ``crs``) intersect the CRS84 ``bbox``, tested in CRS84 (/req/core/fc-bbox-response:
    a lon/lat box is a curved quadrilateral in a projection, and its envelope there holds features that do not
    meet it). A bbox of no width or height is the point or line it is."""
    import shapely

    geometries = np.asarray(geometries, dtype=object)
    if crs:
        geometries = shapely.transform(geometries, _transformer(crs, CRS84).transform, interleaved=False)
    x0, y0, x1, y1 = bbox
    return shapely.intersects(geometries, shapely.envelope(shapely.multipoints([(x0, y0), (x1, y1)])))


@functools.lru_cache(maxsize=32)
def _transformer(source: str | None, target: str | None) -> Transformer:
    return Transformer.from_crs(CRS.from_user_input(source), CRS.from_user_input(target), always_xy=True)


def _features(frame, crs: str | None) -> list[dict]:
    """GeoJSON features in CRS84 (coordinates moved by a cached transformer), the layer's feature id as ``id``."""
    import shapely

    geometries = frame.geometry.values
    if crs:
        geometries = shapely.transform(geometries, _transformer(crs, CRS84).transform, interleaved=False)
    shapes = shapely.to_geojson(geometries)
    properties = json.loads(
        frame.drop(columns=frame.geometry.name).to_json(orient="records", double_precision=15, date_format="iso")
    )
    return [
        {"type": "Feature", "id": int(fid), "geometry": json.loads(shape) if shape else None, "properties": props}
        for fid, shape, props in zip(frame.index, shapes, properties)
    ]


class OgrLayer:
    """A layer OGR reads (GeoPackage, FlatGeobuf, GeoJSON): filters, counts and pages inside GDAL."""

    def __init__(self, path: Path):
        from .catalog import OGR_DRIVERS

        self.path = path
        st = path.stat()
        driver, self.crs, self.features = _ogr_info(str(path), st.st_size, st.st_mtime_ns, st.st_ino)
        if driver != OGR_DRIVERS.get(path.suffix.lower()):  # changed since the catalog looked: refuse an OGR VRT
            raise HTTPException(404, f"{path.name}: not a polygons file")

    def matching(self, bbox) -> np.ndarray:
        """The ids of the features that intersect the CRS84 ``bbox``: OGR's filter on its envelope finds the
        candidates (from the spatial index of a GeoPackage or FlatGeobuf), then :func:`_meeting`."""
        import shapely

        envelope = _envelope(bbox, self.crs)
        _, fids, wkb, _ = pyogrio.raw.read(self.path, bbox=envelope, columns=[], return_fids=True)
        return fids[_meeting(shapely.from_wkb(wkb), self.crs, bbox)]

    def page(self, offset: int, limit: int):
        return pyogrio.read_dataframe(self.path, skip_features=offset, max_features=limit, fid_as_index=True)

    def rows(self, ids):
        return pyogrio.read_dataframe(self.path, fids=ids, fid_as_index=True)

    def one(self, fid: int):
        return pyogrio.read_dataframe(self.path, fids=[fid], fid_as_index=True)


@functools.lru_cache(maxsize=32)
def _ogr_info(path: str, size: int, mtime_ns: int, inode: int) -> tuple[str, str | None, int]:
    info = pyogrio.read_info(path, force_feature_count=True)
    return info["driver"], info["crs"], int(info["features"])


class GeoParquetLayer:
    """A GeoParquet file (GDAL's Parquet driver is not in pyogrio's wheels): read whole with geopandas, kept
    in memory while the file is unchanged, filtered with its spatial index; the row number is the feature id."""

    def __init__(self, path: Path):
        st = path.stat()
        self.frame = _parquet(str(path), st.st_mtime_ns, st.st_ino)
        self.crs = self.frame.crs.to_wkt() if self.frame.crs is not None else None

    @property
    def features(self) -> int:
        return len(self.frame)

    def matching(self, bbox) -> np.ndarray:
        """The row numbers of the features that intersect the CRS84 ``bbox`` (candidates from the spatial index)."""
        import shapely

        candidates = np.sort(self.frame.sindex.query(shapely.box(*_envelope(bbox, self.crs))))
        return candidates[_meeting(self.frame.geometry.values[candidates], self.crs, bbox)]

    def page(self, offset: int, limit: int):
        return self.frame.iloc[offset : offset + limit]

    def rows(self, ids):
        return self.frame.iloc[ids]

    def one(self, fid: int):
        return self.frame.iloc[fid : fid + 1] if 0 <= fid < len(self.frame) else self.frame.iloc[:0]


@functools.lru_cache(maxsize=4)
def _parquet(path: str, mtime_ns: int, inode: int):
    import geopandas as gpd

    return gpd.read_parquet(path).reset_index(drop=True)


def open_layer(path: Path):
    return GeoParquetLayer(path) if path.suffix.lower() == ".parquet" else OgrLayer(path)


def parquet_geometry(path: Path) -> tuple[str, tuple[float, float, float, float] | None] | None:
    """The CRS (PROJJSON text) and bounds of a GeoParquet file, from its ``geo`` metadata; None for a plain table
    or one without a CRS."""
    import pyarrow.parquet as pq

    geo = (pq.read_metadata(path).metadata or {}).get(b"geo")
    if not geo:
        return None
    meta = json.loads(geo)
    column = meta.get("columns", {}).get(meta.get("primary_column", "geometry"), {})
    crs = column.get("crs", "OGC:CRS84")  # GeoParquet: an absent crs means OGC:CRS84; null means unknown
    if crs is None:
        return None
    bbox = column.get("bbox")
    return (json.dumps(crs) if isinstance(crs, dict) else str(crs)), (tuple(bbox[:4]) if bbox else None)
