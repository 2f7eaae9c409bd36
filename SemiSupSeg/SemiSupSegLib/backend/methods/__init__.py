"""Training methods by name: each owns its models, optimisers and one training step."""

from SemiSupSegLib.backend.methods import (
    mn,  # noqa: F401  (M&N)
    supervised,  # noqa: F401  (registers itself)
)
from SemiSupSegLib.backend.methods.base import Method, create_method, list_methods, register_method

__all__ = ["Method", "create_method", "list_methods", "register_method"]
