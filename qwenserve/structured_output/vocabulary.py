"""Qwen-1's vocabulary as llguidance sees it, and which ids a structure may contain.

This module owns the one `llguidance.LLTokenizer` of the process (built from the vendored
`qwen.tiktoken`: ~1 s and ~100 MB, so once), the end tokens, and the bit row of the ids
allowed anywhere in a structure. Every Qwen-1 checkpoint ships the same `qwen.tiktoken`, so
the vendored copy is the vocabulary of them all.

Masks are bit rows: bit `k` of int32 word `w` is token `32 * w + k` (llguidance's layout).

    ids  [0, 151643)        ordinary BPE tokens     what a structure is made of
         151643 <|endoftext|>  ┐ end tokens: allowed only where the grammar may end
         151645 <|im_end|>     ┘ (llguidance's "EOS" set)
         151644, 151646..151850  other special tokens: never allowed
         >= 151851              embedding padding: not in the mask at all (always masked)
"""
from __future__ import annotations

import threading

import numpy as np

from qwenserve.model.tokenizer import NUM_RANKS, VOCAB_SIZE, QwenTokenizer

EOS_TOKEN_ID = QwenTokenizer.eos_token_id  # <|endoftext|>
IM_END_TOKEN_ID = QwenTokenizer.im_end_id
# The ids that end a structure. The mask allows them exactly where the grammar may end, so a
# structured request ends on either, whatever its stop ids and ignore_eos say.
END_TOKEN_IDS = frozenset({EOS_TOKEN_ID, IM_END_TOKEN_ID})
# int32 words per mask row: the real vocabulary only; logits columns beyond it are masked.
MASK_WORDS = (VOCAB_SIZE + 31) // 32


_lltokenizer = None
_lltokenizer_lock = threading.Lock()


def qwen_lltokenizer():
    """The process's llguidance tokenizer over Qwen-1's vocabulary (built on first use; the
    lock keeps two first users from building two)."""
    global _lltokenizer
    with _lltokenizer_lock:
        if _lltokenizer is None:
            import llguidance.tiktoken

            _lltokenizer = llguidance.tiktoken.lltokenizer_from_encoding(
                QwenTokenizer().encoding, n_vocab=VOCAB_SIZE, eos_token=sorted(END_TOKEN_IDS))
        return _lltokenizer


def warm_up_in_background() -> None:
    """Builds the llguidance tokenizer on a daemon thread, so that the first structured request
    does not pay for it inside a step (engine-core processes and rank-0 workers call this at
    start, beside the model loading)."""
    threading.Thread(target=qwen_lltokenizer, name="warm-up-llguidance", daemon=True).start()


def _structure_vocabulary_row() -> np.ndarray:
    allowed = np.zeros(MASK_WORDS * 32, dtype=bool)
    allowed[:NUM_RANKS] = True
    allowed[sorted(END_TOKEN_IDS)] = True
    return np.packbits(allowed, bitorder="little").view(np.int32)


# Every mask row is ANDed with this: llguidance never offers a special token to a JSON
# schema, regex or choice, and the Lark check rejects grammars that name one; this makes
# it hold whatever a grammar says.
STRUCTURE_VOCABULARY_ROW = _structure_vocabulary_row()
STRUCTURE_VOCABULARY_ROW.flags.writeable = False


def end_tokens_row() -> np.ndarray:
    """A mask row allowing only the end tokens (what a failed or finished matcher offers)."""
    row = np.zeros(MASK_WORDS, dtype=np.int32)
    set_bits(row, END_TOKEN_IDS)
    return row


def set_bits(row: np.ndarray, ids) -> None:
    """Sets the bits of `ids` in the int32 mask row `row` (in place)."""
    words = row.view(np.uint32)
    for t in ids:
        words[t >> 5] |= np.uint32(1 << (t & 31))


def clear_bits(row: np.ndarray, ids) -> None:
    """Clears the bits of `ids` (those inside the row) in the int32 mask row `row`."""
    words = row.view(np.uint32)
    for t in ids:
        if 0 <= t < words.shape[0] * 32:
            words[t >> 5] &= np.uint32(~(1 << (t & 31)) & 0xFFFFFFFF)


def allowed_ids(row: np.ndarray) -> np.ndarray:
    """The token ids a mask row allows, ascending (for tests and debugging)."""
    return np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))
