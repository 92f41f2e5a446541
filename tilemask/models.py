"""Network construction, safe weights loading and the per-worker model cache.

Weights are either a ``state_dict`` (loaded with ``torch.load(weights_only=True)``,
which refuses any pickle that would run code) or a TorchScript archive (a zip
with a ``code/`` folder, loaded with ``torch.jit.load``).  A model is built once
per worker process and device, then reused by every task: tasks carry only the
small :class:`ModelSpec`, never the network.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import threading
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import WeightsError, WorkflowError

logger = logging.getLogger(__name__)

MODELS_PER_PROCESS = 2  # least recently used models beyond this are dropped (GPU memory)
_models: OrderedDict[tuple[ModelSpec, str], torch.nn.Module] = OrderedDict()
_models_lock = threading.Lock()
loads = 0  # models this process has loaded (each worker should load a model once)


@dataclass(frozen=True)
class ModelSpec:
    """What identifies a model: network class, its arguments (canonical JSON) and the weights path."""

    network: str
    args_json: str
    weights: str
    weights_stamp: tuple[int, int] = (0, 0)  # (mtime_ns, size): retrained weights are a new model

    @classmethod
    def create(cls, network: str, args: dict[str, Any], weights: str) -> ModelSpec:
        try:
            stat = os.stat(weights)
            stamp = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            stamp = (0, 0)
        return cls(network, json.dumps(args, sort_keys=True), weights, stamp)

    @property
    def args(self) -> dict[str, Any]:
        return json.loads(self.args_json)

    @property
    def is_torchscript(self) -> bool:
        try:
            with zipfile.ZipFile(self.weights) as archive:
                return any("/code/" in name for name in archive.namelist())
        except (zipfile.BadZipFile, OSError):
            return False


def network_class(name: str) -> type[torch.nn.Module]:
    """``UNet`` (a class in ``monai.networks.nets``) or ``package.module:Class``."""
    if ":" in name:
        module_name, _, class_name = name.partition(":")
    else:
        module_name, class_name = "monai.networks.nets", name
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise WorkflowError(f"model.network: no network class {name!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise WorkflowError(f"model.network: {name!r} is not a torch.nn.Module class")
    return cls


def build_network(spec: ModelSpec) -> torch.nn.Module:
    """The network from its class and arguments, untrained."""
    cls = network_class(spec.network)
    try:
        return cls(**spec.args)
    except (TypeError, ValueError, AssertionError) as exc:
        raise WorkflowError(f"model.args: {spec.network} rejects them: {exc}") from None


def load_model(spec: ModelSpec, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The network with its weights, in eval mode, on ``device``."""
    path = Path(spec.weights)
    if not path.is_file():
        raise WeightsError(f"model.weights: no such file {spec.weights}")
    if spec.is_torchscript:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                model = torch.jit.load(str(path), map_location=device)
            except RuntimeError as exc:
                raise WeightsError(f"model.weights: {path} is not a loadable TorchScript archive: {exc}") from None
        return model.eval()
    state = _load_state_dict(path)
    network = build_network(spec)
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()
        raise WeightsError(
            f"model.weights: {path} does not fit {spec.network}: {detail[1].strip() if len(detail) > 1 else detail[0]}"
        ) from None
    return network.to(device).eval()


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise WeightsError(
            f"model.weights: {path} is a pickle that needs code to load; refused "
            "(save a plain state_dict or a TorchScript archive)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise WeightsError(f"model.weights: {path} is not a torch checkpoint: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning-style checkpoints
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise WeightsError(f"model.weights: {path} holds no state_dict of tensors")
    return state


def resolve_device(name: str) -> torch.device:
    """``auto``: a CUDA device when there is one (each Dask worker of a host its own), else the CPU."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", _worker_index() % torch.cuda.device_count())
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WorkflowError(f"inference.device: {name} asked for but this worker has no CUDA device")
    return device


def _worker_index() -> int:
    """The number of this Dask worker (LocalCluster names workers 0, 1, ...), else 0."""
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return 0
    return name if isinstance(name, int) else 0


def cached_model(spec: ModelSpec, device: torch.device) -> torch.nn.Module:
    """The model for ``spec`` on ``device``, loaded once per worker process."""
    global loads
    key = (spec, str(device))
    with _models_lock:
        if key in _models:
            _models.move_to_end(key)
            return _models[key]
        logger.info("loading %s from %s on %s", spec.network, spec.weights, device)
        model = _models[key] = load_model(spec, device)
        loads += 1
        while len(_models) > MODELS_PER_PROCESS:
            _models.popitem(last=False)
        return model


def set_torch_threads(threads: int) -> None:
    """Intra-op threads of this process (one worker's share of the machine's cores)."""
    torch.set_num_threads(max(1, threads))
