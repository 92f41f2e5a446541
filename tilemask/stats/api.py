"""``compute_stats``: the statistics the ``tilemask stats`` command and the workflow's ``stats:`` run.

One table per call, chosen by the arguments (docs/DESIGN.md section 6):

* nothing else: per-class totals;
* ``regions`` a vector file: one row per region (center or fraction coverage);
* ``regions`` a label image (``.tif``, ``.tiff``, ``.zarr``, ``.nii``, ``.nii.gz``): one row per atlas label;
* ``instances=True``: one row per instance (connected component).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import InputError, ReadError, check_flags, on_command_line, option
from ..sources import file_stamp
from ..sources.archive import member_under
from ..sources.labels import check_block_count, check_chunks, open_labels
from .config import StatsConfig, is_label_image, unused_options
from .evaluate import check_same_grid, evaluate
from .instances import CONNECTIVITIES, find_instances
from .surface import check_surface
from .tables import check_table_path, parse_classes, write_json, write_table
from .totals import atlas_zonal, check_atlas_grid, class_totals, grid_of
from .zonal import prepare_vector_zonal, read_regions

logger = logging.getLogger(__name__)

def compute_stats(mask_path: str | os.PathLike, output_path: str | os.PathLike, *, client=None, **options) -> Path:
    """Compute the statistics of the label image at ``mask_path`` and write them to ``output_path``.

    ``options`` are :func:`prepare_stats`'s (``regions``, ``region_id``, ``coverage``, ``instances``,
    ``connectivity``, ``classes``, ``chunks``).  Everything a user can get wrong (output suffix, regions,
    region id, coverage, connectivity, class names) is checked before any pixel is read.
    """
    _check_client(client)
    return prepare_stats(mask_path, output_path, **options)(client)


def prepare_stats(
    mask_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    regions: str | os.PathLike | None = None,
    region_id: str | None = None,
    coverage: str = "center",
    instances: bool = False,
    connectivity: str = "face",
    classes=None,
    chunks: int | None = None,
) -> Callable[..., Path]:
    """Check the arguments and open the label image and the regions, reading no pixel; returns the computation
    (``run(client, before_writing=) -> Path``, ``before_writing`` called between computing the table and writing
    it).  ``tilemask stats`` starts its cluster only after this, so a wrong argument or an unreadable file is
    refused at once."""
    check_flags(instances=instances)
    _check_image_path("mask_path", mask_path)
    if regions is not None and not isinstance(regions, str | os.PathLike):  # a GeoDataFrame was a bare TypeError
        raise InputError(f"regions: a path (a vector file: GeoPackage, shapefile, GeoJSON, ...; or a label image), "
                         f"not a {type(regions).__name__}; write it to one first (GeoDataFrame.to_file)")  # fmt: skip
    output = check_table_path(output_path, inputs=(mask_path, regions))
    mask_path, regions = _absolute(mask_path), regions and _absolute(regions)
    check_unchanged = unchanged(mask_path, regions)
    if coverage not in ("center", "fraction"):
        raise InputError(f"{option('coverage')} must be 'center' or 'fraction', got {coverage!r}")
    if connectivity not in CONNECTIVITIES:
        raise InputError(f"{option('connectivity')} must be 'face' or 'full', got {connectivity!r}")
    if instances and regions is not None:
        raise InputError(f"{option('instances')} and {option('regions')} cannot be combined: pick one table")
    refusal = unused_options(regions, region_id, coverage, instances, connectivity, flags=on_command_line())
    if refusal:
        raise InputError(refusal)
    check_chunks(chunks)
    names = parse_classes(classes)
    image = open_labels(str(mask_path), chunks=chunks)
    check_block_count(image, chunks)
    if not np.issubdtype(image.array.dtype, np.integer):
        raise InputError(f"{mask_path}: labels must be integers, not {image.array.dtype}")
    grid_of(image).check_sizes(mask_path)
    if instances:
        table = lambda client: find_instances(image, connectivity=connectivity, names=names, client=client)
    elif regions is not None and is_label_image(regions):
        atlas = open_labels(str(regions), chunks=chunks)
        if region_id is not None:
            raise InputError(f"{option('region_id')} applies to vector regions; an atlas is keyed by its label value")
        if coverage == "fraction":
            raise InputError(f"{option('coverage')} fraction applies to vector regions; an atlas's pixels are the "
                             "labels' own")  # fmt: skip
        check_atlas_grid(grid_of(image), atlas, mask_path)
        table = lambda client: atlas_zonal(image, atlas, names=names, client=client)
    elif regions is not None:
        frame, key = read_regions(regions, region_id)
        keep_geometry = output.suffix.lower() in (".parquet", ".gpkg", ".csv")
        table = prepare_vector_zonal(image, frame, key, coverage, names=names, keep_geometry=keep_geometry)
    else:
        table = lambda client: class_totals(image, names=names, client=client)

    def run(client=None, *, before_writing: Callable[[], None] = lambda: None) -> Path:
        with on_the_cluster(image.path, client):
            frame = table(client)
        check_unchanged()
        before_writing()  # the command stops here if it was asked to (a Ctrl-C Python swallowed): no table
        return write_table(frame, output)

    return run


def compute_from_config(mask_path: str | os.PathLike, config: StatsConfig, output_path=None, client=None) -> Path:
    """Run ``compute_stats`` as a workflow's ``stats:`` section asks (``output_path`` already formatted)."""
    return compute_stats(
        mask_path,
        output_path or config.output,
        regions=config.regions,
        region_id=config.region_id,
        coverage=config.coverage,
        instances=config.instances,
        connectivity=config.connectivity,
        classes=config.classes,
        client=client,
    )


def evaluate_paths(
    pred_path: str | os.PathLike,
    truth_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    *,
    classes=None,
    chunks: int | None = None,
    surface: bool = False,
    client=None,
) -> dict:
    """Evaluate the prediction at ``pred_path`` against ``truth_path``; write JSON when asked. ``surface``: add
    each class's surface distances (Hausdorff, its 95th percentile, average symmetric surface distance)."""
    _check_client(client)
    return prepare_evaluation(pred_path, truth_path, output_path, classes=classes, chunks=chunks, surface=surface)(
        client
    )


def prepare_evaluation(
    pred_path: str | os.PathLike,
    truth_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    *,
    classes=None,
    chunks: int | None = None,
    surface: bool = False,
) -> Callable[..., dict]:
    """Check the arguments and open both label images, reading no pixel; returns the evaluation
    (``run(client, before_writing=) -> dict``, see :func:`prepare_stats`). With ``surface``, an image too big to
    read whole or on a geographic CRS is refused here too."""
    check_flags(surface=surface)
    _check_image_path("pred_path", pred_path)
    _check_image_path("truth_path", truth_path)
    if output_path is not None:
        check_table_path(output_path, inputs=(pred_path, truth_path), suffixes=(".json",))
    pred_path, truth_path = _absolute(pred_path), _absolute(truth_path)
    check_unchanged = unchanged(pred_path, truth_path)
    check_chunks(chunks)
    names = parse_classes(classes)
    pred = open_labels(str(pred_path), chunks=chunks)
    truth = open_labels(str(truth_path), chunks=chunks)
    check_block_count(pred, chunks)
    grid = check_same_grid(pred, truth)
    if surface:
        check_surface(grid, pred_path)

    def run(client=None, *, before_writing: Callable[[], None] = lambda: None) -> dict:
        with on_the_cluster(pred.path, client):
            result = evaluate(pred, truth, names=names, client=client, surface=surface)
        check_unchanged()
        before_writing()
        if output_path is not None:
            write_json(result, output_path)
        return result

    return run


def on_the_cluster(path: str, client):
    """The cluster's own failures while ``path`` is measured on ``client`` (a worker killed too often, the scheduler
    lost) as one line naming it (:func:`tilemask.cluster.cluster_failures`); nothing without a client."""
    if client is None:
        return contextlib.nullcontext()
    from ..cluster import cluster_failures

    return cluster_failures(path, client)


def unchanged(*paths) -> Callable[[], None]:
    """A check that the local files at ``paths`` (None for one not given) are those there now: a label image
    replaced while its blocks were read (another run's ``--overwrite`` publishing it) gave a table of both
    versions, exit 0 (a review's, 5 of 41 tables).  Such a result is refused, unwritten: each block reads the file
    by its path, on the workers, as exactextract does."""
    stamps = {str(path): file_stamp(str(path)) for path in paths if path is not None}

    def check() -> None:
        for path, stamp in stamps.items():
            if file_stamp(path) != stamp:
                raise ReadError(f"{path} changed while it was read (replaced by another run?); nothing written, "
                                "run again")  # fmt: skip

    return check


def _check_client(client) -> None:
    if client is not None:
        from ..cluster import check_client

        check_client(client)


def _check_image_path(name: str, path) -> None:
    """A label image given as a path or URL.  The DataArray ``tilemask.open_result`` and ``postprocess.apply`` give,
    what a notebook holds, was a bare ``TypeError: expected str, bytes or os.PathLike object, not DataArray``."""
    if isinstance(path, str | os.PathLike):
        return
    kind = type(path).__name__
    how = ".rio.to_raster" if kind == "DataArray" else "rasterio, nibabel or zarr, with its grid"
    raise InputError(f"{name}: a label image's path or URL, not an object of type {kind}; write it to a file first "
                     f"({how})")  # fmt: skip


def _absolute(path: str | os.PathLike) -> str:
    """A local path made absolute (URLs as they are; a relative archive's ``/vsizip/districts.zip/a.gpkg`` too,
    without normalizing ``/vsizip//abs/districts.zip`` into the relative ``/vsizip/abs/...``): the workers of
    another cluster open it from their own working folders."""
    path = str(path)
    if path.startswith("/vsi"):
        return member_under(path, os.getcwd())
    return path if "://" in path else os.path.abspath(path)

