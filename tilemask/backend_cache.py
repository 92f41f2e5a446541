"""The cache folder of :mod:`tilemask.backends`: converted networks and ``auto``'s measurements, on disk.

Under ``TILEMASK_CACHE_DIR`` (else ``~/.cache/tilemask``), one folder per backend, each entry named after the sha256
of the weights, the network, its arguments, the window shape and the backend's version (:func:`cache_path`), so
the next run or worker reads a conversion instead of making it again, and ``auto`` does not measure a backend it
has measured (its verdicts: :func:`verdict_path`) or count again the jobs it did not measure for (its tally:
:func:`unmeasured_seconds`).  Entries are written whole or not at all (:func:`publish_entry`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import InputError, WeightsError
from .settings import ModelSpec

logger = logging.getLogger(__name__)


def cache_path(spec: ModelSpec, backend: str, version: str, channels: int, roi: tuple[int, ...], suffix: str) -> Path:
    weights = "".join(_weights_digest(path, stamp) for path, stamp in zip(spec.weight_files, spec.weight_stamps))
    digest = hashlib.sha256(weights.encode())  # an ensemble's: each checkpoint's, in order (a retrained fold's too)
    digest.update(json.dumps([spec.network, spec.args_json, backend, version, channels, roi]).encode())
    folder = Path(os.environ.get("TILEMASK_CACHE_DIR") or Path.home() / ".cache" / "tilemask") / backend
    return folder / f"{digest.hexdigest()[:32]}{suffix}"


@functools.lru_cache(maxsize=16)
def _weights_digest(path: str, stamp: tuple[int, int]) -> str:
    """sha256 of a weights file, once per file version (``stamp``: mtime and size) and process."""
    digest = hashlib.sha256()
    with open(path, "rb") as weights:
        for block in iter(lambda: weights.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=16)
def local_spec(spec: ModelSpec) -> ModelSpec:
    """The spec with its weights on this machine: weights on object storage or a web server are fetched once
    (:func:`tilemask.storage.local_copy`); what follows reads, checks and caches the local file."""
    from .storage import local_copy

    try:
        local = local_copy(spec.weights)
    except InputError as exc:
        raise WeightsError(f"model.weights: {exc}") from None
    if local == spec.weights:
        return spec
    stat = os.stat(local)
    return dataclasses.replace(spec, weights=local, weights_stamp=(stat.st_mtime_ns, stat.st_size))


def publish_entry(write: Callable[[Path], None], final: Path, suffixes: tuple[str, ...]) -> None:
    """Write the files of a converted network under a temporary stem, then rename them into place, the one
    that marks the entry complete (``final``) last: a reader never sees half an entry.  A cache that cannot
    be written (read-only home, full disk) costs the next run a conversion, nothing more."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        stem = Path(tempfile.mkdtemp(dir=final.parent, prefix=".partial-")) / "model"
    except OSError as exc:
        logger.warning("cannot cache %s: %s", final, exc)
        return
    try:
        write(stem.with_suffix(suffixes[0]))
        for suffix in reversed(suffixes):
            os.replace(stem.with_suffix(suffix), final.with_suffix(suffix))
    except OSError as exc:
        logger.warning("cannot cache %s: %s", final, exc)
    finally:
        for leftover in stem.parent.iterdir():
            leftover.unlink()
        stem.parent.rmdir()


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive ``flock`` on ``path`` with the suffix ``.lock`` for what is inside: none where it cannot be
    made (a cache folder that cannot be written, where nothing is written either)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# The distributions that install each backend's module: ONNX Runtime's builds for GPUs and other accelerators
# are other distributions of the same ``onnxruntime`` module (named, not found by scanning every installed
# distribution: importlib.metadata.packages_distributions took 0.17-0.30 s here, these lookups 2.5 ms).
DISTRIBUTIONS = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml",
                    "onnxruntime-training", "onnxruntime-qnn", "onnxruntime-cann", "onnxruntime-rocm"),
}  # fmt: skip


def backend_version(backend: str) -> str:
    """The distributions and versions of the packages that run ``backend`` ("absent" where none is installed):
    the version alone for the module's own distribution, joined by "+" where several builds are installed (one
    of them is the module that imports)."""
    module = "torch" if backend.startswith("torch") else backend
    found = []
    for distribution in DISTRIBUTIONS.get(module, (module,)):
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(version if distribution == module else f"{distribution}-{version}")
    return "+".join(found) or "absent"


WARM_UP_PASSES, TIMED_ROUNDS = 2, 5  # how auto times a backend (tilemask.backends._paired_seconds): 14 passes in all
TIMING = f"w{WARM_UP_PASSES}r{TIMED_ROUNDS}"  # in a verdict's name: one timed otherwise is measured again


def verdict_path(spec: ModelSpec, name: str, channels: int, roi: tuple[int, ...], batch: int) -> Path:
    """Where ``auto``'s measurements of backend ``name`` are cached: per batch size, torch's threads, CPU
    (:func:`cpu_key`) and way of timing (:data:`TIMING`)."""
    suffix = f".b{batch}.t{torch.get_num_threads()}.{cpu_key()}.{TIMING}.verdict.json"
    return cache_path(spec, name, backend_version(name), channels, roi, suffix)


@functools.cache
def cpu_key() -> str:
    """A short name for this machine's CPU (:func:`cpu_model`) and the vector instructions torch's kernels use
    here.  Which backend is fastest depends on them, and a cache folder in a home shared by a cluster's nodes
    serves CPUs of several kinds: measured on one, a verdict held on all (this project's VMs over one home folder,
    AVX2 and AVX-512 ones, took 76 to 210 ms a batch of the same UNet)."""
    text = f"{cpu_model()}|{torch.backends.cpu.get_cpu_capability()}"
    return "cpu" + hashlib.sha256(text.encode()).hexdigest()[:8]


def gpu_key(device: torch.device) -> str:
    """A short name for the model of the GPU ``device``, its compute capability and the cuDNN version torch runs,
    as :func:`cpu_key` is for the CPU."""
    major, minor = torch.cuda.get_device_capability(device)
    text = f"{torch.cuda.get_device_name(device)}|sm{major}{minor}|cudnn{torch.backends.cudnn.version()}"
    return "gpu" + hashlib.sha256(text.encode()).hexdigest()[:8]


def cpu_model() -> str:
    """The CPU's model as Linux names it in ``/proc/cpuinfo``: ``model name`` on x86, the implementer and part
    numbers on ARM (which has no model name there); else the platform's word for it."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    if fields.get("model name"):
        return fields["model name"]
    if fields.get("CPU implementer"):
        return f"ARM implementer {fields['CPU implementer']} part {fields.get('CPU part', '?')}"
    import platform

    return platform.processor() or platform.machine()


def read_verdict(path: Path, sizes: list[int]) -> dict | None:
    """``auto``'s cached measurements for a network and backend (or why the backend cannot convert it); None
    when not measured (or unreadable)."""
    try:
        known = json.loads(path.read_text())
        if isinstance(known, dict) and isinstance(known.get("cannot_convert"), str):
            return {"cannot_convert": known["cannot_convert"]}
        return {
            "difference": float(known["difference"]),
            "seconds": {str(n): float(known["seconds"][str(n)]) for n in sizes},
            "torch_seconds": {str(n): float(known["torch_seconds"][str(n)]) for n in sizes},
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_cannot_convert(verdict: Path, reason: str) -> None:
    """Remember that a backend cannot take the network, so that ``auto`` neither converts it again nor counts
    it among the backends it has yet to measure (:func:`tilemask.backends.settle_auto`)."""
    publish_entry(lambda p: p.write_text(json.dumps({"cannot_convert": reason})), verdict, (".json",))


def tally_path(spec: ModelSpec, channels: int, roi: tuple[int, ...], batch: int) -> Path:
    """Where ``auto`` adds up the seconds of the jobs it did not measure for (per batch size, torch's threads and
    CPU, as its verdicts)."""
    suffix = f".b{batch}.t{torch.get_num_threads()}.{cpu_key()}.json"
    return cache_path(spec, "auto", backend_version("torch"), channels, roi, suffix)


def unmeasured_seconds(tally: Path) -> float:
    """The seconds of the jobs ``auto`` did not measure for, added up in ``tally`` (0 if unreadable)."""
    try:
        return float(json.loads(tally.read_text())["unmeasured_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0
