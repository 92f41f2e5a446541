"""Readers: one per format, each a lazy, windowed view of an image.

A source is a small picklable value (path and options).  It opens its file
lazily, once per worker thread, and reads only the region it is asked for, so an
image of any size flows through the cluster without one process holding it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..errors import InputError, ReadError
from ..geometry import Geometry, Region, geometry_problem, region_text

logger = logging.getLogger(__name__)

_handles = threading.local()
MAX_OPEN_HANDLES = 32


def cached_handle(key: tuple, opener: Callable[[], Any], version: Any = None) -> Any:
    """An open file handle, opened once per worker thread and reused by later tasks.

    A handle opened on another ``version`` of the file (its :func:`file_stamp`, or an object's version) is closed
    and the file opened again: a replaced file is never read through the old handle, nor through GDAL's cache of
    the old object (closing a network raster's handle drops it: :func:`tilemask.sources.raster.gdal_env`).  The
    least recently used handles are closed past ``MAX_OPEN_HANDLES`` so a batch of thousands of inputs does not
    exhaust file descriptors.
    """
    cache: OrderedDict = _handles.__dict__.setdefault("cache", OrderedDict())
    if key in cache:
        held_version, handle = cache[key]
        if held_version == version:
            cache.move_to_end(key)
            return handle
        del cache[key]
        _close(handle)
    handle = opener()
    cache[key] = (version, handle)
    while len(cache) > MAX_OPEN_HANDLES:
        _close(cache.popitem(last=False)[1][1])
    return handle


def exception_text(exc: BaseException) -> str:
    """What an exception says, after its type's name (``ValueError: ...``): a reader's failure in its own words."""
    return f"{type(exc).__name__}: {exc}"


def read_region(path: str, region: Region, read: Callable[[], np.ndarray],
                detail: Callable[[BaseException], str] = exception_text) -> np.ndarray:
    """``read()``, the pixels of ``region`` of the image at ``path``; any failure (codecs, stores and nibabel raise
    many types) as a :class:`tilemask.errors.ReadError` naming the file and the region as a NumPy index, ``path:
    read failed at [144:304, 144:304, 0:64]: <detail(exc)>``.  Raised outside the handler: the reader's exception
    chain (unpicklable for some) must not travel back to the client."""
    try:
        return read()
    except Exception as exc:  # noqa: BLE001 - what failed is named by detail
        why = detail(exc)
    raise ReadError(f"{path}: read failed at {region_text(region)}: {why}")


def _close(handle: Any) -> None:
    if hasattr(handle, "close"):
        handle.close()


class CannotUnpack(Exception):
    """An input that cannot be unpacked into a temporary file (no room, or not one array): read in place."""


class Spool:
    """An unlinked, unbuffered temporary file (in ``TMPDIR``): nothing is left behind, even by a killed
    process, and its space comes back when the last reference to it goes.  Failing to create or write it is
    :class:`CannotUnpack` (unbuffered, so that no write fails later, outside :meth:`write`); an input that
    fails to read while it is filled raises its own error."""

    def __init__(self):
        try:
            self.file = tempfile.TemporaryFile(prefix="tilemask-", buffering=0)
        except OSError as exc:
            raise CannotUnpack(exc) from None
        self.size = 0

    def write(self, data) -> None:
        """All of ``data``: an unbuffered write may write part of it (up to a full disk or a size limit), and
        the next one then fails."""
        rest = memoryview(data).cast("B")
        try:
            while rest:
                written = self.file.write(rest)
                rest = rest[written:]
                self.size += written
        except OSError as exc:
            raise CannotUnpack(exc) from None


@dataclass
class _Unpacked:
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: bool = False
    value: Any = None  # None once done: could not be unpacked, read in place
    size: int = 0


UNPACKED_BYTES = 2 << 30  # temporary files a process keeps, at most (but always its last UNPACKED_MIN inputs)
UNPACKED_MIN = 2
_unpacked: OrderedDict[tuple, _Unpacked] = OrderedDict()
_evicted: OrderedDict[tuple, None] = OrderedDict()  # inputs let go of: read in place if asked for again
EVICTED_REMEMBERED = 4096  # the most recent of them
_unpacked_lock = threading.Lock()  # guards the two; each input's own lock guards its unpacking
unpacks = 0  # inputs this process has unpacked


def unpacked(key: tuple, unpack: Callable[[Spool], Any]) -> Any | None:
    """What ``unpack`` makes of a :class:`Spool` it fills with an input (``key``: its path and stamp), once
    per process; None where that fails with :class:`CannotUnpack` (one warning), so the caller reads the
    input in place.

    For inputs whose regions are expensive to read in place because the blocks of a volume share what
    must be decoded: a span of a gzip stream, a whole DICOM slice.  The most recently used inputs are kept
    up to :data:`UNPACKED_BYTES`; an input let go of is read in place if its blocks come back (many items
    in flight at once), never unpacked again, so the worst case is reading in place."""
    global unpacks
    with _unpacked_lock:
        if key in _evicted:
            return None
        entry = _unpacked.setdefault(key, _Unpacked())
        _unpacked.move_to_end(key)
    with entry.lock:  # other inputs' readers go on while this one unpacks
        if not entry.done:
            try:
                spool = Spool()
                entry.value = unpack(spool)  # what it makes keeps the file open while it is needed
                entry.size = spool.size
                unpacks += 1
            except CannotUnpack as exc:  # not tried again: a full disk would fill up once per block
                logger.warning("%s: cannot unpack it into a temporary file (%s): reading it in place", key[0], exc)
            entry.done = True
            _evict(key)
        return entry.value


def _evict(keep: tuple) -> None:
    """Let go of the least recently used inputs past :data:`UNPACKED_BYTES`; not closed here: a thread may
    still be reading one, and it closes (its space comes back) when its last reader lets it go."""
    with _unpacked_lock:
        while len(_unpacked) > UNPACKED_MIN and sum(e.size for e in _unpacked.values()) > UNPACKED_BYTES:
            key = next((k for k, e in _unpacked.items() if k != keep and e.done), None)
            if key is None:  # the others are still being unpacked
                break
            del _unpacked[key]
            _evicted[key] = None
            while len(_evicted) > EVICTED_REMEMBERED:
                _evicted.popitem(last=False)


def missing_local(path: str) -> bool:
    """Whether ``path`` names a local file or folder that is not there (not a URL, nor a GDAL ``/vsi`` member)."""
    return "://" not in path and not path.startswith("/vsi") and not os.path.exists(path)


def bytes_at(path: str, offset: int, size: int) -> bytes:
    """``size`` bytes of the file at ``path`` from ``offset`` (fewer at its end; none if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)
    except OSError:
        return b""


def file_stamp(path: str) -> tuple[int, int]:
    """``(mtime_ns, size)`` of a local file (of its archive, for a member of one), so a replaced file is never
    read through a stale handle, nor taken for the one a job read before; ``(0, 0)`` for what is not local."""
    from .archive import split_member

    member = split_member(path)
    try:
        stat = os.stat(member[0] if member else path)
    except OSError:
        return (0, 0)
    return (stat.st_mtime_ns, stat.st_size)


def input_stamp(path: str) -> list:
    """What tells a replaced input from the one a job read: ``[mtime_ns, size]`` of a local file (:func:`file_stamp`),
    ``["zip", CRC-32, size]`` of a local or remote zip's member, ``["tar", mtime, size, header checksum]`` of a local
    tar's (an archive with a scene added redid all its scenes; a remote tar's member goes by the archive's version),
    ``[version]`` of an object on a web server or object storage (its ETag, else its size and modification time:
    one request), ``[None]`` for one that cannot be reached or whose server names no version (never taken for the
    one read before)."""
    from ..storage import network_object, object_version
    from .archive import member_stamp

    url = network_object(path)
    if url:
        return [object_version(url)]
    return member_stamp(path) or list(file_stamp(path))  # an archive's member by its own stamp


class ImageSource(ABC):
    """A channel-first image ``(C, *spatial)`` read by region."""

    path: str
    selects_bands: ClassVar[bool] = False  # takes ``preprocess.bands`` (raster bands, volumes of a 4D NIfTI)

    @property
    @abstractmethod
    def shape(self) -> tuple[int, ...]:
        """``(channels, *spatial)``."""

    @property
    @abstractmethod
    def geometry(self) -> Geometry:
        """Where the voxels are in the world."""

    @abstractmethod
    def read(self, region: Region) -> np.ndarray:
        """The ``(C, *region)`` block of the image, ``region`` inside the image."""

    @property
    def has_invalid(self) -> bool:
        """Whether the image marks some pixels invalid (nodata value, mask or alpha band)."""
        return False

    def read_valid(self, region: Region) -> np.ndarray | None:
        """Validity of ``region`` (True = valid), or None when every pixel is valid."""
        return None

    def read_with_valid(self, region: Region) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`read` and :meth:`read_valid` of one region (a source may derive one from the other)."""
        return self.read(region), self.read_valid(region)

    def with_nodata(self, values: tuple[float, ...]) -> ImageSource:
        """This image with its pixels invalid where every band holds its nodata value (``values``, one a band of
        the file: a STAC Item's ``raster:bands``), in place of its own mask: GDAL rasters; any other keeps its own,
        with a warning."""
        logging.getLogger(__name__).warning("%s: the nodata values %s that its STAC raster:bands declare are applied "
                                            "to GDAL rasters, not this input: its own mask is used", self.path,
                                            list(values))  # fmt: skip
        return self

    @property
    def floating(self) -> bool:
        """Whether values are floats, which may be NaN or infinite: invalid pixels, like nodata."""
        return False

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def channels(self) -> int:
        return self.shape[0]


def open_source(path: str, spatial_dims: int, bands: list[int] | None = None, sliced: bool = False) -> ImageSource:
    """The reader for ``path``, chosen by its format (:func:`tilemask.formats.for_path`); ``sliced``: a 2D model
    over a volume's slices (``inference.slice_axis``), whose image has 3 axes."""
    from ..formats import for_path

    source = for_path(path).open_source(path, spatial_dims, bands)
    if bands and not source.selects_bands:
        raise InputError(f"{path}: preprocess.bands applies to rasters (bands) and NIfTI (volumes of a 4D file)")
    if sliced and len(source.spatial_shape) != spatial_dims:
        raise InputError(f"{path}: has {len(source.spatial_shape)} spatial axes, no volume for inference.slice_axis "
                         "(a 2D model over a volume's slices); leave slice_axis out to run the 2D model over the image")
    if len(source.spatial_shape) != spatial_dims:
        hint = "; inference.slice_axis runs a 2D model over a volume's slices" if spatial_dims == 2 else ""
        raise InputError(f"{path}: has {len(source.spatial_shape)} spatial axes but the model is {spatial_dims}D{hint}")
    if min(source.shape) < 1:  # a header that gives an axis of length 0 (or less): nothing to segment
        unit = "channels" if min(source.spatial_shape) >= 1 else "voxels" if spatial_dims == 3 else "pixels"
        raise InputError(f"{path}: its axes are {tuple(source.spatial_shape)}: an image of no {unit}")
    return source


def usable_geometry(path: str, geometry: Geometry, origin: str | None = None) -> Geometry:
    """``geometry``, refused (exit 2) where it cannot place the pixels or voxels (not finite, singular: a scale of
    0; :func:`tilemask.geometry.geometry_problem`); the line says where it comes from where that is not the
    file's own georeferencing."""
    problem = geometry_problem(geometry)
    if problem:
        raise InputError(f"{path}: {problem}" + (f"; it comes from {origin}" if origin else ""))
    return geometry
