"""Windows -> weighted partial sums, on a worker's device.

One call handles one block (the windows owned by one output chunk): it reads the
block's region once, cuts the windows, runs them through the cached model in
batches of ``batch_size`` and accumulates ``w * pred`` and ``w`` exactly as
``monai.inferers.sliding_window_inference`` does, with MONAI's own
``compute_importance_map`` as ``w`` (or nnU-Net's gaussian, ``mode: nnunet``).  With test-time augmentation each window
also runs flipped, once for each flip whose (mirrored) grid holds it, as extra
items of the same batches; its prediction and ``w`` are flipped back and summed
into that flip's own planes (:mod:`tilemask.stitch`).  With ``tta_mode: patch``
(nnU-Net v2's mirroring) there is one grid and one blend: each window's flipped
predictions, flipped back, are averaged into it before ``w``.  Reading happens on the Dask thread; the
forward passes are called from the process's single compute thread (on the CPU, a batch of 2D windows in two
halves on two threads of their own, the next batch queued behind it), so another Dask thread of the worker
reads, blends and writes while the model computes.

On a GPU the copies stay off the compute thread too: the Dask thread stages the
block's image in pinned host memory and copies it to the GPU on a CUDA stream of
its own while the compute thread runs the windows of other blocks on the compute
stream; an event orders the copy before the computation (:mod:`tilemask.device`).
The block's sums stay on the GPU (:class:`~tilemask.stitch.DevicePartial`): the
chunks are blended there, and only their labels come back.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import timing
from .backends import Halves, NetworkRejected, cached_runner, forward_check, settle_auto
from .device import compute_stream, to_device
from .errors import RunError, WorkflowError
from .geometry import Block, local_slices, region_shape
from .models import ModelSpec, resolve_device, torch_threads
from .preprocess import Preprocessing
from .settings import InferenceSettings
from .sources import ImageSource
from .stitch import DevicePartial, Partial

logger = logging.getLogger(__name__)

# Every forward pass of a process is called from this one thread, and runs on it (torch already uses the cores it
# was given), so OpenMP keeps a single team instead of one per Dask thread (idle teams spin and steal the cores);
# one batch at a time, except that on the CPU a batch of 2D windows runs in two halves on two threads of half the
# team each (:func:`tilemask.backends._halved`), with the next batch queued behind it (:data:`QUEUED_BATCHES`)
# while this thread adds up the last.
_compute_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tilemask-compute")

QUEUED_BATCHES = 1
"""Batches started behind the one running, where the runner takes them (:class:`tilemask.backends.Halves`): its
threads go on to the next batch while the compute thread adds up the last one.  At 16384^2 on this project's 2-core
VM (2026-12-04) tilemask took 92.6 / 93.4 s against 98.4 / 106.8 s with each batch waited for, runs in turn; one
batch queued holds one more batch's windows and answers (10 MB for 8 x 256^2)."""

SUMS_STAY_ON = {"cuda"}
"""Device types on which a block's sums stay (:class:`~tilemask.stitch.DevicePartial`) and its chunk is blended
(:mod:`tilemask.finalize_device`); elsewhere they come back as numpy arrays."""


@functools.lru_cache(maxsize=8)
def importance_map(roi: tuple[int, ...], mode: str, sigma_scale, device: torch.device) -> torch.Tensor:
    """MONAI's window weights (``compute_importance_map``: gaussian or constant, floor-clamped at 1e-3), float32;
    for ``mode: nnunet``, nnU-Net's (:func:`nnunet_importance_map`).

    The same arithmetic as MONAI's, written here so that a worker predicts without importing MONAI (1.4 s of
    start-up); ``tests/test_backends.py`` holds it to MONAI's, bit for bit.
    """
    if mode == "nnunet":
        return nnunet_importance_map(roi, sigma_scale, device)
    if mode == "constant":
        weights = torch.ones(roi, device=device, dtype=torch.float)
    else:
        scales = sigma_scale if isinstance(sigma_scale, tuple) else (sigma_scale,) * len(roi)
        for i, (size, scale) in enumerate(zip(roi, scales)):
            x = torch.arange(start=-(size - 1) / 2.0, end=(size - 1) / 2.0 + 1, dtype=torch.float, device=device)
            x = torch.exp(x**2 / (-2 * (size * scale) ** 2))
            weights = weights.unsqueeze(-1) * x[(None,) * i] if i > 0 else x
    floor = max(torch.min(weights).item(), 1e-3)
    return torch.clamp_(weights.to(torch.float), min=floor)


def nnunet_importance_map(roi: tuple[int, ...], sigma_scale, device: torch.device) -> torch.Tensor:
    """nnU-Net v2's window weights as ``nnUNetPredictor`` makes them (``compute_gaussian(roi, sigma_scale,
    value_scaling_factor=10)``, float16): scipy's gaussian filter of a one at ``roi // 2`` (half a voxel off
    MONAI's centre along an even roi, truncated at 4 sigmas), scaled to 10 at its peak, rounded to float16, its
    zeros given the smallest value; float32 here.  With MONAI's gaussian, labels of 60 windows differed from
    nnU-Net's on 4.4 % of the voxels, against 0.13 % (README, nnU-Net)."""
    from scipy.ndimage import gaussian_filter

    scales = sigma_scale if isinstance(sigma_scale, tuple) else (sigma_scale,) * len(roi)
    delta = np.zeros(roi)
    delta[tuple(size // 2 for size in roi)] = 1
    sigmas = [size * scale for size, scale in zip(roi, scales)]
    weights = torch.from_numpy(gaussian_filter(delta, sigmas, 0, mode="constant", cval=0))
    weights = (weights / (torch.max(weights) / 10)).to(torch.float16)
    weights[weights == 0] = torch.min(weights[weights != 0])
    return weights.to(device=device, dtype=torch.float32)


def predict_block(
    block: Block,
    source: ImageSource,
    model: ModelSpec,
    settings: InferenceSettings,
    preprocessing: Preprocessing,
    keep_weights: bool = True,
) -> Partial:
    """Weighted sums of the block's window predictions over the block's region, and the sums of the weights
    where ``keep_weights`` (:meth:`tilemask.settings.Finishing.needs_weights`)."""
    device = resolve_device(settings.device)
    extent, region = block.extent, block.region
    origin = tuple(lo for lo, _ in extent)
    with timing.timed("read"):
        raw, valid = source.read_with_valid(region)
    with timing.timed("preprocess"):
        data = preprocessing.apply(raw)
        if source.floating:  # NaN or infinite values are invalid pixels, like nodata
            finite = np.isfinite(data).all(axis=0)
            if not finite.all():
                valid = finite if valid is None else valid & finite
        if valid is not None:  # invalid pixels enter the network as 0: the normalized mean, MONAI's padding value
            data[:, ~valid] = 0.0
        if region != extent:  # an axis smaller than the roi: zero padding, as MONAI's F.pad(value=0)
            padded = np.zeros((data.shape[0], *region_shape(extent)), np.float32)
            padded[(slice(None), *local_slices(region, origin))] = data
            data = padded
    _, network = cached_runner(model, settings, data.shape[0], device)
    image, ready = to_device(data, device)
    weighted, weights, finite, starts, done = _compute_thread.submit(
        _accumulate, network, image, ready, list(block.windows()), origin, region_shape(extent), settings, device,
        block, keep_weights,
    ).result()  # fmt: skip
    _refuse_non_finite(finite, starts, done, source.path, settings.roi)

    keep = (slice(None), *local_slices(region, origin))
    weights = None if weights is None else weights[keep]
    if device.type in SUMS_STAY_ON:
        return DevicePartial(region=region, weighted=weighted[keep], weights=weights, valid=valid, done=done)
    return Partial(region=region, weighted=weighted[keep].numpy(), weights=None if weights is None else weights.numpy(),
                   valid=valid)  # fmt: skip


def probe_network(model: ModelSpec, settings: InferenceSettings, channels: int, windows: int | None = None,
                  measure_after: float = 0.0) -> tuple[int, str, InferenceSettings]:  # fmt: skip
    """Output channels of the network (one window of zeros ``(1, channels, *roi)`` on the worker's device),
    the backend that runs it, built now, and the settings the job's tasks run with (``auto`` settled for a job
    of ``windows`` forward passes, :func:`tilemask.backends.settle_auto`; as given when ``windows`` is None): a
    network that fails to load, to fit its weights, to take the inputs' channels or to convert fails before any
    work.  Each step's seconds go to the worker's stage timers (``probe: device``, ``probe: network``,
    ``probe: first window``): the start-up split that ``benchmarks/bench_engine.py`` prints."""
    try:
        return _probe(model, settings, channels, windows, measure_after)
    except NetworkRejected as exc:  # a 3D TorchScript archive (no spatial_dims to check) fed a volume's slices
        if model.slice_axis is None:
            raise
        roi = [size for axis, size in enumerate(settings.roi) if axis != model.slice_axis]
        # a 2D network of other input channels is rejected alike: what it needs is said, not that it is 3D
        raise WorkflowError(f"{exc}; inference.slice_axis {model.slice_axis} feeds it each window's slice, a tensor "
                            f"of {(1, channels, *roi)}: it needs a 2D network taking {channels} "
                            f"channel{'s' if channels != 1 else ''}") from None  # fmt: skip


def _probe(model: ModelSpec, settings: InferenceSettings, channels: int, windows: int | None,
           measure_after: float) -> tuple[int, str, InferenceSettings]:  # fmt: skip
    with timing.timed("probe: device"):
        device = resolve_device(settings.device)
        if device.type == "cuda":  # the context and CUDA's libraries now, not inside the network's figure
            torch.zeros((), device=device)
            torch.cuda.synchronize(device)
    with timing.timed("probe: network"):
        if windows is not None:
            settings = settle_auto(model, settings, channels, device, windows, measure_after)
        backend, network = cached_runner(model, settings, channels, device)
    with timing.timed("probe: first window"):
        return forward_check(network, channels, tuple(settings.roi), device), backend, settings


def _accumulate(network, image, ready, windows, origin, shape, settings: InferenceSettings, device, block: Block,
                keep_weights: bool = True):  # fmt: skip
    """``(sum w * pred, sum w, finite, starts, done)`` over the block's extent, per blend, windows in MONAI's
    order (:func:`_sums`; ``sum w`` None unless ``keep_weights``); on a GPU computed on the compute stream once
    the image's copy is ``ready``, and ``done`` is the event after it."""
    if device.type != "cuda":
        return (*_sums(network, image, windows, origin, shape, settings, device, block, keep_weights), None)
    stream = compute_stream(device)
    with torch.cuda.stream(stream):
        stream.wait_event(ready)
        image.record_stream(stream)  # copied on a Dask thread's stream: not reused before this work is done
        sums = _sums(network, image, windows, origin, shape, settings, device, block, keep_weights)
        done = torch.cuda.Event()
        done.record(stream)
    return (*sums, done)


def _sums(network, image, windows, origin, shape, settings: InferenceSettings, device, block: Block,
          keep_weights: bool = True):  # fmt: skip
    """``(sum w * pred, sum w, finite, starts)`` over the block's extent, per blend (one per flip, or one for
    ``tta_mode: patch``: :attr:`~tilemask.settings.InferenceSettings.blends`), on the image's device and
    current stream (``sum w`` None unless ``keep_weights``); ``finite[i]``: whether the prediction of the window
    at ``starts[i]`` (or a flip of it) holds only finite values, on the device too, so that checking it waits for
    the device once a block."""
    threads = torch.get_num_threads()  # the process's setting: forward passes run on this thread get it
    flips = settings.flips
    weight = importance_map(settings.roi, settings.mode, settings.sigma_scale, device)
    weighted = None
    weights = torch.zeros((settings.blends, *shape), dtype=torch.float32, device=device) if keep_weights else None
    # nnU-Net v2's mirroring (tta_mode patch): a window's outputs, each flipped back, averaged over its flips and
    # weighted by the unflipped weight, all into one blend; with MONAI's flipped images, each flip's own blend
    patch = settings.tta_mode == "patch" and len(flips) > 1
    if patch:
        blend_weight = [weight / len(flips)] * len(flips)
    else:
        blend_weight = [torch.flip(weight, list(axes)) if axes else weight for axes in flips]
    items = [(start, f) for start in windows for f in block.flips_of(start, flips)]
    finite = []
    began, began_cpu = time.perf_counter(), time.thread_time()
    clock = {"model": 0.0, "waited": 0.0, "model cpu": 0.0}
    # Only the forward passes get the process's threads: the windows' copies and sums are too small to split
    # (21 ms for a 120-window block on one thread, 36-47 ms on two), and one thread leaves the other cores to
    # the worker's Dask threads.
    with torch_threads(1), torch.inference_mode():
        with contextlib.closing(_predictions(network, image, items, origin, settings, threads, clock)) as answers:
            for batch, slices, prediction in answers:
                # a window's sum of its values times 0 is NaN when one of them is NaN or infinite, and never
                # overflows (the plain sum of finite logits of 1e35 did): 0.14 ms a batch of 8 x 3 x 128^2 here,
                # against 0.54 ms for isfinite(prediction).all(1)
                finite.append(torch.isfinite((prediction.flatten(1) * 0).sum(1)))
                if weighted is None:
                    channels = prediction.shape[1]
                    weighted = torch.zeros((settings.blends, channels, *shape), dtype=torch.float32, device=device)
                # Window by window, each product added in the same pass (addcmul_): no temporary product, and on
                # the CPU the window's sums still in cache (0.05 against 0.08 ms a window of 2 x 256^2 here).
                for s, p, (_, f) in zip(slices, prediction, batch):
                    blend = 0 if patch else f
                    weighted[(blend, slice(None), *s)].addcmul_(_flip(p, flips[f]), blend_weight[f])
                    if weights is not None and (not patch or not flips[f]):
                        weights[(blend, *s)] += weight if patch else blend_weight[f]
    timing.add("model", clock["model"])
    timing.add("accumulate", time.perf_counter() - began - clock["waited"],
               time.thread_time() - began_cpu - clock["model cpu"])
    return weighted.reshape(-1, *shape), weights, torch.cat(finite), [start for start, _ in items]


def _predictions(network, image, items, origin, settings: InferenceSettings, threads: int, clock: dict):
    """``(batch, slices, prediction)`` for each batch of ``items`` in order.  A runner that can start a batch and
    return (:class:`tilemask.backends.Halves`) gets batches of even sizes (:func:`_batched`) and has the next
    batch it takes in halves queued while the caller adds up one: its threads never wait for the caller.  Other
    batches (one too small to halve, any batch of another runner) run on this thread with ``threads`` torch
    threads, once the queued ones are answered.
    ``clock["model"]`` gets the forward passes' seconds, ``clock["waited"]`` the caller's seconds waiting for them
    (the same, unqueued), ``clock["model cpu"]`` this thread's CPU seconds in the unqueued ones; closed early,
    the queued batches not started yet are cancelled and the others waited for: none is left running into the
    next block."""
    flips = settings.flips
    queued = collections.deque()
    try:
        for batch in _batched(items, settings.batch_size, even=isinstance(network, Halves)):
            slices = [_window_slices(start, settings.roi, origin) for start, _ in batch]
            windows = torch.stack([_flip(image[(slice(None), *s)], flips[f]) for s, (_, f) in zip(slices, batch)])
            if isinstance(network, Halves) and network.takes(len(batch)):
                queued.append((batch, slices, network.submit(windows)))
                if len(queued) > QUEUED_BATCHES:
                    yield _answer(queued.popleft(), clock)
                continue
            while queued:
                yield _answer(queued.popleft(), clock)
            forward, forward_cpu = time.perf_counter(), time.thread_time()
            with torch_threads(threads):
                prediction = network(windows).to(torch.float32)
            seconds = time.perf_counter() - forward
            clock["model"] += seconds
            clock["waited"] += seconds
            clock["model cpu"] += time.thread_time() - forward_cpu
            yield batch, slices, prediction
        while queued:
            yield _answer(queued.popleft(), clock)
    finally:
        for *_, pending in queued:
            pending.cancel()


def _answer(queued: tuple, clock: dict) -> tuple:
    """``(batch, slices, prediction)`` of a queued batch, once answered; its seconds on ``clock``."""
    batch, slices, pending = queued
    waiting = time.perf_counter()
    prediction = pending.result().to(torch.float32)
    clock["waited"] += time.perf_counter() - waiting
    clock["model"] += pending.seconds()
    return batch, slices, prediction


def _refuse_non_finite(finite: torch.Tensor, starts: list, done, path: str, roi: tuple[int, ...]) -> None:
    """Fail the run on the first window the network answered NaN or an infinity for: blended, it makes NaN
    probabilities, which ``argmax`` turns into class 0 (MONAI's ``sliding_window_inference`` passes them on).
    One wait for the device per block, on this Dask thread: the compute thread goes on to the next block."""
    if done is not None:
        done.synchronize()
    failed = torch.nonzero(~finite.cpu())
    if len(failed):
        raise RunError(f"{path}: the network answered NaN or infinite values for the window at "
                       f"{list(starts[int(failed[0])])} (roi {list(roi)})")  # fmt: skip


def _flip(tensor: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """Flip spatial ``axes`` of a ``(C, *spatial)`` tensor."""
    return torch.flip(tensor, [a + 1 for a in axes]) if axes else tensor


def _window_slices(start: tuple[int, ...], roi: tuple[int, ...], origin: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(s - o, s - o + r) for s, r, o in zip(start, roi, origin))


def _batched(items: list, size: int, even: bool = False):
    """``items`` in batches of ``size``, the last one short; ``even``: as many batches, their sizes differing by
    one at most.  For :class:`tilemask.backends.Halves`: a block's short last batch (one window of 113 at 2048^2
    and a roi of 256) ran on the compute thread once the queued ones were answered, while the halves' threads
    waited (63 ms a block of 1.5 s); batches of 7 and 8 all run in halves, queued (README, "Execution")."""
    if not even or not items:
        yield from (items[i : i + size] for i in range(0, len(items), size))
        return
    batches = -(-len(items) // size)
    small, larger = divmod(len(items), batches)  # ``larger`` batches of small + 1 first, then small ones
    start = 0
    for i in range(batches):
        end = start + small + (i < larger)
        yield items[start:end]
        start = end
