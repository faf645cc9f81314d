"""The API key and TLS on the gRPC server (the key check itself is `auth.py`, shared with HTTP).

Owns `ApiKeyInterceptor` (every method but health needs metadata `authorization: Bearer KEY`,
else UNAUTHENTICATED; the request of a refused call is never parsed), the port binding with or
without TLS (`bind_port`), and the check of the certificate and key files at launch
(`check_tls_files`), so that a wrong path fails before minutes of weight loading.
"""
from __future__ import annotations

from typing import Optional

import grpc

from .auth import is_authorized
from .servicer import end_call

# Health stays open: probes (kubelet, load balancers) carry no key. Everything else, server
# reflection included, needs it.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
UNAUTHENTICATED_DETAILS = "missing or wrong API key: send metadata 'authorization: Bearer <key>'"


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_key: str):
        self.api_key = api_key

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        if is_authorized(metadata.get("authorization"), self.api_key):
            return handler
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call UNAUTHENTICATED; no request
    deserializer, so a refused call's bytes are never parsed."""
    code, details = grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_DETAILS

    async def refuse_unary(request, context):
        del request  # not held by the cycle a unary abort makes (see servicer.end_call)
        await context.abort(code, details)

    async def refuse_stream(request, context):
        del request
        end_call(context, code, details)
        return
        yield  # an async generator, as a streaming handler must be

    serializer = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse_unary, response_serializer=serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, response_serializer=serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse_unary, response_serializer=serializer)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, response_serializer=serializer)


def server_interceptors(api_key: Optional[str]) -> list:
    return [ApiKeyInterceptor(api_key)] if api_key else []


def check_tls_files(certfile: Optional[str], keyfile: Optional[str]) -> None:
    """ValueError naming the flag when only one is given, or a file is unreadable or not PEM."""
    if (certfile is None) != (keyfile is None):
        raise ValueError("--ssl-certfile and --ssl-keyfile: give both (TLS) or neither")
    for flag, path, kind in (("--ssl-certfile", certfile, "CERTIFICATE"), ("--ssl-keyfile", keyfile, "PRIVATE KEY")):
        if path is None:
            continue
        try:
            with open(path, "rb") as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"{flag}: cannot read {path!r}: {e.strerror or e}") from None
        if b"-----BEGIN " not in text or kind.encode() not in text:
            raise ValueError(f"{flag}: {path!r} holds no PEM {kind.lower()}")


def bind_port(server: grpc.aio.Server, address: str, certfile: Optional[str], keyfile: Optional[str]) -> int:
    """Binds `address` (TLS when both files are given); the port bound, 0 when binding failed."""
    if certfile is None:
        return server.add_insecure_port(address)
    with open(keyfile, "rb") as key, open(certfile, "rb") as cert:
        credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
    return server.add_secure_port(address, credentials)
