"""`Readiness`: whether a request could be served right now, for every front end's health.

Owns the one answer HTTP's /health and the routes' 503s give (gRPC's health service is set
from the same moments by the app): not before the warm-up generation succeeded, not once the
engine has failed, not while the server drains on SIGTERM.
"""
from __future__ import annotations

from typing import Optional

from qwenserve.frontend.engine_client import EngineClient


class Readiness:
    def __init__(self, client: EngineClient):
        self.client = client
        self.warm = False       # set once the warm-up generation succeeded
        self.draining = False   # set when shutdown begins

    def unavailable_reason(self) -> Optional[str]:
        """Why a request could not be served now, or None when it could."""
        if self.client.dead_reason is not None:
            return f"engine failed: {self.client.dead_reason}"
        if self.draining:
            return "server is shutting down"
        if not self.warm:
            return "server is not ready yet (warming up)"
        return None
