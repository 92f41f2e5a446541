"""A served folder of real tilemask outputs, and a real ``tilemask serve`` process over it.

The folder holds what users serve: the demo's label COG, probabilities and
polygons (the real demo workflow), the same run written as Zarr, a statistics
table, and labels of nibabel's real MR volume (``anatomical.nii``) beside the
scan. Beside it sit a secret file and symlinks that lead out of the folder, for
the hostile-path tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import nibabel as nib
import nibabel.testing
import numpy as np
import pytest
import torch

import tilemask
from tests.conftest import REPO, UNET_3D
from tilemask.workflow import Workflow

SECRET = "tilemask-secret-outside-the-folder"
DEMO = REPO / "workflows" / "demo_landsat.yaml"


def _demo(folder: Path, suffix: str, client, **extra) -> None:
    sets = [f"output.path={folder}/{{stem}}_mask{suffix}", "output.quicklook=false"]
    sets += [f"{k}={v}" for k, v in extra.items()]
    wf = Workflow.from_yaml(DEMO, sets)
    tilemask.run(wf, client)


@pytest.fixture(scope="session")
def served_folder(tmp_path_factory, client) -> Path:
    top = tmp_path_factory.mktemp("serve")
    folder = top / "outputs"
    folder.mkdir()
    _demo(folder, ".tif", client, **{"output.vectors": f"{folder}/{{stem}}_polygons.gpkg"})
    polygons = gpd.read_file(folder / "RGB.byte_polygons.gpkg")
    polygons.to_file(folder / "polygons_fgb.fgb", driver="FlatGeobuf")
    polygons.to_parquet(folder / "polygons_parquet.parquet")
    (zarrs := folder / "zarr").mkdir()
    _demo(zarrs, ".zarr", client, **{"output.vectors": "null"})
    _demo(zarrs, ".ome.zarr", client, **{"output.vectors": "null"})

    from tilemask.stats.api import compute_stats

    compute_stats(folder / "RGB.byte_mask.tif", folder / "RGB.byte_stats.csv", client=client)

    scan = folder / "anatomical.nii"
    shutil.copyfile(Path(nibabel.testing.data_path) / "anatomical.nii", scan)
    torch.manual_seed(0)
    from monai.networks.nets import UNet

    weights = top / "unet3d.pt"
    torch.save(UNet(**UNET_3D).state_dict(), weights)
    wf = Workflow.from_dict(
        {
            "version": 1,
            "input": str(scan),
            "classes": ["background", "tissue"],
            "model": {"network": "UNet", "args": UNET_3D, "weights": str(weights)},
            "preprocess": {"normalize": {"mean": [float(np.asarray(nib.load(scan).dataobj).mean())],
                                         "std": [float(np.asarray(nib.load(scan).dataobj).std())]}},
            "inference": {"roi_size": [32, 32, 32], "overlap": 0.25, "batch_size": 2, "device": "cpu"},
            "output": {"path": f"{folder}/{{stem}}_labels.nii.gz", "chunks": 32},
        }
    )  # fmt: skip
    tilemask.run(wf, client)

    hostile_neighbours(top, folder)
    return folder


def hostile_neighbours(top: Path, folder: Path) -> None:
    """Real outputs outside the folder, and every way a file inside could lead a reader to them.

    The secrets are real tilemask outputs (a label COG, its probabilities, polygons), so a guard that failed
    would serve them (200), not fail to read them.
    """
    (top / "secret.txt").write_text(SECRET)
    shutil.copyfile(folder / "RGB.byte_mask.tif", top / "secret.tif")
    shutil.copyfile(folder / "RGB.byte_mask_probabilities.tif", top / "secret_probabilities.tif")
    shutil.copyfile(folder / "RGB.byte_polygons.gpkg", top / "secret.gpkg")
    (folder / ".env").write_text(SECRET)
    (folder / "escape").symlink_to(top, target_is_directory=True)
    (folder / "passwd.tif").symlink_to(top / "secret.tif")
    vrt = (
        '<VRTDataset rasterXSize="791" rasterYSize="718"><Metadata><MDI key="TILEMASK_CLASSES">["a", "b", "c"]'
        f'</MDI></Metadata><VRTRasterBand dataType="Byte" band="1"><SimpleSource><SourceFilename>{top}/secret.tif'
        "</SourceFilename><SourceBand>1</SourceBand></SimpleSource></VRTRasterBand></VRTDataset>"
    )
    (folder / "inside-but-vrt.tif").write_text(vrt)
    ogr_vrt = (
        f'<OGRVRTDataSource><OGRVRTLayer name="secret"><SrcDataSource>{top}/secret.gpkg</SrcDataSource>'
        "</OGRVRTLayer></OGRVRTDataSource>"
    )
    (folder / "ogr-vrt.geojson").write_text(ogr_vrt)
    shutil.copyfile(folder / "RGB.byte_mask.tif", folder / "symprob_mask.tif")
    (folder / "symprob_mask_probabilities.tif").symlink_to(top / "secret_probabilities.tif")
    shutil.copyfile(folder / "RGB.byte_mask.tif", folder / "sidecar_mask.tif")
    (folder / "sidecar_mask.tif.ovr").symlink_to(top / "secret.tif")
    shutil.copytree(folder / "zarr" / "RGB.byte_mask.zarr", folder / "linked.zarr")
    chunk = next(
        p for p in sorted((folder / "linked.zarr" / "labels").rglob("*")) if p.is_file() and p.name != "zarr.json"
    )
    shutil.copyfile(chunk, top / "secret-chunk")
    chunk.unlink()
    chunk.symlink_to(top / "secret-chunk")


@pytest.fixture(scope="session")
def server(served_folder):
    """``tilemask serve FOLDER --port 0`` in its own process; yields its base URL (ends with ``/``)."""
    with start_server(served_folder) as url:
        yield url


class start_server:
    def __init__(self, folder: Path, *args: str):
        self.command = [str(Path(sys.executable).parent / "tilemask"), "serve", str(folder), "--port", "0", *args]

    def __enter__(self) -> str:
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        line = self.process.stdout.readline()
        match = re.search(r"at (http://\S+/) ", line)
        if not match:
            self.process.kill()
            raise RuntimeError(f"tilemask serve did not start: {line}{self.process.stdout.read()}")
        return match.group(1)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        finally:
            self.process.kill()
            self.process.stdout.close()
