"""The inputs a workflow lists beyond paths and globs (docs/DESIGN.md section 9): a list file, an archive's
members, a STAC ItemCollection or catalog.  Listing opens no image: a run plans each item when it starts.

* ``{list: FILE}``: one path or URL a line; blank lines and ``#`` comments are
  skipped; relative paths resolve against the list file's folder, a ``file://`` URI is its
  local path (:func:`resolved`).  Here and for
  archives a name's leading ``.`` becomes ``_`` (:func:`visible`).
* ``{archive: FILE, members: GLOB}``: the archive's files whose name (or base
  name) matches, read in place through GDAL's ``/vsizip/`` and ``/vsitar/``
  (NIfTI members are extracted once to scratch, :mod:`tilemask.sources.archive`).
* ``{stac: FILE, assets: [...]}``: one item per STAC Item, named by its id (made
  one file name: :func:`file_name`), its assets stacked as bands in the order
  given (each asset's bands, all on one grid); relative hrefs resolve against the
  STAC file, ``file://`` hrefs are local paths.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import urllib.parse
from pathlib import Path

from .errors import InputError
from .formats import WEB_PREFIXES, stem
from .sources.archive import member_path, member_under, members
from .workflow import REMOTE_PREFIXES, InputItem


def list_items(path: str) -> list[InputItem]:
    if path.startswith(REMOTE_PREFIXES):  # it was read as a local path: "No such file or directory"
        raise InputError(f"input.list: {path}: only a local list file is read; download it (the paths it lists may "
                         "be remote)")  # fmt: skip
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark (Notepad) is not a path
    except OSError as exc:
        raise InputError(f"input.list: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"input.list: {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    folder = os.path.dirname(path)
    files = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    for n, line in enumerate(lines, 1):  # a job's items.jsonl, a catalogue's export: each line was taken for a path
        kind = _json_kind(line)
        if kind and not os.path.lexists(os.path.join(folder, line.strip())):  # a file named [2020] is that file
            raise InputError(f"input.list: {path} line {n} is {kind}, not a path: a list file holds one path or URL "
                             "a line")  # fmt: skip
    if not files:
        raise InputError(f"input.list: {path} lists no input")
    return [InputItem(input_name(f), (f,)) for f in (resolved(f, folder, "input.list") for f in files)]


def _json_kind(line: str) -> str | None:
    """"a JSON object" or "a JSON array" where a list file's line is one (a file may be named ``[2020] a.tif`` or
    ``{x}.tif``); else None."""
    line = line.strip()
    if not line.startswith(("{", "[")):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return {dict: "a JSON object", list: "a JSON array"}.get(type(value))


def archive_items(archive: str, pattern: str) -> list[InputItem]:
    if archive.startswith(REMOTE_PREFIXES):
        raise InputError(f"input.archive: {archive}: only a local archive is listed; copy it here, or list its "
                         "members in input.list as /vsizip/ paths (/vsizip//vsis3/bucket/a.zip/scene.tif)")  # fmt: skip
    names = members(archive, pattern)
    if not names:
        raise InputError(f"input.archive: no member of {archive} matches {pattern!r}")
    return [InputItem(input_name(name), (member_path(archive, name),)) for name in names]


def stac_items(path: str, assets: list[str]) -> list[InputItem]:
    import pystac

    if path.startswith(REMOTE_PREFIXES):
        raise InputError(f"input.stac: {path}: only a local STAC file is read; download it (its assets may stay "
                         "remote)")  # fmt: skip
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
        if not isinstance(document, dict):
            raise ValueError(f"a JSON {type(document).__name__}, not a STAC Catalog, ItemCollection or Item")
        kind = document.get("type")
        unnamed = _asset_without_href(document.get("features") if kind == "FeatureCollection" else [document])
        if unnamed:  # pystac's own error for one: "expected str, bytes or os.PathLike object, not NoneType"
            raise ValueError(f"{unnamed} has no href")
        if kind == "FeatureCollection":
            items = list(pystac.ItemCollection.from_file(path))
        elif kind == "Feature":
            items = [pystac.Item.from_file(path)]
        else:
            items = _catalog_items(pystac.Catalog.from_file(path), path)
    except (OSError, ValueError, TypeError, KeyError, pystac.STACError, pystac.STACTypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise InputError(f"input.stac: cannot read {path}: {reason}") from None
    if not items:
        raise InputError(f"input.stac: {path} holds no STAC Item")
    folder = os.path.dirname(path)
    found = []
    for item in items:
        missing = [name for name in assets if name not in item.assets]
        if missing:
            raise InputError(f"input.stac: item {item.id} has no asset {missing[0]!r} (it has {', '.join(item.assets)})")
        empty = next((name for name in assets if not isinstance(item.assets[name].href, str)
                      or not item.assets[name].href.strip()), None)  # fmt: skip
        if empty is not None:  # "" resolved to the STAC file's folder: "a folder with no DICOM file"
            raise InputError(f"input.stac: item {item.id}'s asset {empty!r} has no href")
        hrefs = [item.assets[name].get_absolute_href() or item.assets[name].href for name in assets]
        hrefs = [resolved(h, _item_folder(item, folder), "input.stac") for h in hrefs]
        nodata = tuple(_declared_nodata(item, name) for name in assets)
        found.append(InputItem(file_name(str(item.id)), tuple(hrefs),  # ids are text, even those written as numbers
                               nodata if any(v is not None for v in nodata) else ()))  # fmt: skip
    return found


def resolved(path: str, folder: str, key: str) -> str:
    """A listed path or an href as the run opens it: a URL as given; a ``file://`` URI (pystac writes them, GDAL
    and pystac read them) as its local path; a relative path against ``folder``, a relative archive's too."""
    if path.startswith(REMOTE_PREFIXES):
        return member_under(path, folder)  # a relative archive's member, /vsizip/scenes.zip/a.tif: as a relative path
    path = local_path(path, key)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(folder, path))


def local_path(path: str, key: str) -> str:
    """A ``file://`` URI as its local path; any other path as given."""
    if path[:7].lower() != "file://":
        return path
    uri = urllib.parse.urlsplit(path)
    if uri.netloc not in ("", "localhost"):
        raise InputError(f"{key}: {path}: a file on another host ({uri.netloc}); give its local path or a URL")
    return urllib.parse.unquote(uri.path)


def _declared_nodata(item, asset: str) -> tuple[float, ...] | None:
    """The nodata value of each band of ``item``'s ``asset`` as its ``raster:bands`` declares it (STAC's raster
    extension: a number, or "nan", "inf", "-inf"), as odc-stac and stackstac mask by it; None where a band declares
    none (GDAL's mask from nodata values is "any band != its nodata": a band without one makes every pixel valid)."""
    bands = item.assets[asset].extra_fields.get("raster:bands")
    if not isinstance(bands, list) or not bands:
        return None
    values = [band.get("nodata") if isinstance(band, dict) else None for band in bands]
    try:
        return tuple(float(v) for v in values) if all(isinstance(v, int | float | str) for v in values) else None
    except ValueError:  # a string other than nan, inf, -inf
        raise InputError(f"input.stac: item {item.id}'s asset {asset!r}: raster:bands nodata {values} is not a "
                         "number, nan, inf or -inf") from None


def _asset_without_href(features) -> str | None:
    """``item X's asset 'a'`` for the first asset of these STAC Items (JSON) whose href is not text; None if none."""
    for feature in features if isinstance(features, list) else ():
        assets = feature.get("assets") if isinstance(feature, dict) else None
        for name, asset in assets.items() if isinstance(assets, dict) else ():
            if isinstance(asset, dict) and not isinstance(asset.get("href"), str):
                return f"item {feature.get('id')}'s asset {name!r}"
    return None


def _item_folder(item, folder: str) -> str:
    """The folder a STAC Item's relative hrefs resolve against, as pystac resolves them: its own file's (a catalog's
    item in ``items/x/x.json``), else the STAC file's (``folder``): a relative archive's ``/vsizip/scenes.zip/a.tif``,
    which pystac takes as absolute, resolved against the catalog's folder."""
    own = item.get_self_href()
    if not own or own.startswith(REMOTE_PREFIXES) or ("://" in own and own[:7].lower() != "file://"):
        return folder  # an ItemCollection's item names none; one on a server is not where its file was read
    with contextlib.suppress(InputError):  # a file:// URI of another host
        return os.path.dirname(local_path(own, "input.stac"))
    return folder


def _catalog_items(catalog, path: str, walked: tuple[str, ...] = ()) -> list:
    """The items of a STAC catalog and of its children, in pystac's order (``get_items(recursive=True)``, which
    followed a child linking back to its parent until Python's recursion limit: exit 1). A child that is one of
    the catalogs it lies under is a ``ValueError`` naming both (the caller's "cannot read")."""
    here = os.path.normpath(catalog.get_self_href() or path)
    if here in walked:
        raise ValueError(f"the catalog {walked[-1]} links to {here}, which it lies under (a loop)")
    items = list(catalog.get_items())
    for child in catalog.get_children():
        items += _catalog_items(child, path, (*walked, here))
    return items


def file_name(name: str) -> str:
    """``name`` (a STAC Item's id, from whoever wrote the catalog) as one file name in the output folder: path
    separators, ``:`` and control characters become ``_``, and a leading ``.`` (``..``, a hidden file) too."""
    return visible(re.sub(r"[\\/:\x00-\x1f]", "_", name)) or "_"


def input_name(path: str) -> str:
    """What ``{stem}`` becomes for an input file: its name less its format's suffix (:func:`stem`); a URL's as
    written, not percent-encoded (``sc%C3%A8ne%20%231.tif`` is ``scène #1``), a decoded ``/`` or control character
    made ``_``; a leading ``.`` made ``_`` (:func:`visible`).  Only the input's name: the paths of outputs read back
    over HTTP keep their encoding (:func:`stem`)."""
    name = stem(path)
    if path.startswith(WEB_PREFIXES):
        name = re.sub(r"[/\x00-\x1f]", "_", urllib.parse.unquote(name))
    return visible(name)


def visible(name: str) -> str:
    """``name`` with a leading ``.`` made ``_`` (``.x`` -> ``_x``): outputs named by it are not hidden from file
    browsers and globs (an archive member or a listed file may be a hidden file)."""
    return "_" + name[1:] if name.startswith(".") else name
