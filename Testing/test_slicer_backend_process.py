"""The backend as a child process: non-blocking reads, failure text, and cancel of the whole
process tree, against the REAL backend on tiny hippocampus cases (and cheap stand-in trees)."""

import json
import os
import signal
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
from SemiSupSegLib.output_layout import MODEL_FILE, RUN_FOLDER
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


def tree_of(pid):
    """The process and its descendants, seen with psutil (the module may run without it)."""
    return [pid] + [child.pid for child in psutil.Process(pid).children(recursive=True)]


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


def without_psutil(monkeypatch, use_psutil):
    """Stock Slicer's Python has no psutil: the module must manage without it."""
    if not use_psutil:
        monkeypatch.setattr(backend_process, "psutil", None)


@pytest.mark.parametrize("use_psutil", [True, False], ids=["psutil", "no-psutil"])
def test_stop_waits_the_grace_time_then_kills_the_tree(tmp_path, monkeypatch, use_psutil):
    """What Slicer's exit does: the module's cleanup stops the job and returns only when no
    process of it is left."""
    if os.name == "nt":
        pytest.skip("SIGTERM semantics are POSIX")
    without_psutil(monkeypatch, use_psutil)
    runner = JobRunner(
        lambda command, env=None, cwd=None: BackendProcess(command, graceSeconds=1.0)
    )
    runner.start(stubborn_tree_command(tmp_path))
    wait_until_ready(runner.process)
    pids = tree_of(runner.process.pid)
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
    import psutil
    sys.path.insert(0, sys.argv[1])
    from SemiSupSegLib import backend_process
    from SemiSupSegLib.backend_process import BackendProcess
    if sys.argv[2] == "no-psutil":
        backend_process.psutil = None  # as in stock Slicer
    process = BackendProcess(sys.argv[3:], graceSeconds=1.0).start()
    lines = []
    while "ready" not in lines:
        lines += process.readLines()
        time.sleep(0.05)
    children = psutil.Process(process.pid).children(recursive=True)
    print(json.dumps([process.pid] + [child.pid for child in children]), flush=True)
    # and exit, as Slicer does, without cancelling anything
    """
)


@pytest.mark.parametrize("use_psutil", [True, False], ids=["psutil", "no-psutil"])
def test_a_backend_never_outlives_the_python_that_started_it(tmp_path, use_psutil):
    if os.name == "nt":
        pytest.skip("SIGTERM semantics are POSIX")
    parent = tmp_path / "parent.py"
    parent.write_text(EXITING_PARENT)
    flag = "psutil" if use_psutil else "no-psutil"
    result = subprocess.run(
        [sys.executable, str(parent), moduleSearchPath(), flag] + stubborn_tree_command(tmp_path),
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


# A stand-in backend that ignores SIGTERM and stops only through the stop file, with the
# backend's own StopFlag (as a training loop checks it), then exits like the backend (130).
STOP_FILE_HONOURING = (
    "import signal, sys, time\n"
    "from SemiSupSegLib.backend.cancellation import StopFlag\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "stop = StopFlag()\n"
    "print('ready', flush=True)\n"
    "while not stop.requested:\n"
    "    time.sleep(0.05)\n"
    "print('stopped by ' + stop.signal_name, flush=True)\n"
    "sys.exit(130)"
)


class Taskkill:
    """Stands in for Windows' taskkill (the process boundary): records each command, whether
    the launcher it names was still alive then, and ends that process group like /T /F."""

    def __init__(self):
        self.calls = []

    def __call__(self, command, **kwargs):
        if command[0] != "taskkill":
            raise AssertionError(f"unexpected command {command}")
        pid = int(command[command.index("/PID") + 1])
        self.calls.append((command, not gone(pid)))
        os.killpg(pid, signal.SIGKILL)
        return subprocess.CompletedProcess(command, 0)


def as_windows(monkeypatch):
    """The module's Windows path (without psutil, as in stock Slicer) on this machine: the
    platform check and taskkill are replaced, the processes are real."""
    monkeypatch.setattr(backend_process, "IS_WINDOWS", True)
    monkeypatch.setattr(backend_process, "psutil", None)
    taskkill = Taskkill()
    monkeypatch.setattr(backend_process.subprocess, "run", taskkill)
    return taskkill


@pytest.mark.parametrize("how", ["stop", "cancel"])
def test_on_windows_the_launchers_whole_tree_is_killed_after_the_grace_time(
    tmp_path, monkeypatch, how
):
    """Windows without psutil: ``popen.terminate()`` ended only the PythonSlicer launcher, and
    then the kill skipped ``taskkill /T`` because the launcher was dead: the real Python ran
    on. Now the gentle stop is the stop file, and taskkill /T /F runs on the living launcher."""
    if os.name == "nt":
        pytest.skip("replaces taskkill with a POSIX stand-in")
    process = BackendProcess(stubborn_tree_command(tmp_path), graceSeconds=1.0).start()
    wait_until_ready(process)
    pids = tree_of(process.pid)  # the launcher and the real Python
    assert len(pids) == 2
    taskkill = as_windows(monkeypatch)
    try:
        started = time.monotonic()
        if how == "stop":
            process.stop()
        else:
            process.cancel()
            assert os.path.isfile(process.stopFile)  # the gentle request
            assert not taskkill.calls and process.poll() is None  # nothing killed yet
            assert process.wait(timeout=30) is not None
        assert time.monotonic() - started >= 1.0  # the grace time came first
        command = ["taskkill", "/PID", str(process.pid), "/T", "/F"]
        assert taskkill.calls == [(command, True)]  # on the launcher, while it was alive
        for pid in pids:
            deadline = time.monotonic() + 10
            while not gone(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        assert all(gone(pid) for pid in pids), "a process of the tree was left running"
        assert not os.path.exists(process.stopFile)  # no litter in the temp folder
    finally:
        kill_leftovers(pids)


@pytest.mark.parametrize("platform", ["posix", "windows"])
def test_the_backend_stops_at_the_stop_file_within_the_grace_time(tmp_path, monkeypatch, platform):
    """The gentle stop Windows relies on: the backend's StopFlag sees the stop file named in
    its environment and the backend exits by itself, long before the grace time ends."""
    if os.name == "nt":
        pytest.skip("replaces taskkill with a POSIX stand-in")
    command = [sys.executable, str(write_launcher(tmp_path)), sys.executable, "-c"]
    process = BackendProcess(
        command + [STOP_FILE_HONOURING], env=backendEnvironment(device="cpu"), graceSeconds=60.0
    ).start()
    wait_until_ready(process)
    pids = tree_of(process.pid)
    taskkill = as_windows(monkeypatch) if platform == "windows" else None
    try:
        started = time.monotonic()
        code = process.stop()
        assert time.monotonic() - started < 20
        # the launcher passes on the backend's 130 unless SIGTERM (POSIX only) ended it first
        assert code == (130 if platform == "windows" else -signal.SIGTERM)
        assert process.readLines() == ["stopped by stop file"]
        assert taskkill is None or not taskkill.calls
        assert all(gone(pid) for pid in pids)
    finally:
        kill_leftovers(pids)


def test_a_stop_flag_is_set_once_its_stop_file_exists(tmp_path, monkeypatch):
    from SemiSupSegLib.backend.cancellation import StopFlag
    from SemiSupSegLib.protocol import STOP_FILE_VARIABLE

    path = tmp_path / "stop"
    monkeypatch.setenv(STOP_FILE_VARIABLE, str(path))
    flag = StopFlag()
    assert not flag.requested
    path.write_text("stop\n")
    assert flag.requested and flag.signal_name == "stop file"
    monkeypatch.delenv(STOP_FILE_VARIABLE)
    assert not StopFlag().requested  # no variable: only signals and code stop it


def test_stop_after_a_kill_without_a_cancel(tmp_path, monkeypatch):
    """``kill()`` sets no grace deadline; a ``stop()`` while the killed tree is still there
    (its processes take time to die) must not fail on it."""
    if os.name == "nt":
        pytest.skip("SIGTERM semantics are POSIX")
    process = BackendProcess(stubborn_tree_command(tmp_path), graceSeconds=1.0).start()
    wait_until_ready(process)
    pids = tree_of(process.pid)
    try:
        with monkeypatch.context() as patch:  # the first kill has not taken effect yet
            patch.setattr(backend_process, "psutil", None)
            patch.setattr(backend_process.os, "killpg", lambda pid, sig: None)
            process.kill()
        assert process.poll() is None
        process.stop()
        assert all(gone(pid) for pid in pids)
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
    assert not (tmp_path / "out" / RUN_FOLDER / MODEL_FILE).exists()
