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

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
    """Clean-up of the labels before they are written (see :mod:`tilemask.stats.postprocess`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    remove_small: int = Field(0, ge=0)
    fill_holes: bool = False
    opening: int = Field(0, ge=0)
    closing: int = Field(0, ge=0)
    connectivity: Literal["face", "full"] = "face"

    @property
    def active(self) -> bool:
        return bool(self.remove_small or self.fill_holes or self.opening or self.closing)
