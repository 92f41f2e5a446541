"""Cloud Optimized GeoTIFF output: labels (and probabilities) assembled from chunk pieces.

GDAL's COG driver only creates a file whole (``CreateCopy``), and several
processes must never write one GeoTIFF at once, so the work is split in two:

* workers write each output chunk as its own small tiled GeoTIFF piece
  (``ZSTD`` level 1: cheap to write, about the size of the final data) under a
  hidden parts folder beside the output; a piece is written under a temporary
  name and renamed, so a retried task never leaves half a piece;
* on commit (a task on a worker) a VRT mosaic of the pieces is written (with the georeferencing,
  nodata, colour table, class names and raster attribute table) and GDAL's COG
  driver translates it: it builds the overviews (``MODE`` for labels, so every
  overview pixel is a class or nodata; ``AVERAGE`` for probabilities) into a
  temporary overview file, then copies tiles and overviews into the final layout.
  GDAL streams block by block through its block cache (``GDAL_CACHEMAX``), so
  no process holds the raster.

The parts folder and the assembled COG live under hidden staged names
(``.tilemask-<run>-<name>``, :mod:`tilemask.outputs`) and the COG is renamed
onto its name when whole; :meth:`CogSink.abort` removes the parts folder and any
staged file.  Class names
go three ways: the ``TILEMASK_CLASSES`` dataset tag (JSON, what
:func:`tilemask.sources.labels.open_labels` reads), and in the ``.aux.xml``
sidecar the band's category names and a thematic raster attribute table
(``Value``, ``Class``, ``Red``, ``Green``, ``Blue``, ``Alpha``), which QGIS
(3.30+) turns into a legend with the class names.  See ``docs/outputs.md``.

On object storage (``s3://``) the pieces are objects under the hidden parts
prefix (each written in local scratch and uploaded whole); the commit task reads
them in place through GDAL (``/vsis3/``), assembles the COG in its scratch and
uploads it under its staged name, which is then copied onto the output's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar
from xml.etree import ElementTree
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import rasterio
import rasterio.shutil
from rasterio._err import CPLE_BaseError  # what GDAL raises through rasterio.shutil.copy, not a RasterioError
from rasterio.enums import Interleaving
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from ..classes import BACKGROUND, CLASSES_TAG, class_colours, class_name, probability_class
from ..errors import OutputError
from ..formats import for_path
from ..geometry import RasterGeometry, Region
from ..imports import ignoring_warnings
from ..outputs import atomic_path, describe_write_error, exists, publish, remove, staged_path
from ..sources.raster import gdal_env
from ..storage import gdal_path, is_remote, names, scratch, upload
from . import LabelSink, OutputLayout

logger = logging.getLogger(__name__)

BLOCKSIZE = 512
PIECE_OPTIONS = {"tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "zstd", "zstd_level": 1}
GDAL_OPTIONS = {
    "GDAL_CACHEMAX": 256 << 20,  # bytes, as rasterio passes it on
    "GDAL_NUM_THREADS": "ALL_CPUS",
    # the .aux.xml sidecar (category names, raster attribute table) is GDAL's PAM: written where the environment
    # turns PAM off too (GDAL_PAM_ENABLED=NO, as set where COGs are served: the COG went without it, without a word)
    "GDAL_PAM_ENABLED": "YES",
}


def _overview_options(options: dict, dtype: str) -> dict:
    """GDAL's configuration of the overviews as the COG's ``options`` make the full resolution of ``dtype``: the COG
    driver derives them from its creation options only where the environment sets none (``COMPRESS_OVERVIEW=DEFLATE``,
    ``GDAL_TIFF_OVR_BLOCKSIZE=128`` there made the overviews deflate in 128 px tiles, docs/outputs.md's ZSTD
    in 512 px tiles; ``PREDICTOR_OVERVIEW=3`` failed the labels COG, "Floating point Predictor not supported with 1
    data format"; ``INTERLEAVE_OVERVIEW=BAND`` interleaved the probabilities' overviews by band).  The predictor of
    integers is the one ``PREDICTOR=YES`` picks for them (2), 1 (none) without it; that of floats is not set:
    ``PREDICTOR_OVERVIEW=3`` fails a float32 probabilities COG as it fails the labels (its 8-bit mask's overviews,
    which the COG driver's own choice spares)."""
    pinned = {
        "COMPRESS_OVERVIEW": options["COMPRESS"],
        "ZSTD_LEVEL_OVERVIEW": str(options["LEVEL"]),
        "GDAL_TIFF_OVR_BLOCKSIZE": str(options["BLOCKSIZE"]),
        "INTERLEAVE_OVERVIEW": "PIXEL",  # the COG driver's INTERLEAVE, which tilemask leaves as it is
    }
    if np.dtype(dtype).kind != "f":
        pinned["PREDICTOR_OVERVIEW"] = "2" if options.get("PREDICTOR") == "YES" else "1"
    return pinned


# GDAL_NUM_THREADS made GDAL 3.10 read a VRT of more than a few pieces on threads of its own, which do not see the
# settings rasterio.Env gives a thread other than the main one (a Dask worker's): pieces on S3 were asked of AWS,
# not of the endpoint the AWS variables name ("cannot assemble the COG: Unknown GDAL Error", a review's).  The
# pieces are then read on the assembling thread; the COG's compression still runs on all cores.
PIECES_ON_OBJECT_STORAGE = {"VRT_NUM_THREADS": "1"}

GDAL_TYPES = {"uint8": "Byte", "uint16": "UInt16", "uint32": "UInt32", "float32": "Float32"}


@dataclass(frozen=True)
class CogRaster:
    """One COG being assembled: its final path, its pieces folder and its band layout."""

    path: str
    parts: str  # folder of the chunk pieces
    bands: int
    dtype: str
    kind: str  # "labels" | "probabilities"
    run_id: str

    @property
    def partial(self) -> str:
        return staged_path(self.path, self.run_id)

    @property
    def assembled(self) -> str:
        """Where GDAL writes the COG: the partial itself, or for object storage a file in local scratch."""
        return str(scratch("tilemask-staged") / os.path.basename(self.partial)) if is_remote(self.path) else self.partial

    def piece(self, region: Region) -> str:
        (r0, _), (c0, _) = region
        return os.path.join(self.parts, f"{r0}_{c0}.tif")

    def write_piece(self, region: Region, values: np.ndarray) -> None:
        """Write one chunk (``(bands, h, w)``) as a tiled GeoTIFF; atomic by rename."""
        height, width = values.shape[-2:]
        profile = dict(driver="GTiff", width=width, height=height, count=self.bands, dtype=self.dtype)
        if height >= 256 and width >= 256:
            profile.update(PIECE_OPTIONS)
        else:
            profile.update(compress="zstd", zstd_level=1)
        with atomic_path(self.piece(region)) as staged:
            with ignoring_warnings(NotGeoreferencedWarning):  # a piece is placed by the VRT; rasterio warns as it opens
                dst = rasterio.open(staged, "w", **profile)
            with dst:
                dst.write(values.reshape(self.bands, height, width))

    def publish(self) -> None:
        """Rename the assembled COG into place, its ``.aux.xml`` sidecar first."""
        sidecar = self.partial + ".aux.xml"
        if exists(sidecar):
            publish(sidecar, self.path + ".aux.xml")
        else:
            remove(self.path + ".aux.xml")  # a stale sidecar of an older output
        publish(self.partial, self.path)
        logger.info("wrote %s", self.path)

    def abort(self) -> None:
        """Remove the partial COG and what GDAL writes beside it (``.aux.xml``, ``.ovr.tmp``)."""
        for suffix in ("", ".aux.xml", ".ovr.tmp", ".msk"):
            remove(self.partial + suffix)
            if self.assembled != self.partial:
                remove(self.assembled + suffix)


def written_short(path: str) -> str | None:
    """What is missing from a COG GDAL has just written, or None when it is whole: every block of the image and
    of its overviews ends within the file, and its ``.aux.xml`` sidecar, if any, parses. GDAL's COG driver can
    return from a copy onto a full disk with no error and the file cut short (a first-contact review: the run
    exited 0 and published a COG that did not read)."""
    size, end = os.path.getsize(path), 0
    with rasterio.open(path) as ds:
        levels = [None, *range(len(ds.overviews(1)))]
        bands = [1] if ds.interleaving == Interleaving.pixel else list(ds.indexes)
    for level in levels:
        with rasterio.open(path, overview_level=level) as ds:
            for band in bands:
                for (y, x), _ in ds.block_windows(band):
                    offset = ds.get_tag_item(f"BLOCK_OFFSET_{x}_{y}", "TIFF", bidx=band)
                    if offset:
                        length = ds.get_tag_item(f"BLOCK_SIZE_{x}_{y}", "TIFF", bidx=band)
                        end = max(end, int(offset) + int(length or 0))
    if end > size:
        return f"{path} is {size} bytes, its blocks end at byte {end}"
    if os.path.exists(path + ".aux.xml"):
        try:
            ElementTree.parse(path + ".aux.xml")
        except ElementTree.ParseError as exc:
            return f"{path}.aux.xml does not parse: {exc}"
    return None


@dataclass(frozen=True)
class CogSink(LabelSink):
    """Labels as a COG at ``path``; probabilities, if asked, in ``<stem>_probabilities.tif``."""

    path: str
    layout: OutputLayout
    resumable: ClassVar[bool] = True

    @property
    def parts(self) -> str:
        return staged_path(self.path, self.layout.run_id) + ".parts"

    @property
    def rasters(self) -> tuple[CogRaster, CogRaster | None]:
        layout = self.layout
        run = layout.run_id
        labels = CogRaster(self.path, os.path.join(self.parts, "labels"), 1, layout.labels_dtype, "labels", run)
        if not layout.writes_probabilities:
            return labels, None
        probabilities = CogRaster(
            for_path(self.path).probabilities_path(self.path),
            os.path.join(self.parts, "probabilities"),
            layout.probability_channels,
            layout.probabilities_dtype,
            "probabilities",
            run,
        )
        return labels, probabilities

    # -- create (client), commit (a worker task), abort (client) ------------------------------------

    def create(self) -> None:
        layout = self.layout
        if len(layout.shape) != 2 or not isinstance(layout.geometry, RasterGeometry):
            raise OutputError(f"{self.path}: a COG holds a 2D raster, this output is {len(layout.shape)}D")
        if layout.labels_dtype not in GDAL_TYPES:
            raise OutputError(f"{self.path}: cannot store {layout.labels_dtype} labels in a COG")
        try:
            for raster in self.rasters:
                if raster is not None and not is_remote(raster.parts):  # (object storage has no folders)
                    os.makedirs(raster.parts, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot create the output folder: {exc.strerror}") from None

    def finish(self) -> None:
        """Assemble every COG under its staged name."""
        for raster in self.rasters:
            if raster is not None:
                vrt = os.path.join(self.parts, f"{raster.kind}.vrt")
                if is_remote(vrt):
                    vrt = str(scratch("tilemask-staged") / f"{os.path.basename(raster.partial)}.vrt")
                Path(vrt).write_text(self._vrt(raster), encoding="utf-8")  # as GDAL reads it, whatever the locale
                try:  # a raster 1 pixel wide has overviews 1 pixel wide too: a decimation of 1, not a valid COG
                    self._translate(raster, vrt, overviews=self.layout.shape[1] > 1)
                finally:
                    if is_remote(raster.path):
                        remove(vrt)

    def publish(self) -> list[str]:
        """Rename them all into place, then drop the pieces."""
        rasters = [r for r in self.rasters if r is not None]
        replaced = exists(self.path)
        for raster in rasters:
            raster.publish()
        self.remove_stale_probabilities(replaced)
        remove(self.parts)
        return [raster.path for raster in rasters]

    def abort(self) -> None:
        remove(self.parts)
        for raster in self.rasters:
            if raster is not None:
                raster.abort()

    def reopen(self) -> bool:
        return not is_remote(self.path) and all(os.path.isdir(r.parts) for r in self.rasters if r is not None)

    # -- worker side ------------------------------------------------------------------------------

    def write(self, region: Region, labels: np.ndarray, probabilities: np.ndarray | None) -> None:
        label_raster, probability_raster = self.rasters
        label_raster.write_piece(region, labels)
        if probability_raster is not None and probabilities is not None:
            probability_raster.write_piece(region, probabilities)

    # -- assembly ---------------------------------------------------------------------------------

    def _regions(self) -> list[Region]:
        (height, width), (ch, cw) = self.layout.shape, self.layout.chunks
        return [
            ((r, min(r + ch, height)), (c, min(c + cw, width)))
            for r in range(0, height, ch)
            for c in range(0, width, cw)
        ]

    def _vrt(self, raster: CogRaster) -> str:
        """A VRT mosaic of the pieces, carrying georeferencing, nodata and class metadata."""
        layout, geometry = self.layout, self.layout.geometry
        regions = self._regions()
        if is_remote(raster.parts):  # pieces read in place by GDAL; listed once
            written = set(names(raster.parts))
            missing = [r for r in regions if os.path.basename(raster.piece(r)) not in written]
        else:
            missing = [r for r in regions if not os.path.exists(raster.piece(r))]
        if missing:
            raise OutputError(f"{raster.path}: {len(missing)} chunks were never written (first at {missing[0]})")
        gdal_type = GDAL_TYPES[raster.dtype]
        lines = [f'<VRTDataset rasterXSize="{layout.shape[1]}" rasterYSize="{layout.shape[0]}">']
        if geometry.crs_wkt:
            lines.append(f'  <SRS dataAxisToSRSAxisMapping="1,2">{escape(geometry.crs_wkt)}</SRS>')
        lines.append(f"  <GeoTransform>{', '.join(repr(float(v)) for v in geometry.transform)}</GeoTransform>")
        lines.append("  <Metadata>")
        lines.append(f"    <MDI key={quoteattr(CLASSES_TAG)}>{escape(json.dumps(list(layout.class_names)))}</MDI>")
        lines.append("  </Metadata>")
        for band in range(1, raster.bands + 1):
            lines.append(f'  <VRTRasterBand dataType="{gdal_type}" band="{band}">')
            if raster.kind == "labels":
                lines.extend(self._label_band_metadata(raster.dtype))
            else:
                name = class_name(layout.class_names, probability_class(layout.class_names, raster.bands, band - 1))
                lines.append(f"    <Description>{escape(name)}</Description>")
                if raster.dtype == "uint8":  # round(p * 255): QGIS and GDAL's unscaling read 0-1
                    lines.append(f"    <Scale>{1 / 255!r}</Scale>")
            lines.extend(self._sources(raster, band, regions))
            lines.append("  </VRTRasterBand>")
        if raster.kind == "probabilities" and layout.nodata is not None:
            # the labels' nodata as the file's mask: readers see those pixels as invalid, and the AVERAGE
            # overviews leave them out instead of averaging in their zeros
            labels = self.rasters[0]
            lookup = f"0:255,{layout.nodata - 1}:255,{layout.nodata}:0"  # nodata is the dtype's largest value
            lines.append('  <MaskBand><VRTRasterBand dataType="Byte">')
            lines.extend(self._sources(labels, 1, regions, lookup=lookup))
            lines.append("  </VRTRasterBand></MaskBand>")
        lines.append("</VRTDataset>")
        return "\n".join(lines) + "\n"

    def _sources(self, raster: CogRaster, band: int, regions: list[Region], lookup: str | None = None) -> list[str]:
        """A VRT band's sources: ``band`` of each piece of ``raster`` in its place; through a lookup table
        (GDAL's ``<LUT>``: ``value:output`` pairs) when given."""
        gdal_type = GDAL_TYPES[raster.dtype]
        element = "ComplexSource" if lookup else "SimpleSource"
        lines = []
        for region in regions:
            (r0, r1), (c0, c1) = region
            if is_remote(raster.parts):
                name, relative = gdal_path(raster.piece(region)), 0
            else:
                name, relative = os.path.relpath(raster.piece(region), self.parts), 1
            lines.append(
                f"    <{element}>"
                f'<SourceFilename relativeToVRT="{relative}">{escape(name)}</SourceFilename>'
                f"<SourceBand>{band}</SourceBand>"
                f'<SourceProperties RasterXSize="{c1 - c0}" RasterYSize="{r1 - r0}" DataType="{gdal_type}"'
                f' BlockXSize="{min(256, c1 - c0)}" BlockYSize="{min(256, r1 - r0)}"/>'
                f'<SrcRect xOff="0" yOff="0" xSize="{c1 - c0}" ySize="{r1 - r0}"/>'
                f'<DstRect xOff="{c0}" yOff="{r0}" xSize="{c1 - c0}" ySize="{r1 - r0}"/>'
                + (f"<LUT>{lookup}</LUT>" if lookup else "")
                + f"</{element}>"
            )
        return lines

    def _label_band_metadata(self, dtype: str) -> list[str]:
        """Nodata, colour table, category names and raster attribute table of the labels band."""
        layout = self.layout
        names = layout.class_names
        colours = class_colours(len(names))
        lines = ["    <Description>labels</Description>"]
        if layout.nodata is not None:
            lines.append(f"    <NoDataValue>{int(layout.nodata)}</NoDataValue>")
        if dtype in ("uint8", "uint16"):  # TIFF palettes exist for these two types only
            size = max(len(names), (layout.nodata or 0) + 1)
            lines.append("    <ColorInterp>Palette</ColorInterp>")
            lines.append("    <ColorTable>")
            for value in range(size):
                r, g, b, a = colours.get(value, BACKGROUND)
                lines.append(f'      <Entry c1="{r}" c2="{g}" c3="{b}" c4="{a}"/>')
            lines.append("    </ColorTable>")
        lines.append("    <CategoryNames>")
        lines.extend(f"      <Category>{escape(name)}</Category>" for name in names)
        lines.append("    </CategoryNames>")
        # GDAL RAT field types: 0 integer, 2 string; usages: 5 MinMax (the value), 2 Name, 6-9 R, G, B, A.
        fields = (("Value", 0, 5), ("Class", 2, 2), ("Red", 0, 6), ("Green", 0, 7), ("Blue", 0, 8), ("Alpha", 0, 9))
        lines.append('    <GDALRasterAttributeTable tableType="thematic">')
        for index, (field, kind, usage) in enumerate(fields):
            lines.append(
                f'      <FieldDefn index="{index}"><Name>{field}</Name>'
                f"<Type>{kind}</Type><Usage>{usage}</Usage></FieldDefn>"
            )
        for value, name in enumerate(names):
            cells = (value, escape(name), *colours[value])
            lines.append(f'      <Row index="{value}">' + "".join(f"<F>{c}</F>" for c in cells) + "</Row>")
        lines.append("    </GDALRasterAttributeTable>")
        return lines

    def _translate(self, raster: CogRaster, vrt: str, overviews: bool = True) -> None:
        """VRT -> COG under the partial name."""
        options = {
            "BLOCKSIZE": BLOCKSIZE,
            "COMPRESS": "ZSTD",
            "LEVEL": 9 if raster.kind == "labels" else 6,
            "BIGTIFF": "IF_SAFER",
            "NUM_THREADS": "ALL_CPUS",
            "OVERVIEW_RESAMPLING": "MODE" if raster.kind == "labels" else "AVERAGE",
            "STATISTICS": "NO",
        }
        if raster.kind == "probabilities":
            options["PREDICTOR"] = "YES"
        if not overviews:
            options["OVERVIEWS"] = "NONE"
        raster.abort()
        room = None
        try:
            remote = PIECES_ON_OBJECT_STORAGE if is_remote(raster.parts) else {}
            with gdal_env(), rasterio.Env(**GDAL_OPTIONS, **_overview_options(options, raster.dtype), **remote):
                with rasterio.open(vrt) as pieces:  # the room it had, to name a full disk GDAL's cleanup hid
                    uncompressed = pieces.width * pieces.height * raster.bands * np.dtype(raster.dtype).itemsize
                room = (shutil.disk_usage(os.path.dirname(raster.assembled)).free, uncompressed)
                rasterio.shutil.copy(vrt, raster.assembled, driver="COG", **options)
                short = written_short(raster.assembled)
        except (RasterioError, CPLE_BaseError, OSError, SystemError) as exc:  # SystemError: "Unknown GDAL Error"
            detail = describe_write_error(exc, raster.assembled, room)  # before the partial goes: a full disk is seen
            raster.abort()
            raise OutputError(f"{raster.path}: cannot assemble the COG: {detail}") from None
        if short:
            detail = describe_write_error(OSError(short), raster.assembled)
            raster.abort()
            raise OutputError(f"{raster.path}: cannot assemble the COG: {detail}")
        if raster.assembled != raster.partial:  # uploaded whole under the staged name, the sidecar first
            try:
                for suffix in (".aux.xml", ""):
                    if os.path.exists(raster.assembled + suffix):
                        upload(raster.assembled + suffix, raster.partial + suffix)
                        remove(raster.assembled + suffix)
            except BaseException:  # the store's own one line (OutputError) goes up as it is
                raster.abort()
                raise

