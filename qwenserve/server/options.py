"""`ServerOptions`: the settings of the serving process that are not engine settings
(addresses, authentication, TLS, names, shutdown), as `qwenserve launch` resolved them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from qwenserve.frontend.limits import RequestLimits


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051                     # gRPC; 0: any free port
    http_port: Optional[int] = 8000       # OpenAI-compatible HTTP; 0: any free port, None: no HTTP
    served_model_name: Optional[str] = None  # None: the checkpoint directory's name ("qwen-tiny" built in)
    api_key: Optional[str] = None         # every call but health/metrics needs "Bearer <key>"
    ssl_certfile: Optional[str] = None    # with ssl_keyfile: TLS on both ports
    ssl_keyfile: Optional[str] = None
    shutdown_grace: float = 10.0          # seconds running calls get on SIGINT/SIGTERM
    disable_log_requests: bool = False    # no INFO line per finished request
    limits: RequestLimits = field(default_factory=RequestLimits)  # request sizes (frontend/limits.py)
