"""One front end over several engine cores, without Ray: `AsyncLLM` over two local core
processes (the launchers Ray replicas replace at `--dp N`). Greedy tokens equal the offline
engine's whichever core serves them, a shared prefix goes back to the core that cached it, and a
core killed under load fails only its own requests, leaves routing at once and leaves the other
serving. Ray replicas themselves: tests/test_data_parallel_server.py."""
import asyncio
import os
import signal
import time

import pytest

from qwenserve.config import EngineConfig
from qwenserve.engine_core.client import CoreProcess
from qwenserve.frontend.async_llm import AsyncLLM
from qwenserve.frontend.engine_client import EngineUnavailable
from qwenserve.model.checkpoint import builtin_model_dir
from qwenserve.sampling_params import SamplingParams

CONFIG = dict(device="cpu", dtype="float32", max_model_len=256, kv_cache_memory=16 * 1024 ** 2, seed=0)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = ["The capital of France is", "1 2 3 4 5", "蒙古国的首都是", "Once upon a time", "a b c", "Hello"]
SHARED = list(range(1000, 1064))  # 4 blocks of 16


@pytest.fixture(scope="module")
def offline():
    from qwenserve import LLM

    llm = LLM(**CONFIG)
    try:
        texts = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        shared = [o.outputs[0].token_ids for o in llm.generate(
            prompt_token_ids=[SHARED + [k] for k in range(3)], sampling_params=GREEDY, use_tqdm=False)]
        return texts, shared
    finally:
        llm.shutdown()


async def two_cores(routing="cache_aware") -> AsyncLLM:
    core = EngineConfig(**CONFIG)
    launchers = [CoreProcess(core, builtin_model_dir(), "WARNING") for _ in range(2)]
    config = EngineConfig(**CONFIG, data_parallel_size=2, data_parallel_routing=routing)
    return await AsyncLLM(config, core_launchers=launchers).start("WARNING")


async def tokens(llm, request_id, **inputs):
    out = []
    async for deltas in llm.generate(request_id, params=inputs.pop("params", GREEDY), **inputs):
        for delta in deltas:
            out += delta.token_ids
    return out


def test_two_cores_give_the_offline_tokens_and_a_shared_prefix_goes_home(offline):
    texts, shared = offline

    async def run():
        llm = await two_cores()
        try:
            assert llm.info.data_parallel_size == 2
            got = await asyncio.gather(*[tokens(llm, f"p{i}", prompt=p) for i, p in enumerate(PROMPTS)])
            assert got == texts
            routed = [r["num_routed_requests"] for r in llm.replica_stats()]
            assert sorted(routed) == [3, 3], routed            # concurrent, unrelated: spread by load
            # A prompt sharing 4 full blocks with one served before goes to the same core, and hits.
            first = await tokens(llm, "s0", prompt_token_ids=SHARED + [0])
            before = llm.replica_stats()
            home = next(i for i in range(2) if before[i]["num_routed_requests"] > routed[i])
            rest = [await tokens(llm, f"s{k}", prompt_token_ids=SHARED + [k]) for k in (1, 2)]
            assert [first] + rest == shared
            after = llm.replica_stats()
            assert after[home]["num_routed_requests"] == routed[home] + 3
            assert after[home]["prefix_cache_hit_tokens"] - before[home]["prefix_cache_hit_tokens"] == 2 * 64
            total = llm.stats()
            assert total["num_total_blocks"] == sum(r["num_total_blocks"] for r in after) > 0
            assert total["prefix_cache_hit_tokens"] == sum(r["prefix_cache_hit_tokens"] for r in after)
            # A request's n completions go to one core together: one routed request there, and
            # both completions looked up in that core's cache (the other's untouched).
            two = SamplingParams(n=2, max_tokens=4, temperature=0.0, ignore_eos=True)
            assert len(await tokens(llm, "n2", prompt_token_ids=list(range(300, 340)), params=two)) == 8
            final = llm.replica_stats()
            moved = [(f["num_routed_requests"] - a["num_routed_requests"],
                      f["prefix_cache_query_tokens"] - a["prefix_cache_query_tokens"]) for f, a in zip(final, after)]
            assert sorted(moved) == [(0, 0), (1, 2 * 40)], moved
        finally:
            await llm.close()

    asyncio.run(run())


def test_a_core_killed_under_load_fails_only_its_requests_and_leaves_routing(offline):
    texts, _ = offline
    long = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)

    async def run():
        llm = await two_cores("round_robin")
        failures = []
        llm.on_failure(failures.append)
        try:
            streams = [llm.generate(f"long{i}", params=long, prompt=PROMPTS[i]) for i in range(4)]
            for stream in streams:  # every request has its first token: both cores are busy
                await stream.__anext__()
            victim = 1
            on_victim = [i for i in range(4) if llm._replica_of[f"long{i}"] == victim]
            assert on_victim == [1, 3]                      # round robin
            os.kill(llm.core_clients[victim].core_process.pid, signal.SIGKILL)
            killed = time.monotonic()

            async def finish(stream):
                n = 1
                try:
                    async for deltas in stream:
                        n += sum(len(d.token_ids) for d in deltas)
                except EngineUnavailable as e:
                    return e, time.monotonic() - killed
                return n, None

            results = await asyncio.gather(*(finish(s) for s in streams))
            for i, (outcome, took) in enumerate(results):
                if i in on_victim:
                    assert isinstance(outcome, EngineUnavailable) and "exited unexpectedly" in str(outcome)
                    assert took < 5
                else:
                    assert outcome == 100                   # the other core finished its requests
            assert not llm.router.replicas[victim].alive and llm.dead_reason is None and not failures
            # New requests all go to the survivor and are served right.
            assert [await tokens(llm, f"after{i}", prompt=p) for i, p in enumerate(PROMPTS[:3])] == texts[:3]
            stats = llm.replica_stats()
            assert stats[victim]["alive"] is False and stats[victim]["num_running"] == 0
            assert stats[0]["num_routed_requests"] == 2 + 3
            # The last core dying is the engine dying.
            os.kill(llm.core_clients[0].core_process.pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while llm.dead_reason is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert llm.dead_reason is not None and failures
            with pytest.raises(EngineUnavailable):
                await tokens(llm, "later", prompt="hi")
        finally:
            await llm.close()

    asyncio.run(run())
