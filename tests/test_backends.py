"""Inference backends: torch-mkldnn, OpenVINO and ONNX Runtime against torch through whole runs, and what ``auto`` picks."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging

import numpy as np
import pytest
import rasterio
import torch
import zarr

import tilemask
from tilemask import Workflow

from .conftest import UNET_2D, UNET_3D, probe_twice, raster_workflow

BATCH_NORM_2D = dict(UNET_2D, norm="batch")
BATCH_NORM_3D = dict(UNET_3D, norm="batch")


def probabilities(results) -> np.ndarray:
    (result,) = results
    return zarr.open_group(result.outputs[0], mode="r")["probabilities"][:]


def run(raw: dict, tmp_path, client, backend: str, name: str):
    raw = {**raw, "inference": {**raw["inference"], "backend": backend}}
    raw["output"] = {**raw["output"], "path": f"out/{name}_{backend}.zarr"}
    return tilemask.run(Workflow.from_dict(raw, base_dir=tmp_path), client)


@pytest.mark.parametrize("backend", ["torch-mkldnn", "openvino", "onnxruntime"])
@pytest.mark.parametrize("dims", [2, 3])
def test_every_backend_gives_torchs_probabilities(backend, dims, make_raster, make_volume, make_model, tmp_path, client):
    if dims == 2:
        path, _ = make_raster((3, 150, 170))
        args = BATCH_NORM_2D
    else:
        path, _ = make_volume((40, 36, 30), name="scan.nii.gz")
        args = BATCH_NORM_3D
    weights, _ = make_model(args)
    raw = raster_workflow(path, weights, args=args, output={"chunks": 64})
    if dims == 3:
        raw["preprocess"] = {"normalize": {"mean": [500.0], "std": [300.0]}}
        raw["inference"]["roi_size"] = [32, 32, 32]
    expected = probabilities(run(raw, tmp_path, client, "torch", "ref"))
    got = probabilities(run(raw, tmp_path, client, backend, "converted"))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert np.abs(got - expected).max() > 0, "the converted network ran: not bitwise torch"


@pytest.mark.slow
def test_auto_takes_the_first_backend_that_matches_torch_and_is_faster(make_volume, make_model, tmp_path, client, caplog,
                                                                       monkeypatch):  # fmt: skip
    """MONAI's default UNet normalises per instance: on constant windows OpenVINO parts from torch, so auto
    takes torch's own oneDNN TorchScript; with batch norm OpenVINO matches and auto runs it.  One 3D window
    at a time, where both are several times faster than torch's own kernel (``slow_conv3d``)."""
    monkeypatch.setenv("TILEMASK_AUTO_MEASURE_AFTER", "0")  # measured for so small a job too
    path, _ = make_volume((40, 36, 30), name="scan.nii.gz")
    chosen = {}
    for name, args in (("instance", UNET_3D), ("batch", BATCH_NORM_3D)):
        weights, _ = make_model(args, name=f"{name}.pt")
        raw = raster_workflow(path, weights, args=args, output={"chunks": 64})
        raw["preprocess"] = {"normalize": {"mean": [500.0], "std": [300.0]}}
        raw["inference"].update(roi_size=[64, 64, 64], batch_size=1)
        with caplog.at_level(logging.INFO, logger="tilemask.engine"):
            caplog.clear()
            run(raw, tmp_path, client, "auto", name)
        (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("inference backend")]
        chosen[name] = line.split()[2]
    assert chosen == {"instance": "torch-mkldnn", "batch": "openvino"}


@pytest.mark.slow  # 23 s in a loaded default run (2026-12-07)
@pytest.mark.timeout(120)
def test_auto_measures_the_other_backends_once_the_jobs_would_repay_it(make_raster, make_model, write_workflow,
                                                                        tmp_path):  # fmt: skip
    """Converting and timing the backends made a first run of 4 small scenes 11.5 s against 4.6 s once measured:
    until a network's jobs at a roi would take 15 s in torch together, ``auto`` runs torch and measures
    nothing, and adds the job's time to the tally.  The test above measures a one-window job with
    ``TILEMASK_AUTO_MEASURE_AFTER=0``."""
    import json

    from .conftest import run_cli

    path, _ = make_raster((3, 150, 170))
    weights, _ = make_model()
    workflow = write_workflow(raster_workflow(path, weights, output={"path": "out/{stem}.zarr"}))
    cache = tmp_path / "cache"
    default = {"TILEMASK_CACHE_DIR": str(cache), "TILEMASK_AUTO_MEASURE_AFTER": ""}  # the 15 s, not the session's
    small = run_cli("-v", "run", workflow, "--quiet", cwd=tmp_path, env=default)
    assert small.returncode == 0, small.stderr
    said = "inference backend torch (inference.backend: auto; too little run in torch yet to repay measuring"
    assert said in small.stderr
    assert not list(cache.glob("*/*.verdict.json"))
    (tally,) = cache.glob("auto/*.json")
    assert 0 < json.loads(tally.read_text())["unmeasured_seconds"] < 15


def test_a_threshold_that_is_not_a_number_is_refused_before_the_cluster_starts(make_raster, make_model,
                                                                                write_workflow, tmp_path):  # fmt: skip
    """``TILEMASK_AUTO_MEASURE_AFTER=soon``: exit 2 in one line before any cluster starts (it was read as the
    network was probed, on the cluster)."""
    from click.testing import CliRunner

    from tilemask.cli import main

    path, _ = make_raster((3, 50, 50))
    weights, _ = make_model()
    workflow = write_workflow(raster_workflow(path, weights, output={"path": "out/{stem}.zarr"}))
    result = CliRunner().invoke(main, ["run", str(workflow), "--scheduler", "tcp://127.0.0.1:9"],
                                env={"TILEMASK_AUTO_MEASURE_AFTER": "soon"})  # fmt: skip
    assert (result.exit_code, result.output) == (2, "tilemask: error: TILEMASK_AUTO_MEASURE_AFTER='soon': not a "
                                                    "number of seconds\n")  # fmt: skip


def test_an_unknown_backend_is_refused_by_name(make_raster, make_model, tmp_path):
    path, _ = make_raster((3, 50, 50))
    weights, _ = make_model()
    raw = raster_workflow(path, weights)
    raw["inference"]["backend"] = "tensorrt"
    with pytest.raises(tilemask.TilemaskError, match="inference.backend"):
        Workflow.from_dict(raw, base_dir=tmp_path)


def test_a_backend_not_installed_says_how_to_install_it(make_model, monkeypatch, tmp_path):
    """``backend: onnxruntime`` on a worker without it said only "not installed", where the README installs it as
    ``tilemask[onnx]``; the import fails as it does without the package (``sys.modules`` entry None)."""
    import sys

    from tilemask.inference import probe_network
    from tilemask.settings import InferenceSettings, ModelSpec

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    weights, _ = make_model()
    spec = ModelSpec.create("UNet", UNET_2D, str(weights))
    settings = InferenceSettings(roi=(64, 64), batch_size=2, device="cpu", backend="onnxruntime")
    with pytest.raises(tilemask.errors.WorkflowError) as refused:
        probe_network(spec, settings, 3)
    assert str(refused.value) == ("inference.backend: onnxruntime is not installed on this worker "
                                  "(pip install 'tilemask[onnx]')")  # fmt: skip


def test_onnx_runtimes_other_builds_key_its_cache_by_their_own_version(tmp_path, monkeypatch):
    """``onnxruntime-gpu`` (and ONNX Runtime's other builds) install the same ``onnxruntime`` module under another
    distribution's name: its version read as "absent", so upgrading it kept the old conversions and verdicts.
    Packages here are real ``.dist-info`` folders on a ``sys.path`` that holds only them."""
    import importlib
    import sys

    from tilemask.backend_cache import backend_version

    def install(name: str, version: str) -> None:
        folder = tmp_path / f"{name.replace('-', '_')}-{version}.dist-info"
        folder.mkdir()
        (folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        importlib.invalidate_caches()  # importlib.metadata lists a folder once per modification time

    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    assert backend_version("onnxruntime") == "absent"
    install("onnxruntime-gpu", "1.99.0")
    assert backend_version("onnxruntime") == "onnxruntime-gpu-1.99.0"
    install("onnxruntime", "1.98.0")  # both: either may be the module that imports, so both key it
    assert backend_version("onnxruntime") == "1.98.0+onnxruntime-gpu-1.99.0"
    (tmp_path / "onnxruntime_gpu-1.99.0.dist-info" / "METADATA").unlink()
    (tmp_path / "onnxruntime_gpu-1.99.0.dist-info").rmdir()
    importlib.invalidate_caches()
    assert backend_version("onnxruntime") == "1.98.0"  # the plain build alone: its key as before, its caches valid
    assert backend_version("torch-mkldnn") == "absent"
    install("torch", "2.99.0")
    assert backend_version("torch-mkldnn") == backend_version("torch") == "2.99.0"  # torch's own version


@pytest.mark.parametrize("backend", ["torch-mkldnn", "openvino", "onnxruntime"])
def test_reduced_precision_with_a_float32_only_backend_is_refused(make_raster, make_model, tmp_path, backend):
    path, _ = make_raster((3, 50, 50))
    weights, _ = make_model()
    raw = raster_workflow(path, weights)
    raw["inference"].update(backend=backend, precision="bfloat16")
    with pytest.raises(tilemask.TilemaskError, match=f"precision bfloat16 runs in torch.*{backend} runs float32 only"):
        Workflow.from_dict(raw, base_dir=tmp_path)
    for allowed in ("auto", "torch"):
        raw["inference"]["backend"] = allowed
        assert Workflow.from_dict(raw, base_dir=tmp_path).inference.precision == "bfloat16"


@pytest.mark.parametrize("archive", ["state_dict", "torchscript", "exported"])
def test_reduced_precision_is_the_network_under_autocast_bit_for_bit(make_model, tmp_path, monkeypatch, archive):
    """Whatever the weights file holds, a reduced precision's runner answers what the loaded network answers
    under ``torch.autocast``, in float32; one worker keeps the float32 and the bfloat16 runners apart."""
    import dataclasses

    import torch

    from tilemask.backends import cached_runner
    from tilemask.settings import InferenceSettings, ModelSpec

    monkeypatch.setenv("TILEMASK_CACHE_DIR", str(tmp_path / "cache"))
    weights, net = make_model()
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, 64, 64), dtype=np.float32))
    if archive == "torchscript":
        weights = tmp_path / "net.ts"
        torch.jit.save(torch.jit.trace(net, x), weights)
        net = torch.jit.load(weights)
    elif archive == "exported":
        weights = tmp_path / "net.pt2"
        torch.export.save(torch.export.export(net, (x,)), weights)
        net = torch.export.load(weights).module()
    network, args = ("UNet", UNET_2D) if archive == "state_dict" else ("", {})
    spec = ModelSpec.create(network, args, str(weights))
    assert spec.archive == archive
    settings = InferenceSettings(roi=(64, 64), backend="torch")
    _, full = cached_runner(spec, settings, 3, torch.device("cpu"))
    name, reduced = cached_runner(spec, dataclasses.replace(settings, precision="bfloat16"), 3, torch.device("cpu"))
    assert name == "torch under bfloat16 autocast"
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = net(x).float()
        got = reduced(x)
        assert got.dtype == torch.float32 and torch.equal(got, expected)
        assert (full(x) - got).abs().max() > 1e-3  # the float32 runner is another


@pytest.mark.parametrize("roi,mode,sigma", [((64, 64), "gaussian", 0.125), ((33, 17, 40), "gaussian", (0.1, 0.2, 0.3)),
                                            ((96, 96, 96), "gaussian", 0.125), ((48, 48), "constant", 0.125)])  # fmt: skip
def test_window_weights_are_monais_to_the_bit(roi, mode, sigma):
    import torch
    from monai.data.utils import compute_importance_map

    from tilemask.inference import importance_map

    expected = compute_importance_map(roi, mode=mode, sigma_scale=sigma, device="cpu", dtype=torch.float32)
    assert torch.equal(importance_map(roi, mode, sigma, torch.device("cpu")), expected)


PROBE = """
import sys, torch
from tilemask.backends import cached_runner
from tilemask.settings import InferenceSettings, ModelSpec
spec = ModelSpec.create("UNet", {args!r}, {weights!r})
backend, run = cached_runner(spec, InferenceSettings(roi=(64, 64), backend="torch"), 3, torch.device("cpu"))
window = torch.from_numpy(__import__("numpy").random.default_rng(1).standard_normal((2, 3, 64, 64), dtype="float32"))
with torch.inference_mode():
    torch.save(run(window), sys.argv[1])
# a runner of halves (two CPU threads or more, an even number) holds the trace as its run
print("monai" in sys.modules, isinstance(getattr(run, "run", run), torch.jit.ScriptModule))
"""


@pytest.mark.slow  # two fresh processes importing torch and MONAI (12 s)
def test_a_checkpoints_network_is_traced_once_and_later_runs_load_it_without_monai(make_model, tmp_path):
    weights, net = make_model()
    answers = probe_twice(PROBE.format(args=UNET_2D, weights=str(weights)), tmp_path, timeout=120)
    assert answers[0] == "True True"  # built with MONAI, traced, cached
    assert answers[1] == "False True"  # read from the cache: MONAI never imported
    assert list((tmp_path / "cache" / "torchscript").glob("*.pt"))
    first, second = (torch.load(tmp_path / f"out{n}.pt") for n in range(2))
    assert torch.equal(first, second)  # the cached trace answers as the traced network did, bit for bit
    window = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, 64, 64), dtype="float32"))
    with torch.inference_mode():  # this process may run other torch threads: summation order, not bits
        np.testing.assert_allclose(first.numpy(), net(window).numpy(), rtol=0, atol=1e-5)


def test_a_trace_run_op_by_op_as_on_a_gpu_never_runs_the_executors_plan(make_model):
    """On a GPU the trace runs without TorchScript's optimizing executor (``tilemask.backends._op_by_op``), whose
    plan fuses element-wise operators there (this CPU wheel has no fuser: the plan is told by its inlined
    convolutions, as a trace called as it is shows): the network's answer bit for bit call after call, the plan
    never built, and the setting put back for the thread's other work."""
    from tilemask.backends import _op_by_op

    _, net = make_model()
    windows = torch.from_numpy(np.random.default_rng(2).standard_normal((4, 3, 64, 64), dtype="float32"))
    plans = []
    for wrap in (_op_by_op, lambda traced: traced):
        with torch.no_grad():
            run = wrap(torch.jit.trace(net, torch.zeros((1, 3, 64, 64)), check_trace=False))
        with torch.inference_mode():
            for _ in range(4):  # the profiling executor builds its plan after the first calls
                assert torch.equal(run(windows), net(windows))
            plans.append(str(torch.jit.last_executed_optimized_graph()))
        assert torch._C._get_graph_executor_optimize()
    op_by_op, as_it_is = plans
    assert "aten::_convolution" not in op_by_op and "aten::_convolution" in as_it_is


@pytest.mark.slow  # two fresh worker processes for an unwritable cache
def test_a_cache_that_cannot_be_written_costs_a_conversion_not_the_run(make_model, tmp_path):
    import os
    import subprocess
    import sys

    weights, _ = make_model()
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    env = {**os.environ, "TILEMASK_CACHE_DIR": str(blocked / "cache")}
    done = subprocess.run([sys.executable, "-c", PROBE.format(args=UNET_2D, weights=str(weights)), str(tmp_path / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]  # traced and run, not cached
    assert "cannot cache" in done.stderr


@pytest.mark.slow  # 10 s in a loaded default run (2026-12-07)
@pytest.mark.timeout(120)
def test_a_cache_on_a_full_disk_costs_a_conversion_not_the_worker(make_model, tmp_path, tmpfs):
    """torch.jit.save onto a full disk ends the process: torch's archive writer throws as it closes the file, in a
    destructor, and C++ calls std::terminate (SIGABRT).  Every worker that traced the network died so, four in
    turn, and the run ended 68 s later as ``KilledWorker ... probe_network`` without a word of the disk.  The trace
    is written by Python, where a full disk is an OSError: a warning, and the run goes on."""
    import os
    import subprocess
    import sys

    weights, _ = make_model()
    disk = tmpfs("64k")
    with contextlib.suppress(OSError), open(disk / "filler", "wb", buffering=0) as filler:
        while True:  # until the disk is full
            filler.write(b"\0" * 4096)
    env = {**os.environ, "TILEMASK_CACHE_DIR": str(disk / "cache")}
    done = subprocess.run([sys.executable, "-c", PROBE.format(args=UNET_2D, weights=str(weights)), str(tmp_path / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "True"]  # traced and run, not cached
    assert "cannot cache" in done.stderr and "no space left on device" in done.stderr.lower()
    assert sorted(p.name for p in (disk / "cache" / "torchscript").iterdir()) == []  # no half entry left


@pytest.mark.timeout(120)
def test_an_openvino_cache_on_a_full_disk_costs_the_entry_not_the_backend(make_model, monkeypatch, tmpfs, caplog):
    """OpenVINO's save_model onto a full disk raises RuntimeError (``basic_ios::clear: iostream error``), which
    read as a network OpenVINO cannot convert: ``backend: openvino`` was refused (exit 2) and ``auto`` recorded
    the backend as unable to convert the network.  The converted network runs; the cache entry is lost."""
    from tilemask.backends import cached_runner
    from tilemask.settings import InferenceSettings, ModelSpec

    weights, net = make_model()
    disk = tmpfs("64k")
    with contextlib.suppress(OSError), open(disk / "filler", "wb", buffering=0) as filler:
        while True:  # until the disk is full
            filler.write(b"\0" * 4096)
    monkeypatch.setenv("TILEMASK_CACHE_DIR", str(disk / "cache"))
    spec = ModelSpec.create("UNet", UNET_2D, str(weights))
    with caplog.at_level(logging.WARNING, logger="tilemask"):
        name, run = cached_runner(spec, InferenceSettings(roi=(64, 64), backend="openvino"), 3, torch.device("cpu"))
    assert name == "openvino"
    assert "cannot cache" in caplog.text
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, 64, 64), dtype=np.float32))
    with torch.inference_mode():
        np.testing.assert_allclose(run(x).numpy(), net(x).numpy(), rtol=0, atol=1e-4)
    assert list((disk / "cache" / "openvino").iterdir()) == []  # no half entry left


@pytest.mark.timeout(120)
def test_a_worker_that_ran_a_small_job_measures_for_a_big_one(make_model, tmp_path, monkeypatch):
    """A worker of a scheduler that outlives its jobs keeps its runners: the runner an unmeasured small job
    built is not the one a job big enough to repay measuring gets."""
    from tilemask.inference import probe_network
    from tilemask.settings import InferenceSettings, ModelSpec

    monkeypatch.setenv("TILEMASK_CACHE_DIR", str(tmp_path / "cache"))
    weights, _ = make_model(dict(UNET_2D, norm="batch"))
    spec = ModelSpec.create("UNet", dict(UNET_2D, norm="batch"), str(weights))
    settings = InferenceSettings(roi=(64, 64), batch_size=2, device="cpu", backend="auto")
    *_, small = probe_network(spec, settings, 3, windows=1, measure_after=1e6)
    assert not small.measure
    *_, big = probe_network(spec, settings, 3, windows=10**12, measure_after=1e6)
    assert big.measure
    assert list((tmp_path / "cache").glob("*/*.verdict.json")), "the big job measured no backend"


@pytest.mark.timeout(120)
def test_auto_settles_on_the_runner_its_job_runs(make_model, tmp_path, monkeypatch):
    """The probe of a job too small to measure builds the network once (a scheduler's worker loads it once per
    model); a job whose cached verdict takes a backend measures nothing after it, so it settles nothing."""
    import json

    import torch

    from tilemask import backend_cache, backends
    from tilemask.inference import probe_network
    from tilemask.settings import InferenceSettings, ModelSpec

    monkeypatch.setenv("TILEMASK_CACHE_DIR", str(tmp_path / "cache"))
    weights, _ = make_model()
    spec = ModelSpec.create("UNet", UNET_2D, str(weights))
    settings = InferenceSettings(roi=(64, 64), batch_size=2, device="cpu", backend="auto")
    before = backends.loads
    *_, small = probe_network(spec, settings, 3, windows=1, measure_after=1e6)
    assert not small.measure and backends.loads == before + 1

    verdict = backend_cache.verdict_path(spec, "openvino", 3, (64, 64), 2)
    verdict.parent.mkdir(parents=True, exist_ok=True)
    verdict.write_text(json.dumps({"difference": 0.0, "seconds": {"1": 1.0, "2": 1.0},
                                   "torch_seconds": {"1": 2.0, "2": 2.0}}))  # fmt: skip
    assert backends.settle_auto(spec, settings, 3, torch.device("cpu"), 1, 1e6) is settings


def _auto_on(network: type[torch.nn.Module], tmp_path):
    """The spec of ``network`` (a class of this module, its weights seeded and saved in ``tmp_path``) and settings
    that run it with ``auto`` on the CPU, windows of 32 x 32 in batches of 2."""
    from tilemask.settings import InferenceSettings, ModelSpec

    torch.manual_seed(0)
    weights = tmp_path / f"{network.__name__}.pt"
    torch.save(network().state_dict(), weights)
    spec = ModelSpec.create(f"{__name__}:{network.__name__}", {}, str(weights))
    return spec, InferenceSettings(roi=(32, 32), batch_size=2, device="cpu", backend="auto")


class TakesABranch(torch.nn.Module):
    """A network whose path depends on its input: a trace keeps one branch, so it runs in eager torch and
    torch-mkldnn (which needs TorchScript) cannot take it."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x) if float(x.mean()) > 0 else -self.conv(x)


@pytest.mark.timeout(120)
def test_a_backend_that_cannot_take_the_network_is_not_tried_again(tmp_path, monkeypatch, caplog):
    """A conversion that fails is remembered as that backend's verdict: the next job neither converts again
    nor counts it as unmeasured (it re-timed torch and grew the tally for it, every job)."""
    from tilemask import backends
    from tilemask.inference import probe_network

    monkeypatch.setenv("TILEMASK_CACHE_DIR", str(tmp_path / "cache"))
    spec, settings = _auto_on(TakesABranch, tmp_path)
    with caplog.at_level(logging.INFO, logger="tilemask.backends"):
        *_, first = probe_network(spec, settings, 3, windows=10**12, measure_after=1e6)
    assert first.measure
    assert any("torch-mkldnn cannot convert" in r.getMessage() for r in caplog.records)
    backends._runners.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tilemask.backends"):
        backend, second = probe_network(spec, settings, 3, windows=1, measure_after=1e6)[1:]
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "cannot convert" in m or "too few to repay" in m], messages
    assert backend == "torch" and second is settings
    assert not list((tmp_path / "cache").glob("auto/*.json")), "a job with nothing left to measure grew the tally"


class RunsOutOfMemoryWhenTraced(torch.nn.Module):
    """A network whose conversion runs out of memory (a real allocation torch's CPU allocator refuses), as a
    big 3D network can on a small worker, while it runs in eager torch: until ``traced_fits`` is set."""

    traced_fits = False

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        if torch.jit.is_tracing() and not RunsOutOfMemoryWhenTraced.traced_fits:
            torch.empty(2**46)  # 256 TiB
        return self.conv(x)


@pytest.mark.timeout(120)
def test_running_out_of_memory_while_converting_is_not_remembered(tmp_path, monkeypatch, caplog):
    """Memory that runs out while converting says nothing of the network: the job runs in torch and the next one,
    with memory to spare, converts and measures (a RuntimeError from the allocator was remembered as 'cannot
    convert', for good)."""
    from tilemask import backends
    from tilemask.inference import probe_network

    monkeypatch.setenv("TILEMASK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(RunsOutOfMemoryWhenTraced, "traced_fits", False)
    spec, settings = _auto_on(RunsOutOfMemoryWhenTraced, tmp_path)
    with caplog.at_level(logging.INFO, logger="tilemask.backends"):
        channels, backend, _ = probe_network(spec, settings, 3, windows=10**12, measure_after=1e6)
    assert (channels, backend) == (2, "torch")
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "can't allocate memory" in m], messages
    assert not [p for p in (tmp_path / "cache").rglob("*.verdict.json")], "running out of memory was remembered"
    backends._runners.clear()
    monkeypatch.setattr(RunsOutOfMemoryWhenTraced, "traced_fits", True)
    probe_network(spec, settings, 3, windows=10**12, measure_after=1e6)
    verdicts = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("*.verdict.json")]
    assert verdicts and all("difference" in v for v in verdicts), verdicts  # measured: auto takes the first faster


class RunsOutOfMemory(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.scale * x[:, :1] + torch.empty(2**46)  # 256 TiB: torch's CPU allocator refuses it


@pytest.mark.timeout(60)
def test_a_window_that_runs_out_of_memory_is_not_called_the_networks_fault(tmp_path):
    """Running out of memory on the probe's window is the machine's failure (exit 1), not a network that rejects
    the window (a workflow error, exit 2, which told the user to change the model)."""
    from tilemask.errors import WorkflowError
    from tilemask.inference import probe_network
    from tilemask.settings import InferenceSettings, ModelSpec

    weights = tmp_path / "oom.pt"
    torch.save(RunsOutOfMemory().state_dict(), weights)
    spec = ModelSpec.create(f"{__name__}:RunsOutOfMemory", {}, str(weights))
    with pytest.raises(RuntimeError, match="can't allocate memory") as raised:
        probe_network(spec, InferenceSettings(roi=(16, 16), device="cpu", backend="torch"), 3)
    assert not isinstance(raised.value, WorkflowError)


class NaNOnFlatWindows(torch.nn.Module):
    """A network with fine weights that divides by each window's spread: 0 / 0 on a flat window."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        spread = x.amax(dim=(1, 2, 3), keepdim=True) - x.amin(dim=(1, 2, 3), keepdim=True)
        return self.conv(x) * spread / spread


def test_a_network_that_answers_nan_fails_the_run_naming_the_window(make_raster, write_workflow, tmp_path, client):
    """NaN in a window's prediction blends into NaN probabilities, whose argmax is class 0: the run wrote
    background there and exited 0.  It fails (exit 1) naming the input and the window, and publishes nothing."""
    from .conftest import run_cli
    from .test_cli import assert_one_line_error, nothing_finished

    path, data = make_raster((3, 150, 170))
    data[:, 64:128, 96:160] = 7  # the window at [64, 96] alone is flat
    with rasterio.open(path, "r+") as ds:
        ds.write(data)
    torch.manual_seed(0)
    weights = tmp_path / "nan.pt"
    torch.save(NaNOnFlatWindows().state_dict(), weights)
    raw = raster_workflow(path, weights, output={"path": "out/{stem}.zarr"})
    raw["model"] = {"network": f"{__name__}:NaNOnFlatWindows", "weights": str(weights)}
    raw["inference"]["overlap"] = 0.5
    done = run_cli("run", write_workflow(raw), "--scheduler", client.scheduler.address, cwd=tmp_path)
    assert_one_line_error(done, 1, str(path), "NaN", "window at [64, 96] (roi [64, 64])")
    assert nothing_finished(tmp_path / "out")


class HugeLogits(torch.nn.Module):
    """Finite logits whose sum over a window overflows float32: class 1 at 1e35, the others 0."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x):
        huge = torch.tensor([0.0, 1e35, 0.0], device=x.device).view(1, 3, 1, 1)
        return self.conv(x) * 0 + huge


def test_finite_logits_whose_sum_overflows_are_not_called_nan(make_raster, tmp_path, client):
    """The NaN check summed each window's values: logits of 1e35 overflowed that sum, and a network whose
    answer is finite (softmax 0, 1, 0) failed the run as answering NaN or infinite values."""
    path, _ = make_raster((3, 150, 170))
    weights = tmp_path / "huge.pt"
    torch.save(HugeLogits().state_dict(), weights)
    raw = raster_workflow(path, weights, output={"path": "out/{stem}.zarr"})
    raw["model"] = {"network": f"{__name__}:HugeLogits", "weights": str(weights)}
    (result,) = tilemask.run(Workflow.from_dict(raw, base_dir=tmp_path), client)
    assert result.status == "ok", result.error
    labels = zarr.open_group(str(tmp_path / "out" / "scene.zarr"), mode="r")["labels"][...]
    assert (labels == 1).all()


SETTLE = """
import json, logging, os, time, torch
from tilemask.backends import settle_auto
from tilemask.settings import InferenceSettings, ModelSpec

class Estimates(logging.Handler):  # the seconds each 'too few to repay measuring' line says this job adds
    seconds = []
    def emit(self, record):
        if record.msg.startswith("auto: "):
            self.seconds.append(record.args[1])

logging.getLogger("tilemask.backends").addHandler(Estimates())
logging.getLogger("tilemask.backends").setLevel(logging.INFO)
spec = ModelSpec.create("UNet", {args!r}, {weights!r})
print("ready", flush=True)
while not os.path.exists({go!r}):
    time.sleep(0.001)
settings = InferenceSettings(roi=(64, 64), batch_size=2, device="cpu", backend="auto")
settle_auto(spec, settings, 3, torch.device("cpu"), 1000, 1e6)
print(json.dumps(Estimates.seconds))
"""


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_two_jobs_settling_at_once_both_count_in_the_tally(make_model, tmp_path):
    """``auto``'s tally of seconds run unmeasured is read, added to and written back by each job: two jobs at
    once both read the old figure and the last to write lost the other's seconds."""
    import os
    import subprocess
    import sys

    weights, _ = make_model()
    env = {**os.environ, "TILEMASK_CACHE_DIR": str(tmp_path / "cache")}
    go = tmp_path / "go"

    def start():
        script = SETTLE.format(args=UNET_2D, weights=str(weights), go=str(go))
        return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)

    subprocess.run([sys.executable, "-c", SETTLE.format(args=UNET_2D, weights=str(weights), go="/")], env=env,
                   check=True, timeout=120, capture_output=True)  # fmt: skip  # traced and cached: both load it
    (tally,) = (tmp_path / "cache" / "auto").glob("*.json")
    first = json.loads(tally.read_text())["unmeasured_seconds"]
    jobs = [start(), start()]
    assert [job.stdout.readline() for job in jobs] == ["ready\n"] * 2  # both imported: they settle at once
    go.touch()
    estimates = [json.loads(job.communicate(timeout=120)[0]) for job in jobs]
    assert all(job.returncode == 0 for job in jobs) and all(len(e) == 1 for e in estimates), estimates
    assert json.loads(tally.read_text())["unmeasured_seconds"] == pytest.approx(first + sum(e[0] for e in estimates))
    # the tally is written under a lock: a job waits while another holds it (its flock waits in /proc/locks)
    import fcntl
    import time

    total = json.loads(tally.read_text())["unmeasured_seconds"]
    with open(tally.with_suffix(".lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        job = start()
        assert job.stdout.readline() == "ready\n"
        deadline = time.monotonic() + 60
        while f" {job.pid} " not in "".join(x for x in open("/proc/locks") if "->" in x):
            assert job.poll() is None and time.monotonic() < deadline, "the job did not wait for the lock"
            time.sleep(0.05)
        assert json.loads(tally.read_text())["unmeasured_seconds"] == total
    (estimate,) = json.loads(job.communicate(timeout=120)[0])
    assert json.loads(tally.read_text())["unmeasured_seconds"] == pytest.approx(total + estimate)


class HasAnOpOpenVINOLacks(torch.nn.Module):
    """Convolutions and ``torch.linalg.svdvals``, which neither OpenVINO nor ONNX has a conversion for."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y + torch.linalg.svdvals(y[:, :, :4, :4])[..., :1, None]


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_a_conversion_that_fails_names_the_operation(backend, tmp_path, monkeypatch):
    """OpenVINO's error begins with where in its sources a check failed (``Check 'false' failed at
    src/frontends/...cpp:151:``), and that line alone was all the user read; the operation is in its summary."""
    import dataclasses

    from tilemask.errors import WorkflowError
    from tilemask.inference import probe_network

    monkeypatch.setenv("TILEMASK_CACHE_DIR", str(tmp_path / "cache"))
    spec, settings = _auto_on(HasAnOpOpenVINOLacks, tmp_path)
    with pytest.raises(WorkflowError, match=f"^inference.backend: {backend} cannot convert .*HasAnOpOpenVINOLacks: .*"
                                            "aten::linalg_svdvals"):  # fmt: skip
        probe_network(spec, dataclasses.replace(settings, backend=backend), 3)


@pytest.mark.timeout(120)
def test_auto_takes_no_backend_whose_difference_from_torch_is_nan(tmp_path, monkeypatch):
    """A network that answers NaN for a constant window makes auto's measured difference NaN, and ``NaN >
    1e-4`` is false: a backend faster than torch was taken without having matched it."""
    import dataclasses

    from tilemask import backend_cache, backends
    from tilemask.inference import probe_network

    monkeypatch.setenv("TILEMASK_CACHE_DIR", str(tmp_path / "cache"))
    spec, settings = _auto_on(NaNOnFlatWindows, tmp_path)
    probe_network(spec, settings, 3, windows=10**12, measure_after=0)
    verdict = backend_cache.verdict_path(spec, "openvino", 3, (32, 32), 2)
    measured = json.loads(verdict.read_text())
    assert np.isnan(measured["difference"]), measured
    faster = {size: seconds / 10 for size, seconds in measured["torch_seconds"].items()}
    verdict.write_text(json.dumps(dict(measured, seconds=faster)))  # as fast as OpenVINO is on a big network
    backends._runners.clear()
    assert probe_network(spec, dataclasses.replace(settings, measure=False), 3)[1] == "torch"


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_a_truncated_cached_conversion_is_converted_again(backend, make_model, tmp_path, monkeypatch, caplog):
    """A cached conversion cut short (a machine that went down before its disk had the file, a cache folder
    copied in part) failed every later run with 'cannot convert UNet: [ONNXRuntimeError] ... INVALID_PROTOBUF',
    blaming the network, where an unreadable cached TorchScript is traced again."""
    from tilemask import backends
    from tilemask.inference import probe_network
    from tilemask.settings import InferenceSettings, ModelSpec

    monkeypatch.setenv("TILEMASK_CACHE_DIR", str(tmp_path / "cache"))
    weights, _ = make_model()
    spec = ModelSpec.create("UNet", UNET_2D, str(weights))
    settings = InferenceSettings(roi=(64, 64), batch_size=2, device="cpu", backend=backend)
    probe_network(spec, settings, 3)
    cached = {path: path.read_bytes() for path in (tmp_path / "cache" / backend).iterdir()}
    for path, data in cached.items():
        path.write_bytes(data[: len(data) // 2])
    backends._runners.clear()
    with caplog.at_level(logging.WARNING, logger="tilemask.backends"):
        assert probe_network(spec, settings, 3)[:2] == (3, backend)
    assert [r for r in caplog.records if "unreadable cached conversion, converting again" in r.getMessage()]
    backends._runners.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tilemask.backends"):
        assert probe_network(spec, settings, 3)[:2] == (3, backend)
    assert not caplog.records, "the conversion was not cached again"


def test_the_weights_are_read_once_per_version_and_process_for_their_cache_keys(tmp_path, monkeypatch):
    """Each cache entry's key holds the weights' sha256: the TorchScript trace, each backend's verdict and auto's
    tally, several per worker and job. The digest's per-process cache was lost (47d19dc): every key read the
    whole file again, 2-3 s a worker for a few hundred MB of nnU-Net checkpoint. Counted in the bytes this
    process reads (/proc/self/io)."""
    import os

    from tilemask import backend_cache
    from tilemask.settings import ModelSpec

    def bytes_read() -> int:
        return int(dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())["rchar"])

    monkeypatch.setenv("TILEMASK_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "big.pt"
    weights.write_bytes(os.urandom(16 << 20))
    size = weights.stat().st_size
    spec = ModelSpec.create("UNet", UNET_2D, str(weights))
    before = bytes_read()
    keys = {backend_cache.verdict_path(spec, name, 3, (64, 64), 2) for name in ("openvino", "torch-mkldnn")}
    keys |= {backend_cache.tally_path(spec, 3, (64, 64), 2), backend_cache.cache_path(spec, "torchscript", "2", 3,
                                                                                     (64, 64), ".pt")}
    assert len(keys) == 4
    assert size <= bytes_read() - before < 2 * size  # hashed once for the four keys

    with open(weights, "ab") as f:
        f.write(b"\0")  # another version of the file: hashed again, another key
    changed = ModelSpec.create("UNet", UNET_2D, str(weights))
    before = bytes_read()
    assert backend_cache.tally_path(changed, 3, (64, 64), 2) not in keys
    assert bytes_read() - before >= size


def test_auto_times_each_runner_after_its_first_passes_and_in_turn():
    """auto's timing took the best of two passes after one, each runner after the other: a runner whose first
    passes are slower (a TorchScript trace optimises its graph as it goes) read slower than it runs. Each runner is
    now warmed up, then the two are timed in turn and their medians compared."""
    import time

    from tilemask.backend_cache import WARM_UP_PASSES
    from tilemask.backends import _paired_seconds

    calls = []

    def settling(windows):  # slow for its first passes and one more, as a trace that has not settled
        calls.append("torch")
        if calls.count("torch") <= WARM_UP_PASSES + 1:
            time.sleep(0.2)
        return windows

    def steady(windows):
        calls.append("converted")
        time.sleep(0.05)
        return windows

    converted, reference = _paired_seconds(steady, settling, 1, (4, 4), 2)
    assert reference < 0.025 < converted, (converted, reference)
    timed = calls[2 * WARM_UP_PASSES :]
    assert timed == ["converted", "torch"] * (len(timed) // 2), calls  # in turn


@pytest.mark.timeout(60)
def test_a_2d_batch_runs_in_two_halves_at_once_each_on_half_the_threads():
    """One forward pass over both cores stalls whenever another thread takes one: on the CPU a batch of 2D
    windows runs in two halves at once, each on a thread with half of the caller's torch threads; fewer windows
    on the caller's thread; the process's thread count, which threads started later take, as it was."""
    import threading

    from tilemask.backends import _halved
    from tilemask.models import torch_threads

    calls = []
    together = threading.Barrier(2, timeout=10)  # broken, failing the test, unless both halves run at once

    def run(windows):
        name = threading.current_thread().name
        calls.append((name, torch.get_num_threads(), len(windows), torch.is_inference_mode_enabled()))
        if name.startswith("tilemask-half"):
            together.wait()
        return windows * 2

    caller = threading.current_thread().name
    with torch_threads(2):
        halves = _halved(run, "torch", (32, 32), 8)
        batch = torch.randn(7, 3, 32, 32)
        with torch.inference_mode():
            assert torch.equal(halves(batch), batch * 2)
        assert sorted((name.split("_")[0], *rest) for name, *rest in calls) == [
            ("tilemask-half", 1, 3, True), ("tilemask-half", 1, 4, True)], calls  # fmt: skip
        calls.clear()
        halves(batch[:3])  # too few to halve: a half of one window would go to auto's single-window runtime
        assert calls == [(caller, 2, 3, False)]
        seen = []
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert seen == [2], "a thread started later took the halves' thread count"
        # where halves do not apply: the runner as given
        assert _halved(run, "torch", (16, 16, 16), 8) is run  # 3D
        assert _halved(run, "openvino", (32, 32), 8) is run  # its own threads, one request
        assert _halved(run, "torch", (32, 32), 3) is run  # batches too small to halve
    with torch_threads(1):
        assert _halved(run, "torch", (32, 32), 8) is run


@pytest.mark.timeout(60)
def test_a_half_that_fails_fails_the_batch_after_the_other_half_is_done():
    import threading
    import time

    from tilemask.backends import _halved
    from tilemask.models import torch_threads

    finished = []

    def run(windows):
        if len(windows) == 5:
            raise RuntimeError("the network refuses this half")
        time.sleep(0.3)
        finished.append(threading.current_thread().name)
        return windows

    with torch_threads(2):
        halves = _halved(run, "torch", (32, 32), 9)
    with pytest.raises(RuntimeError, match="refuses this half"):
        halves(torch.zeros(9, 3, 32, 32))
    assert len(finished) == 1, "the batch failed while its other half still ran"


@pytest.mark.timeout(120)
def test_a_cpu_workers_torch_runner_halves_its_batches_and_keeps_the_networks_answer(tmp_path, monkeypatch, caplog):
    from collections import OrderedDict

    from tilemask import backends
    from tilemask.models import torch_threads

    monkeypatch.setenv("TILEMASK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(backends, "_runners", OrderedDict())
    spec, settings = _auto_on(TwoConvolutions, tmp_path)
    settings = dataclasses.replace(settings, backend="torch", batch_size=8)
    with torch_threads(2), caplog.at_level(logging.INFO, logger="tilemask.backends"):
        backend, run = backends.cached_runner(spec, settings, 3, torch.device("cpu"))
        batch = torch.randn(8, 3, 32, 32)
        with torch.inference_mode():
            got = run(batch)
    assert backend == "torch"
    assert any("in two halves at once" in r.getMessage() for r in caplog.records)
    network = TwoConvolutions()
    network.load_state_dict(torch.load(spec.weights, weights_only=True))
    with torch.inference_mode():
        assert torch.allclose(got, network.eval()(batch), atol=1e-5)


class TwoConvolutions(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                          torch.nn.Conv2d(8, 2, 3, padding=1))  # fmt: skip

    def forward(self, x):
        return self.layers(x)


def _block_sums(network, batch_size=8):
    """``tilemask.inference._sums`` over the first block of a 64 x 80 image of random values, windows of 16^2."""
    from tilemask.geometry import WindowPlan, region_shape
    from tilemask.inference import _sums
    from tilemask.settings import InferenceSettings

    block = WindowPlan.build((64, 80), (16, 16), 0.25, 64).block((0, 0))
    origin, shape = tuple(lo for lo, _ in block.extent), region_shape(block.extent)
    image = torch.from_numpy(np.random.default_rng(0).standard_normal((3, *shape), dtype=np.float32))
    settings = InferenceSettings(roi=(16, 16), batch_size=batch_size)
    return _sums(network, image, list(block.windows()), origin, shape, settings, torch.device("cpu"), block)


@pytest.mark.timeout(60)
def test_a_block_queues_its_next_batch_before_waiting_for_one_and_sums_as_batches_run_one_at_a_time():
    """With halves, the compute thread starts the next batch before it waits for the last, so the pool's threads
    go on while it adds that one up; a block's windows come in batches of even sizes, so that none is left short
    to run on the compute thread while the pool waits; a runner without halves gets MONAI's batches on the
    compute thread with all its torch threads; the block's sums are those of its batches run one at a time, bit
    for bit."""
    import threading

    from tilemask.backends import _halved
    from tilemask.models import torch_threads

    events, calls, lock, second = [], [], threading.Lock(), threading.Event()

    def run(windows):
        with lock:
            calls.append((threading.current_thread().name, torch.get_num_threads(), len(windows)))
            first_batch = len(calls) <= 2
        if first_batch:  # unless the second batch is queued meanwhile, answered after 10 s, in the wrong order
            second.wait(timeout=10)
        events.append("answered")
        return windows[:, :2] * 2 + 1  # window by window: the same answer in any batch

    def started(windows):
        events.append("started")
        if events.count("started") == 2:
            second.set()
        return submit(windows)

    caller = threading.current_thread().name
    with torch_threads(2):
        halves = _halved(run, "torch", (16, 16), 9)
        submit, halves.submit = halves.submit, started
        queued = _block_sums(halves, batch_size=9)  # 30 windows: 4 batches, of 8, 8, 7 and 7
        assert events[:2] == ["started", "started"], events  # the second batch started before the first answered
        assert events.count("started") == 4
        assert sorted((name.split("_")[0], *rest) for name, *rest in calls) == [
            ("tilemask-half", 1, 3)] * 2 + [("tilemask-half", 1, 4)] * 6  # fmt: skip
        calls.clear()
        one_at_a_time = _block_sums(run, batch_size=9)  # no halves: batches of 9, 9, 9 and 3 on this thread
        assert calls == [(caller, 2, 9)] * 3 + [(caller, 2, 3)]
    for got, expected in zip(queued, one_at_a_time, strict=True):
        assert torch.equal(got, expected) if isinstance(got, torch.Tensor) else got == expected


@pytest.mark.timeout(60)
def test_a_failed_batch_fails_the_block_with_no_half_left_running():
    """A half fails: the block fails once the other half is done, the batch queued behind it cancelled or done."""
    import threading
    import time

    from tilemask.backends import _halved
    from tilemask.models import torch_threads

    lock, running, started, answered = threading.Lock(), [0], [0], []

    def run(windows):
        with lock:
            started[0] += 1
            if started[0] == 1:  # the first half to start, of the first batch
                raise RuntimeError("the network refuses this half")
            running[0] += 1
        time.sleep(0.3)
        with lock:
            running[0] -= 1
            answered.append(len(windows))
        return windows[:, :2]

    with torch_threads(2):
        halves = _halved(run, "torch", (16, 16), 8)
        submit = halves.submit
        submitted = []
        halves.submit = lambda windows: submitted.append(len(windows)) or submit(windows)
        with pytest.raises(RuntimeError, match="refuses this half"):
            _block_sums(halves)
        assert running == [0], "the block failed while a half still ran"
    assert submitted == [8, 8], "no batch queued behind the failed one, or more started after it"
    assert 1 <= len(answered) <= 3


def test_a_torchscript_2d_network_over_slices_runs_in_torch_mkldnn(tmp_path, monkeypatch):
    """``inference.slice_axis`` wraps the network so it takes a window one slice across: a TorchScript archive's was
    wrapped in an eager module, which torch-mkldnn (it needs TorchScript) refused ("the network is not TorchScript
    and cannot be traced"), where the same archive without ``slice_axis`` ran in it; ``auto`` lost it so."""
    from tilemask.inference import probe_network
    from tilemask.models import load_model
    from tilemask.settings import InferenceSettings, ModelSpec

    monkeypatch.setenv("TILEMASK_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    torch.jit.script(torch.nn.Conv2d(3, 2, 3, padding=1).eval()).save(str(tmp_path / "net.pt"))
    spec = ModelSpec.create("", {}, str(tmp_path / "net.pt"), slice_axis=1)
    settings = InferenceSettings(roi=(32, 1, 32), batch_size=2, device="cpu", backend="torch-mkldnn")
    channels, backend, _ = probe_network(spec, settings, 3)
    assert (channels, backend) == (2, "torch-mkldnn")
    window = torch.rand(2, 3, 32, 1, 32)
    network = torch.jit.load(str(tmp_path / "net.pt")).eval()
    with torch.inference_mode():
        expected = network(window[:, :, :, 0])[:, :, :, None]
        torch.testing.assert_close(load_model(spec)(window), expected)
