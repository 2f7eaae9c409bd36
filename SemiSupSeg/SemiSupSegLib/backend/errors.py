"""Errors the backend reports to users: each names the file and what is wrong with it."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """An input file or dataset that cannot be used; ``path`` is the file at fault."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)


class ConfigError(ValueError):
    """A setting that is unknown or out of range; the message names the setting."""


class CancelledError(RuntimeError):
    """Training or prediction stopped on the user's request (SIGINT/SIGTERM)."""
