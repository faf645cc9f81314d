"""The lines `qwenserve launch` prints once it can serve: what runs where, and how to call it.

    qwenserve: model Qwen/Qwen-7B-Chat on cuda:0, bfloat16, tensor parallel 1
    qwenserve: KV cache 2931 blocks x 16 tokens = 46896 tokens; max_model_len 8192
    qwenserve: gRPC  127.0.0.1:50051     try: qwenserve generate --address 127.0.0.1:50051 "Hello"
    qwenserve: HTTP  http://127.0.0.1:8000/v1 (OpenAI API)  try: curl http://127.0.0.1:8000/v1/chat/completions ...

(None of them says "ready": scripts wait for the one line that does.)
"""
from __future__ import annotations

import json
import shlex
from typing import Optional

from qwenserve.frontend.engine_client import ModelInfo


def startup_summary(info: ModelInfo, served_name: str, grpc_address: str, http_url: Optional[str],
                    api_key_set: bool) -> list[str]:
    lines = [
        f"model {served_name} ({info.model}) on {info.device}, {info.dtype}, tensor parallel "
        f"{info.tensor_parallel_size}",
        f"KV cache {info.num_kv_blocks} blocks x {info.block_size} tokens = {info.num_kv_blocks * info.block_size} "
        f"tokens; max_model_len {info.max_model_len}",
        f"gRPC  {grpc_address}  try: qwenserve generate --address {grpc_address} \"Hello\"",
    ]
    if http_url:
        body = json.dumps({"model": served_name, "messages": [{"role": "user", "content": "Hello"}]})
        auth = ' -H "Authorization: Bearer $QWENSERVE_API_KEY"' if api_key_set else ""
        lines.append(f"HTTP  {http_url}/v1 (OpenAI API)  try: curl {http_url}/v1/chat/completions "
                     f"-H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}")
    if api_key_set:
        lines.append("API key required: Authorization: Bearer <key> (HTTP header, gRPC metadata)")
    return [f"qwenserve: {line}" for line in lines]
