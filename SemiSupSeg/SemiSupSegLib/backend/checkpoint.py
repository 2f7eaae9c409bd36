"""Checkpoints: written atomically, with the config and library versions needed to reuse them."""

from __future__ import annotations

import os
import platform
import random
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from SemiSupSegLib.backend.errors import DataError

FORMAT = "semisupseg-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"


def library_versions() -> Dict[str, str]:
    import monai
    import SimpleITK
    import timm

    import SemiSupSegLib

    return {
        "semisupseg": SemiSupSegLib.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "timm": timm.__version__,
        "SimpleITK": SimpleITK.Version_VersionString(),
        "numpy": np.__version__,
    }


def save_checkpoint(path: str | Path, payload: Dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` through a temporary file and a rename, so a crash or a
    cancel never leaves a half-written checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": library_versions(),
        **payload,
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | Path) -> Dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; clear errors for anything else."""
    path = Path(path)
    if path.is_dir():
        for name in (MODEL_NAME, CHECKPOINT_NAME):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise DataError(path, f"no {MODEL_NAME} or {CHECKPOINT_NAME} in this run folder")
    if not path.exists():
        raise DataError(path, "checkpoint file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for damaged files
        raise DataError(path, f"not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError(path, "not a SemiSupSeg checkpoint")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise DataError(path, "written by a newer SemiSupSeg; update this installation")
    return payload


def rng_state() -> Dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
