"""chatobs: OpenTelemetry metrics and traces for the chat pipeline, served to Prometheus.

Example::

    import chatobs
    telemetry = chatobs.setup(service="gateway", app=app)
    telemetry.llm.request("gpt-4o-mini", "openai")
"""

from chatobs.catalogue import CATALOGUE, Kind, Label, Metric
from chatobs.recorders import CircuitState, llm_error_code
from chatobs.settings import ConfigError, Settings, load_settings
from chatobs.telemetry import Telemetry, current, setup
from chatobs.version import __version__

__all__ = [
    "CATALOGUE",
    "CircuitState",
    "ConfigError",
    "Kind",
    "Label",
    "Metric",
    "Settings",
    "Telemetry",
    "__version__",
    "current",
    "llm_error_code",
    "load_settings",
    "setup",
]
