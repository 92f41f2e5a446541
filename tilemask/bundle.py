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
keys override these.  A transform tilemask cannot apply chunk by chunk is refused
by name before any work (exit 2).

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
SPATIAL = ("Orientation", "Spacing")
KNOWN = PASSIVE | set(SPATIAL) | {
    "ScaleIntensityRange", "NormalizeIntensity", "Activations", "AsDiscrete", "Invert", "SlidingWindowInferer",
}  # fmt: skip


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


def _preprocessing(parser) -> dict:
    keys: dict[str, Any] = {}
    seen_intensity = False
    for config in _transforms(parser, "preprocessing"):
        name, args = _name(config), _arguments(config)
        if name in PASSIVE:
            continue
        if name in SPATIAL and seen_intensity:
            raise WorkflowError(f"model.bundle: preprocessing {name} after an intensity transform: tilemask resamples first")
        if name == "Orientation":
            keys["orientation"] = "RAS" if args.get("as_closest_canonical") else args.get("axcodes")
        elif name == "Spacing":
            mode = args.get("mode", "bilinear")
            if (mode[0] if isinstance(mode, list | tuple) else mode) != "bilinear":
                raise WorkflowError(f"model.bundle: preprocessing Spacing mode {mode!r}: tilemask resamples bilinear")
            keys["spacing"] = list(args["pixdim"]) if isinstance(args["pixdim"], list | tuple) else args["pixdim"]
        elif name == "ScaleIntensityRange":
            seen_intensity = True
            keys["intensity"] = {k: args[k] for k in ("a_min", "a_max", "b_min", "b_max", "clip") if k in args}
        elif name == "NormalizeIntensity":
            seen_intensity = True
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
        else:
            raise WorkflowError(f"model.bundle: preprocessing {config.get('_target_')} cannot run chunk by chunk")
    return keys


def _inferer(parser) -> dict:
    inferer = _parsed(parser, "inferer")
    if not isinstance(inferer, dict) or _name(inferer) != "SlidingWindowInferer":
        raise WorkflowError(f"model.bundle: inferer must be a SlidingWindowInferer (got {inferer and inferer.get('_target_')})")
    args = _arguments(inferer)
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
    for config in _transforms(parser, "postprocessing"):
        name, args = _name(config), _arguments(config)
        if name in PASSIVE:
            continue
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
        else:
            raise WorkflowError(f"model.bundle: postprocessing {config.get('_target_')} cannot run chunk by chunk")
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
