"""Medical inputs (DICOM series, NIfTI volumes) that are damaged: refused when the input is opened, in one line."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.conftest import UNET_3D, run_cli
from tests.test_dicom import series_workflow, write_series
from tilemask.errors import InputError
from tilemask.sources.dicom import DicomSeriesSource


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage, what", [("deleted", "no"), ("empty", "an empty")])
def test_a_slice_without_pixel_data_is_refused_when_the_series_is_opened(damage, what, make_model, tmp_path):
    """A slice whose PixelData was deleted (or left empty) was planned from its header, then failed on a worker,
    exit 1, with pydicom's "AttributeError: The dataset has no 'Pixel Data', ... element"."""

    def damaged(ds, k):
        if k == 3:
            if damage == "deleted":
                del ds.PixelData
            else:
                ds.PixelData = b""

    folder = write_series(tmp_path / "series", slices=8, mutate=damaged)
    why = rf"^{re.escape(str(folder))}/slice\d+\.dcm: a slice with {what} PixelData element: its image is missing$"
    with pytest.raises(InputError, match=why):
        DicomSeriesSource.open(str(folder))
    weights, _ = make_model(UNET_3D)
    workflow = series_workflow(folder, weights, ["background", "lesion"], 500.0, 800.0)
    workflow["output"] = {"path": "out/{stem}_labels.nii.gz"}
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(workflow))
    result = run_cli("run", tmp_path / "w.yaml", cwd=tmp_path)
    assert result.returncode == 2 and re.fullmatch("tilemask: error: " + why[1:-1] + "\n", result.stderr), result.stderr
    assert not (tmp_path / "out" / "series_labels.nii.gz").exists()
