"""OME-Zarr output (NGFF 0.5): labels as a multiscale label image, probabilities as the image they label.

Layout of ``<name>.ome.zarr`` (a Zarr v3 group), what napari's OME-Zarr plugin
and ``ome-zarr``'s reader open::

    zarr.json                 ome.multiscales: the image (probabilities, channel-first; or, when none
    0/, 1/, ...                                are written, the labels as intensities: NGFF hangs labels on an image)
    labels/zarr.json          ome.labels: ["labels"]
    labels/labels/zarr.json   ome.multiscales + ome.image-label: class colours and names
    labels/labels/0/, 1/, ...

Level 0 is written chunk by chunk by the workers, as the plain Zarr output is;
the coarser levels (each half the size of the one before, until the longest
axis is at most :data:`SMALLEST`) are made when the run finishes, a chunk at a
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
    """Spatial shape of every level: level 0, then halved (rounded up) until the longest axis <= SMALLEST."""
    shapes = [tuple(shape)]
    while max(shapes[-1]) > SMALLEST and min(shapes[-1]) > 1:
        shapes.append(tuple(math.ceil(s / 2) for s in shapes[-1]))
    return shapes


def level_translation(spacing: list[float], origin: list[float] | None, level: int) -> list[float]:
    """Where the centre of a level's first pixel/voxel is: that level's cell bins the ``2**level`` first ones of
    level 0 along each axis, so its centre lies ``(2**level - 1) / 2`` of level 0's spacing past theirs (``origin``,
    0 where no origin is written), as ``ome-zarr``'s writer places its levels."""
    return [o + s * (2**level - 1) / 2 for s, o in zip(spacing, origin or [0.0] * len(spacing))]


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


def mode_downsample(block: np.ndarray) -> np.ndarray:
    """Each 2 x 2 (x 2) cell of ``block`` as its most frequent value (ties: the smallest); odd edges padded by
    repeating the last row/column, so an edge cell votes only with real values.

    Counted on each cell's sorted values, one pass per place in a cell (4 or 8), so memory stays a few times the
    block's whatever the number of classes: a count per class present (``np.unique``) held 2 GB for 8 MB of labels
    of 118 classes."""
    pad = [(0, s % 2) for s in block.shape]
    padded = np.pad(block, pad, mode="edge")
    cells = padded.reshape(tuple(x for s in padded.shape for x in (s // 2, 2)))
    cells = cells.transpose(tuple(range(0, 2 * block.ndim, 2)) + tuple(range(1, 2 * block.ndim, 2)))
    cells = np.sort(cells.reshape(*cells.shape[: block.ndim], -1), axis=-1)
    best, most = cells[..., 0].copy(), np.zeros(cells.shape[:-1], np.uint8)
    for place in range(cells.shape[-1]):  # ascending values: a later one wins only by being more frequent
        value = cells[..., place]
        count = (cells == value[..., None]).sum(axis=-1, dtype=np.uint8)
        np.copyto(best, value, where=count > most)
        np.maximum(most, count, out=most)
    return best.astype(block.dtype, copy=False)


def mean_downsample(block: np.ndarray) -> np.ndarray:
    """Each 2 x 2 (x 2) cell of the spatial axes (``block`` is channel-first) as its mean."""
    pad = [(0, 0)] + [(0, s % 2) for s in block.shape[1:]]
    padded = np.pad(block.astype(np.float32), pad, mode="edge")
    shape = (padded.shape[0], *(x for s in padded.shape[1:] for x in (s // 2, 2)))
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
                                  dtype=layout.probabilities_dtype, fill_value=0, dimension_names=("c", *names))  # fmt: skip
            else:
                root.create_array(str(level), shape=shape, chunks=chunks, dtype=layout.labels_dtype, fill_value=0,
                                  dimension_names=names)  # fmt: skip
            labels.create_array(str(level), shape=shape, chunks=chunks, dtype=layout.labels_dtype, fill_value=0,
                                dimension_names=names)  # fmt: skip
        root.attrs.update(
            {"tilemask": {**layout.metadata, "classes": list(layout.class_names), "nodata": layout.nodata,
                          "complete": False, "labels": "labels/labels/0", "every_chunk_stored": True}}
            | layout.geometry.to_attrs()
        )  # fmt: skip

    def _ome(self) -> tuple[dict, dict]:
        """The ``ome`` attributes of the image (the root) and of the label image (``labels/labels``)."""
        layout = self.layout
        levels = len(level_shapes(layout.shape))
        names, spacing, origin, unit = space_axes(layout)
        space = [{"name": n, "type": "space", **({"unit": unit} if unit else {})} for n in names]

        def multiscale(name: str, with_channels: bool) -> dict:
            lead, lead_0 = ([1.0], [0.0]) if with_channels else ([], [])
            return {
                "name": name,
                "axes": ([{"name": "c", "type": "channel"}] if with_channels else []) + space,
                "datasets": [
                    {"path": str(level), "coordinateTransformations": [
                        {"type": "scale", "scale": lead + [s * 2**level for s in spacing]}]
                        + ([{"type": "translation", "translation": lead_0 + level_translation(spacing, origin, level)}]
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
            self._downsample(root["labels/labels"][str(level - 1)], labels_target, mode_downsample)
            image_source, image_target = root[str(level - 1)], storing_every_chunk(root[str(level)])
            channels = image_source.ndim > len(self.layout.shape)
            self._downsample(image_source, image_target, mean_downsample if channels else mode_downsample, channels)
        image, label_image = self._ome()
        root["labels/labels"].attrs["ome"] = label_image
        root["labels"].attrs["ome"] = {"version": NGFF, "labels": ["labels"]}
        root.attrs.update({"ome": image, "tilemask": {**root.attrs["tilemask"], "complete": True}})  # the root last

    @staticmethod
    def _downsample(source, target, reduce, channels: bool = False) -> None:
        spatial = target.shape[1:] if channels else target.shape
        chunks = target.chunks[1:] if channels else target.chunks
        for start in itertools.product(*(range(0, s, c) for s, c in zip(spatial, chunks))):
            out = tuple(slice(a, min(a + c, s)) for a, c, s in zip(start, chunks, spatial))
            src = tuple(slice(2 * o.start, min(2 * o.stop, n)) for o, n in zip(out, source.shape[-len(spatial) :]))
            lead = (slice(None),) if channels else ()
            target[lead + out] = reduce(np.asarray(source[lead + src]))

    def publish(self) -> list[str]:
        publish(self.staged, self.path)
        return [self.path]

    def abort(self) -> None:
        remove(self.staged)
