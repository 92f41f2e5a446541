"""Overlap-add of weighted partial sums.

An output voxel is ``sum_w(w * pred) / sum_w(w)`` over the windows covering it
(MONAI's blending).  With test-time augmentation by flipped images there is one
such blend per flip (each flip is its own MONAI run), so the sums carry a leading
blend axis: ``weighted`` holds ``blends x channels`` planes, ``weights`` one per
blend (one blend without flips, or with nnU-Net's mirroring of each window:
:attr:`~tilemask.settings.InferenceSettings.blends`).  Each
inference block returns the sums over its own region (:class:`Partial`: ``weights``
None where labels alone are written, :meth:`~tilemask.settings.Finishing.needs_weights`); a
chunk adds the parts of its neighbours' partials that fall inside it
(:func:`overlap_add`); :mod:`tilemask.finalize` divides and turns the result
into labels and probabilities.

On a GPU a block's sums stay there (:class:`DevicePartial`): only the parts
that fall in other chunks are copied to the host, and its own chunk is added,
blended and labelled on the GPU (:mod:`tilemask.finalize_device`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .geometry import Region, intersect, local_slices, region_shape

logger = logging.getLogger(__name__)


@dataclass
class Partial:
    """Weighted sums of one block's windows over ``region`` (image coordinates)."""

    region: Region
    weighted: np.ndarray  # (B * C, *region) sum of w * prediction, per blend B
    weights: np.ndarray | None  # (B, *region) sum of w, per blend; None where not needed (Finishing.needs_weights)
    valid: np.ndarray | None = None  # (*region) input validity, None when every pixel is valid

    @property
    def origin(self) -> tuple[int, ...]:
        return tuple(lo for lo, _ in self.region)


@dataclass
class DevicePartial(Partial):
    """A :class:`Partial` whose sums are torch tensors on the worker's device (``valid`` stays on the host).

    Pickled (sent to another worker, or spilled), it becomes a host :class:`Partial`: a GPU's memory is its own
    process's."""

    done: Any = None  # on a GPU: the CUDA event after which the sums hold their values

    def host(self, regions: list[Region]) -> list[Partial]:
        """The sums over each of ``regions`` (within this one's) copied to host :class:`Partial` objects, in
        one wait for the device."""
        from .device import to_host

        if not regions:
            return []
        keeps = [local_slices(region, self.origin) for region in regions]
        sums = [t for t in (self.weighted, self.weights) if t is not None]
        arrays = iter(to_host(tuple(t[(slice(None), *keep)] for keep in keeps for t in sums), self.done))
        return [
            Partial(region, next(arrays), None if self.weights is None else next(arrays),
                    None if self.valid is None else self.valid[keep].copy())
            for region, keep in zip(regions, keeps)
        ]  # fmt: skip

    def __reduce__(self):
        (host,) = self.host([self.region])
        return Partial, (host.region, host.weighted, host.weights, host.valid)


def cut(partial: Partial, regions: dict[tuple[int, ...], Region]) -> dict[tuple[int, ...], Partial]:
    """The parts of ``partial`` inside each of ``regions`` (copies, so the whole partial can be freed)."""
    common = {key: c for key, region in regions.items() if (c := intersect(region, partial.region)) is not None}
    if isinstance(partial, DevicePartial):
        return dict(zip(common, partial.host(list(common.values()))))
    pieces = {}
    for key, region in common.items():
        src = local_slices(region, partial.origin)
        pieces[key] = Partial(
            region=region,
            weighted=partial.weighted[(slice(None), *src)].copy(),
            weights=None if partial.weights is None else partial.weights[(slice(None), *src)].copy(),
            valid=None if partial.valid is None else partial.valid[src].copy(),
        )
    return pieces


def overlap_add(chunk: Region, partials: Iterable[Partial]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The sums of all partials over ``chunk``, and the chunk's input validity (None: all valid).

    The sums are numpy arrays, or torch tensors on the device of the partials' tensors (all on one device); the
    weights' None when the partials hold none (all of them or none hold weights: a mix is an error)."""
    weighted = weights = valid = None
    chunk_origin = tuple(lo for lo, _ in chunk)
    for part in partials:
        common = intersect(chunk, part.region)
        if common is None:
            continue
        if weighted is None:
            weighted = _zeros_like(part.weighted, (part.weighted.shape[0], *region_shape(chunk)))
            if part.weights is not None:
                weights = _zeros_like(part.weights, (part.weights.shape[0], *region_shape(chunk)))
        elif (part.weights is None) != (weights is None):  # one job's blocks all keep them or none does
            raise ValueError(f"the partials of chunk {chunk} disagree on holding the sums of the weights")
        dst = local_slices(common, chunk_origin)
        src = local_slices(common, part.origin)
        weighted[(slice(None), *dst)] += part.weighted[(slice(None), *src)]
        if weights is not None:
            weights[(slice(None), *dst)] += part.weights[(slice(None), *src)]
        if part.valid is not None:  # None: every pixel of the part is valid (and overlapping parts agree)
            if valid is None:
                valid = np.ones(region_shape(chunk), bool)
            valid[dst] = part.valid[src]
    if weighted is None:
        raise ValueError(f"no partial covers chunk {chunk}")
    return weighted, weights, valid


def _zeros_like(array, shape: tuple[int, ...]):
    """float32 zeros of ``shape`` where ``array`` lives: numpy, or a torch tensor on its device."""
    return array.new_zeros(shape) if hasattr(array, "new_zeros") else np.zeros(shape, np.float32)
