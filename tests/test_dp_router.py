"""The data-parallel router without Ray or processes: routing decisions on constructed load and
prefix states, the bounded prefix index, dead-replica removal, and the front end's block hashes
against the KV cache's own."""
import pytest

from qwenserve.frontend.dp_router import DataParallelRouter, NoReplicaAlive
from qwenserve.frontend.prefix_index import PrefixIndex
from qwenserve.kvcache import KVCacheManager, prefix_block_hashes

BS = 4


def hashes(tokens, salt=1.0):
    return prefix_block_hashes(tokens, BS, salt)


SYSTEM_A = list(range(100, 132))       # 8 blocks
SYSTEM_B = list(range(500, 532))


def prompt(system, suffix):
    return system + list(suffix)


# ---------------------------------------------------------------------- block hashes
def test_front_end_hashes_equal_the_kv_caches_and_carry_the_ntk_alpha():
    class Req:
        def __init__(self, rid, tokens, salt):
            self.request_id, self.all_token_ids, self.num_tokens = rid, tokens, len(tokens)
            self.num_computed_tokens, self.cache_salt = 0, salt

    tokens = prompt(SYSTEM_A, [7, 8, 9, 10, 11, 12])     # 9 full blocks and a partial one
    kv = KVCacheManager(num_blocks=64, block_size=BS)
    kv.allocate_slots(Req("r", tokens, 2.0), len(tokens))
    held = kv._requests["r"].hashes                   # what the cache registered
    assert held == hashes(tokens, 2.0) and len(held) == 9
    assert hashes(tokens, 1.0) != held                # another alpha, another K/V: no match
    assert hashes(tokens, 2.0)[:3] == hashes(tokens[:12], 2.0)   # chained: prefixes agree
    assert prefix_block_hashes(tokens, BS, 2.0, max_blocks=2) == held[:2]


# ---------------------------------------------------------------------- the prefix index
def test_prefix_index_matches_leading_blocks_only():
    index = PrefixIndex(capacity=100)
    a = hashes(prompt(SYSTEM_A, range(8)))
    index.insert(a)
    assert index.match(a) == len(a) == 10
    assert index.match(hashes(prompt(SYSTEM_A, range(50, 58)))) == 8  # same system prompt, other suffix
    assert index.match(hashes(prompt(SYSTEM_B, range(8)))) == 0
    assert index.match([]) == 0


def test_prefix_index_is_bounded_and_drops_a_prompts_tail_first():
    index = PrefixIndex(capacity=12)
    a, b = hashes(prompt(SYSTEM_A, range(8))), hashes(prompt(SYSTEM_B, range(8)))
    index.insert(a)
    index.insert(b)                                   # 20 blocks offered, 12 kept
    assert len(index) == 12
    assert index.match(b) == 10                       # the newest prompt whole
    assert index.match(a) == 2                        # the older one's head survives, not its tail
    index.insert(a)                                   # served again: now the newest
    assert index.match(a) == 10 and index.match(b) == 2
    with pytest.raises(ValueError, match="capacity"):
        PrefixIndex(0)


def test_a_prompt_longer_than_the_index_keeps_its_head():
    index = PrefixIndex(capacity=3)
    a = hashes(prompt(SYSTEM_A, range(8)))
    index.insert(a)
    assert index.match(a) == 3 and len(index) == 3


# ---------------------------------------------------------------------- decisions
def router(policy="cache_aware", n=2, **kwargs):
    kwargs.setdefault("balance_abs_threshold", 4)
    kwargs.setdefault("balance_rel_threshold", 1.5)
    return DataParallelRouter(n, policy, index_capacity=1000, **kwargs)


def route(r, tokens, completions=1):
    h = hashes(tokens)
    chosen = r.choose(h, -(-len(tokens) // BS))
    r.on_routed(chosen, completions, h)
    return chosen


def test_cache_aware_sends_a_shared_prefix_back_to_the_replica_that_served_it():
    r = router()
    first_a = route(r, prompt(SYSTEM_A, [1, 2, 3]))
    first_b = route(r, prompt(SYSTEM_B, [1, 2, 3]))
    assert {first_a, first_b} == {0, 1}               # new prefixes: least loaded, so spread
    # Balanced enough (loads 1 and 1): each system prompt goes home, whatever its suffix.
    for k in range(3):
        assert route(r, prompt(SYSTEM_A, [40 + k] * 5)) == first_a
        assert route(r, prompt(SYSTEM_B, [60 + k] * 5)) == first_b
    assert r.decisions["prefix"] == 6


def test_cache_aware_below_the_threshold_goes_to_the_least_loaded():
    r = router(cache_threshold=0.5)
    r.on_routed(0, 1, hashes(SYSTEM_A[:8]))           # replica 0 knows 2 blocks of A
    r.update_stats(0, num_waiting=1, num_running=2)
    # 2 of A's 8 blocks matched: 25% < 50%: the least loaded (1) rather than the match (0).
    assert r.choose(hashes(prompt(SYSTEM_A, [9] * 4)), 9) == 1
    assert r.decisions == {"imbalanced": 0, "prefix": 0, "least_loaded": 1}


def test_cache_aware_gives_way_to_load_when_imbalanced():
    r = router(balance_abs_threshold=4, balance_rel_threshold=1.5)
    r.on_routed(0, 1, hashes(SYSTEM_A))
    r.update_stats(0, num_waiting=3, num_running=3)   # load 6 against 0: 6 - 0 > 4 and 6 > 0 x 1.5
    assert r.choose(hashes(prompt(SYSTEM_A, [1])), 9) == 1
    assert r.decisions["imbalanced"] == 1
    r.update_stats(1, num_waiting=0, num_running=3)   # 6 against 3: 3 is not > 4
    assert r.choose(hashes(prompt(SYSTEM_A, [1])), 9) == 0
    r.update_stats(0, num_waiting=3, num_running=6)   # 9 against 3: both thresholds crossed
    assert r.choose(hashes(prompt(SYSTEM_A, [1])), 9) == 1
    r.balance_rel_threshold = 3.0                     # 9 is not > 3 x 3.0: the prefix wins again
    assert r.choose(hashes(prompt(SYSTEM_A, [1])), 9) == 0
    assert r.decisions == {"imbalanced": 2, "prefix": 2, "least_loaded": 0}


def test_the_front_ends_own_count_counts_before_stats_arrive():
    r = router("least_loaded")
    assert [route(r, [k] * 8) for k in range(4)] == [0, 1, 0, 1]   # no stats yet: in-flight decides
    r.on_finished(1, 2)
    assert route(r, [9] * 8) == 1
    r.update_stats(1, num_waiting=5, num_running=0)   # other front ends' requests count too
    assert route(r, [10] * 8) == 0


def test_round_robin_cycles_over_live_replicas():
    r = router("round_robin", n=3)
    assert [r.choose() for _ in range(4)] == [0, 1, 2, 0]
    r.remove(1)
    assert [r.choose() for _ in range(4)] == [2, 0, 2, 0]


def test_a_dead_replica_leaves_routing_and_its_index_is_dropped():
    r = router(n=2)
    r.on_routed(1, 1, hashes(SYSTEM_A))
    assert r.choose(hashes(prompt(SYSTEM_A, [1])), 9) == 1
    r.remove(1)
    assert len(r.replicas[1].prefixes) == 0
    for policy_router in (r, router("least_loaded"), router("round_robin")):
        policy_router.remove(1)
        assert {policy_router.choose(hashes(prompt(SYSTEM_A, [k])), 9) for k in range(5)} == {0}
    assert not r.wants_block_hashes                   # one replica left: nothing to choose
    r.remove(0)
    with pytest.raises(NoReplicaAlive):
        r.choose()


def test_a_bad_policy_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match="data_parallel_routing"):
        DataParallelRouter(2, "random")


def test_one_engine_core_needs_no_ray():
    """dp = 1 (and tp = 1) never imports Ray: the server, its front end and the core process."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, qwenserve.server.app, qwenserve.frontend.async_llm, qwenserve.engine_core.process; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False", out.stderr
