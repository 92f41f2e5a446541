"""tilemask: segment images too big for one process, on a Dask cluster, with MONAI's answer."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import TilemaskError  # noqa: E402
from .workflow import Workflow  # noqa: E402


def run(workflow, client=None, **kwargs):
    """Run a workflow (a :class:`Workflow` or a YAML path); see :func:`tilemask.engine.run`."""
    from .engine import run as _run

    return _run(workflow, client, **kwargs)


__all__ = ["TilemaskError", "Workflow", "__version__", "run"]
