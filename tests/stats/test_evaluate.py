"""Evaluation against MONAI's DiceMetric, MeanIoU and ConfusionMatrixMetric."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from monai.metrics import ConfusionMatrixMetric, DiceMetric, MeanIoU
from rasterio.transform import Affine

from tilemask.errors import InputError
from tilemask.stats import evaluate_paths
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
                        (out, "exists; pass --overwrite")):  # fmt: skip
        result = runner.invoke(evaluate_command, [str(pred_path), str(truth_path), "-o", str(output)])
        assert result.exit_code == 2 and why in result.output, result.output
    assert pred_path.read_bytes() == before and not (tmp_path / "scores.txt").exists()
