"""How far ``inference.precision: bfloat16 | float16`` moves the answer from float32, next to what the same
``torch.autocast`` does to MONAI's ``sliding_window_inference``, on a real scene and a trained network.

    python benchmarks/bench_precision.py                 # on the CPU
    python benchmarks/bench_precision.py --device cuda   # tilemask's workers and MONAI's call on the GPU

The demo (``workflows/demo_landsat.yaml``: Landsat 7 RGB.byte.tif, the trained 3-class UNet 8-16-32, roi
128) is run by tilemask on an embedded cluster once per precision, probabilities to Zarr; MONAI's call runs
on the same normalized scene in this process, under ``torch.autocast(device, dtype)``.  Printed per
precision: the largest and mean difference of the softmax probabilities from the same side's float32, the
share of labelled pixels whose class changes, and tilemask's distance from MONAI at the same precision.
Speed: ``bench_engine.py --precision``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import rasterio
import torch
import zarr
from bench_engine import autocast
from scratch import scratch_folder

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "workflows" / "demo_landsat.yaml"
PRECISIONS = ("float32", "bfloat16", "float16")


def run_tilemask(workdir: Path, precision: str, client, device: str) -> tuple[np.ndarray, np.ndarray]:
    import tilemask
    from tilemask import Workflow

    overrides = [f"inference.precision={precision}", f"inference.device={device}", "output.probabilities=float32",
                 f"output.path={workdir / f'tilemask_{precision}.zarr'}", "output.vectors=null",
                 "output.quicklook=false"]  # fmt: skip
    wf = Workflow.from_yaml(DEMO, overrides)
    (result,) = tilemask.run(wf, client, progress=False, overwrite=True)
    group = zarr.open_group(result.outputs[0], mode="r")
    return group["probabilities"][:], group["labels"][:]


def run_monai(precision: str, device: str) -> tuple[np.ndarray, np.ndarray]:
    """MONAI's probabilities, and where the scene has data (GDAL's dataset mask): tilemask feeds the network
    0 (the normalized mean) at nodata pixels and labels them nodata, so MONAI gets the same zeros."""
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet

    from tilemask import Workflow

    wf = Workflow.from_yaml(DEMO)
    net = UNet(**wf.model.args)
    net.load_state_dict(torch.load(wf.resolve(wf.model.weights), weights_only=True))
    net.eval().to(device)
    norm = wf.preprocess.normalize
    with rasterio.open(wf.resolve(wf.input)) as ds:
        image, valid = ds.read().astype(np.float32), ds.dataset_mask() > 0
    mean, std = (np.asarray(v, np.float32)[:, None, None] for v in (norm.mean, norm.std))
    x = torch.from_numpy(np.where(valid, (image - mean) / std, np.float32(0)))[None].to(device)
    with torch.inference_mode(), autocast(precision, torch.device(device)):
        logits = sliding_window_inference(x, tuple(wf.inference.roi_size), wf.inference.batch_size, net,
                                          overlap=wf.inference.overlap, mode=wf.inference.mode)  # fmt: skip
    return torch.softmax(logits.float(), 1)[0].cpu().numpy(), valid


def main() -> None:
    from tilemask.cluster import cluster_client

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where both sides run the network")
    device = parser.parse_args().device
    if device.startswith("cuda") and not torch.cuda.is_available():  # before the cluster starts, as bench_engine
        raise SystemExit(f"--device {device}: torch sees no CUDA device here (torch {torch.__version__})")
    workdir = scratch_folder("tilemask-precision-")
    with cluster_client() as client:
        ours = {p: run_tilemask(workdir, p, client, device) for p in PRECISIONS}
    theirs = {p: run_monai(p, device) for p in PRECISIONS}
    gpu = device.startswith("cuda")
    where = f"{device} ({torch.cuda.get_device_name(device)})" if gpu else f"cpu, {torch.get_num_threads()} threads"
    base_p, base_l = ours["float32"]
    monai_p, valid = theirs["float32"]
    print(f"demo scene {base_l.shape[1]} x {base_l.shape[0]} ({valid.sum()} pixels with data), trained UNet "
          f"8-16-32, {base_p.shape[0]} classes; "
          f"torch {torch.__version__}, on {where}")
    print(f"{'':10}{'tilemask: max / mean |dp| vs float32':>40}{'labels changed':>16}"
          f"{'MONAI autocast: max / mean |dp|':>34}{'labels changed':>16}{'tilemask vs MONAI, same precision':>36}")
    for p in PRECISIONS:
        probs, labels = (a[..., valid] for a in ours[p])
        m_probs = theirs[p][0][:, valid]
        ours_gap, theirs_gap, between = (np.abs(a - b) for a, b in
                                         ((probs, base_p[:, valid]), (m_probs, monai_p[:, valid]), (probs, m_probs)))
        changed = 100 * np.mean(labels != base_l[valid])
        m_changed = 100 * np.mean(m_probs.argmax(0) != monai_p[:, valid].argmax(0))
        print(f"{p:10}{ours_gap.max():>26.2e} / {ours_gap.mean():.2e}{changed:>15.3f}%"
              f"{theirs_gap.max():>20.2e} / {theirs_gap.mean():.2e}{m_changed:>15.3f}%"
              f"{between.max():>22.2e} max, {100 * np.mean(labels != m_probs.argmax(0)):.3f}% labels")


if __name__ == "__main__":
    main()
