"""Checkpoints: written atomically, with the config and library versions needed to reuse them.

Model files are shared between colleagues, so they are read with ``torch.load(weights_only=True)``:
tensors and plain values (numbers, strings, lists, dicts) only, never arbitrary Python objects,
whose unpickling could run code. Everything a checkpoint holds is stored in those terms.
"""

from __future__ import annotations

import os
import pickle
import platform
import random
import warnings
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from SemiSupSegLib.backend.atomic_files import temporary_name
from SemiSupSegLib.backend.errors import DataError
from SemiSupSegLib.output_layout import CHECKPOINT_FILE, MODEL_FILE

FORMAT = "semisupseg-checkpoint"
FORMAT_VERSION = 1


def library_versions() -> Dict[str, str]:
    import monai
    import SimpleITK
    import timm

    import SemiSupSegLib

    return {
        "semisupseg": SemiSupSegLib.__version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a TorchVersion object would not load safely
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
    tmp = path.with_name(temporary_name(path.name))
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def model_file(path: str | Path) -> Path:
    """The file a run folder's model is read from: ``model.pt``, else the (possibly unfinished)
    ``checkpoint.pt``; ``path`` itself when it is not a folder."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in (MODEL_FILE, CHECKPOINT_FILE):
        if (path / name).exists():
            return path / name
    raise DataError(path, f"no {MODEL_FILE} or {CHECKPOINT_FILE} in this run folder")


def load_checkpoint(path: str | Path) -> Dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; clear errors for anything else."""
    path = model_file(path)
    if not path.exists():
        raise DataError(path, "checkpoint file not found")
    try:
        # A file that is not torch's own format makes torch warn about its pickle protocol
        # before refusing it; the refusal below says what the user needs to know.
        with torch.serialization.safe_globals(_LEGACY_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" not in str(err).lower():  # the weights-only reader's word for an object
            raise DataError(
                path, "not a readable checkpoint: damaged or not a model file"
            ) from None
        raise DataError(
            path,
            "refused: the file holds Python objects besides weights, which could run code when "
            "loaded; only model files written by SemiSupSeg are accepted",
        ) from None
    except Exception as err:  # torch raises many types for damaged files
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise DataError(
            path,
            f"not a readable checkpoint ({type(err).__name__}{': ' if reason else ''}{reason})",
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError(path, "not a SemiSupSeg checkpoint")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise DataError(path, "written by a newer SemiSupSeg; update this installation")
    return payload


# Checkpoints written before model files were loaded safely hold a TorchVersion and NumPy's
# random state (an array); these constructors only build such values, so they stay readable.
_LEGACY_GLOBALS = [
    torch.torch_version.TorchVersion,
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
    np.zeros(0).__reduce__()[0],  # numpy's array reconstructor (module path varies by version)
]


def rng_state() -> Dict[str, Any]:
    """The global random number generators' states, in plain values and tensors."""
    return {
        "python": random.getstate(),
        "numpy": random_state_to_list(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(random_state_from_list(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def random_state_to_list(state: tuple) -> List[Any]:
    """A ``numpy.random.RandomState`` state tuple as plain values (its key array as a list)."""
    kind, keys, position, has_gauss, cached_gaussian = state
    return [
        str(kind),
        [int(k) for k in keys],
        int(position),
        int(has_gauss),
        float(cached_gaussian),
    ]


def random_state_from_list(state: Any) -> tuple:
    """The state tuple ``numpy.random.RandomState.set_state`` takes, from ``random_state_to_list``
    (or from an older checkpoint, which kept the tuple itself)."""
    kind, keys, position, has_gauss, cached_gaussian = state
    return (kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian)
