"""Connected components of a chunked boolean array, identical to ``scipy.ndimage.label``.

dask-image's ``ndmeasure.label`` does this merge, but with the Dask release we
pin its graph grows with (faces x blocks): 80,000 tasks and ~30 s for an
80-block 60x70x50 volume (dask/dask-image#391 reports the same scaling).  This
module runs the same algorithm with a graph linear in the number of blocks:

1. per block (one task each): ``scipy.ndimage.label`` with the structuring
   element; return the number of components and the block's first and last
   layer along every axis;
2. on the client: offset each block's ids by the number of components in the
   blocks before it (C order), so ids are global; for every chunk boundary of
   every axis, stack the two layers that meet there into a two-voxel-thick slab
   spanning the whole image and label it with the same structure: the ids in
   one slab component belong to one component.  (Two adjacent voxels in
   different blocks straddle a boundary on some axis, so they meet in that
   axis' slab: diagonal block neighbours are covered too.)  The equivalences
   are merged with ``scipy.sparse.csgraph.connected_components``;
3. per block again: relabel, and report per component the voxel count, the
   integer coordinate sums, minima and maxima and the first voxel (C-order flat
   index); the client sums them and numbers the components by first voxel,
   which is scipy's numbering.

Every step is exact integer work, so the result does not depend on the chunking.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .crosstab import compute

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComponentLabels:
    """The components of ``mask``: ``count`` of them, numbered ``1..count`` in scipy's order."""

    mask: da.Array
    structure: np.ndarray
    offsets: dict[tuple[int, ...], int]  # block index -> first global id - 1
    lookup: np.ndarray  # global block-local id -> final id (0 for background)
    moments: pd.DataFrame  # one row per final id (index), see module docstring

    @property
    def count(self) -> int:
        return len(self.moments)

    def labels(self, dtype=np.int64) -> da.Array:
        """A lazy array of the final ids (0 outside the mask)."""
        offsets = np.zeros(self.mask.numblocks, dtype=np.int64)
        for index, offset in self.offsets.items():
            offsets[index] = offset
        return da.map_blocks(
            _final_block, self.mask, self.structure, offsets, self.lookup, dtype=np.dtype(dtype), meta=np.array((), dtype)
        )


def label(mask: da.Array, structure: np.ndarray, client=None, row_sizes: np.ndarray | None = None) -> ComponentLabels:
    """Label the components of a boolean dask array (see the module docstring).

    With ``row_sizes`` (one value per index of axis 0) the moments get a ``size``
    column: ``sum(count in row r * row_sizes[r])`` from exact per-row counts.
    """
    mask = mask.astype(bool)
    indexes = list(np.ndindex(*mask.numblocks))
    blocks = mask.to_delayed()
    first = compute([dask.delayed(_count_and_layers)(blocks[i], structure) for i in indexes], client)
    offsets, total = {}, 0
    for index, (n, _) in zip(indexes, first):
        offsets[index] = total
        total += n
    equivalent = _merge_faces(mask, indexes, first, offsets, total, structure)
    origins = [np.cumsum((0,) + c)[:-1] for c in mask.chunks]
    lookup_arg = client.scatter(equivalent, broadcast=True) if client is not None else equivalent
    second = compute(
        [
            dask.delayed(_block_moments)(
                blocks[i], structure, offsets[i], lookup_arg,
                tuple(int(origins[a][k]) for a, k in enumerate(i)), mask.shape, row_sizes is not None,
            )
            for i in indexes
        ],
        client,
    )
    moments = _merge_moments([m for m, _ in second if len(m)], mask.ndim)
    if row_sizes is not None:
        rows = [r for _, r in second if r is not None and len(r)]
        if rows:
            per_row = pd.concat(rows).groupby(["component", "row"], sort=True)["count"].sum().reset_index()
            per_row["size"] = per_row["count"].to_numpy(dtype=float) * row_sizes[per_row["row"].to_numpy()]
            moments["size"] = per_row.groupby("component", sort=True)["size"].sum()
        else:
            moments["size"] = pd.Series(dtype=float)
    moments = moments.sort_values("first")
    final = np.zeros(int(equivalent.max()) + 1, dtype=np.int64)
    final[moments.index.to_numpy(dtype=np.int64)] = np.arange(1, len(moments) + 1)
    moments.index = pd.RangeIndex(1, len(moments) + 1, name="id")
    return ComponentLabels(mask, structure, offsets, final[equivalent], moments)


def _local_labels(block: np.ndarray, structure: np.ndarray) -> tuple[np.ndarray, int]:
    labels, n = ndimage.label(np.asarray(block, dtype=bool), structure=structure)
    return labels.astype(np.int64, copy=False), int(n)


def _count_and_layers(block: np.ndarray, structure: np.ndarray):
    labels, n = _local_labels(block, structure)
    layers = {}
    for axis in range(labels.ndim):
        layers[(axis, 0)] = np.take(labels, 0, axis=axis).copy()
        layers[(axis, 1)] = np.take(labels, -1, axis=axis).copy()
    return n, layers


def _merge_faces(mask, indexes, first, offsets, total, structure) -> np.ndarray:
    """Global block id -> representative component id (0 for background)."""
    layers = {i: layer for i, (_, layer) in zip(indexes, first)}
    pairs_a, pairs_b = [], []
    for axis in range(mask.ndim):
        for boundary in range(mask.numblocks[axis] - 1):
            slab = np.stack(
                [_layer_plane(mask, layers, offsets, axis, boundary, 1), _layer_plane(mask, layers, offsets, axis, boundary + 1, 0)],
                axis=axis,
            )
            joined, n = ndimage.label(slab > 0, structure=structure)
            if n == 0:
                continue
            hit = joined > 0
            ids, groups = slab[hit], joined[hit]
            # link every id to the smallest id of its slab component
            frame = pd.DataFrame({"g": groups, "id": ids}).drop_duplicates()
            root = frame.groupby("g")["id"].transform("min")
            keep = frame["id"].to_numpy() != root.to_numpy()
            pairs_a.append(frame["id"].to_numpy()[keep])
            pairs_b.append(root.to_numpy()[keep])
    nodes = total + 1
    a = np.concatenate(pairs_a) if pairs_a else np.array([], np.int64)
    b = np.concatenate(pairs_b) if pairs_b else np.array([], np.int64)
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(nodes, nodes))
    _, component = connected_components(graph, directed=False)
    # component 0 is node 0 (background) since node 0 has no edges
    return component.astype(np.int64)


def _layer_plane(mask, layers, offsets, axis, block_along_axis, side) -> np.ndarray:
    """The whole-image plane made of the blocks' layers at one side of block row ``block_along_axis``."""
    other = [a for a in range(mask.ndim) if a != axis]
    grid = np.empty([mask.numblocks[a] for a in other], dtype=object)
    for index in np.ndindex(*grid.shape):
        full = [0] * mask.ndim
        full[axis] = block_along_axis
        for a, k in zip(other, index):
            full[a] = k
        full = tuple(full)
        layer = layers[full][(axis, side)]
        grid[index] = np.where(layer > 0, layer + offsets[full], 0)
    return np.block(grid.tolist()) if grid.ndim else grid[()]


def _block_moments(block, structure, offset, equivalent, origin, shape, by_row):
    """Per component of the block: voxel count, first voxel and coordinate sums, minima and maxima, reduced with
    numpy over the voxels sorted by component (pandas' groupby took 8.4 ms on a 7x8x7 block here, this 0.6 ms)."""
    labels, _ = _local_labels(block, structure)
    where = np.nonzero(labels)
    if not where[0].size:
        return pd.DataFrame(), None
    components = equivalent[labels[where] + offset]
    coords = [w.astype(np.int64) + o for w, o in zip(where, origin)]
    order = np.argsort(components, kind="stable")
    components = components[order]
    coords = [c[order] for c in coords]
    starts = np.flatnonzero(np.r_[True, components[1:] != components[:-1]])
    columns = {
        "count": np.diff(np.r_[starts, len(components)]),
        "first": np.minimum.reduceat(np.ravel_multi_index(tuple(coords), shape).astype(np.int64), starts),
    }
    for axis, c in enumerate(coords):
        columns[f"sum{axis}"] = np.add.reduceat(c, starts)
        columns[f"min{axis}"] = np.minimum.reduceat(c, starts)
        columns[f"max{axis}"] = np.maximum.reduceat(c, starts)
    out = pd.DataFrame(columns, index=pd.Index(components[starts], name="component"))
    rows = None
    if by_row:
        rows = pd.DataFrame({"component": components, "row": coords[0]}).groupby(["component", "row"]).size()
        rows = rows.rename("count").reset_index()
    return out, rows


def _merge_moments(parts: list[pd.DataFrame], ndim: int) -> pd.DataFrame:
    if not parts:
        columns = ["count", "first"] + [f"{k}{a}" for a in range(ndim) for k in ("sum", "min", "max")]
        return pd.DataFrame({c: pd.Series([], dtype=np.int64) for c in columns})
    aggregations = {"count": "sum", "first": "min"}
    for axis in range(ndim):
        aggregations.update({f"sum{axis}": "sum", f"min{axis}": "min", f"max{axis}": "max"})
    return pd.concat(parts).groupby(level=0).agg(aggregations)


def _final_block(block, structure, offsets, lookup, block_info=None):
    labels, _ = _local_labels(block, structure)
    index = tuple(block_info[0]["chunk-location"])
    out = np.where(labels > 0, lookup[np.where(labels > 0, labels + offsets[index], 0)], 0)
    return out
