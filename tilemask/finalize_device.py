"""A chunk added, blended and labelled on the device that holds its block's sums: only the labels (and the
probabilities, when they are written) come back to the host.

:mod:`tilemask.finalize`'s arithmetic in torch, on this Dask thread's stream (:mod:`tilemask.device`): the
block's own sums (:class:`~tilemask.stitch.DevicePartial`) after the compute stream's event, its neighbours'
parts uploaded from the host.  Invalid pixels get the nodata label (and zero probabilities) on the host, where
their mask is, and the class histogram is counted there (:func:`tilemask.finalize.with_invalid`).
"""

from __future__ import annotations

import numpy as np
import torch

from .device import on_thread_stream, to_host
from .finalize import with_invalid
from .geometry import Region
from .settings import Finishing
from .stitch import DevicePartial, Partial, overlap_add


def finish_on_device(
    chunk: Region, own: DevicePartial, others: list[Partial], finishing: Finishing
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """:func:`tilemask.finalize.finalize` of the chunk's sums: ``(labels, encoded probabilities or None,
    pixels per class)`` as numpy arrays."""
    device = own.weighted.device
    with on_thread_stream(device), torch.inference_mode():
        if own.done is not None:
            torch.cuda.current_stream(device).wait_event(own.done)
        uploaded = [
            Partial(p.region, torch.as_tensor(p.weighted, device=device),
                    None if p.weights is None else torch.as_tensor(p.weights, device=device), p.valid)
            for p in others
        ]  # fmt: skip
        weighted, weights, valid = overlap_add(chunk, [own, *uploaded])
        labels, probabilities = blend_and_label(weighted, weights, finishing)
        back = to_host((labels,) if probabilities is None else (labels, probabilities), None)
    encoded = back[1] if probabilities is not None else None
    return with_invalid(back[0].astype(finishing.labels_dtype, copy=False), encoded, valid, finishing)


def blend_and_label(
    weighted: torch.Tensor, weights: torch.Tensor | None, finishing: Finishing
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Labels (uint8, or int32 past 256 channels) and encoded probabilities (None unless written) of the sums
    (``weighted`` is consumed; ``weights`` None where not needed), as :func:`tilemask.finalize.finalize` computes
    them."""
    flips = 1 if weights is None else weights.shape[0]
    channels = weighted.shape[0] // flips
    small = torch.uint8 if channels <= 256 else torch.int32
    if finishing.probabilities == "none" and flips == 1:  # labels straight from the sums (finalize.labels_from_sums)
        if finishing.activation == "sigmoid":
            logit = float(np.float32(np.log(finishing.threshold / (1.0 - finishing.threshold))))
            return (weighted[0] >= logit * weights[0]).to(small), None
        return torch.argmax(weighted, 0).to(small), None
    per_flip = weighted.reshape(flips, channels, *weights.shape[1:])
    per_flip /= weights[:, None]
    probabilities = _activate(per_flip[0], finishing.activation)
    if flips > 1:  # the mean of each flipped image's activated blend (tta_mode: image)
        probabilities = probabilities.clone()
        for one in per_flip[1:]:
            probabilities += _activate(one, finishing.activation)
        probabilities /= flips
    if finishing.activation == "sigmoid":
        labels = (probabilities[0] >= finishing.threshold).to(small)
    else:
        labels = torch.argmax(probabilities, 0).to(small)
    if finishing.probabilities == "none":
        return labels, None
    if finishing.probabilities == "uint8":
        return labels, torch.round(torch.clamp(probabilities, 0.0, 1.0) * 255.0).to(torch.uint8)
    return labels, probabilities


def _activate(blended: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "softmax":
        return torch.softmax(blended, 0)
    if activation == "sigmoid":
        return torch.sigmoid(blended)
    return blended
