"""The OpenAI-compatible HTTP API as an ASGI app (FastAPI): `build_http_app(...)`.

Owns the routes and what is common to them: the API key (every route but /health and
/metrics), the request-body limit (413), turning every failure into OpenAI's error object, and
refusing work (503) while the server is not ready. The routes themselves live in
`completions.py` and `chat.py`; the app reaches the engine only through an `EngineClient`.

    GET  /v1/models            the served model
    POST /v1/completions       prompts -> text
    POST /v1/chat/completions  messages (and tools) -> assistant messages
    POST /tokenize             {"prompt": ...} or {"messages": [...]} -> token ids
    POST /detokenize           {"tokens": [...]} -> text
    GET  /health               200 when a request could be served now, else 503
    GET  /metrics              Prometheus text
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from qwenserve import __version__
from qwenserve.frontend.engine_client import EngineClient
from qwenserve.frontend.limits import RequestLimits
from qwenserve.model.chat_template import encode_chat
from qwenserve.server.auth import is_authorized
from qwenserve.server.readiness import Readiness

from . import request_size
from .chat import create_chat_completion
from .chat_input import normalized_messages
from .completions import create_completion
from .context import RouteContext
from .errors import APIError, from_exception
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, parse_body
from .streaming import ClientDisconnected

logger = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/metrics")  # no API key needed: probes and scrapers


class APIKeyMiddleware:
    """Every HTTP route but OPEN_PATHS needs `Authorization: Bearer KEY` (401 otherwise)."""

    def __init__(self, app: ASGIApp, api_key: Optional[str]):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.api_key is not None and scope["path"] not in OPEN_PATHS:
            header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
            if not is_authorized(header, self.api_key):
                error = APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                await error.response(headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {int(declared)} bytes is over the limit of {limit}",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def build_http_app(client: EngineClient, readiness: Readiness, served_model_name: str, metrics=None,
                   api_key: Optional[str] = None, limits: Optional[RequestLimits] = None) -> ASGIApp:
    """The app; `client` is the HTTP front end's (metered) engine client, `metrics` the
    server's `ServerMetrics` (None: /metrics is 404), `limits` the request-size limits (the
    defaults for the engine's max_model_len when None), shared with the gRPC servicer."""
    app = FastAPI(title="qwenserve", version=__version__, redoc_url=None)
    limits = (limits or RequestLimits()).resolve(client.max_model_len)
    # Larger bodies get 413 before they are parsed: parsing is what costs memory on a hostile
    # request, and the limit is what the other limits allow (frontend/limits.py).
    max_body_bytes = limits.max_request_bytes
    ctx = RouteContext(client, served_model_name, limits)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> Response:
        logger.exception("%s %s failed", request.method, request.url.path)
        return from_exception(exc).response()

    def require_serving() -> None:
        reason = readiness.unavailable_reason()
        if reason is not None:
            raise APIError(503, reason, code="unavailable")

    async def generate(route, model, request: Request) -> Response:
        require_serving()
        body = parse_body(model, await read_body(request, max_body_bytes))
        try:
            return await route(ctx, request, body)
        except ClientDisconnected:  # nobody is listening; the requests were aborted
            return Response(status_code=499)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(create_completion, CompletionRequest, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(create_chat_completion, ChatCompletionRequest, request)

    @app.get("/v1/models")
    async def models() -> Response:
        info = client.info
        return JSONResponse({"object": "list", "data": [{
            "id": served_model_name, "object": "model", "created": created, "owned_by": "qwenserve",
            "root": info.model, "max_model_len": info.max_model_len}]})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        body = parse_body(TokenizeRequest, await read_body(request, max_body_bytes))
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "prompt: give exactly one of prompt and messages", param="prompt")
        if body.prompt is not None:
            request_size.check_prompt_text(body.prompt, limits)
            ids = await client.encode(body.prompt)
        else:
            request_size.check_message_count(body.messages, limits)
            messages = [{"role": m["role"], "content": m["content"] or ""} for m in normalized_messages(body.messages)]
            request_size.check_chat_text(messages, None, limits)
            try:  # off the event loop, like encode: a long conversation must not stall streams
                ids = await asyncio.to_thread(encode_chat, client.tokenizer, messages,
                                              add_generation_prompt=body.add_generation_prompt)
            except ValueError as e:
                raise from_exception(e) from None
        return JSONResponse({"count": len(ids), "max_model_len": client.max_model_len, "tokens": ids})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        body = parse_body(DetokenizeRequest, await read_body(request, max_body_bytes))
        try:
            text = client.tokenizer.decode(body.tokens)
        except ValueError as e:
            raise from_exception(e, {"token_ids": "tokens"}) from None
        return JSONResponse({"prompt": text})

    @app.get("/health")
    async def health() -> Response:
        reason = readiness.unavailable_reason()
        if reason is not None:
            return APIError(503, reason, code="unavailable").response()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        if metrics is None:
            raise APIError(404, "metrics are not enabled", code="not_found")
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return APIKeyMiddleware(app, api_key)
