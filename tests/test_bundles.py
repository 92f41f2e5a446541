"""MONAI bundles laid out as the Model Zoo's; the reference is MONAI running the same config."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import AsDiscreted, Compose, SaveImaged
from nibabel.testing import data_path

import tilemask
from tilemask import Workflow
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


def spleen_ct_bundle(folder):
    """spleen_ct_segmentation's inference.json, with a smaller UNet and roi."""
    return write_bundle(
        folder,
        {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 16],
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


def monai_runs_the_bundle(folder, image_path):
    """The bundle's own preprocessing, network, inferer and postprocessing (up to the argmax), by MONAI."""
    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    parser["bundle_root"] = str(folder)
    pre = parser.get_parsed_content("preprocessing")
    if (folder / "models" / "model.ts").exists():
        net = torch.jit.load(folder / "models" / "model.ts")
    else:
        net = parser.get_parsed_content("network_def")
        net.load_state_dict(torch.load(folder / "models" / "model.pt", weights_only=True))
    net.eval()
    data = pre({"image": str(image_path)})
    with torch.inference_mode():
        data["pred"] = parser.get_parsed_content("inferer")(data["image"][None], net)[0]
    post = [t for t in parser.get_parsed_content("postprocessing").transforms if not isinstance(t, AsDiscreted | SaveImaged)]
    return np.asarray(Compose(post)(data)["pred"])


def run_bundle(folder, image_path, tmp_path, client, **extra):
    workflow = {"version": 1, "input": str(image_path), "model": {"bundle": str(folder)},
                "output": {"path": "out/{stem}_labels.nii.gz", "probabilities": "float32", "chunks": 29}, **extra}  # fmt: skip
    (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    labels = np.asarray(nib.load(result.outputs[0]).dataobj)
    probabilities = np.moveaxis(nib.load(result.outputs[1]).get_fdata(dtype=np.float32), -1, 0)
    return result, labels, probabilities


def test_spleen_ct_bundle_runs_as_monai_runs_it(tmp_path, client):
    folder = spleen_ct_bundle(tmp_path / "spleen_ct_segmentation")
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
    _, labels, probabilities = run_bundle(folder, scan, tmp_path, client)
    expected = monai_runs_the_bundle(folder, scan)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert np.mean(labels == expected.argmax(0)) >= 0.9999
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
    _, labels, probabilities = run_bundle(folder, scan, tmp_path, client)
    expected = monai_runs_the_bundle(folder, scan)
    np.testing.assert_allclose(probabilities, expected, atol=1e-3)
    assert np.mean(labels == expected.argmax(0)) >= 0.9999


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
    folder = spleen_ct_bundle(tmp_path / "bundle")
    raw = {"version": 1, "input": "x.nii.gz", "model": {"bundle": str(folder)}, "output": {"path": "x.nii.gz"}}
    _edited(folder, edit)
    with pytest.raises(WorkflowError, match=refusal) as caught:
        Workflow.from_dict(raw)
    assert caught.value.exit_status == 2


def test_bundle_settings_that_leave_the_answer_alone_are_accepted(tmp_path):
    """Devices, progress, float types, and MONAI's own defaults written out."""
    folder = spleen_ct_bundle(tmp_path / "bundle")

    def edit(config):
        config["inferer"].update(sw_device="cpu", progress=False, padding_mode="constant", cval=0.0)
        config["preprocessing"]["transforms"][3].update(dtype="$np.float32", padding_mode=["border"], align_corners=False)

    _edited(folder, edit)
    raw = {"version": 1, "input": "x.nii.gz", "model": {"bundle": str(folder)}, "output": {"path": "x.nii.gz"}}
    assert Workflow.from_dict(raw).preprocess.spacing == [1.5, 1.5, 2.0]
