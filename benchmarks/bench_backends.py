"""The network alone under each inference backend: time per batch and distance from torch, in one run.

    python benchmarks/bench_backends.py

For MONAI's UNet 16-32-64-128 (2 residual units) in 2D (batch 8 x 3 x 256^2) and
3D (batch 4 x 1 x 64^3), with MONAI's default instance norm and with batch norm
(random weights), through tilemask's own converters (:mod:`tilemask.backends`):
the best of 5 batches, the speed-up over torch eager, and the largest softmax
difference from torch on a random window and on a window of zeros (each alone).
The 3D network also runs on a batch of one window: what a small volume, or
MONAI's default ``sw_batch_size=1``, gives it.  A zero
window is what padding, clipped air and nodata fill look like; it is where an
instance norm divides rounding noise by ``sqrt(eps)``.  What ``auto`` picks
follows from the last two columns (1e-4).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
from scratch import scratch_folder

from tilemask.backends import CONVERTERS
from tilemask.settings import ModelSpec

warnings.filterwarnings("ignore")
CASES = [
    ("2D", dict(spatial_dims=2, in_channels=3, out_channels=2, channels=[16, 32, 64, 128], strides=[2, 2, 2], num_res_units=2), 8, (256, 256)),
    ("3D", dict(spatial_dims=3, in_channels=1, out_channels=2, channels=[16, 32, 64, 128], strides=[2, 2, 2], num_res_units=2), 4, (64, 64, 64)),
    ("3D x1", dict(spatial_dims=3, in_channels=1, out_channels=2, channels=[16, 32, 64, 128], strides=[2, 2, 2], num_res_units=2), 1, (64, 64, 64)),
]


def best_of(run, batch: torch.Tensor, n: int = 5) -> float:
    run(batch)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - start)
    return min(times)


def softmax_gap(reference, run, window: torch.Tensor) -> float:
    with torch.inference_mode():
        expected = torch.softmax(reference(window), 1)
    return float((expected - torch.softmax(run(window), 1)).abs().max())


def main() -> None:
    from monai.networks.nets import UNet

    torch.set_num_threads(os.cpu_count() or 1)
    if "TILEMASK_CACHE_DIR" not in os.environ:
        os.environ["TILEMASK_CACHE_DIR"] = str(scratch_folder("tilemask-bench-cache-"))
    folder = scratch_folder("tilemask-bench-backends-")
    print(f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'network':26}{'backend':13}{'ms/batch':>10}{'vs torch':>10}{'gap random':>12}{'gap zeros':>12}")
    for name, args, batch_size, roi in CASES:
        for norm in ("instance", "batch"):
            torch.manual_seed(0)
            network = UNet(**args, norm=norm).eval()
            weights = folder / f"{name}_{norm}.pt"
            torch.save(network.state_dict(), weights)
            spec = ModelSpec.create("UNet", {**args, "norm": norm}, str(weights))
            channels = args["in_channels"]
            batch = torch.randn(batch_size, channels, *roi)
            random = torch.randn(1, channels, *roi)
            zeros = torch.zeros(1, channels, *roi)

            def eager(x, network=network):
                with torch.inference_mode():
                    return network(x)

            base = best_of(eager, batch)
            label = f"{name} UNet, {norm} norm"
            print(f"{label:26}{'torch':13}{base * 1e3:>10.0f}{1.0:>9.2f}x{0.0:>12.1e}{0.0:>12.1e}")
            for backend, convert in CONVERTERS.items():
                run = convert(spec, lambda network=network: network, channels, roi)
                t = best_of(run, batch)
                print(f"{'':26}{backend:13}{t * 1e3:>10.0f}{base / t:>9.2f}x"
                      f"{softmax_gap(network, run, random):>12.1e}{softmax_gap(network, run, zeros):>12.1e}")  # fmt: skip


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
