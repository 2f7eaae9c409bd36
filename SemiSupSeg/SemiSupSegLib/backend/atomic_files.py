"""Files written whole or not at all: a temporary stand-in beside the file, then a rename.

A rename replaces the file (or a symbolic link in its place) in one step, so a crash leaves the
old file or the new one, and a write never follows a link out of the folder. The stand-ins have
hidden names marked ``.tmp`` so that the next writer of the folder can remove those a killed
process left behind (see ``folder_lock``).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

#: Marks a temporary file or folder of ours (see ``temporary_name``).
TEMPORARY_MARK = ".tmp"
#: A ``temporary_name`` (the random part is absent in those of older versions).
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.\d+(-[0-9a-f]{8})?\.tmp(\..*)?$")


def temporary_name(name: str, ending: str = "") -> str:
    """A hidden, unique name for a temporary stand-in of ``name`` in the same folder (``ending``
    kept last, e.g. an image format's suffix that picks its writer)."""
    return f".{name}.{os.getpid()}-{os.urandom(4).hex()}{TEMPORARY_MARK}{ending}"


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename."""
    path = Path(path)
    temporary = path.with_name(temporary_name(path.name))
    try:
        with open(temporary, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def remove_temporaries(folder: Path, name: Optional[str] = None) -> None:
    """Remove the temporary stand-ins (``temporary_name``) a killed writer left in ``folder``:
    all of them, or only those of ``name``."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
