"""``tilemask stats`` end to end on a real 2-worker LocalCluster; atlas zonal statistics; table formats."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from click.testing import CliRunner
from rasterio.transform import Affine

from tilemask.errors import InputError, OutputConflict, WorkflowError
from tilemask.stats import compute_stats
from tilemask.stats.cli import stats as stats_command

from .conftest import blobs, write_nifti, write_raster
from .test_zonal import random_regions


@pytest.mark.slow  # 17 s in a loaded default run (2026-12-07)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["stats", "evaluate"])
def test_a_cluster_without_a_worker_fails_stats_and_evaluate_in_one_line(tmp_path, shade_labels, command):
    """A scheduler whose workers all died (or never joined) left ``tilemask stats`` and ``evaluate`` waiting for
    ever, where ``tilemask run`` fails once the cluster has had no worker for ``tilemask.no-workers-timeout``: a
    reviewer's stats still waited 152 s after its only worker was killed.  They fail as ``run`` does, exit 1."""
    import time

    from ..conftest import run_cli, start_scheduler

    process, address = start_scheduler(tmp_path)
    try:
        args = ["-o", tmp_path / "t.csv"] if command == "stats" else [shade_labels]
        started = time.monotonic()
        done = run_cli(command, shade_labels, *args, "--scheduler", address, timeout=90,
                       env={"DASK_TILEMASK__NO_WORKERS_TIMEOUT": "3"})  # fmt: skip
        assert done.returncode == 1, done.stderr
        assert done.stderr.strip().splitlines() == [
            f"tilemask: error: the Dask cluster at {address} has had no worker for 3 s (they died or never joined)"
        ]
        assert time.monotonic() - started < 60
        assert not (tmp_path / "t.csv").exists()
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.slow
def test_cli_regions_on_cluster(tmp_path, shade_labels, monkeypatch):
    regions = random_regions(shade_labels, 12, seed=9, crs_out="EPSG:4326")
    regions["district"] = [f"d{i}" for i in range(len(regions))]
    regions_path = tmp_path / "regions.gpkg"
    regions.to_file(regions_path)
    out = tmp_path / "zonal.gpkg"
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        runner = CliRunner()
        monkeypatch.chdir(tmp_path)  # the paths relative to where the command runs, not where the workers do
        result = runner.invoke(
            stats_command,
            [os.path.relpath(shade_labels), "-o", "zonal.gpkg", "--regions", "regions.gpkg", "--region-id", "district",
             "--chunks", "128", "--scheduler", cluster.scheduler_address],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        with Client(cluster) as client:
            local = compute_stats(shade_labels, tmp_path / "local.csv", regions=regions_path, region_id="district", client=client)
        # an existing table is replaced only with --overwrite, as rio's commands do; refused before any work
        table, before = gpd.read_file(out), out.read_bytes()
        totals = [str(shade_labels), "-o", str(out), "--scheduler", cluster.scheduler_address]
        again = runner.invoke(stats_command, totals)
        assert again.exit_code == 2 and again.output == f"tilemask: error: {out} exists; pass --overwrite to replace it\n"
        assert out.read_bytes() == before
        replaced = runner.invoke(stats_command, [*totals, "--overwrite"])
        assert replaced.exit_code == 0, replaced.output
        assert len(gpd.read_file(out)) < len(table)  # the class totals now, not the regions
    assert list(table["district"]) == list(regions["district"])
    reference = pd.read_csv(compute_stats(shade_labels, tmp_path / "threads.csv", regions=regions_path, region_id="district"))
    pd.testing.assert_frame_equal(pd.read_csv(local), reference)
    columns = [c for c in reference.columns if c.endswith("_pixels")]
    np.testing.assert_array_equal(table[columns].to_numpy(), reference[columns].to_numpy())

    bad = CliRunner().invoke(stats_command, [str(shade_labels), "-o", str(tmp_path / "x.parquet"), "--regions", str(regions_path), "--region-id", "nope"])
    assert bad.exit_code == 2 and "not a field" in bad.output
    # the CSV's WKT is the regions' geometry as it is (it was rounded to 6 decimals: 5 cm in lon/lat)
    assert list(shapely.from_wkt(reference["geometry"])) == list(gpd.read_file(regions_path).geometry)
    unused = CliRunner().invoke(stats_command, [str(shade_labels), "-o", str(tmp_path / "u.csv"), "--region-id", "district"])
    assert (unused.exit_code, unused.output) == (2, "tilemask: error: --region-id applies to --regions, which is not given\n")
    with pytest.raises(InputError, match="^coverage fraction applies to regions, which are not given$"):
        compute_stats(shade_labels, tmp_path / "u.csv", coverage="fraction")  # from Python, in its words
    with pytest.raises(InputError, match="^coverage fraction applies to vector regions; an atlas"):
        compute_stats(shade_labels, tmp_path / "u.csv", regions=shade_labels, coverage="fraction")
    with pytest.raises(InputError, match=r"^regions: a path \(a vector file: GeoPackage, shapefile, GeoJSON, "
                                         r"\.\.\.; or a label image\), not a GeoDataFrame; write it to one first"):
        compute_stats(shade_labels, tmp_path / "u.csv", regions=gpd.read_file(regions_path))
    from tilemask.workflow import Workflow

    from ..conftest import REPO

    with pytest.raises(WorkflowError, match="region_id and coverage fraction apply to regions, which are not given"):
        Workflow.from_yaml(REPO / "workflows" / "demo_landsat.yaml",
                           ["stats.output=s.csv", "stats.region_id=district", "stats.coverage=fraction"])  # fmt: skip


def test_connectivity_without_instances_is_refused_before_any_table(tmp_path, shade_labels):
    """--connectivity joins instances only; given alone it was left unused and class totals written (exit 0)."""
    out = tmp_path / "u.csv"
    alone = CliRunner().invoke(stats_command, [str(shade_labels), "-o", str(out), "--connectivity", "full"])
    assert (alone.exit_code, alone.output) == (2, "tilemask: error: --connectivity full applies to --instances, which "
                                                  "is not given\n")  # fmt: skip
    assert not out.exists()
    with pytest.raises(InputError, match="^connectivity full applies to instances, which is not given$"):
        compute_stats(shade_labels, out, connectivity="full")  # from Python, in its words
    from tilemask.workflow import Workflow

    from ..conftest import REPO

    with pytest.raises(WorkflowError, match="connectivity full applies to instances, which is not given"):
        Workflow.from_yaml(REPO / "workflows" / "demo_landsat.yaml", ["stats.output=s.csv", "stats.connectivity=full"])
    assert compute_stats(shade_labels, tmp_path / "i.csv", instances=True, connectivity="full").exists()


@pytest.mark.slow
def test_atlas_zonal_and_chunking(tmp_path):
    data = blobs((40, 44, 36), seed=2)
    atlas = (np.indices(data.shape)[0] // 10 + 1).astype(np.uint8)  # 4 slabs, labels 1..4
    affine = np.diag([0.9, 1.1, 3.0, 1.0])
    mask_path = write_nifti(tmp_path / "mask.nii.gz", data, affine)
    atlas_path = write_nifti(tmp_path / "atlas.nii.gz", atlas, affine)
    tables = [pd.read_csv(compute_stats(mask_path, tmp_path / f"a{c}.csv", regions=atlas_path, chunks=c, classes="bg,a,b")) for c in (5, 13, 64)]
    for other in tables[1:]:
        pd.testing.assert_frame_equal(tables[0], other)
    table = tables[0]
    assert list(table["region"]) == [1, 2, 3, 4]
    voxel_ml = 0.9 * 1.1 * 3.0 / 1000
    for row in table.itertuples(index=False):
        inside = atlas == row.region
        for value, name in enumerate(("bg", "a", "b")):
            count = int((data[inside] == value).sum())
            assert getattr(row, f"{name}_voxels") == count
            assert getattr(row, f"{name}_volume_ml") == pytest.approx(count * voxel_ml, rel=1e-6)  # NIfTI stores float32
            assert getattr(row, f"{name}_fraction") == pytest.approx(count / inside.sum(), rel=1e-12)


@pytest.mark.timeout(120)
def test_an_atlas_label_wholly_over_the_masks_nodata_keeps_its_row(tmp_path):
    """Its row was left out (one row per atlas label, as a vector region over nodata keeps its row)."""
    transform = Affine(10, 0, 500000, 0, -10, 4000000)
    labels = np.ones((30, 40), np.uint8)
    labels[:, :20] = 255  # nodata: the left half
    labels[5:10, 25:30] = 2
    atlas = np.where(np.arange(40) < 20, 1, 2)[None, :].repeat(30, 0).astype(np.uint8)
    atlas[:, 30:] = 3
    mask = write_raster(tmp_path / "mask.tif", labels, "EPSG:32618", transform, nodata=255)
    regions = write_raster(tmp_path / "atlas.tif", atlas, "EPSG:32618", transform)
    table = pd.read_csv(compute_stats(mask, tmp_path / "t.csv", regions=regions, classes="bg,a,b"))
    assert list(table["region"]) == [1, 2, 3]
    for row in table.itertuples(index=False):
        valid = (atlas == row.region) & (labels != 255)
        for value, name in enumerate(("bg", "a", "b")):
            assert getattr(row, f"{name}_pixels") == int((labels[valid] == value).sum())
            assert getattr(row, f"{name}_area_m2") == 100.0 * int((labels[valid] == value).sum())
    assert table.loc[0, ["a_pixels", "b_pixels"]].tolist() == [0, 0] and np.isnan(table.loc[0, "a_fraction"])


def test_an_atlas_is_on_the_grid_within_1_um_and_is_checked_before_any_cluster_starts(tmp_path):
    """An atlas in NIfTI-2 (a float64 affine) beside labels in NIfTI-1 (float32) was refused as off their grid
    (4e-6 mm apart) once the cluster had started, where a workflow's planning took it (1 um). An atlas 0.01 mm off is
    refused by ``prepare_stats`` now, before the command starts a cluster."""
    import nibabel as nib

    from tilemask.stats.api import prepare_stats

    data = blobs((20, 22, 18), seed=2)
    atlas = (np.indices(data.shape)[0] // 5 + 1).astype(np.uint8)
    affine = np.diag([0.9, 1.1, 3.0, 1.0])
    affine[:3, 3] = [-123.456789, 87.654321, -45.6789]
    mask_path = write_nifti(tmp_path / "mask.nii.gz", data, affine)
    float64 = nib.Nifti2Image(atlas, affine)
    float64.set_sform(affine, code=1)
    nib.save(float64, tmp_path / "atlas.nii")
    assert 1e-6 < np.abs(nib.load(mask_path).affine - nib.load(tmp_path / "atlas.nii").affine).max() < 1e-5
    table = pd.read_csv(compute_stats(mask_path, tmp_path / "a.csv", regions=tmp_path / "atlas.nii"))
    for row in table.itertuples(index=False):
        assert [getattr(row, f"class_{v}_voxels") for v in range(3)] == np.bincount(data[atlas == row.region],
                                                                                   minlength=3).tolist()
    affine[0, 3] += 0.01
    write_nifti(tmp_path / "off.nii.gz", atlas, affine)
    with pytest.raises(InputError, match="off.nii.gz: the atlas is not on the grid of .*mask.nii.gz .affines differ"):
        prepare_stats(mask_path, tmp_path / "b.csv", regions=tmp_path / "off.nii.gz")


def test_totals_formats_and_nodata(tmp_path):
    data = blobs((50, 60), seed=4)
    data[:5] = 255
    path = write_raster(tmp_path / "m.tif", data, "EPSG:32633", Affine(2, 0, 0, 0, -2, 0), nodata=255, block=16)
    frames = [compute_stats(path, tmp_path / f"t.{suffix}", chunks=c) for suffix, c in (("csv", 16), ("parquet", 32), ("json", 50), ("gpkg", 7))]
    csv = pd.read_csv(frames[0])
    assert 255 not in set(csv["value"])
    for value in range(3):
        row = csv[csv["value"] == value].iloc[0]
        assert row["pixels"] == int((data == value).sum())
        assert row["area_m2"] == pytest.approx(4.0 * row["pixels"])
    pd.testing.assert_frame_equal(pd.read_parquet(frames[1]), csv, check_dtype=False)
    pd.testing.assert_frame_equal(pd.read_json(frames[2]), csv, check_dtype=False)
    pd.testing.assert_frame_equal(pd.DataFrame(gpd.read_file(frames[3])), csv, check_dtype=False)


def test_a_damaged_or_many_band_label_raster_is_refused_in_one_line(tmp_path, shade_labels, client):
    """A label raster is one band (the real corrupt.tif is RGB: refused at once, exit 2); a damaged tile is
    named with its file and place (exit 1), not as rasterio's bare 'Read failed'."""
    from tilemask.cli import main

    from .conftest import GEO

    rgb = CliRunner().invoke(main, ["stats", str(GEO["corrupt.tif"]), "-o", str(tmp_path / "rgb.csv")])
    assert (rgb.exit_code, rgb.output) == (2, f"tilemask: error: {GEO['corrupt.tif']}: a label image has one band, this raster has 3\n")
    damaged = tmp_path / "damaged.tif"
    damaged.write_bytes(shade_labels.read_bytes()[: shade_labels.stat().st_size * 3 // 4])  # its last tiles cut off
    result = CliRunner().invoke(main, ["stats", str(damaged), "-o", str(tmp_path / "d.csv"), "--chunks", "64",
                                       "--scheduler", client.scheduler.address])  # fmt: skip
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"tilemask: error: {damaged}: read failed at rows "), result.output
    assert not (tmp_path / "d.csv").exists()
    # with regions too: exactextract (the fraction rule) reads the file itself, and gave "Exception:
    # RasterioIOError('Read failed. See previous exception for details.')", no file, no window
    with rasterio.open(shade_labels) as ds:
        whole = gpd.GeoDataFrame({"name": ["all"]}, geometry=[shapely.box(*ds.bounds)], crs=ds.crs)
    whole.to_file(tmp_path / "whole.gpkg")
    for coverage in ("center", "fraction"):
        result = CliRunner().invoke(main, ["stats", str(damaged), "-o", str(tmp_path / "z.csv"), "--regions",
                                           str(tmp_path / "whole.gpkg"), "--coverage", coverage,
                                           "--scheduler", client.scheduler.address])  # fmt: skip
        assert result.exit_code == 1 and result.output.count("\n") == 1, (coverage, result.output)
        assert result.output.startswith(f"tilemask: error: {damaged}: read failed at rows "), (coverage, result.output)
        assert not (tmp_path / "z.csv").exists()



def test_scaled_labels_are_refused_in_one_line(tmp_path, shade_labels):
    """Labels with a band scale or offset (GeoTIFF) or scl_slope / scl_inter (NIfTI) are not the stored values a
    table would count: both are refused, exit 2, before any cluster (the GeoTIFF's were counted as stored)."""
    import nibabel as nib

    from tilemask.cli import main

    scaled = tmp_path / "scaled.tif"
    scaled.write_bytes(shade_labels.read_bytes())
    with rasterio.open(scaled, "r+") as ds:
        ds.scales, ds.offsets = (2.0,), (1.0,)
    result = CliRunner().invoke(main, ["stats", str(scaled), "-o", str(tmp_path / "s.csv")])
    assert (result.exit_code, result.output) == (2, f"tilemask: error: {scaled}: labels must be stored as unscaled "
                                                    "integers (band scale 2, offset 1)\n")  # fmt: skip
    volume = tmp_path / "scaled.nii.gz"
    image = nib.Nifti1Image(blobs((12, 10, 8), seed=1), np.eye(4))
    image.header.set_slope_inter(2.0, 0.0)
    nib.save(image, volume)
    result = CliRunner().invoke(main, ["stats", str(volume), "-o", str(tmp_path / "v.csv")])
    assert (result.exit_code, result.output) == (2, f"tilemask: error: {volume}: labels must be stored as unscaled "
                                                    "integers, or floats holding whole numbers (dtype uint8)\n")  # fmt: skip
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "v.csv").exists()


@pytest.mark.slow  # 35 s in a loaded default run (2026-12-07)
@pytest.mark.timeout(120)
def test_float_labels_of_whole_numbers_count_as_rasterstats_counts_them(tmp_path):
    """QGIS's Rasterize writes Float32 by default, and rasterstats counts such a raster's values: tilemask refused it
    ("labels must be integers, the raster holds float32", exit 2), while a NIfTI's float labels were read. Whole
    numbers are now read as int32, NaN as the nodata it is declared to be; per region, the counts are rasterstats'
    (categorical) on the same float raster. A fraction, or NaN a raster does not declare its nodata, is refused
    naming its pixel, exit 2, and leaves no table."""
    from rasterstats import zonal_stats

    from tilemask.cli import main

    transform = Affine(10, 0, 500000, 0, -10, 4100000)
    labels = blobs((96, 80), seed=5, classes=4).astype(np.float32)
    labels[:7, :9] = np.nan  # the raster's nodata where it is NaN
    regions = random_regions(write_raster(tmp_path / "grid.tif", np.zeros((96, 80), np.uint8), "EPSG:32618",
                                          transform), 6, seed=2)  # fmt: skip
    regions.to_file(tmp_path / "regions.gpkg")
    for nodata in (float("nan"), -9999.0):
        data = np.where(np.isnan(labels), np.float32(nodata), labels)
        path = write_raster(tmp_path / "float.tif", data, "EPSG:32618", transform, nodata=nodata)
        out = tmp_path / "f.csv"
        result = CliRunner().invoke(main, ["stats", str(path), "-o", str(out), "--overwrite",
                                           "--regions", str(tmp_path / "regions.gpkg")])  # fmt: skip
        assert result.exit_code == 0, result.output
        table = pd.read_csv(out)
        reference = zonal_stats(list(regions.geometry), str(path), categorical=True)
        assert any(reference), reference
        for row, ref in zip(table.to_dict(orient="records"), reference):
            for value in (0, 1, 2, 3):
                assert row.get(f"class_{value}_pixels", 0) == ref.get(float(value), 0), (nodata, row, ref)
    labels[40, 30] = 1.5
    write_raster(tmp_path / "half.tif", labels, "EPSG:32618", transform, nodata=float("nan"))
    write_raster(tmp_path / "undeclared.tif", labels.round(), "EPSG:32618", transform)  # NaN, and no nodata
    for name, line in (("half.tif", "labels stored as float32 must be whole numbers; row 40, col 30 holds 1.5"),
                       ("undeclared.tif", "labels stored as float32 must be whole numbers; row 0, col 0 holds nan")):
        result = CliRunner().invoke(main, ["stats", str(tmp_path / name), "-o", str(tmp_path / "h.csv")])
        assert (result.exit_code, result.output) == (2, f"tilemask: error: {tmp_path / name}: {line}\n")
        assert not (tmp_path / "h.csv").exists()



@pytest.mark.slow  # 10 s in a loaded default run (2026-12-07, the 17th session)
@pytest.mark.timeout(60)
def test_float_labels_whose_nodata_is_float32s_lowest_count_as_rasterstats_counts_them(tmp_path):
    """ArcGIS's float rasters declare NoData -3.4028235e38 (float32's lowest): such a label raster was refused as
    "must be whole numbers; its nodata is -3.40282e+38", where rasterstats counts it leaving those pixels out. They
    are its nodata, as a NaN nodata's pixels are."""
    from rasterstats import zonal_stats

    from tilemask.cli import main

    lowest = float(np.finfo(np.float32).min)
    labels = blobs((40, 50), seed=3, classes=3).astype(np.float32)
    labels[:5, :6] = lowest
    path = write_raster(tmp_path / "arc.tif", labels, "EPSG:32618", Affine(10, 0, 500000, 0, -10, 4100000),
                        nodata=lowest)  # fmt: skip
    result = CliRunner().invoke(main, ["stats", str(path), "-o", str(tmp_path / "a.csv")])
    assert result.exit_code == 0, result.output
    counted = dict(zip(*pd.read_csv(tmp_path / "a.csv")[["value", "pixels"]].values.T))
    (reference,) = zonal_stats([shapely.box(500000, 4099600, 500500, 4100000)], str(path), categorical=True)
    assert counted == {int(k): v for k, v in reference.items()} and sum(counted.values()) == 40 * 50 - 30


@pytest.mark.slow  # 11 s in a loaded default run (2026-12-07, the 17th session)
@pytest.mark.timeout(60)
def test_float_labels_past_int32_are_refused_as_past_int32_not_as_no_whole_number(tmp_path):
    """A Float64 raster's whole number past int32 (3e9) was refused as "must be whole numbers; ... holds 3e+09": a
    whole number said to be none. The refusal says int32's range; a fraction still says whole numbers."""
    from tilemask.cli import main

    labels = np.ones((12, 10))
    labels[5, 7] = 3e9
    path = write_raster(tmp_path / "big.tif", labels, "EPSG:32618", Affine(10, 0, 500000, 0, -10, 4100000))
    result = CliRunner().invoke(main, ["stats", str(path), "-o", str(tmp_path / "b.csv")])
    assert (result.exit_code, result.output) == (2, f"tilemask: error: {path}: labels stored as float64 must be whole "
                                                    "numbers within int32 (-2147483648 to 2147483647); row 5, col 7 "
                                                    "holds 3e+09\n")  # fmt: skip
    assert not (tmp_path / "b.csv").exists()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_labels_as_monai_saves_them_float32_and_channel_last_count_as_their_integers(tmp_path):
    """MONAI's ``SaveImage`` writes labels as float32 by default, and a channel-last ``(x, y, z, 1)`` volume is
    what some pipelines keep: both were refused ("labels must be stored as unscaled integers (dtype float32)", "a
    label volume must be 3D"). Their tables now equal those of the same labels stored as uint8; a value that is
    no whole number is refused, naming it and its voxel, exit 2, and leaves no table."""
    import nibabel as nib
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SaveImage

    from tilemask.cli import main

    labels = blobs((20, 18, 12), seed=3)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    write_nifti(tmp_path / "uint8.nii.gz", labels.astype(np.uint8), affine)
    SaveImage(output_dir=tmp_path, output_postfix="", separate_folder=False, output_ext=".nii.gz", print_log=False)(
        MetaTensor(torch.from_numpy(labels[None].astype(np.float32)), affine=torch.from_numpy(affine),
                   meta={"filename_or_obj": "monai"}))  # fmt: skip
    saved = next(tmp_path.glob("monai*.nii.gz"))
    assert nib.load(saved).get_data_dtype() == np.float32
    write_nifti(tmp_path / "last.nii.gz", labels[..., None].astype(np.int16), affine)
    tables = {}
    for path in (tmp_path / "uint8.nii.gz", saved, tmp_path / "last.nii.gz"):
        result = CliRunner().invoke(main, ["stats", str(path), "-o", str(tmp_path / f"{path.name}.csv")])
        assert result.exit_code == 0, result.output
        tables[path.name] = pd.read_csv(tmp_path / f"{path.name}.csv").drop(columns="file", errors="ignore")
    assert len(tables["uint8.nii.gz"]) >= 2
    for name in (saved.name, "last.nii.gz"):
        pd.testing.assert_frame_equal(tables[name], tables["uint8.nii.gz"], check_dtype=False)
    half = labels.astype(np.float32)
    half[5, 6, 7] = 1.5
    write_nifti(tmp_path / "half.nii.gz", half, affine)
    result = CliRunner().invoke(main, ["stats", str(tmp_path / "half.nii.gz"), "-o", str(tmp_path / "h.csv")])
    line = (f"tilemask: error: {tmp_path / 'half.nii.gz'}: labels stored as float32 must be whole numbers; "
            "voxel [5, 6, 7] holds 1.5\n")  # fmt: skip
    assert (result.exit_code, result.output) == (2, line)
    assert not (tmp_path / "h.csv").exists()
    half[5, 6, 7] = 2**31  # past int32, though float32 rounds int32's largest to it: it was read as -2**31
    write_nifti(tmp_path / "half.nii.gz", half, affine)
    result = CliRunner().invoke(main, ["stats", str(tmp_path / "half.nii.gz"), "-o", str(tmp_path / "h.csv")])
    past = line.replace("holds 1.5", "holds 2.14748e+09").replace("numbers;", "numbers within int32 (-2147483648 to "
                                                                         "2147483647);")  # fmt: skip
    assert (result.exit_code, result.output) == (2, past)


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_a_scan_given_as_labels_is_warned_of(tmp_path):
    """A CT given to ``stats`` as its labels gave one class per Hounsfield value (some 2,000 on a real scan) without
    a word. Values below 0, which no label map holds, are now warned of; the same scan's mask is not."""
    import SimpleITK as sitk
    from pydicom.data import get_testdata_file

    from ..conftest import run_cli

    folder = str(Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892001" / "CT5N")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder))
    ct = reader.Execute()
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(sitk.Cast(ct > 0, sitk.sitkUInt8), str(tmp_path / "mask.nii.gz"))
    values = np.unique(sitk.GetArrayFromImage(ct))
    below = values[values < 0]
    assert len(below) > 100
    for name, warned in (("ct.nii.gz", True), ("mask.nii.gz", False)):
        result = run_cli("stats", tmp_path / name, "-o", tmp_path / f"{name}.csv", timeout=100)  # as a user runs it
        assert result.returncode == 0, result.stderr
        table = pd.read_csv(tmp_path / f"{name}.csv")
        line = (f"the labels hold {len(below)} value(s) below 0, down to {below.min()}, each counted as a class: is "
                "this a scan rather than a label image?")  # fmt: skip
        assert (line in result.stderr) == warned, (name, result.stderr)
        assert len(table) == (len(values) if warned else 2)


@pytest.mark.slow  # 16 s in a loaded default run (2026-12-07)
@pytest.mark.timeout(60)
def test_a_minc_volume_is_refused_in_one_line(tmp_path, make_model, write_workflow):
    """nibabel's MINC test volumes are refused as labels and as an input in one line naming the file, exit 2, as
    other files tilemask does not read (nor MONAI's readers): GDAL read the MINC1 one as a 10-band raster, logging a
    warning line of its own before the error ('a label image has one band, this raster has 10'), and a MINC2 one
    failed with 'IndexError: tuple index out of range' (exit 1)."""
    import nibabel

    from tilemask.cli import main

    from ..conftest import UNET_3D, run_cli, volume_workflow

    data = Path(nibabel.__file__).parent / "tests" / "data"
    why = "cannot open as a label image: a MINC volume, which tilemask does not read; convert it to NIfTI (.nii.gz)"
    minc1 = run_cli("stats", data / "tiny.mnc", "-o", tmp_path / "t.csv", timeout=60)  # as a user runs it
    assert (minc1.returncode, minc1.stdout) == (2, "")
    assert minc1.stderr == f"tilemask: error: {data / 'tiny.mnc'}: {why}\n"
    minc2 = CliRunner().invoke(main, ["stats", str(data / "minc2_4d.mnc"), "-o", str(tmp_path / "t.csv")])
    assert (minc2.exit_code, minc2.output) == (2, f"tilemask: error: {data / 'minc2_4d.mnc'}: {why}\n")
    assert not (tmp_path / "t.csv").exists()
    weights, _ = make_model(UNET_3D)
    workflow = write_workflow(volume_workflow(data / "tiny.mnc", weights, {}, {"path": "out/{stem}.nii.gz"}))
    run = run_cli("run", workflow, cwd=tmp_path, timeout=60)
    why = why.replace("a label image", "an input")
    assert (run.returncode, run.stderr) == (2, f"tilemask: error: {data / 'tiny.mnc'}: {why}\n")
    workflow = write_workflow(volume_workflow(tmp_path / "gone.mnc", weights, {}, {"path": "out/{stem}.nii.gz"}))
    run = run_cli("run", workflow, cwd=tmp_path, timeout=60)  # a missing one is missing, not "a MINC volume"
    assert (run.returncode, run.stderr) == (2, f"tilemask: error: {tmp_path / 'gone.mnc'}: no such file\n")
    import zipfile

    from tilemask.errors import InputError
    from tilemask.formats import UnreadVolumeFormat

    with zipfile.ZipFile(tmp_path / "scans.zip", "w") as archive:  # input.archive's members are /vsizip/ paths
        archive.write(data / "tiny.mnc", "tiny.mnc")
    member = f"/vsizip/{tmp_path}/scans.zip/tiny.mnc"
    with pytest.raises(InputError, match="^/vsizip/.*: cannot open as an input: a MINC volume"):  # not 'no such file'
        UnreadVolumeFormat().open_source(member, 3, None)


@pytest.mark.timeout(60)
def test_scans_tilemask_does_not_read_as_labels_are_refused_in_one_line_naming_what_they_are(tmp_path):
    """A DICOM series folder given to ``stats`` or ``evaluate`` was "NotImplementedError: NotImplementedError",
    exit 1; NRRD, MetaImage and MGH volumes (SimpleITK and nibabel write them) GDAL's "not recognized as being in
    a supported file format", naming none of them. One line each, exit 2, as MINC's."""
    import nibabel as nib
    import SimpleITK as sitk

    from tilemask.cli import main

    from ..test_dicom import CT

    volume = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.uint8))
    for name in ("labels.nrrd", "labels.mha"):
        sitk.WriteImage(volume, str(tmp_path / name))
    nib.save(nib.MGHImage(np.zeros((6, 5, 4), np.uint8), np.eye(4)), tmp_path / "labels.mgz")
    said = {
        CT: "a DICOM scan; give its labels as tilemask run writes them (.nii.gz, .zarr)",
        tmp_path / "labels.nrrd": "an NRRD volume, which tilemask does not read; convert it to NIfTI (.nii.gz)",
        tmp_path / "labels.mha": "a MetaImage volume, which tilemask does not read; convert it to NIfTI (.nii.gz)",
        tmp_path / "labels.mgz": "a FreeSurfer MGH volume, which tilemask does not read; convert it to NIfTI (.nii.gz)",
    }
    for path, why in said.items():
        for args in (["stats", str(path), "-o", str(tmp_path / "t.csv")], ["evaluate", str(path), str(path)]):
            result = CliRunner().invoke(main, args)
            line = f"tilemask: error: {path}: cannot open as a label image: {why}\n"
            assert (result.exit_code, result.output) == (2, line), (args, result.output)
    assert not (tmp_path / "t.csv").exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["stats", pytest.param("evaluate", marks=pytest.mark.slow)])
def test_a_ctrl_c_python_swallows_while_the_table_is_computed_leaves_no_table(tmp_path, shade_labels, command):
    """A Ctrl-C Python swallows (raised in a gc callback, a weakref callback or a ``__del__``) once the cluster's
    client exists: ``stats`` and ``evaluate`` stop before they write, exit 130. Both wrote their table, then exited
    130: an output that looked finished."""
    from ..test_trust import SWALLOWED_CTRL_C

    # Once a client exists; the main thread collects often from distributed's import on (it mostly waits on the
    # cluster: with Python's default threshold its first collection came as evaluate printed its scores, written)
    client = 'getattr(sys.modules["distributed"], "Client", None)'  # None while distributed is imported
    script = SWALLOWED_CTRL_C.replace("WHEN", f"gc.set_threshold(100) or len(getattr({client}, '_instances', ()))")
    args, out = {"stats": (["stats", shade_labels, "-o", "t.csv"], "t.csv"),
                 "evaluate": (["evaluate", shade_labels, shade_labels, "-o", "e.json"], "e.json")}[command]
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=100)  # fmt: skip
    assert (tmp_path / "raised in the callback").exists()
    said = [line for line in proc.stderr.splitlines() if not line.startswith("WARNING ")]  # EPSG:3857's areas
    assert (proc.returncode, said) == (130, ["tilemask: interrupted"])
    assert not (tmp_path / out).exists()


@pytest.mark.timeout(120)
def test_a_table_tilemask_did_not_write_is_never_replaced(tmp_path, shade_labels, client):
    """``--overwrite`` replaces a Parquet or GeoPackage table only when it carries tilemask's mark (a key of its
    schema's metadata, the GeoPackage's metadata item): someone's own table at the path, or a damaged file, is
    refused even then, before any work, and left as it was. A CSV has no place for a mark: --overwrite decides."""
    from tilemask.formats import product_written_by_tilemask

    with rasterio.open(shade_labels) as ds:
        whole = shapely.box(*ds.bounds)
        districts = gpd.GeoDataFrame({"district": ["a", "b"]}, geometry=[whole, whole.buffer(-1000)], crs=ds.crs)
    runner, scheduler = CliRunner(), ["--scheduler", client.scheduler.address]
    for suffix in (".parquet", ".gpkg"):
        foreign, damaged = tmp_path / f"districts{suffix}", tmp_path / f"damaged{suffix}"
        districts.to_parquet(foreign) if suffix == ".parquet" else districts.to_file(foreign)
        damaged.write_bytes(foreign.read_bytes()[:100])
        for path in (foreign, damaged):
            before = path.read_bytes()
            for flags in ([], ["--overwrite"]):
                refused = runner.invoke(stats_command, [str(shade_labels), "-o", str(path), *scheduler, *flags])
                assert (refused.exit_code, refused.output) == (
                    2, f"tilemask: error: {path} exists and was not written by tilemask; refused to replace it\n")
            with pytest.raises(OutputConflict, match="exists and was not written by tilemask"):  # Python replaced it
                compute_stats(shade_labels, path, client=client)
            assert path.read_bytes() == before
        ours = tmp_path / f"totals{suffix}"
        assert runner.invoke(stats_command, [str(shade_labels), "-o", str(ours), *scheduler]).exit_code == 0
        assert product_written_by_tilemask(ours) is True
        again = runner.invoke(stats_command, [str(shade_labels), "-o", str(ours), *scheduler])
        assert (again.exit_code, again.output) == (
            2, f"tilemask: error: {ours} exists; pass --overwrite to replace it\n")
        inode = ours.stat().st_ino
        replaced = runner.invoke(stats_command, [str(shade_labels), "-o", str(ours), *scheduler, "--overwrite"])
        assert replaced.exit_code == 0, replaced.output
        assert ours.stat().st_ino != inode and product_written_by_tilemask(ours) is True  # a new file, marked
        assert "pixels" in (gpd.read_file(ours) if suffix == ".gpkg" else pd.read_parquet(ours)).columns
    table = tmp_path / "mine.csv"
    table.write_text("district,score\na,1\n")
    replaced = runner.invoke(stats_command, [str(shade_labels), "-o", str(table), *scheduler, "--overwrite"])
    assert replaced.exit_code == 0 and "pixels" in table.read_text()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["d#1.gpkg", "what?.gpkg", "p%41q.gpkg"])
def test_a_geopackage_named_with_uri_characters(tmp_path, shade_labels, client, name):
    """A GeoPackage whose name holds "#", "?" or "%XX" is written (its spatial index is checked through an SQLite
    URI: unencoded, the name was cut short, the check failed on an empty database it made, and that file stayed)."""
    with rasterio.open(shade_labels) as ds:
        districts = gpd.GeoDataFrame({"district": ["a"]}, geometry=[shapely.box(*ds.bounds)], crs=ds.crs)
    districts.to_file(tmp_path / "districts.gpkg")
    folder = tmp_path / "a folder"
    folder.mkdir()
    result = CliRunner().invoke(stats_command, [str(shade_labels), "-o", str(folder / name), "--regions",
                                                str(tmp_path / "districts.gpkg"), "--region-id", "district",
                                                "--scheduler", client.scheduler.address])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == [name]
    assert list(gpd.read_file(folder / name)["district"]) == ["a"]


@pytest.mark.timeout(60)
def test_a_table_another_command_is_writing_is_refused_before_any_work(tmp_path, shade_labels):
    """A review's: two ``stats`` (or ``evaluate``) writing one ``-o`` at once both checked that it did not exist,
    both wrote it, exit 0, and one table was lost. The second is refused, as a second run of an output is."""
    from tilemask.outputs import OutputLock
    from tilemask.stats.cli import evaluate as evaluate_command

    for command, out in ((stats_command, tmp_path / "t.csv"), (evaluate_command, tmp_path / "e.json")):
        arguments = [str(shade_labels), "-o", str(out)] if command is stats_command else [
            str(shade_labels), str(shade_labels), "-o", str(out)]  # fmt: skip
        with OutputLock([str(out)]):  # as the first command holds it while it computes
            refused = CliRunner().invoke(command, arguments)
        assert (refused.exit_code, refused.output) == (
            2, f"tilemask: error: output {out} is being written by another tilemask run\n")
        assert not out.exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["stats", "evaluate"])
def test_labels_replaced_while_their_statistics_are_computed_give_no_table(tmp_path, shade_labels, command):
    """A review's: another run's ``--overwrite`` published the labels while ``stats`` read them block by block, and
    the table, written with exit 0, was of both versions (5 of 41). A result read across a replace is refused."""
    import re
    import shutil

    from tilemask.errors import ReadError
    from tilemask.stats.api import prepare_evaluation, prepare_stats

    mask, out = tmp_path / "mask.tif", tmp_path / ("t.csv" if command == "stats" else "e.json")
    shutil.copy(shade_labels, mask)
    run = prepare_stats(mask, out) if command == "stats" else prepare_evaluation(mask, shade_labels, out)
    with rasterio.open(mask) as ds:
        profile, labels = ds.profile, ds.read(1)
    with rasterio.open(tmp_path / "new.tif", "w", **profile) as dst:
        dst.write(labels[::-1], 1)
    os.replace(tmp_path / "new.tif", mask)  # another run publishes its labels
    with pytest.raises(ReadError, match=rf"^{re.escape(str(mask))} changed while it was read \(replaced by another "
                                        r"run\?\); nothing written, run again$"):  # fmt: skip
        run()
    assert not out.exists()


def test_verbose_stats_says_its_stages_not_a_librarys_chatter(shade_labels, tmp_path):
    """``tilemask -v stats`` began with ``INFO numexpr.utils: NumExpr defaulting to 2 threads.`` (pandas imports
    numexpr), a line about a library's own threads that no user acts on, also before a refusal's one line."""
    from ..conftest import run_cli

    done = run_cli("-v", "stats", shade_labels, "-o", tmp_path / "t.txt", cwd=tmp_path)
    assert (done.returncode, done.stderr) == (
        2, f"tilemask: error: {tmp_path / 't.txt'}: unknown table format, use one of .parquet, .gpkg, .csv, .json\n")
