"""Tensor parallelism on Ray (CPU + gloo): tp = 2 and 4 generate the same greedy tokens as
tp = 1 (structured output too, at tp = 2), each rank loads exactly its slices, invalid tp
sizes fail before Ray starts, and a killed rank fails the engine fast with the rank named.

One Ray session serves the whole module; every executor joins it (and leaves it running).
"""
import os
import signal
import threading

import pytest
import torch
from safetensors import safe_open

from qwenserve import LLM, SamplingParams
from qwenserve.model.config import QwenConfig
from qwenserve.model.loader import checkpoint_files
from qwenserve.model.parallel import TensorParallelGroup, get_tp_group, set_tp_group
from qwenserve.worker.distributed import check_tp_size, valid_tp_sizes

PROMPTS = ["Hello, my name is", "蒙古国的首都是乌兰巴托（Ulaanbaatar）\n冰岛的首都是",
           "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30",
           "a"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
# float32 on the CPU with a small KV cache: equal math up to the reduction order.
ENGINE_KWARGS = dict(device="cpu", dtype="float32", kv_cache_memory=16 * 1024 ** 2, seed=0)


@pytest.fixture(scope="module")
def ray_session(tiny_checkpoint):
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=5, object_store_memory=200 * 1024 ** 2,
             include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tp1_tokens(tiny_checkpoint):
    llm = LLM(tensor_parallel_size=1, **ENGINE_KWARGS)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    finally:
        llm.shutdown()


def _generate_tp(tp: int) -> list[list[int]]:
    llm = LLM(tensor_parallel_size=tp, **ENGINE_KWARGS)
    try:
        assert llm.engine.executor.num_blocks >= 2
        llm.engine.executor.check_health()
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    finally:
        llm.shutdown()


def test_tp2_matches_tp1(ray_session, tp1_tokens):
    assert _generate_tp(2) == tp1_tokens
    # The driver never joined a process group: its layers still see the single-rank group.
    assert get_tp_group().size == 1


def test_tp4_matches_tp1(ray_session, tp1_tokens):
    assert _generate_tp(4) == tp1_tokens


def test_tp2_structured_output_validates_and_equals_tp1(ray_session, tiny_checkpoint, tmp_path_factory):
    """Masks are computed on rank 0 beside the sampler, from the grammar compiled in that actor;
    the closer model (tests/structured_model.py) makes every valid output the mask's doing."""
    import json

    import jsonschema

    from qwenserve import StructuredOutput
    from structured_model import write_closer_model

    closer = write_closer_model(tiny_checkpoint, str(tmp_path_factory.mktemp("closer-model")))
    with open(os.path.join(os.path.dirname(__file__), "data", "json_schemas.json"), encoding="utf-8") as f:
        schemas = {s["name"]: s["schema"] for s in json.load(f)}
    names = ["person", "order", "ref_defs", "matrix"]
    params = [SamplingParams(max_tokens=64, temperature=0.0, structured_output=StructuredOutput(json_schema=schemas[n]))
              for n in names]
    params += [SamplingParams(max_tokens=64, temperature=1.0, seed=i, structured_output=StructuredOutput(
        json_schema=schemas[n])) for i, n in enumerate(names)]
    outputs = {}
    for tp in (1, 2):
        llm = LLM(model=closer, tensor_parallel_size=tp, **ENGINE_KWARGS)
        try:
            outputs[tp] = [o.outputs[0] for o in llm.generate(["Reply in JSON:"] * len(params), params,
                                                              use_tqdm=False)]
        finally:
            llm.shutdown()
    for completion, name in zip(outputs[2], names + names):
        assert completion.finish_reason == "stop", completion
        jsonschema.validate(json.loads(completion.text), schemas[name])
    assert [c.token_ids for c in outputs[2]] == [c.token_ids for c in outputs[1]]


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_through_the_engine_core_process_matches_tp1(tp1_tokens, tp):
    """The engine core in its own process drives its own Ray ranks (a Ray of its own: the core
    process did not inherit this one's), with overlapped steps; tp = 4 is `launch --tp 4`."""
    llm = LLM(tensor_parallel_size=tp, engine_core_process=True, **ENGINE_KWARGS)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == tp1_tokens
    finally:
        llm.shutdown()


# ---------------------------------------------------------------------- sharded loading
def _full_tensors(path: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in checkpoint_files(path):
        with safe_open(os.path.join(path, file), framework="pt") as f:
            # The model loads in float32; the checkpoint's bf16 values convert exactly.
            tensors.update({name: f.get_tensor(name).float() for name in f.keys()})
    return tensors


def _load_rank(path: str, rank: int, size: int):
    """Loads rank `rank` of `size` in-process (loading needs no communication)."""
    from qwenserve.config import EngineConfig
    from qwenserve.worker.worker import Worker

    previous = get_tp_group()
    set_tp_group(TensorParallelGroup(rank=rank, size=size, group=None))
    try:
        worker = Worker(EngineConfig(device="cpu", dtype="float32"), path)
        worker.load_model()
    finally:
        set_tp_group(previous)
    return worker.model


@pytest.mark.parametrize("size", [2, 4])
def test_each_rank_holds_exactly_its_shard(tiny_checkpoint, size, largest_reads):
    cfg = QwenConfig.from_dir(tiny_checkpoint)
    full = _full_tensors(tiny_checkpoint)
    h, width, vocab = cfg.hidden_size, cfg.mlp_width, cfg.vocab_size
    hr, wr, vr = h // size, width // size, vocab // size
    for rank in range(size):
        model = _load_rank(tiny_checkpoint, rank, size)
        heads = slice(rank * hr, (rank + 1) * hr)
        cols = slice(rank * wr, (rank + 1) * wr)
        rows = slice(rank * vr, (rank + 1) * vr)
        assert model.wte.weight.shape == (vr, h)
        torch.testing.assert_close(model.wte.weight, full["transformer.wte.weight"][rows], rtol=0, atol=0)
        assert model.lm_head.weight.shape == (vr, h)
        torch.testing.assert_close(model.lm_head.weight, full["lm_head.weight"][rows], rtol=0, atol=0)
        for i, block in enumerate(model.h):
            p = f"transformer.h.{i}."
            w, b = full[p + "attn.c_attn.weight"], full[p + "attn.c_attn.bias"]
            # q, k, v thirds first, then this rank's heads of each third.
            q_k_v = [slice(t * h + heads.start, t * h + heads.stop) for t in range(3)]
            assert block.attn.c_attn.weight.shape == (3 * hr, h)
            torch.testing.assert_close(block.attn.c_attn.weight, torch.cat([w[s] for s in q_k_v]), rtol=0, atol=0)
            torch.testing.assert_close(block.attn.c_attn.bias, torch.cat([b[s] for s in q_k_v]), rtol=0, atol=0)
            assert block.attn.num_heads == cfg.num_attention_heads // size
            assert block.attn.c_proj.weight.shape == (h, hr)
            torch.testing.assert_close(block.attn.c_proj.weight, full[p + "attn.c_proj.weight"][:, heads],
                                       rtol=0, atol=0)
            assert block.mlp.gate_up.weight.shape == (2 * wr, h)
            up_gate = torch.cat([full[p + "mlp.w1.weight"][cols], full[p + "mlp.w2.weight"][cols]])
            torch.testing.assert_close(block.mlp.gate_up.weight, up_gate, rtol=0, atol=0)
            assert block.mlp.c_proj.weight.shape == (h, wr)
            torch.testing.assert_close(block.mlp.c_proj.weight, full[p + "mlp.c_proj.weight"][:, cols],
                                       rtol=0, atol=0)
        # Sliced reads: no sharded tensor was ever read whole by any rank.
        assert largest_reads, "the loads went through SafetensorsSource.read"
        for name, numel in largest_reads.items():
            if name.endswith(("c_attn.weight", "c_attn.bias", "c_proj.weight", "w1.weight", "w2.weight",
                              "wte.weight", "lm_head.weight")):
                assert numel <= full[name].numel() // size, name


# ---------------------------------------------------------------------- checks
def test_valid_tp_sizes_for_real_presets():
    qwen_7b = QwenConfig(hidden_size=4096, num_attention_heads=32, num_hidden_layers=32,
                         intermediate_size=22016, vocab_size=151936)
    assert valid_tp_sizes(qwen_7b) == [1, 2, 4, 8, 16, 32]
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 does not divide the 32 attention heads; "
                                         r"valid values: 1, 2, 4, 8, 16, 32"):
        check_tp_size(qwen_7b, 3)


@pytest.mark.parametrize("tp", [3, 8])
def test_invalid_tp_fails_before_ray_starts(tiny_checkpoint, tp, monkeypatch):
    from qwenserve.worker import ray_cluster

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for an invalid tensor_parallel_size")

    monkeypatch.setattr(ray_cluster, "init_ray", no_ray)
    monkeypatch.setattr(ray_cluster.ray, "init", no_ray)
    with pytest.raises(ValueError, match=rf"tensor_parallel_size {tp} does not divide the 4 attention "
                                         r"heads; valid values: 1, 2, 4$"):
        LLM(tensor_parallel_size=tp, **ENGINE_KWARGS)


@pytest.mark.parametrize("ray_address, env, expected", [
    ("ray://head:10001", None, "ray://head:10001"),   # --ray-address joins that cluster
    (None, "10.0.0.1:6379", "10.0.0.1:6379"),         # so does $RAY_ADDRESS
    (None, None, "local"),                            # otherwise a small local Ray starts
])
def test_ray_address_choice(ray_address, env, expected, monkeypatch):
    from qwenserve.config import EngineConfig
    from qwenserve.worker import ray_cluster

    calls, checked = [], []
    monkeypatch.setattr(ray_cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_cluster.ray, "init", lambda **kwargs: calls.append(
        dict(kwargs, gcs_wait=os.environ.get("RAY_gcs_server_port_wait_time_s"))))
    monkeypatch.setattr(ray_cluster, "check_reachable", lambda address, setting: checked.append(setting))
    monkeypatch.delenv("RAY_gcs_server_port_wait_time_s", raising=False)
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    assert ray_cluster.init_ray(EngineConfig(ray_address=ray_address), num_cpus=3) is True
    assert calls[0]["address"] == expected
    if expected == "local":
        assert calls[0]["num_cpus"] == 3 and calls[0]["include_dashboard"] is False
        assert checked == [] and calls[0]["gcs_wait"] is None
    else:
        # Joining is bounded: the address is checked first, Ray's GCS connect loop gets one
        # attempt, and the variable is the user's again afterwards.
        assert checked == ["ray_address" if ray_address else "ray_address ($RAY_ADDRESS)"]
        assert calls[0]["gcs_wait"] == "1"
    assert "RAY_gcs_server_port_wait_time_s" not in os.environ


def test_a_local_ray_for_a_loopback_server_listens_on_loopback_only(monkeypatch):
    """Ray's single-node mode, for this process (read at import) and the processes it starts
    (from the environment); joining a cluster leaves both alone."""
    from ray._private import ray_constants

    from qwenserve.config import EngineConfig
    from qwenserve.worker import ray_cluster

    calls = []
    monkeypatch.setattr(ray_cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_cluster.ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray_cluster, "check_reachable", lambda address, setting: None)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    monkeypatch.delenv(ray_cluster.RAY_SINGLE_NODE_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_cluster.init_ray(EngineConfig(ray_local_loopback=True, ray_address="10.0.0.1:6379"), num_cpus=2)
    assert ray_cluster.RAY_SINGLE_NODE_ENV not in os.environ and ray_constants.ENABLE_RAY_CLUSTER
    ray_cluster.init_ray(EngineConfig(ray_local_loopback=False), num_cpus=2)
    assert ray_cluster.RAY_SINGLE_NODE_ENV not in os.environ and ray_constants.ENABLE_RAY_CLUSTER
    ray_cluster.init_ray(EngineConfig(ray_local_loopback=True), num_cpus=2)
    assert os.environ[ray_cluster.RAY_SINGLE_NODE_ENV] == "0" and not ray_constants.ENABLE_RAY_CLUSTER
    assert [c["address"] for c in calls] == ["10.0.0.1:6379", "local", "local"]


@pytest.mark.parametrize("address, expected", [
    ("10.0.0.1:6379", ("10.0.0.1", 6379)), ("ray://head:10001", ("head", 10001)),
    ("[::1]:6379", ("::1", 6379)), ("auto", None), ("head", None),
])
def test_ray_address_split(address, expected):
    from qwenserve.worker import ray_cluster

    assert ray_cluster.split_address(address) == expected


def _llm_in_subprocess(ray_address: str, timeout: float):
    """LLM(tensor_parallel_size=2, ray_address=...) in a fresh process, where no Ray session of
    this module answers instead: (seconds it took, exit code, output)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])
    code = f"from qwenserve import LLM; LLM(tensor_parallel_size=2, ray_address={ray_address!r}, device='cpu')"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return time.monotonic() - start, proc.returncode, proc.stdout + proc.stderr


@pytest.mark.timeout(90)  # before the fix ray.init waited for this address for ~15 minutes
def test_ray_address_where_nothing_listens_fails_fast_naming_it():
    pytest.importorskip("ray")
    elapsed, code, output = _llm_in_subprocess("127.0.0.1:1", timeout=60)
    assert code != 0, output
    assert "ConnectionError: ray_address: cannot reach a Ray cluster at '127.0.0.1:1'" in output, output
    assert elapsed < 30, output


@pytest.mark.timeout(240)
def test_ray_address_of_something_that_is_not_ray_fails_naming_it():
    """A listener that accepts and never speaks: the TCP check passes, Ray's own connect loop is
    what must give up (one attempt, ~40 s, instead of 20)."""
    import socket

    pytest.importorskip("ray")
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))  # Ray dials this node's IP for 127.0.0.1
    listener.listen(64)
    held = []

    def accept():
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:  # closed
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        port = listener.getsockname()[1]
        elapsed, code, output = _llm_in_subprocess(f"127.0.0.1:{port}", timeout=200)
    finally:
        listener.close()
        for conn in held:
            conn.close()
    assert code != 0, output
    assert f"ConnectionError: ray_address: could not join the Ray cluster at '127.0.0.1:{port}'" in output, output
    assert elapsed < 90, output


@pytest.mark.parametrize("device, gpus, expected", [
    ("cpu", 8, False), ("auto", 0, False), ("auto", 2, True), ("cuda", 4, True),
    ("auto", 1, ValueError), ("cuda", 0, ValueError),
])
def test_gpu_ranks_choice(device, gpus, expected, monkeypatch):
    from qwenserve.config import EngineConfig
    from qwenserve.worker import ray_cluster

    monkeypatch.setattr(ray_cluster.ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": float(gpus)})
    config = EngineConfig(device=device, tensor_parallel_size=2)
    if expected is ValueError:
        with pytest.raises(ValueError, match=r"tensor_parallel_size 2 on CUDA needs 2 GPUs"):
            ray_cluster.use_gpus(config, 2, "tensor_parallel_size 2")
    else:
        assert ray_cluster.use_gpus(config, 2, "tensor_parallel_size 2") is expected


def test_bad_setting_in_a_rank_is_a_value_error(ray_session):
    # 1 KB of KV cache holds no block: each rank refuses, as the tp = 1 worker does.
    with pytest.raises(ValueError, match=r"rank 0 failed while loading the model: .*fewer than 2 blocks"):
        LLM(tensor_parallel_size=2, **{**ENGINE_KWARGS, "kv_cache_memory": 1024})


# ---------------------------------------------------------------------- faults
KILL_AT_STEP = 3  # step 0 is the prefill of the 4 prompts; the decode loop runs from step 1


@pytest.mark.timeout(300)  # failing "fast" means not hanging: a hang is this timeout's to catch
@pytest.mark.parametrize("victim", [1, 0])
def test_killed_worker_fails_fast_naming_the_rank(ray_session, victim):
    llm = LLM(tensor_parallel_size=2, **ENGINE_KWARGS)
    executor = llm.engine.executor
    pids = executor.worker_pids()
    long_run = SamplingParams(max_tokens=4000, temperature=0.0, ignore_eos=True)
    steps = []  # what each execute_model call did: "ok" or the error it raised
    real_execute_model = executor.execute_model

    def execute_model(scheduler_output):
        if len(steps) == KILL_AT_STEP:  # mid-generation, between two decode steps
            os.kill(pids[victim], signal.SIGKILL)
        try:
            result = real_execute_model(scheduler_output)
        except Exception as e:
            steps.append(e)
            raise
        steps.append("ok")
        return result

    executor.execute_model = execute_model  # what LLMEngine.step calls
    try:
        with pytest.raises(RuntimeError, match=rf"rank {victim} died"):
            llm.generate(["Hello"] * 4, long_run, use_tqdm=False)
        # The very step after the kill raised: nothing waited on the dead rank for a reply.
        assert steps[:KILL_AT_STEP] == ["ok"] * KILL_AT_STEP
        assert len(steps) == KILL_AT_STEP + 1 and isinstance(steps[-1], RuntimeError), steps
        with pytest.raises(RuntimeError, match=rf"rank {victim}"):
            executor.check_health()
        with pytest.raises(RuntimeError, match=rf"rank {victim}"):  # stays failed, never hangs
            llm.generate(["Hello"], GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()  # returns although a rank is dead (a hang is the timeout's)


# ---------------------------------------------------------------------- the step channel
def _channel_with_ranks(handlers, die: threading.Event = None):
    """A driver-side StepChannel on localhost with one thread per rank running `serve_steps`
    (a handler of None: a fake rank that says hello, takes one frame and closes its socket,
    at once or once `die` is set). `served` holds each real rank's step count, or the OSError
    of a reply sent after the test closed the channel."""
    import socket as socket_module

    from qwenserve.worker import step_channel

    channel = step_channel.StepChannel("127.0.0.1", len(handlers))
    served = {}

    def fake_dying_rank(rank):
        sock = socket_module.create_connection(channel.address)
        sock.sendall(channel.authkey + step_channel._RANK.pack(rank))
        step_channel._recv_frame(sock)
        if die is not None:
            die.wait()  # dies mid-step, when the test says so
        sock.close()  # what the kernel does when the rank's process is killed

    def run(rank, handler):
        if handler is None:
            fake_dying_rank(rank)
            return
        try:
            served[rank] = step_channel.serve_steps(channel.address, channel.authkey, rank, handler)
        except OSError as e:  # a handler released after the test closed the channel
            served[rank] = e

    threads = [threading.Thread(target=run, args=(r, h), daemon=True) for r, h in enumerate(handlers)]
    for t in threads:
        t.start()
    channel.accept(timeout=300)  # a hang guard only: pytest's timeout ends a hung test first
    return channel, threads, served


def _scheduler_output():
    from qwenserve.scheduler.output import CachedRequestData, NewRequestData, SchedulerOutput

    new = NewRequestData("a", [1, 2, 3], [], [1, 2], 0, 1.0, SamplingParams(max_tokens=3), [7])
    cached = CachedRequestData("b", [42], [5], 17)
    return SchedulerOutput([new], [cached], {"b": 1, "a": 3}, ["c"], ["d"])


@pytest.mark.timeout(60)
def test_step_channel_round_trip():
    from qwenserve.worker.model_runner import ModelRunnerOutput

    received = {0: [], 1: [], 2: []}

    def handler(rank):
        def run(out):
            received[rank].append(out)
            return ModelRunnerOutput(request_ids=list(out.num_scheduled_tokens), sampled_token_ids=[rank, 9])
        return run

    channel, threads, served = _channel_with_ranks([handler(r) for r in range(3)])
    try:
        out = _scheduler_output()
        for _ in range(3):
            result = channel.step(out)
            # Rank 0's output comes back; every rank got an equal SchedulerOutput.
            assert result == ModelRunnerOutput(request_ids=["b", "a"], sampled_token_ids=[0, 9])
        for rank in range(3):
            assert received[rank] == [out] * 3
            assert list(received[rank][0].num_scheduled_tokens) == ["b", "a"]  # batch order kept
    finally:
        channel.close()
    for t in threads:
        t.join()  # closing the channel ends every rank's loop (a hang is the timeout's)
    assert served == {0: 3, 1: 3, 2: 3}


@pytest.mark.timeout(60)
def test_step_channel_returns_a_ranks_exception_with_its_rank():
    from qwenserve.worker.step_channel import RankError

    def fails(out):
        raise ValueError("boom in the step")

    channel, threads, _ = _channel_with_ranks([lambda out: "fine", fails])
    try:
        with pytest.raises(RankError) as info:
            channel.step(_scheduler_output())
        assert info.value.rank == 1 and not info.value.died
        assert "Traceback" in info.value.detail and "ValueError: boom in the step" in info.value.detail
    finally:
        channel.close()


@pytest.mark.timeout(60)  # a step that waited for the blocked rank 0 would hang
@pytest.mark.parametrize("peer", ["blocked", "errors first"])
def test_step_channel_eof_names_the_dead_rank(peer):
    from qwenserve.worker.step_channel import RankError

    release, returned, failed = threading.Event(), threading.Event(), threading.Event()
    die = threading.Event() if peer == "errors first" else None  # "blocked": rank 1 dies at once

    def rank0(out):
        if peer == "blocked":
            release.wait()  # stuck in a collective with the dead rank until the test ends
            returned.set()
            return "late"
        # A broken collective reported before the peer's death shows: the dead rank is named.
        failed.set()
        raise RuntimeError("gloo: connection closed by peer")

    def dead_ranks():
        # Asked when rank 0's error has come in (or no rank answered yet): only once rank 0
        # has failed does rank 1 die, so its death shows after rank 0's error.
        if failed.is_set():
            die.set()
        return {}

    channel, _, _ = _channel_with_ranks([rank0, None], die=die)
    try:
        with pytest.raises(RankError, match=r"rank 1 died") as info:
            channel.step(_scheduler_output(), dead_ranks=dead_ranks)
        assert info.value.rank == 1 and info.value.died
        if peer == "blocked":
            assert not returned.is_set()  # raised while rank 0 was still blocked
        else:
            assert die.is_set()  # rank 1 died only after the driver had rank 0's error
    finally:
        channel.close()
        release.set()
        if die is not None:
            die.set()


@pytest.mark.timeout(60)
def test_executor_names_the_rank_and_its_traceback():
    from qwenserve.worker.ray_executor import RayExecutor

    def fails(out):
        raise KeyError("missing request")

    channel, _, _ = _channel_with_ranks([lambda out: None, fails])
    executor = RayExecutor.__new__(RayExecutor)  # only the step path: no Ray, no model
    executor._failure, executor._channel, executor._serve_refs = None, channel, []
    try:
        with pytest.raises(RuntimeError, match=r"(?s)rank 1 failed while executing a step:\n"
                                               r"Traceback.*KeyError: 'missing request'"):
            executor.execute_model(_scheduler_output())
        with pytest.raises(RuntimeError, match=r"rank 1 failed"):  # stays failed
            executor.execute_model(_scheduler_output())
    finally:
        channel.close()


@pytest.mark.timeout(60)  # a step that waited for a reply would hang
def test_step_channel_asks_for_ranks_lost_without_eof():
    # A lost node may leave its socket open: Ray's word on the actor (`dead_ranks`) names it.
    from qwenserve.worker.step_channel import RankError

    release, returned = threading.Event(), threading.Event()

    def blocked(out):
        release.wait()  # neither rank replies nor closes its socket until the test ends
        returned.set()

    asked = []

    def dead_ranks():
        asked.append(True)
        return {1: (True, "the actor died")}

    channel, _, _ = _channel_with_ranks([blocked, blocked])
    try:
        with pytest.raises(RankError, match=r"rank 1 died: the actor died") as info:
            channel.step(_scheduler_output(), dead_ranks=dead_ranks)
        assert info.value.rank == 1 and info.value.died and asked
        assert not returned.is_set()  # no rank answered: the death came from dead_ranks alone
    finally:
        channel.close()
        release.set()


@pytest.mark.timeout(300)  # the failure this guards against is a server that never exits
def test_tp_server_exits_when_the_whole_process_group_is_signalled(tiny_checkpoint):
    """Ctrl-C or a service manager's SIGTERM reaches the local raylet too; the server must still
    exit (0) instead of blocking forever in Ray's teardown."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("ray")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "qwenserve.cli", "launch", "--port", "0", "--tp", "2", "--device", "cpu",
         "--model", tiny_checkpoint, "--max-model-len", "256", "--kv-cache-memory", "32MiB"],
        cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        line = ""
        for line in proc.stdout:  # ends at the first "ready" line, or when the server exits
            if "ready" in line:
                break
        assert "ready" in line, line
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait() == 0  # exits at all (a hang is the timeout's), and cleanly
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.timeout(300)
def test_a_local_ray_cluster_listens_on_loopback_when_the_server_does(tiny_checkpoint):
    """`launch --tp 2 --host 127.0.0.1` starts its own Ray: every TCP socket that the server, the
    local Ray (GCS, raylet, object manager, agents, workers) and the ranks (the torch.distributed
    store, gloo) listen on is on the loopback address, not on every interface."""
    import subprocess
    import sys
    from pathlib import Path

    from listening_sockets import is_loopback, listening, process_tree

    pytest.importorskip("ray")
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local cluster, not one to join
    env["PYTHONPATH"] = os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "qwenserve.cli", "launch", "--port", "0", "--tp", "2", "--device", "cpu",
         "--host", "127.0.0.1", "--model", tiny_checkpoint, "--max-model-len", "256", "--kv-cache-memory", "32MiB"],
        cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        line = ""
        for line in proc.stdout:  # ends at the first "ready" line, or when the server exits
            if "ready" in line:
                break
        assert "ready" in line, line
        sockets = listening(process_tree(proc.pid))
        # Whole command lines: a long install path puts "gcs_server" past any fixed cut.
        names = {pid: open(f"/proc/{pid}/cmdline").read().replace("\0", " ") for _, _, pid in sockets}
        # Premise: the check saw the server, Ray's own processes and both ranks.
        assert sum("RankWorker" in name for name in names.values()) == 2, names  # one process per rank
        assert any("gcs_server" in name for name in names.values()) and any("raylet" in name for name in names.values())
        exposed = [(address, port, names[pid]) for address, port, pid in sockets if not is_loopback(address)]
        assert exposed == []
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.1.2.3", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("192.0.2.2", False), ("example.com", False),
])
def test_launch_keeps_a_local_ray_on_loopback_exactly_when_its_host_is_loopback(host, loopback):
    from qwenserve.cli import build_parser
    from qwenserve.server.commands import engine_config_from_args

    args = build_parser().parse_args(["launch", "--host", host])
    assert engine_config_from_args(args).ray_local_loopback is loopback
