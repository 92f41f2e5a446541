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
  remove_small: 50                   # remove components with fewer pixels/voxels
  fill_holes: true
  opening: 1                         # binary opening, ball radius in pixels/voxels
  closing: 1                         # binary closing, ball radius in pixels/voxels
  connectivity: face                 # for remove_small and fill_holes
```
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _not_bool(value: Any) -> Any:
    """pydantic's lax mode takes ``true`` as 1 where a number is expected; a YAML boolean there is a mistake."""
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


NotBool = BeforeValidator(_not_bool)  # add to every int or float field: Annotated[int, NotBool]
Count = Annotated[int, NotBool, Field(ge=0)]


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


class PostprocessConfig(BaseModel):
    """Clean-up of the labels before they are written (see :mod:`tilemask.postprocess`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    remove_small: Count = 0
    fill_holes: bool = False
    opening: Count = 0
    closing: Count = 0
    connectivity: Literal["face", "full"] = "face"

    @property
    def active(self) -> bool:
        return bool(self.remove_small or self.fill_holes or self.opening or self.closing)
