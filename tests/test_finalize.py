"""A chunk's labels and class counts, computed channel by channel, are numpy's argmax and bincount."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tilemask.finalize import FEW_CLASSES, argmax_labels, class_histogram

shapes = st.tuples(st.integers(1, 40), st.integers(1, 30), st.integers(1, 30))  # channels, height, width


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**32 - 1), ties=st.booleans(), nans=st.integers(0, 6))
def test_labels_are_numpys_argmax_with_ties_and_nan(shape, seed, ties, nans):
    rng = np.random.default_rng(seed)
    values = (rng.integers(0, 3, shape) if ties else rng.standard_normal(shape)).astype(np.float32)
    flat = values.reshape(shape[0], -1)
    flat[rng.integers(0, shape[0], nans), rng.integers(0, flat.shape[1], nans)] = np.nan
    np.testing.assert_array_equal(argmax_labels(values, np.dtype(np.uint8)), np.argmax(values, axis=0))


@settings(max_examples=10, deadline=None)
@given(channels=st.integers(250, 300), seed=st.integers(0, 2**32 - 1))
def test_labels_past_255_classes_in_uint16(channels, seed):
    """Past 255 classes the labels are uint16 (planning.labels_dtype): the arithmetic must not wrap at 256."""
    values = np.random.default_rng(seed).standard_normal((channels, 7, 9)).astype(np.float32)
    values[-1, 0, 0] = 99.0  # the last class wins somewhere
    labels = argmax_labels(values, np.dtype(np.uint16))
    assert labels.dtype == np.uint16 and labels[0, 0] == channels - 1
    np.testing.assert_array_equal(labels, np.argmax(values, axis=0))


@settings(max_examples=60, deadline=None)
@given(n_classes=st.integers(1, 3 * FEW_CLASSES), seed=st.integers(0, 2**32 - 1), nodata=st.sampled_from([None, 0, 1, 255]))
def test_class_counts_are_bincounts_without_nodata(n_classes, seed, nodata):
    labels = np.random.default_rng(seed).integers(0, n_classes, (37, 23)).astype(np.uint8)
    if nodata is not None:
        labels[::3, ::2] = nodata
    counted = labels if nodata is None else labels[labels != nodata]
    expected = np.bincount(counted.ravel(), minlength=n_classes)[:n_classes]
    np.testing.assert_array_equal(class_histogram(labels, n_classes, nodata), expected)
