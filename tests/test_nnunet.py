"""nnU-Net v2 results folders as the model: ``model: {nnunet: FOLDER, fold: 0}`` reads plans.json, dataset.json and
the fold's checkpoint.  The run is checked against nnU-Net's own steps redone here (SimpleITK's array, the plans'
transpose, CTNormalization, nnU-Net's window steps and mirroring), on a real scan; what tilemask cannot
reproduce is refused before any work.  nnU-Net itself is not a dependency: benchmarks/nnunet_fidelity.py compares
with its ``nnUNetPredictor``."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.testing import data_path

import tilemask
from tests.test_checkpoints import nnunet_checkpoint
from tilemask.errors import WorkflowError
from tilemask.workflow import Workflow

FOLDER = "Dataset042_Anat/nnUNetTrainer__nnUNetPlans__3d_fullres"
TRANSPOSE = [2, 0, 1]  # nnU-Net's planner puts the axis of largest spacing first: not the identity here
PATCH = [16, 24, 16]  # in the network's axes


class AxisNet(torch.nn.Module):
    """A network built as dynamic_network_architectures builds theirs (layer classes as arguments), with kernels of
    another size along each axis: fed its axes in another order, it answers otherwise."""

    def __init__(self, input_channels, num_classes, conv_op, kernel_sizes, norm_op, norm_op_kwargs, nonlin,
                 nonlin_kwargs, deep_supervision=False):  # fmt: skip
        super().__init__()
        kernel = tuple(kernel_sizes[0])
        self.conv = conv_op(input_channels, 6, kernel, padding=tuple(k // 2 for k in kernel))
        self.norm = norm_op(6, **norm_op_kwargs)
        self.act = nonlin(**nonlin_kwargs)
        self.head = conv_op(6, num_classes, 1)

    def forward(self, x):
        return self.head(self.act(self.norm(self.conv(x))))


ARCH_KWARGS = {"conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[1, 3, 5]],
               "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
               "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}  # fmt: skip
ARCH_KWARGS_2D = {**ARCH_KWARGS, "conv_op": "torch.nn.modules.conv.Conv2d", "kernel_sizes": [[3, 5]],
                  "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d"}
PATCH_2D = [16, 24]  # in the network's axes: nnU-Net's axes 1 and 2 after the transpose


def scan() -> tuple[str, np.ndarray]:
    """nibabel's ``anatomical.nii`` (a real MRI, 33 x 41 x 25 at 2 mm): path and data."""
    path = os.path.join(data_path, "anatomical.nii")
    return path, np.asarray(nib.load(path).dataobj)


def results_folder(root, data: np.ndarray, plans_edit=None, dataset_edit=None, folds=(0,), mirroring=(0, 1, 2),
                   two_d: bool = False):  # fmt: skip
    """An nnU-Net v2 results folder as training leaves it: plans.json and dataset.json as nnU-Net's planner and
    dataset conversion write them, a seeded AxisNet saved per fold as ``checkpoint_final.pth`` with the network
    axes its trainer mirrors at inference (``nnUNetTrainer``'s for 3D: all three); with ``two_d``, the ``2d``
    configuration's folder and a 2D AxisNet."""
    foreground = data[data > np.percentile(data, 60)].astype(np.float64)
    properties = {"max": float(foreground.max()), "mean": float(foreground.mean()), "median": float(np.median(foreground)),
                  "min": float(foreground.min()), "percentile_00_5": float(np.percentile(foreground, 0.5)),
                  "percentile_99_5": float(np.percentile(foreground, 99.5)), "std": float(foreground.std())}  # fmt: skip
    config = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
              "patch_size": PATCH, "median_image_size_in_voxels": [33.0, 25.0, 41.0], "spacing": [2.0, 2.0, 2.0],
              "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
              "resampling_fn_data": "resample_data_or_seg_to_shape",
              "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
              "architecture": {"network_class_name": f"{__name__}.AxisNet", "arch_kwargs": ARCH_KWARGS,
                               "_kw_requires_import": ["conv_op", "norm_op", "nonlin"]},
              "batch_dice": False}  # fmt: skip
    plans = {"dataset_name": "Dataset042_Anat", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp":
             [2.0, 2.0, 2.0], "original_median_shape_after_transp": [33, 25, 41], "image_reader_writer": "SimpleITKIO",
             "transpose_forward": TRANSPOSE, "transpose_backward": [1, 2, 0],
             "configurations": {"2d": {**config, "data_identifier": "nnUNetPlans_2d", "patch_size": PATCH_2D,
                                       "spacing": [2.0, 2.0], "architecture": {**config["architecture"],
                                                                               "arch_kwargs": ARCH_KWARGS_2D}},
                                "3d_fullres": config},
             "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
             "foreground_intensity_properties_per_channel": {"0": properties}}  # fmt: skip
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "grey": 1, "bright": 2},
               "numTraining": 1, "file_ending": ".nii.gz"}  # fmt: skip
    (plans_edit or (lambda p: None))(plans)
    (dataset_edit or (lambda d: None))(dataset)
    folder = root / (FOLDER.replace("3d_fullres", "2d") if two_d else FOLDER)
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=4))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=4))
    torch.manual_seed(11)  # a seed whose labels hold each class on thousands of voxels
    make = build_2d if two_d else build
    net, example = make(3).eval(), torch.zeros(1, 1, *[8] * (2 if two_d else 3))
    for fold in folds:
        (folder / f"fold_{fold}").mkdir()
        torch.save(nnunet_checkpoint(net.state_dict(), lambda: make(3), example, mirroring),
                   folder / f"fold_{fold}" / "checkpoint_final.pth")  # fmt: skip
    return folder, plans, net


def build_2d(classes: int) -> AxisNet:
    return AxisNet(1, classes, torch.nn.Conv2d, [[3, 5]], torch.nn.InstanceNorm2d, {"eps": 1e-05, "affine": True},
                   torch.nn.LeakyReLU, {"inplace": True})  # fmt: skip


def build(classes: int) -> AxisNet:
    return AxisNet(1, classes, torch.nn.Conv3d, [[1, 3, 5]], torch.nn.InstanceNorm3d, {"eps": 1e-05, "affine": True},
                   torch.nn.LeakyReLU, {"inplace": True})  # fmt: skip


def mirrored(net: torch.nn.Module, mirror_axes: tuple[int, ...] | None):
    """nnU-Net v2's ``_internal_maybe_mirror_and_predict``: a patch's logits, averaged with those of the patch
    flipped along each combination of ``mirror_axes`` (spatial axes of the network), each flipped back."""
    if not mirror_axes:
        return net
    dims = [a + 2 for a in mirror_axes]
    combinations = [c for i in range(len(dims)) for c in itertools.combinations(dims, i + 1)]

    def predict(x):
        prediction = net(x)
        for axes in combinations:
            prediction += torch.flip(net(torch.flip(x, axes)), axes)
        return prediction / (len(combinations) + 1)

    return predict


def compute_steps_for_sliding_window(image_size, tile_size, tile_step_size):
    """nnunetv2 2.8.1's ``inference.sliding_window_prediction.compute_steps_for_sliding_window``, as it is (Apache
    2.0; nnU-Net is no dependency of tilemask's): each axis's window starts, evenly spread."""
    target_step_sizes_in_voxels = [i * tile_step_size for i in tile_size]
    num_steps = [int(np.ceil((i - k) / j)) + 1 for i, j, k in zip(image_size, target_step_sizes_in_voxels, tile_size)]
    steps = []
    for dim in range(len(tile_size)):
        max_step_value = image_size[dim] - tile_size[dim]
        actual_step_size = max_step_value / (num_steps[dim] - 1) if num_steps[dim] > 1 else 99999999999
        steps.append([int(np.round(actual_step_size * i)) for i in range(num_steps[dim])])
    return steps


def compute_gaussian(tile_size, sigma_scale=1.0 / 8, value_scaling_factor=1, dtype=torch.float16):
    """nnunetv2 2.8.1's ``inference.sliding_window_prediction.compute_gaussian``, as it is but for the device."""
    from scipy.ndimage import gaussian_filter

    tmp = np.zeros(tile_size)
    center_coords = [i // 2 for i in tile_size]
    sigmas = [i * sigma_scale for i in tile_size]
    tmp[tuple(center_coords)] = 1
    gaussian_importance_map = gaussian_filter(tmp, sigmas, 0, mode="constant", cval=0)
    gaussian_importance_map = torch.from_numpy(gaussian_importance_map)
    gaussian_importance_map /= torch.max(gaussian_importance_map) / value_scaling_factor
    gaussian_importance_map = gaussian_importance_map.to(dtype=dtype)
    mask = gaussian_importance_map == 0
    gaussian_importance_map[mask] = torch.min(gaussian_importance_map[~mask])
    return gaussian_importance_map


def nnunet_sliding_window(x: torch.Tensor, patch: list[int], predict) -> torch.Tensor:
    """nnU-Net's sliding window over ``x`` (1, C, *spatial; at least a patch along each axis), as
    ``predict_sliding_window_return_logits`` but in float32: its windows (:func:`compute_steps_for_sliding_window`,
    step 0.5), each answer times its gaussian (:func:`compute_gaussian`, as ``nnUNetPredictor`` calls it) added
    up, divided by the sum of the weights."""
    gaussian = compute_gaussian(tuple(patch), sigma_scale=1.0 / 8, value_scaling_factor=10).float()
    logits, weights = None, torch.zeros(x.shape[2:])
    for start in itertools.product(*compute_steps_for_sliding_window(x.shape[2:], patch, 0.5)):
        window = tuple(slice(s, s + p) for s, p in zip(start, patch))
        answer = predict(x[(slice(None), slice(None), *window)])[0]
        logits = torch.zeros((answer.shape[0], *x.shape[2:])) if logits is None else logits
        logits[(slice(None), *window)] += answer * gaussian
        weights[window] += gaussian
    return (logits / weights)[None]


def monai_sliding_window(x: torch.Tensor, patch: list[int], predict) -> torch.Tensor:
    """MONAI's sliding window half a patch apart: its own window starts, not nnU-Net's."""
    from monai.inferers import sliding_window_inference

    return sliding_window_inference(x, patch, 4, predict, overlap=0.5, mode="gaussian", sigma_scale=0.125)


def nnunet_steps(path: str | list[str], plans: dict, net: torch.nn.Module | list[torch.nn.Module],
                 mirror_axes: tuple[int, ...] | None = (0, 1, 2), sliding_window=nnunet_sliding_window,
                 crop: bool = True) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """nnU-Net's prediction, redone: SimpleITK's arrays (axes k, j, i) of the case's channels (``path``, or one file
    per channel), cropped to the box of the voxels nonzero in some channel (``crop_to_nonzero``, unless not
    ``crop``), transposed by ``transpose_forward``, CTNormalization (clip to the percentiles, then the foreground's
    mean and std) or, with ``use_mask_for_norm``, the z-score of each channel over nnU-Net's mask (the voxels nonzero
    in some channel), nnU-Net's gaussian sliding window (:func:`nnunet_sliding_window`) over nnU-Net's mirrored
    predictor (:func:`mirrored`), of each network of a list (nnU-Net's folds) in turn, their whole logits added up
    and divided by their number as ``nnUNetPredictor.predict_logits_from_preprocessed_data`` does, the
    probabilities put back in the whole scan with background around them
    (``revert_cropping_on_probabilities``); labels and the margin between the two best probabilities, both on
    tilemask's axes."""
    import SimpleITK as sitk

    paths = [path] if isinstance(path, str) else path
    whole = np.stack([sitk.GetArrayFromImage(sitk.ReadImage(p)).astype(np.float32) for p in paths])
    nonzero = np.nonzero((whole != 0).any(0) if crop else np.ones(whole.shape[1:], bool))
    box = tuple(slice(int(at.min()), int(at.max()) + 1) for at in nonzero)  # get_bbox_from_mask_npwhere
    array = whole[(slice(None), *box)].transpose([0, *(1 + t for t in plans["transpose_forward"])])
    config = plans["configurations"]["3d_fullres"]
    if set(config["normalization_schemes"]) == {"ZScoreNormalization"} and all(config["use_mask_for_norm"]):
        mask = (array != 0).any(0)  # crop_to_nonzero's mask, the union of the channels' (its holes filled: none here)
        for channel in array:
            channel[mask] = (channel[mask] - channel[mask].mean()) / max(channel[mask].std(), 1e-8)
    else:
        for c, channel in enumerate(array):
            p = plans["foreground_intensity_properties_per_channel"][str(c)]
            channel[...] = (np.clip(channel, p["percentile_00_5"], p["percentile_99_5"]) - p["mean"]) / p["std"]
    with torch.no_grad():
        folds = net if isinstance(net, list) else [net]
        logits = sum(sliding_window(torch.from_numpy(array)[None], PATCH, mirrored(n, mirror_axes)) for n in folds)
        logits = logits / len(folds)
    cropped = torch.softmax(logits, 1)[0].numpy()
    back = [0, *(1 + a for a in np.argsort(plans["transpose_forward"]))]  # network axes -> SimpleITK's
    probabilities = np.zeros((len(cropped), *whole.shape[1:]), np.float32)
    probabilities[0] = 1
    probabilities[(slice(None), *box)] = cropped.transpose(back)
    probabilities = probabilities.transpose(0, 3, 2, 1)  # -> (C, i, j, k)
    top = np.sort(probabilities, 0)
    return probabilities.argmax(0), top[-1] - top[-2]


@pytest.mark.slow  # 26 s in a loaded default run (2026-12-07)
def test_results_folder_runs_as_nnunet_predicts(tmp_path, client):
    """plans.json's network, patch, spacing, CTNormalization and transpose, dataset.json's classes and channels and
    fold 0's checkpoint give nnU-Net's labels on a real scan, voxel for voxel (but for float ties), mirrored by
    default as ``nnUNetPredictor`` mirrors (each patch along the checkpoint's axes, logits averaged); the class
    names are dataset.json's."""
    path, data = scan()
    folder, plans, net = results_folder(tmp_path, data)
    workflow = {"version": 1, "input": path, "model": {"nnunet": str(folder), "fold": 0},
                "inference": {"device": "cpu", "batch_size": 4}, "output": {"path": "out/{stem}.nii.gz"}}  # fmt: skip
    parsed = Workflow.from_dict(workflow, base_dir=tmp_path)
    assert parsed.inference.roi_size == [16, 16, 24]  # (i, j, k): the network's axes are (i, k, j)
    assert parsed.classes == ["background", "grey", "bright"]
    assert len(parsed.inference.flips) == 8 and parsed.inference.tta_mode == "patch"
    (result,) = tilemask.run(parsed, client)
    ours = np.asarray(nib.load(result.outputs[0]).dataobj)
    theirs, margin = nnunet_steps(path, plans, net)
    assert ours.shape == theirs.shape == data.shape
    apart = ours != theirs
    assert np.bincount(theirs.ravel(), minlength=3).min() > 1000  # all three classes are there to get wrong
    assert apart.sum() == 0 or margin[apart].max() < 1e-5, f"{apart.sum()} voxels apart, not ties"
    unmirrored, _ = nnunet_steps(path, plans, net, None)
    assert (unmirrored != theirs).sum() > 100  # mirroring changes the answer: the test can fail
    monai_windows, _ = nnunet_steps(path, plans, net, sliding_window=monai_sliding_window)
    assert (monai_windows != theirs).sum() > 100  # so do MONAI's starts (0, 8, 16, 17 against 0, 6, 11, 17) and weights
    assert (tmp_path / "out" / "anatomical.colors.csv").read_text().count("grey") == 1


def another_fold(folder, fold: int, net: torch.nn.Module, seed: int, mirroring=(0, 1, 2)) -> torch.nn.Module:
    """``fold_N``'s checkpoint saved over with ``net``'s weights moved a little (another fold's training: a network
    like the others, not the same); the network saved."""
    torch.manual_seed(seed)
    other = build(3).eval()
    with torch.no_grad():
        for mine, theirs in zip(other.parameters(), net.parameters()):
            mine.copy_(theirs + 0.3 * theirs.std() * torch.randn_like(theirs))
    (folder / f"fold_{fold}").mkdir(exist_ok=True)
    torch.save(nnunet_checkpoint(other.state_dict(), lambda: build(3), torch.zeros(1, 1, 8, 8, 8), mirroring),
               folder / f"fold_{fold}" / "checkpoint_final.pth")  # fmt: skip
    return other


def _count_checkpoint_loads() -> None:
    """On a worker: count torch.load's reads of each ``.pth`` file (:func:`_checkpoint_loads` reads them back)."""
    import collections

    load = torch.load
    counts = collections.Counter()

    def counted(f, *args, **kwargs):
        if isinstance(f, str | os.PathLike) and str(f).endswith(".pth"):
            counts[str(f)] += 1
        return load(f, *args, **kwargs)

    counted.counts, counted.original = counts, load
    torch.load = counted


def _checkpoint_loads() -> dict[str, int]:
    counted = torch.load
    torch.load = getattr(counted, "original", counted)
    return dict(getattr(counted, "counts", {}))


@pytest.mark.slow  # 5 folds, each window mirrored 8 times, on both sides
@pytest.mark.timeout(600)
def test_a_folder_of_five_folds_runs_nnunet_s_ensemble(tmp_path, client):
    """nnUNetv2_predict's default: the ensemble of folds 0-4, each fold's whole sliding-window logits (mirrored)
    added up and divided by five, then the softmax.  tilemask averages the folds' logits window by window (one
    module whose forward averages its members'): the windows, their gaussian and the mirroring being the same for
    every fold and linear in the logits, the labels are nnU-Net's but for float ties, as one fold's are.  A folder
    of several folds and no model.fold runs them all (fold_all is no member, as nnUNetPredictor finds the folds);
    each worker reads each checkpoint once."""
    path, data = scan()
    folder, plans, net = results_folder(tmp_path, data)
    nets = [net, *(another_fold(folder, fold, net, seed=fold) for fold in range(1, 5))]
    (folder / "fold_all").mkdir()
    shutil.copy(folder / "fold_1" / "checkpoint_final.pth", folder / "fold_all" / "checkpoint_final.pth")
    workflow = {"version": 1, "input": path, "model": {"nnunet": str(folder)},
                "inference": {"device": "cpu", "batch_size": 4},
                "output": {"path": "out/{stem}.nii.gz", "probabilities": "float32"}}  # fmt: skip
    parsed = Workflow.from_dict(workflow, base_dir=tmp_path)
    checkpoints = [str(folder / f"fold_{fold}" / "checkpoint_final.pth") for fold in range(5)]
    assert [parsed.model.weights, *parsed.model.args["_ensemble"]] == checkpoints
    listed = Workflow.from_dict(workflow, ["model.fold=[0, 1, 2, 3, 4]"], base_dir=tmp_path)
    assert (listed.model.weights, listed.model.args) == (parsed.model.weights, parsed.model.args)
    client.run(_count_checkpoint_loads)
    try:
        (result,) = tilemask.run(parsed, client)
    finally:
        reads = client.run(_checkpoint_loads)
    assert {file for counts in reads.values() for file in counts} == set(checkpoints)
    assert all(n == 1 for counts in reads.values() for n in counts.values()), reads  # once per worker process
    ours = np.asarray(nib.load(result.outputs[0]).dataobj)
    theirs, margin = nnunet_steps(path, plans, nets)
    assert ours.shape == theirs.shape == data.shape
    assert np.bincount(theirs.ravel(), minlength=3).min() > 1000
    apart = ours != theirs
    assert apart.sum() == 0 or margin[apart].max() < 1e-5, f"{apart.sum()} voxels apart, not ties"
    top = np.sort(nib.load(result.outputs[1]).get_fdata(dtype=np.float32), -1).transpose(3, 0, 1, 2)
    # the probabilities too: the labels alone do not tell the folds' mean from their sum (4.8e-7 apart at most)
    np.testing.assert_allclose(top[-1] - top[-2], margin, rtol=0, atol=1e-5)
    alone, _ = nnunet_steps(path, plans, net)
    assert (alone != theirs).sum() > 100  # the ensemble is not fold 0's answer: the test can fail


def test_every_fold_s_checkpoint_keys_the_converted_network(tmp_path):
    """A converted network (OpenVINO, ...) is cached under the sha256 of the weights: of an ensemble, of every
    fold's checkpoint, so a retrained fold is converted again; the spec a worker caches its model under changes
    with any fold's file too."""
    from tilemask.backend_cache import cache_path
    from tilemask.settings import ModelSpec

    _, data = scan()
    folder, _, net = results_folder(tmp_path, data)
    another_fold(folder, 1, net, seed=1)

    def spec(*overrides: str) -> ModelSpec:
        model = Workflow.from_dict({"version": 1, "input": "x.nii.gz", "model": {"nnunet": str(folder)},
                                    "output": {"path": "o.nii.gz"}}, overrides).model  # fmt: skip
        return ModelSpec.create(model.network, model.args, model.weights)

    def key(of: ModelSpec) -> str:
        return cache_path(of, "openvino", "2025.0", 1, (16, 16, 24), ".xml").name

    ensemble, alone = spec(), spec("model.fold=0")
    assert key(ensemble) != key(alone)
    another_fold(folder, 1, net, seed=2)  # fold 1 retrained, saved at the same path
    retrained = spec()
    assert retrained != ensemble and key(retrained) != key(ensemble)
    assert key(spec("model.fold=0")) == key(alone)  # fold 0 alone is as it was


@pytest.mark.slow  # three runs of a two-fold ensemble
@pytest.mark.timeout(300)
def test_a_retrained_fold_redoes_the_job_s_items(tmp_path, client):
    """A job's items are done once; retrained weights at the same path redo them: of an ensemble, any fold's
    checkpoint saved over, not only the first's."""
    path, data = scan()
    folder, _, net = results_folder(tmp_path, data)
    another_fold(folder, 1, net, seed=1)
    workflow = {"version": 1, "input": path, "model": {"nnunet": str(folder)},
                "inference": {"device": "cpu", "batch_size": 4, "tta": "none"},
                "output": {"path": "out/{stem}.nii.gz"}}  # fmt: skip
    (first,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    (again,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    assert (first.status, again.status) == ("ok", "skipped")
    another_fold(folder, 1, net, seed=2)  # fold 1 retrained, saved at the same path
    (redone,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    assert redone.status == "ok" and redone.windows > 0
    (last,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    assert last.status == "skipped"


def _set(path: str, value):
    """An edit of plans.json or dataset.json at ``a/b/c``."""
    def edit(d):
        *keys, last = path.split("/")
        for key in keys:
            d = d[key]
        d[last] = value

    return edit


MASKED_ZSCORE = _set("configurations/3d_fullres/normalization_schemes", ["ZScoreNormalization"]), _set(
    "configurations/3d_fullres/use_mask_for_norm", [True])  # fmt: skip


@pytest.mark.slow  # 14 s in a loaded default run (2026-12-07)
@pytest.mark.parametrize("edits", [(), MASKED_ZSCORE], ids=["CTNormalization", "ZScoreNormalization in the mask"])
def test_a_scan_with_a_border_of_zeros_is_cropped_as_nnunet_crops_it(tmp_path, client, edits):
    """nnU-Net predicts only the box of a case's nonzero voxels (its windows, its resampling and its z-score that
    box's; with ``use_mask_for_norm`` the z-score of the nonzero voxels only, the others left at 0), background
    outside it: a real scan with slabs of zeros along two sides and a block of zeros in a corner of the box gets
    nnU-Net's labels, and a prediction of the whole scan does not."""
    path, data = scan()
    data = data.copy()
    data[:3] = 0
    data[:, 36:] = 0
    data[3:12, :10] = 0  # inside the box, on its edge: outside nnU-Net's mask, which fills only enclosed holes
    cropped = tmp_path / "bordered.nii.gz"
    nib.save(nib.Nifti1Image(data, nib.load(path).affine), cropped)
    folder, plans, net = results_folder(tmp_path, data, lambda plans: [edit(plans) for edit in edits])
    workflow = {"version": 1, "input": str(cropped), "model": {"nnunet": str(folder), "fold": 0},
                "inference": {"device": "cpu", "batch_size": 4}, "output": {"path": "out/{stem}.nii.gz"}}  # fmt: skip
    parsed = Workflow.from_dict(workflow, base_dir=tmp_path)
    assert parsed.preprocess.crop == "nonzero"
    (result,) = tilemask.run(parsed, client)
    ours = np.asarray(nib.load(result.outputs[0]).dataobj)
    theirs, margin = nnunet_steps(str(cropped), plans, net)
    apart = ours != theirs
    assert apart.sum() == 0 or margin[apart].max() < 1e-5, f"{apart.sum()} voxels apart, not ties"
    assert (ours[:3] == 0).all() and (ours[:, 36:] == 0).all() and np.bincount(ours.ravel(), minlength=3).min() > 500
    whole, _ = nnunet_steps(str(cropped), plans, net, crop=False)
    assert (whole != theirs).sum() > 1000  # the crop moves the windows and clears the border: the test can fail


@pytest.mark.slow  # 16 s in a loaded default run (2026-12-07)
def test_a_z_score_within_the_mask_of_several_channels_is_nnunet_s(tmp_path, client):
    """With ``use_mask_for_norm``, nnU-Net z-scores each channel over one mask, the voxels nonzero in some channel
    (``crop_to_nonzero``'s): a voxel 0 in one channel and not in the other is normalized in both.  Two channels
    whose zeros differ get nnU-Net's labels (each channel's own nonzero voxels, MONAI's ``nonzero``, left 2197 of
    33825 apart; against nnunetv2 2.8.1's ``nnUNetPredictor``, 9.4 % of ``example4d.nii.gz``)."""
    path, data = scan()
    first, second = data.copy(), data.copy()
    first[:3] = second[:3] = 0  # outside the mask of both, on the box's border
    first[3:12, :10] = 0  # inside the box and nonzero in the other channel: in nnU-Net's mask
    second[10:25, 20:41, 12:] = 0
    paths = [str(tmp_path / f"case_000{c}.nii.gz") for c in range(2)]
    for channel, file in zip((first, second), paths):
        nib.save(nib.Nifti1Image(channel, nib.load(path).affine), file)

    def two_mr_channels(plans):
        config = plans["configurations"]["3d_fullres"]
        config["normalization_schemes"], config["use_mask_for_norm"] = ["ZScoreNormalization"] * 2, [True] * 2

    folder, plans, _ = results_folder(tmp_path, data, two_mr_channels, _set("channel_names", {"0": "T1", "1": "T2"}))
    torch.manual_seed(11)
    net = AxisNet(2, 3, torch.nn.Conv3d, [[1, 3, 5]], torch.nn.InstanceNorm3d, {"eps": 1e-05, "affine": True},
                  torch.nn.LeakyReLU, {"inplace": True}).eval()  # fmt: skip
    torch.save({"network_weights": net.state_dict(), "inference_allowed_mirroring_axes": (0, 1, 2)},
               folder / "fold_0" / "checkpoint_final.pth")  # fmt: skip
    workflow = {"version": 1, "input": {"channels": [str(tmp_path / "{case}_0000.nii.gz"),
                                                     str(tmp_path / "{case}_0001.nii.gz")]},
                "model": {"nnunet": str(folder), "fold": 0}, "inference": {"device": "cpu", "batch_size": 4},
                "output": {"path": "out/{stem}.nii.gz"}}  # fmt: skip
    (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    ours = np.asarray(nib.load(result.outputs[0]).dataobj)
    theirs, margin = nnunet_steps(paths, plans, net)
    apart = ours != theirs
    assert apart.sum() == 0 or margin[apart].max() < 1e-5, f"{apart.sum()} voxels apart, not ties"
    assert np.bincount(ours.ravel(), minlength=3).min() > 500


def test_a_results_folder_written_on_the_model_grid_predicts_the_whole_scan(tmp_path):
    """``output.grid: model`` writes the grid the network sees; a crop would make it depend on the data, so the
    folder's defaults crop only onto the scan's own grid (the crop and the model grid together are refused)."""
    path, data = scan()
    folder, _, _ = results_folder(tmp_path, data)
    workflow = {"version": 1, "input": path, "model": {"nnunet": str(folder)}, "output": {"path": "out/{stem}.zarr"}}
    assert Workflow.from_dict(workflow, base_dir=tmp_path).preprocess.crop == "nonzero"
    on_model = Workflow.from_dict(workflow, ["output.grid=model"], base_dir=tmp_path)
    assert on_model.output.grid == "model" and on_model.preprocess.crop == "none"
    with pytest.raises(WorkflowError, match="preprocess.crop needs output.grid: input"):
        Workflow.from_dict(workflow, ["output.grid=model", "preprocess.crop=nonzero"], base_dir=tmp_path)


def test_window_starts_are_nnunet_s():
    """``steps: nnunet`` (the folders' default) places windows as nnU-Net does, for any size, patch and step."""
    from tilemask.geometry import WindowPlan

    for roi, step in itertools.product((16, 24, 64, 96, 160), (0.5, 0.25, 0.75, 0.3, 0.2, 0.1)):
        for size in range(roi, 4 * roi):
            plan = WindowPlan.build((size,), (roi,), 1 - step, 64, steps="nnunet")
            assert list(plan.axes[0].starts) == compute_steps_for_sliding_window((size,), (roi,), step)[0]


def test_window_weights_are_nnunet_s():
    """``mode: nnunet`` (the folders' default) weights windows with nnU-Net's gaussian, value for value; MONAI's
    is centred otherwise along an even patch."""
    from tilemask.inference import importance_map

    for patch in ((16, 16, 16), (24, 64, 64), (28, 48, 40), (15, 20, 9)):
        ours = importance_map(patch, "nnunet", 0.125, torch.device("cpu"))
        torch.testing.assert_close(ours, compute_gaussian(patch, value_scaling_factor=10).float(), rtol=0, atol=0)
    monai = importance_map((16, 16, 16), "gaussian", 0.125, torch.device("cpu"))
    assert not torch.allclose(monai / monai.max(), compute_gaussian((16, 16, 16)).float(), atol=1e-2)


def test_transpose_forward_is_what_the_network_sees(tmp_path):
    """Built from the folder, the network permutes tilemask's axes (i, j, k) into nnU-Net's (SimpleITK's k, j, i
    transposed by the plans): with the axes of the identity transpose, the same weights answer otherwise."""
    from tilemask.models import load_model
    from tilemask.settings import ModelSpec

    _, data = scan()
    folder, _, net = results_folder(tmp_path, data)
    model = Workflow.from_dict({"version": 1, "input": "x.nii.gz", "model": {"nnunet": str(folder)},
                                "output": {"path": "o.nii.gz"}}).model  # fmt: skip
    loaded = load_model(ModelSpec.create(model.network, model.args, model.weights))
    x = torch.randn(1, 1, 16, 16, 24)  # (i, j, k)
    network_axes = x.permute(0, 1, 2, 4, 3)  # SimpleITK's (k, j, i) transposed by [2, 0, 1]: (i, k, j)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(network_axes).permute(0, 1, 2, 4, 3), rtol=0, atol=0)
        identity = load_model(ModelSpec.create(model.network, {**model.args, "axes": [2, 1, 0]}, model.weights))
        assert not torch.allclose(identity(x), loaded(x), atol=1e-3)


@pytest.mark.parametrize(
    "folder_name, plans_edit, dataset_edit, message",
    [
        (FOLDER, _set("configurations/3d_fullres/normalization_schemes", ["RescaleTo01Normalization"]), None,
         "plans.json normalizes with RescaleTo01Normalization, which tilemask does not reproduce"),
        (FOLDER, lambda plans: [edit(plans) for edit in (
            _set("configurations/3d_fullres/normalization_schemes", ["ZScoreNormalization"] * 2),
            _set("configurations/3d_fullres/use_mask_for_norm", [True, False]))],
         _set("channel_names", {"0": "T1", "1": "T2"}), "normalizes some channels within the nonzero region"),
        (FOLDER, _set("configurations/3d_fullres/previous_stage", "3d_lowres"), None, "is a cascade stage"),
        (FOLDER, None, _set("labels", {"background": 0, "whole tumor": [1, 2], "core": 2}),
         "dataset.json trains regions (whole tumor)"),
        (FOLDER, None, _set("channel_names", {"0": "CT", "1": "PET"}),
         "configuration 3d_fullres normalizes 1 channel(s) but dataset.json names 2"),
        (FOLDER, None, _set("overwrite_image_reader_writer", "NibabelIOWithReorient"),
         "dataset.json reads images with NibabelIOWithReorient"),
        (FOLDER, _set("image_reader_writer", "NibabelIOWithReorient"), None,
         "plans.json reads images with NibabelIOWithReorient"),  # what nnUNetPredictor reads: it had run (exit 0)
        (FOLDER, _set("configurations/3d_fullres/architecture", None), None, "has no architecture"),
        # a plans.json of values nnU-Net does not write: each was a bare builtin's line naming no file, exit 1
        (FOLDER, _set("configurations/3d_fullres", "x"), None, "configuration 3d_fullres is not a mapping (got 'x')"),
        (FOLDER, _set("configurations/3d_fullres/patch_size", ["a", 24, 16]), None,
         "plans.json: configuration 3d_fullres's patch_size is not a list of numbers (got ['a', 24, 16])"),
        (FOLDER, _set("configurations/3d_fullres/patch_size", 16), None, "patch_size is not a list of numbers"),
        (FOLDER, _set("configurations/3d_fullres/spacing", "x"), None, "spacing is not a list of numbers (got 'x')"),
        (FOLDER, _set("transpose_forward", "abc"), None, "plans.json: transpose_forward is not a list of numbers"),
        (FOLDER, _set("configurations/3d_fullres/patch_size", [float("inf"), 24, 16]), None,  # JSON's Infinity
         "patch_size is not a list of numbers (got [inf, 24, 16])"),  # it was 'OverflowError: cannot convert float...'
        (FOLDER, _set("configurations/3d_fullres/spacing", [float("nan"), 1, 1]), None,  # JSON's NaN (or Infinity)
         "spacing is not a list of numbers (got [nan, 1, 1])"),  # it was 'workflow: preprocess.spacing.0: ...'
        (FOLDER, _set("configurations/3d_fullres/architecture/arch_kwargs", [1]), None,
         "configuration 3d_fullres's arch_kwargs is not a mapping (got [1])"),
        (FOLDER, _set("configurations", ["3d_fullres"]), None, "plans.json: configurations is a list, not a mapping"),
        (FOLDER, _set("configurations/3d_fullres/normalization_schemes", "ZScoreNormalization"), None,
         "normalization_schemes is not a list, one per channel (got 'ZScoreNormalization')"),  # "normalizes 19"
    ],
)  # fmt: skip
def test_what_tilemask_cannot_reproduce_is_refused_by_name(tmp_path, folder_name, plans_edit, dataset_edit, message):
    _, data = scan()
    folder, _, _ = results_folder(tmp_path, data, plans_edit, dataset_edit)
    if folder_name != FOLDER:
        folder = folder.rename(tmp_path / folder_name)
    with pytest.raises(WorkflowError) as refused:
        Workflow.from_dict({"version": 1, "input": "x.nii.gz", "model": {"nnunet": str(folder), "fold": 0},
                            "output": {"path": "o.nii.gz"}})  # fmt: skip
    assert message in str(refused.value) and refused.value.exit_status == 2
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("labels, regions_class_order", [
    ({"background": 0, "grey": [1], "bright": 2}, None),  # a one-label list is no region (LabelManager's has_regions)
    ({"background": 0, "grey": 1, "bright": 2}, [1, 2]),  # regions_class_order counts only with regions
])  # fmt: skip
def test_labels_without_regions_are_classes_as_nnunet_reads_them(tmp_path, labels, regions_class_order):
    """nnU-Net trains regions where a label is a list of more than one value (``LabelManager.has_regions``), else
    one softmax class per label whatever ``regions_class_order`` says: such a folder runs (it was refused as
    region-based training)."""

    def edit(dataset):
        dataset["labels"] = labels
        dataset["regions_class_order"] = regions_class_order

    _, data = scan()
    folder, _, _ = results_folder(tmp_path, data, dataset_edit=edit)
    parsed = Workflow.from_dict({"version": 1, "input": "x.nii.gz", "model": {"nnunet": str(folder)},
                                 "output": {"path": "o.nii.gz"}})  # fmt: skip
    assert parsed.classes == ["background", "grey", "bright"] and parsed.model.args["num_classes"] == 3


def test_labels_refused_are_named_as_dataset_json_gives_them(tmp_path):
    """A label that is no integer is refused quoting dataset.json's labels as written: a one-value list was quoted
    as its value (``'grey': 1`` for ``[1]``)."""
    _, data = scan()
    folder, _, _ = results_folder(tmp_path, data, dataset_edit=_set("labels", {"background": 0, "grey": [1],
                                                                               "bright": "two"}))  # fmt: skip
    with pytest.raises(WorkflowError, match=re.escape("labels must map names to integers (got {'background': 0, "
                                                      "'grey': [1], 'bright': 'two'})")):  # fmt: skip
        Workflow.from_dict({"version": 1, "input": "x.nii.gz", "model": {"nnunet": str(folder)},
                            "output": {"path": "o.nii.gz"}})  # fmt: skip


def test_a_label_value_of_two_names_is_refused_saying_so(tmp_path):
    """Two names of one value (nnU-Net trains it: its labels are the values) were refused as values "not 0, 1, 2,
    ..."; tilemask has one class name a value to write."""
    _, data = scan()
    labels = {"background": 0, "grey": 1, "also grey": [1], "bright": 2}
    folder, _, _ = results_folder(tmp_path, data, dataset_edit=_set("labels", labels))
    with pytest.raises(WorkflowError, match=re.escape("label value 1 has several names (also grey, grey): give each")):
        Workflow.from_dict({"version": 1, "input": "x.nii.gz", "model": {"nnunet": str(folder)},
                            "output": {"path": "o.nii.gz"}})  # fmt: skip


def test_folds_and_checkpoints(tmp_path):
    """One fold is taken as it is; of several, model.fold chooses one, or a list of them nnU-Net's ensemble, and
    without it every numbered fold runs (nnUNetPredictor's default; it was refused); checkpoint_best.pth when asked;
    the workflow's keys override the folder's."""
    _, data = scan()
    folder, _, _ = results_folder(tmp_path, data, folds=(0, 3))
    (folder / "fold_all").mkdir()  # trained on every case: a fold of its own, not "every fold"
    shutil.copy(folder / "fold_0" / "checkpoint_final.pth", folder / "fold_all" / "checkpoint_final.pth")
    raw = {"version": 1, "input": "x.nii.gz", "model": {"nnunet": str(folder)}, "output": {"path": "o.nii.gz"}}

    def checkpoints(workflow: Workflow) -> list[str]:
        return [os.path.relpath(p, folder) for p in (workflow.model.weights, *workflow.model.args.get("_ensemble", []))]

    assert checkpoints(Workflow.from_dict(raw)) == ["fold_0/checkpoint_final.pth", "fold_3/checkpoint_final.pth"]
    assert checkpoints(Workflow.from_dict(raw, ["model.fold=3"])) == ["fold_3/checkpoint_final.pth"]
    assert checkpoints(Workflow.from_dict(raw, ["model.fold=all"])) == ["fold_all/checkpoint_final.pth"]
    for listed, expected in (([3, 0], ["fold_3", "fold_0"]), ([3], ["fold_3"]), ([0, "all"], ["fold_0", "fold_all"])):
        workflow = Workflow.from_dict({**raw, "model": {**raw["model"], "fold": listed}})  # nnUNetv2_predict -f 3 0
        assert checkpoints(workflow) == [f"{fold}/checkpoint_final.pth" for fold in expected]
    for listed in ([], [0, 0], [0, -1]):
        with pytest.raises(WorkflowError, match=r"^model.fold: a (list of one or more different folds|fold number)"):
            Workflow.from_dict({**raw, "model": {**raw["model"], "fold": listed}})
    with pytest.raises(WorkflowError, match=r"^model.nnunet: no fold_1/checkpoint_final.pth in .* \(folds: 0, 3, all"):
        Workflow.from_dict(raw, ["model.fold=[0, 1]"])
    another_fold(folder, 3, build(3), seed=1, mirroring=(0, 1))  # trained by another trainer: mirrored otherwise
    with pytest.raises(WorkflowError, match=r"^model.nnunet: fold_3 mirrors along the axes \[0, 1\] and fold_0 "
                                            r"along \[0, 1, 2\]: give model.fold one fold, or folds that agree$"):
        Workflow.from_dict(raw)
    shutil.rmtree(folder / "fold_all")
    with pytest.raises(WorkflowError, match=r"no fold_3/checkpoint_best.pth in"):
        Workflow.from_dict(raw, ["model.fold=3", "model.checkpoint=checkpoint_best.pth"])
    shutil.copy(folder / "fold_3" / "checkpoint_final.pth", folder / "fold_3" / "checkpoint_best.pth")
    best = Workflow.from_dict(raw, ["model.fold=3", "model.checkpoint=checkpoint_best.pth", "inference.overlap=0.25"])
    assert best.model.weights == str(folder / "fold_3" / "checkpoint_best.pth")
    assert best.inference.overlap == 0.25 and best.preprocess.spacing == [2.0, 2.0, 2.0]
    with pytest.raises(WorkflowError, match=r"model.fold and model.checkpoint choose an nnU-Net fold's weights"):
        Workflow.from_dict({**raw, "model": {"network": "UNet", "weights": "w.pt", "fold": 1}})
    for fold in ("0", "3"):
        shutil.rmtree(folder / f"fold_{fold}")
    with pytest.raises(WorkflowError, match=rf"^model.nnunet: {re.escape(str(folder))} holds no fold_\* folder: give "):
        Workflow.from_dict(raw)  # it said "has folds none: give model.fold"


def test_a_job_s_saved_workflow_of_chosen_folds_reads_back_as_itself(tmp_path):
    """A job folder keeps ``to_dict``'s workflow: model.fold beside model.weights, the checkpoint the fold chose.
    Read back (the driver of ``tilemask submit``, of a SLURM job) it was refused as "give them or model.weights,
    not both", whatever the fold; weights other than the fold's still are."""
    _, data = scan()
    folder, _, net = results_folder(tmp_path, data)
    another_fold(folder, 3, net, seed=3)
    shutil.copy(folder / "fold_3" / "checkpoint_final.pth", folder / "fold_3" / "checkpoint_best.pth")
    raw = {"version": 1, "input": "x.nii.gz", "model": {"nnunet": str(folder)}, "output": {"path": "o.nii.gz"}}
    best = ["model.fold=3", "model.checkpoint=checkpoint_best.pth"]
    for overrides in (["model.fold=0"], ["model.fold=[3, 0]"], [], best):
        saved = Workflow.from_dict(raw, overrides, base_dir=tmp_path).to_dict()
        assert Workflow.from_dict(saved, base_dir=tmp_path).to_dict() == saved, overrides
    with pytest.raises(WorkflowError, match=r"^model.fold and model.checkpoint choose the folder's checkpoint: give "):
        Workflow.from_dict(raw, ["model.fold=3", f"model.weights={folder / 'fold_0' / 'checkpoint_final.pth'}"])


def slice_by_slice(x: torch.Tensor, patch: list[int], predict) -> torch.Tensor:
    """nnU-Net's sliding window for a 2D configuration over a volume (``predict_sliding_window_return_logits``
    with a 2D patch): each slice across the first axis on its own, its 2D windows, steps and gaussian."""
    slices = [nnunet_sliding_window(x[:, :, d], patch, predict) for d in range(x.shape[2])]
    return torch.stack(slices, dim=2)


@pytest.mark.slow
def test_a_2d_configuration_runs_slice_by_slice_as_nnunet_predicts(tmp_path, client):
    """A ``2d`` folder was refused; nnU-Net predicts it slice by slice across its first axis after the transpose
    (tilemask's ``slice_axis`` 0 here: the scan's i), each slice's 2D windows weighted by a 2D gaussian and
    mirrored along the two axes the checkpoint names, the scan's spacing kept across slices."""
    path, data = scan()
    folder, plans, net = results_folder(tmp_path, data, mirroring=(0, 1), two_d=True)
    workflow = {"version": 1, "input": path, "model": {"nnunet": str(folder)},
                "inference": {"device": "cpu", "batch_size": 4}, "output": {"path": "out/{stem}.nii.gz"}}  # fmt: skip
    parsed = Workflow.from_dict(workflow, base_dir=tmp_path)
    assert parsed.inference.slice_axis == 0 and parsed.inference.window == (1, 24, 16)  # network axes: (k, j)
    assert parsed.preprocess.spacing == [0.0, 2.0, 2.0] and len(parsed.inference.flips) == 4
    (result,) = tilemask.run(parsed, client)
    ours = np.asarray(nib.load(result.outputs[0]).dataobj)
    theirs, margin = nnunet_steps(path, plans, net, (0, 1), sliding_window=lambda x, _, p: slice_by_slice(x, PATCH_2D, p))
    assert ours.shape == theirs.shape == data.shape
    apart = ours != theirs
    assert np.bincount(theirs.ravel(), minlength=3).min() > 1000  # all three classes are there to get wrong
    assert apart.sum() == 0 or margin[apart].max() < 1e-5, f"{apart.sum()} voxels apart, not ties"
    swapped, _ = nnunet_steps(path, plans, net, (0, 1), sliding_window=lambda x, _, p: slice_by_slice(
        x.transpose(3, 4), PATCH_2D[::-1], p).transpose(3, 4))  # fmt: skip
    assert (swapped != theirs).sum() > 100  # the network's kernels see the slice's axes in their order: can fail


def padded(x: torch.Tensor, patch: list[int], predict) -> torch.Tensor:
    """:func:`slice_by_slice` on ``x`` padded with 0 to a patch along each slice axis shorter than it, cropped back
    (``pad_nd_image`` of a 2D patch on 3D data: the difference split, its odd voxel after)."""
    short = [max(p - s, 0) for p, s in zip(patch, x.shape[3:])]
    pads = [n for d in reversed(short) for n in (d // 2, d - d // 2)]
    out = slice_by_slice(torch.nn.functional.pad(x, pads), patch, predict)
    return out[(slice(None),) * 3 + tuple(slice(d // 2, d // 2 + s) for d, s in zip(short, x.shape[3:]))]


@pytest.mark.slow  # six runs
@pytest.mark.parametrize("transpose", list(itertools.permutations(range(3))))
def test_a_2d_configuration_of_any_transpose_and_a_patch_over_a_slice_is_nnunets(tmp_path, client, monkeypatch,
                                                                                  transpose):  # fmt: skip
    """Every ``transpose_forward`` puts nnU-Net's slices, a slice's axes, the roi and the one axis mirrored where
    nnU-Net has them; a patch longer than the slice along its second axis is padded as ``pad_nd_image`` pads."""
    patch = [16, 44]  # 44: longer than any axis of the scan's box
    monkeypatch.setattr(sys.modules[__name__], "PATCH_2D", patch)
    path, data = scan()
    folder, plans, net = results_folder(tmp_path, data, _set("transpose_forward", list(transpose)), mirroring=(1,),
                                        two_d=True)  # fmt: skip
    workflow = {"version": 1, "input": path, "model": {"nnunet": str(folder)},
                "inference": {"device": "cpu", "batch_size": 4}, "output": {"path": "out/{stem}.nii.gz"}}  # fmt: skip
    (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    ours = np.asarray(nib.load(result.outputs[0]).dataobj)
    theirs, margin = nnunet_steps(path, plans, net, (1,), sliding_window=lambda x, _, p: padded(x, patch, p))
    apart = ours != theirs
    assert np.bincount(theirs.ravel(), minlength=3).min() > 1000
    assert apart.sum() == 0 or margin[apart].max() < 1e-5, f"{apart.sum()} voxels apart, not ties"


def test_a_2d_checkpoint_naming_a_third_axis_to_mirror_mirrors_nothing_with_a_warning(tmp_path, caplog):
    """A 2D configuration's checkpoint whose ``inference_allowed_mirroring_axes`` names axis 2 (a 3D trainer's, the
    folder renamed) failed with a bare IndexError; it is refused with a warning, as any axis not the network's."""
    _, data = scan()
    folder, _, _ = results_folder(tmp_path, data, mirroring=(0, 1, 2), two_d=True)
    with caplog.at_level("WARNING", logger="tilemask.nnunet"):
        parsed = Workflow.from_dict({"version": 1, "input": "x.nii.gz", "model": {"nnunet": str(folder)},
                                     "output": {"path": "o.nii.gz"}})  # fmt: skip
    assert parsed.inference.tta == "none"
    assert "holds (0, 1, 2), not a tuple of the axes 0, 1 of a 2D network" in caplog.text


def test_a_scan_with_fewer_channels_than_dataset_json_names_is_refused(tmp_path, client):
    """dataset.json's channel_names set the network's input channels: a one-file case for a two-channel model is
    refused naming them before any work (it was refused as "preprocess.normalize has 2 values", keys the user never
    wrote: only MONAI's model.args.in_channels was compared, and nnU-Net's networks take input_channels)."""
    from tilemask.errors import InputError

    def two_ct_channels(plans):
        config = plans["configurations"]["3d_fullres"]
        config["normalization_schemes"], config["use_mask_for_norm"] = ["CTNormalization"] * 2, [False] * 2
        properties = plans["foreground_intensity_properties_per_channel"]
        properties["1"] = properties["0"]

    path, data = scan()
    folder, _, _ = results_folder(tmp_path, data, two_ct_channels, _set("channel_names", {"0": "CT", "1": "CT"}))
    workflow = Workflow.from_dict({"version": 1, "input": path, "model": {"nnunet": str(folder), "fold": 0},
                                   "inference": {"device": "cpu"}, "output": {"path": "out/{stem}.nii.gz"}},
                                  base_dir=tmp_path)  # fmt: skip
    with pytest.raises(InputError, match=r"model.args.input_channels is 2 but the input gives 1 channel\b"):
        tilemask.run(workflow, client)
    assert not (tmp_path / "out").exists()


def test_inherited_configuration_and_ignore_label(tmp_path):
    """A configuration that ``inherits_from`` another takes its parent's keys but its own (as nnU-Net's
    PlansManager resolves it); dataset.json's ``ignore`` label is no output of the network."""

    def lowres(plans):
        plans["configurations"]["3d_lowres"] = {"inherits_from": "3d_fullres", "spacing": [4.0, 3.0, 2.5],
                                                "data_identifier": "nnUNetPlans_3d_lowres"}  # fmt: skip

    _, data = scan()
    folder, _, _ = results_folder(tmp_path, data, lowres, _set("labels", {"background": 0, "grey": 1, "bright": 2,
                                                                          "ignore": 3}))  # fmt: skip
    folder = folder.rename(folder.with_name("nnUNetTrainer__nnUNetPlans__3d_lowres"))
    parsed = Workflow.from_dict({"version": 1, "input": "x.nii.gz", "model": {"nnunet": str(folder)},
                                 "output": {"path": "o.nii.gz"}})  # fmt: skip
    assert parsed.preprocess.spacing == [4.0, 2.5, 3.0]  # (i, j, k) from the network's (i, k, j)
    assert parsed.inference.roi_size == [16, 16, 24] and parsed.preprocess.intensity.clip
    assert parsed.classes == ["background", "grey", "bright"] and parsed.model.args["num_classes"] == 3


@pytest.mark.parametrize("saved, flips", [
    ((0, 1, 2), 8),  # nnUNetTrainer's: every combination of the three axes, the unflipped pass included
    ((1,), 2),  # network axis 1 is tilemask's axis 2 (transpose_forward [2, 0, 1])
    (None, 1),  # what a NoMirroring trainer saves: no mirroring
])  # fmt: skip
def test_mirroring_follows_the_checkpoint_and_the_workflow_overrides_it(tmp_path, saved, flips):
    """The checkpoint's ``inference_allowed_mirroring_axes`` (read from its pickle's opcodes, nothing built) give
    the default flips on tilemask's axes; ``inference.tta`` in the workflow wins."""
    _, data = scan()
    folder, _, _ = results_folder(tmp_path, data, mirroring=saved)
    raw = {"version": 1, "input": "x.nii.gz", "model": {"nnunet": str(folder)}, "output": {"path": "o.nii.gz"}}
    inference = Workflow.from_dict(raw).inference
    assert len(inference.flips) == flips
    if saved == (1,):
        assert inference.flips == ((), (2,)) and inference.tta_mode == "patch"
    assert Workflow.from_dict({**raw, "inference": {"tta": "none"}}).inference.flips == ((),)


def test_a_checkpoint_given_in_the_workflow_gives_the_mirroring_axes(tmp_path):
    """``model.weights`` beside ``model.nnunet``: that checkpoint is run, and its own mirroring axes count (they came
    from the fold's checkpoint); the folder then needs no fold."""
    _, data = scan()
    folder, _, net = results_folder(tmp_path, data, mirroring=(0, 1, 2))
    mine = tmp_path / "mine.pth"
    torch.save(nnunet_checkpoint(net.state_dict(), lambda: build(3), torch.zeros(1, 1, 8, 8, 8), (1,)), mine)
    raw = {"version": 1, "input": "x.nii.gz", "model": {"nnunet": str(folder), "weights": "mine.pth"},
           "output": {"path": "o.nii.gz"}}  # fmt: skip
    parsed = Workflow.from_dict(raw, base_dir=tmp_path)
    assert parsed.inference.flips == ((), (2,)) and parsed.model.weights == "mine.pth"
    assert len(Workflow.from_dict({**raw, "model": {"nnunet": str(folder)}}).inference.flips) == 8
    shutil.rmtree(folder / "fold_0")
    assert Workflow.from_dict(raw, base_dir=tmp_path).inference.flips == ((), (2,))
    with pytest.raises(WorkflowError, match=r"^model.weights: no such file .*mnie.pth$"):
        Workflow.from_dict({**raw, "model": {"nnunet": str(folder), "weights": "mnie.pth"}}, base_dir=tmp_path)
    with pytest.raises(WorkflowError, match="^model.fold and model.checkpoint choose the folder's checkpoint: give "):
        Workflow.from_dict({**raw, "model": {**raw["model"], "fold": 7}}, base_dir=tmp_path)


@pytest.mark.parametrize("edit, warned", [
    (lambda checkpoint: checkpoint.pop("inference_allowed_mirroring_axes"), None),  # nnUNetPredictor: None
    (lambda checkpoint: checkpoint.update(inference_allowed_mirroring_axes=(np.int64(0),)), "holds (an object,)"),
    (lambda checkpoint: checkpoint.update(inference_allowed_mirroring_axes=(0, 3)), "holds (0, 3), not a tuple"),
])  # fmt: skip
def test_a_checkpoint_without_plain_mirroring_axes_mirrors_nothing(tmp_path, caplog, edit, warned):
    """No ``inference_allowed_mirroring_axes``: no mirroring, as ``nnUNetPredictor`` reads it; one that is not a
    tuple of the axes 0 to 2 (numpy integers, an axis 3): none either, and a warning says how to mirror."""
    _, data = scan()
    folder, _, net = results_folder(tmp_path, data)
    checkpoint = nnunet_checkpoint(net.state_dict(), lambda: build(3), torch.zeros(1, 1, 8, 8, 8))
    edit(checkpoint)
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    raw = {"version": 1, "input": "x.nii.gz", "model": {"nnunet": str(folder)}, "output": {"path": "o.nii.gz"}}
    assert Workflow.from_dict(raw).inference.flips == ((),)
    if warned:
        assert warned in caplog.text and "no mirroring; set inference.tta to mirror" in caplog.text
    else:
        assert "mirror" not in caplog.text


def test_a_checkpoint_cut_short_is_named_once_by_its_load_without_a_warning_of_its_mirroring(tmp_path, caplog):
    """Half a ``checkpoint_final.pth`` first warned "cannot read its inference_allowed_mirroring_axes ('ascii'
    codec can't decode byte 0x80 ...)", then the load said what it is: now the load's line alone."""
    from tilemask.errors import WeightsError
    from tilemask.models import load_model
    from tilemask.settings import ModelSpec

    _, data = scan()
    folder, _, _ = results_folder(tmp_path, data)
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    raw = {"version": 1, "input": "x.nii.gz", "model": {"nnunet": str(folder)}, "output": {"path": "o.nii.gz"}}
    workflow = Workflow.from_dict(raw)
    assert workflow.inference.flips == ((),) and caplog.text == ""
    with pytest.raises(WeightsError, match=r"a zip archive cut short or damaged \(\d+ bytes\)$"):
        load_model(ModelSpec.create(workflow.model.network, workflow.model.args, workflow.model.weights))


class _Touch:
    """Pickled as a call of ``os.system`` that makes ``marker``: what a checkpoint with code in it does when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_the_mirroring_axes_of_a_pickle_with_code_are_read_without_running_it(tmp_path):
    """Reading the checkpoint's axes builds nothing of its pickle: a call of ``os.system`` in it does not run (the
    workers' ``torch.load(weights_only=True)`` then refuses the file)."""
    import pickle
    import zipfile

    _, data = scan()
    folder, _, _ = results_folder(tmp_path, data)
    marker = tmp_path / "ran"
    payload = pickle.dumps({"inference_allowed_mirroring_axes": (2,), "init_args": _Touch(marker)}, protocol=2)
    with zipfile.ZipFile(folder / "fold_0" / "checkpoint_final.pth", "w") as archive:
        archive.writestr("checkpoint_final/data.pkl", payload)
    raw = {"version": 1, "input": "x.nii.gz", "model": {"nnunet": str(folder)}, "output": {"path": "o.nii.gz"}}
    assert Workflow.from_dict(raw).inference.flips == ((), (1,))  # network axis 2 is tilemask's axis 1
    assert not marker.exists()


@pytest.mark.parametrize("form", ["shared", "key as an earlier value", "nested key first", "protocol 4", "protocol 5",
                                  "legacy format"])  # fmt: skip
def test_mirroring_axes_read_as_torch_loads_them(tmp_path, form):
    """Checkpoints torch reads as nnUNetPredictor does (``torch.load``), however their pickle says it: the tuple
    memoized and referred to again, the key string given before as a value, a nested dict with the same key
    first, protocols 4 and 5 (frames), torch's legacy format."""
    _, data = scan()
    folder, _, net = results_folder(tmp_path, data)
    checkpoint = nnunet_checkpoint(net.state_dict(), lambda: build(3), torch.zeros(1, 1, 8, 8, 8), (1, 2))
    save = {}
    if form == "shared":
        checkpoint = {"init_args": {**checkpoint["init_args"], "axes": checkpoint["inference_allowed_mirroring_axes"]},
                      **checkpoint}  # fmt: skip
    elif form == "key as an earlier value":
        checkpoint = {"note": "inference_allowed_mirroring_axes", **checkpoint}
    elif form == "nested key first":
        checkpoint = {"nested": {"inference_allowed_mirroring_axes": (0,)}, **checkpoint}
    elif form.startswith("protocol"):
        save = {"pickle_protocol": int(form[-1])}
    else:
        save = {"_use_new_zipfile_serialization": False}
    path = folder / "fold_0" / "checkpoint_final.pth"
    torch.save(checkpoint, path, **save)
    assert torch.load(path, weights_only=False)["inference_allowed_mirroring_axes"] == (1, 2)
    raw = {"version": 1, "input": "x.nii.gz", "model": {"nnunet": str(folder)}, "output": {"path": "o.nii.gz"}}
    assert Workflow.from_dict(raw).inference.flips == ((), (2,), (1,), (1, 2))  # network axes 1, 2: tilemask's 2, 1


def test_reading_a_results_folder_imports_no_torch(tmp_path):
    """The client reads plans.json, dataset.json and the checkpoint's mirroring axes without torch (a command's
    client never imports it); the network the workers build is still ``tilemask.nnunet:NnUNetNetwork``."""
    _, data = scan()
    folder, _, _ = results_folder(tmp_path, data, mirroring=(0,))
    script = ("import json, sys\nfrom tilemask.workflow import Workflow\n"
              f"w = Workflow.from_dict({{'version': 1, 'input': 'x.nii.gz', 'model': {{'nnunet': {str(folder)!r}}}, "
              "'output': {'path': 'o.nii.gz'}})\n"
              "print(json.dumps([w.model.network, w.inference.tta, 'torch' in sys.modules]))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(done.stdout) == ["tilemask.nnunet:NnUNetNetwork", [[0]], False]
