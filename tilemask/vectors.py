"""Polygons of a label image, polygonized per chunk in parallel and merged across chunk borders.

The answer is the one ``rasterio.features.shapes`` gives on the whole label image
with 4-connectivity, restricted to the foreground (not class 0, not nodata): one
polygon per 4-connected region of one class, holes included.  No process holds
the whole image:

1. **Per chunk** (one task each): one ``rasterio.features.shapes`` call on the
   chunk's labels (4-connectivity, foreground mask) in *pixel* coordinates (exact
   integers), shifted to the chunk's place in the image: each polygon is one
   4-connected region of one class, a *piece*, whose id is its place in the
   output.  The polygons are built in bulk from the rings' coordinates
   (``shapely.linearrings``/``polygons``).  The task keeps its pieces and returns
   only its four border strips (region id and class of the first/last row and
   column), read off the pieces' outer-ring edges on the chunk's sides.
2. **Border graph** (client, small): two pieces in neighbouring chunks touch by
   an edge when a pixel on one side of their common border and the pixel facing
   it have the same foreground class.  The connected components of that graph
   (``scipy.sparse.csgraph``) are the regions that cross borders; every other
   piece is already a whole region.  A corner contact is not an edge, so
   regions touching only diagonally stay apart, as with 4-connectivity.
3. **Merge** (one task per chunk): a chunk emits its whole pieces, and the union
   of every group whose first piece it holds, from the pieces selected for it
   (their edges on the chunk sides cut at every pixel corner): the edges two
   pieces share are cancelled and the rest linked back into rings
   (:func:`stitch_pieces`, exact on integer coordinates; GEOS's coverage union
   where its checks fail), and the vertices left on the old chunk sides are
   dropped.  A region spanning many chunks (a lake over 20 chunks) is merged by
   one task that receives just its pieces, never the other regions of those
   chunks.
4. **Write** (client, streaming): features are mapped to world coordinates with
   the GDAL geotransform (``X = GT0 + col*GT1 + row*GT2``, ``Y = GT3 + col*GT4 +
   row*GT5``, GDAL's own formula) and streamed chunk by chunk into the output
   under a temporary name, renamed when whole (:mod:`tilemask.polygon_files`).
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import rasterio.features
import shapely
from rasterio.errors import NotGeoreferencedWarning
from scipy import sparse
from scipy.sparse import csgraph

from .classes import class_name
from .cluster import result_of
from .errors import InputError, OutputError
from .geometry import RasterGeometry
from .polygon_files import VECTOR_DRIVERS, AreaRule, check_polygons_crs, write_features
from .sources.labels import open_labels

logger = logging.getLogger(__name__)

# polygonize_chunk hands rasterio.features.shapes arrays in pixel units, never georeferenced; rasterio silences its
# warnings about that with warnings.catch_warnings, which a shapes call on another worker thread can undo
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module="rasterio.features")

SIDES = ("top", "bottom", "left", "right")


@dataclass
class ChunkPieces:
    """The regions of one chunk: polygons in image pixel coordinates, one per region id."""

    index: tuple[int, int]
    classes: np.ndarray  # class of region id i + 1
    geoms: np.ndarray  # shapely polygons, region id i + 1
    border_ids: dict[str, np.ndarray]  # region id per pixel of each border strip (0: none)
    border_classes: dict[str, np.ndarray]  # class per pixel of each border strip (-1: none)
    extent: tuple[int, int, int, int]  # first row, first column, end row, end column in the image


@dataclass
class FeatureBatch:
    """Finished features of one chunk, in world coordinates."""

    wkb: list[bytes]
    classes: np.ndarray
    area_m2: np.ndarray


# -- 1. per chunk ---------------------------------------------------------------------------------

# the data types rasterio.features.shapes polygonizes exactly (it reads into an int32 buffer); others go through codes
SHAPES_DTYPES = {np.dtype(t) for t in ("int16", "int32", "uint8", "uint16")}


def polygonize_chunk(
    block: np.ndarray, index: tuple[int, int], origin: tuple[int, int], nodata: int | None
) -> ChunkPieces:
    """Polygonize the chunk's foreground regions (4-connectivity) in image pixels.

    One ``shapes`` call on the labels themselves: with 4-connectivity each polygon is one 4-connected region of
    one class (two regions of a class never touch by an edge), the ``scipy.ndimage.label`` regions.  A region's id
    is its polygon's place in the output; the border strips get their ids from the polygons' outer ring edges that
    lie on the chunk's sides (a hole never touches them), pixel for pixel.
    """
    block = np.asarray(block)
    foreground = block != 0
    if nodata is not None:
        foreground &= block != nodata
    labels, values = block, None
    if block.dtype not in SHAPES_DTYPES:  # int8, uint32, int64: polygonize codes of the values, exact for any
        values, codes = np.unique(block, return_inverse=True)
        block = codes.reshape(block.shape).astype(np.int32)
    height, width = block.shape
    flat: list = []  # every ring's (x, y) tuples, one after the other
    ring_lengths: list[int] = []
    ring_counts: list[int] = []  # rings per polygon, outer ring first
    classes: list = []
    extend, lengths, counts, append = flat.extend, ring_lengths.append, ring_counts.append, classes.append
    if foreground.any():
        for geom, value in rasterio.features.shapes(block, mask=foreground, connectivity=4):
            rings = geom["coordinates"]
            for ring in rings:
                extend(ring)
                lengths(len(ring))
            counts(len(rings))
            append(value)
    count = len(classes)
    row0, col0 = origin
    classes = np.asarray(classes, np.int64)
    if values is not None:
        classes = values[classes].astype(np.int64)
    strips = {
        "top": np.zeros(width, np.int32),
        "bottom": np.zeros(width, np.int32),
        "left": np.zeros(height, np.int32),
        "right": np.zeros(height, np.int32),
    }
    if count:
        xy = np.array(flat, np.float64)
        ring_of = np.repeat(np.arange(len(ring_lengths)), ring_lengths)
        polygon_of_ring = np.repeat(np.arange(count), ring_counts)
        _border_ids(xy, ring_of, polygon_of_ring, ring_counts, strips, height, width)
        xy += np.array([col0, row0], np.float64)
        geoms = shapely.polygons(shapely.linearrings(xy, indices=ring_of), indices=polygon_of_ring)
    else:
        geoms = np.empty(0, object)
    class_of = np.concatenate([[-1], classes])
    edges = {"top": np.s_[0, :], "bottom": np.s_[-1, :], "left": np.s_[:, 0], "right": np.s_[:, -1]}
    for side, edge in edges.items():  # every foreground pixel of a side in one region, of its class
        strip, inside = strips[side], foreground[edge]
        if not (np.array_equal(strip > 0, inside) and np.array_equal(class_of[strip[inside]], labels[edge][inside])):
            raise RuntimeError(f"chunk {index}: the {side} border's pixels and regions disagree")
    return ChunkPieces(
        index=index,
        classes=classes,
        geoms=geoms,
        border_ids=strips,
        border_classes={side: class_of[strip] for side, strip in strips.items()},
        extent=(row0, col0, row0 + height, col0 + width),
    )


def _border_ids(xy, ring_of, polygon_of_ring, ring_counts, strips, height, width) -> None:
    """Fill the border strips with region ids (polygon index + 1) from the outer rings' edges on the chunk's sides,
    in chunk pixel coordinates: an edge on x = 0 from y = a to y = b is the left side of pixels a..b-1 of column 0."""
    first_ring = np.concatenate([[0], np.cumsum(ring_counts)[:-1]])
    outer = np.zeros(len(polygon_of_ring), bool)
    outer[first_ring] = True
    a, b = xy[:-1], xy[1:]
    edge = (ring_of[:-1] == ring_of[1:]) & outer[ring_of[:-1]]
    region = polygon_of_ring[ring_of[:-1]] + 1
    for side, axis, line in (("left", 0, 0), ("right", 0, width), ("top", 1, 0), ("bottom", 1, height)):
        on = edge & (a[:, axis] == line) & (b[:, axis] == line)
        if not on.any():
            continue
        ends = np.sort(np.stack([a[on, 1 - axis], b[on, 1 - axis]], axis=1), axis=1).astype(np.int64)
        spans = ends[:, 1] - ends[:, 0]
        first = np.repeat(ends[:, 0] - (np.cumsum(spans) - spans), spans)
        strips[side][first + np.arange(spans.sum())] = np.repeat(region[on], spans)


def chunk_border(pieces: ChunkPieces) -> tuple[dict, dict]:
    return pieces.border_ids, pieces.border_classes


# -- 2. border graph -------------------------------------------------------------------------------


def border_groups(borders: dict[tuple[int, int], tuple[dict, dict]], grid: tuple[int, int]) -> list[np.ndarray]:
    """Groups of pieces that form one region across chunk borders.

    A piece is ``(chunk_row, chunk_col, region_id)``; returns one ``(n, 3)`` array per
    group of two or more pieces, sorted so that the first row is the group's owner.
    """
    pairs = []
    for (i, j), (ids, classes) in borders.items():
        for (di, dj), near, far in (((0, 1), "right", "left"), ((1, 0), "bottom", "top")):
            neighbour = (i + di, j + dj)
            if neighbour not in borders:
                continue
            other_ids, other_classes = borders[neighbour]
            a, b = ids[near], other_ids[far]
            touching = (a > 0) & (b > 0) & (classes[near] == other_classes[far])
            if touching.any():
                found = np.unique(np.stack([a[touching], b[touching]], axis=1), axis=0)
                pairs.append(
                    np.column_stack(
                        [np.full(len(found), i), np.full(len(found), j), found[:, 0],
                         np.full(len(found), neighbour[0]), np.full(len(found), neighbour[1]), found[:, 1]]
                    )
                )  # fmt: skip
    if not pairs:
        return []
    edges = np.concatenate(pairs).astype(np.int64)
    cols = grid[1]
    # a piece's key: flat chunk index in the high 32 bits, region id in the low 32
    keys = np.concatenate(
        [(edges[:, 0] * cols + edges[:, 1]) << 32 | edges[:, 2], (edges[:, 3] * cols + edges[:, 4]) << 32 | edges[:, 5]]
    )
    nodes, inverse = np.unique(keys, return_inverse=True)
    half = len(edges)
    links = (np.ones(half, np.int8), (inverse[:half], inverse[half:]))
    graph = sparse.coo_matrix(links, shape=(len(nodes), len(nodes)))
    _, component = csgraph.connected_components(graph, directed=False)
    order = np.argsort(component, kind="stable")  # nodes are sorted, so each group starts at its smallest key
    splits = np.flatnonzero(np.diff(component[order])) + 1
    groups = []
    for members in np.split(nodes[order], splits):
        flat, region = members >> 32, members & 0xFFFFFFFF
        groups.append(np.column_stack([flat // cols, flat % cols, region]))
    return groups


# -- 3. merge ----------------------------------------------------------------------------------------


def select_pieces(pieces: ChunkPieces, region_ids: np.ndarray) -> dict[int, object]:
    """The polygons of some regions of a chunk (what a merge elsewhere needs), with a vertex at every pixel corner
    along the chunk's sides, so that pieces meeting across a chunk border share their edges segment for segment."""
    region_ids = np.asarray(region_ids, np.int64)
    geoms = densify_sides(pieces.geoms[region_ids - 1], pieces.extent)
    return {int(r): g for r, g in zip(region_ids, geoms)}


def densify_sides(geoms: np.ndarray, extent: tuple[int, int, int, int]) -> np.ndarray:
    """``geoms`` (pixel coordinates) with their edges on the sides of the chunk ``extent`` cut at every integer."""
    if len(geoms) == 0:
        return geoms
    row0, col0, row1, col1 = extent
    rings, polygon_of_ring = shapely.get_rings(geoms, return_index=True)
    xy, ring_of = shapely.get_coordinates(rings, return_index=True)
    a, b = xy[:-1], xy[1:]
    edge = ring_of[:-1] == ring_of[1:]
    vertical = (a[:, 0] == b[:, 0]) & ((a[:, 0] == col0) | (a[:, 0] == col1))
    horizontal = (a[:, 1] == b[:, 1]) & ((a[:, 1] == row0) | (a[:, 1] == row1))
    steps = np.ones(len(xy), np.int64)  # points each coordinate becomes: itself and those up to the next one
    cut = edge & (vertical | horizontal)
    steps[:-1][cut] = np.abs(b[cut] - a[cut]).sum(axis=1).astype(np.int64)
    delta = np.zeros_like(xy)
    delta[:-1][cut] = np.sign(b[cut] - a[cut])
    k = np.arange(steps.sum()) - np.repeat(np.cumsum(steps) - steps, steps)
    dense = np.repeat(xy, steps, axis=0) + k[:, None] * np.repeat(delta, steps, axis=0)
    dense_rings = shapely.linearrings(dense, indices=np.repeat(ring_of, steps))
    return shapely.polygons(dense_rings, indices=polygon_of_ring)


def drop_collinear(polygon) -> object:
    """``polygon`` without the vertices in the middle of a straight run (all its edges are axis-parallel): what
    ``shapely.simplify(polygon, 0)`` gives, without the simplifier's cost."""
    rings = shapely.get_rings(polygon)
    xy, ring_of = shapely.get_coordinates(rings, return_index=True)
    closing = np.append(ring_of[1:] != ring_of[:-1], True)
    xy, ring_of = xy[~closing], ring_of[~closing]
    counts = np.bincount(ring_of, minlength=len(rings))
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    at = np.arange(len(xy)) - starts
    size = counts[ring_of]
    before, after = xy[starts + (at - 1) % size], xy[starts + (at + 1) % size]
    on_x = (before[:, 0] == xy[:, 0]) & (xy[:, 0] == after[:, 0])
    straight = on_x | ((before[:, 1] == xy[:, 1]) & (xy[:, 1] == after[:, 1]))
    kept = shapely.linearrings(xy[~straight], indices=ring_of[~straight])  # closed again by linearrings
    return shapely.polygons(kept, indices=np.zeros(len(kept), np.int64))[0]


def merge_pieces(parts: list) -> object:
    """The union of one region's pieces (side-densified, :func:`densify_sides`), the vertices left on the old chunk
    sides dropped: :func:`stitch_pieces`; GEOS's coverage union (it cancels the shared edges too, several times
    slower) where the stitch does not check out, and the full overlay union where GEOS refuses the coverage."""
    merged = stitch_pieces(parts)
    if merged is not None:
        return merged
    try:
        merged = shapely.coverage_union_all(parts)
    except shapely.errors.GEOSException:
        merged = shapely.union_all(parts)
    if merged.geom_type != "Polygon":
        return merged
    return drop_collinear(merged)


def stitch_pieces(parts: list) -> object | None:
    """The union of one 4-connected region's pieces by cancelling their shared edges, without the vertices in the
    middle of straight runs, or None where a check fails.

    The pieces' rings are pixel edges with integer coordinates, and their edges on the chunk sides are unit
    segments (:func:`densify_sides`): an edge of one piece that is also an edge of another (the other way round) is
    inside the region, every other edge is on its boundary.  The boundary edges are linked back into rings; where
    a vertex has two ways on (two pixels of the region touching at a corner only), the ring turns round the corner
    of the pixel that is not the region's, as GDAL's and GEOS's rings do (a hole touching the outer ring at a
    point, never a ring touching itself).  The outer ring is the one turning the way the pieces' outer rings turn.
    Checks: one outer ring, and the rings' area is the pieces' (both exact on integers).
    """
    parts = np.asarray(parts, dtype=object)
    rings = shapely.get_rings(parts)  # each piece's outer ring, then its holes
    xy, ring_of = shapely.get_coordinates(rings, return_index=True)
    if len(xy) < 2 or (xy != np.floor(xy)).any():
        return None
    span = int(xy[:, 1].max() - xy[:, 1].min()) + 2
    key = (xy[:, 0] - xy[:, 0].min()).astype(np.int64) * span + (xy[:, 1] - xy[:, 1].min()).astype(np.int64)
    # edge k: xy[k] -> xy[k + 1], within a ring
    edge = ring_of[:-1] == ring_of[1:]
    step = xy[1:] - xy[:-1]
    unit = edge & (np.abs(step).sum(axis=1) == 1)
    # an undirected unit edge: its smaller end and whether it is horizontal
    low = np.minimum(key[:-1], key[1:])
    ukey = np.where(unit, low * 2 + (step[:, 1] == 0), -1)
    units = np.flatnonzero(unit)
    order = units[np.argsort(ukey[units])]
    sorted_keys = ukey[order]
    twin = sorted_keys[1:] == sorted_keys[:-1]
    one, other = order[:-1][twin], order[1:][twin]
    if not np.array_equal(step[one], -step[other]):  # an inner edge is walked both ways, once by each piece
        return None
    cancelled = np.zeros(len(ukey), bool)
    cancelled[one] = cancelled[other] = True
    alive = edge & ~cancelled
    # vertices where two boundary edges start (pixels touching at a corner only)
    living = np.flatnonzero(alive)
    by_vertex = living[np.argsort(key[:-1][living])]
    same = key[by_vertex[1:]] == key[by_vertex[:-1]]
    if (same[1:] & same[:-1]).any():  # three edges from one vertex: not pixel edges
        return None
    pinch = np.zeros(len(key), bool)
    pinch[by_vertex[1:][same]] = pinch[by_vertex[:-1][same]] = True
    # chains: runs of boundary edges, cut where a ring starts, after a cancelled edge, and at corner contacts
    first = np.zeros(len(alive), bool)
    first[0] = True
    first[1:] = ring_of[1:-1] != ring_of[:-2]
    prev_alive = np.concatenate([[False], alive[:-1]])
    cut = alive & (first | ~prev_alive | pinch[:-1])
    chain_start = np.flatnonzero(cut)
    # a chain runs from its start edge to the last alive edge before the next cut or dead edge
    # (its end: the first edge after it, or the last vertex; its vertices are xy[start .. end])
    if len(chain_start) == 0:
        return None
    dead_or_cut = np.append(np.flatnonzero(~alive | cut), len(alive))
    chain_end = dead_or_cut[np.searchsorted(dead_or_cut, chain_start, side="right")]
    start_key, end_key = key[chain_start], key[chain_end]
    shell_sign = _outer_turn(xy[ring_of == 0])
    by_start: dict[int, list[int]] = defaultdict(list)
    for c, k in enumerate(start_key.tolist()):
        by_start[k].append(c)
    following = np.empty(len(chain_start), np.int64)
    last_step = step[chain_end - 1]
    first_step = step[chain_start]
    for c, k in enumerate(end_key.tolist()):
        options = by_start.get(k)
        if not options:
            return None
        if len(options) == 1:
            following[c] = options[0]
            continue
        # two ways on: turn away from the region (towards the pixel that is not the region's)
        dx, dy = last_step[c]
        turns = [dx * first_step[o][1] - dy * first_step[o][0] for o in options]
        chosen = [o for o, t in zip(options, turns) if t * shell_sign < 0]
        if len(chosen) != 1:
            return None
        following[c] = chosen[0]
    if len(np.unique(following)) != len(following):
        return None
    # walk the chains into rings
    seen = np.zeros(len(chain_start), bool)
    walk, ring_ids = [], []
    ring = 0
    for c0 in range(len(chain_start)):
        if seen[c0]:
            continue
        c = c0
        while not seen[c]:
            seen[c] = True
            walk.append(c)
            ring_ids.append(ring)
            c = following[c]
        if c != c0:
            return None
        ring += 1
    walk = np.asarray(walk, np.int64)
    lengths = chain_end[walk] - chain_start[walk]  # each chain gives its vertices but the last (the next one's first)
    index = np.repeat(chain_start[walk] - (np.cumsum(lengths) - lengths), lengths) + np.arange(lengths.sum())
    vertex_ring = np.repeat(np.asarray(ring_ids, np.int64), lengths)
    coords = xy[index]
    counts = np.bincount(vertex_ring, minlength=ring)
    begin = np.cumsum(counts) - counts
    after = np.arange(len(coords)) + 1
    after[begin + counts - 1] = begin
    local = coords - coords.min(axis=0)  # shoelace products well within 2**53: exact on integers
    cross = local[:, 0] * local[after, 1] - local[after, 0] * local[:, 1]
    area = np.bincount(vertex_ring, weights=cross, minlength=ring) / 2
    outer = np.flatnonzero(np.sign(area) == np.sign(shell_sign))
    if len(outer) != 1 or abs(area.sum()) != np.sum(shapely.area(parts)):
        return None
    new_rings = shapely.linearrings(coords, indices=vertex_ring)  # closed by linearrings
    outer_first = np.concatenate([outer, np.delete(np.arange(ring), outer)])
    return drop_collinear(shapely.polygons(new_rings[outer_first], indices=np.zeros(ring, np.int64))[0])


def _outer_turn(ring: np.ndarray) -> float:
    """The sign of a closed ring's shoelace area (the first piece's outer ring: how outer rings turn)."""
    x, y = ring[:-1, 0], ring[:-1, 1]
    return float(np.sign(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y)))


def finish_chunk(
    pieces: ChunkPieces,
    grouped: np.ndarray,
    owned: list[np.ndarray],
    selections: dict[tuple[int, int], dict[int, object]],
    area: AreaRule,
    class_names: tuple[str, ...],
) -> FeatureBatch:
    """The chunk's whole pieces plus the unions of the groups it owns, in world coordinates."""
    keep = np.ones(len(pieces.geoms), bool)
    keep[np.asarray(grouped, np.int64) - 1] = False
    geoms = list(pieces.geoms[keep])
    values = list(pieces.classes[keep])
    for group in owned:
        parts = [selections[(int(i), int(j))][int(r)] for i, j, r in group]
        merged = merge_pieces(parts)
        if merged.geom_type != "Polygon":
            raise RuntimeError(f"pieces {group.tolist()} of one region merged into a {merged.geom_type}")
        geoms.append(merged)
        values.append(pieces.classes[int(group[0][2]) - 1])
    world = area.to_world(np.array(geoms, dtype=object))
    names = np.array([class_name(class_names, int(v)) for v in values], dtype=object)
    return FeatureBatch(list(shapely.to_wkb(world)), names, area.area_m2(world))


# -- 4. write ------------------------------------------------------------------------------------------


def write_polygons(
    labels_path: str,
    out_path: str,
    *,
    client=None,
    class_names: tuple[str, ...] | list[str] | None = None,
    chunks: int = 2048,
) -> str:
    """Write the foreground regions of ``labels_path`` as polygons to ``out_path``; returns ``out_path``.

    ``client`` is a ``distributed.Client`` (default: the current one); ``class_names``
    default to the names the label file records, else ``class_0``, ``class_1``, ...
    The format follows the suffix: ``.gpkg``, ``.fgb``, ``.geojson`` (OGR) or
    ``.parquet`` (GeoParquet).
    """
    from distributed import get_client

    suffix = Path(out_path).suffix.lower()
    if suffix not in VECTOR_DRIVERS and suffix != ".parquet":
        raise OutputError(f"{out_path}: unknown vector format, use one of {sorted([*VECTOR_DRIVERS, '.parquet'])}")
    image = open_labels(labels_path, chunks)
    if image.is_volume or image.array.ndim != 2 or not isinstance(image.geometry, RasterGeometry):
        raise InputError(f"{labels_path}: polygons need a 2D georeferenced label raster")
    check_polygons_crs(out_path, image.geometry.crs_wkt, labels_path)
    names = tuple(class_names or image.class_names or ())
    client = client or get_client()
    rule = AreaRule(tuple(float(v) for v in image.geometry.transform), image.geometry.crs_wkt)
    if not image.geometry.crs_wkt:
        logger.warning("%s has no CRS: the polygons' area_m2 is left empty", labels_path)

    blocks = image.array.to_delayed()
    row_starts = np.concatenate([[0], np.cumsum(image.array.chunks[0])[:-1]])
    col_starts = np.concatenate([[0], np.cumsum(image.array.chunks[1])[:-1]])
    grid = blocks.shape
    indexes = [(i, j) for i in range(grid[0]) for j in range(grid[1])]
    polygonize = dask.delayed(polygonize_chunk, pure=False)
    tasks = [
        polygonize(blocks[i, j], (i, j), (int(row_starts[i]), int(col_starts[j])), image.nodata) for i, j in indexes
    ]
    pieces = dict(zip(indexes, client.compute(tasks)))
    border_futures = {k: client.submit(chunk_border, f, pure=False) for k, f in pieces.items()}
    borders = {k: result_of(client, f) for k, f in border_futures.items()}
    del border_futures
    groups = border_groups(borders, grid)
    del borders
    logger.info("%s: %d chunks, %d regions cross chunk borders", labels_path, len(indexes), len(groups))

    grouped: dict[tuple[int, int], list[int]] = defaultdict(list)
    owned: dict[tuple[int, int], list[np.ndarray]] = defaultdict(list)
    wanted: dict[tuple[tuple[int, int], tuple[int, int]], list[int]] = defaultdict(list)  # (chunk, owner): ids
    for group in groups:
        owner = (int(group[0][0]), int(group[0][1]))
        owned[owner].append(group)
        for i, j, r in group:
            grouped[(int(i), int(j))].append(int(r))
            wanted[((int(i), int(j)), owner)].append(int(r))
    # one selection per chunk and owner: an owner receives the pieces of its own groups only
    selections = {
        (chunk, owner): client.submit(select_pieces, pieces[chunk], np.array(ids), pure=False)
        for (chunk, owner), ids in wanted.items()
    }
    batches = []
    for key in indexes:
        needed = {(int(i), int(j)) for group in owned[key] for i, j, _ in group}
        batches.append(
            client.submit(
                finish_chunk,
                pieces[key],
                np.array(grouped[key], np.int64),
                owned[key],
                {k: selections[(k, key)] for k in needed},
                rule,
                names,
                pure=False,
            )
        )
    del pieces, selections
    return write_features(out_path, suffix, _gather_in_order(client, batches), rule, image.array.shape[0])


def _gather_in_order(client, batches: list) -> Iterator[FeatureBatch]:
    """Results one chunk at a time, each released once read (the client never holds them all)."""
    while batches:
        future = batches.pop(0)
        yield result_of(client, future)
        future.release()


