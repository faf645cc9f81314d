"""`ModelRunner`: turns a `SchedulerOutput` into flat input tensors and `AttentionMetadata`,
runs the model, and samples (rank 0).

It keeps a small state per request (token ids, block ids, computed count, sampling state)
that the scheduler's per-step diffs update; nothing of the scheduler's objects crosses over.

Overlapped steps (`async_scheduling`): `execute(step k)` launches k's forward, then reads back
step k-1's samples (the device has finished them by the time k's forward runs), then launches
k's sampling, and returns k-1's output. Reading k-1 back between the two launches means the
sampler of step k sees every token up to k-1 (penalties, seeds, grammar masks) while the
device runs k's forward; nothing waits on the device except that read-back.

    host:   prepare k │ launch fwd k │ wait k-1 ids │ launch sample k │ return out(k-1) ...
    device: ... fwd k-1 │ sample k-1 │ fwd k ──────────────────────────│ sample k │ fwd k+1

A request decoding in step k computes the position of the token sampled in step k-1, whose
value the host does not know yet: its input id is taken from k-1's sampled ids on the device
(`_PendingStep.sampled_ids`; with tp > 1 rank 0 broadcasts them to the other ranks). The
request's host-side token list holds -1 there until the value arrives, from rank 0's own
read-back or from the scheduler's diff. Without `async_scheduling` `execute(k)` returns k's
own output and every input is known on the host.

Structured rows: the sampler masks them to their grammars (qwenserve/structured_output); a
row whose grammar matcher failed is masked to the end tokens and reported with the step's
output (`ModelRunnerOutput.structure_errors`), for the scheduler to abort that request.
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
from qwenserve.model.parallel import get_tp_group
from qwenserve.structured_output.compiler import start_compile
from qwenserve.worker.sampler import Sampler, SamplerOutput, SamplingState, make_generator


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
    # Structured requests whose grammar matcher failed (a token it rejected, a grammar that
    # could not be built here, a per-step limit): request id -> why. Their token this step is
    # an end token drawn from an end-only mask; the scheduler drops it and aborts them.
    structure_errors: dict[str, str] = field(default_factory=dict)


_UNKNOWN = -1  # a token id the host does not know yet: sampled by a step still on the device


@dataclass
class RequestState:
    token_ids: list[int]  # prompt + output; _UNKNOWN where a sample is not back yet
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    rope_theta: float
    sampling: SamplingState
    num_scheduler_tokens: int  # how many of token_ids the scheduler has sent values for


@dataclass
class _PendingStep:
    """A step whose sampling has been launched and whose output has not been returned."""
    request_ids: list[str]
    states: list[RequestState]
    positions: list[int]           # where each row's sample goes in its request's token_ids
    sampled: Optional[SamplerOutput] = None  # rank 0 only
    sampled_ids: Optional[torch.Tensor] = None  # [rows] on the device, every rank
    done: Optional[object] = None  # an event after the sampling: `.synchronize()` waits for it

    def output(self) -> ModelRunnerOutput:
        """Waits for the samples (rank 0), records them in the request states and returns them."""
        if self.done is not None:
            self.done.synchronize()
        sampled = self.sampled
        token_ids = list(sampled.token_ids)
        errors = {}
        for rid, state, position, token in zip(self.request_ids, self.states, self.positions, token_ids):
            if state.token_ids[position] == _UNKNOWN:
                state.token_ids[position] = token
            state.sampling.output_token_ids.append(token)
            matcher = state.sampling.grammar_matcher
            if matcher is not None and matcher.error is not None:  # set by this step's mask
                errors[rid] = structure_error(matcher.error)
        return ModelRunnerOutput(request_ids=self.request_ids, sampled_token_ids=token_ids,
                                 logprobs=sampled.logprobs, sampled_logprobs=sampled.sampled_logprobs,
                                 structure_errors=errors)


def structure_error(reason: str) -> str:
    """A matcher's failure as the request's error, naming the field."""
    return reason if reason.startswith("structured_output") else f"structured_output: {reason}"


class DeviceEvents:
    """Events on the device's (one) stream: `record()` marks the work queued so far; the
    returned object's `synchronize()` waits for it. Nothing to wait for on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def record(self) -> Optional[object]:
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event


class ModelRunner:
    def __init__(self, model: QWenLMHeadModel, block_size: int, device: torch.device, seed: int = 0,
                 is_driver: bool = True, async_scheduling: bool = False):
        self.model, self.block_size, self.device = model, block_size, device
        self.config = model.config
        self.is_driver = is_driver  # rank 0: computes logits and samples
        self.async_scheduling = async_scheduling
        self.tp = getattr(model, "tp", None) or get_tp_group()
        self.sampler = Sampler(vocab_size_real=min(NUM_REAL_TOKENS, self.config.vocab_size), seed=seed)
        self.requests: dict[str, RequestState] = {}
        self.decode_graphs = None  # a `DecodeGraphs` once the worker has captured them
        # Seeded generators outlive preemption so a resumed request continues its stream.
        self._generators: dict[str, torch.Generator] = {}
        self._pending: Optional[_PendingStep] = None
        self.events = DeviceEvents(device)
        # For the step being prepared: which input rows take their id from the previous step's
        # samples on the device, and which sampled row each takes.
        self._fill_rows: list[int] = []
        self._fill_sources: list[int] = []

    # ------------------------------------------------------------------ state updates
    def _update_states(self, out: SchedulerOutput) -> None:
        for rid in out.finished_request_ids:
            self.requests.pop(rid, None)
            self._generators.pop(rid, None)
        for rid in out.preempted_request_ids:
            self.requests.pop(rid, None)
        for new in out.new_requests:
            if self.is_driver and new.params.structured_output is not None:
                # Usually a cache hit (the request was compiled when it was decoded); where it
                # is not (a rank-0 actor under tp > 1) the compile runs during this forward.
                start_compile(new.params.structured_output)
            tokens = list(new.prompt_token_ids) + list(new.output_token_ids)
            self.requests[new.request_id] = RequestState(
                token_ids=tokens, num_prompt_tokens=len(new.prompt_token_ids), block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens, rope_theta=self.config.rope_theta(new.ntk_alpha),
                sampling=SamplingState(params=new.params, prompt_token_ids=list(new.prompt_token_ids),
                                       output_token_ids=list(new.output_token_ids),
                                       generator=self._generator(new.request_id, new.params),
                                       banned_token_ids=list(new.banned_token_ids)),
                num_scheduler_tokens=len(tokens))
        for cached in out.cached_requests:
            state = self.requests[cached.request_id]
            if cached.new_token_ids:
                # The scheduler's values for positions from num_scheduler_tokens on: either
                # samples of this worker's own (already placed, or still _UNKNOWN) or new.
                start = state.num_scheduler_tokens
                end = start + len(cached.new_token_ids)
                tokens = state.token_ids
                if end > len(tokens):
                    tokens.extend([_UNKNOWN] * (end - len(tokens)))
                tokens[start:end] = cached.new_token_ids
                state.num_scheduler_tokens = end
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
        operations; only prompt chunks go through numpy. A token whose value is still on the
        device (sampled by the previous step) is filled in there, after the copy.
        """
        bs = self.block_size
        ids, positions, slots, thetas = [], [], [], []
        starts, seq_lens, tables, sample_rows = [0], [], [], []
        fill_rows, fill_sources = [], []
        pending_rows = self._pending_rows()
        for rid, num_new in out.num_scheduled_tokens.items():
            state = self.requests[rid]
            begin = state.num_computed_tokens
            end = begin + num_new
            blocks = state.block_ids
            tokens = state.token_ids
            if num_new == 1:
                ids.append(tokens[begin])
                positions.append(begin)
                slots.append(blocks[begin // bs] * bs + begin % bs)
            else:
                pos = np.arange(begin, end, dtype=np.int64)
                ids.extend(tokens[begin:end])
                positions.extend(pos.tolist())
                slots.extend((np.asarray(blocks, dtype=np.int64)[pos // bs] * bs + pos % bs).tolist())
            if tokens[end - 1] == _UNKNOWN:
                source = pending_rows.get(rid)
                if source is None or source[1] != end - 1:
                    raise RuntimeError(f"request {rid!r}: token {end - 1} is neither known nor "
                                       "sampled by the previous step")
                fill_rows.append(starts[-1] + num_new - 1)
                fill_sources.append(source[0])
            thetas.extend([state.rope_theta] * num_new)
            starts.append(starts[-1] + num_new)
            seq_lens.append(end)
            tables.append(blocks)
            if end == len(tokens):  # a partial prefill chunk has nothing to sample
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
        int64, (id_span, pos_span, slot_span, row_span, fill_span, source_span) = _pack(
            [ids, positions_np, slots, [row for row, _ in sample_rows], fill_rows, fill_sources], np.int64)
        int32, (qsl_span, len_span, table_span) = _pack([starts, seq_lens, table.ravel()], np.int32)
        use_logn = self.config.use_logn_attn
        floats = [np.asarray(thetas, dtype=np.float32)]
        if use_logn:
            floats.append(logn_scales(torch.from_numpy(positions_np), self.config.seq_length).numpy())
        float32, float_spans = _pack(floats, np.float32)
        int64_t, int32_t, float32_t = (torch.from_numpy(a).to(dev) for a in (int64, int32, float32))
        input_ids = _view(int64_t, id_span)
        if fill_rows:
            input_ids.index_copy_(0, _view(int64_t, fill_span),
                                  self._pending.sampled_ids.index_select(0, _view(int64_t, source_span)))
        meta = AttentionMetadata(
            query_start_loc=_view(int32_t, qsl_span), seq_lens=_view(int32_t, len_span),
            max_query_len=max(b - a for a, b in zip(starts, starts[1:])), max_seq_len=max(seq_lens),
            rope_theta=_view(float32_t, float_spans[0]),
            logn_scale=_view(float32_t, float_spans[1]) if use_logn else None,
            block_tables=_view(int32_t, table_span).view(table.shape),
            slot_mapping=_view(int64_t, slot_span),
            query_start_loc_list=starts, seq_lens_list=seq_lens)
        return (input_ids, _view(int64_t, pos_span), meta, sample_rows, _view(int64_t, row_span))

    def _pending_rows(self) -> dict[str, tuple[int, int]]:
        """request id -> (its row in the previous step's samples, the position that sample fills)."""
        pending = self._pending
        if pending is None:
            return {}
        return {rid: (row, position) for row, (rid, position)
                in enumerate(zip(pending.request_ids, pending.positions))}

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> Optional[ModelRunnerOutput]:
        """Runs one step. Returns, on rank 0, the output of the previous step that computed
        anything (`async_scheduling`) or of this one; None when there is none (other ranks:
        always None). Every step that computes something has exactly one output, in order."""
        self._update_states(out)
        logits, step = None, None
        if not out.is_empty:
            logits, step = self._launch_forward(out)
        previous, self._pending = self._pending, None
        previous_output = previous.output() if previous is not None and self.is_driver else None
        if step is not None:
            self._launch_sampling(logits, step)
            self._pending = step
        if self.async_scheduling:
            return previous_output
        pending, self._pending = self._pending, None
        if pending is None or not self.is_driver:
            return None
        return pending.output()

    def _launch_forward(self, out: SchedulerOutput) -> tuple[Optional[torch.Tensor], _PendingStep]:
        input_ids, positions, meta, sample_rows, sample_index = self.prepare_inputs(out)
        if self.decode_graphs is not None and self.decode_graphs.can_run(meta.num_requests, meta):
            hidden = self.decode_graphs.run(input_ids, positions, meta)
        else:
            hidden = self.model(input_ids, positions, meta)
        request_ids = [rid for _, rid in sample_rows]
        states = [self.requests[rid] for rid in request_ids]
        for state in states:  # the sample's place, filled when its value is back on the host
            state.token_ids.append(_UNKNOWN)
        step = _PendingStep(request_ids, states, [len(s.token_ids) - 1 for s in states])
        if not sample_rows:
            return None, step
        # Other ranks still join the LM head's gather.
        return self.model.compute_logits(hidden.index_select(0, sample_index)), step

    def _launch_sampling(self, logits: Optional[torch.Tensor], step: _PendingStep) -> None:
        num_rows = len(step.request_ids)
        if not self.is_driver:
            step.sampled_ids = torch.empty(num_rows, dtype=torch.long, device=self.device)
        elif num_rows:
            step.sampled = self.sampler.sample(logits, [s.sampling for s in step.states])
            step.sampled_ids = torch.as_tensor(step.sampled.token_ids, dtype=torch.long, device=self.device)
        else:
            step.sampled = SamplerOutput([], [], [])
            step.sampled_ids = torch.empty(0, dtype=torch.long, device=self.device)
        if self.tp.size > 1 and self.async_scheduling and num_rows:
            # The next step's decode inputs are these ids, on every rank.
            self.tp.broadcast_from_rank0(step.sampled_ids)
        step.done = self.events.record()
