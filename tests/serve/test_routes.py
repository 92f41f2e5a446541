"""``tilemask serve`` against the readers users have: GDAL's /vsicurl/, rasterio, geopandas, pystac.

Every expected value comes from the files themselves, read with rasterio /
pyogrio / pandas, never from the server's own code.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

import geopandas as gpd
import httpx
import numpy as np
import pandas as pd
import pytest
import rasterio
from PIL import Image
from pyproj import Transformer
from rasterio.warp import Resampling, reproject
from shapely import from_wkt as shapely_wkt
from shapely.geometry import Polygon, box, shape

from tilemask.classes import class_colours

from .conftest import SECRET

LABELS = "RGB.byte_mask.tif"
PROBS = "RGB.byte_mask_probabilities.tif"
POLYGONS = "RGB.byte_polygons.gpkg"


def get(url: str, **kw) -> httpx.Response:
    return httpx.get(url, timeout=30, **kw)


@pytest.mark.slow  # 39 s in a loaded default run (2026-12-07)
def test_a_file_the_client_has_is_not_sent_again(server):
    """``/files`` gave an ETag and a Last-Modified but answered 200 with the whole file to a client that held it
    (If-None-Match, If-Modified-Since), as QGIS and browsers ask; now 304, as Starlette's static files do."""
    whole = get(f"{server}files/{PROBS}")
    assert whole.status_code == 200 and whole.content
    etag, modified = whole.headers["etag"], whole.headers["last-modified"]
    for method in (httpx.get, httpx.head):
        for held in ({"If-None-Match": etag}, {"If-Modified-Since": modified}):
            answer = method(f"{server}files/{PROBS}", headers=held, timeout=30)
            assert answer.status_code == 304 and not answer.content and answer.headers["etag"] == etag, held
    assert get(f"{server}files/{PROBS}", headers={"If-None-Match": '"another"'}).content == whole.content


def tile_bounds(x: int, y: int, z: int):
    import morecantile

    return morecantile.tms.get("WebMercatorQuad").xy_bounds(x, y, z)


def expected_tile(path, x, y, z, band=1):
    """What a 256 x 256 Web Mercator tile of ``path`` should hold: GDAL's nearest warp, outside = -1."""
    b = tile_bounds(x, y, z)
    out = np.full((256, 256), -1, np.int32)
    with rasterio.open(path) as ds:
        data = ds.read(band).astype(np.int32)
        reproject(
            data, out, src_transform=ds.transform, src_crs=ds.crs, src_nodata=None,
            dst_transform=rasterio.transform.from_bounds(b.left, b.bottom, b.right, b.top, 256, 256),
            dst_crs="EPSG:3857", dst_nodata=-1, resampling=Resampling.nearest,
        )  # fmt: skip
    return out


def png(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGBA"))


def test_gdal_vsicurl_reads_the_label_cog_through_the_server_exactly(server, served_folder):
    url = f"/vsicurl/{server}files/{LABELS}"
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), rasterio.open(url) as remote:
        with rasterio.open(served_folder / LABELS) as local:
            assert remote.profile == local.profile
            np.testing.assert_array_equal(remote.read(), local.read())
            np.testing.assert_array_equal(remote.read(1, out_shape=(90, 99)), local.read(1, out_shape=(90, 99)))
            assert remote.tags() == local.tags()
            assert remote.colormap(1) == local.colormap(1)
            assert remote.descriptions == local.descriptions
            names = remote.tags(1, "")  # category names come from the .aux.xml sidecar, fetched by GDAL
            assert names == local.tags(1, "")
    assert (served_folder / f"{LABELS}.aux.xml").exists()
    aux = get(f"{server}files/{LABELS}.aux.xml")
    assert aux.content == (served_folder / f"{LABELS}.aux.xml").read_bytes() and b"cloud" in aux.content


def test_range_requests_return_exactly_the_bytes_asked_for(server, served_folder):
    data = (served_folder / PROBS).read_bytes()
    r = get(f"{server}files/{PROBS}", headers={"Range": "bytes=1000-5999"})
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes 1000-5999/{len(data)}"
    assert r.content == data[1000:6000]
    head = httpx.head(f"{server}files/{PROBS}", timeout=30)
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(data)
    assert head.headers["accept-ranges"] == "bytes"
    zarr_key = get(f"{server}files/zarr/RGB.byte_mask.zarr/zarr.json")
    assert json.loads(zarr_key.content)["attributes"]["tilemask"]["classes"] == ["water", "land", "cloud"]


@pytest.mark.parametrize("z", [7, 9, 11])
def test_label_tiles_show_each_pixel_in_its_class_colour(server, served_folder, z):
    import morecantile

    with rasterio.open(served_folder / LABELS) as ds:
        names = json.loads(ds.tags()["TILEMASK_CLASSES"])
        nodata = int(ds.nodata)
    tms = morecantile.tms.get("WebMercatorQuad")
    tile = tms.tile(-77.9, 24.6, z)
    rgba = png(get(f"{server}tiles/{z}/{tile.x}/{tile.y}.png", params={"output": LABELS}))
    expected = expected_tile(served_folder / LABELS, tile.x, tile.y, z)
    colours = class_colours(len(names))
    want = np.zeros((256, 256, 4), np.uint8)
    for value, colour in colours.items():
        want[expected == value] = colour
    covered = expected >= 0
    assert covered.mean() > 0.2
    same = np.all(rgba == want, axis=-1)
    # pixels on class edges may take the neighbour's value (overviews at low zoom, half-pixel rounding)
    assert same[covered].mean() > (0.97 if z >= 9 else 0.85), same[covered].mean()
    empty = (expected < 0) | (expected == nodata)  # outside and nodata: transparent
    if empty.any():
        assert (rgba[empty, 3] == 0).mean() > (0.999 if z >= 9 else 0.97), (rgba[empty, 3] == 0).mean()
    for value in (1, 2):  # land and cloud are on this tile in their colours
        assert np.all(rgba[expected == value] == colours[value], axis=-1).mean() > (0.9 if z >= 9 else 0.75)


def test_probability_tiles_are_a_ramp_of_the_band(server, served_folder):
    import morecantile
    from rio_tiler.colormap import cmap

    tile = morecantile.tms.get("WebMercatorQuad").tile(-77.9, 24.6, 10)
    rgba = png(get(f"{server}tiles/10/{tile.x}/{tile.y}.png", params={"output": LABELS, "band": 3}))
    expected = expected_tile(served_folder / PROBS, tile.x, tile.y, 10, band=3)
    ramp = np.array([cmap.get("viridis")[i] for i in range(256)], np.uint8)
    inside = expected >= 0
    agree = np.all(rgba[inside] == ramp[expected[inside]], axis=-1).mean()
    assert agree > 0.97, agree
    assert np.all(rgba[~inside, 3] == 0)
    assert get(f"{server}tiles/10/{tile.x}/{tile.y}.png", params={"output": LABELS, "band": 0}).status_code == 422
    # the probabilities COG named itself, as docs/DESIGN.md's route table does: it was "not a labels output" (404)
    by_name = get(f"{server}tiles/10/{tile.x}/{tile.y}.png", params={"output": PROBS, "band": 3})
    assert by_name.status_code == 200 and np.array_equal(png(by_name), rgba)
    unbanded = get(f"{server}tiles/10/{tile.x}/{tile.y}.png", params={"output": PROBS})
    assert unbanded.status_code == 422  # each band with its class: it said "&band=1 for the first class"
    assert unbanded.json()["detail"].endswith("give the band to show: &band=1 (water), &band=2 (land), &band=3 (cloud)")


@pytest.mark.parametrize("store", ["zarr/RGB.byte_mask.zarr", "zarr/RGB.byte_mask.ome.zarr"])
@pytest.mark.parametrize("band", [None, 2])
def test_zarr_output_tiles_equal_the_cog_tiles_of_the_same_run(server, store, band):
    import morecantile

    tile = morecantile.tms.get("WebMercatorQuad").tile(-77.9, 24.6, 10)
    extra = {"band": band} if band else {}
    cog = png(get(f"{server}tiles/10/{tile.x}/{tile.y}.png", params={"output": LABELS, **extra}))
    zarr = png(get(f"{server}tiles/10/{tile.x}/{tile.y}.png", params={"output": store, **extra}))
    assert np.all(cog == zarr, axis=-1).mean() > 0.999


@pytest.mark.parametrize("variable", ["labels", "probabilities"])
def test_a_zoomed_out_tile_of_an_ome_zarr_reads_its_pyramid_not_its_full_resolution(served_folder, tmp_path, variable):
    """Zoomed out, every tile read the full-resolution array (a reviewer measured 5 s and 1 GB a tile at zoom 6 on
    16384^2): with level 0 all zeros, a tile from the pyramid is whole, and equals the one from the intact store; a
    zoomed-in tile still reads level 0. (Level 0's chunks are zeroed, not removed: an output missing chunks of its
    labels is left out of the catalog.)"""
    import morecantile
    import zarr
    from starlette.testclient import TestClient

    from tilemask.serve import create_app

    store = tmp_path / "RGB.byte_mask.ome.zarr"
    shutil.copytree(served_folder / "zarr" / store.name, store)
    tile = morecantile.tms.get("WebMercatorQuad").tile(-77.9, 24.6, 6)  # 2.4 km pixels: level 2, of 1.2 km ones
    near = morecantile.tms.get("WebMercatorQuad").tile(-77.9, 24.6, 13)
    params = {"output": store.name, **({"band": 2} if variable == "probabilities" else {})}
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1") as client:
        whole = png(client.get(f"/tiles/6/{tile.x}/{tile.y}.png", params=params))
        detail = png(client.get(f"/tiles/13/{near.x}/{near.y}.png", params=params))
    level0 = "labels/labels/0" if variable == "labels" else "0"
    zeroed = zarr.open_array(store / level0, mode="r+").with_config({"write_empty_chunks": True})
    zeroed[...] = 0  # every chunk of level 0 stored, all zeros
    assert zeroed.nchunks_initialized == zeroed.nchunks
    (tmp_path / "moved").mkdir()  # a fresh app: nothing cached from the intact store
    shutil.move(store, tmp_path / "moved" / store.name)
    with TestClient(create_app(tmp_path / "moved"), base_url="http://127.0.0.1") as client:
        pyramid = png(client.get(f"/tiles/6/{tile.x}/{tile.y}.png", params=params))
        gone = png(client.get(f"/tiles/13/{near.x}/{near.y}.png", params=params))
    assert (whole[..., 3] > 0).mean() > 0.01 and np.array_equal(pyramid, whole)
    assert not np.array_equal(gone, detail)  # level 0 is what a zoomed-in tile reads


@pytest.mark.parametrize("output", [LABELS, "zarr/RGB.byte_mask.zarr", "zarr/RGB.byte_mask.ome.zarr"])
def test_point_gives_the_label_class_and_probabilities_of_the_pixel(server, served_folder, output):
    with rasterio.open(served_folder / LABELS) as ds, rasterio.open(served_folder / PROBS) as probs:
        to_lonlat = Transformer.from_crs(ds.crs, "OGC:CRS84", always_xy=True)
        names = json.loads(ds.tags()["TILEMASK_CLASSES"])
        labels = ds.read(1)
        rng = np.random.default_rng(0)
        for row, col in zip(rng.integers(0, ds.height, 20), rng.integers(0, ds.width, 20)):
            x, y = ds.xy(row, col)
            lon, lat = to_lonlat.transform(x, y)
            answer = get(f"{server}point", params={"output": output, "lon": lon, "lat": lat}).json()
            value = int(labels[row, col])
            if value == ds.nodata:
                assert answer["value"] is None and answer["class"] is None
                continue
            assert (answer["value"], answer["class"]) == (value, names[value])
            band = probs.read(window=((row, row + 1), (col, col + 1)))[:, 0, 0] / 255.0
            np.testing.assert_allclose([answer["probabilities"][n] for n in names], band, atol=1e-6)
    outside = get(f"{server}point", params={"output": LABELS, "lon": 10, "lat": 10})
    assert outside.status_code == 404 and outside.headers["X-Tilemask-Outside"] == "1"  # the map's signal, not text


def test_point_names_a_sigmoids_one_probability_for_the_foreground(tmp_path):
    """A sigmoid's one probability channel (classes ``[background, foreground]``) is the foreground's: ``/point``
    gave it under the background's name, ``{"land": 0.901961}`` for a pixel the labels call water; a tile asked of
    the probabilities without a band names it so."""
    from rasterio.transform import from_origin

    from tilemask.geometry import RasterGeometry
    from tilemask.serve.catalog import Entry
    from tilemask.serve.raster import band_choices, point
    from tilemask.sinks import OutputLayout, make_sink

    labels = np.zeros((64, 64), np.uint8)
    labels[:, 32:] = 1
    probabilities = np.where(labels == 1, 230, 20).astype(np.uint8)[None]
    geometry = RasterGeometry(rasterio.CRS.from_epsg(32618).to_wkt(), from_origin(500000, 4000000, 30, 30).to_gdal())
    layout = OutputLayout((64, 64), (64, 64), ("land", "water"), "uint8", 1, "uint8", geometry, "x.tif", None)
    sink = make_sink(str(tmp_path / "m.tif"), layout)
    sink.create()
    sink.write(((0, 64), (0, 64)), labels, probabilities)
    sink.commit()
    entry = Entry("m.tif", "labels", "cog", "m", ("land", "water"), probabilities="m_probabilities.tif")
    lon, lat = Transformer.from_crs("EPSG:32618", "OGC:CRS84", always_xy=True).transform(500000 + 48 * 30, 3999000)
    answer = point(tmp_path, entry, lon, lat)
    assert (answer["class"], answer["probabilities"]) == ("water", {"water": round(230 / 255, 6)})
    assert band_choices(tmp_path, entry) == "&band=1 (water)"  # a tile's 422 said "&band=1 for the first class"


def test_stats_serves_the_table_tilemask_wrote(server, served_folder):
    records = get(f"{server}stats", params={"output": "RGB.byte_stats.csv"}).json()
    table = pd.read_csv(served_folder / "RGB.byte_stats.csv")
    assert len(records) == len(table) > 0
    pd.testing.assert_frame_equal(pd.DataFrame.from_records(records), table, check_dtype=False)
    assert get(f"{server}stats", params={"output": LABELS}).status_code == 404


def test_ogc_api_features_pages_and_filters_as_geopandas_reads(server, served_folder):
    landing = get(server, headers={"Accept": "application/json"}).json()
    assert {link["rel"] for link in landing["links"]} >= {"conformance", "data"}
    conformance = get(f"{server}conformance").json()["conformsTo"]
    assert "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core" in conformance
    ids = [c["id"] for c in get(f"{server}collections").json()["collections"]]
    assert sorted(ids) == ["RGB.byte_polygons", "polygons_fgb", "polygons_parquet"]
    items = f"{server}collections/RGB.byte_polygons/items"

    truth = gpd.read_file(served_folder / POLYGONS)
    first = get(items)
    assert first.headers["content-type"] == "application/geo+json"
    first = first.json()
    assert first["numberMatched"] == len(truth) and first["numberReturned"] == 10  # default limit

    bbox = (-78.3, 24.9, -78.0, 25.2)
    # OGC API Features /req/core/fc-bbox-response: the features whose geometry intersects the bbox (in CRS84).
    # Straight edges in UTM are not straight in degrees: a feature within 1e-5 degrees (1 m) of an edge may go
    # either way; every other one must be returned, and no feature further out.
    in_crs84 = gpd.read_file(served_folder / POLYGONS, fid_as_index=True).to_crs("OGC:CRS84")  # ids: the fids
    surely_in = set(in_crs84.index[in_crs84.intersects(box(*bbox).buffer(-1e-5))])
    maybe_in = set(in_crs84.index[in_crs84.intersects(box(*bbox).buffer(1e-5))])
    to_layer = Transformer.from_crs("OGC:CRS84", truth.crs, always_xy=True)
    in_envelope = gpd.read_file(served_folder / POLYGONS, bbox=to_layer.transform_bounds(*bbox, densify_pts=21))
    assert 0 < len(surely_in) and len(maybe_in) < len(in_envelope) < len(truth)  # the envelope holds more
    seen, url, params = [], items, {"bbox": ",".join(map(str, bbox)), "limit": 50}
    while url:
        page = get(url, params=params).json()
        seen.extend(page["features"])
        matched = page["numberMatched"]
        url = next((link["href"] for link in page["links"] if link["rel"] == "next"), None)
        params = None
    ids = {f["id"] for f in seen}
    assert len(seen) == len(ids) == matched and surely_in <= ids <= maybe_in  # feature ids are the file's fids
    world = get(items, params={"bbox": "-180,-90,180,90", "limit": 10000}).json()  # a client zoomed out
    assert world["numberMatched"] == world["numberReturned"] == len(truth)
    inside = shape(seen[0]["geometry"]).representative_point()
    point = get(items, params={"bbox": f"{inside.x},{inside.y},{inside.x},{inside.y}"}).json()  # no width: a point
    assert seen[0]["id"] in {f["id"] for f in point["features"]}

    one = get(f"{items}/{seen[0]['id']}").json()
    truth_one = gpd.read_file(served_folder / POLYGONS, fid_as_index=True).loc[[seen[0]["id"]]].to_crs("OGC:CRS84")
    assert shape(one["geometry"]).equals_exact(truth_one.geometry.iloc[0], 1e-9)
    assert one["properties"]["class"] == truth_one["class"].iloc[0]
    lon, lat = np.asarray(shape(one["geometry"]).exterior.coords)[0]
    assert -80 < lon < -76 and 23 < lat < 26  # CRS84: longitude first
    for other in ("polygons_fgb", "polygons_parquet"):  # FlatGeobuf (OGR) and GeoParquet (geopandas) alike
        page = get(f"{server}collections/{other}/items", params={"bbox": ",".join(map(str, bbox)), "limit": 10000})
        page = page.json()
        assert page["numberMatched"] == page["numberReturned"] == len(seen)
        got = sorted(shape(f["geometry"]).wkb for f in page["features"])
        assert got == sorted(shape(f["geometry"]).wkb for f in seen)
    assert get(items, params={"bbox": "1,2,3"}).status_code == 400
    assert get(f"{server}collections/nope/items").status_code == 404


def test_stac_catalog_lists_each_output_with_its_classes(server):
    import pystac

    stac = pystac.Catalog.from_file(f"{server}stac/catalog.json")
    items = {item.id: item for item in stac.get_items()}
    # two outputs share the stem RGB.byte_mask (a COG and a Zarr), so both are named by their paths
    assert set(items) == {
        "RGB.byte_mask.tif",
        "zarr--RGB.byte_mask.zarr",
        "zarr--RGB.byte_mask.ome.zarr",
        "RGB.byte_polygons",
        "polygons_fgb",
        "polygons_parquet",
        "anatomical_labels",
        "symprob_mask",
    }
    assert "probabilities" not in items["symprob_mask"].assets  # its probabilities lead out of the folder
    labels = items["RGB.byte_mask.tif"]
    classes = labels.assets["labels"].extra_fields["classification:classes"]
    assert [c["description"] for c in classes] == ["water", "land", "cloud"]
    assert classes[2]["color_hint"] == "%02X%02X%02X" % class_colours(3)[2][:3]
    assert labels.bbox[0] < -77.8 < labels.bbox[2]
    assert get(labels.assets["probabilities"].href).status_code == 200
    assert items["anatomical_labels"].geometry is None  # a volume has no footprint on the Earth


def test_index_lists_the_outputs_in_html_and_json(server):
    listing = get(server, headers={"Accept": "application/json"}).json()["outputs"]
    kinds = {o["path"]: o["kind"] for o in listing}
    assert kinds[LABELS] == "labels" and kinds[PROBS] == "probabilities" and kinds[POLYGONS] == "polygons"
    assert kinds["zarr/RGB.byte_mask.zarr"] == kinds["zarr/RGB.byte_mask.ome.zarr"] == "labels"
    assert kinds["RGB.byte_stats.csv"] == "table"
    assert kinds["anatomical.nii"] == "scan" and kinds["anatomical_labels.nii.gz"] == "labels"
    volume = next(o for o in listing if o["path"] == "anatomical_labels.nii.gz")
    assert volume["scan"] == "anatomical.nii"  # the scan on the same voxel grid
    for hostile in ("inside-but-vrt.tif", "passwd.tif", "ogr-vrt.geojson", "sidecar_mask.tif", "linked.zarr", ".env"):
        assert hostile not in kinds, hostile
    assert next(o for o in listing if o["path"] == "symprob_mask.tif")["probabilities"] is None
    page = get(server).text
    assert "map?output=RGB.byte_mask.tif" in page and "view?volume=anatomical_labels.nii.gz" in page


HOSTILE = [
    "/files/../secret.txt",
    "/files/%2e%2e/secret.txt",
    "/files/%2E%2E%2Fsecret.txt",
    "/files/..%2fsecret.txt",
    "/files/%2fetc%2fpasswd",
    "/files//etc/passwd",
    "/files/escape/secret.txt",
    "/files/passwd.tif",
    "/files/zarr/../../secret.txt",
    "/files/.%2e/secret.txt",
    "/files/%5c..%5csecret.txt",
    "/files/secret.txt%00.tif",
    "/tiles/0/0/0.png?output=../secret.tif",
    "/tiles/0/0/0.png?output=%2e%2e%2fsecret.tif",
    "/tiles/0/0/0.png?output=passwd.tif",
    "/tiles/12/1161/1759.png?output=inside-but-vrt.tif",
    "/point?output=inside-but-vrt.tif&lon=-77.9&lat=24.6",
    "/tiles/12/1161/1759.png?output=symprob_mask.tif&band=1",
    "/tiles/7/36/54.png?output=sidecar_mask.tif",
    "/point?output=linked.zarr&lon=-77.9&lat=24.6",
    "/tiles/12/1161/1759.png?output=linked.zarr",
    "/collections/ogr-vrt/items",
    "/stats?output=ogr-vrt.geojson",
    "/files/.env",
    "/files/escape/../.env",
    "/files/zarr/../.env",
    "/tiles/0/0/0.png?output=/vsicurl/http://127.0.0.1:1/x.tif",
    "/tiles/0/0/0.png?output=http://127.0.0.1:1/x.tif",
    "/point?output=escape/secret.tif&lon=0&lat=0",
    "/stats?output=../secret.txt",
    "/stats?output=escape/secret.txt",
    "/view?volume=../secret.txt",
    "/volumes/escape/secret.txt",
    "/map?output=/etc/passwd",
]


def test_the_hostile_requests_would_succeed_on_files_inside(server):
    """Controls for the hostile list: the same kinds of request on the real outputs answer 200."""
    for path in (
        "/tiles/12/1161/1759.png?output=RGB.byte_mask.tif",
        "/tiles/12/1161/1759.png?output=RGB.byte_mask.tif&band=1",
        "/tiles/7/36/54.png?output=RGB.byte_mask.tif",
        "/point?output=zarr/RGB.byte_mask.zarr&lon=-77.9&lat=24.6",
        "/collections/RGB.byte_polygons/items",
        "/stats?output=RGB.byte_stats.csv",
    ):
        assert get(server + path.lstrip("/")).status_code == 200, path


@pytest.mark.parametrize("path", HOSTILE)
def test_nothing_outside_the_folder_is_ever_read(server, path):
    """Raw requests (no client-side normalisation of ``..``); every one is a 404 that leaks nothing."""
    parts = urlsplit(server)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read().decode("utf-8", "replace")
    conn.close()
    assert response.status == 404, (path, response.status, body)
    assert SECRET not in body and "root:" not in body


@pytest.mark.timeout(60)
def test_another_loopback_address_answers_only_loopback_names(tmp_path):
    """``--host 127.0.0.2`` (or a host name that resolves to loopback, as Debian's own does to 127.0.1.1) is
    loopback too, but it answered any ``Host`` name: a web page could reach it through DNS rebinding."""
    from .conftest import start_server

    (tmp_path / "table.csv").write_text("class,pixels\nland,1\n")
    with start_server(tmp_path, "--host", "127.0.0.2", "--workers", "1") as url:
        parts = urlsplit(url)
        for host, status in (("evil.example", 400), (f"127.0.0.2:{parts.port}", 200), (f"localhost:{parts.port}", 200)):
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            conn.request("GET", "/files/table.csv", headers={"Host": host})
            assert conn.getresponse().status == status, host
            conn.close()


@pytest.mark.timeout(60)
def test_loopback_written_as_an_ipv4_mapped_address_answers_only_loopback_names(tmp_path):
    """``--host ::ffff:127.0.0.1`` listens on loopback only (IPv4's 127.0.0.1 through an IPv6 socket), but Python's
    ``is_loopback`` is False for an IPv4-mapped address: it answered any ``Host`` name, open to DNS rebinding."""
    from .conftest import start_server

    (tmp_path / "table.csv").write_text("class,pixels\nland,1\n")
    with start_server(tmp_path, "--host", "::ffff:127.0.0.1", "--workers", "1") as url:
        port = urlsplit(url).port
        for host, status in (("evil.example", 400), (f"localhost:{port}", 200)):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/files/table.csv", headers={"Host": host})
            assert conn.getresponse().status == status, host
            conn.close()


@pytest.mark.slow  # a second `tilemask serve` process (9 s)
def test_the_server_listens_on_loopback_and_cors_is_off_unless_asked(served_folder, server):
    assert urlsplit(server).hostname == "127.0.0.1"
    parts = urlsplit(server)
    for host, status in (("evil.example", 400), (f"localhost:{parts.port}", 200), (f"127.0.0.1:{parts.port}", 200)):
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        conn.request("GET", "/files/RGB.byte_stats.csv", headers={"Host": host})  # DNS rebinding: a foreign name
        assert conn.getresponse().status == status, host
        conn.close()
    r = get(f"{server}files/{LABELS}", headers={"Origin": "http://example.org"})
    assert "access-control-allow-origin" not in r.headers
    from .conftest import start_server

    with start_server(served_folder, "--cors-origin", "http://example.org") as other:
        r = get(f"{other}files/{LABELS}", headers={"Origin": "http://example.org", "Range": "bytes=0-9"})
        assert r.status_code == 206 and r.headers["access-control-allow-origin"] == "http://example.org"
        r = get(f"{other}files/{LABELS}", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_large_volumes_are_served_to_the_viewer_strided(tmp_path, monkeypatch):
    """A label volume over the texture budget comes back every f-th voxel, with the affine scaled to match."""
    import nibabel as nib
    from starlette.testclient import TestClient

    from tilemask.formats import NIFTI_DESCRIP
    from tilemask.serve import create_app, volumes

    monkeypatch.setattr(volumes, "MAX_VOXELS", 20**3)
    data = np.random.default_rng(0).integers(0, 3, (50, 41, 30), dtype=np.uint8)
    affine = np.array([[0, 0, 1.5, -10], [-0.9, 0, 0, 20], [0, 2.0, 0, 5], [0, 0, 0, 1]])
    img = nib.Nifti1Image(data, affine)
    img.header["descrip"] = NIFTI_DESCRIP
    nib.save(img, tmp_path / "big_labels.nii.gz")
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1") as client:
        page = client.get("/view", params={"volume": "big_labels.nii.gz"})
        assert page.status_code == 200, page.text  # the page scripts are bundled (python web/bundle.py)
        assert '"url": "volumes/big_labels.nii.gz"' in page.text  # the viewer is given the strided copy
        body = client.get("/volumes/big_labels.nii.gz")
    assert body.status_code == 200
    small = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(body.content))
    step = volumes.stride(data.shape)
    assert step == 2 and small.shape == (25, 21, 15) and np.prod(small.shape) <= 20**3
    np.testing.assert_array_equal(np.asarray(small.dataobj), data[::2, ::2, ::2])
    np.testing.assert_allclose(small.affine, affine @ np.diag([2, 2, 2, 1]))
    # voxel (1, 1, 1) of the copy lies where voxel (2, 2, 2) of the volume does, in RAS
    np.testing.assert_allclose(small.affine @ [1, 1, 1, 1], affine @ [2, 2, 2, 1])


@pytest.mark.timeout(60)
def test_uint8_nifti_probabilities_are_listed_and_served_with_their_scale(tmp_path, monkeypatch):
    """The probabilities tilemask writes beside NIfTI labels, uint8 ``round(p * 255)`` with ``scl_slope`` 1/255 and
    their own ``descrip``, are listed as probabilities (not as a scan), and their /volumes/ copy (strided: the first
    class) keeps the stored bytes and the scale: nibabel reads it 0-1, within half a step of p (it read 0-255)."""
    import gzip

    import nibabel as nib
    from starlette.testclient import TestClient

    from tilemask.geometry import VolumeGeometry
    from tilemask.serve import create_app, volumes
    from tilemask.serve.catalog import Catalog
    from tilemask.sinks import OutputLayout, make_sink

    monkeypatch.setattr(volumes, "MAX_VOXELS", 16**3)
    rng = np.random.default_rng(7)
    shape = (30, 26, 20)
    p = rng.random((2, *shape)).astype(np.float32)
    p = np.stack([p[0] / p.sum(0), p[1] / p.sum(0)])
    affine = tuple(tuple(r) for r in [[0, -0.8, 0, 10], [0.9, 0, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    layout = OutputLayout(shape, (32, 32, 32), ("background", "lesion"), "uint8", 2, "uint8", VolumeGeometry(affine),
                          str(tmp_path / "scan.nii.gz"))  # fmt: skip
    sink = make_sink(str(tmp_path / "mask.nii.gz"), layout)
    sink.create()
    sink.write(((0, 30), (0, 26), (0, 20)), p.argmax(0).astype(np.uint8), np.rint(p * 255).astype(np.uint8))
    sink.commit()
    kinds = {e.path: e.kind for e in Catalog(tmp_path).entries()}
    assert kinds == {"mask.nii.gz": "labels", "mask_probabilities.nii.gz": "probabilities"}, kinds
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1") as client:
        body = client.get("/volumes/mask_probabilities.nii.gz")
    assert body.status_code == 200, body.text
    small = nib.Nifti1Image.from_bytes(gzip.decompress(body.content))
    step = volumes.stride(shape)
    assert step == 2 and small.get_data_dtype() == np.uint8
    np.testing.assert_allclose(small.get_fdata(), p[0, ::2, ::2, ::2], rtol=0, atol=1 / 510 + 1e-6)


def test_a_2d_nifti_is_served_as_one_slice(tmp_path, monkeypatch):
    """A 2D NIfTI (a slide) is listed as a scan; its /volumes/ copy, strided when large, was a 500 (IndexError:
    the copy was cut along three axes). It is one slice, with the two axes strided and the affine to match."""
    import nibabel as nib
    from starlette.testclient import TestClient

    from tilemask.serve import create_app, volumes

    monkeypatch.setattr(volumes, "MAX_EDGE", 40)
    data = np.random.default_rng(0).integers(0, 200, (90, 70), dtype=np.int16)
    affine = np.diag([0.5, 0.7, 1.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "slide.nii.gz")
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        body = client.get("/volumes/slide.nii.gz")
    assert body.status_code == 200, body.text
    small = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(body.content))
    assert small.shape == (30, 24, 1)
    np.testing.assert_array_equal(np.asarray(small.dataobj)[..., 0], data[::3, ::3])
    np.testing.assert_allclose(small.affine, affine @ np.diag([3, 3, 1, 1]))


def test_a_damaged_volume_is_a_422_not_a_500(tmp_path):
    """A NIfTI the catalog lists but nibabel cannot read is refused with why, not an error page: here a .nii.gz
    cut short whose last 8 bytes are its whole self's gzip trailer (so its size passes; only reading tells). One
    cut short plainly is refused when opened (its trailer disagrees), as an uncompressed one is: the catalog
    leaves it out."""
    import nibabel as nib
    from starlette.testclient import TestClient

    from tilemask.formats import NIFTI_DESCRIP
    from tilemask.serve import create_app

    img = nib.Nifti1Image(np.random.default_rng(0).integers(0, 3, (40, 40, 40), dtype=np.uint8), np.eye(4))
    img.header["descrip"] = NIFTI_DESCRIP
    nib.save(img, tmp_path / "cut_labels.nii.gz")
    whole = (tmp_path / "cut_labels.nii.gz").read_bytes()
    (tmp_path / "cut_labels.nii.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "damaged_labels.nii.gz").write_bytes(whole[: len(whole) // 2] + whole[-8:])
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        cut = client.get("/volumes/cut_labels.nii.gz")
        answer = client.get("/volumes/damaged_labels.nii.gz")
    assert cut.status_code == 404 and cut.json()["detail"] == "cut_labels.nii.gz: not a NIfTI volume", cut.text
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"].startswith("damaged_labels.nii.gz: cannot read: ")


def test_a_file_removed_after_the_catalog_found_it_is_a_404_not_a_500(tmp_path, monkeypatch):
    """/volumes/ and the STAC item took the file's stat outside their error handler: a NIfTI (or polygons file)
    removed between the catalog finding it and that stat was a 500 with no word of why. Here the file is removed
    right after the real catalog's lookup returns, as another process would."""
    import nibabel as nib
    from starlette.testclient import TestClient

    from tilemask.formats import NIFTI_DESCRIP
    from tilemask.serve import create_app
    from tilemask.serve.catalog import Catalog

    img = nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4))
    img.header["descrip"] = NIFTI_DESCRIP
    nib.save(img, tmp_path / "gone_labels.nii.gz")
    real_find, real_by_id = Catalog.find, Catalog.by_id

    def find_then_remove(self, rel, *kinds):
        found = real_find(self, rel, *kinds)
        (tmp_path / rel).unlink(missing_ok=True)
        return found

    def by_id_then_remove(self, entry_id, *kinds):
        found = real_by_id(self, entry_id, *kinds)
        if found is not None:
            (tmp_path / found.path).unlink(missing_ok=True)
        return found

    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        monkeypatch.setattr(Catalog, "find", find_then_remove)
        answer = client.get("/volumes/gone_labels.nii.gz")
        monkeypatch.setattr(Catalog, "find", real_find)
        nib.save(img, tmp_path / "gone_labels.nii.gz")
        assert client.get("/stac/items/gone_labels.json").status_code == 200
        monkeypatch.setattr(Catalog, "by_id", by_id_then_remove)
        item = client.get("/stac/items/gone_labels.json")
    assert answer.status_code == 404 and answer.json()["detail"] == "gone_labels.nii.gz: not found", answer.text
    assert item.status_code == 404 and item.json()["detail"] == "gone_labels.nii.gz: not found", item.text


def test_damaged_outputs_are_a_422_naming_the_file_not_a_500(tmp_path, served_folder):
    """A label COG with a truncated tile, a Zarr chunk that does not decompress, a FlatGeobuf cut short: the
    catalog lists them (their headers read), and reading them failed with a bare 500."""
    from starlette.testclient import TestClient

    from tilemask.serve import create_app

    whole = (served_folder / LABELS).read_bytes()
    (tmp_path / "cut.tif").write_bytes(whole[: len(whole) // 3])
    shutil.copytree(served_folder / "zarr" / "RGB.byte_mask.zarr", tmp_path / "bad.zarr")
    for chunk in (tmp_path / "bad.zarr" / "labels" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"garbage")
    polygons = (served_folder / "polygons_fgb.fgb").read_bytes()
    (tmp_path / "cutpoly.fgb").write_bytes(polygons[: len(polygons) * 2 // 3])
    lon, lat = -77.75, 24.56
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        assert {e["path"] for e in client.get("/?f=json").json()["outputs"]} >= {"cut.tif", "bad.zarr", "cutpoly.fgb"}
        for url, name in [
            ("/tiles/10/290/439.png?output=cut.tif", "cut.tif"),
            (f"/point?output=cut.tif&lon={lon}&lat={lat}", "cut.tif"),
            ("/tiles/8/72/109.png?output=bad.zarr", "bad.zarr"),
            ("/collections/cutpoly/items?limit=10000", "cutpoly.fgb"),
            ("/stats?output=cutpoly.fgb", "cutpoly.fgb"),
        ]:
            answer = client.get(url)
            assert answer.status_code == 422, (url, answer.status_code, answer.text)
            assert answer.json()["detail"].startswith(f"{name}: cannot read: "), answer.text


@pytest.mark.slow  # 20 s: three formats, five boxes; test_cylindrical_maps_go_on_past_180_degrees: the default run
def test_features_across_the_antimeridian_are_cut_there_and_found_by_any_bbox(tmp_path):
    """Polygons in UTM zone 1, on both sides of 180 degrees. A bbox far wider than the layer transformed into the
    zone to nonsense (the whole world matched 197 of 785 polygons, -100..100 degrees matched 8), a bbox across
    the antimeridian (minlon > maxlon, as OGC API allows and /map sends) was a 400, and a polygon across it came
    out as a band around the globe. The expected sets come from the boxes moved into UTM, not the polygons out."""
    import shapely
    from starlette.testclient import TestClient

    from tilemask.serve import create_app

    cells = [box(x, y, x + 9000, y + 9000) for x in range(0, 270000, 10000) for y in range(0, 200000, 10000)]
    layer = gpd.GeoDataFrame({"class": ["land"] * len(cells)}, geometry=cells, crs="EPSG:32601")
    for suffix, driver in ((".gpkg", "GPKG"), (".fgb", "FlatGeobuf")):
        layer.to_file(tmp_path / f"am{suffix[1:]}{suffix}", driver=driver)
    layer.to_parquet(tmp_path / "amparquet.parquet")
    to_utm = Transformer.from_crs("OGC:CRS84", "EPSG:32601", always_xy=True)

    def in_utm(x0, y0, x1, y1):  # a CRS84 box (one side of the antimeridian) as a densified polygon in the zone
        ring = box(x0, y0, x1, y1).segmentize(0.01)
        return shapely.transform(ring, lambda xy: np.column_stack(to_utm.transform(xy[:, 0], xy[:, 1])))

    boxes = {  # the bbox, and its sides of the antimeridian (None: the whole world)
        "179.5,0,-179.5,1": [(179.5, 0, 180, 1), (-180, 0, -179.5, 1)],
        "179.9,0.5,180,0.6": [(179.9, 0.5, 180, 0.6)],
        "-179.6,0.2,-179.5,1.5": [(-179.6, 0.2, -179.5, 1.5)],
        "-180,-90,180,90": None,
        "-100,-1,100,2": [],
    }
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        for name, path in (("amgpkg", "amgpkg.gpkg"), ("amfgb", "amfgb.fgb"), ("amparquet", "amparquet.parquet")):
            stored = (  # feature ids: a GeoPackage's from 1, a FlatGeobuf's in its spatial index's order, row numbers
                gpd.read_parquet(tmp_path / path) if path.endswith(".parquet")
                else gpd.read_file(tmp_path / path, fid_as_index=True)
            )  # fmt: skip
            extent = client.get(f"/collections/{name}").json()["extent"]["spatial"]["bbox"][0]
            assert extent[0] > extent[2] and 178 < extent[0] < 179 and -180 < extent[2] < -179  # across
            for text, sides in boxes.items():
                answer = client.get(f"/collections/{name}/items", params={"bbox": text, "limit": 10000})
                assert answer.status_code == 200, answer.text
                got = {f["id"] for f in answer.json()["features"]}
                hit = np.full(len(stored), sides is None)
                for side in sides or ():
                    hit |= stored.intersects(in_utm(*side)).to_numpy()
                expected = {int(i) for i in stored.index[hit]}
                assert got == expected, (name, text, len(got), len(expected))
                for feature in answer.json()["features"]:
                    for part in getattr(shape(feature["geometry"]), "geoms", [shape(feature["geometry"])]):
                        x0, _, x1, _ = part.bounds
                        assert -180 <= x0 and x1 <= 180 and x1 - x0 < 1, (name, feature["id"], part.bounds)
        item = client.get("/stac/items/amgpkg.json").json()  # its footprint: a box each side of 180 degrees
        assert item["geometry"]["type"] == "MultiPolygon" and item["bbox"][0] > item["bbox"][2]
        assert [shape(item["geometry"]).geoms[i].bounds[2 - 2 * i] for i in (0, 1)] == [180, -180]
        # a cell across 180 degrees comes out as two parts, one each side
        across = [f for f in client.get("/collections/amgpkg/items", params={"limit": 10000}).json()["features"]
                  if shape(f["geometry"]).geom_type == "MultiPolygon"]  # fmt: skip
        assert across
        for feature in across:
            west, east = sorted(shape(feature["geometry"]).geoms, key=lambda g: g.bounds[0])  # west of 0: -180..
            assert west.bounds[0] == -180 and east.bounds[2] == 180


def test_cylindrical_maps_go_on_past_180_degrees(tmp_path):
    """Cells of Web Mercator and plate carree maps past x = 20037508, which PROJ wraps across 180 degrees: the
    Earth goes on there, so they are cut at the antimeridian (taken for off the Earth, as on a sinusoidal map,
    the first lost its part past 180 and the second its geometry)."""
    from starlette.testclient import TestClient

    from tilemask.serve import create_app

    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        edge = 20037508.342789244
        for name, crs in (("mercator", "EPSG:3857"), ("carree", "EPSG:4087")):
            cells = [box(edge - 1e5, -2e6, edge + 2e5, -1.9e6), box(edge + 1e5, -2e6, edge + 2e5, -1.9e6)]
            gpd.GeoDataFrame({"n": [0, 1]}, geometry=cells, crs=crs).to_file(tmp_path / f"{name}.gpkg")
            answer = client.get(f"/collections/{name}/items", params={"limit": 10})
            assert answer.status_code == 200, answer.text
            parts = {f["properties"]["n"]: shape(f["geometry"]) for f in answer.json()["features"]}
            west, east = sorted(parts[0].geoms, key=lambda g: g.bounds[0])
            assert west.bounds[0] == -180 and east.bounds[2] == 180 and east.bounds[0] < 179.2, name
            assert -179.2 < parts[1].bounds[0] < -179 and parts[1].bounds[2] < -178, name


@pytest.mark.slow  # 18 s in a loaded default run (2026-12-07)
def test_a_polar_polygon_the_antimeridian_cut_fails_on_is_served_not_a_500(tmp_path, client):
    """The demo's labels placed over the North Pole (EPSG:3413, a reviewer's recipe): the land polygon round the
    pole holds a hole the ``antimeridian`` package cannot put back in a piece, an ``AssertionError``; every page
    of items holding it, the item itself and any bbox reaching it answered 500, and /map lost the layer."""
    import antimeridian
    import shapely
    from rasterio.transform import from_origin
    from starlette.testclient import TestClient

    import tilemask
    from tilemask.serve import create_app
    from tilemask.workflow import Workflow

    from .conftest import DEMO

    with rasterio.open(DEMO.parent / "demo" / "RGB.byte.tif") as src:
        pixels = src.read(out_shape=(3, 512, 512))
    scene = tmp_path / "polar.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=512, height=512, count=3, dtype="uint8", nodata=0,
                       crs="EPSG:3413", transform=from_origin(-2560000, 2560000, 10000, 10000)) as out:  # fmt: skip
        out.write(pixels)
    served = tmp_path / "served"
    sets = [f"input={scene}", f"output.path={served}/{{stem}}_mask.tif", "output.quicklook=false",
            f"output.vectors={served}/{{stem}}_polygons.gpkg"]  # fmt: skip
    tilemask.run(Workflow.from_yaml(DEMO, sets), client)
    layer = gpd.read_file(served / "polar_polygons.gpkg", fid_as_index=True)
    to_crs84 = Transformer.from_crs("EPSG:3413", "OGC:CRS84", always_xy=True).transform

    def cut_fails(polygon) -> bool:  # as the server cuts: densified in the layer's CRS, then moved
        x0, y0, x1, y1 = polygon.bounds
        dense = shapely.transform(shapely.segmentize(polygon, np.hypot(x1 - x0, y1 - y0) / 256), to_crs84,
                                  interleaved=False)  # fmt: skip
        try:
            antimeridian.fix_polygon(dense, great_circle=False, fix_winding=True)
        except AssertionError:
            return True
        return False

    pole = layer.index[layer.contains(shapely.Point(0, 0))]
    assert len(pole) == 1 and cut_fails(layer.geometry[pole[0]])  # the case this test is about is still made
    with TestClient(create_app(served), base_url="http://127.0.0.1", raise_server_exceptions=False) as http:
        for path, params in ((f"/collections/polar_polygons/items/{pole[0]}", {}),
                             ("/collections/polar_polygons/items", {"limit": 10000}),
                             ("/collections/polar_polygons/items", {"bbox": "-180,-90,180,90", "limit": 10000})):
            answer = http.get(path, params=params)
            assert answer.status_code == 200, (path, params, answer.status_code, answer.text[:200])
        assert answer.json()["numberReturned"] == len(layer)


def test_a_geographic_output_past_180_degrees_is_served_both_sides_of_it(tmp_path, client):
    """The demo's labels on a geographic grid of 175..185.24 degrees east, as 0..360 grids run (a reviewer's
    case): the extent and STAC bbox ran to 185.24 (STAC allows +-180), the features' longitudes too (RFC 7946),
    a bbox west of 180 degrees found none of them, and tiles and points there were "outside the output". The
    expected values come from a copy of the part past 180 degrees written at -180..-174.76, served plainly."""
    import shapely
    from rasterio.transform import from_origin
    from rasterio.windows import Window
    from starlette.testclient import TestClient

    import tilemask
    from tilemask.serve import create_app
    from tilemask.workflow import Workflow

    from .conftest import DEMO

    with rasterio.open(DEMO.parent / "demo" / "RGB.byte.tif") as src:
        pixels = src.read(out_shape=(3, 512, 512))
    scene = tmp_path / "pacific.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=512, height=512, count=3, dtype="uint8", nodata=0,
                       crs="EPSG:4326", transform=from_origin(175, 10, 0.02, 0.02)) as out:  # fmt: skip
        out.write(pixels)
    served = tmp_path / "served"
    for suffix, vectors in ((".tif", f"{served}/{{stem}}_polygons.gpkg"), (".zarr", "null")):
        sets = [f"input={scene}", f"output.path={served}/{{stem}}_mask{suffix}", "output.quicklook=false",
                f"output.vectors={vectors}"]  # fmt: skip
        tilemask.run(Workflow.from_yaml(DEMO, sets), client)
    east = tmp_path / "plain"  # the columns past 180 degrees (250 on), where -180..-174.76 says they are
    east.mkdir()
    for name in ("mask.tif", "mask_probabilities.tif"):
        with rasterio.open(served / f"pacific_{name}") as ds:
            profile = {**ds.profile, "width": ds.width - 250, "transform": from_origin(-180, 10, 0.02, 0.02)}
            with rasterio.open(east / f"east_{name}", "w", **profile) as out:
                out.write(ds.read(window=Window(250, 0, ds.width - 250, ds.height)))
                out.update_tags(**ds.tags())
    layer = gpd.read_file(served / "pacific_polygons.gpkg", fid_as_index=True)
    west_of_180 = set(layer.index[layer.intersection(box(180, -1, 186, 10)).area > 0])  # -180..-174 taken round,
    # a polygon that ends on 180 degrees only touching it
    assert len(west_of_180) > 100
    with TestClient(create_app(served), base_url="http://127.0.0.1") as http, \
            TestClient(create_app(east), base_url="http://127.0.0.1") as plain:  # fmt: skip
        outputs = {o["path"]: o for o in http.get("/?f=json").json()["outputs"]}
        for path in ("pacific_mask.tif", "pacific_mask.zarr", "pacific_polygons.gpkg"):
            west, _, east_lon, _ = outputs[path]["bounds"]
            assert 174 < west < 176 and -176 < east_lon < -174, (path, outputs[path]["bounds"])  # across 180
        stac_bbox = http.get(f"/stac/items/{outputs['pacific_mask.tif']['id']}.json").json()["bbox"]
        assert stac_bbox[0] > stac_bbox[2] and all(-180 <= v <= 180 for v in stac_bbox[::2]), stac_bbox
        answer = http.get("/collections/pacific_polygons/items", params={"bbox": "-180,-1,-174,10", "limit": 10000})
        assert {f["id"] for f in answer.json()["features"]} == west_of_180
        for feature in http.get("/collections/pacific_polygons/items", params={"limit": 10000}).json()["features"]:
            x0, _, x1, _ = shapely.bounds(shape(feature["geometry"]))
            assert -180 <= x0 and x1 <= 180, (feature["id"], x0, x1)
        for output in ("pacific_mask.tif", "pacific_mask.zarr"):
            for band in (None, 3):
                params = {"output": output, **({"band": band} if band else {})}
                got = http.get("/tiles/9/2/248.png", params=params)  # -178.6..-177.9 degrees
                expected = plain.get("/tiles/9/2/248.png", params={**params, "output": "east_mask.tif"})
                assert got.status_code == 200 and np.array_equal(png(got), png(expected)), (output, band)
                assert (png(got)[..., 3] > 0).mean() > (0.9 if band else 0.01)  # water, class 0, is transparent
            point = http.get("/point", params={"output": output, "lon": -178, "lat": 5}).json()
            assert point["value"] == plain.get("/point", params={"output": "east_mask.tif", "lon": -178,
                                                                 "lat": 5}).json()["value"] is not None  # fmt: skip
        # zoomed out to the world: the COG's tile is drawn; the Zarr's reaches the meridian where its CRS cuts the
        # Earth (0.12 degrees east), which rioxarray cannot cut a tile across: left out (404), not a 422
        assert http.get("/tiles/0/0/0.png", params={"output": "pacific_mask.tif"}).status_code == 200
        assert http.get("/tiles/0/0/0.png", params={"output": "pacific_mask.zarr"}).status_code == 404


def test_geographic_layers_round_the_whole_earth_and_grids_on_its_edge(tmp_path):
    """What a review found past the 0..360 case above: a layer 360 degrees wide (0..360) had its extent taken as
    -180..180, so its features past 180 degrees were never searched (no bbox found them); a polygon round the whole
    Earth was cut into an invalid MultiPolygon; a layer starting on 180 degrees had a STAC bbox whose west part had
    no width; a grid registered at its pixels' centres (-180.0042, GTOPO30's) was read through a warped VRT."""
    from rasterio.transform import from_origin
    from starlette.testclient import TestClient

    from tilemask.serve import create_app
    from tilemask.serve.raster import _round_180

    boxes = [box(0, 0, 10, 5), box(270, 0, 280, 5), box(350, 0, 360, 5), box(0, -60, 360, -55)]
    gpd.GeoDataFrame({"n": range(4)}, geometry=boxes, crs="EPSG:4326").to_file(tmp_path / "wide.gpkg")
    gpd.GeoDataFrame({"n": [0]}, geometry=[box(180, 0, 182, 5)], crs="EPSG:4326").to_file(tmp_path / "edge.gpkg")
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1") as http:
        for bbox, expected in (("-90,-1,-80,10", {2: 1}), ("-180,-90,180,90", {1: 0, 2: 1, 3: 2, 4: 3}),
                               ("-5,-1,-1,6", {3: 2}), ("100,-58,101,-57", {4: 3})):  # fmt: skip
            features = http.get("/collections/wide/items", params={"bbox": bbox}).json()["features"]
            assert {f["id"]: f["properties"]["n"] for f in features} == expected, bbox
        band = next(f for f in http.get("/collections/wide/items").json()["features"] if f["properties"]["n"] == 3)
        ring = shape(band["geometry"])
        assert ring.is_valid and ring.geom_type == "Polygon" and ring.bounds == (-180, -60, 180, -55)
        bbox = http.get("/stac/items/edge.json").json()["bbox"]
        assert bbox == [-180, 0, -178, 5], bbox
    profile = {"driver": "GTiff", "width": 4320, "height": 10, "count": 1, "dtype": "uint8", "crs": "EPSG:4326"}
    for left, wrapped in ((-180 - 1 / 240, False), (-180.5, True)):  # half a 30" pixel past: as it is; more: wrap
        with rasterio.open(tmp_path / "g.tif", "w", **profile, transform=from_origin(left, 10, 1 / 12, 1 / 12)) as d:
            d.write(np.zeros((1, 10, 4320), np.uint8))
        with rasterio.open(tmp_path / "g.tif") as dataset:
            assert (_round_180(dataset) is not dataset) == wrapped, left


def test_global_layers_keep_their_wide_polygons_whole_and_findable(tmp_path):
    """What the antimeridian handling must leave alone: a band along the whole bottom of a Web Mercator grid
    (wider than 180 degrees, crossing nothing) and cells of a global Mollweide grid, whose extent pyproj gives
    as one meridian (their bounding corners are off the Earth). Expected sets: the polygons' own test in
    CRS84, their vertices moved one by one (geopandas)."""
    from starlette.testclient import TestClient

    from tilemask.serve import create_app

    band = box(-20037508.34, -19971868.88, 20037508.34, -9e6)  # 85S..62S, every longitude, in four vertices
    gpd.GeoDataFrame({"class": ["ice"]}, geometry=[band], crs="EPSG:3857").to_file(tmp_path / "ice.gpkg")
    cells = [box(x, y, x + 1.5e6, y + 1.5e6) for x in np.arange(-1.5e7, 1.4e7, 2e6) for y in (-3e6, 0.0, 3e6)]
    cells += [box(-1.8e7, -1e5, -1.65e7, 1e5), box(1.65e7, -1e5, 1.8e7, 1e5)]  # at the rim: bounds off the Earth
    cells += [box(-1.2e7, -5e6, 1.2e7, -4.5e6)]  # 240 degrees wide, edges of one segment
    grid = gpd.GeoDataFrame({"class": ["built"] * len(cells)}, geometry=cells, crs="ESRI:54009")
    grid.to_file(tmp_path / "grid.gpkg")
    in_crs84 = gpd.read_file(tmp_path / "grid.gpkg", fid_as_index=True).to_crs("OGC:CRS84")
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        for bbox in ("10,-80,11,-79", "-180,-90,180,90", "170,-70,-170,-60"):
            answer = client.get("/collections/ice/items", params={"bbox": bbox})
            assert answer.status_code == 200 and answer.json()["numberMatched"] == 1, (bbox, answer.text)
        west, _, east, _ = shape(answer.json()["features"][0]["geometry"]).bounds
        assert west < -179.9 and east > 179.9  # whole, not cut at a crossing it does not make
        for bbox in ("-180,-90,180,90", "100,-10,170,40", "-170,-40,-120,0"):
            answer = client.get("/collections/grid/items", params={"bbox": bbox, "limit": 10000})
            assert answer.status_code == 200, answer.text
            x0, y0, x1, y1 = map(float, bbox.split(","))
            expected = set(in_crs84.index[in_crs84.intersects(box(x0, y0, x1, y1))])
            assert expected and {f["id"] for f in answer.json()["features"]} == expected, bbox


def test_polygons_partly_off_the_earth_are_cut_to_it_and_wholly_off_have_no_geometry(tmp_path):
    """Cells of a global Mollweide grid at its rim: their corners outside the ellipse moved to inf, and the items
    held GeoJSON's invalid [null, null] coordinates. The part on the Earth is measured here by sampling the cell
    and moving each sample back (pyproj gives inf off the Earth), not by the server's outline of the domain."""
    from starlette.testclient import TestClient

    from tilemask.serve import create_app

    cells = [box(1.75e7, -2e5, 1.85e7, 2e5), box(-1.2e7, 6.5e6, -1.0e7, 8.5e6), box(1.6e7, 8e6, 1.8e7, 9e6)]
    cells += [box(0, 0, 1e5, 1e5)]  # rim on the equator, rim at 50-70N, wholly off the Earth, well inside
    gpd.GeoDataFrame({"n": range(len(cells))}, geometry=cells, crs="ESRI:54009").to_file(tmp_path / "rim.gpkg")
    out = Transformer.from_crs("ESRI:54009", "OGC:CRS84", always_xy=True)
    back = Transformer.from_crs("OGC:CRS84", "ESRI:54009", always_xy=True)
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        answer = client.get("/collections/rim/items", params={"limit": 100})
        assert answer.status_code == 200, answer.text
        features = {f["properties"]["n"]: f["geometry"] for f in answer.json()["features"]}
        assert features[2] is None and shape(features[3]).area > 0
        for n in (0, 1):
            x0, y0, x1, y1 = cells[n].bounds
            xs, ys = np.meshgrid(np.linspace(x0, x1, 401)[:-1] + (x1 - x0) / 800,
                                 np.linspace(y0, y1, 401)[:-1] + (y1 - y0) / 800)  # fmt: skip
            on_earth = np.isfinite(out.transform(xs, ys)[0]).mean() * cells[n].area
            assert 0.05 < on_earth / cells[n].area < 0.95  # the cell does straddle the rim
            served = shape(features[n])
            assert np.isfinite(np.asarray(served.exterior.coords)).all()
            x, y = back.transform(*np.asarray(served.exterior.coords).T)
            assert abs(Polygon(np.column_stack([x, y])).area / on_earth - 1) < 0.01
        x0, y0, x1, y1 = shape(features[0]).bounds  # found by a bbox around its part on the Earth only
        found = client.get("/collections/rim/items", params={"bbox": f"{x0},{y0},{x1},{y1}"}).json()
        assert [f["properties"]["n"] for f in found["features"]] == [0]
        # a geostationary view, whose world outline leaves the plane: a cell across the disk's edge has no
        # geometry (its first version was a 500), one inside the disk is served
        disk = [box(5.0e6, -1e5, 5.6e6, 1e5), box(0, 0, 1e5, 1e5)]
        geos = "+proj=geos +h=35786023 +lon_0=140 +sweep=x +ellps=GRS80 +units=m +no_defs"
        gpd.GeoDataFrame({"n": [0, 1]}, geometry=disk, crs=geos).to_file(tmp_path / "disk.gpkg")
        answer = client.get("/collections/disk/items", params={"limit": 100})
        assert answer.status_code == 200, answer.text
        geometries = {f["properties"]["n"]: f["geometry"] for f in answer.json()["features"]}
        assert geometries.get(0) is None and shape(geometries[1]).bounds[0] == pytest.approx(140)
        # MODIS's sinusoidal grid, where PROJ wraps a point off the map round to a longitude instead of inf: a
        # cell across the rim at 45N is cut to its part on the Earth (samples that come back through CRS84),
        # one wholly off has no geometry
        sinu = "+proj=sinu +lon_0=0 +x_0=0 +y_0=0 +R=6371007.181 +units=m +no_defs"
        lens = [box(1.36e7, 4.8e6, 1.48e7, 5.2e6), box(1.9e7, 5e6, 1.95e7, 5.3e6)]
        gpd.GeoDataFrame({"n": [0, 1]}, geometry=lens, crs=sinu).to_file(tmp_path / "modis.gpkg")
        answer = client.get("/collections/modis/items", params={"limit": 100})
        assert answer.status_code == 200, answer.text
        geometries = {f["properties"]["n"]: f["geometry"] for f in answer.json()["features"]}
        assert geometries.get(1) is None
        out, back = (Transformer.from_crs(*pair, always_xy=True) for pair in ((sinu, "OGC:CRS84"), ("OGC:CRS84", sinu)))
        x0, y0, x1, y1 = lens[0].bounds
        xs, ys = np.meshgrid(np.linspace(x0, x1, 401)[:-1] + (x1 - x0) / 800,
                             np.linspace(y0, y1, 401)[:-1] + (y1 - y0) / 800)  # fmt: skip
        returned = np.hypot(*(np.asarray(back.transform(*out.transform(xs, ys))) - [xs, ys])) < 1.0
        assert 0.05 < returned.mean() < 0.95
        x, y = back.transform(*np.asarray(shape(geometries[0]).exterior.coords).T)
        assert abs(Polygon(np.column_stack([x, y])).area / (returned.mean() * lens[0].area) - 1) < 0.01


@pytest.mark.slow
def test_serve_refuses_a_missing_folder_and_a_busy_port(tmp_path, server):
    from tests.conftest import run_cli

    missing = run_cli("serve", tmp_path / "nope", "--port", "0", timeout=60)
    assert missing.returncode == 2 and "nope" in missing.stderr
    busy = run_cli("serve", tmp_path, "--port", str(urlsplit(server).port), timeout=60)
    assert busy.returncode == 2
    assert busy.stderr.strip().splitlines()[-1].startswith("tilemask: error: cannot listen on 127.0.0.1:")


@pytest.mark.timeout(60)
def test_serve_refuses_an_empty_host(tmp_path):
    """``--host ""`` (an unset variable in a script: ``--host "$HOST"``) served the folder on every interface, to
    any Host name, and printed ``http://:PORT/``."""
    from tests.conftest import run_cli

    empty = run_cli("serve", tmp_path, "--host", "", "--port", "0", "--workers", "1", timeout=30)
    assert empty.returncode == 2, empty.stdout + empty.stderr
    assert empty.stderr.strip().splitlines()[-1].startswith("tilemask: error: cannot listen on an empty --host")


@pytest.mark.slow  # three servers started and stopped at once (10 s)
@pytest.mark.timeout(120)
def test_a_ctrl_c_as_the_server_processes_start_prints_no_traceback(tmp_path):
    """A Ctrl-C to the process group just after the 'serving' line, with two server processes: those still
    importing died with a KeyboardInterrupt traceback each (4 of 6 tries, a reviewer's); they start with SIGINT
    ignored now, and are stopped by their supervisor."""
    import os
    import signal
    import subprocess
    import sys

    command = [str(Path(sys.executable).parent / "tilemask"), "serve", str(tmp_path), "--port", "0", "--workers", "2"]
    for delay in (0.05, 0.1, 0.15):
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)  # fmt: skip
        try:
            assert "serving" in process.stdout.readline()
            time.sleep(delay)
            os.killpg(process.pid, signal.SIGINT)
            assert process.wait(timeout=30) == 130
            assert process.stdout.read().strip().splitlines() == ["tilemask: interrupted"], delay
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.slow  # a table that takes the server over 2 s to read (90 MB)
@pytest.mark.timeout(120)
def test_a_request_cut_short_by_ctrl_c_is_one_line_not_a_traceback(tmp_path):
    """A Ctrl-C while a request ran for longer than the server's 2 s of grace printed 60 lines (asyncio's
    CancelledError traceback, logged by uvicorn) before 'tilemask: interrupted'; now uvicorn's one line says it."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    import pyarrow as pa
    import pyarrow.csv

    n = 4_500_000
    rows = pa.table({"region": pa.array(np.char.zfill(np.arange(n).astype(str), 7)),
                     "a": np.random.default_rng(0).random(n), "b": np.arange(n)})  # fmt: skip
    pyarrow.csv.write_csv(rows, tmp_path / "big.csv")
    command = [str(Path(sys.executable).parent / "tilemask"), "serve", str(tmp_path), "--port", "0", "--workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        url = re.search(r"at (http://\S+/) ", process.stdout.readline()).group(1)
        answers = []
        asking = threading.Thread(target=lambda: answers.append(get(f"{url}stats", params={"output": "big.csv"})))
        asking.start()
        time.sleep(1.5)  # the table is being read
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=30) == 130
        asking.join(30)
        printed = process.stdout.read().strip().splitlines()
        assert printed == ["ERROR:    Cancel 1 running task(s), timeout graceful shutdown exceeded",
                           "tilemask: interrupted"], printed  # fmt: skip
        assert answers and answers[0].status_code == 500  # the request was cut short, not answered
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("how", "workers"), [("ctrl-c", "2"), *(pytest.param(*p, marks=pytest.mark.slow) for p in (
    ("sigterm", "2"), ("ctrl-c", "1"), ("sigterm", "1")))])  # one worker: exit 130 before too  # fmt: skip
def test_a_stopped_server_exits_130_whatever_its_workers(tmp_path, workers, how):
    """Ctrl-C (SIGINT to the terminal's process group) or SIGTERM (``kill PID``) stopped one server process with
    ``tilemask: interrupted``, exit 130, as every command; with more (the default on more than one core) it exited
    0, silently."""
    import os
    import signal
    import subprocess
    import sys

    import psutil

    command = [str(Path(sys.executable).parent / "tilemask"), "serve", str(tmp_path), "--port", "0",
               "--workers", workers]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        url = re.search(r"at (http://\S+/) ", process.stdout.readline()).group(1)
        assert get(f"{url}?f=json").status_code == 200
        if how == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 130
        assert process.stdout.read().strip().splitlines()[-1] == "tilemask: interrupted"
        group = [p for p in psutil.process_iter(["pid", "status"]) if p.info["status"] != psutil.STATUS_ZOMBIE
                 and _pgid(p.info["pid"]) == process.pid]  # fmt: skip
        # multiprocessing's resource tracker ends once the supervisor has: on a busy machine a moment later
        _, left = psutil.wait_procs(group, timeout=10)
        assert not left, left  # no worker left behind
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the server and its workers, whatever happened
        process.stdout.close()


def _pgid(pid: int) -> int | None:
    import os

    try:
        return os.getpgid(pid)
    except OSError:  # gone meanwhile
        return None


def test_quote_roundtrip_for_names_with_spaces(served_folder, server):
    """A file name with a space and a '#' (quoted by the client) is served as itself."""
    weird = served_folder / "a b#c.csv"
    weird.write_text("class,pixels\nland,1\n")
    try:
        assert get(f"{server}files/{quote('a b#c.csv')}").text == weird.read_text()
    finally:
        weird.unlink()


def test_gdal_ogc_api_features_client_loads_every_polygon_as_the_file_holds_it(server, served_folder):
    """GDAL's OAPIF driver (an OGC API - Features client, as QGIS's provider) lists and loads the collection."""
    import pyogrio

    layers = pyogrio.list_layers(f"OAPIF:{server}")
    assert sorted(name for name, _ in layers) == ["RGB.byte_polygons", "polygons_fgb", "polygons_parquet"]
    remote = pyogrio.read_dataframe(f"OAPIF:{server}", layer="RGB.byte_polygons")
    local = gpd.read_file(served_folder / POLYGONS).to_crs("OGC:CRS84")
    assert len(remote) == len(local)
    remote = remote.sort_values("area_m2", kind="stable").reset_index(drop=True)
    local = local.sort_values("area_m2", kind="stable").reset_index(drop=True)
    assert list(remote["class"]) == list(local["class"])
    np.testing.assert_allclose(remote["area_m2"], local["area_m2"])
    assert remote.geometry.geom_equals_exact(local.geometry, tolerance=1e-9).all()


def test_ordinary_bad_requests_are_4xx_not_500(server):
    items = f"{server}collections/RGB.byte_polygons/items"
    cases = {
        f"{server}tiles/12/1161/1759.png?output={LABELS}&band=4": 404,  # 3 classes
        f"{server}tiles/12/1161/1759.png?output=zarr/RGB.byte_mask.zarr&band=9": 404,
        f"{server}tiles/99/0/0.png?output={LABELS}": 422,
        f"{server}tiles/12/-1/0.png?output={LABELS}": 422,
        f"{server}tiles/8/328/109.png?output={LABELS}": 404,  # x past 2^8 would wrap to tile 8/72/109
        f"{server}tiles/0/1/0.png?output={LABELS}": 404,
        f"{server}tiles/12/0/0.png?output={LABELS}": 404,  # in the tile matrix, far from the scene
        f"{server}tiles/12/1161/1759.png?output=anatomical_labels.nii.gz": 400,  # a volume
        f"{server}point?output={LABELS}&lon=nan&lat=0": 422,
        f"{items}?bbox=nan,1,2,3": 400,
        f"{items}?bbox=-78,24,-77,95": 400,
        f"{items}/999999": 404,
        f"{items}/99999999999999999999": 404,
        f"{server}collections/polygons_parquet/items/99999999": 404,
        f"{server}files/{'x' * 300}": 404,
        f"{server}stats?output=nope.csv": 404,
        f"{items}?foo=bar": 400,  # /req/core/query-param-unknown
        f"{items}?datetime=2020-01-01T00:00:00Z": 200,  # a Core parameter: the features have no time
    }
    outside = {f"{server}tiles/{tile}.png?output={LABELS}" for tile in ("8/328/109", "0/1/0", "12/0/0")}
    for url, status in cases.items():
        answer = get(url)
        assert answer.status_code == status, url
        assert (answer.headers.get("X-Tilemask-Outside") == "1") == (url in outside), url  # the map's signal
    for collection in ("RGB.byte_polygons", "polygons_fgb", "polygons_parquet"):  # an offset past the end (OGR
        page = get(f"{server}collections/{collection}/items?offset={10**23}")  # takes it as a C long: was a 500)
        assert page.status_code == 200 and page.json()["numberReturned"] == 0, (collection, page.text)
    assert get(f"{items}?bbox=-78.3,24.9,0,-78.0,25.2,10").json()["numberMatched"] > 0  # a 3D bbox


def test_stats_serves_geoparquet_polygons_with_wkt_geometry(server, served_folder):
    records = get(f"{server}stats", params={"output": "polygons_parquet.parquet"}).json()
    truth = gpd.read_parquet(served_folder / "polygons_parquet.parquet")
    assert len(records) == len(truth)
    assert records[0]["class"] == truth["class"].iloc[0]
    assert shapely_wkt(records[0]["geometry"]).equals(truth.geometry.iloc[0])


def test_labels_in_a_geostationary_full_disk_have_finite_bounds_or_none(tmp_path, served_folder):
    """A label COG on a geostationary satellite's full disk: its corners are off the Earth, so PROJ's bounds
    were infinite and the listing, its STAC item and /map were a 500 (the page embedded Infinity, blank for
    every output). One whose pixels are all off the disk has no bounds, and the pages still work."""
    from starlette.testclient import TestClient

    from tilemask.serve import create_app

    geos = "+proj=geos +h=35786023 +lon_0=-75 +sweep=x +ellps=GRS80 +units=m +no_defs"
    for name, (x0, y0) in (("goes_mask.tif", (-5434894.0, 5434894.0)), ("offdisk_mask.tif", (5.2e6, 5.43e6))):
        shutil.copyfile(served_folder / LABELS, tmp_path / name)
        # the full disk, 10869788 m a side; a corner off it
        with rasterio.open(tmp_path / name, "r+", IGNORE_COG_LAYOUT_BREAK="YES") as ds:
            width = 2 * 5434894.0 if name == "goes_mask.tif" else 2e5
            ds.crs = rasterio.crs.CRS.from_string(geos)
            ds.transform = rasterio.transform.from_origin(x0, y0, width / ds.width, width / ds.height)

    def strict(text: str):  # as a browser's JSON.parse: no Infinity, no NaN
        return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"not JSON: {c}")))

    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        listing = client.get("/?f=json")
        assert listing.status_code == 200, listing.text
        outputs = {o["path"]: o for o in strict(listing.text)["outputs"]}
        west, south, east, north = outputs["goes_mask.tif"]["bounds"]
        assert -160 < west < -140 and -10 < east < 10 and -90 <= south < -70 and 70 < north <= 90  # -75 +- 81
        assert "bounds" not in outputs["offdisk_mask.tif"]
        item = client.get("/stac/items/goes_mask.json")
        assert item.status_code == 200 and strict(item.text)["bbox"] == [west, south, east, north]
        item = client.get("/stac/items/offdisk_mask.json")
        assert item.status_code == 200 and strict(item.text)["geometry"] is None
        page = client.get("/map")
        assert page.status_code == 200, page.text
        config = strict(page.text.split('type="application/json">', 1)[1].split("</script>", 1)[0])
        assert [r["path"] for r in config["rasters"]] == ["goes_mask.tif"]
        assert client.get("/map", params={"output": "offdisk_mask.tif"}).status_code == 400
        assert client.get("/").status_code == 200
        tile = client.get("/tiles/2/1/1.png", params={"output": "goes_mask.tif"})  # -90..0 W, 0..66 N
        assert png(tile)[..., 3].any()
    # the rim of the disk is in the bounds (a grid of samples alone missed 2 degrees of it), and so a polygon
    # near it is found by a bbox there
    assert west < -156.2 and east > 6.2, (west, east)  # the limb: 81.3 degrees either side of -75
    to_geos = Transformer.from_crs("OGC:CRS84", geos, always_xy=True)
    corners = ((-156, -0.1), (-155.8, -0.1), (-155.8, 0.1), (-156, 0.1))
    cell = Polygon([to_geos.transform(lon, lat) for lon, lat in corners])
    gpd.GeoDataFrame({"name": ["rim"]}, geometry=[cell], crs=geos).to_file(tmp_path / "rim.gpkg")
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1") as client:
        found = client.get("/collections/rim/items", params={"bbox": "-157,-1,-155,1"}).json()
        assert [f["properties"]["name"] for f in found["features"]] == ["rim"]


def test_stats_keeps_identifiers_as_text_and_floats_exact(tmp_path):
    """Region codes such as "01001" came back as the number 1001 (pandas guessed their type) and floats were
    cut to 15 digits (0.30000000000000004 became 0.3, an area gained digits it never had)."""
    import pyogrio
    from starlette.testclient import TestClient

    from tilemask.serve import create_app

    rows = [
        {"code": "01001", "pixels": 2**62 + 1, "fraction": 0.1 + 0.2, "area_m2": 12489917884.709246},
        {"code": "99999", "pixels": 3, "fraction": 0.7167655142485173, "area_m2": 2577834789.020104},
    ]
    frame = pd.DataFrame(rows)
    frame.to_csv(tmp_path / "regions.csv", index=False)
    (tmp_path / "regions.json").write_text(json.dumps(rows))
    frame.to_parquet(tmp_path / "regions_table.parquet")
    pyogrio.write_dataframe(frame, tmp_path / "regions_table.gpkg")  # attributes only: a table
    assert (tmp_path / "regions.csv").read_text().splitlines()[1].startswith("01001,4611686018427387905,")
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1") as client:
        for name in ("regions.csv", "regions.json", "regions_table.parquet", "regions_table.gpkg"):
            answer = client.get("/stats", params={"output": name})
            assert answer.status_code == 200, (name, answer.text)
            assert answer.json() == rows, name  # == on floats: the same doubles; "01001" stays text
            assert "0.30000000000000004" in answer.text and "12489917884.709246}" in answer.text, name
        # as pandas wrote them and reads them back: booleans, repeated names told apart, missing cells null
        table = pd.DataFrame([[True, 1, "x"], [False, 2, None]], columns=["flag", "a", "a"])
        table.to_csv(tmp_path / "t.csv", index=False)
        expected = [{"flag": True, "a": 1, "a.1": "x"}, {"flag": False, "a": 2, "a.1": None}]
        assert client.get("/stats", params={"output": "t.csv"}).json() == expected


def test_probability_tiles_are_transparent_where_the_labels_are_nodata(server, served_folder):
    """The labels' nodata collar (the input's own nodata) was drawn opaque in the probability tiles: viridis at
    the writer's fill, 0, over the whole collar. (At zoom 8 the tiles come from overviews: edge pixels may differ
    from the full-resolution warp.)"""
    import morecantile

    with rasterio.open(served_folder / LABELS) as ds:
        nodata = int(ds.nodata)
    tile = morecantile.tms.get("WebMercatorQuad").tile(-78.9, 24.0, 8)
    labels = expected_tile(served_folder / LABELS, tile.x, tile.y, 8)
    collar, valid = labels == nodata, (labels >= 0) & (labels != nodata)
    assert collar.sum() > 2000 and valid.sum() > 500  # the tile holds both
    for output in (LABELS, "zarr/RGB.byte_mask.zarr"):
        rgba = png(get(f"{server}tiles/8/{tile.x}/{tile.y}.png", params={"output": output, "band": 1}))
        assert (rgba[collar, 3] == 0).mean() > 0.95, (output, (rgba[collar, 3] == 0).mean())
        assert (rgba[valid, 3] == 255).mean() > 0.95, (output, (rgba[valid, 3] == 255).mean())


@pytest.mark.parametrize("store", ["zarr/RGB.byte_mask.zarr", "zarr/RGB.byte_mask.ome.zarr"])
def test_zarr_probability_tiles_draw_certainty_where_the_cog_does(server, served_folder, store):
    """A Zarr's uint8 probabilities were transparent wherever p = 1.0 (255): they have no nodata, rioxarray warps
    with 255 as one, and rio-tiler masked it; the most certain clouds were holes (11,312 pixels of this tile)."""
    x, y = 4633, 7021  # the reviewer's tile, at zoom 14
    certain = expected_tile(served_folder / PROBS, x, y, 14, band=3) == 255
    assert certain.sum() > 1000  # the tile holds clouds the network is sure of
    cog = png(get(f"{server}tiles/14/{x}/{y}.png", params={"output": LABELS, "band": 3}))
    zarr = png(get(f"{server}tiles/14/{x}/{y}.png", params={"output": store, "band": 3}))
    assert (zarr[certain, 3] == 255).all() and np.array_equal(zarr[..., 3], cog[..., 3])


def test_a_file_whose_name_is_not_utf8_is_left_out_with_a_warning(tmp_path, caplog):
    """A picture named with Latin-1 bytes (caf\\xe9.png) made the index and its JSON a 500 (surrogates do not
    encode); it is left out, named in a warning, as other files the catalog cannot list are."""
    import os

    from starlette.testclient import TestClient

    from tilemask.serve import create_app

    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    os.rename(os.fsencode(tmp_path / "ok.png"), os.fsencode(tmp_path) + b"/caf\xe9.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        listing = client.get("/?f=json")
        assert listing.status_code == 200, listing.text
        assert [o["path"] for o in listing.json()["outputs"]] == ["ok.png"]
        assert client.get("/").status_code == 200 and client.get("/stac/catalog.json").status_code == 200
    assert any("caf\\xe9.png" in r.getMessage() and "not UTF-8" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(30)
def test_a_fifo_in_a_store_or_as_a_colour_table_does_not_hang_the_listing(tmp_path, caplog):
    """A FIFO named zarr.json inside a .zarr folder, or as the colour table beside NIfTI labels: zarr (in a thread
    of its pool) and the table's reader opened it and waited for a writer forever; every listing hung, and the
    server then did not exit on Ctrl-C (that thread was joined). The store is left out with a warning, the
    labels listed without their names."""
    import os

    import nibabel as nib
    from starlette.testclient import TestClient

    from tilemask.formats import NIFTI_DESCRIP, for_path
    from tilemask.serve import create_app

    (tmp_path / "odd.zarr" / "labels").mkdir(parents=True)
    (tmp_path / "odd.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    os.mkfifo(tmp_path / "odd.zarr" / "labels" / "zarr.json")
    img = nib.Nifti1Image(np.random.default_rng(0).integers(0, 3, (8, 8, 8), dtype=np.uint8), np.eye(4))
    img.header["descrip"] = NIFTI_DESCRIP
    nib.save(img, tmp_path / "seg.nii.gz")
    os.mkfifo(for_path("seg.nii.gz").class_table_path(str(tmp_path / "seg.nii.gz")))
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        listing = client.get("/?f=json")
    assert listing.status_code == 200, listing.text
    outputs = {o["path"]: o for o in listing.json()["outputs"]}
    assert list(outputs) == ["seg.nii.gz"] and outputs["seg.nii.gz"]["kind"] == "labels"
    messages = [r.getMessage() for r in caplog.records]
    assert "odd.zarr: left out of the catalog: odd.zarr/labels/zarr.json is not a file" in messages, messages
    assert any("seg.colors.csv: class names left out (not a file)" in m for m in messages), messages


def test_sidecars_published_after_the_output_are_seen(tmp_path, served_folder):
    """The catalog cached an entry by its main file's stamp: probabilities copied beside a label COG later, or
    the colour table beside a NIfTI, were never seen while serving."""
    from starlette.testclient import TestClient

    from tilemask.serve import create_app

    shutil.copyfile(served_folder / LABELS, tmp_path / LABELS)
    shutil.copyfile(served_folder / "anatomical_labels.nii.gz", tmp_path / "anatomical_labels.nii.gz")
    tile = "/tiles/12/1161/1759.png"
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:

        def listed(path):
            return next(o for o in client.get("/?f=json").json()["outputs"] if o["path"] == path)

        assert listed(LABELS)["probabilities"] is None
        assert client.get(tile, params={"output": LABELS, "band": 1}).status_code == 404
        assert [c["name"] for c in listed("anatomical_labels.nii.gz")["classes"]] != ["background", "tissue"]
        shutil.copyfile(served_folder / PROBS, tmp_path / PROBS)
        shutil.copyfile(served_folder / "anatomical_labels.colors.csv", tmp_path / "anatomical_labels.colors.csv")
        assert listed(LABELS)["probabilities"] == PROBS
        assert client.get(tile, params={"output": LABELS, "band": 1}).status_code == 200
        assert [c["name"] for c in listed("anatomical_labels.nii.gz")["classes"]] == ["background", "tissue"]


def test_every_file_link_of_the_index_is_served(server):
    """The index linked each Zarr store (a folder) under /files/, which serves files only: a 404."""
    import re

    links = re.findall(r'href="(files/[^"]+)"', get(server).text)
    assert any(link.startswith("files/zarr/RGB.byte_mask.zarr") for link in links)
    for link in links:
        assert httpx.head(server + link, timeout=30).status_code == 200, link


def test_items_parameters_of_invalid_values_are_400_and_a_large_limit_is_the_maximum(server):
    """OGC API - Features Part 1, /req/core/query-param-invalid: a parameter of an invalid value is a 400 (they
    were FastAPI's 422); a limit above the maximum is served as the maximum (the standard's example: asked
    50000, a server of maximum 10000 returns up to 10000 and a next link), not refused. An id that is not a
    feature's is a 404, as any other id of no feature."""
    items = f"{server}collections/RGB.byte_polygons/items"
    for query in ("limit=0", "limit=-5", "limit=abc", "offset=-1", "offset=x"):
        answer = get(f"{items}?{query}")
        assert answer.status_code == 400, (query, answer.status_code, answer.text)
    assert get(f"{items}/abc").status_code == 404
    page = get(f"{items}?limit=50000")
    assert page.status_code == 200, page.text
    page = page.json()
    assert page["numberReturned"] == min(page["numberMatched"], 10_000)
    assert all("limit=10000" in link["href"] for link in page["links"])
    spec = get(f"{server}openapi.json").json()  # clients (GDAL's OAPIF) read the maximum there
    parameters = spec["paths"]["/collections/{collection_id}/items"]["get"]["parameters"]
    (limit,) = [p for p in parameters if p["name"] == "limit"]
    assert limit["schema"]["maximum"] == 10000


@pytest.mark.timeout(60)
def test_polygons_without_attributes_are_served_as_features_with_empty_properties(tmp_path):
    """A polygons layer with a geometry and no attribute field (a GeoJSON whose features have ``"properties": {}``,
    what ogr2ogr or geopandas write from shapes alone) is listed as a collection; its items came back as no
    features at all beside ``numberMatched: 2`` (pandas writes a frame with no columns as ``[]``, and the
    features were zipped with it), and ``/items/0`` was a 500 with an IndexError traceback."""
    from starlette.testclient import TestClient

    from tilemask.serve import create_app

    shapes = [box(-77.7, 24.5, -77.6, 24.6), box(-77.5, 24.4, -77.4, 24.5)]
    gpd.GeoDataFrame(geometry=shapes, crs="OGC:CRS84").to_file(tmp_path / "bare.geojson", driver="GeoJSON")
    gpd.GeoDataFrame(geometry=shapes, crs="OGC:CRS84").to_parquet(tmp_path / "bareparquet.parquet")
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        for name in ("bare", "bareparquet"):
            page = client.get(f"/collections/{name}/items")
            assert page.status_code == 200, page.text
            body = page.json()
            assert body["numberMatched"] == body["numberReturned"] == 2, body
            assert [f["properties"] for f in body["features"]] == [{}, {}]
            got = [shape(f["geometry"]).bounds for f in body["features"]]
            np.testing.assert_allclose(got, [s.bounds for s in shapes], atol=1e-9)
            boxed = client.get(f"/collections/{name}/items", params={"bbox": "-77.55,24.45,-77.45,24.55"}).json()
            assert [f["properties"] for f in boxed["features"]] == [{}]
            first = body["features"][0]["id"]
            one = client.get(f"/collections/{name}/items/{first}")
            assert one.status_code == 200, one.text
            assert one.json()["properties"] == {} and one.json()["id"] == first


@pytest.mark.timeout(60)
def test_damaged_probabilities_are_a_422_naming_the_probabilities_not_the_labels(tmp_path, served_folder):
    """A label COG that reads whole beside probabilities cut short: ``/point`` and a ``&band=`` tile answered 422
    ``cut_mask.tif: cannot read: Read failed...``, naming the labels, which read fine (``/point`` reads them
    first); the file to look at, or publish again, is the probabilities."""
    from starlette.testclient import TestClient

    from tilemask.serve import create_app

    shutil.copyfile(served_folder / LABELS, tmp_path / "cut_mask.tif")
    whole = (served_folder / PROBS).read_bytes()
    (tmp_path / "cut_mask_probabilities.tif").write_bytes(whole[: len(whole) // 3])
    lon, lat = -77.75, 24.56
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        listed = {e["path"]: e for e in client.get("/?f=json").json()["outputs"]}
        assert listed["cut_mask.tif"]["probabilities"] == "cut_mask_probabilities.tif"
        point, tile = f"/point?output=cut_mask.tif&lon={lon}&lat={lat}", "/tiles/10/290/439.png?output=cut_mask.tif"
        assert client.get(tile).status_code == 200  # the labels read
        for url in (point, f"{tile}&band=2"):
            answer = client.get(url)
            assert answer.status_code == 422, (url, answer.status_code, answer.text)
            assert answer.json()["detail"].startswith("cut_mask_probabilities.tif: cannot read: "), answer.text


@pytest.mark.timeout(90)
def test_a_named_pipe_in_the_folder_is_left_out_and_hangs_nothing(tmp_path):
    """A FIFO named like an output (``pipe.csv``, ``pipe.tif``) was opened by the catalog to classify it, and an
    open of a FIFO waits for a writer: the index, ``/collections`` and ``/stats?output=pipe.csv`` never answered
    (each held a server thread for good). Only regular files and Zarr folders are classified."""
    import os
    import threading

    from starlette.testclient import TestClient

    from tilemask.serve import create_app

    pd.DataFrame({"class": ["water"], "pixels": [3]}).to_csv(tmp_path / "table.csv", index=False)
    pipes = [tmp_path / "pipe.csv", tmp_path / "pipe.tif"]
    for pipe in pipes:
        os.mkfifo(pipe)
    answers = {}

    def ask():
        with TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
            for url in ("/?f=json", "/collections", "/stats?output=pipe.csv", "/stats?output=table.csv"):
                answers[url] = client.get(url)

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    asker.join(30)
    hung = asker.is_alive()
    for pipe in pipes:  # a reader still blocked in open() gets an end of file and lets go
        try:
            os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # ENXIO: nobody is reading it
            pass
    asker.join(30)
    assert not hung, f"hung; answered so far: {sorted(answers)}"
    assert [e["path"] for e in answers["/?f=json"].json()["outputs"]] == ["table.csv"]
    assert answers["/collections"].status_code == 200
    assert answers["/stats?output=pipe.csv"].status_code == 404, answers["/stats?output=pipe.csv"].text
    assert answers["/stats?output=table.csv"].json() == [{"class": "water", "pixels": 3}]


@pytest.mark.timeout(60)
def test_binary_attributes_of_geoparquet_polygons_are_hex_as_in_stats(tmp_path):
    """GeoParquet polygons with a binary column (a hash, a WKB of something else): their items were a 422
    ``cannot read: 'utf-8' codec can't decode byte 0xff``, the file called damaged though it reads whole
    (pandas' JSON writer decoded the bytes as text). They go out as hex, as ``/stats`` gives them."""
    from starlette.testclient import TestClient

    from tilemask.serve import create_app

    shapes = [box(-77.7, 24.5, -77.6, 24.6), box(-77.5, 24.4, -77.4, 24.5)]
    frame = gpd.GeoDataFrame({"digest": [b"\x00\xff", b"ok"], "name": ["a", "b"]}, geometry=shapes, crs="OGC:CRS84")
    frame.to_parquet(tmp_path / "hashed.parquet")
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        page = client.get("/collections/hashed/items")
        assert page.status_code == 200, page.text
        assert [f["properties"] for f in page.json()["features"]] == [{"digest": "00ff", "name": "a"},
                                                                      {"digest": "6f6b", "name": "b"}]  # fmt: skip
        one = client.get("/collections/hashed/items/0")
        assert one.status_code == 200, one.text
        assert one.json()["properties"] == {"digest": "00ff", "name": "a"}
        assert [r["digest"] for r in client.get("/stats?output=hashed.parquet").json()] == ["00ff", "6f6b"]


@pytest.mark.timeout(60)
def test_serving_writes_nothing_into_the_folder(tmp_path, served_folder):
    """Reading a tilemask GeoPackage (its features, its records) made GDAL write ``RGB.byte_polygons.gpkg.aux.xml``
    beside it (the GPKG driver of pyogrio's GDAL saves the dataset and layer metadata it read as PAM when the file
    is closed): the read-only server wrote into the folder it serves."""
    from starlette.testclient import TestClient

    from tilemask.serve import create_app

    for name in (LABELS, f"{LABELS}.aux.xml", "RGB.byte_mask_probabilities.tif", POLYGONS, "polygons_fgb.fgb",
                 "RGB.byte_stats.csv"):  # fmt: skip
        shutil.copyfile(served_folder / name, tmp_path / name)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    lon, lat = -77.75, 24.56
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        items = "/collections/RGB.byte_polygons/items"
        for url in ("/?f=json", f"{items}?limit=5", f"{items}?bbox=-78.3,24.9,-78.0,25.2", f"{items}/1",
                    "/collections/polygons_fgb/items", f"/stats?output={POLYGONS}", "/stats?output=RGB.byte_stats.csv",
                    f"/tiles/10/290/439.png?output={LABELS}&band=2", f"/point?output={LABELS}&lon={lon}&lat={lat}",
                    "/stac/catalog.json"):  # fmt: skip
            answer = client.get(url)
            assert answer.status_code == 200, (url, answer.text)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


@pytest.mark.timeout(60)
def test_a_cog_cut_short_is_a_422_with_gdals_reason(tmp_path, served_folder):
    """The 422 of a label COG or probabilities cut short said ``cannot read: Read failed. See previous exception
    for details.``: rasterio's words, where GDAL's, at the root of its exception chain, say what is wrong."""
    from starlette.testclient import TestClient

    from tilemask.serve import create_app

    for name in (LABELS, "RGB.byte_mask_probabilities.tif"):
        whole = (served_folder / name).read_bytes()
        (tmp_path / name.replace("RGB.byte", "cut")).write_bytes(whole[: len(whole) // 2])
    lon, lat = -77.75, 24.56
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        for url, name in [("/tiles/10/290/439.png?output=cut_mask.tif", "cut_mask.tif"),
                          ("/tiles/10/290/439.png?output=cut_mask.tif&band=2", "cut_mask_probabilities.tif"),
                          (f"/point?output=cut_mask.tif&lon={lon}&lat={lat}", "cut_mask.tif")]:  # fmt: skip
            answer = client.get(url)
            assert answer.status_code == 422, (url, answer.status_code, answer.text)
            assert re.fullmatch(rf"{name}: cannot read: TIFF.* got \d+ bytes, expected \d+", answer.json()["detail"])


def write_segmentation(path: Path, *, transfer_syntax: str = "1.2.840.10008.1.2.1") -> None:
    """A LABELMAP DICOM Segmentation (highdicom) of pydicom's CT series: one segment, ``brain``."""
    import highdicom as hd
    import pydicom

    from tilemask.sources.dicom import DicomSeriesSource

    series = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    images = [pydicom.dcmread(f) for f in DicomSeriesSource.open(str(series)).files]
    frames = np.zeros((len(images), images[0].Rows, images[0].Columns), np.uint8)
    frames[:, 4:12, 4:12] = 1
    tissue = hd.sr.CodedConcept("85756007", "SCT", "Tissue")
    algorithm = hd.AlgorithmIdentificationSequence("test", hd.sr.CodedConcept("113112", "DCM", "Artificial Intelligence"),
                                                   "1")  # fmt: skip
    brain = hd.seg.SegmentDescription(1, "brain", tissue, tissue, hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                      algorithm)  # fmt: skip
    seg = hd.seg.Segmentation(images, frames, hd.seg.SegmentationTypeValues.LABELMAP, [brain], hd.UID(), 900,
                              hd.UID(), 1, "test", "test", "1", "0", transfer_syntax_uid=transfer_syntax,
                              omit_empty_frames=False)  # fmt: skip
    seg.save_as(path, enforce_file_format=True)


@pytest.mark.timeout(60)
def test_a_dicom_segmentation_cut_short_is_left_out_with_a_warning(tmp_path, caplog):
    """A SEG cut short in its pixel data, or before it, was listed as whole, segments and all (its header was read
    up to its pixels, and pydicom stops where a file ends without a word). Each is left out, named in a warning with
    why; the whole ones, native, RLE and deflated (once left out as cut short), are listed."""
    import pydicom
    from starlette.testclient import TestClient

    from tilemask.serve import create_app

    write_segmentation(tmp_path / "whole_seg.dcm")
    write_segmentation(tmp_path / "rle_seg.dcm", transfer_syntax="1.2.840.10008.1.2.5")
    seg = pydicom.dcmread(tmp_path / "whole_seg.dcm")
    seg.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian  # pydicom writes it deflated
    seg.save_as(tmp_path / "deflated_seg.dcm", enforce_file_format=True)
    whole = (tmp_path / "whole_seg.dcm").read_bytes()
    (tmp_path / "pixels_cut_seg.dcm").write_bytes(whole[:-100])
    (tmp_path / "half_seg.dcm").write_bytes(whole[: len(whole) // 2])
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        listing = client.get("/?f=json")
        assert listing.status_code == 200 and client.get("/").status_code == 200
    segments = {o["path"]: o["segments"] for o in listing.json()["outputs"]}
    assert segments == {name: ["Background", "brain"] for name in ("deflated_seg.dcm", "rle_seg.dcm", "whole_seg.dcm")}
    warned = [r.getMessage() for r in caplog.records if "left out of the catalog" in r.getMessage()]
    pixels = len(pydicom.dcmread(tmp_path / "whole_seg.dcm").PixelData)
    assert (f"pixels_cut_seg.dcm: left out of the catalog: cut short: its PixelData holds {pixels - 100} of its "
            f"{pixels} bytes") in warned, warned  # fmt: skip
    assert "half_seg.dcm: left out of the catalog: no PixelData element: its image is missing" in warned, warned


@pytest.mark.timeout(60)
def test_labels_up_to_a_million_list_a_legend_of_their_classes_not_a_row_per_value(tmp_path):
    """A NIfTI label volume whose cal_max is 1e6, or whose colour table names label 1e6, made the index build a
    legend row for every value up to it: 2 minutes and 162 MB of JSON. The legend lists the first 256 classes, or
    the values the colour table names, in tilemask's colours (it listed class_2 to class_255 for a table naming 0, 1
    and 1e6)."""
    import nibabel as nib
    from starlette.testclient import TestClient

    from tilemask.formats import NIFTI_DESCRIP
    from tilemask.serve import create_app

    top = 1_000_000
    volume = np.zeros((8, 8, 8), np.int32)
    volume[0, 0, 0] = top
    for name, cal_max in (("calmax", top), ("table", 0)):
        img = nib.Nifti1Image(volume, np.eye(4))
        img.header["descrip"], img.header["cal_max"] = NIFTI_DESCRIP, cal_max
        nib.save(img, tmp_path / f"{name}_labels.nii.gz")
    (tmp_path / "table_labels.colors.csv").write_text(
        f"LabelValue,Name,Color_R,Color_G,Color_B,Color_A\n0,background,0,0,0,0\n1,liver,1,2,3,255\n{top},lesion,4,5,6,255\n"
    )
    colours = class_colours(top + 1)
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        listing = client.get("/?f=json")
        assert listing.status_code == 200 and client.get("/").status_code == 200
        item = client.get("/stac/items/table_labels.json")
    legends = {o["path"]: o["classes"] for o in listing.json()["outputs"]}
    assert [c["value"] for c in legends["calmax_labels.nii.gz"]] == list(range(256))
    assert [c["value"] for c in legends["table_labels.nii.gz"]] == [0, 1, top]
    lesion = legends["table_labels.nii.gz"][-1]
    assert lesion["name"] == "lesion" and tuple(lesion["rgba"]) == colours[top]
    for legend in legends.values():
        assert all(tuple(c["rgba"]) == colours[c["value"]] for c in legend)
    assert [c["name"] for c in item.json()["assets"]["labels"]["classification:classes"]][-1] == "lesion"


@pytest.mark.timeout(60)
def test_the_legend_of_nifti_labels_without_their_colour_table_leaves_out_the_nodata_label(tmp_path):
    """NIfTI labels' display range (cal_max) reaches their nodata label (255) where the scan had invalid voxels,
    so a viewer shows every value; without the colour table the legend, which runs to cal_max, listed 255 as a
    class."""
    import nibabel as nib
    from starlette.testclient import TestClient

    from tilemask.formats import nifti_descrip
    from tilemask.serve import create_app

    volume = np.zeros((8, 8, 8), np.uint8)
    volume[0, 0, :3], volume[1] = (1, 2, 0), 255
    for name, nodata, cal_max in (("nodata", 255, 255), ("none", None, 2)):
        img = nib.Nifti1Image(volume, np.eye(4))
        img.header["descrip"], img.header["cal_max"] = nifti_descrip(nodata), cal_max
        nib.save(img, tmp_path / f"{name}_labels.nii.gz")
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        listing = client.get("/?f=json")
    legends = {o["path"]: [c["value"] for c in o["classes"]] for o in listing.json()["outputs"]}
    assert legends == {"nodata_labels.nii.gz": list(range(255)), "none_labels.nii.gz": [0, 1, 2]}, legends


def test_a_folder_whose_own_name_is_not_utf8_is_served_with_its_name_escaped(tmp_path):
    """Serving a folder named with Latin-1 bytes (r\\xe9sultats) made the index and its JSON a 500: the title
    held its name's surrogate escapes, which do not encode. Its name is shown with the byte escaped."""
    import os

    from starlette.testclient import TestClient

    from tilemask.serve import create_app

    folder = os.fsdecode(os.fsencode(tmp_path) + b"/r\xe9sultats")
    os.mkdir(folder)
    Image.new("RGB", (4, 4)).save(Path(folder) / "ok.png")
    with TestClient(create_app(folder), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        listing, page = client.get("/?f=json"), client.get("/")
    assert listing.status_code == 200 and page.status_code == 200, (listing.text, page.text)
    assert listing.json()["title"] == "tilemask: r\\xe9sultats" and "<h1>tilemask: r\\xe9sultats</h1>" in page.text
    assert [o["path"] for o in listing.json()["outputs"]] == ["ok.png"]


@pytest.mark.timeout(120)
def test_probability_tiles_of_a_cog_draw_the_band_asked_for_at_every_zoom(tmp_path, served_folder):
    """A probability tile of a COG reads every band and draws the one asked for (GDAL warps one band of a masked
    multi-band COG 100x slower than all of them: 6 to 28 s for a zoom-0 tile of the demo's COG, docs/serve.md;
    timed by hand, not here): the one asked for at zoom 10, where the tile is GDAL's warp of the band, and a
    tile at each zoom."""
    import morecantile
    from rio_tiler.colormap import cmap
    from starlette.testclient import TestClient

    from tilemask.serve import create_app

    for name in (LABELS, PROBS):
        shutil.copyfile(served_folder / name, tmp_path / name)
    tms = morecantile.tms.get("WebMercatorQuad")
    ramp = np.array([cmap.get("viridis")[i] for i in range(256)], np.uint8)
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        for z in (0, 1, 10):
            tile = tms.tile(-77.9, 24.6, z)
            url = f"/tiles/{z}/{tile.x}/{tile.y}.png?output={LABELS}"
            png(client.get(url))  # the datasets opened, the labels' blocks read
            for band in (1, 3):
                rgba = png(client.get(f"{url}&band={band}"))
                assert rgba.shape == (256, 256, 4) and rgba[..., 3].any(), (z, band)
                if z == 10:
                    expected = expected_tile(tmp_path / PROBS, tile.x, tile.y, z, band=band)
                    inside = expected >= 0
                    assert np.all(rgba[inside] == ramp[expected[inside]], axis=-1).mean() > 0.97


def test_a_json_table_with_an_integer_past_64_bits_and_an_infinite_number_has_it_null(tmp_path):
    """A JSON table holding an integer past 64 bits (orjson's limit) and a number too large for a double (1e400:
    inf, as Python's json reads it) was a 422 "Out of range float values are not JSON compliant"; the inf is null,
    as everywhere in /stats, and the integer whole."""
    from starlette.testclient import TestClient

    from tilemask.serve import create_app

    big = 2**64 + 1
    (tmp_path / "ids.json").write_text(f'[{{"id": {big}, "area": 1e400}}, {{"id": 2, "area": 0.5}}]')
    assert json.loads((tmp_path / "ids.json").read_text())[0]["area"] == float("inf")
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1") as client:
        answer = client.get("/stats", params={"output": "ids.json"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == [{"id": big, "area": None}, {"id": 2, "area": 0.5}]


@pytest.mark.timeout(60)
def test_a_collection_asked_by_id_is_found_without_classifying_the_folder_again(tmp_path, served_folder, monkeypatch):
    """Each ``/collections/<id>/items`` (the map asks one per view and page) and STAC item walked the whole folder
    and looked at every file and its sidecars again: 93 ms a feature page in a folder of 2,000 COGs (12 ms now).
    The ids still follow the folder: a file of the same stem added, removed, or a copy left out that becomes
    whole in place."""
    from starlette.testclient import TestClient

    from tilemask.serve import create_app
    from tilemask.serve.catalog import Catalog

    shutil.copyfile(served_folder / POLYGONS, tmp_path / POLYGONS)
    for i in range(40):
        shutil.copyfile(served_folder / LABELS, tmp_path / f"s{i:02d}_mask.tif")
    classified = []
    real = Catalog._classified

    def counted(self, path, names=None):  # the real classification, counted
        classified.append(path)
        return real(self, path, names)

    monkeypatch.setattr(Catalog, "_classified", counted)
    items = "/collections/RGB.byte_polygons/items?limit=1"
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1") as client:
        assert [c["id"] for c in client.get("/collections").json()["collections"]] == ["RGB.byte_polygons"]
        classified.clear()
        for _ in range(5):
            assert client.get(items).json()["numberMatched"] == len(gpd.read_file(tmp_path / POLYGONS))
        assert client.get("/stac/items/RGB.byte_polygons.json").status_code == 200
        assert client.get("/stac/items/s07_mask.json").json()["assets"]["labels"]["title"] == "s07_mask.tif"
        assert len(classified) <= 7, len(classified)  # one file a request, not the 41
        assert client.get("/collections/nope/items").status_code == 404  # after a new listing

        stamp = tmp_path.stat()
        shutil.copyfile(tmp_path / POLYGONS, tmp_path / "fresh.gpkg")
        os.utime(tmp_path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # published in the listing's clock tick
        assert client.get("/collections/fresh/items?limit=1").status_code == 200  # not in the listing: listed again
        (tmp_path / "fresh.gpkg").unlink()

        (tmp_path / "sub").mkdir()
        shutil.copyfile(tmp_path / POLYGONS, tmp_path / "sub" / POLYGONS)  # the stem is shared: ids are paths
        assert client.get(items).status_code == 404
        assert client.get("/collections/sub--RGB.byte_polygons.gpkg/items?limit=1").status_code == 200
        (tmp_path / "sub" / POLYGONS).unlink()
        assert client.get(items).status_code == 200
        assert client.get("/collections/sub--RGB.byte_polygons.gpkg/items?limit=1").status_code == 404

        whole = (tmp_path / POLYGONS).read_bytes()
        with open(tmp_path / "late.gpkg", "wb") as f:  # a copy seen before it is whole: left out
            f.write(whole[: len(whole) // 3])
        assert client.get("/collections/late/items?limit=1").status_code == 404
        with open(tmp_path / "late.gpkg", "r+b") as f:  # whole now, in place: its folder's mtime stays
            f.seek(len(whole) // 3)
            f.write(whole[len(whole) // 3 :])
        assert client.get("/collections/late/items?limit=1").status_code == 200


def test_a_csv_whose_first_row_has_more_cells_than_its_header_is_a_422_not_shifted_records(tmp_path):
    """pandas takes the extra cell of a first row longer than the header as the row's index: ``a,b`` over
    ``1,2,3`` was served as ``{"a": 2, "b": 3}``, every value under the wrong name and the first lost. A longer
    row further down was already refused (pandas: "Expected 2 fields"); a shorter one has its missing cells
    null, as an empty cell."""
    import csv

    from starlette.testclient import TestClient

    from tilemask.serve import create_app

    (tmp_path / "ragged.csv").write_text("region,pixels\n01001,12,7\n99999,3,4\n")
    (tmp_path / "short.csv").write_text("region,pixels,area\n01001,12,0.5\n99999,3\n")
    with open(tmp_path / "ragged.csv", newline="") as f:
        header, first = list(csv.reader(f))[:2]
    assert len(first) > len(header)
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1") as client:
        answer = client.get("/stats", params={"output": "ragged.csv"})
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"].startswith("ragged.csv: not a table: ") and "3" in answer.json()["detail"]
        short = client.get("/stats", params={"output": "short.csv"})
        rows = [{"region": "01001", "pixels": 12, "area": 0.5}, {"region": "99999", "pixels": 3, "area": None}]
        assert short.json() == rows


def test_the_catalogs_cache_forgets_files_removed_from_the_folder(tmp_path, served_folder):
    """A long-lived server over a folder whose outputs come and go kept the classification of every file it had
    ever listed. After a listing, it holds those of the files there now."""
    from tilemask.serve.catalog import Catalog

    shutil.copyfile(served_folder / LABELS, tmp_path / "kept_mask.tif")
    for i in range(40):
        (tmp_path / f"note{i}.txt").write_text("not an output")
    catalog = Catalog(tmp_path)
    assert [e.path for e in catalog.entries()] == ["kept_mask.tif"]
    assert len(catalog._cache) == 41
    for i in range(40):
        (tmp_path / f"note{i}.txt").unlink()
    assert [e.path for e in catalog.entries()] == ["kept_mask.tif"]
    assert set(catalog._cache) == {str(tmp_path / "kept_mask.tif")}


def test_every_get_route_answers_head_and_a_range_of_another_unit_is_ignored(server, served_folder):
    """A reviewer's: HEAD was a 405 everywhere but ``/files`` and ``/static`` (RFC 9110 9.1: every general-purpose
    server supports GET and HEAD, which OGC API - Features Core asks for), and ``Range: items=0-1`` a 400 where RFC
    9110 14.2 says to ignore a unit the server does not know. HEAD answers as GET would, with no body."""
    for route in ("", "?f=json", "map", "view?volume=anatomical_labels.nii.gz", "tiles/9/144/219.png?output=" + LABELS,
                  "conformance", "collections", "stac/catalog.json", "volumes/anatomical_labels.nii.gz",
                  f"stats?output={POLYGONS}", "static/map.js", f"files/{LABELS}", "tiles/1/5/0.png?output=" + LABELS):
        whole, head = get(f"{server}{route}"), httpx.head(f"{server}{route}", timeout=30)
        assert (head.status_code, head.content) == (whole.status_code, b""), route
        assert head.headers.get("content-type") == whole.headers.get("content-type"), route
        assert head.headers.get("content-length") == whole.headers.get("content-length") == str(len(whole.content))
    data = (served_folder / LABELS).read_bytes()
    other_unit = get(f"{server}files/{LABELS}", headers={"Range": "items=0-1"})
    assert (other_unit.status_code, other_unit.content == data) == (200, True)


@pytest.mark.timeout(60)
def test_a_range_that_is_invalid_is_ignored_and_one_past_the_end_is_a_416(tmp_path):
    """A review's: ``Range: bytes=5-2`` (last before first) was a 400, as were ``bytes=abc`` and ``bytes=`` (Starlette's
    "Range header: start must be less than end"), where RFC 9110 14.1.1 calls such a ranges-specifier invalid, and
    14.2 lets a server ignore it: the whole file, 200. ``bytes=abc,0-1`` gave bytes 0-1: one invalid range-spec
    makes the whole specifier invalid, ignored too. A valid one past the end stays a 416, with the file's size; in a set
    with ranges that are not, it is left out (14.1.2), where Starlette answered the whole set with a 416."""
    from .conftest import start_server

    data = bytes(range(100))
    (tmp_path / "blob.bin").write_bytes(data)
    with start_server(tmp_path, "--workers", "1") as url:
        for invalid in ("bytes=5-2", "bytes=abc", "bytes=", "bytes=5-2,0-1", "bytes=abc,0-1", "bytes=1-2-3", "bytes=-"):
            r = get(f"{url}files/blob.bin", headers={"Range": invalid})
            assert (r.status_code, r.content, "content-range" in r.headers) == (200, data, False), invalid
        for unsatisfiable in ("bytes=100-", "bytes=200-300", "bytes=-0"):
            r = get(f"{url}files/blob.bin", headers={"Range": unsatisfiable})
            assert (r.status_code, r.headers["content-range"]) == (416, "bytes */100"), unsatisfiable
        for valid, expected in (("bytes=5-5", data[5:6]), ("bytes=-5", data[95:]), ("bytes=98-200", data[98:]),
                                ("bytes= 0-4", data[:5])):  # fmt: skip
            r = get(f"{url}files/blob.bin", headers={"Range": valid})
            assert (r.status_code, r.content) == (206, expected), valid
        head = httpx.head(f"{url}files/blob.bin", headers={"Range": "bytes=5-2"}, timeout=30)
        assert (head.status_code, head.headers["content-length"]) == (200, "100")
        # a set of ranges is satisfiable when one of them is (14.1.2): answered with those (Starlette's 416)
        r = get(f"{url}files/blob.bin", headers={"Range": "bytes=0-1,100-,-0"})
        assert (r.status_code, r.headers["content-range"], r.content) == (206, "bytes 0-1/100", data[:2])
        r = get(f"{url}files/blob.bin", headers={"Range": "bytes=150-160,98-,0-1"})
        assert r.status_code == 206 and r.headers["content-type"].startswith("multipart/byteranges")
        assert b"Content-Range: bytes 0-1/100" in r.content and b"Content-Range: bytes 98-99/100" in r.content
        r = get(f"{url}files/blob.bin", headers={"Range": "bytes=100-,200-300"})
        assert (r.status_code, r.headers["content-range"]) == (416, "bytes */100")


@pytest.mark.timeout(60)
def test_a_range_of_numbers_too_long_for_int_is_answered_as_its_value_says(tmp_path):
    """A review's: a range whose number has 4,300 digits or more (Python's int() refuses them, as Starlette reads
    them) was a 400 ("range must be requested"), where RFC 9110 14.1.2 reads it as its value: one past the end is a
    416, a last or a suffix past the end is the rest of the file, leading zeros are nothing."""
    from .conftest import start_server

    data, huge = bytes(range(100)), "9" * 5000
    (tmp_path / "blob.bin").write_bytes(data)
    with start_server(tmp_path, "--workers", "1") as url:
        r = get(f"{url}files/blob.bin", headers={"Range": f"bytes={huge}-"})
        assert (r.status_code, r.headers.get("content-range")) == (416, "bytes */100")
        for spec, expected in ((f"0-{huge}", data), (f"-{huge}", data), (f"{'0' * 5000}5-6", data[5:7]),
                               (f"98-{'0' * 4999}99", data[98:])):  # fmt: skip
            r = get(f"{url}files/blob.bin", headers={"Range": f"bytes={spec}"})
            assert (r.status_code, r.content) == (206, expected), spec[-10:]


def test_a_scan_cut_short_is_left_out_not_paired_with_its_labels(tmp_path, served_folder, caplog):
    """A reviewer's: a scan still being copied beside intact labels was listed and paired with them; the viewer
    then stopped at "loading" with gzip's "Compressed input was truncated", naming no file, and drew no labels.
    It is left out with a warning, as labels cut short are, and the labels stand alone."""
    from starlette.testclient import TestClient

    from tilemask.serve import create_app

    shutil.copyfile(served_folder / "anatomical_labels.nii.gz", tmp_path / "anatomical_labels.nii.gz")
    shutil.copyfile(served_folder / "anatomical_labels.colors.csv", tmp_path / "anatomical_labels.colors.csv")
    whole = (served_folder / "anatomical.nii").read_bytes()
    (tmp_path / "anatomical.nii").write_bytes(whole[: len(whole) // 2])
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1") as client:
        outputs = client.get("/?f=json").json()["outputs"]
    assert [(o["path"], o["kind"], o.get("scan")) for o in outputs] == [("anatomical_labels.nii.gz", "labels", None)]
    assert any("anatomical.nii: left out of the catalog" in r.getMessage() and "truncated" in r.getMessage()
               for r in caplog.records), caplog.text  # fmt: skip


def test_the_browser_copy_of_a_tilted_gantrys_labels_lies_where_simpleitk_puts_them(tmp_path):
    """Labels of a tilted gantry's series (a sheared sform, the qform SimpleITK's grid of the series, as tilemask
    writes them) keep both in the copy a browser is sent: its qform was nibabel's compromise of the sheared
    affine, which ITK read 4.6 mm off the series at the far corner."""
    import gzip

    import nibabel as nib
    import SimpleITK as sitk

    from tilemask.serve.volumes import browser_copy
    from tilemask.sinks.nifti import unsheared

    sform = np.array([[-0.7, 0.0, 0.0, 40.0], [0.0, -0.7, -2.5 * np.sin(np.radians(15)), -25.0],
                      [0.0, 0.0, 2.5 * np.cos(np.radians(15)), 60.0], [0.0, 0.0, 0.0, 1.0]])  # fmt: skip
    voxels = np.zeros((272, 256, 250), np.uint8)  # over 256^3: the copy takes every second voxel
    voxels[100:150, 80:120, 30:60] = 2
    labels = nib.Nifti1Image(voxels, sform)
    labels.set_qform(unsheared(sform), code=1)
    labels.set_sform(sform, code=1)
    nib.save(labels, tmp_path / "labels.nii.gz")
    (tmp_path / "copy.nii").write_bytes(gzip.decompress(browser_copy(tmp_path / "labels.nii.gz", (0,))))

    def grid(path):
        image = sitk.ReadImage(str(path))
        return np.array(image.GetOrigin()), np.array(image.GetDirection()), np.array(image.GetSpacing())

    (origin, direction, spacing), (their_origin, their_direction, their_spacing) = (
        grid(tmp_path / "copy.nii"), grid(tmp_path / "labels.nii.gz"))  # fmt: skip
    assert nib.load(tmp_path / "copy.nii").shape == (136, 128, 125)
    np.testing.assert_allclose(origin, their_origin, atol=1e-4)
    np.testing.assert_allclose(direction, their_direction, atol=1e-4)
    np.testing.assert_allclose(spacing, 2 * their_spacing, atol=1e-4)
    np.testing.assert_allclose(nib.load(tmp_path / "copy.nii").header.get_sform(), sform @ np.diag([2, 2, 2, 1]),
                               atol=1e-6)  # fmt: skip


@pytest.mark.timeout(120)
def test_a_zoomed_out_tile_of_a_narrow_plain_zarr_is_drawn_as_its_cog_is(tmp_path):
    """A plain Zarr's zoomed-out tiles read its every (2**k)-th pixel, k up to 7 whatever its size: a strip 100
    pixels high read one row at k = 7, and rioxarray refused it ("At least one of the raster x,y coordinates has
    only one point", a 422) where the COG of the same labels, and the Zarr before, drew it. k stops where two
    pixels are left on each axis; the tile covers what the COG's does."""
    import morecantile
    from starlette.testclient import TestClient

    from tilemask.geometry import RasterGeometry
    from tilemask.serve import create_app
    from tilemask.sinks import OutputLayout, make_sink

    labels = np.random.default_rng(4).integers(1, 3, size=(100, 3000)).astype(np.uint8)
    geometry = RasterGeometry(rasterio.crs.CRS.from_epsg(32618).to_wkt(), (500000.0, 30.0, 0.0, 4000000.0, 0.0, -30.0))
    layout = OutputLayout(labels.shape, (100, 256), ("background", "water", "land"), "uint8", 0, "none", geometry,
                          "input.tif", 255)  # fmt: skip
    for suffix in (".tif", ".zarr"):
        sink = make_sink(str(tmp_path / f"strip{suffix}"), layout)
        sink.create()
        for c in range(0, 3000, 256):
            sink.write(((0, 100), (c, min(c + 256, 3000))), labels[:, c : c + 256], None)
        sink.commit()
    lon, lat = Transformer.from_crs(32618, 4326, always_xy=True).transform(545000, 3998500)
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1") as client:
        for zoom in (5, 4):  # 2.4 and 4.9 km tile pixels: k = 7 on the 30 m grid
            tile = morecantile.tms.get("WebMercatorQuad").tile(lon, lat, zoom)
            cog, plain = (png(client.get(f"/tiles/{zoom}/{tile.x}/{tile.y}.png", params={"output": f"strip{suffix}"}))
                          for suffix in (".tif", ".zarr"))  # fmt: skip
            assert (plain[..., 3] > 0).any() and np.mean((cog[..., 3] > 0) == (plain[..., 3] > 0)) > 0.999, zoom


@pytest.mark.timeout(120)
def test_a_plain_zarr_being_strided_does_not_hold_up_another_outputs_tiles(tmp_path, monkeypatch):
    """A plain Zarr's zoomed-out level is made once under a lock, and that lock was one for every output: while
    the first zoomed-out view of a large Zarr read its whole store (12 s for 8192^2), every zoomed-out tile of
    every other plain Zarr waited, cached ones too. Each level has a lock of its own."""
    import threading

    from tilemask.geometry import RasterGeometry
    from tilemask.serve import raster
    from tilemask.sinks import OutputLayout, make_sink

    labels = np.random.default_rng(4).integers(1, 3, size=(300, 300)).astype(np.uint8)
    geometry = RasterGeometry(rasterio.crs.CRS.from_epsg(32618).to_wkt(), (500000.0, 30.0, 0.0, 4000000.0, 0.0, -30.0))
    layout = OutputLayout(labels.shape, (150, 150), ("background", "water", "land"), "uint8", 0, "none", geometry,
                          "input.tif", 255)  # fmt: skip
    stamps = {}
    for name in ("slow", "quick"):
        path = str(tmp_path / f"{name}.zarr")
        sink = make_sink(path, layout)
        sink.create()
        for r in (0, 150):
            for c in (0, 150):
                sink.write(((r, r + 150), (c, c + 150)), labels[r : r + 150, c : c + 150], None)
        sink.commit()
        st = os.stat(f"{path}/zarr.json")
        stamps[name] = (path, st.st_mtime_ns, st.st_ino)
    reading, release = threading.Event(), threading.Event()
    plain_level = raster._plain_level

    def slow_for_one(path, variable, level, mtime_ns, inode):  # the large store's one read, held until released
        if path == stamps["slow"][0]:
            reading.set()
            release.wait(30)
        return plain_level(path, variable, level, mtime_ns, inode)

    monkeypatch.setattr(raster, "_plain_level", slow_for_one)
    path, mtime_ns, inode = stamps["slow"]
    worker = threading.Thread(target=raster._zarr_array, args=(path, "labels", 2, mtime_ns, inode))
    worker.start()
    try:
        assert reading.wait(30)
        done = threading.Event()
        quick = threading.Thread(target=lambda: (raster._zarr_array(stamps["quick"][0], "labels", 2,
                                                                    *stamps["quick"][1:]), done.set()))  # fmt: skip
        quick.start()
        assert done.wait(10), "another output's zoomed-out level waited for the slow one's"
    finally:
        release.set()
        worker.join(30)


@pytest.mark.timeout(60)
def test_a_plain_zarrs_kept_level_is_bounded_in_bytes_not_pixels(tmp_path):
    """A plain Zarr's zoomed-out level is kept in memory while small: counted in pixels, a level of float32
    probabilities of 5 classes was kept at 80 MiB (16 such levels: 1.3 GB in the server, a review's figure). It is
    kept while it takes at most ``KEPT_BYTES``, all its classes: the labels here are kept, the probabilities read
    lazily."""
    from tilemask.geometry import RasterGeometry
    from tilemask.serve import raster
    from tilemask.sinks import OutputLayout, make_sink

    side, classes = 1100, 5
    labels = np.random.default_rng(4).integers(0, classes, size=(side, side)).astype(np.uint8)
    probabilities = np.random.default_rng(5).random((classes, side, side), dtype=np.float32)
    assert labels.nbytes <= raster.KEPT_BYTES < probabilities.nbytes  # a pixel count would keep both
    geometry = RasterGeometry(rasterio.crs.CRS.from_epsg(32618).to_wkt(), (500000.0, 30.0, 0.0, 4000000.0, 0.0, -30.0))
    layout = OutputLayout(labels.shape, (side, side), tuple(f"c{i}" for i in range(classes)), "uint8", classes,
                          "float32", geometry, "input.tif")  # fmt: skip
    path = str(tmp_path / "scores.zarr")
    sink = make_sink(path, layout)
    sink.create()
    sink.write(((0, side), (0, side)), labels, probabilities)
    sink.commit()
    st = os.stat(f"{path}/zarr.json")
    kept = raster._plain_level(path, "labels", 0, st.st_mtime_ns, st.st_ino)
    lazy = raster._plain_level(path, "probabilities", 0, st.st_mtime_ns, st.st_ino)
    assert isinstance(kept.data, np.ndarray) and not isinstance(lazy.data, np.ndarray)
    np.testing.assert_array_equal(kept.values, labels)
    np.testing.assert_allclose(lazy.values, probabilities)


def _write_labels(path: Path, labels: np.ndarray, chunk: int = 256) -> None:
    """``labels`` written as a tilemask output at ``path`` (its suffix: the format), on a 30 m UTM 18N grid."""
    from tilemask.geometry import RasterGeometry
    from tilemask.sinks import OutputLayout, make_sink

    geometry = RasterGeometry(rasterio.crs.CRS.from_epsg(32618).to_wkt(), (500000.0, 30.0, 0.0, 4000000.0, 0.0, -30.0))
    layout = OutputLayout(labels.shape, (chunk, chunk), ("background", "water", "land"), "uint8", 0, "none", geometry,
                          "input.tif", 255)  # fmt: skip
    sink = make_sink(str(path), layout)
    sink.create()
    for r in range(0, labels.shape[0], chunk):
        for c in range(0, labels.shape[1], chunk):
            region = ((r, min(r + chunk, labels.shape[0])), (c, min(c + chunk, labels.shape[1])))
            sink.write(region, labels[r : r + chunk, c : c + chunk], None)
    sink.commit()


@pytest.mark.timeout(120)
def test_an_ome_zarr_replaced_by_one_of_fewer_levels_while_served_is_drawn_from_its_own_levels(tmp_path):
    """The levels of an OME-Zarr's pyramid were looked up once per path and kept: a store replaced while served
    (a run again with --overwrite on a smaller input) by one of fewer levels was read at a level it no longer had,
    and every zoomed-out tile was a 500 (``KeyError: 'labels/labels/2'``) until the server was restarted. They are
    looked up again when the store changes, as its arrays are: its tile is the one a fresh server draws."""
    import morecantile
    from starlette.testclient import TestClient

    from tilemask.serve import create_app

    store = tmp_path / "scene_mask.ome.zarr"
    rng = np.random.default_rng(5)
    _write_labels(store, rng.integers(1, 3, size=(600, 600)).astype(np.uint8))  # levels 0, 1, 2
    lon, lat = Transformer.from_crs(32618, 4326, always_xy=True).transform(503000, 3997000)
    tile = morecantile.tms.get("WebMercatorQuad").tile(lon, lat, 8)  # 490 m pixels: the coarsest level
    url = f"/tiles/8/{tile.x}/{tile.y}.png"
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        png(client.get(url, params={"output": store.name}))
        shutil.rmtree(store)
        _write_labels(store, rng.integers(1, 3, size=(200, 200)).astype(np.uint8))  # level 0 only
        replaced = png(client.get(url, params={"output": store.name}))
    (tmp_path / "fresh").mkdir()
    shutil.move(store, tmp_path / "fresh" / store.name)
    with TestClient(create_app(tmp_path / "fresh"), base_url="http://127.0.0.1") as client:
        fresh = png(client.get(url, params={"output": store.name}))
    assert (fresh[..., 3] > 0).any() and np.array_equal(replaced, fresh)


@pytest.mark.timeout(120)
def test_a_strips_ome_zarr_is_drawn_zoomed_out_not_refused_for_its_levels_of_one_row(tmp_path):
    """Levels halve only the axes of more than one pixel: a strip 40 pixels high and 20000 wide has levels of
    1 x 313 and 1 x 157. A zoomed-out tile read them, and rio-tiler's clip_box refuses a raster of one row: a 422
    ("At least one of the raster x,y coordinates has only one point") at zoom 6 and out. It is drawn from the
    coarsest level of two rows or more, as a plain Zarr's strided levels are."""
    import morecantile
    import zarr
    from starlette.testclient import TestClient

    from tilemask.serve import create_app

    store = tmp_path / "strip_mask.ome.zarr"
    _write_labels(store, np.random.default_rng(7).integers(1, 3, size=(40, 20000)).astype(np.uint8))
    assert [zarr.open_group(store, mode="r")["labels/labels"][str(n)].shape[0] for n in range(8)] == [
        40, 20, 10, 5, 3, 2, 1, 1]  # fmt: skip
    lon, lat = Transformer.from_crs(32618, 4326, always_xy=True).transform(800000, 3999400)
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        for zoom in (7, 6, 4):
            tile = morecantile.tms.get("WebMercatorQuad").tile(lon, lat, zoom)
            response = client.get(f"/tiles/{zoom}/{tile.x}/{tile.y}.png", params={"output": store.name})
            assert response.status_code == 200, (zoom, response.text)
            assert (png(response)[..., 3] > 0).any(), zoom
