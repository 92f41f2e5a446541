"""The Dask graph: the only module that knows it.

For each input the engine builds a two-layer graph over the output chunk grid:

* ``tilemask-predict-<token>``, one task per chunk that owns windows: read the
  block, predict its windows once, return weighted partial sums (a
  :class:`~tilemask.stitch.Partial`);
* ``tilemask-chunk-<token>``, one task per output chunk: add the partials of the
  (at most ``2**ndim`` when ``roi <= chunk``) blocks that reach into it, divide,
  activate, write labels (and probabilities) to the sink, return the class
  histogram of the chunk.

That is about two tasks per chunk: 512 per gigapixel with 2048-pixel chunks, so
a 100-gigapixel job stays near 50,000 tasks.  The client holds the futures and
releases each partial as soon as every chunk that needs it is written, so
memory follows the chunks in flight, not the image.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from dask.base import tokenize
from distributed import Client, LocalCluster, WorkerPlugin, as_completed

from . import __version__
from .errors import InputError, TilemaskError
from .geometry import Block, Region, WindowPlan
from .inference import InferenceSettings, predict_block
from .models import ModelSpec, load_model, set_torch_threads
from .preprocess import Preprocessing
from .quicklook import write_quicklook
from .sinks import LabelSink, OutputLayout, make_sink
from .sources import ImageSource, open_source
from .sources.raster import RasterSource
from .stitch import Partial, activate, blend, encode_probabilities, labels_dtype, to_labels
from .vectors import write_polygons
from .workflow import Workflow

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finishing:
    """What a chunk task does after blending."""

    activation: str
    threshold: float
    n_classes: int
    labels_dtype: str
    probabilities: str  # none | float32 | uint8
    nodata: int | None = None  # label of invalid input pixels


@dataclass
class Job:
    """Everything one input's run needs, checked before any work starts."""

    input: str
    source: ImageSource
    plan: WindowPlan
    model: ModelSpec
    settings: InferenceSettings
    preprocessing: Preprocessing
    finishing: Finishing
    sink: LabelSink


@dataclass
class RunResult:
    input: str
    outputs: list[str]
    windows: int
    tasks: int
    seconds: float
    class_pixels: dict[str, int] = field(default_factory=dict)


# -- planning (client side, no cluster needed) ----------------------------------------------------


def plan_job(workflow: Workflow, input_path: str) -> Job:
    """Open the input's metadata, check it against the workflow and lay out the output."""
    spatial_dims = len(workflow.inference.roi_size)
    source = open_source(input_path, spatial_dims, workflow.preprocess.bands)
    check_source(workflow, source)
    plan = WindowPlan.build(
        source.spatial_shape, workflow.inference.roi_size, workflow.inference.overlap, workflow.output.chunks
    )
    inference = workflow.inference
    model = ModelSpec.create(workflow.model.network, workflow.model.args, workflow.resolve(workflow.model.weights))
    out_channels = int(workflow.model.args.get("out_channels", workflow.n_classes))
    # invalid pixels get the largest value of the labels' type, one past the classes at least
    dtype = labels_dtype(workflow.n_classes + 1 if source.has_invalid else workflow.n_classes)
    finishing = Finishing(
        activation=inference.activation,
        threshold=inference.threshold,
        n_classes=workflow.n_classes,
        labels_dtype=dtype.name,
        probabilities=workflow.output.probabilities,
        nodata=int(np.iinfo(dtype).max) if source.has_invalid else None,
    )
    layout = OutputLayout(
        shape=plan.shape,
        chunks=plan.chunks,
        class_names=tuple(workflow.class_names),
        labels_dtype=finishing.labels_dtype,
        probability_channels=0 if finishing.probabilities == "none" else out_channels,
        probabilities_dtype=finishing.probabilities,
        geometry=source.geometry,
        reference=input_path,
        nodata=finishing.nodata,
        metadata={"version": __version__, "workflow": workflow.to_dict(), "input": input_path},
    )
    normalize = workflow.preprocess.normalize
    return Job(
        input=input_path,
        source=source,
        plan=plan,
        model=model,
        settings=InferenceSettings(
            roi=plan.roi,
            mode=inference.mode,
            sigma_scale=tuple(inference.sigma_scale) if isinstance(inference.sigma_scale, list) else inference.sigma_scale,
            batch_size=inference.batch_size,
            device=inference.device,
        ),
        preprocessing=Preprocessing(
            tuple(normalize.mean) if normalize else None, tuple(normalize.std) if normalize else None
        ),
        finishing=finishing,
        sink=make_sink(workflow.output_path(input_path), layout),
    )


def check_source(workflow: Workflow, source: ImageSource) -> None:
    """Checks that need the input: channels against ``in_channels`` and normalization."""
    in_channels = workflow.model.args.get("in_channels")
    if in_channels is not None and in_channels != source.channels:
        raise InputError(
            f"{source.path}: model.args.in_channels is {in_channels} but the input gives {source.channels} "
            "bands (select them with preprocess.bands)"
        )
    normalize = workflow.preprocess.normalize
    if normalize and len(normalize.mean) != source.channels:
        raise InputError(
            f"{source.path}: preprocess.normalize has {len(normalize.mean)} values for {source.channels} bands"
        )


# -- the graph ------------------------------------------------------------------------------------


def build_graph(job: Job) -> tuple[dict, dict[tuple, Block], dict[tuple, list[tuple]]]:
    """The task graph, the block of each predict key and the predict keys of each chunk key."""
    token = tokenize(job.input, job.plan, job.model, job.settings, job.finishing, job.sink.path, job.sink.layout.run_id)
    predict_name, chunk_name = f"tilemask-predict-{token}", f"tilemask-chunk-{token}"
    graph: dict = {}
    blocks: dict[tuple, Block] = {}
    for index in job.plan.block_indexes():
        key = (predict_name, *index)
        blocks[key] = job.plan.block(index)
        graph[key] = (predict_block, blocks[key], job.source, job.model, job.settings, job.preprocessing)
    needs: dict[tuple, list[tuple]] = {}
    for index in job.plan.chunk_indexes():
        key = (chunk_name, *index)
        needs[key] = [(predict_name, *b) for b in job.plan.sources_of(index)]
        graph[key] = (finish_chunk, job.plan.chunk_region(index), job.finishing, job.sink, needs[key])
    return graph, blocks, needs


def finish_chunk(region: Region, finishing: Finishing, sink: LabelSink, partials: list[Partial]) -> np.ndarray:
    """Blend, activate, label and write one output chunk; return its class histogram (nodata left out)."""
    blended, valid = blend(region, partials)
    probabilities = activate(blended, finishing.activation)
    labels = to_labels(probabilities, finishing.activation, finishing.threshold, np.dtype(finishing.labels_dtype))
    if valid is not None:
        labels[~valid] = finishing.nodata
        probabilities[:, ~valid] = 0.0
    encoded = None if finishing.probabilities == "none" else encode_probabilities(probabilities, finishing.probabilities)
    sink.write(region, labels, encoded)
    counted = labels if valid is None else labels[valid]
    return np.bincount(counted.ravel(), minlength=finishing.n_classes)[: finishing.n_classes]


# -- execution ------------------------------------------------------------------------------------


class TorchThreads(WorkerPlugin):
    """Gives each worker its share of its machine's cores for torch's intra-op threads."""

    name = "tilemask-torch-threads"

    def __init__(self, threads_by_host: dict[str, int]):
        self.threads_by_host = threads_by_host

    def setup(self, worker) -> None:
        busy = self.threads_by_host.get(worker.address.rsplit(":", 1)[0], worker.state.nthreads)
        set_torch_threads((os.cpu_count() or 1) // max(1, busy))


def default_workers() -> tuple[int, int]:
    """One single-threaded worker process per core (see README, "Execution")."""
    return max(1, os.cpu_count() or 1), 1


@contextlib.contextmanager
def cluster_client(
    scheduler: str | None = None, workers: int | None = None, threads_per_worker: int | None = None
) -> Iterator[Client]:
    """A client of ``scheduler``, or of an embedded ``LocalCluster`` closed on exit."""
    if scheduler:
        try:
            client = Client(scheduler)  # connect timeout: distributed.comm.timeouts.connect
        except OSError as exc:
            raise TilemaskError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
        with client:
            yield client
        return
    default_n, default_t = default_workers()
    with LocalCluster(
        n_workers=workers or default_n,
        threads_per_worker=threads_per_worker or default_t,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.CRITICAL if not logger.isEnabledFor(logging.DEBUG) else logging.INFO,
    ) as cluster, Client(cluster) as client:
        yield client


def register_torch_threads(client: Client) -> None:
    threads_by_host: Counter = Counter()
    for address, info in client.scheduler_info(n_workers=-1)["workers"].items():
        threads_by_host[address.split("://", 1)[-1].rsplit(":", 1)[0]] += info["nthreads"]
    client.register_plugin(TorchThreads({f"tcp://{h}": n for h, n in threads_by_host.items()}))


def execute(client: Client, job: Job, progress: bool = True) -> RunResult:
    """Run one job on the cluster: write the output, or remove it and raise."""
    start = time.perf_counter()
    graph, blocks, needs = build_graph(job)
    predict_keys, chunk_keys = list(blocks), list(needs)
    job.sink.create()
    pending_consumers = Counter(k for deps in needs.values() for k in deps)
    totals = np.zeros(job.finishing.n_classes, np.int64)
    try:
        futures = client.get(graph, predict_keys + chunk_keys, sync=False)
        held = dict(zip(predict_keys + chunk_keys, futures))
        del futures
        with _progress_bar(job.plan.n_windows, enabled=progress, label=Path(job.input).name) as advance:
            for future in as_completed(list(held.values())):
                if future.status == "error":
                    future.result()  # raises the task's exception
                key = future.key
                if key in blocks:
                    advance(blocks[key].n_windows)
                    continue
                totals += future.result()
                del held[key]
                for dep in needs[key]:
                    pending_consumers[dep] -= 1
                    if pending_consumers[dep] == 0:
                        held.pop(dep).release()
        outputs = job.sink.commit()
    except BaseException:
        _cancel_and_drain(client, list(held.values()) if "held" in locals() else [], graph)
        job.sink.abort()
        raise
    seconds = time.perf_counter() - start
    names = job.sink.layout.class_names
    return RunResult(
        input=job.input,
        outputs=outputs,
        windows=job.plan.n_windows,
        tasks=len(graph),
        seconds=seconds,
        class_pixels={names[i] if i < len(names) else str(i): int(n) for i, n in enumerate(totals)},
    )


def _cancel_and_drain(client: Client, futures: list, graph: dict, timeout: float = 60.0) -> None:
    """Cancel the run's tasks and wait until no worker thread still executes one.

    A cancelled task keeps running in its worker thread; waiting for it keeps a
    late chunk write from recreating files after the output was removed.
    """
    client.cancel(futures, force=True)
    keys = {str(k) for k in graph}
    deadline = time.monotonic() + timeout
    with contextlib.suppress(Exception):  # best effort: the cluster itself may be what failed
        while time.monotonic() < deadline:
            running = client.run(_running_keys)
            if not any(k in keys for ks in running.values() for k in ks):
                return
            time.sleep(0.1)


def _running_keys(dask_worker) -> list[str]:
    return [str(k) for k in dask_worker.active_keys]


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool, label: str):
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} windows"),
        TextColumn("{task.fields[rate]:.1f} windows/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    start = time.perf_counter()
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(label, total=total, rate=0.0)

        def advance(n: int) -> None:
            done = bar.tasks[0].completed + n
            bar.update(task, advance=n, rate=done / max(time.perf_counter() - start, 1e-9))

        yield advance


def run(
    workflow: Workflow | str | Path,
    client: Client | None = None,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    progress: bool = False,
) -> list[RunResult]:
    """Run a workflow on every input: on ``client``, on ``scheduler``, or on an embedded cluster.

    All inputs are planned and checked (metadata, channels, weights) before any
    work starts, so an invalid workflow fails fast with nothing written.
    """
    if not isinstance(workflow, Workflow):
        workflow = Workflow.from_yaml(workflow)
    jobs = [plan_job(workflow, path) for path in workflow.input_paths()]
    load_model(jobs[0].model, "cpu")  # weights exist, are safe and fit the network
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(cluster_client(scheduler, workers, threads_per_worker))
        register_torch_threads(client)
        logger.info("dask dashboard: %s", client.dashboard_link)
        results = []
        for job in jobs:
            try:
                result = execute(client, job, progress=progress)
                result.outputs += write_derived(workflow, job, result.outputs[0], client)
            except TilemaskError:
                raise
            except Exception as exc:  # a worker died, a write failed: name the input
                raise TilemaskError(f"{job.input}: {type(exc).__name__}: {exc}") from exc
            results.append(result)
        return results


def write_derived(workflow: Workflow, job: Job, labels_path: str, client: Client) -> list[str]:
    """What is made from the finished labels: polygons and the quick look (2D rasters)."""
    written = []
    vectors = workflow.vectors_path(job.input)
    if vectors:
        written.append(write_polygons(labels_path, vectors, client=client, class_names=job.sink.layout.class_names))
    if workflow.output.quicklook and isinstance(job.source, RasterSource):
        png = str(Path(job.sink.path.rstrip("/")).with_suffix(".png"))
        written.append(write_quicklook(job.input, labels_path, png, list(job.source.bands)))
    return written
