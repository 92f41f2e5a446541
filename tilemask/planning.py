"""Planning: read the workflow once, check all that can be checked before any work, hand out frozen settings.

Two steps, because one fact comes from the network itself:

1. :func:`plan_model` (client, no cluster, no torch) checks what every input
   shares and lists the inputs by name without opening them, refusing clashing
   output names; :meth:`WorkflowPlan.plan_input` then opens one input's
   metadata when it is about to run (a run plans its inputs a window at a time,
   so a list of 100,000 starts at once), lays out its window plan, resolves its
   outputs and refuses what would fail (channels, missing regions);
   :meth:`WorkflowPlan.check_item_outputs`, with the outputs' locks held,
   refuses what would destroy data (outputs that are inputs or exist without
   ``--overwrite``, unwritable folders).  :func:`plan_workflow` plans every
   input at once.
2. :meth:`WorkflowPlan.job` once the network has been probed on a worker
   (:func:`tilemask.engine.probe_network`): the number of output channels fixes
   the classes, the labels' type and the probability layout; a network that
   disagrees with ``model.args``, ``classes`` or the activation is refused.

Every stage then gets its own frozen value: the window plan, the model spec,
:class:`InferenceSettings`, :class:`~tilemask.preprocess.Preprocessing`,
:class:`Finishing`, the sink, and the :class:`Products` to derive.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import __version__
from .classes import class_name
from .errors import InputError, WorkflowError, missing_weights
from .formats import for_output, for_path, written_by_tilemask
from .geometry import RasterGeometry, Region, VolumeGeometry, WindowPlan, normalize_per_axis
from .outputs import check_outputs, new_run_id, remove_made, staged_path
from .preprocess import Intensity, Preprocessing
from .settings import Finishing, InferenceSettings, ModelSpec
from .sinks import LabelSink, OutputLayout, make_sink
from .sources import ImageSource, open_source
from .sources.crop import CroppedSource
from .sources.stack import StackedSource
from .spatial import ModelGrid, ResampledSource, model_grid
from .stats.config import PostprocessConfig, StatsConfig, check_regions, is_label_image
from .storage import is_remote, redacted, redacted_values
from .workflow import DEFAULT_CHUNKS, ONE_CHANNEL, REMOTE_PREFIXES, InputItem, ListInput, StacInput, Workflow

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Products:
    """What is derived from one input's finished labels (see :mod:`tilemask.products`)."""

    vectors: str | None = None
    quicklook: str | None = None  # PNG path (2D rasters)
    quicklook_inputs: tuple[str, ...] = ()  # the rasters under it: several for a STAC item's assets
    quicklook_bands: tuple[int, ...] = ()  # of each of them (none: all)
    stats: StatsConfig | None = None

    @property
    def paths(self) -> list[str]:
        return [p for p in (self.vectors, self.quicklook, self.stats.output if self.stats else None) if p]


@dataclass(frozen=True)
class InputPlan:
    """One input, checked: its source, its window plan and where its outputs go."""

    input: str  # its (first) file
    source: ImageSource
    plan: WindowPlan
    output: str
    products: Products
    files: tuple[str, ...] = ()  # every file it reads (the channels of a case)
    back: Inversion | None = None  # the network sees another grid, and the output is on the input's


@dataclass(frozen=True)
class Inversion:
    """Where a job predicting on the model grid puts its output: the input's grid (MONAI's ``Invertd``)."""

    resampled: ResampledSource  # the input seen on the model grid: what the job predicts on
    plan: WindowPlan  # the input grid's chunks (its windows are unused)
    crop: bool = False  # predict only the box of the input's nonzero voxels (preprocess.crop), measured as the job runs
    box: Region | None = None  # the input's region that ``resampled`` sees (None: all of it); outside it background

    @property
    def source(self) -> ImageSource:
        """The input as stored (not the view of its ``box`` that ``resampled`` reads)."""
        seen = self.resampled.source
        return seen.source if isinstance(seen, CroppedSource) else seen

    @property
    def grid(self) -> ModelGrid:
        return self.resampled.grid


@dataclass
class Job:
    """Everything one input's run needs."""

    input: str
    source: ImageSource
    plan: WindowPlan
    model: ModelSpec
    settings: InferenceSettings
    preprocessing: Preprocessing
    finishing: Finishing
    sink: LabelSink  # on the output grid: the input's when ``back`` is set
    products: Products = field(default_factory=Products)
    back: Inversion | None = None  # predict on the model grid (``source``, ``plan``), then resample back
    ledger: str | None = None  # a job's record of the chunks written, kept to resume (:class:`tilemask.engine.Ledger`)
    stamps: list = field(default_factory=list)  # the input's files' and the weights' stamps as the driver read them

    @property
    def output_plan(self) -> WindowPlan:
        """The chunks of the output grid."""
        return self.back.plan if self.back else self.plan

    def model_grid_layout(self) -> OutputLayout:
        """The hidden model-grid output of a job with ``back``: every channel's probabilities, as float32."""
        return replace(
            self.sink.layout,
            shape=self.plan.shape,
            chunks=self.plan.chunks,
            geometry=self.source.geometry,
            probability_channels=self.sink.layout.probability_channels or self.out_channels,
            probabilities_dtype="float32",
        )

    @property
    def out_channels(self) -> int:
        return 1 if self.finishing.activation == "sigmoid" else self.finishing.n_classes


@dataclass
class WorkflowPlan:
    """A workflow, checked: the model and settings every input shares, its inputs' names and files (cheap,
    listed at once), and the inputs planned so far (:meth:`plan_input` opens one).  :meth:`job` completes an
    input's plan with the network's channel count."""

    workflow: Workflow
    model: ModelSpec
    settings: InferenceSettings
    preprocessing: Preprocessing
    items: list[InputItem]
    postprocess: PostprocessConfig | None
    inputs: list[InputPlan] = field(default_factory=list)  # planned so far, in the order planned
    classes: tuple[int, tuple[str, ...]] | None = None  # (n_classes, names), once the network is probed
    job_id: str | None = None  # the job this plan runs in: its outputs are staged under this id, to resume
    warned: set[str] = field(default_factory=set)  # what settings cost an input that the run was told of
    made: list[Path] = field(default_factory=list)  # the output folders its checks and locks made (uppermost first):
    # removed, if still empty, from a run refused before any work (:meth:`remove_made`)

    @property
    def in_channels(self) -> int:
        return self.inputs[0].source.channels

    def plan_input(self, item: InputItem) -> InputPlan:
        """Open one input's metadata and check it against the workflow and the inputs planned before it."""
        spatial_dims = len(self.settings.roi)  # the image's axes (a 2D model over a volume's slices: 3)
        planned = _plan_input(self.workflow, item, spatial_dims)
        _check_statistics(planned)
        _check_polygons(planned)
        _check_chunk_count(planned)
        for kind, costly in (("chunks", chunks_under_the_roi(planned.plan)), ("roi", roi_over_the_image(planned.plan))):
            if costly and kind not in self.warned:  # once a run
                logger.warning("%s", costly)
                self.warned.add(kind)
        if self.inputs and planned.source.channels != self.in_channels:
            raise InputError(
                f"{planned.input}: gives {_channels(planned.source.channels)}{_per_file(planned.source)}, the first "
                f"input {self.inputs[0].input} {self.in_channels}{_per_file(self.inputs[0].source)}; one network "
                "takes one channel count"
            )
        self.inputs.append(planned)
        return planned

    def output_files(self, item: InputPlan) -> list[str]:
        """Every file one input's run writes: labels, probabilities beside them, derived products."""
        probabilities = self.workflow.output.probabilities != "none"
        return for_output(item.output).files(item.output, probabilities) + item.products.paths

    def remove_made(self) -> None:
        """Remove the output folders its checks and locks made (:attr:`made`) that are still empty: a run refused
        before any work leaves none of them."""
        remove_made(self.made)

    def check_item_outputs(self, item: InputPlan, overwrite: bool) -> None:
        """Refuse (exit 2) outputs of one input that are inputs (images, weights, regions), that exist without
        ``overwrite``, or that tilemask did not write; run with the outputs' locks held."""
        inputs = [*(item.files or (item.input,)), *self.model.weight_files]
        if item.products.stats and item.products.stats.regions:
            inputs.append(item.products.stats.regions)
        check_outputs(((f, written_by_tilemask(f)) for f in self.output_files(item)), inputs, overwrite, self.made)

    def check_outputs_there(self, items: list[InputItem], begun: set[str]) -> None:
        """Refuse (exit 2), before any work, a local labels or probabilities file already there for an input this
        job has not begun (another workflow's output, or not tilemask's): found as that input started, it was exit
        1 while others ran, and stopped those in flight (a review).  Each output folder is listed once; a run with
        ``overwrite`` checks each as it starts (whose output it is means opening it)."""
        probabilities = self.workflow.output.probabilities != "none"
        listed: dict[str, set[str]] = {}
        for item in items:
            labels = self.workflow.output_path(item.name)
            if item.name in begun or is_remote(labels):
                continue
            for path in for_output(labels).files(labels, probabilities):
                folder, name = os.path.split(os.path.normpath(path))
                if folder not in listed:
                    try:
                        listed[folder] = set(os.listdir(folder))
                    except OSError:  # not there yet (or unreadable: the item's own check says so)
                        listed[folder] = set()
                if name in listed[folder]:
                    check_outputs([(path, written_by_tilemask(path))], (), overwrite=False)

    def check_outputs(self, overwrite: bool) -> None:
        """:meth:`check_item_outputs` for every input planned."""
        for item in self.inputs:
            self.check_item_outputs(item, overwrite)

    def job(self, item: InputPlan, out_channels: int) -> Job:
        if self.classes is None:
            self.classes = classes_of(self.workflow, out_channels)
        return self._job(item, out_channels, *self.classes)

    def cropped(self, job: Job, box: Region) -> Job:
        """``job`` on the ``box`` of its input (:func:`tilemask.engine.nonzero_box`): the model grid, the windows and
        the z-score's voxels are the box's, as nnU-Net's ``crop_to_nonzero`` leaves them; the output stays on the
        input's grid, background outside the box."""
        network_source, _ = _network_grid(self.workflow, CroppedSource(job.back.source, box))
        back = replace(job.back, resampled=network_source, box=box)
        return replace(job, source=network_source, plan=_window_plan(self.workflow, network_source), back=back)

    def jobs(self, out_channels: int) -> list[Job]:
        return [self.job(item, out_channels) for item in self.inputs]

    def _job(self, item: InputPlan, out_channels: int, n_classes: int, names: tuple[str, ...]) -> Job:
        workflow, source = self.workflow, item.source
        invalid = source.has_invalid or source.floating  # NaN / inf are invalid pixels too
        # invalid pixels get the largest value of the labels' type, one past the classes at least
        dtype = labels_dtype(n_classes + 1 if invalid else n_classes)
        finishing = Finishing(
            activation=workflow.inference.activation,
            threshold=workflow.inference.threshold,
            n_classes=n_classes,
            labels_dtype=dtype.name,
            probabilities=workflow.output.probabilities,
            nodata=int(np.iinfo(dtype).max) if invalid else None,
        )
        grid_plan = item.back.plan if item.back else item.plan
        layout = OutputLayout(
            shape=grid_plan.shape,
            chunks=grid_plan.chunks,
            class_names=names,
            labels_dtype=finishing.labels_dtype,
            probability_channels=0 if finishing.probabilities == "none" else out_channels,
            probabilities_dtype=finishing.probabilities,
            geometry=(item.back.source if item.back else source).geometry,
            reference=item.input,
            nodata=finishing.nodata,
            # without the credentials of the URLs in them (a signature, a password): an output is shared and served
            metadata={"version": __version__, "workflow": redacted_values(workflow.to_dict()),
                      "input": redacted(item.input)},
            run_id=self.job_id or new_run_id(),
            dicomweb=workflow.output.dicomweb,
            seg_type=workflow.output.seg_type,
        )
        products = item.products
        if products.stats is not None and not workflow.stats.classes:
            products = replace(products, stats=products.stats.model_copy(update={"classes": list(names)}))
        sink = make_sink(item.output, layout)
        resumable = (  # worth a record of the chunks written: a job's item of several chunks, written straight
            self.job_id and sink.resumable and item.back is None and self.postprocess is None
            and math.prod(item.plan.chunk_counts) > 1 and not is_remote(item.output)  # (the record is a folder)
        )  # fmt: skip
        return Job(
            input=item.input,
            source=source,
            plan=item.plan,
            model=self.model,
            settings=self.settings,
            preprocessing=self.preprocessing,
            finishing=finishing,
            sink=sink,
            products=products,
            back=item.back,
            ledger=staged_path(item.output, self.job_id) + ".done" if resumable else None,
        )


def labels_dtype(n_classes: int) -> np.dtype:
    """The smallest unsigned integer type that holds the class indexes."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if n_classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise WorkflowError(f"{n_classes} classes are more than a uint32 label holds")


def classes_of(workflow: Workflow, out_channels: int) -> tuple[int, tuple[str, ...]]:
    """Classes and their names from the network's output channels; disagreements are exit 2."""
    declared = workflow.model.args.get("out_channels")
    if declared is not None and int(declared) != out_channels:
        raise WorkflowError(f"model.args.out_channels is {declared} but the network gives {_channels(out_channels)}")
    activation = workflow.inference.activation
    if activation == "sigmoid" and out_channels != 1:
        raise WorkflowError(f"inference.activation sigmoid needs a one-channel network; this one gives {out_channels}")
    if activation != "sigmoid" and out_channels == 1:
        raise WorkflowError(ONE_CHANNEL.format(activation))
    n_classes = 2 if activation == "sigmoid" else out_channels
    if workflow.classes is not None and len(workflow.classes) != n_classes:
        raise WorkflowError(
            f"classes has {len(workflow.classes)} names but the network gives {n_classes} classes"
            f" ({_channels(out_channels, 'output ')})"
        )
    problem = for_output(workflow.output.path).classes_problem(n_classes)
    if problem:
        raise WorkflowError(f"output.path {workflow.output.path} {problem}")
    if workflow.classes:
        names = tuple(workflow.classes)
    elif activation == "sigmoid":
        names = ("background", "foreground")
    else:
        names = tuple(class_name(None, i) for i in range(n_classes))
    return n_classes, names


def plan_model(workflow: Workflow) -> WorkflowPlan:
    """Check what every input shares (weights, network, settings) and list the inputs, opening none of them."""
    inference = workflow.inference
    spatial_dims = len(inference.window)  # the image's axes: the model's rank, or 3 for a 2D model over slices
    weights = workflow.resolve(workflow.model.weights)
    if not weights.startswith(REMOTE_PREFIXES) and not os.path.isfile(weights):
        raise missing_weights(weights)
    spec = ModelSpec.create(workflow.model.network, workflow.model.args, weights, inference.slice_axis)
    remote = weights.startswith(REMOTE_PREFIXES)  # read on the workers: the probe checks it there
    if not workflow.model.network and not remote and not spec.carries_network:
        raise WorkflowError("model.network: needed for a checkpoint of weights (TorchScript and .pt2 carry their own)")
    sigma = inference.window_sigma_scale
    items = workflow.input_items()
    _check_output_names(workflow, items)
    return WorkflowPlan(
        workflow=workflow,
        model=spec,
        settings=InferenceSettings(
            roi=inference.window,
            mode=inference.mode,
            sigma_scale=tuple(normalize_per_axis(sigma, spatial_dims, "sigma_scale")) if isinstance(sigma, list) else sigma,
            batch_size=inference.batch_size,
            device=inference.device,
            flips=inference.window_flips,
            tta_mode=inference.tta_mode,
            backend=inference.backend,
            precision=inference.precision,
        ),
        preprocessing=preprocessing_of(workflow),
        items=items,
        postprocess=workflow.postprocess if workflow.postprocess and workflow.postprocess.active else None,
    )


def plan_workflow(workflow: Workflow) -> WorkflowPlan:
    """Open every input's metadata and check the whole workflow against them, before any work."""
    plan = plan_model(workflow)
    for item in plan.items:
        plan.plan_input(item)
    logger.info(
        "planned %d input(s), %d windows, roi %s",
        len(plan.inputs), sum(i.plan.n_windows for i in plan.inputs), list(plan.settings.roi),
    )  # fmt: skip
    return plan


def preprocessing_of(workflow: Workflow) -> Preprocessing:
    preprocess = workflow.preprocess
    normalize, intensity = preprocess.normalize, preprocess.intensity
    fixed = normalize is not None and normalize.fixed
    return Preprocessing(
        intensity=Intensity(**intensity.model_dump()) if intensity else None,
        mean=tuple(normalize.mean) if fixed else None,
        std=tuple(normalize.std) if fixed else None,
        zscore=normalize is not None and not fixed,
        nonzero=normalize.nonzero if normalize else False,
        channel_wise=bool(normalize and normalize.channel_wise),
    )


CHUNKS_PER_WINDOW_AXIS = 8  # past this many chunks a window along each axis (chunks under the roi), a run is refused
CHUNKS_UNDER_THE_ROI = 20_000  # and past this many chunks in all


def _chunks_under_the_roi(plan: WindowPlan) -> tuple[int | list[int], int] | None:
    """``output.chunks`` as given and the number of chunks, where they cut the image finer than the roi."""
    if not any(a.chunk < min(a.roi, a.size) for a in plan.axes):
        return None
    return (list(plan.chunks) if len(set(plan.chunks)) > 1 else plan.chunks[0]), math.prod(plan.chunk_counts)


def _check_chunk_count(planned: InputPlan) -> None:
    """Refuse ``output.chunks`` under the roi that cut an input into more than ``CHUNKS_PER_WINDOW_AXIS ** dims``
    chunks a window (64 in 2D, 512 in 3D), or, where they are smaller than the default too, more than
    ``CHUNKS_UNDER_THE_ROI`` in all (the default's count depends on the image, not on the roi): each chunk is Dask
    tasks, and an embedded scheduler orders and cancels them in the run's own process.  A review's ``output.chunks: 1``
    (567,938 chunks for 64 windows of the demo's scene) held 6.5 GB and kept the scheduler busy for minutes, a
    SIGTERM included.  A 16384^2 raster at roi 128 (29,241 windows): chunks 52 (99,225 chunks, 3 a window) had
    predicted no window after 40 s, and a SIGTERM then took 205-267 s to stop it; chunks 120 (18,769) ran at 117
    windows/s against 1,179 at the default 2048, and a SIGTERM took 44 s."""
    plan, under = planned.plan, _chunks_under_the_roi(planned.plan)
    if under is None:
        return
    limit = CHUNKS_PER_WINDOW_AXIS ** len(plan.axes)
    if under[1] > limit * plan.n_windows:
        most = f"more than {limit} a window"
    elif under[1] > CHUNKS_UNDER_THE_ROI and any(a.chunk < min(a.roi, a.size, DEFAULT_CHUNKS) for a in plan.axes):
        most = f"more than {CHUNKS_UNDER_THE_ROI:,}"
    else:
        return
    raise WorkflowError(f"output.chunks {under[0]} cuts {planned.input} into {under[1]:,} chunks for "
                        f"{plan.n_windows:,} window(s), {most}, each Dask tasks of its own; "
                        f"use chunks nearer inference.roi_size {list(plan.roi)} "
                        f"(default {DEFAULT_CHUNKS})")  # fmt: skip


def chunks_under_the_roi(plan: WindowPlan) -> str | None:
    """Why ``output.chunks`` costs this input time, where it cuts the image finer than the roi: each window is
    still predicted once, but Dask's cost per task (several a chunk) then outweighs the windows' (a 16384^2
    raster at chunks 64, roi 256: 17x slower)."""
    under = _chunks_under_the_roi(plan)
    if under is None:
        return None
    return (f"output.chunks {under[0]} is smaller than inference.roi_size {list(plan.roi)}: "
            f"{under[1]} chunks for {plan.n_windows} window(s), each with Dask's own cost; "
            f"chunks of at least the roi (default {DEFAULT_CHUNKS}) run faster")  # fmt: skip


LARGE_WINDOW = 1 << 22  # pixels or voxels of one window (2048^2, 161^3), past which padding is worth a word


def roi_over_the_image(plan: WindowPlan) -> str | None:
    """Why ``inference.roi_size`` costs this input time, where it is so much larger than the image that padding
    to it (as MONAI pads) at least doubles what the network computes and one window is large: a roi of 2048^2
    over the 791 x 718 demo scene (7.4x its pixels) took 213 s on a first run, 4.4 s at roi 128."""
    padded = math.prod(max(a.roi, a.size) for a in plan.axes)
    if not (math.prod(plan.roi) >= LARGE_WINDOW and padded >= 2 * math.prod(plan.shape)):
        return None
    return (f"inference.roi_size {list(plan.roi)} is larger than the image ({' x '.join(map(str, plan.shape))}): "
            f"it is padded to it, as MONAI pads, {padded / math.prod(plan.shape):.1f}x the pixels for the network "
            "to compute")  # fmt: skip


def _plan_input(workflow: Workflow, item: InputItem, spatial_dims: int) -> InputPlan:
    path = item.files[0]
    sliced = workflow.inference.slice_axis is not None
    sources = [open_source(f, spatial_dims, workflow.preprocess.bands, sliced) for f in item.files]
    sources = [s.with_nodata(v) if v is not None else s for s, v in zip(sources, item.nodata or [None] * len(sources))]
    source = sources[0] if len(sources) == 1 else StackedSource.of(sources)
    check_source(workflow, source)
    output = workflow.output_path(item.name)
    network_source, grid = _network_grid(workflow, source)
    for_output(output).check_input(output, source if grid else network_source)
    _check_postprocess_units(workflow, source if grid else network_source)
    plan = _window_plan(workflow, network_source)
    back = None
    if grid:
        inference = workflow.inference
        chunks = WindowPlan.build(source.spatial_shape, inference.window, inference.window_overlap,
                                  workflow.output.chunks)  # fmt: skip
        back = Inversion(network_source, chunks, crop=workflow.preprocess.crop == "nonzero")
    # the bands the run reads, of each file of a stack when they are alike (alpha bands left out as the run does)
    chosen = {tuple(getattr(s, "bands", ())) for s in getattr(source, "sources", (source,))}
    shown_bands = chosen.pop() if len(chosen) == 1 else tuple(workflow.preprocess.bands or ())
    source = network_source
    quicklook = (  # beside a local output only: it reads the labels back
        workflow.output.quicklook and spatial_dims == 2 and all(for_path(f).gdal_raster for f in item.files)
        and not is_remote(output)
    )  # fmt: skip
    return InputPlan(
        input=path,
        source=source,
        plan=plan,
        output=output,
        products=Products(
            vectors=workflow.vectors_path(item.name),
            quicklook=workflow.quicklook_path(item.name) if quicklook else None,
            quicklook_inputs=item.files if quicklook else (),
            quicklook_bands=shown_bands,
            stats=workflow.stats_for(item.name),
        ),
        files=item.files,
        back=back,
    )


def _window_plan(workflow: Workflow, network_source: ImageSource) -> WindowPlan:
    """The windows over the image the network sees, grouped by output chunk."""
    inference = workflow.inference
    # a flip of the whole image has its own grid of windows; nnU-Net's mirrors each window of the one grid
    flips = inference.window_flips if inference.tta_mode == "image" else ()
    mirrored = sorted({axis for axes in flips for axis in axes})
    return WindowPlan.build(network_source.spatial_shape, inference.window, inference.window_overlap,
                            workflow.output.chunks, mirrored, inference.steps)  # fmt: skip


def _network_grid(workflow: Workflow, source: ImageSource) -> tuple[ImageSource, ModelGrid | None]:
    """The input as the network sees it, and the grid to bring the output back from (None: the same grid)."""
    preprocess = workflow.preprocess
    if not preprocess.sees_another_grid:
        return source, None
    geometry = source.geometry
    if not isinstance(geometry, VolumeGeometry):
        raise InputError(f"{source.path}: preprocess.orientation, spacing and crop need a volume with an affine")
    try:
        grid = model_grid(np.asarray(geometry.affine), source.spatial_shape, preprocess.orientation,
                          preprocess.spacing_per_axis)  # fmt: skip
    except OverflowError:  # [1e-320, 1, 1] (:func:`_spaced`): it was "ValueError: cannot convert float NaN to integer"
        raise InputError(f"{source.path}: preprocess.spacing {list(preprocess.spacing_per_axis)} makes the network's "
                         f"grid too large for a float to count its voxels; {_GRID_LIMIT}") from None  # fmt: skip
    _check_model_grid_size(source, grid)
    logger.info("%s: the network sees a %s grid (%s %s)", source.path, "x".join(map(str, grid.shape)),
                "its box" if isinstance(source, CroppedSource) else "input", "x".join(map(str, source.spatial_shape)))
    resampled = ResampledSource(source, grid)
    return resampled, (grid if workflow.output.grid == "input" else None)


MODEL_GRID_GROWTH = 64  # a model grid past this many times the scan's voxels, and past MODEL_GRID_VOXELS, is refused
MODEL_GRID_VOXELS = 1 << 31
_GRID_LIMIT = (f"tilemask refuses a grid over {MODEL_GRID_GROWTH} times the scan's voxels and over "
               f"{MODEL_GRID_VOXELS:,}: the spacing is in mm")  # fmt: skip


def _count(n: int) -> str:
    """``n`` in 3 significant digits, as ``.3g`` writes a float; past a float's range (``[1e-300, 1e-300, 1]``'s
    grid: "OverflowError: int too large to convert to float") as a power of 10."""
    return f"{n:.3g}" if n < 10**300 else f"about 10^{math.floor(math.log10(n))}"


def _check_model_grid_size(source: ImageSource, grid: ModelGrid) -> None:
    """Refuse a ``preprocess.spacing`` that makes the model grid both far larger than the scan and large: a
    spacing in metres given for mm, or a typing slip.  A review's ``[1e-300, 1, 1]`` planned for ever (its windows
    along a 5.9e301-voxel axis), ``1e-3`` started predicting a 59001 x 63001 x 47001 grid that a SIGTERM took 69 s to
    stop, ``[1e-5, 1, 1]`` a run of about 94 million windows."""
    voxels, scan = math.prod(grid.shape), math.prod(source.spatial_shape)
    if voxels > MODEL_GRID_VOXELS and voxels > MODEL_GRID_GROWTH * scan:
        shape, scan_shape = (" x ".join(str(n) if n < 10**15 else _count(n) for n in s)
                             for s in (grid.shape, source.spatial_shape))  # fmt: skip
        ratio = (2 * voxels + scan) // (2 * scan)  # rounded, in whole numbers: no float holds some
        times = f"{ratio:,}" if ratio < 10**15 else _count(ratio)
        raise InputError(f"{source.path}: preprocess.spacing makes the network's grid {shape} ({_count(voxels)} "
                         f"voxels, {times} times the scan's {scan_shape}); {_GRID_LIMIT}")  # fmt: skip


def _check_postprocess_units(workflow: Workflow, source: ImageSource) -> None:
    """Physical sizes and radii need the input's pixel/voxel size, and units of its kind: refused now, not after
    the inference."""
    config = workflow.postprocess
    if config is None or not config.active:
        return
    from .postprocess import cell_size, spacing_of

    spacing = spacing_of(source.geometry)
    try:
        config.check_units(volume=len(source.spatial_shape) == 3)
        config.min_size(cell_size(spacing, source.geometry) if spacing else None)
        config.radius("opening", spacing)
        config.radius("closing", spacing)
    except ValueError as exc:
        raise InputError(f"{source.path}: {exc}") from None


def _channels(count: int, kind: str = "") -> str:
    """``1 channel``, ``3 channels`` (``kind``: words before the noun, ``"output "``)."""
    return f"{count} {kind}channel{'s' if count != 1 else ''}"


def check_source(workflow: Workflow, source: ImageSource) -> None:
    """Checks that need the input: channels against ``in_channels`` and normalization."""
    args = workflow.model.args
    key = "in_channels" if "in_channels" in args else "input_channels"  # MONAI's name, or nnU-Net's
    in_channels = args.get(key)
    if in_channels is not None and in_channels != source.channels:
        hint = " (select them with preprocess.bands)" if for_path(source.path).gdal_raster else ""
        raise InputError(
            f"{source.path}: model.args.{key} is {in_channels} but the input gives {_channels(source.channels)}"
            f"{_per_file(source)}{hint}"
        )
    normalize = workflow.preprocess.normalize
    if normalize and normalize.fixed and len(normalize.mean) not in (1, source.channels):
        raise InputError(
            f"{source.path}: preprocess.normalize has {len(normalize.mean)} values for {_channels(source.channels)}"
        )


def _check_output_names(workflow: Workflow, items: list[InputItem]) -> None:
    """Two inputs must not write one file: checked from their names, before any input is opened."""
    def stats_output(name: str) -> str | None:
        stats = workflow.stats_for(name)
        return stats and stats.output

    def probabilities(name: str) -> str | None:  # beside the labels: x.tif's are x_probabilities.tif's labels
        labels = workflow.output_path(name)
        return for_output(labels).probabilities_path(labels) if workflow.output.probabilities != "none" else None

    seen: dict[str, tuple[InputItem, str]] = {}
    for item in items:
        for key, path_of in (("output.path", workflow.output_path), ("output.probabilities", probabilities),
                             ("output.vectors", workflow.vectors_path), ("stats.output", stats_output)):  # fmt: skip
            path = path_of(item.name)
            if not path:
                continue
            if path in seen and seen[path][0] is item:
                raise WorkflowError(f"{seen[path][1]} and {key} are one file, {path}; give each its own name")
            if path in seen and seen[path][1] != key:  # one's probabilities on the other's labels, or the like
                raise WorkflowError(f"output: {seen[path][0].files[0]} and {item.files[0]} would both write {path}; "
                                    f"the {seen[path][1]} of one is the {key} of the other; rename one")  # fmt: skip
            if path in seen and _one_file(seen[path][0].files[0], item.files[0]):  # a list naming it twice
                raise WorkflowError(f"input: {seen[path][0].files[0]} and {item.files[0]} are one file, given twice; "
                                    "give it once")  # fmt: skip
            if path in seen:
                advice = ("put {stem} in the output's name" if path_of(item.name + "-") == path else
                          f"both are named {item.name!r}, which {{stem}} stands for{_one_name_advice(workflow)}")
                raise WorkflowError(f"output: {seen[path][0].files[0]} and {item.files[0]} would both write {path}; {advice}")
            seen[path] = item, key


def _one_name_advice(workflow: Workflow) -> str:
    """What to change where two inputs are named alike, for the kind of input that names them (globs and folders
    were the advice to a STAC catalog's Items and a list file's lines too)."""
    if isinstance(workflow.input, StacInput):
        return (" (the STAC Items' ids made file names): give them ids of their own, or run them as workflows of "
                "their own")  # fmt: skip
    if isinstance(workflow.input, ListInput):
        return "; rename one, or list them in list files of their own, each run as a workflow of its own"
    return ("; rename one, narrow the input's glob (input.members within an archive), or run each folder as a "
            "workflow of its own")  # fmt: skip


def _one_file(a: str, b: str) -> bool:
    """Whether two inputs are one local file (``scenes/a.tif`` and ``./scenes/a.tif``)."""
    try:
        return "://" not in a + b and os.path.samefile(a, b)
    except OSError:  # a member of an archive, a /vsi path, a file not there
        return False


def _check_polygons(item: InputPlan) -> None:
    """What the polygons would refuse of the output, before the run predicts anything: a 2D input placed by a
    volume's affine (a Zarr slice of a volume), and a CRS the format cannot name (a GeoJSON needs one)."""
    geometry = item.source.geometry
    if item.products.vectors and not isinstance(geometry, RasterGeometry):
        raise InputError(f"{item.input}: output.vectors: polygons need a 2D georeferenced raster; this input is "
                         "placed by a volume's affine; leave out output.vectors")  # fmt: skip
    if item.products.vectors:
        from .polygon_files import check_polygons_crs

        check_polygons_crs(item.products.vectors, geometry.crs_wkt, item.input)


def _per_file(source) -> str:
    """How many channels each file of a case read channel by channel gives (a 4D NIfTI gives several), so that a
    refusal names the file that differs, not only the case's first: empty for an input of one file."""
    from .sources.stack import StackedSource

    if not isinstance(source, StackedSource):
        return ""
    return f" ({', '.join(f'{Path(s.path).name} {s.channels}' for s in source.sources)})"


def _check_statistics(item: InputPlan) -> None:
    """What the ``stats:`` section would refuse of the output, before the run predicts anything: the regions and
    their key, and whether they can measure the output's grid (the input's).  Found after the run, a refusal left
    a finished output whose statistics had failed, and the fixed workflow was then refused that output."""
    stats = item.products.stats
    if not stats:
        return
    from .stats.measure import Grid

    output = item.back.source if item.back else item.source  # the grid the output is written on
    grid = Grid(tuple(int(s) for s in output.shape[1:]), output.geometry)
    grid.check_sizes(item.input)
    if not stats.regions:
        return
    if not stats.regions.startswith(REMOTE_PREFIXES) and not Path(stats.regions).exists():
        raise InputError(f"stats.regions: no such file {stats.regions}")
    if is_label_image(stats.regions):
        if stats.region_id is not None:
            raise InputError(f"stats.region_id applies to vector regions; the atlas {stats.regions} is keyed by its "
                             "label value")  # fmt: skip
        if stats.coverage == "fraction":
            raise InputError(f"stats.coverage fraction applies to vector regions; the atlas {stats.regions}'s pixels "
                             "are the labels' own")  # fmt: skip
        from .sources.labels import open_labels
        from .stats.totals import check_atlas_grid

        check_atlas_grid(grid, open_labels(stats.regions), item.input)
        return
    from .stats.zonal import check_vector_grid

    check_vector_grid(grid, item.input)
    check_regions(stats.regions, stats.region_id)  # GDAL reads them (the layer's info), and their key
