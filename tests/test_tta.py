"""Test-time augmentation by flips.  ``tta_mode: image`` (the default): the reference is the mean of MONAI's
activated sliding-window results over the flipped inputs, each flipped back.  ``tta_mode: patch``: MONAI's sliding
window over a predictor that averages each window's logits over its flips (nnU-Net v2's mirroring)."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
import torch
import zarr
from monai.inferers import sliding_window_inference

import tilemask
from tilemask import Workflow
from tilemask.errors import WorkflowError
from tilemask.geometry import WindowPlan

from .conftest import UNET_3D, raster_workflow, volume_workflow
from .test_fidelity import run_zarr


def monai_mirrored(image: np.ndarray, net, roi, flips, mean, std, overlap=0.25) -> np.ndarray:
    """mean over ``flips`` of softmax(sliding_window_inference(flip(x))), flipped back."""
    x = torch.from_numpy(((image.astype(np.float32) - np.float32(mean)) / np.float32(std))[None])
    total = 0
    with torch.inference_mode():
        for axes in flips:
            dims = [a + 2 for a in axes]
            flipped = torch.flip(x, dims) if dims else x
            logits = sliding_window_inference(flipped, roi, 4, net, overlap=overlap, mode="gaussian")
            total = total + torch.softmax(torch.flip(logits, dims) if dims else logits, 1)
    return (total / len(flips))[0].numpy()


def monai_patch_mirrored(image: np.ndarray, net, roi, flips, mean, std, overlap=0.25) -> np.ndarray:
    """softmax(sliding_window_inference(x)) over a predictor that averages each window's logits over ``flips``,
    each flipped back: nnU-Net v2's mirroring (``_internal_maybe_mirror_and_predict``) inside MONAI's window."""
    x = torch.from_numpy(((image.astype(np.float32) - np.float32(mean)) / np.float32(std))[None])

    def predict(window):
        total = 0
        for axes in flips:
            dims = [a + 2 for a in axes]
            total = total + (torch.flip(net(torch.flip(window, dims)), dims) if dims else net(window))
        return total / len(flips)

    with torch.inference_mode():
        return torch.softmax(sliding_window_inference(x, roi, 4, predict, overlap=overlap, mode="gaussian"), 1)[0].numpy()


def test_mirrored_grid_differs_where_monai_s_does():
    """Along an axis where ``size - roi`` is no multiple of the stride, the flipped image's windows sit
    elsewhere: both grids are kept."""
    plan = WindowPlan.build((37, 40, 19), (24, 24, 24), 0.25, 16, mirrored_axes=(0, 1, 2))
    assert plan.axes[0].starts == (0, 13) and plan.axes[0].mirrored == (0, 13)  # 37 - 24 = 13: symmetric
    assert plan.axes[1].starts == (0, 16) and plan.axes[1].mirrored == (0, 16)
    assert plan.axes[2].starts == (-2,) and plan.axes[2].mirrored == (-3,)  # padded 2 before, or 3 once flipped
    plan = WindowPlan.build((50,), (16,), 0.25, 64, mirrored_axes=(0,))
    assert plan.axes[0].starts == (0, 12, 24, 34) and plan.axes[0].mirrored == (0, 10, 22, 34)


@pytest.mark.parametrize("tta_mode", ["image", "patch"])
def test_all_flips_of_a_volume_equal_monai_s(make_volume, make_model, tmp_path, client, tta_mode):
    """``image``: the mean of MONAI's activated results over the flipped volumes; ``patch`` (nnU-Net v2's
    mirroring): MONAI's sliding window over a predictor that averages each window's logits over its flips, one
    grid of windows and one softmax.  The two answers differ, and differ from no flips: the test can fail."""
    path, volume = make_volume((45, 29, 19))  # 45 - 24 = 21 and 19 < 24: mirrored grids differ on two axes
    weights, net = make_model(UNET_3D)
    workflow = volume_workflow(path, weights, {"batch_size": 5, "tta": "flips", "tta_mode": tta_mode}, {"chunks": 17})
    (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    flips = [axes for n in range(4) for axes in itertools.combinations(range(3), n)]
    references = {mode: mirror(volume[None], net, (24, 24, 24), flips, 500.0, 300.0)
                  for mode, mirror in (("image", monai_mirrored), ("patch", monai_patch_mirrored))}  # fmt: skip
    expected = references[tta_mode]
    probabilities = np.moveaxis(nib.load(result.outputs[1]).get_fdata(dtype=np.float32), -1, 0)
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)
    assert np.abs(references["image"] - references["patch"]).max() > 1e-3
    assert np.abs(monai_mirrored(volume[None], net, (24, 24, 24), [()], 500.0, 300.0) - expected).max() > 1e-2
    labels = np.asarray(nib.load(result.outputs[0]).dataobj)
    top2 = np.sort(expected, axis=0)[-2:]
    assert np.all((labels == expected.argmax(0)) | (top2[1] - top2[0] < 1e-4))


def test_listed_flips_of_a_raster_without_probabilities(make_raster, make_model, tmp_path, client):
    path, image = make_raster((3, 150, 203))
    weights, net = make_model()
    workflow = raster_workflow(path, weights, inference={"tta": [[1]]})
    probs, labels, _ = run_zarr(workflow, tmp_path, client, **{"output.chunks": 70})
    expected = monai_mirrored(image, net, (64, 64), [(), (1,)], 127.0, 60.0)
    np.testing.assert_allclose(probs, expected, atol=1e-4)
    top2 = np.sort(expected, axis=0)[-2:]
    assert np.all((labels == expected.argmax(0)) | (top2[1] - top2[0] < 1e-4))
    labels_only = Workflow.from_dict(workflow, ["output.probabilities=none", "output.path=out/only.zarr"], base_dir=tmp_path)
    (result,) = tilemask.run(labels_only, client)
    np.testing.assert_array_equal(zarr.open_group(result.outputs[0], mode="r")["labels"][:], labels)


def test_patch_mirroring_of_a_raster_labels_only(make_raster, make_model, tmp_path, client):
    """Labels alone, from the one blend's sums (no weights needed, as without flips), are MONAI's."""
    path, image = make_raster((3, 150, 203))
    weights, net = make_model()
    workflow = raster_workflow(path, weights, inference={"tta": [[0], [0, 1]], "tta_mode": "patch"})
    labels_only = Workflow.from_dict(workflow, ["output.probabilities=none", "output.chunks=70"], base_dir=tmp_path)
    (result,) = tilemask.run(labels_only, client)
    labels = zarr.open_group(result.outputs[0], mode="r")["labels"][:]
    expected = monai_patch_mirrored(image, net, (64, 64), [(), (0,), (0, 1)], 127.0, 60.0)
    top2 = np.sort(expected, axis=0)[-2:]
    assert np.all((labels == expected.argmax(0)) | (top2[1] - top2[0] < 1e-4))
    assert (labels != monai_mirrored(image, net, (64, 64), [()], 127.0, 60.0).argmax(0)).sum() > 0


def test_flip_axes_are_checked(make_model, tmp_path):
    weights, _ = make_model()
    with pytest.raises(WorkflowError, match="tta: axis 2 of a 2D model"):
        Workflow.from_dict(raster_workflow("x.tif", weights, inference={"tta": [[0], [2]]}), base_dir=tmp_path)


@pytest.mark.timeout(30)
def test_flip_axes_of_a_model_over_slices_are_said_to_be_a_slice_s(tmp_path):
    """With ``slice_axis`` a flip's axes are a slice's (as ``roi_size``'s), not the volume's: ``tta: [[2]]`` was
    refused as "axis 2 of a 2D model" alone, where the user had named the volume's third axis."""
    from .test_fidelity import UNET_SLICES

    workflow = volume_workflow("scan.nii.gz", "w.pt", {"roi_size": [16, 16], "slice_axis": 0, "tta": [[2]]}, {})
    workflow["model"]["args"] = UNET_SLICES
    with pytest.raises(WorkflowError, match=r"tta: axis 2 of a 2D model \(spatial axes count from 0\); with "
                                            r"slice_axis a flip's axes are a slice's two, 0 and 1, as roi_size's$"):
        Workflow.from_dict(workflow, base_dir=tmp_path)
