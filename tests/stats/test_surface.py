"""``evaluate --surface``: Hausdorff distance, its 95th percentile and the average symmetric surface distance per
class, against MONAI's ``compute_hausdorff_distance`` and ``compute_average_surface_distance`` on real images."""

from __future__ import annotations

import json
import math
import os
import warnings

import nibabel as nib
import numpy as np
import pytest
import rasterio
import torch
from click.testing import CliRunner
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
from nibabel.testing import data_path
from rasterio.transform import Affine
from scipy import ndimage

from tilemask.errors import InputError
from tilemask.stats import evaluate_paths
from tilemask.stats.cli import evaluate as evaluate_command
from tilemask.stats.surface import MAX_SURFACE_ELEMENTS

from ..conftest import GEO
from .conftest import blobs, write_raster


def monai_distances(pred: np.ndarray, truth: np.ndarray, n_classes: int, spacing, ignore=None) -> dict:
    """MONAI's per-class hd, hd95 and assd (background included) of two label images; ``ignore``: pixels of no
    class in either image (MONAI's ``ignore_index`` zeroes both one-hot masks there)."""

    def one_hot(labels):
        hot = torch.nn.functional.one_hot(torch.from_numpy(labels.astype(np.int64)), n_classes)
        hot = hot.permute(labels.ndim, *range(labels.ndim))[None].float()
        if ignore is not None:
            hot = hot * torch.from_numpy(~ignore)[None, None]
        return hot

    p, t = one_hot(pred), one_hot(truth)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the ground truth of class 3 is all 0"
        hd = compute_hausdorff_distance(p, t, include_background=True, spacing=spacing)[0]
        hd95 = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=spacing)[0]
        assd = compute_average_surface_distance(p, t, include_background=True, symmetric=True, spacing=spacing)[0]
    return {"hd": hd, "hd95": hd95, "assd": assd}


def check_equal(row, expected, value, rel=1e-5):
    """Our JSON value against MONAI's float32: NaN is null, infinity is "inf"."""
    for metric, reference in expected.items():
        want, got = float(reference[value]), row[metric]
        if math.isnan(want):
            assert got is None, (value, metric, got)
        elif math.isinf(want):
            assert got == "inf", (value, metric, got)
        else:
            assert got == pytest.approx(want, rel=rel), (value, metric)


@pytest.fixture
def scan_pair(tmp_path):
    """Labels from a real scan (nibabel's example4d, volume 0: oblique, 2 x 2 x 2.2 mm) and a perturbed copy:
    shifted one voxel, its bright class dilated, class 3 missed and a class 4 predicted that the truth lacks."""
    img = nib.load(os.path.join(data_path, "example4d.nii.gz"))
    scan = ndimage.gaussian_filter(np.asarray(img.dataobj[..., 0], dtype=float), 1.0)
    truth = np.digitize(scan, np.quantile(scan, [0.5, 0.8, 0.95])).astype(np.uint8)
    truth[truth == 3] = 2
    truth[60:66, 40:46, 10:13] = 3  # a small structure the prediction misses
    pred = np.roll(truth, 1, axis=0)
    pred[ndimage.binary_dilation(pred == 2) & (pred == 1)] = 2
    pred[pred == 3] = 1
    pred[10:20, 10:16, 2:5] = 4  # a false positive class
    header = img.header.copy()
    header.set_data_shape(truth.shape)
    header.set_data_dtype(np.uint8)
    paths = []
    for name, data in (("pred.nii.gz", pred), ("truth.nii.gz", truth)):
        nib.save(nib.Nifti1Image(data, img.affine, header), tmp_path / name)
        paths.append(tmp_path / name)
    return (*paths, pred, truth, tuple(float(z) for z in img.header.get_zooms()[:3]))


@pytest.mark.timeout(120)
def test_volume_distances_equal_monai_in_mm(scan_pair):
    pred_path, truth_path, pred, truth, spacing = scan_pair
    assert spacing == pytest.approx((2.0, 2.0, 2.2))
    names = "background,tissue,bright,small,spurious,never"  # 5: named, in neither image
    results = [evaluate_paths(pred_path, truth_path, classes=names, chunks=c, surface=True) for c in (16, 200)]
    assert results[0]["classes"] == results[1]["classes"]  # the whole image is read: no chunk changes a distance
    result = results[0]
    assert result["distance_unit"] == "mm"
    expected = monai_distances(pred, truth, 6, spacing)
    for value, name in enumerate(names.split(",")):
        check_equal(result["classes"][name], expected, value)
    tissue = result["classes"]["tissue"]
    assert tissue["hd"] > tissue["hd95"] > tissue["assd"] > 0
    # what MONAI gives a class missing from one image (3: the truth's only, 4: the prediction's) or from both (5)
    for name in ("small", "spurious"):
        assert (result["classes"][name]["hd"], result["classes"][name]["hd95"], result["classes"][name]["assd"]) == (
            "inf", None, "inf")
    assert [result["classes"]["never"][m] for m in ("hd", "hd95", "assd")] == [None, None, None]
    # means over the foreground as MONAI's "mean" reduction: NaN left out, an infinite distance kept
    assert result["mean_foreground"]["hd"] == "inf" and result["mean_foreground"]["assd"] == "inf"
    foreground = [float(v) for v in expected["hd95"][1:] if not math.isnan(v)]
    assert result["mean_foreground"]["hd95"] == pytest.approx(np.mean(foreground), rel=1e-5)
    # the distances follow the voxel size: the same labels on a 1 mm isotropic grid measure other distances
    assert expected["hd"][1] != pytest.approx(float(monai_distances(pred, truth, 6, (1, 1, 1))["hd"][1]))


@pytest.mark.timeout(120)
def test_raster_distances_equal_monai_in_crs_units_with_nodata_in_no_class(tmp_path, client):
    """A real Landsat band (RGB.byte.tif, UTM 18N, 300 m pixels) in 4 classes against a blurred copy, nodata in
    both; by the command, whose JSON and table carry the distances."""
    with rasterio.open(GEO["RGB.byte.tif"]) as src:
        band = src.read(1, window=((300, 560), (200, 440))).astype(float)
        transform = src.window_transform(((300, 560), (200, 440)))
        crs = src.crs
    edges = np.quantile(band, [0.3, 0.6, 0.85])
    truth = np.digitize(band, edges).astype(np.uint8)
    pred = np.digitize(ndimage.gaussian_filter(band, 2.0), edges).astype(np.uint8)
    truth[:20, :30] = 255  # nodata in either image: no class in both
    pred[200:, 220:] = 255
    pred_path = write_raster(tmp_path / "pred.tif", pred, crs, transform, nodata=255, block=64)
    truth_path = write_raster(tmp_path / "truth.tif", truth, crs, transform, nodata=255, block=64)
    out = tmp_path / "scores.json"
    ran = CliRunner().invoke(evaluate_command, [str(pred_path), str(truth_path), "--surface", "-o", str(out),
                                                "--scheduler", client.scheduler.address])  # fmt: skip
    assert ran.exit_code == 0, ran.output
    assert "hd95" in ran.output and "assd" in ran.output and "in metre" in " ".join(ran.output.split())
    result = json.loads(out.read_text())
    assert result["distance_unit"] == "metre"
    ignore = (pred == 255) | (truth == 255)
    spacing = (abs(transform.e), transform.a)
    expected = monai_distances(np.where(ignore, 0, pred), np.where(ignore, 0, truth), 4, spacing, ignore=ignore)
    for value in range(4):
        check_equal(result["classes"][f"class_{value}"], expected, value)
        assert result["classes"][f"class_{value}"]["hd"] > 0
    assert result["mean_foreground"]["assd"] == pytest.approx(float(expected["assd"][1:].mean()), rel=1e-5)


@pytest.mark.timeout(60)
def test_geographic_and_oversized_images_are_refused_before_any_pixel_is_read(tmp_path):
    """Degrees are no distance; an image past the bound (a sparse 20000 x 14000 GeoTIFF: 280 million pixels) is
    refused in one line naming its size, exit 2, no output written. Without ``--surface`` both are evaluated."""
    data = blobs((60, 80), seed=3)
    geographic = write_raster(tmp_path / "geo.tif", data, "EPSG:4326", Affine(0.01, 0, 10.0, 0, -0.01, 61.0))
    big = tmp_path / "big.tif"
    with rasterio.open(big, "w", driver="GTiff", height=20000, width=14000, count=1, dtype="uint8", crs="EPSG:32633",
                       transform=Affine(10, 0, 0, 0, -10, 0), tiled=True, SPARSE_OK=True, compress="deflate"):
        pass  # no block written: a few kB on disk
    assert 20000 * 14000 > MAX_SURFACE_ELEMENTS
    runner, out = CliRunner(), tmp_path / "scores.json"
    for path, why in (
        (geographic, f"{geographic}: surface distances need a projected CRS, not a geographic one (degrees); warp "),
        (big, f"{big}: surface distances read the whole image at once, and 20000 x 14000 = 280,000,000 pixels is "
              f"over the {MAX_SURFACE_ELEMENTS:,} they are bounded to"),
    ):  # fmt: skip
        ran = runner.invoke(evaluate_command, [str(path), str(path), "--surface", "-o", str(out)])
        assert ran.exit_code == 2, ran.output
        assert ran.output.startswith(f"tilemask: error: {why}") and ran.output.count("\n") == 1, ran.output
        assert not out.exists()
        with pytest.raises(InputError, match="surface distances"):
            evaluate_paths(path, path, surface=True)
    assert evaluate_paths(geographic, geographic)["classes"]["class_1"]["dice"] == 1.0


@pytest.mark.timeout(60)
def test_distances_in_a_crs_far_from_the_ground_there_are_warned_of(tmp_path, caplog):
    """Web Mercator (EPSG:3857, the web tiles' CRS) at 60 degrees north has a metre of the CRS for half a metre on
    the ground: the distances, said to be in metres, were twice the ground's without a word, where ``stats`` warns of
    the same CRS's areas. The distances stay the CRS's (as MONAI's ``spacing`` would give them); a warning now gives
    the ratio and the latitude. UTM in its zone: no warning."""
    import logging

    data = blobs((60, 80), seed=3)
    mercator = write_raster(tmp_path / "merc.tif", data, "EPSG:3857", Affine(20, 0, 1_000_000, 0, -20, 8_400_000))
    utm = write_raster(tmp_path / "utm.tif", data, "EPSG:32633", Affine(20, 0, 500_000, 0, -20, 6_650_000))
    with caplog.at_level(logging.WARNING, logger="tilemask.stats"):
        result = evaluate_paths(mercator, mercator, surface=True)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned
    assert warned[0].startswith("surface distances are planar in EPSG:3857: at latitude 60.0 a pixel's side is "
                                "2.00x its length on the ellipsoid; ")  # fmt: skip
    assert result["distance_unit"] == "metre"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tilemask.stats"):
        evaluate_paths(utm, utm, surface=True)
        evaluate_paths(mercator, mercator)  # no distances: nothing to say
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
