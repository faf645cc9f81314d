"""Engine logprobs -> OpenAI's two shapes (chat's `content` entries, completions' four lists).

An engine entry (`Delta.logprobs`, one per token) is the top-N (id, logprob) pairs, best first,
then the sampled token's pair when it is not among them. A token's text is its bytes decoded
with U+FFFD for a partial character; chat entries also carry the exact bytes.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence


class LogprobsFormatter:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.token_bytes = functools.lru_cache(maxsize=65536)(tokenizer.id_to_bytes)

    def text(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    @staticmethod
    def _sampled(entry: Sequence, token_id: int) -> Optional[float]:
        return next((lp for t, lp in entry if t == token_id), None)

    def chat(self, token_ids: Sequence[int], entries: Sequence, top_n: int) -> list[dict]:
        """Chat's `logprobs.content`: one entry per token, with its top `top_n` alternatives."""
        out = []
        for token_id, entry in zip(token_ids, entries):
            out.append({"token": self.text(token_id), "logprob": self._sampled(entry, token_id),
                        "bytes": list(self.token_bytes(token_id)),
                        "top_logprobs": [{"token": self.text(t), "logprob": lp, "bytes": list(self.token_bytes(t))}
                                         for t, lp in entry[:top_n]]})
        return out

    def completion(self, token_ids: Sequence[int], entries: Sequence, offset: int) -> tuple[dict, int]:
        """Completions' `logprobs` and the offset after them; `offset`: the characters of this
        completion's earlier tokens (text_offset counts from the start of the completion)."""
        tokens, token_logprobs, top, offsets = [], [], [], []
        for token_id, entry in zip(token_ids, entries):
            text = self.text(token_id)
            tokens.append(text)
            token_logprobs.append(self._sampled(entry, token_id))
            top.append({self.text(t): lp for t, lp in entry})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}, offset


def merge_completion_logprobs(parts: list[Optional[dict]]) -> Optional[dict]:
    """One completion's logprobs from its per-step parts (None when none were asked for)."""
    parts = [p for p in parts if p]
    if not parts:
        return None
    return {key: [v for p in parts for v in p[key]] for key in ("tokens", "token_logprobs", "top_logprobs",
                                                                 "text_offset")}
