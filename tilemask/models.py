"""Network construction, safe weights loading and the per-worker model cache.

Weights are either a ``state_dict`` (loaded with ``torch.load(weights_only=True)``,
which refuses any pickle that would run code) or a TorchScript archive (a zip
with a ``code/`` folder, loaded with ``torch.jit.load``).  A model is built once
per worker process and device, then reused by every task: tasks carry only the
small :class:`ModelSpec`, never the network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import pickle
import pickletools
import re
import sys
import threading
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from .errors import WeightsError, WorkflowError, first_line, missing_weights
from .imports import add_to_path, holds_package, ignoring_warnings, import_module
from .settings import ENSEMBLE, ModelSpec

logger = logging.getLogger(__name__)

# model.args key (a 2D MONAI bundle's): the network takes images x first, (width, height), as MONAI reads them
X_FIRST = "_x_first"
MODELS_PER_PROCESS = 2  # least recently used models beyond this are dropped (GPU memory)
_models: OrderedDict[tuple[ModelSpec, str], torch.nn.Module] = OrderedDict()
_models_lock = threading.Lock()


def network_class(name: str) -> type[torch.nn.Module]:
    """``UNet`` (a class in ``monai.networks.nets``) or ``package.module:Class``."""
    if ":" in name:
        module_name, _, class_name = name.partition(":")
    else:
        module_name, class_name = "monai.networks.nets", name
    if not (module_name and class_name):
        raise WorkflowError(f"model.network: {name!r} is not a class name or 'package.module:Class'")
    try:
        module = import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - not installed, or the module's own code fails as it is imported
        raise WorkflowError(f"model.network: {name}: importing {module_name} raises {type(exc).__name__}: "
                            f"{first_line(exc)}") from None  # fmt: skip
    cls = getattr(module, class_name, None)
    if cls is None:
        hint = " (another package's class is written 'package.module:Class')" if ":" not in name else ""
        raise WorkflowError(f"model.network: no network class {class_name!r} in {module_name}{hint}")
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise WorkflowError(f"model.network: {name!r} is not a torch.nn.Module class")
    return cls


def build_network(spec: ModelSpec) -> torch.nn.Module:
    """The network from its class and arguments, untrained.  The arguments that ``_kw_requires_import`` names
    are dotted names of classes, imported first, as nnU-Net v2 builds the network of its plans.json
    (``arch_kwargs``: ``conv_op: torch.nn.modules.conv.Conv3d``, ...).  The folders ``_import_path`` lists (a MONAI
    bundle's, whose ``scripts`` package holds its network) are put on ``sys.path`` first, as MONAI's bundle runner
    puts the bundle's."""
    args = dict(spec.args)
    args.pop(X_FIRST, None)  # load_model's, not the network's
    args.pop(ENSEMBLE, None)
    folders = [str(f) for f in args.pop("_import_path", None) or []]
    for folder in folders:
        add_to_path(folder)
    _not_imported_elsewhere(spec.network, folders)
    cls = network_class(spec.network)
    for key in args.pop("_kw_requires_import", None) or []:
        if isinstance(args.get(key), str):
            args[key] = _dotted(args[key], f"model.args.{key}")
    try:
        return cls(**args)
    except WorkflowError:
        raise
    except (TypeError, ValueError, AssertionError) as exc:
        raise WorkflowError(f"model.args: {spec.network} rejects them: {exc}{_class_names_hint(args)}") from None
    except ImportError as exc:  # a package the network imports as it is built
        raise WorkflowError(f"model.network: {spec.network}: building it raises {type(exc).__name__}: "
                            f"{first_line(exc)}") from None  # fmt: skip


def _not_imported_elsewhere(name: str, folders: list[str]) -> None:
    """Refuse a network ``package.module:Class`` whose top package is in one of ``folders`` (a bundle's
    ``scripts``) but which this process imported from elsewhere before: a process holds one package of a name, and
    another bundle's run on this worker imported its own first (its modules were looked up there)."""
    top = name.partition(":")[0].split(".")[0] if ":" in name else ""
    ours = [Path(f).resolve() for f in folders if holds_package(f, top)]
    module = sys.modules.get(top) if top else None
    if not ours or module is None:
        return
    where = [Path(p).resolve() for p in getattr(module, "__path__", None) or [getattr(module, "__file__", None) or ""]]
    if not any(folder in place.parents for folder in ours for place in where):
        raise WorkflowError(f"model.network: {name}: this process imported {top} from {where[0]} before (another "
                            f"bundle's?), not from {ours[0]}: run each bundle whose network is in its own {top} "
                            "package on a cluster of its own")  # fmt: skip


def _class_names_hint(args: dict) -> str:
    """Why a network refused its arguments when one of them is the dotted name of a class left a string: plans.json
    lists the arguments to import in ``_kw_requires_import``, beside ``arch_kwargs``, not in them, so arguments
    copied from ``arch_kwargs`` alone reached nnU-Net's networks as strings ("'str' object is not callable")."""
    names = []
    for key, value in args.items():
        if isinstance(value, str) and re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", value):
            module_name, _, attribute = value.rpartition(".")
            if module_name.partition(".")[0] not in sys.modules:  # "weights.pt": no module "weights" imported here
                continue
            try:
                if isinstance(getattr(import_module(module_name), attribute, None), type):
                    names.append(key)
            except Exception:  # noqa: BLE001, S110 - not a module: no hint, the network's own error stands
                pass
    if not names:
        return ""
    return (f" ({', '.join(names)} {'is a class name' if len(names) == 1 else 'are class names'} left a string: "
            f"list {'it' if len(names) == 1 else 'them'} in model.args._kw_requires_import, as plans.json does beside "
            "arch_kwargs)")  # fmt: skip


def _dotted(name: str, where: str) -> Any:
    module_name, _, attribute = name.rpartition(".")
    try:
        return getattr(import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError):
        raise WorkflowError(f"{where}: cannot import {name!r}") from None


class SliceWise(torch.nn.Module):
    """A 2D network over windows of a volume one voxel across slices, as MONAI's ``SliceInferer`` wraps it: that
    axis squeezed out of the input, and put back in each output."""

    def __init__(self, network: torch.nn.Module, axis: int):
        super().__init__()
        self.network = network
        self.dim = axis + 2  # after the batch and channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.unsqueeze(self.network(torch.squeeze(x, dim=self.dim)), dim=self.dim)


class XFirst(torch.nn.Module):
    """A 2D network that takes images x first, (width, height), as MONAI's readers give them (a MONAI bundle's):
    tilemask's windows, rows first, transposed on the way in and its output on the way out."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x.transpose(-1, -2)).transpose(-1, -2)


class Ensemble(torch.nn.Module):
    """Networks whose outputs are added up and divided by their number, as ``nnUNetPredictor`` averages its folds'
    logits.  Its windows and their gaussian weights are the same for every member, and the sliding window, the
    mirroring and the average are linear in the logits: the mean of each window's logits is nnU-Net's mean of the
    whole case's."""

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.members[0](x)
        for member in self.members[1:]:
            total = total + member(x)
        return total / len(self.members)


def load_model(spec: ModelSpec, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The network with its weights, in eval mode, on ``device``; of each of an ensemble's checkpoints
    (``args._ensemble``, nnU-Net's folds) in :class:`Ensemble`; a 2D one run over a volume's slices
    (``spec.slice_axis``) wrapped in :class:`SliceWise`, one whose args set ``_x_first`` (a 2D MONAI bundle's) in
    :class:`XFirst`."""
    model = _loaded(spec, device)
    if spec.args.get(ENSEMBLE):
        others = [_loaded(dataclasses.replace(spec, weights=path), device) for path in spec.args[ENSEMBLE]]
        model = Ensemble([model, *others]).eval()
    if spec.args.get(X_FIRST) and spec.slice_axis is None:  # a volume's slices are in MONAI's order already
        wrapped = XFirst(model).eval()
        model = torch.jit.script(wrapped) if isinstance(model, torch.jit.ScriptModule) else wrapped
    if spec.slice_axis is None:
        return model
    wrapped = SliceWise(model, spec.slice_axis).eval()  # a TorchScript archive's stays TorchScript (torch-mkldnn)
    return torch.jit.script(wrapped) if isinstance(model, torch.jit.ScriptModule) else wrapped


def _loaded(spec: ModelSpec, device: torch.device | str) -> torch.nn.Module:
    path = Path(spec.weights)
    if not path.is_file():
        raise missing_weights(spec.weights)
    _refuse_damaged_archive(path)
    kind = spec.archive
    if kind == "torchscript":
        with ignoring_warnings(DeprecationWarning):
            try:
                model = torch.jit.load(str(path), map_location=device)
            except RuntimeError as exc:
                raise WeightsError(f"model.weights: {path} is not a loadable TorchScript archive: "
                                   f"{first_line(exc)}") from None  # fmt: skip
        return _refuse_nan(path, model).eval()
    if kind == "exported":
        return _refuse_nan(path, _load_exported(path, device))
    if not spec.network:
        raise WorkflowError(f"model.network: needed for {path}, a checkpoint of weights (only TorchScript "
                            "and torch.export archives carry their network)")  # fmt: skip
    state = _load_state_dict(path, spec.network)
    network = build_network(spec)
    state = _strip_prefix(state, network.state_dict().keys())
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        detail = _misfit(network.state_dict(), state) or first_line(exc)
        raise WeightsError(f"model.weights: {path} does not fit {spec.network}: {detail}") from None
    return _refuse_nan(path, network).to(device).eval()


def _refuse_nan(path: Path, model: torch.nn.Module) -> torch.nn.Module:
    """``model``, unless a parameter or buffer holds NaN (training that diverged): one NaN weight made every
    output NaN, which the argmax took as class 0, a whole scene of background from a run that exited 0."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    nan = [name for name, tensor in tensors if tensor.is_floating_point() and bool(tensor.isnan().any())]
    if nan:
        raise WeightsError(f"model.weights: {path} holds NaN in {_listed(nan)}: the network would answer NaN")
    return model


def _misfit(expected: dict[str, torch.Tensor], state: dict) -> str:
    """How ``state`` differs from a network's own state_dict, in one short line: how many keys are missing,
    unexpected or of another shape, and the first few of each. torch lists every key (1.1 kB for weights of
    another MONAI UNet, a first-contact review)."""
    shape = {key: tuple(getattr(value, "shape", ())) for key, value in state.items()}
    kinds = (
        ("missing", [key for key in expected if key not in state]),
        ("unexpected", [key for key in state if key not in expected]),
        ("of another shape", [f"{key} {list(shape[key])} for {list(value.shape)}" for key, value in expected.items()
                              if key in state and shape[key] != tuple(value.shape)]),  # fmt: skip
    )
    return "; ".join(f"{len(keys)} key(s) {what}: {_listed(keys)}" for what, keys in kinds if keys)


def _listed(keys: list[str]) -> str:
    """The first two of ``keys`` and how many more."""
    return f"{', '.join(keys[:2])}{f' and {len(keys) - 2} more' if len(keys) > 2 else ''}"


def _load_state_dict(path: Path, network: str | None = None) -> dict[str, torch.Tensor]:
    try:
        with ignoring_warnings(UserWarning):  # torch warns about pickle protocols before refusing
            with torch.serialization.safe_globals(_numpy_values()):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's weights-only unpickler refused it: find out why
        raise _refusal(path, str(exc), network) from None
    except Exception as exc:  # noqa: BLE001 - the legacy reader raises what the bytes set off: KeyError 101 for "hello"
        if _looks_like_json(path):
            raise WeightsError(
                f"model.weights: {path} is a JSON file, not weights (a MONAI bundle's weights are models/model.pt)"
            ) from None
        raise WeightsError(f"model.weights: {path} {NOT_A_CHECKPOINT}: {_unreadable(path, exc)}") from None
    if isinstance(state, dict) and not _all_tensors(state):
        # training checkpoints: Lightning and MONAI's CheckpointSaver ("state_dict" / "model" / "network"), nnU-Net
        state = next((state[k] for k in CHECKPOINT_KEYS if isinstance(state.get(k), dict) and _all_tensors(state[k])), state)
    if not (isinstance(state, dict) and _all_tensors(state)):
        found = max(_tensor_dicts(state), key=lambda item: len(item[1]), default=None)  # the weights, not a buffer's
        if found:
            raise WeightsError(f"model.weights: {path} has its tensors under {' > '.join(found[0])} "
                               f"({len(found[1])} of them), where tilemask does not look (the file itself, or "
                               f"{', '.join(CHECKPOINT_KEYS)}): save that dict on its own")  # fmt: skip
        raise WeightsError(f"model.weights: {path} holds no state_dict of tensors")
    return state


def _tensor_dicts(value, keys: tuple[str, ...] = (), depth: int = 3):
    """``(keys, dict)`` for each dict of tensors nested in ``value`` (dicts and lists) up to ``depth`` levels down."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else ()
    for key, item in items:
        if isinstance(item, dict) and _all_tensors(item):
            yield (*keys, repr(key)), item
        elif depth > 1:
            yield from _tensor_dicts(item, (*keys, repr(key)), depth - 1)


def _numpy_values() -> list:
    """numpy's scalars, dtypes and arrays: data that training checkpoints hold beside the weights (nnU-Net v2's
    EMA Dice and logged losses are numpy floats), rebuilt from their bytes without running code (what torch's
    documentation allows for numpy in ``weights_only`` loads)."""
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    kinds = [np.bool_, np.float16, np.float32, np.float64, np.complex64, np.complex128,
             np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]  # fmt: skip
    return [multiarray.multiarray.scalar, multiarray.multiarray._reconstruct, np.ndarray, np.dtype,
            *{type(np.dtype(kind)) for kind in kinds}]  # fmt: skip


CHECKPOINT_KEYS = ("state_dict", "model", "network", "model_state_dict", "network_weights", "net")
# what training wrappers put before the network's keys: Lightning attributes, DataParallel, torch.compile
PREFIXES = ("model.", "net.", "network.", "module.", "_orig_mod.")


def _all_tensors(state: dict) -> bool:
    return bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def _strip_prefix(state: dict[str, torch.Tensor], expected) -> dict[str, torch.Tensor]:
    """``state`` with the prefix a training wrapper added (``model.`` of a LightningModule attribute, ``module.``
    of DataParallel, ``_orig_mod.`` of a ``torch.compile``'d network) taken off, when every key has it and taking
    it off gives exactly the network's keys."""
    expected = set(expected)
    if set(state) == expected:
        return state
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in state):  # MONAI's UNet keys start with "model." themselves
            stripped = {k[len(prefix) :]: v for k, v in state.items()}
            if set(stripped) == expected:
                return stripped
    return state


class _FixedBatch(torch.nn.Module):
    """An exported program whose batch size is static, fed any batch: split into its size, the last padded."""

    def __init__(self, program: torch.nn.Module, batch: int):
        super().__init__()
        self.program, self.batch = program, batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for start in range(0, x.shape[0], self.batch):
            part = x[start : start + self.batch]
            n = part.shape[0]
            if n < self.batch:
                part = torch.cat([part, part.new_zeros((self.batch - n, *part.shape[1:]))])
            out = self.program(part)
            if not isinstance(out, torch.Tensor):  # deep supervision and the like: a tuple of outputs
                raise WeightsError("model.weights: the exported program returns several outputs; export one tensor")
            outputs.append(out[:n])
        return torch.cat(outputs)


def _load_exported(path: Path, device) -> torch.nn.Module:
    """A ``torch.export`` archive (``.pt2``) as a callable module on ``device``.

    torch.export.load falls back to a full unpickling for some members; every
    pickle in the archive is first loaded with ``weights_only=True``, so an
    archive that would run code is refused, as a checkpoint would be.
    """
    _refuse_pickles_with_code(path)
    logged = _Records()  # torch logs why it could not read the archive, then raises "check the warnings above"
    export_log = logging.getLogger("torch.export")
    export_log.addHandler(logged)
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged archive
        why = next((r.exc_info[1] for r in logged.records if r.exc_info and r.exc_info[1]), exc)
        raise WeightsError(f"model.weights: {path} is not a loadable torch.export archive: {first_line(why)}") from None
    finally:
        export_log.removeHandler(logged)
    inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    shape = inputs[0].meta["val"].shape if inputs and "val" in inputs[0].meta else ()
    if torch.device(device).type != "cpu":  # constants baked into the graph move too, not only the parameters
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, torch.device(device))
    module = program.module()
    if shape and isinstance(shape[0], int):  # exported without a dynamic batch dimension
        return _FixedBatch(module, int(shape[0]))
    return module


class _Records(logging.Handler):
    """The log records a logger emits while this handler is attached."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _refuse_pickles_with_code(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        pickled = _pickled_payloads(path, archive)
        for name in archive.namelist():
            if not (name.endswith((".pt", ".pkl", "data.pkl")) or name in pickled):
                continue
            data = archive.read(name)
            try:
                with ignoring_warnings():
                    if name.endswith("data.pkl"):  # a bare pickle: its opcodes tell what it would import
                        imports = _pickle_imports(data) or []
                        if any(not i.startswith(("torch.", "collections.", "_codecs.", "builtins.")) for i in imports):
                            raise pickle.UnpicklingError(f"imports {imports}")
                    else:
                        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                raise WeightsError(
                    f"model.weights: {path} holds a pickle that needs code to load ({name}); refused"
                ) from exc
            except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged member
                raise WeightsError(f"model.weights: {path} is not a loadable torch.export archive: its {name} is "
                                   f"damaged ({type(exc).__name__}: {first_line(exc)})") from None  # fmt: skip


PAYLOAD_CONFIG = re.compile(r"(?:^|/)data/(?:weights|constants)/[^/]+_(?:weights|constants)_config\.json$")
OBJECT_PAYLOADS = ("custom_obj_", "opaque_obj_")  # torch.export's prefixes of a constant that is an object


def _pickled_payloads(path: Path, archive: zipfile.ZipFile) -> set[str]:
    """The members of a ``.pt2`` archive that ``torch.export.load`` unpickles with ``weights_only=False``: the
    weights and constants its payload configs mark ``use_pickle``, whatever their names (``weight_0``). A constant
    that is an object (a torchbind or opaque object, unpickled as such: ``pickle.loads``) is refused at once: a
    network's weights need none."""
    pickled = set()
    for config_name in filter(PAYLOAD_CONFIG.search, archive.namelist()):
        folder = config_name.rsplit("/", 1)[0]
        try:
            payloads = json.loads(archive.read(config_name))["config"]
            marked = {meta["path_name"]: bool(meta.get("use_pickle")) for meta in payloads.values()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise WeightsError(f"model.weights: {path} is not a loadable torch.export archive: its {config_name} "
                               f"is damaged ({type(exc).__name__}: {first_line(exc)})") from None  # fmt: skip
        for name, use_pickle in marked.items():
            if str(name).startswith(OBJECT_PAYLOADS):
                raise WeightsError(f"model.weights: {path} holds an object that needs code to load ({folder}/"
                                   f"{name}); refused")  # fmt: skip
            if use_pickle:
                pickled.add(f"{folder}/{name}")
    return pickled


NOT_A_CHECKPOINT = "is not a torch checkpoint (neither a state_dict archive nor TorchScript)"
MAX_INFLATION = 4  # a torch archive stores its tensors uncompressed: it unpacks to about its own size
INFLATION_SLACK = 16 << 20  # bytes: TorchScript deflates its code/ folder
PICKLE_SCAN_BYTES = 16 << 20  # how much of a pickle is read to name what it would import


def _refuse_damaged_archive(path: Path) -> None:
    """Refuse a zip (state_dict, TorchScript or torch.export archive) that unpacks to far more than its size on
    disk, or whose members do not match their CRC-32.

    torch.save and torch.jit.save store tensors uncompressed, but torch reads
    deflated members too: a 2 MB archive can declare gigabytes, which torch
    allocates and inflates.  The sizes come from the central directory, the same
    sizes torch allocates for, so nothing is inflated to check them.  torch does
    not check the CRC-32 each member carries: bytes changed in a tensor's record
    loaded as other weights, in all three formats; :func:`_damaged_member` checks them.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
            size = path.stat().st_size
            damaged = _damaged_member(archive) if unpacked <= MAX_INFLATION * size + INFLATION_SLACK else None
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip: torch's legacy format or a plain pickle, refused or read by torch.load
    if unpacked > MAX_INFLATION * size + INFLATION_SLACK:
        raise WeightsError(
            f"model.weights: {path} would unpack to {unpacked / 2**20:,.0f} MiB from {size / 2**20:,.1f} MiB "
            "on disk; refused (torch checkpoints store their tensors uncompressed)"
        )
    if damaged is not None:
        raise WeightsError(f"model.weights: {path} is damaged: its member {damaged} does not read back as saved "
                           "(its CRC-32 or its compression is wrong: the file changed after it was saved)")  # fmt: skip


def _damaged_member(archive: zipfile.ZipFile) -> str | None:
    """The first member that does not match its CRC-32 or does not inflate (zipfile checks both as it reads),
    as :meth:`zipfile.ZipFile.testzip`, which lets a deflated member's ``zlib.error`` through."""
    for info in archive.infolist():
        try:
            with archive.open(info) as member:
                while member.read(1 << 20):
                    pass
        except (zipfile.BadZipFile, zlib.error, EOFError):
            return info.filename
    return None


def _unreadable(path: Path, exc: BaseException) -> str:
    """What ``path`` is, that ``torch.load`` could not read: torch's own message suggests ``weights_only=False``,
    which would run the file's code, and names a cut-short archive ``[Errno 22] Invalid argument``."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as error:
        return f"cannot read it: {error.strerror}"
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return f"a zip archive cut short or damaged ({size} bytes)"
    if head == b"PK\x03\x04" and not _pickle_bytes(path):
        return "a zip archive that torch did not write (it has no data.pkl)"
    text = (str(exc).strip().splitlines() or [""])[0]
    if not text or "weights_only" in text or not isinstance(exc, RuntimeError | OSError | EOFError | ValueError):
        return f"{size} bytes in no format torch reads"
    return text


def _looks_like_json(path: Path) -> bool:
    import json

    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
        if not head.lstrip().startswith((b"{", b"[")):
            return False
        json.loads(path.read_bytes())
        return True
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def _refusal(path: Path, torch_message: str, network: str | None) -> WeightsError:
    """Why torch's weights-only unpickler refused ``path``, read from the pickle's opcodes (never run)."""
    if _looks_like_json(path):
        return WeightsError(
            f"model.weights: {path} is a JSON file, not weights (a MONAI bundle's weights are models/model.pt)"
        )
    imports = _pickle_imports(_pickle_bytes(path))
    if imports is None:
        return WeightsError(f"model.weights: {path} {NOT_A_CHECKPOINT}")
    network_name = _qualified_name(network)
    if any(name.startswith("torch.nn.modules.") or name == network_name for name in imports):
        return WeightsError(
            f"model.weights: {path} is a whole pickled model (torch.save(model)), which needs code to load; "
            "refused: save model.state_dict() or a TorchScript archive (torch.jit.script(model).save(path))"
        )
    if not imports:
        return WeightsError(f"model.weights: {path} is a pickle but {NOT_A_CHECKPOINT}")
    named = re.search(r"GLOBAL ([\w.]+)", torch_message)
    culprit = named.group(1) if named else next(
        (name for name in imports if not name.startswith(("torch.", "collections.", "_codecs."))), imports[0]
    )
    return WeightsError(
        f"model.weights: {path} is a pickle that needs code to load (it imports {culprit}); refused "
        "(save a plain state_dict or a TorchScript archive)"
    )


def _pickle_bytes(path: Path) -> bytes:
    """The pickle of a checkpoint: ``data.pkl`` of a torch archive, else the start of the file."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = sorted((n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"), key=len)
            if not names:
                return b""
            with archive.open(names[0]) as member:
                return member.read(PICKLE_SCAN_BYTES)
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError):
        pass
    with open(path, "rb") as f:
        return f.read(PICKLE_SCAN_BYTES)


def _pickle_imports(data: bytes) -> list[str] | None:
    """The ``module.name`` of every class or function the pickle(s) in ``data`` would import.

    Scanned with :func:`pickletools.genops`, which decodes opcodes and runs
    nothing.  torch's legacy format is several pickles in a row; they are all
    read.  None when ``data`` does not start with a whole pickle (random bytes).
    """
    stream = io.BytesIO(data)
    imports: list[str] = []
    pickles = 0
    while stream.tell() < len(data) and pickles < 8:
        pushed: list[Any] = []  # what each opcode pushed: strings, or None for anything else
        memo: dict[Any, Any] = {}
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                name = opcode.name
                if name in ("GLOBAL", "INST"):
                    imports.append(str(arg).replace(" ", "."))
                elif name == "STACK_GLOBAL":
                    module, attr = pushed[-2:] if len(pushed) >= 2 else (None, None)
                    imports.append(f"{module}.{attr}" if isinstance(module, str) and isinstance(attr, str) else "?")
                elif name.startswith("EXT"):
                    imports.append(f"copyreg extension {arg}")
                if name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = pushed[-1] if pushed else None
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(arg))
                elif opcode.stack_after:
                    pushed.append(arg if isinstance(arg, str) and name not in ("GLOBAL", "INST") else None)
        except Exception:  # noqa: BLE001 - pickletools raises ValueError, UnicodeDecodeError, ... on non-pickles
            if pickles == 0:
                return None
            break  # the tensor data after the pickles of torch's legacy format
        pickles += 1
    return imports if pickles else None


def _qualified_name(network: str | None) -> str | None:
    """``module.Class`` of the workflow's network, as a pickle of it would name it."""
    if not network:
        return None
    try:
        cls = network_class(network)
    except WorkflowError:
        return None
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_device(name: str) -> torch.device:
    """``auto``: a CUDA device when there is one, else the CPU.  ``auto`` and ``cuda`` are this worker's GPU:
    on tilemask's embedded cluster (one worker per GPU) worker ``i`` takes GPU ``i`` modulo their number;
    elsewhere the current device, GPU 0, which dask-cuda's workers each see as their own (it rotates their
    ``CUDA_VISIBLE_DEVICES``).  ``cuda:N`` is GPU ``N``, one this worker has.  A CUDA device always has its
    index, so that one GPU has one name."""
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda" if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WorkflowError(f"inference.device: {name} asked for but this worker has no CUDA device")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", _embedded_worker_number() % torch.cuda.device_count())
    if device.type == "cuda" and device.index >= (count := torch.cuda.device_count()):
        seen = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise WorkflowError(f"inference.device: {name} asked for but this worker has {count} CUDA device"
                            f"{'s' if count > 1 else ''} ({seen}; CUDA_VISIBLE_DEVICES numbers them from 0): "
                            "use cuda, or one of those")  # fmt: skip
    return device


def _embedded_worker_number() -> int:
    """The number of this embedded Dask worker (LocalCluster names workers 0, 1, ...), else 0."""
    try:
        from distributed import get_worker

        from .cluster import GPU_PER_WORKER

        if not os.environ.get(GPU_PER_WORKER):
            return 0
        name = get_worker().name
    except (ImportError, ValueError):
        return 0
    return name if isinstance(name, int) else 0


def cached_model(spec: ModelSpec, device: torch.device) -> torch.nn.Module:
    """The model for ``spec`` on ``device``, loaded once per worker process."""
    key = (spec, str(device))
    with _models_lock:
        if key in _models:
            _models.move_to_end(key)
            return _models[key]
        logger.info("loading %s from %s on %s", spec.network, ", ".join(spec.weight_files), device)
        model = _models[key] = load_model(spec, device)
        while len(_models) > MODELS_PER_PROCESS:
            _models.popitem(last=False)
        return model


def set_torch_threads(threads: int) -> None:
    """Intra-op threads of this process (one worker's share of the machine's cores)."""
    torch.set_num_threads(max(1, threads))


@contextlib.contextmanager
def torch_threads(threads: int):
    """This thread's torch intra-op threads (its OpenMP team) set to ``threads`` inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
