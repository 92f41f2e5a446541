"""A DICOM series (a folder of single-frame slices) as a volume, read with pydicom.

Geometry, as nibabel and SimpleITK derive it: slices are sorted along the slice
normal (the cross product of ImageOrientationPatient's row and column cosines)
by the projection of ImagePositionPatient; voxel axes are (column, row, slice)
like a NIfTI converted from DICOM; the column axis steps ``PixelSpacing[1]``
along the row cosines, the row axis ``PixelSpacing[0]`` along the column
cosines, the slice axis the (uniform) step between consecutive positions; the
patient LPS coordinates become RAS by negating x and y. Values are
``stored * RescaleSlope + RescaleIntercept`` (integers stay integers when every
slope is 1 and every intercept whole). Only the headers are read to plan; a
worker decodes the slices once, into a temporary file, and reads regions from it
(:meth:`DicomSeriesSource.read`).
"""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass

import numpy as np

from ..errors import InputError, ReadError
from ..geometry import Region, VolumeGeometry, affine_problem
from . import CannotUnpack, ImageSource, Spool, bytes_at, file_stamp, unpacked

logger = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _part10(path: str) -> bool:
    """Whether ``path`` starts like a DICOM Part 10 file (``DICM`` at byte 128)."""
    return bytes_at(path, 128, 4) == b"DICM"


def _files(folder: str):
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def _name_kind(path: str) -> tuple[str, str]:
    """A file's folder and suffix, lower case; no suffix for one of digits only (files named by their UID)."""
    suffix = os.path.splitext(path)[1].lower()
    return os.path.dirname(path), "" if suffix[1:].isdigit() else suffix


def _stray_slice(others: list[str], slices: list[str]) -> str | None:
    """Why a file of ``others`` (no Part 10 DICOM) that lies beside ``slices`` and is named as they are (in their
    folder, with their suffix) is refused, in a line; None when there is none. A slice damaged or cut short in its
    first 132 bytes is no Part 10 file: it was left out, and a run of a series with its last slice missing exited 0
    (an exploratory review). Other files (``notes.txt`` beside ``*.dcm``, hidden files) are not slices."""
    kinds = {_name_kind(p) for p in slices}
    for path in others:
        if not os.path.basename(path).startswith(".") and _name_kind(path) in kinds:
            size = os.path.getsize(path)
            return (f"{path}: not a DICOM Part 10 file ({size} bytes, no 'DICM' at byte 128), named as the series' "
                    "slices beside it: a slice damaged or cut short? Repair or remove it")  # fmt: skip
    return None


def is_dicom_file(path: str) -> bool:
    return os.path.isfile(path) and _part10(path)


MULTI_FRAME = "a multi-frame image ({frames} frames); tilemask reads series of single-frame slices"


def single_file_problem(path: str, spatial_dims: int = 3) -> str:
    """Why one DICOM file given as the input is not one, in a line: a multi-frame image is named as such (its
    folder is refused for it too), any other file is a slice whose folder is the input, or, for a 2D model, a
    slice of a volume (:func:`volume_problem`)."""
    import pydicom

    from ..storage import network_object
    from .archive import archive_problem, split_member

    if network_object(path) is not None:  # "no such file" before: it was looked for on the local disk
        return (f"{path}: a DICOM file on a web server or object storage; tilemask reads a DICOM series from a local "
                "folder: download the series' slices into a folder and give the folder")  # fmt: skip
    if split_member(path) is not None:  # a member of a series' archive (Orthanc's names its slices CT000000.dcm):
        problem = archive_problem(path)  # "no such file" before
        return f"{path}: {problem or 'a .dcm file in an archive; a DICOM series is read from its folder: extract it'}"
    if not os.path.isfile(path):
        return f"{path}: no such file"
    try:
        frames = int(pydicom.dcmread(path, stop_before_pixels=True).get("NumberOfFrames", 1) or 1)
    except Exception:  # noqa: BLE001 - not a DICOM file pydicom reads: the hint below still holds
        frames = 1
    if frames > 1:
        return f"{path}: {MULTI_FRAME.format(frames=frames)}"
    if spatial_dims != 3:
        return volume_problem(path, "slice")
    return f"{path}: one DICOM file; give the folder of the series as the input"


def volume_problem(path: str, what: str) -> str:
    """Why a DICOM slice or series is no input for a 2D model, in a line: tilemask reads a series, one slice's too,
    as a volume. A slice given to a 2D model was sent to its folder, which was then refused for its 3 axes."""
    return (f"{path}: a DICOM {what}, which tilemask reads as a volume (one slice as a slab), for a 2D model: give "
            "a 3D model, inference.slice_axis (the 2D model over the slices), or each slice's pixels as a 2D image "
            "(a TIFF or PNG)")


PROBE_FILES = 64  # how many files of a folder with no known suffix are looked at to recognise a DICOM series


def folder_problem(path: str) -> str:
    """Why a folder that neither a DICOM series nor GDAL opens is not an input, in a line."""
    files = [p for p, _ in zip(_files(path), range(PROBE_FILES))]
    if not files:
        return f"{path}: an empty folder"
    bare = next((p for p in files if _headerless_dicom(p)), None)
    if bare:
        example = os.path.relpath(bare, path)
        return (f"{path}: DICOM files without the Part 10 header ('DICM' at byte 128), e.g. {example}; rewrite them "
                "as Part 10 files (gdcmconv, or pydicom's dcmwrite)")  # fmt: skip
    rasters = _rasters_problem(path, files)
    if rasters:
        return rasters
    return f"{path}: a folder with no DICOM file among its first {len(files)} files, and no dataset GDAL opens"


RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".vrt", ".img", ".png", ".jpg", ".jpeg", ".nii.gz", ".nii", ".nc")


def _raster_suffix(name: str) -> str | None:
    return next((s for s in RASTER_SUFFIXES if name.lower().endswith(s)), None)


def _rasters_problem(path: str, files: list[str]) -> str | None:
    """A folder of rasters (scenes, scans) given as one input: the glob that runs each as an input.  A batch user's
    ``input: scenes/`` was "a folder with no DICOM file ... and no dataset GDAL opens", with no word of a glob."""
    with os.scandir(path) as entries:
        top = sorted(e.name for e in entries if e.is_file() and _raster_suffix(e.name))
    deeper = "" if top else "**/"
    names = top or [os.path.relpath(f, path) for f in files if _raster_suffix(f)]
    if not names:
        return None
    suffixes = [_raster_suffix(n) for n in names]
    suffix = max(RASTER_SUFFIXES, key=suffixes.count)  # the most common: the scenes, not a stray preview
    names = [n for n, s in zip(names, suffixes) if s == suffix]
    cases = _nnunet_cases(names, suffix) if top else None
    if cases:  # a file a channel: the glob made each channel an input of its own
        case_names, channels = cases
        shown = ", ".join(case_names[:3]) + (", ..." if len(case_names) > 3 else "")
        patterns = ", ".join(repr(f"{path.rstrip('/')}/{{case}}_{c}{suffix}") for c in channels)
        return (f"{path}: a folder of {len(case_names)} cases of {len(channels)} channels each ({shown}), nnU-Net's "
                f"names, not one input: give them as input: {{channels: [{patterns}]}}, to run each case as an input")
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    count = (f"{len(names)} raster{'s' * (len(names) > 1)}") if top else "rasters in its subfolders"
    return (f"{path}: a folder of {count} ({shown}), not one input: give them as a glob, "
            f"{glob.escape(path.rstrip('/'))}/{deeper}*{suffix}, to run each as an input")  # survey [v2]/: no class


def _nnunet_cases(names: list[str], suffix: str) -> tuple[list[str], list[str]] | None:
    """``(cases, channels)`` of files named as nnU-Net names a case's channels (``case1_0000.nii.gz``,
    ``case1_0001.nii.gz``), where there are two channels or more and each case has each; None otherwise."""
    found = [re.fullmatch(rf"(.+)_(\d{{4}}){re.escape(suffix)}", n, re.IGNORECASE) for n in names]
    if not all(found):
        return None
    channels = sorted({m[2] for m in found})
    cases = sorted({m[1] for m in found})
    if len(channels) < 2 or len(found) != len(cases) * len(channels):
        return None
    return cases, channels


def _headerless_dicom(path: str) -> bool:
    """Whether ``path`` starts with a DICOM data element of group 0002 or 0008 (little endian), no preamble."""
    head = bytes_at(path, 0, 4)
    return len(head) == 4 and head[:2] in (b"\x02\x00", b"\x08\x00") and int.from_bytes(head[2:], "little") < 0x0100


def is_dicom_folder(path: str) -> bool:
    """Whether ``path`` is a folder holding a DICOM file among its first :data:`PROBE_FILES` files."""
    if not os.path.isdir(path):
        return False
    return any(_part10(p) for p, _ in zip(_files(path), range(PROBE_FILES)))


def decoder_problem(path: str, syntax: str) -> str | None:
    """Why the pixels of ``path``, stored in transfer syntax ``syntax``, cannot be decoded here, in a line; None
    when a pydicom pixel decoder for it is installed. Found when planning (exit 2), not when a worker first reads
    a slice (exit 1)."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    uid = UID(syntax)
    named = uid if uid.name == str(uid) else f"{uid.name} ({uid})"
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"{path}: its pixels are stored as {named}, which pydicom has no decoder for"
    if decoder.is_available:
        return None
    return (f"{path}: its pixels are stored as {named}, and no decoder for it is installed (pydicom's plugins: "
            f"{'; '.join(decoder.missing_dependencies)})")  # fmt: skip


PIXEL_TAGS = (0x7FE00010, 0x7FE00009, 0x7FE00008)  # Pixel Data, Float and Double Float Pixel Data: where dcmread stops


def bits_problem(header) -> str | None:
    """Why the integer pixels that ``header`` describes cannot be unpacked, in a line; None when they can. Found when
    planning (exit 2), not on a worker's first read (exit 1).

    The rule is pydicom 3's, checked before it decodes (``pydicom.pixels.common.RunnerBase._validate_options``, a
    private method): BitsAllocated 1 or a multiple of 8 up to 64, BitsStored from 1 to BitsAllocated. The DICOM
    standard's part of it: PS3.5 section 8.1.1 (Bits Stored shall never be larger than Bits Allocated; the values
    allowed are the IODs' of PS3.3, as its Image Pixel Module, C.7.6.3). pydicom has no public check of these alone:
    its public ``DecodeRunner.validate()`` wants the dataset with its pixels (``set_source`` refuses one without
    them) and checks every pixel attribute, where this runs on the header read before the pixels."""
    allocated, stored = header.get("BitsAllocated"), header.get("BitsStored")
    if allocated is None or stored is None:
        return f"no {'BitsAllocated' if allocated is None else 'BitsStored'}: its pixels cannot be unpacked"
    if not (allocated == 1 or (allocated % 8 == 0 and 8 <= allocated <= 64)):
        return f"its BitsAllocated {allocated} is not 1 or a multiple of 8 up to 64: its pixels cannot be unpacked"
    if not 1 <= stored <= allocated:
        return (f"its BitsStored {stored} is not from 1 to its BitsAllocated {allocated}: its pixels cannot be "
                "unpacked")  # fmt: skip
    return None


def _sop_class(header) -> str:
    """The name of a file's SOP class (``CT Image Storage``), from its file meta or its data set; '' if none."""
    uid = header.file_meta.get("MediaStorageSOPClassUID") if header.file_meta else None
    uid = uid or header.get("SOPClassUID")
    return uid.name if uid else ""


def read_header(path: str):
    """``path``'s data elements before its pixels, as ``dcmread(stop_before_pixels=True)`` reads them, and why its
    pixels cannot be read, in words (None when they are there): no pixel data element, an empty one, or one the file
    ends inside (pydicom's ``pixel_array`` fails on a worker, mid-run; for a SEG, pydicom reads what there is without
    a word). pydicom's ``read_partial``, which its docs name for stopping on a condition of one's own: here, noting
    where the pixels start. A deflated file is inflated whole to be read (the inflate fails on one cut short), so
    its length on disk says nothing of its pixels and is not compared."""
    import zlib

    from pydicom.filereader import read_partial
    from pydicom.uid import DeflatedExplicitVRLittleEndian
    from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

    found = []

    def at_pixels(tag, vr, length: int) -> bool:
        if tag in PIXEL_TAGS:
            found.append((tag, vr, length))
            return True
        return False

    with open(path, "rb") as f:
        try:
            header = read_partial(f, stop_when=at_pixels)
        except zlib.error as exc:
            raise ValueError(f"its deflated data do not inflate (cut short or damaged): {exc}") from None
        available = os.fstat(f.fileno()).st_size - f.tell()  # read_partial rewinds to the pixel element's start
    if not found:
        return header, "no PixelData element: its image is missing"
    tag, vr, length = found[0]
    if length == 0:
        return header, "an empty PixelData element: its image is missing"
    if tag == PIXEL_TAGS[0] and (problem := bits_problem(header)):
        return header, problem
    if header.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return header, None
    available -= 12 if vr in EXPLICIT_VR_LENGTH_32 else 8  # the element's tag, VR and length (implicit VR: no VR)
    if length != 0xFFFFFFFF and available < length:  # encapsulated pixels (undefined length) are read on a worker
        return header, f"cut short: its PixelData holds {max(available, 0)} of its {length} bytes"
    if length != 0xFFFFFFFF and tag == PIXEL_TAGS[0] and length < (need := _native_bytes(header)):
        return header, (f"its PixelData holds {length} bytes, where its {header.Rows} x {header.Columns} x "
                        f"{header.get('NumberOfFrames', 1) or 1} pixels of {header.BitsAllocated} bits need {need}")
    return header, None


def _native_bytes(header) -> int:
    """How many bytes the native (not encapsulated) pixels that ``header`` describes take: 0 when it does not say
    (no Rows, say). A shorter PixelData failed on a worker's first read (exit 1, an exploratory review)."""
    try:
        values = int(header.Rows) * int(header.Columns) * int(header.get("NumberOfFrames", 1) or 1)
        bits = values * int(header.get("SamplesPerPixel", 1) or 1) * int(header.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        return 0
    return (bits + 7) // 8


UNEVEN_SLICES = 0.02  # of the step: how far a slice may sit from its place on the regular grid (rounded positions)


def _listed(value) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in value) + "]"


def _usual_gap(gaps: np.ndarray) -> float:
    """The gap most pairs of neighbouring slices share (within :data:`UNEVEN_SLICES`), the smallest of those tied:
    a series' spacing where a slice is missing (the average between its first and last slice is not)."""
    near = np.abs(gaps[:, None] - gaps[None, :]) <= UNEVEN_SLICES * gaps[:, None]  # near[i, j]: gap j is gap i's
    shared = near.sum(axis=1)
    usual = int(np.argmin(np.where(shared == shared.max(), gaps, np.inf)))
    return float(np.median(gaps[near[usual]]))


def _check_even(folder: str, files: list[str], positions: np.ndarray, step: np.ndarray) -> None:
    """Refuse slices off the regular grid from the first slice to the last by more than :data:`UNEVEN_SLICES` of
    the step (a missing slice, a change of spacing); warn of smaller departures, as GDCM does (positions written
    to 0.01 mm on 0.625 mm slices are that far off), and read them as the grid."""
    spacing = float(np.linalg.norm(step))
    departure = np.linalg.norm(positions - (positions[0] + np.arange(len(files))[:, None] * step), axis=1)
    worst = int(np.argmax(departure))
    if departure[worst] <= max(1e-3, 1e-3 * spacing):
        return
    gaps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
    if departure[worst] > UNEVEN_SLICES * spacing:
        usual = _usual_gap(gaps)  # the series' own spacing: the first-to-last average counts a gap in
        at = int(np.argmax(np.abs(gaps - usual)))
        a, b = (os.path.relpath(files[i], folder) for i in (at, at + 1))
        along = positions[at : at + 2] @ (step / spacing)  # where they lie along the slice normal, in mm
        missing = round(gaps[at] / usual) - 1
        why = "a change of spacing?"
        if missing >= 1 and abs(gaps[at] - (missing + 1) * usual) <= UNEVEN_SLICES * usual:
            why = "a missing slice?" if missing == 1 else f"{missing} missing slices?"
        raise InputError(f"{folder}: slices are not evenly spaced: the series steps {usual:.4g} mm, but {a} and {b}, "
                         f"at {along[0]:g} and {along[1]:g} mm along the slice normal, are {gaps[at]:.4g} mm apart "
                         f"({why}); tilemask reads a regular grid")  # fmt: skip
    at = int(np.argmax(np.abs(gaps - spacing)))
    a, b = (os.path.relpath(files[i], folder) for i in (at, at + 1))
    pair = f"{a} and {b} are {gaps[at]:.4g} mm apart where the series steps {spacing:.4g} mm"
    logger.warning("%s: slices depart from a regular grid by up to %.3g mm (%s); read as the regular grid",
                   folder, departure[worst], pair)  # fmt: skip


@dataclass(frozen=True)
class DicomSeriesSource(ImageSource):
    path: str
    files: tuple[str, ...]  # sorted along the slice normal: the k axis
    volume_shape: tuple[int, int, int]  # (columns, rows, slices)
    volume_geometry: VolumeGeometry
    slopes: tuple[float, ...]
    intercepts: tuple[float, ...]

    @classmethod
    def open(cls, folder: str) -> DicomSeriesSource:
        from pydicom.errors import InvalidDicomError

        if not os.path.isdir(folder):
            raise InputError(f"{folder}: no such folder")
        headers, pixel_problems = [], {}
        files = {path: _part10(path) for path in _files(folder)}  # whether each is a Part 10 file
        for path in (p for p, part10 in files.items() if part10):
            try:
                header, pixel_problems[path] = read_header(path)
            except (InvalidDicomError, OSError, ValueError) as exc:
                raise InputError(f"{path}: cannot read DICOM: {exc}") from None
            headers.append((path, header))
        images = [(p, h) for p, h in headers if "Rows" in h]  # images (not DICOMDIRs, reports, ...)
        slices = [(p, h) for p, h in images if h.get("Modality") != "SEG"]  # a SEG beside its slices (tilemask's, or
        images = slices or images  # a PACS export's) is not one of them; alone, it is refused as a multi-frame file
        for path, h in headers:  # an image's file that ends before its Rows: left out, the series ran a slice short
            kind = _sop_class(h)
            if "Rows" not in h and kind.endswith("Image Storage"):
                raise InputError(f"{path}: a {kind} file without Rows or pixels (cut short or damaged?): "
                                 f"{pixel_problems[path]}")  # fmt: skip
        if not images:
            raise InputError(f"{folder}: no DICOM image in this folder")
        stray = _stray_slice([p for p, part10 in files.items() if not part10], [p for p, _ in images])
        if stray:
            raise InputError(stray)
        unnamed = [p for p, h in images if not h.get("SeriesInstanceUID")]
        if 0 < len(unnamed) < len(images):
            raise InputError(f"{unnamed[0]}: no SeriesInstanceUID, where {len(images) - len(unnamed)} other slice(s) "
                             "have one: it is not known to be of their series")  # fmt: skip
        series = {h.get("SeriesInstanceUID") for _, h in images}
        if len(series) > 1:
            raise InputError(f"{folder}: holds {len(series)} DICOM series; give the folder of one series: "
                             f"{_series_listed(images, folder)}")  # fmt: skip
        for path, h in images:
            frames = int(h.get("NumberOfFrames", 1) or 1)  # first: an Enhanced CT or MR keeps its geometry per frame
            if frames != 1:  # (functional groups), and was refused for "no ImageOrientationPatient"
                raise InputError(f"{path}: {MULTI_FRAME.format(frames=frames)}")
            missing = [
                k for k in ("Columns", "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing") if k not in h
            ]
            if missing:
                raise InputError(f"{path}: no {missing[0]}: tilemask needs the slice geometry")
            if pixel_problems[path]:
                raise InputError(f"{path}: {pixel_problems[path]}")
            if len(h.ImageOrientationPatient) != 6 or len(h.ImagePositionPatient) != 3 or len(h.PixelSpacing) != 2:
                raise InputError(f"{path}: ImageOrientationPatient, ImagePositionPatient or PixelSpacing is malformed")
            if int(h.get("SamplesPerPixel", 1) or 1) != 1:
                raise InputError(f"{path}: {h.get('PhotometricInterpretation', 'colour')} pixels (SamplesPerPixel "
                                 f"{h.SamplesPerPixel}); tilemask reads greyscale series")  # fmt: skip
        syntaxes = {str(getattr(h, "file_meta", {}).get("TransferSyntaxUID", "")): p for p, h in images}
        for syntax, path in syntaxes.items():
            problem = syntax and decoder_problem(path, syntax)
            if problem:
                raise InputError(problem)
        first_path, first = images[0]
        orientation = np.array(first.ImageOrientationPatient, dtype=float)
        rows, cols = int(first.Rows), int(first.Columns)
        for path, h in images:
            for what, value, expected in (("size", (int(h.Rows), int(h.Columns)), (rows, cols)),
                                          ("orientation", h.ImageOrientationPatient, orientation),
                                          ("pixel spacing", h.PixelSpacing, first.PixelSpacing)):  # fmt: skip
                if not np.allclose(np.asarray(value, float), np.asarray(expected, float), rtol=0, atol=1e-4):
                    raise InputError(f"{path}: its {what} {_listed(value)} differs from {_listed(expected)} of "
                                     f"{os.path.relpath(first_path, folder)}; tilemask reads one grid")  # fmt: skip
        row_cosines, col_cosines = orientation[:3], orientation[3:]
        normal = np.cross(row_cosines, col_cosines)
        if not np.linalg.norm(normal) > 1e-3:  # NaN too: the slices have no direction to be sorted along
            raise InputError(f"{first_path}: ImageOrientationPatient {_listed(orientation)} gives no slice normal (its "
                             "row and column directions are parallel, zero or not numbers)")  # fmt: skip
        positions = np.array([np.array(h.ImagePositionPatient, dtype=float) for _, h in images])
        order = np.argsort(positions @ normal, kind="stable")
        positions = positions[order]
        images = [images[i] for i in order]
        if len(images) > 1:
            steps = np.diff(positions, axis=0)
            step = (positions[-1] - positions[0]) / (len(images) - 1)
            if np.linalg.norm(step) < 1e-6:
                raise InputError(f"{folder}: slices share one position (several acquisitions in one series?)")
            repeated = np.flatnonzero(np.linalg.norm(steps, axis=1) < 1e-3 * np.linalg.norm(step))
            if repeated.size:
                a, b = (os.path.relpath(images[i][0], folder) for i in (repeated[0], repeated[0] + 1))
                raise InputError(f"{folder}: {a} and {b} are slices at one position ({len(repeated)} such pair(s): a "
                                 "slice given twice, or two acquisitions in one series)")  # fmt: skip
            _check_even(folder, [p for p, _ in images], positions, step)
        else:
            given = (first.get("SpacingBetweenSlices"), first.get("SliceThickness"))  # 0 or empty: not given
            thickness = next((float(v) for v in given if v not in (None, "") and float(v) != 0), 1.0)
            step = normal * thickness
        row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
        lps = np.eye(4)
        lps[:3, 0] = row_cosines * col_spacing  # i: along a row, one column to the next
        lps[:3, 1] = col_cosines * row_spacing  # j: down a column, one row to the next
        lps[:3, 2] = step
        lps[:3, 3] = positions[0]
        ras = LPS_TO_RAS @ lps
        problem = affine_problem(ras)
        if problem:
            raise InputError(f"{folder}: its affine (voxel-to-world matrix) is not usable: {problem}; it comes from "
                             "the slices' ImageOrientationPatient, PixelSpacing and ImagePositionPatient")  # fmt: skip
        return cls(
            path=folder,
            files=tuple(p for p, _ in images),
            volume_shape=(cols, rows, len(images)),
            volume_geometry=VolumeGeometry(tuple(tuple(float(v) for v in row) for row in ras)),
            slopes=tuple(float(h.get("RescaleSlope", 1) or 1) for _, h in images),
            intercepts=tuple(float(h.get("RescaleIntercept", 0) or 0) for _, h in images),
        )

    @property
    def shape(self) -> tuple[int, ...]:
        return (1, *self.volume_shape)

    @property
    def geometry(self) -> VolumeGeometry:
        return self.volume_geometry

    @property
    def floating(self) -> bool:
        return any(s != 1 for s in self.slopes) or any(i != int(i) for i in self.intercepts)

    def read(self, region: Region) -> np.ndarray:
        """The stored values of the region's slices, rescaled.  The blocks of a series share its slices, each
        decoded whole: the series is decoded once per process into a temporary file
        (:func:`tilemask.sources.unpacked`), else each region decodes its slices."""
        (i0, i1), (j0, j1), (k0, k1) = region
        stored = unpacked((self.path, tuple(file_stamp(f) for f in self.files)), self._unpack)
        if stored is not None:
            pixels = np.asarray(stored[k0:k1, j0:j1, i0:i1])
        else:
            pixels = np.stack([self._pixels(k)[j0:j1, i0:i1] for k in range(k0, k1)])
        if self.floating:
            slopes = np.array(self.slopes[k0:k1], np.float32)[:, None, None]
            values = pixels.astype(np.float32) * slopes + np.array(self.intercepts[k0:k1], np.float32)[:, None, None]
        else:
            # int32 holds 8- and 16-bit pixels and their intercepts; 32-bit ones (an unsigned 3e9 read as -1.4e9)
            # take int64, as SimpleITK reads them
            wide = np.int64 if pixels.dtype.itemsize >= 4 else np.int32
            intercepts = np.array([int(v) for v in self.intercepts[k0:k1]], wide)
            values = pixels.astype(wide) + intercepts[:, None, None]
        return np.ascontiguousarray(values.transpose(2, 1, 0))[None]  # (slice, row, column) -> (i, j, k)

    def _pixels(self, k: int) -> np.ndarray:
        import pydicom

        try:
            return pydicom.dcmread(self.files[k]).pixel_array
        except Exception as exc:  # noqa: BLE001 - pydicom and its pixel handlers raise many types
            # one line: pydicom puts each decoder's reason on a line of its own, after "...all available plugins:"
            reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            raise ReadError(f"{self.files[k]}: read failed: {type(exc).__name__}: {reason}") from None

    def _unpack(self, spool: Spool) -> np.memmap:
        """Every slice's stored pixels, in order, into ``spool``; read back as one ``(slice, row, column)`` array."""
        columns, rows, _ = self.volume_shape
        dtype = None
        for k in range(len(self.files)):
            pixels = self._pixels(k)
            dtype = pixels.dtype if dtype is None else dtype
            if pixels.dtype != dtype or pixels.shape != (rows, columns):
                raise CannotUnpack(f"{self.files[k]}: {pixels.dtype} {pixels.shape}, not {dtype} {(rows, columns)}")
            spool.write(np.ascontiguousarray(pixels).tobytes())
        return np.memmap(spool.file, dtype=dtype, mode="r", shape=(len(self.files), rows, columns))


def _series_listed(images: list, folder: str, shown: int = 3) -> str:
    """The series of ``images`` (path, header), most files first: each one's UID, description (or modality), number
    of files and first file's path in ``folder`` (a disc's series name their slices alike, IM0000 in each folder);
    the first ``shown`` of them."""
    by_series: dict[str, list] = {}
    for path, header in images:
        by_series.setdefault(str(header.get("SeriesInstanceUID")), []).append((path, header))
    listed = sorted(by_series.items(), key=lambda item: -len(item[1]))
    parts = []
    for uid, members in listed[:shown]:
        path, header = min(members, key=lambda member: member[0])
        what = str(header.get("SeriesDescription") or header.get("Modality") or "no description")
        parts.append(f"{uid} ({what}, {len(members)} file(s), such as {os.path.relpath(path, folder)})")
    more = f"; and {len(listed) - shown} more" if len(listed) > shown else ""
    return "; ".join(parts) + more
