"""A scripted `EngineClient` for front-end tests that need no model: each request's completions
are the text pieces a script returns, one piece per engine step, tokenized with the real Qwen
tokenizer; chat input goes through the real ChatML template (its checks included); every call's
inputs are recorded and every early exit is seen as an abort."""
from __future__ import annotations

import asyncio
from typing import Callable, Optional

from qwenserve.frontend.engine_client import (Delta, EngineClient, EngineUnavailable, ModelInfo, StepStats)
from qwenserve.model.chat_template import encode_chat
from qwenserve.model.tokenizer import QwenTokenizer


class ScriptedEngineClient(EngineClient):
    """`script(call) -> list of text pieces` (one per step) or an exception to raise before the
    first delta; `call` is a dict of the generate arguments. `finish_reason(call)` ends each
    completion ("stop" unless max_tokens ran out first). With `hold`, every stream waits after
    its first step until the event is set (a request that is still running)."""

    def __init__(self, script: Callable[[dict], list] = lambda call: ["Hello", ",", " world"],
                 finish_reason: Callable[[dict], str] = lambda call: "stop", generation_config=None):
        self.script, self.finish_reason = script, finish_reason
        self.tokenizer = QwenTokenizer.from_dir(None)
        self.generation_config = generation_config or {}
        self.max_model_len = 256
        self.info = ModelInfo("scripted", 256, 151936, 1, "float32", "cpu", 16, 100)
        self.calls: list[dict] = []
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.hold: Optional[asyncio.Event] = None
        self.dead: Optional[str] = None
        self.accepting = True
        self._active = 0

    async def generate(self, request_id, *, params, prompt=None, prompt_token_ids=None, messages=None,
                       system=None, continue_final_message=False):
        call = dict(request_id=request_id, params=params, prompt=prompt, prompt_token_ids=prompt_token_ids,
                    messages=messages, system=system, continue_final_message=continue_final_message)
        self.calls.append(call)
        if self.dead:
            raise EngineUnavailable(f"engine failed: {self.dead}")
        if not self.accepting:
            raise EngineUnavailable("server is shutting down")
        if messages is not None:  # the engine's own chat validation and prompt
            prompt_tokens = len(encode_chat(self.tokenizer, messages, system=system,
                                            continue_final_message=continue_final_message))
        else:
            prompt_tokens = len(prompt_token_ids or ()) or len(self.tokenizer.encode(prompt or "x"))
        pieces = self.script(call)
        if isinstance(pieces, Exception):
            raise pieces
        reason = self.finish_reason(call)
        if params.max_tokens is not None and len(pieces) > params.max_tokens:
            pieces, reason = pieces[:params.max_tokens], "length"
        self._active += 1
        done = False
        try:
            counts = [0] * params.n
            for step, piece in enumerate(pieces):
                await asyncio.sleep(0)
                self._notify_step(StepStats(num_tokens=params.n))
                deltas = []
                for i in range(params.n):
                    ids = tuple(self.tokenizer.encode(piece))[:1] or (0,)
                    counts[i] += 1
                    last = step == len(pieces) - 1
                    logprobs = None
                    if params.logprobs is not None:
                        top = [(ids[0], -0.25), (ids[0] + 1, -1.5), (ids[0] + 2, -2.5)][:params.logprobs]
                        logprobs = [top if any(t == ids[0] for t, _ in top) else top + [(ids[0], -0.25)]]
                    deltas.append(Delta(i, piece, ids, reason if last else None, prompt_tokens, counts[i],
                                        logprobs, 0.01))
                yield deltas
                if step == 0 and self.hold is not None:
                    await self.hold.wait()
            done = True
            self.finished.append(request_id)
        finally:
            self._active -= 1
            if not done:
                self.aborted.append(request_id)

    async def abort(self, request_id):
        self.aborted.append(request_id)

    async def encode(self, text):
        return self.tokenizer.encode(text)

    def stats(self):
        return {"num_running": self._active, "num_waiting": 1, "num_pending": 2, "num_used_blocks": 25,
                "num_total_blocks": 100, "prefix_cache_query_tokens": 40, "prefix_cache_hit_tokens": 16,
                "num_preemptions": 3}

    @property
    def dead_reason(self):
        return self.dead

    @property
    def num_active(self):
        return self._active

    def on_failure(self, callback):
        pass

    def stop_accepting(self):
        self.accepting = False

    async def abort_all(self):
        pass

    async def close(self):
        pass
