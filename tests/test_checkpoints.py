"""The checkpoints users have: training checkpoints, wrapper prefixes, torch.export archives, and a JSON by mistake."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

import tilemask
from tests.conftest import UNET_2D
from tilemask.errors import WeightsError
from tilemask.models import load_model
from tilemask.settings import ModelSpec
from tilemask.workflow import Workflow


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return UNet(**UNET_2D).eval()


def forms(sd: dict) -> dict[str, object]:
    return {
        "model": {"model": sd, "epoch": 7},
        "network": {"network": sd, "optimizer": {"lr": 0.1}},
        "lightning": {
            "state_dict": {f"model.{k}": v for k, v in sd.items()},
            "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0", "hyper_parameters": {"lr": 1e-3},
        },
        "data_parallel": {f"module.{k}": v for k, v in sd.items()},
        "compiled": torch.compile(_fitted(sd)).state_dict(),  # what a torch.compile'd network saves: _orig_mod.
        "nnunet": nnunet_checkpoint(sd, lambda: UNet(**UNET_2D), torch.zeros(1, 3, 32, 32)),
    }  # fmt: skip


def _fitted(sd: dict) -> torch.nn.Module:
    net = UNet(**UNET_2D)
    net.load_state_dict(sd)
    return net


def nnunet_checkpoint(sd: dict, build, example: torch.Tensor, mirroring: tuple[int, ...] | None = (0, 1)) -> dict:
    """What nnU-Net v2's ``nnUNetTrainer.save_checkpoint`` writes (nnunetv2 2.x, ``checkpoint_final.pth``): the
    weights beside the optimizer's state, the logger's numpy floats, the EMA Dice as a numpy float32 and the
    init arguments with a ``torch.device`` (what a real one from nnunetv2 2.8.1 held, read with weights_only=False),
    and the axes its trainer mirrors at inference (a 2D trainer's by default).
    ``build()`` makes a network that ``sd`` fits, trained one step on ``example`` for the optimizer's state."""
    net = build()
    net.load_state_dict(sd)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    net(example).sum().backward()
    optimizer.step()  # momentum buffers in the optimizer's state, as after training
    return {
        "network_weights": sd, "optimizer_state": optimizer.state_dict(), "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float32(0.41), np.float32(0.52)], "ema_fg_dice": [np.float32(0.41), np.float32(0.42)],
                    "dice_per_class_or_region": [[np.float64(0.4), np.float64(0.6)]], "train_losses": [np.float32(-0.3)],
                    "val_losses": [np.float32(-0.2)], "lrs": [0.01], "epoch_start_timestamps": [1.7e9]},
        "_best_ema": np.float32(0.42), "current_epoch": 1000,
        "init_args": {"plans": {"dataset_name": "Dataset001_Toy"}, "configuration": "2d", "fold": "all",
                      "dataset_json": {"labels": {"background": 0, "organ": 1}}, "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": mirroring,
    }  # fmt: skip


@pytest.mark.parametrize("form", ["model", "network", "lightning", "data_parallel", "nnunet", "compiled"])
def test_training_checkpoints_load_the_same_network(net, tmp_path, form):
    path = tmp_path / f"{form}.ckpt"
    torch.save(forms(net.state_dict())[form], path)
    model = load_model(ModelSpec.create("UNet", UNET_2D, str(path)))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)


@pytest.mark.parametrize("dynamic", [True, False])
def test_torch_export_archives_need_no_network_and_take_any_batch(net, tmp_path, dynamic):
    x = torch.randn(3, 3, 64, 64)
    shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic else None
    program = torch.export.export(net, (x,), dynamic_shapes=shapes)
    path = tmp_path / "net.pt2"
    torch.export.save(program, path)
    spec = ModelSpec.create("", {}, str(path))
    assert spec.archive == "exported" and spec.carries_network
    model = load_model(spec)
    for batch in (1, 3, 7):  # fewer, as many and more windows than the archive was exported with
        xb = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(model(xb), net(xb), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # the archive's loading is checked above in the default run; this is the whole run on it
def test_a_pt2_runs_end_to_end_without_model_network(net, make_raster, tmp_path, client):
    path, _ = make_raster(shape=(3, 150, 170))
    program = torch.export.export(net, (torch.zeros(4, 3, 64, 64),))  # static batch 4
    torch.export.save(program, tmp_path / "net.pt2")
    torch.save(net.state_dict(), tmp_path / "net.pt")
    results = []
    for weights, extra in (("net.pt2", {}), ("net.pt", {"network": "UNet", "args": UNET_2D})):
        wf = Workflow.from_dict(
            {
                "version": 1,
                "input": str(path),
                "model": {"weights": str(tmp_path / weights), **extra},
                "preprocess": {"normalize": {"mean": [127.0] * 3, "std": [60.0] * 3}},
                "inference": {"roi_size": [64, 64], "batch_size": 4, "device": "cpu"},
                "output": {"path": f"out/{weights}.zarr", "probabilities": "float32", "chunks": 96},
            },
            base_dir=tmp_path,
        )
        (result,) = tilemask.run(wf, client)
        results.append(np.asarray(tilemask.open_result(result.outputs[0], "probabilities")))
    np.testing.assert_allclose(results[0], results[1], atol=1e-5)


def test_a_state_dict_without_model_network_is_one_line(net, tmp_path):
    torch.save(net.state_dict(), tmp_path / "w.pt")
    with pytest.raises(Exception, match="model.network: needed for"):
        load_model(ModelSpec.create("", {}, str(tmp_path / "w.pt")))


def test_a_json_file_given_as_weights_says_so(tmp_path):
    path = tmp_path / "inference.json"
    path.write_text(json.dumps({"network_def": {"_target_": "UNet"}}))
    with pytest.raises(WeightsError, match="is a JSON file, not weights"):
        load_model(ModelSpec.create("UNet", UNET_2D, str(path)))


class Payload:
    """A pickle that would run code: unpickling it calls ``Path.touch`` on a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_pt2_holding_a_pickle_with_code_is_refused_without_running_it(net, tmp_path):
    import zipfile

    program = torch.export.export(net, (torch.zeros(2, 3, 64, 64),))
    clean = tmp_path / "clean.pt2"
    torch.export.save(program, clean)
    marker = tmp_path / "ran"
    payload = tmp_path / "payload.pt"
    torch.save(Payload(str(marker)), payload)
    crafted = tmp_path / "crafted.pt2"
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(crafted, "w") as dst:
        for name in src.namelist():
            data = payload.read_bytes() if name.endswith("sample_inputs/model.pt") else src.read(name)
            dst.writestr(name, data)
    with pytest.raises(WeightsError, match="holds a pickle that needs code to load"):
        load_model(ModelSpec.create("", {}, str(crafted)))
    assert not marker.exists()
    # a weight its payload config marks use_pickle, stored under its plain name (weight_0): torch.export.load
    # unpickles it with weights_only=False; only members named .pt or .pkl were checked, and the code ran (exit 0)
    for member, edit, refusal in (
        ("weight_0", {"use_pickle": True}, "holds a pickle that needs code to load (clean/data/weights/weight_0)"),
        ("weight_0", {"path_name": "opaque_obj_0"}, "holds an object that needs code to load "
                                                    "(clean/data/weights/opaque_obj_0)"),
    ):  # fmt: skip
        with zipfile.ZipFile(clean) as src, zipfile.ZipFile(crafted, "w") as dst:
            for name in src.namelist():
                data = src.read(name)
                if name.endswith("model_weights_config.json"):
                    config = json.loads(data)
                    first = next(meta for meta in config["config"].values() if meta["path_name"] == member)
                    first.update(edit)
                    data = json.dumps(config).encode()
                elif name.endswith(f"weights/{member}"):
                    data = payload.read_bytes()
                dst.writestr(name, data)
        with pytest.raises(WeightsError, match=re.escape(refusal)):
            load_model(ModelSpec.create("", {}, str(crafted)))
        assert not marker.exists()


class PlansNet(torch.nn.Module):
    """A network built as nnU-Net's dynamic_network_architectures builds theirs: layer classes as arguments."""

    def __init__(self, input_channels, num_classes, conv_op, norm_op, norm_op_kwargs, dropout_op, nonlin, nonlin_kwargs):
        super().__init__()
        self.conv = conv_op(input_channels, 8, 3, padding=1)
        self.norm = norm_op(8, **norm_op_kwargs)
        self.drop = dropout_op() if dropout_op else torch.nn.Identity()
        self.act = nonlin(**nonlin_kwargs)
        self.head = conv_op(8, num_classes, 1)

    def forward(self, x):
        return self.head(self.act(self.drop(self.norm(self.conv(x)))))


def test_nnunet_plans_arch_kwargs_are_built_as_nnunet_builds_them(tmp_path):
    """plans.json's ``arch_kwargs``, given as ``model.args`` with its ``_kw_requires_import`` (layer classes by dotted
    name, which plans.json keeps beside ``arch_kwargs``), build the network nnU-Net's ``get_network_from_plans``
    would; its checkpoint loads into it."""
    architecture = {  # a 3d_fullres configuration's, as nnU-Net v2's ExperimentPlanner writes it
        "network_class_name": f"{__name__}.PlansNet",
        "arch_kwargs": {"conv_op": "torch.nn.modules.conv.Conv3d",
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }  # fmt: skip
    arch_kwargs = {**architecture["arch_kwargs"], "_kw_requires_import": architecture["_kw_requires_import"]}
    build = lambda: PlansNet(1, 3, torch.nn.Conv3d, torch.nn.InstanceNorm3d, {"eps": 1e-05, "affine": True}, None,  # noqa: E731
                             torch.nn.LeakyReLU, {"inplace": True})  # fmt: skip
    torch.manual_seed(0)
    expected = build().eval()
    path = tmp_path / "checkpoint_final.pth"
    torch.save(nnunet_checkpoint(expected.state_dict(), build, torch.zeros(1, 1, 8, 8, 8)), path)
    spec = ModelSpec.create(f"{__name__}:PlansNet", {"input_channels": 1, "num_classes": 3, **arch_kwargs}, str(path))
    model = load_model(spec)
    x = torch.randn(1, 1, 12, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected(x), rtol=0, atol=0)
    wrong = {**arch_kwargs, "nonlin": "torch.nn.NoSuchThing"}
    with pytest.raises(tilemask.errors.WorkflowError, match=r"model.args.nonlin: cannot import 'torch.nn.NoSuchThing'"):
        load_model(ModelSpec.create(f"{__name__}:PlansNet", {"input_channels": 1, "num_classes": 3, **wrong}, str(path)))


def test_arch_kwargs_copied_without_kw_requires_import_name_the_class_names_left_strings(tmp_path, monkeypatch):
    """``arch_kwargs`` copied alone (plans.json lists the arguments to import beside them, not in them) reach the
    network as strings: the refusal names them and ``_kw_requires_import``. It was "'str' object is not callable"."""
    torch.save(PlansNet(1, 3, torch.nn.Conv2d, torch.nn.InstanceNorm2d, {}, None, torch.nn.ReLU, {}).state_dict(),
               tmp_path / "w.pt")  # fmt: skip
    args = {"input_channels": 1, "num_classes": 3, "conv_op": "torch.nn.modules.conv.Conv2d",
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d", "norm_op_kwargs": {}, "dropout_op": None,
            "nonlin": "torch.nn.ReLU", "nonlin_kwargs": {}}  # fmt: skip
    with pytest.raises(tilemask.errors.WorkflowError) as refused:
        load_model(ModelSpec.create(f"{__name__}:PlansNet", args, str(tmp_path / "w.pt")))
    assert str(refused.value) == (
        f"model.args: {__name__}:PlansNet rejects them: 'str' object is not callable (conv_op, nonlin, norm_op are "
        "class names left a string: list them in model.args._kw_requires_import, as plans.json does beside arch_kwargs)"
    )
    assert refused.value.exit_status == 2
    not_classes = {**args, "conv_op": "conv.3d", "norm_op": "torch.nn.NoSuchNorm", "nonlin": "torch.nn.functional.relu"}
    with pytest.raises(tilemask.errors.WorkflowError) as refused:  # no class name among them: the network's own words
        load_model(ModelSpec.create(f"{__name__}:PlansNet", not_classes, str(tmp_path / "w.pt")))
    assert str(refused.value) == f"model.args: {__name__}:PlansNet rejects them: 'str' object is not callable"
    # a value that reads as a dotted name of a module not imported ("weights.pt", say) is not imported to find out
    (tmp_path / "side_effect.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\nclass Net: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(tilemask.errors.WorkflowError):
        load_model(ModelSpec.create(f"{__name__}:PlansNet", {**args, "nonlin": "side_effect.Net"},
                                    str(tmp_path / "w.pt")))
    assert not (tmp_path / "imported").exists()
    listed = {**args, "_kw_requires_import": ["conv_op", "norm_op", "nonlin"]}
    load_model(ModelSpec.create(f"{__name__}:PlansNet", listed, str(tmp_path / "w.pt")))


NETWORK_MODULES = {
    "raises_on_import": ("raise RuntimeError('needs a licence server')", "raises_on_import:Net",
                         "importing raises_on_import raises RuntimeError: needs a licence server"),
    "builds_with_a_missing_package": (
        "import torch\n\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        import tilemask_absent_package  # noqa: F401\n",
        "builds_with_a_missing_package:Net",
        "building it raises ModuleNotFoundError: No module named 'tilemask_absent_package'",
    ),
    "absent": ("", "tilemask_absent_package.nets:Net", "importing tilemask_absent_package.nets raises "
               "ModuleNotFoundError: No module named 'tilemask_absent_package'"),
}  # fmt: skip


@pytest.mark.parametrize("case", NETWORK_MODULES)
def test_a_network_module_that_fails_to_import_or_build_is_a_workflow_error_naming_it(
    net, tmp_path, monkeypatch, case
):
    """A network whose module raises as it is imported, or that imports a package that is not installed, is
    refused as a workflow error (exit 2, before any work) naming the module and its error; it was a bare
    ``RuntimeError`` / ``ModuleNotFoundError`` from the worker, exit 1, that did not say which setting it came from."""
    source, network, message = NETWORK_MODULES[case]
    (tmp_path / f"{case}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save(net.state_dict(), tmp_path / "w.pt")
    with pytest.raises(tilemask.errors.WorkflowError) as refused:
        load_model(ModelSpec.create(network, {}, str(tmp_path / "w.pt")))
    assert str(refused.value) == f"model.network: {network}: {message}"
    assert refused.value.exit_status == 2


def test_a_state_dict_nested_deeper_than_the_keys_read_is_refused_naming_where_it_is(net, tmp_path):
    """A training checkpoint with its state_dict one level deeper than the keys tilemask reads was refused as
    "holds no state_dict of tensors", which it does; the refusal now says where (the largest dict of tensors:
    the weights, not an optimizer's per-parameter state)."""
    nested = nnunet_checkpoint(net.state_dict(), lambda: UNet(**UNET_2D), torch.zeros(1, 3, 32, 32))
    nested["checkpoint"] = {"state_dict": nested.pop("network_weights"), "epoch": 3}
    path = tmp_path / "nested.ckpt"
    torch.save(nested, path)
    with pytest.raises(WeightsError) as refused:
        load_model(ModelSpec.create("UNet", UNET_2D, str(path)))
    assert str(refused.value) == (
        f"model.weights: {path} has its tensors under 'checkpoint' > 'state_dict' ({len(net.state_dict())} of them), "
        "where tilemask does not look (the file itself, or state_dict, model, network, model_state_dict, "
        "network_weights, net): save that dict on its own"
    )
    assert refused.value.exit_status == 2


def _newer_schema(data: bytes) -> bytes:
    program = json.loads(data)
    program["schema_version"] = {"major": program["schema_version"]["major"] + 1, "minor": 0}
    return json.dumps(program).encode()


@pytest.mark.parametrize(
    "member, edit, refusal",
    [
        ("models/model.json", _newer_schema, r"is not a loadable torch.export archive: Serialized schema version "
                                             r"SchemaVersion\(major=\d+, minor=0\) does not match our current"),
        ("sample_inputs/model.pt", lambda data: b"junk", r"is not a loadable torch.export archive: its "
                                                         r"\w+/data/sample_inputs/model.pt is damaged \(error: unpack"),
    ],
)  # fmt: skip
def test_a_pt2_of_another_schema_or_with_a_damaged_member_says_why(net, tmp_path, member, edit, refusal):
    """torch.export.load logs why it cannot read an archive (a program saved by a newer torch) and raises "Please
    check the warnings above", which the command line's one line showed with no warning above it; a damaged
    sample input failed as 'error: unpack requires a buffer of 4 bytes' (exit 1)."""
    import zipfile

    clean = tmp_path / "clean.pt2"
    torch.export.save(torch.export.export(net, (torch.zeros(2, 3, 64, 64),)), clean)
    edited = tmp_path / "net.pt2"
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(edited, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, edit(src.read(name)) if name.endswith(member) else src.read(name))
    with pytest.raises(WeightsError, match=refusal) as refused:
        load_model(ModelSpec.create("", {}, str(edited)))
    assert refused.value.exit_status == 2


def _saved(net: torch.nn.Module, kind: str, path):
    """``net`` saved at ``path`` as a ``state_dict``, a TorchScript archive or a torch.export archive."""
    if kind == "state_dict":
        torch.save(net.state_dict(), path)
    elif kind == "torchscript":
        torch.jit.script(net).save(path)
    else:
        torch.export.save(torch.export.export(net, (torch.zeros(2, 3, 64, 64),)), path)
    return path


def _flip_bytes_of(path, member: str) -> None:
    """Invert the first 16 bytes of ``member``'s data in place, as bit rot or a bad copy would: the zip's
    directory and the member's recorded CRC-32 stay as they were."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        offset = archive.getinfo(member).header_offset
    with open(path, "r+b") as f:
        f.seek(offset + 26)
        start = offset + 30 + sum(int.from_bytes(f.read(2), "little") for _ in range(2))  # name and extra lengths
        f.seek(start)
        data = bytes(b ^ 0xFF for b in f.read(16))
        f.seek(start)
        f.write(data)


@pytest.mark.parametrize("kind, part", [("state_dict", "/data/"), ("torchscript", "/data/"), ("exported", "/data/"),
                                        ("torchscript", "/code/__torch__/monai/networks/nets/unet.py")])  # fmt: skip
def test_weights_whose_bytes_changed_after_saving_are_refused_naming_the_member(net, tmp_path, kind, part):
    """torch reads none of the CRC-32s its archives carry: a state_dict, a TorchScript and a torch.export archive
    with 16 bytes of one tensor changed loaded, and predicted with other weights, without a word.  A deflated
    member changed so (TorchScript's code) fails to inflate: zipfile's own testzip let that zlib.error through."""
    import zipfile

    path = _saved(net, kind, tmp_path / "net.weights")
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size if part in info.filename else 0).filename
    _flip_bytes_of(path, member)
    spec = ModelSpec.create("UNet", UNET_2D, str(path))
    assert spec.archive == kind
    with pytest.raises(WeightsError) as refused:
        load_model(spec)
    assert str(refused.value) == (f"model.weights: {path} is damaged: its member {member} does not read back as "
                                  "saved (its CRC-32 or its compression is wrong: the file changed after it was "
                                  "saved)")  # fmt: skip


def test_a_torchscript_archive_missing_its_code_is_refused_on_one_line(net, tmp_path):
    """torch.jit.load's message for an archive without the code of its network starts with a line break: the
    command line's one line was 'model.weights: X is not a loadable TorchScript archive: ' and nothing after."""
    import zipfile

    whole = tmp_path / "whole.ts"
    torch.jit.script(net).save(whole)
    path = tmp_path / "net.ts"
    with zipfile.ZipFile(whole) as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            if "code/__torch__/monai/networks/nets/unet" not in name:  # unet.py, or unet/___torch_mangle_N.py in a
                dst.writestr(name, src.read(name))
    with pytest.raises(WeightsError) as refused:  # process that scripted another UNet before
        load_model(ModelSpec.create("", {}, str(path)))
    assert re.fullmatch(rf"model.weights: {re.escape(str(path))} is not a loadable TorchScript archive: Unknown type "
                        r"name '__torch__\.monai\.networks\.nets\.[\w.]+':", str(refused.value)), str(refused.value)


@pytest.mark.parametrize("kind", ["state_dict", "torchscript", "exported"])
def test_weights_holding_nan_are_refused_naming_the_tensor(net, tmp_path, kind):
    """One NaN weight (training that diverged) makes every output NaN, which the argmax takes as class 0: such a
    state_dict ran to a scene of background only, exit 0."""
    import copy

    diverged = copy.deepcopy(net)
    with torch.no_grad():
        diverged.model[1].submodule[0].conv.unit0.conv.weight[0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        assert torch.isnan(diverged(torch.randn(1, 3, 64, 64))).all()
    path = _saved(diverged, kind, tmp_path / "net.weights")
    with pytest.raises(WeightsError, match=rf"^model.weights: {path} holds NaN in \S*model.1.submodule.0.conv.unit0"
                                           r".conv.weight: the network would answer NaN$"):  # fmt: skip
        load_model(ModelSpec.create("UNet", UNET_2D, str(path)))


def test_a_zip_torch_did_not_write_is_named_so_not_by_torchs_internals(tmp_path):
    """A zip of other files given as weights (a Model Zoo download) was refused with torch's internals: '[enforce
    fail at inline_container.cc:180] . file in archive is not in a subdirectory: metadata.json'."""
    import zipfile

    path = tmp_path / "spleen_ct_segmentation.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", "{}")
        archive.writestr("configs/inference.json", "{}")
    with pytest.raises(WeightsError) as refused:
        load_model(ModelSpec.create("UNet", UNET_2D, str(path)))
    assert str(refused.value) == (f"model.weights: {path} is not a torch checkpoint (neither a state_dict archive "
                                  "nor TorchScript): a zip archive that torch did not write (it has no data.pkl)")
