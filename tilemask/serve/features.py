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

import contextlib
import functools
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pyogrio
from fastapi import HTTPException
from pyproj import CRS

from ..ogr import no_pam
from .catalog import Entry, lonlat_bounds, transformer

CRS84_URI = "http://www.opengis.net/def/crs/OGC/1.3/CRS84"  # how OGC API names longitude/latitude
CRS84 = "OGC:CRS84"  # the same, as pyproj names it
CONFORMANCE = [
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson",
]  # not conf/html: collections and items answer GeoJSON only
ITEMS_PARAMETERS = {"bbox", "limit", "offset", "datetime", "f"}  # datetime: accepted, the features have no time
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
    """``minlon,minlat,maxlon,maxlat`` (or the 6 numbers of a 3D bbox, heights ignored), finite and on the Earth;
    a minlon larger than the maxlon is a box across the antimeridian, as OGC API - Features reads it."""
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
        or values[1] > values[3]
        or not all(-180 <= v <= 180 for v in values[::2])
        or not all(-90 <= v <= 90 for v in values[1::2])
    ):
        raise HTTPException(400, "bbox must be minlon,minlat,maxlon,maxlat in degrees")
    return tuple(values)


def sides(box) -> list[tuple[float, float, float, float]]:
    """A CRS84 box as boxes that do not cross the antimeridian: itself, or its parts east and west of it."""
    x0, y0, x1, y1 = box
    return [(x0, y0, 180.0, y1), (-180.0, y0, x1, y1)] if x0 > x1 else [tuple(box)]


def items(root: Path, entry: Entry, base: str, bbox, limit: int, offset: int) -> dict:
    layer = open_layer(root / entry.path)
    if bbox is None:  # an offset past the end (which OGR takes as a C long) pages from the end: nothing
        frame, matched = layer.page(min(offset, layer.features), limit), layer.features
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


def _envelopes(bbox, crs: str | None, extent, past_180: bool = False) -> list[tuple[float, float, float, float]]:
    """Where, in the layer's CRS, the features that meet the CRS84 ``bbox`` are found: each side of the
    antimeridian apart, transformed. For a layer of less than half the globe, only the parts of the bbox within
    its CRS84 ``extent``: a box reaching far past a layer in a projection of one zone (UTM) transforms to
    nonsense there. A wider layer's extent is no guide (pyproj's bounds of a Mollweide or global grid can be
    one meridian): the bbox is transformed whole. A geographic layer whose longitudes pass +-180 degrees
    (``past_180``: a 0..360 grid's polygons) is searched 360 degrees either way too."""
    if not crs:
        return list(sides(bbox))
    width = None if extent is None else (extent[2] - extent[0]) % 360
    local = width is not None and np.all(np.isfinite(extent)) and 0 < width < 180
    envelopes = []
    for q in sides(bbox):
        for e in sides(extent) if local else [q]:
            part = (max(q[0], e[0]), max(q[1], e[1]), min(q[2], e[2]), min(q[3], e[3]))
            if part[0] <= part[2] and part[1] <= part[3]:
                envelopes.append(transformer(CRS84, crs).transform_bounds(*part, densify_pts=21))
    if past_180:
        envelopes += [(x0 + turn, y0, x1 + turn, y1) for x0, y0, x1, y1 in envelopes for turn in (-360, 360)]
    return envelopes


def _past_180(crs: str | None, bounds) -> bool:
    """Whether a layer of native ``bounds`` in ``crs`` is geographic and passes +-180 degrees (0..360)."""
    return bool(crs) and bounds is not None and CRS.from_user_input(crs).is_geographic and (
        bounds[0] < -180 or bounds[2] > 180)  # fmt: skip


def _meeting(geometries, crs: str | None, bbox) -> np.ndarray:
    """Which ``geometries`` (in ``crs``) intersect the CRS84 ``bbox``, tested in CRS84 (/req/core/fc-bbox-response:
    a lon/lat box is a curved quadrilateral in a projection, and its envelope there holds features that do not
    meet it). A bbox of no width or height is the point or line it is."""
    import shapely

    geometries = _crs84(np.asarray(geometries, dtype=object), crs)
    boxes = [shapely.envelope(shapely.multipoints([(x0, y0), (x1, y1)])) for x0, y0, x1, y1 in sides(bbox)]
    return np.logical_or.reduce([shapely.intersects(geometries, box) for box in boxes])


def _crs84(geometries: np.ndarray, crs: str | None) -> np.ndarray:
    """``geometries`` (in ``crs``) in CRS84. A polygon of a projected layer that crosses the antimeridian is cut
    there into a multipolygon (RFC 7946 3.1.9, with the ``antimeridian`` package): moved as they are, its
    coordinates would jump from 180 to -180 and make it a band around the whole globe. A geometry with vertices
    off the Earth (they move to inf, or their bounding corners do not come back: :func:`_corners_on_earth`) is
    first cut to the projection's :func:`_domain`; one wholly off it, or in a projection whose domain cannot be
    outlined, has no geometry (None: GeoJSON's null). A geographic layer's polygon past +-180 degrees (a 0..360
    grid's) is cut there, its parts taken round (:func:`_cut_at_180`)."""
    import shapely

    if not crs:
        return geometries
    transform = transformer(crs, CRS84).transform
    moved = shapely.transform(geometries, transform, interleaved=False)
    bounds = shapely.bounds(moved)
    present = ~shapely.is_missing(moved) & ~shapely.is_empty(moved)
    on_earth = np.isfinite(bounds).all(axis=1)
    if _curved_rim(crs):
        on_earth &= _corners_on_earth(geometries, crs)
    off = np.flatnonzero(present & ~on_earth)
    if len(off):  # vertices off the Earth (a Mollweide grid's corners): cut to the projection's domain first
        domain = _domain(crs)
        geometries = geometries.copy()
        geometries[off] = shapely.intersection(geometries[off], domain) if domain is not None else None
        moved[off] = shapely.transform(geometries[off], transform, interleaved=False)
        bounds[off] = shapely.bounds(moved[off])
        lost = off[~np.isfinite(bounds[off]).all(axis=1)]
        moved[lost] = None  # wholly off, or no outline: no geometry rather than GeoJSON's invalid nulls
        bounds[lost] = np.nan
    if CRS.from_user_input(crs).is_geographic:  # a 0..360 grid's polygons past 180 degrees: taken round, cut there
        past = np.flatnonzero(np.isfinite(bounds).all(axis=1) & ((bounds[:, 0] < -180) | (bounds[:, 2] > 180)))
        moved[past] = [_cut_at_180(moved[i]) for i in past]
        return moved
    wide = np.flatnonzero(np.isfinite(bounds).all(axis=1) & (bounds[:, 2] - bounds[:, 0] > 180))
    if len(wide):
        import antimeridian

        fixes = {"Polygon": antimeridian.fix_polygon, "MultiPolygon": antimeridian.fix_multi_polygon}
        for i in wide:  # wide, or across? Edges cut short in the layer's CRS jump 180 degrees only across it
            fix, original = fixes.get(moved[i].geom_type), geometries[i]
            if fix is None:
                continue
            dense = shapely.transform(shapely.segmentize(original, _diagonal(original) / 256), transform,
                                      interleaved=False)  # fmt: skip
            if _jumps(dense):
                with contextlib.suppress(ValueError, AssertionError):  # a cut the package cannot make: left as it
                    # was: a hole it cannot put back in a piece is an AssertionError (a polar polygon's was a 500)
                    moved[i] = fix(dense, great_circle=False, fix_winding=True)  # a projection's edges are straight
    return moved


def _cut_at_180(geometry):
    """A CRS84 ``geometry`` with longitudes past +-180 degrees cut there, each part moved by a multiple of 360
    degrees into -180..180 and the parts joined (RFC 7946 3.1.9; a band round the whole Earth is one polygon)."""
    import shapely

    x0, _, x1, _ = geometry.bounds
    turns = range(math.floor((x0 + 180) / 360), math.floor((x1 + 180) / 360) + 1)
    parts = [shapely.transform(shapely.clip_by_rect(geometry, 360 * k - 180, -90, 360 * k + 180, 90),
                               lambda xy, k=k: xy - (360 * k, 0)) for k in turns]  # fmt: skip
    return shapely.union_all([p for p in parts if not p.is_empty])


def _corners_on_earth(geometries: np.ndarray, crs: str) -> np.ndarray:
    """Whether each geometry's bounding corners come back to themselves through CRS84 (on a map with a
    :func:`_curved_rim`): PROJ moves a point off a sinusoidal map (MODIS) to a longitude wrapped round, not to
    inf. Off by 1e-3 of the point's distance from the origin or more: a wrap moves it by thousands of km, a
    projection's own round trip far out by mm. For a domain that is convex (sinusoidal, Mollweide), corners on
    it mean the whole geometry is on it."""
    import shapely

    x0, y0, x1, y1 = shapely.bounds(geometries).T
    xs, ys = np.stack([x0, x0, x1, x1]), np.stack([y0, y1, y0, y1])
    with np.errstate(invalid="ignore"):
        back = transformer(CRS84, crs).transform(*transformer(crs, CRS84).transform(xs, ys))
        missed = np.hypot(back[0] - xs, back[1] - ys) > 1e-3 * np.hypot(xs, ys) + 1e-6
    return ~missed.any(axis=0)


@functools.lru_cache(maxsize=32)
def _curved_rim(crs: str) -> bool:
    """Whether the map's rim is curved (sinusoidal, Mollweide, Robinson): past it there is no Earth, though PROJ
    may wrap such a point round. Past the straight rim of a cylindrical map (Web Mercator, plate carree) the
    Earth goes on across 180 degrees: those polygons are cut at the antimeridian, not to the domain."""
    domain = _domain(crs)
    return domain is not None and domain.area < 0.99 * domain.envelope.area


@functools.lru_cache(maxsize=32)
def _domain(crs: str):
    """The part of ``crs``'s plane that is on the Earth, as a polygon: the CRS84 world's outline, densified and
    moved into ``crs`` (for Mollweide or Robinson, the ellipse or oval the map is drawn in), drawn in by a
    millionth of its size so that its own rim transforms back. None where the outline itself leaves the plane
    (a geostationary or orthographic view sees half the Earth at most)."""
    import shapely

    world = shapely.segmentize(shapely.box(-180, -90, 180, 90), 0.25)
    outline = shapely.transform(world, transformer(CRS84, crs).transform, interleaved=False)
    if not np.isfinite(shapely.get_coordinates(outline)).all():
        return None
    outline = shapely.make_valid(outline)
    x0, y0, x1, y1 = outline.bounds
    return outline.buffer(-1e-6 * max(x1 - x0, y1 - y0))


def _diagonal(geometry) -> float:
    x0, y0, x1, y1 = geometry.bounds
    return max(math.hypot(x1 - x0, y1 - y0), 1e-9)


def _jumps(geometry) -> bool:
    """Whether a ring of ``geometry`` steps more than 180 degrees of longitude from one vertex to the next."""
    import shapely

    rings = shapely.get_rings(shapely.get_parts(geometry))
    return any(np.any(np.abs(np.diff(shapely.get_coordinates(ring)[:, 0])) > 180) for ring in rings)


def _features(frame, crs: str | None) -> list[dict]:
    """GeoJSON features in CRS84 (coordinates moved by a cached transformer), the layer's feature id as ``id``."""
    import shapely

    shapes = shapely.to_geojson(_crs84(np.asarray(frame.geometry.values, dtype=object), crs))
    attributes = frame.drop(columns=frame.geometry.name)
    for name in attributes.columns[attributes.dtypes == object]:  # bytes as hex, as /stats gives them: pandas'
        if attributes[name].map(lambda v: isinstance(v, bytes)).any():  # JSON writer decodes them as UTF-8 text
            attributes[name] = attributes[name].map(lambda v: v.hex() if isinstance(v, bytes) else v)
    properties = (  # pandas writes a frame without columns as [], not one {} per row
        json.loads(attributes.to_json(orient="records", double_precision=15, date_format="iso"))
        if len(attributes.columns) else [{} for _ in range(len(frame))]
    )  # fmt: skip
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
        driver, self.crs, self.features, self.extent, self.past_180 = _ogr_info(str(path), st.st_size,
                                                                                st.st_mtime_ns, st.st_ino)
        if driver != OGR_DRIVERS.get(path.suffix.lower()):  # changed since the catalog looked: refuse an OGR VRT
            raise HTTPException(404, f"{path.name}: not a polygons file")

    def matching(self, bbox) -> np.ndarray:
        """The ids of the features that intersect the CRS84 ``bbox``: OGR's filter on its envelope finds the
        candidates (from the spatial index of a GeoPackage or FlatGeobuf), then :func:`_meeting`."""
        import shapely

        with no_pam():
            found = [pyogrio.raw.read(self.path, bbox=envelope, columns=[], return_fids=True)[1:3]
                     for envelope in _envelopes(bbox, self.crs, self.extent, self.past_180)]  # fmt: skip
        fids, first = np.unique(np.concatenate([np.zeros(0, np.int64)] + [f for f, _ in found]), return_index=True)
        wkb = np.concatenate([np.zeros(0, object)] + [w for _, w in found])[first]
        return fids[_meeting(shapely.from_wkb(wkb), self.crs, bbox)]

    def page(self, offset: int, limit: int):
        with no_pam():
            return pyogrio.read_dataframe(self.path, skip_features=offset, max_features=limit, fid_as_index=True)

    def rows(self, ids):
        with no_pam():
            return pyogrio.read_dataframe(self.path, fids=ids, fid_as_index=True)

    def one(self, fid: int):
        with no_pam():
            return pyogrio.read_dataframe(self.path, fids=[fid], fid_as_index=True)


@functools.lru_cache(maxsize=32)
def _ogr_info(path: str, size: int, mtime_ns: int, inode: int) -> tuple[str, str | None, int, tuple | None, bool]:
    """The driver, CRS, number of features and CRS84 extent of an OGR layer, and whether it passes 180 degrees
    (:func:`_past_180`)."""
    with no_pam():
        info = pyogrio.read_info(path, force_feature_count=True, force_total_bounds=True)
    crs, bounds = info["crs"], info["total_bounds"]
    return info["driver"], crs, int(info["features"]), lonlat_bounds(crs, bounds), _past_180(crs, bounds)


class GeoParquetLayer:
    """A GeoParquet file (GDAL's Parquet driver is not in pyogrio's wheels): read whole with geopandas, kept
    in memory while the file is unchanged, filtered with its spatial index; the row number is the feature id."""

    def __init__(self, path: Path):
        st = path.stat()
        self.frame = _parquet(str(path), st.st_mtime_ns, st.st_ino)
        self.crs = self.frame.crs.to_wkt() if self.frame.crs is not None else None
        bounds = self.frame.total_bounds
        self.extent = lonlat_bounds(self.crs, bounds) if self.crs else None
        self.past_180 = _past_180(self.crs, bounds)

    @property
    def features(self) -> int:
        return len(self.frame)

    def matching(self, bbox) -> np.ndarray:
        """The row numbers of the features that intersect the CRS84 ``bbox`` (candidates from the spatial index)."""
        import shapely

        envelopes = _envelopes(bbox, self.crs, self.extent, self.past_180)
        candidates = np.unique(np.concatenate([np.zeros(0, np.int64)] + [
            self.frame.sindex.query(shapely.box(*envelope)) for envelope in envelopes
        ]))  # fmt: skip
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
