"""Zarr v3 group output: ``labels``, optional ``probabilities`` and the geometry.

Storage chunks equal the processing chunks, so each worker writes whole chunks
of its own and parallel writes never touch the same object.  The group is built
under a hidden staged name (:func:`tilemask.outputs.staged_path`); its
``tilemask`` attribute gets ``complete: true`` only when every chunk is written,
and only then is it renamed onto the output path, replacing an older output.
On object storage (``s3://``) workers write the chunks through fsspec and the
staged group is copied onto the output path (:func:`tilemask.storage.publish`);
an interrupted run's chunks are not kept there (the item starts over).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import zarr

from ..geometry import Region
from ..outputs import publish, remove, staged_path
from ..sources import cached_handle
from ..storage import is_remote, zarr_options
from . import LabelSink, OutputLayout, storing_every_chunk

logger = logging.getLogger(__name__)


def dimension_names(layout: OutputLayout) -> tuple[str, ...] | None:
    """The axes' names ``tilemask.open_result`` gives (``xr.open_zarr`` needs them): (y, x) for a raster, (i, j, k)
    for a volume; the probabilities' ``class`` first."""
    from ..geometry import RasterGeometry

    ndim = len(layout.shape)
    if isinstance(layout.geometry, RasterGeometry):
        return ("y", "x") if ndim == 2 else None
    return ("i", "j", "k")[:ndim] if ndim <= 3 else None


@dataclass(frozen=True)
class ZarrSink(LabelSink):
    path: str
    layout: OutputLayout
    resumable: ClassVar[bool] = True
    visible: bool = True  # False: an intermediate that stays under its hidden staged name

    @property
    def staged(self) -> str:
        return staged_path(self.path, self.layout.run_id)

    def create(self) -> None:
        layout = self.layout
        group = zarr.open_group(self.staged, mode="w", zarr_format=3, **zarr_options(self.staged))
        names = dimension_names(layout)
        group.create_array("labels", shape=layout.shape, chunks=layout.chunks, dtype=layout.labels_dtype,
                           fill_value=layout.labels_fill,
                           dimension_names=names)  # fmt: skip
        if layout.writes_probabilities:
            group.create_array(
                "probabilities",
                shape=(layout.probability_channels, *layout.shape),
                chunks=(layout.probability_channels, *layout.chunks),
                dtype=layout.probabilities_dtype,
                fill_value=layout.probabilities_fill,
                dimension_names=None if names is None else ("class", *names),
                # round(p * 255), said as CF says it (xarray decodes it to 0-1), as a COG's band scale says it
                attributes={"scale_factor": 1 / 255, "add_offset": 0.0} if layout.probabilities_dtype == "uint8" else {},
            )
        group.attrs.update(
            {"tilemask": {**layout.metadata, "classes": list(layout.class_names), "nodata": layout.nodata,
                          "complete": False, "every_chunk_stored": True}}
            | layout.geometry.to_attrs()
        )  # fmt: skip

    def write(self, region: Region, labels: np.ndarray, probabilities: np.ndarray | None) -> None:
        index = tuple(slice(lo, hi) for lo, hi in region)
        labels_array = cached_handle(("zarr-out", self.staged, "labels"),
                                     lambda: storing_every_chunk(self._array("labels", "r+")))  # fmt: skip
        labels_array[index] = labels
        if probabilities is not None:
            array = cached_handle(("zarr-out", self.staged, "probabilities"), lambda: self._array("probabilities", "r+"))
            array[(slice(None), *index)] = probabilities

    def read_probabilities(self, region: Region) -> np.ndarray:
        """The stored probabilities of one chunk (an intermediate's, before it is copied on)."""
        array = self._array("probabilities", "r")
        return array[(slice(None), *(slice(lo, hi) for lo, hi in region))]

    def _array(self, name: str, mode: str) -> zarr.Array:
        return zarr.open_array(f"{self.staged}/{name}", mode=mode, **zarr_options(self.staged))

    def finish(self) -> None:
        group = zarr.open_group(self.staged, mode="r+", **zarr_options(self.staged))
        group.attrs["tilemask"] = {**group.attrs["tilemask"], "complete": True}

    def publish(self) -> list[str]:
        if not self.visible:
            return [self.staged]
        publish(self.staged, self.path)
        return [self.path]

    def abort(self) -> None:
        remove(self.staged)

    def reopen(self) -> bool:
        return self.visible and not is_remote(self.staged) and os.path.isdir(self.staged)
