"""Post-processing on chunked arrays equals the whole-image reference (MONAI FillHoles, scipy)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import shapely
import torch
from monai.transforms import FillHoles
from pyproj import CRS
from rasterio.transform import Affine
from scipy import ndimage

from tilemask.geometry import RasterGeometry
from tilemask.postprocess import apply, ball, spacing_of
from tilemask.stats import PostprocessConfig

from .conftest import blobs


@pytest.fixture(params=[2, 3])
def labels(request):
    shape = (70, 90) if request.param == 2 else (30, 34, 28)
    data = blobs(shape, seed=11, sigma=2.0)
    # holes and specks
    data[tuple(slice(10, 14) for _ in shape)] = 0
    data[tuple(slice(20, 21) for _ in shape)] = 2
    data[tuple(slice(2, 11) for _ in shape)] = 1  # a shell of class 1 around a hole
    data[tuple(slice(5, 8) for _ in shape)] = 0
    data[tuple(slice(6, 7) for _ in shape)] = 2
    return data


def chunkings(shape):
    # many small blocks (2D) / about 100 blocks (3D), a few large ones, and one: every feature crosses chunk edges
    fine = 7 if len(shape) == 2 else 4
    return [tuple(max(3, s // fine) for s in shape), tuple(max(4, s // 3) for s in shape), shape]


def test_remove_small_equals_monai_by_default(labels):
    """RemoveSmallObjects' default connectivity is 1 (face), tilemask's unset one too (per class: MONAI on the
    classes' one-hot channels)."""
    from monai.transforms import RemoveSmallObjects

    onehot = torch.from_numpy(np.stack([labels == v for v in (1, 2)]).astype(np.uint8))
    kept = RemoveSmallObjects(min_size=20)(onehot).numpy().astype(bool)
    expected = np.where(kept[0], 1, np.where(kept[1], 2, 0)).astype(labels.dtype)
    assert not np.array_equal(expected, labels)
    got = apply(da.from_array(labels, chunks=chunkings(labels.shape)[0]), PostprocessConfig(remove_small=20)).compute()
    np.testing.assert_array_equal(got, expected)


def test_remove_small_equals_scipy(labels):
    expected = labels.copy()
    for value in (1, 2):
        components, n = ndimage.label(labels == value)
        sizes = ndimage.sum_labels(np.ones_like(components), components, range(n + 1))
        expected[(labels == value) & (sizes[components] < 20)] = 0
    for chunks in chunkings(labels.shape):
        got = apply(da.from_array(labels, chunks=chunks), PostprocessConfig(remove_small=20)).compute()
        np.testing.assert_array_equal(got, expected)


# Each connectivity in 2D; in 3D (about 3 s each of dask graph on ~100 blocks) the unset one in the default run, the
# others in the slow run.
IN_2D_AND_3D_UNSET = [(2, "face"), (2, "full"), (2, None), pytest.param(3, "face", marks=pytest.mark.slow),
                      pytest.param(3, "full", marks=pytest.mark.slow), (3, None)]  # fmt: skip


def monai_rank(connectivity: str | None, ndim: int) -> dict:
    """MONAI's ``connectivity`` argument for tilemask's: none given, MONAI's own default."""
    return {} if connectivity is None else {"connectivity": 1 if connectivity == "face" else ndim}


def asked(connectivity: str | None) -> dict:
    return {} if connectivity is None else {"connectivity": connectivity}


@pytest.mark.parametrize("labels,connectivity", IN_2D_AND_3D_UNSET, indirect=["labels"])
def test_fill_holes_equals_monai(labels, connectivity):
    """Unset, the connectivity is MONAI's default (full): it was face, and 400 pixels of a scene differed."""
    fill = FillHoles(**monai_rank(connectivity, labels.ndim))
    expected = fill(torch.from_numpy(labels[None].astype(np.int64))).numpy()[0]
    assert not np.array_equal(expected, labels)
    for chunks in chunkings(labels.shape):
        got = apply(da.from_array(labels, chunks=chunks), {"fill_holes": True, **asked(connectivity)}).compute()
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("labels", [2, pytest.param(3, marks=pytest.mark.slow)], indirect=True)
@pytest.mark.parametrize("operation", ["opening", "closing"])
def test_opening_closing_equal_scipy(labels, operation):
    radius = 2
    expected = labels.copy()
    for value in (1, 2):
        mask = expected == value
        if operation == "opening":
            expected[mask & ~ndimage.binary_opening(mask, structure=ball(radius, labels.ndim))] = 0
        else:
            expected[ndimage.binary_closing(mask, structure=ball(radius, labels.ndim)) & (expected == 0)] = value
    assert not np.array_equal(expected, labels)
    for chunks in chunkings(labels.shape):
        got = apply(da.from_array(labels, chunks=chunks), PostprocessConfig(**{operation: radius})).compute()
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("labels,connectivity", IN_2D_AND_3D_UNSET, indirect=["labels"])
def test_keep_largest_equals_monai(labels, connectivity):
    """Unset, the connectivity is MONAI's default (full): it was face, and 12,592 pixels of a scene differed."""
    from monai.transforms import KeepLargestConnectedComponent

    keep = KeepLargestConnectedComponent(applied_labels=[1, 2], is_onehot=False, independent=True,
                                         **monai_rank(connectivity, labels.ndim))  # fmt: skip
    expected = keep(torch.from_numpy(labels[None].astype(np.int64))).numpy()[0]
    assert not np.array_equal(expected, labels)
    for chunks in chunkings(labels.shape):
        config = {"keep_largest": True, **asked(connectivity)}
        got = apply(da.from_array(labels, chunks=chunks), config).compute()
        np.testing.assert_array_equal(got, expected)


def test_physical_sizes_and_radii_use_the_voxel_size(labels):
    """'0.5 mL' on 2 x 1 x 0.5 mm voxels (1 mm3 each) is 500 voxels; '2 mm' is a ball of 1, 2 and 4 voxels."""
    if labels.ndim != 3:
        with pytest.raises(Exception, match="not a unit of a raster"):
            apply(da.from_array(labels, chunks=20), {"remove_small": "0.5 mL"}, spacing=(1.0, 1.0))
        return
    spacing = (2.0, 1.0, 0.5)
    chunks = tuple(max(4, s // 3) for s in labels.shape)
    by_count = apply(da.from_array(labels, chunks=chunks), {"remove_small": 500}).compute()
    by_volume = apply(da.from_array(labels, chunks=chunks), {"remove_small": "0.5 mL"}, spacing=spacing).compute()
    np.testing.assert_array_equal(by_volume, by_count)

    element = ball((1.0, 2.0, 4.0), 3)
    grid = np.indices((3, 5, 9)) - np.array([1, 2, 4])[:, None, None, None]  # built here, not by tilemask
    expected_element = ((grid * np.array(spacing)[:, None, None, None]) ** 2).sum(axis=0) <= 2.0**2
    np.testing.assert_array_equal(element, expected_element)
    expected = labels.copy()
    for value in (1, 2):
        mask = expected == value
        expected[mask & ~ndimage.binary_opening(mask, structure=element)] = 0
    got = apply(da.from_array(labels, chunks=chunks), {"opening": "2 mm"}, spacing=spacing).compute()
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(Exception, match="needs the size of a pixel/voxel"):
        apply(da.from_array(labels, chunks=chunks), {"opening": "2 mm"})
    with pytest.raises(Exception, match="not a unit of a volume"):
        apply(da.from_array(labels, chunks=chunks), {"opening": "30 m"}, spacing=spacing)


def test_fill_holes_keeps_nodata(labels):
    """Nodata pixels stay nodata, even in a hole; everything else as MONAI's FillHoles of the classes (a class-1
    shell around nodata, and scattered nodata)."""
    data = labels.copy()
    data[np.random.default_rng(0).random(data.shape) < 0.01] = 255
    data[tuple(slice(21, 27) for _ in data.shape)] = 1
    inside = tuple(slice(22, 26) for _ in data.shape)
    data[inside] = 255
    fill = FillHoles(applied_labels=[1, 2])
    expected = fill(torch.from_numpy(data[None].astype(np.int64))).numpy()[0]
    assert (expected[inside] == 1).all()  # MONAI, unaware of nodata, fills the shell's nodata
    expected[data == 255] = 255
    assert not np.array_equal(expected, data)
    for chunks in chunkings(data.shape):
        got = apply(da.from_array(data, chunks=chunks), {"fill_holes": True}, nodata=255).compute()
        np.testing.assert_array_equal(got, expected)


def test_labels_open_result_reads_keep_their_nodata(labels, tmp_path):
    """``apply(open_result(path), config)``, as the docs show it, took the nodata for a class (the demo's scene went
    all nodata under fill_holes, a review); the DataArray was refused (no ``to_delayed``). Its ``_FillValue`` is
    now its nodata, as the reference above (MONAI's FillHoles, nodata put back) shows."""
    import nibabel as nib
    import rasterio

    import tilemask

    data = labels.copy()
    data[np.random.default_rng(0).random(data.shape) < 0.01] = 255
    fill = FillHoles(applied_labels=[1, 2])
    expected = fill(torch.from_numpy(data[None].astype(np.int64))).numpy()[0]
    expected[data == 255] = 255
    if data.ndim == 2:
        path = tmp_path / "labels.tif"
        with rasterio.open(path, "w", driver="GTiff", height=data.shape[0], width=data.shape[1], count=1,
                           dtype="uint8", nodata=255, crs="EPSG:32633",
                           transform=Affine(10, 0, 0, 0, -10, 0)) as dst:  # fmt: skip
            dst.write(data.astype(np.uint8), 1)
    else:  # a NIfTI has no nodata of its own: passed
        path = tmp_path / "labels.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(np.uint8), np.eye(4)), path)
    opened = tilemask.open_result(path)
    nodata = {} if data.ndim == 2 else {"nodata": 255}
    got = apply(opened, PostprocessConfig(fill_holes=True), **nodata)
    assert got.dims == opened.dims and got.attrs == opened.attrs
    np.testing.assert_array_equal(got.values, expected)


def test_remove_small_in_m2_on_a_sheared_grid():
    """A pixel of a sheared grid has the area of its outline in world coordinates (|a*e - b*d|), less than the
    product of its edge lengths: '23.9 pixels' of m2 removes a 23-pixel object."""
    transform = Affine.from_gdal(500000.0, 10.0, 3.0, 6000000.0, 0.0, -10.0)
    geometry = RasterGeometry(CRS.from_epsg(32633).to_wkt(), transform.to_gdal())
    pixel = shapely.Polygon([transform @ corner for corner in ((0, 0), (1, 0), (1, 1), (0, 1))]).area
    data = np.zeros((20, 20), np.uint8)
    data[1, :20] = data[3, :3] = 1
    data[6, :12] = data[7, :11] = 1
    config = {"remove_small": f"{23.9 * pixel} m2"}
    got = apply(da.from_array(data, chunks=10), config, spacing=spacing_of(geometry), geometry=geometry).compute()
    np.testing.assert_array_equal(got, _without_components_below(data, 23.9))


def _without_components_below(data: np.ndarray, size: float) -> np.ndarray:
    """``data`` less its components of fewer than ``size`` pixels, by scipy's labelling (the reference)."""
    components, n = ndimage.label(data)
    sizes = ndimage.sum_labels(np.ones_like(components), components, range(n + 1))
    return np.where(sizes[components] < size, 0, data).astype(data.dtype)


def test_sizes_in_m2_and_m_on_a_raster_in_feet():
    """A projected CRS in US survey feet (New York Long Island): sizes in m2 and radii in m are converted by GDAL's
    factor for its unit (refused before: "needs the size of a pixel/voxel, which this image lacks")."""
    from rasterio.crs import CRS as GdalCRS

    unit, metres = GdalCRS.from_epsg(2263).linear_units_factor
    assert unit == "US survey foot"
    geometry = RasterGeometry(CRS.from_epsg(2263).to_wkt(), Affine(10.0, 0, 1e6, 0, -10.0, 2e5).to_gdal())
    assert spacing_of(geometry) == pytest.approx((10 * metres, 10 * metres), rel=1e-12)
    data = np.zeros((20, 30), np.uint8)
    data[1, :20] = data[5, :23] = data[9:12, :3] = 1  # 20, 23 and 9 pixels
    config = {"remove_small": f"{21.5 * (10 * metres) ** 2} m2"}
    got = apply(da.from_array(data, chunks=10), config, spacing=spacing_of(geometry), geometry=geometry).compute()
    np.testing.assert_array_equal(got, _without_components_below(data, 21.5))
    # an opening of 2.05 pixels' length in metres is one of 2 pixels (the next length in the grid is sqrt(5))
    by_pixels = apply(da.from_array(data, chunks=10), {"opening": 2}).compute()
    by_metres = apply(da.from_array(data, chunks=10), {"opening": f"{2.05 * 10 * metres} m"},
                      spacing=spacing_of(geometry), geometry=geometry).compute()  # fmt: skip
    np.testing.assert_array_equal(by_metres, by_pixels)
    assert by_pixels.sum() < data.sum()


@pytest.mark.timeout(120)
def test_physical_units_on_open_result_reads_take_their_grid(tmp_path):
    """``apply(open_result(path), {"remove_small": "1 ha"})``: the DataArray carries its grid (a COG's CRS and
    transform, a NIfTI's affine), which sizes in m2 / mL and radii in m / mm need. They were refused as "needs the
    size of a pixel/voxel, which this image lacks (a raster in a geographic CRS?)" for a UTM raster of 10 m pixels
    and a scan of 2 x 1 x 0.5 mm voxels."""
    import nibabel as nib
    import rasterio

    import tilemask

    data = np.zeros((20, 30), np.uint8)
    data[1, :20] = data[5, :23] = data[9:12, :3] = 1  # 20, 23 and 9 pixels
    path = tmp_path / "labels.tif"
    with rasterio.open(path, "w", driver="GTiff", height=20, width=30, count=1, dtype="uint8", nodata=255,
                       crs="EPSG:32633", transform=Affine(10, 0, 500000, 0, -10, 6000000)) as dst:  # fmt: skip
        dst.write(data, 1)
    opened = tilemask.open_result(path)
    got = apply(opened, {"remove_small": f"{21.5 * 100} m2"})
    np.testing.assert_array_equal(got.values, _without_components_below(data, 21.5))
    by_pixels = apply(da.from_array(data, chunks=10), {"opening": 2}).compute()
    np.testing.assert_array_equal(apply(opened, {"opening": "20.5 m"}).values, by_pixels)
    assert by_pixels.sum() < data.sum()

    volume = np.zeros((12, 10, 8), np.uint8)
    volume[1, 1, :5] = volume[5, 2:8, 1] = volume[9:11, 4:7, 2:4] = 1  # 5, 6 and 12 voxels
    path = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([2.0, 1.0, 0.5, 1.0])), path)  # 1 mm3 voxels
    got = apply(tilemask.open_result(path), {"remove_small": "5.5 mm3"})
    expected = volume.copy()
    expected[1, 1, :5] = 0
    np.testing.assert_array_equal(got.values, expected)
    with pytest.raises(Exception, match="not a unit of a volume"):
        apply(tilemask.open_result(path), {"remove_small": "1 m2"})


@pytest.mark.timeout(120)
def test_keep_largest_keeps_the_first_of_equal_components_whatever_the_chunking():
    """Of equal largest components the one whose first pixel comes first in C order stays, for every chunking (the
    docs said MONAI does the same; MONAI 1.6.1 kept the later of two equal squares: numpy's argsort is unstable)."""
    for shape in ((20, 20), (4, 20, 20)):
        data = np.zeros(shape, np.uint8)
        data[..., 8:11, 2:5] = data[..., 2:5, 8:11] = data[..., 14:17, 14:17] = 1  # the second one comes first
        expected = np.zeros_like(data)
        expected[..., 2:5, 8:11] = 1
        for chunks in (shape, 7, 3):
            got = apply(da.from_array(data, chunks=chunks), PostprocessConfig(keep_largest=True)).compute()
            np.testing.assert_array_equal(got, expected)


@pytest.mark.timeout(120)
def test_a_geometry_alone_gives_the_pixel_size():
    """``apply(labels, config, geometry=g)`` (no ``spacing``): sizes in m2 were refused as "needs the size of a
    pixel/voxel, which this image lacks", the geometry that holds it given."""
    geometry = RasterGeometry(CRS.from_epsg(32633).to_wkt(), Affine(10.0, 0, 500000, 0, -10.0, 6e6).to_gdal())
    data = np.zeros((20, 30), np.uint8)
    data[1, :20] = data[5, :23] = data[9:12, :3] = 1  # 20, 23 and 9 pixels
    got = apply(da.from_array(data, chunks=10), {"remove_small": "2150 m2"}, geometry=geometry).compute()
    np.testing.assert_array_equal(got, _without_components_below(data, 21.5))
