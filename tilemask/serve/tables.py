"""The statistics tables tilemask wrote, as JSON records, exactly as stored (``/stats``).

No type is guessed from what a value looks like: a region code ``01001`` stays the text ``"01001"``, not the
number 1001. A CSV column is numbers only when every one of its cells is written as a JSON number (``-12``,
``0.25``, ``1e-3``; ``nan`` / ``inf`` are null), booleans when every cell is ``True`` or ``False`` (as pandas
writes them), else text; an empty cell is null. Numbers keep their value: floats go out as the shortest text
that reads back as the same double (orjson, as Python's ``repr``), integers as they are. Repeated
column names are told apart as pandas reads them (``a``, ``a.1``). JSON records are passed on as parsed; Parquet
and GeoPackage columns keep their stored types (pyarrow, OGR's Arrow stream). The tables are read column by
column, not cell by cell.
"""

from __future__ import annotations

import datetime
import json
import math
from decimal import Decimal
from pathlib import Path

import orjson
from fastapi import HTTPException

JSON_NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
NOT_FINITE = {"nan", "NaN", "NAN", "inf", "-inf", "Inf", "-Inf", "Infinity", "-Infinity"}  # null in a number column


def records_json(path: Path) -> bytes:
    """``path`` (``.csv``, ``.parquet``, ``.json``, ``.gpkg``) as a JSON list of records; geometries (GeoParquet's
    WKB) as WKT; a GeoPackage's attributes only."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            return _dumps(_json_records(path))
        except ValueError as exc:
            raise HTTPException(422, f"{path.name}: not a table: {str(exc).splitlines()[0] or repr(exc)}") from None
    if suffix == ".csv":
        import pandas as pd

        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
            if not isinstance(frame.index, pd.RangeIndex):  # pandas took the first row's extra cells as the index:
                # every value would come under the name of the column before it (a longer row further down it refuses)
                cells, header = frame.index.nlevels + len(frame.columns), len(frame.columns)
                raise ValueError(f"its first row has {cells} cells, its header {header}")
        except (ValueError, UnicodeDecodeError) as exc:  # pandas' ParserError and EmptyDataError are ValueErrors
            raise HTTPException(422, f"{path.name}: not a table: {str(exc).splitlines()[0] or repr(exc)}") from None
        names, columns = list(frame.columns), [_csv_column(frame[name]) for name in frame.columns]
    else:  # what the readers raise on a damaged file goes to the route, which names the file (422)
        names, columns = _stored_columns(path)
    return _dumps([dict(zip(names, row)) for row in zip(*columns)])


def _dumps(records: list) -> bytes:
    """JSON of ``records`` (orjson: NaN and inf are null), or of Python's json where an integer passes 64 bits."""
    try:
        return orjson.dumps(records)
    except orjson.JSONEncodeError:
        return json.dumps(_plain(records), allow_nan=False).encode()


def _json_records(path: Path) -> list:
    rows = json.loads(path.read_bytes(), parse_constant=lambda _: None)  # NaN, Infinity: null
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError("not a list of records")
    return rows


def _csv_column(text) -> list:
    """A CSV column (pandas, every cell as written) as JSON values: numbers, booleans, or text; empty is null."""
    import numpy as np

    empty = (text == "").to_numpy()
    written = text[~empty]
    values = text.to_numpy(dtype=object)
    if len(written) and written.isin({"True", "False"}).all():
        values = values == "True"
    else:
        numbers = written[~written.isin(NOT_FINITE)]
        if len(numbers) and numbers.str.fullmatch(JSON_NUMBER).all():
            empty = empty | text.isin(NOT_FINITE).to_numpy()
            if numbers.str.fullmatch(r"-?[0-9]+").all():  # integers, of any size
                values = [None if gone else int(t) for t, gone in zip(values, empty)]
            else:  # numpy parses text as Python's float does: the same double
                values = np.where(empty, "nan", values).astype(np.float64)
    out = np.asarray(values, dtype=object)
    out[empty] = None
    return out.tolist()


def _stored_columns(path: Path) -> tuple[list[str], list[list]]:
    """A Parquet file's or GeoPackage's columns, each value of its column's stored type."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        geo = json.loads((table.schema.metadata or {}).get(b"geo", b"{}"))
        wkb = set(geo.get("columns", {})) if isinstance(geo, dict) else set()
    else:
        import pyogrio

        from ..ogr import no_pam

        with no_pam():
            table, wkb = pyogrio.read_arrow(path, read_geometry=False)[1], set()
    return list(table.column_names), [_arrow_column(table[n], n in wkb) for n in table.column_names]


def _arrow_column(column, wkb: bool) -> list:
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if wkb:
        import shapely

        return [None if v is None else shapely.from_wkb(v).wkt for v in column.to_pylist()]
    if pa.types.is_floating(kind):  # NaN and inf: null
        return pc.if_else(pc.is_finite(column), column, pa.scalar(None, kind)).to_pylist()
    native = (pa.types.is_integer, pa.types.is_boolean, pa.types.is_string, pa.types.is_large_string)
    if any(test(kind) for test in native):
        return column.to_pylist()
    return [_plain(v) for v in column.to_pylist()]


def _plain(value):
    """``value`` as JSON has it: non-finite floats null, times in ISO 8601, decimals as their exact text, other
    bytes as hex; lists and mappings value by value."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (datetime.date, datetime.time)):  # datetimes too
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    return value
