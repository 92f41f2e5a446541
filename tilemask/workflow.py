"""The workflow file (YAML, version 1) as validated pydantic models.

Everything a user can get wrong in a workflow is rejected here, before any work
starts, with a one-line :class:`~tilemask.errors.WorkflowError` naming the key.
Checks that need the input image (number of bands against ``in_channels``) are
in :func:`tilemask.engine.check_source`.

Relative paths (input, weights, output) are resolved against the folder of the
workflow file, so a workflow and its data can move together; a workflow built in
Python resolves them against the current directory.
"""

from __future__ import annotations

import functools
import glob
import itertools
import logging
import os
import re
import typing
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import InputError, WorkflowError, on_command_line
from .formats import FORMATS, for_output, stem
from .stats.config import NotBool, PostprocessConfig, StatsConfig, only_stem_placeholder
from .storage import is_remote

logger = logging.getLogger(__name__)

ONE_CHANNEL = ("inference.activation {} of a one-channel network labels every pixel class 0 (softmax of one channel "
               "is 1 everywhere); a binary network takes sigmoid")

# Every number refuses a boolean (pydantic's lax mode would take ``true`` as 1); floats still take ints.
PositiveInt = Annotated[int, NotBool, Field(ge=1)]
Float = Annotated[float, NotBool, Field(allow_inf_nan=False)]  # a NaN mean or std would feed NaN to the network
Overlap = Annotated[float, NotBool, Field(ge=0.0, lt=1.0)]
SigmaScale = Annotated[float, NotBool, Field(gt=0, allow_inf_nan=False)]
MAX_ALIAS_EXPANSION = 100_000  # values YAML aliases may add to a workflow (a "billion laughs" adds ~10**9)
REMOTE_PREFIXES = ("http://", "https://", "s3://", "/vsi", "gs://", "az://")
REMOTE_OUTPUT_FORMATS = ("zarr", "cog")  # written chunk by chunk through fsspec, or assembled and uploaded whole


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Fold = Annotated[int, NotBool, Field(ge=0)] | Literal["all"]  # nnU-Net's fold_N, or fold_all


class ModelConfig(_Strict):
    bundle: str | None = Field(default=None, description="a MONAI bundle folder: its network, weights and settings")
    nnunet: str | None = Field(default=None, description="an nnU-Net v2 results folder (Trainer__Plans__configuration)")
    fold: Fold | list[Fold] | None = Field(
        default=None, description="with nnunet: the fold whose weights run (fold_N), or a list: nnU-Net's ensemble of "
        "those folds; left out, the folder's only fold, else the ensemble of its numbered folds (nnUNetPredictor's)"
    )
    checkpoint: Literal["checkpoint_final.pth", "checkpoint_best.pth"] | None = Field(
        default=None, description="with nnunet: the checkpoint of the fold (checkpoint_final.pth)"
    )
    network: str = Field(
        default="", description='class in monai.networks.nets, or "package.module:Class" (not for TorchScript / .pt2)'
    )
    args: dict[str, Any] = Field(default_factory=dict)
    weights: str = Field(description="a state_dict or training checkpoint (weights_only=True), TorchScript or .pt2")

    @property
    def spatial_dims(self) -> int | None:
        return self.args.get("spatial_dims")


class Normalize(_Strict):
    """MONAI's ``NormalizeIntensity``: fixed ``mean`` / ``std`` (one per channel, or one for all), or ``mode:
    zscore`` with the mean and standard deviation of the whole (resampled) volume; ``nonzero``: only nonzero
    voxels are counted and normalized (``any``: in every channel the voxels nonzero in some channel, nnU-Net's
    ``use_mask_for_norm``)."""

    mode: Literal["fixed", "zscore"] = "fixed"
    mean: list[Float] | None = None
    std: list[Float] | None = None
    nonzero: bool | Literal["any"] = False
    channel_wise: bool = False

    @field_validator("nonzero", mode="wrap")
    @classmethod
    def _nonzero(cls, value: Any, handler) -> bool | str:
        """One line naming the three values: pydantic refused a wrong one once per member of ``bool | "any"``
        (``nonzero.bool: Input should be a valid boolean ... (and 1 more)``), naming neither ``any``."""
        try:
            return handler(value)
        except ValidationError:
            raise ValueError("true (each channel's nonzero voxels, MONAI's), false, or any (the voxels nonzero in "
                             "some channel, nnU-Net's)") from None

    @model_validator(mode="after")
    def _complete(self) -> Normalize:
        if self.mode == "zscore":
            if self.mean is not None or self.std is not None:
                raise ValueError("mode zscore computes mean and std from the volume; give neither")
            return self
        if self.mean is None or self.std is None:
            raise ValueError("give mean and std (one value per channel, or one for all), or mode: zscore")
        if self.channel_wise:
            raise ValueError("channel_wise applies to mode: zscore (fixed values are per channel already)")
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values but std has {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self

    @property
    def fixed(self) -> bool:
        return self.mode == "fixed"


class Intensity(_Strict):
    """MONAI's ``ScaleIntensityRange``: ``(x - a_min) / (a_max - a_min) * (b_max - b_min) + b_min``, clipped to
    ``[b_min, b_max]`` with ``clip``."""

    a_min: Float
    a_max: Float
    b_min: Float | None = None
    b_max: Float | None = None
    clip: bool = False

    @model_validator(mode="after")
    def _range(self) -> Intensity:
        if self.a_min == self.a_max:
            raise ValueError("a_min and a_max must differ")
        if (self.b_min is None) != (self.b_max is None):
            raise ValueError("give both b_min and b_max, or neither")
        if self.clip and self.b_min is None:
            raise ValueError("clip needs b_min and b_max")
        return self


AXIS_CODES = ("LR", "PA", "IS")


class Preprocess(_Strict):
    bands: Annotated[list[PositiveInt], Field(min_length=1)] | None = Field(  # [] was taken for all of them
        default=None, description="1-based band indexes (rasters)"
    )
    orientation: str | None = Field(default=None, description="volumes: MONAI Orientation axis codes, e.g. RAS")
    spacing: Float | list[Float] | None = Field(
        default=None, description="volumes: MONAI Spacing pixdim in mm (bilinear); 0 or less along an axis keeps the "
        "scan's spacing there, as MONAI's Spacing does"
    )
    intensity: Intensity | None = None
    normalize: Normalize | None = None
    crop: Literal["none", "nonzero"] = Field(
        default="none", description="volumes: nonzero predicts only the box of the voxels nonzero in some channel, "
        "outside it background (nnU-Net's crop_to_nonzero)"
    )

    @field_validator("orientation")
    @classmethod
    def _axis_codes(cls, value: str | None) -> str | None:
        if value is None:
            return value
        code = value.upper()
        axes = [next((i for i, pair in enumerate(AXIS_CODES) if c in pair), None) for c in code]
        if len(code) != 3 or None in axes or len(set(axes)) != 3:
            raise ValueError(f"three axis codes, one of L/R, P/A and I/S each, e.g. RAS or LPS (got {value!r})")
        return code

    @property
    def spacing_per_axis(self) -> tuple[float, ...] | None:
        if self.spacing is None:
            return None
        return tuple(self.spacing) if isinstance(self.spacing, list) else (float(self.spacing),) * 3

    @property
    def sees_another_grid(self) -> bool:
        """Whether the network sees another grid than the input's: resampled, or only a box of it."""
        return bool(self.orientation) or self.spacing is not None or self.crop != "none"


class Inference(_Strict):
    roi_size: list[PositiveInt]
    overlap: Overlap | list[Overlap] = 0.25
    mode: Literal["gaussian", "constant", "nnunet"] = Field(
        default="gaussian", description="the windows' weights: MONAI's gaussian or constant, or nnU-Net's gaussian"
    )
    sigma_scale: SigmaScale | list[SigmaScale] = 0.125
    batch_size: PositiveInt = 8
    device: str = "auto"
    backend: Literal["auto", "torch", "torch-mkldnn", "openvino", "onnxruntime"] = Field(
        default="auto", description="what runs the network: auto picks OpenVINO or torch-mkldnn on the CPU when it matches torch"
    )
    precision: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="the forward passes' precision: bfloat16 or float16 run under torch.autocast"
    )
    activation: Literal["softmax", "sigmoid", "none"] = "softmax"
    threshold: Annotated[float, NotBool, Field(gt=0.0, lt=1.0)] = 0.5
    tta: Literal["none", "flips"] | list[list[Annotated[int, NotBool, Field(ge=0)]]] = Field(
        default="none", description="test-time augmentation: flips (all axis flips) or a list of flips to add"
    )
    steps: Literal["monai", "nnunet"] = Field(
        default="monai", description="where windows start: monai (a stride of roi * (1 - overlap), the last one flush "
        "with the far edge) or nnunet (as many windows as a step of roi * (1 - overlap) needs, spread evenly)"
    )
    tta_mode: Literal["image", "patch"] = Field(
        default="image", description="image: each flip a sliding window over the flipped image, the activated results "
        "averaged; patch: nnU-Net v2's mirroring, each window's outputs averaged over its flips before weighting"
    )
    slice_axis: Annotated[int, NotBool, Field(ge=0, le=2)] | None = Field(
        default=None, description="a 2D model over a volume, slice by slice across this axis of the volume, as "
        "MONAI's SliceInferer(spatial_dim=...) runs it; roi_size, overlap, sigma_scale and tta are a slice's"
    )

    @property
    def window(self) -> tuple[int, ...]:
        """The windows' size on the image: ``roi_size``, and one voxel across slices at ``slice_axis``."""
        return tuple(_across_slices(self.slice_axis, self.roi_size, 1))

    @property
    def window_overlap(self) -> float | list[float]:
        """``overlap`` per axis of the image (none across slices: every slice is one window's)."""
        return _across_slices(self.slice_axis, self.overlap, 0.0) if isinstance(self.overlap, list) else self.overlap

    @property
    def window_sigma_scale(self) -> float | list[float]:
        """``sigma_scale`` per axis of the image (across slices a window of one voxel weighs 1 whatever it is)."""
        sigma = self.sigma_scale
        return _across_slices(self.slice_axis, sigma, 0.125) if isinstance(sigma, list) else sigma

    @property
    def window_flips(self) -> tuple[tuple[int, ...], ...]:
        """:attr:`flips` as axes of the image: a slice's axes are the image's other two."""
        if self.slice_axis is None:
            return self.flips
        in_slice = [axis for axis in range(3) if axis != self.slice_axis]
        return tuple(tuple(in_slice[axis] for axis in axes) for axes in self.flips)

    @property
    def flips(self) -> tuple[tuple[int, ...], ...]:
        """The passes averaged: the unflipped one first, then each flip (its sorted spatial axes)."""
        ndim = len(self.roi_size)
        if self.tta == "none":
            return ((),)
        if self.tta == "flips":
            return tuple(axes for n in range(ndim + 1) for axes in itertools.combinations(range(ndim), n))
        listed = [tuple(sorted(set(axes))) for axes in self.tta]
        return ((), *dict.fromkeys(a for a in listed if a))

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"must be auto, cpu, cuda or cuda:N (got {value!r})")

    @model_validator(mode="after")
    def _precision_in_torch(self) -> Inference:
        if self.precision != "float32" and self.backend not in ("auto", "torch"):
            raise ValueError(f"precision {self.precision} runs in torch (torch.autocast); backend {self.backend} "
                             "runs float32 only")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _threshold_of_a_sigmoid(self) -> Inference:
        if self.threshold != 0.5 and self.activation != "sigmoid":  # 0.5, the default: as a job's workflow.yaml has it
            raise ValueError(f"threshold {self.threshold:g} applies to activation: sigmoid; {self.activation} labels "
                             "each pixel by its largest output, and the threshold would be left unused")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _flip_axes(self) -> Inference:
        if isinstance(self.tta, list):
            bad = [a for axes in self.tta for a in axes if a >= len(self.roi_size)]
            if bad:
                sliced = "" if self.slice_axis is None else ("; with slice_axis a flip's axes are a slice's two, 0 "
                                                             "and 1, as roi_size's")  # fmt: skip
                raise ValueError(f"tta: axis {bad[0]} of a {len(self.roi_size)}D model (spatial axes count from 0)"
                                 f"{sliced}")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _slices(self) -> Inference:
        if self.slice_axis is not None and len(self.roi_size) != 2:
            raise ValueError(f"slice_axis runs a 2D model slice by slice: roi_size is a slice's window, 2 values "
                             f"(got {len(self.roi_size)})")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _per_axis_lengths(self) -> Inference:
        for name in ("overlap", "sigma_scale"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != len(self.roi_size):
                raise ValueError(f"{name} has {len(value)} values but roi_size has {len(self.roi_size)}")
        return self


def _across_slices(axis: int | None, values: list, across) -> list:
    """``values`` of a slice's axes with ``across`` inserted at ``axis`` (the axis across slices); ``values``
    without an axis."""
    return list(values) if axis is None else [*values[:axis], across, *values[axis:]]


VECTOR_SUFFIXES = (".gpkg", ".fgb", ".geojson", ".parquet")



DEFAULT_CHUNKS = 2048  # output.chunks: the pixels or voxels of a chunk along each axis


class Output(_Strict):
    path: str
    probabilities: Literal["none", "float32", "uint8"] = "none"
    chunks: PositiveInt | list[PositiveInt] = DEFAULT_CHUNKS
    vectors: str | None = Field(default=None, description="foreground classes as polygons (2D rasters)")
    quicklook: bool = Field(default=True, description="a PNG of the mask over the input beside the output (2D)")
    dicomweb: str | None = Field(default=None, description="a DICOMweb root to store a DICOM Segmentation on (STOW-RS)")
    seg_type: Literal["labelmap", "binary"] = Field(
        default="labelmap", description="a DICOM Segmentation's type: labelmap (a frame per slice, the newer Label "
        "Map Segmentation) or binary (a frame per slice and segment in it: viewers and PACS that predate label maps)"
    )  # fmt: skip
    grid: Literal["input", "model"] = Field(
        default="input", description="with preprocess.orientation / spacing: the input's grid, or the network's"
    )

    @model_validator(mode="after")
    def _dicom_segmentation(self) -> Output:
        segmentation = self.path.lower().endswith(".dcm")
        if segmentation and self.probabilities != "none":
            raise ValueError("a DICOM Segmentation (.dcm) holds labels: probabilities must be none")
        if self.seg_type != "labelmap" and not segmentation:
            raise ValueError(f"seg_type is a DICOM Segmentation's: output.path must end with .dcm (got {self.path})")
        if self.dicomweb is not None:
            if not segmentation:
                raise ValueError("dicomweb stores DICOM Segmentations: output.path must end with .dcm")
            if not self.dicomweb.startswith(("http://", "https://")):
                raise ValueError(f"dicomweb must be an http(s) URL (got {self.dicomweb!r})")
        return self

    @field_validator("path")
    @classmethod
    def _suffix(cls, value: str) -> str:
        # a Zarr named as a folder ("out/m.zarr/") is the Zarr: with the slash, its job folder was made inside it
        # first, and the output was refused as a folder tilemask did not write (an exploratory review)
        value = value.rstrip("/") or value
        fmt = for_output(value)  # ValueError naming the suffixes tilemask writes
        if is_remote(value):
            if fmt.name not in REMOTE_OUTPUT_FORMATS:
                raise ValueError(f"outputs on object storage are {' or '.join(REMOTE_OUTPUT_FORMATS)}; write {fmt.name} "
                                 f"to a file system the workers see (got {value!r})")  # fmt: skip
        elif value.startswith(REMOTE_PREFIXES):
            raise ValueError(f"outputs are written to a file system the workers see or to object storage (s3://), "
                             f"not over HTTP or GDAL's /vsi paths (got {value!r})")  # fmt: skip
        return only_stem_placeholder(value)

    @field_validator("vectors")
    @classmethod
    def _vector_suffix(cls, value: str | None) -> str | None:
        if value is not None and not value.lower().endswith(VECTOR_SUFFIXES):
            raise ValueError(f"suffix must be one of {', '.join(VECTOR_SUFFIXES)} (got {value!r})")
        return value if value is None else only_stem_placeholder(value)


CASE = "{case}"


class CaseChannels(_Strict):
    """One input per case, its channels read from several files on one grid (nnU-Net's ``case_0000``,
    ``case_0001``): ``{case}`` in each pattern stands for the case, found by globbing the first pattern."""

    channels: Annotated[list[str], Field(min_length=1)]

    @field_validator("channels")
    @classmethod
    def _one_case_each(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            if pattern.count(CASE) != 1 or pattern.replace(CASE, "").count("{"):
                raise ValueError(f"each pattern holds {CASE} once and no other placeholder (got {pattern!r})")
        return patterns


class ListInput(_Strict):
    """``input: {list: FILE}``: one path or URL a line (:mod:`tilemask.inputs`)."""

    list: str


class ArchiveInput(_Strict):
    """``input: {archive: FILE, members: GLOB}``: the members of a .zip / .tar / .tar.gz (:mod:`tilemask.inputs`)."""

    archive: str
    members: str = "*"


class StacInput(_Strict):
    """``input: {stac: FILE, assets: [...]}``: each STAC Item's assets as its bands (:mod:`tilemask.inputs`)."""

    stac: str
    assets: Annotated[list[str], Field(min_length=1)]


@dataclass(frozen=True)
class InputItem:
    """One input of a run: what ``{stem}`` becomes, and its files (several for a case read channel by channel);
    for a STAC Item's assets, the nodata value of each file's bands its ``raster:bands`` declares (None: the file's
    own mask)."""

    name: str
    files: tuple[str, ...]
    nodata: tuple[tuple[float, ...] | None, ...] = ()


def _under(path: str, folder: Path) -> str:
    """``path`` (``~`` expanded) made absolute against ``folder``, normalized."""
    p = Path(path).expanduser()
    return os.path.normpath(p if p.is_absolute() else folder / p)


NonEmpty = Annotated[str, Field(min_length=1)]  # an input path: "" was the workflow's own folder


class Workflow(_Strict):
    """A validated workflow, version 1 (see docs/DESIGN.md section 3)."""

    version: Annotated[Literal[1], NotBool]
    input: (NonEmpty | Annotated[list[NonEmpty], Field(min_length=1)] | CaseChannels | ListInput | ArchiveInput
            | StacInput)  # fmt: skip
    classes: list[str] | None = None
    model: ModelConfig
    preprocess: Preprocess = Field(default_factory=Preprocess)
    inference: Inference
    output: Output
    postprocess: PostprocessConfig | None = None
    stats: StatsConfig | None = None

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @field_validator("preprocess", mode="before")
    @classmethod
    def _empty_section(cls, value):
        """``preprocess:`` with nothing under it (its keys commented out) is the defaults, as an empty
        ``postprocess:`` or ``stats:`` is none: it was refused as "Input should be a valid dictionary or
        instance of Preprocess"."""
        return {} if value is None else value

    @model_validator(mode="after")
    def _consistent(self) -> Workflow:
        if self.stats is not None and for_output(self.output.path).name == "dicom-seg":
            raise ValueError("stats read the labels back: write .nii.gz (or another label output) to get them")
        spatial_dims = self.model.spatial_dims
        roi = self.inference.roi_size
        if self.inference.slice_axis is not None and spatial_dims not in (None, 2):
            raise ValueError(f"inference.slice_axis runs a 2D network slice by slice, but model.args.spatial_dims is "
                             f"{spatial_dims}: leave slice_axis out to run the {spatial_dims}D network over the volume "
                             f"(roi_size of {spatial_dims} values)")  # fmt: skip
        if spatial_dims is not None and len(roi) != spatial_dims:
            raise ValueError(
                f"inference.roi_size has {len(roi)} values but model.args.spatial_dims is {spatial_dims}"
            )
        image_dims = len(self.inference.window)  # the image's axes: a slice's two and the one across slices
        chunks = self.output.chunks
        if isinstance(chunks, list) and len(chunks) != image_dims:
            raise ValueError(f"output.chunks has {len(chunks)} values but the image has {image_dims} axes")
        out_channels = self.model.args.get("out_channels")
        if self.inference.activation == "sigmoid" and out_channels not in (None, 1):
            raise ValueError("inference.activation sigmoid needs model.args.out_channels: 1 (one binary class)")
        if self.inference.activation != "sigmoid" and out_channels == 1:
            raise ValueError(ONE_CHANNEL.format(self.inference.activation))
        if self.classes is not None and out_channels is not None and len(self.classes) != self.n_classes:
            raise ValueError(f"classes has {len(self.classes)} names but the model gives {self.n_classes} classes")
        if is_remote(self.output.path) and (self.output.vectors or self.stats is not None):
            raise ValueError("output.vectors and stats read the labels back from a local file system: write the "
                             "labels there, not to object storage")  # fmt: skip
        for key, path in (("output.vectors", self.output.vectors), ("stats.output", self.stats and self.stats.output)):
            if path and ("://" in path or path.startswith(REMOTE_PREFIXES)):  # Path("s3://b/x") is ./s3:/b/x
                raise ValueError(f"{key} is written to a file system the workers see; polygons and tables are not "
                                 f"written to object storage or over HTTP (got {path!r})")  # fmt: skip
        if image_dims != 2 and self.output.vectors:
            raise ValueError("output.vectors needs a 2D raster model (roi_size of 2 values, no slice_axis)")
        fmt = for_output(self.output.path)
        if image_dims not in fmt.spatial_dims:
            writers = [s for f in FORMATS if f.writable and image_dims in f.spatial_dims for s in f.suffixes]
            sliced = self.inference.slice_axis is not None
            slices = " (a 2D model slice by slice: its labels are a volume's)" if sliced else ""
            over = ", or set inference.slice_axis to run it over a volume's slices" if 3 in fmt.spatial_dims else ""
            raise ValueError(
                f"output.path {fmt.suffix(self.output.path)} holds {' or '.join(f'{d}D' for d in fmt.spatial_dims)} "
                f"images, this model is {image_dims}D{slices}; write to {', '.join(writers)}{over}"
            )
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("classes: names must be unique")
        for name in self.classes or ():
            problem = fmt.class_name_problem(name)
            if problem:
                raise ValueError(f"classes: {name!r} has {problem}")
        if self.stats and not self.stats.output.lower().endswith((".parquet", ".gpkg", ".csv", ".json")):
            raise ValueError(f"stats.output: suffix must be .parquet, .gpkg, .csv or .json (got {self.stats.output!r})")
        if self.inference.activation == "none" and self.output.probabilities == "uint8":
            raise ValueError("output.probabilities uint8 needs an activation (softmax or sigmoid)")
        preprocess = self.preprocess
        normalize, bands = preprocess.normalize, preprocess.bands
        if normalize and normalize.fixed and bands and len(normalize.mean) not in (1, len(bands)):
            raise ValueError(f"preprocess.normalize has {len(normalize.mean)} values but bands has {len(bands)}")
        if preprocess.sees_another_grid and image_dims != 3:
            raise ValueError("preprocess.orientation, spacing and crop apply to volumes: they need a 3D model (or a 2D "
                             "one with inference.slice_axis)")  # fmt: skip
        if isinstance(preprocess.spacing, list) and len(preprocess.spacing) != 3:
            raise ValueError(f"preprocess.spacing has {len(preprocess.spacing)} values; a volume has 3 axes")
        if self.output.grid == "model" and not preprocess.orientation and preprocess.spacing is None:
            raise ValueError("output.grid: model needs preprocess.orientation or spacing (else it is the input grid)")
        if self.output.grid == "model" and preprocess.crop != "none":
            raise ValueError("preprocess.crop needs output.grid: input (the box it predicts depends on the data)")
        if self.output.grid == "model" and fmt.name == "dicom-seg":
            raise ValueError("a DICOM Segmentation refers to the scan's slices: output.grid must be input")
        return self

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: str | list[str] | tuple[str, ...] = ()) -> Workflow:
        """Read, override (``key.path=value``, YAML values) and validate a workflow file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")  # YAML 1.2's encoding, whatever the locale
        except OSError as exc:
            raise WorkflowError(f"cannot read workflow {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise WorkflowError(f"workflow {path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
        try:
            raw = load_yaml(text, f"workflow {path}")
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or "invalid YAML"
            raise WorkflowError(f"workflow {path}{where}: {problem}") from None
        if not isinstance(raw, dict):
            raise WorkflowError(f"workflow {path}: expected a mapping of keys, got {type(raw).__name__}")
        return cls.from_dict(raw, overrides, base_dir=path.resolve().parent)

    @classmethod
    def from_dict(
        cls, raw: dict, overrides: list[str] | tuple[str, ...] = (), base_dir: str | Path | None = None
    ) -> Workflow:
        if not isinstance(raw, dict):  # yaml.safe_load of an empty file is None
            raise WorkflowError(f"workflow: expected a mapping of keys, got {type(raw).__name__}")
        raw = apply_overrides(raw, overrides)
        base = Path(base_dir) if base_dir else Path.cwd()
        model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
        bundle = model.get("bundle")
        if model.get("nnunet") is not None:
            raw = _with_nnunet(raw, model, base)
        elif model.get("fold") is not None or model.get("checkpoint") is not None:  # a saved workflow has them null
            raise WorkflowError("model.fold and model.checkpoint choose an nnU-Net fold's weights: give model.nnunet")
        if isinstance(bundle, str):
            from .bundle import bundle_defaults, merge

            folder = Path(bundle).expanduser()
            folder = folder if folder.is_absolute() else base / folder
            if folder.is_file() and zipfile.is_zipfile(folder):
                raise WorkflowError(f"model.bundle: {folder} is a zip file (a Model Zoo download): unzip it and "
                                    "give the folder it holds")  # fmt: skip
            if not folder.is_dir():
                raise WorkflowError(f"model.bundle: no such folder {folder}")
            raw = merge(bundle_defaults(folder, raw), raw)
        try:
            workflow = cls.model_validate(raw)
        except ValidationError as exc:
            raise WorkflowError(_one_line(exc, raw, overrides)) from None
        workflow._base_dir = base
        return workflow

    # -- derived values ------------------------------------------------------------------------

    @property
    def n_classes(self) -> int:
        """Classes the workflow declares (2 for a one-channel sigmoid, else out_channels); the network has the
        last word (:func:`tilemask.planning.classes_of`)."""
        out_channels = self.model.args.get("out_channels", len(self.classes or []) or 2)
        return 2 if self.inference.activation == "sigmoid" else int(out_channels)

    @property
    def base_dir(self) -> Path:
        """The folder relative paths resolve against (the workflow file's)."""
        return self._base_dir

    def resolve(self, path: str) -> str:
        """A path from the workflow, made absolute against the workflow's folder (URLs kept; a relative archive's
        ``/vsizip/scenes.zip/a.tif`` made absolute too)."""
        if path.startswith(("/vsizip/", "/vsitar/")):
            from .sources.archive import member_under

            return member_under(path, str(self._base_dir))
        if path.startswith(REMOTE_PREFIXES):
            return path
        return _under(path, self._base_dir)

    def _pattern(self, path: str) -> str:
        """A local glob from the workflow, made absolute as :meth:`resolve` does, with the workflow's folder taken
        literally: a project folder named "Survey [2024]" is no character class."""
        return _under(path, Path(glob.escape(str(self._base_dir))))

    def input_items(self) -> list[InputItem]:
        """The inputs, globs expanded (sorted), in order; cases of ``input.channels`` by case name."""
        from . import inputs

        given = self.input
        if isinstance(given, CaseChannels):
            return self._cases(given.channels)
        if isinstance(given, ListInput):
            return inputs.list_items(self.resolve(inputs.local_path(given.list, "input.list")))
        if isinstance(given, ArchiveInput):
            return inputs.archive_items(self.resolve(inputs.local_path(given.archive, "input.archive")), given.members)
        if isinstance(given, StacInput):
            return inputs.stac_items(self.resolve(inputs.local_path(given.stac, "input.stac")), given.assets)
        return [InputItem(inputs.input_name(path), (path,)) for path in self.input_paths()]

    def _cases(self, patterns: list[str]) -> list[InputItem]:
        first = self.resolve(patterns[0])
        found = re.compile(re.escape(first).replace(re.escape(CASE), "(.+)") + "$")
        matches = glob.glob(self._pattern(patterns[0]).replace(CASE, "*"))
        cases = sorted({m.group(1) for p in matches if (m := found.match(p))})
        if not cases:
            raise WorkflowError(f"input.channels: no file matches {patterns[0]!r}")
        items = []
        for case in cases:
            files = tuple(self.resolve(p.replace(CASE, case)) for p in patterns)
            missing = [f for f in files if not f.startswith(REMOTE_PREFIXES) and not os.path.exists(f)]
            if missing:
                raise InputError(f"input.channels: case {case!r} has no {missing[0]}")
            items.append(InputItem(case, files))
        return items

    def input_paths(self) -> list[str]:
        """The inputs given as paths, globs expanded (sorted), in order (cases: :meth:`input_items`)."""
        if not isinstance(self.input, (str, list)):
            return [f for item in self.input_items() for f in item.files]
        items = [self.input] if isinstance(self.input, str) else list(self.input)
        paths: list[str] = []
        for item in items:
            resolved = self.resolve(item)
            remote = resolved.startswith(REMOTE_PREFIXES)
            if not remote and glob.has_magic(item) and not os.path.exists(resolved):  # a file that exists is itself
                matches = sorted(glob.glob(self._pattern(item), recursive=True))  # "**": any depth, as in a shell
                if not matches:
                    raise WorkflowError(f"input: no file matches {item!r}")
                paths.extend(self._not_outputs(matches, item))
            elif remote and "*" in resolved.split("?", 1)[0]:
                raise WorkflowError(f"input: {item!r}: a glob is expanded on the local file system only; list the "
                                    "remote files in input.list")  # fmt: skip
            else:
                paths.append(resolved)
        return paths

    def _not_outputs(self, matches: list[str], pattern: str) -> list[str]:
        """The files a glob matched less this workflow's own outputs of them (labels, probabilities, a COG's
        ``.aux.xml``, quick look, polygons): outputs written beside the inputs would be the next run's inputs."""
        folders = {os.path.dirname(os.path.normpath(m)) for m in matches}
        output_folder = os.path.normpath(os.path.dirname(self.output_path("x")))
        if "{stem}" not in os.path.dirname(self.output.path) and output_folder not in folders:
            return matches  # the outputs go to a folder the glob does not reach (the usual case: no cost per file)
        from .inputs import visible

        owners: dict[str, set[str]] = {}  # output file -> the matches it is an output of
        for match in matches:
            name = visible(stem(match))
            labels = self.output_path(name)
            products = [self.quicklook_path(name), self.vectors_path(name)]
            outputs = for_output(labels).files(labels, probabilities=True)
            sidecars = [f"{path}.aux.xml" for path in outputs] if for_output(labels).gdal_raster else []  # GDAL's
            for path in [*outputs, *sidecars, *filter(None, products)]:
                owners.setdefault(os.path.normpath(path), set()).add(os.path.normpath(match))
        # an output of itself (output.path is the input) stays: planning refuses it by name
        kept = [m for m in matches if not owners.get(os.path.normpath(m), set()) - {os.path.normpath(m)}]
        if len(kept) < len(matches):
            logger.info("input %r: %d file(s) it matches are this workflow's outputs, not inputs", pattern,
                        len(matches) - len(kept))  # fmt: skip
        return kept

    def output_path(self, name: str) -> str:
        """``output.path`` with ``{stem}`` replaced by an input's name (:attr:`InputItem.name`)."""
        return self.resolve(self.output.path.format(stem=name))

    def stats_for(self, name: str) -> StatsConfig | None:
        """The ``stats:`` section with ``{stem}`` filled in and paths resolved."""
        if self.stats is None:
            return None
        regions = self.stats.regions
        return self.stats.model_copy(
            update={
                "output": self.resolve(self.stats.output.format(stem=name)),
                "regions": self.resolve(regions.format(stem=name)) if regions else None,
                "classes": self.stats.classes,  # else the network's, once probed (planning)
            }
        )

    def quicklook_path(self, name: str) -> str:
        """The quick look's PNG: beside the labels, named as they are (``scene_mask.ome.zarr`` -> ``scene_mask.png``)."""
        labels = self.output_path(name).rstrip("/")
        return os.path.join(os.path.dirname(labels), stem(labels) + ".png")

    def vectors_path(self, name: str) -> str | None:
        return self.resolve(self.output.vectors.format(stem=name)) if self.output.vectors else None

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``--set key.path=value`` overrides (values parsed as YAML) to a raw workflow dict; one override may be
    given alone, as a string (Python's ``overrides="k=v"`` was taken a letter at a time)."""
    raw = _deep_copy(raw)
    where = "--set" if on_command_line() else "overrides"  # each refusal in the caller's words
    for item in [overrides] if isinstance(overrides, str) else overrides:
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise WorkflowError(f"{where} {item!r}: expected KEY=VALUE, e.g. output.chunks=1024")
        try:
            parsed = load_yaml(value, f"{where} {key}")
        except yaml.YAMLError:
            raise WorkflowError(f"{where} {key}: value {value!r} is not valid YAML") from None
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise WorkflowError(f"{where} {key}: {part} is not a section")
            node = child
        node[parts[-1]] = parsed
    return raw


def load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load``, refusing aliases that expand to more than MAX_ALIAS_EXPANSION values.

    PyYAML builds an aliased collection once and shares it, so a 1 kB "billion
    laughs" loads at once; it is the first copy or validation of it that expands
    it to ~10**9 values (minutes, gigabytes).  The node graph is measured first,
    each node counted once (memoised by id), so the check costs the size of the file.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        distinct, expanded = _node_counts(node, where)
        if expanded - distinct > MAX_ALIAS_EXPANSION:
            raise WorkflowError(
                f"{where}: YAML aliases expand it to {expanded:,} values (at most {MAX_ALIAS_EXPANSION:,} "
                "more than written); refused"
            )
        return loader.construct_document(node)
    except RecursionError:  # PyYAML composes and constructs recursively
        raise WorkflowError(f"{where}: nested too deeply") from None
    finally:
        loader.dispose()


def _node_counts(root: yaml.Node, where: str) -> tuple[int, int]:
    """(distinct nodes, nodes once every alias is expanded) of a composed YAML document."""
    expanded: dict[int, int] = {}
    open_nodes: set[int] = set()  # the collections being counted: the ancestors of the current node
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # depth first, without recursion (a deep document would exhaust Python's stack)
        node, children_counted = stack.pop()
        children = _children(node)
        if children_counted:
            open_nodes.discard(id(node))
            expanded[id(node)] = 1 + sum(expanded[id(child)] for child in children)
        elif id(node) in open_nodes:
            raise WorkflowError(f"{where}: a YAML alias refers to a collection that holds it (recursive); refused")
        elif id(node) not in expanded:
            _unique_keys(node, where)
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in children)
    return len(expanded), expanded[id(root)]


def _unique_keys(node: yaml.Node, where: str) -> None:
    """Refuse a mapping that gives a key twice: YAML keys are unique, and PyYAML keeps the last without a word."""
    if not isinstance(node, yaml.MappingNode):
        return
    first: dict[tuple[str, str], int] = {}
    for index, (key, value) in enumerate(node.value):
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":  # ``<<`` merges may repeat
            continue
        at = first.setdefault((key.tag, key.value), index)
        if at != index:  # by place, not identity: two aliases of one scalar are one node (marked at its anchor)
            (seen, seen_value), again = node.value[at], (key if key is not node.value[at][0] else value)
            seen = seen if seen is not key else seen_value
            raise WorkflowError(f"{where} line {again.start_mark.line + 1}: {key.value} given twice (first on line "
                                f"{seen.start_mark.line + 1})")  # fmt: skip


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [item for pair in node.value for item in pair]
    return []


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _is_union_tag(part: Any) -> bool:
    """pydantic names the union member that failed (``float``, ``list[float]``, ``ListInput``) in the location."""
    return isinstance(part, str) and (
        part in ("int", "float", "str") or "[" in part or "constrained" in part or part in _model_names()
    )


@functools.cache
def _model_names() -> frozenset[str]:
    """The class names of the workflow's models, as pydantic names a union's members."""
    names, todo = set(), [Workflow]
    while todo:
        model = todo.pop()
        if model.__name__ not in names:
            names.add(model.__name__)
            todo += [m for field in model.model_fields.values() for m in _models_in(field.annotation)]
    return frozenset(names)


def _with_nnunet(raw: dict, model: dict, base: Path) -> dict:
    """``raw`` over the defaults read from ``model.nnunet``'s nnU-Net results folder (:mod:`tilemask.nnunet`)."""
    from .bundle import merge
    from .nnunet import CHECKPOINTS, nnunet_defaults

    folder, fold, checkpoint = model["nnunet"], model.get("fold"), model.get("checkpoint")
    if not isinstance(folder, str):
        raise WorkflowError(f"model.nnunet: a folder path (got {folder!r})")
    if model.get("bundle") is not None:
        raise WorkflowError("model: give bundle or nnunet, not both")
    listed = fold if isinstance(fold, list | tuple) else [] if fold is None else [fold]  # -f 0 1 2 3 4: an ensemble
    for one in listed:
        if one != "all" and (isinstance(one, bool) or not isinstance(one, int) or one < 0):
            raise WorkflowError(f"model.fold: a fold number (0, 1, ...), all, or a list of them (got {fold!r})")
    if isinstance(fold, list | tuple) and (not fold or len(set(map(str, fold))) < len(fold)):
        raise WorkflowError(f"model.fold: a list of one or more different folds (got {list(fold)})")
    if checkpoint is not None and checkpoint not in CHECKPOINTS:
        raise WorkflowError(f"model.checkpoint: {' or '.join(CHECKPOINTS)} (got {checkpoint!r})")
    path = Path(folder).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_dir():
        raise WorkflowError(f"model.nnunet: no such folder {path}")
    given = model.get("weights")  # its own checkpoint: its mirroring axes, and no fold_N needed
    weights = Path(given).expanduser() if isinstance(given, str) and not given.startswith(REMOTE_PREFIXES) else None
    if weights is not None:
        weights = weights if weights.is_absolute() else base / weights
        chosen = fold is not None or checkpoint is not None
        if chosen and weights != _fold_checkpoint(path, fold, checkpoint):  # a job's workflow.yaml has both
            raise WorkflowError("model.fold and model.checkpoint choose the folder's checkpoint: give them or "
                                "model.weights, not both")  # fmt: skip
        if not weights.is_file():
            raise WorkflowError(f"model.weights: no such file {weights}")
        weights = None if chosen else weights  # the fold's own: read again, with an ensemble's other folds
    defaults = nnunet_defaults(path, fold, checkpoint, weights)
    output = raw.get("output") if isinstance(raw.get("output"), dict) else {}
    if output.get("grid") == "model":  # its box depends on the data, as would the grid written: the whole scan
        del defaults["preprocess"]["crop"]
    return merge(defaults, raw)


def _fold_checkpoint(folder: Path, fold, checkpoint: str | None) -> Path | None:
    """The checkpoint ``fold`` and ``checkpoint`` choose in the nnU-Net results folder ``folder`` (an ensemble's
    first), or None where they choose none."""
    from .nnunet import fold_checkpoints

    try:
        return fold_checkpoints(folder, fold, checkpoint)[0]
    except WorkflowError:
        return None


def _one_line(exc: ValidationError, raw: Any = None, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """The first invalid key as ``workflow: key.path: message``. A misspelt key's hint may name a key the workflow
    gives where ``--set`` (``overrides``) misspelt it: ``--set outptu.path=...`` meant the workflow's ``output``.

    pydantic reports a value that fits no member of a union once per member; the
    member of the value's own kind (a list for a list) says what is wrong.
    """
    # a typo is an unknown key and a missing one: the unknown key first, unless it is one of a union's members'
    # errors (``input``: a key unknown to one kind of input is another kind's)
    errors = sorted(exc.errors(), key=lambda e: not (e["type"] == "extra_forbidden" and not _in_union(e["loc"])))
    key = _clean_loc(errors[0]["loc"])
    same_key = [e for e in errors if _clean_loc(e["loc"])[: len(key)] == key]
    err = same_key[0]
    if isinstance(err.get("input"), list):
        err = next((e for e in same_key if any("list" in str(p) for p in e["loc"])), err)
    elif isinstance(err.get("input"), dict):
        err = _kind_that_fits(same_key) or err
    key = _clean_loc(err["loc"])
    loc = ".".join(key)
    msg = err["msg"].removeprefix("Value error, ")
    overridden = any(tuple(item.partition("=")[0].split("."))[: len(key)] == key for item in overrides)
    given = set() if overridden else _given(raw, key[:-1])
    meant = _meant(key, errors, given) if err["type"] == "extra_forbidden" else None
    if err["type"] == "extra_forbidden" and key[-1] in _keys_at(key[:-1]):  # a key of the union's other kinds
        msg = f"not a key of the same kind of {key[-2] if len(key) > 1 else 'workflow'} as the others given"
    elif err["type"] == "extra_forbidden":
        msg = "unknown key" + (f"; did you mean {meant!r}?" if meant else "")
    elif err["type"] == "missing":
        msg = "missing key"
    elif err.get("input") is not None and loc and "(got" not in msg and not isinstance(err["input"], dict):
        msg = f"{msg} (got {err['input']!r})"
    hinted = key[:-1] + (meant,)  # the missing key the hint names is not one more error
    others = sorted({".".join(_clean_loc(e["loc"])[:1]) or "workflow" for e in errors
                     if e not in same_key and _clean_loc(e["loc"]) != hinted})  # fmt: skip
    more = f" (and {len(others)} more, at {', '.join(others[:3])}{', ...' if len(others) > 3 else ''})" if others else ""
    return f"workflow: {loc + ': ' if loc else ''}{msg}{more}"


def _kind_that_fits(errors: list) -> dict | None:
    """A mapping given where a union takes several kinds of mapping (``input``): the first error of the kind
    with the fewest (an unknown key before the others), else None when no kind is a mapping."""
    by_kind: dict[str, list] = {}
    for e in errors:
        kind = next((p for p in e["loc"] if p in _model_names()), None)
        if kind is not None:
            by_kind.setdefault(kind, []).append(e)
    if not by_kind:
        return None
    fewest = min(map(len, by_kind.values()))
    best = [e for kind_errors in by_kind.values() if len(kind_errors) == fewest for e in kind_errors]
    return next((e for e in best if e["type"] == "extra_forbidden"), best[0])


def _in_union(loc: tuple) -> bool:
    """Whether pydantic's location names a union member (a class, ``list[str]``, ...) on its way."""
    return any(_is_union_tag(p) for p in loc)


def _meant(key: tuple[str, ...], errors: list, given: set[str] = frozenset()) -> str | None:
    """The key a misspelt one likely meant: the closest of the keys missing beside it, then of the keys its
    section takes and the workflow does not already give (``given``), else None."""
    import difflib

    missing = [_clean_loc(e["loc"])[-1] for e in errors
               if e["type"] == "missing" and _clean_loc(e["loc"])[:-1] == key[:-1]]  # fmt: skip
    known = [k for k in _keys_at(key[:-1]) if k not in given]
    close = difflib.get_close_matches(key[-1], missing, n=1) or difflib.get_close_matches(key[-1], known, n=1)
    return close[0] if close else None


def _given(raw: Any, section: tuple[str, ...]) -> set[str]:
    """The keys the raw workflow gives at ``section`` (empty where it is not a mapping)."""
    for part in section:
        if isinstance(raw, dict):
            raw = raw.get(part)
        elif isinstance(raw, list) and part.isdigit() and int(part) < len(raw):
            raw = raw[int(part)]
        else:
            return set()
    return set(raw) if isinstance(raw, dict) else set()


def _keys_at(section: tuple[str, ...]) -> list[str]:
    """The keys the workflow takes at ``section`` (``()``: the top level; ``("inference",)``), from its models;
    list indexes on the way are stepped over."""
    models: list[type[BaseModel]] = [Workflow]
    for part in section:
        inner = [m for model in models if part in model.model_fields for m in _models_in(model.model_fields[part].annotation)]
        models = inner or (models if part.isdigit() else [])
    return list(dict.fromkeys(name for model in models for name in model.model_fields))


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's type holds: itself, or the members of a union, list, dict or Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _clean_loc(loc: tuple) -> tuple[str, ...]:
    return tuple(str(p) for p in loc if not _is_union_tag(p))
