"""Where a fresh process's first forward pass on a GPU spends its time: the floor under a run's start-up there.

    python benchmarks/gpu/startup.py

bench_engine.py reports the network's probe on a worker (``probe: network``) at about 16 s on an H200, within a
run of 26 s whose windows took 3.4 s.  This times, in a process of its own, each step a worker's probe takes:
torch's import, CUDA's context, MONAI's import and bench_engine.py's UNet built and moved to the GPU, then
forward passes of a batch of 8 windows of 256^2 one after another, each synchronised (the first loads cuDNN
and picks its kernels), then the same in a second process with ``CUDA_MODULE_LOADING=EAGER`` (every kernel of
the libraries loaded with the context instead of at first use).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

STEPS = """
import time
began = time.perf_counter()
def mark(what):
    global began
    now = time.perf_counter()
    print(f"  {what:<44} {now - began:7.2f} s", flush=True)
    began = now
import torch
mark("import torch")
torch.zeros((), device="cuda"); torch.cuda.synchronize()
mark("CUDA context")
import sys
sys.path.insert(0, sys.argv[1])  # benchmarks/: bench_engine.py's network
from bench_engine import ARGS, BATCH, ROI, network
net = network().cuda()
mark("import MONAI, build the UNet, move it to the GPU")
x = torch.randn(BATCH, ARGS["in_channels"], ROI, ROI, device="cuda")
with torch.inference_mode():
    for i in range(4):
        net(x); torch.cuda.synchronize()
        mark(f"forward pass {i + 1} of {BATCH} x {ROI}^2")
"""


def main() -> None:
    benchmarks = str(Path(__file__).resolve().parent.parent)
    for label, extra in (("default (CUDA_MODULE_LOADING as torch sets it)", {}),
                         ("CUDA_MODULE_LOADING=EAGER", {"CUDA_MODULE_LOADING": "EAGER"})):  # fmt: skip
        print(label, flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", STEPS, benchmarks], env={**os.environ, **extra}, check=True)
        print(f"  {'the whole process':<44} {time.perf_counter() - start:7.2f} s", flush=True)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
