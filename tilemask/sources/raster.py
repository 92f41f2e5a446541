"""GeoTIFF / COG (any GDAL raster, local or remote) read by window with rasterio.

Values are returned as stored unless the bands carry scale/offset metadata, in
which case ``stored * scale + offset`` (float32) is returned.  Validity follows
GDAL's dataset mask (``rasterio``'s ``dataset_mask``): an internal or external
mask if there is one, else the alpha band, else the nodata value (a pixel is
invalid when every band holds nodata).  Alpha bands are not image bands: they
are left out of the default band selection.

Remote rasters (``https://``, ``s3://``, ``/vsi...``) are read with HTTP range
requests; :data:`CLOUD_DEFAULTS` are GDAL settings for that, applied unless the
environment already sets them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import RasterioError
from rasterio.windows import Window

from ..errors import InputError, ReadError
from ..geometry import RasterGeometry, Region
from . import ImageSource, cached_handle, file_stamp

logger = logging.getLogger(__name__)

CLOUD_DEFAULTS = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no directory listing to find sidecar files
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF,.vrt,.jp2",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "GDAL_HTTP_VERSION": "2",
    "VSI_CACHE": "TRUE",
    "VSI_CACHE_SIZE": str(64 << 20),
    "GDAL_CACHEMAX": "256",
    "GDAL_HTTP_MAX_RETRY": "3",
    "GDAL_HTTP_RETRY_DELAY": "1",
}
for _key, _value in CLOUD_DEFAULTS.items():  # GDAL reads config options from the environment
    os.environ.setdefault(_key, _value)


@dataclass(frozen=True)
class RasterSource(ImageSource):
    """Bands x rows x cols of a GDAL raster; ``bands`` are 1-based, in the order asked for."""

    path: str
    bands: tuple[int, ...]
    height: int
    width: int
    dtype: str
    raster_geometry: RasterGeometry
    masked: bool = False  # the dataset has a nodata value, a mask or an alpha band
    scales: tuple[float, ...] | None = None  # per selected band, when not all 1 / 0
    offsets: tuple[float, ...] | None = None

    @classmethod
    def open(cls, path: str, bands: list[int] | None = None) -> RasterSource:
        try:
            with rasterio.open(path) as ds:
                count, height, width = ds.count, ds.height, ds.width
                dtype = ds.dtypes[0]
                geometry = RasterGeometry(
                    crs_wkt=ds.crs.to_wkt() if ds.crs else None, transform=tuple(ds.transform.to_gdal())
                )
                image_bands = [i for i, c in enumerate(ds.colorinterp, start=1) if c != ColorInterp.alpha]
                masked = ds.nodata is not None or any(
                    MaskFlags.per_dataset in flags or MaskFlags.alpha in flags for flags in ds.mask_flag_enums
                )
                scales, offsets = ds.scales, ds.offsets
        except RasterioError as exc:
            raise InputError(f"{path}: cannot open raster: {_first_line(exc)}") from None
        if bands:
            bad = [b for b in bands if b > count]
            if bad:
                raise InputError(f"{path}: preprocess.bands {bad} out of range, the raster has {count} bands")
        chosen = tuple(bands or image_bands or range(1, count + 1))
        band_scales = tuple(float(scales[b - 1]) for b in chosen)
        band_offsets = tuple(float(offsets[b - 1]) for b in chosen)
        rescaled = any(s != 1.0 for s in band_scales) or any(o != 0.0 for o in band_offsets)
        return cls(
            path, chosen, height, width, dtype, geometry, masked,
            band_scales if rescaled else None, band_offsets if rescaled else None,
        )  # fmt: skip

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.bands), self.height, self.width)

    @property
    def geometry(self) -> RasterGeometry:
        return self.raster_geometry

    @property
    def has_invalid(self) -> bool:
        return self.masked

    def _dataset(self):
        return cached_handle(("raster", self.path, file_stamp(self.path)), lambda: rasterio.open(self.path))

    def read(self, region: Region) -> np.ndarray:
        (r0, r1), (c0, c1) = region
        try:
            data = self._dataset().read(indexes=list(self.bands), window=Window(c0, r0, c1 - c0, r1 - r0))
            if self.scales is None:
                return data
            shape = (-1, 1, 1)
            return data * np.float32(self.scales).reshape(shape) + np.float32(self.offsets).reshape(shape)
        except RasterioError as exc:
            detail = _first_line(exc)
        # raised outside the handler: GDAL's exception chain must not travel back to the client
        raise ReadError(f"{self.path}: read failed at rows {r0}:{r1}, cols {c0}:{c1}: {detail}")

    def read_valid(self, region: Region) -> np.ndarray | None:
        if not self.masked:
            return None
        (r0, r1), (c0, c1) = region
        try:
            return self._dataset().dataset_mask(window=Window(c0, r0, c1 - c0, r1 - r0)) > 0
        except RasterioError as exc:
            detail = _first_line(exc)
        raise ReadError(f"{self.path}: mask read failed at rows {r0}:{r1}, cols {c0}:{c1}: {detail}")


def _first_line(exc: BaseException) -> str:
    """GDAL's own words: the root of rasterio's exception chain, first line."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
