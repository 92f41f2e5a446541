"""Instances against scipy.ndimage.label (whole image) and SimpleITK's centroids; totals against SimpleITK."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from nibabel.testing import data_path
from scipy import ndimage

from tilemask.sources.labels import open_labels
from tilemask.stats import compute_stats
from tilemask.stats.instances import find_instances, instance_labels

from .conftest import write_nifti, write_raster


def sitk_shapes(labels: np.ndarray, affine: np.ndarray, tmp_path):
    """SimpleITK's label shape statistics of ``labels`` written as NIfTI with ``affine``."""
    path = write_nifti(tmp_path / "sitk_labels.nii.gz", labels.astype(np.int32), affine)
    image = sitk.ReadImage(str(path))
    shapes = sitk.LabelShapeStatisticsImageFilter()
    shapes.Execute(image)
    return shapes


@pytest.mark.slow  # 6-8 s each; the default run keeps 2D instances and the real MR volume against SimpleITK
@pytest.mark.parametrize("connectivity", ["face", "full"])
def test_instances_equal_scipy_and_simpleitk(blob_volume, tmp_path, connectivity):
    path, data, affine = blob_volume
    element = ndimage.generate_binary_structure(3, 1 if connectivity == "face" else 3)
    tables = []
    for chunks in ((8, 9, 10), (16, 16, 16), (48, 56, 40)):  # chunks much smaller than the blobs, and whole
        image = open_labels(str(path), chunks=chunks)
        tables.append(find_instances(image, connectivity=connectivity))
        ids = instance_labels(image, connectivity=connectivity).compute()
        offset = 0
        for value in (1, 2):
            reference, n = ndimage.label(data == value, structure=element)
            assert n > 1
            got = np.where(data == value, ids - offset, 0)
            np.testing.assert_array_equal(got, reference)
            offset += n
    for other in tables[1:]:
        pd.testing.assert_frame_equal(tables[0], other)
    table = tables[0]
    offset = 0
    for value in (1, 2):
        reference, n = ndimage.label(data == value, structure=element)
        rows = table[table["value"] == value]
        assert list(rows["instance_id"]) == list(range(offset + 1, offset + n + 1))
        np.testing.assert_array_equal(rows["voxels"], ndimage.sum_labels(np.ones_like(reference), reference, range(1, n + 1)))
        shapes = sitk_shapes(reference, affine, tmp_path)
        for i, row in enumerate(rows.itertuples(index=False), start=1):
            lps = shapes.GetCentroid(i)
            ras = (-lps[0], -lps[1], lps[2])
            assert (row.centroid_x, row.centroid_y, row.centroid_z) == pytest.approx(ras, abs=1e-4)  # NIfTI stores the affine as float32
            assert row.volume_ml == pytest.approx(shapes.GetPhysicalSize(i) / 1000, rel=1e-6)  # float32 spacing in ITK
        offset += n


def test_totals_on_real_mr_volume_equal_simpleitk(tmp_path):
    anatomy = nib.load(os.path.join(data_path, "anatomical.nii"))
    intensity = np.asarray(anatomy.dataobj, dtype=float)
    labels = np.digitize(intensity, np.quantile(intensity, [0.5, 0.8])).astype(np.uint8)
    path = write_nifti(tmp_path / "anat_labels.nii.gz", labels, anatomy.affine)
    results = [pd.read_csv(compute_stats(path, tmp_path / f"t{c}.csv", chunks=c)) for c in (4, 9, 64)]
    for other in results[1:]:
        pd.testing.assert_frame_equal(results[0], other)
    shapes = sitk.LabelShapeStatisticsImageFilter()
    shapes.Execute(sitk.ReadImage(str(path)))
    for row in results[0].itertuples(index=False):
        if row.value == 0:
            assert row.voxels == int((labels == 0).sum())
            continue
        assert row.voxels == shapes.GetNumberOfPixels(int(row.value))
        assert row.volume_ml == pytest.approx(shapes.GetPhysicalSize(int(row.value)) / 1000, rel=1e-6)
    instances = pd.read_csv(compute_stats(path, tmp_path / "i.csv", instances=True, chunks=7))
    reference, n = ndimage.label(labels == 1)
    assert (instances["value"] == 1).sum() == n


def test_raster_instances_world_coordinates(tmp_path):
    from rasterio.transform import Affine

    data = np.zeros((60, 80), np.uint8)
    data[5:20, 3:30] = 1
    data[30:55, 10:12] = 1
    data[40:50, 50:79] = 2
    transform = Affine(30.0, 0, 500_000.0, 0, -20.0, 4_200_000.0)
    path = write_raster(tmp_path / "r.tif", data, "EPSG:32633", transform, block=16)
    table = pd.read_parquet(compute_stats(path, tmp_path / "i.parquet", instances=True, chunks=16))
    for value in (1, 2):
        reference, n = ndimage.label(data == value)
        rows = table[table["value"] == value]
        assert len(rows) == n
        centres = ndimage.center_of_mass(np.ones_like(reference), reference, range(1, n + 1))
        objects = ndimage.find_objects(reference)
        for row, (r, c), box in zip(rows.itertuples(index=False), centres, objects):
            assert (row.centroid_x, row.centroid_y) == pytest.approx(transform @ (c + 0.5, r + 0.5))
            assert row.area_m2 == pytest.approx(row.pixels * 600.0)
            assert row.bbox_xmin == pytest.approx(transform.c + box[1].start * 30.0)
            assert row.bbox_xmax == pytest.approx(transform.c + box[1].stop * 30.0)
            assert row.bbox_ymax == pytest.approx(transform.f - box[0].start * 20.0)
            assert row.bbox_ymin == pytest.approx(transform.f - box[0].stop * 20.0)
