"""The network's grid: MONAI's ``Orientation`` and ``Spacing``, chunk by chunk, and the way back.

A medical network is trained on volumes reoriented (``Orientation(axcodes)``) and
resampled (``Spacing(pixdim)``, bilinear, border padding).  :func:`model_grid`
computes the grid they produce, with MONAI's own rules (``nib.io_orientation``,
``zoom_affine(diagonal=False)``, ``compute_shape_offset``) in numpy, so the
client never imports torch.  Both steps together map a voxel ``m`` of the model
grid to the input voxel ``inv(A_in) @ A_model @ m``: orientation permutes and
flips axes exactly, spacing interpolates.

:class:`ResampledSource` is the input seen on the model grid: a region of it is
interpolated (trilinear, coordinates clamped to the volume: MONAI's ``border``
padding) from only the input voxels that region maps onto, plus one voxel of
interpolation halo, so no process holds the resampled volume.
:func:`resample_back` is MONAI's ``Invertd(nearest_interp=False)`` for one
output chunk: the model-grid probabilities interpolated the same way onto the
input grid, where the labels are then taken.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .geometry import Region, VolumeGeometry
from .sources import ImageSource

logger = logging.getLogger(__name__)

AFFINE_TOL = 1e-3  # monai.utils.misc's tolerance: a corner within it of the smallest is the origin
Matrix = tuple[tuple[float, ...], ...]


def _as_tuple(matrix: np.ndarray) -> Matrix:
    return tuple(tuple(float(v) for v in row) for row in matrix)


@dataclass(frozen=True)
class ModelGrid:
    """The grids of MONAI's two steps: the input's, the oriented one (axes permuted and flipped), and the
    model's (the oriented one resampled; the same when no spacing is asked or the spacing is already right)."""

    input_affine: Matrix
    input_shape: tuple[int, ...]
    ornt: tuple[tuple[int, int], ...]  # per input axis: (its oriented axis, 1 or -1 when flipped)
    oriented_affine: Matrix
    oriented_shape: tuple[int, ...]
    affine: Matrix
    shape: tuple[int, ...]

    @property
    def resampled(self) -> bool:
        """Whether the model grid interpolates the oriented one (else it is the oriented grid itself)."""
        return self.affine != self.oriented_affine or self.shape != self.oriented_shape

    @property
    def to_oriented(self) -> np.ndarray:
        """MONAI's ``xform`` of the resampling: model voxel -> oriented voxel (``solve(src, dst)``)."""
        return np.linalg.solve(np.asarray(self.oriented_affine), np.asarray(self.affine))

    @property
    def to_model(self) -> np.ndarray:
        """The inverse resampling's ``xform``: oriented voxel -> model voxel."""
        return np.linalg.solve(np.asarray(self.affine), np.asarray(self.oriented_affine))

    @property
    def geometry(self) -> VolumeGeometry:
        return VolumeGeometry(self.affine)

    def input_region(self, oriented: Region) -> Region:
        """The input voxels of a region of the oriented grid (an exact permutation and flips)."""
        out = []
        for axis, (target, flip) in enumerate(self.ornt):
            lo, hi = oriented[target]
            size = self.input_shape[axis]
            out.append((size - hi, size - lo) if flip < 0 else (lo, hi))
        return tuple(out)

    def oriented_region(self, region: Region) -> Region:
        """The oriented voxels of a region of the input grid."""
        out: list = [None] * len(region)
        for axis, (target, flip) in enumerate(self.ornt):
            lo, hi = region[axis]
            size = self.input_shape[axis]
            out[target] = (size - hi, size - lo) if flip < 0 else (lo, hi)
        return tuple(out)

    def orient(self, block: np.ndarray) -> np.ndarray:
        """``(C, *input axes)`` -> ``(C, *oriented axes)``."""
        import nibabel as nib  # here, not at the top: a client planning rasters never needs it

        return np.stack([nib.orientations.apply_orientation(c, np.asarray(self.ornt)) for c in block])

    def unorient(self, block: np.ndarray) -> np.ndarray:
        """``(C, *oriented axes)`` -> ``(C, *input axes)``."""
        inverse = [None] * len(self.ornt)
        for axis, (target, flip) in enumerate(self.ornt):
            inverse[target] = (axis, flip)
        import nibabel as nib

        return np.stack([nib.orientations.apply_orientation(c, np.asarray(inverse)) for c in block])


def model_grid(
    affine: np.ndarray, shape: tuple[int, ...], orientation: str | None, spacing: tuple[float, ...] | None
) -> ModelGrid:
    """The grid MONAI's ``Orientation(axcodes=orientation)`` then ``Spacing(pixdim=spacing)`` produce."""
    import nibabel as nib

    affine = np.asarray(affine, dtype=float)
    shape = tuple(int(s) for s in shape)
    ornt = np.array([[i, 1] for i in range(len(shape))])
    oriented, oriented_shape = affine, shape
    if orientation:
        ornt = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt(orientation))
        oriented_shape = tuple(shape[int(np.flatnonzero(ornt[:, 0] == a)[0])] for a in range(len(shape)))
        oriented = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    model, model_shape = oriented, oriented_shape
    if spacing is not None:
        model, model_shape = _spaced(oriented, oriented_shape, spacing)
        unchanged = model_shape == oriented_shape and np.allclose(np.linalg.solve(oriented, model), np.eye(4), atol=AFFINE_TOL)
        if unchanged:  # MONAI's spatial_resample then returns the image as it is, with its affine
            model = oriented
    pairs = tuple((int(a), int(f)) for a, f in ornt)
    return ModelGrid(_as_tuple(affine), shape, pairs, _as_tuple(oriented), oriented_shape, _as_tuple(model), model_shape)


def _spaced(affine: np.ndarray, shape: tuple[int, ...], pixdim: tuple[float, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
    """``monai.transforms.Spacing(pixdim, diagonal=False)``: ``zoom_affine`` then ``compute_shape_offset``; a pixdim
    of 0 or less is the grid's own spacing along that axis (``zoom_affine``'s ``fall_back_tuple`` of
    ``affine_to_spacing``)."""
    rzs = affine[:3, :3]
    own = np.sqrt((rzs**2).sum(axis=0))
    pixdim = tuple(p if p > 0 else o for p, o in zip(pixdim, own))
    zooms = np.linalg.cholesky(rzs.T @ rzs).T  # the rotation kept, the shears dropped
    rotation = rzs @ np.linalg.inv(zooms)
    new = np.eye(4)
    new[:3, :3] = rotation @ np.diag(np.sign(np.diag(zooms)) * np.abs(np.asarray(pixdim, float)))
    size = np.asarray(shape, dtype=float)
    corners = np.asarray(np.meshgrid(*[(0.0, d - 1.0) for d in size], indexing="ij")).reshape(3, -1)
    corners = np.concatenate((corners, np.ones_like(corners[:1])))
    with np.errstate(all="ignore"):  # a pixdim of 1e-320: infinities and NaN, refused below (no RuntimeWarning)
        in_model = np.linalg.solve(new, affine) @ corners
        world = affine @ corners
        out_shape = np.round(np.ptp(in_model[:-1] / in_model[-1], axis=1) + 1.0)
    if not np.isfinite(out_shape).all():  # a pixdim so small (1e-320) that no float counts the voxels along it
        raise OverflowError(f"pixdim {list(pixdim)} makes more voxels along an axis than a float counts")
    distances = in_model[:-1]
    offset = None
    for i in range(corners.shape[1]):
        if np.allclose(np.min(distances - distances[:, i : i + 1], 1), 0.0, rtol=AFFINE_TOL):
            offset = world[:-1, i]  # this corner is the smallest: it becomes the origin
            break
    if offset is None:  # else the centres are aligned
        offset = affine[:-1, :-1] @ (size / 2.0) + affine[:-1, -1] - new[:-1, :-1] @ (out_shape / 2.0)
    new[:3, -1] = offset
    return new, tuple(int(s) for s in out_shape)


def source_region(matrix: np.ndarray, region: Region, shape: tuple[int, ...]) -> Region:
    """The voxels of a grid of ``shape`` that trilinear interpolation at ``matrix @ region`` reads, clipped."""
    corners = np.asarray(list(itertools.product(*[(lo, hi - 1) for lo, hi in region])), dtype=float).T
    mapped = matrix[:3, :3] @ corners + matrix[:3, 3:4]
    low = np.floor(mapped.min(axis=1)).astype(int) - 1  # one voxel of slack for rounding
    high = np.floor(mapped.max(axis=1)).astype(int) + 3  # the upper neighbour, slack, half-open
    return tuple((int(min(max(lo, 0), size - 1)), int(max(min(hi, size), 1))) for lo, hi, size in zip(low, high, shape))


SLAB_POINTS = 1 << 15  # points sampled at once (whole planes, at least one): their float64 temporaries stay in
# the cache (a 512^3 scan's blocks: 0.22 s each, against 0.28 s with 2^18 points at once)


def sample(
    values: np.ndarray,
    origin: tuple[int, ...],
    xform: np.ndarray,
    src_shape: tuple[int, ...],
    dst_shape: tuple[int, ...],
    region: Region,
    nearest: bool = False,
) -> np.ndarray:
    """``(C, *region)`` of MONAI's ``spatial_resample`` (``align_corners=False``, ``border``, float64) from a
    ``src_shape`` grid onto a ``dst_shape`` grid, for one region of the destination only.

    ``values`` are the source voxels :func:`source_region` names, ``(C, ...)`` starting at ``origin``.  The
    arithmetic is MONAI's and torch's, step by step: ``to_norm_affine``, ``affine_grid``'s base grid and
    product, ``grid_sample``'s unnormalising, clamping, corner weights and their sum in its order, so a
    region equals the same voxels of the whole volume resampled at once, to the last bit.  (Zeros stay
    zero exactly where MONAI's do: a z-score over nonzero voxels depends on it.)
    """
    import torch

    from .imports import import_module

    to_norm_affine = import_module("monai.networks.utils").to_norm_affine
    theta = to_norm_affine(torch.as_tensor(xform, dtype=torch.float64)[None], src_shape, dst_shape, False)[0]
    theta = theta[[2, 1, 0, 3]][:, [2, 1, 0, 3]][:3]  # reverse_indexing: grid coordinates are (x, y, z)
    lines = [torch.linspace(-1, 1, size, dtype=torch.float64) * (size - 1) / size for size in dst_shape]
    zs, ys, xs = (line[lo:hi] for line, (lo, hi) in zip(lines, region))
    data = torch.from_numpy(np.ascontiguousarray(values)).to(torch.float64)
    finite = values.dtype.kind != "f" or bool(np.isfinite(values).all())
    out = torch.empty((values.shape[0], len(zs), len(ys), len(xs)), dtype=torch.float64)
    step = max(1, SLAB_POINTS // max(1, len(ys) * len(xs)))
    for first in range(0, len(zs), step):
        grid = _affine_grid(theta, zs[first : first + step], ys, xs)
        # grid_sampler_compute_source_index: ((g + 1) * size - 1) / 2, then clip to [0, size - 1]
        iz, iy, ix = (
            torch.clamp(((grid[:, k] + 1) * size - 1) / 2, 0, size - 1) for k, size in zip((2, 1, 0), src_shape)
        )
        out[:, first : first + step] = _gather(data, origin, src_shape, iz, iy, ix, nearest, finite).reshape(
            values.shape[0], -1, len(ys), len(xs)
        )
    return out.numpy().astype(values.dtype if nearest else np.float32)


def _affine_grid(theta, zs, ys, xs):
    """``affine_grid``'s points ``(x, y, z)`` for the voxels ``zs x ys x xs`` of its base grid, ``(n, 3)``: its base
    grid's rows ``(x, y, z, 1)`` times ``theta`` transposed by the same ``bmm``, so by the same BLAS kernel (MKL's
    AVX-512 kernel sums the four products in another order than its AVX2 one: a product written out here matched
    MONAI on one machine and left 7 of 149,688 voxels 1e-13 off it on another)."""
    import torch

    base = torch.ones((1, len(zs), len(ys), len(xs), 4), dtype=torch.float64)
    base[..., 0] = xs
    base[..., 1] = ys[:, None]
    base[..., 2] = zs[:, None, None]
    return base.view(1, -1, 4).bmm(theta[None].transpose(1, 2))[0]


def _gather(data, origin, src_shape, iz, iy, ix, nearest: bool, finite: bool):
    """``grid_sampler_3d_cpu``'s bilinear (or nearest) value at (iz, iy, ix), ``data`` starting at ``origin``:
    its corner weights (the same products in the same order) and its sum over the corners inside the
    volume, in its order.  The coordinates are clamped to the volume, so only an upper neighbour can lie
    outside it; a corner is read at one linear offset into ``data``.

    An upper neighbour lies outside only where the coordinate is the volume's last voxel exactly, and its
    weight is then 0: where ``data`` is ``finite`` its term is +-0, and adding it leaves the sum as it is (a
    sum from +0 is never -0), so no corner needs masking.  A NaN or an infinity would not vanish."""
    import torch

    flat = data.reshape(data.shape[0], -1)
    sizes = data.shape[1:]
    strides = (sizes[1] * sizes[2], sizes[2], 1)

    def offset(coordinate, axis: int):  # into ``data``, clamped to it (the corners outside the volume are unused)
        return (coordinate.long() - origin[axis]).clamp_(0, sizes[axis] - 1).mul_(strides[axis])

    def read(at):
        return flat[0].take(at)[None] if len(flat) == 1 else flat.index_select(1, at)

    if nearest:  # nearbyint: halves to even
        return read(offset(torch.round(iz), 0) + offset(torch.round(iy), 1) + offset(torch.round(ix), 2))
    low = [torch.floor(c) for c in (iz, iy, ix)]
    high = [c + 1 for c in low]
    spans = [(h - c, c - l) for c, l, h in zip((iz, iy, ix), low, high)]  # the weights' factors, per axis
    offsets = [(offset(l, axis), offset(h, axis)) for axis, (l, h) in enumerate(zip(low, high))]
    inside = None if finite else [h < size for h, size in zip(high, src_shape)]
    total = torch.zeros((data.shape[0], iz.shape[0]), dtype=torch.float64)
    for z in (0, 1):  # torch's order: tnw, tne, tsw, tse, bnw, bne, bsw, bse
        for y in (0, 1):
            zy = offsets[0][z] + offsets[1][y]
            for x in (0, 1):
                weight = spans[2][x] * spans[1][y] * spans[0][z]
                term = read(zy + offsets[2][x]) * weight
                masks = [m for m, upper in zip(inside, (z, y, x)) if upper] if inside else []
                if not masks:
                    total = total + term
                    continue
                within = masks[0]
                for mask in masks[1:]:
                    within = within & mask
                total = torch.where(within, total + term, total)
    return total


def interpolate(values: np.ndarray, origin: tuple[int, ...], xform: np.ndarray, region: Region) -> np.ndarray:
    """``(C, *region)``: ``values`` (``(C, ...)`` starting at ``origin`` of the source grid) at ``xform @ voxel``
    for every voxel of ``region``, bilinear with border clamping, by torch's own ``grid_sample`` in float32.

    The way back needs no bitwise equality (probabilities, compared within 1e-3), and ``grid_sample``
    itself is 3-4x faster than :func:`sample`'s step-by-step float64 emulation.  ``values`` cover every
    corner the region needs (:func:`source_region`), so clamping at their edge is clamping at the volume's.
    """
    import torch

    axes = [np.arange(lo, hi, dtype=np.float64) for lo, hi in region]
    shape = [hi - lo for lo, hi in region]
    spatial = values.shape[1:]
    grid = np.empty((*shape, 3), np.float32)
    for k in range(3):  # source coordinate along axis k, normalised to the block; grid_sample wants (x, y, z)
        coordinate = sum(xform[k, m] * axes[m].reshape([-1 if a == m else 1 for a in range(3)]) for m in range(3))
        coordinate = coordinate + xform[k, 3] - origin[k]
        grid[..., 2 - k] = (2 * coordinate + 1) / spatial[k] - 1
    out = torch.nn.functional.grid_sample(
        torch.from_numpy(np.ascontiguousarray(values))[None], torch.from_numpy(grid)[None],
        mode="bilinear", padding_mode="border", align_corners=False,
    )  # fmt: skip
    return out[0].numpy()


@dataclass(frozen=True)
class ResampledSource(ImageSource):
    """An input seen on the model grid (:func:`model_grid`), read region by region (on workers: torch)."""

    source: ImageSource
    grid: ModelGrid

    @property
    def path(self) -> str:  # type: ignore[override]
        return self.source.path

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.source.channels, *self.grid.shape)

    @property
    def geometry(self) -> VolumeGeometry:
        return self.grid.geometry

    @property
    def has_invalid(self) -> bool:
        return self.source.has_invalid

    @property
    def floating(self) -> bool:
        return self.source.floating  # interpolating finite values gives finite ones; NaN spreads to neighbours

    def read(self, region: Region) -> np.ndarray:
        return self._resample(region, lambda r: self.source.read(r).astype(np.float32), nearest=False)

    def read_valid(self, region: Region) -> np.ndarray | None:
        if not self.source.has_invalid:
            return None

        def validity(read: Region) -> np.ndarray:
            valid = self.source.read_valid(read)
            return np.ones((1, *(hi - lo for lo, hi in read)), bool) if valid is None else valid[None]

        return self._resample(region, validity, nearest=True)[0]  # a voxel is valid where its nearest is

    def _resample(self, region: Region, read: Callable[[Region], np.ndarray], nearest: bool) -> np.ndarray:
        """The oriented voxels (an exact permutation and flips of the input's), resampled when asked."""
        grid = self.grid
        if not grid.resampled:
            return grid.orient(read(grid.input_region(region)))
        xform = grid.to_oriented
        needed = source_region(xform, region, grid.oriented_shape)
        values = grid.orient(read(grid.input_region(needed)))
        origin = tuple(lo for lo, _ in needed)
        return sample(values, origin, xform, grid.oriented_shape, grid.shape, region, nearest)


def resample_back(grid: ModelGrid, region: Region, read_model: Callable[[Region], np.ndarray]) -> np.ndarray:
    """``(C, *region)`` on the input grid: the model-grid values ``read_model`` gives brought back as MONAI's
    ``Invertd(nearest_interp=False)`` does: resampled onto the oriented grid (bilinear, border), then the
    orientation undone."""
    oriented = grid.oriented_region(region)
    if grid.resampled:
        xform = grid.to_model
        needed = source_region(xform, oriented, grid.shape)
        values = read_model(needed).astype(np.float32, copy=False)
        back = interpolate(values, tuple(lo for lo, _ in needed), xform, oriented)
    else:
        back = read_model(oriented)
    return grid.unorient(back)
