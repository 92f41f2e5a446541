"""The one place that decides a file's format: readers, writer and conventions per format.

:func:`for_path` picks the format of a path by its suffix (as zarr-python and
rio-tiler pick a store or reader); everything else asks the format:

* ``open_source`` (an input image, read by region), ``open_labels`` (a finished
  label output, or any integer label image), ``make_sink`` (the writer);
* conventions: which files make up an output (labels and the probabilities
  beside them), whether what sits at a path was written by tilemask, whether it
  is complete, and the stem of a file name.

Adding a format is one :class:`Format` subclass here (its reader and writer in
``sources/`` and ``sinks/``) and one entry in :data:`FORMATS`; the conformance
suite in ``tests/test_formats.py`` runs over every writable format.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .classes import CLASSES_TAG

logger = logging.getLogger(__name__)

NIFTI_DESCRIP = b"tilemask labels"  # NIfTI header descrip of the label files tilemask writes
NIFTI_NODATA = b"; nodata "  # then, in a label file with invalid voxels, their label: "tilemask labels; nodata 255"
NIFTI_PROBABILITIES_DESCRIP = b"tilemask probabilities"  # of the probabilities beside them (since 2026-12-07)
NIFTI_MARKS = (NIFTI_DESCRIP, NIFTI_PROBABILITIES_DESCRIP)  # what a NIfTI tilemask wrote starts its descrip with


def nifti_probabilities_descrip(dtype: str) -> bytes:
    """The ``descrip`` of the probabilities tilemask writes beside NIfTI labels: what marks them as tilemask's,
    and how uint8 ones are stored (their ``scl_slope`` 1/255 gives p again)."""
    return NIFTI_PROBABILITIES_DESCRIP + (b"; round(p * 255)" if dtype == "uint8" else b"")


def nifti_descrip(nodata: int | None) -> bytes:
    """The ``descrip`` of a NIfTI tilemask writes: what marks it as tilemask's, and the label of invalid voxels
    (NIfTI has no field of its own for it), which :func:`nifti_nodata` reads back."""
    return NIFTI_DESCRIP + (b"" if nodata is None else NIFTI_NODATA + str(nodata).encode())


def nifti_nodata(descrip: bytes) -> int | None:
    """The label of invalid voxels a tilemask NIfTI records in its header's ``descrip`` (NIfTI has no field of its
    own for it), else None."""
    text = bytes(descrip).rstrip(b"\0")
    if not text.startswith(NIFTI_DESCRIP + NIFTI_NODATA):
        return None
    value = text[len(NIFTI_DESCRIP + NIFTI_NODATA):]
    return int(value) if value.isdigit() else None


NIFTI_UNITS_IN_MM = {1: 1000.0, 2: 1.0, 3: 1e-3}  # xyzt_units' spatial code: metre, mm, micron


def nifti_affine_mm(img) -> tuple[tuple[float, ...], ...]:
    """A nibabel image's voxel-to-RAS affine as MONAI's ``NibabelReader`` reads it (:func:`_monai_affine`), in
    mm: the header's spatial unit applied, as SimpleITK applies it (nibabel and MONAI leave it; no unit, or a code
    that is not a length, counts as mm)."""
    factor = NIFTI_UNITS_IN_MM.get(int(img.header["xyzt_units"]) & 0x07, 1.0)
    rows = [[float(v) * (factor if r < 3 else 1.0) for v in row] for r, row in enumerate(_monai_affine(img))]
    return tuple(tuple(row) for row in rows)


def _monai_affine(img):
    """nibabel's affine (the sform, else the qform, else the zooms), but the qform where the sform is set and its
    voxel sizes disagree with the header's pixdim while the qform's agree: MONAI's
    ``correct_nifti_header_if_necessary`` (``rectify_header_sform_qform``), which its ``NibabelReader`` applies
    to every file, and which is the only one of its rules that moves the affine (tilemask does not import MONAI
    to read a header). A reviewer's file of that kind gave 51% of MONAI's labels."""
    import numpy as np

    header = img.header
    dim = int(header["dim"][0])
    if dim >= 5 or not hasattr(img, "get_sform") or int(header["sform_code"]) == 0:
        return img.affine

    def spacing(affine):  # MONAI's affine_to_spacing(affine, r=dim): zero columns count as 1
        norms = np.sqrt(np.sum(np.asarray(affine, float)[:dim, :dim] ** 2, axis=0))
        return np.where(norms == 0, 1.0, norms)

    pixdim = np.asarray(header.get_zooms())[:dim]
    if np.allclose(pixdim, spacing(img.affine)):  # the sform (its code is set) agrees with the pixdim
        return img.affine
    qform = img.get_qform()
    return qform if np.allclose(spacing(qform), pixdim) else img.affine


CLASS_TABLE_SUFFIX = ".colors.csv"  # the class names beside NIfTI labels (3D Slicer's colour table CSV)


WEB_PREFIXES = ("http://", "https://", "/vsicurl/")
"""Paths that are URLs: their name ends before the query, and is percent-encoded."""


def _addressed(path: str) -> str:
    """``path``, a URL's without its query and fragment (``x.tif?name=a.mha`` is a GeoTIFF)."""
    return re.split(r"[?#]", path, maxsplit=1)[0] if path.startswith(WEB_PREFIXES) else path


class Format:
    name: str = ""
    suffixes: tuple[str, ...] = ()
    spatial_dims: tuple[int, ...] = (2, 3)  # ranks it can write
    writable: bool = True
    gdal_raster: bool = False  # read with rasterio: bands, overviews, GDAL's dataset mask
    zarr_store: bool = False  # a Zarr group: a folder of chunk files, probabilities inside it

    def matches(self, path: str) -> bool:
        return _addressed(path).lower().rstrip("/").endswith(self.suffixes)

    def stem(self, path: str) -> str:
        if path.startswith(WEB_PREFIXES):
            path = path.split("?", 1)[0]  # a URL's query (a signature) is not its name; a file's "?" is
        name = os.path.basename(path.rstrip("/"))
        for suffix in self.suffixes:
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return name.rsplit(".", 1)[0] if "." in name else name

    def suffix(self, path: str) -> str:
        name = path.rstrip("/")
        return next((name[-len(s):] for s in self.suffixes if name.lower().endswith(s)), "")

    # -- readers and writer -----------------------------------------------------------------------

    def open_source(self, path: str, spatial_dims: int, bands: list[int] | None):
        raise NotImplementedError

    def open_labels(self, path: str, chunks):
        raise NotImplementedError

    def make_sink(self, path: str, layout):
        raise NotImplementedError

    # -- conventions ------------------------------------------------------------------------------

    def probabilities_path(self, path: str) -> str | None:
        """Where the probabilities of output ``path`` go (None: inside the output itself)."""
        return None

    def check_input(self, output: str, source) -> None:
        """Refuse (exit 2, when planning) an input this output cannot be written for."""

    def class_name_problem(self, name: str) -> str | None:
        """Why this format cannot hold ``name`` as a class's name, or None."""
        return None

    def classes_problem(self, n_classes: int) -> str | None:
        """Why this format cannot hold ``n_classes`` classes (background included), or None."""
        return None

    def files(self, path: str, probabilities: bool) -> list[str]:
        """The paths one output is made of."""
        extra = self.probabilities_path(path) if probabilities else None
        return [path.rstrip("/")] + ([extra] if extra else [])

    def written_by_tilemask(self, path: str) -> bool:
        """Whether what exists at ``path`` is a tilemask output of this format."""
        return False

    def is_complete(self, path: str) -> bool:
        """Whether a tilemask output at ``path`` was finished (files are renamed into place only when whole)."""
        return True

    def require_complete(self, path: str) -> None:
        """Refuse an output a run did not finish (what readers of tilemask outputs call first)."""
        if not self.is_complete(path):
            from .errors import InputError

            raise InputError(f"{path}: an unfinished tilemask output (complete: false); run the workflow again")


class ZarrFormat(Format):
    name = "zarr"
    suffixes = (".zarr",)
    zarr_store = True

    def open_source(self, path, spatial_dims, bands):
        from .sources.zarr import ZarrSource

        return ZarrSource.open(path, spatial_dims)

    def open_labels(self, path, chunks):
        from .sources.labels import open_zarr_labels

        return open_zarr_labels(path, chunks)

    def make_sink(self, path, layout):
        from .sinks.zarr import ZarrSink

        return ZarrSink(path.rstrip("/"), layout)

    def _tilemask_attrs(self, path: str) -> dict | None:
        from .sources.zarr import open_zarr

        try:
            node = open_zarr(path)
        except Exception:
            return None
        meta = dict(node.attrs).get("tilemask")
        return meta if isinstance(meta, dict) else None

    def written_by_tilemask(self, path):
        return self._tilemask_attrs(path) is not None

    def probabilities_key(self, group) -> str | None:
        """Where in the output's group the probabilities are (None: not written)."""
        return "probabilities" if "probabilities" in group else None

    def labels_key(self, group) -> str:
        """Where in the output's group the labels are."""
        return "labels"

    def is_complete(self, path):
        meta = self._tilemask_attrs(path)
        return meta is None or meta.get("complete", True) is True

    def require_complete(self, path, labels: str | None = None):
        """Also refuse an output whose labels (their level at key ``labels``, else its labels' key) lack chunks it
        stored (``every_chunk_stored``, since 2026-12-07: :func:`tilemask.sinks.storing_every_chunk`); they read as
        background, and ``stats`` counted them so."""
        super().require_complete(path)
        if not (self._tilemask_attrs(path) or {}).get("every_chunk_stored"):
            return
        from .errors import InputError
        from .sources.zarr import open_zarr
        from .storage import WEB

        if str(path).startswith(WEB):  # a web server need not list a folder (a 404): fsspec then finds no chunk
            return
        key = labels or self.labels_key(open_zarr(path, "group"))
        array = open_zarr(f"{path.rstrip('/')}/{key}", "array")
        stored, chunks = _stored_chunks(path, key, array), array.nchunks
        if stored < chunks:
            raise InputError(f"{path}: {chunks - stored} of the {chunks} chunks of its labels ({key}) are missing; a "
                             "copy cut short? Copy the output again, or run the workflow again")  # fmt: skip


def _stored_chunks(path: str, key: str, array) -> int:
    """How many chunks of the Zarr ``array`` at ``key`` in the store ``path`` are stored: in a local store of zarr 3's
    default chunk keys (``c/0/1``), the files under its ``c`` folder (7 ms for 16,384 chunks, where zarr's count,
    through its async listing, took 1.6 s); else zarr's count."""
    from .storage import is_remote

    encoding = getattr(array.metadata, "chunk_key_encoding", None)
    if is_remote(path) or getattr(encoding, "name", None) != "default" or getattr(encoding, "separator", None) != "/":
        return array.nchunks_initialized
    return sum(len(files) for _, _, files in os.walk(os.path.join(path, key, "c")))


class OmeZarrFormat(ZarrFormat):
    """OME-Zarr (NGFF 0.5): labels as a multiscale label image under ``labels/labels``, probabilities as the
    image; as an input, the first level of the image's multiscale with its scale."""

    name = "ome-zarr"
    suffixes = (".ome.zarr",)

    def open_source(self, path, spatial_dims, bands):
        from .sources.zarr import ZarrSource

        return ZarrSource.open_ome(path, spatial_dims)

    def open_labels(self, path, chunks):
        from .sources.labels import open_omezarr_labels

        return open_omezarr_labels(path, chunks)

    def probabilities_key(self, group):
        from .sources.zarr import ome_multiscales

        image = (ome_multiscales(dict(group.attrs)) or [{}])[0]
        return image["datasets"][0]["path"] if image.get("name") == "probabilities" else None

    def labels_key(self, group):
        from .sources.labels import omezarr_labels_key

        return omezarr_labels_key(group)

    def make_sink(self, path, layout):
        from .sinks.omezarr import OmeZarrSink

        return OmeZarrSink(path.rstrip("/"), layout)


class NiftiFormat(Format):
    name = "nifti"
    suffixes = (".nii.gz", ".nii")
    spatial_dims = (3,)

    def open_source(self, path, spatial_dims, bands):
        from .sources.nifti import NiftiSource

        return NiftiSource.open(path, bands)

    def open_labels(self, path, chunks):
        from .sources.labels import open_nifti_labels

        return open_nifti_labels(path, chunks)

    def make_sink(self, path, layout):
        from .sinks.nifti import NiftiSink

        return NiftiSink(path, layout)

    def probabilities_path(self, path):
        return str(Path(path).with_name(f"{self.stem(path)}_probabilities.nii.gz"))

    def class_table_path(self, path: str) -> str:
        """The class names and colours beside the labels: a 3D Slicer colour table (NIfTI has no place for them)."""
        return str(Path(path).with_name(f"{self.stem(path)}{CLASS_TABLE_SUFFIX}"))

    def files(self, path, probabilities):
        return super().files(path, probabilities) + [self.class_table_path(path)]

    def written_by_tilemask(self, path):
        import nibabel as nib

        try:
            return bytes(nib.load(path).header["descrip"]).rstrip(b"\0").startswith(NIFTI_MARKS)
        except Exception:
            return False


class GeoTiffFormat(Format):
    """Cloud Optimized GeoTIFF outputs; as an input, any raster GDAL opens (the fallback format)."""

    name = "cog"
    suffixes = (".tif", ".tiff")
    spatial_dims = (2,)
    gdal_raster = True

    def open_source(self, path, spatial_dims, bands):
        from .sources.raster import RasterSource

        return RasterSource.open(path, bands)

    def open_labels(self, path, chunks):
        from .sources.labels import open_raster_labels

        return open_raster_labels(path, chunks)

    def make_sink(self, path, layout):
        from .sinks.cog import CogSink

        return CogSink(path, layout)

    def check_input(self, output, source):
        from .errors import InputError
        from .geometry import RasterGeometry

        if not isinstance(source.geometry, RasterGeometry):  # a 2D Zarr with an affine: a slice of a volume
            raise InputError(f"{source.path}: output.path {output}: a COG holds a georeferenced 2D raster, and this "
                             "input is placed by a volume's affine; write .zarr or .ome.zarr")  # fmt: skip

    def probabilities_path(self, path):
        folder, slash, _ = path.rpartition("/")
        return f"{folder}{slash}{self.stem(path)}_probabilities{self.suffix(path) or '.tif'}"

    def written_by_tilemask(self, path):
        import rasterio
        from rasterio.errors import RasterioError

        from .sources.raster import gdal_env

        try:
            with gdal_env(path), rasterio.open(path) as ds:
                return self.dataset_written_by_tilemask(ds)
        except (RasterioError, OSError):
            return False

    @staticmethod
    def dataset_written_by_tilemask(ds) -> bool:
        """Whether an open rasterio dataset is a tilemask output (its class names tag)."""
        return CLASSES_TAG in ds.tags()


class DicomSeriesFormat(Format):
    """A folder holding one DICOM series of single-frame slices: an input volume (read only)."""

    name = "dicom"
    suffixes = ()
    spatial_dims = (3,)
    writable = False

    UID = r"[0-9]+(\.[0-9]+)+"  # a DICOM UID: numbers and dots (1.2.840...)
    WADO_RS = re.compile(rf"/studies/{UID}(/series/{UID}(/instances/{UID}(/frames/[0-9,]+)?)?)?"
                         r"(/metadata|/rendered|/thumbnail)?/?$")  # fmt: skip
    QIDO_RS = re.compile(rf"(/studies(/{UID}(/series(/{UID}/instances)?|/instances))?|/series|/instances)/?$")
    # the studies, a study's series or instances, a series' instances; and PS3.18's all series, all instances
    WADO_URI = re.compile(r"[?&]requestType=WADO(&|$)", re.IGNORECASE)  # a slice: /wado?requestType=WADO&studyUID=

    def matches(self, path):
        from .sources.dicom import is_dicom_file, is_dicom_folder

        if path.startswith(WEB_PREFIXES):  # a DICOMweb study, series or instance: refused by name (a search of them
            return self._dicomweb(path) is not None  # and a WADO-URI slice fell through to GDAL: "response code: 404")
        if path.startswith(("s3://", "/vsi")):
            return False
        return is_dicom_folder(path) or is_dicom_file(path)  # one slice: refused with a hint, not as a raster

    def _dicomweb(self, url: str) -> str | None:
        """What the DICOMweb address ``url`` is (its query and fragment aside), None for another URL."""
        addressed = _addressed(url)
        query = re.split(r"#", url[len(addressed):], maxsplit=1)[0]
        if self.WADO_URI.search(query):
            return "(WADO-URI) slice"
        if self.QIDO_RS.search(addressed):
            return "(QIDO-RS) search"
        return "(WADO-RS) study or series" if self.WADO_RS.search(addressed) else None

    def stem(self, path):
        return os.path.basename(path.rstrip("/"))  # series folders are often UIDs: "1.2.840..." keeps its dots

    def open_source(self, path, spatial_dims, bands):
        from .errors import InputError
        from .sources.dicom import DicomSeriesSource, single_file_problem, volume_problem

        if path.startswith(WEB_PREFIXES):  # GDAL's "HTTP response code: 404" named none of it
            raise InputError(f"{path}: a DICOMweb {self._dicomweb(path)}, which tilemask does not read; retrieve the "
                             "series into a folder (dicomweb-client's retrieve_series) and give the folder")
        if not os.path.isdir(path):
            raise InputError(single_file_problem(path, spatial_dims))
        if spatial_dims != 3:  # a slice too is a volume: a slab of one
            raise InputError(volume_problem(path, "series"))
        return DicomSeriesSource.open(path)

    def open_labels(self, path, chunks):
        from .errors import InputError

        raise InputError(f"{path}: cannot open as a label image: a DICOM scan; give its labels as tilemask run writes "
                         "them (.nii.gz, .zarr)")  # fmt: skip


class DicomSegFormat(Format):
    """A DICOM Segmentation (highdicom) of a DICOM series input: written, not read back as labels here."""

    name = "dicom-seg"
    suffixes = (".dcm",)
    spatial_dims = (3,)

    def make_sink(self, path, layout):
        from .sinks.dicomseg import DicomSegSink

        return DicomSegSink(path, layout)

    def open_source(self, path, spatial_dims, bands):
        from .errors import InputError
        from .sources.dicom import single_file_problem

        raise InputError(single_file_problem(path, spatial_dims))

    def check_input(self, output, source):
        from .errors import InputError
        from .sources.dicom import DicomSeriesSource
        from .sources.stack import StackedSource

        if isinstance(source, StackedSource):  # a case read channel by channel: it refers to the first's slices
            source = source.sources[0]
        if not isinstance(source, DicomSeriesSource):
            raise InputError(f"{output}: a DICOM Segmentation refers to the slices of a DICOM series; {source.path} is not one")
        import pydicom

        from .sinks.dicomseg import CONVERTED, REQUIRED, refused_values

        first = None  # the first slice: the SEG copies its patient and study, and its study and frame of reference
        for path in source.files:  # headers only: each slice is referred to by its own UIDs
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[*REQUIRED, *CONVERTED])
            missing = [keyword for keyword in REQUIRED if not header.get(keyword)]
            if missing:
                raise InputError(f"{path}: no {' or '.join(missing)}, which a DICOM Segmentation must copy")
            if first is None:
                first = header
                for keyword, why in refused_values(first).items():  # warned here: a worker's warning is not seen
                    logger.warning("%s: the DICOM SEG leaves %s empty: its %r is no DICOM value (%s)", path, keyword,
                                   first.get(keyword), why)  # fmt: skip
            for keyword in ("StudyInstanceUID", "FrameOfReferenceUID"):  # highdicom refused them after every window
                if header.get(keyword) != first.get(keyword):
                    raise InputError(f"{path}: its {keyword} {header.get(keyword)} differs from {first.get(keyword)} "
                                     f"of {source.files[0]}; a DICOM Segmentation refers to slices of one study and "
                                     "frame of reference")  # fmt: skip

    def class_name_problem(self, name):
        from .sinks.dicomseg import segment_label_problem

        return segment_label_problem(name)

    def classes_problem(self, n_classes):
        # segment numbers: 1 to 65535 (a LABELMAP's 16-bit pixels), 0 background; a network of one class is refused
        # for every output (planning.classes_of)
        if n_classes - 1 > 65535:
            return f"holds at most 65535 classes besides the background (its segments); this network gives {n_classes - 1}"
        return None

    def open_labels(self, path, chunks):
        from .errors import InputError

        raise InputError(f"{path}: read a DICOM Segmentation with highdicom (hd.seg.segread); write .nii.gz to get stats")

    def written_by_tilemask(self, path):
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM at all
            return False
        return ds.get("Modality") == "SEG" and ds.get("Manufacturer") == "tilemask"


class GdalRasterFormat(GeoTiffFormat):
    """Any other raster GDAL opens (JPEG 2000, VRT, remote files without a suffix): read only."""

    name = "gdal"
    suffixes = ()
    writable = False

    def matches(self, path):
        return True

    def open_source(self, path, spatial_dims, bands):
        from .errors import InputError
        from .sources.zarr import ZarrSource, ome_first_level, read_by_gdal

        if inside_zarr_store(path) and (ome_first_level(path) or not read_by_gdal(path, spatial_dims)):
            return ZarrSource.open(path, spatial_dims)  # an array, or an OME-Zarr image's group
        try:
            return super().open_source(path, spatial_dims, bands)
        except InputError as exc:  # GDAL's "not recognized": say what the file or folder is, where that is known
            if "not recognized" not in str(exc) and "does not exist" not in str(exc):
                raise
            if os.path.isdir(path):
                from .sources.dicom import folder_problem

                raise InputError(folder_problem(path)) from None
            if _nifti_pair(path):
                raise InputError(f"{path}: a NIfTI pair (.hdr and .img); tilemask reads one-file NIfTI: "
                                 "nib.save(nib.load(path), 'scan.nii.gz') makes one") from None  # fmt: skip
            raise

    def open_labels(self, path, chunks):
        from .errors import InputError
        from .sources.labels import open_zarr_array_labels
        from .sources.zarr import ome_first_level, ome_label_names

        if inside_zarr_store(path):
            names = ome_label_names(path)
            if names is not None:  # GDAL's word for it was "a label image has one band, this raster has 0"
                some = ", ".join(f"{path.rstrip('/')}/{n}" for n in names[:3]) or "none"
                raise InputError(f"{path}: an OME-Zarr labels group, which lists label images; give one ({some})")
            path = ome_first_level(path) or path  # a label image's group: its full resolution
            if zarr_array_inside_store(path):
                return open_zarr_array_labels(path, chunks)
        return super().open_labels(path, chunks)


class UnreadVolumeFormat(Format):
    """Volumes tilemask does not read, as an input or as labels, named in one line with the way to NIfTI: MINC
    (``.mnc``: MINC1 is netCDF, MINC2 HDF5; MONAI's readers do not read it either: GDAL's netCDF driver took a MINC1
    file for a 2D raster whose bands are its slices, a label image of 10 bands, and a MINC2 failed with an
    ``IndexError``), NRRD, MetaImage and FreeSurfer's MGH (GDAL's "not recognized as being in a supported file
    format" named none of them)."""

    name = "unread"
    KINDS = {".mnc": "a MINC volume", ".nrrd": "an NRRD volume", ".nhdr": "an NRRD header",
             ".mha": "a MetaImage volume", ".mhd": "a MetaImage header", ".mgz": "a FreeSurfer MGH volume",
             ".mgh": "a FreeSurfer MGH volume"}  # fmt: skip
    suffixes = tuple(KINDS)
    writable = False

    def open_source(self, path, spatial_dims, bands):
        raise self._unread(path, "an input")

    def open_labels(self, path, chunks):
        raise self._unread(path, "a label image")

    def _unread(self, path: str, what: str) -> Exception:
        from .errors import InputError
        from .sources import missing_local

        if missing_local(path):
            return InputError(f"{path}: no such file")
        return InputError(f"{path}: cannot open as {what}: {self.KINDS[self.suffix(path).lower()]}, which tilemask "
                          "does not read; convert it to NIfTI (.nii.gz)")  # fmt: skip


def inside_zarr_store(path: str) -> bool:
    """Whether ``path`` may name a node inside a Zarr store, local, on a web server or on S3 (others' are GDAL's)
    (``scan.zarr/0``, ``s3://bucket/seg.zarr/mask.5``: a path below a ``.zarr`` folder that is not a store itself).
    Callers open it with zarr and leave it to GDAL where zarr opens no array there.  An array over HTTP or S3, or
    one whose name had a dot, went to GDAL, which took its fill value for nodata: a label array's 0, its
    background, was left out of the statistics without a word (reviews')."""
    from .storage import WEB

    name = path.lower().rstrip("/")
    reachable = ("://" not in name and not name.startswith("/vsi")) or name.startswith((*WEB, "s3://"))
    return reachable and ".zarr/" in name and not name.endswith(".zarr")


def zarr_labels_inside_store(path: str) -> bool:
    """Whether ``path`` names labels inside a Zarr store (:func:`inside_zarr_store`) that zarr-python reads: an array,
    or an OME-Zarr label image's group (:meth:`GdalRasterFormat.open_labels`)."""
    from .sources.zarr import ome_first_level

    return inside_zarr_store(path) and (ome_first_level(path) is not None or zarr_array_inside_store(path))


def zarr_array_inside_store(path: str) -> bool:
    """Whether ``path`` names an array inside a Zarr store (:func:`inside_zarr_store`) that zarr-python reads, not
    GDAL (labels: ``seg.ome.zarr/labels/labels/0``, ``seg.zarr/labels``; :func:`tilemask.sources.zarr.read_by_gdal`)."""
    from .sources.zarr import read_by_gdal

    return inside_zarr_store(path) and not read_by_gdal(path, 2)


def zarr_store_of(path: str) -> tuple[str, str]:
    """The innermost Zarr store holding ``path`` (:func:`inside_zarr_store`) and the key inside it
    (``seg.ome.zarr/labels/labels/0``: ``seg.ome.zarr`` and ``labels/labels/0``; ``seg.zarr//labels``: ``labels``)."""
    parts = path.rstrip("/").split("/")
    stores = [i for i, part in enumerate(parts[:-1]) if part.lower().endswith(".zarr")]
    if not stores:
        raise ValueError(f"{path}: inside no Zarr store")
    return "/".join(parts[: stores[-1] + 1]), "/".join(part for part in parts[stores[-1] + 1 :] if part)


def _nifti_pair(path: str) -> bool:
    """Whether ``path`` is the header or image of a NIfTI-1 pair (magic ``ni1`` in the header)."""
    from .sources import bytes_at

    header = str(Path(path).with_suffix(".hdr")) if path.lower().endswith(".img") else path
    return bytes_at(header, 344, 4) == b"ni1\x00"


FORMATS: tuple[Format, ...] = (
    OmeZarrFormat(), ZarrFormat(), NiftiFormat(), GeoTiffFormat(), DicomSegFormat(), DicomSeriesFormat(), UnreadVolumeFormat(),
    GdalRasterFormat(),
)
OUTPUT_SUFFIXES = tuple(s for f in FORMATS if f.writable for s in f.suffixes)


def for_path(path: str | os.PathLike) -> Format:
    """The format of ``path``, by suffix (GDAL for anything else)."""
    path = os.fspath(path)
    return next(f for f in FORMATS if f.matches(path))


def for_output(path: str) -> Format:
    """The format an output path asks for; ``ValueError`` when tilemask cannot write it."""
    fmt = for_path(path)
    if not fmt.writable:
        raise ValueError(f"suffix must be one of {', '.join(OUTPUT_SUFFIXES)} (got {path!r})")
    return fmt


def stem(path: str) -> str:
    """A file name without its format suffix (``scan.nii.gz`` -> ``scan``)."""
    return for_path(path).stem(path)


# -- derived products: the mark of the files tilemask wrote -----------------------------------------------------

PRODUCT_MARK = "tilemask"
"""The key of the mark tilemask puts in the derived products it writes (polygons, statistics tables, quick looks,
scores), with its version as the value: a layer metadata item of a GeoPackage or a FlatGeobuf (a GeoPackage's
dataset item, which tilemask wrote before 2026-12-03, counts too), a key of a Parquet file's Arrow schema metadata,
the first key of a JSON object. A GeoJSON's mark is its ``description`` member, a PNG's its ``Software`` text chunk:
``tilemask <version>``. CSV and a JSON list of records have no place for one."""


def product_mark() -> dict[str, str]:
    """tilemask's mark as a metadata item, :data:`PRODUCT_MARK` and the version."""
    from . import __version__

    return {PRODUCT_MARK: __version__}


def product_mark_text() -> str:
    """tilemask's mark as one text (a PNG's ``Software`` chunk, a GeoJSON's ``description``): ``tilemask <version>``."""
    return " ".join(*product_mark().items())


def product_written_by_tilemask(path: str | os.PathLike) -> bool | None:
    """Whether the derived product at ``path`` carries tilemask's mark (:data:`PRODUCT_MARK`); None where the
    format has no place for one (CSV, a JSON list of records), nothing is there, or it is on object storage: then
    ``--overwrite`` alone decides. Reads metadata only (a GeoPackage's or FlatGeobuf's header and tables, a
    Parquet footer, a PNG's chunks before its pixels, a JSON's or GeoJSON's first 4 kB); a file it cannot read is
    not tilemask's."""
    path = os.fspath(path)
    if "://" in path or path.startswith("/vsi") or not os.path.lexists(path):
        return None
    suffix = os.path.splitext(path.rstrip("/"))[1].lower()
    if suffix not in (".gpkg", ".fgb", ".geojson", ".parquet", ".png", ".json"):
        return None  # .csv: a header is no mark (columns follow the classes and the regions' fields)
    if not os.path.isfile(path):
        return False  # a folder, a device: not a file tilemask wrote
    try:
        if suffix in (".gpkg", ".fgb"):
            import pyogrio

            from .ogr import no_pam

            with no_pam():
                info = pyogrio.read_info(path)
            return any(PRODUCT_MARK in (info.get(scope) or {}) for scope in ("dataset_metadata", "layer_metadata"))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return PRODUCT_MARK.encode() in (pq.read_schema(path).metadata or {})
        if suffix == ".png":
            from PIL import Image

            with Image.open(path, formats=["PNG"]) as image:
                return str(image.info.get("Software", "")).startswith(PRODUCT_MARK + " ")
        with open(path, "rb") as f:
            head = f.read(4096)
    except Exception:  # noqa: BLE001 - damaged, or not of its suffix's format: not a file tilemask wrote
        return False
    if suffix == ".geojson":  # GDAL writes the collection's members, then its features
        members = head.split(b'"features"', 1)[0]
        return re.search(rb'"description"\s*:\s*"' + re.escape(PRODUCT_MARK.encode() + b" "), members) is not None
    if head.lstrip().startswith(b"["):
        return None  # a list of records (a statistics table): no place for a mark
    return re.match(rb'\s*\{\s*"' + re.escape(PRODUCT_MARK.encode()) + rb'"\s*:', head) is not None


def written_by_tilemask(path: str | os.PathLike) -> bool:
    """Whether what is at ``path`` is an output tilemask wrote: the format decides for label outputs, the mark for
    derived products (:func:`product_written_by_tilemask`; a CSV has no place for one, and counts as tilemask's)."""
    fmt = for_path(os.fspath(path))
    if not fmt.writable:
        return product_written_by_tilemask(path) is not False
    return fmt.written_by_tilemask(os.fspath(path))
