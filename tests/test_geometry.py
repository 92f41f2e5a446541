"""The window plan is MONAI's grid, grouped into blocks that cover the image exactly once."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data.utils import dense_patch_slices, get_valid_patch_size
from monai.inferers.utils import _get_scan_interval

from tilemask.geometry import WindowPlan, clip_region, local_slices, region_shape
from tilemask.stitch import Partial, blend

axis = st.tuples(st.integers(1, 240), st.integers(1, 96), st.integers(16, 200))  # size, roi, chunk
overlaps = st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9])


def monai_windows(shape, roi, overlap):
    """Window starts as MONAI's sliding_window_inference lays them out, in image coordinates."""
    padded = tuple(max(s, r) for s, r in zip(shape, roi))
    pad_before = [(r - s) // 2 if s < r else 0 for s, r in zip(shape, roi)]
    interval = _get_scan_interval(padded, roi, len(shape), (overlap,) * len(shape))
    assert get_valid_patch_size(padded, roi) == tuple(roi)
    return [tuple(sl.start - p for sl, p in zip(w, pad_before)) for w in dense_patch_slices(padded, roi, interval)]


@settings(max_examples=80, deadline=None)
@given(st.lists(axis, min_size=2, max_size=3), overlaps)
def test_windows_are_monais_in_monais_order(axes, overlap):
    shape, roi, chunks = zip(*axes)
    plan = WindowPlan.build(shape, roi, overlap, chunks)
    assert list(plan.windows()) == monai_windows(shape, roi, overlap)
    assert plan.n_windows == len(monai_windows(shape, roi, overlap))


@settings(max_examples=100, deadline=None)
@given(st.lists(axis, min_size=2, max_size=3), overlaps)
def test_every_window_is_owned_by_exactly_one_block(axes, overlap):
    shape, roi, chunks = zip(*axes)
    plan = WindowPlan.build(shape, roi, overlap, chunks)
    owned = [w for index in plan.block_indexes() for w in plan.block(index).windows()]
    assert sorted(owned) == sorted(plan.windows())


@settings(max_examples=200, deadline=None)
@given(st.lists(axis, min_size=2, max_size=3), overlaps)
def test_windows_cover_the_image_and_chunks_get_every_block_that_reaches_them(axes, overlap):
    shape, roi, chunks = zip(*axes)
    plan = WindowPlan.build(shape, roi, overlap, chunks)
    covered = np.zeros(shape, bool)
    for start in plan.windows():
        covered[local_slices(clip_region(tuple((s, s + r) for s, r in zip(start, roi)), shape), (0,) * len(shape))] = True
    assert covered.all()
    block_regions = {index: plan.block(index).region for index in plan.block_indexes()}
    for chunk in plan.chunk_indexes():
        region = plan.chunk_region(chunk)
        needed = {
            index for index, block_region in block_regions.items()
            if all(a < d and c < b for (a, b), (c, d) in zip(block_region, region))
        }
        assert set(plan.sources_of(chunk)) == needed


@settings(max_examples=100, deadline=None)
@given(st.lists(axis, min_size=2, max_size=2), overlaps, st.floats(-5, 5), st.integers(0, 2**32 - 1))
def test_blending_a_constant_prediction_gives_the_constant(axes, overlap, value, seed):
    shape, roi, chunks = zip(*axes)
    plan = WindowPlan.build(shape, roi, overlap, chunks)
    rng = np.random.default_rng(seed)
    weight = rng.uniform(1e-3, 1.0, roi).astype(np.float32)
    partials = []
    for index in plan.block_indexes():
        block = plan.block(index)
        origin = [lo for lo, _ in block.extent]
        weighted = np.zeros((1, *region_shape(block.extent)), np.float32)
        weights = np.zeros(region_shape(block.extent), np.float32)
        for start in block.windows():
            window = tuple(slice(s - o, s - o + r) for s, o, r in zip(start, origin, roi))
            weighted[(0, *window)] += weight * np.float32(value)
            weights[window] += weight
        keep = local_slices(block.region, origin)
        partials.append(Partial(block.region, weighted[(slice(None), *keep)], weights[keep]))
    for chunk in plan.chunk_indexes():
        out, valid = blend(plan.chunk_region(chunk), partials)
        assert valid is None
        np.testing.assert_allclose(out, value, rtol=1e-5, atol=1e-5)


def test_task_count_per_gigapixel_is_about_two_per_chunk():
    plan = WindowPlan.build((32768, 32768), (256, 256), 0.25, 2048)
    blocks, chunks = len(list(plan.block_indexes())), len(list(plan.chunk_indexes()))
    assert (blocks, chunks) == (256, 256)
    assert max(len(list(plan.sources_of(c))) for c in plan.chunk_indexes()) == 4
