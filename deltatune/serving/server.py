"""Running the API under uvicorn with a graceful drain: SIGTERM (or Ctrl-C) stops taking requests
(503 with Retry-After), lets the ones in flight finish within ``drain_timeout`` seconds, then
answers those still open with the same 503 error (a JSON body, or an error event then ``[DONE]``
on a stream) before it exits. A second signal stops at once."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI

from deltatune.serving.engine import Engine

log = logging.getLogger("deltatune.serve")


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first exit signal drains instead of closing the listener at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, engine: Engine, drain_timeout: float) -> None:
        super().__init__(config)
        self.app, self.engine, self.drain_timeout = app, engine, drain_timeout
        self.draining: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.draining is not None:  # a second signal: stop now
            super().handle_exit(sig, frame)
            return
        self.app.state.draining = True
        self.draining = threading.Thread(target=self._drain, name="deltatune-drain", daemon=True)
        self.draining.start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while self.engine.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.engine.busy():
            log.warning("drain timeout: %d requests still open get 503", self.engine.open_requests)
            self.engine.close()  # stops the worker, then fails each open request with 503 shutting_down
        time.sleep(0.2)  # the last answers leave the handlers (uvicorn then waits for them to be sent)
        self.should_exit = True


def serve(engine: Engine, app: FastAPI, host: str, port: int, drain_timeout: float = 30.0) -> None:
    """Serve until drained; the engine's worker stops afterwards (open requests get 503)."""
    if not log.handlers:  # uvicorn configures its own loggers only: ours would print warnings alone, bare
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=5)
    try:
        DrainingServer(config, app, engine, drain_timeout).run()
    finally:
        engine.close()
