"""GeoTIFF / COG (any GDAL raster, local or remote) read by window with rasterio."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.windows import Window

from ..errors import InputError, ReadError
from ..geometry import RasterGeometry, Region
from . import ImageSource, cached_handle, file_stamp

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RasterSource(ImageSource):
    """Bands x rows x cols of a GDAL raster; ``bands`` are 1-based, in the order asked for."""

    path: str
    bands: tuple[int, ...]
    height: int
    width: int
    dtype: str
    raster_geometry: RasterGeometry

    @classmethod
    def open(cls, path: str, bands: list[int] | None = None) -> RasterSource:
        try:
            with rasterio.open(path) as ds:
                count, height, width = ds.count, ds.height, ds.width
                dtype = ds.dtypes[0]
                geometry = RasterGeometry(
                    crs_wkt=ds.crs.to_wkt() if ds.crs else None, transform=tuple(ds.transform.to_gdal())
                )
        except RasterioError as exc:
            raise InputError(f"{path}: cannot open raster: {_first_line(exc)}") from None
        if bands:
            bad = [b for b in bands if b > count]
            if bad:
                raise InputError(f"{path}: preprocess.bands {bad} out of range, the raster has {count} bands")
        return cls(path, tuple(bands or range(1, count + 1)), height, width, dtype, geometry)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.bands), self.height, self.width)

    @property
    def geometry(self) -> RasterGeometry:
        return self.raster_geometry

    def read(self, region: Region) -> np.ndarray:
        (r0, r1), (c0, c1) = region
        try:
            ds = cached_handle(("raster", self.path, file_stamp(self.path)), lambda: rasterio.open(self.path))
            return ds.read(indexes=list(self.bands), window=Window(c0, r0, c1 - c0, r1 - r0))
        except RasterioError as exc:
            detail = _first_line(exc)
        # raised outside the handler: GDAL's exception chain must not travel back to the client
        raise ReadError(f"{self.path}: read failed at rows {r0}:{r1}, cols {c0}:{c1}: {detail}")


def _first_line(exc: BaseException) -> str:
    """GDAL's own words: the root of rasterio's exception chain, first line."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
