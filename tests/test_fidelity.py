"""Same answer as MONAI's sliding_window_inference, whatever the chunking and worker count."""

from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pytest
import torch
import zarr
from monai.inferers import SliceInferer, sliding_window_inference

import tilemask
from tilemask import Workflow
from tilemask.errors import WorkflowError

from .conftest import UNET_2D, UNET_3D, raster_workflow, volume_workflow


def monai_probabilities(image: np.ndarray, net, roi, overlap, mode, mean, std, sigma_scale=0.125, device="cpu"):
    """softmax(sliding_window_inference(normalized image)) on the whole image, in memory (on ``device``)."""
    x = (image.astype(np.float32) - np.float32(mean)) / np.float32(std)
    with torch.inference_mode():
        logits = sliding_window_inference(
            torch.from_numpy(x[None]).to(device), roi, 4, net.to(device), overlap=overlap, mode=mode,
            sigma_scale=sigma_scale,
        )  # fmt: skip
    return torch.softmax(logits, 1)[0].cpu().numpy()


def run_zarr(workflow: dict, tmp_path, client, **overrides):
    wf = Workflow.from_dict(workflow, [f"{k}={v}" for k, v in overrides.items()], base_dir=tmp_path)
    (result,) = tilemask.run(wf, client, overwrite=True)  # reruns replace the previous output
    group = zarr.open_group(result.outputs[0], mode="r")
    return group["probabilities"][:], group["labels"][:], result


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_raster_matches_monai(make_raster, make_model, tmp_path, client, mode, overlap):
    path, image = make_raster((3, 203, 317))
    weights, net = make_model()
    workflow = raster_workflow(path, weights, inference={"mode": mode, "overlap": overlap})
    probs, labels, result = run_zarr(workflow, tmp_path, client)
    expected = monai_probabilities(image, net, (64, 64), overlap, mode, 127.0, 60.0)
    assert result.windows > 1
    np.testing.assert_allclose(probs, expected, atol=1e-4)
    agree = labels == expected.argmax(0)
    top2 = np.sort(expected, axis=0)[-2:]
    assert np.all(agree | (top2[1] - top2[0] < 1e-4)), "labels differ away from ties"


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_labels_alone_are_the_labels_written_with_probabilities(make_raster, make_model, tmp_path, client, activation):
    """A job that writes labels alone, argmax of the weighted sums, adds up no window weights in its blocks (a third
    of a 2-class network's sums, :meth:`tilemask.settings.Finishing.needs_weights`); a sigmoid's threshold needs
    them.  Either way its labels are those of the same run with probabilities, which match MONAI's above."""
    from tilemask.engine import build_graph, predict
    from tilemask.planning import plan_workflow

    path, _ = make_raster((3, 203, 317))
    args = {**UNET_2D, "out_channels": 1} if activation == "sigmoid" else UNET_2D
    weights, _ = make_model(args)
    workflow = raster_workflow(path, weights, args, inference={"activation": activation})
    _, labels, _ = run_zarr(workflow, tmp_path, client)
    labels_only = Workflow.from_dict(workflow, ["output.probabilities=none", "output.path=out/only.zarr"],
                                     base_dir=tmp_path)  # fmt: skip
    (result,) = tilemask.run(labels_only, client)
    np.testing.assert_array_equal(zarr.open_group(result.outputs[0], mode="r")["labels"][:], labels)
    assert 0 < labels.mean() < 1 if activation == "sigmoid" else len(np.unique(labels)) > 1

    direct = Workflow.from_dict(workflow, ["output.probabilities=none", "inference.backend=torch"], base_dir=tmp_path)
    (job,) = plan_workflow(direct).jobs(out_channels=args["out_channels"])  # torch: auto would measure here
    graph, blocks, _ = build_graph(job)
    key, block = next(iter(blocks.items()))
    partial = predict(block, graph[graph[key][2]])  # the task, run here: (predict, block, key of what is shared)
    assert partial.weighted.shape[0] == args["out_channels"]
    assert (partial.weights is None) == (activation == "softmax")


def test_axis_smaller_than_roi_is_padded_like_monai(make_raster, make_model, tmp_path, client):
    path, image = make_raster((3, 41, 150))  # 41 rows < roi 64: MONAI pads 11 before, 12 after
    weights, net = make_model()
    probs, _, _ = run_zarr(raster_workflow(path, weights), tmp_path, client, **{"output.chunks": 32})
    np.testing.assert_allclose(probs, monai_probabilities(image, net, (64, 64), 0.25, "gaussian", 127.0, 60.0), atol=1e-4)


@pytest.mark.slow  # five runs and a second embedded cluster
def test_chunking_and_worker_count_change_nothing_but_summation_order(make_raster, make_model, tmp_path, client):
    from distributed import Client, LocalCluster

    path, _ = make_raster((3, 250, 190))
    weights, _ = make_model()
    workflow = raster_workflow(path, weights)
    reference, ref_labels, _ = run_zarr(workflow, tmp_path, client, **{"output.chunks": 250})
    for chunks in (37, "[50, 120]", 128):
        probs, labels, _ = run_zarr(workflow, tmp_path, client, **{"output.chunks": chunks})
        np.testing.assert_allclose(probs, reference, atol=1e-5)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as one_worker:
            probs, _, _ = run_zarr(workflow, tmp_path, one_worker, **{"output.chunks": 64})
    np.testing.assert_allclose(probs, reference, atol=1e-5)


@pytest.mark.parametrize("mode,overlap,shape", [("gaussian", 0.25, (37, 29, 23)), ("constant", 0.5, (41, 19, 30))])
def test_nifti_volume_matches_monai(make_volume, make_model, tmp_path, client, mode, overlap, shape):
    path, volume = make_volume(shape)  # 19 and 23 < roi 24: padded axes
    weights, net = make_model(UNET_3D)
    workflow = volume_workflow(path, weights, {"overlap": overlap, "mode": mode, "batch_size": 3}, {"chunks": 16})
    wf = Workflow.from_dict(workflow, base_dir=tmp_path)
    (result,) = tilemask.run(wf, client)
    labels_img = nib.load(result.outputs[0])
    probs_img = nib.load(result.outputs[1])
    expected = monai_probabilities(volume[None], net, (24, 24, 24), overlap, mode, 500.0, 300.0)
    np.testing.assert_allclose(np.moveaxis(probs_img.get_fdata(dtype=np.float32), -1, 0), expected, atol=1e-4)
    labels = np.asarray(labels_img.dataobj)
    top2 = np.sort(expected, axis=0)[-2:]
    assert np.all((labels == expected.argmax(0)) | (top2[1] - top2[0] < 1e-4))
    assert labels.dtype == np.uint8 and labels.shape == shape
    reference = nib.load(path)
    np.testing.assert_array_equal(labels_img.affine, reference.affine)
    np.testing.assert_allclose(labels_img.header.get_sform(), reference.affine, atol=1e-6)
    np.testing.assert_allclose(labels_img.header.get_qform(), reference.affine, atol=1e-5)
    assert probs_img.shape == (*shape, 2)


UNET_SLICES = {**UNET_3D, "spatial_dims": 2}  # a 2D network taking a scan's one channel


@pytest.mark.parametrize("axis,backend", [(0, "torch"), (1, "onnxruntime"), (2, "auto")])
def test_a_2d_model_over_a_volumes_slices_is_monais_slice_inferer(make_volume, make_model, tmp_path, client, axis,
                                                                  backend):  # fmt: skip
    """``inference.slice_axis``: a 2D network over a volume slice by slice, as MONAI's ``SliceInferer`` runs it
    (its ``spatial_dim``: a sliding window one voxel across slices, the network fed each slice), with the runners
    of the backends; the labels on the scan's grid."""
    path, volume = make_volume((37, 29, 23))
    weights, net = make_model(UNET_SLICES)
    inference = {"roi_size": [16, 16], "slice_axis": axis, "batch_size": 3, "backend": backend}
    workflow = volume_workflow(path, weights, inference, {"chunks": 16})
    workflow["model"]["args"] = UNET_SLICES
    (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    probabilities = np.moveaxis(nib.load(result.outputs[1]).get_fdata(dtype=np.float32), -1, 0)
    x = (volume.astype(np.float32) - np.float32(500.0)) / np.float32(300.0)
    inferer = SliceInferer(roi_size=(16, 16), sw_batch_size=4, spatial_dim=axis, overlap=0.25, mode="gaussian")
    with torch.inference_mode():
        expected = torch.softmax(inferer(torch.from_numpy(x[None, None]), net), 1)[0].numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    labels = nib.load(result.outputs[0])
    assert labels.shape == volume.shape
    np.testing.assert_array_equal(labels.affine, nib.load(path).affine)


@pytest.mark.parametrize("edit,message", [
    ({"inference": {"roi_size": [1, 16, 16]}}, "roi_size is a slice's window, 2 values (got 3)"),
    ({"output": {"path": "out/{stem}.tif"}}, "this model is 3D (a 2D model slice by slice: its labels are a volume's)"),
    ({"output": {"vectors": "out/{stem}.gpkg"}}, "output.vectors needs a 2D raster model"),
    ({"output": {"chunks": [16, 16]}}, "output.chunks has 2 values but the image has 3 axes"),
])  # fmt: skip
def test_what_a_2d_model_over_slices_cannot_take_is_refused(tmp_path, edit, message):
    workflow = volume_workflow("scan.nii.gz", "w.pt", {"roi_size": [16, 16], "slice_axis": 2}, {})
    workflow["model"]["args"] = UNET_SLICES
    for section, values in edit.items():
        workflow[section] = {**workflow[section], **values}
    with pytest.raises(WorkflowError, match=re.escape(message)):
        Workflow.from_dict(workflow, base_dir=tmp_path)


def test_a_2d_model_writing_a_volumes_format_is_told_of_slice_axis(tmp_path):
    workflow = volume_workflow("scan.nii.gz", "w.pt", {"roi_size": [16, 16]}, {})
    workflow["model"]["args"] = UNET_SLICES
    with pytest.raises(WorkflowError, match="or set inference.slice_axis to run it over a volume's slices$"):
        Workflow.from_dict(workflow, base_dir=tmp_path)


@pytest.mark.timeout(30)
def test_slice_axis_with_a_3d_network_is_refused_naming_both(tmp_path):
    """``slice_axis`` with a 3D network was refused as "inference.roi_size has 2 values but model.args.spatial_dims
    is 3", naming neither slice_axis nor the way out."""
    workflow = volume_workflow("scan.nii.gz", "w.pt", {"roi_size": [16, 16], "slice_axis": 2}, {})
    with pytest.raises(WorkflowError, match=re.escape(
            "inference.slice_axis runs a 2D network slice by slice, but model.args.spatial_dims is 3: leave "
            "slice_axis out to run the 3D network over the volume (roi_size of 3 values)")):  # fmt: skip
        Workflow.from_dict(workflow, base_dir=tmp_path)


@pytest.mark.timeout(120)
def test_slice_axis_over_a_2d_image_is_refused_as_no_volume(make_raster, make_model, tmp_path):
    """A 2D image with ``slice_axis`` was refused as "has 2 spatial axes but the model is 3D": the model is 2D."""
    from tilemask.errors import InputError

    path, _ = make_raster((1, 50, 60))
    weights, _ = make_model(UNET_SLICES)
    workflow = volume_workflow(path, weights, {"roi_size": [16, 16], "slice_axis": 0}, {})
    workflow["model"]["args"] = UNET_SLICES
    workflow["output"]["path"] = "out/{stem}.zarr"
    with pytest.raises(InputError, match=re.escape(
            f"{path}: has 2 spatial axes, no volume for inference.slice_axis (a 2D model over a volume's slices); "
            "leave slice_axis out to run the 2D model over the image")):  # fmt: skip
        tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), workers=1)


@pytest.mark.slow  # 10 s in a loaded default run (2026-12-07, the 17th session)
@pytest.mark.timeout(120)
def test_slice_axis_with_a_3d_torchscript_network_says_it_feeds_2d_slices(make_volume, tmp_path):
    """A TorchScript archive does not say its spatial_dims: a 3D one with ``slice_axis`` was refused as "the network
    rejects a 1-channel window of roi [1, 16, 16]: RuntimeError: Sizes of tensors must match ...", naming neither
    slice_axis nor the 2D slices the network is fed."""
    from monai.networks.nets import UNet

    path, _ = make_volume((37, 29, 23))
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(UNet(**UNET_3D).eval()), tmp_path / "net3d.pt")
    workflow = volume_workflow(path, tmp_path / "net3d.pt", {"roi_size": [16, 16], "slice_axis": 0}, {})
    workflow["model"] = {"weights": str(tmp_path / "net3d.pt")}
    with pytest.raises(WorkflowError, match=re.escape(
            "; inference.slice_axis 0 feeds it each window's slice, a tensor of (1, 1, 16, 16): it needs a 2D "
            "network taking 1 channel") + "$"):  # fmt: skip
        tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), workers=1)


@pytest.mark.slow  # 10 s in a loaded default run (2026-12-07, the 17th session)
@pytest.mark.timeout(120)
def test_slice_axis_with_a_2d_network_wanting_other_channels_is_not_called_3d(make_volume, tmp_path):
    """A 2D TorchScript archive of 3 input channels over a 1-channel volume's slices: the refusal's end said "it needs
    a 2D network" of a network that is 2D (its conv's "expected input[1, 1, 16, 16] to have 3 channels" before it):
    what it needs is a 2D network taking the volume's one channel."""
    from monai.networks.nets import UNet

    path, _ = make_volume((37, 29, 23))
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(UNet(**{**UNET_SLICES, "in_channels": 3}).eval()), tmp_path / "net2d.pt")
    workflow = volume_workflow(path, tmp_path / "net2d.pt", {"roi_size": [16, 16], "slice_axis": 2}, {})
    workflow["model"] = {"weights": str(tmp_path / "net2d.pt")}
    with pytest.raises(WorkflowError, match=r"to have 3 channels, but got 1 channels instead; " + re.escape(
            "inference.slice_axis 2 feeds it each window's slice, a tensor of (1, 1, 16, 16): it needs a 2D "
            "network taking 1 channel") + "$"):  # fmt: skip
        tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), workers=1)


def test_flips_of_a_slice_are_the_volumes_other_axes():
    """``tta`` names a slice's axes, as ``roi_size`` does; the windows flip along the volume's other two axes."""
    inference = Workflow.model_fields["inference"].annotation(roi_size=[16, 16], slice_axis=1, tta="flips")
    assert inference.window == (16, 1, 16)
    assert inference.window_flips == ((), (0,), (2,), (0, 2))
    listed = inference.model_copy(update={"slice_axis": 0, "tta": [[1]]})
    assert listed.window_flips == ((), (2,))


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_reduced_precision_is_monai_under_autocast(make_raster, make_model, tmp_path, client, precision):
    """``inference.precision`` runs the forward passes as a MONAI user's ``torch.autocast`` around
    ``sliding_window_inference`` does: tilemask lands on that answer, and away from float32's."""
    path, image = make_raster((3, 203, 317))
    weights, net = make_model()
    probs, labels, _ = run_zarr(raster_workflow(path, weights, inference={"precision": precision}), tmp_path, client)
    with torch.autocast("cpu", dtype=getattr(torch, precision)):
        expected = monai_probabilities(image, net, (64, 64), 0.25, "gaussian", 127.0, 60.0)
    full = monai_probabilities(image, net, (64, 64), 0.25, "gaussian", 127.0, 60.0)
    to_autocast, to_float32 = np.abs(probs - expected), np.abs(expected - full)
    assert to_autocast.max() < to_float32.max() / 2 and to_autocast.mean() < to_float32.mean() / 3
    assert (labels != expected.argmax(0)).mean() <= (expected.argmax(0) != full.argmax(0)).mean() / 4
