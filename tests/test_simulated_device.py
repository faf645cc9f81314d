"""The simulated device of the benchmarks (`benchmarks/simulated_device.py`) and its plug-in hook.

The step-time model against hand-computed values; the stream's semantics (a launch returns at
once, a readback waits until the modelled completion, launches queue, busy time inside a
window) on wall-clock times with 50 ms of tolerance for a loaded machine, against work of
0.1-0.2 s, and busy times exactly from the recorded intervals; the stats
file against the stream it copies; the engine through `EngineConfig.executor_plugin` (real
scheduler and runner, simulated forward and sampler); `benchmarks/run.py --simulate-device`
offline and serve end to end; and the plug-in's validation errors.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks/ is not installed with the package

from benchmarks import simulated_device as sim  # noqa: E402
from cli_run import run_cli  # noqa: E402
from qwenserve import LLM, EngineConfig, SamplingParams  # noqa: E402

PLUGIN = "benchmarks.simulated_device:h100_7b_executor"
SLACK_S = 0.05  # scheduling noise allowed on a loaded 2-core machine (the work lasts 0.1-0.2 s)


# ---------------------------------------------------------------- the device model
def test_step_time_by_hand():
    # Batch-1 decode, nothing in context: the weights, 14.2e9 B / 2.55e12 B/s = 5.568627 ms.
    assert sim.step_time_s(1, 0) == pytest.approx(5.568627e-3, rel=1e-6)
    # + 384 context tokens x 0.52e6 B / 2.5e12 B/s = 384 x 0.208 us = 79.872 us.
    assert sim.step_time_s(1, 384) == pytest.approx(5.648499e-3, rel=1e-6)
    # 216 tokens x 2 x 7.7e9 FLOP / 600e12 FLOP/s = 5.544 ms < 5.5686 ms: still weight-bound;
    # 217 tokens: 5.569667 ms, FLOP-bound.
    assert sim.step_time_s(216, 0) == pytest.approx(5.568627e-3, rel=1e-6)
    assert sim.step_time_s(217, 0) == pytest.approx(5.569667e-3, rel=1e-6)
    # A full 8192-token prefill step: 210.261333 ms of linears + 8192 x 0.208 us = 1.703936 ms.
    assert sim.step_time_s(8192, 8192) == pytest.approx(0.211965269, rel=1e-6)
    # 256 decoding sequences of 384 tokens: 6.570667 ms + 98304 x 0.208 us = 20.447232 ms.
    assert sim.step_time_s(256, 256 * 384) == pytest.approx(27.017899e-3, rel=1e-6)


def test_kv_capacity_is_an_h100_80gb_with_qwen_7b():
    # 0.9 x 80 GB - 15.4 GB of weights - 2 GB reserve = 54.6 GB; / 0.52 MB per token.
    assert sim.H100_7B.kv_cache_tokens == 105_000


# ---------------------------------------------------------------- the stream
def test_launch_returns_at_once_and_readback_waits_for_completion():
    stream = sim.SimulatedStream()
    before = time.monotonic()
    done_at = stream.launch(0.2)
    assert time.monotonic() - before < SLACK_S  # the launch did not wait for the work
    assert done_at == pytest.approx(before + 0.2, abs=SLACK_S)
    assert stream.record_event() == done_at
    stream.synchronize()
    after = time.monotonic()
    assert done_at <= after < done_at + SLACK_S
    assert stream.busy_s == pytest.approx(0.2)


def test_back_to_back_launches_queue_and_idle_gaps_are_not_busy():
    stream = sim.SimulatedStream()
    t0 = time.monotonic()
    first = stream.launch(0.1)
    second = stream.launch(0.1)  # queued behind the first: starts when it ends
    assert second == pytest.approx(first + 0.1)
    stream.wait_event(first)
    assert time.monotonic() < second  # waiting for an earlier event does not wait for later work
    stream.synchronize()
    time.sleep(0.05)  # the device idles
    before_third = time.monotonic()
    third = stream.launch(0.01)
    assert third - 0.01 >= before_third  # starts when launched, not queued at the idle stream's last end
    stream.synchronize()
    t1 = time.monotonic()
    assert stream.busy_between(t0, t1) == pytest.approx(0.21)
    assert stream.busy_between(t0, first) == pytest.approx(0.1)
    assert stream.busy_between(first - 0.01, first + 0.01) == pytest.approx(0.02)
    assert stream.busy_between(second + 0.001, second + 0.04) == pytest.approx(0.0, abs=1e-9)


def test_busy_within_a_window():
    starts, ends = np.array([0.0, 2.0, 5.0]), np.array([1.0, 3.0, 6.0])
    assert sim.busy_within(starts, ends, 0.5, 2.5) == pytest.approx(1.0)
    assert sim.busy_within(starts, ends, -1.0, 10.0) == pytest.approx(3.0)
    assert sim.busy_within(starts, ends, 3.5, 4.5) == 0.0


def test_stats_file_carries_the_streams_intervals(tmp_path):
    path = str(tmp_path / "device.stats")
    stream = sim.SimulatedStream()
    writer = sim.StatsFileWriter(path, stream, period_s=0.01)
    t0 = time.monotonic()
    for seconds in (0.004, 0.002, 0.003):
        stream.launch(seconds)
    stream.synchronize()
    time.sleep(0.005)
    stream.launch(0.001)
    stream.synchronize()
    t1 = time.monotonic()
    starts, ends = sim.read_stats_file(path, covering=t1, timeout_s=5.0)  # waits for the thread's next write
    assert len(starts) == 4
    assert sim.busy_within(starts, ends, t0, t1) == pytest.approx(stream.busy_between(t0, t1))
    assert sim.busy_within(starts, ends, t0, t1) == pytest.approx(0.010)
    writer.close()
    with pytest.raises(TimeoutError, match="no device stats"):  # nothing is written after close
        sim.read_stats_file(path, covering=time.monotonic() + 1.0, timeout_s=0.1)


def test_a_data_parallel_replica_writes_a_stats_file_of_its_own(tmp_path, monkeypatch, tiny_checkpoint):
    """Each replica of `--dp N` simulates its own device: QWENSERVE_DP_RANK picks its file."""
    path = str(tmp_path / "device.stats")
    monkeypatch.setenv(sim.STATS_ENV, path)
    monkeypatch.setenv(sim.DP_RANK_ENV, "1")
    executor = sim.h100_7b_executor(EngineConfig(num_kv_blocks=8), tiny_checkpoint)
    executor.stream.launch(0.002)
    executor.stream.synchronize()
    done = time.monotonic()
    executor.shutdown()  # writes what is left
    starts, ends = sim.read_stats_file(sim.stats_file_path(path, 1), covering=done, timeout_s=1.0)
    assert (ends - starts).sum() == pytest.approx(0.002)
    assert not os.path.exists(path)


# ---------------------------------------------------------------- the engine glue
def test_engine_on_the_simulated_device_produces_ordinary_seeded_tokens():
    def run(seed):
        llm = LLM(executor_plugin=PLUGIN, seed=seed)
        executor = llm.engine.executor
        assert isinstance(executor, sim.SimulatedExecutor)
        assert executor.num_blocks == 105_000 // 16
        prompts = [[100 + i] * (20 + 7 * i) for i in range(5)]
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=9, ignore_eos=True),
                            use_tqdm=False)
        tokens = [o.outputs[0].token_ids for o in outs]
        # One prefill step (170 tokens), then 8 decode steps of 5 tokens over 170 + 5k context
        # tokens; each step's modelled time is queued on the stream.
        assert executor.stream.busy_s == pytest.approx(
            sim.step_time_s(170, 170) + sum(sim.step_time_s(5, 170 + 5 * k) for k in range(1, 9)))
        llm.shutdown()
        return tokens

    tokens = run(seed=3)
    assert all(len(t) == 9 for t in tokens)
    assert all(0 <= t < 151643 for row in tokens for t in row)  # never a special token
    assert run(seed=3) == tokens
    assert run(seed=4) != tokens


def test_allowed_token_picker_draws_only_allowed_tokens():
    from benchmarks.grammar_walk import AllowedTokenPicker, structural_token_ids
    from qwenserve.structured_output.vocabulary import MASK_WORDS, allowed_ids, set_bits

    rows = np.zeros((4, MASK_WORDS), dtype=np.int32)
    set_bits(rows[0], [5, 70_000])                         # two ordinary tokens: the fallback finds one
    set_bits(rows[1], structural_token_ids()[:3])          # structural only
    rows[2] = -1                                           # everything (a string's inside)
    set_bits(rows[3], [151643, 151645])                    # only the end tokens (a failed matcher)
    picker = AllowedTokenPicker(seed=0)
    seen = [set() for _ in rows]
    for _ in range(200):
        for i, token in enumerate(picker.pick(rows, [0, 1, 2, 3])):
            seen[i].add(token)
    for i, row in enumerate(rows):
        assert seen[i] <= set(allowed_ids(row).tolist()), i
    assert seen[0] and seen[3] == {151643, 151645}  # (one word: both drawn)
    assert len(seen[2]) > 100 and picker.seconds > 0
    # A subset of the rows, in any order.
    assert picker.pick(rows, [3, 0])[0] in (151643, 151645)


def test_structured_rows_on_the_simulated_device_follow_their_grammar():
    """The simulated sampler computes the real masks for structured rows and draws allowed
    tokens: the outputs are prefixes the grammar accepts, and each structured step adds the
    modelled mask-apply time to the stream."""
    from benchmarks.grammar_walk import BENCH_STRUCTURES
    from qwenserve import StructuredOutput
    from qwenserve.structured_output.compiler import compile_structured_output

    llm = LLM(executor_plugin=PLUGIN, seed=5)
    executor = llm.engine.executor
    spec = StructuredOutput(json_schema=BENCH_STRUCTURES["records"])
    params = [SamplingParams(max_tokens=40, ignore_eos=True, structured_output=spec)] * 3 + [
        SamplingParams(max_tokens=40, ignore_eos=True)]
    prompts = [[100 + i] * 20 for i in range(4)]
    outs = [o.outputs[0] for o in llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)]
    for completion in outs[:3]:  # an array of 100,000 records is never complete: runs to max_tokens
        assert completion.finish_reason == "length" and len(completion.token_ids) == 40
        fresh = compile_structured_output(spec).new_matcher()
        assert fresh.try_consume_tokens(completion.token_ids) == 40 and not fresh.is_error()
        assert completion.text.startswith('[{"id":')
    sampler = executor.worker.runner.sampler
    assert sampler.num_structured_rows == 3 * 40 and sampler.mask_seconds > 0
    plain_steps = sim.step_time_s(80, 80) + sum(sim.step_time_s(4, 80 + 4 * k) for k in range(1, 40))
    assert executor.stream.busy_s == pytest.approx(plain_steps + 40 * sim.H100_7B.mask_apply_time_s(4))
    llm.shutdown()


def test_simulated_device_is_one_gpu():
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        sim.h100_7b_executor(EngineConfig(tensor_parallel_size=2), str(REPO))


# ---------------------------------------------------------------- benchmarks/run.py
def run_bench(tmp_path, *args) -> tuple:
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), *args, "--simulate-device",
                           "h100-7b", "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_offline_on_the_simulated_device(tmp_path):
    result, stdout = run_bench(tmp_path, "offline", "--num-prompts", "6", "--input-len", "16:48",
                               "--output-len", "8")
    ours = result["qwenserve"]
    assert ours["output_tokens"] == 6 * 8 == result["workload"]["total_output_tokens"]
    assert 16 <= result["workload"]["input_len_min"] <= result["workload"]["input_len_max"] <= 48
    assert 0 < ours["device_busy_pct"] <= 100
    assert f"device busy: {ours['device_busy_pct']:.1f}%" in stdout
    assert result["baseline"] is None and result["device"] == "simulated h100-7b"
    assert result["environment"]["device"].startswith("simulated h100-7b")


def test_decode_with_structured_output_on_the_simulated_device(tmp_path):
    result, stdout = run_bench(tmp_path, "decode", "--batch-size", "3", "--input-len", "16", "--output-len", "6",
                               "--structured-output", "records")
    assert result["structured_rows"] == 3 * 6  # every token of the timed run (the warm-up's not)
    assert result["mask_fill_s"] > 0 and result["allowed_draw_s"] > 0
    assert "structured output: 18 masked rows" in stdout and "simulation overhead" in stdout


def test_serve_on_the_simulated_device_reads_busy_from_the_server(tmp_path):
    result, stdout = run_bench(tmp_path, "serve", "--num-prompts", "6", "--input-len", "16:48",
                               "--output-len", "5", "--max-concurrency", "2")
    assert result["max_concurrency"] == 2
    m = result["runs"][0]["metrics"]
    assert (m["completed"], m["failed"]) == (6, 0), m["errors"]
    assert m["output_token_throughput"] * m["duration_s"] == pytest.approx(6 * 5)
    assert 0 < m["device_busy_pct"] <= 100
    assert "device busy:" in stdout


# ---------------------------------------------------------------- the plug-in hook
@pytest.mark.parametrize("value,message", [
    (123, "executor_plugin must be a 'module:callable' string or None, got 123"),
    ("benchmarks.simulated_device", "executor_plugin must look like 'module:callable'"),
    ("no_such_module_qs:make", "executor_plugin 'no_such_module_qs:make': cannot import 'no_such_module_qs' "
                               "(ModuleNotFoundError"),
    ("benchmarks.simulated_device:nope", "module 'benchmarks.simulated_device' has no 'nope'"),
    ("benchmarks.simulated_device:STATS_ENV", "executor_plugin 'benchmarks.simulated_device:STATS_ENV': "
                                              "'STATS_ENV' is not callable"),
])
def test_executor_plugin_validation(value, message):
    with pytest.raises(ValueError) as info:
        EngineConfig(executor_plugin=value)
    assert message in str(info.value)


def test_launch_flag_reaches_the_config(capsys, monkeypatch):
    from qwenserve.server import app
    seen = {}

    def run_server(config, *args, **kwargs):
        seen["config"] = config
        return 0

    monkeypatch.setattr(app, "run_server", run_server)
    code, _, _ = run_cli(capsys, "launch", "--executor-plugin", PLUGIN)
    assert code == 0 and seen["config"].executor_plugin == PLUGIN
    code, out, err = run_cli(capsys, "launch", "--executor-plugin", "no_such_module_qs:make")
    assert code == 2 and "executor_plugin 'no_such_module_qs:make': cannot import" in err
    assert "Traceback" not in err and out == ""
    code, out, _ = run_cli(capsys, "launch", "--help")
    assert "--executor-plugin" not in out  # a benchmark hook, not a user feature
