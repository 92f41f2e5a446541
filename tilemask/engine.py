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
a 100-gigapixel job stays near 50,000 tasks.  What every task shares (source,
model, settings, sink) sits once in the graph under its own key.  The client
holds the futures and releases each partial as soon as every chunk that needs
it is written, so memory follows the chunks in flight, not the image.

A run that fails cancels its tasks, waits until none is still executing, and
removes its output (:meth:`~tilemask.sinks.LabelSink.abort`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import dask
import numpy as np
import zarr
from dask.base import tokenize
from distributed import Client, as_completed

from . import __version__
from .cluster import cancel_and_drain, cluster_client, prepare_workers
from .errors import InputError, OutputError, TilemaskError, WorkflowError
from .geometry import Block, Region, WindowPlan
from .inference import InferenceSettings, predict_block
from .models import ModelSpec, load_model
from .preprocess import Preprocessing
from .progress import window_progress
from .quicklook import write_quicklook
from .sinks import LabelSink, OutputLayout, make_sink
from .sinks.zarr import ZarrSink
from .sources import ImageSource, open_source
from .sources.labels import open_labels
from .sources.raster import RasterSource
from .stats import compute_from_config
from .stats.config import PostprocessConfig
from .stats.postprocess import apply as postprocess
from .stitch import (
    Partial,
    activate,
    cut,
    encode_probabilities,
    labels_dtype,
    labels_from_sums,
    overlap_add,
    to_labels,
)
from .vectors import write_polygons
from .workflow import REMOTE_PREFIXES, Workflow

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
    commit_seconds: float = 0.0  # of ``seconds``: making the output whole (COG assembly, NIfTI compression)


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
    """The task graph, the block of each predict key, and the dependencies of each key the client holds.

    Three layers: ``predict`` (one per block: its windows' weighted sums over the
    block's region), ``halo`` (one per block that reaches into other chunks: the
    parts of its sums that fall in them, cut out so the whole partial can be
    freed as soon as its own chunk is written), and ``chunk`` (one per output
    chunk: its own block's sums plus its neighbours' halos, then blend, label and
    write).  Memory then holds whole partials only for blocks in flight, and the
    thin halo strips along the frontier of finished chunks.
    """
    token = tokenize(job.input, job.plan, job.model, job.settings, job.finishing, job.sink.path, job.sink.layout.run_id)
    names = {layer: f"tilemask-{layer}-{token}" for layer in ("predict", "halo", "chunk")}
    shared = {f"tilemask-{name}-{token}": value for name, value in (
        ("source", job.source), ("model", job.model), ("settings", job.settings),
        ("preprocessing", job.preprocessing), ("finishing", job.finishing), ("sink", job.sink),
    )}  # fmt: skip
    source, model, settings, preprocessing, finishing, sink = shared
    plan = job.plan
    graph: dict = dict(shared)
    blocks: dict[tuple, Block] = {}
    deps: dict[tuple, list[tuple]] = {}
    for index in plan.block_indexes():
        key = (names["predict"], *index)
        blocks[key] = plan.block(index)
        graph[key] = (predict_block, blocks[key], source, model, settings, preprocessing)
        deps[key] = []
        others = {c: plan.chunk_region(c) for c in plan.chunks_overlapping(blocks[key].region) if c != index}
        if others:
            deps[(names["halo"], *index)] = [key]
            graph[(names["halo"], *index)] = (cut, key, others)
    for index in plan.chunk_indexes():
        key = (names["chunk"], *index)
        own = (names["predict"], *index) if (names["predict"], *index) in blocks else None
        halos = [(names["halo"], *b) for b in plan.sources_of(index) if b != index]
        deps[key] = ([own] if own else []) + halos
        graph[key] = (finish_chunk, index, plan.chunk_region(index), finishing, sink, own, halos)
    return graph, blocks, deps


def finish_chunk(
    index: tuple[int, ...],
    region: Region,
    finishing: Finishing,
    sink: LabelSink,
    own: Partial | None,
    halos: list[dict[tuple[int, ...], Partial]],
) -> np.ndarray:
    """Blend, activate, label and write one output chunk; return its class histogram."""
    partials = ([own] if own is not None else []) + [h[index] for h in halos if index in h]
    weighted, weights, valid = overlap_add(region, partials)
    dtype = np.dtype(finishing.labels_dtype)
    encoded = None
    if finishing.probabilities == "none":
        labels = labels_from_sums(weighted, weights, finishing.activation, finishing.threshold, dtype)
    else:
        weighted /= weights
        probabilities = activate(weighted, finishing.activation)
        labels = to_labels(probabilities, finishing.activation, finishing.threshold, dtype)
        if valid is not None:
            probabilities[:, ~valid] = 0.0
        encoded = encode_probabilities(probabilities, finishing.probabilities)
    if valid is not None:
        labels[~valid] = finishing.nodata
    write_chunk(sink, region, labels, encoded)
    return class_histogram(labels, finishing.n_classes, finishing.nodata)


def write_chunk(sink: LabelSink, region: Region, labels: np.ndarray, probabilities: np.ndarray | None) -> None:
    """``sink.write`` with storage errors named as one :class:`OutputError` (no foreign exception chain)."""
    try:
        sink.write(region, labels, probabilities)
        return
    except (OSError, RuntimeError, ValueError) as exc:  # GDAL, zarr stores and memmap raise these
        detail = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    raise OutputError(f"{sink.path}: writing chunk {region} failed: {detail}")


def class_histogram(labels: np.ndarray, n_classes: int, nodata: int | None) -> np.ndarray:
    """Pixels per class, nodata left out."""
    counted = labels if nodata is None else labels[labels != nodata]
    return np.bincount(counted.ravel(), minlength=n_classes)[:n_classes]


# -- execution ------------------------------------------------------------------------------------


def execute(client: Client, job: Job, progress: bool = True) -> RunResult:
    """Run one job on the cluster: write the output, or remove it and raise."""
    start = time.perf_counter()
    graph, blocks, deps = build_graph(job)
    consumers = Counter(d for ds in deps.values() for d in ds)
    totals = np.zeros(job.finishing.n_classes, np.int64)
    held: dict = {}
    try:
        job.sink.create()
        held = dict(zip(deps, client.get(graph, list(deps), sync=False)))
        with window_progress(job.plan.n_windows, Path(job.input).name, enabled=progress) as advance:
            for future in as_completed(list(held.values())):
                if future.status == "error":
                    future.result()  # raises the task's exception
                key = future.key
                if key in blocks:
                    advance(blocks[key].n_windows)
                elif consumers[key] == 0:  # a chunk: its class histogram
                    totals += future.result()
                for dep in deps[key]:  # a result is released once everything that needs it is done
                    consumers[dep] -= 1
                    if consumers[dep] == 0:
                        _release(held, dep)
                if consumers[key] == 0:
                    _release(held, key)
        committing = time.perf_counter()
        outputs = client.submit(job.sink.commit, pure=False).result()  # a worker sees the output folder
        commit_seconds = time.perf_counter() - committing
    except BaseException:
        cancel_and_drain(client, list(held.values()))
        job.sink.abort()
        raise
    return RunResult(
        input=job.input,
        outputs=outputs,
        windows=job.plan.n_windows,
        tasks=len(graph),
        seconds=time.perf_counter() - start,
        class_pixels=dict(zip(job.sink.layout.class_names, map(int, totals))),
        commit_seconds=commit_seconds,
    )


def _release(held: dict, key) -> None:
    future = held.pop(key, None)
    if future is not None:
        future.release()


def execute_postprocessed(client: Client, job: Job, config: PostprocessConfig, progress: bool) -> RunResult:
    """Predict into a hidden raw Zarr, clean the labels up, then write them to the real sink.

    Post-processing needs labels across chunk borders (components, halos), so it
    runs on the finished raw labels; the cleaned chunks and the raw probabilities
    are then written chunk by chunk to the output the workflow asked for.
    """
    final = job.sink
    target = Path(final.path.rstrip("/"))
    raw = ZarrSink(str(target.with_name(f".{target.name}.raw-{final.layout.run_id}.zarr")), final.layout)
    result = execute(client, replace(job, sink=raw), progress=progress)
    futures: list = []
    try:
        image = open_labels(raw.path, job.plan.chunks)
        cleaned = postprocess(image.array, config, nodata=image.nodata, client=client).rechunk(job.plan.chunks)
        final.create()
        regions = [job.plan.chunk_region(i) for i in job.plan.chunk_indexes()]
        copy = dask.delayed(_copy_chunk, pure=False)
        futures = client.compute(
            [copy(r, block, final, raw.path, job.finishing) for r, block in zip(regions, cleaned.to_delayed().ravel())]
        )
        totals = np.sum(client.gather(futures), axis=0)
        result.outputs = client.submit(final.commit, pure=False).result()
    except BaseException:
        cancel_and_drain(client, futures)
        final.abort()
        raise
    finally:
        raw.abort()
    result.class_pixels = dict(zip(final.layout.class_names, map(int, totals)))
    return result


def _copy_chunk(region: Region, labels: np.ndarray, sink: LabelSink, raw_path: str, finishing: Finishing) -> np.ndarray:
    """Write one cleaned chunk (and the raw probabilities) to the final sink; return its histogram."""
    probabilities = None
    if sink.layout.writes_probabilities:
        array = zarr.open_array(f"{raw_path}/probabilities", mode="r")
        probabilities = array[(slice(None), *(slice(lo, hi) for lo, hi in region))]
    labels = labels.astype(finishing.labels_dtype, copy=False)
    write_chunk(sink, region, labels, probabilities)
    return class_histogram(labels, finishing.n_classes, finishing.nodata)


def write_derived(workflow: Workflow, job: Job, labels_path: str, client: Client) -> list[str]:
    """What is made from the finished labels: polygons, the quick look (2D rasters), statistics."""
    written = []
    vectors = workflow.vectors_path(job.input)
    if vectors:
        written.append(write_polygons(labels_path, vectors, client=client, class_names=job.sink.layout.class_names))
    if workflow.output.quicklook and isinstance(job.source, RasterSource):
        png = str(Path(job.sink.path.rstrip("/")).with_suffix(".png"))
        bands = list(job.source.bands)
        written.append(client.submit(write_quicklook, job.input, labels_path, png, bands, pure=False).result())
    stats = workflow.stats_for(job.input)
    if stats:
        written.append(str(compute_from_config(labels_path, stats, client=client)))
    return written


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

    All inputs are planned and checked (metadata, channels, weights, output
    paths) before any work starts, so an invalid workflow fails fast with
    nothing written.  Anything that fails after that is a run failure (exit 1).
    """
    if not isinstance(workflow, Workflow):
        workflow = Workflow.from_yaml(workflow)
    jobs = [plan_job(workflow, path) for path in workflow.input_paths()]
    check_jobs(workflow, jobs)
    load_model(jobs[0].model, "cpu")  # weights exist, are safe and fit the network
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(cluster_client(scheduler, workers, threads_per_worker))
        prepare_workers(client)
        if progress:
            print(f"dask dashboard: {client.dashboard_link}", flush=True)
        results = []
        for job in jobs:
            try:
                if workflow.postprocess and workflow.postprocess.active:
                    result = execute_postprocessed(client, job, workflow.postprocess, progress)
                else:
                    result = execute(client, job, progress=progress)
                result.outputs += write_derived(workflow, job, result.outputs[0], client)
            except TilemaskError as exc:
                if exc.exit_status == 1:
                    raise
                raise TilemaskError(str(exc)) from exc  # found by a worker mid-run: a run failure
            except Exception as exc:  # a worker died, a write failed: name the input
                raise TilemaskError(f"{job.input}: {type(exc).__name__}: {exc}") from exc
            results.append(result)
        return results


def check_jobs(workflow: Workflow, jobs: list[Job]) -> None:
    """Checks across inputs and of the derived outputs, before any work."""
    outputs = Counter(job.sink.path for job in jobs)
    clash = [path for path, n in outputs.items() if n > 1]
    if clash:
        raise WorkflowError(f"output.path: several inputs would write {clash[0]}; use {{stem}} in the path")
    for job in jobs:
        stats = workflow.stats_for(job.input)
        if stats and stats.regions and not stats.regions.startswith(REMOTE_PREFIXES) and not Path(stats.regions).exists():
            raise InputError(f"stats.regions: no such file {stats.regions}")
