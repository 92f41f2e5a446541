"""The statistics tables tilemask wrote, as JSON records, exactly as stored (``/stats``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from fastapi import HTTPException


def records_json(path: Path) -> str:
    """``path`` (``.csv``, ``.parquet``, ``.json``, ``.gpkg``) as a JSON list of records; geometries (GeoParquet's
    WKB) as WKT; a GeoPackage's attributes only."""
    try:
        frame = _read(path)
    except (ValueError, OSError) as exc:
        raise HTTPException(422, f"{path.name}: not a table: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    for column in frame.columns:
        values = frame[column]
        if values.dtype == object and values.map(lambda v: isinstance(v, bytes)).any():  # GeoParquet's WKB
            import shapely

            frame[column] = [shapely.from_wkb(v).wkt if isinstance(v, bytes) else v for v in values]
    return frame.to_json(orient="records", double_precision=15, date_format="iso")


def _read(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return pd.read_csv(path)
    if suffix == ".json":
        return pd.read_json(path, orient="records")
    if suffix == ".parquet":
        return pd.read_parquet(path)
    import pyogrio

    return pyogrio.read_dataframe(path, read_geometry=False)
