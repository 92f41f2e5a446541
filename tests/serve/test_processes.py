"""``tilemask serve --workers N``: the server processes uvicorn's supervisor starts, watches and restarts."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

# Each server process (a child of the supervisor, spawned) takes 6 s to import rio-tiler, as the app's modules took
# on a busy 2-core machine (3.4 s alone there, with four importing at once much more); the supervisor itself not.
SLOW_IMPORT = """
import importlib.abc, multiprocessing, sys, time

class SlowRioTiler(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "rio_tiler" and multiprocessing.parent_process() is not None:
            sys.meta_path.remove(self)
            time.sleep(6)
        return None

sys.meta_path.insert(0, SlowRioTiler())
"""


def _server_processes(supervisor: int) -> set[int]:
    """The pids of the server processes (spawned by multiprocessing) under the supervisor."""
    found = set()
    for child in psutil.Process(supervisor).children():
        with contextlib.suppress(psutil.Error):
            if "multiprocessing.spawn" in " ".join(child.cmdline()):
                found.add(child.pid)
    return found


@pytest.mark.timeout(120)
def test_server_processes_slow_to_import_are_not_killed_as_hung(tmp_path):
    """uvicorn's supervisor pings each server process every half second and kills (SIGKILL) and restarts one that
    does not answer within 5 s. A process answers once it has configured its logging, and tilemask's logging filter
    was found by importing ``tilemask.serve``, which imported the whole app (rio-tiler, dask, scipy, FastAPI) first:
    ``--workers 4`` on a busy 2-core machine, idle, had a process killed and restarted every 5 s (7 processes in
    25 s), and one whose import took over 5 s never served. The app is now imported after the process answers."""
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_IMPORT)
    (folder := tmp_path / "out").mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(slow), *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [str(Path(sys.executable).parent / "tilemask"), "serve", str(folder), "--port", "0", "--workers", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)  # fmt: skip
    seen: set[int] = set()
    watching = threading.Event()

    def watch() -> None:  # every server process the supervisor starts, a restart included
        while not watching.wait(0.1):
            seen.update(_server_processes(process.pid))

    watcher = threading.Thread(target=watch, daemon=True)
    try:
        url = re.search(r"at (http://\S+/) ", process.stdout.readline()).group(1)
        watcher.start()
        assert httpx.get(f"{url}?f=json", timeout=40).status_code == 200  # served, not held by killed processes
        time.sleep(6)  # past the supervisor's 5 s: a process that did not answer would be killed by now
        watching.set()
        watcher.join()
        assert len(seen) == 2, f"{len(seen) - 2} server process(es) killed and restarted"
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=30) == 130
        assert process.stdout.read().strip().splitlines() == ["tilemask: interrupted"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the server and its workers, whatever happened
        process.stdout.close()
