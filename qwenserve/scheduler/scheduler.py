"""The scheduler: waiting and running queues under one token budget per step, and the only
owner of `Request` state and of the KV-cache manager.

Each step, running requests come first (in admission order), then waiting ones (FCFS).
Every scheduled request's `num_computed_tokens` moves towards its token count: a decode
gets 1 token, a prompt as many as the budget allows (long prompts are chunked). When the
block pool runs dry, the newest running request is preempted: its blocks are freed and it
goes back to the front of the waiting queue to be recomputed later.

`update_from_output(scheduler_output, runner_output)` takes a step's sampled tokens back:
it appends them, applies the stop rules that need only token ids (stop ids once min_tokens
are out, a structured request's end tokens at once: `structured_output.termination`;
max_tokens, max_model_len), frees finished requests' blocks and returns each
request's per-step delta (`EngineCoreOutput`). Stop strings are the front end's: it aborts.
A structured request whose grammar matcher failed in the workers (`structure_errors`) is
aborted with the reason as its error, its last token (an end token forced by the failure)
dropped: finish "stop" on a structured request always means a complete structure.

Overlapped steps. The engine core schedules step k+1 before step k's samples are back. A
request whose step k samples a token holds a *placeholder* for it (`num_output_placeholders`)
until `update_from_output(k)`; meanwhile step k+1 may already compute that position (the
workers take the token from the device). So the tokens a request has for scheduling are
`num_tokens + num_output_placeholders`, and the output limits count placeholders too: a
request whose last allowed token is in flight is not scheduled again. With steps run one at
a time (`update_from_output` before the next `schedule`) no placeholder is ever outstanding
at scheduling time, and the same code is the plain synchronous scheduler.

    step k:    schedule ─► launch ───────────── (device runs k) ─────────────► samples(k)
    step k+1:              schedule(k+1) ─► launch ─► update_from_output(k) ─►  ...
                           (placeholder for k's sample: position computed in k+1)
"""
from __future__ import annotations

import time
from collections import deque
from typing import Optional

from qwenserve.engine_core.protocol import EngineCoreOutput, SchedulerStats
from qwenserve.kvcache import KVCacheManager
from qwenserve.scheduler.output import CachedRequestData, NewRequestData, SchedulerOutput
from qwenserve.scheduler.request import Request, RequestStatus
from qwenserve.structured_output import termination


def logprob_entry(token_id: int, logprob: float, top_logprobs) -> list[tuple[int, float]]:
    """One token's logprobs entry (vLLM's semantics): the top-N (id, logprob) pairs, best
    first, followed by the sampled token's pair when it is not among them (N=0: only it)."""
    entry = list(top_logprobs or ())
    for t, _ in entry:
        if t == token_id:
            return entry
    entry.append((token_id, logprob))
    return entry


class Scheduler:
    def __init__(self, kv_cache: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int):
        self.kv_cache = kv_cache  # handed over at construction; nobody else touches it
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        # How many of each request's tokens the workers have been sent.
        self._num_sent_tokens: dict[str, int] = {}
        self._num_sent_blocks: dict[str, int] = {}
        self._finished_ids: list[str] = []
        # Samples still in flight for requests that have ended, by id: dropped on their way
        # back, even when a new request has taken the id since (a client may retry at once).
        self._moot_samples: dict[str, int] = {}
        self.num_preemptions = 0
        self.num_steps = 0  # steps that computed something
        self._last_step_tokens = 0

    # ------------------------------------------------------------------ queue management
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id: {request.request_id!r} is already in use")
        if request.num_prompt_tokens >= self.max_model_len:
            # The front end checks this first; a scheduler driven directly must not accept a
            # request that has no room for one new token (it would never run).
            raise ValueError(f"prompt: {request.num_prompt_tokens} tokens leave no room for a new token "
                             f"within max_model_len {self.max_model_len}")
        needed = self.blocks_needed(min(request.num_prompt_tokens + request.max_tokens, self.max_model_len))
        usable = self.kv_cache.num_blocks - 1
        if needed > usable:
            raise ValueError(
                f"max_tokens: the request needs up to {needed} KV blocks ({request.num_prompt_tokens} prompt "
                f"+ {request.max_tokens} new tokens) but the cache holds only {usable}; lower max_tokens "
                f"or give the KV cache more memory")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.kv_cache.block_size)

    def finish_request(self, request_id: str, status: RequestStatus) -> Optional[Request]:
        """Ends a request (stop, length or abort) and frees its blocks; unknown ids are ignored.
        A step in flight may still compute it: its samples are dropped on their way back, also
        when a new request has taken its id by then."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        if request.num_output_placeholders:
            self._moot_samples[request_id] = (self._moot_samples.get(request_id, 0)
                                              + request.num_output_placeholders)
            request.num_output_placeholders = 0
        self.kv_cache.free(request)
        self._num_sent_blocks.pop(request_id, None)
        if self._num_sent_tokens.pop(request_id, None) is not None:
            self._finished_ids.append(request_id)
        return request

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ------------------------------------------------------------------ the step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.max_num_batched_tokens
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(self._num_schedulable(request), budget)
            if num_new <= 0:  # nothing to compute until a sample comes back
                i += 1
                continue
            while self.kv_cache.allocate_slots(request, num_new) is None:
                victim = self.running.pop()
                self._preempt(victim, out)
                preempted = True
                if victim is request:
                    break
            else:
                self._schedule(request, num_new, out, is_new=False)
                budget -= num_new
                i += 1
                continue
            break  # the request itself was preempted: nobody left behind it to run

        # A step that had to preempt admits nobody: the freed blocks go to the running ones.
        # A preempted request whose last sample is still in flight waits for it: it must be
        # resumed with every token it has.
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs \
                and not self.waiting[0].num_output_placeholders:
            request = self.waiting[0]
            hits, num_hit_tokens = self.kv_cache.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit_tokens, budget)
            if self.kv_cache.allocate_slots(request, num_new, hits) is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
                request.num_cached_tokens = min(num_hit_tokens, request.num_prompt_tokens)
            self.running.append(request)
            self._schedule(request, num_new, out, is_new=True)
            budget -= num_new
        if not out.is_empty:
            self.num_steps += 1
            self._last_step_tokens = self.max_num_batched_tokens - budget
        return out

    def _num_schedulable(self, request: Request) -> int:
        """Tokens a running request could compute now, placeholders included; 0 when the
        samples in flight may be its last (its output limits count them)."""
        pending = request.num_output_placeholders
        if pending and (request.num_output_tokens + pending >= request.max_tokens
                        or request.num_tokens + pending >= self.max_model_len):
            return 0
        return request.num_tokens + pending - request.num_computed_tokens

    def _schedule(self, request: Request, num_new: int, out: SchedulerOutput, is_new: bool) -> None:
        rid = request.request_id
        if is_new:
            out.new_requests.append(NewRequestData(
                request_id=rid, prompt_token_ids=request.prompt_token_ids,
                output_token_ids=request.output_token_ids,
                block_ids=self.kv_cache.get_block_ids(rid),
                num_computed_tokens=request.num_computed_tokens, ntk_alpha=request.ntk_alpha,
                params=request.params, banned_token_ids=sorted(request.stop_token_ids)))
        else:
            sent = self._num_sent_tokens[rid]
            out.cached_requests.append(CachedRequestData(
                request_id=rid, new_token_ids=request.all_token_ids[sent:],
                new_block_ids=self.kv_cache.get_block_ids(rid, start=self._num_sent_blocks[rid]),
                num_computed_tokens=request.num_computed_tokens))
        self._num_sent_tokens[rid] = request.num_tokens
        self._num_sent_blocks[rid] = self.kv_cache.num_request_blocks(rid)
        out.num_scheduled_tokens[rid] = num_new
        request.num_computed_tokens += num_new
        if request.num_computed_tokens == request.num_tokens + request.num_output_placeholders:
            request.num_output_placeholders += 1  # this step samples (a partial chunk does not)

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.kv_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._num_sent_tokens.pop(request.request_id, None)
        self._num_sent_blocks.pop(request.request_id, None)
        out.preempted_request_ids.append(request.request_id)
        self.waiting.appendleft(request)

    # ------------------------------------------------------------------ results
    def update_from_output(self, scheduler_output: SchedulerOutput, runner_output) -> list[EngineCoreOutput]:
        """Takes back the samples of the step `scheduler_output` described (`runner_output` is
        its `ModelRunnerOutput`, None when the step sampled nothing); returns one delta per
        request that gained a token, finished requests included."""
        outputs = []
        if runner_output is None:
            return outputs
        for rid, token, logprob, top in zip(runner_output.request_ids, runner_output.sampled_token_ids,
                                           runner_output.sampled_logprobs, runner_output.logprobs):
            moot = self._moot_samples.get(rid)
            if moot:  # its request ended while the step ran; a request now under its id is new
                if moot == 1:
                    del self._moot_samples[rid]
                else:
                    self._moot_samples[rid] = moot - 1
                continue
            request = self.requests[rid]
            request.num_output_placeholders -= 1
            error = runner_output.structure_errors.get(rid)
            if error is not None:  # the token came from an end-only mask: not output
                self.finish_request(rid, RequestStatus.FINISHED_ABORTED)
                outputs.append(EngineCoreOutput(rid, [], finish_reason="abort", error=error))
                continue
            request.append_token(token)
            finish = self._check_stop(request, token)
            output = EngineCoreOutput(rid, [token])
            if request.params.logprobs is not None:
                output.new_logprobs = [logprob_entry(token, logprob, top)]
            if request.num_output_tokens == 1:
                output.num_cached_tokens = request.num_cached_tokens
                output.queue_time = max(0.0, (request.first_scheduled_time or request.arrival_time)
                                        - request.arrival_time)
            if finish is not None:
                output.finish_reason = finish.value
                self.finish_request(rid, finish)
            outputs.append(output)
        return outputs

    def _check_stop(self, request: Request, token: int) -> Optional[RequestStatus]:
        num_output = request.num_output_tokens
        if token in request.stop_token_ids and (num_output >= request.params.min_tokens
                                                or termination.stops_before_min_tokens(request.params)):
            return RequestStatus.FINISHED_STOPPED
        if num_output >= request.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    # ------------------------------------------------------------------ introspection
    def stats(self) -> SchedulerStats:
        kv = self.kv_cache
        prefix = kv.prefix_cache_stats
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting),
            num_used_blocks=kv.num_used_blocks, num_free_blocks=kv.num_free_blocks,
            num_total_blocks=kv.num_blocks - 1, num_cached_blocks=kv.num_cached_blocks,
            kv_cache_usage=kv.usage, num_preemptions=self.num_preemptions,
            prefix_cache_queries=prefix.query_tokens, prefix_cache_hits=prefix.hit_tokens,
            num_steps=self.num_steps, step_num_tokens=self._last_step_tokens)
