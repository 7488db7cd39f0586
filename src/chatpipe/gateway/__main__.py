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
from types import FrameType

import uvicorn

from chatpipe.settings import load_pipeline_settings


def _stopped(signum: int, frame: FrameType | None) -> None:
    """The signal uvicorn raises again once it has stopped: nothing left to do."""


def main() -> None:
    settings = load_pipeline_settings()
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
