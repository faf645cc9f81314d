"""`ModelRunner`: turns a `SchedulerOutput` into flat input tensors and `AttentionMetadata`,
runs the model, and samples (rank 0).

It keeps a small state per request (token ids, block ids, computed count, sampling state)
that the scheduler's per-step diffs update; nothing of the scheduler's objects crosses over.

Overlapped steps (`async_scheduling`): `execute(step k+1)` prepares k+1's inputs, launches the
sampling of step k (whose forward the previous call launched), launches k+1's forward, and only
then reads k's samples back and returns them. So the host's work between two forwards (taking
k's samples back, scheduling k+2, preparing its inputs) runs while the device computes k+1; and
the sampling of k comes after k-1's samples were read back, so its penalties, seeds and grammar
masks see every earlier token. Even a sampler that reads the device (the random draw's
rejection rounds) only delays the launch of k+1's forward, never the host work.

    host:   prepare k+1 │ sample k │ launch fwd k+1 │ read k's ids │ (core: update, schedule k+2) │ prepare k+2 ...
    device: ... fwd k ──────────────│ sample k │ fwd k+1 ────────────────────────────────────────────│ sample k+1 │ ...

A request decoding in step k+1 computes the position of the token step k samples, whose value
the host does not know yet: its input id is taken from k's sampled ids on the device
(`_PendingStep.sampled_ids`; with tp > 1 rank 0 broadcasts them to the other ranks). The
request's host-side token list holds -1 there until the value arrives, from rank 0's own
read-back or from the scheduler's diff. Without `async_scheduling` `execute(k)` samples k at
once and returns k's own output; every input is then known on the host.

Structured rows: the sampler masks them to their grammars (qwenserve/structured_output); a
row whose grammar matcher failed is masked to the end tokens and reported with the step's
output (`ModelRunnerOutput.structure_errors`), for the scheduler to abort that request.
With async scheduling the masks for step k's sampling start on a helper thread as soon as
step k-1's samples are read back (`prefetch_bitmask`, at the end of `execute(k)`), so that
they overlap the scheduler and step k+1's input preparation instead of delaying k+1's launch.

On CUDA a step's inputs cross in one non-blocking copy from pinned memory and its sampled ids
come back through a pinned copy behind an event (`step_transfer.py`): the only host wait of a
step is that read-back.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import numpy as np
import torch

from qwenserve.model.attention import AttentionMetadata
from qwenserve.model.qwen import NUM_REAL_TOKENS, QWenLMHeadModel
from qwenserve.scheduler.output import SchedulerOutput
from qwenserve.model.parallel import get_tp_group
from qwenserve.structured_output.batch import prefetch_bitmask
from qwenserve.structured_output.compiler import start_compile
from qwenserve.worker.batch_order import decodes_first
from qwenserve.worker.logn_table import LognTable
from qwenserve.worker.sampler import DeviceSamples, Sampler, SamplingState
from qwenserve.worker.step_transfer import DeviceEvents, StepInputBuffer, copy_to_host_async


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


class StepInputs(NamedTuple):
    """One step's inputs on the device (`ModelRunner.prepare_inputs`)."""
    input_ids: torch.Tensor        # [T]; the rows in `fill` still to be filled in
    positions: torch.Tensor        # [T]
    meta: AttentionMetadata
    sample_rows: list              # (row, request id) of the requests that sample
    sample_index: torch.Tensor     # their rows, on the device
    # (rows of input_ids, rows of the previous step's samples) for decode inputs the host does
    # not know yet; None when there are none.
    fill: Optional[tuple]


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
    """A step whose forward has been launched and whose samples have not been returned."""
    request_ids: list[str]
    states: list[RequestState]
    positions: list[int]           # where each row's sample goes in its request's token_ids
    logits: Optional[torch.Tensor] = None   # [rows, V], rank 0, until it is sampled
    samples: Optional[DeviceSamples] = None  # rank 0, once sampled
    sampled_ids: Optional[torch.Tensor] = None  # [rows] on the device, every rank, once sampled
    host_ids: Optional[torch.Tensor] = None  # a pinned copy of them (CUDA)
    done: Optional[object] = None  # an event after the sampling: `.synchronize()` waits for it

    @property
    def sampled(self) -> bool:
        return self.sampled_ids is not None

    def output(self) -> ModelRunnerOutput:
        """Waits for the samples (rank 0), records them in the request states and returns them."""
        if self.done is not None:
            self.done.synchronize()
        samples = self.samples.to_host(self.host_ids.tolist() if self.host_ids is not None else None)
        token_ids = samples.token_ids
        errors = {}
        for rid, state, position, token in zip(self.request_ids, self.states, self.positions, token_ids):
            if state.token_ids[position] == _UNKNOWN:
                state.token_ids[position] = token
            state.sampling.output_token_ids.append(token)
            matcher = state.sampling.grammar_matcher
            if matcher is not None and matcher.error is not None:  # set by this step's mask
                errors[rid] = structure_error(matcher.error)
        return ModelRunnerOutput(request_ids=self.request_ids, sampled_token_ids=token_ids,
                                 logprobs=samples.logprobs, sampled_logprobs=samples.sampled_logprobs,
                                 structure_errors=errors)


def structure_error(reason: str) -> str:
    """A matcher's failure as the request's error, naming the field."""
    return reason if reason.startswith("structured_output") else f"structured_output: {reason}"


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
        self.logn = (LognTable(self.config.seq_length, device, self.config.max_position_embeddings)
                     if self.config.use_logn_attn else None)
        self._pending: Optional[_PendingStep] = None
        self.events = DeviceEvents(device)
        self.inputs = StepInputBuffer(device)
        # For the step being prepared: which input rows take their id from the previous step's
        # samples on the device, and which sampled row each takes.
        self._fill_rows: list[int] = []
        self._fill_sources: list[int] = []

    # ------------------------------------------------------------------ state updates
    def _update_states(self, out: SchedulerOutput) -> None:
        for rid in out.finished_request_ids:
            self.requests.pop(rid, None)
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
        order, num_decodes = decodes_first(out.num_scheduled_tokens)
        for rid, num_new in order:
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
        # One host-to-device copy per step: every input is a view of one packed buffer.
        (input_ids, positions_t, slot_mapping, sample_index, fill_index, fill_source, query_start_loc,
         seq_lens_t, block_table, thetas_t) = self.inputs.transfer([
            np.asarray(ids, dtype=np.int64), np.asarray(positions, dtype=np.int64),
            np.asarray(slots, dtype=np.int64), np.asarray([row for row, _ in sample_rows], dtype=np.int64),
            np.asarray(fill_rows, dtype=np.int64), np.asarray(fill_sources, dtype=np.int64),
            np.asarray(starts, dtype=np.int32), np.asarray(seq_lens, dtype=np.int32), table.ravel(),
            np.asarray(thetas, dtype=np.float32)])
        meta = AttentionMetadata(
            query_start_loc=query_start_loc, seq_lens=seq_lens_t,
            max_query_len=max(b - a for a, b in zip(starts, starts[1:])), max_seq_len=max(seq_lens),
            rope_theta=thetas_t,
            logn_scale=self.logn.scales(positions_t, max(seq_lens) - 1) if self.logn else None,
            block_tables=block_table.view(table.shape),
            slot_mapping=slot_mapping, num_decodes=num_decodes,
            query_start_loc_list=starts, seq_lens_list=seq_lens)
        return StepInputs(input_ids, positions_t, meta, sample_rows, sample_index,
                          (fill_index, fill_source) if fill_rows else None)

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
        inputs = None if out.is_empty else self.prepare_inputs(out)
        previous = self._pending
        if previous is not None and not previous.sampled:
            self._launch_sampling(previous)  # its ids are this step's decode inputs
        step = None if inputs is None else self._launch_forward(inputs)
        self._pending = step
        if not self.async_scheduling and step is not None:
            self._launch_sampling(step)
            previous, self._pending = step, None
        if not self.is_driver:
            return None
        output = None if previous is None else previous.output()
        pending = self._pending
        if pending is not None and not pending.sampled and pending.states:
            # Its rows' output tokens are final now: their structured-output masks can be
            # computed while the scheduler and the next step's inputs take the host.
            prefetch_bitmask([s.sampling for s in pending.states], pin_memory=torch.device(self.device).type == "cuda")
        return output

    def _launch_forward(self, inputs: "StepInputs") -> _PendingStep:
        input_ids, positions, meta = inputs.input_ids, inputs.positions, inputs.meta
        if inputs.fill is not None:  # decode inputs sampled by the previous step, on the device
            fill_index, fill_source = inputs.fill
            input_ids.index_copy_(0, fill_index, self._pending.sampled_ids.index_select(0, fill_source))
        if self.decode_graphs is not None and self.decode_graphs.can_run(meta.num_requests, meta):
            hidden = self.decode_graphs.run(input_ids, positions, meta)
        else:
            hidden = self.model(input_ids, positions, meta)
        request_ids = [rid for _, rid in inputs.sample_rows]
        states = [self.requests[rid] for rid in request_ids]
        for state in states:  # the sample's place, filled when its value is back on the host
            state.token_ids.append(_UNKNOWN)
        step = _PendingStep(request_ids, states, [len(s.token_ids) - 1 for s in states])
        if request_ids:
            # Other ranks still join the LM head's gather.
            step.logits = self.model.compute_logits(hidden.index_select(0, inputs.sample_index))
        return step

    def _launch_sampling(self, step: _PendingStep) -> None:
        num_rows = len(step.request_ids)
        if not self.is_driver:
            step.sampled_ids = torch.empty(num_rows, dtype=torch.long, device=self.device)
        elif num_rows:
            step.samples = self.sampler.sample_on_device(step.logits, [s.sampling for s in step.states])
            step.sampled_ids = step.samples.token_ids
        else:
            step.sampled_ids = torch.empty(0, dtype=torch.long, device=self.device)
            step.samples = DeviceSamples(step.sampled_ids, [], [], None, None, None)
        step.logits = None
        if self.tp.size > 1 and self.async_scheduling and num_rows:
            # The next step's decode inputs are these ids, on every rank.
            self.tp.broadcast_from_rank0(step.sampled_ids)
        if self.is_driver:
            step.host_ids = copy_to_host_async(step.sampled_ids)
        step.done = self.events.record()
