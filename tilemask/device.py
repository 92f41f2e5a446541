"""Copies between the host and a worker's device, and the CUDA streams they and the computation run on.

The compute thread (:mod:`tilemask.inference`) runs the forward passes on a high-priority compute stream;
each Dask thread copies on a stream of its own, and blends a chunk on it (:mod:`tilemask.finalize_device`),
so that its copies run beside the compute stream's work.  Events order a copy with the computation it feeds
or waits for.  On the CPU these are plain copies.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import numpy as np
import torch

_streams = threading.local()  # each Dask thread's CUDA stream for its copies, per device


def to_device(data: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """``data`` on ``device``, and on a GPU the event that marks its copy done: staged in pinned host memory
    (torch's caching host allocator reuses it once the copy is over) and copied on this thread's stream."""
    if device.type != "cuda":
        return torch.from_numpy(data).to(device), None
    stream = thread_stream(device)
    staged = torch.from_numpy(data).pin_memory()
    with torch.cuda.stream(stream):
        image = staged.to(device, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(stream)
    return image, ready


def to_host(tensors: tuple[torch.Tensor, ...], done: torch.cuda.Event | None) -> list[np.ndarray]:
    """Copies of ``tensors`` as numpy arrays in pageable memory; on a GPU copied after ``done`` (an event
    after the computation that wrote them, or None: this thread's stream wrote them) into pinned buffers on
    this thread's stream, which this thread alone waits for."""
    if tensors[0].device.type != "cuda":
        return [t.numpy().copy() for t in tensors]
    stream = thread_stream(tensors[0].device)
    with torch.cuda.stream(stream), torch.inference_mode():  # the compute thread's sums are inference tensors
        if done is not None:
            stream.wait_event(done)
        staged = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in tensors]
    stream.synchronize()
    return [t.numpy().copy() for t in staged]  # results can live long: not in page-locked memory


def on_thread_stream(device: torch.device):
    """Work inside runs on this thread's stream of ``device`` (nothing changes on the CPU)."""
    return torch.cuda.stream(thread_stream(device)) if device.type == "cuda" else contextlib.nullcontext()


def thread_stream(device: torch.device) -> torch.cuda.Stream:
    """This thread's stream for copies to and from ``device``."""
    streams = _streams.__dict__.setdefault("by_device", {})
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


@functools.cache
def compute_stream(device: torch.device) -> torch.cuda.Stream:
    """The compute thread's stream on ``device``.  High priority: torch hands out the streams of each priority
    from a pool of 32 per device, round robin, so a 33rd low-priority stream (16 Dask threads' copy streams
    and more) would be one of the first, and its kernels would queue behind another's copies."""
    return torch.cuda.Stream(device, priority=-1)
