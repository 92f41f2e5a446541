"""Jobs: the folder, the manifest and report after skips and resumes, and the inputs a job can list."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr
from PIL import Image

import tilemask
from tilemask import Workflow
from tilemask.cli import describe
from tilemask.errors import InputError, OutputConflict, ReadError, WorkflowError
from tilemask.jobs import JobError, JobFolder, find

from .conftest import GEO, UNET_2D, UNET_3D, raster_workflow, run_cli, volume_workflow
from .range_server import serve


@pytest.fixture
def scenes(tmp_path):
    """Four good scenes and the real corrupt.tif (third), all with corrupt.tif's band count."""
    folder = tmp_path / "scenes"
    folder.mkdir()
    with rasterio.open(GEO["shade.tif"]) as src:
        profile, data = src.profile, src.read(1)[:300, :300]
    with rasterio.open(GEO["corrupt.tif"]) as ds:
        count = ds.count
    profile.update(count=count, nodata=None, width=300, height=300, blockxsize=256, blockysize=256, tiled=True)
    for i, name in enumerate(["a", "b", "d", "e"]):
        with rasterio.open(folder / f"{name}.tif", "w", **profile) as dst:
            dst.write(np.stack([np.roll(data, 37 * i, axis=1)] * count))
    shutil.copy(GEO["corrupt.tif"], folder / "c.tif")
    return folder, count


@pytest.fixture
def scene_workflow(scenes, make_model, tmp_path):
    folder, count = scenes
    args = dict(UNET_2D, in_channels=count)
    weights, _ = make_model(args)
    return raster_workflow(f"{folder}/*.tif", weights, args=args, output={"path": "out/{stem}.zarr", "chunks": 256})


def manifest_lines(job: JobFolder) -> list[dict]:
    return [json.loads(line) for line in (job.path / "manifest.jsonl").read_text().splitlines()]


def report_rows(job: JobFolder) -> list[dict]:
    with open(job.report_path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_skip_records_the_failure_goes_on_and_a_rerun_resumes_without_predicting_again(scene_workflow, tmp_path, client,
                                                                                       caplog):  # fmt: skip
    workflow = Workflow.from_dict(scene_workflow, base_dir=tmp_path)
    results = tilemask.run(workflow, client, on_error="skip")
    job = results.job
    assert job.path.parent == tmp_path / "out" / ".tilemask" / "jobs"  # docs/DESIGN.md section 9's default folder
    assert [r.status for r in results] == ["ok", "ok", "failed", "ok", "ok"]
    assert "c.tif" in results[2].error and "damaged" in results[2].error
    assert f"{results[2].input}: failed, skipped: {results[2].error}" in caplog.messages  # none but the log tells
    assert results.failures() == f"1 of 5 items failed; report: {job.report_path}"

    lines = manifest_lines(job)
    finished = sorted((line["item"], line["status"]) for line in lines if line["status"] != "started")
    assert finished == [(0, "ok"), (1, "ok"), (2, "failed"), (3, "ok"), (4, "ok")]
    assert {line["item"] for line in lines if line["status"] == "started"} == {0, 1, 2, 3, 4}
    ok = [line for line in lines if line["status"] == "ok"]
    assert all(line["windows"] > 0 and line["outputs"][0] == str(tmp_path / "out" / (Path(line["input"]).stem + ".zarr")) for line in ok)
    rows = report_rows(job)
    assert [(row["name"], row["status"]) for row in rows] == [("a", "ok"), ("b", "ok"), ("c", "failed"), ("d", "ok"), ("e", "ok")]
    assert "damaged" in rows[2]["error"]
    assert rows[2]["windows"] == "" and all(int(row["windows"]) > 0 for row in rows if row["status"] == "ok")  # not 0
    assert results[2].windows is None
    status = json.loads((job.path / "status.json").read_text())
    assert status["state"] == "failed" and status["counts"] == {"items": 5, "ok": 4, "failed": 1, "pending": 0}
    assert (tmp_path / "out" / "c.zarr").exists() is False

    # the same workflow again: the job resumes; done items are not redone, the failed one stays failed
    labels_before = zarr.open_group(tmp_path / "out" / "a.zarr", mode="r")["labels"][:]
    again = tilemask.run(Workflow.from_dict(scene_workflow, base_dir=tmp_path), client, on_error="skip")
    assert again.job.path == job.path
    assert [r.status for r in again] == ["skipped", "skipped", "failed", "skipped", "skipped"]
    assert sum(r.windows for r in again) == 0
    from tilemask.cli import describe

    assert describe(results[2]).startswith(f"{results[2].input}: failed: ")
    assert describe(again[2]).startswith(f"{again[2].input}: failed in an earlier run (--retry-failed tries it again): ")
    assert len(manifest_lines(job)) == len(lines), "nothing was attempted"
    assert [row["status"] for row in report_rows(job)] == ["skipped", "skipped", "failed", "skipped", "skipped"]

    # a deleted output is redone; --retry-failed tries the failed one again (the file is fixed meanwhile)
    shutil.rmtree(tmp_path / "out" / "b.zarr")
    shutil.copy(tmp_path / "scenes" / "a.tif", tmp_path / "scenes" / "c.tif")
    third = tilemask.run(Workflow.from_dict(scene_workflow, base_dir=tmp_path), client, on_error="skip", retry_failed=True)
    assert [r.status for r in third] == ["skipped", "ok", "ok", "skipped", "skipped"]
    assert third[1].windows > 0 and third[2].windows > 0
    assert third.failures() is None
    assert json.loads((job.path / "status.json").read_text())["state"] == "done"
    np.testing.assert_array_equal(zarr.open_group(tmp_path / "out" / "c.zarr", mode="r")["labels"][:], labels_before)

    # a new file the glob now matches first: the items move, the record follows them by name
    shutil.copy(tmp_path / "scenes" / "a.tif", tmp_path / "scenes" / "0.tif")
    fourth = tilemask.run(Workflow.from_dict(scene_workflow, base_dir=tmp_path), client, on_error="skip")
    assert [(Path(r.input).stem, r.status) for r in fourth] == [
        ("0", "ok"), ("a", "skipped"), ("b", "skipped"), ("c", "skipped"), ("d", "skipped"), ("e", "skipped")
    ]


@pytest.mark.slow  # 41 s in a loaded default run (2026-12-07)
def test_an_input_replaced_after_its_run_is_redone(make_raster, make_model, tmp_path, client):
    """A finished item whose input file changed since (its size or modification time) is redone by the job's next
    run; it was skipped as done, its labels those of the file it replaced."""
    path, _ = make_raster((3, 80, 90))
    weights, _ = make_model()
    workflow = raster_workflow(path, weights, output={"path": "out/{stem}.zarr", "chunks": 64})
    (first,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    before = zarr.open_group(first.outputs[0], mode="r")["labels"][:]
    make_raster((3, 80, 90), seed=5)  # another scene under the same name
    (redone,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    assert redone.status == "ok" and redone.windows > 0
    after = zarr.open_group(redone.outputs[0], mode="r")["labels"][:]
    assert (after != before).any(), "the new scene's labels"
    (last,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    assert last.status == "skipped"  # unchanged since: done


def test_an_input_a_list_names_anew_under_the_same_name_is_redone(make_raster, make_model, tmp_path, client):
    """The same workflow whose list file (or STAC Item) now names another file under the same name is the same job:
    its rerun checked the files the earlier run had read, found them unchanged and skipped the item as done ("a.tif:
    done in an earlier run"), its labels those of the file the list no longer names."""
    for folder, seed in (("a", 0), ("b", 5)):
        (tmp_path / folder).mkdir()
        make_raster((3, 80, 90), name=f"{folder}/scene.tif", seed=seed)
    weights, _ = make_model()
    (tmp_path / "scenes.txt").write_text("a/scene.tif\n")
    workflow = raster_workflow(tmp_path / "x.tif", weights, output={"path": "out/{stem}.zarr", "chunks": 64})
    workflow["input"] = {"list": "scenes.txt"}
    (first,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    before = zarr.open_group(first.outputs[0], mode="r")["labels"][:]
    (tmp_path / "scenes.txt").write_text("b/scene.tif\n")  # another scene, the same name
    (redone,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    assert (redone.status, redone.input) == ("ok", str(tmp_path / "b" / "scene.tif")) and redone.windows > 0
    after = zarr.open_group(redone.outputs[0], mode="r")["labels"][:]
    assert (after != before).any(), "the new scene's labels"
    (last,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    assert (last.status, last.input) == ("skipped", str(tmp_path / "b" / "scene.tif"))  # unchanged since: done


def test_weights_retrained_at_the_same_path_redo_every_finished_item(make_raster, make_model, tmp_path, client):
    """The same workflow after the weights file was saved over (a retrained network, same path) is the same job:
    its rerun skipped every item as done, their labels the old network's."""
    path, _ = make_raster((3, 80, 90))
    weights, _ = make_model()
    workflow = raster_workflow(path, weights, output={"path": "out/{stem}.zarr", "chunks": 64})
    (first,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    before = zarr.open_group(first.outputs[0], mode="r")["probabilities"][:]
    make_model(seed=7)  # retrained: other weights in the same file
    (redone,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    assert redone.status == "ok" and redone.windows > 0
    after = zarr.open_group(redone.outputs[0], mode="r")["probabilities"][:]
    assert not np.allclose(after, before), "the retrained network's probabilities"
    (last,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    assert last.status == "skipped"  # unchanged since: done


def test_edited_statistics_regions_redo_the_item(make_raster, make_model, tmp_path, client):
    """A ``stats.regions`` file edited since a run (a district removed) redid nothing: the rerun said "done in an
    earlier run" and the table still named the district.  Its stamp is recorded and compared, as the weights' is."""
    import geopandas as gpd
    import pandas as pd
    import shapely

    path, _ = make_raster((3, 80, 90))
    weights, _ = make_model()
    with rasterio.open(path) as ds:
        whole, crs = shapely.box(*ds.bounds), ds.crs
    districts = gpd.GeoDataFrame({"name": ["whole", "half"]}, geometry=[whole, whole.buffer(-500)], crs=crs)
    districts.to_file(tmp_path / "districts.gpkg")
    workflow = raster_workflow(path, weights, output={"path": "out/{stem}.zarr", "chunks": 64},
                               stats={"output": "out/{stem}_stats.csv", "regions": "districts.gpkg",
                                      "region_id": "name"})  # fmt: skip
    (first,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    assert list(pd.read_csv(tmp_path / "out" / "scene_stats.csv")["name"]) == ["whole", "half"]
    districts.iloc[1:].to_file(tmp_path / "districts.gpkg")
    (redone,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    assert redone.status == "ok"
    assert list(pd.read_csv(tmp_path / "out" / "scene_stats.csv")["name"]) == ["half"]
    (last,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    assert last.status == "skipped"  # unchanged since: done
    # a shapefile whose district is renamed: its .dbf rewritten alone (a review's)
    districts.to_file(tmp_path / "districts.shp")
    shapefile = {**workflow, "stats": {**workflow["stats"], "regions": "districts.shp"}}
    tilemask.run(Workflow.from_dict(shapefile, base_dir=tmp_path), client, overwrite=True)
    shp = (tmp_path / "districts.shp").read_bytes()
    dbf = (tmp_path / "districts.dbf").read_bytes()
    (tmp_path / "districts.dbf").write_bytes(dbf.replace(b"whole", b"WHOLE"))
    assert (tmp_path / "districts.shp").read_bytes() == shp
    (renamed,) = tilemask.run(Workflow.from_dict(shapefile, base_dir=tmp_path), client)
    assert renamed.status == "ok"
    assert list(pd.read_csv(tmp_path / "out" / "scene_stats.csv")["name"]) == ["WHOLE", "half"]


@pytest.mark.slow
def test_statistics_regions_inside_a_zip_are_read_and_stamped(make_raster, make_model, tmp_path, client):
    """``stats.regions`` named inside a zip as GDAL names them failed: relative (``/vsizip/districts.zip/...``) with
    "no such archive tmp/.../districts.zip" (the ``//`` of the absolute archive lost), a shapefile for want of its
    ``.shx``, extracted alone. Its table is the unzipped regions'; the zip rewritten with a district renamed in the
    ``.dbf`` alone redoes the item, unchanged it does not."""
    import geopandas as gpd
    import shapely

    path, _ = make_raster((3, 80, 90))
    weights, _ = make_model()
    with rasterio.open(path) as ds:
        whole, crs = shapely.box(*ds.bounds), ds.crs
    districts = gpd.GeoDataFrame({"name": ["whole", "half"]}, geometry=[whole, whole.buffer(-500)], crs=crs)
    unzipped = tmp_path / "unzipped"
    unzipped.mkdir()
    districts.to_file(unzipped / "districts.shp")
    districts.to_file(unzipped / "districts.gpkg")

    def pack():
        with zipfile.ZipFile(tmp_path / "districts.zip", "w") as zf:
            for file in sorted(unzipped.iterdir()):
                zf.write(file, file.name)

    pack()

    def run(regions, table, **options):
        workflow = raster_workflow(path, weights, output={"path": "out/{stem}.zarr", "chunks": 64},
                                   stats={"output": table, "regions": regions, "region_id": "name"})  # fmt: skip
        (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client, **options)
        return result

    for suffix, zipped in [("shp", "/vsizip/districts.zip/districts.shp"),
                           ("gpkg", f"/vsizip/{tmp_path}/districts.zip/districts.gpkg")]:  # fmt: skip
        run(f"unzipped/districts.{suffix}", f"out/plain_{suffix}.csv", overwrite=True)
        assert run(zipped, f"out/zipped_{suffix}.csv", overwrite=True).status == "ok"
        plain = (tmp_path / "out" / f"plain_{suffix}.csv").read_text()
        assert (tmp_path / "out" / f"zipped_{suffix}.csv").read_text() == plain
        assert "whole" in plain
    assert run("/vsizip/districts.zip/districts.shp", "out/zipped_shp.csv", overwrite=True).status == "ok"
    assert run("/vsizip/districts.zip/districts.shp", "out/zipped_shp.csv").status == "skipped"  # unchanged
    dbf = (unzipped / "districts.dbf").read_bytes()
    (unzipped / "districts.dbf").write_bytes(dbf.replace(b"whole", b"WHOLE"))
    pack()  # the .shp as it was: a district renamed in the .dbf alone
    assert run("/vsizip/districts.zip/districts.shp", "out/zipped_shp.csv").status == "ok"
    assert "WHOLE" in (tmp_path / "out" / "zipped_shp.csv").read_text()
    assert run("/vsizip/districts.zip/districts.shp", "out/zipped_shp.csv").status == "skipped"


@pytest.mark.slow
def test_statistics_regions_inside_a_zip_on_a_web_server_are_read_and_stamped(make_raster, make_model, tmp_path,
                                                                              client):  # fmt: skip
    """``stats.regions`` in a zip on a web server (``/vsizip//vsicurl/http://...``) failed with "no such archive
    /vsicurl/http://..."; the archive is copied once, and its version stamps them: a district renamed in the
    ``.dbf`` alone redoes the item."""
    import geopandas as gpd
    import shapely

    path, _ = make_raster((3, 80, 90))
    weights, _ = make_model()
    with rasterio.open(path) as ds:
        whole, crs = shapely.box(*ds.bounds), ds.crs
    shared = tmp_path / "shared"
    shared.mkdir()
    districts = gpd.GeoDataFrame({"name": ["whole", "half"]}, geometry=[whole, whole.buffer(-500)], crs=crs)
    districts.to_file(shared / "districts.shp")

    def pack(mtime: int) -> None:
        with zipfile.ZipFile(shared / "districts.zip", "w") as zf:
            for ext in ("shp", "shx", "dbf", "prj", "cpg"):
                zf.write(shared / f"districts.{ext}", f"districts.{ext}")
        os.utime(shared / "districts.zip", (mtime, mtime))  # Last-Modified is in seconds

    pack(1_700_000_000)
    server = serve(str(shared))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    regions = f"/vsizip//vsicurl/http://127.0.0.1:{server.server_address[1]}/districts.zip/districts.shp"
    workflow = raster_workflow(path, weights, output={"path": "out/{stem}.zarr", "chunks": 64},
                               stats={"output": "out/{stem}_stats.csv", "regions": regions, "region_id": "name"})

    def run() -> str:
        (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
        return result.status

    try:
        assert run() == "ok"
        table = (tmp_path / "out" / "scene_stats.csv").read_text()
        assert "whole" in table and "half" in table
        assert run() == "skipped"
        dbf = (shared / "districts.dbf").read_bytes()
        (shared / "districts.dbf").write_bytes(dbf.replace(b"whole", b"WHOLE"))
        pack(1_700_000_060)
        assert run() == "ok"
        assert "WHOLE" in (tmp_path / "out" / "scene_stats.csv").read_text()
        assert run() == "skipped"
    finally:
        server.shutdown()


def test_a_finished_item_whose_product_someone_replaced_is_not_skipped_as_done(make_raster, make_model, tmp_path,
                                                                               client):  # fmt: skip
    """A job's rerun skipped a finished item when each of its outputs existed: polygons replaced since by a file
    tilemask did not write (someone's own GeoPackage saved over them) passed for the item's. The item is no longer
    done: the job's rerun redoes it, refuses to replace that file (naming it) and leaves it as it was."""
    import geopandas as gpd
    from shapely.geometry import box

    path, _ = make_raster((3, 80, 90))
    weights, _ = make_model()
    workflow = raster_workflow(path, weights, output={"path": "out/{stem}.zarr", "chunks": 64,
                                                     "vectors": "out/{stem}.gpkg"})  # fmt: skip
    (first,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    (polygons,) = [p for p in first.outputs if p.endswith(".gpkg")]
    Path(polygons).unlink()
    gpd.GeoDataFrame({"name": ["north"]}, geometry=[box(0, 0, 1, 1)], crs=32618).to_file(polygons)
    before = Path(polygons).read_bytes()
    with pytest.raises(OutputConflict, match=f"^output {polygons} exists and was not written by tilemask"):
        tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    assert Path(polygons).read_bytes() == before


def test_an_input_replaced_on_a_web_server_is_redone(make_raster, make_model, tmp_path, client):
    """A scene served over HTTP and replaced there (a new Last-Modified, the same size) is redone by the job's next
    run, as a local file is; it was skipped as done, its stamp zeros whatever the server held."""
    (tmp_path / "www").mkdir()
    make_raster((3, 80, 90), name="www/scene.tif")
    weights, _ = make_model()
    server = serve(str(tmp_path / "www"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/scene.tif"
        workflow = raster_workflow(url, weights, output={"path": "out/{stem}.zarr", "chunks": 64})
        (first,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
        before = zarr.open_group(first.outputs[0], mode="r")["labels"][:]
        (same,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
        assert same.status == "skipped"  # unchanged on the server: done
        path, _ = make_raster((3, 80, 90), name="www/scene.tif", seed=5)  # another scene under the same URL
        os.utime(path, (path.stat().st_atime + 10, path.stat().st_mtime + 10))  # Last-Modified is to the second
        (redone,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    finally:
        server.shutdown()
    assert redone.status == "ok" and redone.windows > 0
    assert (zarr.open_group(redone.outputs[0], mode="r")["labels"][:] != before).any(), "the new scene's labels"


def test_an_input_whose_server_names_no_version_is_redone_with_a_warning_saying_why(make_raster, make_model, tmp_path,
                                                                                    client, caplog):  # fmt: skip
    """A scene on a server that names no version (neither ETag nor Last-Modified) cannot be told from a replaced one,
    so every run redoes it: it was redone without a word, the user left to wonder why a finished job did all its
    work again (a review of object storage inputs). The run says so once, naming the item and its URL."""
    import functools
    import http.server

    from .range_server import RangeHandler

    class Unversioned(RangeHandler):
        def send_header(self, keyword, value):
            if keyword != "Last-Modified":
                super().send_header(keyword, value)

    (tmp_path / "www").mkdir()
    make_raster((3, 80, 90), name="www/scene.tif")
    weights, _ = make_model()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Unversioned, directory=tmp_path / "www"))  # fmt: skip
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/scene.tif"
        workflow = raster_workflow(url, weights, output={"path": "out/{stem}.zarr", "chunks": 64})
        (first,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
        assert first.status == "ok"
        assert "names no version" not in caplog.text  # nothing done before to redo
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tilemask"):
            (again,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    finally:
        server.shutdown()
    assert again.status == "ok" and again.windows > 0  # redone, as it must be
    lines = [r.getMessage() for r in caplog.records if "names no version" in r.getMessage()]
    assert lines == [f"scene: done before, redone: {url} names no version (no ETag or Last-Modified from its server, "
                     "or no answer), so it cannot be told from a replaced file; every run redoes it"], caplog.text


@pytest.mark.slow  # 11 s in a loaded default run (2026-12-07)
def test_a_stac_item_whose_hrefs_are_signed_anew_is_not_redone(make_raster, make_model, tmp_path, client):
    """A STAC Item's asset hrefs signed again (a new SAS token: the same path, another query) made its job's next run
    redo the item as another file; and the earlier run's URL, its signature expired, was asked for the stamp."""
    import functools
    import http.server
    from urllib.parse import parse_qs, urlsplit

    from .range_server import RangeHandler

    class Signed(RangeHandler):
        signature = "first"

        def send_head(self):  # as object storage: only the current signature is let in
            if parse_qs(urlsplit(self.path).query).get("sig") != [Signed.signature]:
                self.send_error(403, "Signature not valid in the specified time frame")
                return None
            return super().send_head()

    (tmp_path / "www" / "copy").mkdir(parents=True)
    scene, _ = make_raster((3, 80, 90), name="www/scene.tif")
    shutil.copy2(scene, tmp_path / "www" / "copy" / "scene.tif")  # another file of the same size and time
    weights, _ = make_model()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Signed, directory=scene.parent))
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def stac(signature: str, path: str = "scene.tif") -> None:
        href = f"http://127.0.0.1:{server.server_address[1]}/{path}?se=2026-12-0{len(signature)}&sp=r&sig={signature}"
        (tmp_path / "items.json").write_text(json.dumps({
            "type": "Feature", "stac_version": "1.0.0", "id": "scene", "geometry": None,
            "properties": {"datetime": "2000-01-01T00:00:00Z"}, "links": [], "assets": {"rgb": {"href": href}},
        }))  # fmt: skip
        Signed.signature = signature

    workflow = raster_workflow(tmp_path / "x.tif", weights, output={"path": "out/{stem}.zarr", "chunks": 64})
    workflow["input"] = {"stac": "items.json", "assets": ["rgb"]}
    runs = []
    try:
        for signature, path in (("first", "scene.tif"), ("second", "scene.tif"), ("third", "copy/scene.tif")):
            stac(signature, path)
            (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
            runs.append(result.status)
        stac("fourth", "copy/scene.tif")  # the command's lines name the input without its signature, a credential
        (tmp_path / "w.yaml").write_text(json.dumps(workflow))
        shown = run_cli("run", tmp_path / "w.yaml", "--scheduler", client.scheduler.address, cwd=tmp_path)
    finally:
        server.shutdown()
    assert runs == ["ok", "skipped", "ok"]  # signed anew: done; another file of the same size and time: redone
    assert shown.returncode == 0 and "done in an earlier run" in shown.stdout, shown.stdout + shown.stderr
    assert "/copy/scene.tif?se=2026-12-06&sp=r:" not in shown.stdout and "sig=" not in shown.stdout + shown.stderr
    from tilemask.storage import unsigned  # what is a signature: the names AWS, Google and Azure give it

    signed = "https://b.s3.amazonaws.com/k.tif?versionId=3&X-Amz-Signature=ab&X-Amz-Date=2&x-amz-security-token=t"
    assert unsigned(signed) == "https://b.s3.amazonaws.com/k.tif?versionId=3"
    assert unsigned("/vsicurl/https://s.googleapis.com/b/k.tif?X-Goog-Signature=1&X-Goog-Expires=9") == (
        "/vsicurl/https://s.googleapis.com/b/k.tif")
    assert unsigned("https://a.blob.core.windows.net/c/k.tif?st=1&se=2&sp=r&sv=3&sr=b&sig=x%2F") == (
        "https://a.blob.core.windows.net/c/k.tif")
    assert unsigned("/data/what?sig=1.tif") == "/data/what?sig=1.tif"  # a local file's "?" is its name's


@pytest.mark.slow  # 31 s in a loaded default run (2026-12-07)
def test_credentials_in_urls_are_left_out_of_errors_logs_and_the_report(make_raster, make_model, tmp_path, client):
    """A reviewer's fault sweep: the success line left out a signature, but an error line printed it whole (and a
    URL's password), as did GDAL's warning above it and the report's error and input columns."""
    import base64
    import functools
    import http.server

    from .range_server import RangeHandler

    class Guarded(RangeHandler):
        def send_head(self):
            if self.path.startswith("/denied"):
                self.send_error(403, "Signature not valid")
                return None
            if self.path.startswith("/private") and self.headers.get("Authorization") != "Basic " + base64.b64encode(
                    b"user:right").decode():  # fmt: skip
                self.send_error(401, "Unauthorized")
                return None
            return super().send_head()

    (tmp_path / "www").mkdir()
    scene, _ = make_raster((3, 200, 230), name="www/scene.tif", tiled=True, blockxsize=64, blockysize=64)
    (scene.parent / "cut.tif").write_bytes(scene.read_bytes()[: scene.stat().st_size * 2 // 3])  # tiles cut off
    weights, _ = make_model()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Guarded, directory=scene.parent))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"127.0.0.1:{server.server_address[1]}"
    runs = {}
    try:
        for name, url in (("denied", f"http://{base}/denied/scene.tif?se=2026&sp=r&sig=SECRET1"),
                          ("password", f"http://user:SECRET2@{base}/private/scene.tif"),
                          ("cut", f"http://{base}/cut.tif?sp=r&sig=SECRET3"),
                          ("aborted", f"http://{base}/cut.tif?sp=r&sig=SECRET4")):  # fmt: skip
            workflow = raster_workflow(url, weights, output={"path": f"{tmp_path}/{name}/{{stem}}.zarr", "chunks": 64})
            (tmp_path / f"{name}.yaml").write_text(json.dumps(workflow))
            skip = ["--on-error", "skip"] if name == "cut" else []  # recorded, then the report
            runs[name] = run_cli("run", tmp_path / f"{name}.yaml", "--scheduler", client.scheduler.address, *skip,
                                 cwd=tmp_path)  # fmt: skip
        runs["debug"] = run_cli("run", tmp_path / "denied.yaml", "--scheduler", client.scheduler.address, "--debug",
                                cwd=tmp_path)  # fmt: skip (GDAL's warnings of the URL logged, as all logs are)
    finally:
        server.shutdown()
    printed = {name: run.stdout + run.stderr for name, run in runs.items()}
    assert all("SECRET" not in text for text in printed.values()), printed
    assert (runs["denied"].returncode, runs["denied"].stderr.splitlines()[-1]) == (
        2, f"tilemask: error: http://{base}/denied/scene.tif: cannot open raster: HTTP response code: 403")
    assert len(runs["denied"].stderr.splitlines()) == 1, runs["denied"].stderr  # not GDAL's 403 warnings before it
    assert "WARNING rasterio._env: CPLE_AppDefined in HTTP response code on " \
           f"http://{base}/denied/scene.tif: 403" in runs["debug"].stderr  # GDAL's own warning, as logged
    assert (runs["debug"].returncode, runs["debug"].stderr.splitlines()[-1]) == (runs["denied"].returncode,
        runs["denied"].stderr.splitlines()[-1]) and "Traceback (most recent call last)" in runs["debug"].stderr
    # (raised as it was, the traceback gave the SAS token in full, and exit 1)
    assert (runs["password"].returncode, runs["password"].stderr.splitlines()[-1]) == (
        2, f"tilemask: error: http://user:***@{base}/private/scene.tif: cannot open raster: HTTP response code: 401")
    assert runs["cut"].returncode == 1 and f"http://{base}/cut.tif: failed: " in runs["cut"].stdout, printed["cut"]
    (report,) = (tmp_path / "cut").glob(".tilemask/jobs/*/report.csv")
    row = next(csv.DictReader(report.open()))
    assert (row["status"], row["input"]) == ("failed", f"http://{base}/cut.tif"), row  # sp: an Azure SAS field
    assert row["error"].startswith(f"http://{base}/cut.tif: read failed at rows "), row
    manifest = (report.parent / "manifest.jsonl").read_text()
    assert "SECRET3" in manifest  # what the job reads its input by, to resume it (as its workflow.yaml holds it)
    assert all("SECRET3" not in json.loads(line).get("error", "") or "" for line in manifest.splitlines())
    # the state of the job stopped by the failure, as status and jobs print it (status.json's message held the
    # signature)
    assert runs["aborted"].returncode == 1, printed["aborted"]
    (aborted,) = (tmp_path / "aborted" / ".tilemask" / "jobs").iterdir()
    shown = [run_cli("status", aborted.name, *json_, cwd=tmp_path) for json_ in ((), ("--json",))]
    shown.append(run_cli("jobs", "--json", cwd=tmp_path))
    assert all(run.returncode == 0 for run in shown), shown
    assert f"http://{base}/cut.tif: read failed at rows " in shown[0].stdout, shown[0].stdout
    assert all("SECRET" not in run.stdout for run in shown), [run.stdout for run in shown]


@pytest.mark.timeout(180)
def test_a_signed_urls_credentials_are_left_out_of_the_stage_lines_and_their_logs(make_raster, make_model, tmp_path,
                                                                                 client):
    """A review: a presigned URL's run printed its access key and signature in its live line and, with -v, in the
    log of the stage that makes the COG whole (``a.tif?AWSAccessKeyId=...&Signature=...: making a_mask.tif whole``):
    the stage named the input by its URL's last segment, query and all, where no URL was left to redact."""
    (tmp_path / "www").mkdir()
    scene, _ = make_raster((3, 100, 120), name="www/scene.tif")
    weights, _ = make_model()
    server = serve(str(scene.parent))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/scene.tif?AWSAccessKeyId=KEYSECRET&Signature=SIGSECRET"
    workflow = raster_workflow(url, weights, output={"path": "out/{stem}_mask.tif", "chunks": 64})
    (tmp_path / "w.yaml").write_text(json.dumps(workflow))
    try:
        done = run_cli("-v", "run", tmp_path / "w.yaml", "--scheduler", client.scheduler.address, cwd=tmp_path)
    finally:
        server.shutdown()
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed
    assert "scene.tif: making scene_mask.tif whole" in printed, printed
    assert "SECRET" not in printed, printed


@pytest.mark.timeout(180)
def test_a_zarr_outputs_attributes_name_its_input_and_workflow_without_their_credentials(make_raster, make_model,
                                                                                       tmp_path, client):
    """A review: a Zarr output's ``tilemask`` attribute held its input's URL and the workflow as given, a presigned
    URL's access key and signature (or a URL's password) included, in the output that is shared and served
    (``tilemask serve`` hands out its ``zarr.json``): outputs are not kept as private as the job folder."""
    (tmp_path / "www").mkdir()
    scene, _ = make_raster((3, 100, 120), name="www/scene.tif")
    weights, _ = make_model()
    server = serve(str(scene.parent))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"127.0.0.1:{server.server_address[1]}"
    url = f"http://user:PWSECRET@{base}/scene.tif?AWSAccessKeyId=KEYSECRET&Signature=SIGSECRET&Expires=9"
    workflow = raster_workflow(url, weights, output={"path": "out/{stem}.zarr", "chunks": 64})
    try:
        (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    finally:
        server.shutdown()
    assert result.status == "ok", result.error
    attributes = (tmp_path / "out" / "scene.zarr" / "zarr.json").read_text()
    assert "SECRET" not in attributes, attributes
    meta = zarr.open_group(str(tmp_path / "out" / "scene.zarr"), mode="r").attrs["tilemask"]
    assert meta["input"] == meta["workflow"]["input"] == f"http://user:***@{base}/scene.tif", meta["input"]
    assert meta["workflow"]["model"]["weights"] == str(weights)  # a local path as it was


@pytest.mark.timeout(180)
def test_a_workflow_whose_urls_are_signed_anew_is_the_same_job(make_raster, make_model, tmp_path, client):
    """A review: a workflow whose input and weights are presigned URLs, signed anew for its next run (the first
    signatures expired), was another job: its outputs were refused as another workflow's ("exists; pass
    --overwrite"), and with --overwrite every input was done again.  A STAC Item or list file signed anew was already
    the same job; the workflow's own URLs now are too, as are those whose password changed."""
    (tmp_path / "www").mkdir()
    scene, _ = make_raster((3, 100, 120), name="www/scene.tif")
    weights, _ = make_model(name="www/weights.pt")
    server = serve(str(scene.parent))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://user:{{0}}@127.0.0.1:{server.server_address[1]}"
    runs = []
    try:
        for signature in ("first", "second"):
            signed = f"?X-Amz-Credential=KEY&X-Amz-Signature={signature}&X-Amz-Expires=60"
            workflow = raster_workflow(base.format(signature) + "/scene.tif" + signed,
                                       base.format(signature) + "/weights.pt" + signed,
                                       output={"path": "out/{stem}_mask.tif", "chunks": 64})  # fmt: skip
            (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
            runs.append(result.status)
    finally:
        server.shutdown()
    assert runs == ["ok", "skipped"], runs
    (job,) = (tmp_path / "out" / ".tilemask" / "jobs").iterdir()
    assert "X-Amz-Signature=second" in (job / "workflow.yaml").read_text()  # the URLs it reads by when it resumes


@pytest.mark.timeout(60)
def test_weights_at_a_url_signed_anew_are_not_fetched_again(tmp_path, monkeypatch):
    """A review: weights (or a NIfTI) at a presigned URL were copied to the scratch folder under the URL, signature
    and all: each run signed anew fetched the same object again into a folder of its own (a model of hundreds of
    MB a run, kept).  The copy is named by the URL without its credentials and the object's version."""
    from tilemask.storage import local_copy

    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "weights.pt").write_bytes(b"w" * 1000)
    monkeypatch.setenv("TILEMASK_SCRATCH", str(tmp_path / "scratch"))
    server = serve(str(tmp_path / "www"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/weights.pt"
        copies = [local_copy(f"{base}?X-Amz-Credential=KEY&X-Amz-Signature={s}") for s in ("first", "second")]
    finally:
        server.shutdown()
    assert copies[0] == copies[1], copies
    assert len(list((tmp_path / "scratch").rglob("weights.pt"))) == 1


def test_abort_stops_at_the_first_failure_and_reports_what_did_not_run(scene_workflow, tmp_path, client):
    import dask

    seen = []  # each result as it is known: a stopped batch's command prints those that finished
    with dask.config.set({"tilemask.items-in-flight": 1}), pytest.raises(ReadError, match="c.tif") as failed:
        tilemask.run(Workflow.from_dict(scene_workflow, base_dir=tmp_path), client, on_result=seen.append)
    assert failed.value.exit_status == 1
    assert [(Path(r.input).name, r.status) for r in seen] == [("a.tif", "ok"), ("b.tif", "ok")]
    (job,) = [JobFolder(p) for p in (tmp_path / "out" / ".tilemask" / "jobs").iterdir()]
    assert [row["status"] for row in report_rows(job)] == ["ok", "ok", "failed", "not run", "not run"]
    assert json.loads((job.path / "status.json").read_text())["state"] == "failed"


@pytest.mark.slow  # 16 s in a loaded default run (2026-12-07)
def test_the_command_prints_each_inputs_line_as_it_finishes(scene_workflow, write_workflow, tmp_path, client):
    """``tilemask run`` printed its inputs' lines only once the whole run had returned: a batch stopped by a
    failure (or Ctrl-C) listed none of the inputs it had finished. Now those done before come first, then each
    as it finishes; the failure that stopped it is the one error line."""
    workflow = write_workflow(scene_workflow)
    done = run_cli("run", workflow, "--quiet", "--scheduler", client.scheduler.address,
                   env={"DASK_TILEMASK__ITEMS_IN_FLIGHT": "1"})  # fmt: skip
    assert done.returncode == 1 and "c.tif" in done.stderr
    assert [line.split(":")[0].rsplit("/", 1)[-1] for line in done.stdout.splitlines()] == ["a.tif", "b.tif"]
    again = run_cli("run", workflow, "--quiet", "--scheduler", client.scheduler.address, "--on-error", "skip",
                    env={"DASK_TILEMASK__ITEMS_IN_FLIGHT": "1"})  # fmt: skip
    lines = again.stdout.splitlines()
    assert again.returncode == 1 and len(lines) == 5, again.stdout
    assert [line.split(":")[0].rsplit("/", 1)[-1] for line in lines[:2]] == ["a.tif", "b.tif"]  # done before
    assert all("done in an earlier run" in line for line in lines[:2]) and "c.tif: failed in an earlier run" in lines[2]


def test_on_result_sees_inputs_refused_as_planned_and_its_own_failure_stops_nothing(make_raster, make_model, tmp_path,
                                                                                    client, caplog):  # fmt: skip
    """An input that fails as it is planned (before the cluster's first item) under ``on_error="skip"`` never
    reached ``on_result``, so the command printed nothing for it; and a callback that raised (``click.echo`` into a
    closed pipe: ``tilemask run | head -1``) abandoned the batch, the rest "not run"."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "0bad.tif").write_bytes(b"not a TIFF")
    make_raster((3, 64, 64), name="in/a.tif")
    weights, _ = make_model()
    seen = []

    def on_result(result):
        seen.append((Path(result.input).name, result.status))
        raise BrokenPipeError(32, "Broken pipe")

    workflow = Workflow.from_dict(raster_workflow(str(tmp_path / "in" / "*.tif"), weights), base_dir=tmp_path)
    results = tilemask.run(workflow, client, on_error="skip", on_result=on_result)
    assert [r.status for r in results] == ["failed", "ok"]
    assert seen == [("0bad.tif", "failed"), ("a.tif", "ok")]
    assert "cannot pass on the result of" in caplog.text and "BrokenPipeError" in caplog.text


def test_the_jobs_log_line_counts_what_is_done_before_and_overwrite_redoes(scene_workflow, tmp_path, client, caplog):
    """Under ``overwrite`` nothing counts as done before: it said "1 item(s), 1 to do, 1 done before"."""
    scene_workflow["input"] = str(tmp_path / "scenes" / "a.tif")
    workflow = Workflow.from_dict(scene_workflow, base_dir=tmp_path)
    tilemask.run(workflow, client)
    caplog.set_level(logging.INFO, logger="tilemask.driver")
    tilemask.run(workflow, client)
    assert re.search(r"job \w+: 1 item\(s\), 0 to do, 1 done before", caplog.text)
    caplog.clear()
    (again,) = tilemask.run(workflow, client, overwrite=True)
    assert again.status == "ok" and again.windows > 0
    assert re.search(r"job \w+: 1 item\(s\), 1 to do, 0 done before", caplog.text)


def test_a_different_workflow_may_not_replace_a_jobs_outputs_without_overwrite(scene_workflow, tmp_path, client):
    scene_workflow["input"] = str(tmp_path / "scenes" / "a.tif")
    tilemask.run(Workflow.from_dict(scene_workflow, base_dir=tmp_path), client)
    changed = {**scene_workflow, "inference": {**scene_workflow["inference"], "overlap": 0.5}}
    first = zarr.open_group(tmp_path / "out" / "a.zarr", mode="r")["probabilities"][:]
    with pytest.raises(OutputConflict, match="exists; pass overwrite=True") as refused:
        tilemask.run(Workflow.from_dict(changed, base_dir=tmp_path), client)
    assert refused.value.exit_status == 2
    # the refusal is not the item's start: the next try, failed items retried, is refused as the first was
    with pytest.raises(OutputConflict, match="exists; pass overwrite=True"):
        tilemask.run(Workflow.from_dict(changed, base_dir=tmp_path), client, retry_failed=True)
    (skipped,) = tilemask.run(Workflow.from_dict(changed, base_dir=tmp_path), client, on_error="skip")
    assert skipped.status == "failed" and "exists; pass overwrite=True" in skipped.error
    (retried,) = tilemask.run(Workflow.from_dict(changed, base_dir=tmp_path), client, on_error="skip", retry_failed=True)
    assert retried.status == "failed" and "exists; pass overwrite=True" in retried.error
    np.testing.assert_array_equal(zarr.open_group(tmp_path / "out" / "a.zarr", mode="r")["probabilities"][:], first)
    (result,) = tilemask.run(Workflow.from_dict(changed, base_dir=tmp_path), client, overwrite=True)
    assert result.status == "ok" and result.windows > 0
    assert len(list((tmp_path / "out" / ".tilemask" / "jobs").iterdir())) == 2  # one job per workflow
    # the first workflow's job again: its outputs are the other's now, not "done in an earlier run" (they were
    # skipped as its own, an exploratory review)
    replaced = zarr.open_group(tmp_path / "out" / "a.zarr", mode="r")["probabilities"][:]
    with pytest.raises(OutputConflict, match="exists; pass overwrite=True"):
        tilemask.run(Workflow.from_dict(scene_workflow, base_dir=tmp_path), client)
    np.testing.assert_array_equal(zarr.open_group(tmp_path / "out" / "a.zarr", mode="r")["probabilities"][:], replaced)
    (again,) = tilemask.run(Workflow.from_dict(scene_workflow, base_dir=tmp_path), client, overwrite=True)
    assert again.status == "ok" and again.windows > 0
    np.testing.assert_array_equal(zarr.open_group(tmp_path / "out" / "a.zarr", mode="r")["probabilities"][:], first)


def test_labels_another_workflow_wrote_over_an_item_whose_redo_stopped_are_still_not_the_jobs(scene_workflow,
                                                                                                tmp_path, client):
    """An item redone and stopped (its ``started`` line last) lost the protection above: the labels another workflow
    wrote over its outputs were taken for the job's own and replaced without ``--overwrite`` (a review)."""
    scene_workflow["input"] = str(tmp_path / "scenes" / "a.tif")
    (done,) = tilemask.run(Workflow.from_dict(scene_workflow, base_dir=tmp_path), client)
    (job,) = [JobFolder(p) for p in (tmp_path / "out" / ".tilemask" / "jobs").iterdir()]
    redo = {"item": 0, "name": "a", "input": done.input, "status": "started", "time": 0.0}  # as a stopped redo
    with open(job.path / "manifest.jsonl", "a") as f:  # leaves it (run writes it so)
        f.write(json.dumps(redo) + "\n")
    changed = {**scene_workflow, "inference": {**scene_workflow["inference"], "overlap": 0.5}}
    tilemask.run(Workflow.from_dict(changed, base_dir=tmp_path), client, overwrite=True)
    theirs = zarr.open_group(tmp_path / "out" / "a.zarr", mode="r")["probabilities"][:]
    with pytest.raises(OutputConflict, match="exists; pass overwrite=True"):
        tilemask.run(Workflow.from_dict(scene_workflow, base_dir=tmp_path), client)
    np.testing.assert_array_equal(zarr.open_group(tmp_path / "out" / "a.zarr", mode="r")["probabilities"][:], theirs)


def test_a_first_run_whose_cluster_has_no_worker_keeps_its_job(scene_workflow, tmp_path):
    """A first run that reached its scheduler and found no worker (exit 1) is a job that ran: kept, ``failed``, for
    ``status`` and ``cancel`` (discarding it under a cancel that waited on it made the cancel write a record into a
    folder with no job, a review); one whose scheduler cannot be reached at all leaves none (test above)."""
    import dask
    from distributed import Client, LocalCluster

    from tilemask.errors import RunError

    scene_workflow["input"] = str(tmp_path / "scenes" / "a.tif")
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cluster, Client(cluster) as bare:
        with dask.config.set({"tilemask.no-workers-timeout": 2}), pytest.raises(RunError, match="no Dask worker"):
            tilemask.run(Workflow.from_dict(scene_workflow, base_dir=tmp_path), bare)
    (job,) = [JobFolder(p) for p in (tmp_path / "out" / ".tilemask" / "jobs").iterdir()]
    assert job.exists() and json.loads((job.path / "status.json").read_text())["state"] == "failed"


def two_items_done(make_raster, make_model, tmp_path, client) -> tuple[dict, list]:
    """A workflow of two rasters, ``a`` and ``b``, to Zarr, and its first run's results (both ok)."""
    for name, seed in (("a", 0), ("b", 1)):
        make_raster((3, 80, 90), name=f"{name}.tif", seed=seed)
    weights, _ = make_model()
    workflow = raster_workflow(tmp_path / "*.tif", weights, output={"path": "out/{stem}.zarr", "chunks": 64})
    first = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    assert [r.status for r in first] == ["ok", "ok"]
    return workflow, first


def test_a_run_with_overwrite_stopped_early_leaves_the_jobs_outputs_its_own(make_raster, make_model, tmp_path, client):
    """``--overwrite`` forgot the manifest whole, the ``started`` lines too: a run with it that stopped before it
    redid every item (a scheduler not reached, a lost one, Ctrl-C) left the job's earlier outputs as someone else's,
    and the job's next run refused them ("output ... exists; pass --overwrite", exit 2 for the first, a failure for
    a later one): an interrupted ``--overwrite`` run of 100,000 items could only start over."""
    import dask

    from .conftest import _free_port

    workflow, first = two_items_done(make_raster, make_model, tmp_path, client)
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):  # the --overwrite run stops before any work
        with pytest.raises(tilemask.errors.TilemaskError, match="cannot reach the Dask scheduler"):
            tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), scheduler=f"tcp://127.0.0.1:{_free_port()}",
                         overwrite=True)  # fmt: skip
    again = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)  # no --overwrite: the job's own
    assert [r.status for r in again] == ["skipped"] * 2, "a run stopped before its first record forgets nothing"
    tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client, overwrite=True)
    statuses = sorted(line["status"] for line in manifest_lines(first.job))
    assert statuses == ["ok"] * 2 + ["started"] * 4, "each item's last start kept, then redone once"


def test_a_run_with_overwrite_refused_before_any_work_keeps_the_jobs_record(make_raster, make_model, tmp_path, client):
    """``--overwrite`` forgot the manifest before its refusals: a run with it refused before any work (an output
    that is not tilemask's, exit 2) left the job ``failed`` with none of its items done, and its next run redid
    every item (of 100,000, each one already finished)."""
    workflow, first = two_items_done(make_raster, make_model, tmp_path, client)
    recorded = manifest_lines(first.job)
    shutil.rmtree(tmp_path / "out" / "a.zarr")
    (tmp_path / "out" / "a.zarr").mkdir()  # someone's folder at an output's path: refused even with --overwrite
    (tmp_path / "out" / "a.zarr" / "notes.txt").write_text("mine")
    with pytest.raises(tilemask.errors.OutputConflict, match="was not written by tilemask"):
        tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client, overwrite=True)
    assert manifest_lines(first.job) == recorded
    status = first.job.status()
    assert status["state"] == "failed" and status["counts"] == {"items": 2, "skipped": 1, "pending": 1}, status
    assert [row["status"] for row in report_rows(first.job)] == ["ok", "skipped"]  # as a refused run without it
    shutil.rmtree(tmp_path / "out" / "a.zarr")
    again = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    assert [(r.name, r.status) for r in again] == [("a", "ok"), ("b", "skipped")], "b resumed, not redone"


def test_a_cancel_asked_before_a_run_with_overwrite_forgets_the_manifest_is_kept(make_raster, make_model, tmp_path,
                                                                                 client, monkeypatch):  # fmt: skip
    """``--overwrite`` forgets the manifest at the run's first record, mid-run: it removed the ``cancel`` file with
    it, so a ``tilemask cancel`` asked while the run planned its items (under ``--on-error skip`` one refused item is
    that first record) was lost, and the run went on to its end."""
    from tilemask.planning import WorkflowPlan

    for name, seed in (("a", 0), ("b", 1)):
        make_raster((3, 80, 90), name=f"{name}.tif", seed=seed)
    weights, _ = make_model()
    workflow = raster_workflow(tmp_path / "*.tif", weights, output={"path": "out/{stem}.zarr", "chunks": 64})
    first = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    shutil.rmtree(tmp_path / "out" / "a.zarr")
    (tmp_path / "out" / "a.zarr").mkdir()  # someone's folder at an output's path: a, refused, is recorded failed
    (tmp_path / "out" / "a.zarr" / "notes.txt").write_text("mine")
    plan_input = WorkflowPlan.plan_input

    def cancelled_while_planning(self, item):
        if item.name == "a":
            first.job.request_cancel()  # as tilemask cancel does while the run plans its items
        return plan_input(self, item)

    monkeypatch.setattr(WorkflowPlan, "plan_input", cancelled_while_planning)
    watch = tilemask.driver._watch_cancel
    monkeypatch.setattr(tilemask.driver, "_watch_cancel", lambda job, stop: watch(job, stop, every=0.01))
    with pytest.raises(tilemask.errors.JobCancelled):
        tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client, overwrite=True, on_error="skip")
    assert first.job.status()["state"] == "cancelled"


def test_a_job_dir_holding_another_workflows_job_is_refused_unless_overwrite(scene_workflow, tmp_path, client):
    scene_workflow["input"] = str(tmp_path / "scenes" / "a.tif")
    (first,) = tilemask.run(Workflow.from_dict(scene_workflow, base_dir=tmp_path), client, job_dir=tmp_path / "myjob")
    assert first.status == "ok" and (tmp_path / "myjob" / "manifest.jsonl").exists()
    other = {**scene_workflow, "output": {**scene_workflow["output"], "path": "other/{stem}.zarr"}}
    with pytest.raises(JobError) as refused:
        tilemask.run(Workflow.from_dict(other, base_dir=tmp_path), client, job_dir=tmp_path / "myjob")
    assert refused.value.exit_status == 2 and str(refused.value) == (  # a Python caller's words, not the command's
        f"job folder {tmp_path}/myjob holds the job of another workflow; choose another job_dir, or pass "
        "overwrite=True to start it afresh")
    (again,) = tilemask.run(Workflow.from_dict(other, base_dir=tmp_path), client, job_dir=tmp_path / "myjob", overwrite=True)
    assert again.status == "ok" and again.outputs[0] == str(tmp_path / "other" / "a.zarr")
    assert [row["status"] for row in report_rows(JobFolder(tmp_path / "myjob"))] == ["ok"]
    # a workflow refused when planning (exit 2, nothing begun) does not own the folder: its fix runs there
    third = {**scene_workflow, "output": {**scene_workflow["output"], "path": "third/{stem}.zarr"}}
    wrong = {**third, "preprocess": {**scene_workflow.get("preprocess", {}), "bands": [4, 3, 2]}}
    with pytest.raises(InputError, match="out of range"):
        tilemask.run(Workflow.from_dict(wrong, base_dir=tmp_path), client, job_dir=tmp_path / "fresh")
    (fixed,) = tilemask.run(Workflow.from_dict(third, base_dir=tmp_path), client, job_dir=tmp_path / "fresh")
    assert fixed.status == "ok" and fixed.outputs[0] == str(tmp_path / "third" / "a.zarr")


def killed_past_file_size(workflow, limit: int, cwd) -> None:
    """``tilemask run workflow`` (one worker) in a process that may write files of at most ``limit`` bytes: killed
    by SIGXFSZ at the first write past it, as a full quota stops a run mid-record."""
    import resource
    import signal
    import subprocess
    import sys

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    killed = subprocess.run(
        [sys.executable, "-c", "import signal; signal.signal(signal.SIGXFSZ, signal.SIG_DFL); "
                               "from tilemask.__main__ import main; main()", "run", workflow, "--workers", "1"],
        capture_output=True, text=True, cwd=cwd, preexec_fn=limited, timeout=120)  # fmt: skip
    assert killed.returncode == -signal.SIGXFSZ, killed.stderr


@pytest.mark.slow  # 13 s in a loaded default run (2026-12-07)
def test_a_run_refused_before_any_work_leaves_no_job(make_raster, make_model, write_workflow, tmp_path, tilemask_home):
    """A run refused before any work (exit 2) kept the job folder it had made, and ``tilemask jobs`` listed a job
    that never ran (``failed, 0 of 1 items ok``); the folders made for it go too, the user's own stay."""
    scene, _ = make_raster()
    weights, _ = make_model()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "scene_mask.zarr").write_text("someone's own")
    workflow = raster_workflow(scene, weights)
    refused = run_cli("run", write_workflow(workflow), cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr == (
        f"tilemask: error: output {tmp_path}/out/scene_mask.zarr exists and was not written by tilemask; refused to "
        "replace it\n")
    wrong = {**workflow, "preprocess": {**workflow["preprocess"], "bands": [4, 3, 2]},
             "output": {"path": "new/{stem}.zarr"}}  # fmt: skip
    refused = run_cli("run", write_workflow(wrong), cwd=tmp_path)
    assert refused.returncode == 2 and "out of range" in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "scene.tif", "weights.pt", "workflow.yaml"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["scene_mask.zarr"]
    assert not any((tilemask_home / "jobs").iterdir())
    listing = run_cli("jobs")
    assert listing.returncode == 0 and listing.stdout == listing.stderr == ""
    # a --job-dir holding the user's own report.csv and status.json: a run wrote over them, and its refusal
    # removed them with its own record; the folder is refused before anything is written there
    mine = {"report.csv": "the user's report\n", "status.json": "{}\n", "notes.txt": "the user's notes\n"}
    (tmp_path / "mine").mkdir()
    for name, text in mine.items():
        (tmp_path / "mine" / name).write_text(text)
    refused = run_cli("run", write_workflow(workflow), "--job-dir", "mine", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr == (
        f"tilemask: error: job folder {tmp_path}/mine holds status.json, report.csv but no job.json: they are not a "
        "tilemask job's; move them, or choose another --job-dir\n")
    assert {p.name: p.read_text() for p in (tmp_path / "mine").iterdir()} == mine
    assert not any((tilemask_home / "jobs").iterdir())


@pytest.mark.slow  # 21 s in a loaded default run (2026-12-07)
def test_a_run_killed_while_it_writes_the_jobs_record_is_taken_up_by_the_next(make_raster, make_model,
                                                                             write_workflow, tmp_path):
    """The record was written ``workflow.yaml``, ``items.jsonl``, then ``job.json``: a run killed between them left a
    folder without ``job.json``, which every later run refused as holding "workflow.yaml but no job.json: they are
    not a tilemask job's" (exit 2). ``job.json`` comes first: the folder is the job's, and the next run writes the
    rest. The kernel kills the run (SIGXFSZ, which Python ignores: its default action is restored) when it writes
    past a file size limit that each record but ``items.jsonl`` fits."""
    deep = tmp_path.joinpath(*["d" * 200] * 12)  # long paths: items.jsonl is larger than job.json and workflow.yaml
    deep.mkdir(parents=True)
    scene, _ = make_raster((3, 64, 64))
    for name in ("a", "b"):
        shutil.copy(scene, deep / f"{name}.tif")
    (deep / "items.txt").write_text("a.tif\nb.tif\n")
    weights, _ = make_model()
    workflow = raster_workflow(scene, weights, output={"path": "out/{stem}.zarr", "probabilities": "none"})
    workflow = write_workflow({**workflow, "input": {"list": str(deep / "items.txt")}})
    limit = 4000

    killed_past_file_size(workflow, limit, tmp_path)
    (folder,) = (tmp_path / "out" / ".tilemask" / "jobs").iterdir()
    assert (folder / ".items.jsonl.tmp").stat().st_size == limit  # killed writing it, the other records whole
    done = run_cli("run", workflow, "--workers", "1", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.zarr")) == ["a.zarr", "b.zarr"]
    assert [row["status"] for row in report_rows(JobFolder(folder))] == ["ok"] * 2


@pytest.mark.slow
def test_a_job_whose_run_stopped_before_it_listed_its_inputs_says_so_and_its_next_run_completes_it(
        make_raster, make_model, write_workflow, tmp_path, tilemask_home):
    """A run killed just after it wrote ``job.json`` (here by a file size limit that ``job.json`` fits and
    ``workflow.yaml`` does not) of a job listed before (its output folder removed since) was listed by ``tilemask
    jobs`` as ``lost 0/0/0``, and ``tilemask status`` said "lost, 0 of 0 items ok": as if the job had no inputs.
    Its inputs were never listed; status says so, why, and what completes it; the next run does."""
    scene, _ = make_raster((3, 64, 64))
    weights, _ = make_model()
    workflow = write_workflow(raster_workflow(scene, weights, output={"path": "out/{stem}.zarr", "probabilities": "none"}))
    assert run_cli("-q", "run", workflow, "--workers", "1", cwd=tmp_path).returncode == 0
    (folder,) = (tmp_path / "out" / ".tilemask" / "jobs").iterdir()
    limit = (folder / "job.json").stat().st_size + 16  # workflow.yaml, written next, is larger
    assert (folder / "workflow.yaml").stat().st_size > limit
    shutil.rmtree(tmp_path / "out")

    killed_past_file_size(workflow, limit, tmp_path)
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["job.json", "lock"]
    job = find(folder.name)
    listing = run_cli("jobs")
    assert (listing.returncode, listing.stdout) == (0, f"{job.id}  lost       0/0/?  {folder}\n"), listing.stderr
    shown = run_cli("status", job.id)
    assert (shown.returncode, shown.stdout) == (0, (
        f"job {job.id}: lost, its inputs not listed\n"
        "  its record is incomplete (no workflow.yaml, items.jsonl): the run that created it stopped before it listed "
        f"the inputs; tilemask run {workflow} (or submit it) to complete the record and run the job\n")), shown.stderr
    summary = json.loads(run_cli("status", job.id, "--json").stdout)
    assert summary["counts"] == {"items": None, "ok": 0, "failed": 0, "pending": None}
    assert summary["incomplete"] == ["workflow.yaml", "items.jsonl"]
    with job:  # a run writing the record holds the job's lock: not lost, not incomplete for long
        assert json.loads(run_cli("status", job.id, "--json").stdout)["message"] == "its run is writing its record"
    assert run_cli("-q", "run", workflow, "--workers", "1", cwd=tmp_path).returncode == 0
    shown = run_cli("status", job.id)
    assert shown.stdout.startswith(f"job {job.id}: done, 1 of 1 items ok, 0 failed, 0 pending\n"), shown.stdout


@pytest.mark.parametrize("command", ["run", "submit"])
def test_a_first_run_that_cannot_write_its_jobs_record_leaves_no_job(make_raster, make_model, write_workflow,
                                                                     tmp_path, tilemask_home, client, command):
    """A first run or submit refused because its record cannot be written (a full disk; here a file size limit:
    "File too large", exit 2) left its job folder and the folders made for it, where any other refusal before
    work leaves none."""
    import resource
    import subprocess
    import sys

    scene, _ = make_raster((3, 64, 64))
    weights, _ = make_model()
    workflow = write_workflow(raster_workflow(scene, weights, output={"path": "out/{stem}.zarr"}))

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))  # job.json is larger

    where = ["--scheduler", client.scheduler.address] if command == "submit" else []
    refused = subprocess.run([Path(sys.executable).parent / "tilemask", command, workflow, *where],
                             capture_output=True, text=True, cwd=tmp_path, preexec_fn=limited, timeout=120)  # fmt: skip
    assert refused.returncode == 2 and refused.stderr.startswith("tilemask: error: job folder ")
    assert "File too large" in refused.stderr
    # submit checks the first input's outputs before it asks the scheduler: their folder, made then, stayed empty
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif", "weights.pt", "workflow.yaml"]
    assert not list(tilemask_home.glob("jobs/*"))


@pytest.mark.slow
def test_a_refusal_after_the_output_check_leaves_none_of_the_folders_it_made(make_raster, make_model,
                                                                              write_workflow, tmp_path, tilemask_home):
    """The output check makes the outputs' folder (to prove a file can be made there). A submit whose scheduler
    cannot be reached, and a run with a ``--job-dir`` elsewhere whose weights do not fit (found by the probe, after
    the check), left it behind empty (``out/``, ``out/sub/``); the user's own folder above them stays."""
    scene, _ = make_raster((3, 64, 64))
    weights, _ = make_model()
    (tmp_path / "mine").mkdir()
    workflow = write_workflow(raster_workflow(scene, weights, output={"path": "mine/out/sub/{stem}.zarr"}))
    quick = {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "1s"}
    for command in ("submit", "run"):  # run left its job behind, "failed", in `tilemask jobs` (a review)
        refused = run_cli(command, workflow, "--scheduler", "tcp://127.0.0.1:1", cwd=tmp_path, env=quick)
        assert refused.returncode == 1, refused.stderr
        assert refused.stderr.startswith("tilemask: error: cannot reach the Dask scheduler"), refused.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "scene.tif", "weights.pt", "workflow.yaml"]
        assert not any((tmp_path / "mine").iterdir())
        assert not list(tilemask_home.glob("jobs/*"))
    misfit = write_workflow(raster_workflow(scene, weights, args={**UNET_2D, "out_channels": 4},
                                            output={"path": "mine/out/sub/{stem}.zarr"}), name="misfit.yaml")
    refused = run_cli("run", misfit, "--job-dir", "jobs/misfit", "--workers", "1", cwd=tmp_path)
    assert refused.returncode == 2 and "does not fit UNet" in refused.stderr, refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "misfit.yaml", "scene.tif", "weights.pt",
                                                          "workflow.yaml"]  # fmt: skip
    assert not any((tmp_path / "mine").iterdir())
    assert not list(tilemask_home.glob("jobs/*"))


def test_a_key_added_to_workflows_leaves_earlier_jobs_their_ids(make_model, tmp_path):
    """``inference.slice_axis`` came in a later version, in every workflow's dict (``slice_axis: null``): each job
    made before it got another id, so its next run was a new job that refused the outputs the earlier runs wrote and
    redid nothing they had done. At its default it is left out of the job's identity, as ``output.seg_type`` is."""
    import hashlib

    from tilemask.jobs import job_id

    weights, _ = make_model()
    workflow = Workflow.from_dict(raster_workflow(tmp_path / "a.tif", weights), base_dir=tmp_path).to_dict()
    before = {**workflow, "inference": {k: v for k, v in workflow["inference"].items() if k != "slice_axis"},
              "output": {k: v for k, v in workflow["output"].items() if k != "seg_type"}}
    text = json.dumps({"workflow": before, "base": str(tmp_path)}, sort_keys=True)  # how its id was worked out then
    assert job_id(workflow, str(tmp_path)) == hashlib.sha256(text.encode()).hexdigest()[:12]
    sliced = {**workflow, "inference": {**workflow["inference"], "slice_axis": 2}}
    assert job_id(sliced, str(tmp_path)) != job_id(workflow, str(tmp_path))
    binary = {**workflow, "output": {**workflow["output"], "seg_type": "binary"}}
    assert job_id(binary, str(tmp_path)) != job_id(workflow, str(tmp_path))


WORKFLOW_KEYS = """version input classes model model.bundle model.nnunet model.fold model.checkpoint model.network
model.args model.weights preprocess preprocess.bands preprocess.orientation preprocess.spacing preprocess.intensity
preprocess.normalize preprocess.normalize.mode preprocess.normalize.mean preprocess.normalize.std
preprocess.normalize.nonzero preprocess.normalize.channel_wise preprocess.crop inference inference.roi_size
inference.overlap inference.mode inference.sigma_scale inference.batch_size inference.device inference.backend
inference.precision inference.activation inference.threshold inference.tta inference.steps inference.tta_mode
inference.slice_axis output output.path output.probabilities output.chunks output.vectors output.quicklook
output.dicomweb output.seg_type output.grid postprocess postprocess.remove_small postprocess.keep_largest postprocess.fill_holes
postprocess.opening postprocess.closing postprocess.connectivity stats stats.output stats.regions stats.region_id
stats.coverage stats.instances stats.connectivity stats.classes""".split()


def test_a_key_added_to_workflows_is_a_decision_on_earlier_jobs_ids(make_model, tmp_path):
    """Every key of a workflow is part of its job's id: one added (at its default, in every workflow's dict) gives
    each earlier job another id, unless it is in ``tilemask.jobs.ADDED_LATER``. This list makes that a decision."""
    weights, _ = make_model()
    raw = {**raster_workflow(tmp_path / "a.tif", weights), "postprocess": {"remove_small": 5},
           "stats": {"output": "s.csv"}}  # fmt: skip

    def keys(values: dict, prefix: str = "") -> list[str]:
        return [name for key, value in values.items() for name in
                [prefix + key, *(keys(value, f"{prefix}{key}.") if isinstance(value, dict) and key != "args" else [])]]

    added = sorted(set(keys(Workflow.from_dict(raw, base_dir=tmp_path).to_dict())) - set(WORKFLOW_KEYS))
    assert not added, (f"workflow keys {added} change the id of every job made before them: add them to "
                       "tilemask.jobs.ADDED_LATER at their default (or decide that such jobs start afresh), then here")


def test_job_dirs_of_one_name_are_different_jobs(scene_workflow, tmp_path, client, monkeypatch):
    """A --job-dir's name is the user's, not unique: the id (which names the job and its staged files) is a
    hash of the workflow and the folder, so two workflows run from A/jd and B/jd never resume each other."""
    monkeypatch.setenv("TILEMASK_HOME", str(tmp_path / "home"))
    scene_workflow["input"] = str(tmp_path / "scenes" / "a.tif")
    other = {**scene_workflow, "inference": {**scene_workflow["inference"], "overlap": 0.5}}
    ids = []
    for workflow, folder in ((scene_workflow, "A"), (other, "B")):
        (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client, job_dir=tmp_path / folder / "jd",
                                 overwrite=True)  # fmt: skip
        assert result.status == "ok"
        ids.append(JobFolder(tmp_path / folder / "jd").id)
    assert ids[0] != ids[1] and all(len(i) == 12 and int(i, 16) >= 0 for i in ids)
    assert sorted(p.name for p in (tmp_path / "home" / "jobs").iterdir()) == sorted(ids)  # both listed
    assert [f.location for f in map(find, ids)] == [str(tmp_path / "A" / "jd"), str(tmp_path / "B" / "jd")]


def test_tilemask_jobs_lines_up_its_folders_whatever_the_counts_widths(tmp_path, tilemask_home):
    """``tilemask jobs`` printed each job's counts unpadded: a job of 12 items (``0/0/12``) beside one of 1
    (``1/0/1``) pushed its folder two columns right. The counts are padded to the widest, the folders in one column."""
    jobs = []
    for name, n, ok in (("one", 1, 1), ("dozen", 12, 0), ("many", 120, 101)):
        job = JobFolder(tmp_path / name)
        items = [{"item": i, "name": f"s{i}", "files": [f"s{i}.tif"], "output": f"o{i}"} for i in range(n)]
        job.create({"version": 1, "name": name}, str(tmp_path), None, {}, items)
        for i in range(ok):
            job.record({"item": i, "name": f"s{i}", "input": f"s{i}.tif", "status": "ok", "outputs": []})
        jobs.append(job)
    listing = run_cli("jobs")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert sorted(line.split()[2] for line in lines) == ["0/0/12", "1/0/1", "101/0/120"]
    assert sorted(line.split()[-1] for line in lines) == sorted(str(job.path) for job in jobs)
    assert len({line.index(str(tmp_path)) for line in lines}) == 1  # one column
    assert f" 101/0/120  {tmp_path}" in listing.stdout  # as wide as the widest counts


def test_a_truncated_last_manifest_line_is_dropped_and_the_manifest_goes_on(tmp_path):
    job = JobFolder(tmp_path / "job")
    job.create({"version": 1}, str(tmp_path), None, {}, [{"item": 0, "name": "a", "files": ["a.tif"], "output": "o"}])
    job.record({"item": 0, "name": "a", "status": "started"})
    job.record({"item": 0, "name": "a", "input": "a.tif", "status": "ok", "outputs": []})
    with open(job.path / "manifest.jsonl", "a") as f:
        f.write('{"item": 1, "name": "b", "status": "o')  # a crash in the middle of a write
    assert [line["status"] for line in job.manifest().lines] == ["started", "ok"]
    job.record({"item": 1, "name": "b", "input": "b.tif", "status": "failed", "error": "x"})
    assert [line["status"] for line in job.manifest().lines] == ["started", "ok", "failed"]
    assert set(job.manifest().latest()) == {"a", "b"}
    assert find(job.id).path == job.path  # listed in $TILEMASK_HOME/jobs


@pytest.mark.slow  # the command line around the skip that the in-process test above checks in the default run
def test_on_error_skip_from_the_command_line_exits_1_and_says_where_the_report_is(scene_workflow, tmp_path, write_workflow):
    workflow = write_workflow(scene_workflow)
    done = run_cli("run", workflow, "--on-error", "skip", "--no-progress", "--workers", "1", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    # the failure is its line on stdout, once: it was also a WARNING on stderr (a review)
    assert "failed, skipped" not in done.stderr and done.stdout.count("c.tif: failed:") == 1, (done.stdout, done.stderr)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("tilemask: 1 of 5 items failed; report: ") and last.endswith("report.csv")
    report = last.split("report: ")[1]
    assert [row["status"] for row in csv.DictReader(open(report))] == ["ok", "ok", "failed", "ok", "ok"]
    job_id = report.split("/")[-2]
    status = run_cli("status", job_id, "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "failed"
    assert json.loads(status.stdout)["counts"] == {"items": 5, "ok": 4, "failed": 1, "pending": 0}
    listing = run_cli("jobs", cwd=tmp_path)
    assert listing.stdout.split()[:3] == [job_id, "failed", "4/1/5"]
    assert run_cli("status", "nosuchjob", cwd=tmp_path).returncode == 2


# -- inputs a job lists ---------------------------------------------------------------------------------------


def test_archive_list_and_stac_inputs_give_the_outputs_of_the_files_themselves(make_model, tmp_path, client):
    rgb = GEO["RGB.byte.tif"]
    with rasterio.open(rgb) as src:
        profile, data = src.profile, src.read(window=((200, 456), (200, 456)))
        profile.update(width=256, height=256, transform=src.window_transform(((200, 456), (200, 456))))
    files = tmp_path / "files"
    files.mkdir()
    with rasterio.open(files / "scene.tif", "w", **profile) as dst:
        dst.write(data)
    single = {**profile, "count": 1}
    for band, name in enumerate(["red", "green", "blue"], 1):
        with rasterio.open(files / f"scene_{name}.tif", "w", **single) as dst:
            dst.write(data[band - 1 : band])
    with zipfile.ZipFile(tmp_path / "scenes.zip", "w") as zf:
        zf.write(files / "scene.tif", "inner/scene.tif")
        zf.write(files / "scene_red.tif", "inner/other.txt")  # not a member the glob takes
    (tmp_path / "items.txt").write_text("# the scene\nfiles/scene.tif\n\n")
    (tmp_path / "items.json").write_text(json.dumps({
        "type": "FeatureCollection",
        "features": [{
            "type": "Feature", "stac_version": "1.0.0", "id": "scene", "geometry": None, "properties": {"datetime": "2000-01-01T00:00:00Z"},
            "links": [], "assets": {c: {"href": f"files/scene_{c}.tif"} for c in ("red", "green", "blue")},
        }],
    }))  # fmt: skip
    (tmp_path / "uris.txt").write_text(f"{(files / 'scene.tif').as_uri()}\n")  # as pystac writes hrefs, GDAL reads
    uris = json.loads((tmp_path / "items.json").read_text())
    uris["features"][0]["assets"]["red"]["href"] = (files / "scene_red.tif").as_uri()
    (tmp_path / "uris.json").write_text(json.dumps(uris))
    weights, _ = make_model(UNET_2D)
    labels = {}
    for kind, given in [
        ("file", str(files / "scene.tif")),
        ("zip", {"archive": "scenes.zip", "members": "*.tif"}),
        ("list", {"list": "items.txt"}),
        ("stac", {"stac": "items.json", "assets": ["red", "green", "blue"]}),
        ("list of file URIs", {"list": "uris.txt"}),
        ("stac with a file URI", {"stac": "uris.json", "assets": ["red", "green", "blue"]}),
    ]:
        workflow = raster_workflow("", weights, output={"path": f"{kind}/{{stem}}.zarr", "chunks": 128})
        workflow["input"] = given
        (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
        assert result.outputs[0] == str(tmp_path / kind / "scene.zarr"), kind
        labels[kind] = zarr.open_group(result.outputs[0], mode="r")["labels"][:]
        # the run's line names the item: a STAC Item by its id, before its first asset's file
        first = files / ("scene_red.tif" if kind.startswith("stac") else "scene.tif")
        assert describe(result).startswith(f"scene ({first}): " if kind.startswith("stac") else f"{result.input}: ")
        assert kind == "zip" or result.input == str(first), kind
    assert (labels["file"] > 0).any()
    for kind in ("zip", "list", "stac", "list of file URIs", "stac with a file URI"):
        np.testing.assert_array_equal(labels[kind], labels["file"], err_msg=kind)
    # the quick look of the STAC item's three assets is the scene's own
    looks = {kind: np.asarray(Image.open(tmp_path / kind / "scene.png")) for kind in ("file", "stac")}
    np.testing.assert_array_equal(looks["stac"], looks["file"])


def test_a_stac_items_raster_bands_nodata_masks_its_assets_as_the_files_own_nodata_would(make_model, tmp_path, client,
                                                                                         caplog):  # fmt: skip
    """An Item's ``raster:bands`` nodata (odc-stac and stackstac mask by it) was not applied: assets whose files name
    no nodata had the Landsat fill collar segmented (a review: 184,823 fill pixels labelled water). Now the labels
    equal those of the same assets with the nodata written in the files (GDAL's own mask), and the collar is the
    output's nodata. A float asset's "nan" masks its NaN pixels."""
    from tilemask.sources.raster import RasterSource

    window = ((0, 256), (0, 256))  # the scene's top-left corner: half of it is the fill collar (0 in every band)
    with rasterio.open(GEO["RGB.byte.tif"]) as src:
        profile, data = src.profile, src.read(window=window)
        profile.update(width=256, height=256, count=1, transform=src.window_transform(window))
    assert (data == 0).all(axis=0).mean() > 0.2
    for folder, nodata in (("declared", None), ("written", 0)):
        (tmp_path / folder).mkdir()
        for band, name in enumerate(("red", "green", "blue")):
            with rasterio.open(tmp_path / folder / f"{name}.tif", "w", **{**profile, "nodata": nodata}) as dst:
                dst.write(data[band : band + 1])

    def item(folder, raster_bands):
        assets = {c: {"href": f"{folder}/{c}.tif", **raster_bands} for c in ("red", "green", "blue")}
        return {"type": "Feature", "stac_version": "1.0.0", "id": "scene", "geometry": None, "links": [],
                "properties": {"datetime": "2000-01-01T00:00:00Z"}, "assets": assets,
                "stac_extensions": ["https://stac-extensions.github.io/raster/v1.1.0/schema.json"]}  # fmt: skip

    (tmp_path / "declared.json").write_text(json.dumps(item("declared", {"raster:bands": [{"nodata": 0}]})))
    (tmp_path / "written.json").write_text(json.dumps(item("written", {})))
    weights, _ = make_model(UNET_2D)
    labels = {}
    for name in ("declared", "written"):
        workflow = raster_workflow("", weights, output={"path": f"out_{name}/{{stem}}.zarr", "chunks": 128})
        workflow["input"] = {"stac": f"{name}.json", "assets": ["red", "green", "blue"]}
        (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
        labels[name] = zarr.open_group(result.outputs[0], mode="r")["labels"][:]
    np.testing.assert_array_equal(labels["declared"], labels["written"])
    collar = (data == 0).all(axis=0)
    assert (labels["declared"][collar] == 255).all() and (labels["declared"][~collar] != 255).all()

    floats = tmp_path / "floats.tif"
    pixels = data[:1].astype(np.float32)
    pixels[0, collar] = np.nan
    with rasterio.open(floats, "w", **{**profile, "dtype": "float32", "nodata": None}) as dst:
        dst.write(pixels)
    source = RasterSource.open(str(floats)).with_nodata((float("nan"),))
    _, valid = source.read_with_valid(((0, 256), (0, 256)))
    np.testing.assert_array_equal(valid, ~collar)
    np.testing.assert_array_equal(source.read_valid(((0, 256), (0, 256))), ~collar)
    red = RasterSource.open(str(tmp_path / "declared" / "red.tif"))
    assert red.with_nodata((-9999.0,)) is red  # no uint8 pixel holds it: GDAL would find every pixel valid
    assert "nodata values [-9999.0] that its STAC raster:bands declare are not values of its uint8" in caplog.text


@pytest.mark.slow  # three runs
def test_a_replaced_archive_is_read_again_not_taken_for_the_one_a_job_read(make_model, tmp_path, client):
    """A member's stamp was (0, 0) (not a local file): a job's next run kept the labels of the archive it had
    replaced ("done in an earlier run"), and an interrupted one resumed on the old archive's chunks."""
    with rasterio.open(GEO["RGB.byte.tif"]) as src:
        profile, data = src.profile, src.read(window=((200, 328), (200, 328)))
        profile.update(width=128, height=128, transform=src.window_transform(((200, 328), (200, 328))))
    weights, _ = make_model(UNET_2D)
    workflow = raster_workflow("", weights, output={"path": "out/{stem}.zarr", "chunks": 128})
    workflow["input"] = {"archive": "scenes.zip", "members": "*.tif"}
    labels = []
    for content in (data, data[:, ::-1], data[:, ::-1]):  # the archive replaced by another, then left as it is
        with rasterio.open(tmp_path / "scene.tif", "w", **profile) as dst:
            dst.write(np.ascontiguousarray(content))
        if len(labels) < 2:
            with zipfile.ZipFile(tmp_path / "scenes.zip", "w") as zf:
                zf.write(tmp_path / "scene.tif", "scene.tif")
        (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
        labels.append((result.status, zarr.open_group(tmp_path / "out" / "scene.zarr", mode="r")["labels"][:]))
    assert [status for status, _ in labels] == ["ok", "ok", "skipped"]
    assert not np.array_equal(labels[0][1], labels[1][1])  # the new archive's scene, not the old one's


def test_a_glob_does_not_take_the_workflows_own_outputs_beside_its_inputs(make_raster, make_model, tmp_path):
    """Outputs written into the inputs' folder matched the inputs' glob: the workflow's second run took its mask as
    an input (exit 2: "in_channels is 3 but the input gives 1"), or with --on-error skip segmented its outputs."""
    (tmp_path / "same").mkdir()
    a, _ = make_raster((3, 40, 40), name="same/a.tif")
    b, _ = make_raster((3, 40, 40), name="same/b_mask.tif")  # an input whose name looks like an output: kept
    for name in ("a_mask.tif", "a_mask_probabilities.tif", "a_mask.png"):
        shutil.copy(a, tmp_path / "same" / name)
    weights, _ = make_model()
    workflow = raster_workflow(str(tmp_path / "same" / "*"), weights,
                               output={"path": "same/{stem}_mask.tif", "probabilities": "uint8"})  # fmt: skip
    assert Workflow.from_dict(workflow, base_dir=tmp_path).input_paths() == [str(a), str(b)]
    # each input its own output: kept, for planning to refuse (a_mask_probabilities.tif is a_mask.tif's output)
    itself = {**workflow, "input": str(tmp_path / "same" / "*.tif"),
              "output": {"path": "same/{stem}.tif", "probabilities": "uint8"}}  # fmt: skip
    mask = str(tmp_path / "same" / "a_mask.tif")
    assert Workflow.from_dict(itself, base_dir=tmp_path).input_paths() == [str(a), mask, str(b)]


def test_a_glob_beside_its_cogs_does_not_take_gdals_sidecar_for_an_input(make_raster, make_model, tmp_path, client):
    """A COG's ``.aux.xml`` (its class names) matched ``folder/*``: the finished job's second run was "cannot open
    raster: ... .aux.xml", exit 2 (a review)."""
    (tmp_path / "same").mkdir()
    make_raster((3, 40, 40), name="same/a.tif")
    weights, _ = make_model()
    workflow = raster_workflow(str(tmp_path / "same" / "*"), weights, output={"path": "same/{stem}_mask.tif"})
    (first,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    assert first.status == "ok" and (tmp_path / "same" / "a_mask.tif.aux.xml").exists()
    (again,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    assert again.status == "skipped"


def test_an_output_of_a_later_input_already_there_is_refused_before_any_work(make_raster, make_model, tmp_path,
                                                                              client):  # fmt: skip
    """Found only as its input started, an output already there was exit 1 while the inputs before it ran, and
    stopped them (a review); the first input's was exit 2 before any work. Every input's is now."""
    for name in ("s1", "s2", "s3"):
        make_raster((3, 64, 64), name=f"{name}.tif")
    weights, _ = make_model()
    workflow = raster_workflow(str(tmp_path / "s*.tif"), weights, output={"path": "out/{stem}_mask.tif"})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "s3_mask.tif").write_text("someone's")
    with pytest.raises(OutputConflict, match=f"^output {tmp_path}/out/s3_mask.tif exists and was not written by "
                                             "tilemask; refused to replace it$") as refused:  # fmt: skip
        tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    assert refused.value.exit_status == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["s3_mask.tif"]  # no job, nothing begun
    (tmp_path / "out" / "s3_mask.tif").unlink()
    results = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    assert [r.status for r in results] == ["ok"] * 3
    changed = {**workflow, "inference": {**workflow["inference"], "overlap": 0.5}}  # another job: not its outputs
    with pytest.raises(OutputConflict, match="s1_mask.tif exists; pass overwrite=True") as refused:
        tilemask.run(Workflow.from_dict(changed, base_dir=tmp_path), client)
    assert refused.value.exit_status == 2
    for output in (tmp_path / "out").glob("s1_mask*"):  # labels, probabilities, sidecar, quick look
        output.unlink()
    with pytest.raises(OutputConflict, match="s2_mask.tif exists; pass overwrite=True") as refused:
        tilemask.run(Workflow.from_dict(changed, base_dir=tmp_path), client)
    assert refused.value.exit_status == 2 and not (tmp_path / "out" / "s1_mask.tif").exists()  # s1 not begun


@pytest.mark.slow  # two runs of the command on a 1500^2 scene, one cancelled (14 s)
def test_a_redone_item_that_was_stopped_is_not_run_in_the_report_not_its_earlier_ok(make_raster, make_model,
                                                                                     write_workflow, tmp_path):
    """An item whose output was removed is redone; stopped meanwhile (a cancel, Ctrl-C), the report and ``status``
    still called it ok, with the earlier run's seconds, for an output that was not there (a review)."""
    from .test_trust import start, wait_for

    make_raster((3, 1500, 1500), name="big.tif")
    weights, _ = make_model()
    path = write_workflow(raster_workflow(str(tmp_path / "big.tif"), weights, output={"path": "out/{stem}.zarr"}))
    assert run_cli("run", path, "--workers", "1", "--no-progress", cwd=tmp_path, timeout=200).returncode == 0
    (job,) = (tmp_path / "out" / ".tilemask" / "jobs").iterdir()
    assert [row["status"] for row in report_rows(JobFolder(job))] == ["ok"]
    shutil.rmtree(tmp_path / "out" / "big.zarr")
    proc = start(["run", path, "--workers", "1", "--no-progress"], tmp_path)
    started = lambda: (job / "manifest.jsonl").read_text().count('"started"') == 2  # noqa: E731
    wait_for(started, what="the item started again", proc=proc)
    assert run_cli("cancel", job.name, cwd=tmp_path).returncode == 0
    proc.communicate(timeout=60)
    assert proc.returncode == 1 and not (tmp_path / "out" / "big.zarr").exists()
    assert [(row["status"], row["outputs"], row["seconds"]) for row in report_rows(JobFolder(job))] == [
        ("not run", "", "")
    ]
    status = run_cli("status", job.name, cwd=tmp_path)
    assert "cancelled" in status.stdout and "0 of 1 items ok" in status.stdout, status.stdout


def test_brackets_in_the_workflows_folder_or_an_existing_file_are_taken_literally(make_raster, make_model, tmp_path):
    """A path that exists is that file, and the workflow's folder is no part of a glob: a project folder named
    "survey [v2]" made every relative input "no file matches" (exit 2), as did an input named scene[1].tif."""
    project = tmp_path / "survey [v2]"
    (project / "data").mkdir(parents=True)
    a, _ = make_raster((3, 40, 40), name="survey [v2]/data/a.tif")
    bracketed, _ = make_raster((3, 40, 40), name="survey [v2]/data/scene[1].tif")
    weights, _ = make_model()

    def paths(given):
        return Workflow.from_dict(raster_workflow(given, weights), base_dir=project).input_paths()

    assert paths("data/a.tif") == [str(a)]
    assert paths("data/scene[1].tif") == [str(bracketed)]
    assert paths(str(bracketed)) == [str(bracketed)]
    assert paths("data/*.tif") == [str(a), str(bracketed)]
    assert paths("data/[a]*.tif") == [str(a)]  # a glob of the user's own is still one
    with pytest.raises(WorkflowError, match="no file matches 'data/scene"):
        paths("data/scene[2].tif")
    case = raster_workflow("x", weights)
    case["input"] = {"channels": ["data/{case}.tif"]}
    cases = Workflow.from_dict(case, base_dir=project).input_items()
    assert [item.name for item in cases] == ["a", "scene[1]"]


def test_a_stac_items_id_is_one_file_name_in_the_output_folder(make_model, tmp_path):
    """An id comes from whoever wrote the catalog: ``../../outside`` wrote its mask two folders above the output
    folder, and ``T18/LC08 2020:01`` made a sub-folder. Each is made one file name in the output folder."""
    from tilemask.planning import plan_workflow

    ids = ["../../outside", "T18/LC08 2020:01", "LC08_L2SP_042034"]
    (tmp_path / "items.json").write_text(json.dumps({
        "type": "FeatureCollection",
        "features": [{
            "type": "Feature", "stac_version": "1.0.0", "id": i, "geometry": None,
            "properties": {"datetime": "2000-01-01T00:00:00Z"}, "links": [],
            "assets": {"rgb": {"href": str(GEO["RGB.byte.tif"])}},
        } for i in ids],
    }))  # fmt: skip
    weights, _ = make_model(UNET_2D)
    workflow = raster_workflow(str(tmp_path / "x.tif"), weights, output={"path": "out/{stem}_mask.tif"})
    workflow["input"] = {"stac": str(tmp_path / "items.json"), "assets": ["rgb"]}
    plan = plan_workflow(Workflow.from_dict(workflow, base_dir=tmp_path))
    outputs = [Path(plan.workflow.output_path(item.name)) for item in plan.items]
    assert [p.parent for p in outputs] == [tmp_path / "out"] * 3
    names = ["_._.._outside_mask.tif", "T18_LC08 2020_01_mask.tif", "LC08_L2SP_042034_mask.tif"]
    assert [p.name for p in outputs] == names


def test_a_stac_catalog_is_walked_into_its_children_and_a_loop_is_refused(tmp_path):
    """A catalog's items and its children's, as pystac's recursive walk gives them; a child linking back to a
    catalog above it made that walk recurse until Python's limit (RecursionError, exit 1)."""
    from tilemask.errors import InputError
    from tilemask.inputs import stac_items

    def catalog(name, links):
        (tmp_path / name).write_text(json.dumps({"type": "Catalog", "stac_version": "1.0.0", "id": name,
                                                 "description": "x", "links": links}))  # fmt: skip

    for n in range(3):
        (tmp_path / f"i{n}.json").write_text(json.dumps({
            "type": "Feature", "stac_version": "1.0.0", "id": f"i{n}", "geometry": None,
            "properties": {"datetime": "2000-01-01T00:00:00Z"}, "links": [], "assets": {"rgb": {"href": "a.tif"}},
        }))  # fmt: skip
    catalog("root.json", [{"rel": "child", "href": "./sub.json"}, {"rel": "item", "href": "./i0.json"}])
    catalog("sub.json", [{"rel": "item", "href": "./i1.json"}, {"rel": "child", "href": "./leaf.json"}])
    catalog("leaf.json", [{"rel": "item", "href": "./i2.json"}])
    import pystac

    expected = [item.id for item in pystac.Catalog.from_file(str(tmp_path / "root.json")).get_items(recursive=True)]
    assert [item.name for item in stac_items(str(tmp_path / "root.json"), ["rgb"])] == expected == ["i0", "i1", "i2"]
    catalog("leaf.json", [{"rel": "item", "href": "./i2.json"}, {"rel": "child", "href": "./root.json"}])
    with pytest.raises(InputError, match=re.escape(f"input.stac: cannot read {tmp_path / 'root.json'}: the catalog "
                                                   f"{tmp_path / 'leaf.json'} links to {tmp_path / 'root.json'}, "
                                                   "which it lies under (a loop)")):  # fmt: skip
        stac_items(str(tmp_path / "root.json"), ["rgb"])
    item = json.loads((tmp_path / "i0.json").read_text())
    item["assets"]["rgb"]["href"] = None
    (tmp_path / "i0.json").write_text(json.dumps(item))
    with pytest.raises(InputError, match=re.escape("i0.json: item i0's asset 'rgb' has no href")):
        stac_items(str(tmp_path / "i0.json"), ["rgb"])  # pystac's "expected str, bytes or os.PathLike object"


def test_a_list_archive_or_stac_file_given_as_a_file_uri_is_read_as_its_path(make_model, tmp_path):
    """``input: {list: file:///...}`` (and an archive's, a STAC file's) was read as a relative path:
    ``.../file:/tmp/...: No such file or directory``. A ``file://`` URI names the file at its path, as the hrefs and
    the lines inside them do."""
    folder = tmp_path / "a b"  # a space: %20 in the URI
    folder.mkdir()
    shutil.copy(GEO["RGB.byte.tif"], folder / "x.tif")
    (folder / "items.txt").write_text("x.tif\n")
    with zipfile.ZipFile(folder / "scenes.zip", "w") as zf:
        zf.write(folder / "x.tif", "x.tif")
    (folder / "item.json").write_text(json.dumps({
        "type": "Feature", "stac_version": "1.0.0", "id": "x", "geometry": None,
        "properties": {"datetime": "2000-01-01T00:00:00Z"}, "links": [], "assets": {"rgb": {"href": "x.tif"}},
    }))  # fmt: skip
    weights, _ = make_model(UNET_2D)
    workflow = raster_workflow(str(folder / "x.tif"), weights)
    for key, name, extra in [("list", "items.txt", {}), ("archive", "scenes.zip", {"members": "*.tif"}),
                             ("stac", "item.json", {"assets": ["rgb"]})]:  # fmt: skip
        given = [{key: str(folder / name), **extra}, {key: (folder / name).as_uri(), **extra}]
        items = [Workflow.from_dict({**workflow, "input": i}, base_dir=tmp_path).input_items() for i in given]
        assert "%20" in given[1][key] and items[1] == items[0] and len(items[0]) == 1, key
    with pytest.raises(InputError, match=r"^input.list: file://elsewhere/items.txt: a file on another host"):
        Workflow.from_dict({**workflow, "input": {"list": "file://elsewhere/items.txt"}}, base_dir=tmp_path
                           ).input_items()  # fmt: skip


def test_a_hidden_archive_member_or_listed_file_writes_outputs_that_are_not_hidden(make_model, tmp_path):
    """A member ``.x.tif`` (and a listed ``.x.tif``, a path or glob given as input) wrote ``out/.x_mask.tif`` and
    its quick look ``.x_mask.png``: hidden from file browsers and skipped by globs. Its ``{stem}`` has its leading
    ``.`` made ``_``."""
    from tilemask.planning import plan_workflow

    shutil.copy(GEO["RGB.byte.tif"], tmp_path / ".x.tif")
    with zipfile.ZipFile(tmp_path / "scenes.zip", "w") as zf:
        zf.write(tmp_path / ".x.tif", ".x.tif")
        zf.write(tmp_path / ".x.tif", "in/.y.tif")
    with tarfile.open(tmp_path / "scenes.tar", "w") as tf:
        tf.add(tmp_path / ".x.tif", "./.x.tif")
    (tmp_path / "items.txt").write_text(".x.tif\n")
    weights, _ = make_model(UNET_2D)
    workflow = raster_workflow(str(tmp_path / ".x.tif"), weights, output={"path": "out/{stem}_mask.tif"})
    for given, names in [
        ({"archive": "scenes.zip", "members": "*.tif"}, ["_x_mask.tif", "_y_mask.tif"]),
        ({"archive": "scenes.tar", "members": "*.tif"}, ["_x_mask.tif"]),
        ({"list": "items.txt"}, ["_x_mask.tif"]),
        (".x.tif", ["_x_mask.tif"]),  # a path or a glob too: `.x.tif` and `.*.tif` wrote `out/.x_mask.tif`
        (".*.tif", ["_x_mask.tif"]),
    ]:
        plan = plan_workflow(Workflow.from_dict({**workflow, "input": given}, base_dir=tmp_path))
        outputs = [Path(plan.workflow.output_path(item.name)) for item in plan.items]
        assert [(p.parent, p.name) for p in outputs] == [(tmp_path / "out", name) for name in names], given
        assert [Path(plan.workflow.quicklook_path(item.name)).name[0] for item in plan.items] == ["_"] * len(names)
    with zipfile.ZipFile(tmp_path / "scenes.zip", "a") as zf:  # "_x.tif" beside ".x.tif": one output, refused
        zf.write(tmp_path / ".x.tif", "_x.tif")
    with pytest.raises(WorkflowError, match=r"both write \S+/out/_x_mask.tif; both are named '_x'") as refused:
        plan_workflow(Workflow.from_dict({**workflow, "input": {"archive": "scenes.zip", "members": "*.tif"}},
                                         base_dir=tmp_path))  # fmt: skip
    assert refused.value.exit_status == 2
    # a list naming one file twice, by two paths: said so (it was advice about globs and archives)
    (tmp_path / "twice.txt").write_text(".x.tif\n./.x.tif\n")
    with pytest.raises(WorkflowError, match=rf"^input: {tmp_path}/\.x\.tif and {tmp_path}/\.x\.tif are one file, "
                                            r"given twice; give it once$"):  # fmt: skip
        plan_workflow(Workflow.from_dict({**workflow, "input": {"list": "twice.txt"}}, base_dir=tmp_path))
    # a glob that matches its outputs beside it leaves them out by the same name (`.x.tif` writes `._x_mask.tif`)
    shutil.copy(GEO["RGB.byte.tif"], tmp_path / "._x_mask.tif")
    beside = {**workflow, "input": ".*.tif", "output": {"path": ".{stem}_mask.tif"}}
    assert [item.files for item in Workflow.from_dict(beside, base_dir=tmp_path).input_items()] == [
        (str(tmp_path / ".x.tif"),)]


def test_macos_resource_forks_in_an_archive_are_not_inputs(make_model, tmp_path):
    """A zip made by macOS's Finder holds ``__MACOSX/._a.tif`` beside ``a.tif`` (and ``tar`` on macOS ``._a.tif``):
    AppleDouble metadata, not rasters. ``members: "*.tif"`` took them as inputs: the run was refused ("not
    recognized as being in a supported file format", exit 2) where one sorted first, else each was a failed item."""
    from tilemask.planning import plan_workflow

    scene = GEO["RGB.byte.tif"]
    fork = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(50)  # AppleDouble's header
    with zipfile.ZipFile(tmp_path / "finder.zip", "w") as zf:
        zf.write(scene, "scenes/a.tif")
        zf.writestr("__MACOSX/scenes/._a.tif", fork)
    with tarfile.open(tmp_path / "mac.tar", "w") as tf:
        tf.add(scene, "./a.tif")
        tf.add(scene, "sub/b.tif")
        for name in ("./._a.tif", "sub/._b.tif"):
            info = tarfile.TarInfo(name)
            info.size = len(fork)
            tf.addfile(info, io.BytesIO(fork))
    weights, _ = make_model(UNET_2D)
    workflow = raster_workflow(str(scene), weights, output={"path": "out/{stem}_mask.tif"})
    for archive, members in (("finder.zip", ["scenes/a.tif"]), ("mac.tar", ["a.tif", "sub/b.tif"])):
        plan = plan_workflow(Workflow.from_dict({**workflow, "input": {"archive": archive, "members": "*.tif"}},
                                                base_dir=tmp_path))  # fmt: skip
        assert [item.files for item in plan.items] == [(f"{'/vsizip/' if archive.endswith('zip') else '/vsitar/'}"
                                                         f"{tmp_path}/{archive}/{m}",) for m in members]  # fmt: skip
    with zipfile.ZipFile(tmp_path / "forks.zip", "w") as zf:  # nothing but forks: nothing matches
        zf.writestr("__MACOSX/._a.tif", fork)
    with pytest.raises(InputError, match=r"no member of \S+forks.zip matches '\*.tif'"):
        plan_workflow(Workflow.from_dict({**workflow, "input": {"archive": "forks.zip", "members": "*.tif"}},
                                         base_dir=tmp_path))  # fmt: skip


def test_listings_as_windows_and_other_tools_write_them_are_read_or_refused_by_name(make_model, tmp_path):
    """Each was a Python exception (UnicodeDecodeError, TypeError, AttributeError, STACTypeError) with exit 1, a
    path that does not exist (a byte-order mark, a zip's "\\" folders), or inputs left out in silence (``**``)."""
    from tilemask.planning import plan_model

    weights, _ = make_model(UNET_2D)
    scene = str(GEO["RGB.byte.tif"])

    def planned(given) -> list[str]:
        workflow = raster_workflow(scene, weights, output={"path": "out/{stem}_mask.tif"}) | {"input": given}
        return [item.files[0] for item in plan_model(Workflow.from_dict(workflow, base_dir=tmp_path)).items]

    (tmp_path / "sub").mkdir()
    shutil.copy(scene, tmp_path / "sub" / "a.tif")
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfsub/a.tif\r\n")  # Notepad's UTF-8
    assert planned({"list": "bom.txt"}) == [str(tmp_path / "sub" / "a.tif")]
    (tmp_path / "latin1.txt").write_bytes(b"sub/a.tif\nsub/b\xe9.tif\n")
    with pytest.raises(InputError, match=r"^input.list: .*latin1.txt is not UTF-8 text \(byte 15\); save it as UTF-8$"):
        planned({"list": "latin1.txt"})

    with zipfile.ZipFile(tmp_path / "windows.zip", "w") as zf:
        zf.write(scene, "2020\\scene.tif")
    (member,) = planned({"archive": "windows.zip", "members": "*.tif"})
    assert member.endswith("windows.zip/2020/scene.tif")
    with rasterio.open(member) as ds:  # the path GDAL reads
        assert ds.width == 791
    with tarfile.open(tmp_path / "latin.tar", "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        tf.add(scene, "sc\xe8ne.tif")
    with pytest.raises(InputError, match=r"the member sc\\xe8ne.tif is not named in UTF-8"):
        planned({"archive": "latin.tar", "members": "*.tif"})

    def stac(name: str, document) -> str:
        (tmp_path / name).write_text(json.dumps(document))
        return name

    item = {"type": "Feature", "stac_version": "1.0.0", "id": 20200101, "geometry": None, "links": [],
            "properties": {"datetime": "2000-01-01T00:00:00Z"}, "assets": {"rgb": {"href": scene}}}  # fmt: skip
    assert planned({"stac": stac("numeric.json", item), "assets": ["rgb"]}) == [scene]  # an id written as a number
    for name, document, why in (("array.json", [item], "a JSON list, not a STAC"),
                                ("invalid.json", {"type": "Feature"}, "cannot read"),
                                ("nohref.json", item | {"assets": {"rgb": {"href": None}}}, "")):  # fmt: skip
        with pytest.raises(InputError, match="^input.stac: "):
            planned({"stac": stac(name, document), "assets": ["rgb"]})
    # an empty href resolved to the STAC file's folder: "...: a folder with no DICOM file among its first 40 files"
    for href in ("", " "):
        with pytest.raises(InputError, match=r"^input.stac: item 20200101's asset 'rgb' has no href$"):
            planned({"stac": stac("empty.json", item | {"assets": {"rgb": {"href": href}}}), "assets": ["rgb"]})

    (tmp_path / "gl" / "2020" / "06").mkdir(parents=True)
    for where in ("gl/top.tif", "gl/2020/06/deep.tif", "gl/2021.tif"):
        shutil.copy(scene, tmp_path / where)
    assert [Path(f).name for f in planned("gl/**/*.tif")] == ["deep.tif", "2021.tif", "top.tif"]

    # what is read on the local file system only says so (they were "no such file" or S3's "key does not exist")
    for given, why in (({"stac": "https://example.com/catalog.json", "assets": ["rgb"]}, "only a local STAC file"),
                       ({"archive": "s3://bucket/scenes.zip"}, "only a local archive is listed"),
                       ({"list": "s3://bucket/items.txt"}, "only a local list file is read"),
                       ("s3://bucket/scenes/*.tif", "a glob is expanded on the local file system only")):  # fmt: skip
        with pytest.raises((InputError, WorkflowError), match=why):
            planned(given)
    assert planned("https://example.com/scene.tif?sig=a*b") == ["https://example.com/scene.tif?sig=a*b"]  # a query


@pytest.mark.timeout(60)
def test_a_member_of_a_tar_gz_is_extracted_reading_the_stream_only_up_to_it(tmp_path, monkeypatch):
    """A reviewer's .tar.gz of 100 scans (155 MB): each NIfTI member's extraction read every header of the archive
    first (``getmembers``: the whole stream decompressed), then went back for the member: 1.4 s for the first
    scan, 2.7 s for the last, each item of a batch. It reads up to the member, as GDAL's /vsitar/ does (gzip's
    checksum of the whole stream is checked once per archive, below)."""
    from tilemask.sources.archive import extract

    rng = np.random.default_rng(0)
    with tarfile.open(tmp_path / "scans.tar.gz", "w:gz", compresslevel=1) as tf:
        for i in range(20):
            info = tarfile.TarInfo(f"case{i:02d}/scan.nii.gz")
            info.size = 200_000
            tf.addfile(info, io.BytesIO(rng.integers(0, 255, info.size, dtype=np.uint8).tobytes()))
    archive = str(tmp_path / "scans.tar.gz")
    with tarfile.open(archive) as tf:
        expected = [tf.extractfile(f"case{i:02d}/scan.nii.gz").read() for i in (1, 2)]
    every_header = []
    real = tarfile.TarFile.getmembers
    monkeypatch.setattr(tarfile.TarFile, "getmembers", lambda self: every_header.append(1) or real(self))
    for i in (1, 2):
        target = tmp_path / f"{i}.nii.gz"
        extract(f"/vsitar/{archive}/case{i:02d}/scan.nii.gz", archive, f"case{i:02d}/scan.nii.gz", str(target))
        assert target.read_bytes() == expected[i - 1]
    assert every_header == []


@pytest.mark.timeout(60)
def test_a_member_extracted_from_a_damaged_tar_gz_is_refused_as_gzips_checksum_says(tmp_path):
    """gzip's checksum covers a .tar.gz's whole stream: a member extracted by reading up to it (above) is checked
    by one read of the stream, once per archive version, as a raster member is: a changed byte of the first scan
    (its deflate still inflating) was extracted as other data."""
    from tilemask.sources.archive import extract

    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w:gz", compresslevel=0) as tf:  # stored deflate blocks: bytes as they are
        for i in range(3):
            info = tarfile.TarInfo(f"case{i}/scan.nii")
            info.size = 100_000
            tf.addfile(info, io.BytesIO(bytes([i + 1]) * 100_000))
    data = bytearray(packed.getvalue())
    at = data.index(bytes([1]) * 64) + 1000  # inside case0's data
    data[at] ^= 0xFF
    archive = tmp_path / "scans.tar.gz"
    archive.write_bytes(bytes(data))
    with pytest.raises(InputError, match=re.escape(f"{archive}: the archive is damaged (CRC check failed")):
        extract(f"/vsitar/{archive}/case0/scan.nii", str(archive), "case0/scan.nii", str(tmp_path / "x.nii"))


@pytest.mark.timeout(60)
def test_an_archive_replaced_keeping_its_size_and_time_is_extracted_again(tmp_path, monkeypatch):
    """A NIfTI member is extracted once per archive version; an archive replaced keeping its size and time
    (``rsync -a``: written aside, renamed over it, its time kept) had the path, size and time of the one before,
    and its member's scratch copy, the old scan, was read in silence."""
    from tilemask.storage import local_copy

    monkeypatch.setenv("TILEMASK_SCRATCH", str(tmp_path / "scratch"))
    archive = tmp_path / "scans.tar.gz"

    def packed(version: int) -> Path:
        with tarfile.open(tmp_path / "new.tar.gz", "w:gz", compresslevel=0) as tf:
            info = tarfile.TarInfo("scan.nii")
            info.size = 1000
            tf.addfile(info, io.BytesIO(bytes([version]) * 1000))
        return tmp_path / "new.tar.gz"

    os.replace(packed(1), archive)
    first = archive.stat()
    with open(local_copy(f"/vsitar/{archive}/scan.nii"), "rb") as copy:
        assert copy.read() == bytes([1]) * 1000
    os.utime(packed(2), ns=(first.st_atime_ns, first.st_mtime_ns))
    os.replace(tmp_path / "new.tar.gz", archive)
    assert (archive.stat().st_size, archive.stat().st_mtime_ns) == (first.st_size, first.st_mtime_ns)
    with open(local_copy(f"/vsitar/{archive}/scan.nii"), "rb") as copy:
        assert copy.read() == bytes([2]) * 1000


def test_a_nifti_inside_a_tar_gz_is_read_from_a_scratch_copy(make_volume, make_model, tmp_path, client, monkeypatch):
    monkeypatch.setenv("TILEMASK_SCRATCH", str(tmp_path / "scratch"))
    path, _ = make_volume(shape=(30, 28, 26))
    with tarfile.open(tmp_path / "scans.tar.gz", "w:gz") as tf:
        tf.add(path, "case/scan.nii.gz")
    weights, _ = make_model(UNET_3D)
    outputs = {}
    for kind, given in [("file", str(path)), ("tar", {"archive": "scans.tar.gz", "members": "*.nii.gz"})]:
        workflow = volume_workflow(path, weights, {"roi_size": [24, 24, 24]}, {"path": f"{kind}/{{stem}}.nii.gz", "probabilities": "none"})
        workflow["input"] = given
        (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
        outputs[kind] = result.outputs[0]
    import nibabel as nib

    a, b = nib.load(outputs["file"]), nib.load(outputs["tar"])
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    np.testing.assert_allclose(a.affine, b.affine)
    assert list((tmp_path / "scratch" / "tilemask-archives").glob("*/scan.nii.gz")), "the member was staged to scratch"


@pytest.mark.timeout(60)
def test_a_relative_archive_member_path_resolves_against_the_list_or_workflow_folder(make_model, tmp_path,
                                                                                       monkeypatch):  # fmt: skip
    """A reviewer's list file ``project/lists/items.txt`` naming ``/vsizip/scenes.zip/a.tif`` (GDAL's path of a
    member of a relative archive): every other relative path in a list resolves against its folder, this one was
    read against the working directory ("cannot open raster: no such archive scenes.zip", exit 2, from any other
    folder; or another folder's archive of that name, read in silence), and so was such a path as ``input:``, against
    the workflow's folder. A STAC asset's href is resolved as a list's path is."""
    from tilemask.planning import plan_model

    weights, _ = make_model(UNET_2D)
    scene = str(GEO["RGB.byte.tif"])
    project = tmp_path / "project"
    (project / "lists").mkdir(parents=True)
    for archive in (project / "lists" / "scenes.zip", project / "scenes.zip"):
        with zipfile.ZipFile(archive, "w") as zf:
            zf.write(scene, "d/a.tif")
    (project / "lists" / "items.txt").write_text("/vsizip/scenes.zip/d/a.tif\n/vsitar/../b.tar.gz/x.tif\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    def planned(given) -> list[str]:
        workflow = raster_workflow(scene, weights, output={"path": "out/{stem}_mask.tif"}) | {"input": given}
        return [f for item in Workflow.from_dict(workflow, base_dir=project).input_items() for f in item.files]

    assert planned({"list": "lists/items.txt"}) == [f"/vsizip/{project}/lists/scenes.zip/d/a.tif",
                                                    f"/vsitar/{project}/b.tar.gz/x.tif"]  # fmt: skip
    assert planned("/vsizip/scenes.zip/d/a.tif") == [f"/vsizip/{project}/scenes.zip/d/a.tif"]
    absolute = [f"/vsizip/{project}/scenes.zip/d/a.tif", "/vsizip//vsicurl/https://example.com/a.zip/d/a.tif"]
    assert planned(absolute) == absolute  # as given
    workflow = raster_workflow(scene, weights, output={"path": "out/{stem}_mask.tif"})
    (item,) = plan_model(Workflow.from_dict(workflow | {"input": "/vsizip/scenes.zip/d/a.tif"}, base_dir=project)).items
    from tilemask.sources import open_source

    assert open_source(item.files[0], spatial_dims=2).shape == (3, 718, 791)  # read from elsewhere
    stac = {"type": "Feature", "stac_version": "1.0.0", "id": "a", "geometry": None, "links": [],
            "properties": {"datetime": "2000-01-01T00:00:00Z"},
            "assets": {"rgb": {"href": "/vsizip/scenes.zip/d/a.tif"}}}  # fmt: skip
    (project / "lists" / "a.json").write_text(json.dumps(stac))
    assert planned({"stac": "lists/a.json", "assets": ["rgb"]}) == [f"/vsizip/{project}/lists/scenes.zip/d/a.tif"]


@pytest.mark.timeout(60)
def test_an_archive_under_home_is_read_there(make_model, tmp_path, monkeypatch):
    """``input: ~/scenes.tif`` is read under the home folder; ``/vsizip/~/scenes.zip/a.tif`` was kept as given, and
    GDAL read a folder named ``~`` under the working directory ("no such archive ~/scenes.zip")."""
    weights, _ = make_model(UNET_2D)
    scene = str(GEO["RGB.byte.tif"])
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    workflow = raster_workflow(scene, weights, output={"path": "out/{stem}_mask.tif"})
    for given in ("/vsizip/~/scenes.zip/d/a.tif", "/vsitar/~/scans/scenes.tar/d/a.tif"):
        (item,) = Workflow.from_dict(workflow | {"input": given}, base_dir=tmp_path).input_items()
        assert item.files == (given.replace("/~/", f"/{tmp_path}/home/"),)


@pytest.mark.timeout(60)
def test_a_relative_archive_in_a_catalogs_item_resolves_against_the_items_folder(tmp_path):
    """A STAC catalog whose item lies in its own folder (``items/x/x.json``): its asset ``./a.tif`` resolved against
    the item's folder, as pystac resolves any relative href, and ``/vsizip/scenes.zip/a.tif`` (a relative archive's
    member, made absolute as a relative href is) against the catalog's, another folder's archive or none."""
    from tilemask.inputs import stac_items

    (tmp_path / "items" / "x").mkdir(parents=True)
    item = {"type": "Feature", "stac_version": "1.0.0", "id": "x", "geometry": None, "bbox": None,
            "links": [{"rel": "root", "href": "../../catalog.json"}, {"rel": "parent", "href": "../../catalog.json"}],
            "properties": {"datetime": "2000-01-01T00:00:00Z"},
            "assets": {"zipped": {"href": "/vsizip/scenes.zip/a.tif"}, "plain": {"href": "./a.tif"}}}  # fmt: skip
    (tmp_path / "items" / "x" / "x.json").write_text(json.dumps(item))
    catalog = {"type": "Catalog", "stac_version": "1.0.0", "id": "c", "description": "scenes",
               "links": [{"rel": "item", "href": "./items/x/x.json"}, {"rel": "root", "href": "./catalog.json"}]}  # fmt: skip
    (tmp_path / "catalog.json").write_text(json.dumps(catalog))
    (found,) = stac_items(str(tmp_path / "catalog.json"), ["zipped", "plain"])
    assert found.files == (f"/vsizip/{tmp_path}/items/x/scenes.zip/a.tif", f"{tmp_path}/items/x/a.tif")


@pytest.mark.timeout(60)
def test_an_archive_holding_one_name_twice_is_refused_saying_so(make_raster, tmp_path):
    """A reviewer's zip appended to (``zipfile`` mode "a", an interrupted update): it held ``a/x.tif`` twice, and
    the run said "/vsizip/.../a/x.tif and /vsizip/.../a/x.tif would both write x_mask.tif; ... rename one" of two
    inputs of one name. The archive is refused naming the member it holds twice (GDAL reads only one of them)."""
    import warnings

    scene, _ = make_raster((3, 20, 30))
    for archive in ("twice.zip", "twice.tar"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile's "Duplicate name"
            if archive.endswith(".zip"):
                with zipfile.ZipFile(tmp_path / archive, "w") as zf:
                    for name in ("a/x.tif", "a/y.tif", "a/x.tif"):
                        zf.write(scene, name)
            else:
                with tarfile.open(tmp_path / archive, "w") as tf:
                    for name in ("./a/x.tif", "a/y.tif", "a/x.tif"):
                        tf.add(scene, name)
        from tilemask.inputs import archive_items

        with pytest.raises(InputError, match=re.escape(f"input.archive: {tmp_path / archive}: it holds 2 members named "
                                                       "a/x.tif")) as refused:  # fmt: skip
            archive_items(str(tmp_path / archive), "*.tif")
        assert refused.value.exit_status == 2
        assert len(archive_items(str(tmp_path / archive), "y.tif")) == 1  # the others are read


@pytest.mark.timeout(60)
def test_a_tar_gz_whose_stream_does_not_inflate_is_refused_naming_it(make_raster, tmp_path):
    """A reviewer's batch of a damaged .tar.gz whose deflate stream breaks past its first member (zlib's "invalid
    block type" as the listing reads the headers): the run ended "tilemask: error: error: Error -3 while
    decompressing data: invalid block type", exit 1, naming no archive. It is refused as an archive that cannot be
    read, exit 2, as a cut one is."""
    import gzip

    scene, _ = make_raster((3, 20, 30))
    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w") as tf:
        tf.add(scene, "a.tif")
        tf.add(scene, "b.tif")
    first = 512 + -(-os.path.getsize(scene) // 512) * 512  # a.tif's header and data
    head = gzip.compress(packed.getvalue()[:first])
    tail = bytearray(gzip.compress(packed.getvalue()[first:]))  # a second gzip member, as pigz or cat may make
    tail[10] = 0x07  # its first deflate block: final, of the type that does not exist
    (tmp_path / "scenes.tar.gz").write_bytes(head + bytes(tail))
    from tilemask.inputs import archive_items

    with pytest.raises(InputError, match=re.escape(f"input.archive: {tmp_path}/scenes.tar.gz: cannot read the "
                                                   "archive: Error -3 while decompressing data")) as refused:  # fmt: skip
        archive_items(str(tmp_path / "scenes.tar.gz"), "*.tif")
    assert refused.value.exit_status == 2


def test_a_tar_of_a_folder_whose_members_are_named_dot_slash_is_read(make_raster, make_volume, make_model, tmp_path,
                                                                     client, monkeypatch):  # fmt: skip
    """``tar -czf scenes.tar.gz -C scenes .``, the usual way to pack a folder, names its members ``./a.tif``: each
    input was ``/vsitar/.../scenes.tar.gz/./a.tif``, which GDAL does not find ("does not exist in the file system",
    exit 2 at the first). They are named as GDAL reads them, ``a.tif``; a NIfTI member is still extracted."""
    monkeypatch.setenv("TILEMASK_SCRATCH", str(tmp_path / "scratch"))
    path, _ = make_raster((3, 80, 90), name="a.tif")
    volume, data = make_volume(shape=(20, 18, 16))
    with tarfile.open(tmp_path / "scenes.tar.gz", "w:gz") as tf:
        tf.add(path, "./a.tif")
        tf.add(volume, "./sub/scan.nii.gz")
    assert tarfile.open(tmp_path / "scenes.tar.gz").getnames() == ["./a.tif", "./sub/scan.nii.gz"]
    weights, _ = make_model()
    workflow = raster_workflow(path, weights, output={"path": "out/{stem}.zarr", "chunks": 64})
    workflow["input"] = {"archive": "scenes.tar.gz", "members": "*.tif"}
    (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    assert (result.status, result.input) == ("ok", f"/vsitar/{tmp_path}/scenes.tar.gz/a.tif") and result.windows > 0
    assert not (tmp_path / "scenes.tar.gz.properties").exists()  # GDAL's gzip index: no file beside an input
    from tilemask.inputs import archive_items
    from tilemask.storage import local_copy

    (item,) = archive_items(str(tmp_path / "scenes.tar.gz"), "*.nii.gz")
    assert item.files == (f"/vsitar/{tmp_path}/scenes.tar.gz/sub/scan.nii.gz",)
    import nibabel as nib

    np.testing.assert_array_equal(np.asarray(nib.load(local_copy(item.files[0])).dataobj), data)


@pytest.mark.timeout(60)
def test_an_archive_member_gdal_cannot_read_is_named_with_why(make_raster, make_model, tmp_path):
    """A zip member compressed with LZMA or bzip2 (``zipfile``'s, 7-Zip's) was refused as "cpl_unzOpenCurrentFile()
    failed", and one named ``../../x.tif`` as not existing "in the file system": the one line says why."""
    path, _ = make_raster((3, 40, 40))
    weights, _ = make_model()
    cases = {"lzma.zip": (zipfile.ZIP_LZMA, "a.tif", "is compressed with LZMA, which GDAL does not read (stored or "
                                                     "deflate only); pack the archive again with deflate"),
             "bzip2.zip": (zipfile.ZIP_BZIP2, "a.tif", "is compressed with bzip2, which GDAL does not read"),
             "up.zip": (zipfile.ZIP_DEFLATED, "../../a.tif", "is named with '..', which GDAL does not read"),
             }  # fmt: skip
    for archive, (method, member, words) in cases.items():
        with zipfile.ZipFile(tmp_path / archive, "w", compression=method) as zf:
            zf.writestr(member, path.read_bytes())
        workflow = raster_workflow(path, weights)
        workflow["input"] = {"archive": archive, "members": "*.tif"}
        with pytest.raises(InputError) as refused:
            tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path))  # refused before a cluster starts
        said = str(refused.value)
        assert said.startswith(f"/vsizip/{tmp_path}/{archive}/{member}: cannot open raster: {tmp_path}/{archive}: its "
                               f"member {member} {words}"), said  # fmt: skip
        assert refused.value.exit_status == 2


@pytest.mark.slow  # seven `tilemask` processes (10 s)
def test_a_running_job_whose_process_is_gone_is_lost_and_cancel_ends_it(tmp_path):
    import socket
    import subprocess
    import sys

    job = JobFolder(tmp_path / "job")
    job.create({"version": 1}, str(tmp_path), None, {}, [{"item": 0, "name": "a", "files": ["a.tif"], "output": "o"}])
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    job.set_status("running", host=socket.gethostname(), pid=int(gone.stdout))
    assert run_cli("status", job.path, "--json").returncode == 0
    assert json.loads(run_cli("status", job.path, "--json").stdout)["state"] == "lost"
    job.set_status("running", host=socket.gethostname(), pid=os.getpid())
    with job:  # this process holds the job's lock: it runs the job, and does not heed the cancel
        assert json.loads(run_cli("status", job.path, "--json").stdout)["state"] == "running"
        ignored = run_cli("cancel", job.path, "--wait", "1")
        assert ignored.returncode == 1 and ignored.stdout.strip() == f"job {job.id}: cancel requested; still running after 1 s"
        assert job.cancel_requested()
    assert json.loads(run_cli("status", job.path, "--json").stdout)["state"] == "lost"  # the lock is free
    cancelled = run_cli("cancel", job.path)
    assert cancelled.returncode == 0 and cancelled.stdout.strip() == f"job {job.id}: cancelled"
    assert json.loads((job.path / "status.json").read_text())["state"] == "cancelled"


@pytest.mark.slow
def test_a_foreground_run_stopped_by_cancel_says_so_in_one_line_exit_1(make_raster, make_model, write_workflow,
                                                                        tmp_path):
    """``tilemask cancel JOB`` of a ``tilemask run`` printed two lines: ``WARNING tilemask.driver: job ...: cancel
    requested``, then ``tilemask: error: job ... was cancelled``."""
    from .test_trust import one_line, start, wait_for

    scene, _ = make_raster((3, 3000, 3000), name="big.tif")
    weights, _ = make_model()
    workflow = raster_workflow(scene, weights, output={"path": "out/{stem}.zarr", "chunks": 512})
    proc = start(["run", write_workflow(workflow), "--workers", "1", "--no-progress"], tmp_path)
    jobs = tmp_path / "out" / ".tilemask" / "jobs"
    wait_for(lambda: any(jobs.glob("*/manifest.jsonl")), what="the item started", proc=proc)
    (job,) = jobs.iterdir()
    cancelled = run_cli("cancel", job.name)
    assert cancelled.returncode == 0 and cancelled.stdout == f"job {job.name}: cancelled\n", cancelled.stderr
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1 and stdout == ""
    assert one_line(stderr) == f"tilemask: error: job {job.name} was cancelled"
    assert json.loads((job / "status.json").read_text())["state"] == "cancelled"


def test_the_state_of_a_running_job_is_read_from_a_folder_this_user_may_not_write(tmp_path):
    """``tilemask status`` of a job that a run on this host runs, asked by a user who may not write its folder (a
    teammate's job, a read-only mount), opened the job's lock to write and failed: ``tilemask: error: OSError:
    [Errno 30] Read-only file system: '.../lock'``, exit 1. The lock is tried through a read-only descriptor."""
    import socket
    import subprocess
    import sys

    unshare = shutil.which("unshare")
    if not unshare or subprocess.run([unshare, "-m", "mount", "--bind", tmp_path, tmp_path]).returncode:
        pytest.skip("no mount namespace to make a read-only view of a folder in")
    job = JobFolder(tmp_path / "job")
    job.create({"version": 1}, str(tmp_path), None, {}, [{"item": 0, "name": "a", "files": ["a.tif"], "output": "o"}])
    job.set_status("running", host=socket.gethostname(), pid=os.getpid())
    exe = Path(sys.executable).parent / "tilemask"
    read_only = (f"mount --bind {job.path} {job.path} && mount -o remount,bind,ro {job.path} && "
                 f"! touch {job.path}/x 2>/dev/null && exec {exe} status {job.path} --json")  # fmt: skip
    with job:  # this process runs the job
        asked = subprocess.run([unshare, "-m", "sh", "-c", read_only], capture_output=True, text=True, timeout=60)
    assert asked.returncode == 0 and json.loads(asked.stdout)["state"] == "running", asked.stderr


def test_a_lock_another_process_holds_reads_as_held_and_a_free_one_as_free(tmp_path):
    """The lock is asked for shared through a read-only descriptor (on NFS an exclusive byte-range lock needs the
    file open to write: EBADF, which read as held, so a dead run was never lost); only a conflict is held."""
    import subprocess
    import sys

    from tilemask.jobs import _holds_lock

    job = JobFolder(tmp_path / "job")
    job.create({"version": 1}, str(tmp_path), None, {}, [{"item": 0, "name": "a", "files": ["a.tif"], "output": "o"}])
    with job:
        pass
    assert not _holds_lock(job)
    hold = "import fcntl, os, sys; fcntl.flock(os.open(sys.argv[1], os.O_RDWR), fcntl.LOCK_EX); print(flush=True); input()"
    holder = subprocess.Popen([sys.executable, "-c", hold, job.path / "lock"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline() == "\n"  # it holds the lock
        assert _holds_lock(job)
        assert _holds_lock(job), "asking does not take the lock from its holder"
    finally:
        holder.communicate("\n", timeout=30)
    assert not _holds_lock(job)


def test_a_job_whose_run_was_killed_before_it_recorded_its_state_is_lost_and_cancel_ends_it(tmp_path):
    """A run killed after it created its job but before it wrote ``status.json`` (while it checked what earlier runs
    finished: a request per remote input) left the job ``queued`` for ever, and ``tilemask cancel`` waited its minute
    out: "cancel requested; still queued after 60 s", exit 1. Nothing holds its lock: it is lost."""
    job = JobFolder(tmp_path / "job")
    job.create({"version": 1}, str(tmp_path), None, {}, [{"item": 0, "name": "a", "files": ["a.tif"], "output": "o"}])
    assert not (job.path / "status.json").exists()
    with job:  # the process that creates the job holds its lock while it does
        assert json.loads(run_cli("status", job.path, "--json").stdout)["state"] == "queued"
    assert json.loads(run_cli("status", job.path, "--json").stdout)["state"] == "lost"
    cancelled = run_cli("cancel", job.path, "--wait", "5")
    assert (cancelled.returncode, cancelled.stdout) == (0, f"job {job.id}: cancelled\n"), cancelled.stderr
    assert json.loads((job.path / "status.json").read_text())["state"] == "cancelled"


@pytest.mark.timeout(60)
def test_cancel_with_a_wait_that_is_no_number_of_seconds_is_refused_before_it_asks(tmp_path):
    """``tilemask cancel JOB --wait -1`` (or ``nan``) wrote the cancel request, then said "cancel requested; still
    running after -1 s", exit 1, at once: a usage error, refused (exit 2) before anything is written."""
    import socket

    from click.testing import CliRunner

    from tilemask.cli import main

    job = JobFolder(tmp_path / "job")
    job.create({"version": 1}, str(tmp_path), None, {}, [{"item": 0, "name": "a", "files": ["a.tif"], "output": "o"}])
    job.set_status("running", host=socket.gethostname(), pid=os.getpid())
    with job:  # this process runs the job
        for wait in ("-1", "nan"):
            refused = CliRunner().invoke(main, ["cancel", str(job.path), "--wait", wait])
            assert refused.exit_code == 2, refused.stdout + refused.stderr
            assert refused.stderr == (f"tilemask: error: Invalid value for '--wait': {wait} is not a number of seconds "
                                      "(0 or more)\n")  # fmt: skip
            assert not job.cancel_requested()


def test_jobs_lists_the_others_when_one_record_is_damaged(tmp_path):
    """One unreadable ``status.json`` made ``tilemask jobs`` list nothing, exit 2."""
    folders = [JobFolder(tmp_path / name) for name in ("a", "b")]
    for n, job in enumerate(folders):
        job.create({"version": 1, "n": n}, str(tmp_path), None, {}, [{"item": 0, "name": "x", "files": [], "output": "o"}])
        job.set_status("done")
    import socket

    from click.testing import CliRunner

    from tilemask.cli import main

    # not JSON; JSON, not the record; a record whose pid is no number (it was "ValueError: invalid literal for int()",
    # exit 1, and nothing listed)
    here = socket.gethostname()
    # a state tilemask never writes was listed as it was ("finished"), and tilemask status said it
    for damage in ("garbage", "[]", json.dumps({"state": "running", "host": here, "pid": "12ab"}),
                   json.dumps({"state": "finished"})):  # fmt: skip
        (folders[0].path / "status.json").write_text(damage)
        listing = CliRunner().invoke(main, ["jobs"])
        assert listing.exit_code == 0, listing.stderr
        assert [line.split()[0] for line in listing.stdout.splitlines()] == [folders[1].id]
        (warning,) = listing.stderr.strip().splitlines()
        assert warning.startswith(f"tilemask: warning: {folders[0].path}/status.json: unreadable: ")
        assert warning.endswith("left out of the list")
    assert warning == (f"tilemask: warning: {folders[0].path}/status.json: unreadable: state 'finished' is not one of "
                       "queued, running, done, failed, cancelled (a run with --overwrite starts the job afresh); "
                       "left out of the list")  # fmt: skip
    status = CliRunner().invoke(main, ["status", str(folders[0].path)])
    assert (status.exit_code, status.stdout) == (2, ""), status.stdout
    (folders[0].path / "status.json").write_text(json.dumps({"state": "running", "host": here, "pid": "12ab"}))
    (warning,) = CliRunner().invoke(main, ["jobs"]).stderr.strip().splitlines()
    assert "pid '12ab' is not a pid" in warning
    # a scheduler address that is none (it was "ValueError: missing port number in address 'nowhere'", exit 1)
    nowhere = {"state": "running", "scheduler": "nowhere", "driver": "k"}
    (folders[0].path / "status.json").write_text(json.dumps(nowhere))
    listing = CliRunner().invoke(main, ["jobs"])
    assert listing.exit_code == 0 and sorted(line.split()[:2] for line in listing.stdout.splitlines()) == sorted(
        [[folders[1].id, "done"], [folders[0].id, "lost"]]), listing.stderr  # fmt: skip
    (folders[0].path / "status.json").unlink()
    (folders[0].path / "items.jsonl").write_text('{"item": 0}\n')
    (warning,) = CliRunner().invoke(main, ["jobs"]).stderr.strip().splitlines()
    assert warning.startswith(f"tilemask: warning: {folders[0].path}/items.jsonl line 1: not an input's record")



@pytest.mark.timeout(60)
def test_a_job_record_or_manifest_line_that_is_json_but_no_record_is_one_line(tmp_path):
    """A ``job.json`` or a manifest line that is JSON but not what tilemask writes there (``[]``, ``null``, a line
    without a name or an ok line without outputs: an edited or damaged folder) was a bare ``TypeError``,
    ``AttributeError`` or ``KeyError`` from ``tilemask status`` and ``run`` (exit 1), and made ``tilemask jobs``
    list nothing."""
    from click.testing import CliRunner

    from tilemask.cli import main

    folders = [JobFolder(tmp_path / name) for name in ("a", "b")]
    for n, job in enumerate(folders):
        job.create({"version": 1, "n": n}, str(tmp_path), None, {}, [{"item": 0, "name": "x", "files": [], "output": "o"}])
        job.record({"item": 0, "name": "x", "input": "x.tif", "status": "started"})
        job.set_status("done")
    damaged, good = folders
    manifest = (damaged.path / "manifest.jsonl").read_text()
    for line in ("[1, 2]", "null", '"x"', '{"status": "ok"}', '{"name": "x", "input": "x.tif", "status": "ok"}'):
        (damaged.path / "manifest.jsonl").write_text(manifest + line + "\n")
        with pytest.raises(JobError, match="manifest.jsonl line 2: not an attempt's record; the manifest is damaged"):
            damaged.manifest()
        status = CliRunner().invoke(main, ["status", str(damaged.path)])
        assert status.exit_code == 2 and status.stderr == (f"tilemask: error: {damaged.path}/manifest.jsonl line 2: not "
                                                           "an attempt's record; the manifest is damaged (a run with "
                                                           "--overwrite starts the job afresh)\n")  # fmt: skip
        listing = CliRunner().invoke(main, ["jobs"])
        assert listing.exit_code == 0, listing.stderr
        assert [row.split()[0] for row in listing.stdout.splitlines()] == [good.id]
    (damaged.path / "manifest.jsonl").write_text(manifest)
    # a line that is not UTF-8 (a damaged disk) was a UnicodeDecodeError naming no file, exit 1; tilemask jobs failed
    for name, said in (("manifest.jsonl", "line 2 is not JSON; the manifest is damaged (a run with --overwrite "
                                          "starts the job afresh)"),
                       ("items.jsonl", "line 2: not an input's record; the job's record is damaged")):  # fmt: skip
        kept = (damaged.path / name).read_bytes()
        (damaged.path / name).write_bytes(kept + b'{"name": "\xff"}\n')
        status = CliRunner().invoke(main, ["status", str(damaged.path)])
        assert (status.exit_code, status.stderr) == (2, f"tilemask: error: {damaged.path}/{name} {said}\n")
        listing = CliRunner().invoke(main, ["jobs"])
        assert listing.exit_code == 0 and [row.split()[0] for row in listing.stdout.splitlines()] == [good.id]
        (damaged.path / name).write_bytes(kept)
    for record in ("[]", "null", "5"):
        (damaged.path / "job.json").write_text(record)
        with pytest.raises(JobError, match="job.json: unreadable: not a JSON object"):
            damaged.info()
        status = CliRunner().invoke(main, ["status", str(damaged.path)])
        assert status.exit_code == 0, status.stderr  # the state is in status.json; the id falls back to the name
        assert status.stdout.startswith("job a: done")
        listing = CliRunner().invoke(main, ["jobs"])
        assert listing.exit_code == 0, listing.stderr
        assert sorted(row.split()[0] for row in listing.stdout.splitlines()) == sorted(["a", good.id])


@pytest.mark.slow  # waits out one connect timeout (5 s)
def test_jobs_asks_a_gone_scheduler_once_for_all_its_jobs(tmp_path):
    """``tilemask jobs`` asked each queued job's scheduler in turn (a reviewer's 4 jobs of a scheduler that was gone
    listed nothing for 21 s), then once per job, 16 at a time: a review's 48 jobs queued on a scheduler that was since
    stopped listed nothing for 15.2 s (three connect timeouts), 200 would take 65 s. Each scheduler is
    asked once about all its jobs' drivers; one that still runs them answers for each."""
    import time

    from distributed import LocalCluster

    from .conftest import _free_port

    gone = f"tcp://127.0.0.1:{_free_port()}"  # nothing listens there
    for n in range(40):
        job = JobFolder(tmp_path / f"job{n}")
        job.create({"version": 1, "n": n}, str(tmp_path), None, {}, [{"item": 0, "name": "x", "files": [], "output": "o"}])
        job.set_status("queued", scheduler=gone, driver=f"tilemask-job-{job.id}-0")
    begin = time.monotonic()
    listing = run_cli("jobs")
    took = time.monotonic() - begin
    assert listing.returncode == 0, listing.stderr
    assert [line.split()[1] for line in listing.stdout.splitlines()] == ["lost"] * 40
    assert took < 12, f"{took:.1f} s: one connect timeout (5 s) for the scheduler, not one per 16 jobs"
    # a scheduler that is there is asked about each driver: one it holds is queued, one it does not know is lost
    with LocalCluster(n_workers=0, processes=False, protocol="tcp://", host="127.0.0.1",
                      dashboard_address=":0") as cluster:
        from distributed import Client

        with Client(cluster.scheduler_address) as client:
            held = client.submit(time.sleep, 600, key="tilemask-job-held-0")  # no worker runs it: held
            while "tilemask-job-held-0" not in client.run_on_scheduler(lambda dask_scheduler: [*dask_scheduler.tasks]):
                time.sleep(0.05)
            for n, key in ((0, "tilemask-job-held-0"), (1, "tilemask-job-unknown-0")):
                JobFolder(tmp_path / f"job{n}").set_status("queued", scheduler=cluster.scheduler_address, driver=key)
            listing = run_cli("jobs", "--json")
            assert listing.returncode == 0, listing.stderr
            states = {Path(s["folder"]).name: s["state"] for s in json.loads(listing.stdout)}
            assert (states["job0"], states["job1"], states["job2"]) == ("queued", "lost", "lost")
            del held


def test_jobs_asks_squeue_once_about_all_its_slurm_jobs(tmp_path):
    """``tilemask jobs`` ran ``squeue`` once per ``submit --cluster slurm`` job, 16 at a time: where SLURM's
    controller does not answer, squeue took 18 s each here, so 40 such jobs listed nothing for about a minute. One
    ``squeue`` is asked about all of them (a fake one here, which logs its calls): a job it lists is in its state,
    one it does not is lost, and where it cannot answer each job is as recorded."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "squeue").write_text(f"""#!{sys.executable}
import os, sys
with open({str(calls)!r}, "a") as log:
    print(*sys.argv[1:], file=log)
if os.environ.get("SQUEUE_DOWN"):
    sys.exit("slurm_load_jobs error: Unable to contact slurm controller (connect failure)")
ids, form = sys.argv[sys.argv.index("-j") + 1].split(","), sys.argv[sys.argv.index("-o") + 1]
listed = {{"7": "PENDING", "8": "RUNNING"}}  # the jobs SLURM lists; 9 and the others it has forgotten
if len(ids) == 1 and ids[0] not in listed:
    sys.exit("slurm_load_jobs error: Invalid job id specified")
for job in ids:
    if job in listed:
        print(form.replace("%A", job).replace("%T", listed[job]).replace("%r", "Resources"))
""")
    (bin_dir / "squeue").chmod(0o755)
    for n in range(40):
        job = JobFolder(tmp_path / f"job{n}")
        job.create({"version": 1, "n": n}, str(tmp_path), None, {}, [{"item": 0, "name": "x", "files": [], "output": "o"}])
        job.set_status("running" if n else "queued", slurm_job=str(7 + n))
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    listing = run_cli("jobs", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    summaries = {Path(s["folder"]).name: s for s in json.loads(listing.stdout)}
    states = {name: s["state"] for name, s in summaries.items()}
    assert states == {"job0": "queued", "job1": "running", **{f"job{n}": "lost" for n in range(2, 40)}}
    assert summaries["job0"]["message"] == "its driver job, SLURM job 7, is pending (Resources)"
    assert len(calls.read_text().splitlines()) == 1, calls.read_text()
    calls.unlink()
    listing = run_cli("jobs", "--json", env={**env, "SQUEUE_DOWN": "1"})
    assert listing.returncode == 0, listing.stderr
    states = {Path(s["folder"]).name: s["state"] for s in json.loads(listing.stdout)}
    assert states == {"job0": "queued", **{f"job{n}": "running" for n in range(1, 40)}}
    assert len(calls.read_text().splitlines()) == 1, calls.read_text()


def test_one_squeue_for_all_slurm_jobs_reads_a_driver_in_an_array_task_and_outlives_an_id_it_cannot_read(tmp_path):
    """One ``squeue`` for all the SLURM jobs: an id squeue cannot read (an edited ``status.json``) failed the whole
    question ("squeue: error: Invalid job id: x7", exit 1) and every job read lost, as SLURM no longer knew it; and
    ``%i`` names an array task ``12_4``, not the ``SLURM_JOB_ID`` its driver recorded (30), so that driver read lost
    too, ``tilemask status`` of it alone included (``squeue -o %T`` gave its state).  A fake squeue here, which answers
    as SLURM 23's does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(f"""#!{sys.executable}
import sys
ids, form = sys.argv[sys.argv.index("-j") + 1].split(","), sys.argv[sys.argv.index("-o") + 1]
bad = [job for job in ids if not job.isdigit() or job == "0"]
if bad:
    sys.exit(f"squeue: error: Invalid job id: {{bad[0]}}")
listed = {{"7": ("7", "PENDING"), "8": ("8", "RUNNING"), "30": ("12_4", "RUNNING")}}  # raw id: (%i, %T)
if len(ids) == 1 and ids[0] not in listed:
    sys.exit("slurm_load_jobs error: Invalid job id specified")
for job in ids:
    if job in listed:
        name, state = listed[job]
        print(form.replace("%i", name).replace("%A", job).replace("%T", state).replace("%r", "Resources"))
""")
    (bin_dir / "squeue").chmod(0o755)
    for n, slurm_job in enumerate(["7", "8", "30", "x7", "9"]):
        job = JobFolder(tmp_path / f"job{n}")
        items = [{"item": 0, "name": "x", "files": [], "output": "o"}]
        job.create({"version": 1, "n": n}, str(tmp_path), None, {}, items)
        job.set_status("running" if n else "queued", slurm_job=slurm_job)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    listing = run_cli("jobs", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    summaries = {Path(s["folder"]).name: s for s in json.loads(listing.stdout)}
    states = {name: s["state"] for name, s in summaries.items()}
    assert states == {"job0": "queued", "job1": "running", "job2": "running", "job3": "lost", "job4": "lost"}
    assert summaries["job0"]["message"] == "its driver job, SLURM job 7, is pending (Resources)"
    alone = run_cli("status", str(tmp_path / "job2"), "--json", env=env)
    assert alone.returncode == 0, alone.stderr
    assert json.loads(alone.stdout)["state"] == "running"


def test_a_damaged_entry_of_the_job_list_is_named_and_the_others_listed(tmp_path):
    """An entry of ``$TILEMASK_HOME/jobs`` that could not be read (not UTF-8, a folder) made ``tilemask jobs`` list
    nothing (``tilemask: error: UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff ...``, exit 1), and an empty
    one was taken for the working folder. Each is named in a warning, as a job whose folder is not there."""
    from tilemask.jobs import home

    job = JobFolder(tmp_path / "job")
    job.create({"version": 1}, str(tmp_path), None, {}, [{"item": 0, "name": "x", "files": [], "output": "o"}])
    job.set_status("done")
    index = home() / "jobs"
    (index / "0bin").write_bytes(b"\xff\xfe")
    (index / "1dir").mkdir()
    (index / "2empty").write_text("\n")
    listing = run_cli("jobs", cwd=job.path)  # the working folder is a job's: an empty entry is not that job
    assert listing.returncode == 0 and listing.stdout.split()[:2] == [job.id, "done"], listing.stderr
    reasons = {"0bin": "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte",
               "1dir": "Is a directory", "2empty": "empty"}  # fmt: skip
    assert listing.stderr.splitlines() == [
        f"WARNING tilemask.jobs: job {name}: {index / name}: names no job folder ({reason}); to forget the job, "
        "remove it" for name, reason in reasons.items()
    ]
    status = run_cli("status", "0bin")
    assert (status.returncode, status.stderr) == (2, f"tilemask: error: {index / '0bin'}: names no job folder "
                                                     f"({reasons['0bin']}); to forget the job, remove it\n")


def test_jobs_whose_folders_are_not_there_are_named_in_one_line(tmp_path):
    """Each job whose folder was gone was one warning: a user who removed an output folder of 200 jobs got 200
    lines before the list. One line counts them and names the first three."""
    from tilemask.jobs import home

    folders = [JobFolder(tmp_path / f"f{n}" / "j") for n in range(6)]
    for n, job in enumerate(folders):
        job.create({"version": 1, "n": n}, str(tmp_path), None, {}, [{"item": 0, "name": "x", "files": [], "output": "o"}])
        job.set_status("done")
    gone = sorted((job.id, job.path) for job in folders[1:])  # the ids, as job.json records them
    for job in folders[1:]:
        shutil.rmtree(job.path.parent)
    listing = run_cli("jobs")
    assert listing.returncode == 0 and [line.split()[0] for line in listing.stdout.splitlines()] == [folders[0].id]
    named = ", ".join(f"{identity} ({path})" for identity, path in gone[:3])
    assert listing.stderr == (f"WARNING tilemask.jobs: 5 jobs' folders are not there (removed, or not mounted here): "
                              f"{named} and 2 more; to forget a job, remove its file in {home() / 'jobs'}\n")  # fmt: skip
    identity, path = gone[0]
    status = run_cli("status", identity)  # was "<folder>: not a tilemask job folder (no job.json)": it had been one
    entry = home() / "jobs" / identity
    assert (status.returncode, status.stderr) == (2, f"tilemask: error: job {identity}: its folder {path} is not there "
                                                     "(moved, removed, or not mounted here); give the folder where it "
                                                     f"is now, or to forget the job remove {entry}\n")


@pytest.mark.slow
def test_jobs_names_a_job_whose_folder_is_not_there(tmp_path):
    """A job whose folder was removed (with its outputs' folder) was left out of ``tilemask jobs`` without a word,
    its driver possibly still running (a reviewer's). It is named in a warning, each time: a folder on a file
    system this host has not mounted is not gone, so the job is not forgotten unless its entry is removed."""
    from tilemask.jobs import home

    folders = [JobFolder(tmp_path / name / ".tilemask" / "jobs" / "j") for name in ("kept", "removed")]
    for n, job in enumerate(folders):
        job.create({"version": 1, "n": n}, str(tmp_path), None, {}, [{"item": 0, "name": "x", "files": [], "output": "o"}])
        job.set_status("done")
    kept, removed = (job.id for job in folders)
    shutil.rmtree(tmp_path / "removed")
    first, again = run_cli("jobs"), run_cli("jobs")
    assert [line.split()[0] for line in first.stdout.splitlines()] == [kept]
    entry = home() / "jobs" / removed
    assert first.stderr.strip() == (f"WARNING tilemask.jobs: job {removed}: its folder {folders[1].path} is not there "
                                    f"(removed, or not mounted here); to forget the job, remove {entry}")  # fmt: skip
    assert (again.stdout, again.stderr) == (first.stdout, first.stderr)
    entry.unlink()
    assert run_cli("jobs").stderr == ""


def test_an_empty_job_is_refused_not_taken_for_the_current_folder(tmp_path):
    """A reviewer's: ``tilemask cancel ""`` (an unset ``$JOB``) took the current folder for the job; in a job
    folder it cancelled that job. ``status``, ``cancel`` and ``drive`` of an empty job are one line, exit 2."""
    job = JobFolder(tmp_path / ".tilemask" / "jobs" / "j")
    job.create({"version": 1}, str(tmp_path), None, {}, [{"item": 0, "name": "x", "files": [], "output": "o"}])
    job.set_status("queued")
    for command in ("status", "cancel"):
        done = run_cli(command, "", cwd=job.path)
        assert (done.returncode, done.stderr.strip()) == (
            2, "tilemask: error: no job given: give its id from tilemask jobs, or its folder"), command
    assert job.status()["state"] == "queued" and not (job.path / "cancel").exists()


@pytest.mark.slow
def test_a_damaged_state_record_says_what_starts_the_job_afresh_and_overwrite_does(make_raster, make_model,
                                                                                  write_workflow, tmp_path):
    """A damaged ``status.json`` (a disk that filled as it was written, an edit) refused ``status``, ``cancel``
    and every run of the job, ``--overwrite`` too, without a word of what to do. The line says; a run with
    ``--overwrite`` starts the job afresh, as it does a damaged manifest."""
    path, _ = make_raster((3, 64, 64))
    weights, _ = make_model()
    workflow = write_workflow(raster_workflow(path, weights))
    assert run_cli("run", workflow, "--quiet").returncode == 0
    (job,) = [line.split()[0] for line in run_cli("jobs").stdout.splitlines()]
    record = find(job).path / "status.json"
    record.write_text('{"state": ')
    afresh = " (a run with --overwrite starts the job afresh)"
    for args in (("status", job), ("cancel", job), ("run", workflow, "--no-progress")):
        done = run_cli(*args)
        assert (done.returncode, done.stdout, done.stderr) == (  # the refused run printed its input "done" first
            2, "", f"tilemask: error: {record}: unreadable: Expecting value: line 1 column 11 (char 10){afresh}\n"), args
    done = run_cli("run", workflow, "--quiet", "--overwrite")
    assert done.returncode == 0, done.stderr
    assert run_cli("status", job).stdout.startswith(f"job {job}: done, 1 of 1 items ok")


def test_a_job_stopped_while_it_writes_its_record_is_listed_and_reads_as_lost(tmp_path):
    """A Ctrl-C (or a kill) after job.json, while the items are written: `tilemask jobs` did not list the job, and
    its id was "no job"."""

    def items():
        yield {"item": 0, "name": "a", "files": ["a.tif"], "output": "o"}
        raise KeyboardInterrupt

    job = JobFolder(tmp_path / "job")
    with pytest.raises(KeyboardInterrupt):
        job.create({"version": 1}, str(tmp_path), None, {}, items())
    assert not (job.path / "items.jsonl").exists()
    listing = run_cli("jobs")
    assert listing.returncode == 0 and job.id in listing.stdout and "lost" in listing.stdout.split(job.id)[1]
    status = run_cli("status", job.id)
    assert status.returncode == 0 and "lost" in status.stdout


@pytest.mark.timeout(120)
def test_a_job_running_on_another_thread_of_this_process_is_named_so(make_raster, make_model, tmp_path, client):
    """A notebook runs a job on a thread of its own and calls ``tilemask.run`` on it again meanwhile: the second
    call was refused as "running in another process", which sent the user looking for a process that was not
    there. It says this process, and the first run goes on undisturbed."""
    path, _ = make_raster((3, 80, 90))
    weights, _ = make_model()
    workflow = Workflow.from_dict(raster_workflow(path, weights, output={"path": "out/{stem}.zarr", "chunks": 64}),
                                  base_dir=tmp_path)  # fmt: skip
    holding, tried = threading.Event(), threading.Event()

    def hold(result) -> None:  # the first run holds the job's lock while its item is told
        holding.set()
        tried.wait(60)

    first = []
    thread = threading.Thread(target=lambda: first.extend(tilemask.run(workflow, client, on_result=hold)))
    thread.start()
    try:
        assert holding.wait(90), "the first run told no result"
        with pytest.raises(JobError) as refused:
            tilemask.run(workflow, client)
    finally:
        tried.set()
        thread.join(60)
    job = re.search(r"job (\w+) is", str(refused.value)).group(1)
    assert str(refused.value) == (f"job {job} is running in this process (another thread's tilemask.run); see "
                                  f"tilemask status {job}"), str(refused.value)  # fmt: skip
    assert [r.status for r in first] == ["ok"]


@pytest.mark.timeout(30)
def test_a_job_held_by_this_process_before_its_status_says_running_is_named_so(tmp_path):
    """The lock is taken before the run writes "running" (and its pid) in the job's status: a second
    ``tilemask.run`` meanwhile (the first still writing the job's record, or reading its manifest), or any time
    in a job whose status still held an earlier run's "done", was told "running in another process". It is the
    lock this process holds that says so, not the status."""
    first = JobFolder(tmp_path / "job").acquire()
    try:
        with pytest.raises(JobError) as refused:
            JobFolder(tmp_path / "job").acquire()
    finally:
        first.release()
    assert "is running in this process (another thread's tilemask.run)" in str(refused.value), str(refused.value)
    JobFolder(tmp_path / "job").acquire().release()  # released, it is free again


@pytest.mark.timeout(60)
def test_two_runs_of_one_job_started_at_once_in_one_process_name_this_process(tmp_path):
    """A first-contact review: two ``tilemask.run`` of one workflow started at once on a notebook's threads, the
    second was told "job ... is running in another process": it asked whose the lock was between the first's
    ``flock`` and its noting the lock as this process's."""
    from collections import Counter

    said: list[str] = []
    for _ in range(300):
        barrier = threading.Barrier(2)
        held: list[JobFolder] = []

        def take() -> None:
            barrier.wait()
            try:
                held.append(JobFolder(tmp_path / "job").acquire())
            except JobError as exc:
                said.append(str(exc))

        threads = [threading.Thread(target=take) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for job in held:
            job.release()
    assert said and all("is running in this process" in line for line in said), Counter(said)


@pytest.mark.timeout(30)
def test_the_job_errors_tilemask_run_raises_live_with_the_others_in_tilemask_errors():
    """The README sends a Python caller to ``tilemask.errors`` for the classes to catch; ``tilemask.run``'s "job
    ... is running in another process" (JobError) and "job ... was cancelled" (JobCancelled) were in
    ``tilemask.jobs`` only."""
    from tilemask import errors, jobs

    assert errors.JobError is jobs.JobError and errors.JobCancelled is jobs.JobCancelled
    assert issubclass(errors.JobError, tilemask.TilemaskError) and errors.JobError.exit_status == 2
    assert issubclass(errors.JobCancelled, tilemask.TilemaskError) and errors.JobCancelled.exit_status == 1


@pytest.mark.timeout(60)
def test_the_job_record_is_utf8_whatever_the_locale(tmp_path):
    """``report.csv`` and the job's index entries were written in the locale's encoding: under an ASCII locale
    (``LC_ALL=C``, locale coercion and UTF-8 mode off) an input named ``forêt.tif`` failed the report with
    ``UnicodeEncodeError``, and a Latin-1 locale wrote a report a UTF-8 reader (pandas, QGIS) misreads, and an
    index entry that ``tilemask jobs`` reads as UTF-8."""
    script = f"""
from tilemask.jobs import JobFolder
job = JobFolder(__import__("pathlib").Path({str(tmp_path / "job")!r}))
items = [{{"item": 0, "name": "for\\u00eat", "files": ["/data/for\\u00eat.tif"], "output": "o"}}]
job.create({{"version": 1}}, {str(tmp_path)!r}, None, {{}}, items)
job.write_report(items, set())
from tilemask.jobs import _write_atomic  # what writes an index entry: the job folder's path
_write_atomic(job.path / "entry", "/data/for\\u00eat/job\\n")
"""
    env = {**os.environ, "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "job" / "report.csv", newline="", encoding="utf-8") as f:
        (row,) = csv.DictReader(f)
    assert (row["name"], row["input"]) == ("for\u00eat", "/data/for\u00eat.tif")
    assert (tmp_path / "job" / "entry").read_text(encoding="utf-8") == "/data/for\u00eat/job\n"


def test_a_benchmarks_jobs_are_listed_in_its_scratch_folder_not_the_users(tmp_path):
    """``python benchmarks/bench_tiles.py`` ran the demo into its scratch folder and listed that job in the user's
    ``$TILEMASK_HOME``; the folder removed at exit, every later ``tilemask jobs`` warned ``... jobs' folders are not
    there``. A benchmark's scratch folder holds the jobs' list too, and goes with it."""
    from .conftest import REPO

    code = ("import sys; sys.path.insert(0, sys.argv[1]); from scratch import scratch_folder; "
            "from tilemask import jobs; folder = scratch_folder('t-', under=sys.argv[2]); "
            "print(folder); print(jobs.home()); jobs.home().mkdir(parents=True)")  # fmt: skip
    home = tmp_path / "home"
    done = subprocess.run([sys.executable, "-c", code, str(REPO / "benchmarks"), str(tmp_path)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "TILEMASK_HOME": str(home)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    folder, listed = map(Path, done.stdout.split())
    assert listed.is_relative_to(folder) and not folder.exists() and not home.exists()
