"""Tests of qwenserve.kvcache: the block pool, prefix hashing and KVCacheManager."""

import random
from dataclasses import dataclass

import pytest

from qwenserve.kvcache import BlockPool, KVCacheManager, hash_block_tokens
from qwenserve.kvcache import manager as manager_mod


@dataclass
class FakeRequest:
    request_id: str
    all_token_ids: list
    num_computed_tokens: int = 0
    cache_salt: object = 1

    @property
    def num_tokens(self):
        return len(self.all_token_ids)


def snapshot(kv: KVCacheManager):
    """Everything allocate_slots could change."""
    pool = kv.pool
    return (
        [(b.ref_cnt, b.block_hash) for b in pool.blocks],
        [b.block_id for b in pool.free_queue],
        dict(pool.cached_blocks),
        {rid: (list(s.blocks), list(s.hashes), s.num_tokens) for rid, s in kv._requests.items()},
    )


def run(kv, req, n, hits=()):
    """allocate_slots + the scheduler's bookkeeping (hit tokens and new tokens computed)."""
    new = kv.allocate_slots(req, n, hits)
    if new is not None:
        req.num_computed_tokens += len(hits) * kv.block_size + n
    return new


# ---------------------------------------------------------------------------------------
def test_validation():
    with pytest.raises(ValueError):
        BlockPool(1, True)
    with pytest.raises(ValueError):
        KVCacheManager(0, 16)
    kv = KVCacheManager(2, 4)
    assert kv.num_free_blocks == 1 and kv.num_used_blocks == 0 and kv.usage == 0.0


def test_hash_is_chained_and_salted():
    h0 = hash_block_tokens(None, (1, 2, 3), 1)
    assert h0 == hash_block_tokens(None, (1, 2, 3), 1)
    assert h0 != hash_block_tokens(None, (1, 2, 3), 2)
    assert h0 != hash_block_tokens(None, (1, 2, 4), 1)
    assert hash_block_tokens(h0, (5,), 1) != hash_block_tokens(None, (5,), 1)
    assert isinstance(h0, bytes) and len(h0) == 16


def test_allocation_math_at_block_boundaries():
    kv = KVCacheManager(10, 4)
    r = FakeRequest("a", list(range(20)))
    assert len(run(kv, r, 4)) == 1          # exactly one block
    assert len(run(kv, r, 1)) == 1          # 5 tokens: just past the boundary
    assert run(kv, r, 3) == []              # 8 tokens: fills block 2
    assert run(kv, r, 0) == []
    assert len(run(kv, r, 1)) == 1          # 9 tokens
    assert len(kv.get_block_ids("a")) == 3
    r2 = FakeRequest("b", list(range(100, 109)))
    assert len(run(kv, r2, 9)) == 3
    assert kv.num_used_blocks == 6 and kv.num_free_blocks == 3
    assert kv.usage == pytest.approx(6 / 9)
    assert 0 not in kv.get_block_ids("a") + kv.get_block_ids("b")


def test_none_when_short_changes_nothing():
    kv = KVCacheManager(4, 4)               # 3 usable blocks
    a = FakeRequest("a", list(range(8)))
    run(kv, a, 8)
    b = FakeRequest("b", list(range(50, 59)))
    before = snapshot(kv)
    assert kv.allocate_slots(b, 9) is None
    assert snapshot(kv) == before
    assert kv.get_block_ids("b") == []
    assert len(run(kv, b, 4)) == 1
    assert kv.allocate_slots(b, 1) is None   # pool empty now
    assert kv.num_free_blocks == 0


def test_none_counts_free_hit_blocks_against_the_pool():
    kv = KVCacheManager(4, 4)               # 3 usable
    a = FakeRequest("a", list(range(9)))
    run(kv, a, 9)                            # blocks 1,2 full and cached, 3 partial
    kv.free(a)
    b = FakeRequest("b", list(range(8)) + [77] * 8)
    hits, n = kv.get_computed_blocks(b)
    assert n == 8 and len(hits) == 2
    before = snapshot(kv)
    # 16 tokens need 4 blocks: 2 hits (both free, so taken from the pool) + 2 new > 3 free.
    assert kv.allocate_slots(b, 8, hits) is None
    assert snapshot(kv) == before
    assert kv.allocate_slots(b, 4, hits) is not None


def test_prefix_hit_shared_and_after_free():
    kv = KVCacheManager(16, 4)
    a = FakeRequest("a", list(range(10)))
    run(kv, a, 10)
    assert kv.num_cached_blocks == 2        # only full blocks are hashed
    b = FakeRequest("b", list(range(8)) + [99, 98, 97])
    hits, n = kv.get_computed_blocks(b)
    assert hits == kv.get_block_ids("a")[:2] and n == 8
    new = run(kv, b, b.num_tokens - n, hits)
    assert len(new) == 1
    assert kv.get_block_ids("b") == hits + new
    assert [kv.pool.blocks[i].ref_cnt for i in hits] == [2, 2]
    kv.free(a)
    assert [kv.pool.blocks[i].ref_cnt for i in hits] == [1, 1]
    kv.free(b)
    assert kv.num_used_blocks == 0 and kv.num_cached_blocks == 2
    c = FakeRequest("c", list(range(12)))
    hits_c, n_c = kv.get_computed_blocks(c)
    assert hits_c == hits and n_c == 8
    free_before = kv.num_free_blocks
    run(kv, c, 4, hits_c)                    # touching cached-free blocks takes them off the list
    assert kv.num_free_blocks == free_before - 3
    assert kv.num_cached_blocks == 3


def test_hits_cap_leaves_one_token_to_compute():
    kv = KVCacheManager(16, 4)
    a = FakeRequest("a", list(range(9)))
    run(kv, a, 9)
    b = FakeRequest("b", list(range(8)))     # exactly two full blocks, both cached
    hits, n = kv.get_computed_blocks(b)
    assert len(hits) == 1 and n == 4
    c = FakeRequest("c", list(range(9)))
    assert kv.get_computed_blocks(c)[1] == 8
    assert kv.get_computed_blocks(FakeRequest("d", [0]))[1] == 0
    assert kv.get_computed_blocks(FakeRequest("e", []))[1] == 0


def test_different_salt_never_shares():
    kv = KVCacheManager(16, 4)
    run(kv, FakeRequest("a", list(range(12)), cache_salt=1), 12)
    assert kv.get_computed_blocks(FakeRequest("b", list(range(12)), cache_salt=3)) == ([], 0)
    assert kv.get_computed_blocks(FakeRequest("c", list(range(12)), cache_salt=1))[1] == 8


def test_chain_stops_at_first_miss():
    kv = KVCacheManager(16, 4)
    run(kv, FakeRequest("a", list(range(12))), 12)
    other = [100, 101, 102, 103] + list(range(4, 12)) + [0]
    assert kv.get_computed_blocks(FakeRequest("b", other)) == ([], 0)


def test_lazy_lru_eviction():
    kv = KVCacheManager(5, 2)               # 4 usable blocks of 2 tokens
    a = FakeRequest("a", [1, 2, 3, 4])
    b = FakeRequest("b", [5, 6, 7, 8])
    run(kv, a, 4)
    a_ids = kv.get_block_ids("a")
    kv.free(a)
    run(kv, b, 4)
    b_ids = kv.get_block_ids("b")
    kv.free(b)
    # Nothing is evicted until a block is needed.
    assert kv.num_cached_blocks == 4 and kv.num_free_blocks == 4
    # Oldest freed first, and a request's tail before its head.
    assert [blk.block_id for blk in kv.pool.free_queue] == [a_ids[1], a_ids[0], b_ids[1], b_ids[0]]
    c = FakeRequest("c", [9, 9, 9])
    assert run(kv, c, 1) == [a_ids[1]]
    assert kv.num_cached_blocks == 3
    # a's second block was evicted (and its hash dropped): only its first block still hits.
    a2 = FakeRequest("a2", [1, 2, 3, 4, 5])
    assert kv.get_computed_blocks(a2) == ([a_ids[0]], 2)
    assert kv.pool.get_cached_block(hash_block_tokens(
        hash_block_tokens(None, (1, 2), 1), (3, 4), 1)) is None
    # b is untouched.
    assert kv.get_computed_blocks(FakeRequest("b2", [5, 6, 7, 8, 0]))[0] == b_ids


def test_stale_hit_is_rejected():
    kv = KVCacheManager(3, 2)               # 2 usable
    a = FakeRequest("a", [1, 2, 3])
    run(kv, a, 3)
    kv.free(a)
    b = FakeRequest("b", [1, 2, 3])
    hits, _ = kv.get_computed_blocks(b)
    run(kv, FakeRequest("x", [7, 7, 7, 7]), 4)   # evicts both
    with pytest.raises(ValueError):
        kv.allocate_slots(b, 1, hits)
    # Hits from an older query (not the last one) are checked by hashing again.
    kv.free("x")
    run(kv, FakeRequest("y", [1, 2, 3]), 3)
    kv.free("y")
    c = FakeRequest("c", [1, 2, 3])
    hits_c, _ = kv.get_computed_blocks(c)
    kv.get_computed_blocks(FakeRequest("d", [4, 5, 6]))
    assert len(kv.allocate_slots(c, 1, hits_c)) == 1
    assert kv.get_block_ids("c")[:1] == hits_c
    # ... and hits for a request that already holds blocks are refused.
    with pytest.raises(ValueError):
        kv.allocate_slots(c, 1, hits_c)


def test_fork_shares_only_full_blocks():
    kv = KVCacheManager(16, 4, enable_prefix_caching=False)
    p = FakeRequest("p", list(range(10)))
    run(kv, p, 10)
    shared = kv.fork("p", "c")
    assert shared == 8
    assert kv.get_block_ids("c") == kv.get_block_ids("p")[:2]
    assert [kv.pool.blocks[i].ref_cnt for i in kv.get_block_ids("p")] == [2, 2, 1]
    c = FakeRequest("c", list(range(10)), num_computed_tokens=shared)
    new = run(kv, c, 2)
    assert len(new) == 1 and new[0] not in kv.get_block_ids("p")
    kv.free("p")
    assert [kv.pool.blocks[i].ref_cnt for i in kv.get_block_ids("c")] == [1, 1, 1]
    with pytest.raises(KeyError):
        kv.fork("nope", "d")
    with pytest.raises(ValueError):
        kv.fork("c", "c")


def test_free_unknown_and_by_id():
    kv = KVCacheManager(8, 4)
    kv.free("ghost")
    kv.free(FakeRequest("ghost", [1]))
    r = FakeRequest("r", list(range(5)))
    run(kv, r, 5)
    kv.free("r")
    assert kv.num_used_blocks == 0 and kv.get_block_ids("r") == []
    kv.free("r")                             # double free of a request is a no-op too


def test_no_hashing_when_disabled(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("hashed with prefix caching off")
    monkeypatch.setattr(manager_mod, "hash_block_tokens", boom)
    kv = KVCacheManager(8, 2, enable_prefix_caching=False)
    r = FakeRequest("r", list(range(7)))
    run(kv, r, 7)
    assert kv.num_cached_blocks == 0
    assert kv.get_computed_blocks(FakeRequest("s", list(range(7)))) == ([], 0)
    assert kv.prefix_cache_stats.queries == 0


def test_stats_count_admissions_and_reset():
    kv = KVCacheManager(8, 4)
    run(kv, FakeRequest("a", list(range(12))), 12)             # admitted: 12 tokens, no hit
    b = FakeRequest("b", list(range(10)))
    hits, n_hit = kv.get_computed_blocks(b)                    # 8 of 10 hit
    # Looked up again and again while it waits (the cache is full): not counted until admitted.
    big = FakeRequest("big", [7] * 40)
    for _ in range(3):
        assert kv.get_computed_blocks(big) == ([], 0)
        assert run(kv, big, 40) is None
    assert kv.prefix_cache_stats.queries == 1
    run(kv, b, 10 - n_hit, hits)
    c = FakeRequest("c", [5] * 6)
    assert kv.get_computed_blocks(c) == ([], 0)                # miss
    run(kv, c, 6)
    run(kv, c, 0)  # a running request's later steps are not admissions
    s = kv.prefix_cache_stats
    assert (s.queries, s.hits, s.query_tokens, s.hit_tokens) == (3, 1, 28, 8)
    assert s.hit_rate == pytest.approx(8 / 28)
    kv.reset_prefix_cache()
    assert kv.num_cached_blocks == 0
    assert kv.get_computed_blocks(FakeRequest("b", list(range(10)))) == ([], 0)
    assert all(b.block_hash is None for b in kv.pool.blocks)


def test_decode_registers_blocks_as_they_fill():
    kv = KVCacheManager(16, 4)
    r = FakeRequest("r", [1, 2, 3])
    run(kv, r, 3)
    assert kv.num_cached_blocks == 0
    r.all_token_ids.append(4)                # a sampled token, computed next step
    run(kv, r, 1)
    assert kv.num_cached_blocks == 1
    assert kv.get_computed_blocks(FakeRequest("s", [1, 2, 3, 4, 5]))[1] == 4


# ---------------------------------------------------------------------------------------
# Randomized: many requests with shared prefixes, forks, frees and memory pressure, with a
# shadow of what was written into every block to check that prefix hits are content-correct.

class Shadow:
    def __init__(self, kv):
        self.kv = kv
        self.slots = {}          # block_id -> list of tokens written, by offset
        self.content = {}        # block_id -> (salt, tokens of the request up to the block's end)

    def on_new_blocks(self, ids):
        for b in ids:
            self.slots[b] = [None] * self.kv.block_size
            self.content.pop(b, None)

    def write(self, req, start, end):
        """The step computes tokens [start, end) of req into its blocks."""
        bs = self.kv.block_size
        ids = self.kv.get_block_ids(req.request_id)
        for p in range(start, end):
            b = ids[p // bs]
            # Nobody else may see a block while it is being written.
            assert self.kv.pool.blocks[b].ref_cnt == 1, "write into a shared block"
            assert self.slots[b][p % bs] is None, "slot written twice"
            self.slots[b][p % bs] = req.all_token_ids[p]
            if p % bs == bs - 1:
                self.content[b] = (req.cache_salt, tuple(req.all_token_ids[:p + 1]))

    def check_hits(self, req, hits):
        bs = self.kv.block_size
        for i, b in enumerate(hits):
            assert self.content[b] == (req.cache_salt, tuple(req.all_token_ids[:(i + 1) * bs]))


def check_invariants(kv, reqs, shadow):
    pool = kv.pool
    owners = {}
    for rid in reqs:
        ids = kv.get_block_ids(rid)
        assert len(ids) == len(set(ids)), "request owns a block twice"
        assert 0 not in ids, "null block owned"
        assert len(ids) == -(-reqs[rid].num_computed_tokens // kv.block_size)
        for b in ids:
            owners[b] = owners.get(b, 0) + 1
    assert set(kv._requests) <= set(reqs)
    for blk in pool.blocks[1:]:
        assert blk.ref_cnt == owners.get(blk.block_id, 0)
    assert pool.null_block.ref_cnt == 0 and pool.null_block not in pool.free_queue
    free_list = list(pool.free_queue)
    assert len(free_list) == kv.num_free_blocks
    assert all(b.ref_cnt == 0 for b in free_list)
    assert {b.block_id for b in free_list} == {b.block_id for b in pool.blocks[1:] if b.ref_cnt == 0}
    assert kv.num_free_blocks + kv.num_used_blocks == pool.num_blocks - 1
    assert kv.num_used_blocks == len(owners)
    for h, blk in pool.cached_blocks.items():
        assert blk.block_hash == h
        # The hash really is the chained hash of what was written into the block.
        salt, tokens = shadow.content[blk.block_id]
        bs = kv.block_size
        parent = None
        for i in range(len(tokens) // bs):
            parent = hash_block_tokens(parent, tuple(tokens[i * bs:(i + 1) * bs]), salt)
        assert parent == h
    assert sum(b.block_hash is not None for b in pool.blocks) == kv.num_cached_blocks


@pytest.mark.parametrize("seed", range(8))
def test_randomized_invariants(seed):
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4, 8])
    kv = KVCacheManager(rng.randint(6, 40), bs, enable_prefix_caching=(seed % 4 != 3))
    shadow = Shadow(kv)
    prefixes = [[rng.randrange(50) for _ in range(rng.randint(0, 5 * bs))] for _ in range(4)]
    reqs = {}            # live requests (holding blocks or waiting), by id
    next_id = 0
    num_hit_tokens = 0

    def schedule(req, n, hits=()):
        start = req.num_computed_tokens
        before = snapshot(kv)
        new = kv.allocate_slots(req, n, hits)
        if new is None:
            assert snapshot(kv) == before
            # Like the scheduler: preempt someone (free, recompute later) to make room.
            victims = [r for r in reqs.values() if kv.get_block_ids(r.request_id)]
            if victims and rng.random() < 0.7:
                victim = rng.choice(victims)
                kv.free(victim)
                victim.num_computed_tokens = 0
            return False
        shadow.on_new_blocks(new)
        req.num_computed_tokens += len(hits) * bs
        shadow.write(req, start + len(hits) * bs, req.num_computed_tokens + n)
        req.num_computed_tokens += n
        return True

    for _ in range(400):
        op = rng.random()
        running = [r for r in reqs.values() if kv.get_block_ids(r.request_id)]
        if op < 0.3 or not reqs:
            # A new request: a shared prefix, a random tail, maybe another salt.
            toks = list(rng.choice(prefixes)) + [rng.randrange(50) for _ in range(rng.randint(1, 3 * bs))]
            req = FakeRequest(f"r{next_id}", toks, cache_salt=rng.choice([1, 1, 1, 2]))
            next_id += 1
            reqs[req.request_id] = req
        elif op < 0.55:
            # Schedule a waiting (new or preempted) request, with its prefix hits.
            waiting = [r for r in reqs.values() if not kv.get_block_ids(r.request_id)]
            if not waiting:
                continue
            req = rng.choice(waiting)
            hits, n_hit = kv.get_computed_blocks(req)
            assert n_hit == len(hits) * bs and n_hit <= req.num_tokens - 1
            shadow.check_hits(req, hits)
            chunk = rng.randint(1, req.num_tokens - n_hit)
            if schedule(req, chunk, hits):  # only admissions count
                num_hit_tokens += n_hit
        elif op < 0.8 and running:
            # A running request: next prefill chunk, or decode one sampled token.
            req = rng.choice(running)
            if req.num_computed_tokens == req.num_tokens:
                req.all_token_ids.append(rng.randrange(50))
            schedule(req, rng.randint(1, req.num_tokens - req.num_computed_tokens))
        elif op < 0.87 and running:
            # n > 1: fork a fully computed request.
            parent = rng.choice(running)
            child = FakeRequest(f"r{next_id}", list(parent.all_token_ids), cache_salt=parent.cache_salt)
            next_id += 1
            child.num_computed_tokens = kv.fork(parent.request_id, child.request_id)
            assert child.num_computed_tokens == parent.num_computed_tokens // bs * bs
            reqs[child.request_id] = child
            if child.num_computed_tokens == 0:
                kv.free(child)   # nothing shared: it waits like any new request
        elif op < 0.97 and running:
            # Finish (drop) or preempt (free, recompute later) a request.
            req = rng.choice(running)
            kv.free(req)
            if rng.random() < 0.5:
                del reqs[req.request_id]
            else:
                req.num_computed_tokens = 0
        else:
            # Memory pressure: a request asking for more than may be free.
            toks = [rng.randrange(50) for _ in range(rng.randint(1, kv.num_blocks * bs))]
            req = FakeRequest(f"r{next_id}", toks)
            next_id += 1
            reqs[req.request_id] = req
            schedule(req, req.num_tokens)
        check_invariants(kv, reqs, shadow)

    for rid in list(reqs):
        kv.free(rid)
    check_invariants(kv, {}, shadow)
    assert kv.num_used_blocks == 0
    if kv.enable_prefix_caching:
        assert kv.prefix_cache_stats.hit_tokens == num_hit_tokens
