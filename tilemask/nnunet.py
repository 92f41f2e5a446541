"""nnU-Net v2 results folders as workflow defaults: ``model: {nnunet: FOLDER, fold: 0}``.

``FOLDER`` is what nnU-Net's training writes, ``Dataset123_X/nnUNetTrainer__nnUNetPlans__3d_fullres``: its
``plans.json``, ``dataset.json`` and ``fold_N/checkpoint_final.pth``.  :func:`nnunet_defaults` turns them into
workflow keys, as nnU-Net's ``nnUNetPredictor`` reads them: the network from the configuration's ``architecture``
(built as ``get_network_from_plans`` builds it, :class:`NnUNetNetwork`), the roi from its ``patch_size``, the
spacing, the normalization of each channel (``CTNormalization``: clipped to the foreground's 0.5 and 99.5
percentiles, then ``(x - mean) / std``; ``ZScoreNormalization``: the case's own mean and standard deviation per
channel; ``NoNormalization``), the class names from ``dataset.json``'s ``labels``, the number of input channels
from its ``channel_names``, the weights, nnU-Net's crop of each case to the box of its nonzero voxels
(``preprocess.crop: nonzero``), and nnU-Net's sliding window (its window starts half a patch apart, its gaussian
and its mirroring of each window, from the checkpoint).
Several folds (``fold: [0, 1, 2, 3, 4]``, or left out where the folder has several numbered ones, as
``nnUNetPredictor`` finds them) are nnU-Net's ensemble: each window's logits averaged over the folds
(:class:`tilemask.models.Ensemble`), which is nnU-Net's average of the folds' whole logits.
The workflow's own keys override these.

nnU-Net works on the arrays SimpleITK reads, whose axes are the NIfTI's (i, j, k) reversed, then transposed by
the plans' ``transpose_forward``; tilemask's are (i, j, k).  The roi and the spacing are given in tilemask's
order, and the network permutes its input's axes to nnU-Net's (and its output's back), so its kernels see the
axes they were trained on.  A 2D configuration (``2d``) runs as nnU-Net predicts it, slice by slice across its
first axis (``inference.slice_axis``), the scan's spacing kept along that axis.

What nnU-Net does that tilemask cannot reproduce chunk by chunk is refused by name before any work (exit 2):
cascades (the previous stage's segmentation is an input), region-based training (overlapping sigmoid outputs),
other normalization schemes, channels with different schemes, CT ranges or (z-scored) ``use_mask_for_norm``, and image readers that reorient (``plans.json``'s
``image_reader_writer``, which the predictor reads, or ``dataset.json``'s ``overwrite_image_reader_writer``).
``use_mask_for_norm`` (a z-score within the nonzero region) is ``normalize: {nonzero: any}``: each channel's
z-score over the voxels nonzero in some channel, nnU-Net's mask but for its holes, which nnU-Net fills (README).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import pickletools
import zipfile
from pathlib import Path
from typing import Any

from .errors import WorkflowError, first_line

KEY = "model.nnunet"
READERS = {"SimpleITKIO", "NibabelIO"}  # read the voxels as stored, axes reversed: what tilemask reproduces
OVERLAP = 0.5  # nnUNetPredictor's tile_step_size 0.5: windows half a patch apart
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth")


def nnunet_defaults(folder: Path, fold: int | str | list | None, checkpoint: str | None,
                    weights: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Workflow keys (a raw workflow dict) from the nnU-Net v2 results folder ``folder``; the mirroring axes from
    ``weights`` where the workflow gives its own checkpoint (a local file), else from the fold's.  Several folds
    (``fold`` a list, or left out where the folder has several numbered ones) are nnU-Net's ensemble: the first
    fold's checkpoint is ``model.weights``, the others ``model.args._ensemble`` (:class:`tilemask.models.Ensemble`
    averages their logits)."""
    plans, dataset = _json(folder / "plans.json"), _json(folder / "dataset.json")
    name = _configuration_name(folder, plans)
    config = _configuration(plans, name)
    patch = _numbers(config.get("patch_size"), f"configuration {name}'s patch_size", int)
    if len(patch) not in (2, 3):
        raise WorkflowError(f"{KEY}: plans.json: configuration {name} has patch_size {patch}, not 2 or 3 values")
    if config.get("previous_stage") or "cascade" in name:
        raise WorkflowError(f"{KEY}: {name} is a cascade stage (it takes the previous stage's segmentation as input "
                            "channels); tilemask runs one stage: give 2d, 3d_fullres or 3d_lowres")  # fmt: skip
    transpose = _numbers(plans.get("transpose_forward", [0, 1, 2]), "transpose_forward", int)
    if sorted(transpose) != [0, 1, 2]:
        raise WorkflowError(f"{KEY}: plans.json: transpose_forward {transpose} is not a permutation of 0, 1, 2")
    axes = [2 - t for t in transpose]  # network axis n holds tilemask's axis axes[n]
    classes, channels = _labels(dataset), _channels(dataset)
    # nnUNetPredictor reads each case with the plans' image_reader_writer (PlansManager.image_reader_writer_class);
    # dataset.json's overwrite_image_reader_writer is what the planner wrote there, unless the two files differ
    for file, reader in (("dataset.json", dataset.get("overwrite_image_reader_writer")),
                         ("plans.json", plans.get("image_reader_writer"))):  # fmt: skip
        if reader is not None and reader not in READERS:
            raise WorkflowError(f"{KEY}: {file} reads images with {reader}, which tilemask does not reproduce "
                                f"(it reads voxels as {' and '.join(sorted(READERS))} do)")  # fmt: skip
    architecture = config.get("architecture")
    if not isinstance(architecture, dict) or "network_class_name" not in architecture:
        raise WorkflowError(f"{KEY}: plans.json: configuration {name} has no architecture (plans of nnU-Net "
                            "before 2.4 name their network otherwise: plan again with 2.4 or later)")  # fmt: skip
    if not isinstance(architecture.get("arch_kwargs") or {}, dict):
        raise WorkflowError(f"{KEY}: plans.json: configuration {name}'s arch_kwargs is not a mapping "
                            f"(got {architecture['arch_kwargs']!r})")  # fmt: skip
    args = {"network_class_name": str(architecture["network_class_name"]), "axes": axes,
            "input_channels": channels, "num_classes": len(classes), **dict(architecture.get("arch_kwargs") or {}),
            "_kw_requires_import": list(architecture.get("_kw_requires_import") or [])}  # fmt: skip
    spacing = _numbers(config.get("spacing"), f"configuration {name}'s spacing", float)
    if len(spacing) != len(patch):
        raise WorkflowError(f"{KEY}: plans.json: configuration {name} has spacing {spacing}, not {len(patch)} values")
    checkpoints = [weights] if weights else fold_checkpoints(folder, fold, checkpoint)
    weights = checkpoints[0]
    if len(checkpoints) > 1:
        args["_ensemble"] = [str(path) for path in checkpoints[1:]]
        _same_mirroring(checkpoints, len(patch))
    inference = {"overlap": OVERLAP, "steps": "nnunet", "mode": "nnunet", "sigma_scale": 0.125, "activation": "softmax"}
    if len(patch) == 2:  # nnU-Net predicts a 2D configuration slice by slice across its first axis, its spacing
        # kept there (DefaultPreprocessor: [original_spacing[0]] + the configuration's)
        in_slice = sorted(axes[1:])  # tilemask's axes of a slice, in order: the network's axes n are axes[n + 1]
        args["axes"] = [in_slice.index(axis) for axis in axes[1:]]
        spacing, roi = [0.0, *spacing], [patch[args["axes"].index(n)] for n in range(2)]
        inference |= {"slice_axis": axes[0], "roi_size": roi, **_mirroring(weights, args["axes"])}
    else:
        inference |= {"roi_size": _tilemask_order(patch, axes), **_mirroring(weights, axes)}
    return {
        "classes": classes,
        "model": {"network": f"{__name__}:NnUNetNetwork", "args": args, "weights": str(weights)},
        "preprocess": {"spacing": _tilemask_order(spacing, axes), "crop": "nonzero",
                       **_normalization(plans, config, name, channels)},  # fmt: skip
        "inference": inference,
    }


def _same_mirroring(checkpoints: list[Path], ndim: int) -> None:
    """Refuse an ensemble whose checkpoints mirror along different axes (nnUNetPredictor mirrors every fold as
    the first says; tilemask mirrors the ensemble's windows once, for all of them)."""
    axes = [_allowed_mirroring_axes(path, ndim) for path in checkpoints]
    for path, other in zip(checkpoints[1:], axes[1:]):
        if other != axes[0]:
            raise WorkflowError(f"{KEY}: {path.parent.name} mirrors along the axes {list(other or [])} and "
                                f"{checkpoints[0].parent.name} along {list(axes[0] or [])}: give model.fold one "
                                "fold, or folds that agree")  # fmt: skip


def _mirroring(weights: Path, axes: list[int]) -> dict[str, Any]:
    """``inference.tta`` and ``tta_mode`` as ``nnUNetPredictor`` mirrors: each window flipped along every
    combination of the checkpoint's ``inference_allowed_mirroring_axes`` (network axis ``n`` is ``axes[n]``:
    tilemask's axis, or for a 2D configuration the axis of a slice, as ``inference.tta`` names it), its logits
    averaged (``tta_mode: patch``); none where the checkpoint has no such key or says None."""
    mirror = _allowed_mirroring_axes(weights, len(axes))
    flips = [sorted(axes[n] for n in combination) for k in range(1, len(mirror or ()) + 1)
             for combination in itertools.combinations(mirror, k)]  # fmt: skip
    return {"tta": flips, "tta_mode": "patch"} if flips else {"tta": "none"}


MIRRORING_KEY = "inference_allowed_mirroring_axes"
PICKLE_BYTES = 4 << 20  # the most of a checkpoint's pickle read for it (nnU-Net's: well under 1 MB, tensors apart)
LEGACY_OBJECT = 3  # torch's legacy format pickles a magic number, a protocol, system information, then the object


def _allowed_mirroring_axes(weights: Path, ndim: int) -> tuple[int, ...] | None:
    """The checkpoint's ``inference_allowed_mirroring_axes``: None (no mirroring) where it says None or has no such
    key, as ``nnUNetPredictor`` reads it.  Read by :class:`_PlainValues` (no code of the file's runs, in time and
    memory linear in at most :data:`PICKLE_BYTES`); a value that is not a tuple (or list) of axes of an ``ndim``-D
    network (0, 1 and 2; a 2D configuration's 0 and 1) is refused with a warning, and nothing is mirrored."""
    try:
        if _damaged_zip(weights):  # loading it names what it is ("a zip archive cut short"): no word of this here
            return None
        value = _PlainValues.top_level(_checkpoint_pickle(weights)).get(MIRRORING_KEY)
        if value is None:
            return None
        if not (isinstance(value, tuple | list) and all(type(a) is int and 0 <= a < ndim for a in value)):
            raise ValueError(f"it holds {value!r}, not a tuple of the axes {', '.join(map(str, range(ndim)))} of a "
                             f"{ndim}D network")  # fmt: skip
        return tuple(sorted(set(value)))
    except Exception as exc:  # noqa: BLE001 - torch may still read the file: tilemask only cannot mirror as it says
        logging.getLogger(__name__).warning(
            "%s: cannot read its %s (%s): no mirroring; set inference.tta to mirror (e.g. flips, with tta_mode: "
            "patch)", weights, MIRRORING_KEY, first_line(exc) or type(exc).__name__)  # fmt: skip
        return None


def _damaged_zip(weights: Path) -> bool:
    """Whether ``weights`` begins as a zip (torch's format) that :mod:`zipfile` cannot open: cut short, read as a
    legacy pickle it gave "'ascii' codec can't decode byte 0x80", a warning before the load's own error."""
    with open(weights, "rb") as f:
        return f.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(weights)


def _checkpoint_pickle(weights: Path) -> bytes:
    """The pickle of a torch checkpoint's object: the zip's ``<name>/data.pkl``, or a legacy file's fourth pickle
    (:data:`LEGACY_OBJECT`), at most :data:`PICKLE_BYTES` read."""
    if not zipfile.is_zipfile(weights):
        with open(weights, "rb") as f:
            stream = io.BytesIO(f.read(PICKLE_BYTES))
        for _ in range(LEGACY_OBJECT):
            for _ in pickletools.genops(stream):
                pass
        return stream.read()
    with zipfile.ZipFile(weights) as archive:
        (member,) = [i for i in archive.infolist() if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
        if member.file_size > PICKLE_BYTES:
            raise ValueError(f"its pickle is {member.file_size:,} bytes, over {PICKLE_BYTES:,}")
        with archive.open(member) as f:
            return f.read(PICKLE_BYTES)


_LITERALS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
             "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT"}  # fmt: skip


class _Opaque:
    """Whatever a pickle builds from a class, a function or bytes: never built here."""

    def __repr__(self) -> str:
        return "an object"


class _PlainValues(dict):
    """A dict of the pickle, as :meth:`top_level` reads it: only :data:`MIRRORING_KEY`'s value is kept (keys the
    file chooses are never hashed together: a dict of colliding keys took minutes to build)."""

    def set(self, key, value) -> None:
        if key == MIRRORING_KEY:
            self[key] = value

    @classmethod
    def top_level(cls, data: bytes) -> _PlainValues:
        """The top-level dict of the pickle ``data``, its values built only where plain (None, numbers, strings,
        tuples, lists, dicts); its opcodes decoded by :func:`pickletools.genops`, their effect on pickle's stack and
        memo repeated here, nothing imported or called: a class, a function or a tensor is an :class:`_Opaque`."""
        stack, marks, memo = [], [], {}

        def since_mark() -> list:
            start = marks.pop()
            items = stack[start:]
            del stack[start:]
            return items

        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name == "STOP":
                top = stack.pop()
                if not isinstance(top, _PlainValues):
                    raise ValueError("its pickle holds no dict")
                return top
            if name in ("PROTO", "FRAME"):
                continue
            if name == "MARK":
                marks.append(len(stack))
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
                stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
            elif name in ("EMPTY_DICT", "DICT"):
                plain = cls()
                items = since_mark() if name == "DICT" else []
                for key, value in zip(items[::2], items[1::2]):
                    plain.set(key, value)
                stack.append(plain)
            elif name in ("SETITEM", "SETITEMS"):
                items = since_mark() if name == "SETITEMS" else [stack.pop(-2), stack.pop()]
                if isinstance(stack[-1], _PlainValues):
                    for key, value in zip(items[::2], items[1::2]):
                        stack[-1].set(key, value)
            elif name in ("EMPTY_LIST", "LIST"):
                stack.append(since_mark() if name == "LIST" else [])
            elif name in ("APPEND", "APPENDS"):
                items = since_mark() if name == "APPENDS" else [stack.pop()]
                if isinstance(stack[-1], list):
                    stack[-1].extend(items)
            elif name in ("EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"):
                n = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}.get(name)
                items = since_mark() if n is None else [stack.pop() for _ in range(n)][::-1]
                stack.append(tuple(items))
            elif name == "POP":
                stack.pop()
            elif name == "POP_MARK":
                since_mark()
            elif name == "DUP":
                stack.append(stack[-1])
            elif name in _LITERALS:
                stack.append(arg)
            else:  # what builds an object (GLOBAL, REDUCE, NEWOBJ, BUILD, BINPERSID, bytes, sets, ...): opaque
                if pickletools.markobject in op.stack_before:
                    since_mark()
                    below = op.stack_before.index(pickletools.markobject)  # ADDITEMS: the set under the mark
                    del stack[len(stack) - below :]
                elif op.stack_before:
                    del stack[-len(op.stack_before) :]
                stack.extend(_Opaque() for _ in op.stack_after)
        raise ValueError("its pickle has no end")


def _tilemask_order(values: list, axes: list[int]) -> list:
    """Per-axis values in nnU-Net's (network) order -> tilemask's (i, j, k)."""
    out = [None] * 3
    for n, axis in enumerate(axes):
        out[axis] = values[n]
    return out


def _json(path: Path) -> dict:
    if not path.is_file():
        raise WorkflowError(f"{KEY}: {path.parent} has no {path.name} (give the folder nnU-Net trained into, "
                            "Dataset123_X/nnUNetTrainer__nnUNetPlans__3d_fullres)")  # fmt: skip
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WorkflowError(f"{KEY}: cannot read {path}: {first_line(exc)}") from None
    if not isinstance(value, dict):
        raise WorkflowError(f"{KEY}: {path} holds a {type(value).__name__}, not a mapping")
    return value


def _numbers(value: Any, what: str, kind: type) -> list:
    """plans.json's list of numbers ``what``, refused naming it when it holds something else."""
    try:
        if isinstance(value, str | dict):  # a string's characters are no list ("012")
            raise TypeError
        numbers = [kind(v) for v in value or []]
        if not all(math.isfinite(n) for n in numbers):  # JSON's NaN and Infinity: float() takes them
            raise ValueError
        return numbers
    except (TypeError, ValueError, OverflowError):  # OverflowError: int() of JSON's Infinity
        raise WorkflowError(f"{KEY}: plans.json: {what} is not a list of numbers (got {value!r})") from None


def _configuration_name(folder: Path, plans: dict) -> str:
    """The configuration, from the folder's name ``Trainer__Plans__configuration`` as nnU-Net names it."""
    parts = folder.resolve().name.split("__")
    configurations = plans.get("configurations") or {}
    if not isinstance(configurations, dict):
        raise WorkflowError(f"{KEY}: plans.json: configurations is a {type(configurations).__name__}, not a mapping "
                            "of the configurations' names to their settings")  # fmt: skip
    if len(parts) != 3 or parts[2] not in configurations:
        raise WorkflowError(f"{KEY}: {folder.name} is not named Trainer__Plans__configuration with a configuration "
                            f"of its plans.json ({', '.join(configurations) or 'none'}), as nnU-Net names the "
                            "folders it trains into")  # fmt: skip
    return parts[2]


def _configuration(plans: dict, name: str, seen: tuple[str, ...] = ()) -> dict:
    """The configuration with what it inherits, as nnU-Net's ``PlansManager`` resolves ``inherits_from``."""
    configurations = plans["configurations"]
    if name not in configurations:
        raise WorkflowError(f"{KEY}: plans.json: {seen[-1]} inherits from {name}, which it does not define")
    if not isinstance(configurations[name], dict):
        raise WorkflowError(f"{KEY}: plans.json: configuration {name} is not a mapping (got {configurations[name]!r})")
    config = dict(configurations[name])
    parent = config.get("inherits_from")
    if parent is None:
        return config
    if parent in (*seen, name):
        raise WorkflowError(f"{KEY}: plans.json: configurations inherit in a circle ({', '.join((*seen, name))})")
    return {**_configuration(plans, parent, (*seen, name)), **config}


def _labels(dataset: dict) -> list[str]:
    """Class names by label value, 0 to K-1; an ``ignore`` label (the highest) is no network output."""
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise WorkflowError(f"{KEY}: dataset.json has no labels")
    # regions are labels of several values (LabelManager's has_regions; regions_class_order counts only then)
    regions = [name for name, value in labels.items() if isinstance(value, list | tuple) and len(value) > 1]
    if regions:
        raise WorkflowError(f"{KEY}: dataset.json trains regions ({', '.join(regions)}): "
                            "one sigmoid per region, overlapping; tilemask writes one label per voxel")  # fmt: skip
    values = {name: value[0] if isinstance(value, list | tuple) and value else value for name, value in labels.items()}
    try:  # refused quoting the labels as dataset.json gives them
        by_value = sorted((int(value), str(name)) for name, value in values.items() if name != "ignore")
    except (TypeError, ValueError):
        raise WorkflowError(f"{KEY}: dataset.json: labels must map names to integers (got {labels})") from None
    twice = sorted({value for value, _ in by_value if [v for v, _ in by_value].count(value) > 1})
    if twice:
        names = [name for value, name in by_value if value == twice[0]]
        raise WorkflowError(f"{KEY}: dataset.json: label value {twice[0]} has several names ({', '.join(names)}): "
                            "give each value one name, the class name tilemask writes")  # fmt: skip
    if [value for value, _ in by_value] != list(range(len(by_value))):
        raise WorkflowError(f"{KEY}: dataset.json: label values {[v for v, _ in by_value]} are not 0, 1, 2, ... "
                            "(nnU-Net requires consecutive labels)")  # fmt: skip
    return [name for _, name in by_value]


def _channels(dataset: dict) -> int:
    names = dataset.get("channel_names", dataset.get("modality"))
    if not isinstance(names, dict) or not names:
        raise WorkflowError(f"{KEY}: dataset.json has no channel_names")
    return len(names)


def _normalization(plans: dict, config: dict, name: str, channels: int) -> dict:
    """``intensity`` / ``normalize`` from the configuration's ``normalization_schemes`` (one per channel)."""
    for key in ("normalization_schemes", "use_mask_for_norm"):  # a string was read letter by letter
        if not isinstance(config.get(key) or [], list):
            raise WorkflowError(f"{KEY}: plans.json: configuration {name}'s {key} is not a list, one per channel "
                                f"(got {config[key]!r})")  # fmt: skip
    schemes = [str(s) for s in config.get("normalization_schemes") or []]
    masks = [bool(m) for m in config.get("use_mask_for_norm") or []]
    if len(schemes) != channels:
        raise WorkflowError(f"{KEY}: plans.json: configuration {name} normalizes {len(schemes)} channel(s) "
                            f"but dataset.json names {channels}")  # fmt: skip
    known = ("CTNormalization", "ZScoreNormalization", "NoNormalization")
    other = [s for s in schemes if s not in known]
    if other:
        raise WorkflowError(f"{KEY}: plans.json normalizes with {other[0]}, which tilemask does not reproduce "
                            f"(it does {', '.join(known)})")  # fmt: skip
    if len(set(schemes)) > 1:
        raise WorkflowError(f"{KEY}: plans.json normalizes its channels with {', '.join(schemes)}: tilemask applies "
                            "one scheme to every channel")  # fmt: skip
    scheme = schemes[0]
    if scheme == "NoNormalization":
        return {}
    if scheme == "ZScoreNormalization":  # use_mask_for_norm: within the nonzero voxels (CTNormalization ignores it)
        if len(set(masks)) > 1:
            raise WorkflowError(f"{KEY}: plans.json: configuration {name} normalizes some channels within the nonzero "
                                "region (use_mask_for_norm) and others not: tilemask applies one rule to every channel")
        # nnU-Net's mask is crop_to_nonzero's, the voxels nonzero in some channel: "any", not each channel's own
        return {"normalize": {"mode": "zscore", "channel_wise": True, "nonzero": "any" if any(masks) else False}}
    properties = plans.get("foreground_intensity_properties_per_channel") or {}
    try:
        per_channel = [properties[str(c)] for c in range(channels)]
        ranges = {(float(p["percentile_00_5"]), float(p["percentile_99_5"])) for p in per_channel}
        mean = [float(p["mean"]) for p in per_channel]
        std = [max(float(p["std"]), 1e-8) for p in per_channel]  # nnU-Net divides by max(std, 1e-8)
    except (KeyError, TypeError, ValueError) as exc:
        raise WorkflowError(f"{KEY}: plans.json: CTNormalization needs the mean, std, percentile_00_5 and "
                            "percentile_99_5 of each channel in foreground_intensity_properties_per_channel "
                            f"({exc!r} missing)") from None
    if len(ranges) > 1:
        raise WorkflowError(f"{KEY}: plans.json clips each of its CT channels to its own range: tilemask applies one "
                            "intensity range to every channel")  # fmt: skip
    low, high = ranges.pop()
    if low == high:
        raise WorkflowError(f"{KEY}: plans.json: CTNormalization's percentiles are both {low}")
    return {"intensity": {"a_min": low, "a_max": high, "b_min": low, "b_max": high, "clip": True},
            "normalize": {"mean": mean, "std": std}}  # fmt: skip


def fold_checkpoints(folder: Path, fold: int | str | list | None, checkpoint: str | None) -> list[Path]:
    """The checkpoint of each fold that runs: ``fold``'s (one, or a list: nnU-Net's ensemble), else the folder's
    only fold, else every numbered fold holding the checkpoint, as ``nnUNetPredictor`` finds them
    (``auto_detect_available_folds``: ``fold_all`` is no member)."""
    folds = sorted((p.name[5:] for p in folder.glob("fold_*") if p.is_dir()), key=_fold_order)
    if not folds:
        raise WorkflowError(f"{KEY}: {folder} holds no fold_* folder: give a trained configuration's folder "
                            "(as nnUNetv2_predict's -d, -c and -tr name it, holding fold_0 ... and plans.json)")
    checkpoint = checkpoint or CHECKPOINTS[0]
    if fold is None and len(folds) > 1:
        fold = [f for f in folds if f.isdigit() and (folder / f"fold_{f}" / checkpoint).is_file()]
        if not fold:
            raise WorkflowError(f"{KEY}: {folder.name} has folds {', '.join(folds)}, none numbered with its "
                                f"{checkpoint}: give model.fold")  # fmt: skip
        logging.getLogger(__name__).info("%s: the ensemble of folds %s", folder.name, ", ".join(fold))
    chosen = list(fold) if isinstance(fold, list | tuple) else [folds[0] if fold is None else fold]
    paths = [folder / f"fold_{f}" / checkpoint for f in chosen]
    for path in paths:
        if not path.is_file():
            raise WorkflowError(f"{KEY}: no {path.relative_to(folder)} in {folder} (folds: {', '.join(folds)})")
    return paths


def _fold_order(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def __getattr__(name: str) -> Any:
    """``NnUNetNetwork``, the network the defaults name (``tilemask.nnunet:NnUNetNetwork``), from
    :mod:`tilemask.nnunet_network` when a worker builds it: reading a results folder imports no torch (the
    client does not)."""
    if name == "NnUNetNetwork":
        from .nnunet_network import NnUNetNetwork

        return NnUNetNetwork
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
