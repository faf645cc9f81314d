"""The scheduler: waiting and running queues under one token budget per step.

Each step, running requests come first (in admission order), then waiting ones (FCFS).
Every scheduled request's `num_computed_tokens` moves towards its token count: a decode
gets 1 token, a prompt as many as the budget allows (long prompts are chunked). When the
block pool runs dry, the newest running request is preempted: its blocks are freed and it
goes back to the front of the waiting queue to be recomputed later.
"""
from __future__ import annotations

from collections import deque
from typing import Optional

from qwenserve.kvcache import KVCacheManager
from qwenserve.scheduler.output import CachedRequestData, NewRequestData, SchedulerOutput
from qwenserve.scheduler.request import Request, RequestStatus


class Scheduler:
    def __init__(self, kv_cache: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int):
        self.kv_cache = kv_cache
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
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queue management
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id: {request.request_id!r} is already in use")
        if request.num_prompt_tokens >= self.max_model_len:
            # The engine checks this first; a scheduler driven directly must not accept a
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
        """Ends a request (stop, length or abort) and frees its blocks; unknown ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
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
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:  # nothing to compute until its sample comes back
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
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            hits, num_hit_tokens = self.kv_cache.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit_tokens, budget)
            if self.kv_cache.allocate_slots(request, num_new, hits) is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._schedule(request, num_new, out, is_new=True)
            budget -= num_new
        return out

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
