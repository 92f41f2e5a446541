"""Several files, one case (nnU-Net's case_0000 / case_0001), and a 4D NIfTI's volumes as channels."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

import tilemask
from tests.test_fidelity import monai_probabilities
from tilemask.errors import InputError
from tilemask.workflow import Workflow

UNET_2CH = dict(spatial_dims=3, in_channels=2, out_channels=2, channels=[4, 8, 16], strides=[2, 2], num_res_units=1)
MEAN, STD = [500.0, 400.0], [300.0, 200.0]


def workflow(input_, weights, tmp_path, **preprocess) -> Workflow:
    return Workflow.from_dict(
        {
            "version": 1,
            "input": input_,
            "model": {"network": "UNet", "args": UNET_2CH, "weights": str(weights)},
            "preprocess": {"normalize": {"mean": MEAN, "std": STD}, **preprocess},
            "inference": {"roi_size": [16, 16, 16], "batch_size": 2, "device": "cpu"},
            "output": {"path": "out/{stem}.nii.gz", "probabilities": "float32", "chunks": 16},
        },
        base_dir=tmp_path,
    )


def test_a_case_read_from_one_file_per_channel_equals_monai_on_the_stacked_volume(
    make_volume, make_model, tmp_path, client
):
    (tmp_path / "imagesTs").mkdir()
    volumes = {}
    for case, seed in (("brain_001", 1), ("brain_002", 2)):
        channels = []
        for c in range(2):
            path, data = make_volume((30, 26, 20), name=f"imagesTs/{case}_{c:04d}.nii.gz", seed=seed * 10 + c)
            channels.append(data)
        volumes[case] = np.stack(channels)
    weights, net = make_model(UNET_2CH)
    wf = workflow({"channels": ["imagesTs/{case}_0000.nii.gz", "imagesTs/{case}_0001.nii.gz"]}, weights, tmp_path)
    results = tilemask.run(wf, client)
    assert [r.input for r in results] == [str(tmp_path / f"imagesTs/{c}_0000.nii.gz") for c in volumes]
    mean, std = (np.array(v, np.float32)[:, None, None, None] for v in (MEAN, STD))
    for case, stacked in volumes.items():
        out = tmp_path / "out" / f"{case}.nii.gz"  # {stem} is the case, as nnU-Net names its predictions
        probabilities = np.moveaxis(nib.load(tmp_path / "out" / f"{case}_probabilities.nii.gz").get_fdata(), -1, 0)
        expected = monai_probabilities(stacked, net, (16, 16, 16), 0.25, "gaussian", mean, std)
        np.testing.assert_allclose(probabilities, expected, atol=1e-4)
        np.testing.assert_array_equal(nib.load(out).affine, nib.load(tmp_path / f"imagesTs/{case}_0000.nii.gz").affine)


def test_volumes_of_a_4d_nifti_are_selected_as_channels(make_volume, make_model, tmp_path, client):
    channels = [make_volume((30, 26, 20), name=f"c{c}.nii.gz", seed=c)[1] for c in range(3)]
    reference = nib.load(tmp_path / "c0.nii.gz")
    four_d = np.stack(channels, axis=-1)
    nib.save(nib.Nifti1Image(four_d, reference.affine), tmp_path / "three.nii.gz")
    weights, net = make_model(UNET_2CH)
    (result,) = tilemask.run(workflow(str(tmp_path / "three.nii.gz"), weights, tmp_path, bands=[3, 1]), client)
    probabilities = np.moveaxis(nib.load(tmp_path / "out" / "three_probabilities.nii.gz").get_fdata(), -1, 0)
    mean, std = (np.array(v, np.float32)[:, None, None, None] for v in (MEAN, STD))
    expected = monai_probabilities(np.stack([channels[2], channels[0]]), net, (16, 16, 16), 0.25, "gaussian", mean, std)
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)
    with pytest.raises(InputError, match=r"preprocess.bands \[4\] out of range: the file holds 3 volume"):
        tilemask.run(workflow(str(tmp_path / "three.nii.gz"), weights, tmp_path, bands=[4, 1]), client)


def test_a_case_missing_a_channel_or_on_another_grid_is_refused(make_volume, make_model, tmp_path, client):
    weights, _ = make_model(UNET_2CH)
    make_volume((30, 26, 20), name="a_0000.nii.gz")
    patterns = {"channels": ["{case}_0000.nii.gz", "{case}_0001.nii.gz"]}
    with pytest.raises(InputError, match=r"case 'a' has no .*a_0001.nii.gz"):
        tilemask.run(workflow(patterns, weights, tmp_path), client)
    make_volume((30, 26, 21), name="a_0001.nii.gz")
    with pytest.raises(InputError, match="the channels of one case must share a grid"):
        tilemask.run(workflow(patterns, weights, tmp_path), client)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_a_case_whose_file_holds_more_volumes_is_refused_naming_that_file(make_volume, make_model, tmp_path, client):
    """A case whose ``_0001`` is a 4D NIfTI (two volumes) gives one more channel than the network's ``in_channels``,
    or than the cases before it (a network without ``model.args``): the refusal names each file's channel count.
    It named only the case's ``_0000`` file, which holds one volume."""
    weights, net = make_model(UNET_2CH)
    for name in ("a_0000", "a_0001", "b_0000"):
        make_volume((30, 26, 20), name=f"{name}.nii.gz")
    one = nib.load(tmp_path / "b_0000.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([one.get_fdata()] * 2, axis=-1), one.affine), tmp_path / "b_0001.nii.gz")
    patterns = {"channels": ["{case}_0000.nii.gz", "{case}_0001.nii.gz"]}
    with pytest.raises(InputError) as refused:
        tilemask.run(workflow(patterns, weights, tmp_path), client)
    assert str(refused.value) == (f"{tmp_path}/b_0000.nii.gz: model.args.in_channels is 2 but the input gives 3 "
                                  "channels (b_0000.nii.gz 1, b_0001.nii.gz 2)")  # fmt: skip
    torch.jit.trace(net, torch.zeros(1, 2, 16, 16, 16)).save(tmp_path / "traced.pt")
    traced = workflow(patterns, weights, tmp_path).model_dump(exclude_none=True)
    traced["model"], traced["preprocess"] = {"weights": str(tmp_path / "traced.pt")}, {}
    with pytest.raises(InputError) as refused:
        tilemask.run(Workflow.from_dict(traced, base_dir=tmp_path), client)
    assert str(refused.value) == (
        f"{tmp_path}/b_0000.nii.gz: gives 3 channels (b_0000.nii.gz 1, b_0001.nii.gz 2), the first input "
        f"{tmp_path}/a_0000.nii.gz 2 (a_0000.nii.gz 1, a_0001.nii.gz 1); one network takes one channel count"
    )
