"""Writers: one per output format, chunk-aligned and parallel-safe.

A sink is a small picklable value.  The client calls :meth:`LabelSink.create`
(lay out the files), workers call :meth:`LabelSink.write` for their own chunk,
in any order and in parallel, then the client calls :meth:`LabelSink.commit`
(make the output whole and visible) or :meth:`LabelSink.abort` (remove what a
failed run wrote).  No process ever holds the whole image.
"""

from __future__ import annotations

import logging
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from ..geometry import Geometry, Region

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputLayout:
    """What every sink needs to know about the output."""

    shape: tuple[int, ...]  # spatial
    chunks: tuple[int, ...]  # spatial block edge (processing and storage)
    class_names: tuple[str, ...]
    labels_dtype: str
    probability_channels: int  # 0 when no probabilities are written
    probabilities_dtype: str  # "float32" | "uint8" | "none"
    geometry: Geometry
    reference: str  # the input path (NIfTI sinks copy its header)
    nodata: int | None = None  # label value of pixels the input marks invalid (None: the input has none)
    metadata: dict = field(default_factory=dict, hash=False, compare=False)  # tilemask group attribute
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # keys worker-side handles to this run

    @property
    def writes_probabilities(self) -> bool:
        return self.probability_channels > 0


class LabelSink(ABC):
    """Where labels (and optionally probabilities) of one run go."""

    path: str
    layout: OutputLayout

    @abstractmethod
    def create(self) -> None:
        """Lay out the (temporary) output before any chunk is written (client side)."""

    @abstractmethod
    def write(self, region: Region, labels: np.ndarray, probabilities: np.ndarray | None) -> None:
        """Store one chunk's labels ``(*region)`` and probabilities ``(C, *region)`` (worker side)."""

    @abstractmethod
    def commit(self) -> list[str]:
        """Make the output whole and visible; returns the paths written (client side)."""

    @abstractmethod
    def abort(self) -> None:
        """Remove whatever a failed run left (client side)."""


def make_sink(path: str, layout: OutputLayout) -> LabelSink:
    """The sink for ``path``, chosen by suffix."""
    lowered = path.lower().rstrip("/")
    if lowered.endswith(".zarr"):
        from .zarr import ZarrSink

        return ZarrSink(path.rstrip("/"), layout)
    if lowered.endswith((".nii", ".nii.gz")):
        from .nifti import NiftiSink

        return NiftiSink(path, layout)
    if lowered.endswith((".tif", ".tiff")):
        from .cog import CogSink

        return CogSink(path, layout)
    raise ValueError(f"output.path {path}: no writer for this suffix yet")
