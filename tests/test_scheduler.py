"""Tests of qwenserve.scheduler.Scheduler on its own: a real KVCacheManager, no model.

`Sim` plays the engine core and the worker around the scheduler, in either order of
`EngineCore.step`: synchronous (schedule k, execute k, `update_from_output(k)`) or overlapped
(`overlap=True`, the engine's default: schedule k, execute k, which returns step k-1's samples,
`update_from_output(k-1)`), where step k may compute the position of the token k-1 sampled
before the host knows its value (a *placeholder* in the scheduler). Aborts between steps call
`finish_request(..., FINISHED_ABORTED)` like `EngineCore.abort_requests`.
Its worker (model_runner.py `ModelRunner.execute`) rebuilds each request's tokens and block
table from the `SchedulerOutput` diffs only; its host-side tokens hold UNKNOWN where a sample
is still "on the device", and such an input comes from the previous step's samples, as in the
runner. It "writes K/V" as (cache_salt, position, token) into a fake slot array, then checks
every scheduled request reads exactly the reference tokens back from its block table.
The "model" samples a token that is a deterministic function of the whole context, so the
outputs every request must end with are known up front (`reference_output`), preemption or not.

Every assertion says in a comment which bug it catches.
"""
from __future__ import annotations

import functools
import random
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import pytest

from qwenserve.kvcache import KVCacheManager
from qwenserve.sampling_params import SamplingParams
from qwenserve.scheduler.request import Request, RequestStatus
from qwenserve.scheduler.scheduler import Scheduler
from qwenserve.worker.model_runner import ModelRunnerOutput

VOCAB = 50
STOP = frozenset({0})
UNKNOWN = -1  # the worker's host-side id of a token still on the device (model_runner._UNKNOWN)
ORDERS = pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])


def model_token(context) -> int:
    """The fake model: the next token is a function of the full context only."""
    return hash(tuple(context)) % VOCAB


def reference_output(prompt, max_tokens, stop_ids, max_model_len, min_tokens=0):
    """What the request must produce, computed without any scheduler (the stop rules). The
    fake model does not mask stop ids before min_tokens (the real sampler does), so here the
    scheduler's own min_tokens rule is what keeps an early stop id from ending a request."""
    ctx, out = list(prompt), []
    while True:
        tok = model_token(ctx)
        ctx.append(tok)
        out.append(tok)
        if tok in stop_ids and len(out) >= min_tokens:
            return out, RequestStatus.FINISHED_STOPPED
        if len(out) >= max_tokens or len(ctx) >= max_model_len:
            return out, RequestStatus.FINISHED_LENGTH


def make_request(rid, prompt, max_tokens, *, stop_ids=STOP, alpha=1.0, arrival=None, scope=None, min_tokens=0):
    params = SamplingParams(max_tokens=max_tokens, min_tokens=min_tokens)
    req = Request(rid, prompt, params, max_tokens, alpha, frozenset(stop_ids), arrival_time=arrival)
    req.cache_scope = scope
    return req


@dataclass
class WorkerState:
    token_ids: list  # UNKNOWN where the sample is still on the device
    block_ids: list
    num_computed_tokens: int
    num_scheduler_tokens: int  # how many of token_ids the scheduler has sent values for


class Sample(NamedTuple):
    """A launched step's sample (a row of model_runner._PendingStep), not read back yet."""
    request_id: str
    state: WorkerState  # the worker's state the sample goes to ...
    position: int       # ... at this place in its token_ids
    value: int          # the sampled id ("on the device")
    request: Request    # the harness's: which scheduler Request it was drawn for


class Sim:
    def __init__(self, num_blocks, block_size, max_num_seqs, max_num_batched_tokens, max_model_len=1 << 20,
                 overlap=False):
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=True)  # as engine.py
        self.sched = Scheduler(self.kv, max_num_seqs, max_num_batched_tokens, max_model_len)
        self.bs = block_size
        self.max_model_len = max_model_len
        self.overlap = overlap
        self.worker: dict[str, WorkerState] = {}
        self.launched: list[Sample] | None = None  # the worker's last step, not read back yet
        self.in_flight: deque = deque()  # EngineCore._in_flight: (SchedulerOutput, its samples)
        self.slots: dict[tuple[int, int], tuple] = {}  # (block id, offset) -> (salt, pos, token)
        self.expected: dict[str, tuple[list[int], RequestStatus]] = {}
        self.truth: dict[str, list[int]] = {}  # prompt + reference output
        self.all: dict[str, Request] = {}
        self.finished: dict[str, Request] = {}
        self.ended: list = []  # (request, its output when it ended): nothing may change it later
        self.num_steps = 0
        self.num_added = 0
        # What the runs exercise (test_random_workloads_cover_every_case). Only overlapped: a
        # position computed while its sample is in flight; a request held back while its last
        # sample is; preempted / aborted with one in flight; a stop known only after the request
        # was scheduled again (its extra sample dropped); a step that schedules nothing.
        self.stats = dict.fromkeys([
            "preemptions", "chunked", "prefix_hit_tokens", "stop_before_min_tokens", "max_model_len_ends",
            "ids_reused", "computed_in_flight", "held_back_last", "preempted_in_flight", "aborted_in_flight",
            "dropped_after_stop", "empty_steps"], 0)
        self.preempted_ever: set[str] = set()

    # ------------------------------------------------------------------ requests
    def add(self, req: Request) -> None:
        rid = req.request_id
        self.sched.add_request(req)
        if rid in self.all:
            self.stats["ids_reused"] += 1  # a client retrying under the id of an ended request
        self.all[rid] = req
        self.finished.pop(rid, None)
        self.num_added += 1
        self.expected[rid] = reference_output(req.prompt_token_ids, req.max_tokens, req.stop_token_ids,
                                              self.max_model_len, req.params.min_tokens)
        self.truth[rid] = req.prompt_token_ids + self.expected[rid][0]
        early = self.expected[rid][0][:req.params.min_tokens - 1]  # drawn before min_tokens is reached
        self.stats["stop_before_min_tokens"] += any(t in req.stop_token_ids for t in early)

    def abort(self, rid: str) -> Request:
        self.stats["aborted_in_flight"] += self.sched.requests[rid].num_output_placeholders > 0
        req = self.sched.finish_request(rid, RequestStatus.FINISHED_ABORTED)
        assert req is not None and req.status == RequestStatus.FINISHED_ABORTED
        # Catches: an abort that does not free the request's blocks (leak).
        assert self.kv.num_request_blocks(rid) == 0
        # Catches: an aborted request left in a queue (would be scheduled again or hang).
        assert req not in self.sched.waiting and req not in self.sched.running
        # The output so far is a prefix of what it would have produced.
        exp, _ = self.expected[rid]
        assert req.output_token_ids == exp[:len(req.output_token_ids)]
        self.finished[rid] = req
        self.ended.append((req, list(req.output_token_ids)))
        return req

    def has_work(self) -> bool:  # EngineCore.has_work
        return self.sched.has_unfinished_requests() or bool(self.in_flight)

    # ------------------------------------------------------------------ one engine step
    def step(self):
        """EngineCore.step: schedule k, the worker executes it and returns the samples of the
        step before (overlapped) or of k itself (synchronous), which go back to the scheduler."""
        sched, kv = self.sched, self.kv
        self._check_placeholders()
        running_before = list(sched.running)
        waiting_before = list(sched.waiting)
        computed_before = {r.request_id: r.num_computed_tokens for r in running_before}
        may_compute = {r.request_id: self._may_compute(r) for r in running_before}
        placeholders_before = {rid: r.num_output_placeholders for rid, r in sched.requests.items()}
        free_before = kv.num_free_blocks
        budget_need = self._blocks_the_running_need(may_compute)

        out = sched.schedule()
        self.num_steps += 1
        self._check_limits(out, may_compute)
        self._check_order_and_preemption(out, running_before, waiting_before, free_before, budget_need)
        self._check_token_counts(out, running_before, computed_before, may_compute)
        if out.is_empty and not self.in_flight and not (out.finished_request_ids or out.preempted_request_ids):
            return out  # EngineCore.step: nothing for the executor
        runner_output, launched = self._execute(out, placeholders_before)
        for rid, req in sched.requests.items():
            # Catches: a placeholder not taken for a sample this step draws (the next step would
            # not compute its position, or a limit would let one sample too many through), or
            # one taken for a partial prefill chunk (the request would wait forever for it).
            sampled = any(s.request is req for s in launched or ())
            assert req.num_output_placeholders == placeholders_before.get(rid, 0) + sampled, req
            assert req.num_output_placeholders <= (2 if self.overlap else 1)
        if not out.is_empty:
            self.in_flight.append((out, launched))
        if runner_output is not None:
            self._take_back(*self.in_flight.popleft(), runner_output)
        self._check_blocks()
        return out

    def _may_compute(self, r) -> int:
        """Documented (scheduler.py): tokens a running request may compute now, up to its known
        tokens plus the samples in flight; none while a sample in flight may be its last."""
        pending = r.num_output_placeholders
        if pending and (r.num_output_tokens + pending >= r.max_tokens
                        or r.num_tokens + pending >= self.max_model_len):
            return 0
        return r.num_tokens + pending - r.num_computed_tokens

    def _blocks_the_running_need(self, may_compute) -> int:
        """New blocks the running requests need this step if nobody is preempted (in the
        scheduler's order, under its budget): a preemption is only justified above the free count."""
        budget, need = self.sched.max_num_batched_tokens, 0
        for r in self.sched.running:
            if budget <= 0:
                break
            n = min(may_compute[r.request_id], budget)
            budget -= n
            held = self.kv.num_request_blocks(r.request_id)
            need += max(self.sched.blocks_needed(r.num_computed_tokens + n) - held, 0)
        return need

    def _check_placeholders(self):
        """At scheduling time the only samples in flight are those of the step launched last."""
        in_flight = [s.request for _, samples in self.in_flight for s in samples or ()]
        # Catches: EngineCore's order broken (more than one step in flight at scheduling time).
        assert len(self.in_flight) <= (1 if self.overlap else 0)
        for r in self.sched.requests.values():
            pending = r.num_output_placeholders
            # Catches: a placeholder not dropped when its sample came back (the request would
            # stall at its limits) or never taken; in the synchronous order none is left. A
            # victim's sample is back before the next schedule too (the step that preempted it
            # admits nobody), so it resumes with every token it has.
            assert pending == sum(q is r for q in in_flight), r
            # Catches: computing a position that is neither known nor being sampled.
            assert r.num_computed_tokens <= r.num_tokens + pending
            # Catches: a sample drawn past max_tokens / max_model_len (limits not counting
            # the samples in flight).
            assert r.num_output_tokens + pending <= r.max_tokens and r.num_tokens + pending <= self.max_model_len

    def _check_limits(self, out, may_compute):
        sched = self.sched
        # Catches: the token budget ignored (e.g. a prefill chunk not capped by what is left).
        assert out.total_num_scheduled_tokens <= sched.max_num_batched_tokens
        # Catches: admitting past max_num_seqs (e.g. the check done before a pop or off by one).
        assert len(sched.running) <= sched.max_num_seqs
        # Catches: a request listed with 0 tokens (the worker would sample it again).
        assert all(n >= 1 for n in out.num_scheduled_tokens.values())
        if sched.has_unfinished_requests() and out.is_empty:
            # Catches: a hang -- unfinished requests but nothing to run and nothing in flight
            # whose samples will end some, so step() never progresses. Overlapped, a step may be
            # empty while every running request waits for its last sample.
            assert self.in_flight and not any(may_compute[r.request_id] for r in sched.running), sched.running
            self.stats["empty_steps"] += 1
        # Catches: the running list and the batch disagreeing (scheduled but not running, or
        # a running request dropped from both queues).
        for rid in out.num_scheduled_tokens:
            assert sched.requests[rid].status == RequestStatus.RUNNING
            assert sched.requests[rid] in sched.running
        for r in sched.waiting:
            assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            # Catches: a queued (e.g. preempted) request still holding blocks or computed tokens.
            assert self.kv.num_request_blocks(r.request_id) == 0 and r.num_computed_tokens == 0

    def _check_order_and_preemption(self, out, running_before, waiting_before, free_before, budget_need):
        sched = self.sched
        k = len(out.preempted_request_ids)
        # Catches: the wrong victim. Documented policy (scheduler.py docstring, ARCHITECTURE.md):
        # the NEWEST running request goes first, so the victims are the tail of the running
        # list, newest first.
        assert out.preempted_request_ids == [r.request_id for r in reversed(running_before)][:k]
        if k:
            self.stats["preemptions"] += k
            # Catches: preempting although the free blocks covered every running request.
            assert budget_need > free_before
            # Catches: admitting waiting requests in a step that preempted (documented: the
            # freed blocks go to the running ones).
            assert not out.new_requests
        victims = [self.all[rid] for rid in out.preempted_request_ids]
        for v in victims:
            self.preempted_ever.add(v.request_id)
            self.stats["preempted_in_flight"] += v.num_output_placeholders > 0
            # Catches: a victim not reset (stale computed count -> tokens skipped on resume),
            # not freed (leak), or not re-queued (lost request).
            assert v.status == RequestStatus.PREEMPTED and v.num_computed_tokens == 0
            assert self.kv.num_request_blocks(v.request_id) == 0
            assert v.request_id not in out.num_scheduled_tokens
        # Catches: victims not put back at the FRONT of the waiting queue (documented), in
        # their arrival order, ahead of requests that never ran.
        assert list(sched.waiting)[:k] == sorted(victims, key=lambda r: r.arrival_time)
        # FCFS: the requests admitted this step are exactly the head of the waiting queue as it
        # was before the step (after the victims that went back in front of it, none of which
        # is admitted in a preempting step). Catches: skipping a blocked head-of-line request
        # to admit a later, smaller one, or admitting out of order.
        admitted = [n.request_id for n in out.new_requests]
        assert admitted == [r.request_id for r in waiting_before[:len(admitted)]]
        # The queues together stay in arrival order: running (admission order) then waiting.
        # Catches: a resumed request appended to the back of the queue (overtaken by later
        # arrivals) or a victim chosen from the middle of the running list.
        arrivals = [r.arrival_time for r in list(sched.running) + list(sched.waiting)]
        assert arrivals == sorted(arrivals)
        # Admission stopped for a reason: out of budget, seats, or memory for the head.
        if sched.waiting and not k:
            head = sched.waiting[0]
            left = sched.max_num_batched_tokens - out.total_num_scheduled_tokens
            if left > 0 and len(sched.running) < sched.max_num_seqs:
                # Catches: a head-of-line request left waiting although it fits now.
                hits, n_hit = self.kv.get_computed_blocks(head)
                n = min(head.num_tokens - n_hit, left)
                need = sched.blocks_needed(n_hit + n) - len(hits) + sum(
                    self.kv.pool.blocks[b].ref_cnt == 0 for b in hits)
                assert need > self.kv.num_free_blocks, (head, need, self.kv.num_free_blocks)

    def _check_token_counts(self, out, running_before, computed_before, may_compute):
        sched, bs = self.sched, self.bs
        budget = sched.max_num_batched_tokens
        victims = set(out.preempted_request_ids)
        # Documented: the running requests first, in order, each min(what it may compute, budget
        # left); the victims are their tail. Catches: a chunk smaller than both (needless
        # chunking, or a decode held back while its sample is in flight: the overlap lost), one
        # larger than the budget left, or a request skipped.
        for r in running_before:
            rid = r.request_id
            if rid in victims:
                break
            n = out.num_scheduled_tokens.get(rid, 0)
            assert n == min(may_compute[rid], budget), (r, n, may_compute[rid], budget)
            if n:
                # Catches: num_computed_tokens not advanced by exactly the scheduled count.
                assert r.num_computed_tokens == computed_before[rid] + n
                self.stats["chunked"] += n < r.num_tokens - computed_before[rid]
            elif budget:
                self.stats["held_back_last"] += 1
            budget -= n
        for new in out.new_requests:
            req, n = sched.requests[new.request_id], out.num_scheduled_tokens[new.request_id]
            assert req.num_computed_tokens == new.num_computed_tokens + n
            assert n == min(req.num_tokens - new.num_computed_tokens, budget), (req, n, budget)
            budget -= n
            self.stats["chunked"] += n < req.num_tokens - new.num_computed_tokens
            # Prefix hits are whole blocks and leave at least one token to compute (its logits).
            assert new.num_computed_tokens % bs == 0 and new.num_computed_tokens < req.num_tokens
            self.stats["prefix_hit_tokens"] += new.num_computed_tokens
            # Catches: NewRequestData out of date (a resumed request must carry every output it
            # has: its last sample, in flight when it was preempted, included).
            assert new.prompt_token_ids == req.prompt_token_ids
            assert new.output_token_ids == req.output_token_ids
            assert new.banned_token_ids == sorted(req.stop_token_ids)

    def _update_worker(self, out):
        """model_runner.ModelRunner._update_states, verbatim in effect."""
        for rid in out.finished_request_ids:
            # Catches: a finished id the worker never saw (sent twice, or for a request that
            # was never scheduled / already dropped at preemption).
            assert rid in self.worker, rid
            self.worker.pop(rid)
        for rid in out.preempted_request_ids:
            self.worker.pop(rid, None)
        for new in out.new_requests:
            # Catches: a request sent as new while the worker still holds it (stale state).
            assert new.request_id not in self.worker
            tokens = list(new.prompt_token_ids) + list(new.output_token_ids)
            self.worker[new.request_id] = WorkerState(tokens, list(new.block_ids), new.num_computed_tokens,
                                                      len(tokens))
            # Blocks past the prefix hits come fresh from the pool: what they held is stale.
            self._invalidate(new.block_ids[new.num_computed_tokens // self.bs:])
        for cached in out.cached_requests:
            self._invalidate(cached.new_block_ids)
            st = self.worker[cached.request_id]
            if cached.new_token_ids:  # values from num_scheduler_tokens on, some drawn here
                start, end = st.num_scheduler_tokens, st.num_scheduler_tokens + len(cached.new_token_ids)
                st.token_ids.extend([UNKNOWN] * (end - len(st.token_ids)))
                # Catches: a diff at the wrong offset (the scheduler's value for a position
                # is not the sample the worker drew there).
                assert all(old in (UNKNOWN, new) for old, new in zip(st.token_ids[start:end], cached.new_token_ids))
                st.token_ids[start:end] = cached.new_token_ids
                st.num_scheduler_tokens = end
            st.block_ids.extend(cached.new_block_ids)
            st.num_computed_tokens = cached.num_computed_tokens
        # Catches: finished/preempted requests never reported (worker state leaks) or a
        # running request the worker does not know.
        assert set(self.worker) == {r.request_id for r in self.sched.running}
        # Catches: the cached/new split wrong (every scheduled request is in exactly one).
        listed = [n.request_id for n in out.new_requests] + [c.request_id for c in out.cached_requests]
        assert sorted(listed) == sorted(out.num_scheduled_tokens)

    def _invalidate(self, block_ids):
        for b in block_ids:
            for off in range(self.bs):
                self.slots.pop((b, off), None)

    def _slot(self, st, pos):
        return st.block_ids[pos // self.bs], pos % self.bs

    def _execute(self, out, placeholders_before):
        """model_runner.ModelRunner.execute: update the states, run this step's forward, read
        back the samples of the step launched before, leave this step's samples on the device;
        return the previous step's output (overlapped) or this step's (synchronous), and (for the
        harness) this step's samples, None when it computed nothing."""
        self._update_worker(out)
        step = self._forward(out, placeholders_before) if not out.is_empty else None
        previous, self.launched = (self.launched, step) if self.overlap else (step, None)
        if previous is None:
            return None, step
        for s in previous:
            if s.state.token_ids[s.position] == UNKNOWN:  # the read-back: the host learns its samples
                s.state.token_ids[s.position] = s.value
        return ModelRunnerOutput(request_ids=[s.request_id for s in previous],
                                 sampled_token_ids=[s.value for s in previous],
                                 logprobs=[None] * len(previous), sampled_logprobs=[None] * len(previous)), step

    def _forward(self, out, placeholders_before) -> list[Sample]:
        kv, pool, sched = self.kv, self.kv.pool, self.sched
        previous, samples = self.launched, []
        # Store K/V of every scheduled token (all requests), then "attend" (read back).
        for rid, n in out.num_scheduled_tokens.items():
            st, req = self.worker[rid], sched.requests[rid]
            # Catches: the diffs losing or duplicating tokens or blocks on the way to the worker:
            # it holds the scheduler's tokens, then one unknown per sample still on the device.
            assert st.token_ids == req.all_token_ids + [UNKNOWN] * placeholders_before[rid], (rid, st.token_ids)
            assert st.block_ids == kv.get_block_ids(rid)
            # Catches: a token value the scheduler never sends (ranks other than 0 do not read
            # samples back: they have only the scheduler's values and the device's).
            assert st.num_scheduler_tokens == req.num_tokens
            begin, end = st.num_computed_tokens, st.num_computed_tokens + n
            assert end == req.num_computed_tokens
            # Catches: too few blocks allocated for this step's tokens.
            assert len(st.block_ids) * self.bs >= end
            inputs = st.token_ids[begin:end]
            if inputs[-1] == UNKNOWN:
                # The runner takes this input from the previous step's samples on the device.
                # Catches: a position scheduled whose token is neither known on the host nor
                # drawn by the step before (model_runner raises).
                source = next((s for s in previous or () if s.state is st), None)
                assert source is not None and source.position == end - 1, (rid, end)
                inputs[-1] = source.value
                self.stats["computed_in_flight"] += 1
            for pos, token in zip(range(begin, end), inputs):
                slot, value = self._slot(st, pos), (req.cache_salt, pos, token)
                old = self.slots.get(slot)
                # Catches: overwriting live K/V -- a slot of a shared prefix block, or of a block
                # still held by another request -- with other content.
                assert old is None or old == value, (slot, old, value, pool.blocks[slot[0]])
                self.slots[slot] = value
            st.num_computed_tokens = end
            if end < len(st.token_ids):  # a partial prefill chunk samples nothing
                continue
            truth, context = self.truth[rid], st.token_ids[:end - 1] + inputs[-1:]
            # Catches: the worker's context (host values, and the device's for the last one)
            # not the request's true tokens, e.g. an unknown input anywhere but the last.
            assert context == truth[:end] and end >= req.num_prompt_tokens, (rid, context)
            # Catches: the scheduler's placeholder and the worker's sample at different positions.
            assert end == req.num_tokens + req.num_output_placeholders - 1
            # Catches: a sample drawn past max_tokens or max_model_len.
            assert end - req.num_prompt_tokens < req.max_tokens and end < self.max_model_len
            # Only a step scheduled before the stop token it computes was known may sample past
            # the end; update_from_output must drop that sample.
            assert end < len(truth) or (self.overlap and end == len(truth)
                                        and self.expected[rid][1] == RequestStatus.FINISHED_STOPPED)
            samples.append(Sample(rid, st, end, model_token(context), req))
        for rid in out.num_scheduled_tokens:
            st, req, truth = self.worker[rid], sched.requests[rid], self.truth[rid]
            assert st.num_computed_tokens <= len(truth)
            for pos in range(st.num_computed_tokens):
                # Catches: K/V of this request overwritten by another (block freed while in use,
                # double allocation), prefix hits on blocks of other content/salt/scope, or a
                # block table that does not match the positions.
                assert self.slots.get(self._slot(st, pos)) == (req.cache_salt, pos, truth[pos]), (rid, pos)
        for s in samples:  # the sample's place, filled when its value is read back
            s.state.token_ids.append(UNKNOWN)
        return samples

    def _take_back(self, out, launched: list[Sample], runner_output):
        """EngineCore: a step's samples go back to the scheduler (one step late, overlapped)."""
        sched = self.sched
        assert runner_output.request_ids == [s.request_id for s in launched]
        live = [s for s in launched if sched.requests.get(s.request_id) is s.request]
        dropped = [s.request for s in launched if sched.requests.get(s.request_id) is not s.request]
        outputs = sched.update_from_output(out, runner_output)
        # Catches: a sample of a request that ended while it was drawn (stopped, aborted, or its
        # id taken by a new request since) applied anyway, or a live one lost; a delta that is
        # not exactly the one new token.
        assert [(o.request_id, o.new_token_ids) for o in outputs] == [(s.request_id, [s.value]) for s in live]
        for req in dropped:
            # Catches: a request ended by its length with a sample in flight (one past a limit).
            assert req.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_ABORTED), req
            self.stats["dropped_after_stop"] += req.status == RequestStatus.FINISHED_STOPPED
        for output in outputs:
            if output.finish_reason is not None:
                req, status = self.all[output.request_id], RequestStatus(output.finish_reason)
                assert req.status == status
                self._on_finished(req, status)

    def _on_finished(self, req, status):
        exp, exp_status = self.expected[req.request_id]
        # Catches: outputs lost or duplicated (e.g. by a preemption and recompute): the same
        # tokens, and so the same count, as a run without any scheduler.
        assert req.output_token_ids == exp and status == exp_status, req
        # Catches: a finished request whose blocks are not freed at once.
        assert self.kv.num_request_blocks(req.request_id) == 0
        assert req.request_id not in self.sched.requests
        self.finished[req.request_id] = req
        self.stats["max_model_len_ends"] += len(exp) < req.max_tokens and status == RequestStatus.FINISHED_LENGTH
        self.ended.append((req, list(req.output_token_ids)))

    def _check_blocks(self):
        kv = self.kv
        held = {}
        for r in self.sched.running:
            for b in kv.get_block_ids(r.request_id):
                held[b] = held.get(b, 0) + 1
        # Catches: leaked blocks (held by no live request) or blocks freed while still held.
        assert kv.num_used_blocks == len(held)
        for b, cnt in held.items():
            assert kv.pool.blocks[b].ref_cnt == cnt

    def run_to_end(self, max_steps=10_000):
        while self.has_work():
            self.step()
            assert self.num_steps < max_steps, "livelock: requests never finish"
        self.check_drained()

    def check_drained(self):
        # Catches: a step never taken back (its samples lost) or left on the worker.
        assert not self.in_flight and self.launched is None
        # Catches: leaks at the end (blocks not returned, requests left in queues).
        assert self.kv.num_free_blocks == self.kv.num_blocks - 1
        assert all(b.ref_cnt == 0 for b in self.kv.pool.blocks)
        assert not self.sched.waiting and not self.sched.running and not self.sched.requests
        # Catches: a sample that came back after its request ended appended to it.
        assert all(req.output_token_ids == out for req, out in self.ended)
        # One more schedule: nothing to run, and the worker is told about the last finishes.
        out = self.sched.schedule()
        assert out.is_empty and not out.new_requests and not out.preempted_request_ids
        self._update_worker(out)
        assert self.worker == {}


# ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)  # the coverage test reuses the runs
def run_random_workload(seed: int, overlap: bool):
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4, 4, 8])
    max_model_len = rng.choice([48, 64, 96])
    budget = rng.choice([3, 8, 16, 32, 64])
    max_num_seqs = rng.choice([1, 2, 4, 8])
    prefixes = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(bs, 4 * bs))] for _ in range(3)]

    def random_request():  # prompt, max_tokens, keywords of make_request
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, max_model_len - 1))]
        if rng.random() < 0.4:  # a shared prefix, for prefix-cache hits
            prompt = (rng.choice(prefixes) + prompt)[:max_model_len - 1]
        max_tokens = rng.randint(1, 24)  # sometimes past max_model_len, which ends it first
        max_tokens = min(max_tokens, max_model_len - len(prompt)) if rng.random() < 0.7 else max_tokens
        return prompt, max_tokens, dict(min_tokens=rng.choice([0, 0, rng.randint(0, max_tokens)]),
                                        alpha=rng.choice([1.0, 1.0, 2.0]),
                                        stop_ids=STOP if rng.random() < 0.7 else frozenset())

    specs = []  # (arrival step, request id, random_request(), cache scope)
    for nid in range(rng.randint(12, 30)):
        arrival, spec = rng.randint(0, 40), random_request()
        n = 1 if rng.random() < 0.8 else rng.randint(2, 3)  # n > 1: siblings, one scope
        scope = rng.choice([None, nid])
        specs += [(arrival, f"r{nid}" if n == 1 else f"r{nid}#{i}", spec, scope) for i in range(n)]
    specs.sort(key=lambda s: s[0])
    longest = max(min(len(s[2][0]) + s[2][1], max_model_len) for s in specs)
    # Small caches: the biggest request just fits, so preemption is frequent.
    fit = -(-longest // bs)
    num_blocks = 1 + fit + rng.randint(0, fit if seed % 3 == 0 else fit // 3)
    sim = Sim(num_blocks, bs, max_num_seqs, budget, max_model_len, overlap=overlap)

    aborted = {"waiting": 0, "running": 0, "preempted": 0}
    pending = list(specs)
    step = 0
    while pending or sim.has_work():
        while pending and pending[0][0] <= step:
            _, rid, (prompt, max_tokens, kw), scope = pending.pop(0)
            sim.add(make_request(rid, prompt, max_tokens, arrival=sim.num_added, scope=scope, **kw))
        if sim.sched.requests and rng.random() < 0.05:
            # Abort a waiting (never run), running or preempted request, each kind alike.
            by_kind = {}
            for r in sim.sched.requests.values():
                kind = {RequestStatus.WAITING: "waiting", RequestStatus.RUNNING: "running",
                        RequestStatus.PREEMPTED: "preempted"}[r.status]
                by_kind.setdefault(kind, []).append(r)
            kind = rng.choice(sorted(by_kind))
            sim.abort(rid := rng.choice(by_kind[kind]).request_id)
            aborted[kind] += 1
            if rng.random() < 0.5:  # the client retries under the same id at once
                prompt, max_tokens, kw = random_request()
                if min(len(prompt) + max_tokens, max_model_len) <= longest:
                    sim.add(make_request(rid, prompt, max_tokens, arrival=sim.num_added, **kw))
        if sim.has_work():
            sim.step()
        step += 1
        assert step < 20_000, "livelock: requests never finish"
    sim.check_drained()
    # Every request ended: finished with its reference output, or aborted.
    assert set(sim.finished) == set(sim.all)
    return sim, aborted


SEEDS = range(40)


@ORDERS
@pytest.mark.parametrize("seed", SEEDS)
def test_random_workload(seed, overlap):
    run_random_workload(seed, overlap)


@ORDERS
def test_random_workloads_cover_every_case(overlap):
    """The seeds above do exercise what they claim to (otherwise the checks prove nothing)."""
    totals = {"waiting": 0, "running": 0, "preempted": 0, "resumed_finished": 0}
    for seed in SEEDS:
        sim, aborted = run_random_workload(seed, overlap)
        for k, v in list(sim.stats.items()) + list(aborted.items()):
            totals[k] = totals.get(k, 0) + v
        totals["resumed_finished"] += sum(
            1 for rid in sim.preempted_ever if sim.finished[rid].status != RequestStatus.FINISHED_ABORTED)
    # Only the overlapped order has samples in flight at scheduling time (Sim.stats says which
    # case each counter counts).
    in_flight = {"computed_in_flight", "held_back_last", "preempted_in_flight",
                 "aborted_in_flight", "dropped_after_stop", "empty_steps"}
    assert all(v > 0 for k, v in totals.items() if overlap or k not in in_flight), totals
    assert overlap or not any(totals[k] for k in in_flight), totals


# --------------------------------------------------------------------------------------- directed
@ORDERS
def test_chunked_prefill_splits_a_prompt_longer_than_the_budget(overlap):
    sim = Sim(num_blocks=20, block_size=4, max_num_seqs=4, max_num_batched_tokens=16, overlap=overlap)
    req = make_request("long", list(range(1, 51)), 3, stop_ids=())
    sim.add(req)
    outs = [sim.step() for _ in range(6 + overlap)]
    # Catches: a prompt longer than the budget scheduled whole, or chunks not filling the
    # budget: 50 tokens under a 16-token budget go 16 + 16 + 16 + 2, then one decode per step.
    # Overlapped, the last step schedules nothing: the last sample allowed is in flight.
    assert [o.num_scheduled_tokens.get("long") for o in outs] == [16, 16, 16, 2, 1, 1] + [None] * overlap
    # Catches: sampling from a partial prefill chunk (an output token after 16 prompt tokens).
    assert [len(o.new_requests) for o in outs] == [1] + [0] * (5 + overlap)
    assert [c.new_token_ids for o in outs[1:4] for c in o.cached_requests] == [[], [], []]
    # Each sample is sent once; overlapped, one step later (the first decode computes it first).
    assert [len(o.cached_requests[0].new_token_ids) for o in outs[4:6]] == [1 - overlap, 1]
    assert req.status == RequestStatus.FINISHED_LENGTH and len(req.output_token_ids) == 3
    sim.check_drained()


@ORDERS
def test_preemption_takes_the_newest_running_request_and_it_resumes_first(overlap):
    # 6 usable blocks of 4 tokens; each request needs 5 blocks at most, so each fits alone.
    sim = Sim(num_blocks=7, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, overlap=overlap)
    a, b, c = (make_request(rid, [i + 1] * 7, 10, stop_ids=(), arrival=i) for i, rid in enumerate("abc"))
    for r in (a, b, c):
        sim.add(r)
    sim.step()                                    # all three admitted: 2 blocks each
    assert sim.sched.running == [a, b, c] and sim.kv.num_free_blocks == 0
    d = make_request("d", [9, 9], 2, stop_ids=(), arrival=3)
    sim.add(d)                                    # arrives after c
    sim.step()                                    # 8 tokens each: still 2 blocks each
    out = sim.step()                              # a needs a 3rd block: pool empty
    # Catches: the wrong victim (documented: the newest running request, c) or a victim left
    # running; a and b (older) keep running.
    assert out.preempted_request_ids == ["c"]
    assert sim.sched.running == [a, b] and c.status == RequestStatus.PREEMPTED
    # Catches: a victim that keeps its blocks or its computed count (it is recomputed).
    assert sim.kv.num_request_blocks("c") == 0 and c.num_computed_tokens == 0
    # Catches: the victim queued behind d (documented: back to the FRONT of the queue).
    assert list(sim.sched.waiting) == [c, d]
    n_out = len(c.output_token_ids)
    # Overlapped, c's second sample was in flight when it was preempted: it is back now.
    assert n_out == 2 and sim.stats["preempted_in_flight"] == overlap
    order = []
    while sim.has_work():
        out = sim.step()
        order += [n.request_id for n in out.new_requests]
        if "c" in [n.request_id for n in out.new_requests]:
            new_c = next(n for n in out.new_requests if n.request_id == "c")
            # Catches: a resumed request losing its outputs (the worker must recompute them).
            assert new_c.output_token_ids == c.output_token_ids[:n_out]
    # Catches: d admitted before the earlier-arrived, preempted c.
    assert order.index("c") < order.index("d")
    # Sim._on_finished already checked c's outputs equal the no-preemption reference.
    assert len(c.output_token_ids) == 10 and c.status == RequestStatus.FINISHED_LENGTH
    assert sim.sched.num_preemptions >= 1 and c.num_preemptions >= 1
    sim.check_drained()


@ORDERS
def test_fcfs_a_blocked_head_of_line_request_is_not_overtaken(overlap):
    sim = Sim(num_blocks=7, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, overlap=overlap)
    a = make_request("a", [1] * 12, 8, stop_ids=(), arrival=0)   # 3 blocks now, 5 at most
    big = make_request("big", [2] * 16, 4, stop_ids=(), arrival=1)  # 4 blocks for its prompt
    small = make_request("small", [3] * 2, 2, stop_ids=(), arrival=2)  # 1 block would fit
    for r in (a, big, small):
        sim.add(r)
    out = sim.step()
    # Catches: skipping the head of the queue to admit a later request that fits (not FCFS).
    assert [n.request_id for n in out.new_requests] == ["a"]
    assert list(sim.sched.waiting) == [big, small]
    admitted = []
    while sim.has_work():
        admitted += [n.request_id for n in sim.step().new_requests]
    assert admitted == ["big", "small"]
    sim.check_drained()


@ORDERS
def test_max_num_seqs_caps_the_running_requests(overlap):
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=2, max_num_batched_tokens=64, overlap=overlap)
    reqs = [make_request(f"r{i}", [i + 1] * 5, 3 + i, stop_ids=(), arrival=i) for i in range(5)]
    for r in reqs:
        sim.add(r)
    most = 0
    while sim.has_work():
        sim.step()   # Sim checks len(running) <= 2 after every step
        most = max(most, sim.sched.num_running)
    # Catches: a cap that is off by one downwards (never two at a time).
    assert most == 2
    sim.check_drained()


@ORDERS
def test_aborts_of_waiting_running_and_preempted_requests_free_everything(overlap):
    sim = Sim(num_blocks=7, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, overlap=overlap)
    a, b, c = (make_request(rid, [i + 1] * 7, 10, stop_ids=(), arrival=i) for i, rid in enumerate("abc"))
    for r in (a, b, c):
        sim.add(r)
    for _ in range(3):
        out = sim.step()
    assert out.preempted_request_ids == ["c"]
    never = make_request("never", [5] * 3, 2, stop_ids=(), arrival=9)
    sim.add(never)
    sim.abort("c")       # preempted: holds no blocks, the worker already dropped it
    sim.abort("never")   # waiting, never scheduled
    sim.abort("a")       # running (overlapped: its sample in flight, dropped when back)
    assert sim.stats["aborted_in_flight"] == overlap
    # Catches: an abort of an unknown or already finished id doing anything.
    assert sim.sched.finish_request("a", RequestStatus.FINISHED_ABORTED) is None
    assert sim.sched.finish_request("nobody", RequestStatus.FINISHED_ABORTED) is None
    out = sim.step()
    # Catches: the workers not told about a running request's abort (state leak), or told
    # about requests they never had / already dropped (the Sim also asserts this).
    assert out.finished_request_ids == ["a"]
    sim.run_to_end()
    assert b.status == RequestStatus.FINISHED_LENGTH


@ORDERS
def test_abort_in_the_middle_of_a_chunked_prefill_frees_its_blocks(overlap):
    sim = Sim(num_blocks=20, block_size=4, max_num_seqs=4, max_num_batched_tokens=8, overlap=overlap)
    r = make_request("r", list(range(1, 41)), 4, stop_ids=())
    sim.add(r)
    sim.step()
    sim.step()
    assert r.num_computed_tokens == 16 and sim.kv.num_used_blocks == 4
    sim.abort("r")
    # Catches: blocks of a partially prefilled request not returned.
    assert sim.kv.num_used_blocks == 0
    sim.run_to_end()


def test_a_request_that_can_never_fit_the_cache_is_rejected():
    sim = Sim(num_blocks=5, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)  # 16 tokens
    # 12 prompt + 5 new tokens = 17 > 16: it could never finish in this cache.
    too_big = make_request("too_big", [1] * 12, 5)
    # Catches: accepting it (it would livelock preempting itself) or a vague error.
    with pytest.raises(ValueError, match=r"max_tokens: the request needs up to 5 KV blocks .* only 4"):
        sim.sched.add_request(too_big)
    with pytest.raises(ValueError, match="KV blocks"):
        sim.sched.add_request(make_request("prompt_too_big", [1] * 17, 1))
    # Catches: a rejected request left half-registered (its id taken, or queued).
    assert not sim.sched.has_unfinished_requests() and not sim.sched.waiting
    assert sim.sched.schedule().is_empty
    # Catches: an off-by-one that rejects the largest request that does fit (16 tokens,
    # of which the last sample is never computed); it runs to the end.
    sim.add(make_request("too_big", [1] * 12, 4, stop_ids=()))
    sim.run_to_end()
    # Catches: a duplicate id accepted (two requests would share one worker state).
    sim.add(make_request("x", [1], 1))
    with pytest.raises(ValueError, match="already in use"):
        sim.sched.add_request(make_request("x", [2], 1))
    sim.run_to_end()


def test_a_prompt_longer_than_max_model_len_is_rejected_by_the_scheduler():
    sim = Sim(num_blocks=17, block_size=4, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=32)
    # Catches sizing the need by min(prompt + max_tokens, max_model_len): such a request was
    # accepted, preempted itself and never ran.
    req = make_request("long", list(range(1, 101)), 1)  # 100 tokens; the cache holds 64
    with pytest.raises(ValueError, match="max_model_len"):
        sim.sched.add_request(req)
    assert not sim.sched.has_unfinished_requests()
    # A prompt of exactly max_model_len has no room for a new token either.
    with pytest.raises(ValueError, match="max_model_len"):
        sim.sched.add_request(make_request("full", list(range(1, 33)), 1))


def test_overlap_a_stop_in_flight_the_extra_sample_is_dropped_and_the_id_can_be_reused():
    # A prompt whose first three outputs differ, so that the third alone can be the stop id.
    prompt = next([k, k] for k in range(1, VOCAB) if len(set(reference_output([k, k], 3, (), 99)[0])) == 3)
    expected = reference_output(prompt, 3, (), 99)[0]
    sim = Sim(num_blocks=20, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, overlap=True)
    req = make_request("a", prompt, 10, stop_ids={expected[2]})
    sim.add(req)
    for _ in range(3):  # prefill, then two decodes; the third draws the stop, not known yet
        sim.step()
    assert req.output_token_ids == expected[:2] and req.num_output_placeholders == 1
    out = sim.step()
    # Catches: holding a request back while its sample in flight is not its last (the overlap
    # lost); it computes the stop token's position, then the stop comes back and ends it.
    assert out.num_scheduled_tokens == {"a": 1}
    assert req.status == RequestStatus.FINISHED_STOPPED and req.output_token_ids == expected
    # Its sample from that step is still in flight when a client takes the id again.
    again = make_request("a", [7, 7, 7], 4, stop_ids=())
    sim.add(again)
    out = sim.step()
    # Catches: the workers not told that the old "a" ended before the new one arrives.
    assert out.finished_request_ids == ["a"] and [n.request_id for n in out.new_requests] == ["a"]
    # Catches: the ended request's sample handed to the new request (a token it never drew,
    # and a placeholder taken back that it does not have).
    assert again.output_token_ids == [] and again.num_output_placeholders == 1
    sim.run_to_end()  # Sim._on_finished checks the new "a" ends with its own reference output
    assert sim.stats["dropped_after_stop"] == 1
