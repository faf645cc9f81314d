"""Qwen (v1) tokenizer: tiktoken BPE over `qwen.tiktoken` plus Qwen's 208 special tokens.

Owns text <-> id conversion for the engine. Text is NFC-normalised and always encoded as
plain text: special tokens are only ever produced by code (the chat template), never by a
user typing `<|im_start|>`. Decoding checks ids against the real vocabulary [0, 151851);
the embedding's padding rows above that are never valid ids.
"""

from __future__ import annotations

import base64
import functools
import operator
import os
import unicodedata
from typing import Iterable

import tiktoken

# Qwen's pre-tokenisation regex (from Alibaba's tokenization_qwen.py).
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
TIKTOKEN_FILE = "qwen.tiktoken"
NUM_RANKS = 151643
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Order fixes the ids: 151643, 151644, 151645, then extras 151646..151850.
SPECIAL_TOKEN_NAMES = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(205))
VOCAB_SIZE = NUM_RANKS + len(SPECIAL_TOKEN_NAMES)  # 151851

_VENDORED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", TIKTOKEN_FILE)


def validate_ids(ids: Iterable[int], what: str = "prompt_token_ids") -> list[int]:
    """Raise ValueError naming the first id outside [0, VOCAB_SIZE); return the ids as ints.

    The engine calls this on user-supplied prompt ids. numpy/torch integers are accepted
    (via __index__); bools and floats are not token ids.
    """
    out = []
    for i in ids:
        try:
            if isinstance(i, bool):
                raise TypeError
            v = operator.index(i)
        except TypeError:
            raise ValueError(f"{what}: id {i!r} is not an integer") from None
        if not 0 <= v < VOCAB_SIZE:
            raise ValueError(f"{what}: id {v} is out of range [0, {VOCAB_SIZE})")
        out.append(v)
    return out


def _load_ranks(path: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: malformed rank line") from e
    if len(ranks) != NUM_RANKS or max(ranks.values()) != NUM_RANKS - 1:
        raise ValueError(f"{path}: expected {NUM_RANKS} ranks 0..{NUM_RANKS - 1}, got {len(ranks)}")
    return ranks


@functools.lru_cache(maxsize=8)
def _encoding_for(path: str) -> tiktoken.Encoding:
    """Build (once per file) the tiktoken Encoding: reading 2.5 MB of ranks takes ~0.5 s."""
    return tiktoken.Encoding(
        name=f"qwen:{path}",
        pat_str=PAT_STR,
        mergeable_ranks=_load_ranks(path),
        special_tokens={name: NUM_RANKS + i for i, name in enumerate(SPECIAL_TOKEN_NAMES)},
    )


class QwenTokenizer:
    """Encode/decode for Qwen v1. Cheap to construct: the Encoding is cached per rank file."""

    vocab_size = VOCAB_SIZE
    special_tokens: dict[str, int] = {name: NUM_RANKS + i for i, name in enumerate(SPECIAL_TOKEN_NAMES)}
    eos_token_id = special_tokens[ENDOFTEXT]  # 151643
    im_start_id = special_tokens[IM_START]  # 151644
    im_end_id = special_tokens[IM_END]  # 151645

    def __init__(self, tiktoken_path: str = _VENDORED_PATH):
        self.path = os.path.abspath(tiktoken_path)
        self._enc = _encoding_for(self.path)

    @classmethod
    def from_dir(cls, path: str | None = None) -> "QwenTokenizer":
        """Use `path/qwen.tiktoken` when the checkpoint ships one, else the vendored copy."""
        if path:
            candidate = os.path.join(path, TIKTOKEN_FILE)
            if os.path.isfile(candidate):
                return cls(candidate)
        return cls(_VENDORED_PATH)

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The tiktoken Encoding itself, for libraries that take one (llguidance)."""
        return self._enc

    def encode(self, text: str) -> list[int]:
        """Plain-text encoding of NFC(text): special-token strings become ordinary tokens."""
        text = unicodedata.normalize("NFC", text)
        return self._enc.encode(text, allowed_special=set(), disallowed_special=())

    def is_special(self, token_id: int) -> bool:
        return NUM_RANKS <= token_id < VOCAB_SIZE

    def id_to_bytes(self, token_id: int) -> bytes:
        """The bytes of one id; a special token's bytes are its name (e.g. b'<|im_end|>')."""
        (token_id,) = validate_ids((token_id,), what="token_ids")
        return self._enc.decode_single_token_bytes(token_id)

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        ids = validate_ids(ids, what="token_ids")
        if skip_special_tokens:
            ids = [i for i in ids if i < NUM_RANKS]
        return self._enc.decode_bytes(ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ids; invalid UTF-8 (e.g. a cut-off character) becomes U+FFFD."""
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"QwenTokenizer({self.path!r}, vocab_size={self.vocab_size})"
