"""Writers: one per output format, chunk-aligned and parallel-safe.

A sink is a small picklable value, chosen by :func:`tilemask.formats.for_output`.
The client calls :meth:`LabelSink.create` (lay out the staged files), workers call
:meth:`LabelSink.write` for their own chunk, in any order and in parallel, then
one worker task calls :meth:`LabelSink.commit` (make the output whole and rename
it into place) or the client calls :meth:`LabelSink.abort` (remove what a failed
run staged).  No process ever holds the whole image.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..geometry import Geometry, Region
from ..outputs import new_run_id

logger = logging.getLogger(__name__)


def storing_every_chunk(array):
    """The Zarr ``array`` writing every chunk it is given, all background too (zarr leaves out a chunk that is all
    fill value): a chunk missing from an output's labels is then one lost on the way, a copy cut short, which its
    readers refuse (:meth:`tilemask.formats.ZarrFormat.require_complete`) rather than count as background."""
    return array.with_config({"write_empty_chunks": True})


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
    dicomweb: str | None = None  # a DICOMweb root the output is stored on once whole (DICOM Segmentations)
    seg_type: str = "labelmap"  # a DICOM Segmentation's type: "labelmap" or "binary" (output.seg_type)
    run_id: str = field(default_factory=new_run_id)  # names the staged files and keys worker-side handles

    @property
    def writes_probabilities(self) -> bool:
        return self.probability_channels > 0

    @property
    def labels_fill(self) -> int:
        """The zarr ``fill_value`` of the labels: their nodata, which a chunk never written (a run killed) reads as
        in zarr, xarray and GDAL (0, class 0, where the input has no nodata: zarr v3 needs a value)."""
        return 0 if self.nodata is None else self.nodata

    @property
    def probabilities_fill(self) -> float:
        """The zarr ``fill_value`` of the probabilities: NaN for float32 ones (no probability), 0 for uint8 ones
        (``round(p * 255)``: every value is one)."""
        return float("nan") if self.probabilities_dtype == "float32" else 0

    def check(self, region: Region, labels: np.ndarray, probabilities: np.ndarray | None) -> None:
        """Refuse a chunk whose arrays do not fit the layout (a store would broadcast or truncate them)."""
        shape = tuple(hi - lo for lo, hi in region)
        if labels.shape != shape:
            raise ValueError(f"labels of shape {labels.shape} for a chunk of shape {shape}")
        expected = (self.probability_channels, *shape) if self.writes_probabilities else None
        got = None if probabilities is None else probabilities.shape
        if got != expected:
            raise ValueError(f"probabilities of shape {got} where the output holds {expected}")


class LabelSink(ABC):
    """Where labels (and optionally probabilities) of one run go."""

    path: str
    layout: OutputLayout
    resumable: ClassVar[bool] = False  # chunks a run wrote survive its interruption (:meth:`reopen`)

    @abstractmethod
    def create(self) -> None:
        """Lay out the staged output before any chunk is written (client)."""

    @abstractmethod
    def write(self, region: Region, labels: np.ndarray, probabilities: np.ndarray | None) -> None:
        """Store one chunk's labels ``(*region)`` and probabilities ``(C, *region)`` (worker side)."""

    @abstractmethod
    def finish(self) -> None:
        """Make the staged output whole (COG assembly, compression, ``complete: true``); a task on a worker."""

    @abstractmethod
    def publish(self) -> list[str]:
        """Rename the finished output into place (quick); returns the paths written.  A task on a worker."""

    @property
    def delivery(self) -> str:
        """What :meth:`deliver` does, in words for the progress line ("storing it on DICOMweb"); "": nothing."""
        return ""

    def deliver(self) -> None:
        """Send the published output on where the workflow asks (a DICOM SEG to DICOMweb); a task on a worker, after
        :meth:`publish` and the item's products, that a stopped run does not wait for (:func:`tilemask.engine.deliver`);
        failed, the item's retry calls it alone."""

    def undelivered(self) -> Exception:
        """The failure recorded for a run that stopped while :meth:`deliver` ran: the output is in place."""
        from ..errors import OutputError

        return OutputError(f"{self.path}: the run stopped while {self.delivery} (the output is whole and kept)")

    def commit(self) -> list[str]:
        """:meth:`finish`, then :meth:`publish` (not :meth:`deliver`).  The engine runs them as two tasks, so an
        interrupt during a long finish leaves only staged files for :meth:`abort`, never a published output."""
        self.finish()
        return self.publish()

    @abstractmethod
    def abort(self) -> None:
        """Remove whatever a failed run staged (client, once no task still writes)."""

    def remove_stale_probabilities(self, replaced: bool) -> None:
        """When this run ``replaced`` labels and writes no probabilities beside them, remove those an earlier
        tilemask run wrote there: they belong to the labels replaced (``open_result`` and ``tilemask serve`` pair
        the two).  A file of that name tilemask did not write is left alone; one that cannot be removed is a
        warning (the labels are published)."""
        from ..formats import for_path
        from ..outputs import exists, remove

        fmt = for_path(self.path)
        stale = fmt.probabilities_path(self.path)
        if not replaced or self.layout.writes_probabilities or stale is None or not exists(stale):
            return
        if not fmt.written_by_tilemask(stale):
            return
        logger.info("%s: removing the probabilities of the labels it replaces", stale)
        try:
            remove(stale)
            remove(stale + ".aux.xml")
        except OSError as exc:
            logger.warning("%s: cannot remove the probabilities of the labels replaced: %s", stale, exc)

    def __dask_tokenize__(self):
        """Its kind, path and run: the layout holds the workflow, which Dask need not hash per task."""
        return (type(self).__name__, self.path, self.layout.run_id)

    def reopen(self) -> bool:
        """Keep what an interrupted run of the same job staged, if it is there, and say so; chunks it wrote
        are then not written again (:func:`tilemask.engine.execute`).  False: this format starts over."""
        return False


def make_sink(path: str, layout: OutputLayout) -> LabelSink:
    """The writer for ``path``, chosen by its format (:func:`tilemask.formats.for_output`)."""
    from ..formats import for_output

    return for_output(path).make_sink(path, layout)
