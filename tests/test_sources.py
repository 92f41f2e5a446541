"""Readers read only the region asked for, from the formats users have."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import zarr

from tilemask.sources import cached_handle, file_stamp, open_source


def test_nifti_gz_windows_are_read_through_indexed_gzip(make_volume):
    path, volume = make_volume((60, 50, 40), name="scan.nii.gz")
    source = open_source(str(path), spatial_dims=3)
    assert source.shape == (1, 60, 50, 40)
    np.testing.assert_array_equal(source.read(((5, 30), (10, 50), (0, 17)))[0], volume[5:30, 10:50, 0:17])
    img = cached_handle(("nifti", source.path, file_stamp(source.path)), lambda: None)
    with img.dataobj._get_fileobj() as opened:  # the worker's kept-open handle seeks in the gzip stream
        assert type(opened.fobj).__name__ == "IndexedGzipFile"
    np.testing.assert_array_equal(source.geometry.affine, nib.load(path).affine)


def test_four_d_nifti_is_channels_first(tmp_path):
    data = np.arange(4 * 5 * 6 * 2, dtype=np.float32).reshape(4, 5, 6, 2)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "two.nii")
    source = open_source(str(tmp_path / "two.nii"), spatial_dims=3)
    assert source.shape == (2, 4, 5, 6)
    np.testing.assert_array_equal(source.read(((1, 3), (0, 5), (2, 6))), np.moveaxis(data[1:3, :, 2:6], -1, 0))


def test_zarr_arrays_with_and_without_channels(tmp_path):
    plain = zarr.create_array(str(tmp_path / "a.zarr"), shape=(30, 40), chunks=(16, 16), dtype="uint16")
    plain[:] = np.arange(1200, dtype=np.uint16).reshape(30, 40)
    source = open_source(str(tmp_path / "a.zarr"), spatial_dims=2)
    assert source.shape == (1, 30, 40)
    np.testing.assert_array_equal(source.read(((3, 20), (5, 39)))[0], plain[3:20, 5:39])
    bands = zarr.create_array(str(tmp_path / "b.zarr"), shape=(3, 30, 40), chunks=(3, 16, 16), dtype="float32")
    bands[:] = np.random.default_rng(0).random((3, 30, 40), dtype=np.float32)
    source = open_source(str(tmp_path / "b.zarr"), spatial_dims=2)
    assert source.shape == (3, 30, 40)
    np.testing.assert_array_equal(source.read(((0, 30), (10, 20))), bands[:, :, 10:20])


def test_raster_windows_and_band_order(make_raster):
    path, data = make_raster((3, 70, 90))  # (a 4-band uint8 GeoTIFF would get an alpha band from GDAL)
    source = open_source(str(path), spatial_dims=2, bands=[3, 1])
    assert source.shape == (2, 70, 90) and source.read_valid(((0, 10), (0, 10))) is None
    np.testing.assert_array_equal(source.read(((7, 50), (20, 61))), data[[2, 0], 7:50, 20:61])
