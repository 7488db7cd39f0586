"""The ``error.type`` attribute of a failed operation's span."""

from __future__ import annotations

__all__ = ["error_type"]


def error_type(kind: type[BaseException]) -> str:
    """``error.type`` for an exception class: its fully qualified name, as the semantic
    conventions ask (a built-in's name alone).

    Example::

        span.set_attribute(ERROR_TYPE, error_type(type(error)))   # "asyncio.exceptions.TimeoutError"
    """
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
