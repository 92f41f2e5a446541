"""Per-class totals and cross-tabulations of two label images, summed over chunks.

Every chunk returns integer counts keyed by ``(row, zone, class)`` (``row``
only where the pixel size varies by row: geographic rasters), and the client
sums them.  Integer sums do not depend on the order or the chunking, and sizes
(area, volume) are derived at the end as ``sum(count[row] * size[row])`` over
rows in order, so results are identical for any ``--chunks``.

The same reduction gives the per-class totals (zone = nothing), the zonal
statistics over an atlas (zone = atlas label) and the confusion matrix of an
evaluation (zone = ground-truth label).
"""

from __future__ import annotations

import logging

import dask
import dask.array as da
import numpy as np
import pandas as pd

from .measure import Grid

logger = logging.getLogger(__name__)

NO_ZONE = -1


def chunk_counts(
    labels: np.ndarray, zones: np.ndarray | None, row0: int, by_row: bool, excluded: tuple[int, ...]
) -> pd.DataFrame:
    """Counts of ``(row, zone, class)`` in one chunk, pixels whose class or zone is excluded left out.

    Each key is made a dense integer code (a lookup table for small value ranges,
    ``np.unique`` otherwise) and the codes are counted with one ``np.bincount``:
    a few arrays of the chunk's size, no per-pixel table.
    """
    labels = np.asarray(labels)
    keep = None
    for value in excluded:
        keep = labels != value if keep is None else keep & (labels != value)

    def kept(values: np.ndarray) -> np.ndarray:
        return values.ravel() if keep is None else values[keep]

    factors = {"cls": _dense(kept(labels))}
    if zones is not None:
        factors["zone"] = _dense(kept(np.asarray(zones)))
    if by_row:
        rows = np.broadcast_to(np.arange(labels.shape[0]).reshape((-1,) + (1,) * (labels.ndim - 1)), labels.shape)
        factors["row"] = _dense(kept(rows))
    code = np.zeros(factors["cls"][1].shape, np.int64)
    size = 1
    for values, inverse in factors.values():
        code += inverse * size
        size *= max(len(values), 1)
    counts = np.bincount(code, minlength=size) if code.size else np.zeros(size, np.int64)
    present = np.nonzero(counts)[0]
    columns, rest = {}, present
    for name, (values, _) in factors.items():
        columns[name] = values[rest % max(len(values), 1)].astype(np.int64)
        rest = rest // max(len(values), 1)
    columns.setdefault("zone", np.full(present.shape, NO_ZONE, np.int64))
    columns["row"] = columns["row"] + row0 if by_row else np.zeros(present.shape, np.int64)
    return pd.DataFrame(
        {"row": columns["row"], "zone": columns["zone"], "cls": columns["cls"], "count": counts[present].astype(np.int64)}
    )


def _dense(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(distinct values, index of each value among them)``; a lookup table when the range is small."""
    if values.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lo, hi = int(values.min()), int(values.max())
    if hi - lo < 1 << 20:
        shifted = values.astype(np.int64) - lo
        present = np.bincount(shifted, minlength=hi - lo + 1) > 0
        lookup = np.cumsum(present) - 1
        return np.nonzero(present)[0] + lo, lookup[shifted]
    distinct, inverse = np.unique(values, return_inverse=True)
    return distinct.astype(np.int64), inverse.astype(np.int64)


def count_pairs(
    labels: da.Array,
    zones: da.Array | None,
    grid: Grid,
    excluded: tuple[int, ...] = (),
    zone_excluded: tuple[int, ...] = (),
    client=None,
    sizes: bool = True,
) -> pd.DataFrame:
    """Counts and sizes of every ``(zone, class)`` pair: columns ``zone, cls, count, size``.

    ``size`` is the area (m^2) or volume (mL) of the counted pixels/voxels.
    ``zones`` must have ``labels``' shape; it is rechunked to ``labels``' chunks.
    Pixels whose class is in ``excluded`` or whose zone is in ``zone_excluded`` are
    not counted.  ``sizes=False`` skips the sizes (``size`` is NaN): counts only.
    """
    by_row = sizes and grid.is_geographic
    if zones is not None:
        zones = zones.rechunk(labels.chunks)
    label_blocks = labels.to_delayed().ravel()
    zone_blocks = zones.to_delayed().ravel() if zones is not None else [None] * len(label_blocks)
    row_starts = np.cumsum((0,) + labels.chunks[0])[:-1]
    starts = [row_starts[index[0]] for index in np.ndindex(*labels.numblocks)]
    tasks = [
        dask.delayed(_counts_task)(lab, zone, int(row0), by_row, tuple(excluded), tuple(zone_excluded))
        for lab, zone, row0 in zip(label_blocks, zone_blocks, starts)
    ]
    parts = compute(tasks, client)
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["row", "zone", "cls", "count"])
    frame = frame.groupby(["zone", "cls", "row"], sort=True)["count"].sum().reset_index()
    row_sizes = grid.row_sizes if sizes else np.full(max(grid.shape[0], 1), np.nan)
    frame["size"] = frame["count"].to_numpy(dtype=float) * row_sizes[frame["row"].to_numpy()]
    totals = frame.groupby(["zone", "cls"], sort=True).agg(count=("count", "sum"), size=("size", "sum")).reset_index()
    totals["count"] = totals["count"].astype(np.int64)
    return totals


def _counts_task(labels, zones, row0, by_row, excluded, zone_excluded) -> pd.DataFrame:
    frame = chunk_counts(labels, zones, row0, by_row, excluded)
    if zone_excluded:
        frame = frame[~frame["zone"].isin(zone_excluded)]
    return frame


def compute(tasks: list, client=None) -> list:
    """Compute delayed objects on ``client`` (gathered) or on dask's current scheduler.  On a client, a cluster
    that has had no worker for ``tilemask.no-workers-timeout`` fails the command, as it fails a run
    (:func:`tilemask.cluster.gather`): ``stats`` and ``evaluate`` on a scheduler whose workers had died waited for
    ever."""
    if client is not None:
        from ..cluster import gather

        return gather(client, client.compute(tasks))
    return list(dask.compute(*tasks))
