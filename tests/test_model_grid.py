"""Orientation, spacing and intensity chunk by chunk, and the way back: MONAI's own pipeline is the reference.

The volumes are real (nibabel's test data): ``example4d.nii.gz`` (stored LAS,
oblique, 2 x 2 x 2.2 mm) and ``anatomical.nii`` rewritten as stored PSR (the
same voxels, axes permuted and flipped, the affine to match).
"""

from __future__ import annotations

import os
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
import zarr
from monai.inferers import sliding_window_inference
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    Invertd,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)
from nibabel.testing import data_path

import tilemask
from tilemask import Workflow
from tilemask.errors import WorkflowError

from .conftest import UNET_3D

ROI = (24, 24, 16)


def oblique_las(tmp_path):
    """Volume 0 of nibabel's example4d: LAS, oblique, anisotropic."""
    img = nib.load(os.path.join(data_path, "example4d.nii.gz"))
    path = tmp_path / "oblique_las.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj[..., 0]), img.affine, img.header), path)
    return path


def stored_psr(tmp_path):
    """nibabel's anatomical.nii (LAS) stored PSR: permuted and flipped voxels, the affine to match."""
    img = nib.load(os.path.join(data_path, "anatomical.nii"))
    data = np.asarray(img.dataobj)
    transform = nib.orientations.ornt_transform(
        nib.io_orientation(img.affine), nib.orientations.axcodes2ornt("PSR")
    )
    affine = img.affine @ nib.orientations.inv_ornt_aff(transform, data.shape)
    path = tmp_path / "stored_psr.nii.gz"
    nib.save(nib.Nifti1Image(nib.orientations.apply_orientation(data, transform), affine), path)
    assert nib.aff2axcodes(nib.load(path).affine) == ("P", "S", "R")
    return path


def monai_pipeline(path, net, orientation, spacing, intensity=None, zscore=None, overlap=0.25, crop=False):
    """MONAI on the whole volume: load, (``crop``: crop to the box of the nonzero voxels,) orient, space, scale,
    infer, softmax, Invertd(nearest_interp=False).

    Returns the probabilities on the model grid, its affine, and the probabilities back on the input grid.
    """
    steps = [LoadImaged("image"), EnsureChannelFirstd("image")]
    if crop:  # nnU-Net's crop_to_nonzero; Invertd pads the box back with zeros
        steps.append(CropForegroundd("image", source_key="image", select_fn=lambda x: x != 0, margin=0))
    steps.append(Orientationd("image", axcodes=orientation))
    steps.append(Spacingd("image", pixdim=spacing, mode="bilinear"))
    if intensity:
        steps.append(ScaleIntensityRanged("image", **intensity))
    if zscore is not None:
        steps.append(NormalizeIntensityd("image", **zscore))
    pre = Compose(steps)
    data = pre({"image": str(path)})
    with torch.inference_mode():
        logits = sliding_window_inference(data["image"][None], ROI, 4, net, overlap=overlap, mode="gaussian")[0]
    data["pred"] = torch.softmax(logits, 0)
    model_grid = data["pred"].detach().clone()
    inverted = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)(data)["pred"]
    return model_grid.numpy(), np.asarray(data["image"].affine), np.asarray(inverted)


def workflow(path, weights, tmp_path, preprocess, chunks, grid="input", output="out/{stem}_labels.nii.gz"):
    return Workflow.from_dict(
        {
            "version": 1,
            "input": str(path),
            "model": {"network": "UNet", "args": UNET_3D, "weights": str(weights)},
            "preprocess": preprocess,
            "inference": {"roi_size": list(ROI), "overlap": 0.25, "batch_size": 4, "device": "cpu"},
            "output": {"path": output, "probabilities": "float32", "chunks": chunks, "grid": grid},
        },
        base_dir=tmp_path,
    )


def read_nifti_output(result):
    labels = np.asarray(nib.load(result.outputs[0]).dataobj)
    probabilities = np.moveaxis(nib.load(result.outputs[1]).get_fdata(dtype=np.float32), -1, 0)
    return labels, probabilities


def assert_matches(labels, probabilities, expected):
    np.testing.assert_allclose(probabilities, expected, atol=1e-3)
    agree = np.mean(labels == expected.argmax(0))
    assert agree >= 0.9999, f"labels agree on {agree:.6f} of the voxels"


@pytest.mark.parametrize("chunks", [[40, 32, 16], 23])
def test_oblique_las_volume_oriented_spaced_and_clipped_like_monai(make_model, tmp_path, client, chunks):
    path = oblique_las(tmp_path)
    weights, net = make_model(UNET_3D)
    intensity = {"a_min": 0.0, "a_max": 1200.0, "b_min": 0.0, "b_max": 1.0, "clip": True}
    preprocess = {"orientation": "RAS", "spacing": [2.6, 2.3, 3.0], "intensity": intensity}
    (result,) = tilemask.run(workflow(path, weights, tmp_path, preprocess, chunks), client, overwrite=True)
    _, _, expected = monai_pipeline(path, net, "RAS", (2.6, 2.3, 3.0), intensity=intensity)
    labels, probabilities = read_nifti_output(result)
    assert labels.shape == nib.load(path).shape  # the scan's own grid
    np.testing.assert_array_equal(nib.load(result.outputs[0]).affine, nib.load(path).affine)
    assert_matches(labels, probabilities, expected)


@pytest.mark.parametrize("sform_scale,qform_scale,pixdim_scale,sform_code", [
    (1.3, 1.0, 1.0, 2),  # the sform disagrees with pixdim, the qform agrees: MONAI takes the qform
    (1.0, 1.0, 1.0, 2),  # all agree
    (1.3, 1.0, 1.3, 2),  # the sform agrees
    (1.3, 1.0, 1.0, 0),  # no sform code: the qform, for nibabel too
])  # fmt: skip
def test_a_niftis_affine_is_the_one_monai_reads(tmp_path, sform_scale, qform_scale, pixdim_scale, sform_code):
    """MONAI's NibabelReader rectifies a header whose affine's voxel sizes disagree with its pixdim
    (``correct_nifti_header_if_necessary``); tilemask reads the affine MONAI reads, without importing it."""
    from tilemask.formats import nifti_affine_mm

    affine = nib.load(oblique_las(tmp_path)).affine
    img = nib.Nifti1Image(np.zeros((6, 5, 4), np.float32), None)
    img.set_qform(affine @ np.diag([qform_scale] * 3 + [1]), code=1)
    img.set_sform(affine @ np.diag([sform_scale, 1, 1, 1]), code=sform_code)
    img.header.set_zooms(tuple(np.sqrt((affine[:3, :3] ** 2).sum(0)) * [pixdim_scale, 1, 1]))
    nib.save(img, tmp_path / "h.nii.gz")
    expected = np.asarray(LoadImaged("image", image_only=True)({"image": str(tmp_path / "h.nii.gz")})["image"].affine)
    np.testing.assert_allclose(nifti_affine_mm(nib.load(tmp_path / "h.nii.gz")), expected, atol=1e-6)


@pytest.mark.slow  # a tilemask run and MONAI's whole pipeline (20 s); the header rule is tested above
def test_a_nifti_whose_sform_disagrees_with_its_voxel_sizes_is_placed_by_its_qform_like_monai(make_model, tmp_path,
                                                                                              client):  # fmt: skip
    """A reviewer's: a header whose sform's voxel sizes are not its pixdim while its qform's are. MONAI's
    NibabelReader then reads the qform (``correct_nifti_header_if_necessary``); tilemask read the sform, as
    nibabel does, and agreed with MONAI on 51% of the labels. The labels keep the scan's header as it is."""
    source = nib.load(oblique_las(tmp_path))
    qform = source.affine
    sform = qform.copy()
    sform[:3, :3] = sform[:3, :3] @ np.diag([1.3, 0.8, 1.1])
    img = nib.Nifti1Image(np.asarray(source.dataobj), None)
    img.set_qform(qform, code=1)
    img.set_sform(sform, code=2)
    img.header.set_zooms(source.header.get_zooms()[:3])
    path = tmp_path / "two_affines.nii.gz"
    nib.save(img, path)
    weights, net = make_model(UNET_3D)
    intensity = {"a_min": 0.0, "a_max": 1200.0, "b_min": 0.0, "b_max": 1.0, "clip": True}
    preprocess = {"orientation": "RAS", "spacing": [2.6, 2.3, 3.0], "intensity": intensity}
    (result,) = tilemask.run(workflow(path, weights, tmp_path, preprocess, [40, 32, 16]), client)
    _, _, expected = monai_pipeline(path, net, "RAS", (2.6, 2.3, 3.0), intensity=intensity)
    labels, probabilities = read_nifti_output(result)
    written = nib.load(result.outputs[0])
    np.testing.assert_array_equal(written.get_sform(), nib.load(path).get_sform())
    np.testing.assert_array_equal(written.get_qform(), nib.load(path).get_qform())
    assert_matches(labels, probabilities, expected)


@pytest.mark.parametrize("chunks", [17, 512])  # the statistics of several chunks combined, and of one
def test_stored_psr_volume_zscored_over_nonzero_voxels_like_monai(chunks, make_model, tmp_path, client):
    path = stored_psr(tmp_path)
    weights, net = make_model(UNET_3D)
    preprocess = {"orientation": "RAS", "spacing": [1.5, 2.5, 1.2], "normalize": {"mode": "zscore", "nonzero": True}}
    (result,) = tilemask.run(workflow(path, weights, tmp_path, preprocess, chunks), client)
    _, _, expected = monai_pipeline(path, net, "RAS", (1.5, 2.5, 1.2), zscore={"nonzero": True})
    assert_matches(*read_nifti_output(result), expected)


@pytest.mark.parametrize("stored", ["int16", "float32"])  # floats: NaN or infinity would be invalid voxels
def test_a_volume_cropped_to_its_nonzero_voxels_is_monais_crop_then_its_grid_and_zscore(make_model, tmp_path, client,
                                                                                        stored):  # fmt: skip
    """``preprocess.crop: nonzero`` is MONAI's ``CropForegroundd(select_fn=x != 0)`` before the grid's steps: the
    model grid, its windows and the z-score are the box's (2/3 of example4d's voxels lie outside it), and
    ``Invertd`` pads the box back: outside it background."""
    path = oblique_las(tmp_path)
    if stored == "float32":
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32), img.affine), path)
    weights, net = make_model(UNET_3D)
    preprocess = {"orientation": "RAS", "spacing": [2.6, 2.3, 3.0], "normalize": {"mode": "zscore"}, "crop": "nonzero"}
    (result,) = tilemask.run(workflow(path, weights, tmp_path, preprocess, [40, 32, 16]), client)
    _, _, expected = monai_pipeline(path, net, "RAS", (2.6, 2.3, 3.0), zscore={}, crop=True)
    labels, probabilities = read_nifti_output(result)
    inside = np.asarray(nib.load(path).dataobj) != 0
    box = tuple(slice(int(at.min()), int(at.max()) + 1) for at in np.nonzero(inside))
    assert inside.mean() < 0.5 and labels.shape == inside.shape
    assert_matches(labels[box], probabilities[(slice(None), *box)], expected[(slice(None), *box)])
    outside = np.ones(labels.shape, bool)
    outside[box] = False
    assert (labels[outside] == 0).all() and (probabilities[0][outside] == 1).all()
    assert not expected[:, outside].any()  # MONAI pads with zeros: the test sees its box
    _, _, whole = monai_pipeline(path, net, "RAS", (2.6, 2.3, 3.0), zscore={})
    assert np.abs(whole - expected)[(slice(None), *box)].max() > 0.01  # the crop changes the answer inside the box


def test_a_volume_without_a_nonzero_voxel_is_predicted_whole(make_model, tmp_path, client):
    """No voxel to crop to: the whole volume, as nnU-Net's ``get_bbox_from_mask`` keeps it."""
    img = nib.load(stored_psr(tmp_path))
    path = tmp_path / "zeros.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.int16), img.affine), path)
    weights, _ = make_model(UNET_3D)
    outputs = []
    for crop in ("nonzero", "none"):
        wf = workflow(path, weights, tmp_path, {"spacing": 1.5, "crop": crop}, 16, output=f"{crop}/{{stem}}.nii.gz")
        (result,) = tilemask.run(wf, client)
        outputs.append(read_nifti_output(result)[1])
    np.testing.assert_array_equal(*outputs)


def test_model_grid_output_is_what_monai_feeds_the_network(make_model, tmp_path, client):
    path = stored_psr(tmp_path)
    weights, net = make_model(UNET_3D)
    preprocess = {"orientation": "LPS", "spacing": 1.7, "normalize": {"mode": "zscore"}}
    wf = workflow(path, weights, tmp_path, preprocess, 19, grid="model", output="out/{stem}.zarr")
    (result,) = tilemask.run(wf, client)
    expected, affine, _ = monai_pipeline(path, net, "LPS", (1.7, 1.7, 1.7), zscore={})
    group = zarr.open_group(result.outputs[0], mode="r")
    np.testing.assert_allclose(group["probabilities"][:], expected, atol=1e-4)
    np.testing.assert_allclose(np.asarray(group.attrs["affine"]), affine, atol=1e-6)


@pytest.mark.parametrize("volume,orientation,spacing", [(oblique_las, "RAS", (2.6, 2.3, 3.0)), (stored_psr, "LPI", (1.5, 2.5, 1.2)),
                                                        (oblique_las, "RAS", (2.6, 0.0, -1.0))])  # fmt: skip
def test_regions_of_the_model_grid_are_monais_voxels_to_the_bit(tmp_path, volume, orientation, spacing):
    """Each region read on its own equals the same voxels of MONAI's whole-volume Orientation + Spacing (so
    zeros stay zero where MONAI's do: the z-score over nonzero voxels), and the way back equals Invertd to
    float32's precision (torch's grid_sample in float32 against MONAI's in float64)."""
    from tilemask.sources import open_source
    from tilemask.spatial import ResampledSource, model_grid, resample_back

    path = volume(tmp_path)
    pre = Compose([
        LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", axcodes=orientation),
        Spacingd("image", pixdim=spacing, mode="bilinear"),
    ])  # fmt: skip
    data = pre({"image": str(path)})
    expected = data["image"].numpy()
    source = open_source(str(path), 3)
    grid = model_grid(np.asarray(source.geometry.affine), source.spatial_shape, orientation, spacing)
    # the affine to a few units in the last place: torch's and numpy's BLAS sum a flipped axis's translation in
    # an order of their own that depends on the CPU (the voxels below stay bit for bit)
    np.testing.assert_allclose(np.asarray(grid.affine), data["image"].affine.numpy(), rtol=4e-16, atol=1e-17)
    resampled = ResampledSource(source, grid)
    rng = np.random.default_rng(0)
    for _ in range(6):
        lo = [int(rng.integers(0, s - 1)) for s in grid.shape]
        region = tuple((a, int(rng.integers(a + 1, s + 1))) for a, s in zip(lo, grid.shape))
        np.testing.assert_array_equal(resampled.read(region), expected[(slice(None), *(slice(a, b) for a, b in region))])
    model = np.stack([expected[0], expected[0] * 0.5 + 1]).astype(np.float32)  # two channels on the model grid
    data["pred"] = data["image"].clone().set_array(torch.from_numpy(model))
    inverted = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)(data)["pred"].numpy()
    region = ((3, source.spatial_shape[0] - 2), (0, source.spatial_shape[1] // 2), (1, source.spatial_shape[2]))
    back = resample_back(grid, region, lambda r: model[(slice(None), *(slice(a, b) for a, b in r))])
    np.testing.assert_allclose(back, inverted[(slice(None), *(slice(a, b) for a, b in region))], rtol=0, atol=1e-5 * np.abs(model).max())


def test_regions_of_a_volume_with_nan_and_infinity_are_monais_voxels_to_the_bit(tmp_path):
    """Where values are not all finite, the corners beyond the volume's edge must be left out as torch's
    grid_sample leaves them out (their weight is 0, and 0 * NaN is NaN): each region equals MONAI's voxels,
    NaN for NaN."""
    from tilemask.sources import open_source
    from tilemask.spatial import ResampledSource, model_grid

    img = nib.load(os.path.join(data_path, "example4d.nii.gz"))
    data = np.asarray(img.dataobj[..., 0]).astype(np.float32)
    data[-1, :, 5] = np.nan  # on the volume's last plane along the first axis: the clamped corners' own values
    data[10, 20, :] = np.inf
    data[-1, -1, -1] = -np.inf
    path = tmp_path / "nonfinite.nii.gz"
    stored = nib.Nifti1Image(data, img.affine)
    stored.set_data_dtype(np.float32)
    nib.save(stored, path)
    spacing = (2.6, 2.3, 3.0)
    pre = Compose([
        LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS"),
        Spacingd("image", pixdim=spacing, mode="bilinear"),
    ])  # fmt: skip
    expected = pre({"image": str(path)})["image"].numpy()
    assert np.isnan(expected).any() and not np.isfinite(expected).all()
    source = open_source(str(path), 3)
    resampled = ResampledSource(source, model_grid(np.asarray(source.geometry.affine), source.spatial_shape, "RAS", spacing))
    whole = tuple((0, s) for s in expected.shape[1:])
    np.testing.assert_array_equal(resampled.read(whole), expected)
    rng = np.random.default_rng(1)
    for _ in range(4):
        lo = [int(rng.integers(0, s - 1)) for s in expected.shape[1:]]
        region = tuple((a, int(rng.integers(a + 1, s + 1))) for a, s in zip(lo, expected.shape[1:]))
        np.testing.assert_array_equal(resampled.read(region), expected[(slice(None), *(slice(a, b) for a, b in region))])


def test_grid_keys_are_checked_before_any_work(make_model, tmp_path):
    path = stored_psr(tmp_path)
    weights, _ = make_model(UNET_3D)
    with pytest.raises(WorkflowError, match="orientation: three axis codes"):
        workflow(path, weights, tmp_path, {"orientation": "RAR"}, 16)
    with pytest.raises(WorkflowError, match="grid: model needs preprocess.orientation or spacing"):
        workflow(path, weights, tmp_path, {}, 16, grid="model")
    with pytest.raises(WorkflowError, match="crop needs output.grid: input"):
        workflow(path, weights, tmp_path, {"spacing": 2.0, "crop": "nonzero"}, 16, grid="model")
    with pytest.raises(WorkflowError, match="orientation, spacing and crop apply to volumes: they need a 3D model"):
        Workflow.from_dict({"version": 1, "input": str(path), "model": {"network": "UNet", "weights": str(weights)},
                            "preprocess": {"crop": "nonzero"}, "inference": {"roi_size": [64, 64]},
                            "output": {"path": "out.tif"}}, base_dir=tmp_path)  # fmt: skip
    with pytest.raises(WorkflowError, match="clip needs b_min and b_max"):
        workflow(path, weights, tmp_path, {"intensity": {"a_min": 0, "a_max": 1, "clip": True}}, 16)
    with pytest.raises(WorkflowError, match="mode zscore computes mean and std"):
        workflow(path, weights, tmp_path, {"normalize": {"mode": "zscore", "mean": [1.0], "std": [2.0]}}, 16)


@pytest.mark.slow  # a third run on the oblique volume
def test_post_processing_runs_on_the_input_grid(make_model, tmp_path, client):
    """keep_largest after the way back equals MONAI's KeepLargestConnectedComponent on MONAI's inverted labels."""
    from monai.transforms import KeepLargestConnectedComponent

    path = oblique_las(tmp_path)
    weights, net = make_model(UNET_3D)
    preprocess = {"orientation": "RAS", "spacing": 2.6, "normalize": {"mode": "zscore", "nonzero": True}}
    keys = {**workflow(path, weights, tmp_path, preprocess, 29).to_dict(), "postprocess": {"keep_largest": True}}
    (result,) = tilemask.run(Workflow.from_dict(keys, base_dir=tmp_path), client)
    _, _, inverted = monai_pipeline(path, net, "RAS", (2.6, 2.6, 2.6), zscore={"nonzero": True})
    keep = KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False)  # MONAI's default connectivity
    expected = keep(torch.from_numpy(inverted.argmax(0)[None])).numpy()[0]
    labels, _ = read_nifti_output(result)
    assert labels.shape == nib.load(path).shape and not np.array_equal(expected, inverted.argmax(0))
    assert np.mean(labels == expected) >= 0.9999


def test_a_spacing_of_a_single_0_keeps_each_scans_spacing_as_minus_1_does(make_model, tmp_path):
    """``spacing: 0`` is MONAI's ``Spacing(pixdim=0)``, as ``-1`` or ``[0, 0, 0]``: a grid of the scan's own spacing
    (its shear dropped), not no spacing at all (0 is falsy)."""
    path = oblique_las(tmp_path)
    weights, _ = make_model(UNET_3D)
    for spacing in (0, 0.0, -1.0, [0.0, 0.0, 0.0]):
        wf = workflow(path, weights, tmp_path, {"spacing": spacing}, 16, grid="model")
        assert wf.preprocess.sees_another_grid and wf.preprocess.spacing_per_axis == (float(np.ravel(spacing)[0]),) * 3


@pytest.mark.timeout(120)
def test_a_spacing_that_makes_a_grid_far_larger_than_the_scan_is_refused_before_any_work(make_model, tmp_path):
    """``preprocess.spacing`` of ``[1e-300, 1, 1]`` planned for ever (the windows along a 5.9e301-voxel axis) and
    ``1e-3`` started a 59001 x 63001 x 47001 grid (a review's); both are refused when the input is planned, and a
    grid 8 times the scan's voxels (half its spacing) still plans."""
    from tilemask.errors import InputError
    from tilemask.planning import plan_workflow

    path = oblique_las(tmp_path)
    weights, _ = make_model(UNET_3D)
    for spacing in ([1e-300, 1.0, 1.0], 1e-3, [1e-5, 1.0, 1.0], [1e-300, 1e-300, 1.0], [1e-320, 1.0, 1.0]):
        # the last two: "OverflowError: int too large to convert to float" (the message's count of voxels) and
        # "ValueError: cannot convert float NaN to integer" (the grid's shape), exit 1
        with pytest.raises(InputError, match=r"preprocess.spacing .*makes the network's grid .*tilemask refuses a "
                                             r"grid over 64 times the scan's voxels") as refused, \
                warnings.catch_warnings():  # numpy's "invalid value encountered in matmul" printed before it
            warnings.simplefilter("error", RuntimeWarning)
            plan_workflow(workflow(path, weights, tmp_path, {"spacing": spacing}, 16))
        assert len(str(refused.value)) < 400 and refused.value.exit_status == 2, str(refused.value)
    own = np.sqrt((nib.load(path).affine[:3, :3] ** 2).sum(0))
    (planned,) = plan_workflow(workflow(path, weights, tmp_path, {"spacing": list(own / 2)}, 16)).inputs
    assert planned.plan.n_windows > 0
