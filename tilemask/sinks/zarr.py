"""Zarr v3 group output: ``labels``, optional ``probabilities`` and the geometry.

Storage chunks equal the processing chunks, so each worker writes whole chunks
of its own and parallel writes never touch the same object.  The group's
``tilemask`` attribute gets ``complete: true`` only when every chunk is written.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from ..geometry import Region
from ..sources import cached_handle
from . import LabelSink, OutputLayout

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZarrSink(LabelSink):
    path: str
    layout: OutputLayout

    def create(self) -> None:
        layout = self.layout
        group = zarr.open_group(self.path, mode="w", zarr_format=3)
        group.create_array("labels", shape=layout.shape, chunks=layout.chunks, dtype=layout.labels_dtype, fill_value=0)
        if layout.writes_probabilities:
            group.create_array(
                "probabilities",
                shape=(layout.probability_channels, *layout.shape),
                chunks=(layout.probability_channels, *layout.chunks),
                dtype=layout.probabilities_dtype,
                fill_value=0,
            )
        group.attrs.update(
            {"tilemask": {**layout.metadata, "classes": list(layout.class_names), "nodata": layout.nodata, "complete": False}}
            | layout.geometry.to_attrs()
        )

    def write(self, region: Region, labels: np.ndarray, probabilities: np.ndarray | None) -> None:
        index = tuple(slice(lo, hi) for lo, hi in region)
        cached_handle(("zarr-out", self.layout.run_id, self.path, "labels"), lambda: zarr.open_array(f"{self.path}/labels", mode="r+"))[
            index
        ] = labels
        if probabilities is not None:
            array = cached_handle(
                ("zarr-out", self.layout.run_id, self.path, "probabilities"),
                lambda: zarr.open_array(f"{self.path}/probabilities", mode="r+"),
            )
            array[(slice(None), *index)] = probabilities

    def commit(self) -> list[str]:
        group = zarr.open_group(self.path, mode="r+")
        group.attrs["tilemask"] = {**group.attrs["tilemask"], "complete": True}
        return [self.path]

    def abort(self) -> None:
        if Path(self.path).exists():
            shutil.rmtree(self.path, ignore_errors=True)
