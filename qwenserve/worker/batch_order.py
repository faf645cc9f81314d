"""The order of a step's requests in the flat batch: one-token rows (decodes) first.

The Triton attention sends requests [0, num_decodes) to the split-KV decode kernel and the rest to
the prefill kernel (kernels/paged_attention.py), which needs the decode rows to be a prefix of the
batch; vLLM reorders its batch the same way. Each group keeps the scheduler's order. Nothing else
depends on the order: the runner reports each sampled token with its request id.
"""
from __future__ import annotations


def decodes_first(num_scheduled_tokens: dict[str, int]) -> tuple[list[tuple[str, int]], int]:
    """(request id, tokens this step) with the one-token requests first, and how many those are.
    A one-token prompt chunk counts too: its query is the last position, as a decode's is."""
    decodes = [(rid, n) for rid, n in num_scheduled_tokens.items() if n == 1]
    if len(decodes) == len(num_scheduled_tokens):
        return list(num_scheduled_tokens.items()), len(decodes)
    return decodes + [(rid, n) for rid, n in num_scheduled_tokens.items() if n != 1], len(decodes)
