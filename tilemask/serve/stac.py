"""A STAC catalog of the served outputs (pystac): one Item per label output or polygons file.

Label Items carry ``classification:classes`` (value, name, colour hint) on the
labels asset, and the probabilities as a second asset when they exist. Georeferenced
outputs have their footprint in CRS84 (``bbox`` and ``geometry``); the projection
extension is not written (the files' own CRS is in the assets). Volumes, and
outputs none of whose points is on the Earth, have no footprint, so their Items
have a null geometry (as STAC allows). Asset hrefs point at
``/files/``, so STAC browsers and QGIS's STAC plugin open them through the same
range-request route.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import pystac
from pystac.extensions.classification import Classification, ClassificationExtension

from . import features
from .catalog import Entry

MEDIA = {
    "cog": pystac.MediaType.COG,
    "zarr": "application/vnd+zarr",
    "ome-zarr": "application/vnd+zarr; profile=ome-zarr",
    "nifti": "application/x-nifti",
    "gpkg": pystac.MediaType.GEOPACKAGE,
    "fgb": pystac.MediaType.FLATGEOBUF,
    "geojson": pystac.MediaType.GEOJSON,
    "parquet": pystac.MediaType.PARQUET,
}


def catalog(entries: list[Entry], base: str) -> dict:
    root = pystac.Catalog(id="tilemask", description="tilemask outputs served by tilemask serve")
    out = root.to_dict(include_self_link=False, transform_hrefs=False)
    out["links"] = [
        {"rel": "self", "href": f"{base}stac/catalog.json", "type": "application/json"},
        {"rel": "root", "href": f"{base}stac/catalog.json", "type": "application/json"},
    ] + [
        {"rel": "item", "href": f"{base}stac/items/{quote(e.id)}.json", "type": "application/geo+json", "title": e.path}
        for e in entries
        if e.kind in ("labels", "polygons")
    ]
    return out


def item(entry: Entry, base: str, modified: float) -> dict:
    bbox = list(entry.bounds) if entry.bounds else None
    geometry = None
    if bbox:  # across the antimeridian (west > east): a box each side of it (RFC 7946 3.1.9)
        rings = [[[[w, s], [e, s], [e, n], [w, n], [w, s]]] for w, s, e, n in features.sides(bbox)]
        geometry = {"type": "Polygon", "coordinates": rings[0]} if len(rings) == 1 else {
            "type": "MultiPolygon", "coordinates": rings}  # fmt: skip
    stac_item = pystac.Item(
        id=entry.id, geometry=geometry, bbox=bbox,
        datetime=datetime.fromtimestamp(modified, timezone.utc), properties={"tilemask:kind": entry.kind},
    )  # fmt: skip
    asset = pystac.Asset(
        href=f"{base}files/{quote(entry.path)}",
        media_type=MEDIA.get(entry.format),
        roles=["data"],
        title=Path(entry.path).name,
    )
    stac_item.add_asset(entry.kind, asset)
    if entry.kind == "labels":
        classes = ClassificationExtension.ext(asset, add_if_missing=True)
        classes.classes = [
            Classification.create(value=c["value"], name=_name(c["name"]), description=c["name"],
                                  color_hint=c["color"][1:].upper())
            for c in entry.legend()
        ]  # fmt: skip
        if entry.probabilities and entry.probabilities != entry.path:
            stac_item.add_asset(
                "probabilities",
                pystac.Asset(href=f"{base}files/{quote(entry.probabilities)}", media_type=MEDIA.get(entry.format),
                             roles=["data"], title=Path(entry.probabilities).name),
            )  # fmt: skip
    out = stac_item.to_dict(include_self_link=False, transform_hrefs=False)
    out["links"] = [
        {"rel": "self", "href": f"{base}stac/items/{quote(entry.id)}.json", "type": "application/geo+json"},
        {"rel": "root", "href": f"{base}stac/catalog.json", "type": "application/json"},
        {"rel": "parent", "href": f"{base}stac/catalog.json", "type": "application/json"},
    ]
    return out


def _name(text: str) -> str:
    """The extension's ``name`` is a token (letters, digits, ``_``, ``-``); the label text goes in ``description``."""
    return "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in text) or "class"
