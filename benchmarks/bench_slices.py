"""A 2D model over a volume's slices: tilemask's ``inference.slice_axis`` against MONAI's ``SliceInferer``, in one run.

    python benchmarks/bench_slices.py [--size 256] [--slices 48] [--roi 128] [--axis 2] [--backend auto] [--dir /tmp]

* A ``size x size x slices`` int16 ``.nii.gz`` (kept in ``--dir`` and reused), smooth blobs over noise.
* The workflow: ``ScaleIntensityRange`` with clip, a 2D UNet (MONAI, channels 8/16/32), slice by slice across
  ``--axis``, roi ``roi x roi``, overlap 0.25, gaussian, ``sw_batch_size`` 4, softmax, labels as ``.nii.gz``:
  ``tilemask run`` in a process of its own, as a user runs it (its embedded cluster, its defaults), timed from its
  start to its exit; ``--backend`` is its ``inference.backend`` (``auto``, the default, may take OpenVINO or
  torch-mkldnn on the CPU once it has measured them; ``torch`` runs the network as MONAI does).
* The reference: the same steps with MONAI in this process (LoadImaged, EnsureChannelFirstd, ScaleIntensityRanged,
  ``SliceInferer(spatial_dim=axis)``, softmax, argmax), the labels saved with nibabel; twice: given the
  ``MetaTensor`` the transforms return, as a bundle's evaluator gives it, and given it as a plain tensor
  (``.as_tensor()``), which spares every operation of the network MetaTensor's ``__torch_function__``.
* Peak memory as in ``bench_medical.py``: the largest total RSS of a side's process and all its children.
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
from peakmem import PeakMemory, tilemask_run  # noqa: E402

ARGS = dict(spatial_dims=2, in_channels=1, out_channels=2, channels=[8, 16, 32], strides=[2, 2], num_res_units=1)
INTENSITY = {"a_min": -200.0, "a_max": 800.0, "b_min": 0.0, "b_max": 1.0, "clip": True}
OVERLAP, BATCH = 0.25, 4


def make_volume(path: Path, size: int, slices: int) -> None:
    rng = np.random.default_rng(0)
    shape = (size, size, slices)
    coarse = rng.normal(0, 300, tuple(s // 16 + 2 for s in shape)).astype(np.float32)
    from scipy.ndimage import zoom

    data = zoom(coarse, 16, order=1)[:size, :size, :slices]
    data += rng.normal(0, 30, data.shape).astype(np.float32)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(data.astype(np.int16), affine), path)


def run_tilemask(scan: Path, weights: Path, out: Path, roi: int, axis: int, backend: str) -> dict:
    """``tilemask run --quiet --overwrite`` of the workflow, in a process of its own, as a user runs it."""
    return tilemask_run(out.parent / "tilemask_slices_workflow.json", {
        "version": 1, "input": str(scan),
        "model": {"network": "UNet", "args": ARGS, "weights": str(weights)},
        "preprocess": {"intensity": INTENSITY},
        "inference": {"roi_size": [roi, roi], "slice_axis": axis, "overlap": OVERLAP, "batch_size": BATCH,
                      "device": "cpu", "backend": backend},
        "output": {"path": str(out)},
    })  # fmt: skip


def run_monai(scan: Path, net: torch.nn.Module, out: Path, roi: int, axis: int, plain: bool) -> dict:
    from monai.inferers import SliceInferer
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityRanged

    with PeakMemory() as mem:
        start = time.perf_counter()
        pre = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), ScaleIntensityRanged("image", **INTENSITY)])
        data = pre({"image": str(scan)})
        inferer = SliceInferer(roi_size=(roi, roi), sw_batch_size=BATCH, spatial_dim=axis, overlap=OVERLAP,
                               mode="gaussian")  # fmt: skip
        with torch.inference_mode():
            image = data["image"][None].float()
            logits = inferer(image.as_tensor() if plain else image, net)
            labels = torch.softmax(logits, 1).argmax(1)[0].numpy().astype(np.uint8)
        nib.save(nib.Nifti1Image(labels, nib.load(scan).affine), out)
        wall = time.perf_counter() - start
    del data, logits, labels
    gc.collect()
    return {"wall": wall, "peak": mem.peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--slices", type=int, default=48)
    parser.add_argument("--roi", type=int, default=128)
    parser.add_argument("--axis", type=int, default=2, choices=[0, 1, 2])
    backends = ["auto", "torch", "torch-mkldnn", "openvino", "onnxruntime"]
    parser.add_argument("--backend", default="auto", choices=backends)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    folder = Path(args.dir) / "tilemask-bench-slices"
    folder.mkdir(parents=True, exist_ok=True)
    scan = folder / f"scan{args.size}x{args.slices}.nii.gz"
    if not scan.exists():
        make_volume(scan, args.size, args.slices)
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(**ARGS).eval()
    weights = folder / "unet2d.pt"
    torch.save(net.state_dict(), weights)
    print(f"{args.size} x {args.size} x {args.slices} int16, a 2D UNet roi {args.roi}^2 across axis {args.axis}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    labels = {side: folder / f"{side}_labels.nii.gz" for side in ("monai", "tilemask")}
    m = run_monai(scan, net, labels["monai"], args.roi, args.axis, plain=False)
    p = run_monai(scan, net, labels["monai"], args.roi, args.axis, plain=True)
    t = run_tilemask(scan, weights, labels["tilemask"], args.roi, args.axis, args.backend)
    read = lambda path: np.asarray(nib.load(path).dataobj)  # noqa: E731
    agree = np.mean(read(labels["monai"]) == read(labels["tilemask"]))
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    print(f"{'':16}{'wall s':>10}{'peak memory':>14}")
    print(f"{'SliceInferer':16}{m['wall']:>10.1f}{gib(m['peak']):>14}   (a MetaTensor)")
    print(f"{'SliceInferer':16}{p['wall']:>10.1f}{gib(p['peak']):>14}   (a plain tensor)")
    print(f"{'tilemask ' + args.backend:16}{t['wall']:>10.1f}{gib(t['peak']):>14}   ({t['windows']} windows)")
    print(f"tilemask / MONAI (MetaTensor): time {t['wall'] / m['wall']:.2f}, peak memory {t['peak'] / m['peak']:.2f}")
    print(f"tilemask / MONAI (plain tensor): time {t['wall'] / p['wall']:.2f}, "
          f"peak memory {t['peak'] / p['peak']:.2f}; labels agree on {agree:.5%}")  # fmt: skip


if __name__ == "__main__":
    main()
