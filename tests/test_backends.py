"""Inference backends: OpenVINO and ONNX Runtime against torch through whole runs, and what ``auto`` picks."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import zarr

import tilemask
from tilemask import Workflow

from .conftest import UNET_2D, UNET_3D, raster_workflow

BATCH_NORM_2D = dict(UNET_2D, norm="batch")
BATCH_NORM_3D = dict(UNET_3D, norm="batch")


def probabilities(results) -> np.ndarray:
    (result,) = results
    return zarr.open_group(result.outputs[0], mode="r")["probabilities"][:]


def run(raw: dict, tmp_path, client, backend: str, name: str):
    raw = {**raw, "inference": {**raw["inference"], "backend": backend}}
    raw["output"] = {**raw["output"], "path": f"out/{name}_{backend}.zarr"}
    return tilemask.run(Workflow.from_dict(raw, base_dir=tmp_path), client)


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
@pytest.mark.parametrize("dims", [2, 3])
def test_every_backend_gives_torchs_probabilities(backend, dims, make_raster, make_volume, make_model, tmp_path, client):
    if dims == 2:
        path, _ = make_raster((3, 150, 170))
        args = BATCH_NORM_2D
    else:
        path, _ = make_volume((40, 36, 30), name="scan.nii.gz")
        args = BATCH_NORM_3D
    weights, _ = make_model(args)
    raw = raster_workflow(path, weights, args=args, output={"chunks": 64})
    if dims == 3:
        raw["preprocess"] = {"normalize": {"mean": [500.0], "std": [300.0]}}
        raw["inference"]["roi_size"] = [32, 32, 32]
    expected = probabilities(run(raw, tmp_path, client, "torch", "ref"))
    got = probabilities(run(raw, tmp_path, client, backend, "converted"))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert np.abs(got - expected).max() > 0, "the converted network ran: not bitwise torch"


def test_auto_takes_openvino_only_where_it_matches_torch(make_raster, make_model, tmp_path, client, caplog):
    """MONAI's default UNet normalises per instance: on half-constant windows OpenVINO parts from torch, so auto
    keeps torch; with batch norm it matches and auto runs OpenVINO."""
    path, _ = make_raster((3, 100, 120))
    chosen = {}
    for name, args in (("instance", UNET_2D), ("batch", BATCH_NORM_2D)):
        weights, _ = make_model(args, name=f"{name}.pt")
        raw = raster_workflow(path, weights, args=args)
        with caplog.at_level(logging.INFO, logger="tilemask.engine"):
            caplog.clear()
            run(raw, tmp_path, client, "auto", name)
        (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("inference backend")]
        chosen[name] = line.split()[2]
    assert chosen == {"instance": "torch", "batch": "openvino"}


def test_an_unknown_backend_is_refused_by_name(make_raster, make_model, tmp_path):
    path, _ = make_raster((3, 50, 50))
    weights, _ = make_model()
    raw = raster_workflow(path, weights)
    raw["inference"]["backend"] = "tensorrt"
    with pytest.raises(tilemask.TilemaskError, match="inference.backend"):
        Workflow.from_dict(raw, base_dir=tmp_path)
