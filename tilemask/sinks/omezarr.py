"""OME-Zarr output (NGFF 0.5): labels as a multiscale label image, probabilities as the image they label.

Layout of ``<name>.ome.zarr`` (a Zarr v3 group), what napari's OME-Zarr plugin
and ``ome-zarr``'s reader open::

    zarr.json                 ome.multiscales: the image (probabilities, channel-first; or, when none
    0/, 1/, ...                                are written, the labels as intensities: NGFF hangs labels on an image)
    labels/zarr.json          ome.labels: ["labels"]
    labels/labels/zarr.json   ome.multiscales + ome.image-label: class colours and names
    labels/labels/0/, 1/, ...

Level 0 is written chunk by chunk by the workers, as the plain Zarr output is;
the coarser levels (each half the size of the one before, an axis of one pixel/voxel kept, until the
longest axis is at most :data:`SMALLEST`) are made when the run finishes, a chunk at a
time: labels by the mode of each 2 x 2 (x 2) block (ties to the smallest
value), probabilities by the mean; then, once every level holds its data, the
OME-Zarr metadata (a run cut short leaves a plain Zarr group). Each level's ``scale`` is the pixel/voxel
size (mm for volumes, from the affine; metres for rasters in a projected CRS)
times its factor, its ``translation`` the centre of its first cell (:func:`level_translation`); the whole affine
and CRS stay in tilemask's attributes. An
OME-Zarr input's own unit is kept (micrometres stay micrometres): napari places
layers by their numbers, not their units.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import numpy as np
import zarr

from ..classes import class_colours, class_name
from ..geometry import OME_UNITS_IN_MM, WORLD_AXES, RasterGeometry, Region, ome_space_names
from ..outputs import publish, remove, staged_path
from ..sources import cached_handle
from . import LabelSink, OutputLayout, storing_every_chunk

logger = logging.getLogger(__name__)

NGFF = "0.5"
SMALLEST = 256  # the coarsest level's longest axis is at most this


def level_shapes(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Spatial shape of every level: level 0, then each axis of more than one pixel/voxel halved (rounded up) until
    the longest axis <= SMALLEST.  An axis of one (a single slice) stays one: the levels stopped there, a slab of
    two slices at a first level of 300 x 260 x 1, a single slice at level 0 alone."""
    shapes = [tuple(shape)]
    while max(shapes[-1]) > SMALLEST:
        shapes.append(tuple(math.ceil(s / 2) for s in shapes[-1]))
    return shapes


def level_steps(shape: tuple[int, ...], level: int) -> tuple[int, ...]:
    """How many cells of the level before one cell of ``level`` bins along each axis: 2, or 1 along an axis one
    pixel/voxel long in the level before (level 0: 1)."""
    before = level_shapes(shape)[level - 1] if level else (1,) * len(shape)
    return tuple(2 if size > 1 else 1 for size in before)


def level_factors(shape: tuple[int, ...], level: int) -> tuple[int, ...]:
    """How many level-0 pixels/voxels one cell of ``level`` spans along each axis."""
    return tuple(math.prod(f) for f in zip(*(level_steps(shape, n) for n in range(level + 1))))


def level_translation(spacing: list[float], origin: list[float] | None, factors: tuple[int, ...]) -> list[float]:
    """Where the centre of a level's first pixel/voxel is: that level's cell bins the ``factors`` first ones of
    level 0 along each axis, so its centre lies ``(factor - 1) / 2`` of level 0's spacing past theirs (``origin``,
    0 where no origin is written), as ``ome-zarr``'s writer places its levels."""
    return [o + s * (f - 1) / 2 for s, o, f in zip(spacing, origin or [0.0] * len(spacing), factors)]


def space_axes(layout: OutputLayout) -> tuple[tuple[str, ...], list[float], list[float] | None, str | None]:
    """The space axes' NGFF names, scale, translation (where the centre of pixel/voxel 0 is) and unit.

    A volume: the voxel sizes in mm, or in the unit of an OME-Zarr input.  An image: the pixel size in metres in
    a projected CRS, else the geotransform's own sizes, in the unit of an OME-Zarr input (none if it has none).
    NGFF has no rotation or flip, and its scales are positive: the translation (the origin, on the world axis
    each axis is named after) is written only where every axis runs along its world axis in the positive
    direction (an OME-Zarr input); else none (a north-up raster's rows run south, a NIfTI's first axis often runs
    left), and the grid is in tilemask's attributes.
    """
    from ..postprocess import metres_per_unit, spacing_of
    from ..sources.zarr import ome_space_unit

    geometry = layout.geometry
    names = ome_space_names(geometry, len(layout.shape))
    spacing = spacing_of(geometry)
    if isinstance(geometry, RasterGeometry) and metres_per_unit(geometry) != 1.0:  # feet: the CRS's own sizes and
        spacing = None  # translation, as the grid in tilemask's attributes (no unit NGFF names)
    unit = ome_space_unit(layout.reference)  # None unless the input is an OME-Zarr with one unit
    if isinstance(geometry, RasterGeometry):
        x0, dx, rx, y0, ry, dy = geometry.transform
        sizes = spacing or (float(np.hypot(rx, dy)), float(np.hypot(dx, ry)))
        positive = rx == 0 and ry == 0 and dx > 0 and dy > 0
        # the geotransform's (x0, y0) is pixel (0, 0)'s corner; NGFF's translation, its centre (as a NIfTI's affine)
        centre = [y0 + dy / 2, x0 + dx / 2]
        return names, list(sizes), centre if positive else None, ("meter" if spacing else unit)
    affine = np.asarray(geometry.affine)
    rows = [WORLD_AXES.index(n) for n in names]
    aligned = np.zeros((3, 3))
    for axis, row in enumerate(rows):
        aligned[row, axis] = affine[row, axis]
    positive = all(aligned[row, axis] > 0 for axis, row in enumerate(rows)) and np.allclose(aligned, affine[:3, :3])
    origin = [float(affine[r, 3]) for r in rows] if positive else None
    if unit not in OME_UNITS_IN_MM:  # the affine is in mm
        return names, list(spacing), origin, "millimeter"
    per_mm = 1.0 / OME_UNITS_IN_MM[unit]
    return names, [s * per_mm for s in spacing], origin and [o * per_mm for o in origin], unit


def cells_of(block: np.ndarray, steps: tuple[int, ...]) -> np.ndarray:
    """``block`` as its cells of ``steps`` (2 or 1) along each axis, each cell's values along a last axis; odd edges
    padded by repeating the last row/column, so an edge cell votes (or averages) only with real values."""
    padded = np.pad(block, [(0, s % k) for s, k in zip(block.shape, steps)], mode="edge")
    cells = padded.reshape(tuple(x for s, k in zip(padded.shape, steps) for x in (s // k, k)))
    cells = cells.transpose(tuple(range(0, 2 * block.ndim, 2)) + tuple(range(1, 2 * block.ndim, 2)))
    return cells.reshape(*cells.shape[: block.ndim], -1)


def mode_downsample(block: np.ndarray, steps: tuple[int, ...] | None = None) -> np.ndarray:
    """Each 2 x 2 (x 2) cell of ``block`` (``steps`` along each axis, 2 by default) as its most frequent value
    (ties: the smallest); odd edges as :func:`cells_of` pads them.

    Counted on each cell's sorted values, one pass per place in a cell (4 or 8), so memory stays a few times the
    block's whatever the number of classes: a count per class present (``np.unique``) held 2 GB for 8 MB of labels
    of 118 classes."""
    cells = np.sort(cells_of(block, steps or (2,) * block.ndim), axis=-1)
    best, most = cells[..., 0].copy(), np.zeros(cells.shape[:-1], np.uint8)
    for place in range(cells.shape[-1]):  # ascending values: a later one wins only by being more frequent
        value = cells[..., place]
        count = (cells == value[..., None]).sum(axis=-1, dtype=np.uint8)
        np.copyto(best, value, where=count > most)
        np.maximum(most, count, out=most)
    return best.astype(block.dtype, copy=False)


def mean_downsample(block: np.ndarray, steps: tuple[int, ...] | None = None) -> np.ndarray:
    """Each 2 x 2 (x 2) cell of the spatial axes (``block`` is channel-first; ``steps`` along each, 2 by default)
    as its mean."""
    steps = steps or (2,) * (block.ndim - 1)
    pad = [(0, 0)] + [(0, s % k) for s, k in zip(block.shape[1:], steps)]
    padded = np.pad(block.astype(np.float32), pad, mode="edge")
    shape = (padded.shape[0], *(x for s, k in zip(padded.shape[1:], steps) for x in (s // k, k)))
    mean = padded.reshape(shape).mean(axis=tuple(range(2, len(shape), 2)))
    if np.issubdtype(block.dtype, np.integer):
        return np.rint(mean).astype(block.dtype)
    return mean.astype(block.dtype)


@dataclass(frozen=True)
class OmeZarrSink(LabelSink):
    path: str
    layout: OutputLayout

    @property
    def staged(self) -> str:
        return staged_path(self.path, self.layout.run_id)

    def create(self) -> None:
        """The arrays of every level and tilemask's attributes; the OME-Zarr metadata waits for the data (finish):
        a run cut short leaves a plain Zarr group, which no OME-Zarr reader takes for a finished image."""
        layout = self.layout
        names = space_axes(layout)[0]
        root = zarr.open_group(self.staged, mode="w", zarr_format=3)
        channels = layout.probability_channels if layout.writes_probabilities else 0
        labels = root.create_group("labels").create_group("labels")
        for level, shape in enumerate(level_shapes(layout.shape)):
            chunks = tuple(min(c, s) for c, s in zip(layout.chunks, shape))
            if channels:
                root.create_array(str(level), shape=(channels, *shape), chunks=(channels, *chunks),
                                  dtype=layout.probabilities_dtype, fill_value=layout.probabilities_fill,
                                  dimension_names=("c", *names))  # fmt: skip
            else:
                root.create_array(str(level), shape=shape, chunks=chunks, dtype=layout.labels_dtype,
                                  fill_value=layout.labels_fill, dimension_names=names)  # fmt: skip
            labels.create_array(str(level), shape=shape, chunks=chunks, dtype=layout.labels_dtype,
                                fill_value=layout.labels_fill, dimension_names=names)  # fmt: skip
        root.attrs.update(
            {"tilemask": {**layout.metadata, "classes": list(layout.class_names), "nodata": layout.nodata,
                          "complete": False, "labels": "labels/labels/0", "every_chunk_stored": True}}
            | layout.geometry.to_attrs()
        )  # fmt: skip

    def _ome(self) -> tuple[dict, dict]:
        """The ``ome`` attributes of the image (the root) and of the label image (``labels/labels``)."""
        layout = self.layout
        levels = len(level_shapes(layout.shape))
        factors = [level_factors(layout.shape, level) for level in range(levels)]
        names, spacing, origin, unit = space_axes(layout)
        space = [{"name": n, "type": "space", **({"unit": unit} if unit else {})} for n in names]

        def multiscale(name: str, with_channels: bool) -> dict:
            lead, lead_0 = ([1.0], [0.0]) if with_channels else ([], [])
            return {
                "name": name,
                "axes": ([{"name": "c", "type": "channel"}] if with_channels else []) + space,
                "datasets": [
                    {"path": str(level), "coordinateTransformations": [
                        {"type": "scale", "scale": lead + [s * f for s, f in zip(spacing, factors[level])]}]
                        + ([{"type": "translation",
                             "translation": lead_0 + level_translation(spacing, origin, factors[level])}]
                           if origin or level else [])}  # level 0 without an origin: at 0
                    for level in range(levels)
                ],
                "type": "mean" if with_channels else "mode",  # probabilities are averaged, labels voted
            }  # fmt: skip

        colours = class_colours(max(len(layout.class_names), 2))
        values = list(range(len(layout.class_names)))
        label_image = {
            "version": NGFF,
            "multiscales": [multiscale("labels", False)],
            "image-label": {
                "colors": [{"label-value": v, "rgba": list(colours[v])} for v in values]
                + ([{"label-value": layout.nodata, "rgba": [0, 0, 0, 0]}] if layout.nodata is not None else []),
                "properties": [{"label-value": v, "class": class_name(layout.class_names, v)} for v in values]
                + ([{"label-value": layout.nodata, "class": "nodata"}] if layout.nodata is not None else []),
                "source": {"image": "../../"},
            },
        }
        channels = layout.writes_probabilities
        image = {"version": NGFF, "multiscales": [multiscale("probabilities" if channels else "image", channels)]}
        return image, label_image

    def _array(self, name: str):
        return cached_handle(("omezarr-out", self.staged, name),
                             lambda: storing_every_chunk(zarr.open_array(f"{self.staged}/{name}", mode="r+")))  # fmt: skip

    def write(self, region: Region, labels: np.ndarray, probabilities: np.ndarray | None) -> None:
        index = tuple(slice(lo, hi) for lo, hi in region)
        self._array("labels/labels/0")[index] = labels
        if self.layout.writes_probabilities:
            self._array("0")[(slice(None), *index)] = probabilities
        else:
            self._array("0")[index] = labels

    def finish(self) -> None:
        """Make the coarser levels from the one before, one output chunk at a time, then write the OME-Zarr
        metadata and mark the output whole."""
        root = zarr.open_group(self.staged, mode="r+")
        shapes = level_shapes(self.layout.shape)
        for level in range(1, len(shapes)):
            labels_target = storing_every_chunk(root["labels/labels"][str(level)])
            steps = level_steps(self.layout.shape, level)
            self._downsample(root["labels/labels"][str(level - 1)], labels_target, mode_downsample, steps)
            image_source, image_target = root[str(level - 1)], storing_every_chunk(root[str(level)])
            channels = image_source.ndim > len(self.layout.shape)
            reduce = mean_downsample if channels else mode_downsample
            self._downsample(image_source, image_target, reduce, steps, channels)
        image, label_image = self._ome()
        root["labels/labels"].attrs["ome"] = label_image
        root["labels"].attrs["ome"] = {"version": NGFF, "labels": ["labels"]}
        root.attrs.update({"ome": image, "tilemask": {**root.attrs["tilemask"], "complete": True}})  # the root last

    @staticmethod
    def _downsample(source, target, reduce, steps: tuple[int, ...], channels: bool = False) -> None:
        spatial = target.shape[1:] if channels else target.shape
        chunks = target.chunks[1:] if channels else target.chunks
        for start in itertools.product(*(range(0, s, c) for s, c in zip(spatial, chunks))):
            out = tuple(slice(a, min(a + c, s)) for a, c, s in zip(start, chunks, spatial))
            src = tuple(slice(k * o.start, min(k * o.stop, n))
                        for o, k, n in zip(out, steps, source.shape[-len(spatial) :]))  # fmt: skip
            lead = (slice(None),) if channels else ()
            target[lead + out] = reduce(np.asarray(source[lead + src]), steps)

    def publish(self) -> list[str]:
        publish(self.staged, self.path)
        return [self.path]

    def abort(self) -> None:
        remove(self.staged)
