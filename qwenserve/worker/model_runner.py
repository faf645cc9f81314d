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

from qwenserve.model.attention import AttentionMetadata
from qwenserve.model.qwen import NUM_REAL_TOKENS, QWenLMHeadModel
from qwenserve.sampling_params import SamplingParams
from qwenserve.scheduler.output import SchedulerOutput
from qwenserve.worker.batch_order import decodes_first
from qwenserve.worker.logn_table import LognTable
from qwenserve.worker.sampler import Sampler, SamplingState, make_generator


# Triton compiles a kernel per 16-byte alignment of its pointer arguments: every view into a
# packed step buffer starts on such a boundary, so it is the same from step to step.
_ALIGN_BYTES = 16


def _pack(parts, dtype) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """One host buffer holding the 1-D `parts` end to end, each starting on a 16-byte boundary;
    returns it and each part's (start, length)."""
    step = _ALIGN_BYTES // np.dtype(dtype).itemsize
    spans, offset = [], 0
    for part in parts:
        spans.append((offset, len(part)))
        offset += -(-len(part) // step) * step
    buf = np.zeros(max(offset, 1), dtype=dtype)  # the padding is never read, but stays defined
    for (start, length), part in zip(spans, parts):
        buf[start:start + length] = part
    return buf, spans


def _view(buffer: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    return buffer[span[0]:span[0] + span[1]]


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
        self.logn = (LognTable(self.config.seq_length, device, self.config.max_position_embeddings)
                     if self.config.use_logn_attn else None)
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
        order, num_decodes = decodes_first(out.num_scheduled_tokens)
        for rid, num_new in order:
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
        positions_np = np.asarray(positions, dtype=np.int64)
        int64, (id_span, pos_span, slot_span, row_span) = _pack(
            [ids, positions_np, slots, [row for row, _ in sample_rows]], np.int64)
        int32, (qsl_span, len_span, table_span) = _pack([starts, seq_lens, table.ravel()], np.int32)
        float32, float_spans = _pack([np.asarray(thetas, dtype=np.float32)], np.float32)
        int64_t, int32_t, float32_t = (torch.from_numpy(a).to(dev) for a in (int64, int32, float32))
        meta = AttentionMetadata(
            query_start_loc=_view(int32_t, qsl_span), seq_lens=_view(int32_t, len_span),
            max_query_len=max(b - a for a, b in zip(starts, starts[1:])), max_seq_len=max(seq_lens),
            rope_theta=_view(float32_t, float_spans[0]),
            logn_scale=self.logn.scales(_view(int64_t, pos_span), max(seq_lens) - 1) if self.logn else None,
            block_tables=_view(int32_t, table_span).view(table.shape),
            slot_mapping=_view(int64_t, slot_span), num_decodes=num_decodes,
            query_start_loc_list=starts, seq_lens_list=seq_lens)
        return (_view(int64_t, id_span), _view(int64_t, pos_span), meta, sample_rows,
                _view(int64_t, row_span))

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
