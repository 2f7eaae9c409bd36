"""Output folders replaced whole: the new contents are written into a hidden temporary folder
beside the target, which takes the target's place only once everything is written.

So a prediction that fails, is cancelled or is killed leaves the previous folder as it was (or,
killed in the instant between the two renames of ``commit``, no folder), never a mix of two
runs. Hold the target's ``FolderLock`` meanwhile: it also removes what a killed run left.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from SemiSupSegLib.backend.atomic_files import temporary_name
from SemiSupSegLib.backend.errors import DataError


class StagedFolder:
    """Write into ``staging``; ``commit()`` puts it in place of ``target``. Use as a context
    manager: leaving the block without a commit removes the staging folder."""

    def __init__(self, target: str | Path) -> None:
        self.target = Path(target).absolute()
        self.staging = self.target.parent / temporary_name(self.target.name)

    def __enter__(self) -> StagedFolder:
        try:
            self.staging.mkdir(parents=True)
        except OSError as error:
            problem = f"cannot write here ({error.strerror})"
            raise DataError(self.target.parent, problem) from None
        return self

    def commit(self) -> Path:
        """Replace ``target`` (if any) by the staging folder; the old contents are deleted."""
        replaced = None
        try:
            if self.target.exists() or self.target.is_symlink():
                replaced = self.target.parent / temporary_name(self.target.name)
                os.rename(self.target, replaced)
            os.rename(self.staging, self.target)
        except OSError as error:
            raise DataError(self.target, f"could not be replaced ({error.strerror})") from None
        if replaced is not None:
            if replaced.is_dir() and not replaced.is_symlink():
                shutil.rmtree(replaced, ignore_errors=True)
            else:
                replaced.unlink()
        return self.target

    def __exit__(self, *exc: Any) -> None:
        if self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
