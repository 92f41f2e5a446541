"""On a real cluster: a `dask scheduler` and two `dask worker` processes on 127.0.0.1."""

from __future__ import annotations

import numpy as np
import zarr
from distributed import Client

from .conftest import raster_workflow, run_cli


def test_run_on_an_existing_scheduler_equals_the_embedded_cluster(
    dask_processes, make_raster, make_model, write_workflow, tmp_path
):
    path, _ = make_raster((3, 260, 330))
    weights, _ = make_model()
    workflow = write_workflow(raster_workflow(path, weights))

    remote = run_cli("run", workflow, "--scheduler", dask_processes, "--set", "output.path=out/remote.zarr")
    assert remote.returncode == 0, remote.stderr
    local = run_cli("run", workflow, "--set", "output.path=out/local.zarr", "--set", "output.chunks=128")
    assert local.returncode == 0, local.stderr

    a = zarr.open_group(tmp_path / "out" / "remote.zarr", mode="r")
    b = zarr.open_group(tmp_path / "out" / "local.zarr", mode="r")
    assert a.attrs["tilemask"]["complete"] and b.attrs["tilemask"]["complete"]
    np.testing.assert_allclose(a["probabilities"][:], b["probabilities"][:], atol=1e-5)
    np.testing.assert_array_equal(a["labels"][:], b["labels"][:])

    with Client(dask_processes) as client:
        # both workers took part, and each loaded the model exactly once for 9 blocks
        loads = client.run(lambda: __import__("tilemask.models", fromlist=["loads"]).loads)
        torch_threads = client.run(lambda: __import__("torch").get_num_threads())
    assert sorted(loads.values()) == [1, 1]
    assert all(n >= 1 for n in torch_threads.values())


def test_bad_scheduler_address_is_one_line(make_raster, make_model, write_workflow, tmp_path):
    path, _ = make_raster((3, 50, 50))
    weights, _ = make_model()
    proc = run_cli(
        "run", write_workflow(raster_workflow(path, weights)), "--scheduler", "tcp://127.0.0.1:9",
        env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"},
    )
    assert proc.returncode == 1
    assert "127.0.0.1:9" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "tilemask: error:" in proc.stderr
