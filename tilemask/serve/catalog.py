"""What a served folder holds: each file classified once (by the format registry), cached by its stamp and its
sidecars' (probabilities, colour table), so that a sidecar published later is seen.

An :class:`Entry` is one thing a viewer can show: a label output (COG, Zarr or
NIfTI, with its class names and colours and the probabilities beside or inside
it), polygons (an OGR layer or GeoParquet with a geometry and a CRS), a
statistics table, a scan (a NIfTI volume tilemask did not write; paired with
the labels on the same voxel grid, which is the grid tilemask writes them on),
a picture (quick looks) or a DICOM Segmentation (to download). Unfinished
outputs, hidden files, staging files and locks are never listed.

What the catalog lists is all that tiles, points, statistics and features ever
open, so it refuses here what could make a reader leave the folder: a raster
that is not a plain GeoTIFF (a VRT under a ``.tif`` name), a vector file whose
driver is not the one its suffix names (an OGR VRT under a ``.geojson`` name),
a Zarr store or a COG's sidecars (``.ovr``, ``.msk``, ``.aux.xml``) or
probabilities that are symlinks out of the folder.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..classes import CYCLE, ClassNames, class_count, class_name, cycled, named_values
from ..formats import CLASS_TABLE_SUFFIX, for_path, nifti_affine_mm
from .paths import hidden, inside, relative, shown

logger = logging.getLogger(__name__)

OGR_DRIVERS = {".gpkg": "GPKG", ".fgb": "FlatGeobuf", ".geojson": "GeoJSON"}  # suffix -> the only driver allowed
TABLE_SUFFIXES = (".csv", ".parquet", ".gpkg", ".json")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
GDAL_SIDECARS = (".ovr", ".msk", ".aux.xml")
LEGEND_CLASSES = 256  # the classes a legend lists by value; beyond them, only those a colour table names


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the folder, POSIX
    kind: str  # labels | probabilities | polygons | table | scan | raster | picture | segmentation (DICOM SEG)
    format: str  # the format registry's name, or the file's suffix
    id: str  # unique in the folder: the stem, or on a clash the relative path with "/" as "--"
    class_names: ClassNames = ()
    nodata: int | None = None
    bounds: tuple[float, float, float, float] | None = None  # lon/lat (CRS84) when georeferenced
    probabilities: str | None = None  # where the probabilities of a label output are (inside the folder)
    shape: tuple[int, ...] = ()
    affine: tuple[tuple[float, ...], ...] | None = None  # volumes: voxel to RAS
    scan: str | None = None  # volumes: the scan on the same grid
    named_beyond: tuple[int, ...] = ()  # labels: values past LEGEND_CLASSES with a name of their own (a colour table)

    @property
    def is_volume(self) -> bool:
        return self.affine is not None

    @property
    def n_classes(self) -> int:
        return class_count(self.class_names) or 2

    def legend(self) -> list[dict]:
        """The first :data:`LEGEND_CLASSES` classes (the values a colour table names, when it names some and not
        others), and beyond them those with a name of their own: not a row for each value up to a label of 1e6."""
        rows = []
        if isinstance(self.class_names, Mapping):
            below = [v for v in named_values(self.class_names) if v < LEGEND_CLASSES]
        else:
            below = range(min(self.n_classes, LEGEND_CLASSES))
        for v in (*below, *self.named_beyond):
            rgba = CYCLE[int(cycled(v))]
            rows.append({"value": v, "name": class_name(self.class_names, v),
                         "color": "#{:02x}{:02x}{:02x}".format(*rgba[:3]), "rgba": list(rgba)})  # fmt: skip
        return rows

    def to_json(self) -> dict:
        out = {"path": self.path, "id": self.id, "kind": self.kind, "format": self.format}
        if self.kind == "labels":
            out["classes"] = self.legend()
            out["nodata"] = self.nodata
            out["probabilities"] = self.probabilities
        if self.kind == "segmentation":
            out["segments"] = list(self.class_names)
        if self.bounds:
            out["bounds"] = list(self.bounds)
        if self.shape:
            out["shape"] = list(self.shape)
        if self.scan:
            out["scan"] = self.scan
        return out


def listed(parts: tuple[str, ...]) -> bool:
    """Whether a path (its parts, relative to the folder) can be an entry: not hidden, not inside a Zarr store."""
    return not hidden(parts) and not any(part.lower().endswith(".zarr") for part in parts[:-1])


class Catalog:
    """The entries of one folder; a file is opened again only when its size or mtime changes."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[str, tuple[tuple, list[Entry]]] = {}
        self._lock = threading.Lock()
        self._listing: tuple[dict[str, tuple], dict[str, Entry]] | None = None  # what it saw, entries by id

    def entries(self) -> list[Entry]:
        """Every entry of the folder, with unique ids and each label volume's scan (on one thread: docs/benchmarks.md,
        "Serving", measured several slower)."""
        found: list[Entry] = []
        stamps: dict[str, tuple] = {}  # each folder walked, and each file left out (it may be whole next time)
        walked: set[str] = set()
        for path, names in self._walk(stamps):
            walked.add(str(path))
            classified = self._classified(path, names)
            if not classified:
                stamps[str(path)] = ("file", *_stamp(path))
            found.extend(classified)
        linked = _link(found)
        with self._lock:
            self._listing = (stamps, {e.id: e for e in linked})
            for key in self._cache.keys() - walked:  # files gone since: a long-lived server's cache stays the folder's
                del self._cache[key]
        return linked

    def find(self, rel: str, *kinds: str) -> Entry | None:
        """The entry at ``rel`` (one file classified, not the whole folder: what each tile asks)."""
        path = self.root / rel
        if not listed(Path(rel).parts) or not path.exists():
            return None
        return next((e for e in self._classified(path) if not kinds or e.kind in kinds), None)

    def linked(self, entry: Entry) -> Entry:
        """``entry`` as :meth:`entries` gives it (its unique id, its scan)."""
        return next((e for e in self.entries() if e.path == entry.path and e.kind == entry.kind), entry)

    def by_id(self, entry_id: str, *kinds: str) -> Entry | None:
        """The entry named ``entry_id``, from the last listing while nothing it saw has changed: a folder's mtime
        (a file added, removed or renamed there, which may change the ids), a file it left out (a copy that was
        not whole yet), the entry's own file and sidecars; else from a new listing. Each of the map's feature
        requests asks this: walking a folder of 2,000 files took 80 ms a request. Not seen until the next
        listing (``/``, ``/collections``, ``/map``, the STAC catalog): another listed file damaged in place (not
        replaced by a rename), whose leaving would give its stem back to a file that shared it. An id the last
        listing did not hold is looked for in a new one (a folder's mtime may not move for a file published in
        the same clock tick as the listing, or on a network file system's cached attributes)."""
        with self._lock:
            listing = self._listing
        if listing is not None and _unchanged(listing[0]) and (entry := listing[1].get(entry_id)) is not None:
            current = self.find(entry.path, entry.kind)
            if current is not None and replace(current, id=entry.id, scan=entry.scan) == entry:
                return entry if not kinds or entry.kind in kinds else None
        entry = next((e for e in self.entries() if e.id == entry_id), None)
        return entry if entry is not None and (not kinds or entry.kind in kinds) else None

    def _classified(self, path: Path, names: frozenset[str] | None = None) -> list[Entry]:
        """``path``'s entries, classified again when it or a sidecar changed; ``names``: what its folder holds
        (from the walk), so that a sidecar absent from it costs no system call."""
        stamp = (_stamp(path), *(_stamp(Path(side), follow=False) if names is None or os.path.basename(side) in names
                                 else () for side in _sidecars(path)))  # fmt: skip
        key = str(path)
        with self._lock:
            cached = self._cache.get(key)
        if cached is None or cached[0] != stamp:
            cached = (stamp, _classify(self.root, path))
            with self._lock:
                self._cache[key] = cached
        return cached[1]

    def _walk(self, stamps: dict[str, tuple] | None = None):
        """Each file and Zarr store to classify, with the names its folder holds; ``stamps`` gets each walked
        folder's stamp, taken before it is listed (so that a change while listing is a change the next time).
        Links to folders are not walked into, so every folder walked is in the root: only a link there may lead
        out and needs resolving (each path resolved was 45% of a listing's time)."""
        stack = [self.root]
        while stack:
            here = stack.pop()
            stamp = _folder_stamp(str(here))
            try:
                with os.scandir(here) as it:
                    children = list(it)
            except OSError:  # unreadable, or removed since its parent was listed (as os.walk, left out)
                continue
            if stamps is not None:
                stamps[str(here)] = stamp
            names = frozenset(child.name for child in children)
            subfolders = []
            for child in sorted((c for c in children if _is_dir(c)), key=lambda c: c.name):
                sub = here / child.name
                if child.name.startswith(".") or (child.is_symlink() and not inside(self.root, sub)):
                    continue
                if child.name.lower().endswith(".zarr"):
                    yield sub, None  # a Zarr store is one entry; never walked into (its arrays are its sidecars)
                elif not child.is_symlink():  # as os.walk: a link to a folder is not walked into
                    subfolders.append(sub)
            stack.extend(reversed(subfolders))  # walked in name order, each before the next (top-down)
            for child in sorted((c for c in children if not _is_dir(c)), key=lambda c: c.name):
                path = here / child.name
                if not child.name.startswith(".") and (not child.is_symlink() or inside(self.root, path)):
                    yield path, names


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _unchanged(stamps: dict[str, tuple]) -> bool:
    """Whether every folder a listing walked (no file added, removed or renamed there) and every file it left out
    still has the stamp it had."""
    return all(
        (("file", *_stamp(Path(path))) if stamp[:1] == ("file",) else _folder_stamp(path)) == stamp
        for path, stamp in stamps.items()
    )


def _folder_stamp(path: str) -> tuple:
    """A folder's mtime and inode (a name added, removed or renamed in it changes its mtime); () when absent."""
    try:
        st = os.lstat(path)
    except OSError:
        return ()
    return ("folder", st.st_mtime_ns, st.st_ino)


def _stamp(path: Path, follow: bool = True) -> tuple:
    """A file's size, mtime and inode (a Zarr store's: its ``zarr.json``'s); () when absent. ``follow=False``:
    a symlink's own (so that swapping the link is a change)."""
    marker = path / "zarr.json" if path.is_dir() else path
    try:
        st = marker.stat() if follow else marker.lstat()
    except OSError:
        return ()
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _sidecars(path: Path) -> list[str]:
    """The files beside (or inside) an output that its entry is read from, and so part of its cache key: they
    can be published after it. Probabilities beside a COG or NIfTI, a NIfTI's colour table, GDAL's sidecars
    of a GeoTIFF (whose symlinks :func:`_sidecars_inside` checks), a Zarr store's arrays. Paths as text: a
    listing asks this of every file."""
    name = path.name.lower()
    if not name.endswith((".tif", ".tiff", ".zarr", ".nii", ".nii.gz")):
        return []
    text = str(path)
    fmt = for_path(text)
    if fmt.zarr_store:
        try:
            return sorted(str(child) for child in path.iterdir() if child.is_dir())  # each array's zarr.json
        except OSError:
            return []
    found = fmt.files(text, probabilities=True)[1:]  # probabilities, colour table
    return found + [text + s for s in GDAL_SIDECARS] if fmt.gdal_raster else found


def _classify(root: Path, path: Path) -> list[Entry]:
    """What ``path`` is, as entries (none when it is nothing a viewer shows, or cannot be opened)."""
    import rasterio

    rel = relative(root, path)
    name = path.name.lower()
    if not (path.is_file() or path.is_dir()):  # a FIFO, socket or device: opening a FIFO waits for a writer, forever
        return []
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 (Python's surrogate escapes): no URL or JSON can name it
        logger.warning("%s: left out of the catalog: its name is not UTF-8; rename it to list it", shown(rel))
        return []
    try:
        if name.endswith((".tif", ".tiff", ".zarr", ".nii", ".nii.gz")):
            with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN=os.environ.get("GDAL_DISABLE_READDIR_ON_OPEN", "TRUE")):
                return _image(root, rel, path)  # sidecars probed one by one, not the folder listed at each open
        if name.endswith(".dcm"):
            return _segmentation(rel, path)
        if name.endswith(CLASS_TABLE_SUFFIX):
            return []  # the class names of NIfTI labels: part of that output, not a table of its own
        if name.endswith((*OGR_DRIVERS, *TABLE_SUFFIXES)):
            return _vector_or_table(rel, path)
        if name.endswith(PICTURE_SUFFIXES):
            return [Entry(rel, "picture", Path(name).suffix[1:], rel)]
    except Exception as exc:  # noqa: BLE001 - a file a viewer cannot open is left out, not an error for the folder
        logger.warning("%s: left out of the catalog: %s", rel, exc)
    return []


def _image(root: Path, rel: str, path: Path) -> list[Entry]:
    from ..sources.labels import open_labels

    fmt = for_path(str(path))
    stem = fmt.stem(rel)
    geotiff = None
    if fmt.gdal_raster:
        geotiff = _geotiff(root, path, fmt)
        if geotiff is None:
            return []
    if fmt.zarr_store and not _store_inside(root, path):
        return []
    if not (geotiff.written_by_tilemask if geotiff is not None else fmt.written_by_tilemask(str(path))):
        if fmt.name == "nifti":
            import nibabel as nib

            from ..sources.nifti import check_length

            img = nib.load(path)
            check_length(str(path), img, img.shape)  # one still being copied is left out, as labels are
            return [Entry(rel, "scan", fmt.name, stem, shape=tuple(int(s) for s in img.shape),
                          affine=_affine(nifti_affine_mm(img)))]  # fmt: skip (in mm, as the labels' reader gives)
        if geotiff is not None:
            return [Entry(rel, "raster", fmt.name, stem, bounds=geotiff.bounds)]
        return []
    if not fmt.is_complete(str(path)):
        return []
    if geotiff is not None and Path(rel).stem.endswith("_probabilities"):
        return [Entry(rel, "probabilities", fmt.name, stem, bounds=geotiff.bounds)]
    if fmt.name == "nifti" and Path(stem).name.endswith("_probabilities"):
        return [Entry(rel, "probabilities", fmt.name, stem)]
    labels = open_labels(str(path))
    if fmt.zarr_store:
        import zarr

        probabilities = rel if fmt.probabilities_key(zarr.open_group(path, mode="r")) else None
    else:
        beside = Path(fmt.probabilities_path(str(path)))
        probabilities = relative(root, beside) if inside(root, beside) else None
    names = labels.class_names or ()
    if not names and fmt.name == "nifti":  # no colour table beside it: as many classes as its header's cal_max says
        import nibabel as nib

        top = int(nib.load(path).header["cal_max"])  # tilemask's reaches the nodata label, which is no class
        top = min(top if labels.nodata is None or top < labels.nodata else labels.nodata - 1, LEGEND_CLASSES - 1)
        names = tuple(class_name((), v) for v in range(max(2, top + 1)))
    beyond = tuple(v for v in named_values(names) if v >= LEGEND_CLASSES and class_name(names, v) != class_name((), v))
    common = {"class_names": names, "nodata": labels.nodata, "probabilities": probabilities,
              "shape": tuple(labels.array.shape), "named_beyond": beyond}  # fmt: skip
    if labels.is_volume:
        return [Entry(rel, "labels", fmt.name, stem, affine=labels.geometry.affine, **common)]
    return [
        Entry(rel, "labels", fmt.name, stem, bounds=_geometry_bounds(labels.geometry, labels.array.shape), **common)
    ]


def _segmentation(rel: str, path: Path) -> list[Entry]:
    """A DICOM Segmentation (tilemask's or another's), listed with its segments' labels to be downloaded: its
    place is a PACS (``output.dicomweb``) and its viewers there. Other DICOM files (the slices of a scan) are
    not listed, nor is a SEG cut short (its pixel data missing or past the end of the file), found as a series'
    slices are (:func:`tilemask.sources.dicom.read_header`)."""
    from ..sources.dicom import read_header

    ds, problem = read_header(str(path))
    if ds.get("Modality") != "SEG":
        return []
    if problem:
        raise ValueError(problem)
    segments = tuple(str(item.get("SegmentLabel", "")) for item in ds.get("SegmentSequence", []))
    return [Entry(rel, "segmentation", "dicom-seg", Path(rel).stem, class_names=segments)]


def _vector_or_table(rel: str, path: Path) -> list[Entry]:
    suffix = path.suffix.lower()
    stem = Path(rel).stem
    if suffix == ".parquet":
        from .features import parquet_geometry

        geo = parquet_geometry(path)
        if geo is not None and geo[0]:
            return [Entry(rel, "polygons", "parquet", stem, bounds=lonlat_bounds(*geo))]
        return [Entry(rel, "table", "parquet", stem)]
    if suffix in OGR_DRIVERS:
        import pyogrio

        from ..ogr import no_pam

        with no_pam():
            info = pyogrio.read_info(path)
        if info.get("driver") != OGR_DRIVERS[suffix]:
            return []  # an OGR VRT (or anything else) under a GeoPackage / FlatGeobuf / GeoJSON name
        if info.get("geometry_type") and info.get("crs"):
            return [Entry(rel, "polygons", suffix[1:], stem, bounds=lonlat_bounds(info["crs"], info["total_bounds"]))]
    if suffix == ".json" and not _records(path):
        return []
    if suffix in TABLE_SUFFIXES:
        return [Entry(rel, "table", suffix[1:], stem)]
    return []


def _records(path: Path) -> bool:
    """Whether a ``.json`` file is a list of records (what tilemask's tables are), read lazily."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        return False
    try:
        rows = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(rows, list) and all(isinstance(r, dict) for r in rows)


@dataclass(frozen=True)
class _GeoTiff:
    written_by_tilemask: bool
    crs_wkt: str | None
    native_bounds: tuple[float, float, float, float]

    @property
    def bounds(self) -> tuple[float, float, float, float] | None:
        """In CRS84 (worked out only for the entries that list them)."""
        return lonlat_bounds(self.crs_wkt, self.native_bounds) if self.crs_wkt else None


def _geotiff(root: Path, path: Path, fmt) -> _GeoTiff | None:
    """What a listing needs of a ``.tif``, from one open; None for a file that is not a GeoTIFF (a VRT, or
    anything else, under that name) or whose sidecars lead out of the folder: never opened."""
    import rasterio
    from rasterio.errors import RasterioError

    if not _sidecars_inside(root, path):
        return None
    try:
        with rasterio.open(path, driver="GTiff") as ds:
            crs_wkt = ds.crs.to_wkt() if ds.crs else None
            return _GeoTiff(fmt.dataset_written_by_tilemask(ds), crs_wkt, tuple(ds.bounds))
    except (RasterioError, OSError):
        return None


def _sidecars_inside(root: Path, path: Path) -> bool:
    """GDAL opens ``.ovr``, ``.msk`` and ``.aux.xml`` beside a GeoTIFF by itself: none may lead out."""
    return all(inside(root, side) for side in (Path(f"{path}{s}") for s in GDAL_SIDECARS) if side.is_symlink())


def _store_inside(root: Path, store: Path) -> bool:
    """Whether every member of a Zarr store stays inside the folder (zarr follows symlinks in a store) and is a
    file or a folder: zarr opening a FIFO (its ``zarr.json``) waited for a writer forever, in a thread that then
    held the server's exit too.  One ``scandir`` a folder; its entries' types cost no call of their own."""
    folders = [store]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_symlink() and not inside(root, Path(entry.path)):
                    return False
                if entry.is_dir(follow_symlinks=False):  # not into a linked folder: its links could loop
                    folders.append(Path(entry.path))
                elif not (entry.is_file() or entry.is_dir()):
                    logger.warning("%s: left out of the catalog: %s is not a file", relative(root, store),
                                   relative(root, Path(entry.path)))  # fmt: skip
                    return False
    return True


def _affine(affine) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(v) for v in row) for row in np.asarray(affine))


def _geometry_bounds(geometry, shape) -> tuple[float, float, float, float] | None:
    from affine import Affine

    if not geometry.crs_wkt:
        return None
    transform = Affine.from_gdal(*geometry.transform)
    xs, ys = zip(*(transform @ corner for corner in ((0, 0), (shape[1], 0), (0, shape[0]), (shape[1], shape[0]))))
    return lonlat_bounds(geometry.crs_wkt, (min(xs), min(ys), max(xs), max(ys)))


def lonlat_bounds(crs, bounds) -> tuple[float, float, float, float] | None:
    """``bounds`` in ``crs`` as CRS84 bounds (minlon > maxlon across the antimeridian), always finite; None
    without either, or when no point of ``bounds`` is on the Earth.

    PROJ's densified edges give the bounds, unless a point of an edge is off the Earth (it moves to inf: the
    corners of a geostationary full disk): then the bounds are those of the points of a grid over ``bounds`` that
    are on it and of the rim between them and the points off it (:func:`_sampled_bounds`)."""
    if crs is None or bounds is None or not np.all(np.isfinite(bounds)):
        return None
    to_lonlat = transformer(str(crs), "OGC:CRS84")
    with np.errstate(invalid="ignore"):
        out = to_lonlat.transform_bounds(*bounds, densify_pts=21)
    if np.all(np.isfinite(out)):
        return _within_180(*(float(v) for v in out))
    return _sampled_bounds(to_lonlat, bounds)


def _within_180(west: float, south: float, east: float, north: float) -> tuple[float, float, float, float]:
    """CRS84 bounds with longitudes past +-180 degrees (a geographic grid of 0..360, which PROJ leaves as they
    are: 175..185.24 was the extent, the STAC bbox and the map's) taken round: minlon > maxlon across 180. A west
    edge on 180 is -180 and an east edge on -180 is 180 (180..182 was a box of no width beside -180..-178)."""
    if east - west >= 360:
        return (-180.0, south, 180.0, north)
    west, east = (lon if -180 <= lon <= 180 else (lon + 180) % 360 - 180 for lon in (west, east))
    return (-180.0 if west == 180 else west, south, 180.0 if east == -180 else east, north)


SAMPLES = 257  # a side of the grid :func:`_sampled_bounds` moves: 66,049 points, about 20 ms, once per file


def _sampled_bounds(to_lonlat, bounds) -> tuple[float, float, float, float] | None:
    """The CRS84 bounds of the points of a ``SAMPLES`` x ``SAMPLES`` grid over ``bounds`` that land on the Earth
    (finite, longitude within +-180 and latitude within +-90 degrees), and of the rim between them and their
    neighbours off it (found by bisection: the grid alone misses 2 degrees of a full disk's longitudes); None
    when none does. Across the antimeridian (their longitudes, taken 0..360, span less than taken -180..180)
    minlon > maxlon."""
    x0, y0, x1, y1 = bounds
    xs, ys = np.meshgrid(np.linspace(x0, x1, SAMPLES), np.linspace(y0, y1, SAMPLES))
    lon, lat, keep = _on_earth(to_lonlat, xs, ys)
    if not keep.any():
        return None
    inside, outside = [], []  # neighbours either side of the rim, along rows and along columns
    for a, b in (((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
                 ((slice(None, -1), slice(None)), (slice(1, None), slice(None)))):  # fmt: skip
        for p, q in ((a, b), (b, a)):
            rim = keep[p] & ~keep[q]
            inside.append(np.stack([xs[p][rim], ys[p][rim]], axis=-1))
            outside.append(np.stack([xs[q][rim], ys[q][rim]], axis=-1))
    on, off = np.concatenate(inside), np.concatenate(outside)
    for _ in range(30):  # each halves the gap: 42 km of a full disk's grid to millimetres
        middle = (on + off) / 2
        landed = _on_earth(to_lonlat, middle[:, 0], middle[:, 1])[2]
        on[landed], off[~landed] = middle[landed], middle[~landed]
    rim_lon, rim_lat, _ = _on_earth(to_lonlat, on[:, 0], on[:, 1])
    lon, lat = np.concatenate([lon[keep], rim_lon]), np.concatenate([lat[keep], rim_lat])
    south, north = float(lat.min()), float(lat.max())
    west, east = float(lon.min()), float(lon.max())
    east360 = np.where(lon < 0, lon + 360, lon)
    if east360.max() - east360.min() < east - west:  # shorter across 180 degrees
        west, east = float(east360.min()), float(east360.max())
        west, east = (west - 360 if west > 180 else west), (east - 360 if east > 180 else east)
    return west, south, east, north


def _on_earth(to_lonlat, xs, ys) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Longitudes and latitudes of the points, and which of them are on the Earth."""
    with np.errstate(invalid="ignore"):
        lon, lat = (np.asarray(v, dtype=float) for v in to_lonlat.transform(xs, ys))
        keep = np.isfinite(lon) & np.isfinite(lat) & (np.abs(lon) <= 180) & (np.abs(lat) <= 90)
    return lon, lat, keep


@functools.lru_cache(maxsize=64)
def transformer(source: str, target: str):
    """A pyproj transformer (x, y order), made once per pair of CRSs: making one takes milliseconds, as long as
    opening the file it is for. pyproj's transformers may be shared by threads."""
    from pyproj import CRS, Transformer

    return Transformer.from_crs(CRS.from_user_input(source), CRS.from_user_input(target), always_xy=True)


def _link(entries: list[Entry]) -> list[Entry]:
    """Unique ids (the stem; on a clash the path, "/" as "--") and each label volume's scan."""
    from collections import Counter

    clashes = Counter(e.id for e in entries)
    scans = [e for e in entries if e.kind == "scan"]
    linked = []
    for e in entries:
        if clashes[e.id] > 1:
            e = replace(e, id=e.path.replace("/", "--"))
        if e.kind == "labels" and e.is_volume:
            twin = next((s for s in scans if s.shape[:3] == e.shape[:3]
                         and np.allclose(s.affine, e.affine, atol=1e-4)), None)  # fmt: skip
            if twin is not None:
                e = replace(e, scan=twin.path)
        linked.append(e)
    return linked
