"""API-key authentication shared by the gRPC and HTTP front ends.

`--api-key KEY` (or `$QWENSERVE_API_KEY`) makes every call but health (and HTTP /metrics)
carry `Authorization: Bearer KEY` (gRPC: metadata `authorization`). The comparison is in
constant time, so the response time says nothing about how much of a guess was right.
"""
from __future__ import annotations

import hmac
import os
from typing import Optional

API_KEY_ENV = "QWENSERVE_API_KEY"
_SCHEME = "bearer "


def resolve_api_key(flag_value: Optional[str]) -> Optional[str]:
    """The key to enforce: the flag's value, else $QWENSERVE_API_KEY; None (or empty): no auth."""
    key = flag_value if flag_value is not None else os.environ.get(API_KEY_ENV)
    return key or None


def is_authorized(authorization: Optional[str], api_key: Optional[str]) -> bool:
    """Whether an `Authorization` header value grants access (always, when no key is set)."""
    if api_key is None:
        return True
    if not authorization or authorization[:len(_SCHEME)].lower() != _SCHEME:
        return False
    given = authorization[len(_SCHEME):].strip().encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given, api_key.encode("utf-8", "surrogateescape"))
