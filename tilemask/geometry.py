"""Window plans and chunk grids: pure geometry, no I/O, no torch.

The scan grid is MONAI's (``monai.inferers.utils._get_scan_interval`` and
``monai.data.utils.dense_patch_slices``).  Per spatial axis of size ``S`` with
roi ``r`` and overlap ``o``:

* if ``S < r`` the axis is padded to ``r`` (``(r - S) // 2`` before, the rest
  after) and holds one window;
* otherwise the stride is ``int(r * (1 - o))`` (at least 1; ``r`` when
  ``S == r``), the windows start at ``k * stride`` for
  ``k = 0 .. first k with k * stride + r >= S``, and the last start is clamped
  flush to the far edge: ``min(k * stride, S - r)``.

nnU-Net's grid (``steps: nnunet``, ``compute_steps_for_sliding_window``) takes
``ceil((S - r) / (r * (1 - o))) + 1`` windows (a step not rounded down to whole
voxels, unlike MONAI's stride) and spreads them evenly from 0 to ``S - r`` (each
start rounded); padded as MONAI.

The grid is the Cartesian product of the per-axis starts, so everything below
(windows, blocks, stitching dependencies) is computed per axis and stays cheap
for images of any size.

Test-time augmentation runs MONAI's grid over the flipped image: along a flipped
axis its windows start at ``S - r - s`` for each start ``s`` above (the mirror
image), which differs from the unflipped grid unless ``S - r`` is a multiple of
the stride.  An axis that some flip mirrors then holds both sets of starts, and
each window knows which flips' grids hold it (:meth:`Block.flips_of`).

Each window is owned by exactly one *block*: the output chunk that holds its
(clipped) first voxel.  A block's windows cover a region that reaches at most
``roi`` beyond the chunk; the chunks that region touches receive the block's
weighted partial sums (overlap-add).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

Region = tuple[tuple[int, int], ...]
"""Half-open ``(start, stop)`` per spatial axis."""


def region_text(region: Region) -> str:
    """``region`` as messages name it, a NumPy index: ``[144:304, 144:304, 0:64]`` (not ``((144, 304), ...)``)."""
    return "[" + ", ".join(f"{start}:{stop}" for start, stop in region) + "]"


def normalize_per_axis(value: float | int | Sequence, ndim: int, name: str) -> tuple:
    """Turn a scalar or a per-axis sequence into a tuple of length ``ndim``."""
    if isinstance(value, (int, float)):
        return (value,) * ndim
    value = tuple(value)
    if len(value) != ndim:
        raise ValueError(f"{name} has {len(value)} values but the image has {ndim} spatial axes")
    return value


def scan_starts(size: int, roi: int, overlap: float) -> tuple[int, ...]:
    """Window starts along one axis, MONAI's rule, in image coordinates.

    With padding (``size < roi``) the single window starts at ``-((roi - size) // 2)``.
    """
    if size < roi:
        return (-((roi - size) // 2),)
    if roi == size:
        return (0,)
    stride = max(int(roi * (1 - overlap)), 1)
    count = next(k for k in range(math.ceil(size / stride) + 1) if k * stride + roi >= size) + 1
    return tuple(min(k * stride, size - roi) for k in range(count))


def nnunet_starts(size: int, roi: int, overlap: float) -> tuple[int, ...]:
    """Window starts along one axis as nnU-Net v2's ``compute_steps_for_sliding_window`` places them (its
    ``tile_step_size`` is ``1 - overlap``): evenly spread from 0 to ``size - roi``; padded as MONAI's."""
    if size <= roi:
        return scan_starts(size, roi, overlap)
    step_size = round(1 - overlap, 12)  # nnU-Net's -step_size 0.3, given as overlap 0.7: not 0.30000000000000004
    count = math.ceil((size - roi) / (roi * step_size)) + 1
    step = (size - roi) / (count - 1)
    return tuple(int(round(step * k)) for k in range(count))  # np.round's and round's halves: to even


@dataclass(frozen=True)
class AxisPlan:
    """Windows and blocks along one spatial axis."""

    size: int
    roi: int
    chunk: int
    starts: tuple[int, ...]  # MONAI's grid
    mirrored: tuple[int, ...] = ()  # MONAI's grid over the axis flipped, in unflipped coordinates (TTA)

    @functools.cached_property
    def positions(self) -> tuple[int, ...]:
        """Where windows start: both grids' starts, once each."""
        return tuple(sorted(set(self.starts) | set(self.mirrored)))

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.size / self.chunk)

    def chunk_extent(self, index: int) -> tuple[int, int]:
        return index * self.chunk, min((index + 1) * self.chunk, self.size)

    def owner(self, start: int) -> int:
        """The chunk that owns a window: the one holding its first in-image voxel."""
        return min(max(start, 0), self.size - 1) // self.chunk

    @functools.cached_property
    def _starts_by_block(self) -> dict[int, tuple[int, ...]]:
        by_block: dict[int, list[int]] = {}
        for s in self.positions:
            by_block.setdefault(self.owner(s), []).append(s)
        return {b: tuple(v) for b, v in by_block.items()}

    def block_starts(self, index: int) -> tuple[int, ...]:
        return self._starts_by_block.get(index, ())

    def block_extent(self, index: int) -> tuple[int, int]:
        """Region read and predicted by block ``index``, unclipped (may exceed the image when padded)."""
        starts = self.block_starts(index)
        return starts[0], starts[-1] + self.roi

    def blocks(self) -> tuple[int, ...]:
        """Indexes of the chunks that own at least one window."""
        return tuple(sorted(self._starts_by_block))

    def sources_of(self, chunk_index: int) -> tuple[int, ...]:
        """Blocks whose predicted region overlaps chunk ``chunk_index``."""
        lo, hi = self.chunk_extent(chunk_index)
        return tuple(b for b in self.blocks() if _overlaps(self.block_extent(b), (lo, hi)))


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


@dataclass(frozen=True)
class WindowPlan:
    """MONAI's sliding-window grid over an image, grouped into output-chunk blocks."""

    axes: tuple[AxisPlan, ...]

    @classmethod
    def build(
        cls,
        shape: Sequence[int],
        roi: Sequence[int],
        overlap: float | Sequence[float],
        chunks: int | Sequence[int],
        mirrored_axes: Sequence[int] = (),
        steps: str = "monai",
    ) -> WindowPlan:
        """MONAI's grid (``steps: nnunet``: nnU-Net's); along ``mirrored_axes`` (flipped by test-time augmentation)
        the mirrored grid too."""
        ndim = len(shape)
        roi = normalize_per_axis(roi, ndim, "roi_size")
        overlap = normalize_per_axis(overlap, ndim, "overlap")
        chunks = normalize_per_axis(chunks, ndim, "chunks")
        axes = []
        for axis, (size, r, o, c) in enumerate(zip(shape, roi, overlap, chunks)):
            chunk = max(1, min(int(c), int(size)))  # a chunk larger than the image is the image
            starts = (nnunet_starts if steps == "nnunet" else scan_starts)(int(size), int(r), float(o))
            mirrored = tuple(sorted(int(size) - int(r) - s for s in starts)) if axis in mirrored_axes else ()
            axes.append(AxisPlan(size=int(size), roi=int(r), chunk=chunk, starts=starts, mirrored=mirrored))
        return cls(tuple(axes))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(a.size for a in self.axes)

    @property
    def roi(self) -> tuple[int, ...]:
        return tuple(a.roi for a in self.axes)

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(a.chunk for a in self.axes)

    @property
    def chunk_counts(self) -> tuple[int, ...]:
        return tuple(a.n_chunks for a in self.axes)

    @property
    def n_windows(self) -> int:
        """Windows read (each is predicted once per flip whose grid holds it)."""
        return math.prod(len(a.positions) for a in self.axes)

    def windows(self) -> Iterator[tuple[int, ...]]:
        """All window starts in MONAI's order (C order over the axes)."""
        return itertools.product(*(a.positions for a in self.axes))

    def chunk_indexes(self) -> Iterator[tuple[int, ...]]:
        return itertools.product(*(range(a.n_chunks) for a in self.axes))

    def chunk_region(self, index: Sequence[int]) -> Region:
        return tuple(a.chunk_extent(i) for a, i in zip(self.axes, index))

    def block_indexes(self) -> Iterator[tuple[int, ...]]:
        """Chunks that own at least one window (one inference task each)."""
        return itertools.product(*(a.blocks() for a in self.axes))

    def block(self, index: Sequence[int]) -> Block:
        starts = tuple(a.block_starts(i) for a, i in zip(self.axes, index))
        grids = ()
        if any(a.mirrored for a in self.axes):  # test-time augmentation: which grid holds which of its windows
            grids = tuple(
                (tuple(s for s in own if s in a.starts), tuple(s for s in own if s in a.mirrored))
                for a, own in zip(self.axes, starts)
            )  # fmt: skip
        return Block(index=tuple(index), starts=starts, roi=self.roi, shape=self.shape, grids=grids)

    def sources_of(self, chunk_index: Sequence[int]) -> Iterator[tuple[int, ...]]:
        """Blocks whose partial sums the chunk needs."""
        return itertools.product(*(a.sources_of(i) for a, i in zip(self.axes, chunk_index)))

    def chunks_overlapping(self, region: Region) -> Iterator[tuple[int, ...]]:
        """Output chunks that ``region`` (inside the image) reaches into."""
        return itertools.product(*(range(lo // a.chunk, (hi - 1) // a.chunk + 1) for a, (lo, hi) in zip(self.axes, region)))


@dataclass(frozen=True)
class Block:
    """The windows owned by one output chunk: the unit of inference work."""

    index: tuple[int, ...]
    starts: tuple[tuple[int, ...], ...]  # per axis
    roi: tuple[int, ...]
    shape: tuple[int, ...]  # image shape
    grids: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = ()  # per axis: (MONAI's starts, mirrored ones)

    def flips_of(self, start: tuple[int, ...], flips: Sequence[tuple[int, ...]]) -> list[int]:
        """Indexes of the ``flips`` (tuples of flipped axes) whose window grid holds the window at ``start``."""
        if not self.grids:
            return list(range(len(flips)))
        return [
            i for i, axes in enumerate(flips)
            if all(s in self.grids[d][1 if d in axes else 0] for d, s in enumerate(start))
        ]  # fmt: skip

    @property
    def n_windows(self) -> int:
        return math.prod(len(s) for s in self.starts)

    def reaching(self, region: Region) -> Block:
        """The block with only its windows that reach into ``region`` (a resumed job: the windows a chunk
        not yet written needs from a block whose own chunk was written); itself if none would be left."""
        keep = [tuple(s for s in starts if s < hi and s + r > lo) for starts, r, (lo, hi) in zip(self.starts, self.roi, region)]
        if not all(keep):
            return self
        grids = tuple((tuple(s for s in own if s in k), tuple(s for s in mirrored if s in k))
                      for (own, mirrored), k in zip(self.grids, keep))  # fmt: skip
        return Block(index=self.index, starts=tuple(keep), roi=self.roi, shape=self.shape, grids=grids)

    @property
    def extent(self) -> Region:
        """The region the windows cover, in image coordinates (may exceed the image when padded)."""
        return tuple((s[0], s[-1] + r) for s, r in zip(self.starts, self.roi))

    @property
    def region(self) -> Region:
        """``extent`` clipped to the image: what is read and what the partial sums cover."""
        return clip_region(self.extent, self.shape)

    def windows(self) -> Iterator[tuple[int, ...]]:
        return itertools.product(*self.starts)


def clip_region(region: Region, shape: Sequence[int]) -> Region:
    return tuple((max(lo, 0), min(hi, size)) for (lo, hi), size in zip(region, shape))


def intersect(a: Region, b: Region) -> Region | None:
    out = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b))
    return None if any(lo >= hi for lo, hi in out) else out


def local_slices(region: Region, origin: Sequence[int]) -> tuple[slice, ...]:
    """Slices of ``region`` in an array whose first element sits at ``origin``."""
    return tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(region, origin))


def region_shape(region: Region) -> tuple[int, ...]:
    return tuple(hi - lo for lo, hi in region)


# -- georeferencing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RasterGeometry:
    """Where a raster's pixels are on Earth: CRS (WKT) and GDAL geotransform."""

    crs_wkt: str | None
    transform: tuple[float, float, float, float, float, float]  # GDAL order: x0, dx, rx, y0, ry, dy

    def to_attrs(self) -> dict:
        return {"crs": self.crs_wkt, "transform": list(self.transform)}


@dataclass(frozen=True)
class VolumeGeometry:
    """Where a volume's voxels are in scanner space: 4x4 voxel-to-RAS+ affine (nibabel convention)."""

    affine: tuple[tuple[float, ...], ...]

    def to_attrs(self) -> dict:
        return {"affine": [list(row) for row in self.affine]}


Geometry = RasterGeometry | VolumeGeometry


def affine_problem(affine) -> str | None:
    """Why a voxel-to-world affine cannot place a volume's voxels, in a line, or None when it can: values that are
    not finite, or a 3x3 part that is singular (the voxel axes span fewer than three dimensions), judged with the
    tolerance of nibabel's ``io_orientation``, which reorienting needs (singular values of at most
    ``max * 3 * eps`` count as zero).  Reorienting such an affine failed in nibabel ("Unable to find out axis",
    "SVD did not converge"), and a NIfTI header cannot hold it ("Could not decompose affine")."""
    import numpy as np

    rows = np.asarray(affine, dtype=float)[:3]
    shown = "[" + "; ".join(" ".join(f"{v:g}" for v in row) for row in rows) + "]"
    if not np.isfinite(rows).all():
        return f"it holds values that are not finite: {shown}"
    values = np.linalg.svd(rows[:, :3], compute_uv=False)
    if values.min() <= values.max() * 3 * np.finfo(float).eps:
        return f"it is singular (its voxel axes span fewer than three dimensions): {shown}"
    return None


def transform_problem(transform) -> str | None:
    """Why a GDAL geotransform ``(x0, dx, rx, y0, ry, dy)`` cannot place a raster's pixels, in a line, or None
    when it can: values that are not finite, or a 2x2 part that is singular (a pixel of no area: rows and columns
    along one line), with :func:`affine_problem`'s tolerance.  Such a raster ran: its areas came out 0, its
    polygons failed to write."""
    import numpy as np

    values = np.asarray(transform, dtype=float)
    shown = "(" + ", ".join(f"{v:g}" for v in values) + ")"
    if not np.isfinite(values).all():
        return f"it holds values that are not finite: {shown}"
    scales = np.linalg.svd(values[[1, 2, 4, 5]].reshape(2, 2), compute_uv=False)
    if scales.min() <= scales.max() * 3 * np.finfo(float).eps:
        return f"it is singular (a pixel of no area): {shown}"
    return None


def geometry_problem(geometry: Geometry) -> str | None:
    """Why ``geometry`` cannot place an image's pixels or voxels (:func:`transform_problem`,
    :func:`affine_problem`), as the end of a line naming the file, or None."""
    if isinstance(geometry, VolumeGeometry):
        problem = affine_problem(geometry.affine)
        return problem and f"its affine (voxel-to-world matrix) is not usable: {problem}"
    problem = transform_problem(geometry.transform)
    return problem and f"its geotransform (pixel-to-map) is not usable: {problem}"


IDENTITY_TRANSFORM = (0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def geometry_from_attrs(attrs: dict, spatial_dims: int) -> Geometry:
    """The geometry recorded by ``to_attrs`` (tilemask's Zarr attributes); identity when absent."""
    if "affine" in attrs:
        return VolumeGeometry(tuple(tuple(float(v) for v in row) for row in attrs["affine"]))
    if spatial_dims == 2:
        return RasterGeometry(attrs.get("crs"), tuple(attrs.get("transform", IDENTITY_TRANSFORM)))
    return VolumeGeometry(tuple(tuple(float(i == j) for j in range(4)) for i in range(4)))


WORLD_AXES = ("x", "y", "z")  # a volume's world coordinates (its affine's rows), as NGFF names them
OME_UNITS_IN_MM = {"millimeter": 1.0, "micrometer": 1e-3, "nanometer": 1e-6, "centimeter": 10.0, "meter": 1000.0}


def ome_axes(multiscale: dict) -> list[dict]:
    """A multiscale's axes as NGFF 0.4 writes them, each a dict with a ``type``: NGFF 0.3 names them only, and 0.4
    does not require the type; an untyped axis is a space axis unless named ``t`` (time) or ``c`` (channel)."""
    axes = []
    for axis in multiscale.get("axes", []):
        axis = dict(axis) if isinstance(axis, dict) else {"name": str(axis)}
        axis.setdefault("type", {"t": "time", "c": "channel"}.get(str(axis.get("name", "")).lower(), "space"))
        axes.append(axis)
    return axes


def level_geometry(level0: Geometry, multiscale: dict, level: int) -> Geometry:
    """The grid of ``level`` of a tilemask output's label multiscale, from its full resolution's recorded grid
    (which keeps the CRS and the flips NGFF has no place for): along each array axis, the level's pixel ``i`` is
    level 0's ``step * i + offset``, from the two levels' scale and translation (NGFF places pixel centres)."""
    import numpy as np

    def scale_and_translation(index: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(ome_axes(multiscale))
        scale, translation = np.ones(n), np.zeros(n)
        for transform in multiscale["datasets"][index].get("coordinateTransformations", []):
            if transform.get("type") == "scale":
                scale = np.asarray(transform["scale"], dtype=float)
            elif transform.get("type") == "translation":
                translation = np.asarray(transform["translation"], dtype=float)
        return scale, translation

    space = [i for i, a in enumerate(ome_axes(multiscale)) if a["type"] == "space"]
    (s0, t0), (sk, tk) = scale_and_translation(0), scale_and_translation(level)
    step, offset = sk[space] / s0[space], (tk[space] - t0[space]) / s0[space]
    if isinstance(level0, VolumeGeometry):
        to_level0 = np.eye(4)
        to_level0[:3, :3], to_level0[:3, 3] = np.diag(step), offset
        return VolumeGeometry(tuple(tuple(float(v) for v in row) for row in np.asarray(level0.affine) @ to_level0))
    x0, dx, rx, y0, ry, dy = level0.transform  # GDAL's: (col, row) of pixel corners; the array's axes are (row, col)
    (row_step, col_step), (row_offset, col_offset) = step, offset
    to_level0 = np.array([[col_step, 0.0, col_offset + 0.5 - 0.5 * col_step],
                          [0.0, row_step, row_offset + 0.5 - 0.5 * row_step], [0.0, 0.0, 1.0]])  # fmt: skip
    placed = np.array([[dx, rx, x0], [ry, dy, y0], [0.0, 0.0, 1.0]]) @ to_level0
    return RasterGeometry(level0.crs_wkt, tuple(float(v) for v in (placed[0, 2], placed[0, 0], placed[0, 1],
                                                                   placed[1, 2], placed[1, 0], placed[1, 1])))


def ome_geometry(multiscale: dict, spatial_dims: int, level: int = 0) -> Geometry:
    """The grid of one level of an OME-Zarr multiscale: its ``scale`` and ``translation`` on the space axes.

    NGFF applies a dataset's transformations first, then the multiscale's:
    ``x = S_ms * (S_ds * i + t_ds) + t_ms``. Volumes get an axis-aligned affine in mm
    (the axes' ``unit`` converted; none given: mm), each array axis on the world axis its name says when the
    names are x, y and z in any order (else in the axes' order); NGFF has no rotation. 2D images get a
    transform with no CRS whose rows run the way y grows, its corner half a pixel before the translation (the centre
    of pixel (0, 0) in NGFF, as a voxel's in a NIfTI affine).
    """
    import numpy as np

    from .errors import InputError

    axes = ome_axes(multiscale)
    space = [i for i, a in enumerate(axes) if a["type"] == "space"]
    if len(space) != spatial_dims:
        raise InputError(f"OME-Zarr with {len(space)} space axes for a {spatial_dims}D model")
    scale, translation = np.ones(len(axes)), np.zeros(len(axes))
    for transform in (*multiscale["datasets"][level].get("coordinateTransformations", []),
                      *multiscale.get("coordinateTransformations", [])):  # fmt: skip
        if transform.get("type") == "scale":
            factor = np.asarray(transform["scale"], dtype=float)
            scale, translation = scale * factor, translation * factor
        elif transform.get("type") == "translation":
            translation = translation + np.asarray(transform["translation"], dtype=float)
    units = [axes[i].get("unit") for i in space]
    if spatial_dims == 3:
        unknown = [u for u in units if u is not None and u not in OME_UNITS_IN_MM]
        if unknown:
            raise InputError(f"OME-Zarr space unit {unknown[0]!r}: tilemask reads {', '.join(OME_UNITS_IN_MM)}")
        to_mm = np.array([OME_UNITS_IN_MM.get(u or "millimeter") for u in units])
    else:
        to_mm = np.ones(2)
    sizes = [float(scale[i]) * f for i, f in zip(space, to_mm)]
    origin = [float(translation[i]) * f for i, f in zip(space, to_mm)]
    if spatial_dims == 2:  # NGFF places pixel centres; a geotransform, pixel (0, 0)'s corner, half a pixel before
        corner = [o - size / 2 for o, size in zip(origin, sizes)]
        return RasterGeometry(None, (corner[1], sizes[1], 0.0, corner[0], 0.0, sizes[0]))
    names = [axes[i].get("name") for i in space]
    world = [WORLD_AXES.index(n) for n in names] if sorted(names) == sorted(WORLD_AXES) else [0, 1, 2]
    affine = [[0.0] * 4 for _ in range(3)] + [[0.0, 0.0, 0.0, 1.0]]
    for axis, row in enumerate(world):
        affine[row][axis], affine[row][3] = sizes[axis], origin[axis]
    return VolumeGeometry(tuple(tuple(row) for row in affine))


def ome_space_names(geometry: Geometry, spatial_dims: int) -> tuple[str, ...]:
    """The NGFF names of an output's space axes, in array order: ``y, x`` for rows and columns of an image; for a
    volume, the world axis (x, y, z of its affine) each array axis runs closest to, as nibabel orients it."""
    if spatial_dims == 2 or not isinstance(geometry, VolumeGeometry):
        return ("z", "y", "x")[-spatial_dims:]
    import numpy as np
    from nibabel.orientations import io_orientation

    return tuple(WORLD_AXES[int(w)] for w in io_orientation(np.asarray(geometry.affine))[:, 0])
