"""The inputs of a batch as a user of an archive of scenes first gives them: a folder of rasters, a JSON-lines list."""

from __future__ import annotations

import json
import shutil

import pytest

import tilemask
from tilemask import Workflow
from tilemask.errors import InputError
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
