"""Inputs and weights on S3-compatible object storage: a real S3 API server on loopback (moto's server mode,
``python -m moto.server``), reached through the usual AWS variables by GDAL (rasters, in place) and fsspec
(weights and NIfTI, copied once).  The outputs equal those of the same files read from disk."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import rasterio
import yaml

from .conftest import GEO, REPO, UNET_3D, _free_port, run_cli, volume_workflow

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free loopback port, and the environment that points clients at it."""
    import boto3

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket="tilemask")
            break
        except Exception:  # noqa: BLE001 - not listening yet
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.2)
    yield client, env
    server.terminate()
    server.wait(timeout=30)


def demo_workflow(input_path: str, weights: str, output: str) -> dict:
    workflow = yaml.safe_load((REPO / "workflows" / "demo_landsat.yaml").read_text())
    workflow.update(input=input_path)
    workflow["model"]["weights"] = weights
    workflow["inference"]["device"] = "cpu"
    workflow["output"] = {"path": output, "chunks": 256}
    return workflow


def test_a_scene_and_weights_on_s3_give_the_outputs_of_the_local_files(s3, tmp_path, write_workflow, client):
    import tilemask
    from tilemask import Workflow

    s3_client, env = s3
    weights = REPO / "workflows" / "demo" / "landsat_water_land_cloud.pt"
    s3_client.upload_file(str(GEO["RGB.byte.tif"]), "tilemask", "scenes/RGB.byte.tif")
    s3_client.upload_file(str(weights), "tilemask", "models/demo.pt")
    remote = write_workflow(demo_workflow("s3://tilemask/scenes/RGB.byte.tif", "s3://tilemask/models/demo.pt", "s3out/{stem}_mask.tif"), "remote.yaml")
    scratch = {"TILEMASK_SCRATCH": str(tmp_path / "scratch"), "TILEMASK_CACHE_DIR": str(tmp_path / "cache")}
    done = run_cli("run", remote, "--quiet", "--workers", "1", cwd=tmp_path, env={**env, **scratch})
    assert done.returncode == 0, done.stderr
    local = demo_workflow(str(GEO["RGB.byte.tif"]), str(weights), "local/{stem}_mask.tif")
    (expected,) = tilemask.run(Workflow.from_dict(local, base_dir=tmp_path), client)
    with rasterio.open(tmp_path / "s3out" / "RGB.byte_mask.tif") as a, rasterio.open(expected.outputs[0]) as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))
        assert a.crs == b.crs and a.transform == b.transform
    assert list((tmp_path / "scratch" / "tilemask-remote").glob("*/demo.pt")), "the weights were fetched to scratch"

    missing = write_workflow(demo_workflow("s3://tilemask/scenes/RGB.byte.tif", "s3://tilemask/models/nope.pt", "o/{stem}.tif"), "missing.yaml")
    refused = run_cli("run", missing, "--quiet", "--workers", "1", cwd=tmp_path, env={**env, **scratch})
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip() == "tilemask: error: model.weights: s3://tilemask/models/nope.pt: no such object"


@pytest.mark.slow
def test_a_nifti_on_s3_is_read_from_a_copy_and_gives_the_local_labels(s3, make_volume, make_model, tmp_path, client):
    import tilemask
    from tilemask import Workflow

    s3_client, env = s3
    path, _ = make_volume(shape=(30, 28, 26))
    s3_client.upload_file(str(path), "tilemask", "scans/scan.nii.gz")
    weights, _ = make_model(UNET_3D)
    outputs = {}
    for kind, given in [("local", str(path)), ("s3", "s3://tilemask/scans/scan.nii.gz")]:
        workflow = volume_workflow(given, weights, {"roi_size": [24, 24, 24]}, {"path": f"{kind}/{{stem}}.nii.gz", "probabilities": "none"})
        if kind == "s3":  # the shared cluster's workers were started without these variables: run on a fresh one
            workflow_path = tmp_path / "s3.yaml"
            workflow_path.write_text(yaml.safe_dump(workflow))
            done = run_cli("run", workflow_path, "--quiet", "--workers", "1", cwd=tmp_path,
                           env={**env, "TILEMASK_SCRATCH": str(tmp_path / "scratch")})  # fmt: skip
            assert done.returncode == 0, done.stderr
            outputs[kind] = tmp_path / "s3" / "scan.nii.gz"
        else:
            (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
            outputs[kind] = result.outputs[0]
    a, b = nib.load(outputs["local"]), nib.load(outputs["s3"])
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    np.testing.assert_allclose(a.affine, b.affine)
    assert os.path.exists(tmp_path / "scratch" / "tilemask-remote")
