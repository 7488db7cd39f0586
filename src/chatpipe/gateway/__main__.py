"""Run the gateway: ``python -m chatpipe.gateway`` (``CHATPIPE_GATEWAY_HOST``/``_PORT``).

``uvicorn chatpipe.gateway:app`` works too; this entry point differs in how it ends. On
SIGTERM uvicorn stops taking connections, lets open requests finish, runs the lifespan's
shutdown, and then raises the signal again for the handler that was there before it
started: with the default handler the process dies there, by the signal (exit status
-15), and no atexit hook runs. Here a handler is in place, so the gateway returns from
uvicorn and exits 0 after a graceful stop, with chatobs's exit hook run.
"""

from __future__ import annotations

import signal
import socket
from types import FrameType

import uvicorn

from chatobs.settings import ConfigError, load_settings
from chatpipe.settings import PipelineSettings, load_pipeline_settings

_ANY_ADDRESS = ("0.0.0.0", "::")


def _stopped(signum: int, frame: FrameType | None) -> None:
    """The signal uvicorn raises again once it has stopped: nothing left to do."""


def _bound_addresses(host: str, family: socket.AddressFamily) -> set[tuple[int, str]]:
    """``(family, address)`` of each socket a listener on ``host`` binds; none if it does not resolve
    (the listener itself then says so)."""
    try:
        found = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except OSError:
        return set()
    return {(info[0], str(info[4][0])) for info in found}


def _clash(first: set[tuple[int, str]], second: set[tuple[int, str]]) -> bool:
    # Both listeners set IPV6_V6ONLY (asyncio's server and socket.create_server do), so only
    # addresses of one family can clash: the same address, or that family's wildcard.
    return any(
        family == other_family and (address == other or not {address, other}.isdisjoint(_ANY_ADDRESS))
        for family, address in first
        for other_family, other in second
    )


def _check_ports(settings: PipelineSettings) -> None:
    """Refuse a standalone metrics server on the gateway's own address: the app import starts
    it first, and uvicorn would then fail to bind in words that name neither variable."""
    metrics = load_settings().chatobs
    if metrics.metrics_port != settings.gateway_port or settings.gateway_port == 0:
        return
    # The metrics server binds one family (IPv6 for an address with a colon), uvicorn each address the host resolves to.
    metrics_family = socket.AF_INET6 if ":" in metrics.metrics_host else socket.AF_INET
    metrics_addresses = _bound_addresses(metrics.metrics_host, metrics_family)
    if _clash(metrics_addresses, _bound_addresses(settings.gateway_host, socket.AF_UNSPEC)):
        raise ConfigError(
            {
                "CHATPIPE_GATEWAY_PORT, CHATOBS_METRICS_PORT": f": both {settings.gateway_port}; the gateway serves "
                "/metrics on its own port already (give the metrics server another, or unset CHATOBS_METRICS_PORT)"
            }
        )


def main() -> None:
    settings = load_pipeline_settings()
    _check_ports(settings)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stopped)
    uvicorn.run(
        "chatpipe.gateway:app",
        host=settings.gateway_host,
        port=settings.gateway_port,
        timeout_graceful_shutdown=settings.gateway_graceful_shutdown_seconds,
        log_level="info",
    )


if __name__ == "__main__":
    main()
