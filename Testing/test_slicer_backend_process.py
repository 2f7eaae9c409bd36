"""The backend as a child process: non-blocking reads, failure text, and cancel of the whole
process tree, against the REAL backend on tiny hippocampus cases (and cheap stand-in trees)."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from SemiSupSegLib import backend_process
from SemiSupSegLib.backend_process import (
    BackendProcess,
    backendCommand,
    backendEnvironment,
    moduleSearchPath,
)
from SemiSupSegLib.job_runner import JobRunner
from SemiSupSegLib.protocol import JobSpec, LabeledCase, UnlabeledCase
from slicer_side_helpers import TINY_SETTINGS, hippocampusCase

psutil = pytest.importorskip("psutil")

# A stand-in for PythonSlicer: a launcher process that starts the real Python as its child
# and does not forward signals (the worst case for cancel).
LAUNCHER = textwrap.dedent(
    """
    import subprocess, sys
    child = subprocess.Popen(sys.argv[1:])
    sys.exit(child.wait())
    """
)


def write_launcher(tmp_path):
    path = tmp_path / "launcher.py"
    path.write_text(LAUNCHER)
    return path


def tiny_job(tmp_path, settings=None, iterations=None):
    (image1, label1), (image2, label2), (image3, _) = (
        hippocampusCase("001"),
        hippocampusCase("003"),
        hippocampusCase("004"),
    )
    values = dict(TINY_SETTINGS)
    values.update(settings or {})
    if iterations:
        values["iterations"] = iterations
    job = JobSpec(
        labeled=[
            LabeledCase("a", str(image1), str(label1)),
            LabeledCase("b", str(image2), str(label2)),
        ],
        unlabeled=[UnlabeledCase("c", str(image3))],
        classes={"0": "background", "1": "Anterior", "2": "Posterior"},
        method="supervised",
        device="cpu",
        output=str(tmp_path / "out"),
        settings=values,
    )
    path = tmp_path / "job.json"
    job.save(path)
    return path


def gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_command_and_environment():
    command = backendCommand("/opt/PythonSlicer", "/data/job.json")
    assert command == [
        "/opt/PythonSlicer",
        "-m",
        "SemiSupSegLib.backend",
        "run",
        "/data/job.json",
        "--events",
        "-",
        "--quiet",
    ]
    env = backendEnvironment({"PYTHONPATH": "/other", "PATH": "/bin"}, device="cpu")
    assert env["PYTHONPATH"].split(os.pathsep) == [moduleSearchPath(), "/other"]
    assert env["CUDA_VISIBLE_DEVICES"] == "-1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in backendEnvironment({}, device="auto")
    assert os.path.isdir(os.path.join(moduleSearchPath(), "SemiSupSegLib"))


def test_reads_never_block_and_stderr_is_kept():
    code = "import sys, time\nprint('one', flush=True)\ntime.sleep(1.5)\nprint('two')\nsys.stderr.write('oops\\n')"
    process = BackendProcess([sys.executable, "-c", code]).start()
    started = time.monotonic()
    seen = []
    while process.poll() is None:
        before = time.monotonic()
        seen += process.readLines()
        assert time.monotonic() - before < 0.1  # a poll from the GUI timer returns at once
        time.sleep(0.05)
        assert time.monotonic() - started < 30
    seen += process.readLines()
    assert seen == ["one", "two"]
    assert process.poll() == 0
    assert process.stderrTail() == "oops"


def test_kill_after_grace_when_the_tree_ignores_sigterm(tmp_path, monkeypatch):
    if os.name == "nt":
        pytest.skip("SIGTERM semantics are POSIX")
    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(120)"
    for use_psutil in (True, False):
        if not use_psutil:
            monkeypatch.setattr(backend_process, "psutil", None)
        process = BackendProcess(
            [sys.executable, str(write_launcher(tmp_path)), sys.executable, "-c", stubborn],
            graceSeconds=1.0,
        ).start()
        lines = []
        while "ready" not in lines:
            lines += process.readLines()
            time.sleep(0.05)
        tree = psutil.Process(process.pid).children(recursive=True)
        assert tree, "the launcher should have a child"
        process.cancel()
        code = process.wait(timeout=30)
        assert code is not None, "the tree was not killed after the grace time"
        for child in tree:
            child_pid = child.pid
            deadline = time.monotonic() + 10
            while not gone(child_pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert gone(child_pid), f"child {child_pid} survived (psutil={use_psutil})"


STUBBORN = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)"
)


def wait_until_ready(process):
    deadline = time.monotonic() + 60
    lines = []
    while "ready" not in lines:
        lines += process.readLines()
        assert time.monotonic() < deadline, "the stand-in backend did not start"
        time.sleep(0.05)


def stubborn_tree_command(tmp_path):
    """A launcher (like PythonSlicer) whose child ignores SIGTERM."""
    return [sys.executable, str(write_launcher(tmp_path)), sys.executable, "-c", STUBBORN]


def kill_leftovers(pids):
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass


def test_stop_waits_the_grace_time_then_kills_the_tree(tmp_path):
    """What Slicer's exit does: the module's cleanup stops the job and returns only when no
    process of it is left."""
    if os.name == "nt":
        pytest.skip("SIGTERM semantics are POSIX")
    runner = JobRunner(
        lambda command, env=None, cwd=None: BackendProcess(command, graceSeconds=1.0)
    )
    runner.start(stubborn_tree_command(tmp_path))
    wait_until_ready(runner.process)
    pids = runner.process.treePids()
    assert len(pids) == 2
    try:
        started = time.monotonic()
        runner.stop()
        elapsed = time.monotonic() - started
        assert all(gone(pid) for pid in pids), "stop returned with the tree still running"
        assert elapsed >= 1.0  # the backend had its grace time to save a checkpoint
        assert elapsed < 1.0 + 15
        assert runner.finished and runner.cancelled and not runner.failed
    finally:
        kill_leftovers(pids)


EXITING_PARENT = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    from SemiSupSegLib.backend_process import BackendProcess
    process = BackendProcess(sys.argv[2:], graceSeconds=1.0).start()
    lines = []
    while "ready" not in lines:
        lines += process.readLines()
        time.sleep(0.05)
    print(json.dumps(process.treePids()), flush=True)
    # and exit, as Slicer does, without cancelling anything
    """
)


def test_a_backend_never_outlives_the_python_that_started_it(tmp_path):
    if os.name == "nt":
        pytest.skip("SIGTERM semantics are POSIX")
    parent = tmp_path / "parent.py"
    parent.write_text(EXITING_PARENT)
    result = subprocess.run(
        [sys.executable, str(parent), moduleSearchPath()] + stubborn_tree_command(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    pids = json.loads(result.stdout.strip().splitlines()[-1])
    try:
        assert result.returncode == 0, result.stderr
        assert len(pids) == 2
        survivors = [pid for pid in pids if not gone(pid)]
        assert not survivors, f"processes {survivors} outlived the Python that started them"
    finally:
        kill_leftovers(pids)


def test_failing_job_shows_the_backends_error_text(tmp_path):
    job = tiny_job(tmp_path, settings={"no_such_setting": 1})
    runner = JobRunner().start(
        backendCommand(sys.executable, job), env=backendEnvironment(device="cpu")
    )
    assert runner.wait(timeout=180)
    assert runner.failed and runner.progress.returncode == 1
    assert "no_such_setting" in runner.progress.errorText
    assert runner.progress.statusText().startswith("Failed: unknown setting 'no_such_setting'")


def test_cancel_ends_the_whole_backend_tree(tmp_path):
    job = tiny_job(tmp_path, iterations=50)  # cancelled long before the end
    command = [sys.executable, str(write_launcher(tmp_path))] + backendCommand(sys.executable, job)
    runner = JobRunner().start(command, env=backendEnvironment(device="cpu"))
    deadline = time.monotonic() + 180
    while runner.progress.events == 0 and not runner.finished:
        runner.poll()
        time.sleep(0.1)
        assert time.monotonic() < deadline, "the backend sent no event"
    pids = runner.process.treePids()
    assert len(pids) >= 2  # launcher + the real backend
    started = time.monotonic()
    runner.cancel()
    assert runner.wait(timeout=60), "cancel did not end the job"
    assert time.monotonic() - started < 60
    assert runner.cancelled and not runner.failed
    for pid in pids:
        deadline = time.monotonic() + 15
        while not gone(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone(pid), f"process {pid} of the backend tree is still running"
    assert not (tmp_path / "out" / "run" / "model.pt").exists()
