"""The OpenAI-compatible HTTP front end: `build_http_app` (the ASGI app) and `HttpServer`
(uvicorn inside the server's own event loop)."""
from .app import build_http_app
from .server import HttpServer

__all__ = ["build_http_app", "HttpServer"]
