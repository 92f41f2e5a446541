"""MONAI bundles laid out as the Model Zoo's; the reference is MONAI running the same config."""

from __future__ import annotations

import json
import os
import re
import sys

import dask.array as da
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import AsDiscreted, Compose, FillHoles, KeepLargestConnectedComponent, SaveImaged
from nibabel.testing import data_path

import tilemask
from tilemask import Workflow, postprocess
from tilemask.errors import WorkflowError

from .test_model_grid import stored_psr


def write_bundle(folder, network_def, preprocessing, inferer, postprocessing, classes, torchscript=False):
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    config = {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        "inferer": inferer,
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing},
    }
    (folder / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    channel_def = {str(i): name for i, name in enumerate(classes)}
    metadata = {"version": "0.1.0", "network_data_format": {"outputs": {"pred": {"type": "image", "channel_def": channel_def}}}}
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def").eval()
    if torchscript:
        torch.jit.save(torch.jit.script(net), folder / "models" / "model.ts")
    else:
        torch.save(net.state_dict(), folder / "models" / "model.pt")
    return folder


def test_a_slice_inferer_bundle_runs_its_2d_network_over_the_slices_as_monai_does(tmp_path, client):
    """A bundle whose inferer is ``SliceInferer`` (a 2D network over a volume, slice by slice across
    ``spatial_dim``) was refused as no SlidingWindowInferer; it runs as ``inference.slice_axis``, the answer MONAI's
    own run of the bundle gives, on a scan resampled as the bundle says (``Orientationd``, ``Spacingd``)."""
    network = {**small_unet(2), "spatial_dims": 2}
    inferer = {"_target_": "SliceInferer", "roi_size": [32, 32], "sw_batch_size": 4, "overlap": 0.25,
               "spatial_dim": 1, "mode": "gaussian"}  # fmt: skip
    preprocessing = [*UNRESAMPLED[:2], {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                     {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
                     UNRESAMPLED[2]]  # fmt: skip
    postprocessing = [SOFTMAX_LABELS[0],
                      {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
                       "nearest_interp": False}, SOFTMAX_LABELS[1]]  # fmt: skip
    folder = write_bundle(tmp_path / "slices", network, preprocessing, inferer, postprocessing, ["background", "x"])
    raw = {"version": 1, "input": "x.nii.gz", "model": {"bundle": str(folder)}, "output": {"path": "x.nii.gz"}}
    assert Workflow.from_dict(raw).inference.window == (32, 1, 32)
    scan = stored_psr(tmp_path)
    assert_runs_as_monai(folder, scan, tmp_path, client, atol=1e-4)


def test_a_slice_inferers_per_axis_overlap_and_sigma_are_the_volumes_three_axes_as_monai_takes_them(tmp_path, client):
    """MONAI's SliceInferer takes a list of ``overlap`` or ``sigma_scale`` per axis of the volume, three values (two
    are its ValueError "Sequence must have length 3"); tilemask read them as a slice's two and refused the bundle
    ("overlap has 3 values but roi_size has 2"). The value across slices is dropped: a window one slice across has
    one start and weighs the same whatever it is."""
    network = {**small_unet(2), "spatial_dims": 2}
    inferer = {"_target_": "SliceInferer", "roi_size": [32, 24], "sw_batch_size": 4, "overlap": [0.25, 0.5, 0.6],
               "sigma_scale": [0.3, 0.125, 0.2], "spatial_dim": 1, "mode": "gaussian"}  # fmt: skip
    folder = write_bundle(tmp_path / "slices", network, UNRESAMPLED, inferer, SOFTMAX_LABELS, ["background", "x"])
    raw = {"version": 1, "input": "x.nii.gz", "model": {"bundle": str(folder)}, "output": {"path": "x.nii.gz"}}
    inference = Workflow.from_dict(raw).inference
    assert (inference.overlap, inference.sigma_scale) == ([0.25, 0.6], [0.3, 0.2])
    scan = stored_psr(tmp_path)
    assert_runs_as_monai(folder, scan, tmp_path, client, atol=1e-4)


@pytest.mark.timeout(60)
def test_a_slice_inferers_arguments_are_checked_against_the_sliding_windows_defaults(tmp_path):
    """SliceInferer passes ``cval``, ``padding_mode`` ... on to SlidingWindowInferer (its own signature is
    ``spatial_dim, *args, **kwargs``): a bundle writing MONAI's defaults, ``cval: 0.0``, was refused ("cval=0.0:
    tilemask does not apply it", with no default named) where MONAI runs it; a ``spatial_dim`` MONAI refuses (3:
    "can only be 0, 1, 2") or breaks on (-1: a conv's "expected input ... to have 1 channels") was refused as
    "workflow: inference.slice_axis: Input should be less than or equal to 2", a key the bundle never wrote."""
    network = {**small_unet(2), "spatial_dims": 2}
    base = {"_target_": "SliceInferer", "roi_size": [32, 24], "sw_batch_size": 4, "overlap": 0.25, "mode": "gaussian"}
    cases = [({"cval": 0.0, "padding_mode": "constant", "spatial_dim": 2}, None),
             ({"cval": 1.0}, "model.bundle: inferer SliceInferer cval=1.0: tilemask does not apply it (only MONAI's "
                             "default, 0.0)"),
             ({"spatial_dim": 3}, "model.bundle: inferer SliceInferer spatial_dim=3: an axis of the volume, 0, 1 or 2"),
             ({"spatial_dim": -1}, "model.bundle: inferer SliceInferer spatial_dim=-1: an axis of the volume, 0, 1 "
                                   "or 2")]  # fmt: skip
    for i, (extra, refusal) in enumerate(cases):
        folder = write_bundle(tmp_path / f"b{i}", network, UNRESAMPLED, {**base, **extra}, SOFTMAX_LABELS,
                              ["background", "x"])  # fmt: skip
        raw = {"version": 1, "input": "x.nii.gz", "model": {"bundle": str(folder)}, "output": {"path": "x.nii.gz"}}
        if refusal is None:
            assert Workflow.from_dict(raw).inference.window == (32, 24, 1)
        else:
            with pytest.raises(WorkflowError, match=f"^{re.escape(refusal)}$"):
                Workflow.from_dict(raw)


def spleen_ct_bundle(folder, network=None):
    """spleen_ct_segmentation's inference.json, with a smaller UNet (or ``network``) and roi."""
    return write_bundle(
        folder,
        network or {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 16],
                    "strides": [2, 2], "num_res_units": 2, "norm": "batch"},
        [{"_target_": "LoadImaged", "keys": "image"}, {"_target_": "EnsureChannelFirstd", "keys": "image"},
         {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
         {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
         {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 200, "a_max": 5000, "b_min": 0.0, "b_max": 1.0, "clip": True},
         {"_target_": "EnsureTyped", "keys": "image"}],
        {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 24], "sw_batch_size": 4, "overlap": 0.5},
        [{"_target_": "Activationsd", "keys": "pred", "softmax": True},
         {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
          "meta_key_postfix": "meta_dict", "nearest_interp": False, "to_tensor": True},
         {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
         {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir"}],
        ["background", "spleen"],
    )  # fmt: skip


def brain_mr_bundle(folder):
    """A brain MR bundle: SegResNet on two MR channels, z-scored per channel over nonzero voxels, TorchScript."""
    return write_bundle(
        folder,
        {"_target_": "SegResNet", "spatial_dims": 3, "in_channels": 2, "out_channels": 3, "init_filters": 8,
         "blocks_down": [1, 2], "blocks_up": [1]},
        [{"_target_": "LoadImaged", "keys": "image"}, {"_target_": "EnsureChannelFirstd", "keys": "image"},
         {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
         {"_target_": "Spacingd", "keys": "image", "pixdim": [2.5, 2.5, 2.5], "mode": "bilinear"},
         {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True}],
        {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 16], "sw_batch_size": 2, "overlap": 0.25,
         "mode": "gaussian"},
        [{"_target_": "Activationsd", "keys": "pred", "softmax": True},
         {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
          "nearest_interp": False},
         {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}],
        ["background", "grey", "white"], torchscript=True,
    )  # fmt: skip


def assert_runs_as_monai(folder, scan, tmp_path, client, atol: float) -> None:
    """tilemask's run of the bundle on ``scan``: its probabilities within ``atol`` of MONAI's own run of it, its
    labels MONAI's argmax on all but 0.01% of the voxels."""
    _, labels, probabilities = run_bundle(folder, scan, tmp_path, client)
    expected = monai_runs_the_bundle(folder, scan)
    np.testing.assert_allclose(probabilities, expected, atol=atol)
    assert np.mean(labels == expected.argmax(0)) >= 0.9999


def monai_runs_the_bundle(folder, image_path, labels=False, saved=False):
    """The bundle's own preprocessing, network, inferer and postprocessing (up to the argmax; all of it but the
    saving with ``labels``), by MONAI; the transforms are the dataset's and the evaluator's where it has them.
    With ``saved``, all of it, ``SaveImaged`` included: the labels it saves in the bundle's ``eval``, and their
    affine."""
    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    parser["bundle_root"] = str(folder)
    pre = parser.get_parsed_content("dataset::transform" if "dataset" in parser else "preprocessing")
    if (folder / "models" / "model.ts").exists():
        net = torch.jit.load(folder / "models" / "model.ts")
    else:
        net = parser.get_parsed_content("network_def")
        net.load_state_dict(torch.load(folder / "models" / "model.pt", weights_only=True))
    net.eval()
    data = pre({"image": str(image_path)})
    with torch.inference_mode():
        data["pred"] = parser.get_parsed_content("inferer")(data["image"][None], net)[0]
    post_key = "evaluator::postprocessing" if "evaluator" in parser else "postprocessing"
    if saved:
        parser.get_parsed_content(post_key)(data)
        (path,) = (folder / "eval").rglob("*.nii.gz")
        return np.asarray(nib.load(path).dataobj), nib.load(path).affine
    post = [t for t in parser.get_parsed_content(post_key).transforms if not isinstance(t, SaveImaged)]
    if not labels:
        post = post[: next((i for i, t in enumerate(post) if isinstance(t, AsDiscreted)), len(post))]
    return np.asarray(Compose(post)(data)["pred"])


def run_bundle(folder, image_path, tmp_path, client, **extra):
    workflow = {"version": 1, "input": str(image_path), "model": {"bundle": str(folder)},
                "output": {"path": "out/{stem}_labels.nii.gz", "probabilities": "float32", "chunks": 29}, **extra}  # fmt: skip
    (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    labels = np.asarray(nib.load(result.outputs[0]).dataobj)
    probabilities = np.moveaxis(nib.load(result.outputs[1]).get_fdata(dtype=np.float32), -1, 0)
    return result, labels, probabilities


def _per_key(config):
    """The postprocessing's flags given one per key (a one-item list), as MONAI's dictionary transforms take them."""
    softmax, invert, discrete = config["postprocessing"]["transforms"][:3]
    softmax["softmax"], invert["nearest_interp"], discrete["argmax"] = [True], [False], [True]
    discrete["threshold"] = [None]


def test_spleen_ct_bundle_runs_as_monai_runs_it(tmp_path, client):
    """The spleen bundle, its postprocessing's flags given per key: ``Invertd(nearest_interp=[false])`` was refused
    as if it were true (tilemask tested the truth of the list)."""
    folder = spleen_ct_bundle(tmp_path / "spleen_ct_segmentation")
    _edited(folder, _per_key)
    scan = stored_psr(tmp_path)
    workflow = Workflow.from_dict({"version": 1, "input": str(scan), "model": {"bundle": str(folder)}, "output": {"path": "x.nii.gz"}})
    assert workflow.inference.mode == "constant" and workflow.inference.overlap == 0.5  # the inferer's, MONAI's default mode
    assert workflow.preprocess.intensity.clip and workflow.classes == ["background", "spleen"]
    result, labels, probabilities = run_bundle(folder, scan, tmp_path, client)
    expected = monai_runs_the_bundle(folder, scan)
    np.testing.assert_allclose(probabilities, expected, atol=1e-3)
    assert np.mean(labels == expected.argmax(0)) >= 0.9999
    assert set(result.class_pixels) == {"background", "spleen"}


def test_fixed_normalization_of_one_value_for_all_channels_over_nonzero_voxels_runs_as_monai_runs_it(tmp_path, client):
    """``NormalizeIntensityd(subtrahend=50.0, divisor=30.0, nonzero=True)``, the scalar form MONAI takes without
    ``channel_wise`` (a list needs it): it failed with "'float' object is not iterable"."""
    img = nib.load(stored_psr(tmp_path))
    values = np.asarray(img.dataobj)
    values[values < np.median(values)] = 0  # background for nonzero to leave alone
    scan = tmp_path / "masked.nii.gz"
    nib.save(nib.Nifti1Image(values, img.affine, img.header), scan)
    assert 0.1 < np.mean(values == 0) < 0.9
    folder = write_bundle(
        tmp_path / "fixed",
        {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 16],
         "strides": [2, 2], "num_res_units": 1},
        [{"_target_": "LoadImaged", "keys": "image"}, {"_target_": "EnsureChannelFirstd", "keys": "image"},
         {"_target_": "NormalizeIntensityd", "keys": "image", "subtrahend": 50.0, "divisor": 30.0, "nonzero": True}],
        {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 24], "sw_batch_size": 4, "overlap": 0.25},
        [{"_target_": "Activationsd", "keys": "pred", "softmax": True},
         {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}],
        ["background", "foreground"],
    )  # fmt: skip
    assert_runs_as_monai(folder, scan, tmp_path, client, atol=1e-5)
    half = json.loads((folder / "configs" / "inference.json").read_text())
    half["preprocessing"]["transforms"][2].pop("divisor")
    (folder / "configs" / "inference.json").write_text(json.dumps(half))
    with pytest.raises(WorkflowError, match="NormalizeIntensity with only a subtrahend or only a divisor"):
        Workflow.from_dict({"version": 1, "input": str(scan), "model": {"bundle": str(folder)},
                            "output": {"path": "x.nii.gz"}})  # fmt: skip


@pytest.mark.slow  # a second bundle, SegResNet in TorchScript
def test_brain_mr_bundle_with_torchscript_and_two_channels(tmp_path, client):
    folder = brain_mr_bundle(tmp_path / "brain_mr")
    img = nib.load(os.path.join(data_path, "example4d.nii.gz"))  # two MR volumes: the two channels
    scan = tmp_path / "mr.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header), scan)
    assert_runs_as_monai(folder, scan, tmp_path, client, atol=1e-3)


def test_workflow_keys_override_the_bundle_and_foreign_transforms_are_refused(tmp_path):
    folder = spleen_ct_bundle(tmp_path / "bundle")
    raw = {"version": 1, "input": "x.nii.gz", "model": {"bundle": str(folder)}, "output": {"path": "x.nii.gz"},
           "inference": {"overlap": 0.25, "mode": "gaussian"}, "preprocess": {"spacing": 2.0}}  # fmt: skip
    workflow = Workflow.from_dict(raw)
    assert (workflow.inference.overlap, workflow.inference.mode, workflow.preprocess.spacing) == (0.25, "gaussian", 2.0)
    assert workflow.inference.roi_size == [32, 32, 24]  # still the bundle's
    config = json.loads((folder / "configs" / "inference.json").read_text())
    config["preprocessing"]["transforms"].insert(3, {"_target_": "CropForegroundd", "keys": "image", "source_key": "image"})
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(WorkflowError, match="preprocessing CropForegroundd cannot run chunk by chunk") as caught:
        Workflow.from_dict(raw)
    assert caught.value.exit_status == 2


def _edited(folder, edit):
    config = json.loads((folder / "configs" / "inference.json").read_text())
    edit(config)
    (folder / "configs" / "inference.json").write_text(json.dumps(config))


def _insert_normalize_first(config):  # before ScaleIntensityRanged
    config["preprocessing"]["transforms"].insert(4, {"_target_": "NormalizeIntensityd", "keys": "image",
                                                     "subtrahend": 40.0, "divisor": 100.0})  # fmt: skip


def _assert_refused(tmp_path, edit, refusal: str) -> None:
    """The spleen bundle, changed by ``edit``, is refused with ``refusal`` (a regex) and exit status 2."""
    folder = spleen_ct_bundle(tmp_path / "bundle")
    raw = {"version": 1, "input": "x.nii.gz", "model": {"bundle": str(folder)}, "output": {"path": "x.nii.gz"}}
    _edited(folder, edit)
    with pytest.raises(WorkflowError, match=refusal) as caught:
        Workflow.from_dict(raw)
    assert caught.value.exit_status == 2


@pytest.mark.parametrize(
    "edit, refusal",
    [
        (_insert_normalize_first, "preprocessing has Orientation, Spacing, NormalizeIntensity, ScaleIntensityRange: "
                                  "tilemask applies .* in that order"),  # fmt: skip
        (lambda c: c["inferer"].update(padding_mode="replicate"),
         "inferer SlidingWindowInferer padding_mode='replicate': tilemask does not apply it .*'constant'"),
        (lambda c: c["preprocessing"]["transforms"][3].update(padding_mode="zeros"),
         "preprocessing Spacingd padding_mode='zeros': tilemask does not apply it .*'border'"),
        (lambda c: c["postprocessing"]["transforms"].insert(0, c["postprocessing"]["transforms"].pop(1)),
         "postprocessing has Invert, Activations, AsDiscrete: tilemask applies Activations, Invert, AsDiscrete"),
        (lambda c: c["postprocessing"]["transforms"][2].update(to_onehot=2), "AsDiscreted to_onehot=2"),
        (lambda c: c["postprocessing"]["transforms"][2].update(threshold=0.5), "AsDiscreted with both argmax and "),
    ],
)
def test_bundle_settings_tilemask_does_not_apply_are_refused_by_name(tmp_path, edit, refusal):
    """Found by a first-contact review: each of these ran (exit 0) and gave another answer than MONAI's for the
    same bundle (labels on 32253 of 33825 voxels for the order of the intensity transforms)."""
    _assert_refused(tmp_path, edit, refusal)


def test_bundle_settings_that_leave_the_answer_alone_are_accepted(tmp_path):
    """Devices, progress, float types, MONAI's own defaults written out (NibabelReader for NIfTI), and flags given
    one per key (MONAI's dictionary transforms take ``[true]`` as true: ``threshold: [null]`` beside ``argmax`` was
    refused as both)."""
    folder = spleen_ct_bundle(tmp_path / "bundle")

    def edit(config):
        config["inferer"].update(sw_device="cpu", progress=False, padding_mode="constant", cval=0.0)
        config["preprocessing"]["transforms"][3].update(dtype="$np.float32", padding_mode=["border"], align_corners=False)
        config["postprocessing"]["transforms"][0].update(softmax=[True], sigmoid=[False])
        config["postprocessing"]["transforms"][2].update(argmax=[True], threshold=[None])
        config["preprocessing"]["transforms"][0].update(reader="NibabelReader", image_only=True)
        config["preprocessing"]["transforms"][1].update(channel_dim="no_channel")
        config["preprocessing"]["transforms"].insert(2, {"_target_": "CastToTyped", "keys": "image",
                                                         "dtype": "$torch.float16"})  # fmt: skip
        # after Invertd the labels are on the scan's grid already: MONAI's resampling leaves them
        config["postprocessing"]["transforms"][3].update(resample=True, output_dtype="$np.uint8")

    _edited(folder, edit)
    raw = {"version": 1, "input": "x.nii.gz", "model": {"bundle": str(folder)}, "output": {"path": "x.nii.gz"}}
    workflow = Workflow.from_dict(raw)
    assert workflow.preprocess.spacing == [1.5, 1.5, 2.0] and workflow.inference.activation == "softmax"


def test_a_threshold_of_a_numpy_type_is_taken(tmp_path):
    """``threshold: "$np.float32(0.5)"`` is a number to MONAI's ``AsDiscreted``: it was refused as "a number or
    null" (numpy's float32 is no Python float)."""
    folder = spleen_ct_bundle(tmp_path / "bundle")
    _edited(folder, lambda c: c["postprocessing"]["transforms"][2].update(argmax=False, threshold="$np.float32(0.5)"))
    raw = {"version": 1, "input": "x.nii.gz", "model": {"bundle": str(folder)}, "output": {"path": "x.nii.gz"}}
    assert Workflow.from_dict(raw).inference.threshold == 0.5


UNRESAMPLED = [{"_target_": "LoadImaged", "keys": "image"}, {"_target_": "EnsureChannelFirstd", "keys": "image"},
               {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 200, "a_max": 5000, "b_min": 0.0,
                "b_max": 1.0, "clip": True}]  # fmt: skip  # no resampling: a bundle that runs in about a second
SMALL_INFERER = {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 24], "sw_batch_size": 4, "overlap": 0.25}
SOFTMAX_LABELS = [{"_target_": "Activationsd", "keys": "pred", "softmax": True},
                  {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]  # fmt: skip


KLCC = "KeepLargestConnectedComponentd"


def small_unet(out_channels):
    return {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": out_channels,
            "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}  # fmt: skip


def test_a_spacing_of_0_or_less_keeps_the_scans_own_along_that_axis_as_monai_does(tmp_path, client):
    """``Spacingd(pixdim=[1.5, 1.5, -1])``: MONAI keeps the scan's own spacing along the last axis (a 2D model's
    slices, nnU-Net's 2D configurations); it was refused."""
    folder = spleen_ct_bundle(tmp_path / "bundle")
    _edited(folder, lambda c: c["preprocessing"]["transforms"][3].update(pixdim=[1.5, 1.5, -1]))
    raw = {"version": 1, "input": "x.nii.gz", "model": {"bundle": str(folder)}, "output": {"path": "x.nii.gz"}}
    assert Workflow.from_dict(raw).preprocess.spacing == [1.5, 1.5, -1.0]
    assert_runs_as_monai(folder, stored_psr(tmp_path), tmp_path, client, atol=1e-3)


def test_transforms_under_other_names_are_found_as_monai_finds_them(tmp_path, client):
    """The preprocessing and postprocessing named ``pre_transforms`` and ``post_transforms``, which the bundle's
    ``dataset`` and ``evaluator`` refer to (``preprocessing`` is a convention only): the bundle ran with neither
    (exit 0), labels differing from MONAI's on 16565 of 33825 voxels in a first-contact review."""
    folder = write_bundle(tmp_path / "renamed", small_unet(2), UNRESAMPLED, SMALL_INFERER, SOFTMAX_LABELS,
                          ["background", "foreground"])  # fmt: skip

    def rename(config):
        config["pre_transforms"] = config.pop("preprocessing")
        config["post_transforms"] = config.pop("postprocessing")
        config["dataset"] = {"_target_": "Dataset", "data": [], "transform": "@pre_transforms"}
        config["dataloader"] = {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1}
        config["evaluator"] = {"_target_": "SupervisedEvaluator", "device": "@device", "network": "@network",
                               "val_data_loader": "@dataloader", "inferer": "@inferer",
                               "postprocessing": "@post_transforms"}  # fmt: skip

    _edited(folder, rename)
    scan = stored_psr(tmp_path)
    assert_runs_as_monai(folder, scan, tmp_path, client, atol=1e-5)


def test_preprocessing_is_found_through_invertd_else_a_bundle_without_it_is_refused(tmp_path):
    """Without a dataset, ``Invertd``'s ``transform`` names the preprocessing (the one it inverts): the settings
    are those of the bundle naming it ``preprocessing``, which the spleen test holds to MONAI's result.  With
    neither, a bundle whose transforms load the images is refused rather than run without its preprocessing."""
    folder = spleen_ct_bundle(tmp_path / "bundle")
    raw = {"version": 1, "input": "x.nii.gz", "model": {"bundle": str(folder)}, "output": {"path": "x.nii.gz"}}
    standard = Workflow.from_dict(raw).preprocess

    def rename(config):
        config["pre_transforms"] = config.pop("preprocessing")
        config["postprocessing"]["transforms"][1]["transform"] = "@pre_transforms"

    _edited(folder, rename)
    assert Workflow.from_dict(raw).preprocess == standard
    _edited(folder, lambda c: c["postprocessing"]["transforms"].pop(1))
    with pytest.raises(WorkflowError, match="found no preprocessing .*, yet the bundle loads images") as caught:
        Workflow.from_dict(raw)
    assert caught.value.exit_status == 2


@pytest.mark.parametrize("threshold", [0.7, [0.7]])
def test_one_channel_sigmoid_bundle_naming_its_channel_runs_as_monai_runs_it(tmp_path, client, threshold):
    """``channel_def: {"0": "lesion"}`` names the one output channel of a sigmoid network, label 1 where its
    probability reaches ``AsDiscreted``'s threshold: it was refused ("classes has 1 names but the network gives 2
    classes").  The threshold given per key (``[0.7]``, as MONAI's dictionary transform takes it) failed with
    "TypeError: float() argument must be ... not 'list'" (exit 1)."""
    post = [{"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
            {"_target_": "AsDiscreted", "keys": "pred", "threshold": threshold}]  # fmt: skip
    folder = write_bundle(tmp_path / "sigmoid", small_unet(1), UNRESAMPLED, SMALL_INFERER, post, ["lesion"])
    scan = stored_psr(tmp_path)
    result, labels, _ = run_bundle(folder, scan, tmp_path, client)
    expected = monai_runs_the_bundle(folder, scan, labels=True)[0]
    assert 0.05 < expected.mean() < 0.95  # both classes
    assert np.mean(labels == expected) >= 0.9999
    assert set(result.class_pixels) == {"background", "lesion"}


@pytest.mark.parametrize(
    "bundle, steps",
    [
        (lambda f: spleen_ct_bundle(f, small_unet(2)),  # on the scan's grid, after Invertd
         [{"_target_": KLCC, "keys": "pred", "applied_labels": [1], "connectivity": 1},
          {"_target_": "FillHolesd", "keys": "pred", "connectivity": 1}]),
        (lambda f: write_bundle(f, small_unet(3), UNRESAMPLED, SMALL_INFERER, SOFTMAX_LABELS, ["b", "x", "y"]),
         [{"_target_": KLCC, "keys": "pred", "applied_labels": [1, 2]}]),
    ],
)  # fmt: skip
def test_largest_component_and_holes_run_as_monai_runs_them(tmp_path, client, bundle, steps):
    """``KeepLargestConnectedComponentd`` and ``FillHolesd`` after the labels, as tilemask's ``postprocess``
    (``keep_largest``, ``fill_holes``, ``connectivity``): they were refused ("cannot run chunk by chunk")."""
    folder = bundle(tmp_path / "bundle")

    def add(config):
        transforms = config["postprocessing"]["transforms"]
        at = next(i for i, t in enumerate(transforms) if t["_target_"] == "AsDiscreted") + 1
        transforms[at:at] = steps

    _edited(folder, add)
    scan = stored_psr(tmp_path)
    _, labels, _ = run_bundle(folder, scan, tmp_path, client)
    expected = monai_runs_the_bundle(folder, scan, labels=True)[0]
    assert np.sum(expected != monai_runs_the_bundle(folder, scan).argmax(0)) > 100  # MONAI's steps change labels
    assert np.mean(labels == expected) >= 0.9999


def test_largest_component_and_holes_of_several_classes_together_are_refused(tmp_path):
    """MONAI keeps the largest component of every class before filling any hole; tilemask's postprocess does
    both class by class.  They differ where a class's holes hold another class: here class 2's largest piece
    lies inside class 1 (MONAI keeps it, then fills it with 1), a smaller one outside (tilemask keeps that)."""
    labels = np.zeros((8, 12, 12), np.uint8)
    labels[1:6, 1:6, 1:6] = 1
    labels[2:5, 2:5, 2:5] = 2
    labels[1:3, 8:10, 8:10] = 2
    monai = Compose([KeepLargestConnectedComponent(), FillHoles()])(torch.tensor(labels[None]))[0].numpy()  # a copy
    ours = postprocess.apply(da.from_array(labels, chunks=4), {"keep_largest": True, "fill_holes": True}).compute()
    assert np.sum(monai != ours) == 8
    steps = [{"_target_": "KeepLargestConnectedComponentd", "keys": "pred"}, {"_target_": "FillHolesd", "keys": "pred"}]
    folder = write_bundle(tmp_path / "three", small_unet(3), UNRESAMPLED, SMALL_INFERER, SOFTMAX_LABELS + steps,
                          ["background", "x", "y"])  # fmt: skip
    raw = {"version": 1, "input": "x.nii.gz", "model": {"bundle": str(folder)}, "output": {"path": "x.nii.gz"}}
    with pytest.raises(WorkflowError, match="has KeepLargestConnectedComponent and FillHoles over 2 ") as caught:
        Workflow.from_dict(raw)
    assert caught.value.exit_status == 2


def test_a_short_pixdim_is_padded_as_monai_pads_it(tmp_path):
    """``Spacingd(pixdim=[1.5, 2.0])`` on a volume: MONAI pads it with its last value; it was refused with
    "preprocess.spacing has 2 values", a key the bundle never wrote."""
    folder = spleen_ct_bundle(tmp_path / "bundle")
    _edited(folder, lambda c: c["preprocessing"]["transforms"][3].update(pixdim=[1.5, 2.0]))
    raw = {"version": 1, "input": "x.nii.gz", "model": {"bundle": str(folder)}, "output": {"path": "x.nii.gz"}}
    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    image = parser.get_parsed_content("preprocessing")({"image": str(stored_psr(tmp_path))})["image"]
    np.testing.assert_allclose(Workflow.from_dict(raw).preprocess.spacing, image.pixdim)


def test_a_roi_size_of_one_int_is_the_window_along_every_axis_as_monai_takes_it(tmp_path, client):
    """``SlidingWindowInferer(roi_size=24)``: MONAI repeats it over every spatial axis (``fall_back_tuple``); it
    was refused with "workflow: inference.roi_size has 1 values but model.args.spatial_dims is 3", a key the bundle
    never wrote."""
    inferer = {**SMALL_INFERER, "roi_size": 24}
    folder = write_bundle(tmp_path / "roi", small_unet(2), UNRESAMPLED, inferer, SOFTMAX_LABELS, ["background", "x"])
    scan = stored_psr(tmp_path)
    assert_runs_as_monai(folder, scan, tmp_path, client, atol=1e-5)


def test_labels_saved_on_the_scans_grid_after_orientation_alone_are_monai_s(tmp_path, client):
    """``SaveImaged(resample=True)`` without ``Invertd``: MONAI saves the labels back on the scan's grid, which after
    ``Orientationd`` alone permutes and flips them back, as tilemask's input grid does; it was ignored, the labels
    written on the model grid (exit 0)."""
    pre = [*UNRESAMPLED[:2], {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"}, UNRESAMPLED[2]]
    post = [*SOFTMAX_LABELS, {"_target_": "SaveImaged", "keys": "pred", "resample": True, "output_dir": "@output_dir"}]
    folder = write_bundle(tmp_path / "saved", small_unet(2), pre, SMALL_INFERER, post, ["background", "x"])
    scan = stored_psr(tmp_path)  # PSR: reoriented to RAS for the network
    result, labels, _ = run_bundle(folder, scan, tmp_path, client)
    expected, affine = monai_runs_the_bundle(folder, scan, saved=True)
    assert labels.shape == expected.shape == nib.load(scan).shape
    np.testing.assert_allclose(nib.load(result.outputs[0]).affine, affine, atol=1e-5)
    assert 0.05 < expected.mean() < 0.95 and np.mean(labels == expected) >= 0.9999


def _saved_on_the_scans_grid_without_invertd(config):
    """MONAI resamples the labels, nearest, after Spacingd; tilemask's input grid would resample the probabilities:
    3967 of 33825 voxels apart from MONAI's (the spleen bundle's small UNet on ``stored_psr``)."""
    config["postprocessing"]["transforms"].pop(1)
    config["postprocessing"]["transforms"][-1]["resample"] = True


def _insert_preprocessing(at, **step):
    return lambda c: c["preprocessing"]["transforms"].insert(at, {"keys": "image", **step})


TINYNET = """import torch


class TinyNet(torch.nn.Module):
    def __init__(self, in_channels=1, out_channels=2):
        super().__init__()
        self.a = torch.nn.Conv3d(in_channels, 4, 3, padding=1)
        self.b = torch.nn.Conv3d(4, out_channels, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))
"""


def _forget_scripts():
    for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
        del sys.modules[name]


def test_a_network_in_the_bundle_s_scripts_package_runs_as_monai_runs_it(tmp_path, client, monkeypatch):
    """``network_def: {_target_: scripts.tinynet.TinyNet}``, the Model Zoo's place for a bundle's own code: MONAI's
    bundle runner puts the bundle's folder on ``sys.path``; tilemask did not, on the client or the workers, and
    refused the bundle ("importing scripts.tinynet raises ModuleNotFoundError")."""
    folder = tmp_path / "scripted"
    (folder / "scripts").mkdir(parents=True)
    (folder / "scripts" / "__init__.py").write_text("")
    (folder / "scripts" / "tinynet.py").write_text(TINYNET)
    monkeypatch.setattr(sys, "path", [*sys.path])  # put back after the test, with what MONAI and tilemask add
    try:
        with monkeypatch.context() as bundle_runner:
            bundle_runner.syspath_prepend(str(folder))  # as MONAI's bundle runner: write_bundle builds the network
            write_bundle(folder, {"_target_": "scripts.tinynet.TinyNet", "in_channels": 1, "out_channels": 2},
                         UNRESAMPLED, SMALL_INFERER, SOFTMAX_LABELS, ["background", "x"])  # fmt: skip
        _forget_scripts()
        scan = stored_psr(tmp_path)
        _, labels, probabilities = run_bundle(folder, scan, tmp_path, client)
        sys.path.insert(1, str(folder))
        expected = monai_runs_the_bundle(folder, scan)
    finally:
        _forget_scripts()
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert np.mean(labels == expected.argmax(0)) >= 0.9999


def test_a_second_bundle_s_scripts_package_in_one_process_is_refused(tmp_path, monkeypatch):
    """A process imports one package named ``scripts``: a second bundle's network would be looked up in the
    first bundle's, whether its module has the same name (it would run the first's network) or another (a
    review's: "No module named 'scripts.other'")."""
    from tilemask.models import build_network
    from tilemask.settings import ModelSpec

    monkeypatch.setattr(sys, "path", [*sys.path])
    specs = []
    for name, module in (("first", "tinynet"), ("second", "tinynet"), ("third", "other")):
        (tmp_path / name / "scripts").mkdir(parents=True)
        (tmp_path / name / "scripts" / "__init__.py").write_text("")
        (tmp_path / name / "scripts" / f"{module}.py").write_text(TINYNET)
        specs.append(ModelSpec.create(f"scripts.{module}:TinyNet", {"_import_path": [str(tmp_path / name)]}, "x.pt"))
    _forget_scripts()
    try:
        build_network(specs[0])
        build_network(specs[0])  # its own, again
        for spec in specs[1:]:
            with pytest.raises(WorkflowError, match=r"this process imported scripts from .*/first/scripts before"):
                build_network(spec)
    finally:
        _forget_scripts()


def _postprocessing_step(at, **step):
    return lambda c: c["postprocessing"]["transforms"].insert(at, {"keys": "pred", **step})


def _sigmoid_over_three_channels(config):  # brats_mri_segmentation's: one overlapping region per channel
    config["network_def"]["out_channels"] = 3
    config["postprocessing"]["transforms"][0].update(softmax=False, sigmoid=True)
    config["postprocessing"]["transforms"][2].update(argmax=False, threshold=0.5)


def _fill_holes_before_largest(config):  # tilemask keeps the largest component first: another answer
    config["postprocessing"]["transforms"][3:3] = [{"_target_": "FillHolesd", "keys": "pred"},
                                                   {"_target_": KLCC, "keys": "pred"}]  # fmt: skip


@pytest.mark.parametrize(
    "edit, refusal",
    [
        (_sigmoid_over_three_channels, (r"postprocessing Activationsd sigmoid on the network's out_channels 3 "
                                        r"\(background, spleen\): one binary mask per channel, which may overlap "
                                        r"\(multi-label output\), is not supported")),
        (lambda c: c["inferer"].update(roi_size=[32, 32, -1]),
         r"inferer SlidingWindowInferer roi_size=\[32, 32, -1\]: MONAI takes each image's own size"),
        (lambda c: c.update(network_def=("$monai.networks.nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, "
                                         "channels=[4, 8, 16], strides=[2, 2])")),
         "network_def is an expression .*: tilemask builds the network on its workers from a _target_ dict"),
        (_postprocessing_step(3, _target_=KLCC, applied_labels=[0, 1]),
         (r"postprocessing KeepLargestConnectedComponentd applied_labels=\[0, 1\]: tilemask applies it to every "
          r"foreground class \(\[1\]\)")),
        (_postprocessing_step(3, _target_=KLCC, num_components=2),
         "KeepLargestConnectedComponentd num_components=2: tilemask does not apply it .*1"),
        (_postprocessing_step(3, _target_=KLCC, connectivity=2),
         r"KeepLargestConnectedComponentd connectivity=2: tilemask connects voxels by their faces \(1\) or fully"),
        (_postprocessing_step(3, _target_=KLCC, is_onehot=True), "KeepLargestConnectedComponentd is_onehot=True"),
        (lambda c: c["postprocessing"]["transforms"].__setitem__(2, {"_target_": KLCC, "keys": "pred"}),
         "postprocessing KeepLargestConnectedComponentd without AsDiscreted before it runs on the network's output"),
        (_postprocessing_step(2, _target_=KLCC),
         "postprocessing has Activations, Invert, KeepLargestConnectedComponent, AsDiscrete: tilemask applies"),
        (lambda c: c["postprocessing"]["transforms"][2].update(keys=["pred", "label"], argmax=[True, False]),
         r"postprocessing AsDiscreted argmax=\[True, False\]: one value per key of \['pred', 'label'\], which "
         "differ: tilemask applies one"),
        (lambda c: c["postprocessing"]["transforms"][2].update(argmax=False, threshold="0.5"),
         "postprocessing AsDiscreted threshold='0.5': a number or null"),
        (lambda c: c["postprocessing"]["transforms"][0].update(softmax=[]),
         r"postprocessing Activationsd softmax=\[\]: no value \(one per key of 'pred'\)"),
        (_saved_on_the_scans_grid_without_invertd,
         r"postprocessing SaveImaged resample=True without Invertd: MONAI resamples the labels \(nearest\) onto the "
         "scan's grid"),
        (lambda c: c["postprocessing"]["transforms"][3].update(scale=255),
         r"postprocessing SaveImaged scale=255: tilemask writes the labels unscaled"),
        (lambda c: c["preprocessing"]["transforms"][0].update(reader="ITKReader"),
         "preprocessing LoadImaged reader='ITKReader': tilemask reads images itself"),
        (lambda c: c["preprocessing"]["transforms"][0].update(as_closest_canonical=True),
         "preprocessing LoadImaged as_closest_canonical=True: an option of its reader"),
        (lambda c: c["preprocessing"]["transforms"][1].update(channel_dim=0),
         "preprocessing EnsureChannelFirstd channel_dim=0: tilemask takes the channels where MONAI finds them"),
        (_insert_preprocessing(2, _target_="CastToTyped", dtype="$np.int16"),
         r"preprocessing CastToTyped dtype='int16': tilemask computes in floats \(an integer type truncates"),
        (_fill_holes_before_largest, ("postprocessing has Activations, Invert, AsDiscrete, FillHoles, "
                                      "KeepLargestConnectedComponent: tilemask applies .*, "
                                      "KeepLargestConnectedComponent, FillHoles once each")),
    ],
)  # fmt: skip
def test_bundle_settings_refused_by_what_monai_does_with_them(tmp_path, edit, refusal):
    """Found by a first-contact review: these were refused with a message naming a key the bundle never wrote
    (``preprocess.spacing.2``, ``model.args.out_channels``, "configs have no network_def") or, for the largest
    component, "cannot run chunk by chunk"; each now names the bundle's transform and argument."""
    _assert_refused(tmp_path, edit, refusal)


def test_a_zipped_bundle_is_refused_with_what_to_do(tmp_path):
    """A Model Zoo download is a zip of the bundle's folder: "no such folder" did not say to unzip it."""
    import shutil

    folder = spleen_ct_bundle(tmp_path / "spleen_ct_segmentation")
    archive = shutil.make_archive(str(tmp_path / "spleen_ct_segmentation_v0.5.9"), "zip", tmp_path, folder.name)
    raw = {"version": 1, "input": "x.nii.gz", "model": {"bundle": archive}, "output": {"path": "x.nii.gz"}}
    with pytest.raises(WorkflowError, match=r"\.zip is a zip file \(a Model Zoo download\): unzip it"):
        Workflow.from_dict(raw, base_dir=tmp_path)


def test_a_bundle_expression_that_raises_is_one_line_naming_it_and_its_error(tmp_path):
    """MONAI writes the expression that failed on a second line and keeps its error as the cause: the one line
    the command line shows was 'model.bundle: network_def: RuntimeError: Failed to evaluate ConfigExpression:',
    naming neither the expression nor what went wrong."""
    folder = spleen_ct_bundle(tmp_path / "bundle")
    _edited(folder, lambda c: c["network_def"].update(channels="$[4, 8, 16 // 0]"))
    raw = {"version": 1, "input": "x.nii.gz", "model": {"bundle": str(folder)}, "output": {"path": "x.nii.gz"}}
    with pytest.raises(WorkflowError) as caught:
        Workflow.from_dict(raw)
    assert str(caught.value) == ("model.bundle: network_def: Failed to evaluate ConfigExpression: '$[4, 8, 16 // 0]' "
                                 "(ZeroDivisionError: integer division or modulo by zero)")  # fmt: skip
    assert caught.value.exit_status == 2


def _channel_def(channel_def):
    def edit(folder):
        metadata = json.loads((folder / "configs" / "metadata.json").read_text())
        metadata["network_data_format"]["outputs"]["pred"]["channel_def"] = channel_def
        (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))

    return edit


@pytest.mark.parametrize(
    "edit, refusal",
    [
        (lambda folder: (folder / "configs" / "metadata.json").write_text('{"version": "0.1.0",'),
         r"cannot read .*/bundle/configs/metadata\.json: Expecting property name"),
        (_channel_def({"background": "0", "spleen": "1"}),
         r"/bundle/configs/metadata\.json: channel_def has keys \['background', 'spleen'\]: they must be the output "
         r"channels 0 to 1$"),
        (_channel_def({"0": "background", "2": "spleen"}), r"channel_def has keys \['0', '2'\]"),
        (_channel_def({"0": "background", "1": "spleen", "2": "liver"}),
         r"/bundle/configs/metadata\.json: channel_def names 3 output channel\(s\) but the network gives 2; name them "
         r"in the workflow's classes$"),
    ],
)  # fmt: skip
def test_a_bundle_metadata_that_does_not_name_the_output_channels_is_refused_naming_it(tmp_path, edit, refusal):
    """A metadata.json that is no JSON was named as configs/inference.json; channel_def keys that are no channel
    numbers failed with a bare ValueError (exit 1), and keys with a gap ran, naming channel 2's name label 1; names
    for more channels than the network gives were "classes has 3 names but the model gives 2 classes", no word of
    the bundle (the workflow's own classes stand in for them)."""
    folder = spleen_ct_bundle(tmp_path / "bundle")
    edit(folder)
    raw = {"version": 1, "input": "x.nii.gz", "model": {"bundle": str(folder)}, "output": {"path": "x.nii.gz"}}
    with pytest.raises(WorkflowError, match=refusal) as caught:
        Workflow.from_dict(raw)
    assert caught.value.exit_status == 2
    if "names 3" in refusal:
        assert Workflow.from_dict({**raw, "classes": ["background", "spleen"]}).classes == ["background", "spleen"]


@pytest.mark.parametrize("inferer", ["$monai.inferers.SimpleInferer()",
                                     "$monai.inferers.SlidingWindowInferer([32] * 3)"])  # fmt: skip
def test_an_inferer_written_as_an_expression_is_refused_naming_it(tmp_path, inferer):
    """An inferer the config builds by an expression failed with "AttributeError: 'SimpleInferer' object has no
    attribute 'get'" (exit 1): tilemask reads the inferer's settings from a _target_ dict."""
    refusal = (r"^model.bundle: inferer must be a SlidingWindowInferer or SliceInferer _target_ dict "
               rf"\(got '{re.escape(inferer)}'\)$")
    _assert_refused(tmp_path, lambda c: c.update(inferer=inferer), refusal)


def test_a_roi_size_of_one_number_has_as_many_axes_as_the_network(tmp_path):
    """A one-number roi is repeated over the network's spatial axes: a MONAI network whose config leaves
    ``spatial_dims`` out has its class's default (FlexibleUNet is 2D; it was taken for a volume), and a TorchScript
    network, which does not say, is refused by name."""
    from tilemask.bundle import bundle_defaults

    def bundle(name, network_def, weights="model.pt"):
        folder = tmp_path / name
        (folder / "configs").mkdir(parents=True)
        (folder / "models").mkdir()
        (folder / "models" / weights).write_bytes(b"")  # not read: the bundle's keys only
        config = {"network_def": network_def, "inferer": {"_target_": "SlidingWindowInferer", "roi_size": 24}}
        (folder / "configs" / "inference.json").write_text(json.dumps(config))
        return folder

    flexible = {"_target_": "FlexibleUNet", "in_channels": 3, "out_channels": 2, "backbone": "efficientnet-b0"}
    assert bundle_defaults(bundle("flexible", flexible))["inference"]["roi_size"] == [24, 24]
    basic = {"_target_": "BasicUNet", "in_channels": 1, "out_channels": 2}  # 3D by default
    assert bundle_defaults(bundle("basic", basic))["inference"]["roi_size"] == [24, 24, 24]
    with pytest.raises(WorkflowError, match="roi_size=24: one number, and the network does not say how many spatial "
                                            "axes it has; give one size per axis"):  # fmt: skip
        bundle_defaults(bundle("scripted", "$torch.jit.load('model.ts')", weights="model.ts"))


@pytest.mark.parametrize("disabled", ["false", "False", " FALSE "])
def test_a_transform_disabled_by_the_string_false_is_one_monai_runs(tmp_path, disabled):
    """MONAI's ``ConfigComponent.is_disabled`` reads a string ``_disabled_`` as true only when it says "true": a
    transform with ``"_disabled_": "false"`` runs in MONAI. tilemask took any non-empty string as disabled and
    skipped it without a word: a ``CropForegroundd`` it refuses ran (exit 0), and a ``ScaleIntensityRanged`` was
    left out, its intensities unscaled."""
    folder = spleen_ct_bundle(tmp_path / "bundle")
    raw = {"version": 1, "input": "x.nii.gz", "model": {"bundle": str(folder)}, "output": {"path": "x.nii.gz"}}
    _edited(folder, lambda c: c["preprocessing"]["transforms"][4].update(_disabled_=disabled))
    assert Workflow.from_dict(raw).preprocess.intensity.a_max == 5000  # applied, as MONAI applies it
    _edited(folder, lambda c: c["preprocessing"]["transforms"][4].update(_disabled_="true"))
    assert Workflow.from_dict(raw).preprocess.intensity is None  # left out, as MONAI leaves it out
    crop = {"_target_": "CropForegroundd", "keys": "image", "source_key": "image", "_disabled_": disabled}
    _edited(folder, lambda c: c["preprocessing"]["transforms"].insert(2, crop))
    with pytest.raises(WorkflowError, match="preprocessing CropForegroundd cannot run chunk by chunk"):
        Workflow.from_dict(raw)


@pytest.mark.parametrize("bands", [1, 3])
def test_a_2d_bundle_sees_a_png_with_monai_s_axes_x_first(tmp_path, client, bands):
    """MONAI's readers (PIL's for a PNG, ITK's) give a 2D image's axes x first, (width, height), and a 2D bundle's
    network and ``roi_size`` are in that order; tilemask reads a raster's rows first. It ran the network on the
    image transposed: 5664 of 12288 labels (grey) and 5075 (RGB) other than MONAI's own run of the bundle, whose
    labels matched tilemask's only once the PNG itself was transposed."""
    import rasterio
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = np.cumsum(rng.normal(size=(80, 56, bands)), axis=0)  # 80 rows, 56 columns; smooth down the columns
    image = (255 * (rows - rows.min()) / np.ptp(rows)).astype(np.uint8)
    png = tmp_path / "image.png"
    Image.fromarray(image[..., 0] if bands == 1 else image).save(png)
    network = {"_target_": "UNet", "spatial_dims": 2, "in_channels": bands, "out_channels": 3, "channels": [8, 16],
               "strides": [2], "num_res_units": 1}
    inferer = {"_target_": "SlidingWindowInferer", "roi_size": [48, 32], "sw_batch_size": 4, "overlap": [0.25, 0.5],
               "sigma_scale": [0.125, 0.2], "mode": "gaussian"}
    preprocessing = [*UNRESAMPLED[:2], {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0, "a_max": 255,
                                        "b_min": 0.0, "b_max": 1.0, "clip": True}]  # fmt: skip
    folder = write_bundle(tmp_path / "bundle", network, preprocessing, inferer, SOFTMAX_LABELS, ["bg", "a", "b"])
    expected = monai_runs_the_bundle(folder, png, labels=True)[0]  # (x, y): MONAI's
    assert expected.shape == (56, 80)
    workflow = {"version": 1, "input": str(png), "model": {"bundle": str(folder)},
                "output": {"path": "out/{stem}_labels.tif", "quicklook": False}}  # fmt: skip
    parsed = Workflow.from_dict(workflow, base_dir=tmp_path).inference
    assert (parsed.roi_size, parsed.overlap, parsed.sigma_scale) == ([32, 48], [0.5, 0.25], [0.2, 0.125])  # rows first
    (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    with rasterio.open(result.outputs[0]) as written:
        labels = written.read(1)
    assert labels.shape == (80, 56)
    np.testing.assert_array_equal(labels, expected.T)
    # over a volume's slices (the workflow's own slice_axis) the axes are the volume's, MONAI's order: as written
    sliced = {**workflow, "input": "x.nii.gz", "inference": {"slice_axis": 2}, "output": {"path": "x.nii.gz"}}
    parsed = Workflow.from_dict(sliced, base_dir=tmp_path)
    assert (parsed.inference.roi_size, parsed.inference.overlap) == ([48, 32], [0.25, 0.5])
    assert "_x_first" not in parsed.model.args


def test_a_sliding_window_inferer_adapt_runs_as_monai_runs_it(tmp_path, client):
    """``SlidingWindowInfererAdapt`` (Auto3DSeg's bundles) slides and weighs the windows as ``SlidingWindowInferer``,
    of which it is a subclass; it only moves the stitching to the CPU when a GPU runs out of memory. It was refused:
    "inferer must be a SlidingWindowInferer or SliceInferer _target_ dict (got 'SlidingWindowInfererAdapt')"."""
    inferer = {**SMALL_INFERER, "_target_": "SlidingWindowInfererAdapt", "mode": "gaussian", "overlap": 0.5}
    folder = write_bundle(tmp_path / "adapt", small_unet(2), UNRESAMPLED, inferer, SOFTMAX_LABELS, ["background", "x"])
    scan = stored_psr(tmp_path)
    assert_runs_as_monai(folder, scan, tmp_path, client, atol=1e-5)
    _edited(folder, lambda c: c["inferer"].update(padding_mode="reflect"))  # its arguments checked as the parent's
    with pytest.raises(WorkflowError, match="inferer SlidingWindowInfererAdapt padding_mode='reflect': tilemask does"):
        Workflow.from_dict({"version": 1, "input": str(scan), "model": {"bundle": str(folder)},
                            "output": {"path": "x.nii.gz"}})  # fmt: skip


@pytest.mark.parametrize("step", [{"_target_": "Spacingd", "keys": "image", "pixdim": [0.5, 0.5]},
                                  {"_target_": "Orientationd", "keys": "image", "axcodes": "RA"}])  # fmt: skip
def test_a_2d_bundle_that_orients_or_resamples_is_refused_naming_its_transform(tmp_path, step):
    """tilemask orients and resamples volumes only: a 2D bundle's ``Spacingd`` was refused as "preprocess.orientation,
    spacing and crop apply to volumes", its ``Orientationd(axcodes="RA")`` as "preprocess.orientation: three axis
    codes", keys the bundle never wrote."""
    network = {"_target_": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [8, 16],
               "strides": [2], "num_res_units": 1}
    inferer = {"_target_": "SlidingWindowInferer", "roi_size": [32, 32], "sw_batch_size": 4, "overlap": 0.25}
    folder = write_bundle(tmp_path / "bundle", network, [*UNRESAMPLED[:2], step], inferer, SOFTMAX_LABELS,
                          ["background", "x"])  # fmt: skip
    raw = {"version": 1, "input": "x.png", "model": {"bundle": str(folder)}, "output": {"path": "x.tif"}}
    with pytest.raises(WorkflowError, match=rf"^model.bundle: preprocessing {step['_target_']} with a 2D network: "
                                            "tilemask orients and resamples volumes") as caught:  # fmt: skip
        Workflow.from_dict(raw)
    assert caught.value.exit_status == 2


def test_a_2d_bundle_naming_pil_reader_reads_as_monai_s_default_does(tmp_path, client):
    """``LoadImaged(reader="PILReader")`` is MONAI's own reader for a PNG or JPEG, x first as tilemask now feeds a 2D
    bundle; a 2D bundle naming it was refused: "reader='PILReader': tilemask reads images itself, as MONAI's default
    readers do (NibabelReader for NIfTI)" (a review). It runs as MONAI runs it; with ``reverse_indexing=False``
    (rows first), in a 3D bundle, or over a volume's slices it is still refused."""
    import rasterio
    from PIL import Image

    rng = np.random.default_rng(1)
    image = np.cumsum(rng.normal(size=(72, 40)), axis=0)
    png = tmp_path / "image.png"
    Image.fromarray((255 * (image - image.min()) / np.ptp(image)).astype(np.uint8)).save(png)
    network = {"_target_": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [8, 16],
               "strides": [2], "num_res_units": 1}
    inferer = {"_target_": "SlidingWindowInferer", "roi_size": [32, 24], "sw_batch_size": 4, "overlap": 0.25}
    load = {"_target_": "LoadImaged", "keys": "image", "reader": "PILReader"}
    preprocessing = [load, *UNRESAMPLED[1:2], {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0,
                                               "a_max": 255, "b_min": 0.0, "b_max": 1.0, "clip": True}]  # fmt: skip
    folder = write_bundle(tmp_path / "bundle", network, preprocessing, inferer, SOFTMAX_LABELS, ["bg", "a"])
    expected = monai_runs_the_bundle(folder, png, labels=True)[0]  # (x, y): MONAI's
    workflow = {"version": 1, "input": str(png), "model": {"bundle": str(folder)},
                "output": {"path": "out/{stem}_labels.tif", "quicklook": False}}  # fmt: skip
    (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    with rasterio.open(result.outputs[0]) as written:
        np.testing.assert_array_equal(written.read(1), expected.T)
    sliced = {**workflow, "input": "x.nii.gz", "inference": {"slice_axis": 2}, "output": {"path": "x.nii.gz"}}
    with pytest.raises(WorkflowError, match="LoadImaged reader='PILReader': tilemask reads images itself"):
        Workflow.from_dict(sliced, base_dir=tmp_path)
    _edited(folder, lambda c: c["preprocessing"]["transforms"][0].update(reverse_indexing=False))
    with pytest.raises(WorkflowError, match="LoadImaged reverse_indexing=False: an option of its reader"):
        Workflow.from_dict(workflow, base_dir=tmp_path)
    volume = write_bundle(tmp_path / "volume", small_unet(2), [load, *UNRESAMPLED[1:]], SMALL_INFERER, SOFTMAX_LABELS,
                          ["background", "x"])  # fmt: skip
    with pytest.raises(WorkflowError, match="LoadImaged reader='PILReader': tilemask reads images itself"):
        Workflow.from_dict({"version": 1, "input": "x.nii.gz", "model": {"bundle": str(volume)},
                            "output": {"path": "x.nii.gz"}})  # fmt: skip
