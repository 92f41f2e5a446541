"""The command line as users meet it: help, bad input, exit statuses, nothing half-written.

A few tests run the installed ``tilemask`` entry point in a subprocess (help, a
run on the embedded cluster, a worker's read failure): they prove what only a
real process shows.  The rest call :func:`tilemask.cli.main` in-process through
click's ``CliRunner`` (its stderr kept apart from stdout, click >= 8.2), and run
on the tests' shared cluster (``--scheduler``) where they need one, so no
interpreter or cluster is started per case.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zarr

from .conftest import GEO, UNET_2D, raster_workflow, run_cli


def assert_one_line_error(outcome, status, *words):
    """A subprocess's or a ``CliRunner`` result's exit status and its one-line stderr."""
    code = outcome.returncode if isinstance(outcome, subprocess.CompletedProcess) else outcome.exit_code
    assert code == status, outcome.stderr
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tilemask: error: "), outcome.stderr
    assert "Traceback" not in outcome.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def cli(client):
    """``tilemask run WORKFLOW ARGS`` in-process, on the shared cluster; returns click's ``Result``."""
    from click.testing import CliRunner

    from tilemask.cli import main

    def invoke(workflow, *args):
        distributed = logging.getLogger("distributed")
        level = distributed.level  # the command quiets Dask's logs for the process; give them back
        try:
            result = CliRunner().invoke(
                main, ["run", str(workflow), "--scheduler", client.scheduler.address, *map(str, args)],
                catch_exceptions=False,  # an exception the command lets through fails the test, with its traceback
            )
        finally:
            distributed.setLevel(level)
        return result

    return invoke


def nothing_finished(out_dir):
    """No output at all, or a Zarr group not marked complete."""
    if not out_dir.exists():
        return True
    for path in out_dir.rglob("*"):
        if path.suffix in (".tif", ".nii", ".gz") and not path.name.startswith("."):
            return False
        if path.suffix == ".zarr" and zarr.open_group(path, mode="r").attrs.get("tilemask", {}).get("complete"):
            return False
    return True


def test_help_for_every_command():
    for args in ([], ["run"]):
        proc = run_cli(*args, "--help")
        assert proc.returncode == 0 and "Usage:" in proc.stdout


@pytest.mark.parametrize("module", ["pydantic", "click", "tilemask.job_commands"])
def test_a_ctrl_c_while_the_command_imports_its_modules_is_interrupted_exit_130(module, tmp_path):
    """A Ctrl-C in the first second of ``tilemask run``, while its modules are imported, was a Python traceback
    ending in ``KeyboardInterrupt`` and a process killed by SIGINT (status -2). The console script (as pip writes it
    from pyproject.toml's entry point) and ``python -m tilemask`` are sent SIGINT as ``module`` is imported."""
    import tomllib

    from .conftest import REPO

    entry = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["tilemask"]
    where, function = entry.split(":")
    stop = (f"import os, signal, sys\nsys.addaudithook(lambda event, args: event == 'import' and args[0] == {module!r}"
            " and os.kill(os.getpid(), signal.SIGINT))\n")  # fmt: skip
    for start in (f"from {where} import {function}\nsys.exit({function}())",
                  "import runpy\nrunpy.run_module('tilemask', run_name='__main__', alter_sys=True)"):  # fmt: skip
        done = subprocess.run([sys.executable, "-c", stop + start, "run", "workflow.yaml"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert (done.returncode, done.stderr) == (130, "tilemask: interrupted\n"), start
    assert not any(tmp_path.iterdir())


def test_usage_errors_and_unreadable_workflows_are_one_line_exit_2(tmp_path):
    alone = run_cli()  # no command: click's help, not one line
    assert alone.returncode == 2 and alone.stderr.startswith("Usage: tilemask [OPTIONS] COMMAND") and "Commands:" in alone.stderr
    (tmp_path / "latin1.yaml").write_bytes("model: caf\xe9\n".encode("latin-1"))
    for args, line in [
        (["serve", tmp_path / "nothere"], f"Invalid value for 'FOLDER': Directory '{tmp_path / 'nothere'}' does not exist."),
        (["run", tmp_path], f"Invalid value for 'WORKFLOW': File '{tmp_path}' is a directory."),
        (["bogus"], "No such command 'bogus'."),
        (["--bogus", "run"], "No such option '--bogus'. Did you mean '--verbose'?"),
        (["run"], "Missing argument 'WORKFLOW'."),
        (["run", tmp_path / "latin1.yaml"], f"workflow {tmp_path / 'latin1.yaml'}: not UTF-8 text (byte 10: invalid continuation byte)"),
    ]:  # fmt: skip
        proc = run_cli(*args)
        assert (proc.returncode, proc.stderr, proc.stdout) == (2, f"tilemask: error: {line}\n", ""), args


def test_the_commands_own_options_given_after_a_command_say_where_they_go(tmp_path):
    """``tilemask run w.yaml -q`` (as the README's ``-q`` reads) was ``No such option '-q'.``, and ``--verbose``
    after ``run`` was offered ``Did you mean '--overwrite'?``: -v and -q are tilemask's own options, before the
    command. An option no command has keeps click's line."""
    workflow = tmp_path / "w.yaml"
    workflow.write_text("version: 1\n")
    for args, option in [(["run", workflow, "-q"], "-q"), (["stats", "mask.tif", "-o", "t.csv", "-vv"], "-v"),
                         (["run", workflow, "--verbose"], "--verbose"), (["serve", tmp_path, "-v"], "-v")]:
        proc = run_cli(*args)
        command = args[0]
        assert (proc.returncode, proc.stdout) == (2, ""), args
        assert proc.stderr == (f"tilemask: error: {option} is an option of tilemask itself, not of {command}: give it "
                               f"before the command (tilemask {option} {command} ...)\n"), args
    proc = run_cli("run", workflow, "--bogus")
    assert (proc.returncode, proc.stderr) == (2, "tilemask: error: No such option '--bogus'.\n")


def test_the_command_list_says_each_command_whole():
    """``tilemask --help`` listed its commands cut short by click at the terminal's width (``cancel  Stop JOB: the
    items in flight are abandoned and clean up;...``): each says what it does in a line that fits 80 columns."""
    proc = run_cli("--help", env={"COLUMNS": "80"})
    listed = proc.stdout.split("Commands:\n")[1].splitlines()
    assert proc.returncode == 0 and [line.split()[0] for line in listed] == [
        "cancel", "evaluate", "jobs", "run", "serve", "stats", "status", "submit"]
    assert not [line for line in listed if line.endswith("...") or len(line) > 80]


def test_a_scheduler_that_is_no_address_is_a_usage_error():
    from tilemask.cluster import cluster_client
    from tilemask.errors import UsageError

    with pytest.raises(UsageError, match="^scheduler='notanaddress': not a Dask scheduler address: missing port") as refused:
        with cluster_client("notanaddress"):
            pass
    assert refused.value.exit_status == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["run", "submit"])
def test_a_scheduler_address_no_command_can_connect_by_is_refused_before_a_job_folder_is_made(
    scene, write_workflow, tmp_path, command
):
    """``--scheduler inproc://...`` (distributed's comms inside one process) ended as ``ValueError: not enough values
    to unpack``, and ``ucx://`` (a stub since distributed moved it to distributed-ucxx) as ``TypeError: Can't
    instantiate abstract class UCXConnector``, both exit 1 once the job folder was made: addresses no command can
    connect by, refused as such (exit 2) before anything is written."""
    from click.testing import CliRunner

    from tilemask.cli import main

    path = write_workflow(scene)
    refusals = [("inproc://192.168.1.5/1234/1", "an inproc:// address names a scheduler inside one Python process"),
                ("ucx://127.0.0.1:8786", "this Dask has no ucx:// transport (distributed moved ucx:// to the package "
                                         "distributed-ucxx)")]  # fmt: skip
    for address, words in refusals:
        refused = CliRunner().invoke(main, [command, str(path), "--scheduler", address])
        assert_one_line_error(refused, 2, f"--scheduler {address}: not a Dask scheduler address: {words}")
        assert not (tmp_path / "out").exists(), "no job folder, no output folder"


@pytest.mark.slow  # 13 s in a loaded default run (2026-12-07)
@pytest.mark.timeout(60)
def test_a_scheduler_port_out_of_range_is_refused_at_once(tmp_path):
    """``tilemask stats MASK --scheduler tcp://127.0.0.1:99999`` (a digit too many) tried to connect for 30 s and
    ended ``cannot reach the Dask scheduler ... Connection refused``, exit 1, as for a scheduler that is down for
    now; no port past 65535 ever answers: it is an address that is not one, exit 2 at once, nothing written."""
    import rasterio

    mask = tmp_path / "mask.tif"
    with rasterio.open(mask, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8") as ds:
        ds.write(np.zeros((8, 8), np.uint8), 1)
    for address, port in (("tcp://127.0.0.1:99999", 99999), ("127.0.0.1:70000", 70000)):
        proc = run_cli("stats", mask, "-o", tmp_path / "out.csv", "--scheduler", address, timeout=60)
        assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
        assert proc.stderr == (f"tilemask: error: --scheduler {address}: not a Dask scheduler address: port {port} "
                               "is out of range (1-65535)\n")  # fmt: skip
        assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("command", ["run", "submit"])
def test_where_the_work_runs_is_refused_before_a_job_folder_is_made(scene, write_workflow, tmp_path, command):
    """An empty --scheduler (an unset ``$DASK_SCHEDULER_ADDRESS``) started an embedded cluster: ``submit`` said
    "submitted" with exit 0, and the job, whose driver died with that cluster, read ``queued`` for ever. That and
    ``--cluster slurm`` with ``--scheduler`` are refused before a job folder is made (it was left ``failed``), as
    is an address that is not one (a scheduler file given as the address: a reviewer's)."""
    path = write_workflow(scene)
    refusals = [(["--scheduler", ""], "--scheduler is empty"),
                (["--scheduler", "dask/scheduler.json"], "dask/scheduler.json: no such scheduler file (waited 1 s")]
    if command == "run":
        refusals.append((["--cluster", "slurm", "--scheduler", "tcp://127.0.0.1:1"], "leave out --scheduler"))
        refusals.append((["--scheduler", "tcp://127.0.0.1:1", "--workers", "4"],  # dropped without a word
                         "--workers applies to the cluster tilemask starts, not to one given by --scheduler"))
    import dask
    from click.testing import CliRunner

    from tilemask.cli import main

    for args, words in refusals:  # in this process: refused before any cluster, as the command in its own
        with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):  # how long a scheduler file is waited for
            assert_one_line_error(CliRunner().invoke(main, [command, str(path), *args]), 2, words)
        assert not (tmp_path / "out").exists(), "no job folder, no output folder"


@pytest.mark.timeout(60)
def test_submit_refuses_the_first_inputs_outputs_as_run_does(scene, write_workflow, tmp_path):
    """``tilemask run`` refuses an output that is not the job's (exit 2, before any work); ``submit`` said
    "submitted", exit 0, and the job failed on the cluster with that refusal. It is refused before the scheduler is
    asked (nothing listens at this address: it is never reached)."""
    from click.testing import CliRunner

    from tilemask.cli import main

    from .conftest import _free_port

    path = write_workflow(scene)
    (tmp_path / "out" / "scene_mask.zarr").mkdir(parents=True)  # a folder of someone else's at the output's path
    refused = CliRunner().invoke(main, ["submit", str(path), "--scheduler", f"tcp://127.0.0.1:{_free_port()}"])
    assert_one_line_error(refused, 2, f"{tmp_path / 'out' / 'scene_mask.zarr'}", "was not written by tilemask")
    assert not (tmp_path / "out" / ".tilemask").exists(), "no job folder"


@pytest.mark.timeout(60)
def test_slurm_worker_settings_that_are_no_counts_are_refused_before_a_job_folder_is_made(scene, write_workflow,
                                                                                          tmp_path):  # fmt: skip
    """``jobqueue.slurm.cores: 0`` or ``processes: 0`` (dask-jobqueue divides one by the other) ended as
    ``ZeroDivisionError``, and ``cores: four`` as ``TypeError: '<=' not supported``, exit 1 once the job folder was
    made: settings, refused as the missing ``cores`` is (exit 2, one line naming it, nothing written)."""
    import dask
    from click.testing import CliRunner

    from tilemask.cli import main

    path = write_workflow(scene)
    for key, value in (("cores", 0), ("processes", 0), ("cores", "four"), ("processes", -2), ("cores", True)):
        settings = {"cores": 1, "memory": "2GB", key: value}
        with dask.config.set({"jobqueue.slurm": settings}):
            refused = CliRunner().invoke(main, ["run", str(path), "--cluster", "slurm"])
        assert_one_line_error(refused, 2, f"--cluster slurm: jobqueue.slurm.{key} is {value!r}, not a whole number of "
                                          "at least 1")  # fmt: skip
        assert not (tmp_path / "out").exists(), "no job folder, no output folder"


@pytest.fixture
def scene(make_raster, make_model, write_workflow, tmp_path):
    path, _ = make_raster((3, 90, 120))
    weights, _ = make_model()
    return raster_workflow(path, weights)


@pytest.mark.slow  # 16 s in a loaded default run (2026-12-07)
def test_a_run_writes_a_complete_zarr(scene, write_workflow, tmp_path):
    proc = run_cli("run", write_workflow(scene), "--workers", "1", "--set", "output.chunks=64")
    assert proc.returncode == 0, proc.stderr
    group = zarr.open_group(tmp_path / "out" / "scene_mask.zarr", mode="r")
    assert group.attrs["tilemask"]["complete"] is True
    assert group["labels"].shape == (90, 120) and group["labels"].chunks == (64, 64)
    assert group["probabilities"].shape == (3, 90, 120)
    assert "windows/s" in proc.stdout and "dask dashboard: http://" in proc.stdout


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_the_embedded_workers_warnings_are_printed(scene, write_workflow, tmp_path):
    """The embedded workers' stderr is /dev/null outside --debug, and their warnings went with it: a worker that
    could not write its cache of the converted network ("cannot cache ...: Not a directory") said nothing, nor
    would the DICOMweb store's warnings.  They are the command's to print, as the client's own are."""
    (tmp_path / "a_file").write_text("")
    env = {"TILEMASK_CACHE_DIR": str(tmp_path / "a_file" / "cache")}
    proc = run_cli("run", write_workflow(scene), "--workers", "1", "--no-progress", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING tilemask.backend_cache: cannot cache" in proc.stderr and "Not a directory" in proc.stderr
    proc = run_cli("-q", "run", write_workflow(scene), "--workers", "1", "--overwrite", env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")  # -q: errors only


def test_tilemask_q_prints_errors_only(scene, write_workflow, tmp_path, client):
    """``tilemask -q``: no dashboard link, progress or summary lines, on a run and on its skipped rerun."""
    workflow = write_workflow(scene)
    for _ in range(2):
        proc = run_cli("-q", "run", workflow, "--scheduler", client.scheduler.address)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert zarr.open_group(tmp_path / "out" / "scene_mask.zarr", mode="r").attrs["tilemask"]["complete"] is True


def test_the_client_of_a_raster_run_imports_neither_torch_nor_the_label_readers(scene, write_workflow, tmp_path,
                                                                                client):  # fmt: skip
    """The client plans, waits and writes small files: the network, the NIfTI reader, dask.array (which the
    quick look's label reader brings) and zarr (a COG's run stages nothing in it) are the workers' (README,
    "Execution")."""
    workflow = write_workflow({**scene, "output": {"path": "out/{stem}_mask.tif"}})
    script = (
        "import json, sys\n"
        "from tilemask.cli import main\n"
        "main(sys.argv[1:], standalone_mode=False)\n"
        "heavy = ('torch', 'monai', 'nibabel', 'scipy', 'dask.array', 'zarr')\n"
        "print(json.dumps(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, "run", str(workflow), "--scheduler", client.scheduler.address,
                           "--quiet"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "scene_mask.png").is_file()
    assert proc.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    "change,status,words",
    [
        ({"extra_key": 1}, 2, ["extra_key", "unknown key"]),
        ({"inference": {"roi_size": [64, 64], "overlap": 1.0}}, 2, ["inference.overlap", "less than 1"]),
        ({"inference": {"roi_size": [64, 64, 64]}}, 2, ["roi_size", "spatial_dims"]),
        ({"inference": {"roi_size": [64, 64], "mode": "median"}}, 2, ["inference.mode"]),
        ({"model": {"network": "UNet", "args": {**UNET_2D, "in_channels": 4}, "weights": "w"}}, 2, ["in_channels", "4"]),
        ({"model": {"network": "NoSuchNet", "args": UNET_2D, "weights": "w"}}, 2, ["NoSuchNet"]),
        ({"input": "missing.tif"}, 2, ["missing.tif"]),
        ({"output": {"path": "out/x.png"}}, 2, ["output.path"]),
    ],
)
def test_invalid_workflows_exit_2_before_any_work(scene, write_workflow, tmp_path, cli, change, status, words):
    workflow = {**scene, **change}
    if "model" in change and change["model"]["weights"] == "w":
        workflow["model"]["weights"] = scene["model"]["weights"]
    assert_one_line_error(cli(write_workflow(workflow)), status, *words)
    assert nothing_finished(tmp_path / "out")


def test_an_output_path_ending_in_a_slash_is_the_zarr_it_names(scene, write_workflow, tmp_path, cli):
    """``out/scene_mask.zarr/`` was refused as "exists and was not written by tilemask": the job folder had been
    made inside it first (an exploratory review)."""
    scene["output"]["path"] = "out/scene_mask.zarr/"  # its job folder goes beside it, in out/
    result = cli(write_workflow(scene))
    assert result.exit_code == 0, result.stderr
    assert zarr.open_group(tmp_path / "out" / "scene_mask.zarr", mode="r").attrs["tilemask"]["complete"] is True


def test_malformed_yaml(write_workflow, tmp_path, cli):
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\ninput: [a.tif\nmodel: {")
    assert_one_line_error(cli(path), 2, "bad.yaml", "line")


def test_missing_weights(scene, write_workflow, tmp_path, cli):
    scene["model"]["weights"] = str(tmp_path / "nowhere.pt")
    assert_one_line_error(cli(write_workflow(scene)), 2, "model.weights", "nowhere.pt")
    assert nothing_finished(tmp_path / "out")


@pytest.mark.parametrize("text", ["hello\n", "hi\n", "model weights go here\n"])
def test_weights_of_plain_text_are_named_exit_2(scene, write_workflow, tmp_path, cli, text):
    """torch's legacy reader took "hello" for a pickle and raised ``KeyError: 101``, which left as exit 1 with a
    failed job folder (an exploratory review)."""
    path = tmp_path / "weights.pt"
    path.write_text(text)
    scene["model"]["weights"] = str(path)
    assert_one_line_error(cli(write_workflow(scene)), 2, f"model.weights: {path}", "is not a torch checkpoint")
    assert nothing_finished(tmp_path / "out")
    assert not (tmp_path / "out" / ".tilemask").exists()


class _Exploit:
    """A checkpoint that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_with_code_is_refused_and_never_run(scene, write_workflow, tmp_path, cli):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    import torch

    torch.save({"weight": _Exploit(marker)}, evil, pickle_protocol=2)
    with open(tmp_path / "evil.pkl", "wb") as f:  # the plain-pickle variant
        pickle.dump(_Exploit(marker), f)
    for path in (evil, tmp_path / "evil.pkl"):
        scene["model"]["weights"] = str(path)
        assert_one_line_error(cli(write_workflow(scene)), 2, "refused", path.name)
        assert not marker.exists(), "the pickle's code ran"
    assert nothing_finished(tmp_path / "out")


def test_weights_of_another_network_are_refused(scene, write_workflow, make_model, tmp_path, cli):
    """In a short line: torch lists every key that differs (1.1 kB for a UNet with other residual units)."""
    weights, _ = make_model({**UNET_2D, "channels": [4, 8, 16]}, name="other.pt")
    scene["model"]["weights"] = str(weights)
    outcome = cli(write_workflow(scene))
    shape = "key(s) of another shape: model.0.conv.unit0.conv.weight [4, 3, 3, 3] for [8, 3, 3, 3]"
    assert_one_line_error(outcome, 2, "does not fit", "other.pt", shape)
    weights, _ = make_model({**UNET_2D, "num_res_units": 2}, name="deeper.pt")
    scene["model"]["weights"] = str(weights)
    outcome = cli(write_workflow(scene))
    assert_one_line_error(outcome, 2, "does not fit", "deeper.pt", "key(s) unexpected: model.0.conv.unit1.conv.weight")
    assert len(outcome.stderr) < 400, outcome.stderr
    assert nothing_finished(tmp_path / "out")


def test_an_output_under_a_file_names_the_file(scene, write_workflow, tmp_path, cli):
    """A file where a folder of the output's path should be said "File exists" or "Not a directory"."""
    (tmp_path / "afile").write_text("")
    for output, jobs in (("afile/{stem}.tif", []), ("afile/sub/{stem}.zarr", ["--job-dir", tmp_path / "job"])):
        scene["output"] = {"path": str(tmp_path / output)}
        assert_one_line_error(cli(write_workflow(scene), *jobs), 2, f"{tmp_path / 'afile'} is a file, not a folder")
    assert (tmp_path / "afile").read_text() == ""


def test_torchscript_weights_run(scene, write_workflow, make_model, tmp_path, cli):
    import torch

    _, net = make_model()
    script = tmp_path / "scripted.pt"
    torch.jit.script(net).save(str(script))
    scene["model"]["weights"] = str(script)
    result = cli(write_workflow(scene), "--quiet")
    assert result.exit_code == 0, result.stderr
    assert zarr.open_group(tmp_path / "out" / "scene_mask.zarr").attrs["tilemask"]["complete"]


def test_real_corrupt_geotiff_fails_with_one_line_and_no_output(write_workflow, make_model, tmp_path, client):
    weights, _ = make_model()
    corrupt = tmp_path / "corrupt.tif"
    shutil.copy(GEO["corrupt.tif"], corrupt)
    workflow = raster_workflow(corrupt, weights, output={"chunks": 256, "path": "out/{stem}.zarr"})
    workflow["inference"]["roi_size"] = [128, 128]
    proc = run_cli("run", write_workflow(workflow), "--scheduler", client.scheduler.address)
    assert_one_line_error(proc, 1, "corrupt.tif", "read failed")
    assert nothing_finished(tmp_path / "out")


def test_truncated_geotiff(make_raster, make_model, write_workflow, tmp_path, cli):
    path, _ = make_raster((3, 400, 400), tiled=True, blockxsize=128, blockysize=128, compress="deflate")
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    weights, _ = make_model()
    result = cli(write_workflow(raster_workflow(path, weights)), "--quiet")
    assert result.exit_code in (1, 2)  # 2 when GDAL already refuses the header, 1 when a block read fails
    assert_one_line_error(result, result.exit_code, "scene.tif")
    assert nothing_finished(tmp_path / "out")


def test_set_overrides_and_bad_set(scene, write_workflow, tmp_path, cli):
    assert_one_line_error(cli(write_workflow(scene), "--set", "output.chunks"), 2, "KEY=VALUE")
    assert_one_line_error(cli(write_workflow(scene), "--set", "inference.overlap=2"), 2, "inference.overlap")
    assert nothing_finished(tmp_path / "out")


def test_probabilities_uint8(scene, write_workflow, tmp_path, cli):
    result = cli(write_workflow(scene), "--quiet", "--set", "output.probabilities=uint8")
    assert result.exit_code == 0, result.stderr
    group = zarr.open_group(tmp_path / "out" / "scene_mask.zarr", mode="r")
    probs = group["probabilities"][:]
    assert probs.dtype == np.uint8
    assert np.all(np.abs(probs.astype(int).sum(axis=0) - 255) <= 2)  # softmax sums to 1, rounded per class


@pytest.mark.parametrize("debug", [False, True])
def test_dask_and_asyncio_chatter_reaches_stderr_only_with_debug(debug):
    """A worker killed while the client reads a result made distributed.client warn ("Couldn't gather 1 keys,
    rescheduling": a logger with a level of its own in Dask's config) and asyncio print an inner task's
    AllExit traceback above the run's own one-line error."""
    script = (
        "import logging\n"
        "from tilemask.command import configure_logging\n"
        f"configure_logging(debug={debug})\n"
        "logging.getLogger('distributed.client').warning(\"Couldn't gather 1 keys, rescheduling\")\n"
        "logging.getLogger('distributed.worker').error('worker failed')\n"
        "logging.getLogger('asyncio').error('Task exception was never retrieved')\n"
        "logging.getLogger('tornado.application').error('Exception in callback: NameError: cannot access free "
        "variable')\n"  # a Ctrl-C as the embedded cluster starts: a fresh-clone CI printed it above 'interrupted'
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    if debug:
        for line in ("Couldn't gather 1 keys", "worker failed", "Task exception was never retrieved",
                     "Exception in callback"):  # fmt: skip
            assert line in proc.stderr
    else:
        assert proc.stderr == ""


def test_v_logs_tilemasks_stages_not_the_errors_gdal_signals_on_the_way():
    """``-v`` printed "INFO rasterio._env: GDAL signalled an error: ... No such file or directory" for every
    output whose existence was checked."""
    script = (
        "import logging\n"
        "from tilemask.command import configure_logging\n"
        "configure_logging(debug=False, verbosity=1)\n"
        "logging.getLogger('rasterio._env').info('GDAL signalled an error: err_no=4')\n"
        "logging.getLogger('tilemask.engine').info('one line per stage')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "INFO tilemask.engine: one line per stage\n", proc.stderr


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path, monkeypatch):
    """``tilemask status JOB | head -1``: once the reader has gone, no 'BrokenPipeError' line (Python's exit 1)."""
    from tilemask.jobs import JobFolder

    monkeypatch.setenv("TILEMASK_HOME", str(tmp_path / "home"))
    job = JobFolder(tmp_path / "job")
    job.create({"version": 1}, str(tmp_path), None, {}, [])
    exe = os.path.join(os.path.dirname(sys.executable), "tilemask")
    proc = subprocess.Popen([exe, "status", job.path], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # gone before the command writes, as head is after its first line
    assert (proc.wait(timeout=120), proc.stderr.read()) == (1, b"")


@pytest.mark.timeout(30)
def test_debug_prints_an_unexpected_errors_traceback_without_credentials_and_exit_1():
    """``--debug`` re-raised the error, and Python's traceback printed a password or a SAS token in full; the
    traceback is now printed with its URLs as the error line shows them, then that line, exit 1."""
    import click
    from click.testing import CliRunner

    from tilemask.command import TilemaskCommand

    @click.command(cls=TilemaskCommand)
    @click.option("--debug", is_flag=True)
    def failing(debug):
        raise RuntimeError("reading http://user:SECRET1@example.org/x.tif?sp=r&sig=SECRET2 failed")

    for args, status in (([], 1), (["--debug"], 1)):
        result = CliRunner().invoke(failing, args)
        assert result.exit_code == status and "SECRET" not in result.output, result.output
        last = result.output.strip().splitlines()[-1]
        assert last.startswith("tilemask: error: RuntimeError: reading http://user:***@example.org/x.tif failed")
        assert ("Traceback (most recent call last)" in result.output) == bool(args), result.output


@pytest.mark.timeout(90)
@pytest.mark.parametrize("stops", [["SIGINT"], ["SIGTERM"], ["SIGTERM", "SIGINT"]], ids=["ctrl-c", "sigterm", "two"])
def test_a_stop_while_the_command_exits_is_one_line_and_130_and_a_second_leaves_at_once(stops):
    """Once a command has returned, the exit waits for threads and runs the atexit handlers (an embedded cluster's
    close): a Ctrl-C there was a traceback, a SIGTERM a silent death by the signal. Now it is held until they are
    done, then ``tilemask: interrupted``, exit 130; a second one leaves at once."""
    import signal
    import time

    script = ("import atexit, sys, time\n"
              "from tilemask.cli import console\n"
              "atexit.register(lambda: (print('exiting', flush=True), time.sleep(4), print('exited', flush=True)))\n"
              "sys.argv = ['tilemask', '--version']\n"
              "console()\n")  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    while process.stdout.readline().strip() != "exiting":
        assert process.poll() is None, process.stderr.read()
    started = time.monotonic()
    for stop in stops:
        time.sleep(0.3)
        process.send_signal(getattr(signal, stop))
    out, err = process.communicate(timeout=30)
    assert (process.returncode, err) == (130, "tilemask: interrupted\n")
    if len(stops) == 1:
        assert out == "exited\n"  # the handlers ran to their end
    else:
        assert out == "" and time.monotonic() - started < 3
