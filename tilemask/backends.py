"""Inference backends: the same network run by torch, OpenVINO or ONNX Runtime, behind one call.

``inference.backend`` (see README, "Inference backends"):

* ``torch``: the network as loaded (:func:`tilemask.models.cached_model`): eager,
  TorchScript or an exported program, on the CPU or a GPU.  A checkpoint's network
  is traced to TorchScript once per device (kept only when the trace answers bit for
  bit what the network does there) and cached, so later runs load it in
  milliseconds without building the network or importing MONAI (:func:`_torch`).
* ``openvino``: the network converted by ``openvino.convert_model`` (traced with a
  window of the roi's shape, any batch size) and compiled for the CPU with float32
  precision: OpenVINO would otherwise run bfloat16 on CPUs that have it.
* ``onnxruntime``: the network exported with ``torch.onnx.export`` and run by ONNX
  Runtime's CPU execution provider.
* ``torch-mkldnn``: the TorchScript trace frozen and optimized for inference
  (``torch.jit.optimize_for_inference``): every convolution runs in oneDNN
  (MKLDNN) with its weights pre-packed.  Eager torch sends the convolutions of a
  single 3D window to its native ``slow_conv3d`` (its heuristic for oneDNN looks
  at batch x channels x depth x height): 4-6x slower here.
* ``auto``: on the CPU, the first of OpenVINO and ``torch-mkldnn`` that converts
  the network, whose activated output is within 1e-4 of torch's on three test
  windows, as a batch and one by one (random values, zeros, ones: constant
  windows are where instance norms part, :func:`_difference`), and that runs one
  window or a batch of ``batch_size`` faster than torch; each batch then runs
  through whichever was faster at its size.  Otherwise torch.  Measuring a backend
  (converting the network, timing it) takes seconds, paid once per network, roi
  and machine: until the jobs of a network at a roi would take
  :data:`tilemask.settings.MEASURE_AFTER_SECONDS` in torch together, ``auto``
  measures no backend it has no cached verdict for (:func:`settle_auto`).  On a GPU, torch,
  its forward pass for a full batch captured once as a CUDA graph and replayed
  (:func:`_cuda_graph`), when the capture succeeds and keeps torch's answer.

``inference.precision: bfloat16 | float16`` runs the network as loaded in torch under
``torch.autocast`` on the worker's device, as a MONAI user wraps
``sliding_window_inference`` (:func:`_autocast`); its outputs are summed in float32
like MONAI's.  A checkpoint's network runs eager, not as the cached trace: a traced
MONAI UNet under autocast answers otherwise than the eager one (logits 2e-3 apart in
float16, 1.2e-2 in bfloat16), and MONAI's users run it eager.

A converted network is built once per worker process and also kept on disk (:mod:`tilemask.backend_cache`:
``TILEMASK_CACHE_DIR``, else ``~/.cache/tilemask``) under the sha256
of the weights, the network, its arguments, the window shape and the backend's
version, so the next run or worker reads it instead of converting again; so are
``auto``'s measurements (difference and time), so a network that failed them is not converted again.  Every
runner takes and returns float32 torch tensors ``(N, C, *roi)`` on the CPU or
the model's device.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import json
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .backend_cache import (
    TIMED_ROUNDS,
    WARM_UP_PASSES,
    backend_version,
    cache_path,
    gpu_key,
    local_spec,
    locked,
    publish_entry,
    read_verdict,
    record_cannot_convert,
    tally_path,
    unmeasured_seconds,
    verdict_path,
)
from .errors import WeightsError, WorkflowError, first_line
from .imports import ignoring_warnings
from .models import MODELS_PER_PROCESS, cached_model
from .settings import InferenceSettings, ModelSpec

logger = logging.getLogger(__name__)

AUTO_ORDER = ("openvino", "torch-mkldnn")  # what auto tries on the CPU, in this order, before plain torch
AUTO_TOLERANCE = 1e-4  # largest difference of activated outputs for auto to take a converted network
AUTO_MARGIN = 0.05  # how much faster than torch a converted network must be timed for auto to take it

Runner = Callable[[torch.Tensor], torch.Tensor]
# how torch's CPU allocator, OpenVINO (std::bad_alloc) and ONNX Runtime say that memory ran out: a RuntimeError
_OUT_OF_MEMORY = re.compile(r"can't allocate memory|cannot allocate memory|out of memory|bad_alloc|bad allocation|"
                            r"failed to allocate", re.IGNORECASE)  # fmt: skip
_runners: OrderedDict[tuple, tuple[str, Runner]] = OrderedDict()
_runners_lock = threading.Lock()
loads = 0  # networks this process has built or loaded (each worker should do it once per model)


def cached_runner(spec: ModelSpec, settings: InferenceSettings, channels: int, device: torch.device) -> tuple[str, Runner]:
    """``(backend, run)`` for the network of ``spec`` on windows of ``channels`` x ``settings.roi``, built
    once per worker process; ``backend`` names what ``auto`` chose."""
    global loads
    key = (spec, str(device), settings.backend, settings.precision, channels, tuple(settings.roi),
           settings.batch_size, settings.measure)  # fmt: skip  # measure: a worker's later, bigger job measures
    with _runners_lock:
        if key in _runners:
            _runners.move_to_end(key)
            return _runners[key]
        local = local_spec(spec)  # weights on object storage or a web server: fetched once, read here
        try:
            _runners[key] = _build(local, settings, channels, device)
        except (WeightsError, WorkflowError) as exc:  # it named their copy in scratch, not the URL the workflow
            if local.weights == spec.weights:  # gives ("model.network: needed for ..., a checkpoint of weights")
                raise
            raise type(exc)(str(exc).replace(local.weights, spec.weights)) from None
        if device.type == "cuda":  # the weights were put there on this thread's stream: in place before any use
            torch.cuda.synchronize(device)
        loads += 1
        while len(_runners) > MODELS_PER_PROCESS:
            _runners.popitem(last=False)
        return _runners[key]


class NetworkRejected(WorkflowError):
    """:func:`forward_check`'s refusal of a network that rejects a window (what ``inference.slice_axis`` fed it is
    added by :func:`tilemask.inference.probe_network`)."""


def forward_check(run: Runner, channels: int, roi: tuple[int, ...], device: torch.device) -> int:
    """The network's output channels, from one window of zeros; a network that rejects the window, or does not
    answer ``(1, classes, *roi)``, is a workflow error."""
    shape = (1, channels, *roi)
    try:
        with torch.inference_mode():
            output = run(torch.zeros(shape, dtype=torch.float32, device=device))
    except Exception as exc:  # noqa: BLE001 - torch and TorchScript raise RuntimeError with pages of context
        if out_of_memory(exc):
            raise  # the machine, not the workflow
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        raise NetworkRejected(f"model: the network rejects a {channels}-channel window of roi {list(roi)}: "
                            f"{lines[-1] if lines else type(exc).__name__}") from None  # fmt: skip
    if not isinstance(output, torch.Tensor) or output.ndim != len(shape) or tuple(output.shape[2:]) != tuple(roi):
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise WorkflowError(f"model: the network turns a window of shape {shape} into {got}; expected (1, classes, *roi)")
    return int(output.shape[1])


def settle_auto(spec: ModelSpec, settings: InferenceSettings, channels: int, device: torch.device, windows: int,
                after: float) -> InferenceSettings:  # fmt: skip
    """``settings`` for a job of ``windows`` forward passes of one window: with ``measure`` off while ``auto``
    has no cached verdict for some backend it tries and the network's jobs at this roi on this machine, this one
    and the earlier ones it did not measure for, would take less than ``after`` seconds in torch together.  A
    first small job (the demo) then does not wait for measurements it cannot repay, and a small job run again
    and again measures once they add up.  The job's time is estimated from a window of zeros: up to three, as
    the first passes of a TorchScript network are slower (it optimises the graph as it goes: 0.05-0.27 s
    against 0.01 s for the demo's window)."""
    if settings.backend != "auto" or device.type != "cpu" or settings.precision != "float32" or not settings.measure:
        return settings
    local, roi, batch = local_spec(spec), tuple(settings.roi), settings.batch_size
    if not os.path.isfile(local.weights):
        return settings  # load_model's own error comes from building it
    sizes, unmeasured = sorted({1, batch}), []
    for name in AUTO_ORDER:
        known = read_verdict(verdict_path(local, name, channels, roi, batch), sizes)
        if known is None:
            unmeasured.append(name)
        elif _faster_sizes(known):
            break  # auto takes this one: it never tries those after it
    if not unmeasured:
        return settings
    tally = tally_path(local, channels, roi, batch)
    before = unmeasured_seconds(tally)
    # the runner the job gets if it does not measure: built once, not once more for the job
    _, run = cached_runner(spec, dataclasses.replace(settings, measure=False), channels, device)
    for _ in range(3):
        start = time.perf_counter()
        forward_check(run, channels, roi, device)
        estimate = windows * (time.perf_counter() - start)
        if before + estimate < after:
            break
    else:
        return settings
    with locked(tally):  # read again: a job settling at the same time may have added its seconds since
        before = unmeasured_seconds(tally)
        if before + estimate >= after:
            return settings  # with them, this job repays measuring
        publish_entry(lambda p: p.write_text(json.dumps({"unmeasured_seconds": before + estimate})), tally, (".json",))
    logger.info("auto: %d windows, about %.1f s in torch (%.1f s with the earlier jobs): too few to repay measuring "
                "%s", windows, estimate, before + estimate, ", ".join(unmeasured))  # fmt: skip
    return dataclasses.replace(settings, measure=False)


def _build(spec: ModelSpec, settings: InferenceSettings, channels: int, device: torch.device) -> tuple[str, Runner]:
    """The runner of :func:`cached_runner`, ``spec``'s weights on this machine (:func:`local_spec`)."""
    backend, roi, batch = settings.backend, tuple(settings.roi), settings.batch_size

    @functools.cache
    def network() -> torch.nn.Module:  # built (MONAI imported) only when no cached conversion serves
        model = cached_model(spec, device)
        forward_check(model, channels, roi, device)
        return model

    if not os.path.isfile(spec.weights):
        return "torch", network()  # raises load_model's own error, naming the weights
    if settings.precision != "float32":  # with backend auto or torch (tilemask.workflow refuses the others)
        if device.type == "cuda" and settings.precision == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise WorkflowError(f"inference.precision: bfloat16 is not supported by {device}; use float16")
        return f"torch under {settings.precision} autocast", _autocast(network(), settings.precision, device)
    if backend != "torch" and not (backend == "auto" and device.type != "cpu"):
        if device.type != "cpu":
            raise WorkflowError(f"inference.backend: {backend} runs on the CPU, and inference.device is {device}")
        for name in AUTO_ORDER if backend == "auto" else (backend,):
            converted = _converted(spec, name, backend == "auto", network, channels, roi, batch, settings.measure)
            if converted is not None:
                logger.info("inference backend: %s", converted[0])
                return converted
    run = _torch(spec, network, channels, roi, device)
    if backend == "auto" and device.type == "cuda":
        graphed = _cuda_graph(run, channels, roi, batch, device)
        if graphed is not None:
            return f"torch, replayed as a CUDA graph of {batch} windows", graphed
    return "torch", _halved(run, "torch", roi, batch) if device.type == "cpu" else run


def _cuda_graph(network: torch.nn.Module, channels: int, roi: tuple[int, ...], batch: int,
                device: torch.device) -> Runner | None:  # fmt: skip
    """The network's forward pass over a batch of ``batch`` windows captured once as a CUDA graph, then
    replayed: one launch per batch instead of one per kernel, so the GPU waits neither for Python to launch
    each kernel nor for the GIL, which a worker's Dask threads take in turns.  On an H200, MONAI's UNet
    16-32-64-128 took 0.84 ms a batch of 8 windows of 256^2 replayed, against 3.2 ms eager; eager forward
    passes took 1.5-1.9x their time alone in a run.  Any other batch size (a block's last batch, one window)
    runs eagerly: padded to a full batch, TF32 convolutions answer otherwise than on the batch itself.
    Taken when the capture succeeds and a replay gives eager's answer on the same batch of random windows
    (:func:`_activated_gap` within ``AUTO_TOLERANCE``); else None, and the network runs eagerly.  Not on
    constant windows, as the converters are checked: a replay runs the captured kernels, and on a constant
    window instance norm divides their rounding by sqrt(eps) (a review perturbed every convolution of the
    benchmark UNet by about 1 ulp: zeros moved 6e-5 to 3.3e-4 in softmax, random windows 1.6e-6; eager against
    replay differed by 9.5e-7 in logits on an H200)."""
    # Every CUDA call here on ``device``: the capture's synchronisation and the replay's launch take the thread's
    # current device, which is GPU 0 on a Dask thread whatever GPU its worker holds.
    with torch.cuda.device(device):
        return _capture(network, channels, roi, batch, device)


def _capture(network: torch.nn.Module, channels: int, roi: tuple[int, ...], batch: int,
             device: torch.device) -> Runner | None:  # fmt: skip
    static = torch.zeros((batch, channels, *roi), dtype=torch.float32, device=device)
    try:
        warm = torch.cuda.Stream(device)  # cuDNN's workspaces and lazy initialisation before, not in, the graph
        warm.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(warm), torch.no_grad():
            for _ in range(3):
                network(static)
        torch.cuda.current_stream(device).wait_stream(warm)
        graph = torch.cuda.CUDAGraph()
        # captured on the warm-up stream of ``device`` (torch's default capture stream is the current device's);
        # thread_local: the worker's other threads may copy and allocate meanwhile
        with torch.no_grad(), torch.cuda.graph(graph, stream=warm, capture_error_mode="thread_local"):
            output = network(static)
    except Exception as exc:  # noqa: BLE001 - a network that syncs with the host or branches on values
        logger.warning("the network cannot be captured as a CUDA graph, running it eagerly: %s", first_line(exc))
        return None
    lock = threading.Lock()  # one set of static buffers
    done = torch.cuda.Event()  # after the last replay's answer is copied out: a call on another stream waits

    def run(windows: torch.Tensor) -> torch.Tensor:
        if len(windows) != batch:
            return network(windows)
        with lock, torch.cuda.device(device):  # the replay launches on the current device's current stream
            stream = torch.cuda.current_stream(device)
            stream.wait_event(done)
            static.copy_(windows)
            graph.replay()  # on the caller's current stream, in order with the copies
            answer = output.clone()
            done.record(stream)
            return answer

    windows = torch.from_numpy(np.random.default_rng(0).standard_normal(static.shape, dtype=np.float32)).to(device)
    with torch.inference_mode():
        gap = _activated_gap(network(windows), run(windows))
    if gap > AUTO_TOLERANCE:
        logger.warning("the CUDA graph's answer is %.2g from the network's: running it eagerly", gap)
        return None
    return run


def _autocast(network: torch.nn.Module, precision: str, device: torch.device) -> Runner:
    """The network's forward passes under ``torch.autocast`` in ``precision`` on ``device``'s type, its output
    back in float32 (exactly: every bfloat16 and float16 value is a float32), where MONAI's sums promote it."""
    dtype = getattr(torch, precision)

    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype):
            return network(batch).to(torch.float32)

    return run


class NotConvertible(Exception):
    """A network a backend cannot take, for a reason that is not worth a warning (``auto`` runs torch)."""


def _converted(spec: ModelSpec, name: str, auto: bool, network: Callable[[], torch.nn.Module], channels: int,
               roi: tuple[int, ...], batch: int, measure: bool) -> tuple[str, Runner] | None:  # fmt: skip
    """Backend ``name``'s runner.  For ``auto``, only when it keeps torch's answer and is faster than torch on
    one window or on ``batch`` (measured once, then read from the cache; not measured unless ``measure``);
    each batch then runs through whichever of the two was faster at its size.  None when not taken."""
    sizes = sorted({1, batch})
    verdict = verdict_path(spec, name, channels, roi, batch) if auto else None
    known = read_verdict(verdict, sizes) if verdict is not None else None
    if known is not None and not _faster_sizes(known):
        return None  # measured before: under this backend the network parts from torch, or is no faster
    if auto and known is None and not measure:
        return None  # a job too small to repay measuring it (settle_auto)
    try:
        run = CONVERTERS[name](spec, network, channels, roi)
    except ImportError:
        if not auto:
            extra = " (pip install 'tilemask[onnx]')" if name == "onnxruntime" else ""  # openvino is a dependency
            raise WorkflowError(f"inference.backend: {name} is not installed on this worker{extra}") from None
        if backend_version(name) == "absent":  # the verdict's key holds that: installing the package makes another
            record_cannot_convert(verdict, "not installed")
        return None
    except WorkflowError:
        raise  # the network itself rejects the window
    except Exception as exc:  # noqa: BLE001 - exporters raise anything a traced network can
        reason = _conversion_failure(exc)
        if not auto:
            raise WorkflowError(f"inference.backend: {name} cannot convert {spec.network or spec.weights}: "
                                f"{reason}") from None  # fmt: skip
        log = logger.info if isinstance(exc, NotConvertible) else logger.warning
        log("%s cannot convert the network, auto tries the next backend: %s", name, reason)
        if not isinstance(exc, OSError) and not out_of_memory(exc):  # those may pass; the network stays as it is
            record_cannot_convert(verdict, reason)
        return None
    if not auto:
        return name, _halved(run, name, roi, batch)
    reference = functools.cache(lambda: _torch(spec, network, channels, roi, torch.device("cpu")))
    if known is None:
        difference = _difference(network(), run, channels, roi)
        untimed = (math.nan, math.nan)  # a network that parts from torch's answer is not taken: not worth timing
        timed = {n: _paired_seconds(run, reference(), channels, roi, n) if difference <= AUTO_TOLERANCE else untimed
                 for n in sizes}  # fmt: skip
        known = {
            "difference": difference,
            "seconds": {str(n): seconds for n, (seconds, _) in timed.items()},
            "torch_seconds": {str(n): seconds for n, (_, seconds) in timed.items()},
        }
        publish_entry(lambda p: p.write_text(json.dumps(known)), verdict, (".json",))
    faster = _faster_sizes(known)
    logger.info("auto and %s: softmax %.2g from torch's; seconds for %s windows: %s against torch's %s", name,
                known["difference"], sizes, [known["seconds"][str(n)] for n in sizes],
                [known["torch_seconds"][str(n)] for n in sizes])  # fmt: skip
    if not faster:
        return None
    if faster == set(sizes):
        return name, _halved(run, name, roi, batch)

    torch_run = reference()

    def fastest(windows: torch.Tensor) -> torch.Tensor:  # one window, or a batch (a block's last one may be short)
        return (run if (1 if len(windows) == 1 else batch) in faster else torch_run)(windows)

    alone, batched = (name if n in faster else "torch" for n in sizes)
    return f"{alone} for one window, {batched} for batches of {batch}", _halved(fastest, batched, roi, batch)


HALVED_RUNTIMES = ("torch", "torch-mkldnn")
"""The CPU runtimes whose batches :func:`_halved` splits, calling their runner from two threads at once: a
TorchScript trace, torch-mkldnn's frozen one, or the network as loaded (whose ``forward`` must then keep no state
between calls, as for any server that answers requests on several threads).  Not OpenVINO (one infer request
under a lock) nor ONNX Runtime: both keep thread pools of their own."""
HALVED_FROM = 4  # windows in a batch: each half a batch of 2 or more, never one window


def _halved(run: Runner, runtime: str, roi: tuple[int, ...], batch: int) -> Runner:
    """``run`` with each batch of at least ``HALVED_FROM`` 2D windows split in two halves run at once, each on
    a thread of its own with half of the calling thread's torch threads, where ``runtime`` runs the batches on the
    CPU and the calling thread (the one that builds the runner: a worker's, set by :func:`set_torch_threads`) has an
    even number of them; else ``run`` itself.  Each half is a batch: a single-window runner (``auto``'s) is never
    given one.

    One forward pass over both cores stalls whenever another thread of the worker takes one of them: each of
    its parallel regions waits for both of its threads.  On this project's 2-core VM (MONAI's UNet 16-32-64-128,
    batches of 8 windows of 256^2, 2026-12-04), two halves in one thread each took 96-98 ms a batch alone
    against 95-103 ms for the batch on both threads, and 131-136 ms against 149-158 ms beside a thread doing
    numpy work and compression; in runs of 16384^2 tilemask took 95.5 / 106.9 s against 107.7-128.4 s.
    Not for 3D windows: a half of a few 3D windows may run in eager torch's slow ``slow_conv3d`` (not measured);
    not under autocast (a reduced precision's answer depends on the batch).  A window's answer in a half of the
    batch differs from its answer in the whole batch by float32 rounding (3e-6 in logits here).  ``auto`` times
    the runtimes unhalved (:func:`_paired_seconds`): halving is the same for torch and torch-mkldnn."""
    threads = torch.get_num_threads()
    if runtime not in HALVED_RUNTIMES or len(roi) != 2 or batch < HALVED_FROM or threads < 2 or threads % 2:
        return run
    logger.info("inference backend %s: each batch of %d windows or more in two halves at once, on threads of %d "
                "torch threads", runtime, HALVED_FROM, threads // 2)  # fmt: skip
    return Halves(run, _halves_pool(threads // 2))


class Halves:
    """A runner whose batches run on the two threads of :func:`_halves_pool` (:func:`_halved`).

    Called, it runs a batch and returns its answer, as any runner.  :meth:`submit` starts a batch and returns at
    once (:class:`Pending`), so that a caller can queue the next batch while one runs and add up the last one's
    answer meanwhile: each pool thread takes the next half as soon as its own is done, instead of waiting at
    the end of each batch for the other half, which a Dask thread on its core slowed."""

    def __init__(self, run: Runner, pool: concurrent.futures.ThreadPoolExecutor):
        self.run, self.pool = run, pool

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        if not self.takes(len(windows)):  # on the calling thread, with its torch threads
            return self.run(windows)
        return self.submit(windows).result()

    @staticmethod
    def takes(windows: int) -> bool:
        """Whether a batch of ``windows`` windows runs in halves (:meth:`submit`): ``HALVED_FROM`` or more."""
        return windows >= HALVED_FROM

    def submit(self, windows: torch.Tensor) -> Pending:
        """The forward passes of a batch that :meth:`takes` started on the pool, in two halves."""
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()  # the caller's, per thread

        def half(part: torch.Tensor) -> tuple[torch.Tensor, float]:
            start = time.perf_counter()
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return self.run(part), time.perf_counter() - start

        return Pending([self.pool.submit(half, part) for part in windows.chunk(2)])


class Pending:
    """A batch started by :meth:`Halves.submit`: the futures of its halves."""

    def __init__(self, halves: list[concurrent.futures.Future]):
        self.halves = halves

    def result(self) -> torch.Tensor:
        """The batch's answer, once both halves are done (a half's error once both are: none is left running into
        the caller's next work)."""
        concurrent.futures.wait(self.halves)
        return torch.cat([half.result()[0] for half in self.halves])

    def seconds(self) -> float:
        """The forward passes' time, once done: the longer half's."""
        return max(half.result()[1] for half in self.halves)

    def cancel(self) -> None:
        """The halves not started yet cancelled, then the others waited for."""
        for half in self.halves:
            half.cancel()
        concurrent.futures.wait(self.halves)


@functools.cache
def _halves_pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """The two threads of this process that run the halves of a batch (:func:`_halved`), ``threads`` torch threads
    each, started now.  ``torch.set_num_threads`` sets the calling thread's count and also the process's, which a
    thread's first use of torch copies: the count of the thread that builds the pool is put back as the process's
    once both have set theirs, so a thread started later (a Dask thread) does not take the halves' count."""

    def start() -> None:
        torch.get_num_threads()  # torch's own first-use setting of this thread's count, before ours
        torch.set_num_threads(threads)

    pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="tilemask-half", initializer=start)
    both = threading.Barrier(3)
    started = [pool.submit(both.wait) for _ in range(2)]  # one task per thread: each waits for the other's start
    both.wait()
    concurrent.futures.wait(started)
    torch.set_num_threads(torch.get_num_threads())  # this thread's count, as the process's again
    return pool


def _conversion_failure(exc: BaseException) -> str:
    """A converter's error in one line: OpenVINO's begins with where in its sources a check failed (``Check
    'false' failed at src/frontends/...cpp:151:``) and names the operations it has no rule for in a summary."""
    unconverted = re.search(r"No conversion rule found for operations: .*", str(exc))
    return unconverted.group(0).strip() if unconverted else first_line(exc)


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says that memory ran out (torch's CPU allocator and the converters raise RuntimeError)."""
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or bool(_OUT_OF_MEMORY.search(str(exc)))


def _faster_sizes(verdict: dict) -> set[int]:
    """The batch sizes at which a backend that keeps torch's answer was timed faster than torch by more than
    :data:`AUTO_MARGIN`: two timings of the same torch network on one VM, seconds apart, differed by up to 23%
    (2026-12-04), and a verdict is kept for good; a near tie stays with torch, MONAI's own runtime."""
    if "cannot_convert" in verdict or not verdict["difference"] <= AUTO_TOLERANCE:  # NaN: no match either
        return set()
    return {int(n) for n, seconds in verdict["seconds"].items()
            if seconds < (1 - AUTO_MARGIN) * verdict["torch_seconds"][n]}  # fmt: skip


def _paired_seconds(run: Runner, reference: Runner, channels: int, roi: tuple[int, ...],
                    batch: int) -> tuple[float, float]:  # fmt: skip
    """Seconds of one batch of ``batch`` random windows through ``run`` and through torch (``reference``): each
    warmed up :data:`WARM_UP_PASSES` times, then the two in turn :data:`TIMED_ROUNDS` times, the median of each.

    Warmed up, because a TorchScript network optimises its graph over its first passes and fresh buffers
    page-fault; in turn, so that a machine whose speed moves meanwhile moves both.  Measured one after the other,
    best of two after one pass, on a worker's probe on 2026-12-04: torch-mkldnn 225 ms a batch of 8, torch 253 ms,
    both about twice their steady time, and ``auto`` took torch-mkldnn for batches, which then ran 142 ms a batch
    alone against torch's 112 ms.  Measured in turn after three warm-up passes on the same VM: 108 and 104 ms
    (docs/benchmarks.md)."""
    windows = torch.from_numpy(np.random.default_rng(0).standard_normal((batch, channels, *roi), dtype=np.float32))
    times: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        for runner in (run, reference):
            for _ in range(WARM_UP_PASSES):
                runner(windows)
        for _ in range(TIMED_ROUNDS):
            for i, runner in enumerate((run, reference)):
                start = time.perf_counter()
                runner(windows)
                times[i].append(time.perf_counter() - start)
    return float(np.median(times[0])), float(np.median(times[1]))


def _torch(spec: ModelSpec, network: Callable[[], torch.nn.Module], channels: int, roi: tuple[int, ...],
           device: torch.device, eager_if_out_of_memory: bool = True) -> Runner:  # fmt: skip
    """The network in torch: a checkpoint's network traced to TorchScript once per device and cached, so a
    later run loads it in milliseconds without building the network or importing MONAI (on a GPU machine whose
    MONAI imports torchvision and transformers, 16 s of a worker's start: ``benchmarks/gpu/NOTES.md``); kept
    only when the trace gives the network's own output bit for bit, for one window and for three, on ``device``.
    On a GPU the trace runs op by op (:func:`_op_by_op`).  Memory that runs out while tracing (it checks three
    windows at once) runs the network as it is, or is raised when not ``eager_if_out_of_memory`` (torch-mkldnn,
    which needs the trace, fails now and is tried again later)."""
    if spec.archive != "state_dict":
        return network()
    path = cache_path(spec, "torchscript", torch.__version__, channels, roi, _trace_suffix(device))
    if path.is_file():
        try:
            return _traced_runner(torch.jit.load(str(path), map_location=device).eval(), device)
        except RuntimeError as exc:
            if out_of_memory(exc):  # the device's memory, not the file: traced again it would need more
                raise
            logger.warning("%s: unreadable cached TorchScript, tracing again: %s", path, first_line(exc))
    eager = network()
    try:
        traced = _trace(eager, channels, roi, device)
    except Exception as exc:  # noqa: BLE001 - out of memory: _trace lets nothing else through
        if not eager_if_out_of_memory:
            raise
        logger.warning("memory ran out while tracing the network (%s): running it as it is", first_line(exc))
        return eager
    if traced is None:
        return eager
    publish_entry(lambda p: p.write_bytes(_archive(traced)), path, (".pt",))
    return _traced_runner(traced, device)


def _archive(traced: torch.jit.ScriptModule) -> bytes:
    """The trace as TorchScript's archive, made in memory: written to a path, a full disk ends the process, as
    torch's archive writer throws as it closes the file, in a destructor (SIGABRT; every worker that traced the
    network died so).  Python writes the bytes, where a full disk is an ``OSError`` that costs the cache entry."""
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    return buffer.getvalue()


def _trace_suffix(device: torch.device) -> str:
    """A cached trace's suffix: one trace per GPU number, as a traced network may hold its device as a constant (a
    tensor made in ``forward``), per GPU model and cuDNN version (a home folder shared by nodes with GPUs of several
    kinds: the trace is checked only where it was made), and per cuDNN setting that a trace freezes into its
    convolutions (enabled, benchmark, deterministic, TF32), as checked against the network when traced."""
    if device.type == "cpu":
        return ".pt"
    cudnn = torch.backends.cudnn
    flags = "".join(str(int(f)) for f in (cudnn.enabled, cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32))
    return f".{device.type}{device.index or 0}.{gpu_key(device)}.cudnn{flags}.pt"


def _traced_runner(traced: torch.jit.ScriptModule, device: torch.device) -> Runner:
    return traced if device.type == "cpu" else _op_by_op(traced)


def _op_by_op(traced: torch.jit.ScriptModule) -> Runner:
    """``traced`` run by TorchScript's interpreter without its optimizing executor (a per-thread setting): the
    network's operators one by one, the kernels eager torch launches, never fused.  On a GPU that executor
    fuses element-wise operators after profiling a few calls, into kernels that may round otherwise than the
    network's own, after the trace was checked.  Only while ``traced`` is never called otherwise: a module whose
    executor has built its optimized plan runs that plan whatever the setting."""

    def run(windows: torch.Tensor) -> torch.Tensor:
        with torch.jit.optimized_execution(False):
            return traced(windows)

    return run


def _trace(network: torch.nn.Module, channels: int, roi: tuple[int, ...],
           device: torch.device) -> torch.jit.ScriptModule | None:  # fmt: skip
    try:
        with ignoring_warnings(), torch.no_grad():
            traced = torch.jit.trace(network, torch.zeros((1, channels, *roi), device=device), check_trace=False)
        run, rng = _traced_runner(traced, device), np.random.default_rng(0)
        with torch.inference_mode():
            for batch in (1, 3):
                window = torch.from_numpy(rng.standard_normal((batch, channels, *roi), dtype=np.float32)).to(device)
                if not torch.equal(network(window), run(window)):
                    logger.info("the traced network differs from the network: running it as it is")
                    return None
    except Exception as exc:  # noqa: BLE001 - tracing fails on networks with data-dependent control flow
        if out_of_memory(exc):
            raise
        logger.info("the network cannot be traced (%s): running it as it is", first_line(exc))
        return None
    return traced


def _difference(network: Runner, run: Runner, channels: int, roi: tuple[int, ...]) -> float:
    """Largest difference between the activated outputs (softmax over channels; sigmoid for one) of torch
    and a converted network, on three windows, as one batch and one by one: seeded random normal values,
    zeros (padding, clipped air, nodata fill) and ones.  Constant windows are where converted networks part
    from torch: an instance norm over a constant feature map divides rounding noise by ``sqrt(eps)``, and
    OpenVINO and ONNX Runtime compute that variance otherwise than torch (measured on a zero window with
    MONAI's UNet 16-32-64-128: softmax outputs 0.95 apart under OpenVINO).  One by one, because torch itself
    convolves a single 3D window with another kernel than a batch."""
    normal = np.random.default_rng(0).standard_normal((channels, *roi), dtype=np.float32)
    windows = torch.from_numpy(np.stack([normal, np.zeros_like(normal), np.ones_like(normal)]))
    with torch.inference_mode():
        return max(_activated_gap(network(batch), run(batch)) for batch in (windows, *windows[:, None]))


def _activated_gap(expected: torch.Tensor, got: torch.Tensor) -> float:
    """Largest difference of two outputs activated (softmax over channels; sigmoid for one channel)."""
    expected, got = expected.to(torch.float32), got.to(torch.float32)
    activate = (lambda x: torch.softmax(x, 1)) if expected.shape[1] > 1 else torch.sigmoid
    return float((activate(expected) - activate(got)).abs().max())


def _read_cached(path: Path, read: Callable[[Path], object]):
    """``read(path)``: a runtime's network from its cached conversion; None when there is none, or when it cannot
    be read (a file cut short: converted again, as an unreadable cached TorchScript is traced again)."""
    if not path.is_file():
        return None
    try:
        return read(path)
    except Exception as exc:  # noqa: BLE001 - each runtime raises its own types for a corrupt file
        if out_of_memory(exc):
            raise
        logger.warning("%s: unreadable cached conversion, converting again: %s", path, first_line(exc))
        return None


def _openvino(spec: ModelSpec, network: Callable[[], torch.nn.Module], channels: int, roi: tuple[int, ...]) -> Runner:
    import openvino as ov

    path = cache_path(spec, "openvino", ov.__version__, channels, roi, ".xml")
    core = ov.Core()
    on_cpu = functools.partial(core.compile_model, device_name="CPU", config={
        "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
    })  # fmt: skip
    compiled = _read_cached(path, lambda p: on_cpu(core.read_model(p)))
    if compiled is None:
        example = torch.zeros((1, channels, *roi))
        model = ov.convert_model(network(), example_input=example, input=[ov.PartialShape([-1, channels, *roi])])
        publish_entry(functools.partial(_save_openvino, model), path, (".xml", ".bin"))
        compiled = on_cpu(model)
    request, lock = compiled.create_infer_request(), threading.Lock()

    def run(batch: torch.Tensor) -> torch.Tensor:
        with lock:  # one request: the compute thread, and the probe before any work
            output = request.infer([batch.detach().cpu().numpy()])[0]
            return torch.from_numpy(np.array(output, dtype=np.float32))

    return run


def _save_openvino(model, path: Path) -> None:
    """``ov.save_model``, whose failure to write (a full disk) is a ``RuntimeError`` (``basic_ios::clear:
    iostream error``) that read as a network OpenVINO cannot convert: an ``OSError`` here, the cache entry lost."""
    import openvino as ov

    try:
        ov.save_model(model, path, compress_to_fp16=False)
    except RuntimeError as exc:
        raise OSError(f"OpenVINO could not write it: {first_line(exc)}") from None


def _onnxruntime(spec: ModelSpec, network: Callable[[], torch.nn.Module], channels: int, roi: tuple[int, ...]) -> Runner:
    import onnxruntime as ort

    path = cache_path(spec, "onnxruntime", ort.__version__, channels, roi, ".onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    start = functools.partial(ort.InferenceSession, sess_options=options, providers=["CPUExecutionProvider"])
    session = _read_cached(path, lambda p: start(p.read_bytes()))
    if session is None:
        buffer = io.BytesIO()
        torch.onnx.export(network(), (torch.zeros((1, channels, *roi)),), buffer, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)  # fmt: skip
        exported = buffer.getvalue()
        publish_entry(lambda p: p.write_bytes(exported), path, (".onnx",))
        session = start(exported)

    def run(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"x": batch.detach().cpu().numpy()})[0])

    return run


def _mkldnn(spec: ModelSpec, network: Callable[[], torch.nn.Module], channels: int, roi: tuple[int, ...]) -> Runner:
    """The CPU network's TorchScript (the cached trace, or the user's archive) frozen and optimized for
    inference: every convolution in oneDNN with pre-packed weights."""
    module = _torch(spec, network, channels, roi, torch.device("cpu"), eager_if_out_of_memory=False)
    if not isinstance(module, torch.jit.ScriptModule):
        raise NotConvertible("the network is not TorchScript and cannot be traced")
    with ignoring_warnings():
        return torch.jit.optimize_for_inference(torch.jit.freeze(module.eval()))


CONVERTERS: dict[str, Callable[[ModelSpec, Callable[[], torch.nn.Module], int, tuple[int, ...]], Runner]] = {
    "openvino": _openvino,
    "onnxruntime": _onnxruntime,
    "torch-mkldnn": _mkldnn,
}
