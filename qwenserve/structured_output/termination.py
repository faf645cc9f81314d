"""How a structured request ends: which token ids finish it, and whether stop strings apply.

This module owns the rule, so that the scheduler and the output processor apply the same one:

- Inside a structure the structure wins. The mask offers an end token (<|endoftext|>,
  <|im_end|>) only where the grammar may end, and nothing but an end token once it is
  complete; so for a structured request the end tokens are its stop ids, whatever
  `ignore_eos`, `stop_token_ids` or the chat template's stop ids say, and its stop strings
  are not checked (a stop string can only match inside the structure, where cutting the
  output would break it). An output that does not end on an end token was cut by max_tokens
  (finish_reason "length"), or by the model length.
- min_tokens is the mask's job for a structured request: it bans the end tokens until
  min_tokens unless the structure is complete and only its end may follow. So an end token
  that reaches the scheduler early ends the request all the same (otherwise the complete
  structure could only be followed by more end tokens until min_tokens).
- A request without a structure keeps its own stop ids and stop strings, and its stop ids
  count only once min_tokens tokens are out.
"""
from __future__ import annotations

from typing import Iterable

from qwenserve.sampling_params import SamplingParams
from qwenserve.structured_output.vocabulary import END_TOKEN_IDS


def stop_token_ids(params: SamplingParams, unstructured_stop_ids: Iterable[int]) -> frozenset[int]:
    """The ids that finish the request: END_TOKEN_IDS for a structured request, else
    `unstructured_stop_ids` (what the engine resolved from EOS, chat, ignore_eos and
    stop_token_ids)."""
    if params.structured_output is not None:
        return END_TOKEN_IDS
    return frozenset(unstructured_stop_ids)


def stops_before_min_tokens(params: SamplingParams) -> bool:
    """Whether a stop id ends the request even before `params.min_tokens` (structured)."""
    return params.structured_output is not None


def checks_stop_strings(params: SamplingParams) -> bool:
    """Whether the output processor looks for `params.stop` in the text."""
    return params.structured_output is None
