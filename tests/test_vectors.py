"""Polygons merged across chunk borders equal one whole-image ``rasterio.features.shapes`` run.

Chunks are small (48-64 pixels) so that most regions cross chunk borders; the
reference polygonizes the whole label image at once (4-connectivity, foreground
only).  Geometries are compared exactly after ``shapely.normalize`` (vertex order
and ring start), plus topological equality as a second opinion.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.features
import shapely
from pyproj import CRS
from rasterio.transform import Affine
from scipy import ndimage

from tilemask.errors import InputError, OutputError, ReadError
from tilemask.vectors import write_polygons

CLASSES = ("background", "water", "forest", "urban")


def blobs(shape, seed, n_classes=4, nodata=None, sigma=5):
    """Smooth random classes (regions of all sizes, holes, islands) and scattered nodata."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    labels = np.digitize(field, np.quantile(field, np.linspace(0.4, 0.9, n_classes - 1))).astype(np.uint8)
    if nodata is not None:
        labels[rng.random(shape) < 0.005] = nodata
        labels[:5, :] = nodata
    return labels


def write_raster(path, labels, crs, transform, nodata=None):
    with rasterio.open(path, "w", driver="GTiff", width=labels.shape[1], height=labels.shape[0], count=1,
                       dtype=labels.dtype, crs=crs, transform=transform, nodata=nodata) as dst:  # fmt: skip
        dst.write(labels, 1)
    return str(path)


def reference_shapes(labels, transform, nodata):
    """The whole image polygonized at once: the answer the chunked result must equal."""
    mask = labels != 0
    if nodata is not None:
        mask &= labels != nodata
    return [(shapely.geometry.shape(g), int(v)) for g, v in rasterio.features.shapes(labels, mask=mask, connectivity=4, transform=transform)]


def read(path):
    return gpd.read_parquet(path) if str(path).endswith(".parquet") else gpd.read_file(path)


def assert_identical(result: gpd.GeoDataFrame, reference, class_names):
    expected = Counter((shapely.normalize(g).wkb, class_names[v]) for g, v in reference)
    got = Counter((shapely.normalize(g).wkb, c) for g, c in zip(result.geometry, result["class"]))
    assert len(result) == len(reference)
    assert got == expected
    tree = shapely.STRtree([g for g, _ in reference])
    for geom in result.geometry:
        assert any(shapely.equals(geom, reference[k][0]) for k in tree.query(geom.representative_point()))


def areas_by_class(geoms, classes, crs, step=None):
    """Area per class: planar, or for a geographic CRS geodesic on the polygons with a vertex every ``step``
    (degrees) along their edges, so that the geodesics between vertices follow the parallels of the pixel edges."""
    crs = CRS.from_user_input(crs)
    totals = defaultdict(float)
    for geom, name in zip(geoms, classes):
        if crs.is_geographic:
            totals[name] += abs(crs.get_geod().geometry_area_perimeter(shapely.segmentize(geom, step))[0])
        else:
            totals[name] += geom.area
    return dict(totals)


@pytest.mark.parametrize("suffix", [".gpkg", pytest.param(".fgb", marks=pytest.mark.slow),
                                    pytest.param(".parquet", marks=pytest.mark.slow)])
def test_projected_labels_match_whole_image_shapes(tmp_path, client, suffix):
    labels = blobs((400, 520), seed=3, nodata=255)
    transform = Affine(300.0379266750948, 0.0, 101985.0, 0.0, -300.041782729805, 2826915.0)  # RGB.byte's grid
    path = write_raster(tmp_path / "labels.tif", labels, "EPSG:32618", transform, nodata=255)
    out = write_polygons(path, str(tmp_path / f"polygons{suffix}"), client=client, class_names=CLASSES, chunks=64)
    assert out == str(tmp_path / f"polygons{suffix}")
    result = read(out)
    reference = reference_shapes(labels, transform, 255)
    assert len(reference) > 100
    crossing = sum(1 for g, _ in reference if _spans_chunks(g, transform, 64))
    assert crossing > 20  # the test is about merging: many regions cross borders
    assert result.crs == CRS.from_epsg(32618)
    assert list(result.columns[:2]) == ["class", "area_m2"] or set(result.columns) >= {"class", "area_m2"}
    assert_identical(result, reference, CLASSES)
    expected = areas_by_class([g for g, _ in reference], [CLASSES[v] for _, v in reference], "EPSG:32618")
    got = result.groupby("class")["area_m2"].sum().to_dict()
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-12)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_geographic_crs_geodesic_area(tmp_path, client):
    labels = blobs((300, 360), seed=11, nodata=None, n_classes=3)
    transform = Affine(0.001, 0, 11.0, 0, -0.001, 46.5)
    path = write_raster(tmp_path / "labels.tif", labels, "EPSG:4326", transform)
    result = read(write_polygons(path, str(tmp_path / "p.gpkg"), client=client, chunks=48))
    names = ("class_0", "class_1", "class_2")  # the raster records no class names
    reference = reference_shapes(labels, transform, None)
    assert_identical(result, reference, names)
    expected = areas_by_class([g for g, _ in reference], [names[v] for _, v in reference], "EPSG:4326", 0.0002)
    got = result.groupby("class")["area_m2"].sum().to_dict()
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-9)
    # a 0.001 degree pixel near 46.5 N is about 111 m x 77 m: geodesic m^2, not square degrees
    assert 8.0e3 < result["area_m2"].sum() / np.count_nonzero(labels) < 9.0e3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("crs", [None, "EPSG:32618"])
def test_polygons_written_beside_another_threads_silenced_warnings_leave_the_process_filters_as_they_were(tmp_path,
                                                                                                          crs):  # fmt: skip
    """Polygons were written inside ``warnings.catch_warnings()``, which saves the process's filters and puts them
    back: a thread in :func:`~tilemask.imports.ignoring_warnings` (a network traced on a worker thread of the same
    process) that left meanwhile had its "ignore every warning" put back by the writer, for good."""
    import threading

    from tilemask.imports import ignoring_warnings
    from tilemask.polygon_files import AreaRule, write_features
    from tilemask.vectors import FeatureBatch

    before = list(warnings.filters)
    inside, leave = threading.Event(), threading.Event()

    def silenced() -> None:
        with ignoring_warnings():
            inside.set()
            leave.wait(30)

    other = threading.Thread(target=silenced)
    other.start()
    assert inside.wait(30)

    def batches():  # pulled by pyogrio as it writes: the other thread leaves then
        leave.set()
        other.join(30)
        boxes = shapely.box(np.arange(3.0), 0.0, np.arange(3.0) + 0.5, 0.5)
        yield FeatureBatch(list(shapely.to_wkb(boxes)), np.array(["a"] * 3, object), np.ones(3))

    write_features(str(tmp_path / "p.gpkg"), ".gpkg", batches(), AreaRule((0, 1, 0, 0, 0, -1), crs), 10)
    assert not other.is_alive()
    unsaid = ("ignore", "'crs' was not provided")  # pyogrio's, for polygons without a CRS, may stay silenced
    assert [f for f in warnings.filters if (f[0], getattr(f[1], "pattern", None)) != unsaid] == before
    assert len(read(str(tmp_path / "p.gpkg"))) == 3


def test_without_a_crs_the_polygons_have_no_area(tmp_path, client, caplog):
    """The coordinates are in no known unit: area_m2 was the planar area in them, as if metres; the statistics
    leave it empty."""
    labels = blobs((120, 150), seed=3, nodata=None, n_classes=3)
    transform = Affine(30.0, 0, 1000.0, 0, -30.0, 5000.0)
    path = write_raster(tmp_path / "labels.tif", labels, None, transform)
    with caplog.at_level("WARNING", logger="tilemask.vectors"), warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        result = read(write_polygons(path, str(tmp_path / "p.gpkg"), client=client, chunks=48))
    # said once, by tilemask: pyogrio's "UserWarning: 'crs' was not provided ..." followed it, with a line of code
    assert [str(w.message) for w in warned if "crs" in str(w.message).lower()] == []
    assert_identical(result, reference_shapes(labels, transform, None), ("class_0", "class_1", "class_2"))
    assert len(result) > 10 and result["area_m2"].isna().all()
    assert "has no CRS: the polygons' area_m2 is left empty" in caplog.text
    import pyarrow.parquet as pq  # null, not NaN (GeoPackage stores NaN as NULL; GeoParquet keeps NaN)

    column = pq.read_table(write_polygons(path, str(tmp_path / "p.parquet"), client=client, chunks=48))["area_m2"]
    assert column.null_count == len(column) == len(result)


@pytest.mark.parametrize(
    "rows, cols, west",
    [((0, 180), (0, 360), -180), ((80, 90), (0, 360), -180), ((20, 40), (30, 150), -180), ((80, 100), (0, 20), 170)],
    ids=["globe", "band-0-10N-360deg", "50-70N-120deg", "antimeridian-170-190E"],
)
def test_geographic_area_of_wide_regions(tmp_path, client, rows, cols, west):
    """A region bounded by long parallels (merged pixel edges, one edge per side) gets the area of its pixels: the
    stats module's per-pixel geodesic sum (its own 1-degree pixels' edges are geodesics: 3e-5 off away from the
    equator) and, closer, the geodesic area of the polygon with a vertex every 0.01 degree along its edges."""
    from tilemask.stats.measure import geodesic_row_areas

    labels = np.zeros((180, 360), np.uint8)
    labels[slice(*rows), slice(*cols)] = 1
    transform = Affine(1, 0, west, 0, -1, 90)
    path = write_raster(tmp_path / "labels.tif", labels, "EPSG:4326", transform)
    result = read(write_polygons(path, str(tmp_path / "p.parquet"), client=client, chunks=64))
    assert len(result) == 1
    geod = CRS.from_epsg(4326).get_geod()
    per_pixel = (geodesic_row_areas(west, 1.0, 90.0, -1.0, 180, geod) * (labels == 1).sum(axis=1)).sum()
    assert result["area_m2"].iloc[0] == pytest.approx(per_pixel, rel=1e-4)
    if rows != (0, 180):  # the whole globe's densified outline has its two long edges on the poles
        dense = abs(geod.geometry_area_perimeter(shapely.segmentize(result.geometry.iloc[0], 0.01))[0])
        assert result["area_m2"].iloc[0] == pytest.approx(dense, rel=1e-8)


def test_region_across_many_chunks_with_holes_and_corner_contacts(tmp_path, client):
    """A lake over 6x6 chunks with islands, and same-class pixels touching only at chunk corners."""
    labels = np.zeros((192, 192), np.uint8)
    labels[10:180, 10:180] = 1  # the lake, across 36 chunks of 32
    labels[40:60, 40:130] = 0  # islands: holes in the lake
    labels[100:101, 20:170] = 2  # a thin other-class strip splitting no water
    labels[150:170, 31:33] = 0
    # diagonal (corner) contacts across chunk corners: 4-connectivity keeps them apart
    labels[186:192, :] = 0
    labels[185, 31] = labels[186, 32] = 3
    labels[0, 63] = labels[1, 64] = 3
    transform = Affine(10, 0, 500000, 0, -10, 4000000)
    path = write_raster(tmp_path / "labels.tif", labels, "EPSG:32633", transform)
    result = read(write_polygons(path, str(tmp_path / "p.fgb"), client=client, class_names=CLASSES, chunks=32))
    reference = reference_shapes(labels, transform, None)
    assert_identical(result, reference, CLASSES)
    lake = result[result["class"] == "water"]
    assert len(lake) == 1 and len(lake.geometry.iloc[0].interiors) == 3  # islands, strip, notch
    assert (result["class"] == "urban").sum() == 4


@pytest.mark.parametrize("dtype", ["int64", "uint32"])
def test_noise_labels_of_integer_types_shapes_does_not_read(tmp_path, client, dtype):
    """Pixel noise (corner contacts everywhere, across chunk sides and corners too) in types ``shapes`` does not
    read exactly: the chunks polygonize codes of the values."""
    labels = blobs((90, 110), seed=8, nodata=9, sigma=0.6).astype(dtype)
    transform = Affine(20, 0, 500000, 0, -20, 4000000)
    path = write_raster(tmp_path / "labels.tif", labels, "EPSG:32633", transform, nodata=9)
    result = read(write_polygons(path, str(tmp_path / "p.parquet"), client=client, class_names=CLASSES, chunks=16))
    reference = reference_shapes(labels.astype(np.int32), transform, 9)
    assert len(reference) > 300
    assert_identical(result, reference, CLASSES)


def test_stitched_regions_equal_the_overlay_union():
    """The merge cancels the pieces' shared edges and links the rest into rings (a corner contact: the ring turns
    round the pixel that is not the region's); GEOS's overlay union of the same pieces is the same polygon."""
    from tilemask.vectors import (
        border_groups,
        chunk_border,
        drop_collinear,
        polygonize_chunk,
        select_pieces,
        stitch_pieces,
    )

    labels = blobs((96, 96), seed=2, sigma=0.8, n_classes=3)
    size = 12
    pieces = {
        (i, j): polygonize_chunk(labels[i * size : (i + 1) * size, j * size : (j + 1) * size], (i, j), (i * size, j * size), None)
        for i in range(8)
        for j in range(8)
    }  # fmt: skip
    groups = border_groups({k: chunk_border(p) for k, p in pieces.items()}, (8, 8))
    assert len(groups) > 20
    for group in groups:
        parts = [select_pieces(pieces[(int(i), int(j))], np.array([r]))[int(r)] for i, j, r in group]
        stitched = stitch_pieces(parts)
        assert stitched is not None
        overlay = shapely.simplify(shapely.union_all(parts), 0.0)
        assert shapely.normalize(drop_collinear(stitched)).equals_exact(shapely.normalize(overlay), 0)


def test_empty_foreground_writes_an_empty_layer(tmp_path, client):
    labels = np.zeros((100, 100), np.uint8)
    path = write_raster(tmp_path / "labels.tif", labels, "EPSG:32633", Affine(10, 0, 0, 0, -10, 0))
    result = read(write_polygons(path, str(tmp_path / "p.gpkg"), client=client, chunks=32))
    assert len(result) == 0


@pytest.mark.parametrize("crs", [None, 'LOCAL_CS["site grid",UNIT["metre",1]]',
                                 "+proj=tmerc +lon_0=9.5 +k=0.9996 +x_0=500000 +ellps=GRS80 +units=m"],
                         ids=["no-crs", "local", "no-authority-code"])  # fmt: skip
def test_geojson_of_a_crs_it_cannot_name_is_refused_and_geopackage_keeps_it(tmp_path, client, crs):
    """A GeoJSON without a ``crs`` member is WGS 84 longitude/latitude (RFC 7946): GDAL wrote none for a raster
    without a CRS or with one it has no code for, and every reader put the polygons near (0, 0) degrees."""
    labels = blobs((60, 70), seed=3, nodata=None, n_classes=3)
    transform = Affine(30.0, 0, 1000.0, 0, -30.0, 5000.0)
    path = write_raster(tmp_path / "labels.tif", labels, crs, transform)
    out = tmp_path / "p.geojson"
    with pytest.raises(InputError, match=rf"^{out}: {path} has (no CRS|a CRS without an authority code .*), and a "
                                         r"GeoJSON without one is read as WGS 84 .*write the polygons to \.gpkg"):
        write_polygons(path, str(out), client=client, chunks=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif"]
    gpkg = write_polygons(path, str(tmp_path / "p.gpkg"), client=client, chunks=32)
    written = pyogrio.read_info(gpkg)["crs"]
    assert (written is None) if crs is None else CRS(written).equals(CRS(crs))
    assert_identical(read(gpkg), reference_shapes(labels, transform, None), ("class_0", "class_1", "class_2"))


@pytest.mark.parametrize("crs, transform, decimals, area_decimals", [
    ("EPSG:32618", Affine(300.0379266750948, 0.0, 101985.0, 0.0, -300.041782729805, 2826915.0), 0, 0),  # RGB.byte
    ("EPSG:4326", Affine(1 / 3600, 0.0, 11.1, 0.0, -1 / 3600, 46.7), 6, 0),  # 1 arc second: 655 m2 pixels
    ("EPSG:32633", Affine(0.4999, 0.0, 500000.3, 0.0, -0.5003, 4100000.7), 3, 3),  # 0.25 m2 pixels
], ids=["utm-300m", "wgs84-1arcsec", "utm-50cm"])  # fmt: skip
def test_geojson_coordinates_keep_what_the_pixel_size_warrants_and_the_crs(
    tmp_path, client, crs, transform, decimals, area_decimals
):
    """GDAL's GeoJSON default, 15 significant digits, wrote 104085.265486726 for a 300 m pixel's corner: its
    ``COORDINATE_PRECISION`` now keeps a step of 1/100 of a pixel, each vertex within half a step of
    ``rasterio.features.shapes``'s, and the file names the raster's CRS. ``area_m2`` was written with 17 digits
    (8993.9970000118738 for ten 29.97 x 30.01 m pixels); it keeps a step of 1/100 of a pixel's area, within half a
    step of the area of ``shapes``'s polygon (on the ellipsoid, pyproj's ``Geod``, its edges along the parallels)."""
    labels = blobs((150, 170), seed=4, nodata=255)
    path = write_raster(tmp_path / "labels.tif", labels, crs, transform, nodata=255)
    out = write_polygons(path, str(tmp_path / "p.geojson"), client=client, class_names=CLASSES, chunks=48)
    assert CRS(pyogrio.read_info(out)["crs"]) == CRS(crs)
    features = json.loads(Path(out).read_text())["features"]
    rings = [ring for feature in features for ring in feature["geometry"]["coordinates"]]
    scaled = np.concatenate(rings) * 10.0**decimals  # as written in the file
    assert np.allclose(scaled, np.round(scaled), rtol=0, atol=1e-6), "coordinates carry more decimals than asked"
    result, reference = read(out), reference_shapes(labels, transform, 255)
    assert len(result) == len(reference) > 50
    half_step = 0.5 * 10.0**-decimals
    assert half_step <= abs(transform.a) / 200
    tree = shapely.STRtree([g for g, _ in reference])
    for geom, name in zip(result.geometry, result["class"]):
        (k,) = tree.query(geom.representative_point(), predicate="within")
        expected, value = reference[k]
        assert name == CLASSES[value] and shapely.get_num_coordinates(geom) == shapely.get_num_coordinates(expected)
        assert shapely.hausdorff_distance(geom, expected) <= half_step * 1.5  # a corner moves along both axes
    written = [f["properties"]["area_m2"] for f in json.loads(Path(out).read_text(), parse_float=str)["features"]]
    assert max(len(text.partition(".")[2].rstrip("0")) for text in written) <= area_decimals, written
    geod = CRS(crs).get_geod()
    for geom, area in zip(result.geometry, result["area_m2"]):
        (k,) = tree.query(geom.representative_point(), predicate="within")
        expected = reference[k][0]
        if CRS(crs).is_geographic:  # edges cut into steps of 1e-5 degree: geodesics that follow the parallels
            exact = abs(geod.geometry_area_perimeter(shapely.segmentize(expected, 1e-5))[0])
        else:
            exact = expected.area
        assert abs(area - exact) <= 0.5 * 10.0**-area_decimals + 1e-9 * exact


def test_unknown_format_is_a_one_line_error(tmp_path, client):
    path = write_raster(tmp_path / "labels.tif", np.ones((10, 10), np.uint8), "EPSG:32633", Affine(1, 0, 0, 0, -1, 0))
    with pytest.raises(OutputError, match="unknown vector format"):
        write_polygons(path, str(tmp_path / "p.xyz"), client=client)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("suffix", [".gpkg", ".fgb", ".geojson", ".parquet"])
def test_polygons_carry_tilemasks_mark_and_someone_elses_do_not(tmp_path, client, suffix):
    """``--overwrite`` replaces polygons only where tilemask's mark says tilemask wrote them: a metadata item of a
    GeoPackage or FlatGeobuf, a GeoJSON's description, a key of the Parquet schema's metadata. Polygons geopandas
    wrote carry none, and a file that cannot be read is not tilemask's."""
    from tilemask.formats import product_written_by_tilemask

    labels = blobs((120, 150), seed=5, nodata=255)
    path = write_raster(tmp_path / "labels.tif", labels, "EPSG:32618", Affine(30, 0, 500000, 0, -30, 4000000), 255)
    ours = write_polygons(path, str(tmp_path / f"ours{suffix}"), client=client, class_names=CLASSES, chunks=64)
    assert product_written_by_tilemask(ours) is True
    assert_identical(read(ours), reference_shapes(labels, Affine(30, 0, 500000, 0, -30, 4000000), 255), CLASSES)
    north, south = shapely.box(500000, 3998000, 502000, 4000000), shapely.box(500000, 3996000, 502000, 3998000)
    districts = gpd.GeoDataFrame({"name": ["north", "south"]}, geometry=[north, south], crs="EPSG:32618")
    foreign = tmp_path / f"districts{suffix}"
    districts.to_parquet(foreign) if suffix == ".parquet" else districts.to_file(foreign)
    assert product_written_by_tilemask(foreign) is False
    for name, content in (("cut", foreign.read_bytes()[:200]), ("noise", np.random.default_rng(0).bytes(5000))):
        damaged = tmp_path / f"{name}{suffix}"  # someone's file cut short, bytes of no format: not tilemask's
        damaged.write_bytes(content)
        assert product_written_by_tilemask(damaged) is False, name


@pytest.mark.timeout(120)
def test_reading_tilemasks_geopackages_leaves_no_sidecar(tmp_path, client):
    """A GeoPackage tilemask wrote (polygons, a statistics table) is read by geopandas / pyogrio without a
    ``.aux.xml`` appearing beside it: GDAL read a dataset metadata item of a GeoPackage back into its PAM and wrote
    it out as ``<name>.gpkg.aux.xml`` when the file closed, so every read of the polygons left one in the output
    folder (and a read-only folder a warning). The mark is the layer's metadata item, which GDAL reads in place."""
    import subprocess
    import sys

    import pandas as pd

    from tilemask.formats import product_written_by_tilemask
    from tilemask.stats.tables import write_table

    labels = blobs((120, 150), seed=5, nodata=255)
    path = write_raster(tmp_path / "labels.tif", labels, "EPSG:32618", Affine(30, 0, 500000, 0, -30, 4000000), 255)
    polygons = write_polygons(path, str(tmp_path / "polygons.gpkg"), client=client, class_names=CLASSES, chunks=64)
    table = write_table(pd.DataFrame({"class": ["water"], "pixels": [3]}), tmp_path / "totals.gpkg")
    for written in (Path(polygons), table):
        assert product_written_by_tilemask(written) is True
        read = "import geopandas, pyogrio, sys; geopandas.read_file(sys.argv[1]); pyogrio.list_layers(sys.argv[1])"
        subprocess.run([sys.executable, "-c", read, str(written)], check=True, timeout=60)  # GDAL's defaults
        assert not (tmp_path / f"{written.name}.aux.xml").exists(), sorted(p.name for p in tmp_path.iterdir())
        assert product_written_by_tilemask(written) is True


def _spans_chunks(geom, transform, chunk):
    minx, miny, maxx, maxy = geom.bounds
    (c0, r0), (c1, r1) = ~transform @ (minx, maxy), ~transform @ (maxx, miny)
    return int(c0) // chunk != (int(round(c1)) - 1) // chunk or int(r0) // chunk != (int(round(r1)) - 1) // chunk


@pytest.mark.timeout(60)
@pytest.mark.parametrize("suffix", [".gpkg", ".fgb", ".geojson", ".parquet"])
@pytest.mark.parametrize("stop", ["read failed", "Ctrl-C"])
def test_a_chunk_that_fails_as_its_polygons_are_written_raises_its_own_error(tmp_path, suffix, stop):
    """Polygons are streamed into GDAL's writer as the chunks come back: a chunk's failure (a damaged label chunk's
    ReadError, Ctrl-C while waiting on the workers) came out of a GeoPackage, FlatGeobuf or GeoJSON as pyogrio's
    ``RuntimeError: Error while accessing batch from stream.`` (exit 1), the cause and the stop lost; as a Parquet's
    does, it goes on as itself, nothing left."""
    from tilemask.polygon_files import AreaRule, write_features
    from tilemask.vectors import FeatureBatch

    i = np.arange(1000)
    boxes = shapely.box(i % 100, i // 100, i % 100 + 0.5, i // 100 + 0.5)
    batch = FeatureBatch(list(shapely.to_wkb(boxes)), np.array(["a"] * len(i), object), np.ones(len(i)))
    rule = AreaRule((500000.0, 30.0, 0.0, 4000000.0, 0.0, -30.0), CRS.from_epsg(32618).to_wkt())
    failure = KeyboardInterrupt() if stop == "Ctrl-C" else ReadError("/x/l.zarr: read failed at [0:10, 0:10]: boom")

    def batches():
        yield batch
        raise failure

    with pytest.raises(type(failure)) as raised:
        write_features(str(tmp_path / f"p{suffix}"), suffix, batches(), rule, 100)
    assert raised.value is failure
    assert list(tmp_path.iterdir()) == []
