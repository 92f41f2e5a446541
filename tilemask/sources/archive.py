"""Inputs inside .zip / .tar / .tar.gz archives, named as GDAL names them: ``/vsizip/ARCHIVE/MEMBER``,
``/vsitar/ARCHIVE/MEMBER``.

GDAL reads rasters in place through those paths.  Readers without such access
(nibabel) read a copy of the member that :func:`tilemask.storage.local_copy`
extracts once per machine (:func:`extract`).
"""

from __future__ import annotations

import collections
import contextlib
import fnmatch
import functools
import glob
import gzip
import os
import shutil
import tarfile
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator
from typing import IO

from ..errors import InputError, first_line

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
MEMBER_PREFIXES = ("/vsizip/", "/vsitar/")  # GDAL's paths of an archive's member


def _prefix(archive: str) -> str:
    return "/vsizip/" if archive.lower().endswith(".zip") else "/vsitar/"


def member_path(archive: str, member: str) -> str:
    return f"{_prefix(archive)}{archive}/{member}"


def split_member(path: str) -> tuple[str, str] | None:
    """``(archive, member)`` of a ``/vsizip/`` or ``/vsitar/`` path; None for any other path.  The archive's path
    is GDAL's: after the prefix, ``/abs/a.zip`` (``/vsizip//abs/a.zip/...``) or relative (``/vsizip/a.zip/...``)."""
    if not path.startswith(MEMBER_PREFIXES):
        return None
    rest = path[len("/vsizip/") :]
    lowered = rest.lower()
    for suffix in ARCHIVE_SUFFIXES:
        at = lowered.find(suffix + "/")
        if at >= 0:
            end = at + len(suffix)
            return rest[:end], rest[end + 1 :]
    return None


def member_under(path: str, folder: str) -> str:
    """A ``/vsizip/`` or ``/vsitar/`` path of a member of a relative archive (``/vsizip/scenes.zip/a.tif``) with
    the archive made absolute against ``folder`` (a list file's, the workflow's), as any relative path given there
    is: GDAL reads it against the working directory, which a worker's need not be. Any other path as given."""
    split = split_member(path)
    if split is None or split[0].startswith("/") or "://" in split[0]:
        return path
    archive, member = split  # ~ expanded as in any path of a workflow: GDAL read a folder named ~ (no such archive)
    return f"{path[: len('/vsizip/')]}{os.path.normpath(os.path.join(folder, os.path.expanduser(archive)))}/{member}"


def members(archive: str, pattern: str, named: str | None = None) -> list[str]:
    """The files in ``archive`` whose name (or base name) matches ``pattern`` (fnmatch), sorted; macOS resource
    forks are no files (:func:`is_resource_fork`). Its errors name ``input.archive``, or the path ``named`` that
    was read (a shapefile's sidecars: ``stats.regions``, ``--regions``), with no advice about input.members."""
    said = f"{named}: " if named is not None else "input.archive: "
    narrow = "" if named is not None else ", or narrow input.members"
    if not archive.lower().endswith(ARCHIVE_SUFFIXES):
        raise InputError(f"{said}{archive}: not a .zip, .tar, .tar.gz or .tgz archive")
    try:
        if archive.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:  # Windows' zips may separate folders with "\": GDAL reads "/"
                names = [i.filename.replace("\\", "/") for i in zf.infolist() if not i.is_dir()]
        else:
            names = [name for name, *_ in _tar_listing(archive, *_local_version(archive))]
    except FileNotFoundError:
        raise InputError(f"{said}no such file {archive}") from None
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error) as exc:  # zlib's: a .tar.gz's
        raise InputError(f"{said}{archive}: cannot read the archive: {exc}") from None  # stream damaged
    names = [n for n in names if not is_resource_fork(n)]
    found = sorted(n for n in names if fnmatch.fnmatch(n, pattern) or fnmatch.fnmatch(os.path.basename(n), pattern))
    twice = [a for a, b in zip(found, found[1:]) if a == b]  # an archive appended to: GDAL reads one of them
    if twice:
        raise InputError(f"{said}{archive}: it holds {found.count(twice[0])} members named {twice[0]} (GDAL "
                         f"reads only one of them); pack it again with each name once{narrow}")  # fmt: skip
    for name in found:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # a tar's bytes in another encoding: Python's surrogate escapes
            shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise InputError(f"{said}{archive}: the member {shown} is not named in UTF-8, which GDAL needs; "
                             f"{'narrow input.members, or ' if named is None else ''}rename it") from None  # fmt: skip
    return found


def is_resource_fork(name: str) -> bool:
    """Whether a member is macOS metadata, not a file: a ``._x`` AppleDouble file (``tar`` on macOS writes one
    beside each file with extended attributes) or anything under ``__MACOSX/`` (Finder's Compress), which
    Finder and ``ditto`` do not extract as files."""
    return os.path.basename(name).startswith("._") or name.split("/", 1)[0] == "__MACOSX"


def _gdal_name(name: str) -> str:
    """A tar member's name as GDAL's ``/vsitar/`` reads it: without a leading ``./``."""
    return name[2:] if name.startswith("./") else name


def archive_problem(path: str) -> str | None:
    """Why GDAL cannot open the ``/vsizip/`` or ``/vsitar/`` ``path`` of a local archive, where the archive says:
    it is not there, cannot be read (cut short, not an archive), holds no such member, names it with ``..``, or
    compressed it in a way GDAL does not read; None otherwise. GDAL says "does not exist in the file system" or
    "cpl_unzOpenCurrentFile() failed" for them."""
    split = split_member(path)
    if split is None:
        return None
    archive, member = split
    if archive.startswith("/vsi") or "://" in archive:
        return None  # a remote archive (/vsizip//vsicurl/https://...): GDAL says what is wrong at the read
    if not os.path.isfile(archive):
        return None if os.path.exists(archive) else f"no such archive {archive}"
    try:  # its own name alone: another member held twice or not named in UTF-8 is that member's problem
        names = members(archive, glob.escape(member))
    except InputError as exc:
        return str(exc).removeprefix("input.archive: ")
    if member not in names:
        return f"{archive} has no member {member}"
    if ".." in member.split("/"):
        return f"{archive}: its member {member} is named with '..', which GDAL does not read; narrow input.members"
    seen = None if archive.lower().endswith(".zip") else _ustar_name(archive, member)
    if seen is not None and seen != member:
        return (f"{archive}: its member {member} is named in a pax header, which GDAL's /vsitar/ does not read (it "
                f"reads the name {seen!r}); pack the archive again with GNU tar (tar --format=gnu) or as a zip")  # fmt: skip
    if _is_dicom(archive, member):
        return (f"{archive}: its member {member} is a DICOM file; a DICOM series is read from its folder: extract "
                "the archive and give the series' folder as the input")  # fmt: skip
    if archive.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            method = next(i.compress_type for i in zf.infolist() if i.filename.replace("\\", "/") == member)
        if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            name = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA"}.get(method, f"method {method}")
            return (f"{archive}: its member {member} is compressed with {name}, which GDAL does not read (stored or "
                    "deflate only); pack the archive again with deflate")  # fmt: skip
    return None


def _ustar_name(archive: str, member: str) -> str | None:
    """The name a tar's ``member`` has in its own header, the only one GDAL's ``/vsitar/`` reads (GNU tar's long
    name record too), where a pax header names it (Python's tarfile and bsdtar write one for a name that is not
    ASCII, ``sc?ne.tif`` in the header, or longer than 100 bytes, cut there); None where none does."""
    try:
        with tarfile.open(archive) as tf:
            info = next((m for m in tf if _gdal_name(m.name) == member), None)
            if info is None or "path" not in info.pax_headers:
                return None
            tf.fileobj.seek(info.offset_data - tarfile.BLOCKSIZE)  # the member's own header, after the pax one
            header = tf.fileobj.read(tarfile.BLOCKSIZE)
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        return None
    name, prefix = (field.split(b"\0", 1)[0].decode("utf-8", "replace") for field in (header[:100], header[345:500]))
    return _gdal_name(f"{prefix}/{name}" if prefix and header[257:263] == b"ustar\0" else name)


def _is_dicom(archive: str, member: str) -> bool:
    """Whether the member starts as a DICOM Part 10 file does (``DICM`` after its 128-byte preamble)."""
    try:
        with _member(archive, member) as handle:
            return handle.read(132)[128:] == b"DICM"
    except (KeyError, zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, NotImplementedError, zlib.error):
        return False  # a member damaged at its start (zlib's error): the caller's damaged_member says so


def damaged_member(path: str) -> str | None:
    """Why the member of an archive that the ``/vsizip/`` or ``/vsitar/`` ``path`` names does not match its
    checksum; None when it does, or when nothing can be checked (a plain .tar: no checksum of its data). GDAL
    checks none: a damaged member was read as other pixels (exit 0, wrong labels). A zip's member is read once for
    its CRC-32; a .tar.gz's whole stream once for gzip's, which covers the stream, not a member (once per archive
    and version: a batch of its members reads it once). A remote archive (``/vsizip//vsis3/...``,
    ``/vsizip//vsicurl/https://...``) is read so too, by fsspec: the whole member, where GDAL reads a stored one
    by ranges."""
    from ..storage import network_object, object_version

    split = split_member(path)
    if split is None:
        return None
    archive, member = split
    zipped = archive.lower().endswith(".zip")
    if not (zipped or archive.lower().endswith((".tar.gz", ".tgz"))):
        return None
    remote = network_object(archive)
    if remote is not None:  # a server that names no version of it: checked each time, not kept
        version = object_version(remote)
        check = _damage if version is not None else _damage.__wrapped__
        return check(archive, member if zipped else None, remote, version)
    if archive.startswith("/vsi") or "://" in archive or not os.path.isfile(archive):
        return None
    return _damage(archive, member if zipped else None, None, *_local_version(archive))


def member_stamp(path: str) -> list | None:
    """What tells one version of a local archive's member from another: ``["zip", CRC-32, size]`` from a zip's
    central directory, ``["tar", mtime, size, header checksum]`` from a tar's header of it (each read once per
    archive version: a .tar.gz's whole stream is decompressed for it, as for its listing).  None for any other
    path, or an archive that cannot be read (its time and size then stand for it).  The archive's own time and size
    stood for every member: a scene appended to an archive of scenes redid every scene of it.  A tar member
    replaced by one of the same size and time (``tar --mtime``) is not told from it: a tar holds no checksum of
    its data."""
    from ..storage import network_object

    split = split_member(path)
    if split is None or not split[0].lower().endswith(ARCHIVE_SUFFIXES):
        return None
    archive, member = split
    zipped = archive.lower().endswith(".zip")
    remote = network_object(archive)
    if remote is not None:
        return _remote_stamp(remote, member if zipped else None)
    if archive.startswith("/vsi") or "://" in archive or not os.path.isfile(archive):
        return None
    try:
        if zipped:
            info = _zip_directory(archive, *_local_version(archive)).get(member)
        else:
            info = _tar_stamps(archive, *_local_version(archive)).get(member)
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error):
        return None
    return None if info is None else ["zip" if zipped else "tar", *info]


def _remote_stamp(remote: str, member: str | None) -> list:
    """:func:`member_stamp` of a member of the archive at the URL ``remote`` (``/vsizip//vsis3/...``,
    ``/vsizip//vsicurl/https://...``): a zip's member by its CRC-32 and size, read from the central directory of
    the archive's version (its ETag, else its time and size: one request an item, as for any object; the directory
    read by ranges once per version and process), a tar's by the archive's version; ``[None]`` where the server
    names no version, or cannot be reached (redone).  Such a member was stamped ``[0, 0]``: a replaced archive was
    never seen."""
    from ..storage import object_version

    version = object_version(remote)
    if version is None:
        return [None]
    if member is None:
        return [version]
    try:
        zf, names = _remote_zip(remote, os.getpid(), version)
        info = zf.getinfo(names.get(member, member))
    except Exception:  # noqa: BLE001 - not a zip, no such member, the network's: not the member stamped before
        return [None]
    return ["zip", info.CRC, info.file_size]


_listing_lock = threading.Lock()


def _tar_listing(archive: str, *version) -> tuple[tuple[str, int, int, int], ...]:
    """``(member, mtime, size, header checksum)`` of each file in a local tar of ``version``
    (:func:`_local_version`), named as GDAL reads them, read once for its listing (:func:`members`) and its
    members' stamps (:func:`member_stamp`): a .tar.gz's whole stream is decompressed for it (6 s a GB here), and
    the items' stamps are asked from many threads."""
    with _listing_lock:
        return _read_tar_listing(archive, *version)


@functools.lru_cache(maxsize=64)
def _tar_stamps(archive: str, *version) -> dict[str, tuple[int, int, int]]:
    """``{member: (mtime, size, header checksum)}`` of :func:`_tar_listing`."""
    return {name: tuple(stamp) for name, *stamp in _tar_listing(archive, *version)}


@functools.lru_cache(maxsize=64)
def _read_tar_listing(archive: str, *version) -> tuple[tuple[str, int, int, int], ...]:
    with tarfile.open(archive) as tf:  # "tar -C folder ." names "./scan.tif", which GDAL reads as "scan.tif"
        return tuple((_gdal_name(m.name), int(m.mtime), m.size, m.chksum) for m in tf if m.isfile())


@functools.lru_cache(maxsize=64)
def _zip_directory(archive: str, *version) -> dict[str, tuple[int, int]]:
    """``{member: (CRC-32, size)}`` of a local zip of ``version`` (:func:`_local_version`), named as GDAL reads them."""
    with zipfile.ZipFile(archive) as zf:
        return {i.filename.replace("\\", "/"): (i.CRC, i.file_size) for i in zf.infolist() if not i.is_dir()}


def _local_version(archive: str) -> tuple[int, int, int, int]:
    """What tells one version of a local file from another: its inode, time, size and change time (a copy over it
    in place keeping its time and size, ``cp -p`` or ``rsync -a --inplace``, changes only that one: the zip kept
    open read the old member's bytes)."""
    stat = os.stat(archive)
    return stat.st_ino, stat.st_mtime_ns, stat.st_size, stat.st_ctime_ns


@functools.lru_cache(maxsize=256)
def _damage(archive: str, member: str | None, remote: str | None, *version) -> str | None:
    """:func:`damaged_member` of ``archive``, read from disk or from the URL ``remote``; ``version`` tells one
    version of it from another (a file's :func:`_local_version`; an object's ETag or time and size)."""
    try:
        with contextlib.ExitStack() as stack:
            if member is not None and remote is None:  # a local zip's member: through the zip opened once
                handle = stack.enter_context(_member(archive, member))
            elif member is not None and version[0] is not None:  # a remote zip of a version the server names: so
                zf, names = _remote_zip(remote, os.getpid(), *version)
                handle = stack.enter_context(zf.open(names.get(member, member)))
            else:
                source = stack.enter_context(_opened(archive, remote))
                handle = stack.enter_context(_member(archive, member, source) if member is not None
                                             else gzip.open(source))  # fmt: skip
            while handle.read(1 << 22):
                pass
    except (zipfile.BadZipFile, tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as exc:
        damage = exc
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a local file's read error; the network's, named as such
        if remote is not None:
            raise InputError(f"{archive}: cannot read it to check its checksum: {type(exc).__name__}: "
                             f"{first_line(exc)}") from None  # fmt: skip
        if not isinstance(exc, OSError):
            raise
        damage = exc
    else:
        return None
    what = f"its member {member}" if member is not None else "the archive"
    return f"{archive}: {what} is damaged ({damage})"


@contextlib.contextmanager
def _opened(archive: str, remote: str | None) -> Iterator[IO[bytes]]:
    """The archive's bytes: the local file, or the object at ``remote`` read by ranges."""
    if remote is None:
        with open(archive, "rb") as handle:
            yield handle
        return
    from ..storage import open_object

    with open_object(remote) as handle:
        yield handle


def extract(path: str, archive: str, member: str, target: str) -> None:
    """Write ``member`` of ``archive`` (the input ``path`` names) to the file ``target``; a .tar.gz's whole stream
    is checked against gzip's checksum (:func:`damaged_member`, once per archive version): the member's read stops
    at its end."""
    damage = damaged_member(path) if archive.lower().endswith((".tar.gz", ".tgz")) else None
    if damage:
        raise InputError(damage)
    try:
        if not archive.lower().endswith(".zip"):  # a tar appended to (tar -rf): the first copy was read, its last
            held = sum(name == member for name, *_ in _tar_listing(archive, *_local_version(archive)))  # stamped
            if held > 1:
                raise InputError(f"{path}: {archive} holds {held} members named {member} (tar -x gives the last, "
                                 "GDAL the first); pack it again with each name once")  # fmt: skip
        with _member(archive, member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: cannot extract {member} from {archive}: {exc}") from None


def sidecars(archive: str, member: str) -> list[str]:
    """The members of ``archive`` beside ``member`` and named as it is but for their suffix: a shapefile's
    ``districts.dbf``, ``.shx``, ``.prj`` beside its ``districts.shp``, which GDAL reads with it. An archive that
    cannot be read is an :class:`InputError` naming the member's path."""
    folder, stem = os.path.split(member)
    stem = os.path.splitext(stem)[0]
    found = members(archive, glob.escape(stem) + ".*", named=member_path(archive, member))
    return [name for name in found if name != member and os.path.split(name)[0] == folder]


def extract_sidecars(path: str, archive: str, member: str, folder: str) -> None:
    """Write the :func:`sidecars` of ``member`` into ``folder``, each under its base name (renamed into place when
    whole)."""
    for name in sidecars(archive, member):
        target = os.path.join(folder, os.path.basename(name))
        staged = f"{target}.{os.getpid()}.{threading.get_ident()}.part"
        try:
            extract(member_path(archive, name), archive, name, staged)
            os.replace(staged, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)


@contextlib.contextmanager
def _member(archive: str, member: str, source: IO[bytes] | None = None) -> Iterator[IO[bytes]]:
    """``member`` of ``archive``, read from the file ``source`` holding it where given."""
    if archive.lower().endswith(".zip") and source is None:
        zf, names = _local_zip(archive, os.getpid(), *_local_version(archive))
        with zf.open(names.get(member, member)) as handle:
            yield handle
        return
    if archive.lower().endswith(".zip"):
        with zipfile.ZipFile(source) as zf:
            with zf.open(_zip_names(zf).get(member, member)) as handle:
                yield handle
        return
    with tarfile.open(archive, fileobj=source) as tf:  # read up to the member, as GDAL does: a .tar.gz's whole
        info = next((m for m in tf if _gdal_name(m.name) == member), None)  # stream was read for each (getmembers)
        if info is None:
            raise KeyError(f"no member {member}")
        handle = tf.extractfile(info)
        if handle is None:
            raise KeyError(f"{member} is not a file")
        with handle:
            yield handle


def _local_zip(archive: str, *version) -> tuple[zipfile.ZipFile, dict[str, str]]:
    """The local zip ``archive`` opened once per ``version`` (the process and :func:`_local_version`), with
    :func:`_zip_names` (:func:`_zip_once`): ``ZipFile`` reads the whole central directory as it opens, and a batch
    of a zip's members opened it for each (30 ms a member in a zip of 10,000: planning grew with the square of the
    batch). Its members are read through it from several threads, as ``ZipFile`` allows (each read seeks under its
    lock)."""
    return _zip_once(archive, version, lambda: archive)


def _remote_zip(remote: str, *version) -> tuple[zipfile.ZipFile, dict[str, str]]:
    """The zip at the URL ``remote`` opened once per ``version`` (the process and its ETag, or time and size), as
    :func:`_local_zip`: its central directory was read again by ranges for each member checked (97 ms a member of
    a zip of 10,000 on loopback)."""
    from ..storage import open_object

    return _zip_once(remote, version, lambda: open_object(remote))


OPEN_ZIPS = 8  # the zips kept open, each the version of its archive read last
_open_zips: collections.OrderedDict[str, tuple[tuple, zipfile.ZipFile, dict[str, str]]] = collections.OrderedDict()
_open_zips_lock = threading.Lock()


def _zip_once(where: str, version: tuple, source: Callable[[], str | IO[bytes]]) -> tuple[zipfile.ZipFile, dict]:
    """The zip at ``where`` (a path, a URL) as ``version`` of it, opened from ``source()`` unless kept, with
    :func:`_zip_names`. Only the version read last of each archive is kept (a replaced one's was held open, its
    disk space with it, until seven other versions were read), and the last :data:`OPEN_ZIPS` archives read."""
    with _open_zips_lock:
        kept = _open_zips.get(where)
        if kept is not None and kept[0] == version:
            _open_zips.move_to_end(where)
            return kept[1], kept[2]
    zf = zipfile.ZipFile(source())  # outside the lock: another archive's members are read meanwhile
    kept = (version, zf, _zip_names(zf))
    with _open_zips_lock:  # a reader of the version dropped keeps its ZipFile, closed as the last one lets it go
        _open_zips[where] = kept
        _open_zips.move_to_end(where)
        while len(_open_zips) > OPEN_ZIPS:
            _open_zips.popitem(last=False)
    return zf, kept[2]


def _zip_names(zf: zipfile.ZipFile) -> dict[str, str]:
    """A zip's member names as :func:`members` names them (``/`` for a Windows ``\\``) -> as the zip writes them."""
    return {i.filename.replace("\\", "/"): i.filename for i in zf.infolist()}
