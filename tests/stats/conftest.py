"""Fixtures that make label images: GeoTIFFs (rasterio) and NIfTI volumes (nibabel)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine
from scipy import ndimage

from ..conftest import GEO


def blobs(shape, seed: int, sigma: float = 4.0, classes: int = 3) -> np.ndarray:
    """Smooth random blobs labelled 0..classes-1."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random(shape), sigma)
    edges = np.quantile(field, np.linspace(0, 1, classes + 1)[1:-1])
    return np.digitize(field, edges).astype(np.uint8)


def write_raster(path: Path, data: np.ndarray, crs, transform: Affine, nodata=None, block: int = 64) -> Path:
    profile = dict(
        driver="GTiff", height=data.shape[0], width=data.shape[1], count=1, dtype=data.dtype, crs=crs,
        transform=transform, nodata=nodata, tiled=True, blockxsize=block, blockysize=block, compress="deflate",
    )
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data, 1)
    return path


@pytest.fixture
def shade_labels(tmp_path) -> Path:
    """Labels 0..3 from the real hillshade raster (EPSG:3857, nodata 255 kept)."""
    with rasterio.open(GEO["shade.tif"]) as src:
        data = src.read(1)
        nodata = int(src.nodata)
        crs, transform = src.crs, src.transform
    valid = data != nodata
    edges = np.unique(np.quantile(data[valid], [0.25, 0.5, 0.75]))
    labels = np.where(valid, np.digitize(data, edges), nodata).astype(np.uint8)
    return write_raster(tmp_path / "shade_labels.tif", labels, crs, transform, nodata=nodata, block=256)


@pytest.fixture
def geographic_labels(tmp_path) -> Path:
    """A lon/lat (EPSG:4326) label raster at 60 N with 0.01 degree pixels."""
    data = blobs((120, 160), seed=3)
    transform = Affine(0.01, 0, 10.0, 0, -0.01, 61.0)
    return write_raster(tmp_path / "geographic.tif", data, "EPSG:4326", transform, block=32)


def anisotropic_affine() -> np.ndarray:
    """Rotated, anisotropic voxel-to-RAS affine (0.8 x 1.3 x 2.5 mm, 20 degrees about z)."""
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 1.3, 2.5])
    affine[:3, 3] = [-40.0, 12.5, -7.0]
    return affine


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, path)
    return path


@pytest.fixture
def blob_volume(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A 3-class blob volume with an anisotropic, rotated affine."""
    data = blobs((48, 56, 40), seed=5, sigma=3.0)
    affine = anisotropic_affine()
    return write_nifti(tmp_path / "blobs.nii.gz", data, affine), data, affine
