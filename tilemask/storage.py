"""Files on object storage (``s3://``, ``gs://``, ``az://``) and web servers, for the workers that read them.

Rasters are read in place by GDAL (``/vsis3/`` and friends, range requests):
:func:`gdal_options` points GDAL at the S3 endpoint the usual AWS variables
name (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, as boto3 reads them), so
an S3-compatible server (MinIO, Ceph, moto) works as AWS does; credentials come
from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE`` as GDAL
and boto3 read them.

Readers that need a local file (weights for torch, NIfTI for nibabel) get
:func:`local_copy`: the object fetched once per machine with fsspec (``s3fs``
for S3: ``pip install 'tilemask[s3]'``) into a scratch folder
(``$TILEMASK_SCRATCH``, else the system's temporary folder), named by the URL and
the object's ETag (a changed object is fetched again), renamed into place only
when whole.  Archive members (``/vsizip/``, ``/vsitar/``) are extracted the same
way (:mod:`tilemask.sources.archive`).

Outputs and job folders may be on object storage too (:func:`is_remote`): the
few file operations :mod:`tilemask.outputs` and :mod:`tilemask.jobs` need
(exists, remove, list, upload, publish) are here, on fsspec's file systems.
S3 has no rename: a staged object is published by a server-side copy (the
destination appears whole) and a staged Zarr folder by copying its objects with
the root ``zarr.json`` last, so a reader finds no group until every chunk is
there.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO
from urllib.parse import unquote_plus, urlsplit

from .errors import InputError, OutputError, TilemaskError

OBJECT_STORES = ("s3://", "gs://", "az://", "abfs://")
WEB = ("http://", "https://")


def s3_endpoint() -> str | None:
    """The S3 endpoint URL the environment names, as boto3 reads it; None: AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def gdal_options() -> dict[str, str]:
    """GDAL settings for an S3-compatible endpoint named by the AWS variables (unless GDAL's own are set)."""
    endpoint = s3_endpoint()
    if not endpoint or "AWS_S3_ENDPOINT" in os.environ:
        return {}
    url = urlsplit(endpoint)
    return {
        "AWS_S3_ENDPOINT": url.netloc + url.path.rstrip("/"),
        "AWS_HTTPS": "NO" if url.scheme == "http" else "YES",
        "AWS_VIRTUAL_HOSTING": "FALSE",  # path-style requests: what S3-compatible servers answer
    }


def local_copy(path: str, sidecars: bool = False) -> str:
    """A file on this machine holding ``path``: the path itself when local, else a copy made once. ``sidecars``: an
    archive's member is copied with the members beside it of its name (a shapefile's ``.dbf``, ``.shx``, ``.prj``:
    GDAL opened the ``.shp`` alone without them)."""
    from .sources.archive import extract, extract_sidecars, split_member

    if (member := split_member(path)) is not None:
        archive, name = member
        try:
            stat = os.stat(archive)
        except FileNotFoundError:
            raise InputError(f"{path}: no such archive {archive}") from None
        # its inode and change time too: one replaced keeping its size and time (rsync -a, cp -p) was the old copy
        identity = f"{os.path.realpath(archive)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{name}" \
            f"\0{stat.st_ino}\0{stat.st_ctime_ns}" + ("\0sidecars" if sidecars else "")

        def write(target: str) -> None:  # the sidecars first: the member's copy, renamed in place last, is whole
            if sidecars:
                extract_sidecars(path, archive, name, os.path.dirname(target))
            extract(path, archive, name, target)

        return _copy_once("tilemask-archives", identity, name, write)
    if not path.startswith(OBJECT_STORES + WEB):
        return path
    fs, key = _filesystem(path)
    tag = _version(_info(fs, key, path))
    if tag is None:  # no ETag, no modification time: the size alone kept retrained weights of one size for good
        return _copy_by_content(fs, key, path)
    fetch = lambda target: _fetch(fs, key, path, target)  # noqa: E731
    # named by the URL without its credentials: one signed anew is the same object, of the same version
    return _copy_once("tilemask-remote", f"{redacted(path)}\0{tag}", urlsplit(path).path, fetch)


def _copy_by_content(fs, key: str, path: str) -> str:
    """``path`` fetched now, and kept under the hash of its bytes (a server that names no version of it)."""
    staged = scratch("tilemask-remote") / f".fetch.{os.getpid()}.{threading.get_ident()}.part"
    try:
        _fetch(fs, key, path, str(staged))
        with open(staged, "rb") as fetched:
            digest = hashlib.file_digest(fetched, "sha256").hexdigest()
        return _copy_once("tilemask-remote", f"{redacted(path)}\0sha256:{digest}", urlsplit(path).path,
                          lambda target: os.replace(staged, target))  # fmt: skip
    finally:
        staged.unlink(missing_ok=True)


def _fetch(fs, key: str, path: str, target: str) -> None:
    """``fs.get_file``, its failures named as :func:`_info` names them (a body cut short was aiohttp's bare
    ``ClientPayloadError``, a stalled one ``FSTimeoutError: FSTimeoutError``, naming neither the object nor why)."""
    deadline = _gdal_setting("GDAL_HTTP_TIMEOUT") if path.startswith(WEB) else None
    try:
        fs.get_file(key, target)
    except TimeoutError as exc:  # fsspec's FSTimeoutError
        failure: BaseException = _timed_out(exc, deadline)
    except OSError as exc:  # a full or unwritable scratch folder: the machine's, not the object's
        if exc.filename is not None or exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        failure = exc
    except Exception as exc:  # noqa: BLE001 - botocore, aiohttp and fsspec raise many types
        failure = exc
    else:
        return
    raise InputError(f"{path}: download failed: {_named(failure)}") from None


def _info(fs, key: str, path: str) -> dict:
    """``fs.info(key)``: the object's size and version.  On a web server, within ``GDAL_HTTP_TIMEOUT`` in all, as
    GDAL's own request (CURLOPT_TIMEOUT): fsspec asks by HEAD, then by GET where HEAD failed, each under the read
    timeout, so a server that accepts the connection and never answers held it twice as long (60 s by default)."""
    deadline = _gdal_setting("GDAL_HTTP_TIMEOUT") if path.startswith(WEB) else None
    try:
        return fs.info(key, timeout=deadline) if deadline else fs.info(key)  # fsspec's sync takes the deadline
    except TimeoutError as exc:  # fsspec's FSTimeoutError where the deadline passed
        failure: BaseException = _timed_out(exc, deadline)
    except FileNotFoundError as exc:
        unreachable = _unreachable(exc.__cause__)
        if unreachable is None:
            raise InputError(f"{path}: no such object") from None
        failure = unreachable
    except Exception as exc:  # noqa: BLE001 - botocore, aiohttp and fsspec raise many types
        failure = exc
    raise InputError(f"{path}: cannot reach it: {_named(failure)}") from None


def _timed_out(exc: TimeoutError, deadline: float | None) -> TimeoutError:
    """fsspec's bare ``FSTimeoutError`` as the setting whose deadline passed."""
    return TimeoutError(f"no answer in {deadline:g} s (GDAL_HTTP_TIMEOUT)") if deadline else exc


def _named(failure: BaseException) -> str:
    """``Type: first line`` of a store's or the network's error (its type alone when it has no text)."""
    text = str(failure).strip()
    return f"{type(failure).__name__}: {text.splitlines()[0] if text else ''}"


def _unreachable(cause: BaseException | None) -> BaseException | None:
    """fsspec's HTTP file system calls every failed request a FileNotFoundError, its cause the request's error: a
    server that refused the connection, timed out or answered other than 404/410 is that error, not a missing file
    (a NIfTI whose web server died mid-run was 'no such object'). None: the object is not there."""
    try:
        from aiohttp import ClientConnectionError, ClientResponseError
    except ImportError:  # pragma: no cover - fsspec's HTTP needs aiohttp
        return None
    if isinstance(cause, ClientResponseError):
        return None if cause.status in (404, 410) else cause
    return cause if isinstance(cause, (ClientConnectionError, TimeoutError)) else None


def _version(info: dict) -> str | None:
    """What names one version of an object: its ETag, else its size and modification time; None where the server
    gives neither (its size alone told retrained weights of the same network from the old ones)."""
    modified = info.get("LastModified") or info.get("Last-Modified") or info.get("mtime")
    etag = info.get("ETag") or info.get("etag")
    return etag or (f"{info.get('size')}-{modified}" if modified else None)


def object_version(url: str) -> str | None:
    """The version (:func:`_version`, one request) of the object at ``url``; None where it cannot be reached, or
    its server names none."""
    try:
        fs, key = _filesystem(url)
        return _version(_info(fs, key, url))
    except InputError:
        return None


def object_problem(url: str, body: bool = False) -> str | None:
    """Why the object at ``url`` cannot be had, by one request (:func:`_info`: a HEAD on a web server): ``no such
    object``, or ``cannot reach it: ...``; None where it is there, or where it cannot be asked so (a scheme whose
    fsspec package is not installed: s3fs, gcsfs, adlfs).  ``body``: on a web server, a second request for its
    first bytes (:func:`_first_bytes`)."""
    try:
        fs, key = _filesystem(url)
        _info(fs, key, url)
        if body and url.startswith(WEB):
            _first_bytes(fs, key, url)
    except InputError as exc:
        text = str(exc)
        return None if "reading it needs" in text else text.removeprefix(f"{url}: ")
    except ValueError:  # a scheme fsspec does not know
        return None
    return None


def prefix_entries(url: str) -> int:
    """How many objects and prefixes lie directly under ``url`` taken as a prefix (a "folder") on object storage:
    an input given as a folder of scenes (``s3://bucket/scenes/``), which no object is named by.  0 for a web URL,
    or where the store cannot be listed."""
    if not url.startswith(OBJECT_STORES):
        return 0
    try:
        fs, key = _filesystem(url)
        key = key.rstrip("/")
        return len(fs.ls(key, detail=False)) if fs.isdir(key) else 0  # (ls of an object lists the object)
    except Exception:  # noqa: BLE001 - not a prefix, or not listable: the store's own words stand
        return 0


def open_object(url: str) -> IO[bytes]:
    """The object at ``url`` (a URL fsspec reads: :func:`network_object`), opened to read by ranges; one that
    cannot be had is an :class:`InputError` naming it."""
    fs, key = _filesystem(url)
    try:
        return fs.open(key, "rb")
    except Exception as exc:  # noqa: BLE001 - botocore, aiohttp and fsspec raise many types
        raise InputError(f"{url}: cannot reach it: {_named(exc)}") from None


def _first_bytes(fs, key: str, url: str) -> None:
    """Refuse a web server that answers a request's headers and then sends nothing (GDAL said "not recognized as
    being in a supported file format"): the object's first bytes, streamed (a server that ignores ``Range`` sends
    no more than is read), each read within ``GDAL_HTTP_TIMEOUT`` (:func:`storage_options`).  Any answer reached
    it, an error status too (416 for an empty file): GDAL's line stands."""
    import aiohttp

    try:
        with fs.open(key, "rb", block_size=0) as stream:
            stream.read(16)
    except TimeoutError as exc:  # aiohttp's read timeout
        failure = _timed_out(exc, _gdal_setting("GDAL_HTTP_TIMEOUT"))
        raise InputError(f"{url}: cannot reach it: {_named(failure)}") from None
    except aiohttp.ClientConnectionError as exc:  # refused, reset, cut before any answer
        raise InputError(f"{url}: cannot reach it: {_named(exc)}") from None
    except Exception:  # noqa: BLE001 - an answer, whatever its status: the server was reached
        return


# the query parameters that sign a URL: presigned S3 (SigV2; SigV4's are X-Amz-*) and Google Cloud (V2; V4's are
# X-Goog-*) URLs, CloudFront signed URLs, Azure SAS tokens (signed fields and the response headers they fix)
SIGNING = frozenset({"awsaccesskeyid", "googleaccessid", "signature", "expires", "policy", "key-pair-id",
                     "sv", "ss", "srt", "sp", "st", "se", "sip", "spr", "si", "sr", "sdd", "ses", "sig", "skoid",
                     "sktid", "skt", "ske", "sks", "skv", "saoid", "suoid", "scid", "rscc", "rscd", "rsce", "rscl",
                     "rsct"})  # fmt: skip


def unsigned(path: str) -> str:
    """``path`` without the query parameters that sign a web URL (:data:`SIGNING`, ``X-Amz-*``, ``X-Goog-*``): the
    same object signed anew (a new SAS token) is the same input.  Its other parameters, and any other path (a local
    file's ``?`` is its name's), are kept as they are."""
    if "?" not in path or not path.removeprefix("/vsicurl/").startswith(WEB):
        return path
    base, _, query = path.partition("?")
    kept = [p for p in query.split("&") if not _signs(unquote_plus(p.partition("=")[0]).lower())]
    return f"{base}?{'&'.join(kept)}" if kept else base


_URL_IN_TEXT = re.compile(r"[a-z][a-z0-9+.-]*://[^\s'\"<>]+", re.IGNORECASE)
_PASSWORD = re.compile(r"^([a-z][a-z0-9+.-]*://[^/@:\s]*:)[^/@\s]*@", re.IGNORECASE)


# a request's signing headers as botocore's debug lines print them: ``Authorization: AWS4-HMAC-SHA256
# Credential=AKIA.../20261207/..., SignedHeaders=..., Signature=...``, ``'X-Amz-Security-Token': b'...'`` and, in
# its canonical request, ``x-amz-security-token:...``; and its SigV4 signer's own line, ``Signature:\n<hex>``. Only
# there: a folder ``signature=2023/`` or a class ``Credential=x`` is no header (kept, and a job's id with it)
_SIGNING_IN_TEXT = re.compile(r"""(AWS4-HMAC-SHA256\s+Credential=)[^/'"\s,]+"""
                              r"""|(SignedHeaders=[^'"\s,]*,\s*Signature=)[^'"\s,&]+|(^Signature:\n)[0-9a-f]+"""
                              r"""|(X-Amz-Security-Token['"]?:\s*b?['"]?)[^'"\s,]+""",
                              re.IGNORECASE | re.MULTILINE)  # fmt: skip


def redacted(text: str) -> str:
    """``text`` (an error, a report's field, a log line) with the credentials of the URLs it holds left out: a
    password (``user:***@``) and the query parameters that sign a URL (:func:`unsigned`); and a request's signing
    headers (an access key id, a signature, a session token) as botocore's debug lines show them. A URL's trailing
    punctuation (``...?sig=X: cannot open``) stays the text's."""

    def hide(match: re.Match) -> str:
        url = match.group(0)
        tail = len(url) - len(url.rstrip(":,;.)]"))
        url, after = (url[:-tail], url[-tail:]) if tail else (url, "")
        return unsigned(_PASSWORD.sub(r"\1***@", url)) + after

    def unsigning(match: re.Match) -> str:  # the header's name kept, its value hidden
        return next(name for name in match.groups() if name is not None) + "***"

    return _SIGNING_IN_TEXT.sub(unsigning, _URL_IN_TEXT.sub(hide, text))


def redacted_values(value):
    """``value`` (a workflow's dict, as an output's metadata records it) with :func:`redacted` applied to every
    string in it, its lists' and dicts' too."""
    if isinstance(value, str):
        return redacted(value)
    if isinstance(value, dict):
        return {key: redacted_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted_values(item) for item in value]
    return value


def _signs(name: str) -> bool:
    return name in SIGNING or name.startswith(("x-amz-", "x-goog-"))


def network_object(path: str) -> str | None:
    """The URL fsspec reads ``path`` by where it names an object on a web server or object storage (a URL, or the
    name GDAL reads it by: ``/vsis3/b/k`` -> ``s3://b/k``, the inverse of :func:`gdal_path`); None for any other."""
    if path.startswith("/vsicurl/"):
        path = path[len("/vsicurl/"):]
    for scheme, prefix in GDAL_PREFIXES.items():
        if path.startswith(prefix):
            path = scheme + path[len(prefix):]
    return path if path.startswith(OBJECT_STORES + WEB) else None


def _copy_once(kind: str, identity: str, name: str, write: Callable[[str], None]) -> str:
    """``scratch/kind/<hash of identity>/<base name>``, written by ``write`` under a temporary name and
    renamed into place when whole (a reader never sees half a copy); kept for the next reader."""
    folder = scratch(kind) / hashlib.sha256(identity.encode()).hexdigest()[:20]
    target = folder / (os.path.basename(name) or "object")
    if target.exists():
        return str(target)
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / f".{target.name}.{os.getpid()}.{threading.get_ident()}.part"
    try:
        write(str(staged))
        os.replace(staged, target)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return str(target)


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is on object storage (written through fsspec, not the local file system)."""
    return os.fspath(path).startswith(OBJECT_STORES)


GDAL_PREFIXES = {"s3://": "/vsis3/", "gs://": "/vsigs/", "az://": "/vsiaz/", "abfs://": "/vsiaz/"}


def gdal_path(path: str) -> str:
    """The name GDAL reads an object by (``s3://b/k`` -> ``/vsis3/b/k``)."""
    for scheme, prefix in GDAL_PREFIXES.items():
        if path.startswith(scheme):
            return prefix + path[len(scheme):]
    return path


def scratch(kind: str) -> Path:
    """This machine's scratch folder for ``kind`` (``$TILEMASK_SCRATCH``, else the system's temporary folder)."""
    folder = Path(os.environ.get("TILEMASK_SCRATCH") or tempfile.gettempdir()) / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def storage_options(path: str) -> dict:
    """fsspec's options for ``path`` (the S3 endpoint the AWS variables name), for zarr's ``storage_options``.

    A server that stops answering fails a request as GDAL's reads of it do (its settings, :data:`CLOUD_DEFAULTS`
    unless the environment sets them): ``GDAL_HTTP_CONNECTTIMEOUT`` to connect, ``GDAL_HTTP_TIMEOUT`` for a read,
    instead of aiohttp's 5 minutes.  On S3, botocore retries a server error or a timeout ``GDAL_HTTP_MAX_RETRY``
    times (standard mode), and s3fs makes its own 5 attempts over a timeout: a stalled server fails a request after
    ``GDAL_HTTP_TIMEOUT`` x (``GDAL_HTTP_MAX_RETRY`` + 1) x 5 seconds (10 minutes by default; set them lower to
    fail sooner)."""
    options: dict = {}
    if path.startswith(WEB):
        try:
            import aiohttp
        except ImportError:  # fsspec names what it needs when it is asked to reach the server
            return options
        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(
            total=None, sock_connect=_gdal_setting("GDAL_HTTP_CONNECTTIMEOUT"), sock_read=_gdal_setting("GDAL_HTTP_TIMEOUT"),
        )}  # fmt: skip
    if path.startswith("s3://"):
        options["use_listings_cache"] = False  # other processes write the same prefixes
        options["config_kwargs"] = {  # botocore's: a 5xx or a timeout retried as GDAL retries them
            "connect_timeout": _gdal_setting("GDAL_HTTP_CONNECTTIMEOUT"), "read_timeout": _gdal_setting("GDAL_HTTP_TIMEOUT"),
            "retries": {"mode": "standard", "total_max_attempts": int(_gdal_setting("GDAL_HTTP_MAX_RETRY")) + 1},
        }  # fmt: skip
        if s3_endpoint():
            options["client_kwargs"] = {"endpoint_url": s3_endpoint()}
        if os.environ.get("AWS_REQUEST_PAYER", "").lower() == "requester":  # GDAL's setting, as GDAL reads it
            options["requester_pays"] = True  # (a requester-pays bucket refuses a request that does not say so)
        if os.environ.get("AWS_NO_SIGN_REQUEST", "").upper() in ("YES", "TRUE", "ON", "1"):  # GDAL's, for a public
            options["anon"] = True  # bucket: unsigned requests (botocore found no credentials to sign them with)
    return options


def _gdal_setting(name: str) -> float:
    """GDAL's setting ``name`` for its own requests (the environment's, else :data:`CLOUD_DEFAULTS`'), as a number."""
    from .sources.raster import CLOUD_DEFAULTS

    return float(os.environ.get(name) or CLOUD_DEFAULTS[name])


def _reaching(operation: Callable) -> Callable:
    """``operation(path, ...)`` with what the store or the network raised (but a missing object) as one line:
    an :class:`OutputError` naming the path."""

    @functools.wraps(operation)
    def wrapped(path, *args):
        try:
            return operation(path, *args)
        except (FileNotFoundError, TilemaskError):
            raise
        except Exception as exc:  # noqa: BLE001 - botocore, aiohttp and fsspec raise many types
            kind = AccessDenied if isinstance(exc, PermissionError) else OutputError
            raise kind(f"{path}: object storage: {_named(exc)}") from None

    return wrapped


class AccessDenied(OutputError, PermissionError):
    """Object storage refused the credentials or the key: an :class:`OutputError` that is still a
    ``PermissionError``, so that a job folder's checks refuse it before any work (exit 2), as a missing bucket."""


def zarr_options(path: str) -> dict:
    """zarr's ``open`` keywords for ``path``: fsspec's options where it is on object storage or a web server."""
    return {"storage_options": storage_options(path)} if is_remote(path) or os.fspath(path).startswith(WEB) else {}


@_reaching
def exists(path: str) -> bool:
    fs, key = _filesystem(path)
    return fs.exists(key)


@_reaching
def names(folder: str) -> list[str]:
    """The base names of the objects and prefixes directly under ``folder`` (none if there is none)."""
    fs, key = _filesystem(folder)
    try:
        return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(key, detail=False)]
    except FileNotFoundError:
        return []


@_reaching
def remove(path: str) -> None:
    """Remove an object, or every object under a prefix, if there is any."""
    fs, key = _filesystem(path)
    try:
        fs.rm(key, recursive=True)
    except FileNotFoundError:
        pass


@_reaching
def _put(path: str, local: str) -> None:
    fs, key = _filesystem(path)
    fs.put_file(local, key)


def upload(local: str | os.PathLike, path: str) -> None:
    """Put a local file at ``path`` (a multipart upload appears only when whole)."""
    _put(path, os.fspath(local))


@_reaching
def download(path: str, local: str | os.PathLike) -> None:
    """Get the object at ``path`` into the local file ``local``."""
    fs, key = _filesystem(path)
    fs.get_file(key, os.fspath(local))


@_reaching
def put_bytes(path: str, data: bytes) -> None:
    fs, key = _filesystem(path)
    fs.pipe_file(key, data)


@_reaching
def publish(staged: str, path: str) -> None:
    """Put a staged object or Zarr folder at ``path``, replacing what was there, then drop the staged one."""
    fs, source = _filesystem(staged)
    _, target = _filesystem(path)
    if not fs.isdir(source):
        fs.copy(source, target)
        fs.rm(source)
        return
    remove(path)
    keys = [key for key in fs.find(source) if key != source]
    roots = [key for key in keys if key == f"{source}/zarr.json"]
    rest = [key for key in keys if key not in roots]
    for batch in (rest, roots):  # the group's own metadata last: until then no reader sees a group
        if batch:
            fs.copy(batch, [target + key[len(source):] for key in batch])
    fs.rm(source, recursive=True)


def _filesystem(path: str):
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with dask
        raise InputError(f"{path}: reading it needs fsspec") from None
    try:
        return fsspec.core.url_to_fs(path, **storage_options(path))
    except ImportError as exc:
        raise InputError(f"{path}: reading it needs {exc.name or 's3fs'}: pip install 'tilemask[s3]'") from None
