"""Training methods by name: each owns its models, optimisers and one training step."""

from SemiSupSegLib.backend.methods import (
    copy_paste,  # noqa: F401  (bcp)
    embedding_matching,  # noqa: F401  (em, mn+em)
    mn,  # noqa: F401  (M&N)
    supervised,  # noqa: F401  (registers itself)
    teacher_student,  # noqa: F401  (mean-teacher, ua-mt)
)
from SemiSupSegLib.backend.methods.base import (
    Method,
    create_method,
    describe_method,
    list_methods,
    method_class,
    method_options,
    option,
    register_method,
)

__all__ = [
    "Method",
    "create_method",
    "describe_method",
    "list_methods",
    "method_class",
    "method_options",
    "option",
    "register_method",
]
