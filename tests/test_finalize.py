"""A chunk's labels and class counts, computed channel by channel, are numpy's argmax and bincount."""

from __future__ import annotations

import numpy as np
import pytest
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


# -- blending on the device that holds the sums (tilemask.finalize_device) -----------------------------------------
# torch's CPU stands in for the GPU here: the same torch code, without the CUDA streams and events
# (tests/test_gpu.py runs it on CUDA where there is one).


def _sums_around(chunk, flips, channels, seed):
    """A device partial over the chunk and a halo past it, and host partials of two neighbours reaching in."""
    import torch

    from tilemask.stitch import DevicePartial, Partial

    rng = np.random.default_rng(seed)

    def sums(region):
        shape = tuple(hi - lo for lo, hi in region)
        weights = rng.uniform(0.001, 2.0, (flips, *shape)).astype(np.float32)
        weighted = (rng.standard_normal((flips * channels, *shape)) * 3).astype(np.float32)
        valid = rng.random(shape) > 0.1
        return weighted, weights, valid

    (y0, y1), (x0, x1) = chunk
    own_region = ((y0, y1 + 5), (x0 - 3, x1))
    weighted, weights, valid = sums(own_region)
    own = DevicePartial(own_region, torch.from_numpy(weighted), torch.from_numpy(weights), valid)
    others = [Partial(r, *sums(r)) for r in (((y0, y0 + 6), (x0, x1)), ((y0 + 4, y1), (x1 - 7, x1)))]
    return own, others


@pytest.mark.parametrize("flips", [1, 2])
@pytest.mark.parametrize("probabilities", ["none", "float32", "uint8"])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
def test_a_chunk_blended_on_the_device_is_the_hosts(activation, probabilities, flips):
    from tilemask.finalize import finalize
    from tilemask.finalize_device import finish_on_device
    from tilemask.settings import Finishing
    from tilemask.stitch import overlap_add

    channels = 1 if activation == "sigmoid" else 3
    finishing = Finishing(activation, 0.3, max(channels, 2), "uint8", probabilities, nodata=255)
    chunk = ((10, 40), (20, 45))
    own, others = _sums_around(chunk, flips, channels, seed=len(activation) + len(probabilities) + flips)
    (host_own,) = own.host([own.region])
    assert isinstance(host_own.weighted, np.ndarray) and not np.shares_memory(host_own.weighted, own.weighted.numpy())

    weighted, weights, valid = overlap_add(chunk, [host_own, *others])
    expected_labels, expected, expected_histogram = finalize(weighted, weights, valid, finishing)
    if not finishing.needs_weights(flips):  # labels by argmax: the blocks of such a job add up no weights
        assert activation != "sigmoid" and probabilities == "none" and flips == 1
        for part in (own, host_own, *others):
            part.weights = None
        weighted, weights, _ = overlap_add(chunk, [host_own, *others])
        assert weights is None
        host_labels, _, _ = finalize(weighted, weights, valid, finishing)
        np.testing.assert_array_equal(host_labels, expected_labels)
    labels, encoded, histogram = finish_on_device(chunk, own, others, finishing)

    assert labels.dtype == expected_labels.dtype and labels.shape == (30, 25)
    np.testing.assert_array_equal(labels, expected_labels)  # random sums: no ties
    np.testing.assert_array_equal(histogram, expected_histogram)
    assert (labels == 255).sum() == (~valid).sum() > 0
    if probabilities == "none":
        assert encoded is None and expected is None
    else:
        assert encoded.dtype == expected.dtype
        np.testing.assert_allclose(encoded.astype(np.float32), expected.astype(np.float32), atol=1 if probabilities == "uint8" else 2e-6)


@pytest.mark.parametrize("weights", [True, False])
def test_a_device_partial_sent_to_another_worker_arrives_as_host_sums(weights):
    import pickle

    from tilemask.stitch import Partial, cut

    own, _ = _sums_around(((10, 40), (20, 45)), 1, 2, seed=3)
    if not weights:  # a job labelled by argmax (Finishing.needs_weights)
        own.weights = None
    arrived = pickle.loads(pickle.dumps(own))
    assert type(arrived) is Partial and isinstance(arrived.weighted, np.ndarray)
    np.testing.assert_array_equal(arrived.weighted, own.weighted.numpy())
    pieces = cut(own, {(1, 0): ((40, 64), (17, 30)), (0, 1): ((0, 40), (45, 64)), (0, -1): ((10, 40), (0, 18))})
    assert list(pieces) == [(1, 0), (0, -1)], "the chunk that the partial does not reach gets no piece"
    assert type(pieces[(1, 0)]) is Partial and pieces[(1, 0)].region == ((40, 45), (17, 30))
    np.testing.assert_array_equal(pieces[(1, 0)].weighted, own.weighted.numpy()[:, 30:35, :13])
    if weights:
        np.testing.assert_array_equal(pieces[(1, 0)].weights, own.weights.numpy()[:, 30:35, :13])
    else:
        assert arrived.weights is None and pieces[(1, 0)].weights is None
    np.testing.assert_array_equal(pieces[(1, 0)].valid, own.valid[30:35, :13])
    np.testing.assert_array_equal(pieces[(0, -1)].weighted, own.weighted.numpy()[:, :30, :1])


def test_a_run_blending_on_the_device_gives_the_hosts_answer_and_monais(make_raster, make_model, tmp_path, monkeypatch):
    """The whole graph, with a block's sums kept as torch tensors and its chunk blended in torch: on one
    in-process worker, so that the switch below reaches it."""
    from distributed import Client, LocalCluster

    from tilemask import finalize_device, inference

    from .conftest import raster_workflow
    from .test_fidelity import monai_probabilities, run_zarr

    path, image = make_raster((3, 203, 317))
    weights, net = make_model()
    workflow = raster_workflow(path, weights, output={"chunks": 64})
    blended = []
    finish = finalize_device.finish_on_device
    monkeypatch.setattr(finalize_device, "finish_on_device", lambda *a: blended.append(a[0]) or finish(*a))
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            host_probs, host_labels, _ = run_zarr(workflow, tmp_path, client)
            assert not blended
            monkeypatch.setattr(inference, "SUMS_STAY_ON", {"cpu", "cuda"})
            probs, labels, _ = run_zarr(workflow, tmp_path, client)
    # windows start at rows 0, 48, 96, 139 and columns 0, 48, ..., 240, 253: the 3 x 4 chunks holding a start own
    # a block, blended where its sums are; the last row and column of chunks hold only neighbours' host sums
    assert sorted(blended) == sorted(((r, r + 64), (c, c + 64)) for r in (0, 64, 128) for c in (0, 64, 128, 192))
    np.testing.assert_allclose(probs, host_probs, atol=1e-6)
    np.testing.assert_array_equal(labels, host_labels)
    np.testing.assert_allclose(probs, monai_probabilities(image, net, (64, 64), 0.25, "gaussian", 127.0, 60.0), atol=1e-4)


def test_sigmoid_of_logits_far_from_zero_is_torchs_and_warns_nothing():
    """A logit under -88 overflowed float32's exp in ``1 / (1 + exp(-x))``: right (0), but every such chunk printed
    "RuntimeWarning: overflow encountered in exp" on its worker."""
    import warnings

    import torch

    from tilemask.finalize import activate

    logits = np.array([[-1000.0, -100.0, -88.8, 0.0, 30.0, 1000.0]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        activated = activate(logits, "sigmoid")
    assert activated.dtype == np.float32
    np.testing.assert_allclose(activated, torch.sigmoid(torch.from_numpy(logits)).numpy(), rtol=1e-6, atol=0)
