"""bench_engine.py's tilemask column in a process of its own, as ``tilemask run`` runs it: its client never
imports torch (tilemask's workers do), so the peak memory of all processes is a user's.  bench_engine.py's own
process holds torch, MONAI and the network for the other columns (0.47 GiB), which a tilemask run does not.

    python benchmarks/tilemask_column.py '{"raster": ..., "weights": ..., "out": ..., "args": {...}, ...}'

prints the run's figures as JSON on a line beginning with :data:`RESULT` (bench_engine.py measures its time and
memory from outside).
"""

from __future__ import annotations

import json
import sys
import time

RESULT = "tilemask column: "


def run_tilemask(raster: str, weights: str, out: str, args: dict, mean: float, std: float, roi: int,
                 overlap: float, batch: int, chunks: int, probabilities: str = "none", precision: str = "float32",
                 device: str = "cpu", backend: str = "auto") -> dict:  # fmt: skip
    """``tilemask.run`` on the embedded cluster the CLI starts (its defaults, no progress), labels to ``out``."""
    import tilemask
    from tilemask import Workflow, forkserver, timing
    from tilemask.cluster import cluster_client

    wf = Workflow.from_dict({
        "version": 1, "input": raster,
        "model": {"network": "UNet", "args": args, "weights": weights},
        "preprocess": {"normalize": {"mean": [mean] * 3, "std": [std] * 3}},
        "inference": {"roi_size": [roi, roi], "overlap": overlap, "batch_size": batch, "device": device,
                      "precision": precision, "backend": backend},
        "output": {"path": out, "chunks": chunks, "quicklook": False, "probabilities": probabilities},
    })  # fmt: skip
    start = time.perf_counter()
    forkserver.start()  # as tilemask run starts it
    with cluster_client() as client:  # the embedded cluster tilemask.run starts without progress
        up = time.perf_counter()
        (result,) = tilemask.run(wf, client, progress=False, overwrite=True)
        ran = time.perf_counter()
        stages, stages_cpu = timing.totals(client.run(timing.snapshot)), timing.totals(client.run(timing.cpu_snapshot))
        closing = time.perf_counter()
    closed = time.perf_counter()
    forkserver.stop()
    end = time.perf_counter()
    return {"windows": result.windows, "tasks": result.tasks, "commit": result.commit_seconds,
            "outputs": result.outputs, "stages": stages, "stages_cpu": stages_cpu, "inference": result.seconds,
            "cluster_up": up - start, "run": ran - up, "cluster_close": closed - closing, "inside": end - start,
            "client_imported_torch": "torch" in sys.modules}  # fmt: skip


if __name__ == "__main__":
    print(RESULT + json.dumps(run_tilemask(**json.loads(sys.argv[1]))))
