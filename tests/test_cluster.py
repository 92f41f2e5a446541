"""On a real cluster: a `dask scheduler` and two `dask worker` processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from distributed import Client

from tilemask.cluster import WorkerSetup

from .conftest import raster_workflow, run_cli, start_scheduler
from .test_detached import dask_cluster, dask_variables


@pytest.mark.slow
def test_run_on_an_existing_scheduler_equals_the_embedded_cluster(
    dask_processes, make_raster, make_model, write_workflow, tmp_path
):
    path, _ = make_raster((3, 260, 330))
    weights, _ = make_model()
    workflow = write_workflow(raster_workflow(path, weights))

    remote = run_cli("run", workflow, "--scheduler", dask_processes, "--set", "output.path=out/remote.zarr")
    assert remote.returncode == 0, remote.stderr
    assert "dask dashboard" not in remote.stdout  # dask scheduler --no-dashboard: no link to a page that is not there
    local = run_cli("run", workflow, "--set", "output.path=out/local.zarr", "--set", "output.chunks=128")
    assert local.returncode == 0, local.stderr

    a = zarr.open_group(tmp_path / "out" / "remote.zarr", mode="r")
    b = zarr.open_group(tmp_path / "out" / "local.zarr", mode="r")
    assert a.attrs["tilemask"]["complete"] and b.attrs["tilemask"]["complete"]
    np.testing.assert_allclose(a["probabilities"][:], b["probabilities"][:], atol=1e-5)
    np.testing.assert_array_equal(a["labels"][:], b["labels"][:])

    with Client(dask_processes) as client:
        # both workers took part, and each loaded the model exactly once for 9 blocks
        loads = client.run(lambda: __import__("tilemask.backends", fromlist=["loads"]).loads)
        torch_threads = client.run(lambda: __import__("torch").get_num_threads())
        cores = client.run(lambda: __import__("tilemask.cluster", fromlist=["available_cores"]).available_cores())
        plugins = client.run(lambda dask_worker: sorted(dask_worker.plugins))
    assert sorted(loads.values()) == [1, 1]
    # the run set each worker up: both on 127.0.0.1, so each gets half of the host's cores as torch threads; its
    # plugin is unregistered again as the run ends (a worker joining later need not import tilemask)
    assert not any(WorkerSetup.name in names for names in plugins.values()), plugins
    assert torch_threads == {worker: max(1, n // 2) for worker, n in cores.items()}


def test_a_lost_scheduler_is_named_so():
    """A scheduler killed under ``tilemask stats`` ended it as ``FutureCancelledError: unique-9c41... cancelled for
    reason: scheduler-connection-lost. (run with --debug for details)``: Dask's words, and a hint of a bug.  It is
    one line naming the lost scheduler, as a run's ``lost the Dask scheduler while running ...``."""
    from distributed.client import FutureCancelledError

    from tilemask.cluster import cluster_failures
    from tilemask.errors import RunError

    with pytest.raises(RunError, match=r"^computing the statistics: lost the Dask scheduler$"):
        with cluster_failures("computing the statistics"):
            raise FutureCancelledError("unique-9c415e90", "scheduler-connection-lost")
    with pytest.raises(RunError, match=r"^probing: the cluster failed: FutureCancelledError: k cancelled for reason: "
                                       r"stimulus\.$"):  # fmt: skip
        with cluster_failures("probing"):
            raise FutureCancelledError("k", "stimulus")


@pytest.mark.timeout(120)
def test_a_broken_connection_is_named_the_lost_scheduler_once_the_client_has_lost_it(tmp_path):
    """A scheduler killed mid-``tilemask stats`` could also end it as ``the cluster failed: CommClosedError: ...
    Connection reset by peer`` (a review's reproduction, as the gather's connection broke before the client
    noticed).  Given the client, that failure is named the lost scheduler once it is; with its scheduler
    still there, it stays the cluster's failure."""
    from distributed import Client
    from distributed.comm import CommClosedError

    from tilemask.cluster import cluster_failures
    from tilemask.errors import RunError

    process, address = start_scheduler(tmp_path)
    try:
        with Client(address, timeout="10s") as client:
            with pytest.raises(RunError, match=r"^mask\.tif: the cluster failed: CommClosedError: reset$"):
                with cluster_failures("mask.tif", client):
                    raise CommClosedError("reset")
            process.kill()
            process.wait(10)
            with pytest.raises(RunError, match=r"^mask\.tif: lost the Dask scheduler$"):
                with cluster_failures("mask.tif", client):
                    raise CommClosedError("in <TCP (closed) ConnectionPool.gather local=...>: Connection reset by peer")
    finally:
        process.kill()
        process.wait(10)


@pytest.mark.timeout(120)
def test_a_workers_failure_under_a_live_scheduler_is_named_at_once(tmp_path):
    """A killed worker (``KilledWorker``, the scheduler's own verdict) or a cancelled task is no sign of a lost
    scheduler, yet each waited up to 2 s for the client to lose it before it was named the cluster's failure; only
    a broken connection (``CommClosedError``) may be the scheduler's loss seen early."""
    from types import SimpleNamespace

    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    from tilemask.cluster import cluster_failures
    from tilemask.errors import RunError

    process, address = start_scheduler(tmp_path)
    try:
        with Client(address, timeout="10s") as client:
            for failure in (KilledWorker("k", SimpleNamespace(address="tcp://w:1"), 3), FutureCancelledError("k", "stimulus")):
                start = time.monotonic()
                with pytest.raises(RunError, match=r"^mask\.tif: the cluster failed: "):
                    with cluster_failures("mask.tif", client):
                        raise failure
                assert time.monotonic() - start < 1.0, type(failure).__name__
    finally:
        process.kill()
        process.wait(10)


def test_a_hosts_cores_are_shared_among_its_workers():
    """Independent of this machine's core count: 12 cores, 3 workers on the host -> 4 torch threads each."""
    from tilemask.cluster import threads_per_process

    assert threads_per_process(12, 3) == 4
    assert threads_per_process(12, 1) == 12
    assert threads_per_process(12, 24) == 1  # never zero
    assert threads_per_process(2, 0) == 2


def test_the_embedded_cluster_gives_a_gpu_worker_the_cores_and_a_cpu_worker_two_threads():
    """Independent of this machine: a GPU worker's Dask threads read, blend and write for a device that
    computes faster than two of them could; on the CPU one thread waits on the model and one does the rest."""
    from tilemask.cluster import workers_for

    assert workers_for(16, 1) == (1, 16)
    assert workers_for(16, 4) == (4, 4)
    assert workers_for(2, 4) == (4, 2)  # never fewer than two threads
    assert workers_for(16, 0) == (4, 2)
    assert workers_for(2, 0) == (1, 2)


@pytest.mark.slow
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


@contextlib.contextmanager
def tcp_service(reply: bytes | None):
    """A server on a free port of 127.0.0.1 that is not a Dask scheduler; yields its ``tcp://`` address. It takes
    every connection and, with ``reply``, sends it and closes (an HTTP server's answer to Dask's first bytes);
    without, it holds the connection and never says a word, not even to an HTTP request (a stalled scheduler)."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed: the test is over
                return
            if reply is None:
                held.append(conn)
            else:
                with conn:
                    conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(5)
        for conn in held:
            conn.close()


QUICK_CONNECT = {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"}  # the 30 s a --scheduler has to answer


@pytest.mark.timeout(60)
def test_a_scheduler_address_that_takes_the_connection_and_never_answers_fails_within_the_connect_timeout(
    make_raster, make_model, write_workflow
):
    """A reviewer's: a service that accepts and waits (then python -m http.server) left tilemask run waiting forever in
    distributed's handshake, whose read has no timeout. It may be a stalled scheduler too: exit 1."""
    path, _ = make_raster((3, 50, 50))
    weights, _ = make_model()
    with tcp_service(reply=None) as address:
        start = time.monotonic()
        proc = run_cli("-q", "run", write_workflow(raster_workflow(path, weights)), "--scheduler", address,
                       env=QUICK_CONNECT, timeout=40)  # fmt: skip
        took = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("tilemask: error:") and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert address in proc.stderr and "did not answer as a Dask scheduler within 2 s" in proc.stderr
    assert took < 20


@pytest.mark.timeout(30)
def test_a_jobs_recorded_scheduler_that_never_answers_reads_as_gone_within_the_timeout():
    """``tilemask status`` and ``cancel`` ask a job's recorded scheduler about its driver; a port another service
    took since (one that holds the connection and says nothing) held them in distributed's handshake. One that
    says nothing is :data:`UNANSWERED` (``status`` says so: a stalled scheduler, its driver perhaps running on);
    one that answers something else has no such task."""
    from tilemask.jobs import UNANSWERED, driver_state

    for reply, state in ((None, UNANSWERED), (b"HTTP/1.1 400 Bad Request\r\n\r\n", None)):
        with tcp_service(reply=reply) as address:
            start = time.monotonic()
            assert driver_state(address, "tilemask-driver-x", timeout=1.0) == state
            assert time.monotonic() - start < 10, reply


@pytest.mark.timeout(60)
def test_a_scheduler_address_where_something_else_answers_is_refused(make_raster, make_model, write_workflow):
    """A reviewer's: a service that answers other bytes (the dashboard's HTTP port by mistake) ended as
    'MemoryError: Unable to allocate 3.07 EiB' (its 'HTTP/1.1' read as the length of Dask's first message). It is
    not a scheduler's address, and trying again will not make it one: exit 2."""
    path, _ = make_raster((3, 50, 50))
    weights, _ = make_model()
    with tcp_service(reply=b"HTTP/1.1 400 Bad Request\r\n\r\n") as address:
        proc = run_cli("-q", "run", write_workflow(raster_workflow(path, weights)), "--scheduler", address,
                       env=QUICK_CONNECT, timeout=40)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("tilemask: error:") and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert f"--scheduler {address}: not a Dask scheduler" in proc.stderr and "MemoryError" not in proc.stderr


@pytest.mark.timeout(60)
def test_the_real_dashboards_port_is_refused_as_no_scheduler(client):
    """A first-contact user's: ``--scheduler`` at a real Dask dashboard's port (the scheduler's HTTP server). Unlike
    the server above, it answers nothing to Dask's first bytes (it waits for the end of an HTTP request), so it read
    as a stalled scheduler: exit 1 after the whole connect timeout, where the README names the dashboard's port an
    address that is not a scheduler's (exit 2)."""
    from urllib.parse import urlsplit

    from tilemask.cluster import scheduler_client
    from tilemask.errors import UsageError

    address = f"tcp://127.0.0.1:{urlsplit(client.dashboard_link).port}"
    start = time.monotonic()
    with pytest.raises(UsageError, match=f"^scheduler='{address}': not a Dask scheduler: an HTTP server answered"):
        scheduler_client(address, timeout=10, set_as_default=False)
    assert time.monotonic() - start < 8  # a real scheduler answers at once: the HTTP question waits 3 s


@pytest.mark.timeout(60)
def test_a_scheduler_address_of_an_unknown_scheme_is_refused(make_raster, make_model, write_workflow):
    """A reviewer's: 'nonsense://x' ended as a ValueError from distributed, exit 1; it is no address (exit 2)."""
    path, _ = make_raster((3, 50, 50))
    weights, _ = make_model()
    proc = run_cli("-q", "run", write_workflow(raster_workflow(path, weights)), "--scheduler", "nonsense://x",
                   timeout=40)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("tilemask: error: --scheduler nonsense://x: not a Dask scheduler address: unknown "
                                  "address scheme 'nonsense'"), proc.stderr  # fmt: skip


@pytest.mark.slow  # a real TLS scheduler and worker
@pytest.mark.timeout(180)
def test_a_tls_scheduler_takes_the_dask_configs_tls_settings_and_without_them_is_one_line(
    make_raster, make_model, write_workflow, tmp_path
):
    """A reviewer's: ``--scheduler tls://...`` with no TLS settings ended as distributed's bare 'TypeError: TLS
    expects a `ssl_context` argument', and a missing certificate as 'FileNotFoundError', both exit 1. They are
    settings to give: one line naming them, exit 2. With Dask's own TLS keys the run completes on the cluster."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True, timeout=60)  # fmt: skip
    tls = {"distributed.comm.tls.ca-file": str(cert)}
    for who in ("scheduler", "worker", "client"):
        tls |= {f"distributed.comm.tls.{who}.cert": str(cert), f"distributed.comm.tls.{who}.key": str(key)}
    path, _ = make_raster((3, 100, 100))
    weights, _ = make_model()
    workflow = write_workflow(raster_workflow(path, weights))
    gone = tmp_path / "gone.pem"
    with dask_cluster(tmp_path, 1, "--protocol", "tls", config=tls) as (address, _):
        assert address.startswith("tls://")
        bare = run_cli("-q", "run", workflow, "--scheduler", address, timeout=60)
        missing = run_cli("-q", "run", workflow, "--scheduler", address,
                          env=dask_variables({**tls, "distributed.comm.tls.client.key": gone}), timeout=60)  # fmt: skip
        assert not (tmp_path / "out").exists()
        ran = run_cli("-q", "run", workflow, "--scheduler", address, env=dask_variables(tls), timeout=120)
    for refused in (bare, missing):
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.startswith(f"tilemask: error: --scheduler {address}: ") and refused.stderr.count("\n") == 1
        assert "Error" not in refused.stderr
    assert "no TLS settings for the client: set distributed.comm.tls.ca-file" in bare.stderr
    assert f"no such file for TLS: distributed.comm.tls.client.key ({gone})" in missing.stderr
    assert ran.returncode == 0, ran.stderr
    group = zarr.open_group(tmp_path / "out" / f"{path.stem}_mask.zarr", mode="r")
    assert group.attrs["tilemask"]["complete"] and group["labels"].shape == (100, 100)


@pytest.mark.slow  # the real dask scheduler and workers of dask_processes take ~10 s to start
@pytest.mark.timeout(120)
def test_a_workers_address_is_refused_and_the_schedulers_connects(dask_processes):
    """A Dask worker answers Dask's handshake, but is no scheduler: one line, exit 2 (was 'TypeError:
    Worker.identity() got an unexpected keyword argument', exit 1). The scheduler's own address connects."""
    from tilemask.cluster import cluster_client
    from tilemask.errors import UsageError

    with cluster_client(dask_processes) as client:
        worker = sorted(client.scheduler_info(n_workers=-1)["workers"])[0]
    with pytest.raises(UsageError, match="not a Dask scheduler: a Dask server answered there, but not a scheduler"):
        with cluster_client(worker):
            pass


def test_workers_count_the_seconds_of_each_stage(make_raster, make_model, tmp_path, client):
    """What benchmarks/bench_engine.py's breakdown reads: every stage of a run adds to its worker's counters."""
    import tilemask
    from tilemask import Workflow, timing

    def totals(snapshot) -> dict[str, float]:
        return timing.totals(client.run(snapshot))

    path, _ = make_raster((3, 200, 230))
    weights, _ = make_model()
    before, before_cpu = totals(timing.snapshot), totals(timing.cpu_snapshot)
    tilemask.run(Workflow.from_dict(raster_workflow(path, weights), base_dir=tmp_path), client)
    after, after_cpu = totals(timing.snapshot), totals(timing.cpu_snapshot)
    stages = ("read", "preprocess", "model", "accumulate", "blend", "write", "probe: network", "probe: first window")
    for stage in stages:
        assert after.get(stage, 0.0) > before.get(stage, 0.0), stage
    assert "probe: import" in after and "probe: device" in after
    for stage in ("read", "preprocess", "accumulate", "blend", "write"):  # CPU seconds too, never above the wall's
        assert 0.0 < after_cpu[stage] - before_cpu.get(stage, 0.0) <= after[stage] - before.get(stage, 0.0) + 0.01
    assert "model" not in after_cpu  # its passes run on the runner's threads
    assert after_cpu[timing.ZARR_THREADS] > before_cpu.get(timing.ZARR_THREADS, 0.0)  # the Zarr output's chunks


@pytest.mark.parametrize("dashboard", [True, False])
def test_the_embedded_dashboard_and_profiler_run_only_when_someone_can_look(dashboard):
    """The CLI asks for them when it shows progress (it prints the link); under --quiet neither starts."""
    import urllib.error
    import urllib.request

    from tilemask.cluster import cluster_client

    with cluster_client(workers=1, threads_per_worker=1, dashboard=dashboard) as client:
        profiling = client.run(lambda: __import__("dask").config.get("distributed.worker.profile.enabled"))
        ticks = client.run(lambda dask_worker: dask_worker._tick_interval)  # the event loop's health tick, s
        numbered = client.run(lambda: __import__("os").environ.get("TILEMASK_GPU_PER_WORKER"))  # worker i: GPU i
        link = client.dashboard_link  # the scheduler's HTTP server on a free port: the dashboard's pages or none
        assert link.startswith("http://127.0.0.1:") and not link.startswith("http://127.0.0.1:8787/")
        try:
            with urllib.request.urlopen(link, timeout=10) as page:
                status = page.status
        except urllib.error.HTTPError as exc:
            status = exc.code
    assert list(profiling.values()) == [dashboard]
    assert list(ticks.values()) == [0.02 if dashboard else 1.0]  # Dask's default, or every second
    assert list(numbered.values()) == ["1"]  # only the embedded workers: dask-cuda's each see their GPU as 0
    assert status == (200 if dashboard else 404)


def _faults_of_buffers_on_a_new_thread() -> int:
    """Page faults per cycle of a thread that takes eight 12 MB buffers from glibc, fills and frees them, as
    the compute thread does with a forward pass's activations (after three cycles to warm up)."""
    import ctypes
    import resource
    import threading

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    size, faults = 12 << 20, []

    def cycle() -> None:
        buffers = [libc.malloc(size) for _ in range(8)]
        for buffer in buffers:
            libc.memset(buffer, 1, size)
        for buffer in reversed(buffers):
            libc.free(buffer)

    def cycles() -> None:
        for _ in range(3):
            cycle()
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(5):
            cycle()
        faults.append((resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) // 5)

    thread = threading.Thread(target=cycles)
    thread.start()
    thread.join()
    return faults[0]


@pytest.mark.slow  # a worker process timing page faults (7 s)
def test_a_workers_threads_reuse_freed_buffers_instead_of_faulting_them_in_again():
    """glibc unmaps a thread arena's empty heaps: every forward pass faulted its activations in again (2.5
    million faults, 15% of the model's time in a 1,800-window run) until the worker setup padded the heaps."""
    from distributed import Client, LocalCluster

    from tilemask.cluster import prepare_workers

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            (before,) = client.run(_faults_of_buffers_on_a_new_thread).values()
            prepare_workers(client)
            (after,) = client.run(_faults_of_buffers_on_a_new_thread).values()
    assert before > 5000  # 96 MB of buffers in 4 kB pages, faulted in again on every cycle
    assert after < 100


class SlowToRead:
    """A task result that takes ``seconds`` to unpickle on the client: a result that takes that long to arrive."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __reduce__(self):
        return (_arrive_slowly, (self.seconds,))


def _arrive_slowly(seconds: float) -> SlowToRead:
    import time

    time.sleep(seconds)
    return SlowToRead(seconds)


@pytest.mark.timeout(60)
def test_a_result_that_takes_seconds_to_arrive_is_read_once(client):
    """A chunk's polygons (a million features) took over a second to reach the client; waiting in 1 s slices
    dropped the transfer at each slice and began it again, for ever (a first-contact review's hang)."""
    import time

    from tilemask.cluster import result_of

    future = client.submit(SlowToRead, 1.5, pure=False)
    begin = time.monotonic()
    assert isinstance(result_of(client, future), SlowToRead)
    assert time.monotonic() - begin < 20


class SwallowsACtrlC:
    """A Ctrl-C in a ``__del__``: Python prints the ``KeyboardInterrupt`` raised there ("Exception ignored in") and
    goes on."""

    def __del__(self):
        signal.raise_signal(signal.SIGINT)  # to this thread: its handler runs before this returns


def test_an_error_a_ctrl_c_caused_is_the_ctrl_c():
    """A Ctrl-C while pydantic built a workflow model's schema (0.4 s into a fresh-clone CI's ``run``) came out as
    ``tilemask: error: SchemaError: Error building "function-after" validator``, exit 1: pydantic-core wraps what
    a validator raises. An error raised once the command was asked to stop is the stop (exit 130)."""
    from tilemask.interrupts import stop_signals

    with pytest.raises(KeyboardInterrupt):
        with stop_signals():
            try:
                signal.raise_signal(signal.SIGINT)  # to this thread: its handler raises here
            except KeyboardInterrupt as exc:
                raise RuntimeError("Error building validator") from exc  # as pydantic-core's SchemaError
    with pytest.raises(RuntimeError):  # no stop asked: the error itself
        with stop_signals():
            raise RuntimeError("a failure")


def test_an_item_waiting_on_the_cluster_stops_at_a_ctrl_c_python_swallowed(client):
    """A run's items check for a stop each time they wait on the cluster, so a Ctrl-C lost so in the command's
    main thread still stops the run before it publishes anything (``test_trust`` has one lost while the command
    starts)."""
    import contextvars
    import uuid

    from distributed import Event

    from tilemask.cluster import abandon_on, completed
    from tilemask.interrupts import stop_signals

    released = Event(f"release-{uuid.uuid4().hex}", client=client)  # a task that waits for it, a worker's thread held
    future = client.submit(lambda name: Event(name).wait(60), released.name, pure=False)
    item = contextvars.copy_context()
    item.run(abandon_on, threading.Event())
    try:
        with pytest.raises(KeyboardInterrupt):  # the command, once its items have stopped
            with stop_signals():
                SwallowsACtrlC()
                with pytest.raises(KeyboardInterrupt):  # the item
                    item.run(lambda: list(completed(client, [future])))
        assert not future.done()
    finally:
        released.set()  # the shared cluster's worker is free again
        future.result(timeout=30)


@pytest.mark.slow  # two interpreters importing dask-jobqueue (5 s); test_slurm.py interrupts a real SLURM run
def test_importing_dask_jobqueue_for_slurm_keeps_the_commands_ctrl_c():
    """Importing ``dask_jobqueue`` sets SIGINT's handler to ``sys.exit()``: a Ctrl-C of a ``--cluster slurm`` run
    exited 0, recorded as a failure (a reviewer's, on a real SLURM). tilemask imports it keeping its own handler.
    Each in a fresh interpreter: the import does this once."""
    import subprocess
    import sys

    check = "import signal; {imports}; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    bare = subprocess.run([sys.executable, "-c", check.format(imports="import dask_jobqueue")],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    ours = subprocess.run([sys.executable, "-c", check.format(
        imports="from tilemask.cluster import slurm_cluster_class; slurm_cluster_class()")],
        capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (bare.stdout.strip(), ours.stdout.strip()) == ("False", "True"), (bare.stderr, ours.stderr)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("closed", ["client", "cluster"])
def test_a_closed_client_is_refused_in_one_line_before_a_job_is_made(make_raster, make_model, tmp_path, closed):
    """A notebook's client closed (or its cluster, which closes it): ``tilemask.run(workflow, client)`` failed
    with ``AttributeError: 'NoneType' object has no attribute 'address'`` and left a job folder that
    ``tilemask jobs`` listed as queued for ever."""
    from distributed import LocalCluster

    import tilemask
    from tilemask.errors import UsageError

    path, _ = make_raster((3, 64, 64))
    weights, _ = make_model()
    workflow = tilemask.Workflow.from_dict(raster_workflow(path, weights), base_dir=tmp_path)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        client = Client(cluster, set_as_default=False)
        (client if closed == "client" else cluster).close()
        with pytest.raises(UsageError) as refused:
            tilemask.run(workflow, client)
        client.close()
    assert str(refused.value).startswith("the Dask client is closed"), str(refused.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(60)
def test_a_schedulers_address_given_as_the_client_says_to_give_it_as_scheduler(make_raster, make_model, tmp_path):
    """``tilemask.run(workflow, "tcp://host:8786")``, as ``Client("tcp://host:8786")`` reads: it failed with
    ``AttributeError: 'str' object has no attribute 'scheduler'``."""
    import tilemask
    from tilemask.errors import UsageError

    path, _ = make_raster((3, 64, 64))
    weights, _ = make_model()
    workflow = tilemask.Workflow.from_dict(raster_workflow(path, weights), base_dir=tmp_path)
    with pytest.raises(UsageError) as refused:
        tilemask.run(workflow, "tcp://127.0.0.1:8786")
    assert str(refused.value) == ("client: a distributed.Client, not str 'tcp://127.0.0.1:8786' (tilemask.run takes "
                                  "a scheduler's address as scheduler=)"), str(refused.value)  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argument, message", [
    ({"cluster": "bogus"}, "cluster must be one of local, slurm, not 'bogus'"),
    ({"workers": 0}, "workers must be a positive integer, not 0"),
    ({"workers": "2"}, "workers must be a positive integer, not '2'"),
    ({"threads_per_worker": 1.5}, "threads_per_worker must be a positive integer, not 1.5"),
    ({"scheduler": 8786}, "scheduler: a Dask scheduler's address (tcp://HOST:PORT), not 8786"),
    ({"overwrite": "no"}, "overwrite must be True or False, not 'no'"),
    ({"progress": "no"}, "progress must be True or False, not 'no'"),  # a reviewer's: it showed the bars
    ({"on_error": "ignore"}, "on_error must be one of abort, skip (got 'ignore')"),  # a ValueError too
    ({"scheduler": " "}, "scheduler is empty: give the Dask scheduler's address (tcp://HOST:PORT)"),
    ({"cluster": "slurm", "scheduler": "tcp://127.0.0.1:1"}, "cluster='slurm' starts its own scheduler; leave out "
                                                             "scheduler"),
    ({"scheduler": "tcp://127.0.0.1:99999"}, "scheduler='tcp://127.0.0.1:99999': not a Dask scheduler address: "
                                             "port 99999 is out of range (1-65535)"),
    ({"scheduler": "tcp://127.0.0.1:1", "workers": 2}, "workers applies to the cluster tilemask starts, not to one "
                                                      "given by scheduler: leave it out"),
    ({"scheduler": "tcp://127.0.0.1:1", "workers": 2, "threads_per_worker": 1},
     "workers and threads_per_worker apply to the cluster tilemask starts, not to one given by scheduler: leave "
     "them out"),
])  # fmt: skip
def test_python_arguments_the_command_would_refuse_are_refused_before_a_job_is_made(make_raster, make_model, tmp_path,
                                                                                   argument, message):  # fmt: skip
    """From Python, ``cluster="bogus"``, ``workers=0`` and ``threads_per_worker=0`` ran an embedded cluster of the
    default size, ``overwrite="no"`` replaced every output; ``workers="2"`` was a ``TypeError`` from distributed,
    ``scheduler=8786`` an ``AttributeError``. The command's options never reach these (click checks them).
    ``workers=`` beside ``scheduler=`` was dropped without a word (the cluster there has its own workers)."""
    import tilemask
    from tilemask.errors import UsageError

    path, _ = make_raster((3, 64, 64))
    weights, _ = make_model()
    workflow = tilemask.Workflow.from_dict(raster_workflow(path, weights), base_dir=tmp_path)
    with pytest.raises(UsageError) as refused:
        tilemask.run(workflow, **argument)
    assert (str(refused.value), refused.value.exit_status) == (message, 2)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # 28 s in a loaded default run (2026-12-07)
@pytest.mark.timeout(120)
def test_a_script_that_runs_at_its_top_level_is_told_to_guard_it(make_raster, make_model, write_workflow, tmp_path):
    """A script calling ``tilemask.run`` outside ``if __name__ == "__main__":``: each embedded worker imports it as
    it starts and called it again.  The worker exits in one line saying so and the script gets one error, where
    it got distributed's "Nanny failed to start" after a job "running in another process", in two tracebacks."""
    path, _ = make_raster((3, 64, 64))
    weights, _ = make_model()
    workflow = write_workflow(raster_workflow(path, weights))
    script = tmp_path / "unguarded.py"
    script.write_text(f"import tilemask\ntilemask.run({str(workflow)!r}, workers=1)\n")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=100)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if "Warning" not in line]
    assert 'tilemask: error: tilemask.run was called again as a new worker process imported your script: call it ' \
           'under if __name__ == "__main__":' in lines[0]
    assert lines[-1].startswith("tilemask.errors.RunError: the embedded cluster's workers did not start")
    # a script has no --debug: it is told what shows the workers' logs in Python (it was "--debug shows why")
    assert lines[-1].endswith("; logging at DEBUG shows why: logging.basicConfig(level=logging.DEBUG))")
    assert "Nanny failed" not in done.stderr and "running in another process" not in done.stderr
    # a script read from standard input, guarded: the workers cannot import it, and it is told so, not to guard it
    guarded = f"import tilemask\nif __name__ == '__main__':\n    tilemask.run({str(workflow)!r}, workers=1)\n"
    done = subprocess.run([sys.executable, "-"], input=guarded, cwd=tmp_path, capture_output=True, text=True,
                          timeout=100)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        "tilemask.errors.RunError: the embedded cluster's workers did not start: they import the script that started "
        "them, and <stdin> is no file (a script read from standard input): save it to a file, or give tilemask.run a "
        "scheduler")
    # a cluster that fails to start for another reason still says it (a reviewer's: it took this line)
    missing = {"DASK_DISTRIBUTED__SCHEDULER__PRELOAD": '["no_such_xyz"]'}
    preload = run_cli("run", workflow, "--workers", "1", env=missing)
    assert preload.returncode == 1 and "No module named 'no_such_xyz'" in preload.stderr, preload.stderr


@pytest.mark.timeout(60)
def test_workers_beside_a_client_are_refused_before_a_job_is_made(make_raster, make_model, tmp_path, client):
    """``tilemask.run(workflow, client, workers=4)`` ran on the client's cluster as it is, the 4 dropped without a
    word: a caller who meant to size the cluster is told, before a job folder is made."""
    import tilemask
    from tilemask.errors import UsageError

    path, _ = make_raster((3, 64, 64))
    weights, _ = make_model()
    workflow = tilemask.Workflow.from_dict(raster_workflow(path, weights), base_dir=tmp_path)
    with pytest.raises(UsageError) as refused:
        tilemask.run(workflow, client, threads_per_worker=2)
    assert str(refused.value) == ("threads_per_worker applies to the cluster tilemask starts, not to one given by "
                                  "client: leave it out")  # fmt: skip
    # so are a scheduler and a cluster kind, dropped as silently (a review); a list of workflows was a TypeError
    for argument, given in ((dict(scheduler="tcp://127.0.0.1:1"), "scheduler='tcp://127.0.0.1:1'"),
                            (dict(cluster="slurm"), "cluster='slurm'")):  # fmt: skip
        with pytest.raises(UsageError) as refused:
            tilemask.run(workflow, client, **argument)
        name = given.split("=")[0]
        assert str(refused.value) == f"{given} and a client: the client's cluster runs the work; leave {name} out"
    with pytest.raises(UsageError, match=r"^workflow: a Workflow, a workflow file or the mapping one holds, not list"):
        tilemask.run([str(tmp_path / "w.yaml")], client)
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(120)
def test_a_workflow_given_as_a_dict_runs_as_workflow_from_dict_reads_it(make_raster, make_model, tmp_path, client,
                                                                       monkeypatch):  # fmt: skip
    """``tilemask.run({...}, client)``, the mapping a YAML file holds: it failed with ``TypeError: expected str,
    bytes or os.PathLike object, not dict``. Its relative paths are the working folder's, as ``from_dict``'s."""
    import tilemask

    path, _ = make_raster((3, 64, 64))
    weights, _ = make_model()
    monkeypatch.chdir(tmp_path)
    (result,) = tilemask.run(raster_workflow(path.name, weights.name, output={"path": "out/{stem}.zarr"}), client)
    assert result.status == "ok" and result.outputs[0] == str(tmp_path / "out" / f"{path.stem}.zarr")


@pytest.mark.slow  # a `dask scheduler` and a `dask worker` (10 s)
def test_a_scheduler_file_is_taken_as_its_schedulers_address(make_raster, make_model, write_workflow, tmp_path):
    """A reviewer's: ``--scheduler`` given the scheduler file that ``dask scheduler --scheduler-file`` writes (and
    ``dask worker --scheduler-file`` reads) was refused ("missing port number"). Its address is taken; one not
    there yet is waited for, as ``dask worker`` waits (it was refused at once: a review); a file that is no scheduler
    file is one line, exit 2."""
    path, _ = make_raster()
    weights, _ = make_model()
    workflow = write_workflow(raster_workflow(path, weights))
    with dask_cluster(tmp_path, 1) as (address, _):
        done = run_cli("run", workflow, "--scheduler", tmp_path / "scheduler.json", "--quiet")
        assert done.returncode == 0, done.stderr
        (job,) = [line.split()[0] for line in run_cli("jobs").stdout.splitlines()]
        assert run_cli("status", job, "--json").stdout.count(f'"scheduler": "{address}"') == 1
        later = threading.Timer(3.0, shutil.copy, (tmp_path / "scheduler.json", tmp_path / "later" / "s.json"))
        (tmp_path / "later").mkdir()
        later.start()
        done = run_cli("run", workflow, "--scheduler", tmp_path / "later" / "s.json", "--quiet", "--overwrite")
        later.join()
        assert done.returncode == 0, done.stderr
    (tmp_path / "other.json").write_text('{"type": "Worker"}')
    done = run_cli("run", workflow, "--scheduler", tmp_path / "other.json")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"tilemask: error: Invalid value for '--scheduler': {tmp_path / 'other.json'}: not "
                                   "a Dask scheduler file: it names no address")  # fmt: skip


_INTERRUPTED_AS_IT_STARTS = """
import os, subprocess, sys, threading, time
import psutil
import tilemask

def children():  # the cluster's processes: Pythons other than multiprocessing's resource tracker
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            alive = p.status() != psutil.STATUS_ZOMBIE
            if alive and "python" in p.name() and "resource_tracker" not in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:  # gone meanwhile
            pass
    return found

if __name__ == "__main__":
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()  # an idle thread, as a notebook has
    workflow = tilemask.Workflow.from_yaml(sys.argv[1])
    tilemask.run(workflow, overwrite=True)  # the imports done: the next runs start their cluster at once
    for delay in (0.1, 0.2, 0.3, 0.4):
        subprocess.Popen(["sh", "-c", f"sleep {delay}; kill -INT {os.getpid()}"])
        try:
            tilemask.run(workflow, overwrite=True)
            print("finished", flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        deadline = time.monotonic() + 20
        while children() and time.monotonic() < deadline:
            time.sleep(0.2)
        print("left running:", len(children()), flush=True)
"""


@pytest.mark.slow  # five embedded clusters started in one interpreter (30 s)
def test_a_ctrl_c_as_the_embedded_cluster_starts_leaves_no_process(make_raster, make_model, write_workflow, tmp_path):
    """A reviewer's: a SIGINT in ``tilemask.run``'s first half second, as a notebook's "interrupt kernel" sends it
    while a thread of its own idles, raised KeyboardInterrupt half-way through starting the embedded cluster; its
    scheduler, nanny and 250 MB worker process stayed until the interpreter exited. It is raised once the cluster
    stands, which is closed."""
    path, _ = make_raster()
    weights, _ = make_model()
    workflow = write_workflow(raster_workflow(path, weights, output={"path": str(tmp_path / "{stem}.zarr")}))
    (tmp_path / "interrupt.py").write_text(_INTERRUPTED_AS_IT_STARTS)
    done = subprocess.run([sys.executable, str(tmp_path / "interrupt.py"), str(workflow)], capture_output=True,
                          text=True, timeout=240)  # fmt: skip
    said = done.stdout.split("\n")
    assert said.count("interrupted") == 4, done.stdout + done.stderr
    assert said.count("left running: 0") == 4, done.stdout + done.stderr


def test_an_asynchronous_client_and_the_statistics_clients_are_refused_before_any_work(make_raster, make_model,
                                                                                       tmp_path, client):
    """A reviewer's: an asynchronous Client (``await``-ed in Jupyter) was a coroutine's AttributeError and left a
    failed job; ``compute_stats`` and ``evaluate_paths`` took a closed client or an address as a client and failed
    inside Dask. Each is one UsageError, no job and no table."""
    import asyncio

    from distributed import LocalCluster

    import tilemask
    from tilemask.errors import UsageError
    from tilemask.stats import compute_stats, evaluate_paths

    path, _ = make_raster((3, 64, 64))
    weights, _ = make_model()
    workflow = tilemask.Workflow.from_dict(raster_workflow(path, weights), base_dir=tmp_path)
    labels = tilemask.run(workflow, client)[0].outputs[0]
    table = tmp_path / "table.csv"

    async def asynchronous() -> list[str]:
        async with LocalCluster(n_workers=1, processes=False, asynchronous=True, dashboard_address=":0") as cluster:
            async with Client(cluster, asynchronous=True) as given:
                return [_refusal(lambda: call(given)) for call in (
                    lambda c: tilemask.run(workflow.model_copy(update={"output": workflow.output.model_copy(
                        update={"path": str(tmp_path / "async" / "{stem}.zarr")})}), c),
                    lambda c: compute_stats(labels, table, client=c),
                    lambda c: evaluate_paths(labels, labels, client=c),
                )]  # fmt: skip

    asynchronous_said = asyncio.run(asynchronous())
    assert set(asynchronous_said) == {"the Dask client is asynchronous (asynchronous=True), which tilemask cannot "
                                      "wait on: give a synchronous one, or none"}, asynchronous_said  # fmt: skip
    assert not (tmp_path / "async").exists()
    closed = Client(client.cluster, set_as_default=False)
    closed.close()
    for given, said in ((closed, "the Dask client is closed: give a running one"),
                        ("tcp://127.0.0.1:8786", "client: a distributed.Client, not str 'tcp://127.0.0.1:8786'")):
        for call in (lambda: compute_stats(labels, table, client=given), lambda: evaluate_paths(labels, labels,
                                                                                               client=given)):
            with pytest.raises(UsageError, match=f"^{said}"):
                call()
    assert not table.exists()


def _refusal(call) -> str:
    from tilemask.errors import UsageError

    try:
        call()
    except UsageError as exc:
        return str(exc)
    return "not refused"


@pytest.mark.timeout(120)
def test_a_run_inside_a_dask_task_without_a_client_is_refused_not_hung(make_raster, make_model, tmp_path, client):
    """A reviewer's: ``tilemask.run(workflow)`` inside a Dask task started an embedded cluster, which a worker's
    process (daemonic: its nanny's child) may not, and hung without a word. It is one UsageError naming the way:
    the worker's own client."""
    import tilemask

    path, _ = make_raster((3, 64, 64))
    weights, _ = make_model()
    workflow = tilemask.Workflow.from_dict(raster_workflow(path, weights), base_dir=tmp_path)

    def inside(workflow) -> str:
        import tilemask

        try:
            tilemask.run(workflow)
        except tilemask.TilemaskError as exc:
            return f"{type(exc).__name__}: {exc}"
        return "ran"

    said = client.submit(inside, workflow, pure=False).result(timeout=90)
    assert said == ("UsageError: tilemask cannot start its cluster inside a Dask task: a worker's process may start "
                    "none of its own; give the worker's, client=distributed.get_client()"), said
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore:Sending large graph")
def test_a_client_close_that_times_out_after_a_stop_leaves_the_stop_as_it_was(tmp_path):
    """A stop (KeyboardInterrupt) while the scheduler cannot answer: the client's close times out, and is a warning,
    not the command's outcome (a SIGTERM during an embedded scheduler's ordering of a million tasks ended as
    "TimeoutError: timed out after 60 s.", exit 1)."""
    import dask

    from tilemask.cluster import cluster_client

    process, address = start_scheduler(tmp_path)
    try:
        with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
            started = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                with cluster_client(scheduler=address) as client:
                    assert client.status == "running"
                    process.send_signal(signal.SIGSTOP)  # a scheduler that no longer reads what it is sent
                    client.submit(len, b"x" * (64 << 20))  # more than its socket takes: the close waits to send it
                    started = time.monotonic()
                    raise KeyboardInterrupt
        assert time.monotonic() - started < 30
    finally:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        process.wait(10)



@pytest.mark.slow  # 16 s in a loaded default run (2026-12-07)
@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:Sending large graph")
@pytest.mark.parametrize("stops", [1, 2])
def test_a_stop_during_a_close_that_fails_is_kept_and_a_second_cuts_the_close_short(tmp_path, stops):
    """A command's work done, its client's close waits on a scheduler that no longer answers: a Ctrl-C then was
    lost once the close failed (a warning), and the command exited 0. It is raised after the close; a second
    one cuts the close short (it would wait 2 x ``distributed.comm.timeouts.connect``)."""
    import os

    import dask

    from tilemask.cluster import cluster_client
    from tilemask.interrupts import stop_signals

    process, address = start_scheduler(tmp_path)

    def press() -> None:
        for _ in range(stops):
            time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGINT)

    try:
        with dask.config.set({"distributed.comm.timeouts.connect": "5s"}):  # the close: 10 s at most
            with pytest.raises(KeyboardInterrupt):
                with stop_signals(), cluster_client(scheduler=address) as client:
                    process.send_signal(signal.SIGSTOP)
                    client.submit(len, b"x" * (64 << 20))  # more than its socket takes: the close waits to send it
                    started = time.monotonic()
                    threading.Thread(target=press, daemon=True).start()
            took = time.monotonic() - started
        assert took > 9 if stops == 1 else took < 4
    finally:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        process.wait(10)

@pytest.mark.timeout(120)
def test_a_second_stop_while_the_embedded_cluster_closes_waits_for_the_close(monkeypatch):
    """A second Ctrl-C as the embedded cluster closed cut the close short, and distributed's own close at exit then
    kept the command 10 s after its "tilemask: interrupted" (a review's two Ctrl-C 0.35 s apart)."""
    import os

    from distributed import LocalCluster

    from tilemask.cluster import cluster_client
    from tilemask.interrupts import stop_signals

    close = LocalCluster.close

    def stopped_again(cluster, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, as the close begins
        return close(cluster, *args, **kwargs)

    monkeypatch.setattr(LocalCluster, "close", stopped_again)
    cluster = None
    try:
        with pytest.raises(KeyboardInterrupt):
            with stop_signals(), cluster_client(workers=1, threads_per_worker=1) as client:
                cluster = client.cluster
                raise KeyboardInterrupt  # the first
        assert cluster.status.name == "closed"
    finally:
        if cluster is not None and cluster.status.name != "closed":
            close(cluster)


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_a_worker_restarted_after_a_no_worker_timeout_of_steady_progress_does_not_fail_the_wait():
    """The wait's worker check ran only between results: in a run whose results came steadily for longer than
    ``tilemask.no-workers-timeout``, a worker killed (and restarted by its nanny in seconds) failed it at once with
    "no worker for 60 s".  The limit now counts from the last result."""
    import os

    import dask
    from distributed import LocalCluster

    from tilemask.cluster import completed

    with dask.config.set({"tilemask.no-workers-timeout": 6}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:  # fmt: skip
        client.wait_for_workers(1)
        futures = [client.submit(time.sleep, 0.05, key=f"nap-{i}") for i in range(300)]
        started, killed = time.monotonic(), None
        for n, _ in enumerate(completed(client, futures), 1):
            if killed is None and time.monotonic() - started > 7:  # past the limit, results arriving all along
                (pid,) = client.run(os.getpid).values()
                os.kill(pid, signal.SIGKILL)
                killed = n
        assert killed is not None and killed < 300, "the results ended before the worker was killed"
        assert all(f.status == "finished" for f in futures)


@pytest.mark.slow  # 26 s in a loaded default run (2026-12-07)
@pytest.mark.timeout(120)
def test_a_python_run_on_its_embedded_cluster_leaves_the_callers_environment_as_it_was(
    make_raster, make_model, tmp_path, monkeypatch
):
    """Dask's nanny sets its workers' variables (``distributed.nanny.pre-spawn-environ``: OMP_NUM_THREADS=1, ...)
    in the process that runs it; ``tilemask.run`` without a client left them in the caller's: a notebook's
    ``import torch`` after it got one thread instead of the cores (1 of 2 here), and so did every process it
    started later."""
    import os

    import tilemask

    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_", "PYTHONHASHSEED",
            "__DASK_PARENT_PID")  # fmt: skip
    for key in keys:
        monkeypatch.delenv(key, raising=False)  # put back as they were after the test, whatever it finds
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")  # one the caller set is kept as it is
    path, _ = make_raster((3, 64, 64))
    weights, _ = make_model()
    workflow = tilemask.Workflow.from_dict(raster_workflow(path, weights), base_dir=tmp_path)
    (result,) = tilemask.run(workflow, workers=1, threads_per_worker=1)
    assert result.status == "ok"
    assert {key: os.environ.get(key) for key in keys} == {key: "2" if key == "OPENBLAS_NUM_THREADS" else None
                                                          for key in keys}  # fmt: skip


@pytest.mark.timeout(30)
def test_tilemask_run_shows_the_keywords_it_takes():
    """``tilemask.run`` was ``run(workflow, client=None, **kwargs)``: a notebook's signature help (``help()``, Shift-Tab,
    an IDE) showed none of its options, and its docstring left out ``on_result``, which the README documents. It has
    :func:`tilemask.driver.run`'s parameters, and its docstring names each."""
    import inspect

    import tilemask
    from tilemask import driver

    public, inner = inspect.signature(tilemask.run), inspect.signature(driver.run)
    assert public == inner, (public, inner)
    assert all(f"``{name}``" in tilemask.run.__doc__ for name in list(inner.parameters)[1:]), tilemask.run.__doc__


def nannies_setting(monkeypatch, variables: dict[str, str]) -> None:
    """The embedded cluster's LocalCluster and Client replaced by stand-ins whose start sets ``variables`` in this
    process's environment, as LocalCluster's nannies do as they spawn their workers
    (``os.environ.update(pre_spawn_env)``): what the tests of the caller's environment put back are about."""
    import os

    from tilemask import cluster as cluster_module

    class Nannies:
        def __init__(self, **kwargs):
            os.environ.update(variables)

        def close(self):
            pass

    class Closing:
        def __init__(self, cluster):
            pass

        def forward_logging(self, *args, **kwargs):
            pass

        def close(self):
            pass

    monkeypatch.setattr(cluster_module, "LocalCluster", Nannies)
    monkeypatch.setattr(cluster_module, "Client", Closing)


@pytest.mark.timeout(30)
def test_two_embedded_clusters_at_once_leave_the_callers_environment_as_it_was(monkeypatch):
    """Two ``tilemask.run`` without a client at once (a notebook's, one on a thread of its own): the second read the
    caller's environment while the first cluster's nannies had set OMP_NUM_THREADS=1 in it, and put that back once
    the first had put back the caller's: the variables stayed at 1 after both, as before the environment was kept.
    The cluster here is a stand-in that sets them as a nanny does (``os.environ.update(pre_spawn_env)``)."""
    import os

    from tilemask import cluster as cluster_module

    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONHASHSEED")
    for key in keys:
        monkeypatch.delenv(key, raising=False)

    nannies_setting(monkeypatch, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "6640"})
    first, second = cluster_module.cluster_client(workers=1), cluster_module.cluster_client(workers=1)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the first run ends while the second still runs
    assert os.environ.get("OMP_NUM_THREADS") == "1"  # the second cluster's nannies may still start a worker
    second.__exit__(None, None, None)
    assert {key: os.environ.get(key) for key in keys} == dict.fromkeys(keys), os.environ


@pytest.mark.timeout(30)
def test_tilemask_run_passes_every_argument_on_to_driver_run(monkeypatch):
    """tilemask.run repeats driver.run's parameters (its signature help) and passes each on by name: the test of
    the two signatures alone passed with one left out of the call, which then took driver.run's default
    without a word."""
    import inspect

    import tilemask
    from tilemask import driver

    given = {name: object() for name in inspect.signature(driver.run).parameters}
    received = {}
    monkeypatch.setattr(driver, "run", lambda *args, **kwargs: received.update(
        inspect.signature(tilemask.run).bind(*args, **kwargs).arguments))  # fmt: skip
    workflow, client = given.pop("workflow"), given.pop("client")
    tilemask.run(workflow, client, **given)
    assert received == {"workflow": workflow, "client": client, **given}


@pytest.mark.timeout(30)
def test_an_embedded_cluster_stopped_by_ctrl_c_as_it_closes_leaves_the_callers_environment_as_it_was(monkeypatch):
    """A Ctrl-C while the embedded cluster closes is held and raised once it has (``_close_quietly``): a notebook's
    interrupted ``tilemask.run`` then skipped putting back the caller's variables, and OMP_NUM_THREADS stayed 1."""
    import os

    from tilemask import cluster as cluster_module

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def interrupted(closeable, what):  # the Ctrl-C held while the cluster closed, raised after
        raise KeyboardInterrupt

    nannies_setting(monkeypatch, {"OMP_NUM_THREADS": "1"})
    monkeypatch.setattr(cluster_module, "_close_quietly", interrupted)
    with pytest.raises(KeyboardInterrupt), cluster_module.cluster_client(workers=1):
        assert os.environ["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in os.environ


@pytest.mark.timeout(30)
def test_a_variable_the_caller_sets_while_the_embedded_cluster_runs_is_kept(monkeypatch):
    """The caller's environment is put back as the cluster closes, but a variable set meanwhile (a notebook's other
    thread, ``os.environ["OMP_NUM_THREADS"] = "4"``, between the run's start and end) is the caller's own now, not
    the nannies': it was put back to what it had been before the run."""
    import os

    from tilemask import cluster as cluster_module

    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)

    nannies_setting(monkeypatch, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    with cluster_module.cluster_client(workers=1):
        os.environ["OMP_NUM_THREADS"] = "4"
    assert (os.environ.get("OMP_NUM_THREADS"), os.environ.get("MKL_NUM_THREADS")) == ("4", None)


@pytest.mark.timeout(30)
def test_tilemask_run_s_annotations_add_no_names_to_the_package():
    """tilemask.run's explicit signature imported its annotations' names at the package's top: ``tilemask.os``,
    ``tilemask.Path``, ``tilemask.Callable``, ``tilemask.Mapping`` were offered to a notebook's completion beside
    the API. They are annotations' names only (``from __future__ import annotations``)."""
    import tilemask

    assert not {"os", "Path", "Callable", "Mapping", "TYPE_CHECKING"} & set(vars(tilemask)), sorted(vars(tilemask))


@pytest.mark.slow  # 29 s in a loaded default run (2026-12-07)
@pytest.mark.timeout(180)
def test_a_run_on_a_callers_cluster_leaves_no_plugin_that_stops_a_worker_joining_later(
    make_raster, make_model, tmp_path
):
    """A first-contact review: ``tilemask.run(workflow, client)`` left its worker plugin registered on the caller's
    scheduler, which sent it to every worker that joined later.  One whose environment had no tilemask then failed
    to start (``Nanny failed to start``: ``No module named 'tilemask.cluster'``), stayed listed as a worker, and the
    next ``tilemask.run`` waited for ever asking it what it imports."""
    import tilemask

    path, _ = make_raster((3, 64, 64))
    weights, _ = make_model()
    workflow = tilemask.Workflow.from_dict(raster_workflow(path, weights), base_dir=tmp_path)
    blocked = tmp_path / "no-tilemask"
    blocked.mkdir()
    (blocked / "sitecustomize.py").write_text("import sys\nsys.modules['tilemask'] = None\n")
    with dask_cluster(tmp_path, 1) as (address, procs), Client(address, timeout=30) as client:
        (result,) = tilemask.run(workflow, client)
        assert result.status == "ok", result.error
        plugins = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.worker_plugins))
        assert WorkerSetup.name not in plugins, plugins
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")])}
        late = subprocess.Popen(
            [str(Path(sys.executable).parent / "dask"), "worker", address, "--nthreads", "1", "--no-dashboard",
             "--host", "127.0.0.1", "--name", "late"],
            stdout=open(tmp_path / "logs" / "late.log", "w"), stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )  # fmt: skip
        procs.append(late)
        deadline = time.monotonic() + 60
        while len(client.scheduler_info()["workers"]) < 2:
            assert late.poll() is None, (tmp_path / "logs" / "late.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the late worker did not join"
            time.sleep(0.2)
        answers = client.run(lambda: 1, callback_timeout=30)  # every worker up and answering
        assert sorted(answers.values()) == [1, 1]


def _once_running(tmp_path, act) -> threading.Thread:
    """A thread, started, that calls ``act`` once the job writing under ``tmp_path/out`` says it is running."""
    import json

    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for status in tmp_path.glob("out/.tilemask/jobs/*/status.json"):
                with contextlib.suppress(OSError, ValueError):
                    if json.loads(status.read_text())["state"] == "running":
                        act()
                        return
            time.sleep(0.005)

    thread = threading.Thread(target=watch)
    thread.start()
    return thread


@pytest.mark.timeout(120)
def test_a_client_closed_during_the_run_is_named_so_and_the_job_is_cancelled(make_raster, make_model, tmp_path):
    """A first-contact review: a notebook's client closed while ``tilemask.run(workflow, client)`` ran ended it with
    a bare ``KeyError: 'workers'`` as the workers were prepared (the job recorded failed with the message
    ``'workers'``), or later with ``SchedulerLost: lost the Dask scheduler while running ...``: the scheduler was
    still there.  It is one line naming the closed client, and the job is recorded cancelled, to resume."""
    import json

    from distributed import LocalCluster

    import tilemask
    from tilemask.errors import RunError

    path, _ = make_raster((3, 64, 64))
    weights, _ = make_model()
    workflow = tilemask.Workflow.from_dict(raster_workflow(path, weights), base_dir=tmp_path)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        client = Client(cluster, set_as_default=False)
        closer = _once_running(tmp_path, client.close)
        with pytest.raises(RunError) as failed:
            tilemask.run(workflow, client)
        closer.join()
    assert type(failed.value).__name__ == "ClientClosed", repr(failed.value)
    assert str(failed.value).startswith("the Dask client was closed "), str(failed.value)
    assert str(failed.value).endswith("run it again to resume the job"), str(failed.value)
    (status,) = tmp_path.glob("out/.tilemask/jobs/*/status.json")
    assert json.loads(status.read_text())["state"] == "cancelled"


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_python_takes_a_scheduler_file_as_the_command_does(make_raster, make_model, tmp_path):
    """``tilemask run --scheduler scheduler.json`` reads the file's address (as ``dask worker --scheduler-file``);
    ``tilemask.run(workflow, scheduler="scheduler.json")``, documented as taking the command's options, refused it:
    ``UsageError: scheduler='scheduler.json': not a Dask scheduler address: missing port number in address``.  A
    file that is not there is waited for, then refused by name, as by the command."""
    import dask

    import tilemask
    from tilemask.errors import UsageError

    path, _ = make_raster((3, 64, 64))
    weights, _ = make_model()
    workflow = tilemask.Workflow.from_dict(raster_workflow(path, weights), base_dir=tmp_path)
    with dask_cluster(tmp_path, 1):
        for given_as in (str(tmp_path / "scheduler.json"), tmp_path / "scheduler.json"):
            (result,) = tilemask.run(workflow, scheduler=given_as, overwrite=True)
            assert result.status == "ok", result.error
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), pytest.raises(UsageError) as refused:
        tilemask.run(workflow, scheduler=str(tmp_path / "none" / "scheduler.json"))
    assert str(refused.value) == (f"scheduler: {tmp_path}/none/scheduler.json: no such scheduler file (waited 1 s for "
                                  "a scheduler to write it, as dask worker --scheduler-file waits)")


def _run_in_a_task(workflow):
    from distributed import get_client

    import tilemask

    return [result.status for result in tilemask.run(workflow, get_client())]


@pytest.mark.timeout(120)
def test_a_run_inside_a_task_on_a_single_threaded_worker_does_not_wait_for_ever(make_raster, make_model, tmp_path):
    """A first-contact review: ``tilemask.run(workflow, client=distributed.get_client())`` in a Dask task, as the
    README says to call it there, held the task's thread while it waited on its own tasks: on one worker of one
    thread they never started, and the run waited for ever.  The task's thread leaves the pool for the run, as
    ``distributed.worker_client`` does, and rejoins it after."""
    from distributed import LocalCluster

    import tilemask

    path, _ = make_raster((3, 64, 64))
    weights, _ = make_model()
    workflow = tilemask.Workflow.from_dict(raster_workflow(path, weights), base_dir=tmp_path)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        with Client(cluster, set_as_default=False) as client:
            future = client.submit(_run_in_a_task, workflow, pure=False)
            assert future.result(timeout=60) == ["ok"]
            assert client.submit(lambda: 1, pure=False).result(timeout=10) == 1  # the thread is back in the pool


@pytest.mark.timeout(180)
def test_a_lost_scheduler_under_a_callers_client_is_not_named_a_closed_client(make_raster, make_model, tmp_path):
    """A review: the caller's client closes itself once it has failed to reconnect to a lost scheduler
    (``Failed to reconnect to scheduler after 3.00 seconds, closing client``), and a ``dask scheduler`` killed
    mid-run ended ``tilemask.run(workflow, client)`` with ``ClientClosed: the Dask client was closed during the run``,
    the job recorded cancelled: the caller had closed nothing.  It is the lost scheduler, the job left as it was."""
    import json

    import tilemask
    from tilemask.errors import RunError

    path, _ = make_raster((3, 64, 64))
    weights, _ = make_model()
    workflow = tilemask.Workflow.from_dict(raster_workflow(path, weights), base_dir=tmp_path)
    with dask_cluster(tmp_path, 1) as (address, procs), Client(address, timeout=3) as client:
        killer = _once_running(tmp_path, procs[0].kill)
        with pytest.raises(RunError) as failed:
            tilemask.run(workflow, client)
        killer.join()
    assert type(failed.value).__name__ == "SchedulerLost", repr(failed.value)
    assert str(failed.value).startswith("lost the Dask scheduler"), str(failed.value)
    (status,) = tmp_path.glob("out/.tilemask/jobs/*/status.json")
    assert json.loads(status.read_text())["state"] == "running"


@pytest.mark.timeout(120)
def test_an_embedded_worker_killed_as_its_warnings_are_forwarded_leaves_the_cluster_to_its_nanny(monkeypatch):
    """CI's: ``tilemask run`` of the demo, its embedded worker killed (SIGKILL) half a second after it started,
    failed with ``CommClosedError: in <TCP (closed) ConnectionPool.register_worker_plugin ...>: Stream is closed``,
    exit 1: the worker was killed as the command asked the workers to forward their warnings.  The scheduler keeps
    that plugin, and the worker its nanny starts anew takes it."""
    import os
    import signal

    from distributed import Client as DaskClient

    from tilemask.cluster import cluster_client

    forward = DaskClient.forward_logging

    def killed_first(client, *args, **kwargs):  # the worker killed as it is asked: a real SIGKILL, a real comm
        for pid in client.run(os.getpid).values():
            os.kill(pid, signal.SIGKILL)
        return forward(client, *args, **kwargs)

    monkeypatch.setattr(DaskClient, "forward_logging", killed_first)
    with cluster_client(workers=1) as client:
        client.wait_for_workers(1, timeout=60)
        assert client.submit(lambda: 1, pure=False).result(timeout=60) == 1
        plugins = client.run(lambda dask_worker: list(dask_worker.plugins))
        assert all("forward-logging-tilemask" in names for names in plugins.values()), plugins  # the new worker's


@pytest.mark.timeout(30)
@pytest.mark.parametrize("last", ["first", "second"])
def test_two_clusters_started_at_once_in_threads_leave_the_nanny_loggers_level_as_it_was(last):
    """Each cluster's start lowered distributed's nanny logger to INFO and put back the level it had read: of two
    started at once in threads, the second read the first's INFO, and put it back when it ended last, the nanny
    then at INFO for good (its INFO lines shown past a caller's later ``distributed`` at WARNING)."""
    import logging

    from tilemask.cluster import _workers_that_did_not_start

    nannies = logging.getLogger("distributed.nanny")
    before = (nannies.level, list(nannies.filters))
    first, second = _workers_that_did_not_start(), _workers_that_did_not_start()
    first.__enter__()
    second.__enter__()
    assert nannies.isEnabledFor(logging.INFO)
    for run in (first, second) if last == "second" else (second, first):
        run.__exit__(None, None, None)
    assert (nannies.level, list(nannies.filters)) == before
