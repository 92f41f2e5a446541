"""``tilemask stats`` and ``tilemask evaluate``: parse, open a client, call :mod:`tilemask.stats`."""

from __future__ import annotations

import contextlib
import logging
import os

import click

from ..command import TilemaskCommand, errors_only, scheduler_address
from ..errors import OutputConflict

logger = logging.getLogger(__name__)


def _file_or_url(ctx, param, value: str | None) -> str | None:
    """A local file that exists (click's own check and message), or a URL read over the network (a label COG or
    an atlas read in place by GDAL, vector regions copied once, as a workflow's ``stats.regions``); click refused a
    URL as 'does not exist', and an archive's member as GDAL names it (``/vsizip/districts.zip/districts.shp``)."""
    from ..sources.archive import MEMBER_PREFIXES
    from ..storage import network_object

    if value is None or network_object(value) is not None or value.startswith(MEMBER_PREFIXES):
        return value
    return click.Path(exists=True).convert(value, param, ctx)


@click.command("stats", cls=TilemaskCommand, short_help="Per-class, per-region or per-instance statistics.")
@click.argument("mask", callback=_file_or_url)
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False), help="Table: .parquet, .gpkg, .csv or .json.")
@click.option("--regions", metavar="PATH|URL", callback=_file_or_url,
              help="Vector regions (any OGR format, GeoParquet) or an atlas label image; a path, an s3:// or "
              "https:// URL, or a member of a zip or tar (/vsizip/districts.zip/districts.shp).")  # fmt: skip
@click.option("--region-id", metavar="FIELD", help="Field keying the regions (default: the feature index).")
@click.option("--coverage", type=click.Choice(["center", "fraction"]), default="center", show_default=True,
              help="center: pixel centre inside (rasterstats); fraction: covered fraction (exactextract).")
@click.option("--instances", is_flag=True, help="One row per connected component of each foreground class.")
@click.option("--connectivity", type=click.Choice(["face", "full"]), default="face", show_default=True,
              help="Neighbours for --instances: face (4/6) or full (8/26).")
@click.option("--classes", metavar="A,B,...", help="Names of label values 0, 1, ... (default: those the file records).")
@click.option("--chunks", type=click.IntRange(min=1), help="Block edge used to split the work (results do not depend on it).")
@click.option("--scheduler", metavar="ADDRESS", callback=scheduler_address,
              help="This Dask scheduler: its address or scheduler file (default: an embedded local cluster).")
@click.option("--overwrite", is_flag=True, help="Replace an output file tilemask wrote (its mark says so; a CSV or "
              "JSON-records table has no place for one: any such file at the path).")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
def stats(
    mask, output, regions, region_id, coverage, instances, connectivity, classes, chunks, scheduler, overwrite, debug
) -> None:
    """Per-class, per-region or per-instance statistics of the label image MASK."""
    from ..cluster import cluster_client
    from ..interrupts import raise_if_stopped
    from .api import prepare_stats

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run = prepare_stats(
        mask, output, regions=regions, region_id=region_id, coverage=coverage, instances=instances,
        connectivity=connectivity, classes=classes, chunks=chunks,
    )  # fmt: skip
    with _output_lock(output):
        _refuse_existing(output, overwrite)
        with cluster_client(scheduler) as client:  # started once the arguments and the files have passed
            path = run(client, before_writing=raise_if_stopped)
    if not errors_only():
        click.echo(f"wrote {path}")


@click.command("evaluate", cls=TilemaskCommand, short_help="Dice, IoU, precision, recall against the truth.")
@click.argument("pred", callback=_file_or_url)
@click.argument("truth", callback=_file_or_url)
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), help="Write the scores as JSON.")
@click.option("--classes", metavar="A,B,...", help="Names of label values 0, 1, ...")
@click.option("--chunks", type=click.IntRange(min=1), help="Block edge used to split the work (results do not depend on it).")
@click.option("--surface", is_flag=True, help="Also the surface distances per class: Hausdorff (hd), its 95th "
              "percentile (hd95), average symmetric (assd), in mm or CRS units; reads both images whole.")
@click.option("--scheduler", metavar="ADDRESS", callback=scheduler_address,
              help="This Dask scheduler: its address or scheduler file (default: an embedded local cluster).")
@click.option("--overwrite", is_flag=True, help="Replace an output file tilemask wrote.")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
def evaluate(pred, truth, output, classes, chunks, surface, scheduler, overwrite, debug) -> None:
    """Dice, IoU, precision and recall (and with --surface the surface distances) of the label image PRED against
    TRUTH (same grid)."""
    from rich.console import Console

    from ..cluster import cluster_client
    from ..interrupts import raise_if_stopped
    from .api import prepare_evaluation
    from .evaluate import render

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run = prepare_evaluation(pred, truth, output, classes=classes, chunks=chunks, surface=surface)
    with _output_lock(output):
        _refuse_existing(output, overwrite)
        with cluster_client(scheduler) as client:  # started once the arguments and the files have passed
            result = run(client, before_writing=raise_if_stopped)
    if not errors_only():
        table, console = render(result), Console()
        if not console.is_terminal and not os.environ.get("COLUMNS"):  # a pipe or a CI log: the table at its own
            # width, not cut to 80 columns ("0.7…"); COLUMNS, where set, is rich's and the user's word for it
            console = Console(width=Console(width=100_000).measure(table).maximum)
        console.print(table)
        if output:
            click.echo(f"wrote {output}")


def _output_lock(output: str | None):
    """The table's lock, as a run holds its outputs': a second command writing the same file meanwhile is refused
    (exit 2), where both wrote it, without ``--overwrite``, and one table was lost (a review's, 6 of 6)."""
    if not output:
        return contextlib.nullcontext()
    from ..outputs import OutputLock

    return OutputLock([str(output)])


def _refuse_existing(output: str | None, overwrite: bool) -> None:
    """An existing output file is replaced only with ``--overwrite`` (exit 2 before any work), as rio's commands,
    and only when tilemask wrote it: a file without tilemask's mark is refused even then (a CSV has no place for a
    mark: ``--overwrite`` alone decides)."""
    if not output or not os.path.lexists(output):
        return
    from ..formats import product_written_by_tilemask

    if product_written_by_tilemask(output) is False:
        raise OutputConflict(f"{output} exists and was not written by tilemask; refused to replace it")
    if not overwrite:
        raise OutputConflict(f"{output} exists; pass --overwrite to replace it")
