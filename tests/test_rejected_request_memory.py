"""A request the front end rejects (e.g. too many tokens for max_model_len) is freed when its
call ends, not at some later garbage collection: nothing on the way from the input processor's
worker thread to the caller (the thread's future, the generate iterator, the exception's
traceback) may keep the request's token ids in a reference cycle."""
import asyncio
import gc
import weakref

import pytest

from qwenserve.config import EngineConfig
from qwenserve.frontend.async_llm import AsyncLLM
from qwenserve.sampling_params import SamplingParams


class Tokens:
    """Stands in for the token ids of a long prompt (a list cannot be weakly referenced)."""


def test_a_rejected_requests_tokens_are_freed_without_a_garbage_collection():
    refs = []

    def rejecting_process(*args, **kwargs):
        ids = Tokens()  # a local of this frame, as the input processor holds its ids
        refs.append(weakref.ref(ids))
        raise ValueError("prompt: 16001 tokens leave no room to generate within max_model_len (256)")

    async def run():
        llm = await AsyncLLM(EngineConfig(device="cpu", max_model_len=256, kv_cache_memory=32 * 2 ** 20)).start("WARNING")
        llm.input_processor.process = rejecting_process
        gc.disable()
        try:
            for i in range(3):
                with pytest.raises(ValueError, match="^prompt: 16001 tokens"):
                    async for _ in llm.generate(f"r{i}", params=SamplingParams(max_tokens=1), prompt="long"):
                        pass
            await asyncio.sleep(0.1)  # the worker thread leaves its call
            assert [ref() for ref in refs] == [None] * 3
        finally:
            gc.enable()
            await llm.close()

    asyncio.run(run())
