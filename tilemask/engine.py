"""The Dask graph: the only module that knows it.

For each input the engine builds a three-layer graph over the output chunk grid
(:func:`build_graph`):

* ``tilemask-predict-<token>``, one task per chunk that owns windows: read the
  block, predict its windows once, return weighted partial sums (a
  :class:`~tilemask.stitch.Partial`);
* ``tilemask-halo-<token>``, one per block that reaches into other chunks: the
  strips of its sums that fall in them, so the whole partial can be freed as
  soon as its own chunk is written;
* ``tilemask-chunk-<token>``, one task per output chunk: add its own block's
  sums and its neighbours' halos, finalize (:mod:`tilemask.finalize`; on a GPU
  :mod:`tilemask.finalize_device`, where the block's sums stayed), write labels
  (and probabilities) to the sink, return the class histogram.

That is under three tasks per chunk: about 720 per gigapixel with 2048-pixel
chunks, so a 100-gigapixel job stays near 72,000 tasks.  What every task shares
(source, model, settings, sink) sits once in the graph under one key.  The
client holds the futures and releases each result as soon as everything that
needs it is done, so memory follows the chunks in flight, not the image.  The
output is made whole by a task on a worker (which sees the output folder).

Planning (:mod:`tilemask.planning`), the numbers of a chunk
(:mod:`tilemask.finalize`) and the derived products (:mod:`tilemask.products`)
live elsewhere; this module builds and runs the graph.  The client never
imports torch: the model is probed and run on workers only.

A run that fails cancels its tasks, waits until none is still executing, and
removes what it staged (:meth:`~tilemask.sinks.LabelSink.abort`); a Ctrl-C or
SIGTERM during that cleanup is held off.  A job's run that is interrupted
rather than failed keeps its staged chunks and their :class:`Ledger`, and the
job's next run writes only the others.  Errors keep their type; one found
while running exits 1 (``exit_status``), one found before any work exits 2.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import dask
import numpy as np
from distributed import Client

from . import timing
from .cluster import Abandoned, cancel_and_drain, cluster_failures, completed, gather, not_abandoned, result_of
from .errors import NoWorkers, OutputError, TilemaskError
from .finalize import class_histogram, finalize
from .geometry import Block, Region, WindowPlan, intersect, local_slices
from .interrupts import raise_if_stopped, shielded
from .outputs import describe_write_error, output_step, remove
from .planning import Inversion, Job, WorkflowPlan
from .preprocess import Preprocessing
from .products import write_products
from .progress import stage, window_progress
from .settings import Finishing, InferenceSettings, ModelSpec
from .sinks import LabelSink
from .sources import ImageSource
from .stats.config import PostprocessConfig
from .stitch import DevicePartial, Partial, cut, overlap_add
from .storage import redacted

if TYPE_CHECKING:
    from .sinks.zarr import ZarrSink

logger = logging.getLogger(__name__)

@dataclass
class RunResult:
    input: str
    outputs: list[str]
    windows: int | None  # predicted in this run; None: it failed here (how many it predicted is not known)
    tasks: int
    seconds: float
    class_pixels: dict[str, int] = field(default_factory=dict)
    commit_seconds: float = 0.0  # of ``seconds``: making the output whole (COG assembly, NIfTI compression)
    status: str = "ok"  # ok | skipped (ok in an earlier run of the job) | failed
    error: str | None = None
    name: str = ""  # the item's name in its job ({stem}; a STAC Item's id, a case's name), set by the driver
    resumed_chunks: int = 0  # chunks an interrupted run of the job had written, taken as they were

    @property
    def named(self) -> str:
        """The input as a line of the run names it: its (first) file or URL, credentials hidden, after the item's
        name where that is not the file's own (a STAC Item's id, a case read from one file per channel)."""
        from .inputs import input_name
        from .storage import redacted

        shown = redacted(self.input)
        return f"{self.name} ({shown})" if self.name and self.name != input_name(self.input) else shown

    @property
    def failed_before(self) -> bool:
        """Failed in an earlier run of the job, and not tried again (without ``--retry-failed``): no windows is
        "not known" only for a failure of this run."""
        return self.status == "failed" and self.windows is not None

# -- worker-side entry points (torch is imported there, never on the client) -----------------------

@dataclass(frozen=True)
class Shared:
    """What every task of one job's graph needs, held once under one key.

    One key, not one per part: Dask counts a task whose group depends on fewer
    than five tasks as a root task and spreads those over all workers as threads
    free up; with more, it places each predict task next to its dependencies,
    which all sit on the one worker that computed them.
    """

    source: ImageSource
    model: ModelSpec
    settings: InferenceSettings
    preprocessing: Preprocessing
    finishing: Finishing
    sink: LabelSink
    ledger: str | None = None  # the folder recording each chunk written (see :class:`Ledger`)
    token: str = ""  # the graph's

    def __dask_tokenize__(self):
        """The graph's token: Dask tokenizes every argument of a graph it is given, and this one holds the
        workflow (many small items would each spend milliseconds on it)."""
        return ("tilemask-shared", self.token)


def _shown_name(path: str) -> str:
    """An input's name in a stage's line: its file name, without a signed URL's credentials (its query holds them,
    and once the URL is cut to its last segment nothing shows it was a URL to redact)."""
    return Path(redacted(path)).name


def predict(block: Block, shared: Shared) -> Partial:
    from .inference import predict_block

    keep_weights = shared.finishing.needs_weights(shared.settings.blends)
    return predict_block(block, shared.source, shared.model, shared.settings, shared.preprocessing, keep_weights)

def probe_network(model: ModelSpec, settings: InferenceSettings, channels: int, windows: int | None = None,
                  measure_after: float = 0.0) -> tuple[int, str, InferenceSettings]:  # fmt: skip
    with timing.timed("probe: import"):  # torch, unless the worker's preload thread has imported it already
        from .inference import probe_network as probe

    return probe(model, settings, channels, windows, measure_after)

# -- the graph ------------------------------------------------------------------------------------

def build_graph(job: Job, written: Collection[tuple[int, ...]] = ()) -> tuple[dict, dict[tuple, Block], dict[tuple, list[tuple]]]:
    """The task graph, the block of each predict key, and the dependencies of each key the client holds.

    Three layers: ``predict`` (one per block: its windows' weighted sums over the
    block's region), ``halo`` (one per block that reaches into other chunks: the
    parts of its sums that fall in them, cut out so the whole partial can be
    freed as soon as its own chunk is written), and ``chunk`` (one per output
    chunk: its own block's sums plus its neighbours' halos, then blend, label and
    write).  Memory then holds whole partials only for blocks in flight, and the
    thin halo strips along the frontier of finished chunks.

    Chunks in ``written`` (by an interrupted run of the same job) get no task,
    nor do the blocks and halos only they need; a written chunk's block that an
    unwritten neighbour needs predicts only its windows that reach into the
    unwritten chunks.
    """
    token = uuid.uuid4().hex  # one graph per run of an item: unique is all a key needs
    names = {layer: f"tilemask-{layer}-{token}" for layer in ("predict", "halo", "chunk")}
    shared = f"tilemask-shared-{token}"
    plan = job.plan
    graph: dict = {shared: Shared(job.source, job.model, job.settings, job.preprocessing, job.finishing, job.sink, job.ledger, token)}
    blocks: dict[tuple, Block] = {}
    deps: dict[tuple, list[tuple]] = {}
    written = set(written)
    todo = [index for index in plan.chunk_indexes() if index not in written]
    for index, block in blocks_to_predict(plan, written).items():
        key = (names["predict"], *index)
        blocks[key] = block
        graph[key] = (predict, blocks[key], shared)
        deps[key] = []
        others = {c: plan.chunk_region(c) for c in plan.chunks_overlapping(blocks[key].region) if c != index and c not in written}
        if others:
            deps[(names["halo"], *index)] = [key]
            graph[(names["halo"], *index)] = (cut, key, others)
    for index in todo:
        key = (names["chunk"], *index)
        own = (names["predict"], *index) if (names["predict"], *index) in blocks else None
        halos = [(names["halo"], *b) for b in plan.sources_of(index) if b != index]
        deps[key] = ([own] if own else []) + halos
        graph[key] = (finish_chunk, index, plan.chunk_region(index), shared, own, halos)
    return graph, blocks, deps

def blocks_to_predict(plan: WindowPlan, written: set[tuple[int, ...]]) -> dict[tuple[int, ...], Block]:
    """Every block, or on resuming (``written``: chunks written before) the blocks the other chunks need: a
    written chunk's block with only its windows that reach into the unwritten chunks around it."""
    if not written:
        return {index: plan.block(index) for index in plan.block_indexes()}
    needed = {b for c in plan.chunk_indexes() if c not in written for b in plan.sources_of(c)}
    blocks = {}
    for index in plan.block_indexes():
        if index not in needed:
            continue
        block = plan.block(index)
        reached = [plan.chunk_region(c) for c in plan.chunks_overlapping(block.region) if c not in written]
        if index in written and reached:
            box = tuple((min(r[d][0] for r in reached), max(r[d][1] for r in reached)) for d in range(len(index)))
            block = block.reaching(box)
        blocks[index] = block
    return blocks


def finish_chunk(
    index: tuple[int, ...],
    region: Region,
    shared: Shared,
    own: Partial | None,
    halos: list[dict[tuple[int, ...], Partial]],
) -> np.ndarray:
    """Blend, finalize and write one output chunk; return its class histogram."""
    with timing.timed("blend"):
        others = [h[index] for h in halos if index in h]
        if isinstance(own, DevicePartial):  # its sums are on the worker's GPU: blended there
            from .finalize_device import finish_on_device

            labels, probabilities, histogram = finish_on_device(region, own, others, shared.finishing)
        else:
            weighted, weights, valid = overlap_add(region, ([own] if own is not None else []) + others)
            labels, probabilities, histogram = finalize(weighted, weights, valid, shared.finishing)
    with timing.timed("write"):
        write_chunk(shared.sink, region, labels, probabilities)
        if shared.ledger:
            Ledger(shared.ledger).record(index, histogram)
    return histogram


@dataclass(frozen=True)
class Ledger:
    """The chunks of a job's output written so far: one small file per chunk, ``<i>_<j>[_<k>].json`` holding
    its class histogram, written (atomically) once the chunk is.  A run that is interrupted (Ctrl-C, a cancel,
    a lost scheduler, a killed process) keeps its staged output and this folder; the job's next run reopens
    them and writes only the other chunks."""

    folder: str

    def record(self, index: tuple[int, ...], histogram: np.ndarray) -> None:
        """The chunk at ``index`` is written.  The ledger sits beside the staged output: a disk that the chunk
        just filled fails here, as one line naming the disk, and leaves no part of a record."""
        path = os.path.join(self.folder, "_".join(map(str, index)) + ".json")
        staged = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(staged, "w") as f:
                json.dump([int(v) for v in histogram], f)
            os.replace(staged, path)
        except OSError as exc:
            remove(staged)
            detail = describe_write_error(exc, path)
            raise OutputError(f"{path}: cannot record the chunk as written: {detail}") from None

    def written(self) -> dict[tuple[int, ...], np.ndarray]:
        found = {}
        for name in os.listdir(self.folder) if os.path.isdir(self.folder) else ():
            if name.endswith(".json") and name != "input.json":
                with open(os.path.join(self.folder, name)) as f:
                    found[tuple(int(v) for v in name[:-5].split("_"))] = np.asarray(json.load(f), np.int64)
        return found

    def stamp(self) -> list | None:
        """The job's ``stamps`` when this record was begun: its input's files' and the weights'."""
        try:
            with open(os.path.join(self.folder, "input.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def clear(self, stamp: list) -> None:
        remove(self.folder)
        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, "input.json"), "w") as f:
            json.dump(stamp, f)

def write_chunk(sink: LabelSink, region: Region, labels: np.ndarray, probabilities: np.ndarray | None) -> None:
    """``sink.write`` after checking the shapes, with storage errors named as one :class:`OutputError`."""
    sink.layout.check(region, labels, probabilities)
    try:
        sink.write(region, labels, probabilities)
        return
    except (OSError, RuntimeError, ValueError, SystemError) as exc:  # GDAL, zarr stores and memmap raise these
        detail = describe_write_error(exc, sink.path)
    raise OutputError(f"{sink.path}: writing chunk {region} failed: {detail}")

# -- execution ------------------------------------------------------------------------------------

def execute(client: Client, job: Job, progress: bool = True) -> RunResult:
    """Run one job on the cluster: write the output, or remove it and raise."""
    start = time.perf_counter()
    held: dict = {}
    try:
        written = _reopen(job)
        graph, blocks, deps = build_graph(job, written)
        consumers = Counter(d for ds in deps.values() for d in ds)
        totals = np.sum([np.zeros(job.finishing.n_classes, np.int64), *written.values()], axis=0)
        windows = sum(block.n_windows for block in blocks.values())
        if written:
            logger.info("%s: resuming: %d chunks written before; %d of %d windows to predict",
                        job.input, len(written), windows, job.plan.n_windows)  # fmt: skip
        held = dict(zip(deps, client.get(graph, list(deps), sync=False)))
        with window_progress(windows, _shown_name(job.input), enabled=progress) as advance:
            for future in completed(client, list(held.values())):
                if future.status == "error":
                    future.result()  # raises the task's exception
                key = future.key
                if key in blocks:
                    advance(blocks[key].n_windows)
                elif consumers[key] == 0:  # a chunk: its class histogram
                    totals += result_of(client, future)
                for dep in deps[key]:  # a result is released once everything that needs it is done
                    consumers[dep] -= 1
                    if consumers[dep] == 0:
                        _release(held, dep)
                if consumers[key] == 0:
                    _release(held, key)
        committing = time.perf_counter()
        with stage(f"{_shown_name(job.input)}: making {Path(job.sink.path).name} whole", enabled=progress):
            outputs = finish_and_publish(client, job.sink, held)
        commit_seconds = time.perf_counter() - committing
    except BaseException as exc:
        with shielded():  # no abort while any task, the commit included, may still write
            cancel_and_drain(client, list(held.values()))
            if not (job.ledger and interrupted(exc, client)):  # an interrupted job keeps what it wrote
                job.sink.abort()
                if job.ledger:
                    remove(job.ledger)
        raise
    if job.ledger:
        remove(job.ledger)
    return RunResult(
        input=job.input,
        outputs=outputs,
        windows=windows,
        tasks=len(graph),
        seconds=time.perf_counter() - start,
        class_pixels=dict(zip(job.sink.layout.class_names, map(int, totals))),
        commit_seconds=commit_seconds,
        resumed_chunks=len(written),
    )

def _reopen(job: Job) -> dict[tuple[int, ...], np.ndarray]:
    """Create the job's output, or reopen what an interrupted run of the same job staged: the chunks it
    wrote, with their class histograms (empty: start from nothing)."""
    stamp = job.stamps  # every file the input reads and the weights: any of them replaced (or not reached) starts over
    known = bool(stamp) and [None] not in stamp
    if job.ledger and job.sink.resumable and known and job.sink.reopen() and Ledger(job.ledger).stamp() == stamp:
        written = Ledger(job.ledger).written()
        if written:
            return written
    output_step(job.sink.create, job.sink.path)
    if job.ledger:
        Ledger(job.ledger).clear(stamp)
    return {}


def interrupted(exc: BaseException, client: Client) -> bool:
    """Whether the run was stopped rather than failed: Ctrl-C, SIGTERM, a cancel, another item's failure, the
    scheduler lost or every worker gone.  Its chunks are whole and worth keeping."""
    return isinstance(exc, (KeyboardInterrupt, Abandoned, NoWorkers)) or client.status != "running"


def finish_and_publish(client: Client, sink: LabelSink, held: dict) -> list[str]:
    """Make the output whole on a worker (which sees the output folder), then rename it into place.

    Two tasks: an interrupt while the first runs leaves only staged files, which
    the caller's cleanup removes once ``held``'s tasks have stopped.
    """
    held["finish"] = client.submit(output_step, sink.finish, sink.path, pure=False)
    gather(client, [held["finish"]])
    raise_if_stopped()  # the point of no return
    with not_abandoned():
        held["publish"] = client.submit(sink.publish, pure=False)
        (outputs,) = gather(client, [held["publish"]])
    return outputs


def deliver(client: Client, sink: LabelSink, progress: bool) -> None:
    """Send the output in place on where the workflow asks (:meth:`LabelSink.deliver`, a SEG's STOW-RS), a task on a
    worker, once the item's products are written too.  Any failure is :class:`Undelivered`: the output stands, and a
    retry of the item sends it alone; a stopped run does not wait for it (130 s to a stalled server)."""
    if not sink.delivery:
        return
    with stage(f"{Path(sink.path).name}: {sink.delivery}", enabled=progress):
        future = client.submit(sink.deliver, pure=False)
        try:
            gather(client, [future])
        except (Abandoned, KeyboardInterrupt) as stop:  # abandoned, or a stop Python swallowed in the main thread
            future.cancel()  # not drained: it writes no file, and may wait minutes on the server
            raise Undelivered(sink.undelivered(), stop) from None
        except TilemaskError as exc:  # the server's refusal (a worker or the scheduler lost is the item's failure)
            raise Undelivered(exc) from None


class Undelivered(Exception):
    """An output in place that was not sent on (:func:`deliver`): its item is recorded failed with ``error``, with
    its outputs, which a retry sends on alone; ``stop``, if the run was stopped meanwhile (a cancel, Ctrl-C), then
    goes on."""

    def __init__(self, error: Exception, stop: BaseException | None = None):
        super().__init__(str(error))
        self.error, self.stop = error, stop


def _release(held: dict, key) -> None:
    future = held.pop(key, None)
    if future is not None:
        future.release()

def predict_into(client: Client, job: Job, sink: LabelSink, progress: bool) -> RunResult:
    """Predict one input into ``sink`` (on the output grid): the z-score's statistics first when asked, then
    straight into the sink, or onto the model grid and back (:func:`execute_and_invert`)."""
    if job.preprocessing.needs_statistics:
        with stage(f"{_shown_name(job.input)}: intensity statistics", enabled=progress):
            job = replace(job, preprocessing=measure_statistics(client, job))
    if job.back is None:
        return execute(client, replace(job, sink=sink), progress=progress)
    return execute_and_invert(client, replace(job, sink=sink), progress)


def measure_statistics(client: Client, job: Job) -> Preprocessing:
    """The z-score fixed with the mean and standard deviation of the whole volume the network sees."""
    from .preprocess import combine

    plan, preprocessing = job.plan, job.preprocessing
    regions = [plan.chunk_region(i) for i in plan.chunk_indexes()]
    mean, std = combine(_per_chunk(client, chunk_moments, regions, source=job.source, preprocessing=preprocessing))
    logger.info("%s: z-score mean %s, std %s", job.input, mean, std)
    return preprocessing.with_statistics(mean, std)


def _per_chunk(client: Client, task: Callable, regions: list[Region], **shared) -> list:
    """``task(region, **shared)`` for each region on the cluster, gathered; on any failure, stopped."""
    futures = client.map(task, regions, **shared, pure=False)
    try:
        return gather(client, futures)
    except BaseException:
        with shielded():
            cancel_and_drain(client, futures)
        raise


def nonzero_box(client: Client, job: Job) -> Region | None:
    """The box of the input voxels nonzero in some channel (nnU-Net's ``crop_to_nonzero``; filling the mask's
    holes, as it does, leaves its box as it is), or None where that is the whole input or no voxel is nonzero
    (nnU-Net's ``get_bbox_from_mask`` then keeps the whole)."""
    source, plan = job.back.source, job.back.plan
    boxes = [b for b in _per_chunk(client, chunk_nonzero_box, [plan.chunk_region(i) for i in plan.chunk_indexes()],
                                   source=source) if b is not None]  # fmt: skip
    if not boxes:
        return None
    box = tuple((min(b[a][0] for b in boxes), max(b[a][1] for b in boxes)) for a in range(len(plan.shape)))
    if box == tuple((0, size) for size in plan.shape):
        return None
    logger.info("%s: the network sees the box %s of its nonzero voxels", job.input, [list(b) for b in box])
    return box


def chunk_nonzero_box(region: Region, source: ImageSource) -> Region | None:
    """The box of the voxels of ``region`` nonzero in some channel (NaN counts), in the source's voxels."""
    nonzero = (source.read(region) != 0).any(axis=0)
    if not nonzero.any():
        return None
    box = []
    for axis, (lo, _) in enumerate(region):
        along = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(nonzero.ndim) if a != axis)))
        box.append((lo + int(along[0]), lo + int(along[-1]) + 1))
    return tuple(box)


def chunk_moments(region: Region, source: ImageSource, preprocessing: Preprocessing) -> np.ndarray:
    from .preprocess import moments

    data = preprocessing.scaled(source.read(region))
    valid = np.isfinite(data).all(axis=0) if source.floating else None  # NaN and infinity: invalid, left out
    return moments(data, preprocessing.nonzero, preprocessing.channel_wise, valid)


def execute_and_invert(client: Client, job: Job, progress: bool) -> RunResult:
    """Predict on the model grid into a hidden Zarr of probabilities, then bring them back onto the input grid
    chunk by chunk (MONAI's ``Invertd(nearest_interp=False)``) and take the labels there."""
    from .sinks.zarr import ZarrSink  # zarr: 0.3 s of imports, only for the runs that stage in it

    final, back = job.sink, job.back
    model_sink = ZarrSink(final.path.rstrip("/") + ".model.zarr", job.model_grid_layout(), visible=False)
    finishing = replace(job.finishing, probabilities="float32")
    result = execute(client, replace(job, sink=model_sink, finishing=finishing), progress=progress)
    name = _shown_name(job.input)
    try:
        with stage(f"{name}: back onto the input grid", enabled=progress):
            regions = [back.plan.chunk_region(i) for i in back.plan.chunk_indexes()]
            submit = functools.partial(
                client.map, invert_chunk, regions, back=back, model=model_sink, finishing=job.finishing, sink=final,
                pure=False,
            )  # fmt: skip
            result.outputs, totals = fill_sink(client, final, submit, f"{name}: making {Path(final.path).name} whole", progress)
    finally:
        with shielded():
            model_sink.abort()
    result.class_pixels = dict(zip(final.layout.class_names, map(int, totals)))
    return result


def invert_chunk(region: Region, back: Inversion, model: ZarrSink, finishing: Finishing, sink: LabelSink) -> np.ndarray:
    """One input-grid chunk: the model-grid probabilities interpolated back, labelled and written."""
    from .finalize import finish_probabilities
    from .spatial import resample_back

    if back.box is None:
        probabilities = resample_back(back.grid, region, model.read_probabilities)
    else:  # outside the box background, as nnU-Net's revert_cropping_on_probabilities has it
        channels = model.layout.probability_channels
        probabilities = np.zeros((channels, *(hi - lo for lo, hi in region)), np.float32)
        probabilities[0] = 1.0 if channels > 1 else 0.0
        inside = intersect(region, back.box)
        if inside is not None:
            shifted = tuple((lo - start, hi - start) for (lo, hi), (start, _) in zip(inside, back.box))
            local = local_slices(inside, tuple(lo for lo, _ in region))
            probabilities[(slice(None), *local)] = resample_back(back.grid, shifted, model.read_probabilities)
    valid = back.source.read_valid(region)
    if back.source.floating:
        finite = np.isfinite(back.source.read(region)).all(axis=0)
        valid = finite if valid is None else valid & finite
    labels, encoded, histogram = finish_probabilities(probabilities, valid, finishing)
    write_chunk(sink, region, labels, encoded)
    return histogram


def fill_sink(
    client: Client, sink: LabelSink, submit: Callable[[], list], what: str, progress: bool
) -> tuple[list[str], np.ndarray]:
    """Create ``sink``, run the chunk tasks ``submit`` starts (each writes its chunk and returns its class
    histogram), make the output whole and publish it; on any failure, stop them and remove what was staged."""
    futures: list = []
    finishing: dict = {}  # the finish and publish tasks, once submitted
    try:
        output_step(sink.create, sink.path)
        futures = submit()
        totals = np.sum(gather(client, futures), axis=0)
        with stage(what, enabled=progress):
            outputs = finish_and_publish(client, sink, finishing)
    except BaseException:
        with shielded():
            cancel_and_drain(client, futures + list(finishing.values()))
            sink.abort()
        raise
    return outputs, totals


def execute_postprocessed(client: Client, job: Job, config: PostprocessConfig, progress: bool) -> RunResult:
    """Predict into a hidden raw Zarr, clean the labels up, then write them to the real sink.

    Post-processing needs labels across chunk borders (components, halos), so it
    runs on the finished raw labels; the cleaned chunks and the raw probabilities
    are then written chunk by chunk to the output the workflow asked for.
    """
    from .postprocess import apply as postprocess  # dask.array, pandas: only when post-processing
    from .postprocess import spacing_of
    from .sinks.zarr import ZarrSink
    from .sources.labels import open_labels

    final = job.sink
    raw = ZarrSink(final.path.rstrip("/") + ".raw.zarr", final.layout, visible=False)  # stays hidden: staged only
    result = predict_into(client, job, raw, progress)
    plan = job.output_plan
    try:
        with stage(f"{_shown_name(job.input)}: post-processing", enabled=progress):
            image = open_labels(raw.staged, plan.chunks)
            cleaned = postprocess(
                image.array, config, nodata=image.nodata, client=client, spacing=spacing_of(image.geometry),
                geometry=image.geometry,
            ).rechunk(plan.chunks)
            regions = [plan.chunk_region(i) for i in plan.chunk_indexes()]
            copy = dask.delayed(_copy_chunk, pure=False)
            tasks = [copy(r, block, final, raw, job.finishing) for r, block in zip(regions, cleaned.to_delayed().ravel())]
            what = f"{_shown_name(job.input)}: making {Path(final.path).name} whole"
            result.outputs, totals = fill_sink(client, final, lambda: client.compute(tasks), what, progress)
    finally:
        with shielded():
            raw.abort()
    result.class_pixels = dict(zip(final.layout.class_names, map(int, totals)))
    return result

def _copy_chunk(region: Region, labels: np.ndarray, sink: LabelSink, raw: ZarrSink, finishing: Finishing) -> np.ndarray:
    """Write one cleaned chunk (and the raw probabilities) to the final sink; return its histogram."""
    probabilities = raw.read_probabilities(region) if sink.layout.writes_probabilities else None
    labels = labels.astype(finishing.labels_dtype, copy=False)
    write_chunk(sink, region, labels, probabilities)
    return class_histogram(labels, finishing.n_classes, finishing.nodata)


def process_age() -> float:
    """Seconds since this process started: the start-up figure of ``benchmarks/bench_small.py``.

    On Linux both ends are read against the boot (``/proc/self/stat``'s start in clock ticks, ``/proc/uptime``),
    to 10 ms.  psutil's ``create_time`` adds the boot time, which the kernel gives in whole seconds: the age it
    gives is too large by up to 1 s, by the same amount for every process of one boot (0.65 s on 2026-12-01).
    """
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
            return float(uptime.read().split()[0]) - started / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):  # not Linux
        import psutil

        return time.time() - psutil.Process().create_time()


def probe(client: Client, plan: WorkflowPlan, windows: int | None = None, measure_after: float = 0.0) -> int:
    """The network's output channels, from one forward pass of zeros at the roi on a worker.

    This also proves on a worker, before any work, that the weights load, fit
    the network and are safe, that the device exists, and that the network takes
    the inputs' channels (a failure here keeps its type: exit 2), and converts
    it for the backend (:mod:`tilemask.backends`). For a job of ``windows``
    forward passes, ``plan.settings`` become those the probe settled ``auto`` to
    (``measure_after``: :func:`tilemask.settings.measure_after_seconds`).
    """
    future = client.submit(probe_network, plan.model, plan.settings, plan.in_channels, windows, measure_after,
                           pure=False)  # fmt: skip
    with cluster_failures("probing the network", client):
        ((channels, backend, settings),) = gather(client, [future])
    unmeasured = plan.settings.measure and not settings.measure
    logger.info("inference backend %s (inference.backend: %s%s)", backend, plan.settings.backend,
                "; too little run in torch yet to repay measuring the others" if unmeasured else "")  # fmt: skip
    plan.settings = settings
    return channels


def run_job(client: Client, job: Job, plan: WorkflowPlan, progress: bool) -> RunResult:
    """One input: predict and write its output, then its products; errors found now exit 1."""
    try:
        with cluster_failures(job.input, client):
            if job.back and job.back.crop:
                with stage(f"{_shown_name(job.input)}: the box of its nonzero voxels", enabled=progress):
                    box = nonzero_box(client, job)
                if box is not None:
                    job = plan.cropped(job, box)
            logger.info("%s: %d windows in %d chunks -> %s", job.input, job.plan.n_windows,
                        len(list(job.plan.chunk_indexes())), job.sink.path)  # fmt: skip
            if plan.postprocess:
                result = execute_postprocessed(client, job, plan.postprocess, progress)
            else:
                result = predict_into(client, job, job.sink, progress)
            with not_abandoned():  # the output is in place: its item is finished and recorded
                result.outputs += write_products(job, result.outputs[0], client, progress)
    except TilemaskError as exc:
        exc.exit_status = 1  # found while running: a run failure, whatever its kind
        raise
    return result
