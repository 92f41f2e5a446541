"""NIfTI labels on the scan's grid as every reader sees it (SimpleITK as well as nibabel), and volumes in mm."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import zarr

import tilemask
from tests.conftest import UNET_3D, run_small_volume
from tilemask.stats.api import compute_stats
from tilemask.workflow import Workflow

GRID_FIELDS = ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
               "qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units")  # fmt: skip


def scan(path, header_of) -> str:
    """A random int16 volume of 24 x 20 x 16 whose header ``header_of(header)`` sets up."""
    data = (np.random.default_rng(1).random((24, 20, 16)) * 1000).astype(np.int16)
    img = nib.Nifti1Image(data, None)
    header_of(img.header)
    nib.save(img, path)
    return str(path)


def run(path, make_model, tmp_path, client, suffix=".nii.gz") -> str:
    weights, _ = make_model(UNET_3D)
    return run_small_volume(path, weights, tmp_path, client, suffix)


def sitk_grid(path) -> tuple[np.ndarray, ...]:
    image = sitk.ReadImage(str(path))
    return np.array(image.GetOrigin()), np.array(image.GetDirection()), np.array(image.GetSpacing())


def qform_unlike_sform(header) -> None:
    header.set_qform(np.diag([1.0, 1.0, 1.0, 1.0]) + np.array([[0, 0, 0, 10], [0, 0, 0, -20], [0, 0, 0, 30], [0] * 4]),
                     code=1)  # fmt: skip
    header.set_sform(np.array([[-1.0, 0, 0, 15], [0, -1.0, 0, -15], [0, 0, 1.0, 35], [0, 0, 0, 1]]), code=2)
    header.set_xyzt_units("mm", "sec")


def no_codes(header) -> None:
    header.set_zooms((0.9, 1.1, 2.0))
    header["qform_code"], header["sform_code"] = 0, 0


@pytest.mark.parametrize("header_of", [qform_unlike_sform, no_codes], ids=["qform-unlike-sform", "no-codes"])
def test_labels_keep_the_scans_qform_and_sform_so_simpleitk_places_them_on_it(make_model, tmp_path, client, header_of):
    """SimpleITK (ITK-SNAP, 3D Slicer) reads a NIfTI's qform where nibabel (MONAI) reads its sform: labels whose
    header held the sform in both, with the scan's qform code, sat 5 mm away and flipped in those readers."""
    path = scan(tmp_path / "scan.nii.gz", header_of)
    out = run(path, make_model, tmp_path, client)
    source, labels = nib.load(path).header, nib.load(out).header
    for field in GRID_FIELDS:
        np.testing.assert_array_equal(labels[field], source[field], err_msg=field)
    np.testing.assert_array_equal(labels["pixdim"][:4], source["pixdim"][:4])
    for ours, theirs in zip(sitk_grid(out), sitk_grid(path)):
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
    np.testing.assert_allclose(nib.load(out).affine, nib.load(path).affine)


def test_a_scan_in_micrometres_is_measured_in_mm_as_simpleitk_reads_it(make_model, tmp_path, client):
    """NIfTI's ``xyzt_units`` say what the affine is in; tilemask's grids are mm, as SimpleITK's spacing: 20 um
    voxels hold 8e-9 mL each, not the 8 mL of 20 mm ones (the statistics were 10^9 times too large)."""

    def micrometres(header) -> None:
        header.set_qform(np.diag([20.0, 20.0, 20.0, 1.0]) + np.array([[0, 0, 0, 500.0]] + [[0] * 4] * 3), code=1)
        header.set_sform(header.get_qform(), code=1)
        header.set_xyzt_units("micron", "sec")

    path = scan(tmp_path / "cells.nii.gz", micrometres)
    out = run(path, make_model, tmp_path, client)
    assert nib.load(out).header.get_xyzt_units()[0] == "micron"  # the labels say what the scan says
    np.testing.assert_allclose(nib.load(out).affine, nib.load(path).affine)
    spacing_mm = sitk_grid(path)[2]
    np.testing.assert_allclose(spacing_mm, [0.02] * 3)  # the reference: ITK converts the NIfTI unit to mm

    table = pd.read_csv(compute_stats(out, tmp_path / "volumes.csv"))
    labels = np.asarray(nib.load(out).dataobj)
    for row in table.itertuples(index=False):
        voxels = int((labels == row.value).sum())
        assert row.voxels == voxels
        assert row.volume_ml == pytest.approx(voxels * np.prod(spacing_mm) / 1000, rel=1e-6)

    from tilemask.serve.catalog import Catalog

    (labels_entry,) = [e for e in Catalog(tmp_path).entries() if e.kind == "labels"]
    assert labels_entry.scan == "cells.nii.gz"  # tilemask serve shows the labels over their scan, both in mm

    ome = run(path, make_model, tmp_path, client, suffix=".ome.zarr")
    (multiscale,) = dict(zarr.open_group(ome, mode="r")["labels/labels"].attrs)["ome"]["multiscales"]
    assert [a["unit"] for a in multiscale["axes"]] == ["millimeter"] * 3
    np.testing.assert_allclose(multiscale["datasets"][0]["coordinateTransformations"][0]["scale"], spacing_mm)


def test_a_spatial_unit_code_that_is_not_a_length_counts_as_mm():
    """xyzt_units codes 4-7 name no length (nibabel's get_xyzt_units raises KeyError on them): mm, as ITK takes them."""
    from tilemask.formats import nifti_affine_mm

    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.diag([20.0, 20.0, 20.0, 1.0]))
    img.header["xyzt_units"] = 5
    np.testing.assert_array_equal(nifti_affine_mm(img), img.affine)
    img.header.set_xyzt_units("meter")
    np.testing.assert_array_equal(np.asarray(nifti_affine_mm(img))[:3, :3], np.diag([20000.0] * 3))


def test_a_nifti2_scans_labels_are_nifti2_with_its_grid_as_it_is(make_model, tmp_path, client):
    """A NIfTI-2 scan's qform is float64: labels written as NIfTI-1 had its quaternion rounded to float32 (the
    rotation of nibabel's ``example_nifti2.nii.gz`` moved by 1.4e-4)."""
    data = (np.random.default_rng(2).random((24, 20, 16)) * 1000).astype(np.int16)
    angle = 0.3000000001  # a rotation whose quaternion float32 cannot hold
    c, s = np.cos(angle), np.sin(angle)
    affine = np.array([[1.1 * c, -1.2 * s, 0, -12.25], [1.1 * s, 1.2 * c, 0, 7.5], [0, 0, 2.5, 30.125], [0, 0, 0, 1]])
    img = nib.Nifti2Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    path = tmp_path / "scan2.nii.gz"
    nib.save(img, path)
    out = run(path, make_model, tmp_path, client)
    source, labels = nib.load(path), nib.load(out)
    assert isinstance(labels, nib.Nifti2Image)
    for field in GRID_FIELDS:
        np.testing.assert_array_equal(labels.header[field], source.header[field], err_msg=field)
    np.testing.assert_array_equal(labels.header.get_qform(), source.header.get_qform())
    np.testing.assert_array_equal(labels.affine, source.affine)  # SimpleITK 2 reads no NIfTI-2, input or labels


def test_a_volume_with_a_side_over_32767_is_written_as_nifti2(tmp_path):
    """NIfTI-1 holds sides up to 32767 (int16): a longer one is NIfTI-2, written chunk by chunk as NIfTI-1 is."""
    from tilemask.sinks.nifti import NiftiVolume

    volume = NiftiVolume(str(tmp_path / "long.nii.gz"), (40000, 3, 2), "uint8", "run1")
    volume.create(str(tmp_path / "no-reference.zarr"), np.diag([0.5, 1.0, 2.0, 1.0]))
    expected = (np.arange(40000 * 3 * 2) % 251).astype(np.uint8).reshape(40000, 3, 2)
    for start in range(0, 40000, 16384):
        stop = min(start + 16384, 40000)
        volume.write((slice(start, stop), slice(None), slice(None)), expected[start:stop])
    volume.finish()
    volume.publish()
    img = nib.load(tmp_path / "long.nii.gz")
    assert isinstance(img, nib.Nifti2Image)
    np.testing.assert_array_equal(np.asarray(img.dataobj), expected)
    np.testing.assert_array_equal(img.affine, np.diag([0.5, 1.0, 2.0, 1.0]))


@pytest.mark.parametrize("out_channels, nan", [(1, False), (3, True)], ids=["binary", "nodata"])
def test_the_labels_display_range_holds_every_value_they_take(make_volume, make_model, tmp_path, client, out_channels,
                                                                nan):
    """NIfTI-1's ``cal_min`` / ``cal_max`` are the display range (values above ``cal_max`` show as it, and both 0
    means "not set"): the nodata label 255 lay above ``cal_max`` 2, so a grey-scale viewer showed invalid voxels as
    the last class; a binary (sigmoid) network's is (0, 1). Both read back with nibabel and SimpleITK (ITK-SNAP, 3D
    Slicer); the labels' intent is NIFTI_INTENT_LABEL (1002), which NiiVue colours a value apart."""
    path, data = make_volume((24, 20, 16), dtype="float32" if nan else "int16")  # a float scan may hold NaN
    if nan:
        data[3, 4, 5] = np.nan
        nib.save(nib.Nifti1Image(data, nib.load(path).affine), path)
    weights, _ = make_model({**UNET_3D, "out_channels": out_channels})
    workflow = {"version": 1, "input": str(path),
                "model": {"network": "UNet", "args": {**UNET_3D, "out_channels": out_channels}, "weights": str(weights)},
                "preprocess": {"normalize": {"mean": [500.0], "std": [300.0]}},
                "inference": {"roi_size": [16, 16, 16], "device": "cpu",
                              "activation": "sigmoid" if out_channels == 1 else "softmax"},
                "output": {"path": "out/{stem}_labels.nii.gz", "chunks": 16}}  # fmt: skip
    (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    labels = nib.load(result.outputs[0])
    values = np.unique(np.asarray(labels.dataobj))
    expected = (0, 255) if nan else (0, 1)
    assert (255 in values) == nan and values.max() <= expected[1]
    assert (float(labels.header["cal_min"]), float(labels.header["cal_max"])) == expected
    assert labels.header.get_intent()[0] == "label"
    reader = sitk.ImageFileReader()
    reader.SetFileName(result.outputs[0])
    reader.ReadImageInformation()
    assert [float(reader.GetMetaData(k)) for k in ("cal_min", "cal_max")] == list(expected)
    assert reader.GetMetaData("intent_code") == "1002"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["web", "zip"])
def test_labels_of_a_scan_on_a_web_server_or_in_an_archive_keep_its_qform_and_sform(make_model, tmp_path, client,
                                                                                     where):
    """The header was copied only from a scan on this machine: the labels of one read over HTTP, or from a zip,
    held the sform in both, codes 1, and SimpleITK put them 5.9 mm from where it put the scan (its qform)."""
    import threading
    import zipfile

    from tests.range_server import serve

    (tmp_path / "served").mkdir()
    path = scan(tmp_path / "served" / "scan.nii.gz", qform_unlike_sform)
    if where == "zip":
        with zipfile.ZipFile(tmp_path / "scans.zip", "w") as archive:
            archive.write(path, "scan.nii.gz")
        out = run(f"/vsizip/{tmp_path}/scans.zip/scan.nii.gz", make_model, tmp_path, client)
    else:
        server = serve(str(tmp_path / "served"))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            out = run(f"http://127.0.0.1:{server.server_address[1]}/scan.nii.gz", make_model, tmp_path, client)
        finally:
            server.shutdown()
            server.server_close()
    source, labels = nib.load(path).header, nib.load(out).header
    for field in GRID_FIELDS:
        np.testing.assert_array_equal(labels[field], source[field], err_msg=field)
    for scan_values, label_values in zip(sitk_grid(path), sitk_grid(out)):
        np.testing.assert_allclose(label_values, scan_values, atol=1e-5)


@pytest.mark.timeout(60)
def test_a_finish_run_again_after_its_worker_died_finds_the_volumes_it_compressed(tmp_path):
    """Dask runs a task again when its worker dies: a ``.nii.gz`` output's finish killed while it compressed the
    probabilities, the labels' already compressed and their uncompressed file removed, failed when run again
    (``cannot write the output: FileNotFoundError: ... .raw.nii``, exit 1, a worker SIGKILLed as a slice_axis
    run made its output whole); the volume compressed whole is kept, the other compressed again."""
    from tilemask.sinks.nifti import NiftiVolume

    labels = NiftiVolume(str(tmp_path / "a.nii.gz"), (6, 5, 4), "uint8", "run1")
    probabilities = NiftiVolume(str(tmp_path / "a_probabilities.nii.gz"), (6, 5, 4, 2), "float32", "run1")
    expected = np.arange(120, dtype=np.uint8).reshape(6, 5, 4)
    for volume, values in ((labels, expected), (probabilities, np.stack([expected, -expected], -1))):
        volume.create(str(tmp_path / "no-reference.zarr"), np.eye(4))
        volume.write(tuple(slice(None) for _ in volume.shape), values)
    labels.finish()  # the first run of the task, killed before the probabilities were compressed
    for volume in (labels, probabilities):  # the task run again
        volume.finish()
        volume.publish()
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "a.nii.gz").dataobj), expected)
    np.testing.assert_array_equal(nib.load(tmp_path / "a_probabilities.nii.gz").get_fdata()[..., 0], expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "a_probabilities.nii.gz"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("compressed", ["none", "cut short", "damaged"])
def test_a_finish_whose_uncompressed_file_is_gone_publishes_no_volume_not_whole(tmp_path, compressed):
    """A finish skips compressing only where the compressed volume is whole: with the uncompressed file gone (removed
    by hand) it had returned as done whatever the compressed one held, and the run published a ``.nii.gz`` cut
    short (exit 0), or, with none, failed at its rename with a bare ``FileNotFoundError`` naming the hidden staged
    file. Now the finish fails on the uncompressed file's absence, as it did before it skipped any."""
    from tilemask.sinks.nifti import NiftiVolume

    volume = NiftiVolume(str(tmp_path / "a.nii.gz"), (60, 50, 40), "uint8", "run1")
    volume.create(str(tmp_path / "no-reference.zarr"), np.eye(4))
    volume.write((slice(None),) * 3, np.random.default_rng(0).integers(0, 255, (60, 50, 40), dtype=np.uint8))
    if compressed == "cut short":
        volume.finish()
        whole = Path(volume.finished).read_bytes()
        Path(volume.finished).write_bytes(whole[: len(whole) // 2])
    elif compressed == "damaged":  # its gzip header, then zeros: 'zlib.error: Error -3 while decompressing data'
        volume.finish()
        whole = Path(volume.finished).read_bytes()
        Path(volume.finished).write_bytes(whole[:10] + bytes(len(whole) - 10))
    else:
        os.remove(volume.partial)
    with pytest.raises(FileNotFoundError, match=r"\.raw\.nii"):
        volume.finish()
    assert not (tmp_path / "a.nii.gz").exists()


@pytest.mark.timeout(180)
def test_uint8_probabilities_read_as_monais_in_nibabel_monai_and_simpleitk(make_volume, make_model, tmp_path, client):
    """uint8 NIfTI probabilities are ``round(p * 255)``: they carried no scale, so nibabel's ``get_fdata``, MONAI's
    ``LoadImage`` and SimpleITK read 0-255 (252.0 from MONAI's probabilities at worst), and their ``descrip`` said
    ``tilemask labels``. They carry ``scl_slope`` 1/255 and say they are probabilities; every reader gives MONAI's
    sliding window's within half a step (1/510; the slope is float32 in NIfTI-1: 6e-8 off 1/255 at 255), and
    tilemask's own readers are as they were: ``open_result`` as stored (uint8, its ``scale_factor`` 1/255), a
    finished run complete, replaced with ``--overwrite`` and the probabilities removed by a run without them."""
    from monai.transforms import LoadImage

    from tests.conftest import volume_workflow
    from tests.test_fidelity import monai_probabilities
    from tilemask.formats import for_path
    from tilemask.jobs import outputs_complete

    path, volume = make_volume((37, 29, 23))
    args = {**UNET_3D, "out_channels": 3}
    weights, net = make_model(args)
    workflow = volume_workflow(path, weights, {"overlap": 0.25, "mode": "gaussian", "batch_size": 3},
                               {"chunks": 16, "probabilities": "uint8"})  # fmt: skip
    workflow["model"]["args"] = args
    (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    labels, probabilities = result.outputs[:2]
    assert probabilities.endswith("scan_labels_probabilities.nii.gz")
    expected = monai_probabilities(volume[None], net, (24, 24, 24), 0.25, "gaussian", 500.0, 300.0)
    half_step = 1 / 510 + 1e-6

    img = nib.load(probabilities)
    with open(probabilities, "rb") as f:  # the header as stored (nibabel's in-memory one drops the scale)
        header = nib.Nifti1Header.from_fileobj(__import__("gzip").GzipFile(fileobj=f))
    assert img.get_data_dtype() == np.uint8 and img.shape == (37, 29, 23, 3)
    assert (header["scl_slope"], header["scl_inter"]) == (np.float32(1 / 255), 0)
    assert bytes(header["descrip"]).rstrip(b"\0") == b"tilemask probabilities; round(p * 255)"
    assert (header["cal_min"], header["cal_max"]) == (0, 1)  # the display range, in the values readers give
    read = {
        "nibabel": np.moveaxis(img.get_fdata(), -1, 0),
        "MONAI": np.moveaxis(np.asarray(LoadImage(image_only=True)(probabilities)), -1, 0),
        "SimpleITK": sitk.GetArrayFromImage(sitk.ReadImage(probabilities)).transpose(0, 3, 2, 1),  # (t, z, y, x)
    }
    for reader, values in read.items():
        assert values.shape == expected.shape, reader
        np.testing.assert_allclose(values, expected, rtol=0, atol=half_step, err_msg=reader)

    stored = np.moveaxis(np.asarray(img.dataobj.get_unscaled()), -1, 0)
    opened = tilemask.open_result(labels, "probabilities")
    assert opened.dtype == np.uint8 and opened.attrs["scale_factor"] == 1 / 255
    np.testing.assert_array_equal(opened.values, stored)  # as stored, as before
    np.testing.assert_allclose(opened.values * opened.attrs["scale_factor"], expected, rtol=0, atol=half_step)
    np.testing.assert_array_equal(tilemask.open_result(labels).values, np.asarray(nib.load(labels).dataobj))

    assert for_path(probabilities).written_by_tilemask(probabilities)
    assert outputs_complete(result.outputs)  # what a job's resume asks of a finished input
    workflow["output"]["probabilities"] = "none"
    (again,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client, overwrite=True)
    assert again.outputs[0] == labels and not Path(probabilities).exists()  # tilemask's: replaced, then removed
