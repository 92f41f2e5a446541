"""Evaluation of a predicted label image against a ground truth on the same grid.

The confusion matrix ``M[p, t]`` (pixels predicted ``p`` whose truth is ``t``)
is summed over chunks (integers, so independent of the chunking); pixels where
either image holds its nodata value are left out.  Per class ``c``:

* ``tp = M[c, c]``, ``fp = sum_t M[c, t] - tp``, ``fn = sum_p M[p, c] - tp``;
* ``dice = 2 tp / (2 tp + fp + fn)`` and ``iou = tp / (tp + fp + fn)``, NaN
  (JSON ``null``) when the class is absent from the truth: MONAI's
  ``DiceMetric`` / ``MeanIoU`` with their default ``ignore_empty=True``;
* ``precision = tp / (tp + fp)``, ``recall = tp / (tp + fn)``, NaN when the
  denominator is 0 (MONAI's ``ConfusionMatrixMetric``).

Means are over the foreground classes (every class but 0), ignoring NaN, as
MONAI's ``mean`` reduction does; NaN when no foreground class has a value.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from ..errors import InputError
from ..sources.labels import LabelImage
from .crosstab import count_pairs
from .measure import same_grid
from .tables import class_names, jsonable
from .totals import grid_of

logger = logging.getLogger(__name__)

METRICS = ("dice", "iou", "precision", "recall")


def confusion_matrix(pred: LabelImage, truth: LabelImage, client=None) -> np.ndarray:
    """``M[p, t]`` over the valid pixels of both images."""
    grid = grid_of(pred)
    why = same_grid(grid, grid_of(truth))
    if why:
        raise InputError(f"{pred.path} and {truth.path} are not on the same grid ({why}); resample one onto the other")
    excluded = () if pred.nodata is None else (int(pred.nodata),)
    zone_excluded = () if truth.nodata is None else (int(truth.nodata),)
    pairs = count_pairs(pred.array, truth.array, grid, sizes=False, excluded=excluded, zone_excluded=zone_excluded, client=client)
    if pairs.empty:
        return np.zeros((1, 1), np.int64)
    size = int(max(pairs["cls"].max(), pairs["zone"].max())) + 1
    matrix = np.zeros((size, size), np.int64)
    np.add.at(matrix, (pairs["cls"].to_numpy(), pairs["zone"].to_numpy()), pairs["count"].to_numpy())
    return matrix


def scores(matrix: np.ndarray, names=None) -> dict:
    """Per-class metrics and their means over foreground classes (see the module docstring)."""
    n = matrix.shape[0]
    named = class_names(range(n), names)
    tp = np.diag(matrix).astype(np.int64)
    fp = matrix.sum(axis=1) - tp
    fn = matrix.sum(axis=0) - tp
    per_class = {}
    for value, name in named.items():
        if value >= n:
            t = p = f = 0
        else:
            t, p, f = int(tp[value]), int(fp[value]), int(fn[value])
        truth_empty = t + f == 0
        per_class[name] = {
            "value": value,
            "dice": math.nan if truth_empty else 2 * t / (2 * t + p + f),
            "iou": math.nan if truth_empty else t / (t + p + f),
            "precision": t / (t + p) if t + p else math.nan,
            "recall": t / (t + f) if t + f else math.nan,
            "tp": t,
            "fp": p,
            "fn": f,
        }
    means = {}
    for metric in METRICS:
        values = [row[metric] for row in per_class.values() if row["value"] != 0 and not math.isnan(row[metric])]
        means[metric] = float(np.mean(values)) if values else math.nan
    return {"classes": per_class, "mean_foreground": means}


def evaluate(pred: LabelImage, truth: LabelImage, names=None, client=None) -> dict:
    """Scores of ``pred`` against ``truth``, plus the inputs and the confusion matrix."""
    matrix = confusion_matrix(pred, truth, client)
    result = scores(matrix, names if names is not None else (pred.class_names or truth.class_names))
    result["prediction"], result["truth"] = pred.path, truth.path
    result["confusion_matrix"] = {"rows": "prediction", "columns": "truth", "values": matrix.tolist()}
    return jsonable(result)


def render(result: dict):
    """A rich table of the per-class scores and the foreground means."""
    from rich.table import Table

    table = Table(title=f"{result['prediction']} vs {result['truth']}")
    for column in ("class", *METRICS, "tp", "fp", "fn"):
        table.add_column(column, justify="left" if column == "class" else "right")

    def fmt(v):
        return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    for name, row in result["classes"].items():
        table.add_row(name, *(fmt(row[m]) for m in METRICS), str(row["tp"]), str(row["fp"]), str(row["fn"]))
    means = result["mean_foreground"]
    table.add_row("mean (foreground)", *(fmt(means[m]) for m in METRICS), "", "", "", style="bold")
    return table
