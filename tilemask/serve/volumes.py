"""Volumes small enough for a browser: a strided copy of a NIfTI when it is too large for a WebGL texture.

NiiVue uploads a volume as one 3D texture; browsers cap its edge (often 2048)
and a tab's memory well before that. A volume with more than
:data:`MAX_VOXELS` voxels, or an edge over :data:`MAX_EDGE`, is served as every
``f``-th voxel along each axis (the smallest integer ``f`` that fits; nearest,
so labels stay labels), with the affine scaled to match so it still lies over
its scan. Copies are kept in memory, a few at a time.
"""

from __future__ import annotations

import gzip
import io
import math
import threading
from collections import OrderedDict
from pathlib import Path

import nibabel as nib
import numpy as np

from ..sinks.nifti import unsheared
from ..sources.labels import unscaled
from .locks import KeyedLocks

MAX_VOXELS = 256**3
MAX_EDGE = 2048
_CACHE: OrderedDict[tuple, bytes] = OrderedDict()
_CACHE_SIZE = 4
_LOCK = threading.Lock()
_MAKING = KeyedLocks()  # a lock per copy being made


def stride(shape: tuple[int, ...]) -> int:
    """The smallest integer step that brings ``shape`` (3 spatial axes) under both limits."""
    voxels = math.prod(shape[:3])
    step = max(1, math.ceil((voxels / MAX_VOXELS) ** (1 / 3)), math.ceil(max(shape[:3]) / MAX_EDGE))
    while math.prod(math.ceil(s / step) for s in shape[:3]) > MAX_VOXELS:
        step += 1
    return step


def browser_copy(path: Path, stamp: tuple) -> bytes:
    """``path`` as a gzipped NIfTI-1, strided by :func:`stride`; made once while requests for it come together
    (each held the whole volume: 8 viewers of a 300 MB scan at once took 806 MB more, where one took 117 MB)."""
    key = (str(path), stamp)
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    with _MAKING(key):  # the first request makes it; the others wait for its copy
        with _LOCK:
            if key in _CACHE:
                return _CACHE[key]
        body = _strided(path)
        with _LOCK:
            _CACHE[key] = body
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        return body


def _strided(path: Path) -> bytes:
    """:func:`browser_copy`'s copy of ``path``, made."""
    img = nib.load(path)
    step = stride(img.shape)
    spatial = min(len(img.shape), 3)  # a 2D NIfTI (a slide) has two
    index = (slice(None, None, step),) * spatial + (0,) * (len(img.shape) - spatial)
    proxy = img.dataobj
    scale = (float(proxy.slope), float(proxy.inter))
    stored = np.dtype(proxy.dtype).kind in "iu" and scale != (1.0, 0.0)  # scaled integers: uint8 probabilities
    if stored:  # kept as stored, with their scale (readers scale them as the file's): a quarter of float32's bytes
        proxy = unscaled(proxy)
    data = np.asarray(proxy[index])
    data = data.reshape(data.shape + (1,) * (3 - data.ndim))  # one slice: the 3D texture a viewer uploads
    if data.dtype == np.float64:  # a texture needs no more than float32
        data = data.astype(np.float32)
    affine = img.affine @ np.diag([step] * spatial + [1.0] * (4 - spatial))
    small = nib.Nifti1Image(data, affine)
    if stored:
        small.header.set_slope_inter(*scale)  # nibabel writes a header's scale as it is (no scale: it picks one)
    small.header.set_xyzt_units(*img.header.get_xyzt_units())
    small.set_qform(unsheared(affine), code=int(img.header["qform_code"]) or 1)  # a tilted gantry's: ITK's grid
    small.set_sform(affine, code=int(img.header["sform_code"]) or 1)
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as out:
        out.write(small.to_bytes())
    return raw.getvalue()
