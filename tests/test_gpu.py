"""The CUDA path, where the machine has a GPU (skipped here: none of this project's CI machines has one).

Run on a lent GPU by ``benchmarks/gpu/check.sh``: MONAI's answer on the same GPU, the weighting, sums and
blending on the GPU, one embedded worker per GPU, and the reduced precisions as MONAI's ``torch.autocast`` on
CUDA.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import zarr

import tilemask
from tilemask.workflow import Workflow

from .conftest import UNET_2D, UNET_3D, probe_twice, raster_workflow
from .test_fidelity import monai_probabilities, run_zarr

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def monai_on_gpu(image: np.ndarray, net, precision: str = "float32") -> np.ndarray:
    """MONAI's probabilities at ``raster_workflow``'s settings, all on the GPU, under ``torch.autocast`` in ``precision``."""
    enabled = precision != "float32"
    with torch.autocast("cuda", dtype=getattr(torch, precision), enabled=enabled):
        return monai_probabilities(image, net, (64, 64), 0.25, "gaussian", 127.0, 60.0, device="cuda")


def float32_cuda_backends(dask_worker) -> list[str]:
    """What ``auto`` chose for this worker's float32 networks on a GPU (``tilemask.backends``' cached runners;
    a key holds the device second, the precision fourth), for ``client.run``."""
    from tilemask import backends

    return [name for key, (name, _) in backends._runners.items() if key[1].startswith("cuda") and key[3] == "float32"]


GRAPH_OF_4 = "torch, replayed as a CUDA graph of 4 windows"  # raster_workflow's batch_size: 4


def test_a_cuda_run_gives_monais_answer_on_the_same_gpu(make_raster, make_model, tmp_path, client):
    path, image = make_raster((3, 203, 317))
    weights, net = make_model()
    probs, labels, _ = run_zarr(raster_workflow(path, weights, inference={"device": "cuda"}), tmp_path, client)
    used = client.run(lambda: __import__("torch").cuda.max_memory_allocated())
    assert max(used.values()) > 0, "the workers computed on the GPU"
    chosen = client.run(float32_cuda_backends)
    assert {n for names in chosen.values() for n in names} == {GRAPH_OF_4}, f"the workers replayed the graph: {chosen}"
    expected = monai_on_gpu(image, net)
    np.testing.assert_allclose(probs, expected, atol=1e-3)  # cuDNN's TF32 convolutions, batched otherwise
    top2 = np.sort(expected, axis=0)[-2:]
    assert np.all((labels == expected.argmax(0)) | (top2[1] - top2[0] < 2e-3)), "labels differ away from ties"


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_reduced_precision_on_cuda_is_monai_under_autocast(make_raster, make_model, tmp_path, client, precision):
    path, image = make_raster((3, 203, 317))
    weights, net = make_model()
    workflow = raster_workflow(path, weights, inference={"device": "cuda", "precision": precision})
    probs, _, _ = run_zarr(workflow, tmp_path, client)
    expected, full = monai_on_gpu(image, net, precision), monai_on_gpu(image, net)
    to_autocast, to_float32 = np.abs(probs - expected), np.abs(expected - full)
    assert to_autocast.max() < to_float32.max() / 2 and to_autocast.mean() < to_float32.mean() / 3


@pytest.mark.parametrize("args, channels, roi", [(UNET_2D, 3, (64, 64)), (UNET_3D, 1, (32, 32, 32))])
def test_auto_on_cuda_replays_a_cuda_graph_that_keeps_the_networks_answer(make_model, caplog, args, channels, roi):
    from tilemask.backends import cached_runner
    from tilemask.settings import InferenceSettings, ModelSpec

    weights, net = make_model(args)
    settings = InferenceSettings(roi=roi, batch_size=4, backend="auto")
    caplog.set_level(logging.INFO, logger="tilemask.backends")  # why a graph was refused, in the failure
    backend, run = cached_runner(ModelSpec.create("UNet", args, str(weights)), settings, channels, torch.device("cuda"))
    assert backend == "torch, replayed as a CUDA graph of 4 windows", caplog.text
    net = net.cuda()
    answers = []
    for n in (4, 3, 4):  # full batches replay the graph; a block's last and shorter one runs eagerly
        windows = torch.randn((n, channels, *roi), device="cuda")
        with torch.inference_mode():
            got, expected = run(windows), net(windows)
        assert got.shape == expected.shape
        assert (torch.softmax(got, 1) - torch.softmax(expected, 1)).abs().max() < 1e-4
        answers.append((got, expected))
    first, first_expected = answers[0]  # still the first batch's answer after later replays: a tensor of its own
    assert (torch.softmax(first, 1) - torch.softmax(first_expected, 1)).abs().max() < 1e-4


def test_the_embedded_cluster_has_one_worker_per_gpu_and_auto_uses_it(make_raster, make_model, tmp_path):
    from tilemask.cluster import THREADS_PER_WORKER, available_cores, cluster_client, default_workers

    gpus = torch.cuda.device_count()
    assert default_workers() == (gpus, max(THREADS_PER_WORKER, available_cores() // gpus))
    path, _ = make_raster((3, 150, 170))
    weights, _ = make_model()
    with cluster_client() as client:
        names = {address: w["name"] for address, w in client.scheduler_info()["workers"].items()}
        assert sorted(names.values()) == list(range(gpus))
        run_zarr(raster_workflow(path, weights, inference={"device": "auto"}), tmp_path, client)
        used = client.run(lambda: [__import__("torch").cuda.max_memory_allocated(i) for i in range(gpus)])
    for address, per_gpu in used.items():  # worker i on GPU i, and nothing of it on another GPU
        assert [n > 0 for n in per_gpu] == [i == names[address] for i in range(gpus)], used


def test_blocks_copied_on_their_threads_streams_beside_the_compute_stream_give_monais_answer(
    make_raster, make_model, tmp_path
):
    """110 blocks through one worker with 8 Dask threads: each thread copies its block in, its strips of
    neighbours' sums out and its chunk's labels back on a stream of its own, and blends the chunk there, while
    the compute thread runs other blocks; a copy or a blend not ordered by its event would read or free a
    buffer too early and show here as a wrong answer.  Then labels alone (argmax of the sums on the GPU)."""
    from tilemask.cluster import cluster_client

    path, image = make_raster((3, 640, 704))
    weights, net = make_model()
    workflow = raster_workflow(path, weights, inference={"device": "cuda"}, output={"chunks": 64})
    expected = monai_on_gpu(image, net)
    top2 = np.sort(expected, axis=0)[-2:]
    with cluster_client(workers=1, threads_per_worker=8) as client:
        probs, _, result = run_zarr(workflow, tmp_path, client)
        assert result.windows > 100
        np.testing.assert_allclose(probs, expected, atol=1e-3)
        assert list(client.run(float32_cuda_backends).values()) == [[GRAPH_OF_4]], "the compute stream replayed the graph"
        wf = Workflow.from_dict(workflow, ["output.probabilities=none"], base_dir=tmp_path)
        (result,) = tilemask.run(wf, client, overwrite=True)
        labels = zarr.open_group(result.outputs[0], mode="r")["labels"][:]
        assert np.all((labels == expected.argmax(0)) | (top2[1] - top2[0] < 2e-3)), "labels differ away from ties"


CUDA_PROBE = """
import sys, numpy, torch
from tilemask.backends import cached_runner
from tilemask.settings import InferenceSettings, ModelSpec
spec = ModelSpec.create("UNet", {args!r}, {weights!r})
settings = InferenceSettings(roi=(64, 64), batch_size=4, backend="auto")
backend, run = cached_runner(spec, settings, 3, torch.device("cuda", 0))  # a worker's device is indexed
windows = torch.from_numpy(numpy.random.default_rng(1).standard_normal((4, 3, 64, 64), dtype="float32")).cuda()
with torch.inference_mode():
    torch.save(run(windows).cpu(), sys.argv[1])
print("monai" in sys.modules, "|", backend)
"""


@pytest.mark.timeout(240)  # two fresh processes importing torch and CUDA, the first MONAI too (16 s on an H200 host)
def test_on_a_gpu_the_network_is_traced_once_and_later_workers_load_it_without_monai(make_model, tmp_path):
    weights, net = make_model()
    answers = probe_twice(CUDA_PROBE.format(args=UNET_2D, weights=str(weights)), tmp_path, timeout=110)
    assert answers[0] == f"True | {GRAPH_OF_4}"  # built with MONAI, traced on the GPU, cached, captured
    assert answers[1] == f"False | {GRAPH_OF_4}"  # read from the cache: MONAI never imported
    assert list((tmp_path / "cache" / "torchscript").glob("*.cuda0.gpu*.cudnn*.pt"))
    first, second = (torch.load(tmp_path / f"out{n}.pt") for n in range(2))
    assert torch.equal(first, second)  # the cached trace replays as the traced network did, bit for bit
    windows = torch.from_numpy(np.random.default_rng(1).standard_normal((4, 3, 64, 64), dtype="float32")).cuda()
    with torch.inference_mode():
        expected = net.cuda()(windows).cpu()
    assert (torch.softmax(first, 1) - torch.softmax(expected, 1)).abs().max() < 1e-4
