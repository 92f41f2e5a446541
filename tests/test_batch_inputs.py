"""The inputs of a batch as a user of an archive of scenes first gives them: a folder of rasters, a JSON-lines list."""

from __future__ import annotations

import datetime
import io
import json
import os
import re
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio

import tilemask
from tilemask import Workflow
from tilemask.errors import InputError, WorkflowError
from tilemask.planning import plan_model

from .conftest import GEO, raster_workflow, run_cli


@pytest.mark.timeout(120)
def test_a_folder_of_rasters_given_as_the_input_is_refused_naming_the_glob_that_runs_each(make_model, tmp_path):
    """``input: scenes/`` (a folder of GeoTIFFs, how a batch user first writes it) was refused as no DICOM series:
    "a folder with no DICOM file among its first 3 files, and no dataset GDAL opens", with no word of a glob."""
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(GEO["RGB.byte.tif"], scenes / f"{name}.tif")
    (scenes / "notes.txt").write_text("taken 2020\n")
    weights, _ = make_model()
    workflow = Workflow.from_dict(raster_workflow(scenes, weights, output={"path": "out/{stem}_mask.tif"}),
                                  base_dir=tmp_path)  # fmt: skip
    expected = (rf"^{scenes}: a folder of 3 rasters \(a.tif, b.tif, c.tif\), not one input: give them as a glob, "
                rf"{scenes}/\*.tif, to run each as an input$")  # fmt: skip
    with pytest.raises(InputError, match=expected):
        tilemask.run(workflow)
    assert not (tmp_path / "out").exists()  # refused before any work: no job folder

    (tmp_path / "w.yaml").write_text(json.dumps(raster_workflow("scenes/", weights,
                                                                output={"path": "out/{stem}_mask.tif"})))
    done = run_cli("run", tmp_path / "w.yaml", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"tilemask: error: {scenes}: a folder of 3 rasters (a.tif, b.tif, c.tif), not one input: give them as a "
        f"glob, {scenes}/*.tif, to run each as an input")


@pytest.mark.timeout(60)
def test_a_folder_of_one_raster_is_said_so(tmp_path):
    from tilemask.sources.dicom import folder_problem

    shutil.copy(GEO["RGB.byte.tif"], tmp_path / "a.tif")
    assert folder_problem(str(tmp_path)).startswith(f"{tmp_path}: a folder of 1 raster (a.tif), not one input")


@pytest.mark.timeout(60)
def test_a_json_lines_file_given_as_a_list_is_refused_as_one(make_model, tmp_path):
    """``input: {list: items.jsonl}`` (a job's own items.jsonl, or a catalogue's export) took each JSON line for a
    path: ``.../{"item": 0, "name": "a", ...}: no such file or folder``."""
    shutil.copy(GEO["RGB.byte.tif"], tmp_path / "a.tif")
    (tmp_path / "items.jsonl").write_text(json.dumps({"item": 0, "name": "a", "files": [str(tmp_path / "a.tif")]})
                                          + "\n")  # fmt: skip
    weights, _ = make_model()
    workflow = raster_workflow("x", weights, output={"path": "out/{stem}_mask.tif"})
    workflow["input"] = {"list": "items.jsonl"}
    with pytest.raises(InputError, match=rf"^input.list: {tmp_path}/items.jsonl line 1 is a JSON object, not a path: "
                                         r"a list file holds one path or URL a line$"):  # fmt: skip
        tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path))
    (tmp_path / "[2020] a.tif").symlink_to(tmp_path / "a.tif")  # a path that starts as JSON does is a path
    (tmp_path / "named.txt").write_text("[2020] a.tif\n")
    workflow["input"] = {"list": "named.txt"}
    items = plan_model(Workflow.from_dict(workflow, base_dir=tmp_path)).items
    assert [item.files for item in items] == [(str(tmp_path / "[2020] a.tif"),)]


def _three_scenes(folder: Path) -> dict[str, bytes]:
    """Three 64x64 scenes of the Landsat raster, ``a``, ``b`` and ``c``, written in ``folder``: their files' bytes."""
    scenes = {}
    with rasterio.open(GEO["RGB.byte.tif"]) as src:
        for name, (row, col) in {"a": (200, 200), "b": (300, 400), "c": (400, 100)}.items():
            window = ((row, row + 64), (col, col + 64))
            profile = src.profile | {"width": 64, "height": 64, "transform": src.window_transform(window)}
            with rasterio.open(folder / f"{name}.tif", "w", **profile) as dst:
                dst.write(src.read(window=window))
            scenes[name] = (folder / f"{name}.tif").read_bytes()
    return scenes


@pytest.mark.timeout(300)
def test_a_scene_added_to_a_zip_redoes_only_that_scene_and_a_replaced_member_only_itself(make_model, tmp_path, client):
    """A zip member was stamped by its archive's time and size: a scene appended to an archive of scenes (``zip -u``)
    redid every scene of it, unchanged ones too (2 of 2 predicted again here, 1000 of 1000 in an archive of 1000).
    A zip's central directory names each member's CRC-32 and size: a member goes by them."""
    scenes = _three_scenes(tmp_path)
    weights, _ = make_model()
    workflow = raster_workflow("x", weights, output={"path": "out/{stem}.tif"})
    workflow["input"] = {"archive": "scenes.zip", "members": "*.tif"}

    def run(members: dict[str, bytes], mode: str) -> dict[str, tuple[str, int]]:
        with zipfile.ZipFile(tmp_path / "scenes.zip", mode) as zf:
            for name, data in members.items():
                zf.writestr(f"{name}.tif", data)
        results = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
        return {Path(r.outputs[0]).stem: (r.status, r.windows) for r in results}

    assert run({"a": scenes["a"], "b": scenes["b"]}, "w") == {"a": ("ok", 1), "b": ("ok", 1)}
    assert run({"c": scenes["c"]}, "a") == {"a": ("skipped", 0), "b": ("skipped", 0), "c": ("ok", 1)}
    # the archive written anew, b's member now another scene's pixels: b alone is redone
    assert run({"a": scenes["a"], "b": scenes["c"], "c": scenes["c"]}, "w") == {
        "a": ("skipped", 0), "b": ("ok", 1), "c": ("skipped", 0)}
    with rasterio.open(tmp_path / "out" / "b.tif") as b, rasterio.open(tmp_path / "out" / "c.tif") as c:
        assert np.array_equal(b.read(), c.read())  # b's labels are of its new member's pixels
    # a job's lines written before members had stamps of their own hold the archive's time and size: kept skipped
    (manifest,) = (tmp_path / "out" / ".tilemask" / "jobs").glob("*/manifest.jsonl")
    stat = (tmp_path / "scenes.zip").stat()
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    for line in lines:
        if line["status"] == "ok":
            assert line["stamps"][0][0] == "zip"
            line["stamps"][0] = [stat.st_mtime_ns, stat.st_size]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert run({}, "a") == {"a": ("skipped", 0), "b": ("skipped", 0), "c": ("skipped", 0)}


def _tar(path: Path, members: dict[str, tuple[bytes, int]], mode: str = "w") -> None:
    """A tar (``mode`` ``"a"``: appended to, as ``tar -rf``) of ``{name: (bytes, mtime)}``."""
    import tarfile

    with tarfile.open(path, mode) as tf:
        for name, (data, mtime) in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tf.addfile(info, io.BytesIO(data))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_scene_appended_to_a_tar_redoes_only_that_scene(make_model, tmp_path, client):
    """A tar's member was stamped by its archive's time and size: a scene appended to a tar of scenes (``tar -rf``)
    redid every scene of it (2 of 2 predicted again here).  A tar's header of a member names its time and size
    (and the header's checksum): a member goes by them. Lines written before, stamped by the archive, are taken
    while it is as it was."""
    scenes = _three_scenes(tmp_path)
    weights, _ = make_model()
    workflow = raster_workflow("x", weights, output={"path": "out/{stem}.tif"})
    workflow["input"] = {"archive": "scenes.tar", "members": "*.tif"}

    def run(members: dict[str, tuple[bytes, int]], mode: str) -> dict[str, tuple[str, int]]:
        _tar(tmp_path / "scenes.tar", members, mode)
        results = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
        return {Path(r.outputs[0]).stem: (r.status, r.windows) for r in results}

    t = 1_700_000_000
    assert run({"a.tif": (scenes["a"], t), "b.tif": (scenes["b"], t)}, "w") == {"a": ("ok", 1), "b": ("ok", 1)}
    assert run({"c.tif": (scenes["c"], t)}, "a") == {"a": ("skipped", 0), "b": ("skipped", 0), "c": ("ok", 1)}
    assert len(scenes["b"]) == len(scenes["c"])  # packed anew, b's member another scene's pixels of its size
    assert run({"a.tif": (scenes["a"], t), "b.tif": (scenes["c"], t + 60), "c.tif": (scenes["c"], t)}, "w") == {
        "a": ("skipped", 0), "b": ("ok", 1), "c": ("skipped", 0)}
    with rasterio.open(tmp_path / "out" / "b.tif") as b, rasterio.open(tmp_path / "out" / "c.tif") as c:
        assert np.array_equal(b.read(), c.read())  # b's labels are of its new member's pixels
    (manifest,) = (tmp_path / "out" / ".tilemask" / "jobs").glob("*/manifest.jsonl")
    stat = (tmp_path / "scenes.tar").stat()
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    for line in lines:
        if line["status"] == "ok":  # as the version before wrote them
            assert line["stamps"][0][0] == "tar"
            line["stamps"][0] = [stat.st_mtime_ns, stat.st_size]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    results = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)  # the archive as it was
    assert [r.status for r in results] == ["skipped"] * 3


def test_a_tar_gz_member_is_stamped_by_its_header(tmp_path):
    """A .tar.gz's member, as a tar's: by its header's time and size, the same packed again with a scene more, and
    another for a member replaced; a job's line stamped by the archive's time and size is taken while it is as it
    was, not once it changed."""
    from tilemask.driver import _same_stamps
    from tilemask.sources import input_stamp

    archive = tmp_path / "scenes.tar.gz"
    _tar(archive, {"a.tif": (b"a" * 700, 100), "b.tif": (b"b" * 700, 100)}, "w:gz")
    paths = [f"/vsitar/{archive}/{name}.tif" for name in "abc"]
    before = [input_stamp(path) for path in paths[:2]]
    assert [stamp[0] for stamp in before] == ["tar", "tar"]
    old = [[archive.stat().st_mtime_ns, archive.stat().st_size]] * 2  # the version before's
    assert _same_stamps(before, old, paths[:2])
    _tar(archive, {"a.tif": (b"a" * 700, 100), "b.tif": (b"B" * 700, 160), "c.tif": (b"c" * 700, 100)}, "w:gz")
    after = [input_stamp(path) for path in paths]
    assert after[0] == before[0] and after[1] != before[1] and after[2][0] == "tar"
    assert not _same_stamps(after[:1], old[:1], paths[:1])


def test_regions_in_an_archive_that_cannot_be_read_are_refused_naming_them_not_input_archive(tmp_path):
    """``--regions /vsitar/districts.tar/districts.shp`` (or ``stats.regions``) of a tar whose ``.dbf`` was appended
    again (``tar -rf``), or of a zip that is none, was refused as "input.archive: ...; narrow input.members", options
    the user never gave: the regions' path is named, with no advice about an input's members."""
    from tilemask.stats.config import regions_file

    shapefile = {f"districts.{ext}": (ext.encode() * 100, 100) for ext in ("shp", "shx", "dbf")}
    appended = tmp_path / "districts.tar"
    _tar(appended, shapefile)
    _tar(appended, {"districts.dbf": (b"DBF" * 100, 200)}, "a")
    (tmp_path / "districts.zip").write_bytes(b"not a zip")
    for regions, problem in [(f"/vsitar/{appended}/districts.shp", "it holds 2 members named districts.dbf"),
                             (f"/vsizip/{tmp_path}/districts.zip/districts.shp", "File is not a zip file")]:  # fmt: skip
        with pytest.raises(InputError) as raised:
            regions_file(regions)
        message = str(raised.value)
        assert message.startswith(f"{regions}: ") and problem in message, message
        assert "input." not in message and "\n" not in message, message


def test_a_tar_member_appended_again_is_refused_not_read_as_its_first_copy(tmp_path):
    """Weights (or a NIfTI scan) in a tar whose member was appended again (``tar -rf models.tar model.pt``): the
    first copy was read, the old weights, where ``tar -x`` gives the last, and the job stamped the member by the
    last one's header (a job's line then said it ran the new weights). Refused, as an input held twice is."""
    from tilemask.storage import local_copy

    archive = tmp_path / "models.tar"
    _tar(archive, {"model.pt": (b"old weights", 100)})
    _tar(archive, {"model.pt": (b"new weights", 200)}, "a")
    path = f"/vsitar/{archive}/model.pt"
    with pytest.raises(InputError, match=rf"^{re.escape(path)}: {re.escape(str(archive))} holds 2 members named "
                                         r"model\.pt .*; pack it again with each name once$"):  # fmt: skip
        local_copy(path)
    _tar(archive, {"model.pt": (b"new weights", 200)})  # packed again: read
    with open(local_copy(path), "rb") as copy:
        assert copy.read() == b"new weights"


@pytest.mark.timeout(60)
def test_a_remote_zip_member_is_stamped_by_its_crc_in_the_archive_version_the_server_names(tmp_path):
    """A member of a zip on a web server or object storage (``/vsizip//vsicurl/http://...``) was stamped ``[0, 0]``
    and never seen replaced: a resume skipped it, its labels of the old pixels.  It goes by its CRC-32 and size in
    the central directory of the archive's version (ETag, or size and Last-Modified); a line stamped ``[0, 0]`` is
    not taken."""
    from tilemask.driver import _same_stamps
    from tilemask.sources import input_stamp

    from .range_server import serve

    def pack(b: bytes, mtime: int) -> None:
        with zipfile.ZipFile(tmp_path / "scenes.zip", "w") as zf:
            zf.writestr("a.tif", b"a" * 500)
            zf.writestr("b.tif", b)
        os.utime(tmp_path / "scenes.zip", (mtime, mtime))  # Last-Modified is in seconds

    pack(b"b" * 500, 1_700_000_000)
    server = serve(str(tmp_path))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    web = f"/vsizip//vsicurl/http://127.0.0.1:{server.server_address[1]}/scenes.zip"
    try:
        before = [input_stamp(f"{web}/{name}.tif") for name in "ab"]
        assert [stamp[0] for stamp in before] == ["zip", "zip"], before
        pack(b"B" * 500, 1_700_000_060)  # b replaced, of its size
        after = [input_stamp(f"{web}/{name}.tif") for name in "ab"]
        assert after[0] == before[0] and after[1] != before[1]
        assert input_stamp(f"{web}/c.tif") == [None]  # no such member: never the one read before
        assert not _same_stamps(after, [[0, 0], [0, 0]], [f"{web}/{name}.tif" for name in "ab"])
    finally:
        server.shutdown()


@pytest.mark.timeout(60)
def test_two_stac_items_or_listed_files_of_one_name_are_told_what_to_change_for_their_kind(make_model, tmp_path):
    """Two STAC Items whose ids make one file name (``scene/2`` and ``scene_2``) were refused naming their assets'
    files, with advice about globs and folders (to narrow the input's glob, or run each folder as a workflow)."""
    import pystac

    for folder in ("2020", "2021"):
        (tmp_path / folder).mkdir()
        shutil.copy(GEO["RGB.byte.tif"], tmp_path / folder / "a.tif")
    items = []
    for item_id, folder in (("scene/2", "2020"), ("scene_2", "2021")):
        item = pystac.Item(id=item_id, geometry=None, bbox=None, datetime=datetime.datetime(2020, 1, 1), properties={})
        item.add_asset("visual", pystac.Asset(href=f"{folder}/a.tif"))
        items.append(item)
    (tmp_path / "items.json").write_text(json.dumps(pystac.ItemCollection(items).to_dict()))
    (tmp_path / "items.txt").write_text("2020/a.tif\n2021/a.tif\n")
    weights, _ = make_model()
    workflow = raster_workflow("x", weights, output={"path": "out/{stem}_mask.tif"})
    stac = (r"both are named 'scene_2', which \{stem\} stands for \(the STAC Items' ids made file names\): give them "
            "ids of their own, or run them as workflows of their own$")
    listed = (r"both are named 'a', which \{stem\} stands for; rename one, or list them in list files of their own, "
              "each run as a workflow of its own$")
    for given, advice in (({"stac": "items.json", "assets": ["visual"]}, stac), ({"list": "items.txt"}, listed)):
        workflow["input"] = given
        with pytest.raises(WorkflowError, match=advice):
            plan_model(Workflow.from_dict(workflow, base_dir=tmp_path))


@pytest.mark.slow  # 8 s in a quiet default run (2026-12-08, the 18th session)
@pytest.mark.timeout(300)
def test_weights_in_a_zip_recorded_by_the_archives_stamp_are_taken_while_the_archive_is_as_it_was(make_model,
                                                                                                  tmp_path, client):
    """Weights read from a zip (``/vsizip/models.zip/weights.pt``) were stamped, in a job's lines written before
    2026-12-07, by the archive's time and size; they now go by the member's CRC-32 and size.  The items' files were
    still taken, the archive as it was, but the weights' stamp was not: every item was redone once."""
    shutil.copy(GEO["RGB.byte.tif"], tmp_path / "a.tif")
    weights, _ = make_model()
    with zipfile.ZipFile(tmp_path / "models.zip", "w") as zf:
        zf.write(weights, "weights.pt")
    workflow = raster_workflow(tmp_path / "a.tif", f"/vsizip/{tmp_path}/models.zip/weights.pt",
                               output={"path": "out/{stem}.tif"})  # fmt: skip

    def run() -> list[str]:
        return [r.status for r in tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)]

    assert run() == ["ok"]
    (manifest,) = (tmp_path / "out" / ".tilemask" / "jobs").glob("*/manifest.jsonl")
    stat = (tmp_path / "models.zip").stat()
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [line["weights_stamp"][0] for line in lines if line["status"] == "ok"] == ["zip"]
    for line in lines:
        if line["status"] == "ok":  # as the version before wrote it
            line["weights_stamp"] = [stat.st_mtime_ns, stat.st_size]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert run() == ["skipped"]
    with zipfile.ZipFile(tmp_path / "models.zip", "a") as zf:  # the archive changed since: redone, as before
        zf.writestr("notes.txt", "retrained\n")
    for line in lines:
        if line["status"] == "ok":
            line["weights_stamp"] = [stat.st_mtime_ns, stat.st_size]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert run() == ["ok"]


@pytest.mark.timeout(60)
def test_a_listed_path_that_is_also_json_is_a_path_where_it_exists(make_model, tmp_path):
    """A list file's line ``[2020]`` (a scene, a series' folder, named by its year) is a JSON array too: it was
    refused as one ("line 1 is a JSON array, not a path"), where a path that exists is that file."""
    shutil.copy(GEO["RGB.byte.tif"], tmp_path / "[2020]")
    (tmp_path / "years.txt").write_text("[2020]\n")
    weights, _ = make_model()
    workflow = raster_workflow("x", weights, output={"path": "out/{stem}_mask.tif"})
    workflow["input"] = {"list": "years.txt"}
    items = plan_model(Workflow.from_dict(workflow, base_dir=tmp_path)).items
    assert [item.files for item in items] == [(str(tmp_path / "[2020]"),)]
    (tmp_path / "years.txt").write_text("[2021]\n")  # no such file: a JSON array, as before
    with pytest.raises(InputError, match=r"years.txt line 1 is a JSON array, not a path"):
        plan_model(Workflow.from_dict(workflow, base_dir=tmp_path))



@pytest.mark.timeout(120)
def test_a_folder_of_nnunet_cases_given_as_the_input_is_refused_naming_input_channels(make_model, tmp_path):
    """``input: imagesTs/`` (nnU-Net's cases, a file a channel: ``case1_0000.nii.gz``, ``case1_0001.nii.gz``) was
    told to give ``imagesTs/*.nii.gz``: each channel's file one input, a case's channels never read together."""
    import nibabel as nib

    scans = tmp_path / "imagesTs"
    scans.mkdir()
    for case in ("case1", "case2"):
        for channel in ("0000", "0001"):
            nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), scans / f"{case}_{channel}.nii.gz")
    weights, _ = make_model()
    workflow = Workflow.from_dict(raster_workflow(scans, weights, output={"path": "out/{stem}_mask.tif"}),
                                  base_dir=tmp_path)  # fmt: skip
    expected = (rf"^{scans}: a folder of 2 cases of 2 channels each \(case1, case2\), nnU-Net's names, not one input: "
                rf"give them as input: {{channels: \['{scans}/{{case}}_0000.nii.gz', '{scans}/{{case}}_0001.nii.gz'\]}}"
                ", to run each case as an input$")  # fmt: skip
    with pytest.raises(InputError, match=expected):
        tilemask.run(workflow)
    for path in scans.glob("*_0001.nii.gz"):  # one channel: the glob, as for any folder of scans
        path.unlink()
    glob = rf"^{scans}: a folder of 2 rasters .*: give them as a glob, {scans}/\*.nii.gz"
    with pytest.raises(InputError, match=glob):
        tilemask.run(workflow)


@pytest.mark.timeout(120)
def test_the_glob_a_folder_of_rasters_is_told_runs_its_rasters_in_a_folder_named_with_brackets(make_model, tmp_path):
    """The glob named for a folder of rasters in ``survey [v2]/`` (a project's folder) matched none of them: its
    ``[v2]`` is a character class in ``input:``, which is a glob as written."""
    scenes = tmp_path / "survey [v2]" / "scenes"
    scenes.mkdir(parents=True)
    for name in ("a", "b"):
        shutil.copy(GEO["RGB.byte.tif"], scenes / f"{name}.tif")
    weights, _ = make_model()
    workflow = raster_workflow(scenes, weights, output={"path": "out/{stem}_mask.tif"})
    with pytest.raises(InputError, match="give them as a glob, ") as refused:
        tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path))
    told = str(refused.value).split("give them as a glob, ")[1].removesuffix(", to run each as an input")
    items = plan_model(Workflow.from_dict(workflow | {"input": told}, base_dir=tmp_path)).items
    assert [item.files for item in items] == [(str(scenes / "a.tif"),), (str(scenes / "b.tif"),)]
