"""`DataParallelRouter`: which engine-core replica a request goes to (`--dp N`).

Owns the routing decision and what it rests on: each replica's load, a bounded index of the
prompt blocks each replica served recently (`PrefixIndex`), and which replicas are still
alive. It does no I/O: the front end (`AsyncLLM`) tells it about stats, routed and finished
requests and dead replicas, and asks it where the next request goes.

Load of a replica = max(waiting + running in its latest scheduler stats, completions this
front end has sent it and not yet seen finish). The stats are exact but one step old and
include other front ends' requests; the front end's own count moves the moment a request is
sent, so a burst of requests does not all land on the replica that looked idle a step ago.

Policies:
  * cache_aware (default; SGLang's cache-aware router, on block hashes instead of a radix tree
    of text): if the loads are imbalanced (max - min > `balance_abs_threshold` and max >
    `balance_rel_threshold` x min) the least loaded replica; otherwise the replica whose index
    holds the longest prefix of the prompt, if that prefix covers more than `cache_threshold`
    of the prompt; otherwise the least loaded (ties: the one whose index holds fewest blocks,
    i.e. most room, then the lowest index). The chosen replica's index then records the
    prompt's blocks.
  * round_robin: the live replicas in turn.
  * least_loaded: the least loaded live replica (ties: the lowest index).
A dead replica is removed at once (`remove`): it is never chosen again and its index is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from qwenserve.frontend.prefix_index import PrefixIndex

ROUTING_POLICIES = ("cache_aware", "round_robin", "least_loaded")
# SGLang router's defaults (sgl-router: --cache-threshold, --balance-abs-threshold,
# --balance-rel-threshold).
CACHE_THRESHOLD = 0.3
BALANCE_ABS_THRESHOLD = 64
BALANCE_REL_THRESHOLD = 1.5


class NoReplicaAlive(Exception):
    """Every replica has died."""


@dataclass
class ReplicaState:
    index: int
    prefixes: PrefixIndex
    alive: bool = True
    reported_load: int = 0      # num_waiting + num_running of its latest stats
    in_flight: int = 0          # completions sent from here whose finish has not come back
    num_routed: int = 0         # requests routed to it, since start

    @property
    def load(self) -> int:
        return max(self.reported_load, self.in_flight)


class DataParallelRouter:
    def __init__(self, num_replicas: int, policy: str = "cache_aware", index_capacity: int = 65536,
                 cache_threshold: float = CACHE_THRESHOLD, balance_abs_threshold: int = BALANCE_ABS_THRESHOLD,
                 balance_rel_threshold: float = BALANCE_REL_THRESHOLD):
        if policy not in ROUTING_POLICIES:
            raise ValueError(f"data_parallel_routing: must be one of {', '.join(ROUTING_POLICIES)}, got {policy!r}")
        if num_replicas < 1:
            raise ValueError(f"num_replicas: must be at least 1, got {num_replicas}")
        self.policy = policy
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.replicas = [ReplicaState(i, PrefixIndex(index_capacity)) for i in range(num_replicas)]
        self._next = 0  # round_robin's cursor
        # Counters of cache_aware's decisions, for tests and logs.
        self.decisions = {"imbalanced": 0, "prefix": 0, "least_loaded": 0}

    # ------------------------------------------------------------------ what the front end reports
    @property
    def live(self) -> list[ReplicaState]:
        return [r for r in self.replicas if r.alive]

    @property
    def wants_block_hashes(self) -> bool:
        """Whether `choose` looks at block hashes (else the front end need not compute them)."""
        return self.policy == "cache_aware" and len(self.live) > 1

    def update_stats(self, replica: int, num_waiting: int, num_running: int) -> None:
        self.replicas[replica].reported_load = num_waiting + num_running

    def on_routed(self, replica: int, num_completions: int, block_hashes: Sequence[bytes] = ()) -> None:
        state = self.replicas[replica]
        state.in_flight += num_completions
        state.num_routed += 1
        if block_hashes and self.policy == "cache_aware":
            state.prefixes.insert(block_hashes)

    def on_finished(self, replica: int, num_completions: int) -> None:
        state = self.replicas[replica]
        state.in_flight = max(0, state.in_flight - num_completions)

    def remove(self, replica: int) -> None:
        """A dead replica: never chosen again."""
        state = self.replicas[replica]
        state.alive = False
        state.prefixes.clear()
        state.reported_load = state.in_flight = 0

    # ------------------------------------------------------------------ the decision
    def choose(self, block_hashes: Sequence[bytes] = (), num_prompt_blocks: Optional[int] = None) -> int:
        """The replica for a request whose prompt's full blocks hash to `block_hashes`
        (`num_prompt_blocks`: how many blocks the prompt spans, partial last block included;
        default len(block_hashes)). Raises NoReplicaAlive when none is left."""
        live = self.live
        if not live:
            raise NoReplicaAlive("every engine-core replica has died")
        if len(live) == 1:
            return live[0].index
        if self.policy == "round_robin":
            return self._round_robin(live)
        if self.policy == "least_loaded":
            return self._least_loaded(live)
        return self._cache_aware(live, block_hashes, num_prompt_blocks)

    def _round_robin(self, live: list[ReplicaState]) -> int:
        after = [r for r in live if r.index >= self._next] or live
        chosen = after[0].index
        self._next = chosen + 1
        return chosen

    @staticmethod
    def _least_loaded(live: list[ReplicaState]) -> int:
        return min(live, key=lambda r: (r.load, len(r.prefixes), r.index)).index

    def _cache_aware(self, live: list[ReplicaState], block_hashes: Sequence[bytes],
                     num_prompt_blocks: Optional[int]) -> int:
        loads = [r.load for r in live]
        high, low = max(loads), min(loads)
        if high - low > self.balance_abs_threshold and high > low * self.balance_rel_threshold:
            self.decisions["imbalanced"] += 1
            return self._least_loaded(live)
        total = max(num_prompt_blocks or len(block_hashes), 1)
        if block_hashes:
            # The longest match; among equal matches, the less loaded.
            best = max(live, key=lambda r: (r.prefixes.match(block_hashes), -r.load, -r.index))
            matched = best.prefixes.match(block_hashes)
            if matched and matched / total > self.cache_threshold:
                self.decisions["prefix"] += 1
                return best.index
        self.decisions["least_loaded"] += 1
        return self._least_loaded(live)
