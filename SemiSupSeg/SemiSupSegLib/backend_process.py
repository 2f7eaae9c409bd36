"""The backend as a child process that never blocks the caller.

``BackendProcess`` starts a command, and two reader threads move its stdout lines into a
``queue.Queue`` and keep the tail of its stderr. The GUI drains the queue from a ``qt.QTimer``
(``readLines``/``poll`` return at once). ``cancel`` asks the whole process tree to stop (the
backend saves a checkpoint and exits with 130) and, if it is still alive after
``graceSeconds``, ``poll`` kills the tree. The tree matters: Slicer's ``PythonSlicer`` is a
launcher that starts the real Python as a separate child (CTK's AppLauncher; on Windows no
job object ties them together).

The gentle stop is the stop file named in the child's environment
(``protocol.STOP_FILE_VARIABLE``, honoured by the backend's ``StopFlag``) plus SIGTERM on Linux
and macOS. Windows has no SIGTERM for a windowless child and ``TerminateProcess`` is a kill,
so there the stop file is the whole grace period, and the kill is ``taskkill /T /F`` on the
launcher while it is alive (once it has died its children can no longer be found from it).

A backend never outlives the Python that started it: ``stop`` (called when Slicer unloads the
module, and for every process still running when the interpreter exits) asks gently, waits
the grace time and then kills the tree. The child runs in its own session, so nothing else
would end it.

Plain Python (no Slicer, no Qt); psutil is used when it is installed (stock Slicer has none),
otherwise process groups (``os.killpg``) on Linux and macOS and ``taskkill /T`` on Windows.
"""

import atexit
import collections
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Deque, Dict, List, Mapping, Optional, Sequence, Set

from SemiSupSegLib.protocol import STOP_FILE_VARIABLE

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is optional in Slicer's Python
    psutil = None

IS_WINDOWS = os.name == "nt"
BACKEND_MODULE = "SemiSupSegLib.backend"
STDERR_TAIL_LINES = 200
# After the grace time, how long ``stop`` waits for a killed tree to be gone.
KILL_WAIT_SECONDS = 5.0


def moduleSearchPath() -> str:
    """The folder that holds the SemiSupSegLib package (what the backend needs on sys.path)."""
    return str(Path(__file__).resolve().parent.parent)


def slicerPython(executable: Optional[str] = None) -> str:
    """Slicer's Python launcher, ``PythonSlicer``, to run the backend and the dependency probe.

    Current Slicer already sets ``sys.executable`` to PythonSlicer as found on the PATH
    (qSlicerCoreApplication.cxx), and to "" when it is not there; this lookup is the fallback
    for that case and for older Slicers, where ``sys.executable`` is the application itself.
    Like ``slicer.util.executePythonModule``, look on the PATH (Slicer puts its bin folder
    there), then next to ``executable`` (on macOS also in ``Contents/bin`` for an application
    in ``Contents/MacOS``). Outside Slicer (scripts, tests) a Python interpreter is its own
    answer.

    Raises:
        FileNotFoundError: PythonSlicer is nowhere to be found; the message says where it
            looked.
    """
    executable = executable or sys.executable
    found = shutil.which("PythonSlicer")
    if found:
        return found
    if not executable:
        raise FileNotFoundError(
            "PythonSlicer is not on the PATH and Slicer did not name its Python "
            "(sys.executable is empty); choose an external Python environment instead"
        )
    application = Path(executable)
    name = "PythonSlicer.exe" if IS_WINDOWS else "PythonSlicer"
    candidates = [application.with_name(name)]
    if application.parent.name == "MacOS":  # Slicer.app/Contents/MacOS -> Contents/bin
        candidates.append(application.parent.parent / "bin" / name)
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    if re.fullmatch(r"python[0-9.]*(\.exe)?", application.name, re.IGNORECASE):
        return executable
    raise FileNotFoundError(
        f"PythonSlicer was found neither on the PATH nor next to {executable}; "
        "choose an external Python environment instead"
    )


def backendCommand(python: str, jobPath, resume: bool = False) -> List[str]:
    """The command line that runs one job and streams its events as JSON lines on stdout."""
    command = [str(python), "-m", BACKEND_MODULE, "run", str(jobPath), "--events", "-", "--quiet"]
    if resume:
        command.append("--resume")
    return command


def backendEnvironment(
    baseEnvironment: Optional[Mapping[str, str]] = None,
    device: str = "auto",
    moduleDir: Optional[str] = None,
) -> Dict[str, str]:
    """The child's environment: SemiSupSegLib importable, unbuffered UTF-8 output, and no
    visible CUDA device when the user chose the CPU (``CUDA_VISIBLE_DEVICES=-1``)."""
    env = dict(os.environ if baseEnvironment is None else baseEnvironment)
    moduleDir = moduleDir or moduleSearchPath()
    existing = env.get("PYTHONPATH", "")
    parts = [moduleDir] + [p for p in existing.split(os.pathsep) if p and p != moduleDir]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    return env


class BackendProcess:
    """One child process: start, non-blocking reads, cancel of the whole tree.

    The constructor takes the command; nothing runs until ``start``. Every method returns
    immediately except ``wait``, which is for scripts and tests, never for the GUI thread.
    """

    def __init__(
        self,
        command: Sequence[str],
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        graceSeconds: float = 10.0,
    ) -> None:
        self.command = [str(c) for c in command]
        self.env = dict(env) if env is not None else None
        self.cwd = str(cwd) if cwd else None
        self.graceSeconds = graceSeconds
        self._popen: Optional[subprocess.Popen] = None
        self._lines: queue.Queue[str] = queue.Queue()
        self._stderr: Deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._readers: List[threading.Thread] = []
        self._cancelDeadline: Optional[float] = None
        self._killed = False
        self._tree: Dict[int, object] = {}
        self.cancelRequested = False
        # the file whose appearance asks the backend to stop (its name is in the child's env)
        self.stopFile = os.path.join(tempfile.gettempdir(), f"SemiSupSeg-stop-{uuid.uuid4().hex}")

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> "BackendProcess":
        if self._popen is not None:
            raise RuntimeError("the process was already started")
        env = dict(os.environ if self.env is None else self.env)
        env[STOP_FILE_VARIABLE] = self.stopFile
        kwargs = {
            "stdin": subprocess.DEVNULL,
            "stdout": subprocess.PIPE,
            "stderr": subprocess.PIPE,
            "env": env,
            "cwd": self.cwd,
            "universal_newlines": True,
            "encoding": "utf-8",
            "errors": "replace",
            "bufsize": 1,
        }
        if IS_WINDOWS:
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) | getattr(
                subprocess, "CREATE_NO_WINDOW", 0
            )
        else:
            kwargs["start_new_session"] = True  # its own process group: killpg reaches the tree
        self._popen = subprocess.Popen(self.command, **kwargs)
        self._readers = [
            threading.Thread(target=self._readStdout, name="SemiSupSeg-stdout", daemon=True),
            threading.Thread(target=self._readStderr, name="SemiSupSeg-stderr", daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        _started.add(self)
        return self

    @property
    def pid(self) -> Optional[int]:
        return self._popen.pid if self._popen is not None else None

    @property
    def started(self) -> bool:
        return self._popen is not None

    @property
    def running(self) -> bool:
        return self.started and self.poll() is None

    def readLines(self, maxLines: int = 10000) -> List[str]:
        """Lines of stdout received since the last call (never waits)."""
        lines: List[str] = []
        while len(lines) < maxLines:
            try:
                lines.append(self._lines.get_nowait())
            except queue.Empty:
                break
        return lines

    def stderrTail(self) -> str:
        return "\n".join(self._stderr)

    def poll(self) -> Optional[int]:
        """The exit code once the process has exited and its output is fully read, else None.

        While a cancel is pending, this also escalates to killing the tree after the grace time.
        """
        if self._popen is None:
            return None
        code = self._popen.poll()
        if self.cancelRequested:
            self._rememberTree()
            overdue = self._cancelDeadline is not None and time.monotonic() >= self._cancelDeadline
            if overdue and not self._killed and (code is None or self._treeAlive()):
                self.kill()
        if code is None:
            return None
        if any(reader.is_alive() for reader in self._readers):
            if self.cancelRequested and self._killed:
                # a killed tree closes its pipes at once; do not wait on a stray reader
                for reader in self._readers:
                    reader.join(0.5)
            else:
                return None
        self._ended()
        return code

    def cancel(self) -> None:
        """Ask the process tree to stop (stop file, SIGTERM); ``poll`` kills it if it outlives
        ``graceSeconds``."""
        if self._popen is None or self._popen.poll() is not None:
            return
        self.cancelRequested = True
        self._cancelDeadline = time.monotonic() + self.graceSeconds
        self._rememberTree()
        self._signalTree(force=False)

    def kill(self) -> None:
        """End the process and every descendant now."""
        if self._popen is None:
            return
        self.cancelRequested = True
        self._killed = True
        self._rememberTree()
        self._signalTree(force=True)

    def stop(self) -> Optional[int]:
        """End the process tree and wait until it is gone (Slicer's exit; never the GUI's
        normal use): the gentle stop, up to ``graceSeconds`` for the backend to save a
        checkpoint and exit (counted from an earlier ``cancel``), then kill. Returns the exit
        code."""
        if self._popen is None:
            return None
        self._rememberTree()
        if self._treeAlive():
            if not self.cancelRequested:
                self.cancelRequested = True
                self._cancelDeadline = time.monotonic() + self.graceSeconds
                self._signalTree(force=False)
            # no deadline after a kill() without a cancel(): no grace time left
            self._waitForTree(self._cancelDeadline or time.monotonic())
            if self._treeAlive():
                self.kill()
                self._waitForTree(time.monotonic() + KILL_WAIT_SECONDS)
        if not self._treeAlive():
            self._ended()
        return self._popen.poll()

    def _waitForTree(self, deadline: float, interval: float = 0.05) -> None:
        while time.monotonic() < deadline and self._treeAlive():
            self._rememberTree()  # a child started late is ended too
            time.sleep(interval)

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> Optional[int]:
        """Block until the process has finished (scripts and tests only, never the GUI)."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            code = self.poll()
            if code is not None:
                return code
            if end is not None and time.monotonic() >= end:
                return None
            time.sleep(interval)

    def treePids(self) -> List[int]:
        """Process ids of the process and the descendants seen so far."""
        self._rememberTree()
        return sorted(self._tree)

    # ------------------------------------------------------------------ helpers

    def _readStdout(self) -> None:
        stream = self._popen.stdout
        try:
            for line in iter(stream.readline, ""):
                self._lines.put(line.rstrip("\r\n"))
        except (OSError, ValueError):
            pass
        finally:
            stream.close()

    def _readStderr(self) -> None:
        stream = self._popen.stderr
        try:
            for line in iter(stream.readline, ""):
                self._stderr.append(line.rstrip("\r\n"))
        except (OSError, ValueError):
            pass
        finally:
            stream.close()

    def _ended(self) -> None:
        _started.discard(self)
        try:
            os.remove(self.stopFile)
        except OSError:
            pass  # never written

    def _rememberTree(self) -> None:
        if psutil is None or self._popen is None:
            if self._popen is not None:
                self._tree.setdefault(self._popen.pid, None)
            return
        try:
            root = psutil.Process(self._popen.pid)
            found = [root] + root.children(recursive=True)
        except psutil.Error:
            found = []
        for process in found:
            self._tree.setdefault(process.pid, process)

    def _treeAlive(self) -> bool:
        if self._popen is not None and self._popen.poll() is None:
            return True
        if any(reader.is_alive() for reader in self._readers):
            return True  # a descendant still holds the output pipes open
        if psutil is None:
            return False
        for process in self._tree.values():
            try:
                if process is not None and process.is_running() and process.status() != "zombie":
                    return True
            except psutil.Error:
                continue
        return False

    def _signalTree(self, force: bool) -> None:
        """Gentle: the stop file, and SIGTERM except on Windows (there the only signal is a
        kill). Forced: kill every process of the tree."""
        if not force:
            self._writeStopFile()
            if IS_WINDOWS:
                return
        elif IS_WINDOWS:
            self._killWindowsTree()  # first: it finds the tree only through a living launcher
        if psutil is not None:
            for process in list(self._tree.values()):
                if process is None:
                    continue
                try:
                    if force:
                        process.kill()
                    else:
                        process.terminate()
                except psutil.Error:
                    pass
        if not IS_WINDOWS:
            try:
                os.killpg(self._popen.pid, signal.SIGKILL if force else signal.SIGTERM)
            except (ProcessLookupError, PermissionError, OSError):
                pass

    def _writeStopFile(self) -> None:
        try:
            with open(self.stopFile, "w", encoding="utf-8") as handle:
                handle.write("stop\n")
        except OSError:
            pass  # the signal or, after the grace time, the kill still ends the tree

    def _killWindowsTree(self) -> None:
        """``taskkill /T /F`` from the launcher: the launcher, the real Python and their
        children."""
        if self._popen.poll() is not None:
            return  # a dead root has no tree for taskkill; psutil ends what it remembered
        subprocess.run(
            ["taskkill", "/PID", str(self._popen.pid), "/T", "/F"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
            check=False,
        )


# Every process started here and not yet seen to end, so that none outlives this interpreter.
_started: Set[BackendProcess] = set()


@atexit.register
def stopAllProcesses() -> None:
    """Stop every process started here that is still running (grace time, then kill).

    Runs when the interpreter exits (Slicer's Python too); all trees are asked to stop first,
    so the grace times run side by side."""
    processes = [process for process in list(_started) if process._treeAlive()]
    for process in processes:
        if not process.cancelRequested:
            process.cancel()
    for process in processes:
        process.stop()
