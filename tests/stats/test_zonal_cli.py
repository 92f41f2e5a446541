"""``tilemask stats --coverage fraction`` as a user runs it: the installed command, a real embedded cluster.

These runs caught a deadlock between exactextract's C++ static-initialisation
guard and the GIL (see :mod:`tilemask.stats.zonal`): two threads of a worker
reaching a region with no cell (off the raster, or a point) at once hung.
Before the fix, 5 of 5 runs of the polygon test below hung, and 2 of 3 runs with
point regions.  Each run is a subprocess in its own session, its whole process
group (the Dask workers too) killed when it overruns, so a hang fails the test
instead of stalling the suite and leaving a stuck worker behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from exactextract import exact_extract
from shapely import affinity

from ..conftest import _free_port
from .test_zonal import class_values, random_regions

RUN_TIMEOUT = 120
"""Seconds one ``tilemask stats`` run may take (about 6 s on 2 idle cores, 12-18 s on 2 shared ones)."""


def run_stats(*args, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    """``tilemask stats ARGS`` in a new session, whose whole process group is killed afterwards (at once on overrun).

    Like ``run_cli`` in tests/conftest.py, but a hung run must not leave its Dask
    worker behind: the worker that deadlocked held the GIL for good and outlived
    its killed client by hours.
    """
    command = [str(Path(sys.executable).parent / "tilemask"), "stats", *map(str, args)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"hung: `{' '.join(command[1:])}` did not exit within {timeout} s\nstderr: {err[-2000:]}")
    finally:
        _kill_group(proc)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the session's group: tilemask and the cluster it started
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait()


def offset_regions(raster, n: int, seed: int) -> gpd.GeoDataFrame:
    """``random_regions`` with every other region, from the first, moved off the raster; in EPSG:4326.

    A region off the raster gets no cell from exactextract, the path through
    ``Operation::empty_stats()`` that deadlocked.  Regions are batched in the Z order of their centres' pixels, and
    those moved north-west of the raster's corner come first (their pixel clamped to the corner's, in file order):
    with batches of 6 (24 regions and one worker) the first two batches, which the worker's two threads start at
    once, hold only regions off the raster, so both threads reach that path at once: before the fix, 5 of 5 runs
    hung.  (Moved east, they came last in Z order, and the first two batches reached no such region before
    their tenth.)
    """
    frame = random_regions(raster, n, seed=seed)
    with rasterio.open(raster) as ds:
        width, height = ds.bounds.right - ds.bounds.left, ds.bounds.top - ds.bounds.bottom
    moved = [affinity.translate(g, xoff=-3 * width, yoff=3 * height) if i % 2 == 0 else g
             for i, g in enumerate(frame.geometry)]  # fmt: skip
    return frame.set_geometry(moved).to_crs("EPSG:4326")


def test_the_first_batches_of_the_deadlock_runs_start_off_the_raster(shade_labels):
    """What :func:`test_cli_fraction_polygons_never_hangs` proves rests on the batches tilemask makes of its regions:
    the two its worker's threads start at once must each begin with a region off the raster."""
    from tilemask.sources.labels import open_labels
    from tilemask.stats import zonal
    from tilemask.stats.totals import grid_of

    regions = offset_regions(shade_labels, 23, seed=11)
    grid = grid_of(open_labels(str(shade_labels)))
    projected = zonal._to_raster_crs(regions, grid, shade_labels, np.arange(len(regions)))
    off = zonal._off_raster(projected.geometry, grid)
    size = 6  # one worker: ceil(24 / (4 * 1)), as zonal._batch_size gives it
    batches = [zonal._by_place(projected.geometry, grid)[i : i + size] for i in range(0, len(regions), size)]
    assert len(batches) == 4
    assert all(off[i] for batch in batches[:2] for i in batch)


def exactextract_pixels(raster, regions: gpd.GeoDataFrame) -> list[dict[int, float]]:
    """exactextract's ``count * frac`` per class and region, on the whole raster (the reference)."""
    with rasterio.open(raster) as ds:
        projected = regions.to_crs(ds.crs)
    reference = exact_extract(str(raster), projected, ["count", "frac", "unique"], output="pandas")
    return [
        {int(u): count * f for u, f in zip(unique, frac)}
        for count, frac, unique in reference[["count", "frac", "unique"]].itertuples(index=False)
    ]


def assert_pixels_equal(table: pd.DataFrame, reference: list[dict[int, float]]) -> None:
    values = class_values(table)
    assert len(table) == len(reference)
    for row, weighted in zip(table.to_dict(orient="records"), reference):
        assert set(weighted) <= set(values)
        for value in values:
            assert row[f"class_{value}_pixels"] == pytest.approx(weighted.get(value, 0.0), rel=1e-9, abs=1e-9)


@pytest.fixture
def polygon_regions(tmp_path, shade_labels):
    regions = offset_regions(shade_labels, 23, seed=11)
    path = tmp_path / "regions.gpkg"
    regions.to_file(path)
    return path, regions


@pytest.mark.timeout(RUN_TIMEOUT + 60)
@pytest.mark.slow  # five CLI runs (11 s each); the default run checks the fraction rule in test_zonal.py
@pytest.mark.parametrize("run", range(5))
def test_cli_fraction_polygons_never_hangs(tmp_path, shade_labels, polygon_regions, run):
    path, regions = polygon_regions
    out = tmp_path / "zonal.csv"
    result = run_stats(shade_labels, "-o", out, "--regions", path, "--region-id", "name", "--coverage", "fraction")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out}"
    table = pd.read_csv(out)
    assert list(table["name"]) == list(regions["name"])
    reference = exactextract_pixels(shade_labels, regions)
    assert sum(sum(r.values()) for r in reference) > 0
    assert sum(not r for r in reference) >= 10  # the regions off the raster: 0 pixels
    assert_pixels_equal(table, reference)


@pytest.mark.slow  # the same path through exactextract as the polygons' runs above
@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_cli_fraction_points_zero_pixels(tmp_path, shade_labels):
    with rasterio.open(shade_labels) as ds:
        left, bottom, right, top = ds.bounds
        crs = ds.crs
    rng = np.random.default_rng(12)
    points = [shapely.Point(x, y) for x, y in zip(rng.uniform(left, right, 30), rng.uniform(bottom, top, 30))]
    points.append(shapely.MultiPoint([(left + 10, top - 10), (right + 1000, top)]))
    regions = gpd.GeoDataFrame({"name": [f"p{i}" for i in range(len(points))]}, geometry=points, crs=crs)
    path = tmp_path / "points.gpkg"
    regions.to_file(path)
    out = tmp_path / "points.csv"
    result = run_stats(shade_labels, "-o", out, "--regions", path, "--region-id", "name", "--coverage", "fraction")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out}"
    assert "31 of 31 regions are points" in result.stderr and "0 pixels" in result.stderr
    table = pd.read_csv(out)
    assert list(table["name"]) == list(regions["name"])
    # exactextract's own answer: a point covers no cell (it raises on the multipoint, which spans cells)
    reference = exactextract_pixels(shade_labels, regions.iloc[:-1])
    assert all(not r for r in reference)
    assert_pixels_equal(table, reference + [{}])


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_cli_fraction_lines_refused(tmp_path, shade_labels):
    with rasterio.open(shade_labels) as ds:
        left, bottom, right, top = ds.bounds
        crs = ds.crs
    lines = [shapely.LineString([(left, bottom), (right, top)]), shapely.LineString([(left, top), (right, bottom)])]
    regions = gpd.GeoDataFrame({"name": ["a", "b"]}, geometry=lines, crs=crs)
    path = tmp_path / "lines.gpkg"
    regions.to_file(path)
    out = tmp_path / "lines.csv"
    nobody = f"tcp://127.0.0.1:{_free_port()}"  # refused before any cluster: no scheduler listens there
    result = run_stats(shade_labels, "-o", out, "--regions", path, "--region-id", "name", "--coverage", "fraction",
                       "--scheduler", nobody)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    # one error line (other stderr lines, e.g. Dask's shutdown chatter on a busy machine, are not ours)
    errors = [line for line in result.stderr.splitlines() if line.startswith("tilemask: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    message = errors[0]
    assert message.startswith("tilemask: error: --coverage fraction measures the area of polygons")
    assert "2 of 2 regions are LineString (first: 'a')" in message and "--coverage center" in message
    assert not out.exists()


@pytest.mark.slow  # 14 s in a loaded default run (2026-12-07)
@pytest.mark.timeout(2 * RUN_TIMEOUT + 60)
@pytest.mark.parametrize("coverage", ["center", "fraction"])
def test_a_region_with_a_vertex_that_is_not_a_number_is_refused_before_any_cluster(tmp_path, shade_labels, coverage):
    """exactextract failed on it mid-run ("RuntimeError: Failed to parse geometry", exit 1, naming no file); the
    center rule counted it 0 pixels, silently (an exploratory review)."""
    with rasterio.open(shade_labels) as ds:
        left, bottom, right, top = ds.bounds
        crs = ds.crs
    good = shapely.box(left, bottom, (left + right) / 2, (bottom + top) / 2)
    broken = shapely.Polygon([(left, top), (right, top), (right, np.nan), (left, bottom)])
    path = tmp_path / "regions.gpkg"
    gpd.GeoDataFrame({"name": ["good", "broken"]}, geometry=[good, broken], crs=crs).to_file(path)
    out = tmp_path / "t.csv"
    nobody = f"tcp://127.0.0.1:{_free_port()}"  # refused before any cluster: no scheduler listens there
    result = run_stats(shade_labels, "-o", out, "--regions", path, "--region-id", "name", "--coverage", coverage,
                       "--scheduler", nobody)  # fmt: skip
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("tilemask: error:")]
    assert errors == [f"tilemask: error: {path}: 1 region(s) have a vertex that is not a number (NaN or infinite; "
                      "first: 'broken'): fix or drop them"], result.stderr  # fmt: skip
    assert not out.exists()
