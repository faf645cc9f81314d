"""`ModelRunner`: turns a `SchedulerOutput` into flat input tensors and `AttentionMetadata`,
runs the model, and samples (rank 0).

It keeps a small state per request (token ids, block ids, computed count, sampling state)
that the scheduler's per-step diffs update; nothing of the scheduler's objects crosses over.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from qwenserve.model.attention import AttentionMetadata, logn_scales
from qwenserve.model.qwen import NUM_REAL_TOKENS, QWenLMHeadModel
from qwenserve.sampling_params import SamplingParams
from qwenserve.scheduler.output import SchedulerOutput
from qwenserve.worker.sampler import Sampler, SamplingState, make_generator


@dataclass
class ModelRunnerOutput:
    """Per request that reached the end of its known tokens this step: the sampled token."""

    request_ids: list[str] = field(default_factory=list)
    sampled_token_ids: list[int] = field(default_factory=list)
    logprobs: list[Optional[list[tuple[int, float]]]] = field(default_factory=list)
    sampled_logprobs: list[float] = field(default_factory=list)


@dataclass
class RequestState:
    token_ids: list[int]
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    rope_theta: float
    sampling: SamplingState


class ModelRunner:
    def __init__(self, model: QWenLMHeadModel, block_size: int, device: torch.device, seed: int = 0,
                 is_driver: bool = True):
        self.model, self.block_size, self.device = model, block_size, device
        self.config = model.config
        self.is_driver = is_driver  # rank 0: computes logits and samples
        self.sampler = Sampler(vocab_size_real=min(NUM_REAL_TOKENS, self.config.vocab_size), seed=seed)
        self.requests: dict[str, RequestState] = {}
        self.decode_graphs = None  # a `DecodeGraphs` once the worker has captured them
        # Seeded generators outlive preemption so a resumed request continues its stream.
        self._generators: dict[str, torch.Generator] = {}

    # ------------------------------------------------------------------ state updates
    def _update_states(self, out: SchedulerOutput) -> None:
        for rid in out.finished_request_ids:
            self.requests.pop(rid, None)
            self._generators.pop(rid, None)
        for rid in out.preempted_request_ids:
            self.requests.pop(rid, None)
        for new in out.new_requests:
            tokens = list(new.prompt_token_ids) + list(new.output_token_ids)
            self.requests[new.request_id] = RequestState(
                token_ids=tokens, num_prompt_tokens=len(new.prompt_token_ids), block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens, rope_theta=self.config.rope_theta(new.ntk_alpha),
                sampling=SamplingState(params=new.params, prompt_token_ids=list(new.prompt_token_ids),
                                       output_token_ids=list(new.output_token_ids),
                                       generator=self._generator(new.request_id, new.params),
                                       banned_token_ids=list(new.banned_token_ids)))
        for cached in out.cached_requests:
            state = self.requests[cached.request_id]
            state.token_ids.extend(cached.new_token_ids)
            state.sampling.output_token_ids.extend(cached.new_token_ids)
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _generator(self, request_id: str, params: SamplingParams) -> Optional[torch.Generator]:
        if params.seed is None or params.is_greedy:
            return None
        if request_id not in self._generators:
            self._generators[request_id] = make_generator(params.seed, self.device)
        return self._generators[request_id]

    # ------------------------------------------------------------------ inputs
    def prepare_inputs(self, out: SchedulerOutput):
        """Flat ids, positions, attention metadata, the rows to sample as (row, request id) pairs
        and as a device index tensor.

        Runs on the host every step, so a decode token (the common case) costs a few scalar
        operations; only prompt chunks go through numpy.
        """
        bs = self.block_size
        ids, positions, slots, thetas = [], [], [], []
        starts, seq_lens, tables, sample_rows = [0], [], [], []
        for rid, num_new in out.num_scheduled_tokens.items():
            state = self.requests[rid]
            begin = state.num_computed_tokens
            end = begin + num_new
            blocks = state.block_ids
            if num_new == 1:
                ids.append(state.token_ids[begin])
                positions.append(begin)
                slots.append(blocks[begin // bs] * bs + begin % bs)
            else:
                pos = np.arange(begin, end, dtype=np.int64)
                ids.extend(state.token_ids[begin:end])
                positions.extend(pos.tolist())
                slots.extend((np.asarray(blocks, dtype=np.int64)[pos // bs] * bs + pos % bs).tolist())
            thetas.extend([state.rope_theta] * num_new)
            starts.append(starts[-1] + num_new)
            seq_lens.append(end)
            tables.append(blocks)
            if end == len(state.token_ids):  # a partial prefill chunk has nothing to sample
                sample_rows.append((starts[-1] - 1, rid))
            state.num_computed_tokens = end

        lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
        table = np.zeros((len(tables), int(lens.max())), dtype=np.int32)
        # Row-major fill of each row's first len entries in one vectorized assignment.
        table[np.arange(table.shape[1]) < lens[:, None]] = np.fromiter(
            itertools.chain.from_iterable(tables), dtype=np.int32, count=int(lens.sum()))
        # Three host-to-device copies per step (int64, int32, float32), each array a view of one
        # of them: on a GPU every separate copy from pageable memory costs ~10 us of host time.
        dev = self.device
        num_tokens, num_seqs, num_samples = len(ids), len(seq_lens), len(sample_rows)
        int64 = np.empty(3 * num_tokens + num_samples, dtype=np.int64)
        int64[:num_tokens] = ids
        int64[num_tokens:2 * num_tokens] = positions
        int64[2 * num_tokens:3 * num_tokens] = slots
        int64[3 * num_tokens:] = [row for row, _ in sample_rows]
        int32 = np.empty(2 * num_seqs + 1 + table.size, dtype=np.int32)
        int32[:num_seqs + 1] = starts
        int32[num_seqs + 1:2 * num_seqs + 1] = seq_lens
        int32[2 * num_seqs + 1:] = table.ravel()
        host_positions = torch.from_numpy(int64[num_tokens:2 * num_tokens])
        use_logn = self.config.use_logn_attn
        float32 = torch.empty((2 if use_logn else 1, num_tokens), dtype=torch.float32)
        float32[0] = torch.tensor(thetas, dtype=torch.float32)
        if use_logn:
            float32[1] = logn_scales(host_positions, self.config.seq_length)
        int64_t = torch.from_numpy(int64).to(dev)
        int32_t = torch.from_numpy(int32).to(dev)
        float32_t = float32.to(dev)
        meta = AttentionMetadata(
            query_start_loc=int32_t[:num_seqs + 1], seq_lens=int32_t[num_seqs + 1:2 * num_seqs + 1],
            max_query_len=max(b - a for a, b in zip(starts, starts[1:])), max_seq_len=max(seq_lens),
            rope_theta=float32_t[0], logn_scale=float32_t[1] if use_logn else None,
            block_tables=int32_t[2 * num_seqs + 1:].view(table.shape),
            slot_mapping=int64_t[2 * num_tokens:3 * num_tokens],
            query_start_loc_list=starts, seq_lens_list=seq_lens)
        sample_index = int64_t[3 * num_tokens:]
        return int64_t[:num_tokens], int64_t[num_tokens:2 * num_tokens], meta, sample_rows, sample_index

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> Optional[ModelRunnerOutput]:
        self._update_states(out)
        if out.is_empty:
            return ModelRunnerOutput() if self.is_driver else None
        input_ids, positions, meta, sample_rows, sample_index = self.prepare_inputs(out)
        if self.decode_graphs is not None and self.decode_graphs.can_run(meta.num_requests, meta):
            hidden = self.decode_graphs.run(input_ids, positions, meta)
        else:
            hidden = self.model(input_ids, positions, meta)
        if not sample_rows:
            # Other ranks still join the LM head's gather.
            return ModelRunnerOutput() if self.is_driver else None
        logits = self.model.compute_logits(hidden.index_select(0, sample_index))
        if not self.is_driver:
            return None
        states = [self.requests[rid].sampling for _, rid in sample_rows]
        sampled = self.sampler.sample(logits, states)
        return ModelRunnerOutput(request_ids=[rid for _, rid in sample_rows],
                                 sampled_token_ids=sampled.token_ids, logprobs=sampled.logprobs,
                                 sampled_logprobs=sampled.sampled_logprobs)
