"""Evaluation of a predicted label image against a ground truth on the same grid.

The confusion matrix ``M[p, t]`` (pixels predicted ``p`` whose truth is ``t``)
is summed over chunks (integers, so independent of the chunking); pixels where
either image holds its nodata value are left out.  Its rows and columns are the
label values found in either image (``labels`` in the JSON), negative ones too,
at most 1024 of them.  Per class ``c``:

* ``tp = M[c, c]``, ``fp = sum_t M[c, t] - tp``, ``fn = sum_p M[p, c] - tp``;
* ``dice = 2 tp / (2 tp + fp + fn)`` and ``iou = tp / (tp + fp + fn)``, NaN
  (JSON ``null``) when the class is absent from the truth: MONAI's
  ``DiceMetric`` / ``MeanIoU`` with their default ``ignore_empty=True``;
* ``precision = tp / (tp + fp)``, ``recall = tp / (tp + fn)``, NaN when the
  denominator is 0 (MONAI's ``ConfusionMatrixMetric``).

Means are over the foreground classes (every class but 0), ignoring NaN, as
MONAI's ``mean`` reduction does; NaN when no foreground class has a value.

With ``surface=True``, each class also gets ``hd``, ``hd95`` and ``assd``, its surface distances
(:mod:`tilemask.stats.surface`), read from both images whole; their means are over the foreground
classes the same way (an infinite distance makes the mean infinite, as in MONAI). JSON holds an
infinite distance as the string ``"inf"`` (strict JSON has no infinity).
"""

from __future__ import annotations

import logging
import math

import numpy as np

from ..classes import class_name, named_values
from ..errors import InputError
from ..sources.labels import LabelImage
from .crosstab import count_pairs
from .measure import Grid, same_grid, warn_of_planar_distances
from .surface import SURFACE_METRICS, check_surface, surface_distances
from .tables import class_names, jsonable
from .totals import grid_of

logger = logging.getLogger(__name__)

METRICS = ("dice", "iou", "precision", "recall")


MAX_LABELS = 1024
"""Distinct label values ``evaluate`` compares: classes, not instance ids (its matrix grows with their square)."""


def check_same_grid(pred: LabelImage, truth: LabelImage) -> Grid:
    """The grid of ``pred``, refused unless ``truth`` is on it too (shape, CRS and geotransform, or affine)."""
    grid = grid_of(pred)
    why = same_grid(grid, grid_of(truth))
    if why:
        raise InputError(f"{pred.path} and {truth.path} are not on the same grid ({why}); resample one onto the other")
    return grid


def confusion_matrix(pred: LabelImage, truth: LabelImage, client=None) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, M)``: the label values found in either image, in order, and ``M[i, j]``, the valid pixels
    predicted ``labels[i]`` whose truth is ``labels[j]``. Only values present have a row and column: a truth
    with 5000 as an unmarked value, or -1, gives them their own, not a matrix 5001 wide or a wrapped index."""
    return _confusion_matrix(pred, truth, client)[:2]


def _confusion_matrix(pred: LabelImage, truth: LabelImage, client=None) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`confusion_matrix`, and how many of the truth's pixels of the prediction's nodata value it hides
    (warned of where that value is a class of the truth elsewhere, or hides the truth's other classes with it: a
    prediction whose background is its nodata)."""
    grid = check_same_grid(pred, truth)
    zone_excluded = () if truth.nodata is None else (int(truth.nodata),)
    pairs = count_pairs(pred.array, truth.array, grid, sizes=False, zone_excluded=zone_excluded, client=client)
    hidden = 0
    if pred.nodata is not None:  # counted, then left out: the pixels of the truth's own class it hides
        nodata = pairs["cls"] == int(pred.nodata)
        hidden = int(pairs.loc[nodata & (pairs["zone"] == int(pred.nodata)), "count"].sum())
        # the value is a class of the truth where the prediction holds other values, or the nodata hides the
        # truth's other classes with it (a background right everywhere, the foreground's misses left as it); alone
        # under the nodata it is the truth's own unmarked nodata (outside the scene in both): nothing to say
        others = (nodata & (pairs["zone"] != int(pred.nodata))).any()
        pairs = pairs[~nodata]
        if hidden and (others or (pairs["zone"] == int(pred.nodata)).any()):
            logger.warning("%s: its nodata value %d is a class of %s: %s of its pixels there are the prediction's "
                           "nodata, left out of the scores with every other pixel the prediction marks %d (misses of "
                           "the other classes too); if %d is a class of the prediction, its nodata is wrong: unset "
                           "it", pred.path, int(pred.nodata), truth.path, f"{hidden:,}", int(pred.nodata),
                           int(pred.nodata))  # fmt: skip
        else:
            hidden = 0
    predicted, true = pairs["cls"].to_numpy(np.int64), pairs["zone"].to_numpy(np.int64)
    labels = np.union1d(predicted, true)
    if len(labels) > MAX_LABELS:
        raise InputError(f"{pred.path} and {truth.path} hold {len(labels)} distinct label values (at most "
                         f"{MAX_LABELS}): evaluate compares classes; is one an instance map?")  # fmt: skip
    matrix = np.zeros((len(labels), len(labels)), np.int64)
    np.add.at(matrix, (np.searchsorted(labels, predicted), np.searchsorted(labels, true)), pairs["count"].to_numpy())
    return labels, matrix, hidden


def scores(labels: np.ndarray, matrix: np.ndarray, names=None, distances=None) -> dict:
    """Per-class metrics and their means over foreground classes (see the module docstring); ``labels``: the
    value of each row and column of ``matrix``. A named class absent from both images scores as empty.
    ``distances``: ``{value: {"hd", "hd95", "assd"}}`` for every class's value, or None."""
    position = {int(value): i for i, value in enumerate(labels)}
    tp = np.diag(matrix).astype(np.int64)
    fp = matrix.sum(axis=1) - tp
    fn = matrix.sum(axis=0) - tp
    per_class = {}
    for value, name in class_names(position, names, warn_below_0=False).items():  # values in one image: warned of
        i = position.get(value)
        t, p, f = (0, 0, 0) if i is None else (int(tp[i]), int(fp[i]), int(fn[i]))
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
    metrics = METRICS
    if distances is not None:
        for row in per_class.values():
            row.update(distances[row["value"]])
        metrics = METRICS + SURFACE_METRICS
    means = {}
    for metric in metrics:
        values = [row[metric] for row in per_class.values() if row["value"] != 0 and not math.isnan(row[metric])]
        means[metric] = float(np.mean(values)) if values else math.nan
    return {"classes": per_class, "mean_foreground": means}


def evaluate(pred: LabelImage, truth: LabelImage, names=None, client=None, surface: bool = False) -> dict:
    """Scores of ``pred`` against ``truth``, plus the inputs and the confusion matrix; with ``surface``, the
    surface distances too (both images read whole: refused over :data:`surface.MAX_SURFACE_ELEMENTS`)."""
    if surface:
        grid = check_same_grid(pred, truth)
        check_surface(grid, pred.path)
        warn_of_planar_distances(grid)
    labels, matrix, hidden = _confusion_matrix(pred, truth, client)
    if names is None:
        _warn_of_other_names(pred, truth)
    names = names if names is not None else (pred.class_names or truth.class_names)
    named = set(named_values(names))
    unpredicted = [int(v) for v, p, t in zip(labels, matrix.sum(axis=1), matrix.sum(axis=0))
                   if t and not p and int(v) not in named
                   and not (hidden and int(v) == int(pred.nodata))]  # fmt: skip (warned of as the nodata above)
    if unpredicted:
        logger.warning("%s: label value(s) %s are in the truth only, and not named: each is a class with dice 0 in "
                       "the means; if they mark pixels to ignore, make the truth's nodata say so", truth.path,
                       ", ".join(map(str, unpredicted)))  # fmt: skip
    distances = unit = None
    if surface:
        distances, unit = whole_image_distances(pred, truth, set(labels.tolist()) | named, client)
    result = scores(labels, matrix, names, distances)
    if surface:
        result["distance_unit"] = unit
        _infinite_as_text(result)
    result["prediction"], result["truth"] = pred.path, truth.path
    result["confusion_matrix"] = {"rows": "prediction", "columns": "truth", "labels": labels.tolist(),
                                  "values": matrix.tolist()}  # fmt: skip
    return jsonable(result)


def _warn_of_other_names(pred: LabelImage, truth: LabelImage) -> None:
    """Warn where both images name a label value and their names differ: classes are scored by value, and named as
    the prediction names them (two outputs of networks whose classes came in another order scored 1.0 unwarned)."""
    if not (pred.class_names and truth.class_names):
        return
    values = sorted(set(named_values(pred.class_names)) & set(named_values(truth.class_names)))
    differ = [v for v in values if class_name(pred.class_names, v) != class_name(truth.class_names, v)]
    if differ:
        v = differ[0]
        logger.warning("%s and %s name label value %d %r and %r%s: classes are scored by value, named as the "
                       "prediction names them", pred.path, truth.path, v, class_name(pred.class_names, v),
                       class_name(truth.class_names, v), f" (and {len(differ) - 1} more)" if len(differ) > 1 else "")


def whole_image_distances(pred: LabelImage, truth: LabelImage, values, client=None):
    """:func:`surface.surface_distances` of both images read whole (nodata in either: no class in both)."""
    from .crosstab import compute

    grid = grid_of(pred)
    p, t = compute([pred.array, truth.array], client)
    p, t = np.asarray(p), np.asarray(t)
    valid = None
    for image, array in ((pred, p), (truth, t)):
        if image.nodata is not None:
            here = array != image.nodata
            valid = here if valid is None else valid & here
    return surface_distances(p, t, valid, grid, values)


def _infinite_as_text(result: dict) -> None:
    """Infinite distances as ``"inf"``: JSON has no infinity (Python's ``Infinity`` is refused by strict readers)."""
    for row in (*result["classes"].values(), result["mean_foreground"]):
        for metric in SURFACE_METRICS:
            if isinstance(row.get(metric), float) and math.isinf(row[metric]):
                row[metric] = "inf"


def render(result: dict):
    """A rich table of the per-class scores and the foreground means."""
    from rich.table import Table

    metrics = METRICS + (SURFACE_METRICS if "distance_unit" in result else ())
    unit = f" (distances in {result['distance_unit']})" if result.get("distance_unit") else ""
    table = Table(title=f"{result['prediction']} vs {result['truth']}{unit}")
    for column in ("class", *metrics, "tp", "fp", "fn"):
        table.add_column(column, justify="left" if column == "class" else "right")

    def fmt(v):
        return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    for name, row in result["classes"].items():
        table.add_row(name, *(fmt(row[m]) for m in metrics), str(row["tp"]), str(row["fp"]), str(row["fn"]))
    means = result["mean_foreground"]
    table.add_row("mean (foreground)", *(fmt(means[m]) for m in metrics), "", "", "", style="bold")
    return table
