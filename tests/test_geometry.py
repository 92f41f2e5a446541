"""The window plan is MONAI's grid, grouped into blocks that cover the image exactly once.

MONAI's grid is the Cartesian product of per-axis starts (``dense_patch_slices``
builds it with ``np.meshgrid(..., indexing="ij")``), and so is the plan's.  The
properties below are therefore checked per axis, which stays cheap for any
image; the N-D enumeration (MONAI's order, ownership, chunk sources) is also
compared in full whenever the grid is small enough to enumerate quickly.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import rasterio
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data.utils import dense_patch_slices, get_valid_patch_size
from monai.inferers.utils import _get_scan_interval
from rasterio.transform import from_origin

from tilemask.errors import WorkflowError
from tilemask.geometry import WindowPlan, local_slices, region_shape
from tilemask.stitch import Partial, overlap_add

axis = st.tuples(st.integers(1, 240), st.integers(1, 96), st.integers(16, 200))  # size, roi, chunk
overlaps = st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9])
ENUMERABLE = 20_000  # grids up to this many windows are also compared window by window


def monai_axis_starts(size, roi, overlap):
    """One axis of MONAI's sliding_window_inference grid, in image coordinates.

    MONAI pads an axis shorter than the roi to the roi (``(roi - size) // 2``
    before), takes the interval from ``_get_scan_interval`` and the starts from
    ``dense_patch_slices``; each depends on that axis alone.
    """
    padded = max(size, roi)
    pad_before = (roi - size) // 2 if size < roi else 0
    (interval,) = _get_scan_interval((padded,), (roi,), 1, (overlap,))
    assert get_valid_patch_size((padded,), (roi,)) == (roi,)
    return tuple(sl.start - pad_before for (sl,) in dense_patch_slices((padded,), (roi,), (interval,)))


def monai_windows(shape, roi, overlap):
    """Every window start of MONAI's N-D grid, in its order (only for small grids)."""
    padded = tuple(max(s, r) for s, r in zip(shape, roi))
    pad_before = [(r - s) // 2 if s < r else 0 for s, r in zip(shape, roi)]
    interval = _get_scan_interval(padded, roi, len(shape), (overlap,) * len(shape))
    return [tuple(sl.start - p for sl, p in zip(w, pad_before)) for w in dense_patch_slices(padded, roi, interval)]


def owner_chunk(start, size, chunk):
    """The chunk holding a window's first in-image voxel."""
    return min(max(start, 0), size - 1) // chunk


def test_monai_axis_starts_of_known_axes():
    """The per-axis reference itself: a clamped last start, and an axis shorter than the roi."""
    assert monai_axis_starts(100, 32, 0.25) == (0, 24, 48, 68)
    assert monai_axis_starts(20, 32, 0.5) == (-6,)  # padded 6 before, 6 after
    plan = WindowPlan.build((100, 20), (32, 32), 0.25, 64)
    assert [a.starts for a in plan.axes] == [monai_axis_starts(100, 32, 0.25), monai_axis_starts(20, 32, 0.25)]


@settings(max_examples=200, deadline=None)
@given(st.lists(axis, min_size=2, max_size=3), overlaps)
def test_windows_are_monais_in_monais_order(axes, overlap):
    shape, roi, chunks = zip(*axes)
    plan = WindowPlan.build(shape, roi, overlap, chunks)
    expected = [monai_axis_starts(s, r, overlap) for s, r in zip(shape, roi)]
    assert [a.starts for a in plan.axes] == expected
    assert plan.n_windows == math.prod(map(len, expected))
    if plan.n_windows <= ENUMERABLE:  # the N-D grid, in MONAI's order
        assert list(plan.windows()) == monai_windows(shape, roi, overlap)


@settings(max_examples=200, deadline=None)
@given(st.lists(axis, min_size=2, max_size=3), overlaps)
def test_every_window_is_owned_by_exactly_one_block(axes, overlap):
    shape, roi, chunks = zip(*axes)
    plan = WindowPlan.build(shape, roi, overlap, chunks)
    for a in plan.axes:
        # each start in exactly one block, blocks in order, each block the chunk of its starts' first voxel
        assert [s for b in a.blocks() for s in a.block_starts(b)] == list(a.starts)
        for b in a.blocks():
            assert a.block_starts(b) and all(owner_chunk(s, a.size, a.chunk) == b for s in a.block_starts(b))
    indexes = list(plan.block_indexes())
    assert indexes == list(itertools.product(*(a.blocks() for a in plan.axes)))
    for index in indexes:
        block = plan.block(index)
        assert block.starts == tuple(a.block_starts(i) for a, i in zip(plan.axes, index))
    assert sum(plan.block(i).n_windows for i in indexes) == plan.n_windows
    if plan.n_windows <= ENUMERABLE:
        owned = [w for index in indexes for w in plan.block(index).windows()]
        assert sorted(owned) == sorted(plan.windows())
        for index in indexes:
            for w in plan.block(index).windows():
                assert tuple(owner_chunk(s, a.size, a.chunk) for s, a in zip(w, plan.axes)) == index


@settings(max_examples=200, deadline=None)
@given(st.lists(axis, min_size=2, max_size=3), overlaps)
def test_windows_cover_the_image_and_chunks_get_every_block_that_reaches_them(axes, overlap):
    shape, roi, chunks = zip(*axes)
    plan = WindowPlan.build(shape, roi, overlap, chunks)
    for a in plan.axes:
        covered = np.zeros(a.size, bool)
        for s in a.starts:
            covered[max(s, 0) : s + a.roi] = True
        assert covered.all()  # so the product of the axes covers the image
        # the clipped span of each block's windows, computed here from its starts
        spans = {b: (max(a.block_starts(b)[0], 0), min(a.block_starts(b)[-1] + a.roi, a.size)) for b in a.blocks()}
        for c in range(a.n_chunks):
            lo, hi = c * a.chunk, min((c + 1) * a.chunk, a.size)
            assert set(a.sources_of(c)) == {b for b, (s, e) in spans.items() if s < hi and lo < e}
    block_regions = {index: plan.block(index).region for index in plan.block_indexes()}
    chunk_indexes = list(plan.chunk_indexes())
    assert len(chunk_indexes) == math.prod(math.ceil(s / a.chunk) for s, a in zip(shape, plan.axes))
    if len(chunk_indexes) * len(block_regions) > ENUMERABLE:
        chunk_indexes = chunk_indexes[:: max(1, len(chunk_indexes) * len(block_regions) // ENUMERABLE)]
    for chunk in chunk_indexes:
        region = plan.chunk_region(chunk)
        needed = {
            index for index, block_region in block_regions.items()
            if all(a < d and c < b for (a, b), (c, d) in zip(block_region, region))
        }
        assert set(plan.sources_of(chunk)) == needed


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 120), st.integers(1, 48), st.integers(16, 100)), min_size=2, max_size=2),
    overlaps, st.floats(-5, 5), st.integers(0, 2**32 - 1),
)
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
        partials.append(Partial(block.region, weighted[(slice(None), *keep)], weights[keep][None]))
    for chunk in plan.chunk_indexes():
        weighted, weights, valid = overlap_add(plan.chunk_region(chunk), partials)
        assert valid is None
        np.testing.assert_allclose(weighted / weights, value, rtol=1e-5, atol=1e-5)


def test_partials_that_disagree_on_holding_weights_are_refused():
    """A chunk's partials with and without the sums of the weights cannot be added up: an error, not sums whose
    weights miss some blocks' (whichever partial comes first)."""
    with_weights = Partial(((0, 4), (0, 4)), np.ones((2, 4, 4), np.float32), np.ones((1, 4, 4), np.float32))
    without = Partial(((2, 6), (0, 4)), np.ones((2, 4, 4), np.float32), None)
    for partials in ([with_weights, without], [without, with_weights]):
        with pytest.raises(ValueError, match="disagree on holding the sums of the weights"):
            overlap_add(((0, 8), (0, 4)), partials)
    weighted, weights, _ = overlap_add(((0, 8), (0, 4)), [without, without])
    assert weights is None and weighted.sum() == 2 * 2 * 16


def test_the_real_graph_of_a_gigapixel_has_about_three_tasks_per_chunk(make_model, write_workflow, tmp_path):
    """The graph :func:`tilemask.engine.build_graph` makes for a planned 32768 x 32768 raster."""
    from tilemask import Workflow
    from tilemask.engine import build_graph
    from tilemask.planning import plan_workflow

    scene = tmp_path / "giga.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=32768, height=32768, count=1, dtype="uint8",
                       crs="EPSG:3857", transform=from_origin(0, 0, 10, 10),
                       tiled=True, blockxsize=512, blockysize=512, sparse_ok=True):  # fmt: skip
        pass  # metadata only: no tile is written
    args = dict(spatial_dims=2, in_channels=1, out_channels=2, channels=[4, 8], strides=[2], num_res_units=0)
    weights, _ = make_model(args)
    workflow = Workflow.from_dict({
        "version": 1,
        "input": str(scene),
        "model": {"network": "UNet", "args": args, "weights": str(weights)},
        "inference": {"roi_size": [256, 256], "overlap": 0.25, "device": "cpu"},
        "output": {"path": "out/{stem}.zarr", "chunks": 2048},
    }, base_dir=tmp_path)  # fmt: skip
    (job,) = plan_workflow(workflow).jobs(out_channels=2)
    graph, blocks, deps = build_graph(job)

    layers = {}
    for key in graph:
        if isinstance(key, tuple):
            layer = key[0].split("-")[1]
            layers[layer] = layers.get(layer, 0) + 1
    chunks = 16 * 16
    # every chunk owns windows (stride 192 < chunk); every block but the far corner's reaches a neighbour
    assert layers == {"predict": chunks, "halo": chunks - 1, "chunk": chunks}
    assert len(graph) - sum(layers.values()) == 1  # what every task shares sits once in the graph
    assert len(graph) <= 3 * chunks + 1
    assert len(blocks) == chunks and sum(b.n_windows for b in blocks.values()) == job.plan.n_windows == 171 ** 2
    chunk_deps = [d for k, d in deps.items() if "-chunk-" in k[0]]
    assert max(map(len, chunk_deps)) == 4  # its own block's sums and at most three neighbours' halos


def test_chunks_finer_than_the_roi_and_a_roi_far_over_the_image_are_told_once_a_run(make_model, tmp_path, caplog):
    """A reviewer's: ``output.chunks`` 64 under a roi of 256 ran 17x slower on 16384^2, silently (Dask's cost per
    task outweighs the windows'); a roi of 2048^2 over the demo scene took 213 s on a first run (padded to it, as
    MONAI pads). One warning a run each, with the counts; chunks of at least the roi, or clipped to an image
    smaller than the roi, and a small roi padded over a small image (nnU-Net's 3D patches) say nothing."""
    import logging

    from tilemask import Workflow
    from tilemask.planning import plan_workflow

    for name, size in (("a", 300), ("b", 300), ("small", 40)):
        with rasterio.open(tmp_path / f"{name}.tif", "w", driver="GTiff", width=size, height=size, count=1,
                           dtype="uint8", crs="EPSG:3857", transform=from_origin(0, 0, 10, 10)):  # fmt: skip
            pass
    args = dict(spatial_dims=2, in_channels=1, out_channels=2, channels=[4, 8], strides=[2], num_res_units=0)
    weights, _ = make_model(args)

    def warnings(inputs: str, chunks, roi=(64, 64)) -> list[str]:
        workflow = Workflow.from_dict({
            "version": 1, "input": inputs,
            "model": {"network": "UNet", "args": args, "weights": str(weights)},
            "inference": {"roi_size": list(roi), "overlap": 0.25, "device": "cpu"},
            "output": {"path": "out/{stem}.zarr", "chunks": chunks},
        }, base_dir=tmp_path)  # fmt: skip
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tilemask.planning"):
            plan_workflow(workflow)
        return [r.getMessage() for r in caplog.records if r.name == "tilemask.planning"]

    assert warnings("?.tif", 32) == ["output.chunks 32 is smaller than inference.roi_size [64, 64]: 100 chunks for 36 "
                                     "window(s), each with Dask's own cost; chunks of at least the roi (default 2048) "
                                     "run faster"]  # fmt: skip
    assert warnings("?.tif", [64, 16])[0].startswith("output.chunks [64, 16] is smaller than")
    assert warnings("?.tif", 64) == warnings("?.tif", 2048) == warnings("small.tif", 40) == []
    assert warnings("?.tif", 2048, roi=(2048, 2048)) == ["inference.roi_size [2048, 2048] is larger than the image "
                                                         "(300 x 300): it is padded to it, as MONAI pads, 46.6x the "
                                                         "pixels for the network to compute"]  # fmt: skip
    assert warnings("small.tif", 2048, roi=(1024, 1024)) == []  # 655x the pixels, but one window of 1 Mpx
    with pytest.raises(WorkflowError, match=r"^output\.chunks 4 cuts \S+a\.tif into 5,625 chunks for 36 window\(s\), "
                                            r"more than 64 a window, "):  # fmt: skip (a review's chunks of 1 pixel
        warnings("?.tif", 4)  # ignored SIGTERM for minutes)
    assert len(warnings("?.tif", 8)) == 1  # 1,444 chunks: 40 a window, warned of
    with rasterio.open(tmp_path / "large.tif", "w", driver="GTiff", width=3000, height=3000, count=1, dtype="uint8",
                       tiled=True, sparse_ok=True, crs="EPSG:3857", transform=from_origin(0, 0, 10, 10)):  # fmt: skip
        pass
    with pytest.raises(WorkflowError, match=r"^output\.chunks 16 cuts \S+large\.tif into 35,344 chunks for 3,969 "
                                            r"window\(s\), more than 20,000, "):  # fmt: skip (9 a window, but a
        warnings("large.tif", 16)  # scheduler in the run's process orders and cancels them for minutes)
    assert len(warnings("large.tif", 32)) == 1  # 8,836 chunks, warned of
    with rasterio.open(tmp_path / "huge.tif", "w", driver="GTiff", width=300_000, height=300_000, count=1,
                       dtype="uint8", tiled=True, sparse_ok=True, BIGTIFF="YES", crs="EPSG:3857",
                       transform=from_origin(0, 0, 10, 10)):  # fmt: skip
        pass  # the default chunks under a roi of 2049: 21,609 chunks, as many as at roi 2048, were refused
    assert warnings("huge.tif", 2048, roi=(2049, 2049))[0].startswith("output.chunks 2048 is smaller than")


@pytest.mark.parametrize(
    "pattern, exact",
    [(lambda c: c[0] < 2, True), (lambda c: c != (1, 1), True), (lambda c: sum(c) % 3 == 0, False)],
    ids=["rows written", "all but one", "scattered"],
)
def test_a_resumed_graph_predicts_every_window_an_unwritten_chunk_needs_and_few_others(pattern, exact):
    """On resuming, each chunk not yet written must get the sums of every window that overlaps it, as a whole
    run would give it; a written chunk's block predicts only its windows that reach the unwritten chunks
    around it (all of them exactly when those chunks form a box, a superset otherwise)."""
    import itertools

    from tilemask.engine import blocks_to_predict
    from tilemask.geometry import WindowPlan, intersect

    plan = WindowPlan.build((1000, 900), [128, 128], 0.25, 256)
    written = {c for c in plan.chunk_indexes() if pattern(c)}
    unwritten = [c for c in plan.chunk_indexes() if c not in written]

    def windows(blocks):
        return {start for block in blocks for start in itertools.product(*block.starts)}

    def reaches(start, chunk):
        return intersect(tuple((s, s + 128) for s in start), plan.chunk_region(chunk)) is not None

    everything = windows(plan.block(b) for b in plan.block_indexes())
    needed = {w for w in everything if any(reaches(w, c) for c in unwritten)}
    whole_blocks = windows(plan.block(b) for b in {b for c in unwritten for b in plan.sources_of(c)})
    predicted = windows(blocks_to_predict(plan, written).values())
    assert needed <= predicted, "a window an unwritten chunk needs is missing"
    assert predicted == needed if exact else needed < predicted < whole_blocks
