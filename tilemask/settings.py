"""The frozen values stages hand each other: what identifies a model, how to predict, how to finish a chunk.

No imports beyond the standard library: workers, the planner and the pure-numpy
finalizer all use them without pulling each other in.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from typing import Any

ENSEMBLE = "_ensemble"  # model.args: an ensemble's other checkpoints (nnU-Net's folds), averaged with the weights'


@dataclass(frozen=True)
class ModelSpec:
    """What identifies a model: network class, its arguments (canonical JSON) and the weights path."""

    network: str
    args_json: str
    weights: str
    weights_stamp: tuple[int, int] = (0, 0)  # (mtime_ns, size): retrained weights are a new model
    slice_axis: int | None = None  # a 2D network run over a volume's slices across this axis (SliceInferer's)
    ensemble_stamps: tuple[tuple[int, int], ...] = ()  # the weights_stamp of each of args._ensemble's checkpoints

    @classmethod
    def create(cls, network: str, args: dict[str, Any], weights: str, slice_axis: int | None = None) -> ModelSpec:
        stamps = tuple(_stamp(path) for path in args.get(ENSEMBLE) or ())
        return cls(network, json.dumps(args, sort_keys=True), weights, _stamp(weights), slice_axis, stamps)

    @property
    def weight_files(self) -> tuple[str, ...]:
        """Every checkpoint the model reads: its weights, then an ensemble's others (``args._ensemble``: nnU-Net's
        folds, the same network with each one's weights, their outputs averaged)."""
        return (self.weights, *self.args.get(ENSEMBLE, ()))

    @property
    def weight_stamps(self) -> tuple[tuple[int, int], ...]:
        """``weights_stamp`` of each of :attr:`weight_files`."""
        return (self.weights_stamp, *self.ensemble_stamps)

    @property
    def args(self) -> dict[str, Any]:
        return json.loads(self.args_json)

    @property
    def archive(self) -> str:
        """What the weights file is: ``torchscript`` (torch.jit.save), ``exported`` (torch.export.save, ``.pt2``:
        a ``archive_format`` member) or ``state_dict`` (anything else: a checkpoint read with weights_only)."""
        try:
            with zipfile.ZipFile(self.weights) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "state_dict"
        if any(name.endswith("/archive_format") for name in names):
            return "exported"
        if any("/code/" in name for name in names):
            return "torchscript"
        return "state_dict"

    @property
    def carries_network(self) -> bool:
        """TorchScript and exported programs hold their network: ``model.network`` is not needed."""
        return self.archive != "state_dict"


MEASURE_AFTER_SECONDS = 15.0
"""How long the jobs of a network at a roi on a machine would take in torch, together, before
``inference.backend: auto`` measures the backends it has no cached verdict for
(:func:`tilemask.backends.settle_auto`): a first run of 4 scenes of 512^2 with a UNet 16-128 took 11.5 s
measuring them, 4.6 s once measured (README, "auto measures once it can repay it")."""


def measure_after_seconds() -> float:
    """:data:`MEASURE_AFTER_SECONDS`, or ``TILEMASK_AUTO_MEASURE_AFTER`` where the run starts (0: measure for any
    job)."""
    value = os.environ.get("TILEMASK_AUTO_MEASURE_AFTER", "").strip()
    if not value:
        return MEASURE_AFTER_SECONDS
    try:
        return float(value)
    except ValueError:
        from .errors import UsageError

        raise UsageError(f"TILEMASK_AUTO_MEASURE_AFTER={value!r}: not a number of seconds") from None


@dataclass(frozen=True)
class InferenceSettings:
    """What a worker needs to predict a block's windows (per-axis tuples)."""

    roi: tuple[int, ...]
    mode: str = "gaussian"
    sigma_scale: float | tuple[float, ...] = 0.125
    batch_size: int = 8
    device: str = "auto"
    flips: tuple[tuple[int, ...], ...] = ((),)  # test-time augmentation: the spatial axes each pass flips
    tta_mode: str = "image"  # image: a blend per flip, each on its own grid | patch: one, the flips' outputs averaged
    backend: str = "auto"  # auto | torch | torch-mkldnn | openvino | onnxruntime (tilemask.backends)
    precision: str = "float32"  # float32 | bfloat16 | float16: the forward passes under torch.autocast
    measure: bool = True  # auto may measure the backends it has no verdict for (a job too small to repay it: not)

    @property
    def blends(self) -> int:
        """How many blends the sums hold: one per flip (``tta_mode: image``), or one (``patch``: nnU-Net v2's
        mirroring averages each window's outputs over its flips, on one grid of windows)."""
        return 1 if self.tta_mode == "patch" else len(self.flips)


@dataclass(frozen=True)
class Finishing:
    """What a chunk task does after blending (see :mod:`tilemask.finalize`)."""

    activation: str
    threshold: float
    n_classes: int
    labels_dtype: str
    probabilities: str  # none | float32 | uint8
    nodata: int | None = None  # label of invalid input pixels

    def needs_weights(self, blends: int) -> bool:
        """Whether a chunk needs the sums of its windows' weights besides the weighted sums: to divide by them
        (probabilities, the mean of several ``blends``) or to compare a sigmoid's sums with its threshold.  Labels
        by argmax need only the weighted sums (:func:`tilemask.finalize.labels_from_sums`), so the blocks of such
        a job add up no weights (a third of the sums of a 2-class network)."""
        return self.probabilities != "none" or blends > 1 or self.activation == "sigmoid"


def _stamp(path: str) -> tuple[int, int]:
    try:
        stat = os.stat(path)
    except OSError:
        return (0, 0)
    return (stat.st_mtime_ns, stat.st_size)
