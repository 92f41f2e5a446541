"""Weighted sums -> labels, probabilities and the class histogram of one chunk (pure numpy).

``sum(w * pred) / sum(w)`` is the blended network output; the activation
(softmax over channels, or a one-channel sigmoid) gives probabilities; labels
are their argmax, or ``p >= threshold`` for a sigmoid.  Invalid input pixels
(nodata, masked, NaN) get the ``nodata`` label and zero probabilities, and are
counted in no class.

Ties: where two classes' blended outputs differ by float32 summation noise,
the label may differ between worker layouts (torch's thread count changes the
order of its sums).  README, "Ties", says how large that margin is.
"""

from __future__ import annotations

import numpy as np

from .settings import Finishing

FEW_CLASSES = 16  # up to this many classes, class_histogram compares instead of counting with bincount


def finalize(
    weighted: np.ndarray, weights: np.ndarray | None, valid: np.ndarray | None, finishing: Finishing
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``(labels, encoded probabilities or None, pixels per class)`` of one chunk; ``weighted`` is consumed.

    ``weights`` has one plane per flip of test-time augmentation (one without it); None where the finishing needs
    none (:meth:`~tilemask.settings.Finishing.needs_weights`).
    """
    if finishing.probabilities != "none" or (weights is not None and weights.shape[0] > 1):
        return finish_probabilities(blend(weighted, weights, finishing.activation), valid, finishing)
    dtype = np.dtype(finishing.labels_dtype)
    labels = labels_from_sums(weighted, None if weights is None else weights[0], finishing.activation,
                              finishing.threshold, dtype)  # fmt: skip
    return with_invalid(labels, None, valid, finishing)


def finish_probabilities(
    probabilities: np.ndarray, valid: np.ndarray | None, finishing: Finishing
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """:func:`finalize` from activated probabilities (or blended outputs, no activation); modifies them."""
    labels = to_labels(probabilities, finishing.activation, finishing.threshold, np.dtype(finishing.labels_dtype))
    encoded = None if finishing.probabilities == "none" else encode_probabilities(probabilities, finishing.probabilities)
    return with_invalid(labels, encoded, valid, finishing)


def with_invalid(
    labels: np.ndarray, encoded: np.ndarray | None, valid: np.ndarray | None, finishing: Finishing
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``(labels, encoded, pixels per class)`` with invalid pixels given the nodata label and zero
    probabilities (in place), counted in no class."""
    if valid is not None:
        labels[~valid] = finishing.nodata
        if encoded is not None:
            encoded[:, ~valid] = 0
    return labels, encoded, class_histogram(labels, finishing.n_classes, finishing.nodata)


def blend(weighted: np.ndarray, weights: np.ndarray, activation: str) -> np.ndarray:
    """The activated blend of the windows; with test-time augmentation by flipped images (``tta_mode: image``),
    each flip's, averaged (the mean of MONAI's activated sliding-window results over the flips)."""
    flips = weights.shape[0]
    per_flip = weighted.reshape(flips, -1, *weights.shape[1:])
    per_flip /= weights[:, None]
    if flips == 1:
        return activate(per_flip[0], activation)
    total = activate(per_flip[0], activation).copy()
    for one in per_flip[1:]:
        total += activate(one, activation)
    total /= np.float32(flips)
    return total


def activate(blended: np.ndarray, activation: str) -> np.ndarray:
    if activation == "softmax":
        from scipy.special import softmax  # here, not at the top: the client never activates (0.12 s of import)

        return softmax(blended, axis=0).astype(np.float32, copy=False)
    if activation == "sigmoid":
        from scipy.special import expit  # no "overflow encountered in exp" of a logit under -88, as 1 / (1 + exp(-x))

        return expit(blended).astype(np.float32, copy=False)
    return blended


def labels_from_sums(
    weighted: np.ndarray, weights: np.ndarray | None, activation: str, threshold: float, dtype: np.dtype
) -> np.ndarray:
    """Labels straight from the sums, when no probabilities are written.

    ``sum(w) > 0`` scales every channel of a pixel alike and softmax is monotonic,
    so ``argmax`` of the sums is ``argmax`` of the probabilities; for a sigmoid,
    ``sigmoid(z) >= t`` is ``z >= logit(t)``, i.e. ``sum(w*z) >= logit(t) * sum(w)``.
    This skips a division and an exponential per voxel and channel; by argmax, ``weights`` are not needed (None).
    """
    if activation == "sigmoid":
        return (weighted[0] >= np.float32(np.log(threshold / (1.0 - threshold))) * weights).astype(dtype)
    return argmax_labels(weighted, dtype)


def to_labels(probabilities: np.ndarray, activation: str, threshold: float, dtype: np.dtype) -> np.ndarray:
    """Class per voxel: argmax over channels, or ``p >= threshold`` for a one-channel sigmoid."""
    if activation == "sigmoid":
        return (probabilities[0] >= threshold).astype(dtype)
    return argmax_labels(probabilities, dtype)


def argmax_labels(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``np.argmax(values, axis=0).astype(dtype)``, one pass per channel: numpy's argmax over the first axis
    copies the array transposed and returns int64 (50 ms for a 2-class 2048^2 chunk here).  Each channel
    moves the label up by arithmetic, not by masked assignment, whose branches mispredict where classes
    interleave (3 ms against 23 ms for a 2-class 2048^2 chunk of noise).  The first of equal maxima wins, as in
    numpy; pixels with a NaN in any channel go to numpy's own argmax."""
    labels = np.zeros(values.shape[1:], dtype)
    best = values[0].copy()
    above = np.empty(values.shape[1:], bool)
    step = np.empty(values.shape[1:], dtype)
    for channel in range(1, values.shape[0]):
        np.greater(values[channel], best, out=above)
        np.subtract(channel, labels, out=step, casting="unsafe")  # labels < channel: no wrap-around
        step *= above
        labels += step  # channel where above, else unchanged
        np.maximum(best, values[channel], out=best)  # NaN spreads into best, so its pixels are found below
    unordered = np.isnan(best)
    if unordered.any():
        labels[unordered] = np.argmax(values[:, unordered], axis=0)
    return labels


def encode_probabilities(probabilities: np.ndarray, kind: str) -> np.ndarray:
    """float32 as is, or uint8 as ``round(p * 255)``."""
    if kind == "uint8":
        return np.rint(np.clip(probabilities, 0.0, 1.0) * 255.0).astype(np.uint8)
    return probabilities.astype(np.float32, copy=False)


def class_histogram(labels: np.ndarray, n_classes: int, nodata: int | None) -> np.ndarray:
    """Pixels per class, nodata left out.  For a few classes, one comparison per class (0.4 ms for a 2048^2
    chunk of two classes here, against 10 ms for ``np.bincount``, which copies the labels to int64)."""
    if n_classes > FEW_CLASSES:
        counted = labels if nodata is None else labels[labels != nodata]
        return np.bincount(counted.ravel(), minlength=n_classes)[:n_classes]
    return np.array([0 if c == nodata else np.count_nonzero(labels == c) for c in range(n_classes)], np.int64)

