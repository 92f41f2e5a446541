"""Per-class totals of a label image, and zonal statistics over an atlas label image.

Totals: one row per class (``class``, ``value``, ``pixels``/``voxels``,
``area_m2``/``volume_ml``), nodata excluded.

Atlas zonal statistics: one row per atlas label (column ``region``, the label
value; the atlas's 0 and nodata are not regions) with, for every class,
``<class>_pixels``, ``<class>_fraction`` (of the region's valid pixels) and
``<class>_area_m2`` (voxels / volume_ml for volumes).  The atlas must be on the
mask's grid.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ..errors import InputError
from ..sources.labels import LabelImage
from .crosstab import count_pairs
from .measure import Grid, same_grid
from .tables import class_names

logger = logging.getLogger(__name__)


def grid_of(image: LabelImage) -> Grid:
    return Grid(tuple(int(s) for s in image.array.shape), image.geometry)


def excluded_values(image: LabelImage) -> tuple[int, ...]:
    return () if image.nodata is None else (int(image.nodata),)


def class_totals(image: LabelImage, names=None, client=None) -> pd.DataFrame:
    """One row per class: ``class``, ``value``, count and size columns."""
    grid = grid_of(image)
    units = grid.units
    pairs = count_pairs(image.array, None, grid, excluded=excluded_values(image), client=client)
    counts = dict(zip(pairs["cls"], pairs["count"]))
    sizes = dict(zip(pairs["cls"], pairs["size"]))
    named = class_names(counts, names if names is not None else image.class_names)
    return pd.DataFrame(
        {
            "class": list(named.values()),
            "value": np.array(list(named), dtype=np.int64),
            units.count: np.array([counts.get(v, 0) for v in named], dtype=np.int64),
            units.size: np.array([sizes.get(v, 0.0) if grid.sizes_known else np.nan for v in named], dtype=float),
        }
    )


def check_atlas_grid(grid: Grid, atlas: LabelImage, image_path) -> None:
    """Refuse an atlas that is not on the labels' ``grid``: a volume's affine within 1 um, as a NIfTI stores it in
    float32 where a DICOM series or a NIfTI-2 atlas has it in float64 (see :func:`same_grid`)."""
    why = same_grid(grid, grid_of(atlas), 1e-6 if grid.is_volume else 1e-9)
    if why:
        raise InputError(f"{atlas.path}: the atlas is not on the grid of {image_path} ({why})")


def atlas_zonal(image: LabelImage, atlas: LabelImage, names=None, client=None) -> pd.DataFrame:
    """One row per atlas label with per-class counts, fractions and sizes (``atlas`` on the grid of ``image``:
    :func:`check_atlas_grid`)."""
    grid = grid_of(image)
    zone_excluded = (0,) + (() if atlas.nodata is None else (int(atlas.nodata),))
    # the mask's nodata counted, then dropped: an atlas label wholly over it keeps its row, with no pixel (it had
    # none, an exploratory review), as a vector region does
    pairs = count_pairs(image.array, atlas.array, grid, zone_excluded=zone_excluded, client=client)
    zones = sorted(pairs["zone"].unique())
    pairs = pairs[~pairs["cls"].isin(excluded_values(image))]
    return zone_table(pairs, "region", names if names is not None else image.class_names, grid, zones)


def zone_table(pairs: pd.DataFrame, key: str, names, grid: Grid, zones=None) -> pd.DataFrame:
    """Pivot ``zone, cls, count, size`` rows into one row per zone with per-class columns (in ``grid``'s units;
    sizes empty where it has none).

    ``zones`` lists the zones to report (in order) including those with no pixels.
    """
    units = grid.units
    named = class_names(pairs["cls"].unique(), names)
    if zones is None:
        zones = sorted(pairs["zone"].unique())
    counts = pairs.pivot_table(index="zone", columns="cls", values="count", aggfunc="sum", fill_value=0)
    sizes = pairs.pivot_table(index="zone", columns="cls", values="size", aggfunc="sum", fill_value=0.0)
    counts = counts.reindex(index=zones, columns=list(named), fill_value=0)
    sizes = sizes.reindex(index=zones, columns=list(named), fill_value=0.0)
    totals = counts.sum(axis=1).to_numpy(dtype=float)
    table = {key: np.asarray(zones)}
    with np.errstate(invalid="ignore", divide="ignore"):
        for value, name in named.items():
            column = counts[value].to_numpy()
            table[f"{name}_{units.count}"] = column
            table[f"{name}_fraction"] = np.where(totals > 0, column / np.where(totals > 0, totals, 1), np.nan)
            table[f"{name}_{units.size}"] = sizes[value].to_numpy(dtype=float) if grid.sizes_known else np.nan
    return pd.DataFrame(table)
