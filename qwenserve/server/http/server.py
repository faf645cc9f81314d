"""`HttpServer`: uvicorn serving the HTTP app inside the server's own asyncio loop.

Owns the listening socket and uvicorn's lifecycle beside gRPC: the port is bound up front (so a
busy port fails before anything starts, and port 0 says which port it got), uvicorn never
installs signal handlers (the app's SIGINT/SIGTERM handling drains both front ends together),
and `stop` is called only after the app has aborted what was still running, so the streams it
waits for end at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Optional

import uvicorn

logger = logging.getLogger(__name__)


class _InLoopServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the app owns the signals
        yield


class HttpServer:
    def __init__(self, app, host: str, port: int, ssl_certfile: Optional[str] = None,
                 ssl_keyfile: Optional[str] = None):
        self.app, self.host, self.port = app, host, port
        self.ssl_certfile, self.ssl_keyfile = ssl_certfile, ssl_keyfile
        self._socket: Optional[socket.socket] = None
        self._server: Optional[_InLoopServer] = None
        self._task: Optional[asyncio.Task] = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.ssl_certfile else 'http'}://{host}:{self.port}"

    def bind(self) -> None:
        """Binds the port (OSError when it cannot); `port` is then the real one."""
        family, kind, proto, _, address = socket.getaddrinfo(self.host.strip("[]"), self.port,
                                                             type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self.port = sock.getsockname()[1]

    async def start(self) -> None:
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, log_level="warning",
                                access_log=False, ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile,
                                timeout_graceful_shutdown=5, timeout_keep_alive=5)
        self._server = _InLoopServer(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[self._socket]))
        while not self._server.started:  # startup is quick: the socket is already bound
            if self._task.done():
                self._task.result()  # raises what went wrong (e.g. a bad certificate)
                raise RuntimeError("the HTTP server stopped during startup")
            await asyncio.sleep(0.01)

    async def stop(self, timeout: float = 10.0) -> None:
        """Closes the port, lets responses in flight finish (the app has aborted their
        requests by now), then returns; after `timeout` seconds connections are dropped."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except asyncio.TimeoutError:
            logger.warning("HTTP connections still open after %.0fs: closing them", timeout)
            self._server.force_exit = True
            await self._task
