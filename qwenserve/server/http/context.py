"""What every HTTP route needs from the server: the engine client, the names it answers to and
the request-size limits."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from qwenserve.frontend.engine_client import EngineClient
from qwenserve.frontend.limits import RequestLimits

from .logprobs import LogprobsFormatter


@dataclass
class RouteContext:
    client: EngineClient          # the metered client of the HTTP front end
    served_model_name: str
    limits: RequestLimits         # resolved for the engine's max_model_len (request_size.py)
    formatter: LogprobsFormatter = field(init=False)

    def __post_init__(self) -> None:
        self.formatter = LogprobsFormatter(self.client.tokenizer)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
