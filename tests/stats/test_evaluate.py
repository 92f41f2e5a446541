"""Evaluation against MONAI's DiceMetric, MeanIoU and ConfusionMatrixMetric."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import rasterio
import torch
from click.testing import CliRunner
from monai.metrics import ConfusionMatrixMetric, DiceMetric, MeanIoU
from rasterio.transform import Affine

from tilemask.errors import InputError, UsageError
from tilemask.stats import evaluate_paths
from tilemask.stats.api import prepare_evaluation
from tilemask.stats.cli import evaluate as evaluate_command

from .conftest import blobs, write_raster

N_CLASSES = 5  # 3: empty in both masks; 4: predicted only (empty truth)


def one_hot(labels: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.from_numpy(labels.astype(np.int64)), N_CLASSES).permute(2, 0, 1)[None].float()


@pytest.fixture
def pair(tmp_path):
    truth = blobs((90, 110), seed=7)
    pred = blobs((90, 110), seed=7, sigma=3.5)
    pred[40:50, 40:60] = 4  # a class absent from the truth
    pred[truth == 2] = np.where(np.random.default_rng(1).random((truth == 2).sum()) < 0.1, 1, 2)
    transform = Affine(10, 0, 0, 0, -10, 1000)
    return (
        write_raster(tmp_path / "pred.tif", pred, "EPSG:32633", transform, block=32),
        write_raster(tmp_path / "truth.tif", truth, "EPSG:32633", transform, block=32),
        pred,
        truth,
    )


def test_scores_equal_monai(pair, tmp_path):
    pred_path, truth_path, pred, truth = pair
    results = [evaluate_paths(pred_path, truth_path, chunks=c) for c in (17, 32, 200)]
    assert results[0]["classes"] == results[1]["classes"] == results[2]["classes"]
    result = results[0]
    p, t = one_hot(pred), one_hot(truth)
    dice = DiceMetric(include_background=True, reduction="none")(p, t)[0]
    iou = MeanIoU(include_background=True, reduction="none")(p, t)[0]
    confusion = ConfusionMatrixMetric(include_background=True, metric_name=["precision", "recall"], reduction="none")
    confusion(p, t)
    precision, recall = (m[0] for m in confusion.aggregate())
    for value in range(N_CLASSES):
        row = result["classes"][f"class_{value}"] if f"class_{value}" in result["classes"] else None
        if value == 3:  # empty in both: absent from the matrix, MONAI gives NaN for dice/iou
            assert math.isnan(dice[value]) and math.isnan(iou[value])
            assert row is None or (row["dice"] is None and row["tp"] == 0)
            continue
        for name, reference in (("dice", dice), ("iou", iou), ("precision", precision), ("recall", recall)):
            expected = float(reference[value])
            if math.isnan(expected):
                assert row[name] is None, (value, name)
            else:
                assert row[name] == pytest.approx(expected, rel=1e-6), (value, name)
    foreground = [v for v in dice[1:].tolist() if not math.isnan(v)]
    assert result["mean_foreground"]["dice"] == pytest.approx(np.mean(foreground), rel=1e-6)
    assert result["classes"]["class_4"]["dice"] is None  # empty truth -> ignored (MONAI ignore_empty)
    assert result["classes"]["class_4"]["fp"] == int((pred == 4).sum()) > 0


@pytest.mark.slow  # the command around the scores that test_scores_equal_monai checks in the default run
def test_cli_writes_json_and_rejects_other_grid(pair, tmp_path):
    pred_path, truth_path, pred, _ = pair
    out = tmp_path / "scores.json"
    runner = CliRunner()
    result = runner.invoke(evaluate_command, [str(pred_path), str(truth_path), "-o", str(out), "--chunks", "40"])
    assert result.exit_code == 0, result.output
    assert "mean (foreground)" in result.output
    assert json.loads(out.read_text())["classes"]["class_1"]["tp"] > 0
    shifted = write_raster(tmp_path / "shifted.tif", pred, "EPSG:32633", Affine(10, 0, 5, 0, -10, 1000))
    with pytest.raises(InputError, match="not on the same grid"):
        evaluate_paths(pred_path, shifted)
    result = runner.invoke(evaluate_command, [str(pred_path), str(shifted)])
    assert result.exit_code == 2
    assert result.output.strip().startswith("tilemask: error:") and "same grid" in result.output
    # an output that is an input, is not JSON or exists is refused (exit 2) and nothing is written
    before = pred_path.read_bytes()
    for output, why in ((pred_path, "the output is an input"), (tmp_path / "scores.txt", "use one of .json"),
                        (out, "exists; pass --overwrite"),  # a URL: written to ./s3:/b/ where that folder existed
                        ("s3://b/scores.json", "s3://b/scores.json: written to a local file system, not to object "
                                               "storage")):  # fmt: skip
        result = runner.invoke(evaluate_command, [str(pred_path), str(truth_path), "-o", str(output)])
        assert result.exit_code == 2 and why in result.output, result.output
    assert pred_path.read_bytes() == before and not (tmp_path / "scores.txt").exists()


@pytest.mark.slow  # 11 s in a loaded default run (2026-12-07)
def test_the_table_piped_to_a_file_or_a_ci_log_is_whole(pair, tmp_path):
    """Piped (``| tee``, a CI log), the table was cut to 80 columns: "│ cla… │ 0.7… │ 0.5… │", every score lost.
    It is printed at its own width there; the scores shown are those of the JSON."""
    pred_path, truth_path, _, _ = pair
    out = tmp_path / "scores.json"
    result = CliRunner().invoke(evaluate_command, [str(pred_path), str(truth_path), "-o", str(out), "--surface"],
                                env={"COLUMNS": None})  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    scores = json.loads(out.read_text())["classes"]
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 5}
    for name, row in scores.items():
        for metric in ("dice", "iou", "hd95"):
            if row.get(metric) is not None:
                assert f"{row[metric]:.4f}" in rows[name], (name, metric, rows.get(name))


def test_images_on_other_grids_are_refused_before_any_cluster_starts(pair, tmp_path):
    """``prepare_evaluation`` (what the command runs before it starts its cluster) opened both images and left the
    grids to the run: another shape, origin, pixel size or CRS started a LocalCluster before exit 2."""
    pred_path, _, pred, _ = pair
    for name, crs, transform, labels, why in (
        ("shape", "EPSG:32633", Affine(10, 0, 0, 0, -10, 1000), pred[:-1], "shapes differ"),
        ("origin", "EPSG:32633", Affine(10, 0, 5, 0, -10, 1000), pred, "geotransforms differ"),
        ("pixel", "EPSG:32633", Affine(10.01, 0, 0, 0, -10, 1000), pred, "geotransforms differ"),
        ("crs", "EPSG:32634", Affine(10, 0, 0, 0, -10, 1000), pred, "CRSs differ"),
    ):
        other = write_raster(tmp_path / f"{name}.tif", labels, crs, transform)
        with pytest.raises(InputError, match=f"are not on the same grid \\({why}"):
            prepare_evaluation(pred_path, other)


def test_negative_and_far_label_values_are_classes_of_their_own(tmp_path, caplog):
    """A truth with -1 (an unmarked "ignore") had it counted as the last class (a wrapped index), and one with
    5000 made a 5001 x 5001 matrix (61 s, 2.7 GB for 64 x 64 pixels). The reference: pandas' crosstab."""
    import pandas as pd

    truth = blobs((90, 110), seed=7).astype(np.int16)
    pred = blobs((90, 110), seed=7, sigma=3.5).astype(np.int16)
    truth[:12] = -1
    truth[80:, :30] = 5000
    transform = Affine(10, 0, 0, 0, -10, 1000)
    pred_path = write_raster(tmp_path / "pred.tif", pred, "EPSG:32633", transform, block=32)
    truth_path = write_raster(tmp_path / "truth.tif", truth, "EPSG:32633", transform, block=32)
    with caplog.at_level(logging.WARNING, logger="tilemask.stats.evaluate"):
        result = evaluate_paths(pred_path, truth_path, chunks=40)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "label value(s) -1, 5000 are in the truth only" in warning and "nodata" in warning
    labels = sorted(set(np.unique(pred).tolist()) | set(np.unique(truth).tolist()))
    expected = pd.crosstab(pred.ravel(), truth.ravel()).reindex(index=labels, columns=labels, fill_value=0)
    assert result["confusion_matrix"]["labels"] == labels == [-1, 0, 1, 2, 5000]
    np.testing.assert_array_equal(np.array(result["confusion_matrix"]["values"]), expected.to_numpy())
    for value in labels:
        row = result["classes"][f"class_{value}"]
        tp = int(expected.loc[value, value])
        assert (row["tp"], row["fp"], row["fn"]) == (tp, int(expected.loc[value].sum()) - tp,
                                                     int(expected[value].sum()) - tp)  # fmt: skip


def test_a_given_name_that_is_another_values_generated_name_is_refused(pair):
    """``--classes class_2,b`` named value 0 ``class_2``: value 2 (unnamed, so also ``class_2``) took its place,
    and value 0 was gone from the scores."""
    pred_path, truth_path, _, _ = pair
    with pytest.raises(InputError, match="'class_2' names label 0, and is the name of label 2 when it has none"):
        evaluate_paths(pred_path, truth_path, classes="class_2,b")
    from tilemask.stats.tables import class_names

    with pytest.raises(InputError, match="class names repeat: labels 0 and 1 are both named 'a'"):
        class_names([0, 1], ("a", "a"))  # names a file records are checked when the values are known


@pytest.mark.timeout(120)
def test_scores_json_carries_the_mark_and_a_json_tilemask_did_not_write_is_never_replaced(pair, tmp_path, client):
    """The scores' JSON opens with tilemask's mark (``"tilemask": version``); ``--overwrite`` replaces such a file
    and refuses, before any work, someone's own JSON object or a damaged file at the path, leaving it as it was."""
    from tilemask import __version__
    from tilemask.formats import product_written_by_tilemask

    pred_path, truth_path, _, _ = pair
    runner, args = CliRunner(), [str(pred_path), str(truth_path), "--scheduler", client.scheduler.address]
    foreign, damaged = tmp_path / "settings.json", tmp_path / "damaged.json"
    foreign.write_text(json.dumps({"project": "mine", "classes": {"class_1": {"dice": 0.9}}}, indent=2))
    damaged.write_bytes(b"\x00\xffnot json")
    for path in (foreign, damaged):
        before = path.read_bytes()
        refused = runner.invoke(evaluate_command, [*args, "-o", str(path), "--overwrite"])
        assert (refused.exit_code, refused.output) == (
            2, f"tilemask: error: {path} exists and was not written by tilemask; refused to replace it\n")
        assert path.read_bytes() == before
    ours = tmp_path / "scores.json"
    assert runner.invoke(evaluate_command, [*args, "-o", str(ours)]).exit_code == 0
    scores = json.loads(ours.read_text())
    assert next(iter(scores)) == "tilemask" and scores["tilemask"] == __version__
    assert scores["classes"]["class_1"]["tp"] > 0
    assert product_written_by_tilemask(ours) is True
    inode = ours.stat().st_ino
    replaced = runner.invoke(evaluate_command, [*args, "-o", str(ours), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert ours.stat().st_ino != inode and product_written_by_tilemask(ours) is True


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunks", [2.5, "64", True, 0])
def test_python_chunks_that_are_no_positive_integer_are_named_not_blamed_on_the_file(pair, tmp_path, chunks):
    """``evaluate_paths(..., chunks=2.5)`` was 'pred.tif: cannot open as a label image: chunks can only contain
    integers', and ``chunks="64"`` a bare ``ValueError`` (invalid literal for int()); ``compute_stats`` the same."""
    from tilemask.stats import compute_stats

    pred, truth, _, _ = pair
    for call in (lambda: evaluate_paths(pred, truth, chunks=chunks),
                 lambda: compute_stats(pred, tmp_path / "t.csv", chunks=chunks)):  # fmt: skip
        with pytest.raises(InputError) as refused:
            call()
        assert str(refused.value) == f"chunks must be a positive integer or one per axis, got {chunks!r}", refused


@pytest.mark.timeout(60)
def test_chunks_that_cut_the_labels_into_too_many_small_blocks_are_refused(tmp_path):
    """``--chunks 1`` on a 0.57-megapixel mask ran for minutes in 2 GB, where ``tilemask run`` refuses such a
    chunking: more than 20,000 blocks under 256 pixels along an axis are refused before any work (exit 2); fewer
    blocks are not."""
    from tilemask.stats import compute_stats
    from tilemask.stats.cli import stats as stats_command

    transform = Affine(10, 0, 0, 0, -10, 1000)
    pred = write_raster(tmp_path / "pred.tif", blobs((150, 200), seed=7), "EPSG:32633", transform, block=32)
    truth = write_raster(tmp_path / "truth.tif", blobs((150, 200), seed=8), "EPSG:32633", transform, block=32)
    why = (f"chunks 1 cuts {pred} into 30,000 blocks, more than 20,000, each Dask tasks of its own; give 256 or "
           "more, or leave it out (the file's own blocks)")  # fmt: skip
    for call in (lambda: evaluate_paths(pred, truth, chunks=1),
                 lambda: compute_stats(pred, tmp_path / "t.csv", chunks=1)):  # fmt: skip
        with pytest.raises(InputError) as refused:
            call()
        assert str(refused.value) == why
    refused = CliRunner().invoke(stats_command, [str(pred), "-o", str(tmp_path / "t.csv"), "--chunks", "1"])
    assert (refused.exit_code, refused.output) == (2, f"tilemask: error: --{why}\n")
    assert not (tmp_path / "t.csv").exists()
    assert evaluate_paths(pred, truth, chunks=8)["classes"]  # 475 blocks


@pytest.mark.timeout(60)
@pytest.mark.parametrize("classes", [5, {0: "bg", 1: "a"}, ["bg", 1]], ids=["int", "dict", "not-str"])
def test_python_classes_that_are_no_names_are_a_usage_error_naming_the_argument(pair, tmp_path, classes):
    """``compute_stats(..., classes=5)`` was a bare ``TypeError: 'int' object is not iterable`` from deep inside,
    a mapping or a list holding a number an ``AttributeError``; from the command ``--classes`` is always text."""
    from tilemask.stats import compute_stats

    pred, truth, _, _ = pair
    for call in (lambda: evaluate_paths(pred, truth, classes=classes),
                 lambda: compute_stats(pred, tmp_path / "t.csv", classes=classes)):  # fmt: skip
        with pytest.raises(UsageError) as refused:
            call()
        assert str(refused.value) == (f"classes: names of label values 0, 1, ...: 'a,b,...' or a list of str, not "
                                      f"{type(classes).__name__} {classes!r}")  # fmt: skip
        assert refused.value.exit_status == 2
    assert not (tmp_path / "t.csv").exists()


@pytest.mark.timeout(60)
def test_python_flags_that_are_no_true_or_false_are_refused(pair, tmp_path):
    """A reviewer's: ``instances="no"`` wrote an instances table and ``surface="no"`` computed surface distances,
    as ``"no"`` is true. Both are a UsageError; a ``postprocess`` section given as a dict with a misspelt key was
    pydantic's ValidationError, and is a WorkflowError naming the key."""
    import dask.array as da

    from tilemask import postprocess
    from tilemask.errors import WorkflowError
    from tilemask.stats import compute_stats

    pred, truth, _, _ = pair
    with pytest.raises(UsageError, match=r"^instances must be True or False, not 'no'$"):
        compute_stats(pred, tmp_path / "t.csv", instances="no")
    with pytest.raises(UsageError, match=r"^surface must be True or False, not 'no'$"):
        evaluate_paths(pred, truth, surface="no")
    assert not (tmp_path / "t.csv").exists()
    with pytest.raises(WorkflowError, match=r"^postprocess: remove_smal: unknown key$"):
        postprocess.apply(da.zeros((8, 8), dtype="uint8"), {"remove_smal": 5})


def test_classes_named_otherwise_in_the_truth_are_warned_of(tmp_path, caplog):
    """Two outputs whose networks had their classes in another order (``[bg, water, forest]`` against
    ``[bg, forest, water]``) scored dice 1.0 for both without a word: classes are scored by value. Now warned of."""
    from tilemask.classes import CLASSES_TAG

    labels = blobs((60, 70), seed=3).astype(np.uint8)
    transform = Affine(10, 0, 0, 0, -10, 1000)
    paths = []
    for name, names in (("pred", ["bg", "water", "forest"]), ("truth", ["bg", "forest", "water"])):
        paths.append(write_raster(tmp_path / f"{name}.tif", labels, "EPSG:32633", transform))
        with rasterio.open(paths[-1], "r+") as ds:
            ds.update_tags(**{CLASSES_TAG: json.dumps(names)})
    with caplog.at_level(logging.WARNING, logger="tilemask.stats.evaluate"):
        result = evaluate_paths(*paths)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{paths[0]} and {paths[1]} name label value 1 'water' and 'forest' (and 1 more): classes "
                        "are scored by value, named as the prediction names them"]  # fmt: skip
    assert result["classes"]["water"]["dice"] == 1.0  # scored by value, as before
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tilemask.stats.evaluate"):
        evaluate_paths(paths[0], paths[0])
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.timeout(60)
def test_a_label_image_given_as_the_dataarray_open_result_gives_is_named_not_a_bare_type_error(pair, tmp_path):
    """In a notebook the labels at hand are the DataArray ``tilemask.open_result`` (or ``postprocess.apply``) gives;
    ``evaluate_paths(labels, truth)`` and ``compute_stats(labels, "t.csv")`` were a bare ``TypeError: expected str,
    bytes or os.PathLike object, not DataArray``, which named neither the argument nor what to give instead."""
    import tilemask
    from tilemask.stats import compute_stats

    pred, truth, _, _ = pair
    labels = tilemask.open_result(pred)
    calls = {"pred_path": lambda: evaluate_paths(labels, truth), "truth_path": lambda: evaluate_paths(pred, labels),
             "mask_path": lambda: compute_stats(labels, tmp_path / "t.csv")}  # fmt: skip
    for name, call in calls.items():
        with pytest.raises(InputError) as refused:
            call()
        assert str(refused.value) == (f"{name}: a label image's path or URL, not an object of type DataArray; write "
                                      "it to a file first (.rio.to_raster)"), refused  # fmt: skip
    assert not (tmp_path / "t.csv").exists()
    with pytest.raises(InputError, match=r"^mask_path: a label image's path or URL, not an object of type ndarray; "
                                         r"write it to a file first \(rasterio, nibabel or zarr, with its grid\)$"):  # fmt: skip
        compute_stats(labels.values, tmp_path / "t.csv")  # it was "not a ndarray; ... (a DataArray: .rio.to_raster)"


@pytest.mark.timeout(60)
def test_a_prediction_whose_nodata_is_a_class_of_the_truth_is_warned_of(tmp_path, caplog):
    """A prediction written by a GIS tool with nodata 0, its background (a review's), had every pixel it left as
    0 dropped from the scores without a word: the foreground's misses were not counted (the demo's land: recall
    0.96 for 0.80, dice 0.91 for 0.83). The scores stay MONAI's on the pixels both images hold; a warning now says
    how many of the truth's pixels of that class the prediction's nodata hides."""
    truth = blobs((60, 70), seed=3).astype(np.uint8)
    pred = blobs((60, 70), seed=3, sigma=3.5).astype(np.uint8)
    transform = Affine(10, 0, 0, 0, -10, 1000)
    pred_path = write_raster(tmp_path / "pred.tif", pred, "EPSG:32633", transform, nodata=0)
    truth_path = write_raster(tmp_path / "truth.tif", truth, "EPSG:32633", transform)
    with caplog.at_level(logging.WARNING, logger="tilemask.stats.evaluate"):
        result = evaluate_paths(pred_path, truth_path)
    hidden = int(((pred == 0) & (truth == 0)).sum())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{pred_path}: its nodata value 0 is a class of {truth_path}: {hidden:,} of its pixels there "
                        "are the prediction's nodata, left out of the scores with every other pixel the prediction "
                        "marks 0 (misses of the other classes too); if 0 is a class of the prediction, its nodata is "
                        "wrong: unset it"]  # fmt: skip
    valid = pred != 0  # the scores themselves: the pixels both images hold, as before
    expected_fn = int(((truth == 1) & valid & (pred != 1)).sum())
    assert result["classes"]["class_1"]["fn"] == expected_fn
    caplog.clear()  # a nodata that is no class of the truth (outside the scene in both): no warning
    outside = pred.copy()
    outside[:10] = 255
    truth_outside = truth.copy()
    truth_outside[:10] = 255
    pred_path = write_raster(tmp_path / "pred255.tif", outside, "EPSG:32633", transform, nodata=255)
    truth_path = write_raster(tmp_path / "truth255.tif", truth_outside, "EPSG:32633", transform)
    with caplog.at_level(logging.WARNING, logger="tilemask.stats.evaluate"):
        evaluate_paths(pred_path, truth_path)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.timeout(60)
def test_a_prediction_whose_nodata_is_a_class_of_the_truth_is_warned_of_when_right_there(tmp_path, caplog):
    """A GIS tool's prediction with nodata 0, its background, right wherever the truth is 0 but missing some of the
    foreground (left 0): the truth's 0 lies under the prediction's nodata only, and the misses of class 1 there were
    dropped without a word (recall 1.0 for a fifth of the class missed), where a 0 of the truth elsewhere was warned
    of. A nodata that hides the truth's own value and its other classes is warned of too."""
    truth = blobs((60, 70), seed=3, classes=2)
    pred = truth.copy()
    missed = (truth == 1) & (np.arange(70)[None, :] < 14)  # a strip of the foreground left as background
    pred[missed] = 0
    transform = Affine(10, 0, 0, 0, -10, 1000)
    pred_path = write_raster(tmp_path / "pred.tif", pred, "EPSG:32633", transform, nodata=0)
    truth_path = write_raster(tmp_path / "truth.tif", truth, "EPSG:32633", transform)
    with caplog.at_level(logging.WARNING, logger="tilemask.stats.evaluate"):
        result = evaluate_paths(pred_path, truth_path)
    hidden = int(((pred == 0) & (truth == 0)).sum())
    assert missed.sum() > 100 and result["classes"]["class_1"]["fn"] == 0  # the scores: the pixels both images hold
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{pred_path}: its nodata value 0 is a class of {truth_path}: {hidden:,} of its pixels there "
                        "are the prediction's nodata, left out of the scores with every other pixel the prediction "
                        "marks 0 (misses of the other classes too); if 0 is a class of the prediction, its nodata is "
                        "wrong: unset it"]  # fmt: skip
