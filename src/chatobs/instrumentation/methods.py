"""The ``http.request.method`` value the HTTP semantic conventions bound a request's method to.

Example::

    >>> http_method("get"), http_method("BREW")
    ('GET', '_OTHER')
"""

from __future__ import annotations

import functools

from opentelemetry.util.http import sanitize_method

__all__ = ["http_method"]


@functools.lru_cache(maxsize=64)
def http_method(method: str) -> str:
    """A known method upper-cased, any other ``_OTHER`` (every method as sent with
    ``OTEL_PYTHON_INSTRUMENTATION_HTTP_CAPTURE_ALL_METHODS``), as the contrib instrumentations do.

    Cached, so bounded in memory: ``sanitize_method`` reads the environment on every call,
    which was a quarter of the instrumentation of an outbound request under the demo's load.
    """
    return sanitize_method(method) or "_OTHER"
