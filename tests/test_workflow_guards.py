"""Hostile or mistaken inputs refused before they cost anything: YAML alias bombs, booleans where numbers
belong, zip-bomb checkpoints, and weights that are not what they claim (random bytes, code, whole models)."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest
import yaml

from tilemask import Workflow
from tilemask.errors import WeightsError, WorkflowError
from tilemask.models import ModelSpec, load_model

from .conftest import UNET_2D, raster_workflow, run_cli

NOT_A_CHECKPOINT = "is not a torch checkpoint (neither a state_dict archive nor TorchScript)"


def assert_one_line_error(proc, status, *words):
    assert proc.returncode == status, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tilemask: error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


# -- 1. YAML alias bombs --------------------------------------------------------------------------


def alias_bomb(levels: int, width: int = 10) -> str:
    """A "billion laughs": each level a list of ``width`` aliases of the one below; width**levels values."""
    lines = ["version: 1", "a0: &a0 [" + ", ".join(['"lol lol lol lol lol lol"'] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


# Run in a child with its address space capped, so that code without the guard fails with a MemoryError
# instead of taking minutes and gigabytes of the machine; it reports time and resident-memory growth.
_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    from tilemask import Workflow
    from tilemask.errors import WorkflowError
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, peak so far
    before, start = rss(), time.perf_counter()
    try:
        Workflow.from_yaml(sys.argv[1])
        outcome = "loaded"
    except WorkflowError as exc:
        outcome = "WorkflowError: " + str(exc)
    except MemoryError:
        outcome = "MemoryError"
    print(json.dumps({"outcome": outcome, "seconds": time.perf_counter() - start, "rss_growth_kib": rss() - before}))
    """
)


@pytest.mark.timeout(90)
def test_a_billion_laughs_is_refused_at_once_in_little_memory(tmp_path):
    bomb = tmp_path / "laughs.yaml"
    bomb.write_text(alias_bomb(9))  # 10**9 values from 0.8 kB
    assert bomb.stat().st_size < 1600
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
    proc = subprocess.run(
        [sys.executable, "-c", limit + _CHILD, str(bomb)], capture_output=True, text=True, timeout=80
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["outcome"].startswith("WorkflowError: "), report
    message = report["outcome"].removeprefix("WorkflowError: ")
    assert "\n" not in message and "laughs.yaml" in message and "aliases" in message, message
    assert report["seconds"] < 2.0, report
    assert report["rss_growth_kib"] < 50 * 1024, report


@pytest.mark.timeout(120)
def test_an_alias_bomb_exits_2_with_one_line(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb(6))  # 10**6 values: enough to refuse, small enough not to hurt unguarded code
    assert_one_line_error(run_cli("run", bomb, timeout=100), 2, "bomb.yaml", "aliases", "refused")


@pytest.mark.timeout(60)
def test_an_alias_bomb_in_a_set_value_is_refused(tmp_path):
    flow = "[" + ", ".join(f"&b{i} [" + ", ".join([f"*b{i - 1}" if i else "x"] * 10) + "]" for i in range(8)) + "]"
    workflow = raster_workflow(tmp_path / "scene.tif", tmp_path / "weights.pt")
    start = time.perf_counter()
    with pytest.raises(WorkflowError, match=r"^overrides model\.args: YAML aliases expand"):
        Workflow.from_dict(workflow, [f"model.args={{bomb: {flow}}}"])
    assert time.perf_counter() - start < 2.0


@pytest.mark.timeout(60)
def test_a_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("version: 1\ninput: &loop [a.tif, *loop]\n")
    with pytest.raises(WorkflowError, match=r"loop\.yaml: a YAML alias refers to a collection that holds it"):
        Workflow.from_yaml(path)


@pytest.mark.timeout(60)
def test_small_anchors_aliases_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text(
        textwrap.dedent(
            """
            version: 1
            input: scene.tif
            model:
              network: UNet
              args: {spatial_dims: 2, in_channels: 3, out_channels: 3, channels: &ch [8, 16, 32], strides: [2, 2]}
              weights: weights.pt
            preprocess:
              normalize: {mean: &three [1, 2.5, 3], std: *three}
            inference: {<<: {roi_size: &roi [64, 64], overlap: 0.5}, overlap: 0, sigma_scale: 1}
            output: {path: "out/{stem}.zarr", chunks: *roi}
            """
        )
    )
    workflow = Workflow.from_yaml(path)
    assert workflow.model.args["channels"] == [8, 16, 32]
    assert workflow.preprocess.normalize.std == [1.0, 2.5, 3.0]
    assert workflow.inference.roi_size == [64, 64] and workflow.output.chunks == [64, 64]
    assert workflow.inference.overlap == 0.0 and workflow.inference.sigma_scale == 1.0


# -- 2. booleans where numbers belong --------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "override,key,got",
    [
        ("output.chunks=true", "output.chunks", True),
        ("output.chunks=[64, false]", "output.chunks.1", False),
        ("inference.roi_size=[true, 64]", "inference.roi_size.0", True),
        ("inference.overlap=false", "inference.overlap", False),
        ("inference.overlap=[0.25, true]", "inference.overlap.1", True),
        ("inference.sigma_scale=true", "inference.sigma_scale", True),
        ("inference.batch_size=true", "inference.batch_size", True),
        ("inference.threshold=true", "inference.threshold", True),
        ("preprocess.normalize.mean=[1, 2, true]", "preprocess.normalize.mean.2", True),
        ("preprocess.normalize.std=[false, 1, 1]", "preprocess.normalize.std.0", False),
        ("preprocess.bands=[true, 2, 3]", "preprocess.bands.0", True),
        ("postprocess.remove_small=true", "postprocess.remove_small", True),
        ("postprocess.opening=true", "postprocess.opening", True),
        ("postprocess.closing=false", "postprocess.closing", False),
        ("version=true", "version", True),
    ],
)
def test_a_boolean_is_no_number(tmp_path, override, key, got):
    workflow = raster_workflow(tmp_path / "scene.tif", tmp_path / "weights.pt")
    with pytest.raises(WorkflowError) as caught:
        Workflow.from_dict(workflow, [override])
    assert str(caught.value) == f"workflow: {key}: expected a number, not a boolean (got {got})"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "override,key",
    [
        ("preprocess.normalize.mean=[.nan, 1, 1]", "preprocess.normalize.mean.0"),
        ("preprocess.normalize.std=[1, .inf, 1]", "preprocess.normalize.std.1"),
        ("preprocess.intensity={a_min: 0, a_max: .inf}", "preprocess.intensity.a_max"),
        ("inference.sigma_scale=.inf", "inference.sigma_scale"),
    ],
)
def test_a_number_that_is_not_finite_is_refused(tmp_path, override, key):
    """YAML's ``.nan`` and ``.inf`` were taken: a NaN mean or std made every window NaN for the network."""
    workflow = raster_workflow(tmp_path / "scene.tif", tmp_path / "weights.pt")
    with pytest.raises(WorkflowError, match=rf"^workflow: {re.escape(key)}: Input should be a finite number"):
        Workflow.from_dict(workflow, [override])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value, got", [("all", " (got 'all')"), ("Any", " (got 'Any')"), ("2", " (got 2)"),
                                        ("[any]", " (got ['any'])"), ("null", "")])  # fmt: skip
def test_a_wrong_normalize_nonzero_names_its_three_values(tmp_path, value, got):
    """``nonzero`` is true, false or any: a wrong value was refused once per member of its type, naming neither
    ``any`` nor the key itself (``preprocess.normalize.nonzero.bool: Input should be a valid boolean ... (and 1
    more, at preprocess)``)."""
    workflow = raster_workflow(tmp_path / "scene.tif", tmp_path / "weights.pt")
    with pytest.raises(WorkflowError) as caught:
        Workflow.from_dict(workflow, [f"preprocess.normalize={{mode: zscore, nonzero: {value}}}"])
    assert str(caught.value) == ("workflow: preprocess.normalize.nonzero: true (each channel's nonzero voxels, "
                                 f"MONAI's), false, or any (the voxels nonzero in some channel, nnU-Net's){got}")
    for given, taken in (("any", "any"), ("true", True), ("false", False), ("1", True)):  # 1: pydantic's lax bool
        normalize = Workflow.from_dict(workflow, [f"preprocess.normalize={{mode: zscore, nonzero: {given}}}"])
        assert normalize.preprocess.normalize.nonzero == taken


@pytest.mark.timeout(60)
def test_set_chunks_true_exits_2(write_workflow, tmp_path):
    workflow = raster_workflow(tmp_path / "missing.tif", tmp_path / "missing.pt")  # nothing could run anyway
    proc = run_cli("run", write_workflow(workflow), "--set", "output.chunks=true", timeout=50)
    assert_one_line_error(proc, 2, "workflow: output.chunks: expected a number, not a boolean (got True)")


@pytest.mark.timeout(60)
def test_numbers_still_take_ints_and_floats(write_workflow, tmp_path):
    workflow = raster_workflow(
        tmp_path / "scene.tif", tmp_path / "weights.pt", {**UNET_2D, "out_channels": 1},
        inference={"overlap": 0, "sigma_scale": [1, 0.5], "threshold": 0.3, "activation": "sigmoid", "batch_size": 2},
        output={"chunks": [64, 128]},
        postprocess={"remove_small": 5, "fill_holes": True},
    )
    workflow["preprocess"]["normalize"] = {"mean": [1, 2, 3], "std": [0.5, 1, 2]}
    loaded = Workflow.from_yaml(write_workflow(workflow), ["inference.roi_size=[32, 32]", "output.quicklook=false"])
    assert loaded.inference.overlap == 0.0 and loaded.inference.sigma_scale == [1.0, 0.5]
    assert loaded.output.chunks == [64, 128] and loaded.inference.roi_size == [32, 32]
    assert loaded.preprocess.normalize.mean == [1.0, 2.0, 3.0] and loaded.postprocess.remove_small == 5
    assert loaded.postprocess.fill_holes is True and loaded.output.quicklook is False


def test_a_threshold_beside_softmax_is_refused(tmp_path):
    """inference.threshold is a sigmoid's (DESIGN: 'sigmoid only'); given beside softmax it was left unused, the
    labels those of the largest output, exit 0 (a reviewer's). 0.5, the default, is what a job's workflow.yaml
    holds for every workflow."""
    workflow = raster_workflow(tmp_path / "scene.tif", tmp_path / "weights.pt", inference={"threshold": 0.3})
    with pytest.raises(WorkflowError, match="threshold 0.3 applies to activation: sigmoid; softmax labels each pixel"):
        Workflow.from_dict(workflow)
    workflow["inference"]["threshold"] = 0.5
    assert Workflow.from_dict(workflow).inference.threshold == 0.5
    workflow["inference"].update(threshold=0.3, activation="sigmoid")
    workflow["model"]["args"] = {**UNET_2D, "out_channels": 1}
    assert Workflow.from_dict(workflow).inference.threshold == 0.3


# -- 3. zip-bomb checkpoints ----------------------------------------------------------------------


def inflate_member(archive, member_suffix, size, out):
    """Copy a torch archive with one member replaced by ``size`` bytes of zeros, deflated (written streaming)."""
    with zipfile.ZipFile(archive) as zin, zipfile.ZipFile(out, "w", compresslevel=1) as zout:
        replaced = False
        for info in zin.infolist():
            if not replaced and info.filename.endswith(member_suffix):
                member = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                member.compress_type = zipfile.ZIP_DEFLATED
                with zout.open(member, "w", force_zip64=True) as f:
                    chunk = bytes(1 << 20)
                    for _ in range(size >> 20):
                        f.write(chunk)
                replaced = True
            else:
                zout.writestr(info, zin.read(info.filename))
    assert replaced
    return out


@pytest.mark.timeout(60)
def test_a_zip_bomb_state_dict_is_refused_before_loading(make_model, tmp_path):
    weights, _ = make_model()
    bomb = inflate_member(weights, "/data/0", 512 << 20, tmp_path / "bomb.pt")
    assert bomb.stat().st_size < 2 << 20
    start = time.perf_counter()
    with pytest.raises(WeightsError, match=r"bomb\.pt would unpack to 512 MiB from 0\.\d MiB on disk; refused"):
        load_model(ModelSpec.create("UNet", UNET_2D, str(bomb)))
    assert time.perf_counter() - start < 1.0
    load_model(ModelSpec.create("UNet", UNET_2D, str(weights)))  # the genuine archive passes the guard


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_zip_bomb_torchscript_is_refused_before_loading(make_model, tmp_path):
    import torch

    _, net = make_model()
    script = tmp_path / "scripted.pt"
    torch.jit.script(net).save(str(script))
    bomb = inflate_member(script, "/data/0", 512 << 20, tmp_path / "scripted_bomb.pt")
    spec = ModelSpec.create("UNet", UNET_2D, str(bomb))
    assert spec.archive == "torchscript"
    start = time.perf_counter()
    with pytest.raises(WeightsError, match=r"scripted_bomb\.pt would unpack to 512 MiB"):
        load_model(spec)
    assert time.perf_counter() - start < 1.0
    load_model(ModelSpec.create("UNet", UNET_2D, str(script)))  # its deflated code/ folder is fine


# -- 4, 5. weights that are not a state_dict ----------------------------------------------------------


@pytest.mark.timeout(60)
def test_random_bytes_are_not_called_a_pickle(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(random.Random(0).randbytes(64 << 10))
    with pytest.raises(WeightsError) as caught:
        load_model(ModelSpec.create("UNet", UNET_2D, str(path)))
    assert str(caught.value) == f"model.weights: {path} {NOT_A_CHECKPOINT}"


@pytest.mark.parametrize("kind", ["zeros", "cut short"])
def test_unreadable_weights_say_what_the_file_is_not_torchs_advice(make_model, tmp_path, kind):
    """torch's message for 1000 zero bytes advised ``weights_only=False`` (which runs a file's code), and a
    checkpoint cut short was ``[Errno 22] Invalid argument`` (a first-contact review)."""
    weights, _ = make_model()
    path = tmp_path / "model.pt"
    path.write_bytes(bytes(1000) if kind == "zeros" else weights.read_bytes()[:5000])
    with pytest.raises(WeightsError) as caught:
        load_model(ModelSpec.create("UNet", UNET_2D, str(path)))
    said = "1000 bytes in no format torch reads" if kind == "zeros" else "a zip archive cut short or damaged (5000 bytes)"
    assert str(caught.value) == f"model.weights: {path} {NOT_A_CHECKPOINT}: {said}"


class _Exploit:
    """Would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["torch.save", "pickle protocol 0", "pickle protocol 2", "pickle default"])
def test_a_pickle_with_code_is_named_refused_and_never_run(tmp_path, kind):
    import torch

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if kind == "torch.save":
        torch.save({"weight": _Exploit(marker)}, path, pickle_protocol=2)
    else:
        protocol = {"pickle protocol 0": 0, "pickle protocol 2": 2, "pickle default": None}[kind]
        path.write_bytes(pickle.dumps({"weight": _Exploit(marker)}, protocol=protocol))
    with pytest.raises(WeightsError) as caught:
        load_model(ModelSpec.create("UNet", UNET_2D, str(path)))
    message = str(caught.value)
    assert "evil.pt is a pickle that needs code to load (it imports " in message and "system); refused" in message
    assert NOT_A_CHECKPOINT not in message
    assert not marker.exists(), "the pickle's code ran"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("which", ["workflow network", "torch layers"])
def test_a_whole_pickled_model_gets_its_own_message(make_model, tmp_path, which):
    import torch

    _, net = make_model()
    if which == "torch layers":
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1))
    path = tmp_path / "model.pt"
    torch.save(net, path)
    with pytest.raises(WeightsError) as caught:
        load_model(ModelSpec.create("UNet", UNET_2D, str(path)))
    message = str(caught.value)
    assert "model.pt is a whole pickled model (torch.save(model))" in message, message
    assert "refused" in message and "state_dict()" in message and "TorchScript" in message


@pytest.mark.parametrize(
    "rename,line",
    [
        (("model", "modle"), "workflow: modle: unknown key; did you mean 'model'?"),
        (("postprocess", "postproces"), "workflow: postproces: unknown key; did you mean 'postprocess'?"),
        (("model.weights", "model.weigths"), "workflow: model.weigths: unknown key; did you mean 'weights'?"),
        (("inference.overlap", "inference.overlapp"), "workflow: inference.overlapp: unknown key; did you mean 'overlap'?"),
        (("output.quicklook", "output.quiklook"), "workflow: output.quiklook: unknown key; did you mean 'quicklook'?"),
    ],
)
def test_a_misspelt_key_is_named_with_the_key_it_likely_meant(rename, line):
    """A typo in a required key is an unknown key and a missing one: the unknown one is named, with the closest
    key missing beside it (or section), not 'missing key model (and 1 more)'."""
    workflow = {"version": 1, "input": "x.tif", "model": {"weights": "w.pt"}, "postprocess": {},
                "inference": {"roi_size": [64, 64], "overlap": 0.5}, "output": {"path": "o.tif", "quicklook": False}}
    (old, new) = rename
    *parent, leaf = old.split(".")
    section = workflow if not parent else workflow[parent[0]]
    section[new.split(".")[-1]] = section.pop(leaf)
    with pytest.raises(WorkflowError) as refused:
        Workflow.from_dict(workflow)
    assert str(refused.value).startswith(line), str(refused.value)


def test_the_errors_beside_the_first_are_named_by_their_section():
    """A workflow without model and inference said "model: missing key (and 1 more)", naming no other: the user
    mended one to meet the next. The others are named by their top-level key."""
    with pytest.raises(WorkflowError) as refused:
        Workflow.from_dict({"version": 1, "input": "x.nii.gz", "output": {"path": "o.nii.gz"}})
    assert str(refused.value) == "workflow: model: missing key (and 1 more, at inference)"
    with pytest.raises(WorkflowError) as refused:
        Workflow.from_dict({"version": 1, "input": "x.tif", "model": {"weights": "w.pt", "network": "UNet"},
                            "inference": {"roi_size": "big", "overlap": 2}, "output": {"path": 3},
                            "classes": 4, "postprocess": 5})  # fmt: skip
    assert re.search(r" \(and 3 more, at [a-z, ]+\)$", str(refused.value)), str(refused.value)


def test_a_key_already_given_is_not_what_a_misspelt_one_meant():
    workflow = {"version": 1, "input": "x.tif", "model": {"weights": "w.pt"}, "output": {"path": "o.tif"},
                "inference": {"roi_size": [64, 64], "overlap": 0.5, "overlapp": 0.25}}  # fmt: skip
    with pytest.raises(WorkflowError) as refused:
        Workflow.from_dict(workflow)
    assert str(refused.value) == "workflow: inference.overlapp: unknown key", str(refused.value)


@pytest.mark.parametrize("override, line", [
    ("inference.overlapp=0.5", "workflow: inference.overlapp: unknown key; did you mean 'overlap'?"),
    ("outptu.path=x.tif", "workflow: outptu: unknown key; did you mean 'output'?"),
])  # fmt: skip
def test_a_key_misspelt_in_set_is_named_with_the_given_key_it_meant(override, line):
    """``--set`` overrides a key the workflow gives: its misspelling got no hint, as a YAML's second key does not."""
    workflow = {"version": 1, "input": "x.tif", "model": {"weights": "w.pt"}, "output": {"path": "o.tif"},
                "inference": {"roi_size": [64, 64], "overlap": 0.25}}  # fmt: skip
    with pytest.raises(WorkflowError) as refused:
        Workflow.from_dict(workflow, [override])
    assert str(refused.value).startswith(line), str(refused.value)


@pytest.mark.parametrize(
    "given,line",
    [
        ({"lists": "scenes.txt"}, "workflow: input.lists: unknown key; did you mean 'list'?"),
        ({"archive": "a.zip", "member": "*.tif"}, "workflow: input.member: unknown key; did you mean 'members'?"),
        ({"list": 5}, "workflow: input.list: Input should be a valid string (got 5)"),
        ({"stac": "items.json"}, "workflow: input.assets: missing key"),
        ({"list": "a.txt", "archive": "b.zip"}, "workflow: input.archive: not a key of the same kind of input as"),
    ],
)
def test_a_wrong_input_mapping_is_named_by_the_kind_it_fits_best(given, line):
    """``input`` takes a path, a list, or one of four kinds of mapping: the error of the kind the mapping fits
    best, not that of a path ('Input should be a valid string' for ``{lists: ...}``)."""
    workflow = {"version": 1, "input": given, "model": {"weights": "w.pt"},
                "inference": {"roi_size": [64, 64]}, "output": {"path": "o.tif"}}  # fmt: skip
    with pytest.raises(WorkflowError) as refused:
        Workflow.from_dict(workflow)
    assert str(refused.value).startswith(line), str(refused.value)


@pytest.mark.parametrize(
    "given, line",
    [
        ({"input": ""}, "workflow: input: String should have at least 1 character (got '')"),
        ({"input": ["a.tif", ""]}, "workflow: input.1: String should have at least 1 character (got '')"),
        ({"preprocess": {"bands": []}}, "workflow: preprocess.bands: List should have at least 1 item"),
    ],
)
def test_an_empty_input_or_band_list_is_refused_not_taken_for_all(given, line):
    """A review's: ``input: ""`` was the workflow's own folder ("a folder with no DICOM file ..."), and
    ``preprocess.bands: []`` every band, as if it was not given."""
    workflow = {"version": 1, "input": "a.tif", "model": {"weights": "w.pt"},
                "inference": {"roi_size": [64, 64]}, "output": {"path": "o.tif"}, **given}  # fmt: skip
    with pytest.raises(WorkflowError) as refused:
        Workflow.from_dict(workflow)
    assert str(refused.value).startswith(line), str(refused.value)


def test_an_empty_preprocess_section_is_its_defaults_as_an_empty_postprocess_is_none():
    """``preprocess:`` with its keys commented out was refused ("Input should be a valid dictionary or instance of
    Preprocess"), where an empty ``postprocess:`` or ``stats:`` ran."""
    text = "version: 1\ninput: a.tif\nmodel: {weights: w.pt}\ninference: {roi_size: [64, 64]}\noutput: {path: o.tif}\n"
    empty = {section: Workflow.from_dict(yaml.safe_load(f"{text}{section}:\n  # mean: [0]\n"))
             for section in ("preprocess", "postprocess", "stats")}  # fmt: skip
    assert empty["preprocess"].preprocess == Workflow.from_dict(yaml.safe_load(text)).preprocess
    assert empty["postprocess"].postprocess is None and empty["stats"].stats is None


def test_a_sigmoid_networks_classes_are_background_and_foreground_unless_named(tmp_path):
    """The README says so; unnamed, they were class_0 and class_1 in the COG, the tables and the summary."""
    from tilemask.planning import classes_of

    workflow = raster_workflow("scene.tif", tmp_path / "w.pt")
    workflow["inference"]["activation"] = "sigmoid"
    workflow["model"]["args"] = {**workflow["model"]["args"], "out_channels": 1}
    workflow.pop("classes", None)
    assert classes_of(Workflow.from_dict(workflow, base_dir=tmp_path), 1) == (2, ("background", "foreground"))
    named = Workflow.from_dict({**workflow, "classes": ["land", "water"]}, base_dir=tmp_path)
    assert classes_of(named, 1) == (2, ("land", "water"))
    softmax = {**workflow, "inference": {**workflow["inference"], "activation": "softmax"},
               "model": {**workflow["model"], "args": {**workflow["model"]["args"], "out_channels": 3}}}
    assert classes_of(Workflow.from_dict(softmax, base_dir=tmp_path), 3)[1] == ("class_0", "class_1", "class_2")


@pytest.mark.parametrize("activation", ["softmax", "none"])
def test_a_one_channel_network_but_under_sigmoid_is_refused(tmp_path, activation):
    """softmax over one channel is 1 everywhere, and the argmax of one raw channel 0: every pixel was written class
    0 (background), exit 0. A one-channel network is a binary one: refused before any work, declared or found by
    the probe."""
    from tilemask.planning import classes_of

    workflow = raster_workflow("scene.tif", tmp_path / "w.pt")
    workflow.pop("classes", None)
    workflow["inference"]["activation"] = activation
    declared = {**workflow, "model": {**workflow["model"], "args": {**workflow["model"]["args"], "out_channels": 1}}}
    why = f"inference.activation {activation} of a one-channel network labels every pixel class 0"
    with pytest.raises(WorkflowError, match=re.escape(why)):
        Workflow.from_dict(declared, base_dir=tmp_path)
    found = {**workflow, "model": {**workflow["model"], "args": {k: v for k, v in workflow["model"]["args"].items()
                                                                  if k != "out_channels"}}}  # fmt: skip
    with pytest.raises(WorkflowError, match=re.escape(why)):
        classes_of(Workflow.from_dict(found, base_dir=tmp_path), 1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("raw", [None, [], ["version: 1"], "workflow.yaml"])
def test_a_workflow_that_is_no_mapping_is_refused_in_one_line_from_python(raw):
    """``Workflow.from_dict(yaml.safe_load(open(path)))`` of an empty file gives None: it failed with
    ``AttributeError: 'NoneType' object has no attribute 'get'`` (exit 1 from the CLI's catch-all), where
    ``from_yaml`` of the same file says what is wrong."""
    with pytest.raises(WorkflowError) as refused:
        Workflow.from_dict(raw)
    assert str(refused.value) == f"workflow: expected a mapping of keys, got {type(raw).__name__}", str(refused.value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "stats,key",
    [({"output": "out/{name}_stats.csv"}, "stats.output"), ({"output": "out/{}.csv"}, "stats.output"),
     ({"output": "out/{stem}.csv", "regions": "regions_{region}.gpkg"}, "stats.regions")],
)  # fmt: skip
def test_a_stats_path_with_another_placeholder_than_stem_is_refused_with_the_workflow(tmp_path, stats, key):
    """As output.path and output.vectors are: the ``{name}`` of a statistics table failed as the run planned its
    first input, ``KeyError: 'name'`` (exit 1, no key named)."""
    workflow = raster_workflow("scene.tif", tmp_path / "w.pt", stats=stats)
    with pytest.raises(WorkflowError) as refused:
        Workflow.from_dict(workflow, base_dir=tmp_path)
    assert str(refused.value).startswith(f"workflow: {key}: the only placeholder"), str(refused.value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("field", ["{stem.upper}", "{stem[0]}", "{stem!r}", "{stem:>9}"])
def test_stem_is_the_placeholder_as_written_not_a_format_field_of_it(tmp_path, field):
    """``{stem.upper}`` passed as ``{stem}`` and named the labels ``<built-in method upper of str object at
    0x7f...>_mask.tif``, a name the job's next run (another process, another address) no longer finds."""
    workflow = raster_workflow("scene.tif", tmp_path / "w.pt", output={"path": f"out/{field}_mask.tif"})
    with pytest.raises(WorkflowError) as refused:
        Workflow.from_dict(workflow, base_dir=tmp_path)
    assert str(refused.value).startswith("workflow: output.path: the only placeholder"), str(refused.value)


@pytest.mark.timeout(60)
def test_a_key_given_twice_in_a_workflow_file_is_refused_with_both_lines(tmp_path):
    """YAML keys are unique; PyYAML kept the last of two without a word, so a workflow edited by adding
    ``overlap: 0.5`` below the ``overlap: 0.25`` already there ran with whichever came last."""
    path = tmp_path / "twice.yaml"
    path.write_text(
        textwrap.dedent(
            """
            version: 1
            input: scene.tif
            model: {network: UNet, weights: weights.pt}
            inference:
              roi_size: [64, 64]
              overlap: 0.25
              batch_size: 4
              overlap: 0.5
            output: {path: "out/{stem}.zarr"}
            """
        )
    )
    with pytest.raises(WorkflowError) as refused:
        Workflow.from_yaml(path)
    assert str(refused.value) == f"workflow {path} line 9: overlap given twice (first on line 7)", str(refused.value)
    with pytest.raises(WorkflowError) as refused:
        Workflow.from_dict({}, ["inference={roi_size: [64, 64], roi_size: [32, 32]}"])
    assert str(refused.value) == "overrides inference line 1: roi_size given twice (first on line 1)", refused


@pytest.mark.timeout(60)
def test_a_key_given_twice_through_one_alias_is_refused_too(tmp_path):
    """Two aliases of one anchored scalar are one YAML node: the check by identity took the second for the first,
    and PyYAML kept the last value without a word (``mode: zscore`` here, where ``fixed`` came first)."""
    path = tmp_path / "aliased.yaml"
    path.write_text(
        textwrap.dedent(
            """
            version: 1
            input: scene.tif
            model: {network: UNet, weights: weights.pt, args: {note: &mode mode}}
            preprocess:
              normalize:
                *mode : fixed
                *mode : zscore
            inference: {roi_size: [64, 64]}
            output: {path: "out/{stem}.zarr"}
            """
        )
    )
    with pytest.raises(WorkflowError) as refused:
        Workflow.from_yaml(path)
    assert re.fullmatch(rf"workflow {re.escape(str(path))} line \d+: mode given twice \(first on line \d+\)",
                        str(refused.value)), str(refused.value)  # fmt: skip


def test_a_saved_workflow_reads_back_as_itself(tmp_path):
    """A job folder's workflow is ``to_dict``'s, with model.fold and model.checkpoint as null: reading it back refused
    it as an nnU-Net choice without model.nnunet, and every submitted job and SLURM driver failed (CI's slow run)."""
    workflow = Workflow.from_dict(raster_workflow("scene.tif", tmp_path / "w.pt"), base_dir=tmp_path)
    saved = workflow.to_dict()
    assert saved["model"]["fold"] is None and saved["model"]["checkpoint"] is None
    assert Workflow.from_dict(saved, base_dir=tmp_path).to_dict() == saved
    with pytest.raises(WorkflowError, match="give model.nnunet"):
        Workflow.from_dict({**saved, "model": {**saved["model"], "fold": 0}}, base_dir=tmp_path)


@pytest.mark.timeout(60)
def test_one_override_given_alone_as_a_string_is_taken_whole_and_refusals_name_overrides(make_raster, make_model,
                                                                                          write_workflow):
    """A reviewer's: ``Workflow.from_yaml(path, "inference.backend=onnxruntime")`` took the string a letter at a
    time ("--set 'i': expected KEY=VALUE"), its refusal naming the command's --set to a Python caller."""
    path, _ = make_raster((3, 64, 64))
    weights, _ = make_model()
    workflow = write_workflow(raster_workflow(path, weights))
    assert Workflow.from_yaml(workflow, "inference.overlap=0.5").inference.overlap == 0.5
    with pytest.raises(WorkflowError, match=r"^overrides 'overlap': expected KEY=VALUE, e\.g\. output\.chunks=1024$"):
        Workflow.from_yaml(workflow, ["overlap"])


def test_the_readme_workflow_example_is_a_valid_workflow(tmp_path):
    """The README's "A workflow" example, every key shown, set ``inference.slice_axis: 2`` (a volume's) beside
    ``output.vectors`` on a raster, and was refused as a whole: ``output.vectors needs a 2D raster model``."""
    from .conftest import REPO

    readme = (REPO / "README.md").read_text()
    example = re.search(r"## A workflow\n\n```yaml\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "w.yaml").write_text(example)
    workflow = Workflow.from_yaml(tmp_path / "w.yaml")
    assert (workflow.output.chunks, workflow.inference.tta_mode) == (2048, "image")
