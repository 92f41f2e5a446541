"""The workflow's ``stats:`` and ``postprocess:`` sections as pydantic models.

```yaml
stats:
  output: out/{stem}_stats.parquet   # .parquet | .gpkg | .csv | .json
  regions: regions.gpkg              # optional: vector file, or a label image (atlas)
  region_id: NAME                    # optional key field of the regions
  coverage: center                   # center | fraction
  instances: false                   # true: one row per instance instead
  connectivity: face                 # face | full
  classes: [background, water]       # optional names for label values 0, 1, ...
postprocess:                         # applied in this order, to every foreground class
  remove_small: 50                   # remove components with fewer pixels/voxels (or "0.5 mL", "100 m2")
  keep_largest: true                 # keep each class's largest component only (MONAI's KeepLargestConnectedComponent)
  fill_holes: true
  opening: 1                         # binary opening, ball radius in pixels/voxels (or "2 mm", "30 m")
  closing: 1                         # binary closing, ball radius in pixels/voxels (or "2 mm", "30 m")
  connectivity: full                 # for all three; unset: MONAI's defaults (face, full, full)
```
"""

from __future__ import annotations

import functools
import os
import string
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, field_validator, model_validator

from ..errors import InputError, first_line
from ..ogr import no_pam

LABEL_IMAGE_SUFFIXES = (".tif", ".tiff", ".zarr", ".nii", ".nii.gz", ".vrt", ".img")


def is_label_image(path: str) -> bool:
    """Whether ``regions`` name a label image (an atlas) rather than a vector file: by its suffix, or labels inside a
    Zarr store (``atlas.ome.zarr/labels/regions``)."""
    from ..formats import zarr_labels_inside_store

    return str(path).lower().rstrip("/").endswith(LABEL_IMAGE_SUFFIXES) or zarr_labels_inside_store(str(path))


def regions_file(path: str) -> str:
    """A local file holding the vector regions at ``path``: itself, or a copy made once of the object it names
    (``s3://``, ``https://``, ``/vsis3/``...: fsspec, with the AWS variables as for the inputs; pyogrio's own GDAL
    knew no S3-compatible endpoint, so such regions failed after the run, its outputs written); a member of a local
    archive (``/vsizip/districts.zip/districts.shp``) extracted once with its sidecars (the ``.dbf``, ``.shx``...),
    a remote archive's (``/vsizip//vsis3/b/districts.zip/...``) from the archive copied once."""
    from ..sources.archive import member_path, split_member
    from ..storage import local_copy, network_object

    path = str(path)
    member = split_member(path)
    if member is not None and (remote := network_object(member[0])) is not None:
        path = member_path(local_copy(remote), member[1])
    return local_copy(network_object(path) or path, sidecars=True)


def check_regions(path: str, region_id: str | None) -> None:
    """What the zonal statistics check of their regions, from the layer's info and attribute table alone: that GDAL
    reads the file, that it holds one layer with geometries, and that their key (``region_id``, when given) is a
    field with unique values, or the layer's feature id column (a GeoPackage's ``fid``); a workflow's ``stats:`` is
    refused before its run predicts anything.  Read once per file."""
    local = regions_file(path)
    stat = os.stat(local)
    _check_regions(path, local, region_id, (stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=16)
def _check_regions(path: str, local: str, region_id: str | None, stamp: tuple[int, int]) -> None:
    import pyogrio

    fid = None
    try:
        if is_geoparquet(path):
            import pandas as pd

            fields = geoparquet_fields(local)
            values = pd.read_parquet(local, columns=[region_id])[region_id] if region_id in fields else None
        else:
            layer = regions_layer(path, local)
            with no_pam():
                info = pyogrio.read_info(local, layer=layer)  # the layer's metadata: no feature read
                fields, fid = list(info["fields"]), info["fid_column"] or None
                values = None
                if region_id in fields:
                    values = pyogrio.read_dataframe(local, layer=layer, columns=[region_id],
                                                    read_geometry=False)[region_id]  # fmt: skip
                elif region_id is not None and region_id == fid:  # a GeoPackage's fid: the layer's feature ids
                    return
    except InputError:
        raise
    except Exception as exc:  # pyogrio raises its own DataSourceError, DataLayerError, ...
        raise regions_unreadable(path, exc, local) from None
    if region_id is not None:
        check_key(path, region_id, fields, values, fid)


def fid_column(local: str, layer: str) -> str | None:
    """The name of the layer's feature id column (a GeoPackage's ``fid``, the first column QGIS shows), None where
    the format names none (a shapefile, a GeoJSON)."""
    import pyogrio

    with no_pam():
        return pyogrio.read_info(local, layer=layer)["fid_column"] or None


def is_geoparquet(path) -> bool:
    """Regions in (Geo)Parquet are read with geopandas (pyarrow): pyogrio's wheels have no Parquet driver, and
    GDAL's ADBC driver claims the file and fails loading libduckdb."""
    return str(path).lower().endswith(".parquet")


def geoparquet_fields(path) -> list[str]:
    """The attribute fields of a GeoParquet file, from its schema; a Parquet file without GeoParquet's ``geo``
    metadata has no geometry (ValueError)."""
    import json

    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    geo = json.loads((schema.metadata or {}).get(b"geo", b"null"))
    if not isinstance(geo, dict) or not geo.get("columns"):
        raise ValueError("a Parquet table without GeoParquet's geo metadata: no geometry")
    return [name for name in schema.names if name not in geo["columns"]]


GDAL_DRIVER_ADVICE = "; It might help to specify the correct driver"  # pyogrio's tail on a format GDAL does not know


def regions_unreadable(path, exc: BaseException, local: str | None = None) -> InputError:
    """The error for regions GDAL cannot read, in one line: its words without pyogrio's advice on driver prefixes
    (``'CSV:path'``), which tilemask does not take, nor the path it repeats (``path``, or the ``local`` copy it
    read)."""
    text = first_line(exc).split(GDAL_DRIVER_ADVICE, 1)[0]
    for shown in {str(path), local or str(path)}:
        for quoted in (f"'{shown}' ", f"{shown}: "):
            text = text.removeprefix(quoted)
    return InputError(f"{path}: cannot read the regions: {text}")


def regions_layer(path, local: str) -> str:
    """The layer of vector regions in the file ``local`` (``path``'s copy): its one layer with geometries. GDAL read
    the first of several (a GeoPackage's second table, a folder's other shapefiles) and the others were left out
    without a word; tilemask takes no layer's name, so a file of several is refused, naming them. Tables without
    geometries (the ``layer_styles`` QGIS saves into a GeoPackage) are not regions and are passed over; pyogrio's
    errors are left to the caller."""
    import pyogrio

    with no_pam():
        layers = [(str(name), geometry) for name, geometry in pyogrio.list_layers(local)]
    spatial = sorted(name for name, geometry in layers if geometry is not None)  # a folder lists them in no order
    if not spatial:
        tables = ", ".join(name for name, _ in layers) or "none"
        raise InputError(f"{path}: the regions hold no layer with geometries (tables: {tables})")
    if len(spatial) > 1:
        raise InputError(f"{path}: the regions hold {len(spatial)} layers ({', '.join(spatial)}); a regions file must "
                         "hold one layer (ogr2ogr one.gpkg FILE LAYER copies one out)")  # fmt: skip
    return spatial[0]


def check_key(path, region_id: str, fields: list[str], values, fid: str | None = None) -> None:
    """``region_id`` names one of the regions' ``fields``, and its ``values`` (a pandas Series) are set (a feature
    with no key gave a row no one could join back; a blank text counts as none, as a shapefile stores a missing
    text) and unique. ``fid``: the name of the layer's feature ids, which a key may name too (unique and set)."""
    import numpy as np

    if region_id not in fields:
        listed = (", ".join(fields) or "none") + (f"; feature id: {fid}" if fid else "")
        raise InputError(f"{path}: region id {region_id!r} is not a field of the regions (fields: {listed})")
    missing = int((values.isna() | values.map(lambda v: isinstance(v, str) and not v.strip())).sum())
    if missing:
        raise InputError(f"{path}: region id {region_id!r} has no value in {missing} of {len(values)} features; "
                         "every region needs a key")  # fmt: skip
    # a key of lists (a GeoJSON's IntegerList, read as arrays): compared by value, not by identity
    if values.map(lambda v: tuple(v) if isinstance(v, (list, np.ndarray)) else v).duplicated().any():
        raise InputError(f"{path}: region id {region_id!r} has repeated values; region keys must be unique")


def _not_bool(value: Any) -> Any:
    """pydantic's lax mode takes ``true`` as 1 where a number is expected; a YAML boolean there is a mistake."""
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


NotBool = BeforeValidator(_not_bool)  # add to every int or float field: Annotated[int, NotBool]


def unused_options(regions, region_id, coverage: str, instances: bool, connectivity: str, flags: bool) -> str | None:
    """Why options that apply only beside another one are refused when that one is not given: ``region_id`` and
    ``coverage: fraction`` key or measure vector regions, ``connectivity: full`` joins instances (they would be
    left unused, and a user left believing they applied); None when none is.  ``flags``: named as the command's
    options, else as the workflow's keys."""
    region_options = [("region_id", region_id is not None), ("coverage fraction", coverage == "fraction")]
    unused = [name for name, present in region_options if present and regions is None]
    needs, which = ("regions", "are") if unused else ("instances", "is")
    if not unused and connectivity == "full" and not instances:
        unused = ["connectivity full"]
    if not unused:
        return None
    if flags:
        unused, which = ["--" + name.replace("_", "-") for name in unused], "is"
        needs = "--" + needs
    verb = "applies" if len(unused) == 1 else "apply"
    return f"{' and '.join(unused)} {verb} to {needs}, which {which} not given"


class StatsConfig(BaseModel):
    """What statistics to compute on a fresh output, and where to write them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: str
    regions: str | None = None
    region_id: str | None = None
    coverage: Literal["center", "fraction"] = "center"
    instances: bool = False
    connectivity: Literal["face", "full"] = "face"
    classes: list[str] | None = None

    @field_validator("output", "regions")
    @classmethod
    def _stem_only(cls, value: str | None) -> str | None:
        return value if value is None else only_stem_placeholder(value)

    @model_validator(mode="after")
    def _needed_options_given(self) -> StatsConfig:
        refusal = unused_options(self.regions, self.region_id, self.coverage, self.instances, self.connectivity,
                                 flags=False)
        if refusal:
            raise ValueError(refusal)
        return self


def only_stem_placeholder(path: str) -> str:
    """Paths of a workflow's outputs (and its regions) may hold ``{stem}`` and nothing else in braces."""
    try:
        fields = [field for _, *field in string.Formatter().parse(path) if field[0] is not None]  # name, spec, !conv
    except ValueError:  # a lone brace
        fields = [None]
    if any(field != ["stem", "", None] for field in fields):  # {stem.upper}, {stem[0]}: a format field of it
        raise ValueError(f"the only placeholder a path may hold is {{stem}} (got {path!r})")
    return path


SIZE_UNITS = {"mL": 1000.0, "cm3": 1000.0, "mm3": 1.0, "m2": 1.0, "ha": 10_000.0, "km2": 1e6}  # -> mm3 or m2
LENGTH_UNITS = {"mm": 1.0, "cm": 10.0, "m": 1.0, "km": 1000.0}  # -> mm (volumes) or m (rasters)
VOLUME_UNITS = ("mL", "cm3", "mm3", "mm", "cm")  # the others are map units (metres)


def _quantity(units: dict[str, float]):
    """A count of pixels/voxels (a plain number), or ``"<number> <unit>"`` with a unit of ``units``."""

    def parse(value: Any) -> Any:
        value = _not_bool(value)
        if isinstance(value, str):
            number, _, unit = value.strip().partition(" ")
            unit = unit.strip()
            if unit not in units:
                raise ValueError(f"{value!r}: the unit must be one of {', '.join(units)} (or give a plain count)")
            try:
                amount = float(number)
            except ValueError:
                raise ValueError(f"{value!r}: expected '<number> <unit>'") from None
            if not amount >= 0:
                raise ValueError(f"{value!r} must be >= 0")
            return f"{amount:g} {unit}"
        if isinstance(value, int) and value < 0:
            raise ValueError(f"{value} must be >= 0")
        return value

    return BeforeValidator(parse)


Size = Annotated[int | str, _quantity(SIZE_UNITS)]
Radius = Annotated[int | str, _quantity(LENGTH_UNITS)]


class PostprocessConfig(BaseModel):
    """Clean-up of the labels before they are written (see :mod:`tilemask.postprocess`).

    Sizes and radii are counts of pixels/voxels, or physical: ``"0.5 mL"``,
    ``"20 mm3"`` and ``"2 mm"`` for volumes (the voxel size from the affine),
    ``"100 m2"``, ``"1 ha"`` and ``"30 m"`` for rasters in a projected CRS.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    remove_small: Size = 0
    keep_largest: bool = False
    fill_holes: bool = False
    opening: Radius = 0
    closing: Radius = 0
    # None: each step's MONAI default (RemoveSmallObjects: face; KeepLargestConnectedComponent, FillHoles: full)
    connectivity: Literal["face", "full"] | None = None

    @property
    def active(self) -> bool:
        return bool(self.remove_small or self.keep_largest or self.fill_holes or self.opening or self.closing)

    def check_units(self, volume: bool) -> None:
        """Refuse a volume unit (mL, mm) on a raster, or a map unit (m2, m) on a volume."""
        for name in ("remove_small", "opening", "closing"):
            value = getattr(self, name)
            if isinstance(value, str) and (value.split(" ")[1] in VOLUME_UNITS) != volume:
                raise ValueError(f"postprocess.{name}: {value!r} is not a unit of a {'volume' if volume else 'raster'}")

    def min_size(self, cell: float | None) -> float:
        """``remove_small`` in pixels/voxels, given the size of one (mm3 or m2; None when unknown)."""
        return _in_cells(self.remove_small, SIZE_UNITS, cell, "remove_small")

    def radius(self, name: str, spacing: tuple[float, ...] | None) -> tuple[float, ...]:
        """``opening`` or ``closing`` in pixels/voxels along each axis, given their spacing (mm or m)."""
        value = getattr(self, name)
        if not isinstance(value, str):
            return (float(value),) * (len(spacing) if spacing else 1)
        return tuple(_in_cells(value, LENGTH_UNITS, step, name) for step in spacing or (None,))


def _in_cells(value: int | str, units: dict[str, float], cell: float | None, name: str) -> float:
    if not isinstance(value, str):
        return float(value)
    number, unit = value.split(" ")
    if cell is None or not cell > 0:
        raise ValueError(f"postprocess.{name}: {value!r} needs the size of a pixel/voxel, which this image lacks "
                         "(a raster in a geographic CRS?); give a count of pixels/voxels")  # fmt: skip
    return float(number) * units[unit] / cell
