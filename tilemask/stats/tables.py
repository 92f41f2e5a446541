"""Class names and table writers.

Tables are written by suffix: ``.parquet`` (GeoParquet when the table keeps a
geometry, plain Parquet otherwise), ``.gpkg`` (GeoPackage; a table without
geometry becomes an attribute-only layer), ``.csv`` (geometry, if any, as WKT)
and ``.json`` (a list of records).  Files are written under a temporary name
and renamed into place, so a failed run leaves nothing that looks finished.
Parquet and GeoPackage tables, and the scores' JSON, carry tilemask's mark
(:data:`tilemask.formats.PRODUCT_MARK`), so that ``--overwrite`` replaces only
tables tilemask wrote; a CSV or a JSON list of records has no place for one.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..classes import ClassNames, class_name, named_values
from ..errors import InputError, OutputConflict, OutputError, UsageError, option
from ..formats import PRODUCT_MARK, product_mark, product_written_by_tilemask
from ..outputs import atomic_path, check_spatial_index, check_writable

logger = logging.getLogger(__name__)

TABLE_SUFFIXES = (".parquet", ".gpkg", ".csv", ".json")


def class_names(values: Iterable[int], names: ClassNames | None, warn_below_0: bool = True) -> dict[int, str]:
    """Name of each label value: ``names[v]`` when given, else ``class_<v>``.

    Every named class is listed (in value order), then the other values found. Names that repeat are refused.
    Values below 0 that are not named are warned of (``warn_below_0``).
    """
    named = {i: class_name(names, i) for i in named_values(names)}
    below = [value for value in sorted(int(v) for v in values) if value < 0 and value not in named]
    if below and warn_below_0:  # a CT given as labels: some 2,000 classes, without a word (a review)
        logger.warning("the labels hold %d value(s) below 0, down to %d, each counted as a class: is this a scan "
                       "rather than a label image? (a value the file declares as nodata is not counted)",
                       len(below), below[0])  # fmt: skip
    for value in sorted(int(v) for v in values):
        named.setdefault(value, class_name(names, value))
    seen: dict[str, int] = {}
    for value, name in sorted(named.items()):
        if name in seen:  # one would hide the other's columns (names given with --classes are checked before)
            raise InputError(f"class names repeat: labels {seen[name]} and {value} are both named {name!r}")
        seen[name] = value
    return dict(sorted(named.items()))


def parse_classes(text: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"a,b,c"`` or a list into class names for label values 0, 1, 2, ..."""
    if text is None:
        return None
    if not isinstance(text, str) and not (isinstance(text, Sequence) and all(isinstance(n, str) for n in text)):
        raise UsageError(f"{option('classes')}: names of label values 0, 1, ...: 'a,b,...' or a list of str, not "
                         f"{type(text).__name__} {text!r}")  # fmt: skip
    names = tuple(n.strip() for n in (text.split(",") if isinstance(text, str) else text))
    if not names or any(not n for n in names):
        raise InputError(f"{option('classes')}: expected comma-separated names, got {text!r}")
    if len(set(names)) != len(names):
        raise InputError(f"{option('classes')}: names repeat in {text!r}")
    for value, name in enumerate(names):
        generated = re.fullmatch(r"class_(-?\d+)", name)
        if generated and int(generated[1]) != value:  # an unnamed label's name: one would hide the other's columns
            raise InputError(f"{option('classes')}: {name!r} names label {value}, and is the name of label "
                             f"{generated[1]} when it has none; choose another name")  # fmt: skip
    return names


def check_table_path(path: str | os.PathLike, inputs: Sequence = (), suffixes: Sequence[str] = TABLE_SUFFIXES) -> Path:
    """The output path, checked before any work: a known suffix, an existing folder a file can be made in, and
    none of ``inputs`` (paths or URLs; None for an input not given).  A URL is refused: ``Path("s3://b/t.csv")`` is
    ``./s3:/b/t.csv``, where a table was written (a review's)."""
    if "://" in str(path):
        raise InputError(f"{path}: written to a local file system, not to object storage or over HTTP; "
                         "write it here and copy it there")  # fmt: skip
    path = Path(path)
    for given in inputs:
        if given is not None and "://" not in str(given) and os.path.realpath(given) == os.path.realpath(path):
            raise InputError(f"{path}: the output is an input ({given}); refused to overwrite it")
    if path.suffix.lower() not in suffixes:
        kind = "table " if suffixes == TABLE_SUFFIXES else ""
        raise InputError(f"{path}: unknown {kind}format, use one of {', '.join(suffixes)}")
    if product_written_by_tilemask(path) is False:  # the Python functions replaced one too (a user's GeoPackage)
        raise OutputConflict(f"{path} exists and was not written by tilemask; refused to replace it")
    if not path.parent.exists():
        raise InputError(f"{path}: the folder {path.parent} does not exist")
    check_writable(path.parent)
    return path


def write_table(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``frame`` (a DataFrame or GeoDataFrame) to ``path`` by suffix, atomically (``path`` checked by
    :func:`check_table_path` before the work)."""
    path = Path(path)
    suffix = path.suffix.lower()
    has_geometry = hasattr(frame, "geometry") and "geometry" in frame.columns
    try:
        with atomic_path(path) as tmp:
            if suffix == ".parquet":
                _write_parquet(frame, tmp, has_geometry)
            elif suffix == ".gpkg":
                import pyogrio

                # the layer's metadata: a GeoPackage's dataset item is copied to a .aux.xml by every read
                frame = _lists_as_json(frame)
                pyogrio.write_dataframe(frame, tmp, driver="GPKG", layer=path.stem, layer_metadata=product_mark(),
                                        layer_options=_gpkg_fid_options(frame.columns))  # fmt: skip
                if has_geometry:
                    check_spatial_index(tmp, path)
            elif suffix == ".csv":
                plain = _lists_as_json(pd.DataFrame(frame))
                if has_geometry:
                    plain["geometry"] = frame.geometry.to_wkt(rounding_precision=-1)  # as they are, not to 6 decimals
                plain.to_csv(tmp, index=False)
            else:
                plain = pd.DataFrame(frame.drop(columns="geometry") if has_geometry else frame)
                Path(tmp).write_text(json.dumps(to_records(plain), indent=2) + "\n")
    except OutputError:
        raise  # named already (a full disk)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the table: {exc}") from None
    logger.info("wrote %s (%d rows)", path, len(frame))
    return path


def _lists_as_json(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its cells of lists (a region key of a GeoJSON's IntegerList, read as arrays) as JSON text, as
    a JSON table keeps them: a CSV or a GeoPackage took numpy's print of the array (``[ 0 10]``), which no reader
    parses and numpy cuts past 1,000 items."""
    listed = [c for c in frame.columns if frame[c].dtype == object and frame[c].map(_is_list).any()]
    if not listed:
        return frame
    frame = frame.copy()
    for c in listed:
        frame[c] = frame[c].map(lambda v: json.dumps(jsonable(v)) if _is_list(v) else v)
    return frame


def _is_list(value) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def _gpkg_fid_options(columns) -> dict:
    """A GeoPackage table's FID column named apart from its fields: GDAL takes a field named ``fid`` (any case; a
    region key so named) for the FID, failing a text one (``Error adding field 'fid'``) and hiding an integer one
    from the table's fields."""
    names = {str(c).lower() for c in columns}
    if "fid" not in names:
        return {}
    fid = next(f"fid_{i}" for i in range(1, len(names) + 2) if f"fid_{i}" not in names)
    return {"FID": fid}


def _write_parquet(frame: pd.DataFrame, path: str, has_geometry: bool) -> None:
    """``frame`` as Parquet (GeoParquet with a geometry, as ``GeoDataFrame.to_parquet`` writes it), tilemask's mark
    (:data:`PRODUCT_MARK`) in its Arrow schema's metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if has_geometry:  # GeoParquet as geopandas writes it (its ``geo`` metadata), read back to add the mark
        frame.to_parquet(path, index=False)
        table = pq.read_table(path)
    else:
        table = pa.Table.from_pandas(pd.DataFrame(frame), preserve_index=False)
    mark = {key.encode(): value.encode() for key, value in product_mark().items()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **mark})
    pq.write_table(table, path, compression="snappy")


def write_json(data: dict, path: str | os.PathLike) -> Path:
    """``data`` as a JSON object whose first key is tilemask's mark (:data:`PRODUCT_MARK`: its version)."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            marked = {**product_mark(), **{k: v for k, v in data.items() if k != PRODUCT_MARK}}
            Path(tmp).write_text(json.dumps(jsonable(marked), indent=2) + "\n")
    except OutputError:  # a full disk, named with the file already
        raise
    except OSError as exc:
        raise OutputError(f"{path}: cannot write: {exc}") from None
    return path


def to_records(frame: pd.DataFrame) -> list[dict]:
    return [jsonable(r) for r in frame.to_dict(orient="records")]


def jsonable(value):
    """Plain JSON values: numpy scalars and arrays to Python, NaN to null, dates and times to ISO 8601 text (a
    GeoPackage's DateTime key, a pandas Timestamp: ``TypeError: ... not JSON serializable`` after the counting)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):  # an array: a GeoJSON's list field, as pyogrio reads it
        return [jsonable(v) for v in value]
    if isinstance(value, np.datetime64):  # .item() of nanoseconds is an int
        value = pd.Timestamp(value)
    if isinstance(value, np.generic):
        value = value.item()
    if value is pd.NaT:
        return None
    if isinstance(value, (datetime.date, datetime.time)):  # datetime.datetime and pd.Timestamp too
        return value.isoformat()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
