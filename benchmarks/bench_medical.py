"""A volume with orientation and spacing to undo: tilemask against MONAI's whole-volume pipeline, in one run.

    python benchmarks/bench_medical.py [--size 512] [--roi 96] [--dir /tmp] [--precision bfloat16]

* A ``size^3`` int16 ``.nii.gz`` stored LPS at 0.8 x 0.8 x 1.0 mm (kept in ``--dir``
  and reused), smooth blobs over noise.
* The workflow: ``Orientation(RAS)``, ``Spacing(1.0 mm)``, ``ScaleIntensityRange``
  with clip, a 3D UNet (MONAI, channels 8/16/32), roi ``roi^3``, overlap 0.25,
  gaussian, softmax, back onto the scan's grid (``Invertd(nearest_interp=False)``),
  labels as ``.nii.gz``: ``tilemask run`` in a process of its own, as a user runs it (its embedded cluster, its
  defaults), timed from its start to its exit.
* The reference: the same steps with MONAI's transforms on the whole volume in
  this process (LoadImaged ... sliding_window_inference, Activationsd, Invertd,
  AsDiscreted), the labels saved with nibabel.
* Peak memory is the largest total RSS of a side's process and all its children: MONAI's, this process (which
  holds torch, MONAI and the network); tilemask's, the command's (its client does not import torch) and its
  cluster's.  Until 2026-12-06 tilemask ran in this process too, whose 0.5 GiB (and what MONAI's run left
  in it) counted in tilemask's peak, and its time left out starting Python and importing tilemask.
* ``--precision bfloat16 | float16``: tilemask's ``inference.precision`` and MONAI's call under
  ``torch.autocast`` in it; the labels of an earlier float32 run in ``--dir`` are compared too.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import autocast  # noqa: E402
from peakmem import PeakMemory, tilemask_run  # noqa: E402

ARGS = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=[8, 16, 32], strides=[2, 2], num_res_units=1)
SPACING = (1.0, 1.0, 1.0)
INTENSITY = {"a_min": -200.0, "a_max": 800.0, "b_min": 0.0, "b_max": 1.0, "clip": True}


def make_volume(path: Path, size: int) -> None:
    rng = np.random.default_rng(0)
    coarse = rng.normal(0, 300, (size // 32 + 2,) * 3).astype(np.float32)
    from scipy.ndimage import zoom

    data = zoom(coarse, 32, order=1)[:size, :size, :size]
    data += rng.normal(0, 30, data.shape).astype(np.float32)
    affine = np.diag([-0.8, -0.8, 1.0, 1.0])  # LPS, anisotropic
    affine[:3, 3] = [200.0, 200.0, -250.0]
    nib.save(nib.Nifti1Image(data.astype(np.int16), affine), path)


def run_tilemask(scan: Path, weights: Path, out: Path, roi: int, precision: str) -> dict:
    """``tilemask run --quiet --overwrite`` of the workflow, in a process of its own, as a user runs it."""
    return tilemask_run(out.parent / "tilemask_workflow.json", {
        "version": 1, "input": str(scan),
        "model": {"network": "UNet", "args": ARGS, "weights": str(weights)},
        "preprocess": {"orientation": "RAS", "spacing": list(SPACING), "intensity": INTENSITY},
        "inference": {"roi_size": [roi] * 3, "overlap": 0.25, "batch_size": 2, "device": "cpu", "precision": precision},
        "output": {"path": str(out), "chunks": 128},
    })  # fmt: skip


def run_monai(scan: Path, net: torch.nn.Module, out: Path, roi: int, precision: str) -> dict:
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        Activationsd,
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )  # fmt: skip

    with PeakMemory() as mem:
        start = time.perf_counter()
        pre = Compose([
            LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS"),
            Spacingd("image", pixdim=SPACING, mode="bilinear"), ScaleIntensityRanged("image", **INTENSITY),
        ])  # fmt: skip
        data = pre({"image": str(scan)})
        with torch.inference_mode(), autocast(precision, torch.device("cpu")):
            data["pred"] = sliding_window_inference(data["image"][None], (roi,) * 3, 2, net, overlap=0.25,
                                                    mode="gaussian")[0].float()  # fmt: skip
        post = Compose([
            Activationsd("pred", softmax=True),
            Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False),
            AsDiscreted("pred", argmax=True),
        ])  # fmt: skip
        labels = np.asarray(post(data)["pred"][0]).astype(np.uint8)
        nib.save(nib.Nifti1Image(labels, nib.load(scan).affine), out)
        wall = time.perf_counter() - start
    del data, labels
    gc.collect()
    return {"wall": wall, "peak": mem.peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--precision", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args()
    folder = Path(args.dir) / "tilemask-bench-medical"
    folder.mkdir(parents=True, exist_ok=True)
    scan = folder / f"scan{args.size}.nii.gz"
    if not scan.exists():
        make_volume(scan, args.size)
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(**ARGS).eval()
    weights = folder / "unet.pt"
    torch.save(net.state_dict(), weights)
    print(f"{args.size}^3 int16 LPS 0.8 x 0.8 x 1.0 mm -> RAS 1 mm, UNet roi {args.roi}^3, {torch.get_num_threads()} threads")
    labels = {side: folder / f"{side}_labels{'' if args.precision == 'float32' else '_' + args.precision}.nii.gz"
              for side in ("monai", "tilemask")}  # fmt: skip
    m = run_monai(scan, net, labels["monai"], args.roi, args.precision)
    t = run_tilemask(scan, weights, labels["tilemask"], args.roi, args.precision)
    read = lambda path: np.asarray(nib.load(path).dataobj)  # noqa: E731
    agree = np.mean(read(labels["monai"]) == read(labels["tilemask"]))
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    print(args.precision)
    print(f"{'':10}{'wall s':>10}{'peak memory':>14}")
    print(f"{'MONAI':10}{m['wall']:>10.1f}{gib(m['peak']):>14}")
    print(f"{'tilemask':10}{t['wall']:>10.1f}{gib(t['peak']):>14}   ({t['windows']} windows)")
    print(f"tilemask / MONAI: time {t['wall'] / m['wall']:.2f}, peak memory {t['peak'] / m['peak']:.2f}; labels agree on {agree:.5%}")
    for side, path in labels.items():
        full = folder / f"{side}_labels.nii.gz"
        if args.precision != "float32" and full.exists():
            print(f"{side}: labels agree with its float32 run's on {np.mean(read(path) == read(full)):.5%}")


if __name__ == "__main__":
    main()
