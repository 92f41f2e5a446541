"""Map tiles of the demo's label and probability COGs, through ``tilemask serve``'s routes and through rio-tiler.

    python benchmarks/bench_tiles.py [--zooms 0 1 2 6 10] [--repeat 3]

The demo (``workflows/demo_landsat.yaml``) is run into a scratch folder; then, in
this process, each zoom's tile over the scene's centre is asked of the app
(``tilemask.serve.create_app``, through Starlette's test client: no sockets) as a
label tile and as a probability tile of band 1, and the same tile is read by
rio-tiler's ``Reader.tile`` of the probabilities COG, one band (``indexes=1``:
what the route did before 2026-12-02) and every band. Best of ``--repeat``, in
milliseconds, each kind of read first made once so that the datasets are open.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import morecantile
from rio_tiler.io import Reader
from scratch import scratch_folder
from starlette.testclient import TestClient

from tilemask.serve import create_app

ROOT = Path(__file__).resolve().parents[1]
CENTRE = (-77.9, 24.6)  # lon, lat inside the demo scene (Andros)
LABELS, PROBS = "RGB.byte_mask.tif", "RGB.byte_mask_probabilities.tif"


def best_ms(call, repeat: int) -> float:
    call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zooms", type=int, nargs="+", default=[0, 1, 2, 6, 10])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    folder = scratch_folder("tilemask-bench-tiles-")
    subprocess.run([sys.executable, "-m", "tilemask", "-q", "run", str(ROOT / "workflows" / "demo_landsat.yaml"),
                    "--set", f"output.path={folder}/{{stem}}_mask.tif", "--set", "output.vectors=null",
                    "--job-dir", str(folder / "job")], check=True)  # fmt: skip
    tms = morecantile.tms.get("WebMercatorQuad")
    print(f"{'zoom':>4} | {'labels':>8} {'probs b1':>9} | {'rio-tiler b1':>12} {'rio-tiler all':>13} | "
          f"{'probs / rio-tiler b1':>20}")  # fmt: skip
    with TestClient(create_app(folder), base_url="http://127.0.0.1") as client, Reader(str(folder / PROBS)) as cog:
        for z in args.zooms:
            tile = tms.tile(*CENTRE, z)
            url = f"/tiles/{z}/{tile.x}/{tile.y}.png?output={LABELS}"
            labels = best_ms(lambda: client.get(url).raise_for_status(), args.repeat)
            probs = best_ms(lambda: client.get(f"{url}&band=1").raise_for_status(), args.repeat)
            one = best_ms(lambda: cog.tile(tile.x, tile.y, z, indexes=1), args.repeat)
            every = best_ms(lambda: cog.tile(tile.x, tile.y, z), args.repeat)
            print(f"{z:>4} | {labels:>8.1f} {probs:>9.1f} | {one:>12.1f} {every:>13.1f} | {probs / one:>20.3f}")


if __name__ == "__main__":
    main()
