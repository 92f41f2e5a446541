"""Polygon outputs as OGC API - Features (Part 1: Core, GeoJSON): what QGIS's OAPIF provider reads.

Each polygons file (GeoPackage, FlatGeobuf, GeoJSON, GeoParquet) is a collection
named by its stem. Items are read with pyogrio, a page at a time: ``bbox`` (in
CRS84) is turned into the layer's CRS and handed to OGR as a spatial filter
(GeoPackage and FlatGeobuf answer it from their spatial index), ``offset`` /
``limit`` skip and cap the features OGR returns, and ``numberMatched`` counts the
features the filter selects (their ids only, no geometries). Geometries go out
in CRS84 (longitude, latitude), as the standard asks.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pyogrio
from fastapi import HTTPException
from pyproj import CRS, Transformer

from .catalog import Entry

CRS84 = "http://www.opengis.net/def/crs/OGC/1.3/CRS84"
CONFORMANCE = [
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/html",
]
DEFAULT_LIMIT = 10
MAX_LIMIT = 10_000


def collection(entry: Entry, base: str) -> dict:
    items = f"{base}collections/{entry.id}/items"
    return {
        "id": entry.id,
        "title": entry.id,
        "description": f"polygons of {entry.path}",
        "itemType": "feature",
        "crs": [CRS84],
        "extent": {"spatial": {"bbox": [list(entry.bounds or (-180, -90, 180, 90))], "crs": CRS84}},
        "links": [
            {"href": f"{base}collections/{entry.id}", "rel": "self", "type": "application/json"},
            {"href": items, "rel": "items", "type": "application/geo+json", "title": entry.id},
            {"href": f"{base}files/{entry.path}", "rel": "enclosure", "title": Path(entry.path).name},
        ],
    }


def parse_bbox(text: str | None) -> tuple[float, float, float, float] | None:
    if not text:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or values[0] > values[2] or values[1] > values[3]:
        raise HTTPException(400, "bbox must be minlon,minlat,maxlon,maxlat")
    return tuple(values)


def items(root: Path, entry: Entry, base: str, bbox, limit: int, offset: int) -> dict:
    path = root / entry.path
    info = pyogrio.read_info(path)
    layer_bbox = _to_layer(info["crs"], bbox) if bbox else None
    if layer_bbox is None:
        matched = int(info["features"])
    else:
        _, fids, *_ = pyogrio.raw.read(path, bbox=layer_bbox, read_geometry=False, columns=[], return_fids=True)
        matched = len(fids)
    features = []
    if offset < matched:
        frame = pyogrio.read_dataframe(
            path, bbox=layer_bbox, skip_features=offset, max_features=limit, fid_as_index=True
        )
        frame = frame.to_crs("OGC:CRS84") if frame.crs is not None else frame
        for fid, feature in zip(frame.index, frame.iterfeatures(na="null", drop_id=True)):
            feature["id"] = int(fid)
            features.append(feature)
    query = f"limit={limit}" + (f"&bbox={','.join(map(str, bbox))}" if bbox else "")
    here = f"{base}collections/{entry.id}/items?{query}"
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
    path = root / entry.path
    frame = pyogrio.read_dataframe(path, fids=[fid], fid_as_index=True)
    if frame.empty:
        raise HTTPException(404, f"no feature {fid} in {entry.id}")
    frame = frame.to_crs("OGC:CRS84") if frame.crs is not None else frame
    feature = next(frame.iterfeatures(na="null", drop_id=True))
    feature["id"] = int(fid)
    return json.loads(json.dumps(feature))


def _to_layer(crs: str | None, bbox) -> tuple[float, float, float, float]:
    if not crs:
        return bbox
    transformer = Transformer.from_crs("OGC:CRS84", CRS.from_user_input(crs), always_xy=True)
    return tuple(transformer.transform_bounds(*bbox, densify_pts=21))
