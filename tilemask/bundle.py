"""MONAI bundles as workflow defaults: ``model: {bundle: FOLDER}``.

A bundle (the MONAI Model Zoo's layout) is a folder with ``configs/inference.json``
(or ``.yaml``), ``configs/metadata.json`` and ``models/model.pt`` (a state_dict) or
``models/model.ts`` (TorchScript).  :func:`bundle_defaults` reads it with
``monai.bundle.ConfigParser`` (references and expressions resolved, nothing
instantiated) and turns it into workflow keys: the network from ``network_def``,
roi / overlap / mode / sigma / batch from the inferer, orientation / spacing /
intensity / z-score from the preprocessing transforms, the activation, the
threshold and whether the output goes back to the scan's grid (``Invertd``) from
the post-processing, the class names from ``channel_def``.  The workflow's own
keys override these.  A transform tilemask cannot apply chunk by chunk, an
argument it does not apply set to other than MONAI's default, and transforms out
of tilemask's order are refused by name before any work (exit 2).

Reading a bundle imports MONAI (and torch) on the client, and evaluates the
config's ``$`` expressions as MONAI does: a bundle is code, trust it as such.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .errors import WorkflowError

logger = logging.getLogger(__name__)

# Transforms that only load, type or move the data: nothing for tilemask to do (it reads and writes itself).
PASSIVE = {
    "LoadImage", "EnsureChannelFirst", "EnsureType", "ToTensor", "ToDevice", "CastToType", "AsChannelFirst",
    "AddChannel", "SaveImage", "CopyItems", "DeleteItems", "Identity", "FromMetaTensor", "ToMetaTensor",
}  # fmt: skip
READ = {  # per transform tilemask applies: the arguments it reads (below); any other must be MONAI's default
    "Orientation": {"axcodes", "as_closest_canonical"},
    "Spacing": {"pixdim", "mode"},
    "ScaleIntensityRange": {"a_min", "a_max", "b_min", "b_max", "clip"},
    "NormalizeIntensity": {"subtrahend", "divisor", "nonzero", "channel_wise"},
    "SlidingWindowInferer": {"roi_size", "sw_batch_size", "overlap", "mode", "sigma_scale"},
    "Activations": {"softmax", "sigmoid"},
    "Invert": {"nearest_interp"},
    "AsDiscrete": {"argmax", "threshold"},  # labels by argmax, or by a threshold (a sigmoid's): always labels
}
ANSWER_UNCHANGED = {  # arguments that change where or how fast, or the float type of a step, not the answer
    "keys", "allow_missing_keys", "lazy", "dtype", "device", "sw_device", "progress", "cache_roi_weight_map",
    "cpu_thresh", "buffer_steps", "buffer_dim", "transform", "orig_keys", "meta_keys", "orig_meta_keys",
    "meta_key_postfix", "to_tensor",
}  # fmt: skip
PREPROCESSING_ORDER = ("Orientation", "Spacing", "ScaleIntensityRange", "NormalizeIntensity")  # tilemask's order
POSTPROCESSING_ORDER = ("Activations", "Invert", "AsDiscrete")  # tilemask activates, inverts, then takes labels
KNOWN = PASSIVE | set(READ)


def bundle_defaults(folder: Path) -> dict[str, Any]:
    """Workflow keys (a raw workflow dict) from the bundle at ``folder``."""
    from monai.bundle import ConfigParser

    configs = folder / "configs"
    found = [configs / f"inference.{s}" for s in ("json", "yaml", "yml") if (configs / f"inference.{s}").is_file()]
    if not found:
        raise WorkflowError(f"model.bundle: {folder} has no configs/inference.json or .yaml")
    parser = ConfigParser()
    try:
        parser.read_config(str(found[0]))
        parser["bundle_root"] = str(folder)
        metadata = configs / "metadata.json"
        if metadata.is_file():
            parser.read_meta(str(metadata))
    except Exception as exc:  # JSON / YAML errors of many types
        raise WorkflowError(f"model.bundle: cannot read {found[0]}: {exc}") from None
    keys: dict[str, Any] = {"model": _network(parser, folder), "preprocess": {}, "inference": {}, "output": {}}
    keys["preprocess"] = _preprocessing(parser)
    keys["inference"] = _inferer(parser)
    post = _postprocessing(parser)
    keys["inference"].update(post["inference"])
    if not post["inverted"] and keys["preprocess"].keys() & {"orientation", "spacing"}:
        keys["output"]["grid"] = "model"  # no Invertd: MONAI saves the prediction on the grid the network saw
    classes = _classes(parser)
    if classes:
        keys["classes"] = classes
    return keys


def _parsed(parser, key: str, default=None):
    if key not in parser:
        return default
    try:
        value = parser.get_parsed_content(key, instantiate=False)
    except Exception as exc:  # an expression or a reference that fails
        raise WorkflowError(f"model.bundle: {key}: {type(exc).__name__}: {exc}") from None
    return value.get_config() if hasattr(value, "get_config") else value


def _name(config: dict) -> str:
    """A transform's class name without its module and the dictionary ``d`` suffix."""
    name = str(config.get("_target_", "")).rsplit(".", 1)[-1]
    return name[:-1] if name.endswith("d") and name[:-1] in KNOWN else name


def _arguments(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _applied(section: str, config: dict) -> dict:
    """The arguments of a transform (or the inferer) tilemask applies, once every other one is checked to be
    MONAI's default: a bundle's ``padding_mode`` or ``cval`` silently dropped gave another answer than MONAI's."""
    import inspect

    import monai.inferers
    import monai.transforms

    name, args = _name(config), _arguments(config)
    target = str(config.get("_target_", "")).rsplit(".", 1)[-1]
    cls = getattr(monai.inferers if name == "SlidingWindowInferer" else monai.transforms, target, None)
    parameters = inspect.signature(cls).parameters if cls is not None else {}
    for key, value in args.items():
        if key in READ[name] or key in ANSWER_UNCHANGED:
            continue
        default = parameters[key].default if key in parameters else inspect.Parameter.empty
        if default is inspect.Parameter.empty or not _is_default(value, default):
            shown = "" if default is inspect.Parameter.empty else f" (only MONAI's default, {_plain(default)!r})"
            raise WorkflowError(f"model.bundle: {section} {target} {key}={value!r}: tilemask does not apply it{shown}")
    if name == "AsDiscrete" and args.get("argmax") and args.get("threshold") is not None:
        raise WorkflowError(f"model.bundle: {section} {target} with both argmax and threshold: MONAI thresholds the "
                            "class indices; tilemask takes one or the other")  # fmt: skip
    return args


def _is_default(value, default) -> bool:
    """Whether a config's ``value`` is MONAI's ``default``: one per key (``["border", "border"]``) counts as one;
    anything that does not compare plainly (an array) is not."""
    plain, expected = _plain(value), _plain(default)
    if isinstance(plain, tuple) and not isinstance(expected, tuple):
        return bool(plain) and all(_is_default(v, default) for v in plain)
    try:
        return bool(plain == expected)
    except (ValueError, TypeError):
        return False


def _plain(value):
    """A value as configs write it: enums as their value, sequences as tuples (to compare with a default)."""
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    value = getattr(value, "value", value)
    return value.lower() if isinstance(value, str) else value


def _in_order(section: str, names: list[str], order: tuple[str, ...]) -> None:
    """``names`` (the transforms a section holds, in its order, all of ``order``) each once, in tilemask's order."""
    if len(set(names)) != len(names) or names != sorted(names, key=order.index):
        raise WorkflowError(f"model.bundle: {section} has {', '.join(names)}: tilemask applies "
                            f"{', '.join(n for n in order if n in names)} once each, in that order")  # fmt: skip


def _network(parser, folder: Path) -> dict:
    models = folder / "models"
    weights = next((models / n for n in ("model.pt", "model.ts") if (models / n).is_file()), None)
    if weights is None:
        raise WorkflowError(f"model.bundle: {folder} has no models/model.pt or models/model.ts")
    model: dict[str, Any] = {"weights": str(weights), "bundle": str(folder)}
    network = _parsed(parser, "network_def")
    if isinstance(network, dict) and network.get("_target_"):
        target = str(network["_target_"])
        module, _, name = target.rpartition(".")
        model["network"] = f"{module}:{name}" if module and not module.startswith("monai.networks.nets") else name
        model["args"] = _arguments(network)
    elif weights.suffix != ".ts":
        raise WorkflowError(f"model.bundle: {folder}: configs have no network_def for {weights.name}")
    return model


def _transforms(parser, key: str) -> list[dict]:
    value = _parsed(parser, key)
    if value is None:
        return []
    transforms = value.get("transforms", []) if isinstance(value, dict) else value
    transforms = [t.get_config() if hasattr(t, "get_config") else t for t in transforms]  # parsed components
    return [t for t in transforms if isinstance(t, dict) and not t.get("_disabled_")]


def _values(value) -> list[float]:
    """A NormalizeIntensity subtrahend or divisor: one per channel (``channel_wise``), or one for them all."""
    return [float(v) for v in value] if isinstance(value, list | tuple) else [float(value)]


def _steps(parser, section: str, order: tuple[str, ...]) -> list[tuple[str, dict]]:
    """The transforms of ``section`` tilemask applies, as (name, arguments), in order; a transform it cannot
    apply chunk by chunk, one out of ``order`` or twice, or an argument it does not apply, is refused."""
    transforms = [c for c in _transforms(parser, section) if _name(c) not in PASSIVE]
    for config in transforms:
        if _name(config) not in order:
            raise WorkflowError(f"model.bundle: {section} {config.get('_target_')} cannot run chunk by chunk")
    _in_order(section, [_name(c) for c in transforms], order)
    return [(_name(c), _applied(section, c)) for c in transforms]


def _preprocessing(parser) -> dict:
    keys: dict[str, Any] = {}
    for name, args in _steps(parser, "preprocessing", PREPROCESSING_ORDER):
        if name == "Orientation":
            keys["orientation"] = "RAS" if args.get("as_closest_canonical") else args.get("axcodes")
        elif name == "Spacing":
            mode = args.get("mode", "bilinear")
            if (mode[0] if isinstance(mode, list | tuple) else mode) != "bilinear":
                raise WorkflowError(f"model.bundle: preprocessing Spacing mode {mode!r}: tilemask resamples bilinear")
            keys["spacing"] = list(args["pixdim"]) if isinstance(args["pixdim"], list | tuple) else args["pixdim"]
        elif name == "ScaleIntensityRange":
            keys["intensity"] = {k: args[k] for k in ("a_min", "a_max", "b_min", "b_max", "clip") if k in args}
        elif name == "NormalizeIntensity":
            subtrahend, divisor = args.get("subtrahend"), args.get("divisor")
            if subtrahend is not None or divisor is not None:
                if subtrahend is None or divisor is None:  # MONAI takes the other from the image: a z-score half
                    raise WorkflowError("model.bundle: NormalizeIntensity with only a subtrahend or only a divisor; "
                                        "tilemask takes both (fixed values) or neither (the z-score)")  # fmt: skip
                keys["normalize"] = {"mean": _values(subtrahend), "std": _values(divisor),
                                     "nonzero": bool(args.get("nonzero", False))}  # fmt: skip
            else:
                keys["normalize"] = {
                    "mode": "zscore", "nonzero": bool(args.get("nonzero", False)),
                    "channel_wise": bool(args.get("channel_wise", False)),
                }  # fmt: skip
    return keys


def _inferer(parser) -> dict:
    inferer = _parsed(parser, "inferer")
    if not isinstance(inferer, dict) or _name(inferer) != "SlidingWindowInferer":
        raise WorkflowError(f"model.bundle: inferer must be a SlidingWindowInferer (got {inferer and inferer.get('_target_')})")
    args = _applied("inferer", inferer)
    roi = args["roi_size"]
    keys = {
        "roi_size": list(roi) if isinstance(roi, list | tuple) else [roi],
        "overlap": args.get("overlap", 0.25),
        "mode": args.get("mode", "constant"),  # MONAI's default, not tilemask's
        "batch_size": args.get("sw_batch_size", 1),
    }
    if "sigma_scale" in args:
        keys["sigma_scale"] = args["sigma_scale"]
    return keys


def _postprocessing(parser) -> dict:
    inference: dict[str, Any] = {"activation": "none"}
    inverted = False
    for name, args in _steps(parser, "postprocessing", POSTPROCESSING_ORDER):
        if name == "Activations":
            if args.get("softmax"):
                inference["activation"] = "softmax"
            elif args.get("sigmoid"):
                inference["activation"] = "sigmoid"
        elif name == "Invert":
            if args.get("nearest_interp", True):
                raise WorkflowError("model.bundle: postprocessing Invertd with nearest_interp: tilemask inverts probabilities (nearest_interp: false)")
            inverted = True
        elif name == "AsDiscrete":
            if args.get("threshold") is not None:
                inference["threshold"] = float(args["threshold"])
    return {"inference": inference, "inverted": inverted}


def _classes(parser) -> list[str]:
    try:
        outputs = parser.get("_meta_", {}).get("network_data_format", {}).get("outputs", {})
        channel_def = next(iter(outputs.values())).get("channel_def", {})
    except (AttributeError, StopIteration):
        return []
    return [str(channel_def[k]) for k in sorted(channel_def, key=int)] if channel_def else []


def merge(defaults: dict, workflow: dict) -> dict:
    """The workflow's keys over the bundle's (nested sections merged)."""
    merged = dict(defaults)
    for key, value in workflow.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged
