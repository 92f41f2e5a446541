"""Statistics of label images: per class, per region, per instance; evaluation; post-processing.

Public API:

* :func:`compute_stats` -- what ``tilemask stats`` runs (totals, zonal, instances);
* :func:`evaluate_paths` -- what ``tilemask evaluate`` runs;
* :class:`StatsConfig`, :class:`PostprocessConfig` -- the workflow's ``stats:`` and
  ``postprocess:`` sections; :func:`compute_from_config` runs the former,
  :func:`tilemask.postprocess.apply` the latter.
"""

from .config import PostprocessConfig, StatsConfig

_API = ("compute_stats", "compute_from_config", "evaluate_paths")


def __getattr__(name: str):
    """The statistics API, imported when first used: ``import tilemask`` stays light."""
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["compute_stats", "compute_from_config", "evaluate_paths", "StatsConfig", "PostprocessConfig"]
