"""GrammarMatcher: one request's position in its grammar, derived from its output tokens.

This module owns the per-request llguidance matcher and the rule that keeps it honest: the
request's output tokens (`SamplingState.output_token_ids`) are the truth, and the matcher is
only ever moved to them, never by the draw. Before a mask is computed, `catch_up` consumes
the output tokens the matcher has not seen yet (one per step in steady decoding; all of
them for a request resumed after preemption with a fresh state; none when the draw's token
has not reached the host yet). If the output was cut back, the matcher is rolled back.

States:

    running ──consume end token──► finished   (mask: end tokens only)
       │
       └──token the grammar rejects──► failed (error set; mask: end tokens only, so the
                                                request ends at once instead of looping)

A token the mask allowed is never rejected, so `failed` means the tokens did not come from
this grammar's masks (a bug upstream) or llguidance hit a per-step limit; `error` says which.
"""
from __future__ import annotations

import logging
from typing import Sequence

from qwenserve.structured_output.compiler import CompiledGrammar
from qwenserve.structured_output.vocabulary import END_TOKEN_IDS

logger = logging.getLogger(__name__)


class GrammarMatcher:
    def __init__(self, compiled: CompiledGrammar):
        self.compiled = compiled
        self.matcher = compiled.new_matcher()  # llguidance.LLMatcher
        self.num_consumed = 0
        self.finished = False  # an end token was consumed
        self.error: str | None = None

    @classmethod
    def failed(cls, reason: str) -> GrammarMatcher:
        """A matcher for a grammar that could not be compiled where the step runs (it was when
        the request was validated, so this is a timeout under load or a bug): masked to the end
        tokens from the start, so the request ends instead of failing the step."""
        self = cls.__new__(cls)
        self.compiled, self.matcher = None, None
        self.num_consumed, self.finished, self.error = 0, False, None
        self.fail(reason)
        return self

    def new_tokens(self, output_token_ids: Sequence[int]) -> Sequence[int]:
        """The output tokens not yet consumed, after rolling back past a cut."""
        if len(output_token_ids) < self.num_consumed:
            self._rollback(self.num_consumed - len(output_token_ids))
        return output_token_ids[self.num_consumed:]

    def catch_up(self, output_token_ids: Sequence[int]) -> None:
        """Consume the output tokens not consumed yet (see the module docstring)."""
        new = self.new_tokens(output_token_ids)
        if not new or self.error is not None:
            self.num_consumed += len(new)
            return
        for token in new:
            self.advanced(token, self.matcher.consume_token(token))
            if self.error is not None:
                self.num_consumed = len(output_token_ids)
                break

    def advanced(self, token: int, accepted: bool) -> None:
        """Book-keeping after the llguidance matcher was given `token` (here or by a batch
        consume): `accepted` is what llguidance answered."""
        self.num_consumed += 1
        if not accepted:
            self.fail(f"output token {token} (position {self.num_consumed - 1}) is not allowed "
                      f"by the grammar: {self.matcher.get_error() or 'rejected'}")
        elif token in END_TOKEN_IDS:
            self.finished = True

    def fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
            logger.warning("structured output: %s", reason)

    def _rollback(self, num_tokens: int) -> None:
        if self.compiled is None:  # failed from the start: nothing to roll back
            self.num_consumed -= num_tokens
            return
        # llguidance does not count an end token consumed after the grammar stopped, so a
        # finished matcher's history is one short; a failed one cannot roll back at all.
        if self.error is None and not self.finished and self.matcher.rollback(num_tokens):
            self.num_consumed -= num_tokens
            return
        # Start over: catch_up then replays the remaining output from the beginning.
        self.matcher = self.compiled.new_matcher()
        self.num_consumed = 0
        self.finished = False
        self.error = None

    @property
    def is_accepting(self) -> bool:
        """The output so far is a complete structure (an end token may come next)."""
        return self.error is None and (self.finished or self.matcher.is_accepting())
