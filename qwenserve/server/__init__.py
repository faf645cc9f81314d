"""The server process: the gRPC service and its Python client, the HTTP API (`http/`), metrics,
security, startup and drain (`app.py`), all over an `EngineClient` (`qwenserve/frontend/`)."""
