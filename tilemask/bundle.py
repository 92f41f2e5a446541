"""MONAI bundles as workflow defaults: ``model: {bundle: FOLDER}``.

A bundle (the MONAI Model Zoo's layout) is a folder with ``configs/inference.json``
(or ``.yaml``), ``configs/metadata.json`` and ``models/model.pt`` (a state_dict) or
``models/model.ts`` (TorchScript).  :func:`bundle_defaults` reads it with
``monai.bundle.ConfigParser`` (references and expressions resolved, nothing
instantiated) and turns it into workflow keys: the network from ``network_def`` (a class
of the bundle's own ``scripts`` package imported with its folder on ``sys.path``),
roi / overlap / mode / sigma / batch from the inferer, orientation / spacing /
intensity / z-score from the preprocessing transforms, the activation, the
threshold, whether the output goes back to the scan's grid (``Invertd``) and the
largest component / hole filling from the post-processing, the class names from
``channel_def``.  The preprocessing is found as MONAI's inference finds it: what
``dataset``'s ``transform`` refers to, else ``Invertd``'s, else ``preprocessing``
(the name is a convention only); the post-processing is what ``evaluator`` refers
to, else ``postprocessing``.  The workflow's own keys override these.  A
transform tilemask cannot apply chunk by chunk, an argument it does not apply set
to other than MONAI's default (of the transforms that load or save, one that
changes the answer: a reader, an integer type, ``SaveImaged``'s ``scale``, its
``resample`` where MONAI would resample the labels), and transforms out of
tilemask's order are refused by name before any work (exit 2).

Reading a bundle imports MONAI (and torch) on the client, and evaluates the
config's ``$`` expressions as MONAI does: a bundle is code, trust it as such.
"""

from __future__ import annotations

import logging
import numbers
from pathlib import Path
from typing import Any

from .errors import WorkflowError, first_line
from .imports import holds_package

logger = logging.getLogger(__name__)

# Transforms that only load, type or move the data: nothing for tilemask to do (it reads and writes itself).
PASSIVE = {
    "LoadImage", "EnsureChannelFirst", "EnsureType", "ToTensor", "ToDevice", "CastToType", "AsChannelFirst",
    "AddChannel", "SaveImage", "CopyItems", "DeleteItems", "Identity", "FromMetaTensor", "ToMetaTensor",
}  # fmt: skip
# Passive transforms of the preprocessing with arguments that change the answer, checked by _loading (those of
# SaveImage, by _postprocessing)
CHECKED = {"LoadImage", "EnsureChannelFirst", "CastToType"}
LOADIMAGE_OWN = {  # LoadImaged's own arguments: any other goes to its reader; only reader and dtype change the answer
    "keys", "reader", "dtype", "meta_keys", "meta_key_postfix", "overwriting", "image_only", "ensure_channel_first",
    "simple_keys", "prune_meta_pattern", "prune_meta_sep", "allow_missing_keys", "expanduser",
}  # fmt: skip
INFERERS = ("SlidingWindowInferer", "SliceInferer")
# the same windows and weights as the class named: SlidingWindowInfererAdapt only moves the stitching to the CPU
# when a GPU runs out of memory (Auto3DSeg's bundles use it)
SAME_AS = {"SlidingWindowInfererAdapt": "SlidingWindowInferer"}
READ = {  # per transform tilemask applies: the arguments it reads (below); any other must be MONAI's default
    "Orientation": {"axcodes", "as_closest_canonical"},
    "Spacing": {"pixdim", "mode"},
    "ScaleIntensityRange": {"a_min", "a_max", "b_min", "b_max", "clip"},
    "NormalizeIntensity": {"subtrahend", "divisor", "nonzero", "channel_wise"},
    "SlidingWindowInferer": {"roi_size", "sw_batch_size", "overlap", "mode", "sigma_scale"},
    "SliceInferer": {"roi_size", "sw_batch_size", "overlap", "mode", "sigma_scale", "spatial_dim"},
    "Activations": {"softmax", "sigmoid"},
    "Invert": {"nearest_interp"},
    "AsDiscrete": {"argmax", "threshold"},  # labels by argmax, or by a threshold (a sigmoid's): always labels
    "KeepLargestConnectedComponent": {"applied_labels", "is_onehot", "independent", "connectivity"},
    "FillHoles": {"applied_labels", "connectivity"},
}
ANSWER_UNCHANGED = {  # arguments that change where or how fast, or the float type of a step, not the answer
    "keys", "allow_missing_keys", "lazy", "dtype", "device", "sw_device", "progress", "cache_roi_weight_map",
    "cpu_thresh", "buffer_steps", "buffer_dim", "transform", "orig_keys", "meta_keys", "orig_meta_keys",
    "meta_key_postfix", "to_tensor",
}  # fmt: skip
PER_KEY = {  # arguments MONAI's dictionary transforms take one per key (ensure_tuple_rep), read as one value here
    "Activations": {"softmax", "sigmoid"},
    "AsDiscrete": {"argmax", "threshold"},
    "Invert": {"nearest_interp"},
}
PREPROCESSING_ORDER = ("Orientation", "Spacing", "ScaleIntensityRange", "NormalizeIntensity")  # tilemask's order
# tilemask activates, inverts, takes labels, then keeps each class's largest component and fills its holes
POSTPROCESSING_ORDER = ("Activations", "Invert", "AsDiscrete", "KeepLargestConnectedComponent", "FillHoles")
KNOWN = PASSIVE | set(READ)


def bundle_defaults(folder: Path, workflow: dict | None = None) -> dict[str, Any]:
    """Workflow keys (a raw workflow dict) from the bundle at ``folder``; ``workflow``, the raw keys that override
    them, says whether a 2D network runs over a volume's slices (its own ``inference.slice_axis``)."""
    from monai.bundle import ConfigParser

    configs = folder / "configs"
    found = [configs / f"inference.{s}" for s in ("json", "yaml", "yml") if (configs / f"inference.{s}").is_file()]
    if not found:
        raise WorkflowError(f"model.bundle: {folder} has no configs/inference.json or .yaml")
    parser = ConfigParser()
    metadata = configs / "metadata.json"
    for path, read in ((found[0], parser.read_config), (metadata, parser.read_meta)):
        try:
            if path.is_file():
                read(str(path))
        except Exception as exc:  # JSON / YAML errors of many types
            raise WorkflowError(f"model.bundle: cannot read {path}: {first_line(exc)}") from None
    parser["bundle_root"] = str(folder)
    model = _network(parser, folder)
    spatial_dims = model.get("args", {}).get("spatial_dims") or _default_rank(model.get("network"))
    inference = _inferer(parser, spatial_dims)
    ndim = 3 if "slice_axis" in inference else int(spatial_dims or len(inference["roi_size"]))  # the image's axes
    post_key = _referred(parser, "evaluator::postprocessing") or _referred(parser, "postprocessing")
    own = (workflow or {}).get("inference")
    over_slices = isinstance(own, dict) and own.get("slice_axis") is not None  # a volume's axes: MONAI's order
    planar = ndim == 2 and not over_slices  # a 2D network over 2D images: nothing to orient or resample
    if planar:  # MONAI reads a 2D image x first, (width, height), tilemask a raster's rows
        from .models import X_FIRST

        model.setdefault("args", {})[X_FIRST] = True  # the windows go in transposed
        for key in ("roi_size", "overlap", "sigma_scale"):  # and the inferer's values per axis are MONAI's (x, y)
            if isinstance(inference.get(key), list | tuple):
                inference[key] = list(inference[key])[::-1]
    keys: dict[str, Any] = {"model": model, "preprocess": _preprocessing(parser, folder, post_key, ndim, planar),
                            "inference": inference, "output": {}}  # fmt: skip
    channel_def = _channel_def(parser, metadata)
    post = _postprocessing(parser, post_key, model.get("args", {}), channel_def, ndim)
    keys["inference"].update(post["inference"])
    if post["postprocess"]:
        keys["postprocess"] = post["postprocess"]
    if not post["inverted"] and keys["preprocess"].keys() & {"orientation", "spacing"}:
        if not post["saved_resampled"]:
            keys["output"]["grid"] = "model"  # no Invertd: MONAI saves the prediction on the grid the network saw
        elif "spacing" in keys["preprocess"]:
            raise WorkflowError(f"model.bundle: {post_key} SaveImaged resample=True without Invertd: MONAI "
                                "resamples the labels (nearest) onto the scan's grid, tilemask its probabilities "
                                "(Invertd with nearest_interp: false, which gives other labels) or nothing (the model "
                                "grid)")  # fmt: skip
        # else after Orientationd alone, MONAI's resampling permutes and flips the labels back: the input's grid
    if channel_def and "classes" not in (workflow or {}):  # the workflow's own names stand in for them
        keys["classes"] = _classes(channel_def, keys["inference"]["activation"])
        out_channels = model.get("args", {}).get("out_channels")
        given = 2 if keys["inference"]["activation"] == "sigmoid" else out_channels
        if isinstance(given, int) and len(keys["classes"]) != given:  # "classes has 2 names": no word of the bundle
            raise WorkflowError(f"model.bundle: {metadata}: channel_def names {len(channel_def)} output "
                                f"channel(s) but the network gives {out_channels}; name them in the workflow's "
                                "classes")  # fmt: skip
    return keys


def _referred(parser, key: str) -> str | None:
    """The id of what ``key`` holds: the id it names when it is a plain reference (``"@pre_transforms"``), else
    ``key`` itself; None when the configs have no ``key``."""
    if key not in parser:
        return None
    value = parser.get(key)
    if isinstance(value, str) and value.startswith("@"):
        if value[1:] not in parser:
            raise WorkflowError(f"model.bundle: {key} refers to {value}, which the configs do not define")
        return value[1:]
    return key


def _parsed(parser, key: str, default=None):
    if key not in parser:
        return default
    try:
        value = parser.get_parsed_content(key, instantiate=False)
    except Exception as exc:  # an expression or a reference that fails
        raise WorkflowError(f"model.bundle: {key}: {_failure(exc)}") from None
    return value.get_config() if hasattr(value, "get_config") else value


def _failure(exc: BaseException) -> str:
    """MONAI's error in one line, with the error under it: MONAI writes the expression that failed on a line of
    its own (``Failed to evaluate ConfigExpression:`` then ``'$...'``) and keeps the expression's error as the
    ``__cause__``."""
    said, cause = " ".join(str(exc).split()), exc.__cause__
    return f"{said} ({type(cause).__name__}: {first_line(cause)})" if cause else f"{type(exc).__name__}: {said}"


def _target(config: dict) -> str:
    """A transform's class name as the config writes it, without its module (``Activationsd``)."""
    return str(config.get("_target_", "")).rsplit(".", 1)[-1]


def _name(config: dict) -> str:
    """A transform's class name without its module and the dictionary ``d`` suffix (an inferer that computes what
    another does, that one's: ``SAME_AS``)."""
    name = _target(config)
    if name in SAME_AS:
        return SAME_AS[name]
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
    target = _target(config)
    cls = getattr(monai.inferers if name in INFERERS else monai.transforms, target, None)
    parameters = dict(inspect.signature(cls).parameters) if cls is not None else {}
    if name == "SliceInferer":  # (spatial_dim, *args, **kwargs): the rest are SlidingWindowInferer's, and defaults
        parameters = {**inspect.signature(monai.inferers.SlidingWindowInferer).parameters, **parameters}
    for key, value in args.items():
        if key in READ[name] or key in ANSWER_UNCHANGED:
            continue
        default = parameters[key].default if key in parameters else inspect.Parameter.empty
        if default is inspect.Parameter.empty or not _is_default(value, default):
            shown = "" if default is inspect.Parameter.empty else f" (only MONAI's default, {_plain(default)!r})"
            raise WorkflowError(f"model.bundle: {section} {target} {key}={value!r}: tilemask does not apply it{shown}")
    if target != name:  # a dictionary transform (``Activationsd``): ``[true]`` is true, not a list
        for key in PER_KEY.get(name, set()) & args.keys():
            args[key] = _per_key(f"{section} {target}", key, args[key], args.get("keys"))
    if name == "AsDiscrete" and args.get("argmax") and args.get("threshold") is not None:
        raise WorkflowError(f"model.bundle: {section} {target} with both argmax and threshold: MONAI thresholds the "
                            "class indices; tilemask takes one or the other")  # fmt: skip
    return args


def _per_key(step: str, key: str, value, keys):
    """A dictionary transform's ``value`` of ``key`` as one value: MONAI takes one per key of ``keys``
    (``ensure_tuple_rep``), so a list's one value, or the one all its values are.  Values that differ are refused:
    tilemask applies one, to the network's output, and does not know which key names it."""
    if not isinstance(value, list | tuple):
        return value
    if not value:
        raise WorkflowError(f"model.bundle: {step} {key}={value!r}: no value (one per key of {keys!r})")
    if any(not _is_default(v, value[0]) for v in value):
        raise WorkflowError(f"model.bundle: {step} {key}={value!r}: one value per key of {keys!r}, which differ: "
                            "tilemask applies one")  # fmt: skip
    return value[0]


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
    key = _referred(parser, "network_def")
    expression = parser.get(key) if key else None
    if isinstance(expression, str) and expression.startswith("$"):
        if weights.suffix == ".ts":
            return model  # TorchScript holds its network
        shown = expression if len(expression) <= 60 else f"{expression[:57]}..."
        raise WorkflowError(f"model.bundle: {folder}: network_def is an expression ({shown}): tilemask "
                            "builds the network on its workers from a _target_ dict, such as "
                            '{"_target_": "UNet", "spatial_dims": 3, ...}')  # fmt: skip
    network = _parsed(parser, key) if key else None
    if isinstance(network, dict) and network.get("_target_"):
        target = str(network["_target_"])
        module, _, name = target.rpartition(".")
        model["network"] = f"{module}:{name}" if module and not module.startswith("monai.networks.nets") else name
        model["args"] = _arguments(network)
        if holds_package(folder, module.split(".")[0]):  # the bundle's own (scripts/)
            model["args"]["_import_path"] = [str(folder.resolve())]  # on sys.path, as MONAI's bundle runner puts it
    elif weights.suffix != ".ts":
        raise WorkflowError(f"model.bundle: {folder}: configs have no network_def for {weights.name}")
    return model


def _transforms(parser, key: str | None) -> list[dict]:
    """The configs of the transforms ``key`` holds (a Compose or a list; none without ``key``), those MONAI does
    not leave out (``_disabled_``)."""
    value = _parsed(parser, key) if key else None
    if value is None:
        return []
    transforms = value.get("transforms", []) if isinstance(value, dict) else value
    if not isinstance(transforms, list | tuple):
        raise WorkflowError(f"model.bundle: {key} is not a Compose or a list of transforms "
                            f"(it gives a {type(transforms).__name__})")  # fmt: skip
    transforms = [t.get_config() if hasattr(t, "get_config") else t for t in transforms]  # parsed components
    return [t for t in transforms if isinstance(t, dict) and not _disabled(t)]


def _disabled(config: dict) -> bool:
    """Whether MONAI leaves the component out: its ``ConfigComponent.is_disabled``, which reads a string
    ``_disabled_`` as true only when it says "true" (``"false"`` runs the transform)."""
    from monai.bundle import ConfigComponent

    return ConfigComponent(config).is_disabled()


def _values(value) -> list[float]:
    """A NormalizeIntensity subtrahend or divisor: one per channel (``channel_wise``), or one for them all."""
    return [float(v) for v in value] if isinstance(value, list | tuple) else [float(value)]


def _steps(parser, section: str | None, order: tuple[str, ...]) -> list[tuple[str, str, dict]]:
    """The transforms of ``section`` tilemask applies, as (name, class name, arguments), in order; a transform it
    cannot apply chunk by chunk, one out of ``order`` or twice, or an argument it does not apply, is refused."""
    transforms = [c for c in _transforms(parser, section) if _name(c) not in PASSIVE]
    for config in transforms:
        if _name(config) not in order:
            raise WorkflowError(f"model.bundle: {section} {config.get('_target_')} cannot run chunk by chunk")
    _in_order(section, [_name(c) for c in transforms], order)
    return [(_name(c), _target(c), _applied(section, c)) for c in transforms]


def _loading(section: str, config: dict, planar: bool = False) -> None:
    """Refuse the arguments of a preprocessing transform that only loads or types the image (which tilemask does
    itself) that would change MONAI's answer: a reader other than MONAI's own for NIfTI, or for a 2D network over
    2D images (``planar``) PIL's, x first as tilemask feeds it (or options passed on to one), an integer type (it
    truncates the intensities), a channel axis other than the one MONAI finds."""
    name, target, args = _name(config), _target(config), _arguments(config)
    step = f"model.bundle: {section} {target}"
    if name == "LoadImage":
        passed = sorted(k for k in args if k not in LOADIMAGE_OWN)
        if passed:
            raise WorkflowError(f"{step} {passed[0]}={args[passed[0]]!r}: an option of its reader; tilemask reads "
                                "images itself, as MONAI's default readers do")  # fmt: skip
        reader = args.get("reader")
        shown = getattr(reader, "__name__", reader)
        own = ("nibabelreader", "pilreader") if planar else ("nibabelreader",)  # MONAI's for NIfTI, for a PNG
        if reader is not None and str(shown).lower() not in own:
            raise WorkflowError(f"{step} reader={shown!r}: tilemask reads images itself, as MONAI's default "
                                "readers do (NibabelReader for NIfTI)")  # fmt: skip
    if name in ("LoadImage", "CastToType") and "dtype" in args:
        dtype = args["dtype"]
        if name == "CastToType" and target != name:  # CastToTyped: one per key
            dtype = _per_key(f"{section} {target}", "dtype", dtype, args.get("keys"))
        if not _float_type(dtype):
            raise WorkflowError(f"{step} dtype={getattr(dtype, '__name__', dtype)!r}: tilemask computes in floats "
                                "(an integer type truncates the intensities)")  # fmt: skip
    if name == "EnsureChannelFirst" and args.get("channel_dim") not in (None, "no_channel"):
        raise WorkflowError(f"{step} channel_dim={args['channel_dim']!r}: tilemask takes the channels where MONAI "
                            "finds them (only MONAI's default, None)")  # fmt: skip


def _float_type(dtype) -> bool:
    """Whether a config's ``dtype`` (numpy's, torch's or a name; None keeps the file's) is a float type or None."""
    import numpy as np

    if dtype is None or getattr(dtype, "is_floating_point", False):
        return True
    try:
        return np.dtype(dtype).kind == "f"
    except TypeError:
        return False


def _preprocessing_key(parser, folder: Path, post_key: str | None) -> str | None:
    """The id of the preprocessing, as MONAI's inference finds it: what ``dataset``'s ``transform`` refers to,
    else ``Invertd``'s ``transform``, else ``preprocessing``; None for a bundle that has none and neither has a
    dataset nor loads images.  A bundle that does and has none is refused: run without its preprocessing, a
    bundle naming it ``pre_transforms`` gave labels with a Dice of 0.51 against MONAI's."""
    for key in ("dataset::transform", _invert_transform(parser, post_key), "preprocessing"):
        found = _referred(parser, key) if key else None
        if found:
            return found
    if "dataset" in parser or _loads_images(parser.get()):
        raise WorkflowError(f"model.bundle: {folder}: found no preprocessing (no dataset::transform, Invertd "
                            "transform or preprocessing key), yet the bundle "
                            f"{'has a dataset' if 'dataset' in parser else 'loads images'}: tilemask will not run "
                            "it without its preprocessing")  # fmt: skip
    return None


def _invert_transform(parser, post_key: str | None) -> str | None:
    """The id of the first ``Invertd``'s ``transform`` in the post-processing ``post_key`` (None without one)."""
    if post_key is None:
        return None
    listed = f"{post_key}::transforms" if isinstance(parser.get(post_key), dict) else post_key
    transforms = parser.get(listed) if listed in parser else None
    for i, config in enumerate(transforms if isinstance(transforms, list) else []):
        if isinstance(config, dict) and _name(config) == "Invert" and "transform" in config:
            return f"{listed}::{i}::transform"
    return None


def _loads_images(config) -> bool:
    """Whether a raw config holds a ``LoadImage`` or ``LoadImaged`` anywhere."""
    if isinstance(config, dict):
        if _target(config) in ("LoadImage", "LoadImaged"):
            return True
        return any(_loads_images(v) for v in config.values())
    return isinstance(config, list) and any(_loads_images(v) for v in config)


def _preprocessing(parser, folder: Path, post_key: str | None, ndim: int, planar: bool = False) -> dict:
    """Workflow ``preprocess`` keys; ``planar``: a 2D network over 2D images, which tilemask neither orients nor
    resamples (volumes only)."""
    key = _preprocessing_key(parser, folder, post_key)
    keys: dict[str, Any] = {}
    for config in _transforms(parser, key):
        if _name(config) in CHECKED:
            _loading(key, config, planar)
    for name, target, args in _steps(parser, key, PREPROCESSING_ORDER):
        if planar and name in ("Orientation", "Spacing"):
            raise WorkflowError(f"model.bundle: {key} {target} with a 2D network: tilemask orients and resamples "
                                "volumes (a 2D network over a volume's slices: inference.slice_axis)")  # fmt: skip
        if name == "Orientation":
            keys["orientation"] = "RAS" if args.get("as_closest_canonical") else args.get("axcodes")
        elif name == "Spacing":
            mode = args.get("mode", "bilinear")
            if (mode[0] if isinstance(mode, list | tuple) else mode) != "bilinear":
                raise WorkflowError(f"model.bundle: {key} {target} mode {mode!r}: tilemask resamples bilinear")
            keys["spacing"] = _pixdim(args["pixdim"], ndim)
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


def _pixdim(pixdim, ndim: int) -> list[float]:
    """Spacingd's ``pixdim`` on ``ndim`` axes as MONAI takes it: one number for all, a list cut to ``ndim`` or
    padded with its last value; an axis <= 0 keeps the scan's own spacing there, as MONAI and
    ``preprocess.spacing`` do."""
    given = [float(v) for v in pixdim] if isinstance(pixdim, list | tuple) else [float(pixdim)]
    return (given + given[-1:] * ndim)[:ndim]


def _default_rank(network: str | None) -> int | None:
    """The spatial axes of one of MONAI's networks whose config leaves ``spatial_dims`` out: its class's default (2
    for FlexibleUNet, 3 for UNETR); None for another network, or one without that argument."""
    import inspect

    import monai.networks.nets

    cls = getattr(monai.networks.nets, network, None) if network and ":" not in network else None
    parameter = inspect.signature(cls).parameters.get("spatial_dims") if cls is not None else None
    return parameter.default if parameter is not None and isinstance(parameter.default, int) else None


def _inferer(parser, ndim: int | None) -> dict:
    """Workflow ``inference`` keys from the bundle's SlidingWindowInferer, or SliceInferer (a 2D network over a
    volume's slices), for a network of ``ndim`` spatial axes (None: not known, as for TorchScript)."""
    inferer = _parsed(parser, "inferer")
    if not isinstance(inferer, dict) or _name(inferer) not in INFERERS:
        got = inferer.get("_target_") if isinstance(inferer, dict) else parser.get("inferer")  # an expression's text
        raise WorkflowError(f"model.bundle: inferer must be a SlidingWindowInferer or SliceInferer _target_ dict "
                            f"(got {got!r})")  # fmt: skip
    args = _applied("inferer", inferer)
    # one number is the size along every axis, as MONAI's sliding window takes it (fall_back_tuple)
    roi = args["roi_size"]
    if not isinstance(roi, list | tuple):
        if ndim is None:
            raise WorkflowError(f"model.bundle: inferer {_name(inferer)} roi_size={roi!r}: one number, and the "
                                "network does not say how many spatial axes it has; give one size per axis")  # fmt: skip
        roi = [roi] * ndim
    roi = list(roi)
    if any(r is None or r <= 0 for r in roi):
        raise WorkflowError(f"model.bundle: inferer {_name(inferer)} roi_size={args['roi_size']!r}: MONAI takes "
                            "each image's own size along an axis <= 0; tilemask slides one window size, given on "
                            "every axis")  # fmt: skip
    keys = {
        "roi_size": roi,
        "overlap": args.get("overlap", 0.25),
        "mode": args.get("mode", "constant"),  # MONAI's default, not tilemask's
        "batch_size": args.get("sw_batch_size", 1),
    }
    if "sigma_scale" in args:
        keys["sigma_scale"] = args["sigma_scale"]
    if _name(inferer) == "SliceInferer":
        keys["slice_axis"] = axis = args.get("spatial_dim", 0)  # MONAI's default
        if isinstance(axis, bool) or axis not in (0, 1, 2):  # MONAI refuses 3, and -1 breaks in its network wrapper
            raise WorkflowError(f"model.bundle: inferer {_name(inferer)} spatial_dim={axis!r}: an axis of the "
                                "volume, 0, 1 or 2")  # fmt: skip
        for key in ("overlap", "sigma_scale"):  # MONAI's lists are per axis of the volume; tilemask's a slice's:
            if isinstance(keys.get(key), list | tuple) and len(keys[key]) == 3:  # across slices one start, one
                keys[key] = [value for i, value in enumerate(keys[key]) if i != axis]  # weight whatever it is
    return keys


def _postprocessing(parser, key: str | None, network: dict, channel_def: dict, ndim: int) -> dict:
    """Workflow keys from the post-processing ``key``: ``inference`` (activation, threshold), ``postprocess``
    (largest component, holes), whether it is ``inverted``, and whether ``SaveImaged`` writes the labels on the
    scan's grid (``saved_resampled``).  ``network`` (the network's arguments) and ``channel_def`` give the number of
    classes, the foreground labels being 1 up to it."""
    inference: dict[str, Any] = {"activation": "none"}
    postprocess: dict[str, Any] = {}
    connectivity: set[str] = set()
    foreground: set[int] | None = None  # the labels other than background, once known
    inverted = False
    out_channels = network.get("out_channels")
    steps = _steps(parser, key, POSTPROCESSING_ORDER)
    saved_resampled = False  # SaveImaged(resample=True) writes the labels on the grid the scan was loaded on
    for config in (c for c in _transforms(parser, key) if _name(c) == "SaveImage"):
        args = _arguments(config)
        saved_resampled = saved_resampled or bool(args.get("resample"))
        if args.get("scale") is not None:
            raise WorkflowError(f"model.bundle: {key} {_target(config)} scale={args['scale']!r}: tilemask writes "
                                "the labels unscaled (only MONAI's default, None)")  # fmt: skip
    for name, target, args in steps:
        if name == "Activations":
            if args.get("softmax"):
                inference["activation"] = "softmax"
            elif args.get("sigmoid"):
                if out_channels is not None and int(out_channels) > 1:
                    names = f" ({', '.join(_classes(channel_def, 'none'))})" if channel_def else ""
                    raise WorkflowError(f"model.bundle: {key} {target} sigmoid on the network's out_channels "
                                        f"{out_channels}{names}: one binary mask per channel, which may overlap "
                                        "(multi-label output), is not supported; tilemask writes one class per "
                                        "voxel")  # fmt: skip
                inference["activation"] = "sigmoid"
        elif name == "Invert":
            if args.get("nearest_interp", True):
                raise WorkflowError(f"model.bundle: {key} {target} with nearest_interp: tilemask inverts probabilities "
                                    "(nearest_interp: false)")  # fmt: skip
            inverted = True
        elif name == "AsDiscrete":
            threshold = args.get("threshold")
            if threshold is not None:
                if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):  # np.float32 too
                    raise WorkflowError(f"model.bundle: {key} {target} threshold={threshold!r}: a number or null")
                inference["threshold"] = float(threshold)
        else:
            if "AsDiscrete" not in (n for n, _, _ in steps):
                raise WorkflowError(f"model.bundle: {key} {target} without AsDiscreted before it runs on the network's "
                                    "output; tilemask runs it on the labels")  # fmt: skip
            n = 2 if inference["activation"] == "sigmoid" else out_channels or len(channel_def)
            foreground = set(range(1, int(n))) if n else None
            _labels_of(f"{key} {target}", args, foreground, zero=name == "FillHoles")
            if name == "KeepLargestConnectedComponent":
                if args.get("is_onehot"):
                    raise WorkflowError(f"model.bundle: {key} {target} is_onehot=True: tilemask's labels are one "
                                        "channel of class values")  # fmt: skip
                if args.get("independent") is False and (foreground is None or len(foreground) > 1):
                    raise WorkflowError(f"model.bundle: {key} {target} independent=False: tilemask keeps the "
                                        "largest component of each class on its own")  # fmt: skip
                postprocess["keep_largest"] = True
            else:
                postprocess["fill_holes"] = True
            connectivity.add(_connectivity(f"{key} {target}", args.get("connectivity"), ndim))
    if len(postprocess) == 2 and (foreground is None or len(foreground) > 1):
        raise WorkflowError(f"model.bundle: {key} has KeepLargestConnectedComponent and FillHoles over "
                            f"{len(foreground) if foreground else 'an unknown number of'} foreground classes: MONAI "
                            "keeps the largest component of every class before filling any hole, tilemask does both "
                            "class by class, which differs where one class's holes hold another class")  # fmt: skip
    if len(connectivity) > 1:
        raise WorkflowError(f"model.bundle: {key} has KeepLargestConnectedComponent and FillHoles with different "
                            "connectivity: tilemask applies one to both")  # fmt: skip
    if connectivity == {"face"}:
        postprocess["connectivity"] = "face"
    return {"inference": inference, "postprocess": postprocess, "inverted": inverted,
            "saved_resampled": saved_resampled}  # fmt: skip


def _labels_of(step: str, args: dict, foreground: set[int] | None, zero: bool) -> None:
    """Refuse ``applied_labels`` other than every foreground label (tilemask's postprocess applies to each one);
    FillHoles leaves label 0 out itself (``zero``), KeepLargestConnectedComponent would keep background's
    largest component."""
    applied = args.get("applied_labels")
    if applied is None:
        return
    labels = {int(v) for v in (applied if isinstance(applied, list | tuple) else [applied])} - ({0} if zero else set())
    if labels != foreground:
        every = f" ({sorted(foreground)})" if foreground else ""
        raise WorkflowError(f"model.bundle: {step} applied_labels={applied!r}: tilemask applies it to every "
                            f"foreground class{every}")  # fmt: skip


def _connectivity(step: str, value, ndim: int) -> str:
    """A KeepLargestConnectedComponent's or FillHoles's ``connectivity`` (hops; None is ``ndim``) as tilemask's."""
    if value is None or value == ndim:
        return "full"
    if value == 1:
        return "face"
    raise WorkflowError(f"model.bundle: {step} connectivity={value!r}: tilemask connects voxels by their faces (1) "
                        f"or fully ({ndim})")  # fmt: skip


def _channel_def(parser, metadata: Path) -> dict:
    """``metadata.json``'s ``channel_def`` of the network's output: channel index (a string) to name.  Keys other
    than the channels 0, 1, ... are refused: the names are the classes in the order of their keys."""
    try:
        outputs = parser.get("_meta_", {}).get("network_data_format", {}).get("outputs", {})
        channel_def = dict(next(iter(outputs.values())).get("channel_def", {}))
    except (AttributeError, StopIteration, TypeError, ValueError):
        return {}
    if sorted(str(k).strip() for k in channel_def) != sorted(str(i) for i in range(len(channel_def))):
        raise WorkflowError(f"model.bundle: {metadata}: channel_def has keys {list(channel_def)}: they must be the "
                            f"output channels 0 to {len(channel_def) - 1}")  # fmt: skip
    return channel_def


def _classes(channel_def: dict, activation: str) -> list[str]:
    """Class names from ``channel_def``; with a sigmoid, one entry names the one output channel: label 1 where
    its probability reaches the threshold, and 0 is background."""
    names = [str(channel_def[k]) for k in sorted(channel_def, key=int)]
    return ["background", *names] if activation == "sigmoid" and len(names) == 1 else names


def merge(defaults: dict, workflow: dict) -> dict:
    """The workflow's keys over the bundle's (nested sections merged)."""
    merged = dict(defaults)
    for key, value in workflow.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged
