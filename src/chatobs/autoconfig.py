"""Zero-code path: ``opentelemetry-instrument uvicorn app:app`` gives what ``setup()`` gives.

``opentelemetry-instrument`` loads, in order, a distro, a configurator and every
installed instrumentor (entry points declared in ``pyproject.toml``):

* :class:`ChatobsDistro` sets defaults other instrumentations read (keep the
  scrape and health paths out of HTTP traces and metrics), and leaves the libraries
  chatobs instruments itself (:data:`~chatobs.instrumentation.LIBRARIES`) to chatobs, so
  they are instrumented exactly as ``setup()`` does it;
* :class:`ChatobsConfigurator` calls :func:`chatobs.setup` with the role from
  ``CHATOBS_SERVICE``, so settings are validated, providers made global and the client
  libraries instrumented before any other instrumentor runs;
* :class:`MetricsRouteInstrumentor` mounts ``/metrics`` on every FastAPI app
  created afterwards, and instruments it, which is how both happen without code changes.

Example::

    CHATOBS_SERVICE=gateway opentelemetry-instrument uvicorn myservice:app
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Collection
from importlib.metadata import EntryPoint
from typing import Any

from opentelemetry.instrumentation.distro import BaseDistro
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.instrumentation.utils import unwrap
from wrapt import wrap_function_wrapper

from chatobs.instrumentation import LIBRARIES

__all__ = ["ChatobsConfigurator", "ChatobsDistro", "MetricsRouteInstrumentor"]

_logger = logging.getLogger("chatobs")


class ChatobsDistro(BaseDistro):
    """Defaults for the instrumentations ``opentelemetry-instrument`` loads."""

    def _configure(self, **kwargs: Any) -> None:
        path = os.environ.get("CHATOBS_METRICS_PATH", "/metrics")
        health = os.environ.get("CHATOBS_HEALTH_PATHS", "/health")
        # Scrapes and probes would otherwise dominate the HTTP server metrics and traces.
        os.environ.setdefault("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS", f"{path},{health}")
        # The catalogue names the stable HTTP metrics (seconds, `http.route`).
        os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")

    def load_instrumentor(self, entry_point: EntryPoint, **kwargs: Any) -> None:
        if entry_point.name in LIBRARIES:
            # chatobs.setup() (the configurator) instruments these, under its own client
            # instrumentors; the contrib instrumentor on its own would trace and meter them twice.
            _logger.debug("chatobs: %s is instrumented by chatobs.setup()", entry_point.name)
            return
        super().load_instrumentor(entry_point, **kwargs)


class ChatobsConfigurator:
    """Builds the providers through :func:`chatobs.setup` (settings from the environment)."""

    def configure(self, **kwargs: Any) -> None:
        from chatobs.settings import ConfigError
        from chatobs.telemetry import _set_up

        try:
            # The client libraries now; FastAPI apps as they are built (MetricsRouteInstrumentor).
            _set_up(None, None, None, True, zero_code=True)
        except ConfigError as error:
            # `opentelemetry-instrument` catches an Exception here and runs the app anyway, with
            # no telemetry and no /metrics; a bad setting must stop the service, as `setup()` does.
            # This runs in `sitecustomize`, where a SystemExit is a "Fatal Python error" and a
            # traceback: exit at once, with the message alone, as a usage error (2).
            print(f"chatobs: bad settings, not starting: {error}", file=sys.stderr, flush=True)
            os._exit(2)


def _mount_after_init(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    wrapped(*args, **kwargs)
    try:
        from chatobs.telemetry import current

        telemetry = current()
        if telemetry is not None:
            telemetry.mount(instance)
            telemetry.instrument(instance)
    except Exception:
        _logger.exception("chatobs: could not mount the metrics route or instrument the app")


class MetricsRouteInstrumentor(BaseInstrumentor):
    """Mounts the scrape route on each ``fastapi.FastAPI`` built after :meth:`instrument`, and
    instruments it (chatobs's :class:`~chatobs.instrumentation.ServerMiddleware`).

    ``instrument()`` and ``uninstrument()`` are idempotent (``BaseInstrumentor``).
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("fastapi >= 0.110",)

    def _instrument(self, **kwargs: Any) -> None:
        wrap_function_wrapper("fastapi", "FastAPI.__init__", _mount_after_init)

    def _uninstrument(self, **kwargs: Any) -> None:
        import fastapi

        unwrap(fastapi.FastAPI, "__init__")
