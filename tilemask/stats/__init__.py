"""Statistics of label images: per class, per region, per instance; evaluation; post-processing.

Public API:

* :func:`compute_stats` -- what ``tilemask stats`` runs (totals, zonal, instances);
* :func:`evaluate_paths` -- what ``tilemask evaluate`` runs;
* :class:`StatsConfig`, :class:`PostprocessConfig` -- the workflow's ``stats:`` and
  ``postprocess:`` sections; :func:`compute_from_config` runs the former,
  :func:`tilemask.stats.postprocess.apply` the latter.
"""

from .api import compute_from_config, compute_stats, evaluate_paths
from .config import PostprocessConfig, StatsConfig

__all__ = ["compute_stats", "compute_from_config", "evaluate_paths", "StatsConfig", "PostprocessConfig"]
