"""The manifest of a prediction folder, ``predictions.json``: which model predicted which cases,
when, and whether the folder is complete.

``predict`` writes it first as ``partial`` and last as ``complete``, listing every file it wrote.
A folder whose manifest says ``partial``, or whose files differ from the list (a mix of runs, a
file added or lost), is told apart from a complete one: ``evaluate`` refuses it, and ``predict``
replaces a folder only when everything in it is listed (it never deletes files it did not write).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from SemiSupSegLib.backend.atomic_files import write_text_atomic
from SemiSupSegLib.backend.errors import DataError
from SemiSupSegLib.output_layout import PREDICTION_MANIFEST_FILE, uncertainty_file_name

FORMAT = "semisupseg-predictions"
PARTIAL = "partial"
COMPLETE = "complete"


def case_entry(case: str, label_file: str) -> Dict[str, str]:
    """A case as the manifest lists it: its name and its files, relative to the folder."""
    return {"case": case, "label": label_file, "uncertainty": uncertainty_file_name(label_file)}


def write_manifest(
    folder: Path,
    model: Dict[str, Any],
    cases: Sequence[Dict[str, str]],
    status: str,
    other_files: Sequence[str] = (),
) -> None:
    """Write ``folder/predictions.json``: ``model`` (file, iteration, run id), ``cases`` (per
    case: its name and its output files relative to ``folder``), the ``other_files`` written,
    ``status`` and the time."""
    manifest = {
        "format": FORMAT,
        "format_version": 1,
        "status": status,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model,
        "cases": list(cases),
        "other_files": list(other_files),
    }
    write_text_atomic(folder / PREDICTION_MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: Path) -> Optional[Dict[str, Any]]:
    """The manifest of ``folder``, or None when it has none; DataError when it is unreadable."""
    path = folder / PREDICTION_MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise DataError(path, f"unreadable prediction manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(path, "not a SemiSupSeg prediction manifest")
    return manifest


def listed_files(manifest: Dict[str, Any]) -> List[str]:
    """Every file the manifest's prediction wrote, relative to its folder (itself included)."""
    files = [PREDICTION_MANIFEST_FILE]
    for case in manifest.get("cases") or []:
        files.extend(v for k, v in case.items() if k != "case" and isinstance(v, str))
    files.extend(manifest.get("other_files") or [])
    return files


def folder_files(folder: Path) -> List[str]:
    """Every file under ``folder`` but hidden ones (a file manager's, our temporaries),
    relative to it, in ``/`` notation."""
    files = (p.relative_to(folder) for p in folder.rglob("*") if not p.is_dir())
    return sorted(f.as_posix() for f in files if not any(n.startswith(".") for n in f.parts))


def check_complete(folder: Path) -> Optional[Dict[str, Any]]:
    """Raise DataError when ``folder``'s manifest says it is partial, or its files are not
    exactly those listed (mixed); return the manifest (None for a folder without one)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    path = folder / PREDICTION_MANIFEST_FILE
    if manifest.get("status") != COMPLETE:
        raise DataError(
            path,
            f"the prediction in this folder did not finish (status {manifest.get('status')!r}); "
            "run predict again",
        )
    listed, present = set(listed_files(manifest)), set(folder_files(folder))
    if present != listed:
        raise DataError(path, "the folder is mixed: " + _difference(listed, present))
    return manifest


def check_replaceable(folder: Path) -> None:
    """Raise DataError unless ``folder`` is absent, empty, or a complete or partial prediction
    folder of ours holding nothing else, which ``predict`` may then replace whole."""
    if not folder.is_dir():
        return
    present = set(folder_files(folder))
    if not present:
        return
    manifest = read_manifest(folder)
    if manifest is None:
        raise DataError(
            folder,
            f"holds files that are not SemiSupSeg predictions (no {PREDICTION_MANIFEST_FILE}), e.g. "
            f"{sorted(present)[0]}; choose a new or empty output folder",
        )
    unlisted = sorted(present - set(listed_files(manifest)))
    if unlisted:
        raise DataError(
            folder,
            f"holds files the previous prediction did not write, e.g. {unlisted[0]}; move them "
            "away or choose another output folder (a new prediction replaces the folder whole)",
        )


def _difference(listed: set, present: set) -> str:
    parts = []
    missing, extra = sorted(listed - present), sorted(present - listed)
    if missing:
        parts.append(f"{len(missing)} listed file(s) missing, e.g. {missing[0]}")
    if extra:
        parts.append(
            f"{len(extra)} file(s) not written by the prediction it records, e.g. {extra[0]}"
        )
    return "; ".join(parts) + "; run predict again into an empty folder"
