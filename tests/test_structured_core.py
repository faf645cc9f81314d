"""Structured requests and the engine-core process (`AsyncLLM`, the servers' engine client, on the
closer-preferring tiny model): a request's grammar is compiled again in the core, when its
message is decoded on the core's input thread. Checked here: that compile does not stall the
busy loop (another stream keeps getting tokens while a slow schema compiles), and a request
whose grammar fails to compile in the core is refused with the error naming the field while
the core goes on taking requests (a failed decode used to end the input thread: a deaf core).
"""
import asyncio
import json
import time

import jsonschema
import pytest

from qwenserve import SamplingParams, StructuredOutput
from qwenserve.config import EngineConfig
from qwenserve.frontend.async_llm import AsyncLLM

from structured_model import write_closer_model

PROMPT = "Reply in JSON:"
# ~0.5-1.5 s to compile on a loaded 2-core machine (llguidance releases the GIL meanwhile),
# within the 5 s limit: long against a tiny-model step, short enough for a test. (One object
# of 1,500 optional keys compiles too, but its first key overflows llguidance's per-step
# row limit; groups of 400 stay under it.)
SLOW_SCHEMA = {"type": "object", "properties": {
    f"group_{j}": {"type": "object", "properties": {f"field_{i}": {"type": "integer"} for i in range(400)}}
    for j in range(8)}}


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engine(loop, tiny_checkpoint, tmp_path_factory):
    closer = write_closer_model(tiny_checkpoint, str(tmp_path_factory.mktemp("closer-model")))
    config = EngineConfig(model=closer, device="cpu", dtype="float32", max_model_len=512,
                          kv_cache_memory=32 * 1024 ** 2, seed=0)
    llm = loop.run_until_complete(AsyncLLM(config).start(log_level="WARNING"))
    yield llm
    loop.run_until_complete(llm.close())


async def collect(llm, request_id: str, params: SamplingParams, arrivals: list = None):
    """(text, token ids, finish reason); the arrival time of each delta appended to `arrivals`."""
    text, ids, finish = "", [], None
    async for deltas in llm.generate(request_id, params=params, prompt=PROMPT):
        if arrivals is not None:
            arrivals.append(time.monotonic())
        for delta in deltas:
            text += delta.text
            ids += delta.token_ids
            finish = delta.finish_reason or finish
    return text, ids, finish


def test_a_slow_compile_in_the_core_does_not_stall_other_streams(loop, engine):
    structured = SamplingParams(max_tokens=64, temperature=0.0, structured_output=StructuredOutput(
        json_schema=SLOW_SCHEMA))  # compiled here too, before it is sent: that is not timed
    plain = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    async def run():
        plain_arrivals, structured_arrivals = [], []
        background = asyncio.ensure_future(collect(engine, "plain", plain, plain_arrivals))
        while len(plain_arrivals) < 5:  # the loop is busy stepping
            await asyncio.sleep(0.01)
        sent = time.monotonic()
        result = await collect(engine, "slow-schema", structured, structured_arrivals)
        await background
        return sent, structured_arrivals[0], plain_arrivals, result

    sent, first, plain_arrivals, (text, _, finish) = loop.run_until_complete(run())
    assert finish == "stop"
    jsonschema.validate(json.loads(text), SLOW_SCHEMA)
    window = first - sent  # the core's compile is in here
    assert window > 0.2, f"the compile was meant to take a while in the core ({window:.3f} s)"
    during = [t for t in plain_arrivals if sent <= t <= first]
    gaps = [b - a for a, b in zip([sent] + during, during + [first])]
    assert len(during) >= 3 and max(gaps) < window / 2, (window, gaps)


def test_a_grammar_that_fails_to_compile_in_the_core_is_refused_and_the_core_goes_on(loop, engine):
    good = SamplingParams(max_tokens=48, temperature=0.0,
                          structured_output=StructuredOutput(regex=r"[0-9]{3}-[0-9]{4}"))
    process = engine.input_processor.process

    def with_a_broken_regex(*args, **kwargs):
        # What the front end passed compiles; what reaches the core does not (as when the core's
        # compile runs over its time limit): the front end's checks cannot see it.
        processed = process(*args, **kwargs)
        spec = processed.params.structured_output
        object.__setattr__(spec, "regex", "(unclosed")
        object.__setattr__(spec, "_source", "(unclosed")
        return processed

    engine.input_processor.process = with_a_broken_regex
    try:
        with pytest.raises(ValueError, match=r"^structured_output\.regex: "):
            loop.run_until_complete(asyncio.wait_for(collect(engine, "broken", good), 120))
    finally:
        engine.input_processor.process = process
    # The core still takes requests (its input thread survived) and nothing is left behind.
    again = SamplingParams(max_tokens=48, temperature=0.0,
                           structured_output=StructuredOutput(regex=r"#[0-9a-f]{6}"))
    text, _, finish = loop.run_until_complete(asyncio.wait_for(collect(engine, "after", again), 120))
    assert finish == "stop" and len(text) == 7 and text.startswith("#")
    assert engine.num_active == 0
