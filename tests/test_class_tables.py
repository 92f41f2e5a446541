"""Class names of NIfTI labels: a 3D Slicer colour table beside them, read back by every tilemask reader."""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

import tilemask
from tests.conftest import UNET_3D
from tilemask.classes import class_colours
from tilemask.stats.api import compute_stats
from tilemask.workflow import Workflow

CLASSES = ["background", "left kidney"]  # a space, as anatomical names have


def test_nifti_labels_carry_their_class_names_in_a_slicer_colour_table(make_volume, make_model, tmp_path, client):
    """Also the engine's post-processing with physical units: 0.03 mL on 0.9 x 1.2 x 2.5 mm voxels is 11.1 voxels."""
    path, _ = make_volume((30, 26, 20))
    weights, _ = make_model(UNET_3D)
    wf = Workflow.from_dict(
        {
            "version": 1,
            "input": str(path),
            "classes": CLASSES,
            "model": {"network": "UNet", "args": UNET_3D, "weights": str(weights)},
            "preprocess": {"normalize": {"mean": [500.0], "std": [300.0]}},
            "inference": {"roi_size": [16, 16, 16], "batch_size": 2, "device": "cpu"},
            "output": {"path": "out/{stem}_labels.nii.gz", "chunks": 16},
            "postprocess": {"remove_small": "0.03 mL", "keep_largest": True},
        },
        base_dir=tmp_path,
    )
    (result,) = tilemask.run(wf, client)
    table = tmp_path / "out" / "scan_labels.colors.csv"
    assert str(table) in result.outputs
    with open(table, newline="") as f:
        rows = list(csv.reader(f))
    # the columns 3D Slicer's colour table reader expects (slicer.readthedocs.io, "Color table CSV file format")
    assert rows[0] == ["LabelValue", "Name", "Color_R", "Color_G", "Color_B", "Color_A"]
    colours = class_colours(2)
    assert rows[1:] == [[str(v), name, *map(str, colours[v])] for v, name in enumerate(CLASSES)]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tilemask-")]

    labels = tilemask.open_result(str(tmp_path / "out" / "scan_labels.nii.gz"))
    assert labels.attrs["class_names"] == CLASSES
    values = np.asarray(labels)
    assert (values == 1).any()
    components, n = ndimage.label(values == 1, structure=np.ones((3, 3, 3)))  # MONAI's default: full connectivity
    assert n == 1 and (components == 1).sum() >= 12  # the largest, and at least 0.03 mL
    stats = compute_stats(tmp_path / "out" / "scan_labels.nii.gz", tmp_path / "stats.csv", client=client)
    named = set(pd.read_csv(stats)["class"])
    assert named <= set(CLASSES) and named


def test_nifti_labels_keep_their_class_count_in_the_header_for_a_viewer_without_the_colour_table(
    make_volume, make_model, tmp_path, client
):
    """Labels of three classes, their colour table not copied along: ``tilemask serve`` gave them a legend of two
    (a helper's sweep). The header's display range (``cal_min`` / ``cal_max``, which ITK-SNAP and niivue read) is
    the classes' range, and the legend takes it from there."""
    import nibabel as nib

    from tilemask.serve.catalog import Catalog

    path, _ = make_volume((30, 26, 20))
    args = {**UNET_3D, "out_channels": 3}
    weights, _ = make_model(args)
    wf = Workflow.from_dict(
        {
            "version": 1,
            "input": str(path),
            "model": {"network": "UNet", "args": args, "weights": str(weights)},
            "preprocess": {"normalize": {"mean": [500.0], "std": [300.0]}},
            "inference": {"roi_size": [16, 16, 16], "device": "cpu"},
            "output": {"path": "out/{stem}_labels.nii.gz", "chunks": 16, "probabilities": "uint8"},
        },
        base_dir=tmp_path,
    )
    tilemask.run(wf, client)
    out = tmp_path / "out"
    (out / "scan_labels.colors.csv").unlink()
    labels, probabilities = nib.load(out / "scan_labels.nii.gz"), nib.load(out / "scan_labels_probabilities.nii.gz")
    assert (labels.header["cal_min"], labels.header["cal_max"]) == (0, 2)
    assert (probabilities.header["cal_min"], probabilities.header["cal_max"]) == (0, 1)  # in the scaled values
    assert np.asarray(probabilities.dataobj.get_unscaled()).max() > 1  # round(p * 255), scl_slope 1/255
    assert probabilities.get_fdata().max() <= 1
    (entry,) = [e for e in Catalog(out).entries() if e.kind == "labels"]
    assert [c["value"] for c in entry.legend()] == [0, 1, 2]


@pytest.mark.slow  # 17 s in a loaded default run (2026-12-07)
def test_a_colour_table_naming_sparse_labels_names_those_only_and_one_naming_a_label_twice_is_refused(tmp_path, client):
    """A 3D Slicer colour table naming label 1e6 (Slicer's own tables skip values; FreeSurfer's LUT reaches 14175)
    was read into a name for every value up to it: 1e6 rows of unnamed classes in the statistics (label 3e8 ate
    the memory). A label named twice kept the last name silently."""
    import SimpleITK as sitk

    from tests.conftest import run_cli
    from tests.stats.conftest import anisotropic_affine, blobs, write_nifti
    from tilemask.classes import COLOUR_TABLE_COLUMNS

    labels = blobs((20, 24, 16), seed=3, sigma=2.0, classes=3).astype(np.int32)
    labels[labels == 2] = 10**6
    labels[:5][labels[:5] == 1] = 0  # sizes that differ
    path = write_nifti(tmp_path / "scan_labels.nii.gz", labels, anisotropic_affine())
    table = tmp_path / "scan_labels.colors.csv"
    rows = [(0, "background"), (1, "liver"), (10**6, "tumour")]
    lines = [COLOUR_TABLE_COLUMNS, *[(*r, 1, 2, 3, 255) for r in rows]]
    table.write_text("\n".join(",".join(map(str, line)) for line in lines))
    stats = pd.read_csv(compute_stats(path, tmp_path / "stats.csv", client=client))
    assert list(zip(stats["value"], stats["class"])) == rows
    shapes = sitk.LabelShapeStatisticsImageFilter()
    shapes.Execute(sitk.ReadImage(str(path)))
    expected = [shapes.GetPhysicalSize(v) / 1000 for v, _ in rows[1:]]  # mm3 to mL (its spacing in float32)
    np.testing.assert_allclose(stats["volume_ml"][1:], expected, rtol=1e-6)
    assert tilemask.open_result(str(path)).attrs["class_names"] == dict(rows)

    table.write_text(table.read_text() + "\n1,spleen,4,5,6,255")
    refused = run_cli("stats", path, "-o", tmp_path / "again.csv")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr == f"tilemask: error: {table}: label 1 is named twice ('liver' and 'spleen')\n"
    assert not (tmp_path / "again.csv").exists()


@pytest.mark.parametrize("rows, why", [
    ("LabelValue,Name\n0,background\n1.5,liver", "not a row of an integer LabelValue and a Name"),
    ("Value,Name\n0,background\n1,liver", "not a row of an integer LabelValue and a Name: 'LabelValue'"),
    ("LabelValue,Name\n-1,ignore\n1,liver", "label -1 is negative"),
], ids=["float", "no-column", "negative"])  # fmt: skip
def test_a_colour_table_that_is_no_slicer_table_is_left_out_with_a_warning(tmp_path, caplog, rows, why):
    """Such a table beside NIfTI labels was passed over in silence: its names were gone, the labels class_<v>."""
    from tests.stats.conftest import write_nifti
    from tilemask.sources.labels import open_labels

    path = write_nifti(tmp_path / "scan_labels.nii.gz", np.arange(8, dtype=np.uint8).reshape(2, 2, 2) % 2, np.eye(4))
    (tmp_path / "scan_labels.colors.csv").write_text(rows)
    assert open_labels(str(path)).class_names is None
    (record,) = [r for r in caplog.records if r.name == "tilemask.classes"]
    assert record.levelname == "WARNING" and record.getMessage().startswith(
        f"{tmp_path / 'scan_labels.colors.csv'}: class names left out ({why}")


def test_a_colour_table_saved_with_a_byte_order_mark_keeps_its_names(tmp_path, caplog):
    """Excel's "CSV UTF-8" (and pandas' ``encoding="utf-8-sig"``) starts the file with a byte order mark: the first
    column read as ``\\ufeffLabelValue``, and the table was left out with a warning, the labels named class_<v>."""
    from tests.stats.conftest import write_nifti
    from tilemask.sources.labels import open_labels

    path = write_nifti(tmp_path / "scan_labels.nii.gz", np.arange(8, dtype=np.uint8).reshape(2, 2, 2) % 2, np.eye(4))
    table = pd.DataFrame({"LabelValue": [0, 1], "Name": ["background", "hígado"], "Color_R": [0, 255]})
    table.to_csv(tmp_path / "scan_labels.colors.csv", index=False, encoding="utf-8-sig")
    assert (tmp_path / "scan_labels.colors.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    assert open_labels(str(path)).class_names == ("background", "hígado")
    assert not [r for r in caplog.records if r.name == "tilemask.classes"]
