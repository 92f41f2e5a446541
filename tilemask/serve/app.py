"""The ``tilemask serve`` ASGI app: one read-only FastAPI app over one folder of outputs.

Routes (docs/DESIGN.md section 10): ``/`` (index, HTML or JSON), ``/files/`` (range
requests), ``/tiles/``, ``/point``, ``/stats``, OGC API - Features
(``/conformance``, ``/collections/...``), ``/map``, ``/view``, ``/stac/``, and
``/static/`` (the pages' own scripts, no CDN). Every path a client names goes
through :func:`tilemask.serve.paths.resolve`; tiles, points and features only
open files the catalog lists, so a client can make the server open nothing else
(no URL, no VRT, nothing outside FOLDER). No route fetches a URL.
"""

from __future__ import annotations

import html
import json
import re
import stat
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.trustedhost import TrustedHostMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.staticfiles import NotModifiedResponse

from . import LOOPBACK_NAMES, features, raster, stac, tables, volumes
from .catalog import Catalog, Entry
from .paths import reading, relative, resolve, shown

STATIC = Path(__file__).parent / "static"
VENDOR = STATIC / "vendor"
VENDOR_FILES = ("ol.js", "ol.css", "niivue.umd.js")
GEOJSON = "application/geo+json"
OUTSIDE = {"X-Tilemask-Outside": "1"}  # a 404 for a place the output does not cover: the map shows nothing there
BYTE_RANGE = re.compile(rb"(\d+)-(\d*)|-\d+")  # RFC 9110 14.1.2: first-last, first- or -suffix


def valid_byte_ranges(value: bytes) -> bool:
    """Whether a ``Range`` value (its unit ``bytes``) is a valid ranges-specifier (RFC 9110 14.1.1): one range-spec
    or more, each ``first-last`` with last not before first, ``first-`` or ``-suffix`` (a list's empty elements
    skipped, RFC 9110 5.6.1).  Whether it is satisfiable is the file's to say (416)."""
    specs = [spec.strip(b" \t") for spec in value.split(b"=", 1)[1].split(b",")]
    matches = [BYTE_RANGE.fullmatch(spec) for spec in specs if spec]
    return bool(matches) and all(m and not (m[2] and _number(m[2]) < _number(m[1])) for m in matches)


def _number(digits: bytes) -> tuple[int, bytes]:
    """Decimal ``digits`` as a key that orders as their value, with no int() (which refuses 4,300 digits or more;
    :func:`bounded_range`)."""
    digits = digits.lstrip(b"0")
    return len(digits), digits


def bounded_range(value: bytes) -> bytes:
    """A valid ``Range`` value with each number over 10**18 (leading zeros left out) as 10**18, more than any file's
    size: Starlette reads them with int(), which refuses 4,300 digits or more, and it answered such a range with a
    400 where its value says a 416 (first past the end) or the rest of the file (last or suffix past the end)."""
    return re.sub(rb"\d{19,}", _bounded, value)


def _bounded(number: re.Match) -> bytes:
    digits = number[0].lstrip(b"0") or b"0"
    return digits if len(digits) <= 18 else b"1" + b"0" * 18


def ignored_range(name: bytes, value: bytes) -> bool:
    """A ``Range`` header to ignore, as RFC 9110 14.2 says a server does (MUST for a unit it does not know, MAY for an
    invalid ranges-specifier): another unit than bytes, or ranges that are invalid, as ``bytes=5-2`` (Starlette
    answered both with a 400)."""
    if name != b"range":
        return False
    value = value.strip().lower()
    return not value.startswith(b"bytes=") or not valid_byte_ranges(value)


class SatisfiableParts(FileResponse):
    """A file answered as Starlette answers it, but for a set of byte ranges of which some start past its end: RFC
    9110 14.1.2 calls the set satisfiable when one of its ranges is, and a server answers with those (Starlette
    answered the whole set with a 416; one only past the end is still a 416)."""

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        unit, _, specs = http_range.partition("=")
        kept = [spec for spec in specs.split(",")
                if any(start < file_size for start, _ in cls._parse_ranges(spec, file_size))]  # fmt: skip
        return super()._parse_range_header(f"{unit}={','.join(kept or [specs])}", file_size)


class HeadAsGet:
    """HEAD of every GET route, answered as GET without its body (RFC 9110 9.1: every general-purpose server
    supports both; FastAPI's routes answered 405); ``/files`` and ``/static`` answer HEAD themselves, without
    reading the file.  A ``Range`` of another unit than bytes, or one whose ranges are invalid (``bytes=5-2``), is
    ignored, as RFC 9110 14.2 says (:func:`ignored_range`; it was a 400)."""

    ANSWER_HEAD = ("/files/", "/static/")

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = [(k, bounded_range(v) if k == b"range" else v)
                   for k, v in scope["headers"] if not ignored_range(k, v)]  # fmt: skip
        scope = {**scope, "headers": headers}
        if scope["method"] != "HEAD" or scope["path"].startswith(self.ANSWER_HEAD):
            return await self.app(scope, receive, send)

        async def without_body(message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, without_body)


def create_app(
    folder: str | Path, cors_origins: tuple[str, ...] = (), allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES
) -> FastAPI:
    """The app over ``folder``. ``allowed_hosts``: the names clients may use in their ``Host`` header (by
    default loopback only, so a web page cannot reach the server through DNS rebinding); ``("*",)`` for any."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"{folder}: not a folder")
    catalog = Catalog(root)
    preconditions = StaticFiles(directory=root)  # Starlette's conditional GET, for /files
    app = FastAPI(title="tilemask serve", docs_url=None, redoc_url=None)  # the docs pages load from a CDN
    app.add_middleware(HeadAsGet)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "HEAD"],
                           allow_headers=["Range"],
                           expose_headers=["Content-Range", "Accept-Ranges", *OUTSIDE])  # fmt: skip
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def entry_at(output: str, *kinds: str) -> Entry:
        entry = catalog.find(relative(root, resolve(root, output)), *kinds)
        if entry is None:
            raise HTTPException(404, f"{output}: not a {' or '.join(kinds)} output")
        return entry

    def map_labels(output: str, probabilities: bool = False) -> Entry:
        """A label output with a place on the Earth (tiles, points, the map); with ``probabilities``, also the one
        whose probabilities COG ``output`` names (its tiles: a band's colour ramp)."""
        path = relative(root, resolve(root, output))
        if probabilities and catalog.find(path, "labels") is None:
            entry = next((e for e in catalog.entries() if e.kind == "labels" and e.probabilities == path), None)
            if entry is None:
                raise HTTPException(404, f"{output}: not a labels or probabilities output")
        else:
            entry = entry_at(output, "labels")
        if entry.is_volume or entry.bounds is None:
            raise HTTPException(400, f"{output}: labels without a CRS (a volume or an image) have no map tiles")
        return entry

    @app.get("/")
    def index(request: Request, f: str | None = None):
        entries = catalog.entries()
        base = str(request.base_url)
        if f == "json" or (f is None and "application/json" in request.headers.get("accept", "")):
            return {
                "title": f"tilemask: {shown(root.name)}",
                "outputs": [e.to_json() for e in entries],
                "links": [
                    {"href": base, "rel": "self", "type": "application/json"},
                    {"href": f"{base}openapi.json", "rel": "service-desc", "type": "application/vnd.oai.openapi+json;version=3.1"},
                    {"href": f"{base}conformance", "rel": "conformance", "type": "application/json"},
                    {"href": f"{base}collections", "rel": "data", "type": "application/json"},
                    {"href": f"{base}stac/catalog.json", "rel": "catalog", "type": "application/json"},
                ],
            }  # fmt: skip
        return HTMLResponse(_index_html(root, entries))

    @app.api_route("/files/{path:path}", methods=["GET", "HEAD"])
    def files(path: str, request: Request):
        target = resolve(root, path)
        try:
            found = target.stat()
        except OSError:
            found = None
        if found is None or not stat.S_ISREG(found.st_mode):
            raise HTTPException(404, f"not found: {path}")
        response = SatisfiableParts(target, stat_result=found)  # its ETag and Last-Modified set now
        if preconditions.is_not_modified(response.headers, request.headers):  # a client's copy still current: 304,
            return NotModifiedResponse(response.headers)  # as Starlette's static files answer
        return response

    @app.get("/tiles/{z}/{x}/{y}.png")
    def tiles(
        output: str, z: int = PathParam(ge=0, le=30), x: int = PathParam(ge=0), y: int = PathParam(ge=0),
        band: int | None = Query(None, ge=1),
    ):  # fmt: skip
        entry = map_labels(output, probabilities=True)
        if x >= 2**z or y >= 2**z:  # WebMercatorQuad has 2^z tiles a side: a larger x would wrap around the world
            raise HTTPException(404, f"tile {z}/{x}/{y} is outside the tile matrix (0 to {2**z - 1} at zoom {z})",
                                headers=OUTSIDE)  # fmt: skip
        if band is None and entry.path != relative(root, resolve(root, output)):  # the probabilities named
            raise HTTPException(422, f"{output}: give the band to show: {raster.band_choices(root, entry)}")
        if band is not None and not entry.probabilities:
            raise HTTPException(404, f"{output}: no probabilities were written")
        try:
            with reading(entry.path):
                if band is None:
                    body = raster.label_tile(root, entry, x, y, z)
                else:
                    body = raster.probability_tile(root, entry, band, x, y, z)
        except raster.OUTSIDE:
            raise HTTPException(404, "tile outside the output", headers=OUTSIDE) from None
        except IndexError:
            raise HTTPException(404, f"{output}: no probabilities band {band}") from None
        return Response(body, media_type="image/png", headers={"Cache-Control": "max-age=60"})

    @app.get("/point")
    def point(output: str, lon: float = Query(ge=-180, le=180), lat: float = Query(ge=-90, le=90)):
        entry = map_labels(output)
        try:
            with reading(entry.path):
                return raster.point(root, entry, lon, lat)
        except raster.OUTSIDE:
            raise HTTPException(404, f"({lon}, {lat}) is outside {output}", headers=OUTSIDE) from None

    @app.get("/stats")
    def stats(output: str):
        entry = entry_at(output, "table", "polygons")
        with reading(entry.path):
            return Response(tables.records_json(root / entry.path), media_type="application/json")

    @app.get("/conformance")
    def conformance():
        return {"conformsTo": features.CONFORMANCE}

    @app.get("/collections")
    def collections(request: Request):
        base = str(request.base_url)
        return {
            "collections": [features.collection(e, base) for e in catalog.entries() if e.kind == "polygons"],
            "links": [{"href": f"{base}collections", "rel": "self", "type": "application/json"}],
        }

    def polygons(collection_id: str) -> Entry:
        entry = catalog.by_id(collection_id, "polygons")
        if entry is None:
            raise HTTPException(404, f"no collection {collection_id}")
        return entry

    @app.get("/collections/{collection_id}")
    def one_collection(collection_id: str, request: Request):
        return features.collection(polygons(collection_id), str(request.base_url))

    @app.get("/collections/{collection_id}/items")
    def items(
        collection_id: str, request: Request, bbox: str | None = None,
        limit: int = Query(features.DEFAULT_LIMIT, ge=1, json_schema_extra={"maximum": features.MAX_LIMIT}),
        offset: int = Query(0, ge=0),
    ):  # fmt: skip
        limit = min(limit, features.MAX_LIMIT)  # a larger limit is served as the maximum, with a next link
        entry = polygons(collection_id)
        unknown = sorted(set(request.query_params) - features.ITEMS_PARAMETERS)
        if unknown:  # /req/core/query-param-unknown
            raise HTTPException(400, f"unknown query parameter {', '.join(unknown)}: items takes "
                                     f"{', '.join(sorted(features.ITEMS_PARAMETERS))}")  # fmt: skip
        box = features.parse_bbox(bbox)
        with reading(entry.path):
            body = features.items(root, entry, str(request.base_url), box, limit, offset)
        return JSONResponse(body, media_type=GEOJSON)

    @app.get("/collections/{collection_id}/items/{fid}")
    def one_item(collection_id: str, fid: str):
        entry = polygons(collection_id)
        if not re.fullmatch(r"-?[0-9]+", fid):  # feature ids are the layer's integer fids: no such feature
            raise HTTPException(404, f"no feature {fid} in {entry.id}")
        with reading(entry.path):
            return JSONResponse(features.item(root, entry, int(fid)), media_type=GEOJSON)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        """OGC API - Features' routes answer a parameter of an invalid value (``limit=0``, ``offset=-1``) with
        400 (/req/core/query-param-invalid); the others with FastAPI's 422."""
        status = 400 if request.scope.get("endpoint") in (items, one_item) else 422
        return JSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=status)

    @app.get("/stac/catalog.json")
    def stac_catalog(request: Request):
        return stac.catalog(catalog.entries(), str(request.base_url))

    @app.get("/stac/items/{item_id}.json")
    def stac_item(item_id: str, request: Request):
        entry = catalog.by_id(item_id, "labels", "polygons")
        if entry is None:
            raise HTTPException(404, f"no item {item_id}")
        with reading(entry.path):
            modified = (root / entry.path).stat().st_mtime
        return JSONResponse(stac.item(entry, str(request.base_url), modified), media_type=GEOJSON)

    @app.get("/volumes/{path:path}")
    def volume(path: str):
        target = resolve(root, path)
        entry = catalog.find(relative(root, target), "labels", "scan", "probabilities")
        if entry is None or entry.format != "nifti":
            raise HTTPException(404, f"{path}: not a NIfTI volume")
        with reading(path):  # removed since the catalog looked (its stat included): a 404, not a 500
            st = target.stat()
            body = volumes.browser_copy(target, (st.st_size, st.st_mtime_ns))
        return Response(body, media_type="application/gzip")

    @app.get("/map")
    def map_page(output: str | None = None):
        _require_vendor()
        entries = catalog.entries()
        rasters = [e for e in entries if e.kind == "labels" and e.bounds]
        if output is not None:
            rasters = [map_labels(output)]
        config = {
            "rasters": [e.to_json() for e in rasters],
            "polygons": [e.to_json() for e in entries if e.kind == "polygons"],
            "zoom_to_output": output is not None,  # the view fitted to it, not to every layer with it
        }
        return HTMLResponse(_page("map.html", config))

    @app.get("/view")
    def view_page(volume: str, scan: str | None = None):
        _require_vendor()
        labels = entry_at(volume, "labels")
        if not labels.is_volume or labels.format != "nifti":
            raise HTTPException(400, f"{volume}: /view shows NIfTI label volumes")
        if scan is None:  # the scan on the same grid, found among all the entries
            scan = catalog.linked(labels).scan
        scan_entry = entry_at(scan, "scan") if scan else None
        config = {
            "labels": _volume_url(labels),
            "scan": _volume_url(scan_entry) if scan_entry else None,
            "classes": labels.legend(),
            "nodata": labels.nodata,
        }
        return HTMLResponse(_page("view.html", config))

    return app


def _volume_url(entry: Entry) -> dict:
    name = Path(entry.path).name
    route = "volumes" if volumes.stride(entry.shape) > 1 else "files"
    return {"url": f"{route}/{quote(entry.path)}", "name": name, "path": entry.path}


def _require_vendor() -> None:
    missing = [name for name in VENDOR_FILES if not (VENDOR / name).is_file()]
    if missing:
        raise HTTPException(
            503, f"the page scripts are not bundled ({', '.join(missing)} missing): run `python web/bundle.py`"
        )


def _page(name: str, config: dict) -> str:
    text = (STATIC / name).read_text()
    payload = json.dumps(config).replace("<", "\\u003c")  # nothing in it can close the script element
    return text.replace("__TILEMASK_CONFIG__", payload)


def _index_html(root: Path, entries: list[Entry]) -> str:
    rows = []
    for e in entries:
        path = html.escape(e.path)
        q = quote(e.path)
        if (root / e.path).is_dir():  # a Zarr store: /files/ serves its keys, not the folder; its metadata
            links = [f'<a href="files/{q}/zarr.json">zarr.json</a>'] if (root / e.path / "zarr.json").is_file() else []
        else:
            links = [f'<a href="files/{q}">file</a>']
        if e.kind == "labels" and e.bounds:
            links.append(f'<a href="map?output={q}">map</a>')
        if e.kind == "labels" and e.is_volume and e.format == "nifti":
            links.append(f'<a href="view?volume={q}">view</a>')
        if e.kind == "polygons":
            links.append(f'<a href="collections/{quote(e.id)}/items?limit=100">features</a>')
        if e.kind == "table":
            links.append(f'<a href="stats?output={q}">records</a>')
        names = [c["name"] for c in e.legend()] if e.kind == "labels" else e.class_names
        classes = ", ".join(html.escape(name) for name in names)
        rows.append(f"<tr><td>{path}</td><td>{e.kind}</td><td>{e.format}</td><td>{classes}</td>"
                    f"<td>{' '.join(links)}</td></tr>")  # fmt: skip
    return (
        "<!doctype html><html><head><meta charset='utf-8'><link rel='icon' href='data:,'>"
        "<title>tilemask outputs</title>"
        "<link rel='stylesheet' href='static/tilemask.css'></head><body>"
        f"<h1>tilemask: {html.escape(shown(root.name))}</h1>"
        "<p><a href='map'>map</a> · <a href='stac/catalog.json'>STAC</a> · <a href='collections'>OGC API Features</a>"
        " · <a href='?f=json'>JSON</a></p>"
        "<table><tr><th>path</th><th>kind</th><th>format</th><th>classes</th><th></th></tr>"
        + "".join(rows) + "</table></body></html>"
    )  # fmt: skip
