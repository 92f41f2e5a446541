"""The workflow's postprocess: and stats: sections run inside `tilemask run`."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import zarr

import tilemask
from tilemask import Workflow
from tilemask.postprocess import apply as postprocess

from .conftest import raster_workflow
from .test_trust import hidden


@pytest.mark.slow
def test_postprocess_and_stats_sections(make_raster, make_model, tmp_path, client):
    path, _ = make_raster((3, 180, 230))
    weights, _ = make_model()
    base = raster_workflow(path, weights, output={"path": "out/raw.zarr", "chunks": 64})
    (raw,) = tilemask.run(Workflow.from_dict(base, base_dir=tmp_path), client)
    raw_group = zarr.open_group(raw.outputs[0], mode="r")

    cleaned = dict(base)
    cleaned["output"] = {**base["output"], "path": "out/{stem}_clean.zarr", "chunks": 48}
    cleaned["postprocess"] = {"remove_small": 15, "fill_holes": True}
    cleaned["stats"] = {"output": "out/{stem}_stats.csv"}
    cleaned["classes"] = ["a", "b", "c"]
    (result,) = tilemask.run(Workflow.from_dict(cleaned, base_dir=tmp_path), client)

    group = zarr.open_group(result.outputs[0], mode="r")
    assert group.attrs["tilemask"]["complete"] is True
    labels = group["labels"][:]
    whole = postprocess(da.from_array(raw_group["labels"][:], chunks=-1), cleaned["postprocess"]).compute()
    np.testing.assert_array_equal(labels, whole)  # chunks of 48 give the whole-image answer
    assert (labels != raw_group["labels"][:]).any(), "post-processing changed nothing: the test proves nothing"
    np.testing.assert_allclose(group["probabilities"][:], raw_group["probabilities"][:], atol=1e-5)
    assert hidden(tmp_path / "out") == [], "raw intermediate left behind"

    table = pd.read_csv(tmp_path / "out" / "scene_stats.csv")
    counts = np.bincount(labels.ravel(), minlength=3)
    assert dict(zip(table["class"], table["pixels"])) == {"a": counts[0], "b": counts[1], "c": counts[2]}
    assert result.class_pixels == {"a": counts[0], "b": counts[1], "c": counts[2]}
