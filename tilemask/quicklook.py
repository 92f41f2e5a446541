"""A quick look: a small PNG of the mask over the input image, because people look before they read.

Both rasters are read at thumbnail size only (rasterio ``out_shape`` reads, which
use the overviews of a COG, or without overviews each block once), never whole.  The input is contrast-stretched per
band between its 2nd and 98th percentiles (on the valid pixels of the
thumbnail); foreground classes are blended over it in the output's class colours
at ``opacity``; background shows the image as is; pixels that are nodata in every input band
(GDAL's dataset mask) or not finite, or nodata in the labels, are transparent.  Its ``Software`` text chunk,
``tilemask <version>``, marks it as tilemask's: ``--overwrite`` replaces no other PNG.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from rasterio.enums import Resampling
from rasterio.errors import RasterioError

from .classes import CLASSES_TAG, class_colours
from .errors import InputError, OutputError, ReadError
from .formats import for_path, product_mark_text
from .outputs import atomic_path
from .sources.raster import first_gdal_line, gdal_env, read_bands

logger = logging.getLogger(__name__)

THUMBNAIL = 1024
PNG_LEVEL = 3
"""zlib level of the PNG: the demo's 791 x 718 quick look took 0.10 s and 911 kB at 3, 0.60 s and 853 kB with
Pillow's ``optimize`` (level 9)."""


def thumbnail_shape(shape: tuple[int, int], size: int) -> tuple[int, int]:
    """``shape`` scaled so that its longest side is at most ``size`` (never enlarged)."""
    scale = min(1.0, size / max(shape))
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def write_quicklook(
    input_path: str | Sequence[str],
    labels_path: str,
    png_path: str,
    bands: list[int] | None = None,
    *,
    size: int = THUMBNAIL,
    opacity: float = 0.5,
) -> str:
    """Write ``png_path``: the labels over the input, longest side ``size``; returns ``png_path``.

    ``input_path`` is a raster, or several stacked as the channels of one input (a STAC item's assets):
    ``bands`` (1-based) of each file, or all of its bands, in turn. The first three channels show as RGB,
    else the first as grey.

    An :class:`OutputError` (the PNG cannot be written: a full disk, a folder not writable) begins with the PNG's
    path; an :class:`InputError` or :class:`ReadError` names the file it could not read (an input, the labels),
    never the PNG: the run's warning names the PNG once (:func:`tilemask.products.write_products`).
    """
    labels, nodata, n_classes, labels_shape = _read_labels(labels_path, size)
    files = [input_path] if isinstance(input_path, str) else list(input_path)
    layers = []
    for path in files:
        try:
            with gdal_env(path), rasterio.open(path) as src:  # a remote input: GDAL's settings for it
                if (src.height, src.width) != labels_shape:
                    raise InputError(f"{path}: {src.height}x{src.width} pixels, the labels are not on its grid")
                if path == files[0]:
                    north_up = _north_up(src)
                wanted = (bands or range(1, src.count + 1))[: 3 - sum(len(layer) for layer in layers)]
                with rasterio.Env(GDAL_CACHEMAX=_row_of_blocks(src)):
                    layers.append(read_bands(src, list(wanted), out_shape=labels.shape, masked=True,
                                             resampling=Resampling.nearest))  # fmt: skip
        except RasterioError as exc:  # after the run, which read the pixels: an overview cut short, say
            raise ReadError(f"{path}: cannot read for the quick look: {first_gdal_line(exc)}") from None
        if sum(len(layer) for layer in layers) == 3:
            break
    image = np.ma.masked_invalid(np.ma.concatenate(layers))  # NaN and inf: invalid pixels, as the run takes them
    image = image if len(image) == 3 else image[:1]
    rgb = _stretch(image)
    valid = ~np.ma.getmaskarray(image).all(axis=0)  # as GDAL's dataset mask: nodata in every band
    if nodata is not None:
        valid &= labels != nodata
    colours = np.zeros((max(n_classes, int(labels.max(initial=0)) + 1), 3), np.float32)
    for value, (r, g, b, _) in class_colours(len(colours)).items():
        colours[value] = (r, g, b)
    foreground = valid & (labels != 0)
    blended = rgb.astype(np.float32)
    overlay = colours[np.where(foreground, labels, 0)]
    blended[foreground] = (1 - opacity) * blended[foreground] + opacity * overlay[foreground]
    rgba = north_up(np.dstack([np.rint(blended).astype(np.uint8), np.where(valid, 255, 0).astype(np.uint8)]))
    target = Path(png_path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        mark = PngInfo()  # tilemask's mark: a text chunk before the pixels, read back without them
        mark.add_text("Software", product_mark_text())
        with atomic_path(target) as staged:
            Image.fromarray(rgba, "RGBA").save(staged, format="PNG", compress_level=PNG_LEVEL, pnginfo=mark)
    except OutputError:  # a full disk, named with the file already
        raise
    except OSError as exc:
        raise OutputError(f"{target}: cannot write the quick look: {exc}") from None
    logger.info("wrote %s (%dx%d)", target, rgba.shape[1], rgba.shape[0])
    return str(target)


def _north_up(src):
    """What turns an image of ``src``'s rows and columns north up, west left: a georeferenced raster stored
    south-up (rows running north, as some GeoTIFFs and netCDFs are) or east-left is shown as a map shows it. One
    without a CRS or a transform, or turned (a rotation in its transform), is shown as stored."""
    a, b, _, d, e, _ = src.transform[:6]
    if src.crs is None or src.transform.is_identity or b or d:  # identity: GDAL's for a raster with no transform
        return lambda image: image
    return lambda image: image[:: -1 if e > 0 else 1, :: -1 if a < 0 else 1]


def _row_of_blocks(src) -> int:
    """GDAL's block cache for a reduced read without overviews (bytes, as rasterio hands it to GDAL): four rows of
    the raster's blocks, every band, at least 64 MB and at most 512 MB. The read takes a few pixel rows from each
    row of blocks; a cache that cannot hold the row decodes each block again for every one of them (76 s instead
    of 1 s for a 3955 x 3590 scene: ``benchmarks/bench_quicklook.py``)."""
    block_rows, block_cols = src.block_shapes[0]
    row = -(-src.width // block_cols) * block_cols * block_rows * src.count * np.dtype(src.dtypes[0]).itemsize
    return int(min(max(4 * row, 64 << 20), 512 << 20))


def _read_labels(labels_path: str, size: int) -> tuple[np.ndarray, int | None, int, tuple[int, int]]:
    """The labels at thumbnail size, their nodata value, the number of classes and their full shape."""
    if for_path(labels_path).gdal_raster:  # read through its overviews
        try:
            with rasterio.open(labels_path) as ds:
                shape = thumbnail_shape((ds.height, ds.width), size)
                labels = ds.read(1, out_shape=shape, resampling=Resampling.nearest)
                tag = ds.tags().get(CLASSES_TAG)
                nodata = None if ds.nodata is None else int(ds.nodata)
        except RasterioError as exc:
            raise ReadError(f"{labels_path}: cannot read for the quick look: {first_gdal_line(exc)}") from None
        n_classes = len(json.loads(tag)) if tag else 0
        return labels, nodata, n_classes, (ds.height, ds.width)
    # Zarr (no overviews): take every k-th pixel, chunk by chunk, on this process's threads. Within a task Dask's
    # default would be the cluster itself, through a new client of the worker's, while this task holds a thread.
    # The label reader is imported here only: it brings dask.array, nibabel and scipy (1.7 s on a worker here),
    # which a GeoTIFF's quick look does without.
    from .sources.labels import open_labels

    image = open_labels(labels_path)
    if image.array.ndim != 2:
        raise InputError(f"{labels_path}: a quick look needs a 2D label raster")
    step = max(1, -(-max(image.array.shape) // size))
    labels = np.asarray(image.array[::step, ::step].compute(scheduler="threads"))
    return labels, image.nodata, len(image.class_names or ()), tuple(image.array.shape)


def _stretch(image: np.ma.MaskedArray) -> np.ndarray:
    """``(bands, h, w)`` -> ``(h, w, 3)`` uint8, each band stretched between its 2nd and 98th percentiles."""
    out = []
    for band in image:
        values = band.compressed().astype(np.float64)
        lo, hi = np.percentile(values, (2, 98)) if values.size else (0.0, 1.0)
        scaled = (np.ma.filled(band, lo).astype(np.float64) - lo) / max(hi - lo, 1e-12)
        out.append(np.clip(scaled * 255.0, 0, 255))
    return np.rint(np.dstack(out * (3 // len(out)))).astype(np.uint8)
