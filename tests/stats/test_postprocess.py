"""Post-processing on chunked arrays equals the whole-image reference (MONAI FillHoles, scipy)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import torch
from monai.transforms import FillHoles
from scipy import ndimage

from tilemask.postprocess import apply, ball
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
    return [tuple(max(3, s // 7) for s in shape), tuple(max(4, s // 3) for s in shape), shape]


def test_remove_small_equals_scipy(labels):
    expected = labels.copy()
    for value in (1, 2):
        components, n = ndimage.label(labels == value)
        sizes = ndimage.sum_labels(np.ones_like(components), components, range(n + 1))
        expected[(labels == value) & (sizes[components] < 20)] = 0
    for chunks in chunkings(labels.shape):
        got = apply(da.from_array(labels, chunks=chunks), PostprocessConfig(remove_small=20)).compute()
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("connectivity", ["face", "full"])
def test_fill_holes_equals_monai(labels, connectivity):
    rank = 1 if connectivity == "face" else labels.ndim
    expected = FillHoles(connectivity=rank)(torch.from_numpy(labels[None].astype(np.int64))).numpy()[0]
    assert not np.array_equal(expected, labels)
    for chunks in chunkings(labels.shape):
        got = apply(da.from_array(labels, chunks=chunks), {"fill_holes": True, "connectivity": connectivity}).compute()
        np.testing.assert_array_equal(got, expected)


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
