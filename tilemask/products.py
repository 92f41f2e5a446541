"""What is derived from one input's finished labels: polygons, the quick look, statistics.

One interface, :func:`write_products`: each product gets the labels path, the
job's chunking and class names, runs on the cluster and writes through
:func:`tilemask.outputs.atomic_path`; it returns the paths written.
"""

from __future__ import annotations

import logging
from pathlib import Path

from distributed import Client

from .cluster import gather
from .errors import InputError, OutputError, ReadError, first_line
from .planning import Job
from .progress import stage
from .workflow import Workflow

logger = logging.getLogger(__name__)


def client_imports(workflow: Workflow) -> list[str]:
    """The modules :func:`write_products` imports on the client for ``workflow``'s products and that are slow
    to import: polygons' (geopandas, dask.array, scipy: 2 s here) and statistics' (the label reader)."""
    wanted = {"tilemask.vectors": workflow.output.vectors, "tilemask.stats.api": workflow.stats}
    return [name for name, asked in wanted.items() if asked]


def write_products(job: Job, labels_path: str, client: Client, progress: bool = False) -> list[str]:
    """Polygons, quick look (2D rasters) and statistics of ``labels_path``, as the job's products ask. A quick look
    that cannot be made (an input's overview cut short) is a warning: the item's labels and other products stand."""
    products, written = job.products, []
    chunks = max(job.plan.chunks)
    if products.vectors:
        from .vectors import write_polygons

        with stage(f"polygons -> {Path(products.vectors).name}", progress):
            names = job.sink.layout.class_names
            written.append(write_polygons(labels_path, products.vectors, client=client, class_names=names, chunks=chunks))
    if products.quicklook:
        from .quicklook import write_quicklook  # a GeoTIFF's needs rasterio and Pillow only; Zarr's, on the worker

        with stage(f"quick look -> {Path(products.quicklook).name}", progress):
            inputs, bands = list(products.quicklook_inputs), list(products.quicklook_bands)
            task = client.submit(write_quicklook, inputs, labels_path, products.quicklook, bands, pure=False)
            try:  # a picture for people: the labels are the product, a quick look that fails is a warning
                written.extend(gather(client, [task]))
            except OutputError as exc:  # the PNG could not be written: write_quicklook's OutputError names it
                logger.warning("no quick look %s", first_line(exc))
            except (InputError, ReadError) as exc:  # an input or the labels could not be read: named, not the PNG
                logger.warning("no quick look %s: %s", products.quicklook, first_line(exc))
    if products.stats:
        from .stats import compute_from_config

        with stage(f"statistics -> {Path(products.stats.output).name}", progress):
            written.append(str(compute_from_config(labels_path, products.stats, client=client)))
    return written

