"""Streaming detokenization: turn a growing stream of token ids into text deltas.

Owns the rule that a streamed character is never split: Qwen's byte-level BPE tokens can end
in the middle of a UTF-8 character (emoji, CJK), so the bytes of an incomplete tail are held
back until the next token completes them. Bytes that can never become valid are emitted as
U+FFFD at once. The concatenation of every `push` plus `flush` equals
`tokenizer.decode(all_ids, skip_special_tokens)`.
"""

from __future__ import annotations

import codecs
from typing import Iterable

from qwenserve.model.tokenizer import QwenTokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: QwenTokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Python's stateful UTF-8 decoder is exactly the "longest valid prefix" machine we need:
        # it keeps only a tail that could still become a valid character, replaces invalid
        # sequences with U+FFFD the same way bytes.decode(errors="replace") does, and costs
        # O(new bytes) per call.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chunks: list[str] = []

    def push(self, ids: Iterable[int]) -> str:
        """Feed new token ids; return the newly completed text (may be "")."""
        # Specials go through the byte stream as their names (or not at all when skipped), so
        # a special token after half a character yields U+FFFD exactly as decode() would.
        data = self.tokenizer.decode_bytes(ids, skip_special_tokens=self.skip_special_tokens)
        return self._emit(self._decoder.decode(data))

    def flush(self) -> str:
        """End of stream: emit held-back bytes (an incomplete character becomes U+FFFD)."""
        return self._emit(self._decoder.decode(b"", final=True))

    @property
    def has_pending(self) -> bool:
        """True while bytes of an incomplete character are held back."""
        return bool(self._decoder.getstate()[0])

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._chunks) > 1:
            # Compact so repeated reads stay cheap (str += on an attribute would be quadratic).
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def _emit(self, s: str) -> str:
        if s:
            self._chunks.append(s)
        return s
