"""Generation for the structured-output tests: the real Sampler over a model's no-cache forward.

Until the engine core exists, this is the loop the tests drive: each step runs the whole
growing sequences through `model` (dense attention, qwenserve/model/reference.py's inputs),
samples the last positions with `Sampler.sample`, and appends the tokens to the states'
`output_token_ids`, which is all the matchers ever follow. A row stops on an end token or
at max_tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from qwenserve.model.reference import dense_inputs
from qwenserve.sampling_params import SamplingParams
from qwenserve.structured_output.vocabulary import END_TOKEN_IDS
from qwenserve.worker.sampler import Sampler, SamplingState, make_generator


@dataclass
class Generation:
    state: SamplingState
    max_tokens: int

    @property
    def token_ids(self) -> list[int]:
        return self.state.output_token_ids

    @property
    def finished_by_end_token(self) -> bool:
        return bool(self.token_ids) and self.token_ids[-1] in END_TOKEN_IDS

    @property
    def done(self) -> bool:
        return self.finished_by_end_token or len(self.token_ids) >= self.max_tokens

    def text(self, tokenizer) -> str:
        """The output's text without its end token."""
        return tokenizer.decode(self.token_ids, skip_special_tokens=True)


def new_state(params: SamplingParams, prompt: Sequence[int], output: Sequence[int] = ()) -> SamplingState:
    """A state as the model runner builds one (also after preemption: same output, fresh state)."""
    generator = None if params.seed is None or params.is_greedy else make_generator(params.seed)
    return SamplingState(params, list(prompt), list(output), generator,
                         banned_token_ids=sorted(END_TOKEN_IDS))


@torch.inference_mode()
def last_logits(model, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """[len(sequences), V] logits of each sequence's last position (LM head on those rows only)."""
    ids, positions, meta = dense_inputs(model.config, sequences)
    hidden = model(ids, positions, meta)
    last = torch.tensor(meta.query_start_loc_list[1:]) - 1
    return model.compute_logits(hidden[last])


def generate(model, prompt: Sequence[int], params: Sequence[SamplingParams],
             on_step: Optional[Callable[[list[Generation]], None]] = None,
             sampler: Optional[Sampler] = None) -> list[Generation]:
    """Every params' completion of `prompt`, batched; `on_step(active)` runs before each
    step's sampling (the tests compare masks there)."""
    sampler = sampler or Sampler(seed=0)
    gens = [Generation(new_state(p, prompt), p.max_tokens) for p in params]
    return continue_generation(model, gens, on_step, sampler)


def continue_generation(model, gens: list[Generation],
                        on_step: Optional[Callable[[list[Generation]], None]] = None,
                        sampler: Optional[Sampler] = None) -> list[Generation]:
    sampler = sampler or Sampler(seed=0)
    active = [g for g in gens if not g.done]
    while active:
        if on_step is not None:
            on_step(active)
        logits = last_logits(model, [g.state.prompt_token_ids + g.token_ids for g in active])
        out = sampler.sample(logits, [g.state for g in active])
        for g, token in zip(active, out.token_ids):
            g.token_ids.append(token)
        active = [g for g in active if not g.done]
    return gens
