"""Device choice: CUDA, then Apple MPS, then CPU, unless the user names one."""

from __future__ import annotations

import torch

from SemiSupSegLib.backend.errors import ConfigError


def select_device(requested: str = "auto") -> torch.device:
    """Return the device to train on; ask for an unavailable one and get a clear error."""
    requested = (requested or "auto").lower()
    mps = getattr(torch.backends, "mps", None)
    mps_available = bool(mps is not None and mps.is_available())
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available:
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                "device 'cuda' was asked for but torch sees no CUDA GPU "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); use --device cpu"
            )
        return torch.device(requested)
    if requested == "mps":
        if not mps_available:
            raise ConfigError("device 'mps' was asked for but this machine has no Apple GPU (MPS)")
        return torch.device("mps")
    if requested == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"unknown device {requested!r}; use auto, cuda, mps or cpu")


def describe_device(device: torch.device) -> str:
    """A short human description, e.g. 'cuda (NVIDIA RTX 4090, 24 GB)'."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"cuda ({props.name}, {props.total_memory / 2**30:.0f} GB)"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type
