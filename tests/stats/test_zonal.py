"""Zonal statistics over vector regions against rasterstats (centre rule) and exactextract (coverage)."""

from __future__ import annotations

import json
import re
import warnings

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from exactextract import exact_extract
from rasterstats import zonal_stats

from tilemask.errors import InputError
from tilemask.stats import compute_stats


def random_regions(path, n: int, seed: int, crs_out=None, pad: float = 0.15) -> gpd.GeoDataFrame:
    """Random buffered points over the raster (some reaching past its edges), as a GeoDataFrame."""
    rng = np.random.default_rng(seed)
    with rasterio.open(path) as ds:
        left, bottom, right, top = ds.bounds
        crs, res = ds.crs, ds.res[0]
    w, h = right - left, top - bottom
    xs = rng.uniform(left - pad * w, right + pad * w, n)
    ys = rng.uniform(bottom - pad * h, top + pad * h, n)
    radii = rng.uniform(3, 120, n) * res
    geoms = [shapely.Point(x, y).buffer(r, quad_segs=6) for x, y, r in zip(xs, ys, radii)]
    geoms.append(shapely.box(left + 0.3 * w, bottom + 0.2 * h, left + 0.9 * w, bottom + 0.7 * h).buffer(5 * res))
    frame = gpd.GeoDataFrame({"name": [f"r{i}" for i in range(len(geoms))]}, geometry=geoms, crs=crs)
    return frame.to_crs(crs_out) if crs_out else frame


def class_values(table) -> list[int]:
    return sorted(int(c.split("_")[1]) for c in table.columns if c.endswith("_pixels"))


def reference_centre(raster, regions: gpd.GeoDataFrame) -> list[dict]:
    with rasterio.open(raster) as ds:
        crs = ds.crs
    geoms = list(regions.to_crs(crs).geometry) if regions.crs and not regions.crs.equals(crs) else list(regions.geometry)
    return zonal_stats(geoms, str(raster), categorical=True)


@pytest.mark.parametrize("chunks", [100, 256, 1000])
@pytest.mark.parametrize("regions_crs", [None, "EPSG:4326"])
def test_centre_rule_equals_rasterstats(tmp_path, shade_labels, chunks, regions_crs):
    regions = random_regions(shade_labels, 40, seed=1, crs_out=regions_crs)
    regions_path = tmp_path / "regions.gpkg"
    regions.to_file(regions_path)
    out = compute_stats(shade_labels, tmp_path / "zonal.parquet", regions=regions_path, region_id="name", chunks=chunks)
    table = gpd.read_parquet(out)
    assert list(table["name"]) == list(regions["name"])
    assert table.crs.equals(regions.crs)
    reference = reference_centre(shade_labels, regions)
    values = class_values(table)
    with rasterio.open(shade_labels) as ds:
        pixel_area = abs(ds.transform.a * ds.transform.e)
    assert any(sum(r.values()) for r in reference)
    for row, ref in zip(table.to_dict(orient="records"), reference):
        ref = {k: v for k, v in ref.items() if k != 255}
        assert set(ref) <= set(values)
        total = sum(ref.values())
        for value in values:
            assert row[f"class_{value}_pixels"] == ref.get(value, 0)
            if total:
                assert row[f"class_{value}_fraction"] == pytest.approx(ref.get(value, 0) / total, rel=1e-12)
            assert row[f"class_{value}_area_m2"] == pytest.approx(ref.get(value, 0) * pixel_area, rel=1e-12)


def test_fraction_rule_equals_exactextract(tmp_path, shade_labels):
    regions = random_regions(shade_labels, 40, seed=2, crs_out="EPSG:4326")
    regions_path = tmp_path / "regions.gpkg"
    regions.to_file(regions_path)
    results = [
        gpd.read_parquet(compute_stats(shade_labels, tmp_path / f"f{c}.parquet", regions=regions_path, coverage="fraction", chunks=c))
        for c in (128, 512)
    ]
    pd.testing.assert_frame_equal(pd.DataFrame(results[0]).drop(columns="geometry"), pd.DataFrame(results[1]).drop(columns="geometry"))
    with rasterio.open(shade_labels) as ds:
        projected = regions.to_crs(ds.crs)
    reference = exact_extract(str(shade_labels), projected, ["count", "frac", "unique"], output="pandas")
    table = results[0]
    values = class_values(table)
    assert reference["count"].sum() > 0
    for row, (count, frac, unique) in zip(table.to_dict(orient="records"), reference[["count", "frac", "unique"]].itertuples(index=False)):
        weighted = dict(zip((int(u) for u in unique), (count * f for f in frac)))
        assert set(weighted) <= set(values)
        for value in values:
            assert row[f"class_{value}_pixels"] == pytest.approx(weighted.get(value, 0.0), rel=1e-9, abs=1e-9)


def test_geographic_raster_geodesic_areas(tmp_path, geographic_labels):
    from pyproj import Geod

    totals = pd.read_csv(compute_stats(geographic_labels, tmp_path / "totals.csv"))
    geod = Geod(ellps="WGS84")
    with rasterio.open(geographic_labels) as ds:
        data, transform = ds.read(1), ds.transform
    # independent reference: geodesic area of every pixel polygon, summed per class
    pixel_area = np.empty(data.shape)
    for r in range(data.shape[0]):
        for c in range(0, data.shape[1], 40):  # rows share one area; sample columns to check that too
            x0, y0 = transform @ (c, r)
            x1, y1 = transform @ (c + 1, r + 1)
            pixel_area[r, c] = abs(geod.geometry_area_perimeter(shapely.box(x0, y1, x1, y0))[0])
        pixel_area[r, :] = pixel_area[r, 0]
    for row in totals.itertuples(index=False):
        expected = pixel_area[data == row.value].sum()
        assert row.area_m2 == pytest.approx(expected, rel=1e-9)
        assert row.pixels == int((data == row.value).sum())
    # and a pixel at 60 N really is ~ 0.01 deg x 0.01 deg there
    assert pixel_area[60, 0] == pytest.approx(111_320 * 0.01 * 111_320 * 0.01 * np.cos(np.deg2rad(60.4)), rel=0.01)

    regions = random_regions(geographic_labels, 15, seed=4)
    regions_path = tmp_path / "regions.geojson"
    regions.to_file(regions_path)
    zonal = pd.read_csv(compute_stats(geographic_labels, tmp_path / "zonal.csv", regions=regions_path, chunks=50))
    # an in-memory array: rasterstats pads it with ``nodata`` outside the raster (a file without
    # nodata would be padded with 0, counted as class 0: a rasterstats artefact tilemask does not copy)
    reference = zonal_stats(list(regions.geometry), data, affine=transform, categorical=True, nodata=255)
    for row, ref in zip(zonal.to_dict(orient="records"), reference):
        for value in class_values(zonal):
            assert row[f"class_{value}_pixels"] == ref.get(value, 0)


def test_planar_areas_far_from_the_grounds_are_said(tmp_path, shade_labels, caplog):
    """``area_m2`` in EPSG:3857 is planar, 1.69x the ground area of the project's own hillshade (39.6 N), with
    nothing said (a first-contact review). The warning gives the furthest of the centre column's top, middle and
    bottom pixels from its area on the ellipsoid (pyproj's Geod, an independent reference): a global Web Mercator
    raster, centred on the equator, is said too. UTM, within 0.1%, says nothing."""
    from pyproj import Geod, Transformer

    from .conftest import blobs, write_raster

    def worst(path):
        with rasterio.open(path) as ds:
            transform, (h, w) = ds.transform, ds.shape
        to_degrees = Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True)
        seen = []
        for row in (0, h // 2, h - 1):
            corners = [transform @ (w // 2 + dc, row + dr) for dc, dr in ((0, 0), (0, 1), (1, 1), (1, 0))]
            lon, lat = to_degrees.transform(*zip(*corners))
            seen.append((abs(transform.a * transform.e) / abs(Geod(ellps="WGS84").polygon_area_perimeter(lon, lat)[0]),
                         np.mean(lat)))  # fmt: skip
        return max(seen, key=lambda s: abs(s[0] - 1))

    whole_world = rasterio.transform.from_origin(-20_000_000, 19_000_000, 500_000, 223_000)
    world = write_raster(tmp_path / "world.tif", blobs((170, 80), seed=3), "EPSG:3857", whole_world, block=16)
    for path, expected in ((shade_labels, 1.69), (world, None)):
        caplog.clear()
        compute_stats(path, tmp_path / "t.csv")
        (said,) = [r.getMessage() for r in caplog.records if "area_m2 is planar" in r.getMessage()]
        ratio, latitude = worst(path)
        assert said.startswith(f"area_m2 is planar in EPSG:3857: at latitude {latitude:.1f} a pixel's planar area "
                               f"is {ratio:.2f}x its area on the ellipsoid")  # fmt: skip
        if expected:
            assert ratio == pytest.approx(expected, abs=0.01)
    assert abs(worst(world)[1]) > 80
    caplog.clear()
    utm = write_raster(tmp_path / "utm.tif", blobs((60, 80), seed=3), "EPSG:32618",
                       rasterio.transform.from_origin(500000, 4000000, 30, 30), block=32)  # fmt: skip
    compute_stats(utm, tmp_path / "u.csv")
    assert "area_m2 is planar" not in caplog.text


@pytest.mark.parametrize("coverage", ["center", "fraction"])
def test_a_south_up_raster_is_refused_for_vector_regions(tmp_path, shade_labels, coverage):
    """A geotransform with rows running north (``e > 0``): the centre rule counted 0 pixels in every region
    (exit 0), the fraction rule failed with exactextract's "Incompatible extents"."""
    from affine import Affine

    from .conftest import blobs, write_raster

    south_up = write_raster(tmp_path / "south_up.tif", blobs((60, 80), seed=3), "EPSG:32618",
                            Affine(30, 0, 500000, 0, 30, 4000000), block=32)  # fmt: skip
    regions = tmp_path / "regions.gpkg"
    gpd.GeoDataFrame({"name": ["all"]}, geometry=[shapely.box(499000, 3999000, 503000, 4003000)],
                     crs="EPSG:32618").to_file(regions)  # fmt: skip
    with pytest.raises(InputError, match=re.escape(f"{south_up}: vector regions need a north-up raster")):
        compute_stats(south_up, tmp_path / "t.csv", regions=regions, coverage=coverage)


def test_a_rotated_geographic_raster_is_refused_before_any_pixel_is_read(tmp_path):
    """Geodesic row areas need a north-up raster: a rotated one in degrees is refused by name when the statistics
    are prepared (``tilemask stats`` starts no cluster), not by a task half way through."""
    from affine import Affine

    from tilemask.stats.api import prepare_stats

    from .conftest import blobs, write_raster

    path = write_raster(tmp_path / "turned.tif", blobs((60, 80), seed=3), "EPSG:4326",
                        Affine(0.01, 0.002, 10.0, 0.002, -0.01, 61.0), block=32)  # fmt: skip
    with pytest.raises(InputError, match=re.escape(f"{path}: geodesic areas need a north-up geographic raster")):
        prepare_stats(path, tmp_path / "t.csv")


def test_fraction_rule_on_a_geographic_raster_weights_each_cell_by_its_rows_area(tmp_path, geographic_labels):
    regions = random_regions(geographic_labels, 12, seed=5)
    regions_path = tmp_path / "regions.gpkg"
    regions.to_file(regions_path)
    table = pd.read_csv(compute_stats(geographic_labels, tmp_path / "z.csv", regions=regions_path, coverage="fraction", chunks=50))
    ops = ["count", "frac", "unique", "area=count(coverage_weight=area_spherical_m2)",
           "area_frac=frac(coverage_weight=area_spherical_m2)"]  # fmt: skip
    reference = exact_extract(str(geographic_labels), regions, ops, output="pandas")
    assert reference["count"].sum() > 0
    for row, ref in zip(table.to_dict(orient="records"), reference.to_dict(orient="records")):
        pixels = dict(zip((int(u) for u in ref["unique"]), (ref["count"] * f for f in ref["frac"])))
        areas = dict(zip((int(u) for u in ref["unique"]), (ref["area"] * f for f in ref["area_frac"])))
        for value in class_values(table):
            assert row[f"class_{value}_pixels"] == pytest.approx(pixels.get(value, 0.0), rel=1e-9, abs=1e-9)
            # tilemask's pixel areas are geodesic (WGS84's ellipsoid), exactextract's spherical: within 0.5%
            assert row[f"class_{value}_area_m2"] == pytest.approx(areas.get(value, 0.0), rel=5e-3, abs=1e-6)


def test_region_errors(tmp_path, shade_labels, monkeypatch):
    regions = random_regions(shade_labels, 3, seed=1)
    regions_path = tmp_path / "regions.gpkg"
    regions.to_file(regions_path)
    with pytest.raises(InputError, match="not a field"):
        compute_stats(shade_labels, tmp_path / "z.parquet", regions=regions_path, region_id="nope")
    with pytest.raises(InputError, match="unknown table format"):
        compute_stats(shade_labels, tmp_path / "z.xlsx", regions=regions_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s3:" / "b").mkdir(parents=True)  # a URL was a local path: ./s3:/b/z.csv, written where it existed
    with pytest.raises(InputError, match=r"^s3://b/z\.csv: written to a local file system, not to object storage"):
        compute_stats(shade_labels, "s3://b/z.csv", regions=regions_path)
    with pytest.raises(InputError, match="cannot read the regions"):
        (tmp_path / "bad.gpkg").write_text("not a geopackage")
        compute_stats(shade_labels, tmp_path / "z.parquet", regions=tmp_path / "bad.gpkg")



@pytest.mark.timeout(60)
def test_regions_without_a_key_are_refused_in_one_line(tmp_path, shade_labels):
    """A feature whose key field is null (a GeoPackage's missing text, a GeoJSON's missing number) is refused, exit
    2, by the command and by a workflow's check, naming the field and how many features lack it: one was accepted
    and gave a row with an empty key; two were refused as 'repeated values'. So is a blank text key."""
    from click.testing import CliRunner

    from tilemask.cli import main
    from tilemask.stats.config import check_regions

    regions = random_regions(shade_labels, 4, seed=2)
    regions["name"] = ["a", None, "c", " ", "e"]  # a blank name is none too (a shapefile's missing text)
    regions["code"] = [1.0, np.nan, 3.0, np.nan, 5.0]
    regions.to_file(tmp_path / "regions.gpkg")
    regions.to_crs("EPSG:4326").to_file(tmp_path / "regions.geojson")
    for path, field, missing in ((tmp_path / "regions.gpkg", "name", 2), (tmp_path / "regions.geojson", "code", 2)):
        out = tmp_path / f"{path.suffix[1:]}.csv"
        result = CliRunner().invoke(main, ["stats", str(shade_labels), "-o", str(out), "--regions", str(path),
                                           "--region-id", field])  # fmt: skip
        why = f"{path}: region id {field!r} has no value in {missing} of 5 features; every region needs a key"
        assert (result.exit_code, result.output) == (2, f"tilemask: error: {why}\n")
        assert not out.exists()
        with pytest.raises(InputError, match=re.escape(why)):
            check_regions(str(path), field)  # what a workflow's stats: section is checked with when planned


@pytest.mark.timeout(60)
def test_regions_of_several_layers_are_refused_naming_them(tmp_path, shade_labels):
    """A GeoPackage of two layers, or a folder of two shapefiles, is refused, exit 2, by the command and by a
    workflow's check, naming the layers: GDAL read the first and the command measured it alone without a word."""
    from click.testing import CliRunner

    from tilemask.cli import main
    from tilemask.stats.config import check_regions

    regions = random_regions(shade_labels, 3, seed=5)
    regions.to_file(tmp_path / "regions.gpkg", layer="districts")
    regions.iloc[:2].to_file(tmp_path / "regions.gpkg", layer="parks")
    (tmp_path / "shapes").mkdir()
    regions.to_file(tmp_path / "shapes" / "districts.shp")
    regions.iloc[:2].to_file(tmp_path / "shapes" / "parks.shp")
    for path in (tmp_path / "regions.gpkg", tmp_path / "shapes"):
        out = tmp_path / f"{path.stem}.csv"
        result = CliRunner().invoke(main, ["stats", str(shade_labels), "-o", str(out), "--regions", str(path)])
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        why = f"{path}: the regions hold 2 layers (districts, parks); a regions file must hold one layer"
        assert result.output.startswith(f"tilemask: error: {why} ("), result.output
        assert not out.exists()
        with pytest.raises(InputError, match=re.escape(why)):
            check_regions(str(path), None)  # what a workflow's stats: section is checked with when planned


@pytest.mark.timeout(60)
def test_a_table_without_geometries_beside_the_regions_is_passed_over(tmp_path, shade_labels):
    """QGIS saves a layer's style into its GeoPackage as a table without geometries, ``layer_styles``: such a file
    holds one layer of regions, measured as the same regions alone."""
    import pyogrio

    from tilemask.stats.config import check_regions

    regions = random_regions(shade_labels, 3, seed=5)
    regions.to_file(tmp_path / "alone.gpkg", layer="districts")
    regions.to_file(tmp_path / "styled.gpkg", layer="districts")
    pyogrio.write_dataframe(pd.DataFrame({"styleName": ["districts"], "styleQML": ["<qgis/>"]}),
                            tmp_path / "styled.gpkg", layer="layer_styles")  # fmt: skip
    assert [geometry for _, geometry in pyogrio.list_layers(tmp_path / "styled.gpkg")] == ["Polygon", None]
    check_regions(str(tmp_path / "styled.gpkg"), "name")
    tables = [compute_stats(shade_labels, tmp_path / f"{name}.csv", regions=str(tmp_path / f"{name}.gpkg"),
                            region_id="name") for name in ("alone", "styled")]  # fmt: skip
    assert len(pd.read_csv(tables[0])) == len(regions)
    pd.testing.assert_frame_equal(pd.read_csv(tables[1]), pd.read_csv(tables[0]))
    # tables alone are no regions (they passed the check, then failed: 'DataFrame' object has no attribute 'crs')
    pyogrio.write_dataframe(pd.DataFrame({"styleName": ["districts"]}), tmp_path / "styles.gpkg", layer="layer_styles")
    why = f"{tmp_path / 'styles.gpkg'}: the regions hold no layer with geometries (tables: layer_styles)"
    with pytest.raises(InputError, match=re.escape(why)):
        check_regions(str(tmp_path / "styles.gpkg"), None)
    with pytest.raises(InputError, match=re.escape(why)):
        compute_stats(shade_labels, tmp_path / "styles.csv", regions=str(tmp_path / "styles.gpkg"))


def write_zarr_labels(raster, path):
    """The labels of a GeoTIFF as a tilemask Zarr group (``labels`` array, CRS, transform and nodata attributes)."""
    import zarr

    with rasterio.open(raster) as ds:
        data, crs, transform, nodata = ds.read(1), ds.crs, ds.transform, ds.nodata
    group = zarr.open_group(path, mode="w", zarr_format=3)
    group.create_array("labels", data=data, chunks=(200, 300))
    group.attrs.update(
        {"crs": crs.to_wkt(), "transform": list(transform.to_gdal()), "tilemask": {"nodata": int(nodata)}}
    )
    return path


@pytest.mark.timeout(120)
def test_fraction_rule_zarr_labels_and_points(tmp_path, shade_labels):
    """Zarr labels go through tilemask's own exactextract source; points get exactextract's 0 pixels."""
    regions = random_regions(shade_labels, 16, seed=7)
    with rasterio.open(shade_labels) as ds:
        left, bottom, right, top = ds.bounds
    # regions off the raster and points: no cell for exactextract (the path that deadlocked threads)
    extra = [shapely.Point(left + 100, top - 100), shapely.box(right + 10, bottom, right + 500, top),
             shapely.MultiPoint([(left + 50, bottom + 50), (right - 50, top - 50)])]
    regions = pd.concat([regions, gpd.GeoDataFrame({"name": ["pt", "off", "mpt"]}, geometry=extra, crs=regions.crs)],
                        ignore_index=True)
    regions_path = tmp_path / "regions.gpkg"
    regions.to_file(regions_path)
    zarr_path = write_zarr_labels(shade_labels, tmp_path / "labels.zarr")
    tables = [
        pd.read_csv(compute_stats(
            source, tmp_path / f"{name}.csv", regions=regions_path, region_id="name", coverage="fraction", chunks=c
        ))
        for name, source, c in (("tif", shade_labels, None), ("zarr", zarr_path, None), ("zarr128", zarr_path, 128))
    ]
    geometry = tables[0].pop("geometry")
    for other in tables[1:]:
        assert list(other.pop("geometry")) == list(geometry)
        pd.testing.assert_frame_equal(other, tables[0], rtol=1e-12)
    # exactextract gives a point no cell, and raises on a multipoint spanning cells: the reference leaves it out
    reference = exact_extract(str(shade_labels), regions.iloc[:-1], ["count", "frac", "unique"], output="pandas")
    table = tables[1]
    values = class_values(table)
    assert list(reference["count"].iloc[-2:]) == [0, 0]
    assert all(table.iloc[-1][f"class_{v}_pixels"] == 0 for v in values)
    columns = reference[["count", "frac", "unique"]].itertuples(index=False)
    for row, (count, frac, unique) in zip(table.to_dict(orient="records"), columns):
        weighted = dict(zip((int(u) for u in unique), (count * f for f in frac)))
        for value in values:
            assert row[f"class_{value}_pixels"] == pytest.approx(weighted.get(value, 0.0), rel=1e-9, abs=1e-9)
    assert all(table.iloc[-3][f"class_{v}_pixels"] == 0 for v in values)


@pytest.mark.parametrize("coverage", ["center", "fraction"])
def test_regions_without_geometry_count_no_pixel_and_are_named_in_a_warning(tmp_path, shade_labels, coverage, caplog):
    """A feature with no geometry (a GIS layer's unplaced row, or what GDAL reads of a damaged shape) keeps its row,
    with no pixel, and is named in a warning rather than passing as a region that holds nothing."""
    regions = random_regions(shade_labels, 4, seed=3)
    regions.loc[1, "geometry"] = None
    regions_path = tmp_path / "regions.gpkg"
    regions.to_file(regions_path)
    table = pd.read_csv(compute_stats(shade_labels, tmp_path / "t.csv", regions=regions_path, region_id="name",
                                      coverage=coverage))  # fmt: skip
    values = class_values(table)
    assert list(table["name"]) == list(regions["name"])
    assert all(table.iloc[1][f"class_{v}_pixels"] == 0 for v in values)
    assert sum(table.iloc[4][f"class_{v}_pixels"] for v in values) > 0  # the large box counts pixels
    assert "1 of 5 regions have no geometry (first: 'r1'): they count no pixel" in caplog.text


def test_regions_that_are_not_valid_geometries_are_named_in_a_warning(tmp_path, shade_labels, caplog):
    """A multipolygon whose parts overlap (not valid): the fraction rule counted the overlap twice (exactextract's
    answer), the center rule once, 14 % apart in a review's case, with nothing said."""
    with rasterio.open(shade_labels) as ds:
        x0, y0, x1, y1 = ds.bounds
        crs = ds.crs
    w, h = (x1 - x0) / 4, (y1 - y0) / 4
    a = shapely.box(x0 + w, y0 + h, x0 + 2.5 * w, y0 + 2.5 * h)
    overlapping = shapely.MultiPolygon([a, shapely.affinity.translate(a, w, h)])
    regions = gpd.GeoDataFrame({"name": ["fine", "overlapping"]}, geometry=[a, overlapping], crs=crs)
    regions.to_file(tmp_path / "regions.gpkg")
    totals = {}
    for coverage in ("center", "fraction"):
        caplog.clear()
        table = pd.read_csv(compute_stats(shade_labels, tmp_path / f"{coverage}.csv", regions=tmp_path / "regions.gpkg",
                                          region_id="name", coverage=coverage))  # fmt: skip
        totals[coverage] = table[[f"class_{v}_pixels" for v in class_values(table)]].sum(axis=1).tolist()
        assert re.search(r"regions\.gpkg: 1 of 2 regions are not valid geometries \(first: 'overlapping', Self-"
                         r"intersection\[.*\]\): the fraction rule counts where they overlap themselves twice",
                         caplog.text), caplog.text
    fine, overlapping = (totals["fraction"][i] / totals["center"][i] for i in (0, 1))
    assert overlapping > fine + 0.01  # the overlap counted twice


def test_regions_of_no_feature_give_no_row_and_a_warning(tmp_path, shade_labels, caplog):
    """An empty layer gave a table of no rows with nothing said; exactextract gives no row either."""
    regions_path = tmp_path / "regions.gpkg"
    random_regions(shade_labels, 4, seed=3).iloc[:0].to_file(regions_path)
    assert len(exact_extract(str(shade_labels), gpd.read_file(regions_path), ["count"], output="pandas")) == 0
    for coverage in ("center", "fraction"):
        table = compute_stats(shade_labels, tmp_path / f"{coverage}.parquet", regions=regions_path, region_id="name",
                              coverage=coverage)  # fmt: skip
        assert len(gpd.read_parquet(table)) == 0
    assert caplog.text.count(f"{regions_path} holds no features: the table has no rows") == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("coverage", ["center", "fraction"])
def test_regions_off_the_raster_keep_their_rows_and_are_counted_in_one_warning(tmp_path, shade_labels, coverage,
                                                                                caplog):  # fmt: skip
    """Regions wholly off the raster (one beside it, one 1 mm from its east edge), in lon/lat over a Web Mercator
    raster with nodata, keep their rows with no pixel, as rasterstats gives them, and one warning says how many there
    are, judged on the raster's grid after reprojection (in lon/lat, every region lies off its metres): they passed
    as regions that hold nothing."""
    regions = random_regions(shade_labels, 3, seed=6, pad=0.0)
    with rasterio.open(shade_labels) as ds:
        left, bottom, right, top = ds.bounds
    width = right - left
    beside = shapely.box(right + width, bottom, right + 2 * width, top)
    edge = shapely.box(right + 1e-3, bottom, right + 0.1 * width, top)  # off by more than reprojection's error
    extra = gpd.GeoDataFrame({"name": ["beside", "edge"]}, geometry=[beside, edge], crs=regions.crs)
    regions = pd.concat([regions.iloc[:2], extra, regions.iloc[2:]], ignore_index=True).to_crs("EPSG:4326")
    regions.to_file(tmp_path / "regions.geojson")
    with caplog.at_level("WARNING", logger="tilemask.stats.zonal"):
        table = pd.read_csv(compute_stats(shade_labels, tmp_path / "t.csv", regions=tmp_path / "regions.geojson",
                                          region_id="name", coverage=coverage))  # fmt: skip
    pixels = table[[f"class_{v}_pixels" for v in class_values(table)]].sum(axis=1)
    assert list(table["name"]) == list(regions["name"])
    assert list(pixels == 0) == [False, False, True, True, False, False]
    assert [bool(r) for r in reference_centre(shade_labels, regions)] == [True, True, False, False, True, True]
    off = [r.getMessage() for r in caplog.records if "do not overlap" in r.getMessage()]
    assert off == [f"2 of 6 regions do not overlap the raster {shade_labels} (first: 'beside'): they count no pixel"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("coverage", ["center", "fraction"])
def test_regions_that_reach_a_pole_are_measured_on_a_conic_raster(tmp_path, coverage, caplog):
    """A pole has no place in a Lambert conic (France's Lambert-93 here): a world layer in lon/lat, whose
    Antarctica reaches -90, reprojected onto such a raster has infinite vertices.  Every region was then measured
    for nothing: ``OverflowError: cannot convert float infinity to integer`` (center) or exactextract's ``Failed to
    parse geometry`` (fraction), exit 1, right after a warning that Antarctica counts no pixel.  A region is
    measured over its part near the raster: Antarctica counts nothing, as warned, and a region from the south pole
    to the raster's middle counts the pixels whose centres lie south of that latitude."""
    from pyproj import Transformer
    from rasterio.transform import from_origin
    from rasterio.warp import transform_bounds

    from .conftest import write_raster

    data = np.arange(48 * 64, dtype=np.uint8).reshape(48, 64) % 3 + 1
    transform = from_origin(650000, 6870000, 10, 10)
    labels = write_raster(tmp_path / "labels.tif", data, "EPSG:2154", transform)
    with rasterio.open(labels) as ds:
        west, south, east, north = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
    middle = south + 0.43 * (north - south)
    geometries = [shapely.box(-180, -90, 180, -60), shapely.box(west - 1, -90, east + 1, middle)]
    gpd.GeoDataFrame({"name": ["antarctica", "to the pole"]}, geometry=geometries, crs="EPSG:4326").to_file(
        tmp_path / "world.geojson")  # fmt: skip
    with caplog.at_level("WARNING", logger="tilemask.stats.zonal"):
        table = pd.read_csv(compute_stats(labels, tmp_path / "t.csv", regions=tmp_path / "world.geojson",
                                          region_id="name", coverage=coverage))  # fmt: skip
    assert "1 of 2 regions do not overlap the raster" in caplog.text and "(first: 'antarctica')" in caplog.text
    rows, cols = np.mgrid[0:48, 0:64] + 0.5
    x, y = transform @ (cols, rows)
    _, lat = Transformer.from_crs("EPSG:2154", "EPSG:4326", always_xy=True).transform(x, y)
    south_of = lat < middle
    assert 0 < south_of.sum() < south_of.size
    for value in (1, 2, 3):
        assert table.loc[0, f"class_{value}_pixels"] == 0
        expected = np.sum(south_of & (data == value))
        if coverage == "center":
            assert table.loc[1, f"class_{value}_pixels"] == expected
        else:  # cells the latitude crosses count in part
            assert table.loc[1, f"class_{value}_pixels"] == pytest.approx(expected, abs=64 / 3 + 1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("coverage", ["center", "fraction"])
def test_a_world_region_counts_every_pixel_of_a_conic_raster(tmp_path, coverage):
    """The whole world, cut to the raster's surroundings before it is reprojected onto a Lambert conic, is the
    whole raster: the cut's edges are parallels, curves there, and a cut of four corners alone ran straight
    through a 1,000 km raster (46 of 310,500 pixels of a 2 km one left out, in a review)."""
    from rasterio.transform import from_origin

    from .conftest import write_raster

    data = np.arange(216 * 230, dtype=np.uint32).reshape(216, 230) % 3 + 1
    labels = write_raster(tmp_path / "labels.tif", data.astype(np.uint8), "EPSG:2154",
                          from_origin(100000, 7110000, 5000, 5000))  # France, 1,150 x 1,080 km  # fmt: skip
    gpd.GeoDataFrame({"name": ["world"]}, geometry=[shapely.box(-180, -90, 180, 90)], crs="EPSG:4326").to_file(
        tmp_path / "world.geojson")  # fmt: skip
    table = pd.read_csv(compute_stats(labels, tmp_path / "t.csv", regions=tmp_path / "world.geojson",
                                      region_id="name", coverage=coverage))  # fmt: skip
    for value in (1, 2, 3):
        assert table.loc[0, f"class_{value}_pixels"] == pytest.approx(np.sum(data == value), abs=1e-6)


@pytest.mark.timeout(60)
def test_points_on_pixel_edges_count_the_pixel_rasterstats_counts(tmp_path, caplog):
    """A point on a pixel's edge or corner counts the pixel east and south of it, as rasterstats counts it (it makes
    each point the box of the cell it falls in): one on the raster's west or north edge its first column or row, one
    on an inner corner the pixel below and right.  They counted nothing (their bounds gave an empty window), and the
    first two were warned of as off the raster.  One on the east or south edge lies off it: tilemask counts nothing
    and warns, where rasterstats counts the fill of its boundless read (a 0 the raster does not hold)."""
    from rasterio.transform import from_origin

    from .conftest import write_raster

    labels = write_raster(tmp_path / "labels.tif", np.arange(48 * 64, dtype=np.uint8).reshape(48, 64) % 3 + 1,
                          "EPSG:32618", from_origin(500000, 4000000, 10, 10))  # fmt: skip
    left, top, right, bottom = 500000, 4000000, 500000 + 640, 4000000 - 480
    points = {"west": (left, top - 235), "north": (left + 315, top), "corner": (left + 320, top - 240),
              "inside": (left + 123, top - 321), "east": (right, top - 235), "south": (left + 315, bottom)}  # fmt: skip
    regions = gpd.GeoDataFrame({"name": list(points)}, geometry=[shapely.Point(p) for p in points.values()],
                               crs="EPSG:32618")  # fmt: skip
    regions.to_file(tmp_path / "points.gpkg")
    with caplog.at_level("WARNING", logger="tilemask.stats.zonal"):
        table = pd.read_csv(compute_stats(labels, tmp_path / "t.csv", regions=tmp_path / "points.gpkg",
                                          region_id="name"))  # fmt: skip
    reference = reference_centre(labels, regions)
    for row, ref in zip(table.to_dict(orient="records"), reference):
        counted = {v: row[f"class_{v}_pixels"] for v in class_values(table) if row[f"class_{v}_pixels"]}
        assert counted == ({} if row["name"] in ("east", "south") else ref), row["name"]
    assert [r for r in reference[-2:]] == [{0: 1}, {0: 1}]
    off = [r.getMessage() for r in caplog.records if "do not overlap" in r.getMessage()]
    assert off == [f"2 of 6 regions do not overlap the raster {labels} (first: 'east'): they count no pixel"]


def test_fraction_rule_refuses_lines_and_collections(tmp_path, shade_labels):
    regions = random_regions(shade_labels, 3, seed=1)
    with rasterio.open(shade_labels) as ds:
        left, bottom, right, top = ds.bounds
    cases = {
        "LineString": shapely.LineString([(left, bottom), (right, top)]),
        "MultiLineString": shapely.MultiLineString([[(left, bottom), (right, top)], [(left, top), (right, bottom)]]),
        "GeometryCollection": shapely.GeometryCollection([shapely.Point(left, top), regions.geometry[0]]),
    }
    for kind, geom in cases.items():
        frame = regions.copy()
        frame.loc[1, "geometry"] = geom
        path = tmp_path / f"{kind}.gpkg"
        frame.to_file(path)
        expected = rf"^coverage='fraction' measures .* 1 of 4 regions are {kind} \(first: 'r1'\); use coverage='center'"
        with pytest.raises(InputError, match=expected) as info:
            compute_stats(shade_labels, tmp_path / "z.csv", regions=path, region_id="name", coverage="fraction")
        assert "\n" not in str(info.value)
        # the centre rule burns lines and collections as rasterstats does
        compute_stats(shade_labels, tmp_path / "c.csv", regions=path, region_id="name", coverage="center")


def test_exactextract_callbacks_run_under_the_process_lock():
    """A Python raster source is only ever called with the process-wide exactextract lock held."""
    from exactextract.raster import RasterSource

    from tilemask.stats import zonal

    held = []

    class Source(RasterSource):
        def res(self):
            return (1.0, 1.0)

        def extent(self):
            return (0.0, 0.0, 4.0, 4.0)

        def srs_wkt(self):
            return None

        def nodata_value(self):
            return None

        def read_window(self, x0, y0, nx, ny):
            held.append(zonal._EXACTEXTRACT_LOCK.locked())
            return np.arange(16, dtype=np.int32).reshape(4, 4)[y0 : y0 + ny, x0 : x0 + nx]

    features = [
        {"type": "Feature", "properties": {"zone": z}, "geometry": g.__geo_interface__}
        for z, g in ((1, shapely.box(0.5, 0.5, 2.5, 2.0)), (2, shapely.box(10, 10, 11, 11)))
    ]
    result = zonal.locked_exact_extract(Source(), features, ["count"], include_cols=["zone"], output="pandas")
    assert list(result["count"]) == pytest.approx([3.0, 0.0])
    assert held and all(held)
    assert not zonal._EXACTEXTRACT_LOCK.locked()


def test_fraction_rule_without_crs(tmp_path):
    """A raster and regions without a CRS: coordinates taken as they are, as exactextract takes them."""
    from rasterio.transform import Affine

    from .conftest import blobs, write_raster

    data = blobs((60, 80), seed=8)
    raster = write_raster(tmp_path / "nocrs.tif", data, None, Affine(2, 0, 100, 0, -2, 500), block=16)
    geoms = [shapely.Point(150, 450).buffer(17), shapely.box(90, 380, 131.3, 442.7), shapely.box(400, 0, 410, 10)]
    regions_path = tmp_path / "nocrs.gpkg"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pyogrio: "'crs' was not provided"
        gpd.GeoDataFrame({"name": ["a", "b", "off"]}, geometry=geoms).to_file(regions_path)
    out = compute_stats(raster, tmp_path / "z.csv", regions=regions_path, region_id="name", coverage="fraction")
    table = pd.read_csv(out)
    features = [{"type": "Feature", "properties": {}, "geometry": g.__geo_interface__} for g in geoms]
    reference = exact_extract(str(raster), features, ["count", "frac", "unique"], output="pandas")
    assert reference["count"].iloc[0] > 0 and reference["count"].iloc[2] == 0
    columns = reference[["count", "frac", "unique"]].itertuples(index=False)
    for row, (count, frac, unique) in zip(table.to_dict(orient="records"), columns):
        weighted = dict(zip((int(u) for u in unique), (count * f for f in frac)))
        for value in class_values(table):
            assert row[f"class_{value}_pixels"] == pytest.approx(weighted.get(value, 0.0), rel=1e-9, abs=1e-9)
    for value in class_values(table):  # no CRS, no area: empty, as the warning says (it was 0.0)
        assert table[f"class_{value}_area_m2"].isna().all()
    totals = pd.read_csv(compute_stats(raster, tmp_path / "totals.csv"))
    assert totals["area_m2"].isna().all() and totals["pixels"].sum() == data.size


@pytest.mark.timeout(120)
def test_geoparquet_regions_are_read_as_the_same_regions_in_a_geopackage(tmp_path, shade_labels):
    """GeoParquet regions (what tilemask writes its own polygons and tables with geometry as) were refused as
    unreadable: ``cannot read the regions: libduckdb.so: cannot open shared object file``, GDAL's ADBC driver
    claiming the ``.parquet`` that pyogrio's wheels have no Parquet driver for; the workflow's ``stats:`` check
    refused them the same way. They are read with geopandas (pyarrow), keyed and counted as any other file."""
    from tilemask.stats.config import check_regions

    regions = random_regions(shade_labels, 12, seed=4, crs_out="EPSG:4326")
    regions.to_file(tmp_path / "regions.gpkg")
    regions.to_parquet(tmp_path / "regions.parquet")
    check_regions(str(tmp_path / "regions.parquet"), "name")
    with pytest.raises(InputError, match="region id 'nope' is not a field of the regions \\(fields: name\\)"):
        check_regions(str(tmp_path / "regions.parquet"), "nope")
    expected = compute_stats(shade_labels, tmp_path / "gpkg.csv", regions=tmp_path / "regions.gpkg", region_id="name")
    got = compute_stats(shade_labels, tmp_path / "parquet.csv", regions=tmp_path / "regions.parquet", region_id="name")
    pd.testing.assert_frame_equal(pd.read_csv(got), pd.read_csv(expected))
    pd.DataFrame({"name": ["a"]}).to_parquet(tmp_path / "plain.parquet")  # a table, no geometry
    with pytest.raises(InputError, match="plain.parquet: cannot read the regions: "):
        compute_stats(shade_labels, tmp_path / "z.csv", regions=tmp_path / "plain.parquet")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fid", [[7, 3, 9, 11, 2, 5], ["x7", "x3", "x9", "x11", "x2", "x5"]], ids=["integer", "text"])
def test_a_geopackage_table_keeps_a_region_id_named_fid(tmp_path, shade_labels, fid):
    """A key named ``fid`` (a GeoJSON QGIS exported from a GeoPackage carries one) is a field of a GeoPackage table,
    as any other key: GDAL took a column of that name for the table's FID, so a text key failed the command after
    the counting (``FieldError: Error adding field 'fid' to layer``, exit 1) and an integer one vanished from the
    table's fields, its rows read back in the order of their keys."""
    regions = random_regions(shade_labels, 5, seed=6).assign(fid=fid)
    regions.to_parquet(tmp_path / "regions.parquet")
    expected = pd.read_csv(compute_stats(shade_labels, tmp_path / "t.csv", regions=tmp_path / "regions.parquet",
                                         region_id="fid"))  # fmt: skip
    out = compute_stats(shade_labels, tmp_path / "t.gpkg", regions=tmp_path / "regions.parquet", region_id="fid")
    table = gpd.read_file(out)
    assert list(table["fid"]) == fid
    pixels = [c for c in expected.columns if c.endswith("_pixels")]
    assert (table[pixels].to_numpy() == expected[pixels].to_numpy()).all()


@pytest.mark.timeout(60)
def test_a_json_table_keeps_a_region_id_that_is_a_list(tmp_path, shade_labels):
    """A GeoJSON's key of lists (GDAL's IntegerList, read as arrays) is written to a JSON table as lists: the table
    failed after the counting (``TypeError: Object of type ndarray is not JSON serializable``, exit 1)."""
    regions = random_regions(shade_labels, 3, seed=7)
    regions.to_file(tmp_path / "plain.geojson")
    collection = json.loads((tmp_path / "plain.geojson").read_text())
    for i, feature in enumerate(collection["features"]):
        feature["properties"]["ids"] = [i, i + 10]
    (tmp_path / "regions.geojson").write_text(json.dumps(collection))
    out = compute_stats(shade_labels, tmp_path / "t.json", regions=tmp_path / "regions.geojson", region_id="ids")
    records = json.loads(out.read_text())
    assert [r["ids"] for r in records] == [[i, i + 10] for i in range(len(regions))]


@pytest.mark.timeout(60)
def test_a_json_table_keeps_a_region_id_that_is_a_date_and_time(tmp_path, shade_labels):
    """A GeoPackage's DateTime key (an acquisition's time, read as pandas Timestamps) is written to a JSON table as
    ISO 8601 text: the table failed after the counting (``TypeError: Object of type Timestamp is not JSON
    serializable``, exit 1), where the CSV, GeoPackage and Parquet tables were written."""
    regions = random_regions(shade_labels, 3, seed=7)
    regions["when"] = pd.to_datetime(["2020-01-01 10:00:00", "2020-01-02 11:30:00", "2020-01-03 12:45:30",
                                      "2021-06-30 00:00:00"])
    regions.to_file(tmp_path / "regions.gpkg")
    out = compute_stats(shade_labels, tmp_path / "t.json", regions=tmp_path / "regions.gpkg", region_id="when")
    records = json.loads(out.read_text())
    assert [r["when"] for r in records] == ["2020-01-01T10:00:00", "2020-01-02T11:30:00", "2020-01-03T12:45:30",
                                            "2021-06-30T00:00:00"]
    table = pd.read_csv(compute_stats(shade_labels, tmp_path / "t.csv", regions=tmp_path / "regions.gpkg",
                                      region_id="when"))  # fmt: skip
    def plain(v):
        return None if isinstance(v, float) and np.isnan(v) else v

    assert [{k: v for k, v in r.items() if k != "when"} for r in records] == [
        {k: plain(v) for k, v in r.items() if k not in ("when", "geometry")} for r in table.to_dict(orient="records")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("coverage", ["center", "fraction"])
def test_a_batch_of_regions_in_one_zarr_chunk_decodes_it_once(tmp_path, shade_labels, coverage, monkeypatch):
    """Regions are measured in batches of neighbours, and a batch reads a Zarr label array's chunks through a cache:
    each region's window decoded its chunks again, and a batch held regions from all over the raster (20,000
    districts on a 16384^2 Zarr of 2048^2 chunks, centre rule: 124 s, 34 s now)."""
    import dask
    import zarr

    from tilemask.stats import zonal

    zarr_path = write_zarr_labels(shade_labels, tmp_path / "labels.zarr")  # chunks of 200 x 300
    with rasterio.open(shade_labels) as ds:
        transform, crs = ds.transform, ds.crs
    boxes = [  # in file order, one region in the first chunk, the next in the third row's
        shapely.box(*(transform @ (10 + 5 * i, 20 + 3 * i + 400 * (i % 2))), *(transform @ (40 + 5 * i, 50 + 3 * i + 400 * (i % 2))))
        for i in range(40)
    ]  # fmt: skip
    regions = gpd.GeoDataFrame({"name": [f"b{i}" for i in range(40)]}, geometry=boxes, crs=crs)
    regions.to_file(tmp_path / "regions.gpkg")
    reads = []
    getitem = zarr.Array.__getitem__
    monkeypatch.setattr(zarr.Array, "__getitem__", lambda self, key: reads.append(key) or getitem(self, key))
    monkeypatch.setattr(zonal, "_batch_size", lambda n, client: 10)
    with dask.config.set(scheduler="synchronous"):  # one thread
        got = compute_stats(zarr_path, tmp_path / "zarr.csv", regions=tmp_path / "regions.gpkg", region_id="name",
                            coverage=coverage)  # fmt: skip
    assert 0 < len(reads) <= 4 + 1  # one chunk a batch of 10 (and exactextract's first look)
    expected = compute_stats(shade_labels, tmp_path / "tif.csv", regions=tmp_path / "regions.gpkg", region_id="name",
                             coverage=coverage)  # fmt: skip
    pd.testing.assert_frame_equal(pd.read_csv(got), pd.read_csv(expected))


@pytest.mark.timeout(60)
def test_a_geopackage_s_fid_is_a_region_id(tmp_path, shade_labels):
    """``--region-id fid`` keys a GeoPackage's regions by their feature id, the first column QGIS shows of every
    GeoPackage layer: it was refused as ``region id 'fid' is not a field of the regions``."""
    from tilemask.stats.config import check_regions

    regions = random_regions(shade_labels, 5, seed=8)
    regions.to_file(tmp_path / "regions.gpkg")  # fids 1..6
    check_regions(str(tmp_path / "regions.gpkg"), "fid")
    table = pd.read_csv(compute_stats(shade_labels, tmp_path / "t.csv", regions=tmp_path / "regions.gpkg",
                                      region_id="fid"))  # fmt: skip
    expected = pd.read_csv(compute_stats(shade_labels, tmp_path / "n.csv", regions=tmp_path / "regions.gpkg",
                                         region_id="name"))  # fmt: skip
    assert list(table["fid"]) == list(range(1, len(regions) + 1))
    pd.testing.assert_frame_equal(table.drop(columns="fid"), expected.drop(columns="name"))
    with pytest.raises(InputError, match="region id 'FID' is not a field of the regions \\(fields: name; feature id: fid"):
        check_regions(str(tmp_path / "regions.gpkg"), "FID")


@pytest.mark.timeout(60)
def test_a_region_id_of_repeated_lists_is_refused(tmp_path, shade_labels):
    """A key of lists (a GeoJSON's IntegerList, read as arrays) must be unique as any other: arrays were compared by
    identity, so two features keyed ``[1, 10]`` were measured and written as two rows with the same key."""
    from tilemask.stats.config import check_regions

    regions = random_regions(shade_labels, 3, seed=7)
    regions.to_file(tmp_path / "plain.geojson")
    collection = json.loads((tmp_path / "plain.geojson").read_text())
    for i, feature in enumerate(collection["features"]):
        feature["properties"]["ids"] = [i, 10] if i else [1, 10]
    collection["features"][1]["properties"]["ids"] = [1, 10]
    (tmp_path / "regions.geojson").write_text(json.dumps(collection))
    with pytest.raises(InputError, match="region id 'ids' has repeated values"):
        check_regions(str(tmp_path / "regions.geojson"), "ids")
    with pytest.raises(InputError, match="region id 'ids' has repeated values"):
        compute_stats(shade_labels, tmp_path / "t.json", regions=tmp_path / "regions.geojson", region_id="ids")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("suffix", [".csv", ".gpkg"])
def test_a_csv_or_geopackage_table_writes_a_region_id_of_lists_as_json(tmp_path, shade_labels, suffix):
    """A key of lists (a GeoJSON's IntegerList, read as arrays) is written as the JSON text of its list, as the JSON
    table keeps it: it was numpy's print of the array (``[ 0 10]``, ``['a' 'b']``), which no reader parses and
    which numpy cuts to ``[0 1 2 ... 998 999]`` past 1,000 items."""
    import pyogrio

    regions = random_regions(shade_labels, 3, seed=7)
    regions.to_file(tmp_path / "plain.geojson")
    collection = json.loads((tmp_path / "plain.geojson").read_text())
    for i, feature in enumerate(collection["features"]):
        feature["properties"]["ids"] = [i, i + 10] if i else list(range(1200))
    (tmp_path / "regions.geojson").write_text(json.dumps(collection))
    out = compute_stats(shade_labels, tmp_path / f"t{suffix}", regions=tmp_path / "regions.geojson", region_id="ids")
    written = pd.read_csv(out)["ids"] if suffix == ".csv" else pyogrio.read_dataframe(out)["ids"]
    assert [json.loads(v) for v in written] == [list(range(1200))] + [[i, i + 10] for i in range(1, len(regions))]


def test_zarr_chunks_are_kept_inside_a_batch_alone(tmp_path):
    """The Zarr chunk cache lives only inside :func:`_batch` (a client's check of the first region kept 64 MiB in its
    thread): outside a batch each window is read as it is, and after one, a failed one included, no chunk is kept.
    (That a batch decodes a chunk once: ``test_a_batch_of_regions_in_one_zarr_chunk_decodes_it_once``.)"""
    import zarr

    from tilemask.stats import zonal

    array = zarr.open_array(str(tmp_path / "l.zarr"), mode="w", shape=(256, 256), chunks=(64, 64), dtype="uint8")
    array[:] = (np.arange(256)[:, None] // 64 + np.arange(256)[None] // 64).astype("uint8")
    reads = []

    class Counted:
        chunks, dtype = array.chunks, array.dtype

        def __getitem__(self, key):
            reads.append(key)
            return array[key]

    def windows():
        return [zonal.zarr_window(Counted(), slice(10 + i, 50 + i), slice(10, 50)) for i in range(5)]

    inside = zonal._batch(windows)
    assert len(reads) == 1, "one chunk under five windows, decoded once"
    assert not zonal._zarr_chunks.__dict__, "no chunk kept after the batch"
    outside = windows()
    assert len(reads) == 1 + 5, "outside a batch each window is read as it is"
    for a, b, i in zip(inside, outside, range(5)):
        np.testing.assert_array_equal(a, array[10 + i : 50 + i, 10:50])
        np.testing.assert_array_equal(b, a)

    def failing():
        windows()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        zonal._batch(failing)
    assert not zonal._zarr_chunks.__dict__, "nor after a batch that failed"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("coverage", ["center", "fraction"])
def test_a_damaged_zarr_chunk_is_named_with_the_file_and_its_window(tmp_path, shade_labels, coverage):
    """A Zarr label chunk that does not decode (cut short) fails the regions that read it naming the file and the
    window, as the per-class statistics do: through the chunk cache of a batch of regions it was the codec's bare
    line, ``tilemask: error: RuntimeError: Zstd decompression error: invalid input data``, naming no file."""
    from tilemask.errors import ReadError

    zarr_path = write_zarr_labels(shade_labels, tmp_path / "labels.zarr")  # chunks of 200 x 300
    chunk = zarr_path / "labels" / "c" / "1" / "1"
    chunk.write_bytes(chunk.read_bytes()[:20])
    random_regions(shade_labels, 16, seed=7).to_file(tmp_path / "regions.gpkg")
    with pytest.raises(ReadError, match=rf"^{re.escape(str(zarr_path))}: read failed at \[\d+:\d+, \d+:\d+\]: "
                                        r"RuntimeError: .*decompress"):  # fmt: skip
        compute_stats(zarr_path, tmp_path / "t.csv", regions=tmp_path / "regions.gpkg", region_id="name",
                      coverage=coverage)  # fmt: skip
    assert not (tmp_path / "t.csv").exists()
