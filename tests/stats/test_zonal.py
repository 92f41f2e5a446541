"""Zonal statistics over vector regions against rasterstats (centre rule) and exactextract (coverage)."""

from __future__ import annotations

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
            x0, y0 = transform * (c, r)
            x1, y1 = transform * (c + 1, r + 1)
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


def test_region_errors(tmp_path, shade_labels):
    regions = random_regions(shade_labels, 3, seed=1)
    regions_path = tmp_path / "regions.gpkg"
    regions.to_file(regions_path)
    with pytest.raises(InputError, match="not a field"):
        compute_stats(shade_labels, tmp_path / "z.parquet", regions=regions_path, region_id="nope")
    with pytest.raises(InputError, match="unknown table format"):
        compute_stats(shade_labels, tmp_path / "z.xlsx", regions=regions_path)
    with pytest.raises(InputError, match="cannot read the regions"):
        (tmp_path / "bad.gpkg").write_text("not a geopackage")
        compute_stats(shade_labels, tmp_path / "z.parquet", regions=tmp_path / "bad.gpkg")
