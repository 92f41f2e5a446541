"""The statistics tables tilemask wrote, as JSON records, exactly as stored (``/stats``).

No type is guessed from what a value looks like: a region code ``01001`` stays the text ``"01001"``, not the
number 1001. A CSV column is numbers only when every one of its cells is written as a JSON number (``-12``,
``0.25``, ``1e-3``; empty cells and ``nan`` / ``inf`` are null), and then each number keeps its value: floats go
out through Python's ``repr``, the shortest text that reads back as the same double, and integers of any size as
they are. JSON records are passed on as parsed; Parquet and GeoPackage columns keep their stored types
(pyarrow, OGR's Arrow stream).
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import re
from decimal import Decimal
from pathlib import Path

from fastapi import HTTPException

JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
NOT_A_NUMBER = {"", "nan", "NaN", "NAN", "inf", "-inf", "Inf", "-Inf", "Infinity", "-Infinity"}  # null in numbers


def records_json(path: Path) -> str:
    """``path`` (``.csv``, ``.parquet``, ``.json``, ``.gpkg``) as a JSON list of records; geometries (GeoParquet's
    WKB) as WKT; a GeoPackage's attributes only."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".json"):
        try:
            rows = _csv_records(path) if suffix == ".csv" else _json_records(path)
        except (ValueError, csv.Error) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else repr(exc)
            raise HTTPException(422, f"{path.name}: not a table: {reason}") from None
    else:  # what the readers raise on a damaged file goes to the route, which names the file (422)
        rows = _stored_records(path)
    return json.dumps([{str(k): _plain(v) for k, v in row.items()} for row in rows], allow_nan=False)


def _json_records(path: Path) -> list[dict]:
    rows = json.loads(path.read_bytes(), parse_constant=lambda _: None)  # NaN, Infinity: null
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError("not a list of records")
    return rows


def _stored_records(path: Path) -> list[dict]:
    """A Parquet file's or GeoPackage's rows, each value of its column's stored type."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        geo = json.loads((table.schema.metadata or {}).get(b"geo", b"{}"))
        wkb = set(geo.get("columns", {})) if isinstance(geo, dict) else set()
        return [{k: _wkt(v) if k in wkb else v for k, v in row.items()} for row in table.to_pylist()]
    import pyogrio

    return pyogrio.read_arrow(path, read_geometry=False)[1].to_pylist()


def _csv_records(path: Path) -> list[dict]:
    """The rows of a CSV file, each cell its text, or a number where its whole column is written as numbers."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return []
        rows = []
        for line, row in enumerate(reader, start=2):
            if len(row) > len(header):
                raise ValueError(f"line {line}: {len(row)} fields, the header names {len(header)}")
            if row:
                rows.append(row + [""] * (len(header) - len(row)))
    numeric = [
        any(r[i] not in NOT_A_NUMBER for r in rows)
        and all(r[i] in NOT_A_NUMBER or JSON_NUMBER.fullmatch(r[i]) for r in rows)
        for i in range(len(header))
    ]
    return [{name: _number(cell) if numeric[i] else cell for i, (name, cell) in enumerate(zip(header, row))}
            for row in rows]  # fmt: skip


def _number(text: str) -> int | float | None:
    if text in NOT_A_NUMBER:
        return None
    return int(text) if re.fullmatch(r"-?[0-9]+", text) else float(text)


def _wkt(value):
    import shapely

    return shapely.from_wkb(value).wkt if isinstance(value, bytes) else value


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
