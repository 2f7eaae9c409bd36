"""One writer per output folder: an exclusive lock held while a run or prediction folder is written.

The lock is the file ``.<folder>.lock`` beside the folder (so taking it creates nothing inside a
folder that validation may still refuse). It is held with ``fcntl.flock`` (``msvcrt.locking``
on Windows), which the operating system releases when its process ends, however it ends: a lock
file left by a killed process is stale and does not block anyone. The file names the holder, so
a second writer is told which process has the folder.

While the lock is held no other SemiSupSeg process writes into the folder, so temporary files
found in it or beside it (``atomic_files.temporary_name``), left by a killed writer, are stale
and removed.
"""

from __future__ import annotations

import functools
import inspect
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from SemiSupSegLib.backend.atomic_files import remove_temporaries
from SemiSupSegLib.backend.errors import DataError

if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


def lock_path(folder: Path) -> Path:
    """The lock file of ``folder``: ``.<name>.lock`` beside it."""
    return folder.parent / f".{folder.name}.lock"


class FolderLock:
    """Hold ``folder`` for writing; ``DataError`` naming the holder if another process has it.

    Use as a context manager. Also refuses, before any work is done, a ``folder`` that is a
    file or whose parent cannot be written.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).absolute()
        self.path = lock_path(self.folder)
        self._fd: Optional[int] = None

    def acquire(self) -> FolderLock:
        if self.folder.exists() and not self.folder.is_dir():
            raise DataError(self.folder, "is a file, not a folder; choose a folder for the outputs")
        try:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            problem = f"cannot create the folder ({error.strerror})"
            raise DataError(self.folder.parent, problem) from None
        while self._fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise DataError(self.folder, f"cannot write here ({error.strerror})") from None
            if not _try_lock(fd):
                holder = _read_holder(fd)
                os.close(fd)
                raise DataError(
                    self.folder,
                    f"in use by another SemiSupSeg process ({holder}); wait for it to finish or "
                    f"stop it, or choose another folder (lock file {self.path})",
                )
            if _same_file(fd, self.path):
                self._fd = fd
            else:  # its holder removed the file between our open and our lock: take a new one
                os.close(fd)
        os.ftruncate(self._fd, 0)
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}"
        os.write(self._fd, holder.encode("utf-8"))
        if self.folder.is_dir() and not os.access(self.folder, os.W_OK | os.X_OK):
            self.release()
            raise DataError(self.folder, "folder is not writable")
        remove_temporaries(self.folder)
        remove_temporaries(self.folder.parent, name=self.folder.name)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # before unlocking: whoever opens the path next gets a new file
        except OSError:
            pass  # Windows cannot remove an open file; the next writer reuses it
        _unlock(self._fd)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown process"
    except OSError:
        return "unknown process"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


Function = TypeVar("Function", bound=Callable[..., Any])


def holds_folder(argument: str, when: Callable[[], bool] = lambda: True) -> Callable:
    """Decorator: the call holds a ``FolderLock`` on the folder passed as ``argument``
    (only when ``when()`` is true, e.g. on the process that writes)."""

    def decorate(function: Function) -> Function:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args: Any, **kwargs: Any) -> Any:
            if not when():
                return function(*args, **kwargs)
            folder = signature.bind(*args, **kwargs).arguments[argument]
            with FolderLock(folder):
                return function(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate
