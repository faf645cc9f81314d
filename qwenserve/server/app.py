"""Builds and runs the serving process: `run_server(config, options)`.

Owns the server's lifecycle:
  1. start the engine: `AsyncLLM` starts the engine-core process, which loads the weights
     (showing its own progress) and answers once it is ready (`--dp N`: N cores as Ray actors);
  2. bind both ports and start gRPC with health NOT_SERVING (`grpc.health.v1.Health`) and
     server reflection, and the OpenAI-compatible HTTP API (uvicorn, in this same event loop;
     /health 503), print the addresses; with --api-key every call but health needs the key,
     with --ssl-* both ports serve TLS;
  3. run one warm-up generation through the engine; only if it succeeds does health
     turn SERVING (HTTP /health 200), the startup summary and the one "ready" line get
     printed (health must never say OK while nothing can be generated);
  4. on SIGINT/SIGTERM, drain: health NOT_SERVING at once on both with the ports still open
     (probes see it), new calls UNAVAILABLE (HTTP 503), running calls finish for up to
     `shutdown_grace` seconds; then abort the rest (their streams end with finish_reason
     "abort"), close the ports, stop the engine core and its workers, exit 0.
An engine failure later turns health NOT_SERVING (calls get UNAVAILABLE, HTTP 503) but keeps
the process up, so that an orchestrator sees the failure through health. With several engine
cores that is when the last one fails: until then a failed core's calls get UNAVAILABLE and the
others keep serving, health SERVING.

Both front ends get the engine through a `MeteredEngineClient` sharing one `ServerMetrics`, so
/metrics and the request log cover gRPC and HTTP requests alike.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import sys
import time
import uuid
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from qwenserve.config import EngineConfig
from qwenserve.sampling_params import SamplingParams

from . import qwenserve_pb2 as pb
from . import qwenserve_pb2_grpc as pb_grpc
from qwenserve.engine_core.client import EngineCoreDead, EngineCoreStartupError
from qwenserve.frontend.async_llm import AsyncLLM
from qwenserve.frontend.engine_client import EngineClient, EngineUnavailable
from qwenserve.frontend.limits import RequestLimits

from qwenserve.model.hub import served_model_name

from .grpc_security import bind_port, server_interceptors
from .http import HttpServer, build_http_app
from .metrics import MeteredEngineClient, ServerMetrics
from .options import ServerOptions
from .readiness import Readiness
from .request_parsing import add_generation_service
from .servicer import GenerationServicer
from .startup_summary import startup_summary

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # qwenserve.v1.Generation
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Time the transport gets, after our own abort at the end of the grace period, to flush the
# final "abort" messages before gRPC cancels whatever is still open.
_FLUSH_SECONDS = 3.0


async def warm_up(engine: EngineClient, timeout: float = 600.0) -> None:
    """One short greedy generation through the engine; raises if it fails."""
    async def run() -> None:
        try:
            async for _ in engine.generate(f"warmup-{uuid.uuid4().hex}", prompt="Hello, world",
                                           params=SamplingParams(max_tokens=2, temperature=0.0)):
                pass
        except EngineUnavailable:
            raise RuntimeError(f"engine failed during warm-up: {engine.dead_reason}") from None

    await asyncio.wait_for(run(), timeout)


def grpc_server_options(limits: RequestLimits) -> list:
    # so_reuseport off: a second server on a busy port must fail, not share it. A message over
    # the request limit is refused by gRPC itself (RESOURCE_EXHAUSTED) before it is parsed.
    return [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", limits.max_request_bytes)]


class _Server:
    def __init__(self, engine: EngineClient, config: EngineConfig, options: ServerOptions):
        self.engine = engine
        self.config = config
        self.options = options
        self.host, self.port = options.host, options.port
        self.shutdown_grace = options.shutdown_grace
        self.health = health.aio.HealthServicer()
        self.stop_requested: Optional[asyncio.Event] = None
        self.readiness: Optional[Readiness] = None

    async def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    def _on_engine_failure(self, loop: asyncio.AbstractEventLoop, reason: str) -> None:
        # May be called on another thread; health lives on the event loop.
        logger.error("engine failed, health is NOT_SERVING: %s", reason)
        loop.call_soon_threadsafe(lambda: loop.create_task(self._set_health(_NOT_SERVING)))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        await self._set_health(_NOT_SERVING)
        client = self.engine
        client.on_failure(lambda reason: self._on_engine_failure(loop, reason))
        metrics = ServerMetrics(client)
        log_requests = not self.options.disable_log_requests
        servicer = GenerationServicer(MeteredEngineClient(client, metrics, "grpc", log_requests), self.options.limits)
        self.readiness = Readiness(client)
        served_name = self.options.served_model_name or served_model_name(self.config.model)
        http = None
        if self.options.http_port is not None:
            http_client = MeteredEngineClient(client, metrics, "http", log_requests)
            http = HttpServer(build_http_app(http_client, self.readiness, served_name, metrics, self.options.api_key,
                                             self.options.limits),
                              self.host, self.options.http_port, self.options.ssl_certfile, self.options.ssl_keyfile)
            try:
                http.bind()
            except OSError as e:
                print(f"qwenserve: error: cannot listen on {self.host}:{self.options.http_port} (HTTP): "
                      f"{e.strerror or e}", file=sys.stderr, flush=True)
                await client.close()
                return 1
        server = grpc.aio.server(options=grpc_server_options(servicer.limits),
                                 interceptors=server_interceptors(self.options.api_key))
        add_generation_service(servicer, server)  # parses requests itself: see request_parsing.py
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server)
        address = f"{self.host}:{self.port}"
        try:
            bound = bind_port(server, address, self.options.ssl_certfile, self.options.ssl_keyfile)
        except RuntimeError as e:
            bound = 0
            logger.error("%s", e)
        if not bound:
            print(f"qwenserve: error: cannot listen on {address}", file=sys.stderr, flush=True)
            await client.close()
            return 1
        address = f"{self.host}:{bound}"
        security = ", ".join(name for name, on in (("TLS", self.options.ssl_certfile),
                                                   ("API key required", self.options.api_key)) if on)
        await server.start()
        if http is not None:
            try:
                await http.start()
            except Exception as e:  # noqa: BLE001 - e.g. an unreadable TLS certificate
                print(f"qwenserve: error: cannot start HTTP on {http.url}: {e}", file=sys.stderr, flush=True)
                await self._shutdown(server, client, None, grace=0.0)
                return 1
        both = f"{address} (gRPC)" + (f" and {http.url} (HTTP)" if http else "")
        print(f"qwenserve: listening on {both} (warming up)", flush=True)

        self.stop_requested = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)

        try:
            started = time.monotonic()
            warm = asyncio.ensure_future(warm_up(client))
            stop = asyncio.ensure_future(self.stop_requested.wait())
            await asyncio.wait({warm, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not warm.done():  # a signal during warm-up: nothing runs yet, just leave
                warm.cancel()
            else:
                stop.cancel()
                warm.result()
                servicer.ready = self.readiness.warm = True
                await self._set_health(_SERVING)
                for line in startup_summary(client.info, served_name, address, http.url if http else None,
                                            self.options.api_key is not None):
                    print(line, flush=True)
                print(f"qwenserve: ready on {both} (model: {served_name}, warm-up "
                      f"{time.monotonic() - started:.1f}s{', ' + security if security else ''})", flush=True)
                await self.stop_requested.wait()
        except Exception as e:  # warm-up failed: never report SERVING
            logger.exception("warm-up failed")
            print(f"qwenserve: error: warm-up failed: {e}", file=sys.stderr, flush=True)
            await self._shutdown(server, client, http, grace=0.0)
            return 1
        await self._shutdown(server, client, http, grace=self.shutdown_grace)
        return 0

    def _on_signal(self) -> None:
        if self.stop_requested.is_set():
            logger.warning("second signal: shutting down without waiting")
            self.shutdown_grace = 0.0
        self.stop_requested.set()

    async def _shutdown(self, server: grpc.aio.Server, client: EngineClient, http: Optional[HttpServer],
                        grace: float) -> None:
        """Drains, then stops. During the drain the ports stay open: health answers NOT_SERVING
        (a probe sees the change; a closed port would only look like a crash), new calls get
        UNAVAILABLE (HTTP 503), and running calls go on until they end or the grace is over."""
        loop = asyncio.get_running_loop()
        print(f"qwenserve: shutting down ({client.num_active} running, grace {grace:g}s)",
              file=sys.stderr, flush=True)
        self.readiness.draining = True  # HTTP /health 503 and new HTTP requests 503 from now on
        await self.health.enter_graceful_shutdown()
        client.stop_accepting()
        deadline = loop.time() + grace
        while client.num_active and loop.time() < deadline and not self._forced(grace):
            await asyncio.sleep(0.05)
        # Our abort first, so every stream still open gets its "abort" message; then gRPC
        # refuses new calls and gives those messages _FLUSH_SECONDS to go out.
        await client.abort_all()
        await server.stop(_FLUSH_SECONDS)
        if http is not None:  # its open streams got their "abort" above and end now
            await http.stop(_FLUSH_SECONDS)
        await client.close()

    def _forced(self, grace: float) -> bool:
        return self.shutdown_grace < grace  # a second signal zeroed the grace


def _port_is_free(host: str, port: int) -> bool:
    """Best-effort early check; the real bind below still decides."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.bind(addr)
    except OSError as e:
        return e.errno != errno.EADDRINUSE
    return True


def run_server(config: EngineConfig, options: Optional[ServerOptions] = None,
               engine: Optional[EngineClient] = None) -> int:
    """Serves until SIGINT/SIGTERM; returns the process exit code."""
    options = options or ServerOptions()
    host = options.host
    for port in (options.port, options.http_port):
        if port and not _port_is_free(host, port):  # fail before minutes of weight loading
            print(f"qwenserve: error: cannot listen on {host}:{port}: address in use", file=sys.stderr)
            return 1
    return asyncio.run(_serve(config, options, engine))


async def _serve(config: EngineConfig, options: ServerOptions, engine: Optional[EngineClient]) -> int:
    if engine is None:
        print(f"qwenserve: loading {config.model or 'the built-in tiny model'} ...",
              file=sys.stderr, flush=True)
        try:
            engine = AsyncLLM(config)  # resolves the model (a directory or a Hub repo id)
        except (ValueError, OSError) as e:
            print(f"qwenserve: error: {e}", file=sys.stderr, flush=True)
            return 2
        try:
            await engine.start(log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()))
        except EngineCoreStartupError as e:  # a bad model directory or setting: say so, no traceback
            print(f"qwenserve: error: {e}", file=sys.stderr, flush=True)
            await engine.close()
            return 2 if e.bad_setting else 1
        except (ValueError, ConnectionError) as e:  # --dp > 1: Ray or placement refused a setting
            print(f"qwenserve: error: {e}", file=sys.stderr, flush=True)
            await engine.close()
            return 2
        except (EngineCoreDead, asyncio.TimeoutError, RuntimeError) as e:
            print(f"qwenserve: error: the engine did not start: {e}", file=sys.stderr, flush=True)
            await engine.close()
            return 1
    return await _Server(engine, config, options).run()
