"""Polygons of a label image, polygonized per chunk in parallel and merged across chunk borders.

The answer is the one ``rasterio.features.shapes`` gives on the whole label image
with 4-connectivity, restricted to the foreground (not class 0, not nodata): one
polygon per 4-connected region of one class, holes included.  No process holds
the whole image:

1. **Per chunk** (one task each): the chunk's regions are labelled
   (``scipy.ndimage.label`` per class, 4-connectivity), and the region-id image
   is polygonized with ``rasterio.features.shapes`` in *pixel* coordinates (exact
   integers), shifted to the chunk's place in the image.  Each region is a
   *piece*.  The task keeps its pieces and returns only its four border strips
   (region id and class of the first/last row and column).
2. **Border graph** (client, small): two pieces in neighbouring chunks touch by
   an edge when a pixel on one side of their common border and the pixel facing
   it have the same foreground class.  The connected components of that graph
   (``scipy.sparse.csgraph``) are the regions that cross borders; every other
   piece is already a whole region.  A corner contact is not an edge, so
   regions touching only diagonally stay apart, as with 4-connectivity.
3. **Merge** (one task per chunk): a chunk emits its whole pieces, and the union
   (``shapely.union_all``, exact on integer coordinates) of every group whose
   first piece it holds; the union's collinear vertices left on the old chunk
   borders are dropped (``shapely.simplify(g, 0)``).  A region spanning many
   chunks (a lake over 20 chunks) is merged by one task that receives just its
   pieces, never the other regions of those chunks.
4. **Write** (client, streaming): features are mapped to world coordinates with
   the GDAL geotransform (``X = GT0 + col*GT1 + row*GT2``, ``Y = GT3 + col*GT4 +
   row*GT5``, GDAL's own formula) and streamed chunk by chunk into the output
   under a temporary name, renamed when whole.

Attributes: ``class`` (name) and ``area_m2`` (planar area times the CRS unit's
metres squared for a projected CRS; for a geographic CRS, the area on the CRS's
ellipsoid: planar area in its cylindrical equal-area projection, exact for the
parallels and meridians bounding the pixels of a north-up grid; empty (null)
without a CRS, as in the statistics).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio.features
import shapely
from pyproj import CRS, Proj
from rasterio.errors import NotGeoreferencedWarning
from scipy import ndimage, sparse
from scipy.sparse import csgraph

from .classes import class_name
from .cluster import result_of
from .errors import InputError, OutputError
from .formats import product_mark, product_mark_text
from .geometry import RasterGeometry
from .outputs import atomic_path
from .sources.labels import open_labels

logger = logging.getLogger(__name__)

# polygonize_chunk hands rasterio.features.shapes arrays in pixel units, never georeferenced; rasterio silences its
# warnings about that with warnings.catch_warnings, which a shapes call on another worker thread can undo
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module="rasterio.features")

VECTOR_DRIVERS = {".gpkg": "GPKG", ".fgb": "FlatGeobuf", ".geojson": "GeoJSON"}
SIDES = ("top", "bottom", "left", "right")


@dataclass
class ChunkPieces:
    """The regions of one chunk: polygons in image pixel coordinates, one per region id."""

    index: tuple[int, int]
    classes: np.ndarray  # class of region id i + 1
    geoms: np.ndarray  # shapely polygons, region id i + 1
    border_ids: dict[str, np.ndarray]  # region id per pixel of each border strip (0: none)
    border_classes: dict[str, np.ndarray]  # class per pixel of each border strip (-1: none)


@dataclass
class FeatureBatch:
    """Finished features of one chunk, in world coordinates."""

    wkb: list[bytes]
    classes: np.ndarray
    area_m2: np.ndarray


# -- 1. per chunk ---------------------------------------------------------------------------------


def polygonize_chunk(
    block: np.ndarray, index: tuple[int, int], origin: tuple[int, int], nodata: int | None
) -> ChunkPieces:
    """Label the chunk's foreground regions (4-connectivity) and polygonize them in image pixels."""
    block = np.asarray(block)
    ids = np.zeros(block.shape, np.int32)
    classes: list[np.ndarray] = []
    count = 0
    for value in np.unique(block):
        if value == 0 or (nodata is not None and value == nodata):
            continue
        regions, n = ndimage.label(block == value)  # default structure: face (4-) connectivity
        ids[regions > 0] = regions[regions > 0] + count
        classes.append(np.full(n, value, np.int64))
        count += n
    geoms = np.empty(count, object)
    if count:
        for geom, value in rasterio.features.shapes(ids, mask=ids > 0, connectivity=4):
            geoms[int(value) - 1] = shapely.geometry.shape(geom)
        if any(g is None for g in geoms):
            raise RuntimeError(f"chunk {index}: a labelled region got no polygon")
        row0, col0 = origin
        geoms = shapely.transform(geoms, lambda xy: xy + np.array([col0, row0], dtype=np.float64))
    class_of = np.concatenate([[-1], *classes]) if classes else np.array([-1])
    strips = {"top": ids[0, :], "bottom": ids[-1, :], "left": ids[:, 0], "right": ids[:, -1]}
    return ChunkPieces(
        index=index,
        classes=class_of[1:],
        geoms=geoms,
        border_ids={side: strip.copy() for side, strip in strips.items()},
        border_classes={side: class_of[strip] for side, strip in strips.items()},
    )


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
    """The polygons of some regions of a chunk (what a merge elsewhere needs)."""
    return {int(r): pieces.geoms[int(r) - 1] for r in region_ids}


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
        merged = shapely.simplify(shapely.union_all(parts), 0.0)
        if merged.geom_type != "Polygon":
            raise RuntimeError(f"pieces {group.tolist()} of one region merged into a {merged.geom_type}")
        geoms.append(merged)
        values.append(pieces.classes[int(group[0][2]) - 1])
    world = area.to_world(np.array(geoms, dtype=object))
    names = np.array([class_name(class_names, int(v)) for v in values], dtype=object)
    return FeatureBatch(list(shapely.to_wkb(world)), names, area.area_m2(world))


@dataclass(frozen=True)
class AreaRule:
    """Pixel-to-world mapping and the area rule of the label image's CRS."""

    transform: tuple[float, float, float, float, float, float]  # GDAL order
    crs_wkt: str | None

    def to_world(self, geoms: np.ndarray) -> np.ndarray:
        gt = self.transform

        def affine(xy: np.ndarray) -> np.ndarray:
            x, y = xy[:, 0], xy[:, 1]
            return np.column_stack([gt[0] + x * gt[1] + y * gt[2], gt[3] + x * gt[4] + y * gt[5]])

        return shapely.transform(geoms, affine)

    def area_m2(self, geoms: np.ndarray) -> np.ndarray:
        if len(geoms) == 0:
            return np.zeros(0)
        if not self.crs_wkt:  # coordinates in no known unit: no area, as in the statistics
            return np.full(len(geoms), np.nan)
        crs = CRS.from_wkt(self.crs_wkt)
        if crs.is_geographic:
            return shapely.area(shapely.transform(geoms, equal_area(crs)))
        factor = (crs.axis_info[0].unit_conversion_factor or 1.0) if crs.axis_info else 1.0
        return shapely.area(geoms) * factor**2


def equal_area(crs: CRS):
    """The map from ``crs``'s longitude/latitude (x, y, in its angular unit) to the cylindrical equal-area projection
    (``+proj=cea``) on its ellipsoid, longitudes beyond +-180 kept as they are (``+over``).

    Planar areas there are areas on the ellipsoid, and parallels and meridians (the pixel edges of a north-up
    grid) are straight lines, so a polygon of such pixels gets its exact area, however wide: a geodesic between
    its vertices would cut across the pixels (the whole globe's edges along +-90 and +-180 enclose nothing).
    """
    geod = crs.get_geod()
    proj = Proj(f"+proj=cea +a={geod.a!r} +f={geod.f!r} +over")
    to_degrees = np.degrees(crs.axis_info[0].unit_conversion_factor)

    def forward(xy: np.ndarray) -> np.ndarray:
        return np.column_stack(proj(xy[:, 0] * to_degrees, xy[:, 1] * to_degrees))

    return forward


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
    for group in groups:
        owned[(int(group[0][0]), int(group[0][1]))].append(group)
        for i, j, r in group:
            grouped[(int(i), int(j))].append(int(r))
    selections = {k: client.submit(select_pieces, pieces[k], np.array(v), pure=False) for k, v in grouped.items()}
    batches = []
    for key in indexes:
        needed = {(int(i), int(j)) for group in owned[key] for i, j, _ in group}
        batches.append(
            client.submit(
                finish_chunk,
                pieces[key],
                np.array(grouped[key], np.int64),
                owned[key],
                {k: selections[k] for k in needed},
                rule,
                names,
                pure=False,
            )
        )
    del pieces, selections
    return _write(out_path, suffix, _gather_in_order(client, batches), rule.crs_wkt)


def _gather_in_order(client, batches: list) -> Iterator[FeatureBatch]:
    """Results one chunk at a time, each released once read (the client never holds them all)."""
    while batches:
        future = batches.pop(0)
        yield result_of(client, future)
        future.release()


def _record_batches(batches: Iterator[FeatureBatch]) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        yield pa.record_batch(
            [
                pa.array(batch.wkb, pa.binary()),
                pa.array(batch.classes, pa.string()),
                pa.array(batch.area_m2, pa.float64(), from_pandas=True),  # NaN (no CRS: no area) as null
            ],
            schema=_schema(),
        )


def _schema(geo: dict | None = None) -> pa.Schema:
    """The features' columns; with ``geo``, GeoParquet's metadata and tilemask's mark
    (:func:`~tilemask.formats.product_mark`)."""
    geometry = pa.field("geometry", pa.binary(), metadata={b"ARROW:extension:name": b"geoarrow.wkb"})
    schema = pa.schema([geometry, pa.field("class", pa.string()), pa.field("area_m2", pa.float64())])
    mark = {key.encode(): value.encode() for key, value in product_mark().items()}
    return schema.with_metadata({b"geo": json.dumps(geo).encode(), **mark}) if geo else schema


def _ogr_mark(driver: str) -> dict:
    """tilemask's mark (:func:`~tilemask.formats.product_mark`) as ``pyogrio.write_arrow`` keywords: the metadata
    items a GeoPackage (dataset and layer) and a FlatGeobuf (layer) keep, a GeoJSON's ``description`` member (it
    keeps no metadata)."""
    if driver == "GeoJSON":
        return {"layer_options": {"DESCRIPTION": product_mark_text()}}
    mark = product_mark()
    return {"dataset_metadata": mark, "layer_metadata": mark} if driver == "GPKG" else {"layer_metadata": mark}


def _write(out_path: str, suffix: str, batches: Iterator[FeatureBatch], crs_wkt: str | None) -> str:
    """Stream the features into ``out_path`` under a temporary name; rename when whole."""
    target = Path(out_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with atomic_path(target) as staged:
        if suffix == ".parquet":
            geo = {
                "version": "1.1.0",
                "primary_column": "geometry",
                "columns": {
                    "geometry": {
                        "encoding": "WKB",
                        "geometry_types": ["Polygon"],
                        "crs": CRS.from_wkt(crs_wkt).to_json_dict() if crs_wkt else None,
                    }
                },
            }
            with pq.ParquetWriter(staged, _schema(geo), compression="zstd") as writer:
                for record in _record_batches(batches):
                    writer.write_batch(record)
                    count += record.num_rows
        else:
            import pyogrio

            counted = _counting(_record_batches(batches))
            reader = pa.RecordBatchReader.from_batches(_schema(), counted)
            pyogrio.write_arrow(
                reader,
                str(staged),
                layer=target.stem,
                driver=VECTOR_DRIVERS[suffix],
                geometry_name="geometry",
                geometry_type="Polygon",
                crs=crs_wkt,
                **_ogr_mark(VECTOR_DRIVERS[suffix]),
            )
            count = counted.count
    logger.info("wrote %d polygons to %s", count, target)
    return str(target)


class _counting:
    """An iterator of record batches that counts the rows going through."""

    def __init__(self, batches: Iterator[pa.RecordBatch]):
        self.batches, self.count = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.count += batch.num_rows
            yield batch
