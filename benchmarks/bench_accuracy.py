"""How far each inference backend's softmax is from the exact answer (the network in float64), in one run.

    python benchmarks/bench_accuracy.py

MONAI's UNet 16-32-64-128 (2 residual units, instance norm, random weights) in
2D on windows of 3 x 256^2, through torch float32 and tilemask's own converters
(:mod:`tilemask.backends`), against the same network in float64, on windows an
Earth-observation run meets: random values; zeros; ones; -2 (a nodata fill of 0
normalized with mean 100 and std 50); -2 with one pixel, and with 1% of the
pixels, 0.02 higher (a flat fill with a few quantization steps); and two windows
of the demo scene (``workflows/demo/RGB.byte.tif``, same normalization): its
corner (black fill and land) and its middle.  Each window runs in a batch with a
random one, as in a run.  Each backend's column gives its distance from float64,
then from torch float32 (what ``auto``'s 1e-4 test measures); the last column is
torch float32's own distance from float64.
"""

from __future__ import annotations

import argparse
import copy
import os
import warnings
from pathlib import Path

import numpy as np
import rasterio
import torch
from scratch import scratch_folder

from tilemask.backends import CONVERTERS
from tilemask.settings import ModelSpec

warnings.filterwarnings("ignore")
ARGS = dict(spatial_dims=2, in_channels=3, out_channels=2, channels=[16, 32, 64, 128], strides=[2, 2, 2], num_res_units=2)
ROI = (256, 256)
SCENE = Path(__file__).resolve().parent.parent / "workflows" / "demo" / "RGB.byte.tif"


def windows() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    shape = (3, *ROI)
    fill = np.full(shape, -2.0, np.float32)
    one_pixel = fill.copy()
    one_pixel[:, 100, 100] += 0.02
    few = fill + np.float32(0.02) * (rng.random(shape) < 0.01)
    with rasterio.open(SCENE) as ds:
        scene = (ds.read().astype(np.float32) - 100.0) / 50.0
    found = {
        "random": rng.standard_normal(shape, dtype=np.float32),
        "zeros": np.zeros(shape, np.float32),
        "ones": np.ones(shape, np.float32),
        "-2 (nodata fill)": fill,
        "-2, one pixel +0.02": one_pixel,
        "-2, 1% pixels +0.02": few.astype(np.float32),
        "RGB.byte corner": scene[:, : ROI[0], : ROI[1]],
        "RGB.byte middle": scene[:, 300 : 300 + ROI[0], 300 : 300 + ROI[1]],
    }
    return {name: torch.from_numpy(np.ascontiguousarray(w)) for name, w in found.items()}


def main() -> None:
    from monai.networks.nets import UNet

    torch.set_num_threads(os.cpu_count() or 1)
    if "TILEMASK_CACHE_DIR" not in os.environ:
        os.environ["TILEMASK_CACHE_DIR"] = str(scratch_folder("tilemask-bench-cache-"))
    torch.manual_seed(0)
    network = UNet(**ARGS).eval()
    exact = copy.deepcopy(network).double()
    weights = scratch_folder("tilemask-bench-accuracy-") / "unet.pt"
    torch.save(network.state_dict(), weights)
    spec = ModelSpec.create("UNet", ARGS, str(weights))
    runners = {"torch": network, **{name: convert(spec, lambda: network, 3, ROI) for name, convert in CONVERTERS.items()}}
    companion = torch.from_numpy(np.random.default_rng(1).standard_normal((3, *ROI), dtype=np.float32))
    print(f"{os.cpu_count()} cores, torch {torch.__version__}; largest softmax difference, 2D UNet, instance norm")
    others = [name for name in runners if name != "torch"]
    print(f"{'window':22}" + "".join(f"{name:>24}" for name in others) + f"{'torch':>14}")
    print(f"{'(from)':22}" + "".join(f"{'float64 / torch':>24}" for _ in others) + f"{'float64':>14}")
    with torch.inference_mode():
        for label, window in windows().items():
            batch = torch.stack([window, companion])
            truth = torch.softmax(exact(batch.double()), 1)[0]
            got = {name: torch.softmax(run(batch).double(), 1)[0] for name, run in runners.items()}
            gaps = {name: float((p - truth).abs().max()) for name, p in got.items()}
            row = "".join(f"{gaps[n]:>13.1e} / {float((got[n] - got['torch']).abs().max()):<8.1e}" for n in others)
            print(f"{label:22}{row}{gaps['torch']:>14.1e}")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
