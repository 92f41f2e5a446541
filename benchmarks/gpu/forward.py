"""The bare model's forward passes on a GPU, in the ways tilemask could run them: what sets its floor there.

    python benchmarks/gpu/forward.py [--batches 200]

bench_engine.py's UNet (16-32-64-128, 2 residual units) on batches of 8 windows of 256^2, median time per
batch over ``--batches`` timed batches after a warm-up, each batch timed with CUDA events:

* eager float32, as bench_engine.py's "model only" and tilemask's default run it;
* with ``torch.backends.cudnn.benchmark`` (cuDNN times its convolution algorithms once per shape);
* through the runner ``inference.backend: auto`` builds on a worker (:mod:`tilemask.backends`: a CUDA graph
  replayed, one launch per batch instead of one per kernel, with its copies in and out), against eager's answer;
* eager under ``torch.autocast`` in bfloat16 and float16 (``inference.precision``);
* auto's runner while 15 other Python threads keep the interpreter busy, as a worker's Dask threads can, with the
  interpreter's default switch interval (5 ms) and with 0.5 ms; and eager at 0.5 ms: the forward passes
  launch their kernels from Python, so a thread that waits for the GIL leaves the GPU idle.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_engine import ARGS, BATCH, ROI, network  # noqa: E402


def per_batch(run, batches: int, warm_up: int = 20) -> float:
    """Median milliseconds of ``run()`` over ``batches`` calls, after ``warm_up`` calls."""
    for _ in range(warm_up):
        run()
    times = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def auto_runner(net: torch.nn.Module, device: torch.device):
    """``(backend, run)``: what ``inference.backend: auto`` runs ``net`` with on a worker of ``device``."""
    from tilemask.backends import cached_runner
    from tilemask.settings import InferenceSettings, ModelSpec

    with tempfile.TemporaryDirectory(prefix="tilemask-forward-") as folder:  # the weights are read once, here
        weights = Path(folder) / "unet.pt"
        torch.save(net.state_dict(), weights)
        spec = ModelSpec.create("UNet", ARGS, str(weights))
        return cached_runner(spec, InferenceSettings(roi=(ROI, ROI), batch_size=BATCH, backend="auto"), 3, device)


def busy_threads(count: int) -> tuple[threading.Event, list[threading.Thread]]:
    stop = threading.Event()

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    threads = [threading.Thread(target=spin, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    return stop, threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=200)
    n = parser.parse_args().batches
    device = torch.device("cuda")
    net = network().to(device)
    batch = torch.randn(BATCH, 3, ROI, ROI, device=device)
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}; "
          f"UNet 16-32-64-128, batches of {BATCH} x {ROI}^2, median of {n}")  # fmt: skip

    def eager(precision: str = "float32"):
        def run():
            with torch.inference_mode(), torch.autocast("cuda", dtype=getattr(torch, precision),
                                                        enabled=precision != "float32"):  # fmt: skip
                net(batch)

        return run

    base = per_batch(eager(), n)
    print(f"{'':52}{'ms / batch':>12}{'vs eager':>10}")

    def row(name: str, ms: float) -> None:  # printed as measured: a step cut short by its time limit says what it had
        print(f"{name:52}{ms:>12.3f}{ms / base:>9.2f}x")

    row("eager float32", base)
    backend, runner = auto_runner(net, device)

    def replay():
        with torch.inference_mode():
            runner(batch)

    row(f"auto: {backend}", per_batch(replay, n))
    with torch.inference_mode():
        gap = (runner(batch) - net(batch)).abs().max().item()
    print(f"  auto's runner vs eager: max |logit difference| {gap:.2e}")
    for precision in ("bfloat16", "float16"):
        row(f"eager {precision} autocast", per_batch(eager(precision), n))
    for interval in (sys.getswitchinterval(), 0.0005):
        sys.setswitchinterval(interval)
        stop, threads = busy_threads(15)
        # each launch can wait for the GIL through other threads' switch intervals: a few batches say enough
        row(f"auto's runner, 15 busy threads, switch {interval * 1e3:g} ms", per_batch(replay, 5, 1))
        if interval < 0.001:  # at 5 ms one eager batch took longer than the step's 45 s on an H200
            row(f"eager, 15 busy threads, switch {interval * 1e3:g} ms", per_batch(eager(), 1, 0))
        stop.set()
        for t in threads:
            t.join()
    sys.setswitchinterval(0.005)
    torch.backends.cudnn.benchmark = True
    row("eager float32, cudnn.benchmark", per_batch(eager(), n))


if __name__ == "__main__":
    main()
